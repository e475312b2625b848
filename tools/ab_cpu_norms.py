#!/usr/bin/env python
"""Model-level A/B of the CPU norm kernels: the same model in one process, decode and prefill
timed with the C++ kernels (kernels/cpu.py) and with the torch code (kernels.torch_path()),
interleaved so that a noisy machine's drift falls on both alike. Median [min-max] of --rounds.

    python tools/ab_cpu_norms.py --dtype bfloat16 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import minillama
from minillama.assets import default_model_dir
from minillama.generate import generate
from minillama.kernels import torch_path


def run(model: torch.nn.Module, prompt: torch.Tensor, ids: torch.Tensor, new: int,
        path) -> tuple[float, float]:
    """(decode tok/s, prefill tok/s) on one path."""
    with path(), torch.inference_mode():
        t = time.perf_counter()
        generate(model, prompt, new + 1, eos_token_id=[])
        full = time.perf_counter() - t
        t = time.perf_counter()
        generate(model, prompt, 1, eos_token_id=[])
        one = time.perf_counter() - t
        t = time.perf_counter()
        generate(model, ids, 1, eos_token_id=[])
        prefill = time.perf_counter() - t
    return new / (full - one), ids.shape[1] / prefill


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    model = minillama.from_pretrained(args.model or default_model_dir(), dtype=args.dtype)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.prefill), generator=torch.Generator().manual_seed(0))
    prompt = ids[:, :16]
    paths = {"kernels": contextlib.nullcontext, "torch code": torch_path}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for path in paths.values():  # warm-up
        run(model, prompt, ids, args.new_tokens, path)
    for _ in range(args.rounds):
        for name, path in paths.items():
            results[name].append(run(model, prompt, ids, args.new_tokens, path))
    print(f"# {args.dtype}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    for name, rows in results.items():
        dec, pre = [r[0] for r in rows], [r[1] for r in rows]
        print(f"{name:10} decode {statistics.median(dec):.2f} tok/s [{min(dec):.2f}-{max(dec):.2f}]  "
              f"prefill {statistics.median(pre):.1f} tok/s [{min(pre):.1f}-{max(pre):.1f}]")


if __name__ == "__main__":
    main()
