#!/usr/bin/env python
"""Training speed and memory of minillama against transformers' LlamaForCausalLM: same checkpoint,
same Accelerate training step (minillama.train.loop.train_step: forward, summed next-token loss,
backward, clip, AdamW), same batch, sequence length and precision, one run, same machine.
The loss is each library's own way of computing the same number: transformers materialises every
logit in fp32 and then the cross-entropy (what LlamaForCausalLM(labels=...) does); minillama fuses
the output projection with the loss in chunks (minillama/loss.py). The first step's losses agree.

Speed: both models live in this process and train in alternation, one step each in turn (the
order flipping every round), so a machine that speeds up or slows down affects both alike.
Reported: tokens/s median [min-max] over --steps steps after --warmup, the ratio of medians, and
the median of the per-round ratios; model FLOP/s (6 x parameters x tokens + attention) as % of a
matmul's FLOP/s measured in this run (the compute roofline).
Memory: each implementation again in its own subprocess: GPU max allocated, or on the CPU the
peak RSS while training (weights touched first: transformers maps the checkpoint file lazily).

    python tools/bench_train.py                            # embedded SmolLM2, fp32, batch 4 x 256
    python tools/bench_train.py --precision bf16 --batch 8 --seq 512 --device cuda --json out.json
    python tools/bench_train.py --compile                  # + minillama with every block compiled

--json is rewritten after every timed round and every memory worker: a run stopped part-way
keeps the figures of the steps it timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch
from benchutil import PeakRSS, matmul_flops, median_spread, sync, write_json

IMPLS = ("transformers", "minillama")


def load(impl: str, args: argparse.Namespace, accelerator: Any) -> tuple[Any, Any, Callable[..., torch.Tensor]]:
    """(prepared model, prepared AdamW, loss_fn(model, ids, targets)) of one implementation, fp32 weights."""
    import minillama
    from minillama.loss import reference_cross_entropy, shift_labels
    from minillama.train.loop import token_loss

    if impl == "transformers":
        import transformers

        transformers.logging.set_verbosity_error()
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32,
                                                                  attn_implementation="sdpa")
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        def loss_fn(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            # What LlamaForCausalLM(labels=...) computes: every logit in fp32, then the loss.
            return reference_cross_entropy(model(ids).logits, shift_labels(ids, targets))
    else:
        model = minillama.from_pretrained(args.model_dir, dtype="float32", norm=args.norm)
        model.gradient_checkpointing = args.gradient_checkpointing
        if impl == "minillama-compiled":
            model.compile_blocks()  # regional compilation; compiled during the warm-up steps
        loss_fn = token_loss  # the projection fused with the loss, in chunks
    with torch.no_grad():
        for p in model.parameters():
            p.sum()  # make every weight resident before memory is measured
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    model, optimizer = accelerator.prepare(model.train(), optimizer)
    return model, optimizer, loss_fn


def stepper(args: argparse.Namespace, accelerator: Any, impl: str, vocab: int) -> Callable[[], float]:
    """A function running one training step of `impl` on a fixed random batch; returns its mean loss."""
    from minillama.train.loop import train_step

    model, optimizer, loss_fn = load(impl, args, accelerator)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    targets = torch.ones_like(ids, dtype=torch.bool)
    n_targets = args.batch * (args.seq - 1)

    def step() -> float:
        loss, _ = train_step(accelerator, model, optimizer, [(ids, targets)], n_targets, 1.0, loss_fn)
        sync(accelerator.device)
        return float(loss) / n_targets

    return step


def memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one implementation over 3 training steps (a fresh process)."""
    from minillama import dist
    from minillama.config import load_config

    accelerator = dist.accelerator(mixed_precision=args.precision)
    device = accelerator.device
    step = stepper(args, accelerator, args.impl, load_config(args.model_dir).vocab_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with PeakRSS() as rss:
        for _ in range(3):
            step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mb": peak / 2**20, "above_model_mb": (peak - base) / 2**20}
    return {"peak_mb": rss.peak / 2**20, "above_model_mb": (rss.peak - rss.start) / 2**20}


def speed(args: argparse.Namespace, impls: list[str],
          on_round: Callable[[dict[str, dict[str, Any]]], None] = lambda results: None) -> dict[str, dict[str, Any]]:
    """Alternating steps of every implementation in this process: tokens/s samples and losses;
    on_round(results) after every timed round."""
    from minillama import dist
    from minillama.config import load_config

    cfg = load_config(args.model_dir)
    accelerator = dist.accelerator(mixed_precision=args.precision)
    steps = {impl: stepper(args, accelerator, impl, cfg.vocab_size) for impl in impls}
    results: dict[str, dict[str, Any]] = {impl: {"losses": [], "tok_s_samples": []} for impl in impls}
    tokens = args.batch * args.seq
    for i in range(args.warmup + args.steps):
        for impl in (impls if i % 2 == 0 else impls[::-1]):
            t = time.perf_counter()
            results[impl]["losses"].append(steps[impl]())
            if i >= args.warmup:
                results[impl]["tok_s_samples"].append(tokens / (time.perf_counter() - t))
        if i >= args.warmup:
            on_round(results)
    return results


def summarize(results: dict[str, dict[str, Any]], impls: list[str], flops_per_token: float,
              peak_flops: float) -> None:
    """Per implementation with timed steps: tokens/s median [min-max], the ratios to transformers
    (or the first implementation), model TFLOP/s and % of the matmul roofline."""
    ref = results.get("transformers") or results[impls[0]]
    for impl in impls:
        r = results[impl]
        if not r["tok_s_samples"] or not ref["tok_s_samples"]:
            continue
        m, lo, hi = median_spread(r["tok_s_samples"])
        tflops = m * flops_per_token / 1e12
        r.update(impl=impl, tok_s=[m, lo, hi], vs_hf=m / median_spread(ref["tok_s_samples"])[0],
                 vs_hf_paired=statistics.median(a / b for a, b in zip(r["tok_s_samples"], ref["tok_s_samples"])),
                 tflops=tflops, roofline_pct=100 * tflops * 1e12 / peak_flops, flops_per_token=flops_per_token)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"], help="accelerate mixed precision")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time minillama with each block compiled "
                   "(minillama-compiled: the fine-tune recipe's `compile: true`)")
    p.add_argument("--norm", default=None, help="minillama's norm (a registry name; default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--json", help="also write all results here")
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from minillama.config import load_config
    from minillama.hub import model_path

    args.model_dir = model_path(args.model)
    if args.impl:  # memory worker mode
        print(json.dumps(memory_worker(args)))
        return

    impls = args.impls.split(",") + (["minillama-compiled"] if args.compile else [])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32)
    peak_flops = matmul_flops(device, compute_dtype)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"# bench_train: {args.model or 'SmolLM2-135M-Instruct (embedded)'} on {machine}, {args.threads} threads, "
          f"torch {torch.__version__}")
    print(f"# batch {args.batch} x seq {args.seq}, precision {args.precision}, fp32 master weights, AdamW, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; {args.steps} alternating timed "
          f"steps each after {args.warmup} warm-up; matmul roofline {peak_flops / 1e12:.2f} TFLOP/s "
          f"({str(compute_dtype).removeprefix('torch.')})\n")

    cfg = load_config(args.model_dir)
    from minillama import Transformer

    with torch.device("meta"):
        n_params = sum(p.numel() for p in Transformer(cfg).parameters())
    # 6N per token (forward 2N, backward 4N) + causal attention (6 L h d s: QK^T and AV, half masked, x3).
    flops_per_token = 6 * n_params + 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * args.seq

    def save(results: dict[str, dict[str, Any]]) -> None:
        summarize(results, impls, flops_per_token, peak_flops)
        if args.json:
            write_json(args.json, {"machine": machine, "peak_flops": peak_flops,
                                   "args": {k: str(v) for k, v in vars(args).items()},
                                   "rows": [dict(r, impl=impl) for impl, r in results.items()]})

    results = speed(args, impls, save)
    if not args.no_memory:
        for impl in impls:
            cmd = [sys.executable, __file__, "--impl", impl, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--precision", args.precision, "--threads", str(args.threads)] \
                + (["--model", args.model] if args.model else []) + (["--norm", args.norm] if args.norm else []) \
                + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"memory worker {impl} failed:\n{out.stderr[-3000:]}")
            results[impl].update(json.loads(out.stdout.strip().splitlines()[-1]))
            save(results)

    head = ("| impl | tokens/s | x HF (medians) | x HF (per-round median) | model TFLOP/s | % roofline | peak MB "
            "| above model MB | first loss |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for impl in impls:
        r = results[impl]
        m, lo, hi = r["tok_s"]
        mem = (f"{r['peak_mb']:.0f} | {r['above_model_mb']:.0f}" if "peak_mb" in r else "- | -")
        print(f"| {impl} | {m:.0f} [{lo:.0f}-{hi:.0f}] | {r['vs_hf']:.2f} | {r['vs_hf_paired']:.2f} "
              f"| {r['tflops']:.3f} | {r['roofline_pct']:.0f}% | {mem} | {r['losses'][0]:.5f} |")


if __name__ == "__main__":
    main()
