#!/usr/bin/env python
"""Norm kernels against their peers: time, GB/s and % of memory bandwidth, forward and backward.

Byte model (what a perfect kernel must move): forward reads x and writes y; backward reads x and
dy and writes dx (the weight, its gradient and the per-row statistics are ignored: O(hidden),
not O(rows x hidden)). GB/s = bytes / median time; "% peak" divides by the device's bandwidth
measured here with a large device-to-device copy (so it is a fraction of what is reachable).

Peers, all in the same run: F.rms_norm, the transformers-style eager RMSNorm module, and
torch.compile of that module; F.layer_norm for LayerNorm. On a machine without CUDA the
"minillama" rows are the torch path (Triton needs a GPU or TRITON_INTERPRET=1).

    python tools/bench_kernels.py                            # bf16, 4096 rows, hidden 1024..16384
    python tools/bench_kernels.py --dtypes bfloat16,float16 --rows 8192 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from benchutil import copy_bandwidth, timed

from minillama.kernels import layer_norm, rms_norm
from minillama.kernels._common import use_triton


class HFRMSNorm(torch.nn.Module):
    """transformers' LlamaRMSNorm, verbatim in behaviour: the eager peer."""

    def __init__(self, weight: torch.Tensor, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", default="1024,2048,4096,8192,16384")
    p.add_argument("--rows", type=int, default=None, help="default: 4096 on CUDA, 256 on CPU")
    p.add_argument("--dtypes", default="bfloat16")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    p.add_argument("--json")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = args.rows or (4096 if device.type == "cuda" else 256)
    inner = 20 if device.type == "cuda" else 3
    peak = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    ours = "minillama (Triton)" if use_triton(torch.empty(0, device=device)) else "minillama (torch path)"
    print(f"# bench_kernels on {name}, torch {torch.__version__}, {rows} rows; copy bandwidth {peak:.0f} GB/s")
    print("# bytes: forward reads x + writes y; backward reads x + dy, writes dx. median [min-max] of "
          f"{args.repeats}\n")
    print("| norm | dtype | hidden | impl | fwd us | fwd GB/s | fwd % peak | bwd us | bwd GB/s | bwd % peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for n in map(int, args.hidden.split(",")):
            x = torch.randn(rows, n, device=device, dtype=dtype)
            w = torch.rand(n, device=device, dtype=dtype) + 0.5
            b = torch.randn(n, device=device, dtype=dtype)
            dy = torch.randn_like(x)
            hf = HFRMSNorm(w.clone()).to(device)
            impls = {
                ("rmsnorm", ours): lambda t: rms_norm(t, w, 1e-6),
                ("rmsnorm", "F.rms_norm"): lambda t: F.rms_norm(t, (n,), w, 1e-6),
                ("rmsnorm", "HF eager"): hf,
                ("layernorm", ours): lambda t: layer_norm(t, w, b, 1e-5),
                ("layernorm", "F.layer_norm"): lambda t: F.layer_norm(t, (n,), w, b, 1e-5),
            }
            if not args.no_compile:
                impls[("rmsnorm", "torch.compile(HF eager)")] = torch.compile(hf)
            elem = x.element_size()
            for (norm, impl), fn in impls.items():
                fwd = timed(lambda: fn(x), device, args.repeats, inner, warmup=3)
                xg = x.detach().requires_grad_()
                y = fn(xg)
                bwd = timed(lambda: torch.autograd.grad(y, xg, dy, retain_graph=True), device, args.repeats, inner, warmup=3)
                row = {"norm": norm, "dtype": dtype_name, "hidden": n, "rows": rows, "impl": impl,
                       "fwd_s": fwd, "bwd_s": bwd, "fwd_bytes": 2 * rows * n * elem, "bwd_bytes": 3 * rows * n * elem}
                fm, bm = statistics.median(fwd), statistics.median(bwd)
                row.update(fwd_gb_s=row["fwd_bytes"] / fm / 1e9, bwd_gb_s=row["bwd_bytes"] / bm / 1e9)
                results.append(row)
                print(f"| {norm} | {dtype_name} | {n} | {impl} | {fm * 1e6:.0f} [{min(fwd) * 1e6:.0f}-{max(fwd) * 1e6:.0f}]"
                      f" | {row['fwd_gb_s']:.0f} | {100 * row['fwd_gb_s'] / peak:.0f}% "
                      f"| {bm * 1e6:.0f} [{min(bwd) * 1e6:.0f}-{max(bwd) * 1e6:.0f}] | {row['bwd_gb_s']:.0f} "
                      f"| {100 * row['bwd_gb_s'] / peak:.0f}% |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "copy_gb_s": peak, "results": results}, indent=2))


if __name__ == "__main__":
    main()
