#!/usr/bin/env python
"""Weight-only quantization, speed against quality: one checkpoint, one machine, one run.

Per mode (none, int8, int4-g32/g64/g128 by default), each in its own process:
  weight bytes (as saved) and the bytes one decode step reads (the roofline's numerator),
  decode tok/s eager and compiled (batch 1, greedy, EOS ignored, prefill excluded), prefill tok/s,
  perplexity on held-out public-domain text (the Gutenberg Shakespeare the tools fetch once; the
  tests never evaluate on it), KL(unquantized || quantized) of the next-token distributions on the
  same text, and greedy agreement over --new-tokens tokens: the share of positions where the
  quantized model's greedy choice equals the unquantized one's along the unquantized continuation
  (teacher-forced, so one early difference does not count twice), and how many tokens the
  free-running continuations share before they first differ.
transformers' decode in the same dtype runs alongside (tools/bench_generate.py's worker) as the
reference of the speed ratios. Figures are medians [min-max] over --repeats. results.json in --out
is rewritten as each worker finishes (a stopped run keeps what it measured); results.md and the
plot (only where matplotlib is installed) come at the end.

    python tools/bench_quant.py                                 # SmolLM2, bf16
    python tools/bench_quant.py --modes none,int8,int4-g64+lm_head --dtype float32
    python tools/bench_quant.py --quick --model DIR --out out   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from benchutil import (decode_bytes, decode_rate, median_spread, nll_and_kl, pyplot, read_bandwidth, shakespeare_corpus, timed,
                       write_json)

TOOLS = Path(__file__).resolve().parent
DEFAULT_MODES = "none,int8,int4-g32,int4-g64,int4-g128"


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One mode in one process: load, quality against the saved reference, then speed."""
    import warnings

    from safetensors.torch import load_file, save_file

    import minillama
    from minillama.generate import generate
    from minillama.quant import weight_bytes

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    inputs = load_file(args.inputs)
    eval_ids, prompt = inputs["eval_ids"].to(device), inputs["prompt"].to(device)
    reference = None if args.mode == "none" else load_file(args.reference)

    t0 = time.perf_counter()
    model = minillama.from_pretrained(args.model, dtype=args.dtype, device=device,
                                      quantize=None if args.mode == "none" else args.mode)
    result: dict[str, Any] = {"mode": args.mode, "load_s": time.perf_counter() - t0,
                              "weight_bytes": weight_bytes(model), "decode_bytes": decode_bytes(model)}

    with torch.no_grad():
        logprobs = [torch.log_softmax(model(window[None]).float(), -1)[0] for window in eval_ids]
        continuation = generate(model, prompt, args.new_tokens, eos_token_id=[])[0, prompt.shape[1]:]
        if reference is None:
            forced = continuation
        else:
            forced = reference["continuation"].to(device)
        # Teacher-forced along the unquantized continuation: logits at the positions before each of its tokens.
        seq = torch.cat([prompt[0], forced])[None]
        choices = model(seq)[0, prompt.shape[1] - 1:-1].argmax(-1)
    stats = [nll_and_kl(lp, ids, None if reference is None else reference[f"logprobs{i}"].to(device))
             for i, (lp, ids) in enumerate(zip(logprobs, eval_ids, strict=True))]
    nll = sum(s[0] for s in stats) / len(stats)
    differ = (continuation != forced).nonzero()
    result.update(
        perplexity=math.exp(nll),
        kl=None if reference is None else sum(s[1] for s in stats) / len(stats),
        greedy_agreement=(choices == forced).float().mean().item(),
        same_prefix=int(differ[0, 0]) if len(differ) else len(forced),
    )
    if reference is None:
        save_file({**{f"logprobs{i}": lp.cpu() for i, lp in enumerate(logprobs)},
                   "continuation": continuation.cpu()}, args.reference)
    del logprobs

    def run(n: int, ids: torch.Tensor = prompt, compile: bool = False) -> torch.Tensor:
        return generate(model, ids, n, eos_token_id=[], compile=compile)

    run(args.new_tokens)  # warm-up
    result["decode_tok_s"] = median_spread([decode_rate(run, args.new_tokens, device) for _ in range(args.repeats)])
    long_ids = eval_ids[:1, : args.prefill]
    prefills = timed(lambda: run(1, long_ids), device, args.repeats, warmup=1)
    result["prefill_tok_s"] = median_spread([long_ids.shape[1] / t for t in prefills])
    if args.compile:
        # A fresh session's cache (prompt + new tokens): the compiled step attends over every slot,
        # so the 512-token prefill above would otherwise slow it down.
        model.clear_cache()

        def compiled(n: int) -> torch.Tensor:
            return run(n, compile=True)

        t0 = time.perf_counter()
        compiled(args.new_tokens)  # compiles
        result["compile_warmup_s"] = time.perf_counter() - t0
        result["compiled_decode_tok_s"] = median_spread(
            [decode_rate(compiled, args.new_tokens, device) for _ in range(args.repeats)])
    return result


