#!/usr/bin/env python
"""Speculative decoding against plain greedy decoding: tok/s, acceptance, tokens per target forward,
and whether the tokens are the same. Same model, same process, runs interleaved.

    python tools/bench_speculative.py                                   # embedded SmolLM2, bf16 lookup
    python tools/bench_speculative.py --dtype float32 --draft-compile --methods draft   # int8 draft, compiled
    python tools/bench_speculative.py --dtype float32 --draft-compile --compile --methods draft   # target too

Tasks: `quote`, an input-grounded one (the model asked to copy a ~500-token Hamlet passage, where
prompt lookup finds its guesses), and `story`, free text from a one-line prompt (little to copy:
where speculation must not cost). Methods: `lookup` (PromptLookup, --lookup-tokens) and `draft`
(DraftModel: the same checkpoint loaded again, --draft-quantize, by default its int8 copy output
head included; or --draft DIR). --compile compiles the target: plain decoding's one-token step and
speculation's verify step (the baseline is then compiled plain decoding). Decode tok/s = new tokens / (time of the whole call - time of the same
prompt with one new token), median of --repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import write_json  # noqa: E402

import minillama  # noqa: E402
from minillama.generate import GenerationStats, generate  # noqa: E402
from minillama.hub import model_path  # noqa: E402
from minillama.speculative import DraftModel, PromptLookup  # noqa: E402

HAMLET = Path(__file__).resolve().parent.parent / "tests" / "data" / "hamlet.txt"


def task_prompts(tok) -> dict[str, list[int]]:
    passage = " ".join(HAMLET.read_text()[8000:10400].split())
    messages = {
        "quote": f"Copy this passage exactly, word for word:\n\n{passage}",
        "story": "Write a long story about a lighthouse keeper.",
    }
    return {name: list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               return_dict=True)["input_ids"]) for name, text in messages.items()}


def timed_call(model, prompt: list[int], n: int, speculative, compile: bool = False
               ) -> tuple[float, torch.Tensor, GenerationStats]:
    stats = GenerationStats()
    start = time.perf_counter()
    out = generate(model, [prompt], n, eos_token_id=[], speculative=speculative, stats=stats, compile=compile)
    return time.perf_counter() - start, out, stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory or Hugging Face id (default: the embedded SmolLM2)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--methods", default="lookup,draft")
    p.add_argument("--tasks", default="quote,story")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--lookup-tokens", type=int, default=10)
    p.add_argument("--draft", default=None, help="draft checkpoint (default: the model again)")
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--draft-quantize", default="int8+lm_head",
                   help="the draft's quantization ('none': as loaded; default int8 with the output head too: "
                        "SmolLM2's tied 49152x576 head is half an int8 copy's bytes when left in the target's dtype)")
    p.add_argument("--draft-compile", action="store_true", help="the draft's one-token steps compiled")
    p.add_argument("--compile", action="store_true",
                   help="the target compiled: plain decoding's step and speculation's verify step")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    directory = model_path(args.model)
    model = minillama.from_pretrained(directory, dtype=args.dtype)
    tok = minillama.load_tokenizer(directory)
    methods = args.methods.split(",")
    draft = None
    if "draft" in methods:
        quantize = None if args.draft_quantize == "none" else args.draft_quantize
        draft = minillama.from_pretrained(model_path(args.draft) if args.draft else directory, dtype=args.dtype,
                                          quantize=quantize)
    prompts = task_prompts(tok)
    results = []
    for task in args.tasks.split(","):
        prompt = prompts[task]
        for method in methods:
            make = (lambda: PromptLookup(args.lookup_tokens)) if method == "lookup" else \
                (lambda: DraftModel(draft, args.draft_tokens, compile=args.draft_compile))
            plain_s, spec_s, same, acc = [], [], True, []
            # warm-up: compiled steps compile (or load) here, not in the timed calls
            timed_call(model, prompt, 8, make(), args.compile)
            timed_call(model, prompt, 8, None, args.compile)
            for _ in range(args.repeats):  # interleaved: drift falls on both
                one, _, _ = timed_call(model, prompt, 1, None, args.compile)
                t, plain, _ = timed_call(model, prompt, args.new_tokens, None, args.compile)
                plain_s.append(t - one)
                t, spec, stats = timed_call(model, prompt, args.new_tokens, make(), args.compile)
                spec_s.append(t - one)
                same &= spec.tolist() == plain.tolist()
                acc.append((stats.acceptance, stats.new_tokens / max(1, stats.target_forwards + 1)))
            n = args.new_tokens - 1
            row = {"task": task, "method": method, "dtype": args.dtype, "compile": args.compile,
                   "prompt_tokens": len(prompt),
                   "plain_tok_s": n / statistics.median(plain_s), "spec_tok_s": n / statistics.median(spec_s),
                   "plain_runs_s": plain_s, "spec_runs_s": spec_s, "same_tokens": same,
                   "acceptance": statistics.median(a for a, _ in acc),
                   "tokens_per_forward": statistics.median(t for _, t in acc)}
            row["speedup"] = row["spec_tok_s"] / row["plain_tok_s"]
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("runs_s")}), file=sys.stderr)
            if args.json:
                write_json(args.json, results)
    print(f"# bench_speculative: {args.model or 'SmolLM2-135M-Instruct (embedded)'} {args.dtype}"
          f"{' compiled' if args.compile else ''}, {args.new_tokens} new tokens, greedy, median of {args.repeats}; "
          f"draft: {args.draft or 'the model'} {args.draft_quantize}{' compiled' if args.draft_compile else ''}, "
          f"{args.draft_tokens} tokens; lookup {args.lookup_tokens}\n")
    print_table(results)


def print_table(results: list[dict]) -> None:
    """The rows as a markdown table (bench_generate --speculative prints them so too)."""
    print("| task | method | target | plain tok/s | speculative tok/s | speedup | acceptance | tokens / forward "
          "| same tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['task']} | {r['method']} | {r['dtype']}{' compiled' if r.get('compile') else ''} "
              f"| {r['plain_tok_s']:.1f} | {r['spec_tok_s']:.1f} | {r['speedup']:.2f} "
              f"| {r['acceptance']:.0%} | {r['tokens_per_forward']:.2f} | {'yes' if r['same_tokens'] else 'NO'} |")

if __name__ == "__main__":
    main()
