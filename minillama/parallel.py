"""Tensor-parallel inference: each of N processes holds 1/N of every projection (gpt-fast's layout).

Column-parallel: the fused q/k/v and gate/up projections are split by output rows, so a process
owns whole attention heads (num_attention_heads/N query heads and num_key_value_heads/N key/value
heads: its KV cache holds only its own heads) and 1/N of the MLP's hidden units. Row-parallel: the
attention output and down projections are split by input columns; their partial products are
summed over the processes (one all-reduce per sublayer) before the replicated bias is added.
Embeddings, norms and lm_head are replicated: every process computes the same logits and, with
the same seed, samples the same token, so generation runs unchanged on every process. One norm
is split with its projection: a q/k norm over the whole projection (OLMo 2, qk_norm "proj")
holds this process's slice of the gain and sums its statistics over the processes
(ProjectionRMSNorm); norms over each head (Qwen3, Gemma 3) are replicated like the others.

Biases follow their rows: q/k/v biases (Qwen2) are split with the q/k/v rows; a row-parallel
projection's bias is added once, after the all-reduce. A checkpoint with fused q/k/v or gate/up
tensors (Phi-3's qkv_proj, gate_up_proj) gives each process several row ranges of one tensor:
the selector returns a list of them, which load_weights reads and concatenates.

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
from .norms import NORMS, RMSNorm, parse_norm

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
    if world > 1 and cfg.qk_norm == "proj" and not _splits_over_features(cfg.norm):
        raise ConfigError(f"--tp {world}: {cfg.model_type}'s q/k norms span the whole projection, which "
                          f"tensor parallelism splits; norm {cfg.norm!r} cannot be computed from split "
                          "features (an RMSNorm can: use the checkpoint's own norm)")
    return dataclasses.replace(
        cfg, num_attention_heads=cfg.num_attention_heads // world, num_key_value_heads=cfg.num_key_value_heads // world,
        intermediate_size=cfg.intermediate_size // world, head_dim=cfg.head_dim)


def _splits_over_features(norm: str) -> bool:
    """Whether ProjectionRMSNorm computes norm `norm` from split features: transformers' RMSNorm."""
    cls = NORMS[parse_norm(norm)[0]]
    return issubclass(cls, RMSNorm) and cls.hf_compatible


def _row_ranges(sizes: tuple[int, ...], rank: int, world: int) -> list[tuple[slice, ...]]:
    """Process `rank`'s rows of a tensor whose rows are blocks of `sizes` (q, k, v), each split in
    `world` equal parts: one range per block, adjacent ones merged."""
    ranges: list[tuple[int, int]] = []
    offset = 0
    for size in sizes:
        n = size // world
        start, stop = offset + rank * n, offset + (rank + 1) * n
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], stop)
        else:
            ranges.append((start, stop))
        offset += size
    return [(slice(start, stop),) for start, stop in ranges]


def shard_selector(cfg: ModelConfig, rank: int, world: int) -> Any:
    """For load_weights: which rows (column-parallel) or columns (row-parallel) of each HF tensor
    process `rank` of `world` reads; replicated tensors are read whole. A fused tensor's rows are
    several ranges (this process's q, k and v rows of a qkv_proj): a list of indices."""
    hd = cfg.head_dim
    q, kv, inter = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
    # HF tensor -> the sizes of the row blocks it stacks, each split across the processes.
    rows = {"q_proj": (q,), "k_proj": (kv,), "v_proj": (kv,), "gate_proj": (inter,), "up_proj": (inter,),
            "qkv_proj": (q, kv, kv), "gate_up_proj": (inter, inter)}
    if cfg.qk_norm == "proj":  # the gain over the whole projection: sliced as the projection's rows
        rows.update(q_norm=(q,), k_norm=(kv,))
    columns = {"o_proj": q // world, "down_proj": inter // world}

    def select(key: str, shape: tuple[int, ...]) -> tuple[slice, ...] | list[tuple[slice, ...]] | None:
        parts = key.split(".")
        proj, param = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", "")
        if proj in rows:
            ranges = _row_ranges(rows[proj], rank, world)
            return ranges[0] if len(ranges) == 1 else ranges
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
        bias = self.bias_tensor()
        return y if bias is None else y + bias


class ProjectionRMSNorm(RMSNorm):
    """An RMSNorm over features split across the group (OLMo 2's q/k norm over the whole
    projection, whose heads the processes share out): this process's slice of the gain, the mean
    square of all the features (squares summed here, then over the group), transformers' numerics."""

    group: Any = None
    features: int = 0  # over the whole group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed import _functional_collectives as funcol

        x32 = x.float()
        squares = funcol.all_reduce(x32.pow(2).sum(-1, keepdim=True), "sum",
                                    self.group if self.group is not None else dist.group.WORLD)
        return self._gain(x32 * torch.rsqrt(squares / self.features + self.eps), x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, of {self.features} features over the group"


def make_row_parallel(model: nn.Module, group: Any = None) -> None:
    """Turn every block's output projections into RowParallelLinear (same parameters), and q/k
    norms over the whole projection into ProjectionRMSNorm, in place."""
    world = dist.get_world_size(group)
    for block in model.layers:
        for name in ROW_PARALLEL:
            layer = block.get_submodule(name)
            layer.__class__ = RowParallelLinear
            layer.group = group
        if getattr(block.attn, "qk_norm", None) == "proj" and world > 1:
            for norm in (block.attn.q_norm, block.attn.k_norm):
                if not (isinstance(norm, RMSNorm) and norm.hf_compatible):  # shard_config refuses these
                    raise ConfigError(f"tensor parallelism cannot split {type(norm).__name__} over features")
                norm.__class__ = ProjectionRMSNorm
                norm.group, norm.features = group, norm.weight.shape[0] * world


def is_tensor_parallel(model: nn.Module) -> bool:
    """True for a shard made by from_pretrained(..., tensor_parallel=True)."""
    return any(isinstance(m, RowParallelLinear) for m in model.modules())
