#!/usr/bin/env python
"""Prefill and decode speed of minillama against transformers, same checkpoint, same machine, one run.

Each (implementation, dtype) runs in its own subprocess so that peak memory is its own. Decode is
greedy at batch 1 with EOS ignored; decode tok/s = new tokens / (time of a generate with N new
tokens - time of one with 1), so prefill never leaks into it. Figures are medians over --repeats
with min-max spread. The roofline is weight bytes read per decoded token over a bandwidth measured
here, in this run.

    python tools/bench_generate.py                       # embedded SmolLM2, fp32 + bf16
    python tools/bench_generate.py --model DIR --dtypes bfloat16 --json out.json
    python tools/bench_generate.py --dtypes float32 --impls minillama --speculative lookup,draft

--json is rewritten as each row finishes, so a run stopped part-way keeps the rows it measured.
On CUDA every minillama worker sizes its KV cache once, before the warm-up, for the longest call
it makes (--cache-len, default: prompt + new tokens or prefill + 1, rounded up to 256): the
compiled step and prefill (and the hand-captured graph) are then made once, never again for a
grown cache inside the timed calls. On a CPU the cache grows as generate sizes it (the figures of
docs/benchmarks.md were measured so) unless --cache-len is given.
"""

from __future__ import annotations

import argparse
import importlib.util
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
IMPLS = ("transformers", "llama.cpp", "minillama-plain", "minillama", "minillama-compiled", "minillama-compiled-all",
         "minillama-cudagraph", "minillama-compiled-cudagraph")
COMPILE = {"minillama-compiled": True, "minillama-compiled-all": "all"}
# llama.cpp (through llama-cpp-python, when importable): a GGUF of the same checkpoint written by
# our exporter (minillama/gguf_export.py) at the width of the row's minillama mode.
GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int8": "q8_0", "int4": "q4_0"}
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
    if args.impl == "llama.cpp":
        model, run = llama_cpp_runner(args, model_dir, prompt, long_ids)
        result["gguf_type"] = model.gguf_type
    elif args.impl == "transformers":
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
    if args.impl == "llama.cpp":  # the file's tensors: what a decode step reads, near enough (tied head)
        n_params, nbytes = model.n_params, model.file_bytes
        result.update(weight_bytes=nbytes, decode_bytes=nbytes, quantize=args.quantize)
    else:
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