def prepare_inputs(model_dir: Path, args: argparse.Namespace, path: Path) -> int:
    """Tokenise the evaluation text and the chat prompt once, for every worker; returns the vocabulary size."""
    from safetensors.torch import save_file

    from minillama.config import load_config
    from minillama.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    vocab = load_config(model_dir).vocab_size
    text = (args.corpus.read_bytes() if args.corpus else shakespeare_corpus()).decode("utf-8", "replace")
    # The last part of the corpus (ablate_norm trains on the first 90%): held out there too.
    ids = tok(text[-200_000:], add_special_tokens=False).input_ids
    need = args.windows * args.seq
    if len(ids) < need:
        raise SystemExit(f"bench_quant: the evaluation text has {len(ids)} tokens; --windows x --seq needs {need}")
    eval_ids = torch.tensor(ids[-need:]).view(args.windows, args.seq) % vocab
    chat = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    if tok.chat_template:
        prompt = tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
    else:
        prompt = tok(chat[0]["content"]).input_ids
    save_file({"eval_ids": eval_ids.contiguous(), "prompt": torch.tensor([prompt]) % vocab}, path)
    return vocab


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]], hf: dict[str, Any]) -> str:
    """The results table (markdown)."""
    base = next(r for r in rows if r["mode"] == "none")
    hf_decode = hf["decode_tok_s"][0]
    lines = [
        f"# bench_quant: {meta['model']} on {meta['machine']}, {meta['dtype']}, {meta['threads']} threads, "
        f"torch {meta['torch']}",
        "",
        f"Read bandwidth {meta['bandwidth_gb_s']:.1f} GB/s (measured in this run); batch 1, greedy, "
        f"{meta['new_tokens']} new tokens, prefill {meta['prefill']} tokens; median [min-max] of {meta['repeats']}. "
        f"transformers {meta['dtype']} decodes at {hf_decode:.1f} tok/s here. Perplexity and KL on "
        f"{meta['eval_tokens']} held-out tokens of {meta['eval_text']}.",
        "",
        "| mode | weights MB | read per token MB | roofline tok/s | decode tok/s | x HF | compiled tok/s | x HF "
        "| compile s | prefill tok/s | perplexity | vs none | KL | greedy agree | same prefix |",
        "|" + "---|" * 15,
    ]
    for r in rows:
        dm, dl, dh = r["decode_tok_s"]
        cm = r.get("compiled_decode_tok_s")
        compiled = f"{cm[0]:.1f} [{cm[1]:.1f}-{cm[2]:.1f}] | {cm[0] / hf_decode:.2f} | {r['compile_warmup_s']:.1f}" \
            if cm else "- | - | -"
        kl = "-" if r["kl"] is None else f"{r['kl']:.4f}"
        lines.append(
            f"| {r['mode']} | {r['weight_bytes'] / 1e6:.0f} | {r['decode_bytes'] / 1e6:.0f} "
            f"| {meta['bandwidth_gb_s'] * 1e9 / r['decode_bytes']:.0f} | {dm:.1f} [{dl:.1f}-{dh:.1f}] "
            f"| {dm / hf_decode:.2f} | {compiled} | {r['prefill_tok_s'][0]:.0f} | {r['perplexity']:.3f} "
            f"| {100 * (r['perplexity'] / base['perplexity'] - 1):+.2f}% | {kl} | {100 * r['greedy_agreement']:.1f}% "
            f"| {r['same_prefix']} |")
    lines += [f"\n{mode}: not measured: {why}" for mode, why in meta["skipped"].items()]
    return "\n".join(lines) + "\n"


