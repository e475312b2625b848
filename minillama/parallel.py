"""Tensor-parallel inference: each of N processes holds 1/N of every projection (gpt-fast's layout).

Column-parallel: the fused q/k/v and gate/up projections are split by output rows, so a process
owns whole attention heads (num_attention_heads/N query heads and num_key_value_heads/N key/value
heads: its KV cache holds only its own heads) and 1/N of the MLP's hidden units. Row-parallel: the
attention output and down projections are split by input columns; their partial products are
summed over the processes (one all-reduce per sublayer) before the replicated bias is added.
Embeddings, norms and lm_head are replicated: every process computes the same logits and, with
the same seed, samples the same token, so generation runs unchanged on every process.

A shard is just a smaller model: the local config divides the head counts and the MLP width by
N, and `from_pretrained(..., tensor_parallel=True)` reads only this process's rows or columns of
each tensor from the safetensors files, so no process ever holds the whole model. Launch N
processes with `torchrun` or `accelerate launch` (gloo on CPUs, NCCL on GPUs).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import ModelConfig
from .errors import ConfigError
from .linear import Linear

# The projections whose partial products are summed (input columns split across processes).
ROW_PARALLEL = ("attn.wo", "mlp.w_down")


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """(this process's rank, number of processes) in `group` (the default group when None)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("tensor parallelism needs torch.distributed: launch the processes with torchrun or "
                          "accelerate launch")
    return dist.get_rank(group), dist.get_world_size(group)


# What a shard divides, and how an error names it.
SHARDED = {"num_attention_heads": "{} attention heads", "num_key_value_heads": "{} KV heads",
           "intermediate_size": "the MLP width {}"}


def tp_sizes(cfg: ModelConfig) -> list[int]:
    """The process counts a model shards over: those dividing both head counts and the MLP width."""
    common = math.gcd(*(getattr(cfg, name) for name in SHARDED))
    return [n for n in range(1, common + 1) if common % n == 0]


def shard_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The config of one process's shard: heads and MLP width divided by `world`."""
    bad = [name for name in SHARDED if getattr(cfg, name) % world]
    if bad:
        what = " / ".join(SHARDED[name].format(getattr(cfg, name)) for name in bad)
        needs = " and ".join(f"{name} ({getattr(cfg, name)})" for name in bad)
        raise ConfigError(f"--tp {world} ({world} processes) does not divide {what}: tensor parallelism needs "
                          f"{needs} divisible by {world}; process counts that work for this model: "
                          f"{', '.join(map(str, tp_sizes(cfg)))}")
    return dataclasses.replace(
        cfg, num_attention_heads=cfg.num_attention_heads // world, num_key_value_heads=cfg.num_key_value_heads // world,
        intermediate_size=cfg.intermediate_size // world, head_dim=cfg.head_dim)


def shard_selector(cfg: ModelConfig, rank: int, world: int) -> Any:
    """For load_weights: which rows (column-parallel) or columns (row-parallel) of each HF tensor
    process `rank` of `world` reads; replicated tensors are read whole."""
    hd = cfg.head_dim
    rows = {"q_proj": cfg.num_attention_heads // world * hd, "k_proj": cfg.num_key_value_heads // world * hd,
            "v_proj": cfg.num_key_value_heads // world * hd, "gate_proj": cfg.intermediate_size // world,
            "up_proj": cfg.intermediate_size // world}
    columns = {"o_proj": cfg.num_attention_heads // world * hd, "down_proj": cfg.intermediate_size // world}

    def select(key: str, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
        parts = key.split(".")
        proj, param = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", "")
        if proj in rows:
            n = rows[proj]
            return (slice(rank * n, (rank + 1) * n),)
        if proj in columns and param == "weight":
            n = columns[proj]
            return (slice(None), slice(rank * n, (rank + 1) * n))
        return None  # embeddings, norms, lm_head, row-parallel biases: replicated

    return select


class RowParallelLinear(Linear):
    """A Linear holding a slice of the input columns: partial products summed over the group,
    then the (replicated) bias added once."""

    group: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed import _functional_collectives as funcol

        # The functional all-reduce is traceable, so a compiled decode step keeps it in its graph.
        y = funcol.all_reduce(self.matmul(x, None), "sum", self.group if self.group is not None else
                              dist.group.WORLD)
        return y if self.bias is None else y + self.bias


def make_row_parallel(model: nn.Module, group: Any = None) -> None:
    """Turn every block's output projections into RowParallelLinear (same parameters), in place."""
    for block in model.layers:
        for name in ROW_PARALLEL:
            layer = block.get_submodule(name)
            layer.__class__ = RowParallelLinear
            layer.group = group


def is_tensor_parallel(model: nn.Module) -> bool:
    """True for a shard made by from_pretrained(..., tensor_parallel=True)."""
    return any(isinstance(m, RowParallelLinear) for m in model.modules())
