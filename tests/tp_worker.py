"""Run by tests/test_distributed.py under 2 processes: tensor-parallel shards against the whole model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from minillama import from_pretrained, generate
from minillama.dist import finish, process_state


def projection_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if name.endswith("weight") and any(k in name for k in ("wqkv", "wo", "w_gate_up", "w_down")))


def main(out: str, *model_dirs: str) -> None:
    process_state()  # joins the process group accelerate launch set up (gloo on the CPU)
    rank = dist.get_rank()
    results = []
    for i, model_dir in enumerate(model_dirs):
        shard = from_pretrained(model_dir, tensor_parallel=True)
        full = from_pretrained(model_dir)
        ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
        prompts = [[5, 9, 3, 7, 1, 2, 8], [4, 6]]
        with torch.no_grad():
            diff = (shard(ids) - full(ids)).abs().max().item()
        tokens = generate(shard, prompts, 10, eos_token_id=[])
        results.append({
            "model": model_dir, "max_logit_diff": diff,
            "same_tokens": torch.equal(tokens, generate(full, prompts, 10, eos_token_id=[])),
            # the compiled shard once (the first model): each compilation costs CI ~10 s per process
            "same_tokens_compiled": i > 0 or torch.equal(generate(shard, prompts, 10, eos_token_id=[], compile=True),
                                                         tokens),
            "tokens": tokens.tolist(), "shard_bytes": projection_bytes(shard), "full_bytes": projection_bytes(full),
            "local_heads": [shard.config.num_attention_heads, shard.config.num_key_value_heads],
            "kv_cache_heads": shard.kv_cache.k.shape[1],
        })
    Path(f"{out}.{rank}.json").write_text(json.dumps(results))
    finish(0)


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