def plot(out: Path, rows: list[dict[str, Any]], hf: dict[str, Any]) -> str | None:
    """Decode speed against perplexity, one point per mode (eager and compiled); None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, marker, label in (("decode_tok_s", "o", "eager"), ("compiled_decode_tok_s", "s", "compiled")):
        pts = [(r["perplexity"], r[key][0], r["mode"]) for r in rows if r.get(key)]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
            for x, y, mode in pts:
                ax.annotate(mode, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(hf["decode_tok_s"][0], color="gray", linestyle="--", label="transformers")
    ax.set_xlabel("perplexity (lower is better)")
    ax.set_ylabel("decode tok/s (batch 1)")
    ax.set_title("Weight-only quantization: speed vs quality")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "speed_vs_perplexity.png", dpi=120)
    plt.close(fig)
    return "speed_vs_perplexity.png"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--modes", default=DEFAULT_MODES, help="comma-separated: none and quantization names "
                   "(MODE[-gGROUP][+lm_head], e.g. int8, int4-g64+lm_head)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--windows", type=int, default=4, help="evaluation windows of --seq tokens")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled decode")
    p.add_argument("--corpus", type=Path, default=None, help="evaluate on this text file instead")
    p.add_argument("--quick", action="store_true", help="a smoke run: short windows, few tokens, one repeat")
    p.add_argument("--out", type=Path, default=Path("bench_quant_out"))
    for hidden in ("--mode", "--inputs", "--reference"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = parser().parse_args()
    if args.mode:  # worker
        print(json.dumps(worker(args)))
        return
    from minillama.config import QuantConfig, load_config
    from minillama.errors import MinillamaError
    from minillama.hub import model_path
    from minillama.quant import unquantizable

    if args.quick:
        args.new_tokens, args.prefill, args.windows, args.seq, args.repeats = 16, 64, 1, 128, 1
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    try:
        for m in modes:
            if m != "none":
                QuantConfig.parse(m)
        model_dir = model_path(args.model)
    except MinillamaError as e:
        sys.exit(f"bench_quant: {e}")
    modes = ["none"] + [m for m in modes if m != "none"]  # the reference comes first
    skipped = {}
    for m in modes[1:]:
        why = unquantizable(load_config(model_dir), QuantConfig.parse(m))
        if why:
            skipped[m] = why
            print(f"bench_quant: skipping {m}: {why}", file=sys.stderr)
    modes = [m for m in modes if m not in skipped]
    device = torch.device(args.device)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    meta = dict(model=args.model or "SmolLM2-135M-Instruct (embedded)", machine=machine, dtype=args.dtype,
                threads=args.threads, torch=torch.__version__, bandwidth_gb_s=read_bandwidth(device),
                new_tokens=args.new_tokens, prefill=args.prefill, repeats=args.repeats,
                eval_tokens=args.windows * args.seq,
                eval_text=args.corpus.name if args.corpus else "the Gutenberg Shakespeare", skipped=skipped)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"meta": meta, "transformers": None, "rows": [], "plots": []}
    write_json(args.out / "results.json", results)
    with tempfile.TemporaryDirectory() as tmp:
        inputs, reference = Path(tmp) / "inputs.safetensors", Path(tmp) / "reference.safetensors"
        try:
            prepare_inputs(model_dir, args, inputs)
        except MinillamaError as e:
            sys.exit(f"bench_quant: {e}")
        common = ["--model", str(model_dir), "--dtype", args.dtype, "--device", args.device,
                  "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
                  "--prefill", str(args.prefill), "--repeats", str(args.repeats)]
        hf_cmd = [sys.executable, str(TOOLS / "bench_generate.py"), "--impl", "transformers"] + common
        jobs = [("transformers", hf_cmd)] + [
            (m, [sys.executable, __file__, "--mode", m, "--inputs", str(inputs), "--reference", str(reference)]
             + common + ([] if args.compile else ["--no-compile"])) for m in modes]
        for name, cmd in jobs:
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"bench_quant: worker {name} failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            if name == "transformers":
                results["transformers"] = row
            else:
                results["rows"].append(row)
            write_json(args.out / "results.json", results)  # as each worker finishes, before any plot
            print(f"  measured {name}", file=sys.stderr)
    hf, rows = results["transformers"], results["rows"]
    table = markdown(meta, rows, hf)
    print(table)
    (args.out / "results.md").write_text(table)
    png = plot(args.out, rows, hf)
    results["plots"] = [png] if png else []
    write_json(args.out / "results.json", results)


if __name__ == "__main__":
    main()
