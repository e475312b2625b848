#!/usr/bin/env python
"""Prefill and decode speed of minillama against transformers, same checkpoint, same machine, one run.

Each (implementation, dtype) runs in its own subprocess so that peak memory is its own. Decode is
greedy at batch 1 with EOS ignored; decode tok/s = new tokens / (time of a generate with N new
tokens - time of one with 1), so prefill never leaks into it. Figures are medians over --repeats
with min-max spread. The roofline is weight bytes read per decoded token over a bandwidth measured
here, in this run.

    python tools/bench_generate.py                       # embedded SmolLM2, fp32 + bf16
    python tools/bench_generate.py --model DIR --dtypes bfloat16 --json out.json

--json is rewritten as each row finishes, so a run stopped part-way keeps the rows it measured.
On CUDA every minillama worker sizes its KV cache once, before the warm-up, for the longest call
it makes (--cache-len, default: prompt + new tokens or prefill + 1, rounded up to 256): the
compiled step and prefill (and the hand-captured graph) are then made once, never again for a
grown cache inside the timed calls. On a CPU the cache grows as generate sizes it (the figures of
docs/benchmarks.md were measured so) unless --cache-len is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from benchutil import decode_bytes, decode_rate, median_spread, read_bandwidth, timed, write_json

# minillama-plain: eager with ordinary matmuls (prepack=False); minillama: the default eager path
# (on a CPU, projections prepacked for oneDNN at load); minillama-compiled: compile=True (the decode
# step; on a GPU the prefill too); minillama-compiled-all: compile="all" (decode step and prefill).
# GPU only, the decode step captured into a CUDA graph by hand (minillama/cudagraph.py), against
# compile=True's torch.compile(mode="reduce-overhead"): minillama-cudagraph captures the eager step
# (no compilation), minillama-compiled-cudagraph a torch.compile'd step without CUDA graphs.
IMPLS = ("transformers", "minillama-plain", "minillama", "minillama-compiled", "minillama-compiled-all",
         "minillama-cudagraph", "minillama-compiled-cudagraph")
COMPILE = {"minillama-compiled": True, "minillama-compiled-all": "all"}
GRAPHS = ("minillama-cudagraph", "minillama-compiled-cudagraph")


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one implementation in one dtype; runs in a fresh process."""
    import transformers

    import minillama
    from minillama.generate import CACHE_ROUND, generate
    from minillama.hub import model_path
    from minillama.linear import model_tensors, packed_bytes
    from minillama.quant import weight_bytes

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model_dir = model_path(args.model)
    tok = minillama.load_tokenizer(model_dir)
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text() * 20
    long_ids = tok(text, return_tensors="pt").input_ids[:, : args.prefill].to(device)
    chat = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)["input_ids"].to(device)
    result: dict[str, Any] = {"impl": args.impl, "dtype": args.dtype}

    t0 = time.perf_counter()
    if args.impl == "transformers":
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()

        def run(n: int, ids: torch.Tensor = prompt) -> torch.Tensor:
            # eos_token_id=-1: never stop early (transformers warns, then runs to max_new_tokens)
            return model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=-1, pad_token_id=0)
    else:
        model = minillama.from_pretrained(model_dir, dtype=dtype, device=device, norm=args.norm,
                                          prepack=False if args.impl == "minillama-plain" else None,
                                          quantize=None if args.quantize == "none" else args.quantize)
        compile_step = COMPILE.get(args.impl, False)
        result["packed_mb"] = packed_bytes(model) / 2**20
        step_fn = None
        if args.impl in GRAPHS:
            from minillama.cudagraph import CUDAGraphStep

            inner = (torch.compile(model, fullgraph=True, dynamic=False) if args.impl == "minillama-compiled-cudagraph"
                     else None)
            step_fn = CUDAGraphStep(model, inner)

        def run(n: int, ids: torch.Tensor = prompt) -> torch.Tensor:
            return generate(model, ids, n, eos_token_id=[], compile=compile_step, step_fn=step_fn)

        cache_len = args.cache_len
        if cache_len is None and device.type == "cuda":
            longest = max(prompt.shape[1] + args.new_tokens, long_ids.shape[1] + 1)
            cache_len = -(-longest // CACHE_ROUND) * CACHE_ROUND
        if cache_len:  # one cache for every call below: generate grows it only when a call needs more
            model.setup_cache(1, cache_len)
        result["cache_len"] = cache_len
    result["load_s"] = time.perf_counter() - t0
    n_params = sum(t.numel() for t in model_tensors(model) if isinstance(t, torch.nn.Parameter))
    result.update(weight_bytes=weight_bytes(model), decode_bytes=decode_bytes(model), quantize=args.quantize)

    t0 = time.perf_counter()
    first = run(args.new_tokens)  # warm-up; for the compiled step this is where compilation happens
    result["warmup_s"] = time.perf_counter() - t0
    decodes = [decode_rate(run, args.new_tokens, device) for _ in range(args.repeats)]
    # Prefill as generation does it: a long prompt, one new token. Measured after decode, because
    # minillama keeps its KV cache at the longest request's size (decode attends over all of it).
    prefills = timed(lambda: run(1, long_ids), device, args.repeats, warmup=1)
    result.update(
        params=n_params,
        prefill_tokens=long_ids.shape[1],
        prefill_tok_s=median_spread([long_ids.shape[1] / t for t in prefills]),
        decode_tok_s=median_spread(decodes),
        tokens=first[0, prompt.shape[1]:].tolist(),
        peak_mem_mb=(torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                     else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    )
    return result


def annotate(r: dict[str, Any], rows: list[dict[str, Any]], bandwidth: float) -> None:
    """Add the roofline and, once transformers' row of that dtype exists, the ratios to it."""
    if "error" in r:
        return
    r["roofline_tok_s"] = bandwidth * 1e9 / r.get("decode_bytes", r["weight_bytes"])
    ref = next((x for x in rows if x["dtype"] == r["dtype"] and x["impl"] == "transformers" and "error" not in x),
               None)
    if ref is not None:
        r.update(decode_vs_hf=r["decode_tok_s"][0] / ref["decode_tok_s"][0],
                 prefill_vs_hf=r["prefill_tok_s"][0] / ref["prefill_tok_s"][0],
                 same_tokens_as_hf=r["tokens"] == ref["tokens"])


def warmup(row: dict[str, Any]) -> str:
    """The first generate call's seconds; for the compiled step, the second process's, then the first's."""
    if row.get("first_start_warmup_s") is not None:
        return f"{row['warmup_s']:.1f} (first start {row['first_start_warmup_s']:.0f})"
    return f"{row['warmup_s']:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--impls", default=None, help=f"comma-separated, of {', '.join(IMPLS)} (default: all that "
                   "apply to the device)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--norm", default=None, help="minillama's norm (a registry name; default: the checkpoint's)")
    p.add_argument("--cache-len", type=int, default=None, help="minillama's KV-cache slots, set up before the "
                   "warm-up (default: on CUDA, enough for every call; on a CPU, as generate grows it)")
    p.add_argument("--quantize", default="none", help="comma-separated minillama quantization modes, e.g. "
                   "none,int8,int4-g32 (transformers runs only 'none')")
    p.add_argument("--json", help="also write all results here (rewritten as each row finishes)")
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.impl:  # worker mode
        print(json.dumps(worker(args)))
        return

    from minillama.hub import model_path

    model_path(args.model)  # convert (or download) once here, not inside a timed worker
    device = torch.device(args.device)
    impls = args.impls.split(",") if args.impls else [i for i in IMPLS if device.type == "cuda" or i not in GRAPHS]
    unknown = [i for i in impls if i not in IMPLS] or [i for i in impls if i in GRAPHS and device.type != "cuda"]
    if unknown:
        sys.exit(f"--impls: {', '.join(unknown)}: not one of {', '.join(IMPLS)}, or needs CUDA "
                 f"(CUDA graphs: {', '.join(GRAPHS)})")
    bandwidth = read_bandwidth(device)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"# bench_generate: {args.model or 'SmolLM2-135M-Instruct (embedded)'} on {machine}, "
          f"{args.threads} threads, torch {torch.__version__}")
    print(f"# measured read bandwidth: {bandwidth:.1f} GB/s; batch 1, greedy, {args.new_tokens} new tokens "
          f"(EOS ignored), prefill {args.prefill} tokens, median [min-max] of {args.repeats}\n")
    rows = []
    compile_cache = tempfile.mkdtemp(prefix="bench-generate-compiled-")
    runs = [(dtype, quantize, impl) for dtype in args.dtypes.split(",") for quantize in args.quantize.split(",")
            for impl in impls if quantize == "none" or impl != "transformers"]
    for dtype, quantize, impl in runs:
        cmd = [sys.executable, __file__, "--impl", impl, "--dtype", dtype, "--threads", str(args.threads),
               "--quantize", quantize,
               "--device", args.device, "--new-tokens", str(args.new_tokens), "--prefill", str(args.prefill),
               "--repeats", str(args.repeats)] + (["--model", args.model] if args.model else []) \
            + (["--norm", args.norm] if args.norm else []) \
            + (["--cache-len", str(args.cache_len)] if args.cache_len is not None else [])
        # On a CPU the compiled step runs twice against one fresh compile cache: a first start
        # (compiles) and a second start (a new process that loads what the first compiled, see
        # minillama/aot.py); the row is the second's. GPUs compile in-process every time.
        warmups = []
        for _ in range(2 if impl in COMPILE and device.type == "cpu" else 1):
            out = subprocess.run(cmd, capture_output=True, text=True,
                                 env={**os.environ, "MINILLAMA_COMPILE_CACHE": compile_cache})
            if out.returncode:
                # One failed row (a path never run on this machine, a model too big for transformers'
                # load) keeps the others'; a killed worker (out of memory) says so.
                print(f"worker {impl}/{dtype}/{quantize} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                last = (out.stderr.strip().splitlines() or [f"killed by signal {-out.returncode}"])[-1]
                row = {"impl": impl, "dtype": dtype, "quantize": quantize, "error": last}
                break
            row = json.loads(out.stdout.strip().splitlines()[-1])
            warmups.append(row["warmup_s"])
        rows.append({**row, "first_start_warmup_s": warmups[0] if len(warmups) == 2 else None})
        annotate(rows[-1], rows, bandwidth)
        if args.json:  # as each row finishes: a stopped run keeps what it measured
            write_json(args.json, {"machine": machine, "bandwidth_gb_s": bandwidth, "threads": args.threads,
                                   "rows": rows})
        print(f"  measured {impl} {dtype} {quantize}", file=sys.stderr)

    for r in rows:  # transformers' row may come after ours
        annotate(r, rows, bandwidth)
    head = ("| dtype | impl | prefill tok/s | x HF | decode tok/s | x HF | roofline tok/s | % roofline "
            "| peak MB | load s | warm-up s | same tokens |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        if "error" in r:
            print(f"| {r['dtype']} | {r['impl']} | failed: {r['error'][:120]} |")
            continue
        pm, pl, ph = r["prefill_tok_s"]
        dm, dl, dh = r["decode_tok_s"]
        roof = r["roofline_tok_s"]
        roof_s = f"{roof:.0f}" if roof >= 10 else f"{roof:.1f}"  # a big model's roofline is a few tok/s
        vs = (lambda key: f"{r[key]:.2f}" if key in r else "-")
        same = {True: "yes", False: "no"}.get(r.get("same_tokens_as_hf"), "-")
        label = r["impl"] + (f" {r['quantize']}" if r.get("quantize", "none") != "none" else "")
        print(f"| {r['dtype']} | {label} | {pm:.0f} [{pl:.0f}-{ph:.0f}] | {vs('prefill_vs_hf')} "
              f"| {dm:.1f} [{dl:.1f}-{dh:.1f}] | {vs('decode_vs_hf')} | {roof_s} | {100 * dm / roof:.0f}% "
              f"| {r['peak_mem_mb']:.0f} | {r['load_s']:.2f} | {warmup(r)} | {same} |")
    shutil.rmtree(compile_cache, ignore_errors=True)


if __name__ == "__main__":
    main()
