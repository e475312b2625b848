"""Run by tests/test_distributed.py under torchrun: FSDP2 (fully_shard) on the CPU over gloo.

Accelerate runs FSDP only on GPUs, so this drives torch's fully_shard directly, with a stand-in
for the few Accelerator members the checkpoint and export code use. Checks that a checkpoint of a
sharded model resumes exactly and that the export gathers the shards into the right weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from minillama import ModelConfig, Transformer, from_pretrained
from minillama.loss import shift_labels
from minillama.train.checkpointing import load_checkpoint, save_checkpoint
from minillama.train.config import FinetuneConfig
from minillama.train.loop import export_model

CFG = ModelConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


class Processes:
    """The Accelerator members that save_checkpoint / load_checkpoint / export_model use."""

    def __init__(self) -> None:
        self.process_index, self.num_processes = dist.get_rank(), dist.get_world_size()
        self.is_main_process = self.process_index == 0

    def wait_for_everyone(self) -> None:
        dist.barrier()

    def unwrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = Transformer(CFG)
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(step * 10 + dist.get_rank()))


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, step: int) -> float:
    ids = batch(step)
    loss = model(ids, labels=shift_labels(ids))
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return loss.item()


def main() -> None:
    dist.init_process_group("gloo")
    out = Path(sys.argv[1])
    procs = Processes()
    model, optimizer, scheduler = build()
    for step in range(3):
        train(model, optimizer, scheduler, step)
    save_checkpoint(procs, model, optimizer, scheduler, out / "checkpoints", 3, {}, keep_last=2)
    straight = [train(model, optimizer, scheduler, s) for s in range(3, 6)]
    model2, optimizer2, scheduler2 = build()
    load_checkpoint(procs, model2, optimizer2, scheduler2, out / "checkpoints/step-000003")
    resumed = [train(model2, optimizer2, scheduler2, s) for s in range(3, 6)]

    export_model(procs, model2, FinetuneConfig(), CFG, {}, None, out / "final")
    ids = batch(99)
    with torch.no_grad():
        sharded = model2(ids)  # collective: every process runs it
    exported = from_pretrained(out / "final")(ids)
    result = {"rank": procs.process_index, "resume_equal": straight == resumed,
              "export_max_diff": float((exported - sharded).abs().max())}
    (out / f"result-{procs.process_index}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
