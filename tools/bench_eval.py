#!/usr/bin/env python
"""lm-eval loglikelihood throughput: minillama's in-process backend against lm-eval's own `hf` backend
(transformers), same checkpoint, same requests, same process, interleaved repeats.

The requests are the shipped multiple-choice task's (configs/eval/mc.jsonl: 40 questions x 4
choices, as lm-eval's task asks them); each repeat scores all of them with both backends and the
per-request loglikelihoods are checked to agree. Reported: requests/s and scored tokens/s (context
+ continuation, as the `hf` backend feeds them), median [min-max] over repeats, and the ratio.

    python tools/bench_eval.py                                  # SmolLM2 bf16, batch 16 (both backends)
    python tools/bench_eval.py --dtype float32 --batch-size 8 --repeats 5 --json eval.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from benchutil import write_json

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF checkpoint directory (default: the embedded SmolLM2)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()

    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import minillama
    from minillama.evaluate import MinillamaLM
    from minillama.hub import model_path

    path = model_path(args.model)
    tok = minillama.load_tokenizer(path)
    dtype = getattr(torch, args.dtype)
    ours = MinillamaLM(model=minillama.from_pretrained(path, dtype=args.dtype), tokenizer=tok,
                       batch_size=args.batch_size)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    theirs = HFLM(pretrained=hf_model, tokenizer=tok, batch_size=args.batch_size, device="cpu")
    docs = [json.loads(line) for line in (ROOT / "configs/eval/mc.jsonl").read_text().splitlines()]
    requests = [Instance("loglikelihood", {}, (f"Question: {d['question']}\nAnswer:", f" {c}"), i)
                for d in docs for i, c in enumerate(d["choices"])]
    tokens = sum(len(tok(ctx + cont).input_ids) for ctx, cont in (r.args for r in requests))
    times: dict[str, list[float]] = {"minillama": [], "transformers (lm-eval hf)": []}
    worst = 0.0
    with torch.inference_mode():
        for _ in range(args.repeats + 1):  # the first round warms both up and is not counted
            results = []
            for name, lm in zip(times, (ours, theirs)):
                start = time.perf_counter()
                results.append(lm.loglikelihood(requests, disable_tqdm=True))
                times[name].append(time.perf_counter() - start)
            worst = max(worst, max(abs(a[0] - b[0]) for a, b in zip(*results)))
    rows = {}
    print(f"{len(requests)} requests, {tokens} tokens, {args.dtype}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads; largest loglikelihood difference {worst:.2e}")
    print("| backend | requests/s | tokens/s | x hf |\n|---|---|---|---|")
    base = statistics.median(times["transformers (lm-eval hf)"][1:])
    for name, ts in times.items():
        ts = ts[1:]
        med = statistics.median(ts)
        rows[name] = {"seconds": ts, "requests_per_s": len(requests) / med, "tokens_per_s": tokens / med}
        print(f"| {name} | {len(requests) / med:.1f} [{len(requests) / max(ts):.1f}-{len(requests) / min(ts):.1f}] "
              f"| {tokens / med:.0f} | {base / med:.2f} |")
    if args.json:
        write_json(Path(args.json), {"dtype": args.dtype, "batch_size": args.batch_size, "requests": len(requests),
                                     "tokens": tokens, "max_abs_diff": worst, "rows": rows})


if __name__ == "__main__":
    main()