def llama_cpp_runner(args: argparse.Namespace, model_dir: Path, prompt: torch.Tensor, long_ids: torch.Tensor):
    """(a llama.cpp model of the checkpoint, run(n, ids) -> prompt + n greedy tokens) as the other
    rows' run; the GGUF is exported here by minillama's exporter, at the row's width."""
    import llama_cpp

    import minillama
    from minillama.gguf_export import save_gguf

    kind = GGUF_TYPES.get(args.dtype if args.quantize == "none" else args.quantize.split("-")[0])
    if kind is None:
        raise SystemExit(f"llama.cpp: no GGUF type for {args.dtype}/{args.quantize}")
    source = minillama.from_pretrained(model_dir, dtype="float32", prepack=False)
    n_params = sum(p.numel() for p in source.parameters())
    path = Path(tempfile.mkdtemp(prefix="bench-gguf-")) / f"model-{kind}.gguf"
    save_gguf(source, path, model_dir, type=kind)
    del source
    context = max(prompt.shape[1] + args.new_tokens, long_ids.shape[1] + 1) + 8
    llm = llama_cpp.Llama(str(path), n_ctx=context, n_batch=512, n_threads=args.threads, verbose=False)
    llm.gguf_type, llm.n_params, llm.file_bytes = kind, n_params, path.stat().st_size

    def run(n: int, ids: torch.Tensor = prompt) -> torch.Tensor:
        tokens = ids[0].tolist()
        out: list[int] = []
        # greedy (top_k=1, temperature 0); EOS ignored: generate yields until the caller stops
        for t in llm.generate(tokens, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(t)
            if len(out) == n:
                break
        return torch.tensor([tokens + out])

    return llm, run


def annotate(r: dict[str, Any], rows: list[dict[str, Any]], bandwidth: float) -> None:
    """Add the roofline and, once transformers' row of that dtype exists, the ratios to it; and
    to llama.cpp's row of the same dtype and quantization (its GGUF of the same width)."""
    if "error" in r:
        return
    r["roofline_tok_s"] = bandwidth * 1e9 / r.get("decode_bytes", r["weight_bytes"])
    ref = next((x for x in rows if x["dtype"] == r["dtype"] and x["impl"] == "transformers" and "error" not in x),
               None)
    if ref is not None:
        r.update(decode_vs_hf=r["decode_tok_s"][0] / ref["decode_tok_s"][0],
                 prefill_vs_hf=r["prefill_tok_s"][0] / ref["prefill_tok_s"][0],
                 same_tokens_as_hf=r["tokens"] == ref["tokens"])
    peer = next((x for x in rows if x["impl"] == "llama.cpp" and "error" not in x and x["dtype"] == r["dtype"]
                 and x.get("quantize") == r.get("quantize")), None)
    if peer is not None and r["impl"] != "llama.cpp":
        r.update(decode_vs_llama_cpp=r["decode_tok_s"][0] / peer["decode_tok_s"][0],
                 prefill_vs_llama_cpp=r["prefill_tok_s"][0] / peer["prefill_tok_s"][0],
                 same_tokens_as_llama_cpp=r["tokens"] == peer["tokens"])


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
    p.add_argument("--speculative", default=None, metavar="METHODS",
                   help="also speculative decoding rows, e.g. lookup,draft: measured by tools/bench_speculative.py "
                        "(tok/s against plain decoding in the same process, acceptance, tokens per target forward, "
                        "same tokens as plain greedy) for each dtype, the target eager and, when minillama-compiled "
                        "is among --impls, compiled; the draft is the model's int8 copy, compiled")
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
    impls = args.impls.split(",") if args.impls else [
        i for i in IMPLS if (device.type == "cuda" or i not in GRAPHS)
        and (i != "llama.cpp" or (device.type == "cpu" and importlib.util.find_spec("llama_cpp") is not None))]
    unknown = [i for i in impls if i not in IMPLS] or [i for i in impls if i in GRAPHS and device.type != "cuda"]
    if "llama.cpp" in impls and importlib.util.find_spec("llama_cpp") is None:
        sys.exit("--impls llama.cpp: llama-cpp-python is not installed (pip install llama-cpp-python: it builds "
                 "llama.cpp from source, ~12 minutes on 2 cores)")
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

    speculative = speculative_rows(args, impls, compile_cache) if args.speculative else []
    if args.json and speculative:
        write_json(args.json, {"machine": machine, "bandwidth_gb_s": bandwidth, "threads": args.threads,
                               "rows": rows, "speculative": speculative})
    for r in rows:  # transformers' row may come after ours
        annotate(r, rows, bandwidth)
    head = ("| dtype | impl | prefill tok/s | x HF | decode tok/s | x HF | roofline tok/s | % roofline "
            "| peak MB | load s | warm-up s | same tokens |")
    peer = any(r["impl"] == "llama.cpp" and "error" not in r for r in rows)
    if peer:  # the same width's llama.cpp row: prefill and decode ratios, and whether the tokens agree
        head += " x llama.cpp prefill | x llama.cpp decode | same tokens as llama.cpp |"
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
              f"| {r['peak_mem_mb']:.0f} | {r['load_s']:.2f} | {warmup(r)} | {same} |"
              + (f" {vs('prefill_vs_llama_cpp')} | {vs('decode_vs_llama_cpp')} | "
                 f"{ {True: 'yes', False: 'no'}.get(r.get('same_tokens_as_llama_cpp'), '-')} |" if peer else ""))
    if speculative:
        from bench_speculative import print_table

        print(f"\n# speculative decoding ({args.speculative}): {args.new_tokens} new tokens, greedy, median of "
              f"{args.repeats}; the quote and story prompts of tools/bench_speculative.py\n")
        print_table(speculative)
    shutil.rmtree(compile_cache, ignore_errors=True)


def speculative_rows(args: argparse.Namespace, impls: list[str], compile_cache: str) -> list[dict[str, Any]]:
    """tools/bench_speculative.py's rows for each dtype (and compiled target), each in its own process."""
    out: list[dict[str, Any]] = []
    compiled = [False] + ([True] if "minillama-compiled" in impls else [])
    for dtype in args.dtypes.split(","):
        for compile_target in compiled:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                cmd = [sys.executable, str(Path(__file__).with_name("bench_speculative.py")), "--dtype", dtype,
                       "--methods", args.speculative, "--new-tokens", str(args.new_tokens), "--repeats",
                       str(args.repeats), "--draft-compile", "--json", f.name] \
                    + (["--model", args.model] if args.model else []) + (["--compile"] if compile_target else [])
                run = subprocess.run(cmd, capture_output=True, text=True,
                                     env={**os.environ, "MINILLAMA_COMPILE_CACHE": compile_cache})
                if run.returncode:
                    print(f"bench_speculative {dtype} failed:\n{run.stderr[-3000:]}", file=sys.stderr)
                    continue
                out += json.loads(Path(f.name).read_text())
            print(f"  measured speculative {dtype}{' compiled' if compile_target else ''}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
