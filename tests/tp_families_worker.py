"""Run by tests/test_tp_families.py under 2 processes: each family's tiny model, sharded, against the
whole model in the same process.

Writes `{out}.{rank}.json` (per model: the largest logit difference, whether greedy generation
gives the same tokens, or the ConfigError with which from_pretrained refused to shard it) and
`{out}.{rank}.pt` (each shard's logits for IDS, which the test compares with transformers')."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from minillama import from_pretrained, generate
from minillama.dist import finish, process_state
from minillama.errors import ConfigError

IDS = [[5, 9, 3, 7, 1, 2, 8, 11, 4], [4, 6, 100, 27, 3, 3, 90, 12, 8]]
PROMPTS = [[5, 9, 3, 7, 1, 2, 8], [4, 6]]


def main(out: str, *model_dirs: str) -> None:
    process_state()  # joins the process group accelerate launch set up (gloo on the CPU)
    rank = dist.get_rank()
    results, logits = [], {}
    ids = torch.tensor(IDS)
    for model_dir in model_dirs:
        try:
            shard = from_pretrained(model_dir, tensor_parallel=True)
        except ConfigError as e:
            results.append({"model": model_dir, "refused": str(e)})
            continue
        full = from_pretrained(model_dir)
        with torch.no_grad():
            logits[model_dir] = shard(ids)
            diff = (logits[model_dir] - full(ids)).abs().max().item()
        tokens = generate(shard, PROMPTS, 8, eos_token_id=[])
        results.append({"model": model_dir, "max_logit_diff": diff, "tokens": tokens.tolist(),
                        "same_tokens": torch.equal(tokens, generate(full, PROMPTS, 8, eos_token_id=[])),
                        "local_heads": [shard.config.num_attention_heads, shard.config.num_key_value_heads],
                        "kv_cache_heads": shard.kv_cache.k.shape[1]})
    torch.save(logits, f"{out}.{rank}.pt")
    Path(f"{out}.{rank}.json").write_text(json.dumps(results))
    finish(0)


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
