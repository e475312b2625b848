#!/usr/bin/env python
"""Norm kernels against their peers: eager-call time and device time, GB/s and % of copy bandwidth.

Two times per call, because a GPU runs kernels the way they are issued:
- eager: wall clock of back-to-back calls from Python, as eager code sees them (host overhead included);
- device: the calls captured in a CUDA graph and replayed, timed with CUDA events: the kernels alone,
  as inside a CUDA-graph decode step. Inputs rotate through enough buffers that each call reads
  from HBM, not from the L2 cache. The backward's device time is that of forward + backward
  captured together on the capture stream (autograd inside the capture, as make_graphed_callables
  does) minus the forward's; the gradient the replayed graph computes is checked against an eager
  one. A call that cannot be captured fails its row (an "error" in the JSON), never falls back to
  the eager time. Without CUDA device = eager.
Byte model (what a perfect kernel moves): forward reads x (and the residual) and writes y (and h);
backward reads h and dy (and dh) and writes dx (and d-residual); weights and per-row statistics are
ignored (O(hidden)). GB/s use the device time; "% copy" divides by a large device-to-device copy
measured in the same run.

Peers in the same run: F.rms_norm / F.layer_norm (unfused add for the residual variant),
torch.compile of the transformers-style module, and Liger-Kernel when it is importable (never a
dependency). On a machine without CUDA our rows are the torch path.

    python tools/bench_kernels.py --rows 1,2048,8192 --dtypes bfloat16,float16 --json k.json --plot k.png
    python tools/bench_kernels.py --rows 8192 --hidden 2048,4096,8192 --no-compile   # gpu_check.sh's grid
    python tools/bench_kernels.py --overhead        # host cost of one call on a tiny tensor (any machine)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch._dynamo.config
import torch._functorch.config
import torch.nn.functional as F

from benchutil import copy_bandwidth, median_spread, pyplot, sync, write_json

from minillama.kernels import _common, layer_norm, rms_norm
from minillama.kernels.rms_norm import rms_norm_fwd


class HFRMSNorm(torch.nn.Module):
    """transformers' LlamaRMSNorm, in behaviour: the eager peer and the module torch.compile gets."""

    def __init__(self, weight: torch.Tensor, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        h = x if residual is None else x + residual
        hf = h.float()
        y = self.weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps)).to(h.dtype)
        return y if residual is None else (y, h)


def _liger() -> dict[str, Any]:
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except ImportError:
        return {}
    return {"rms": LigerRMSNormFunction}


# ---------------------------------------------------------------- timing

def eager_time(fn: Callable[[int], Any], device: torch.device, calls: int, repeats: int) -> list[float]:
    """Seconds per call of `calls` back-to-back calls (fn(i) uses buffer i), synchronised at the end."""
    for i in range(3):
        fn(i)
    sync(device)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(calls):
            fn(i)
        sync(device)
        out.append((time.perf_counter() - t) / calls)
    return out


Capture = Callable[[Callable[[], Any], Callable[[], Any]], tuple[Any, Callable[[], float]]]


def cuda_graph(record: Callable[[], Any], warmup: Callable[[], Any]) -> tuple[Any, Callable[[], float]]:
    """(output of record(), replay() -> seconds of one replay, CUDA events): record() captured into a
    CUDA graph after warmup() ran on a side stream (compilation, autotuning, allocation and autograd's
    first use stay outside the capture). The output is the graph's static tensor, as the last replay
    left it. Raises when record() cannot be captured (an op that syncs with the host, or autograd on
    graphs built outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warmup()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = record()

    def replay() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return out, replay


def device_time(fn: Callable[[int], Any], calls: int, repeats: int,
                capture: Capture = cuda_graph) -> tuple[list[float], Any]:
    """(seconds per call over `repeats` replays of `calls` calls captured in one graph, the last
    call's output as the replays leave it). `capture` makes the graph (the tests pass one that runs
    on a CPU)."""
    def record() -> Any:
        last = None
        for i in range(calls):
            last = fn(i)
        return last

    def warmup() -> None:
        for i in range(3):
            fn(i)

    out, replay = capture(record, warmup)
    return [replay() / calls for _ in range(repeats)], out


def check_backward(graph_grad: Any, eager_grad: torch.Tensor) -> None:
    """The replayed forward + backward graph computed the gradient (an eager call on the same buffer
    gives the same one): a capture that recorded no backward must fail the row."""
    if not isinstance(graph_grad, torch.Tensor) or graph_grad.shape != eager_grad.shape:
        raise RuntimeError("the captured forward + backward returned no gradient")
    if not torch.allclose(graph_grad.float(), eager_grad.float(), rtol=1e-2, atol=1e-2):
        err = (graph_grad.float() - eager_grad.float()).abs().max().item()
        raise RuntimeError(f"the captured backward's gradient differs from eager's (max abs error {err:.3g})")


# ---------------------------------------------------------------- the cases

def impls(norm: str, n: int, w: torch.Tensor, b: torch.Tensor, compile_peer: bool) -> dict[str, Callable]:
    """name -> f(x, residual) for one norm; residual is None except for add+rmsnorm."""
    hf = HFRMSNorm(w.detach().clone()).to(w.device)
    if norm in ("rmsnorm", "add+rmsnorm"):
        out = {
            "minillama": lambda x, r: rms_norm(x, w, 1e-6, residual=r),
            "F.rms_norm": lambda x, r: F.rms_norm(x if r is None else x + r, (n,), w, 1e-6),
            "HF eager": hf,
        }
        if compile_peer:
            out["torch.compile(HF)"] = torch.compile(hf)
        liger = _liger().get("rms")
        if liger is not None and w.is_cuda and norm == "rmsnorm":
            out["Liger-Kernel"] = lambda x, r: liger.apply(x, w, 1e-6, 0.0, "llama", False)
        return out
    out = {
        "minillama": lambda x, r: layer_norm(x, w, b, 1e-5),
        "F.layer_norm": lambda x, r: F.layer_norm(x, (n,), w, b, 1e-5),
    }
    if compile_peer:
        out["torch.compile(F.layer_norm)"] = torch.compile(lambda x, r: F.layer_norm(x, (n,), w, b, 1e-5))
    return out


def bench_case(norm: str, dtype: torch.dtype, n: int, rows: int, device: torch.device, args: argparse.Namespace,
               peak: float, done: Callable[[dict[str, Any]], None] = lambda row: None,
               capture: Capture | None = None) -> list[dict[str, Any]]:
    """One row per implementation; `done(row)` is called as each row finishes. Device times come from
    graphs made by `capture` (default: CUDA graphs on CUDA, none elsewhere: device = eager)."""
    if capture is None and device.type == "cuda":
        capture = cuda_graph
    elem = torch.empty(0, dtype=dtype).element_size()
    fused = norm == "add+rmsnorm"
    fwd_bytes = (4 if fused else 2) * rows * n * elem
    bwd_bytes = (5 if fused else 3) * rows * n * elem
    # Enough distinct buffers that one pass over them is ~4x a 60 MB L2: every call reads HBM.
    nbuf = max(1, min(args.calls, -(-(256 << 20) // max(fwd_bytes, 1)))) if device.type == "cuda" else 1
    w = torch.rand(n, device=device, dtype=dtype) + 0.5
    b = torch.randn(n, device=device, dtype=dtype)
    xs = [torch.randn(rows, n, device=device, dtype=dtype) for _ in range(nbuf)]
    rs = [torch.randn(rows, n, device=device, dtype=dtype) for _ in range(nbuf)] if fused else [None] * nbuf
    dys = [torch.randn(rows, n, device=device, dtype=dtype) for _ in range(nbuf)]
    results = []
    wanted = args.impls.split(",") if args.impls else None
    for impl, fn in impls(norm, n, w, b, not args.no_compile).items():
        if wanted is not None and impl not in wanted:
            continue
        row: dict[str, Any] = {"norm": norm, "dtype": str(dtype).removeprefix("torch."), "hidden": n, "rows": rows,
                               "impl": impl, "fwd_bytes": fwd_bytes, "bwd_bytes": bwd_bytes, "buffers": nbuf}
        phase = "fwd"
        try:
            def fwd(i: int) -> Any:
                return fn(xs[i % nbuf], rs[i % nbuf])

            grads_in = []
            for i in range(nbuf):  # one autograd graph per buffer, kept for repeated eager backward calls
                x = xs[i].detach().requires_grad_()
                out = fn(x, rs[i])
                outs = list(out) if isinstance(out, tuple) else [out]
                grads_in.append((outs, x, [dys[i]] * len(outs)))

            def bwd(i: int) -> Any:
                outs, x, g = grads_in[i % nbuf]
                return torch.autograd.grad(outs, x, g, retain_graph=True)

            def fwd_bwd(i: int) -> torch.Tensor:
                """Forward and backward in one call (what a capture can hold: the autograd graph made
                inside it); returns dx."""
                x = xs[i % nbuf].detach().requires_grad_()
                out = fn(x, rs[i % nbuf])
                outs = list(out) if isinstance(out, tuple) else [out]
                return torch.autograd.grad(outs, x, [dys[i % nbuf]] * len(outs))[0]

            row["fwd_eager_s"] = eager_time(fwd, device, args.calls, args.repeats)
            if capture is not None:
                row["fwd_device_s"], _ = device_time(fwd, args.calls, args.repeats, capture)
            else:
                row["fwd_device_s"] = row["fwd_eager_s"]
            phase = "bwd"
            row["bwd_eager_s"] = eager_time(bwd, device, args.calls, args.repeats)
            if capture is not None:
                both, grad = device_time(fwd_bwd, args.calls, args.repeats, capture)
                check_backward(grad, fwd_bwd(args.calls - 1))
                fwd_median = statistics.median(row["fwd_device_s"])
                if statistics.median(both) <= fwd_median:
                    raise RuntimeError(f"forward + backward ({statistics.median(both) * 1e6:.1f} us) is no slower "
                                       f"than the forward alone ({fwd_median * 1e6:.1f} us)")
                row["fwd_bwd_device_s"] = both
                row["bwd_device_s"] = [t - fwd_median for t in both]
            else:
                row["bwd_device_s"] = row["bwd_eager_s"]
            for p in ("fwd", "bwd"):
                row[f"{p}_gb_s"] = row[f"{p}_bytes"] / statistics.median(row[f"{p}_device_s"]) / 1e9
                row[f"{p}_pct_copy"] = 100 * row[f"{p}_gb_s"] / peak
        except Exception as e:  # a peer that cannot run (or be captured in) this case fails its row only
            row["error"] = f"{phase}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        results.append(row)
        print(_md_row(row), flush=True)
        done(row)
    return results


def _us(xs: list[float]) -> str:
    m, lo, hi = median_spread(xs)
    return f"{m * 1e6:.1f} [{lo * 1e6:.1f}-{hi * 1e6:.1f}]"


def _md_row(r: dict[str, Any]) -> str:
    head = f"| {r['norm']} | {r['dtype']} | {r['hidden']} | {r['rows']} | {r['impl']} |"
    if "error" in r:
        return head + f" {r['error']} | | | | | | | |"
    return head + " | ".join(
        f" {_us(r[f'{p}_eager_s'])} | {_us(r[f'{p}_device_s'])} | {r[f'{p}_gb_s']:.0f} | {r[f'{p}_pct_copy']:.0f}%"
        for p in ("fwd", "bwd")) + " |"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """GB/s (device time) against hidden size, one line per implementation; one panel per norm x pass."""
    plt = pyplot()
    ok = [r for r in results if "error" not in r]
    if plt is None or not ok:
        return
    rows = max(r["rows"] for r in ok)
    dtype = ok[0]["dtype"]
    norms = sorted({r["norm"] for r in ok})
    fig, axes = plt.subplots(2, len(norms), figsize=(5 * len(norms), 7), squeeze=False)
    for j, norm in enumerate(norms):
        for i, phase in enumerate(("fwd", "bwd")):
            ax = axes[i][j]
            sel = [r for r in ok if r["norm"] == norm and r["rows"] == rows and r["dtype"] == dtype]
            for impl in dict.fromkeys(r["impl"] for r in sel):
                pts = sorted((r["hidden"], r[f"{phase}_gb_s"]) for r in sel if r["impl"] == impl)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            ax.set(xscale="log", xlabel="hidden", ylabel="GB/s", title=f"{norm} {phase}, {rows} rows, {dtype}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- host overhead alone

def overhead(args: argparse.Namespace) -> None:
    """Microseconds of host work per call on a tiny tensor, where the kernel itself costs nothing:
    the op machinery (custom op, autograd) and our Python around it. On a CPU our rows run the
    torch implementation through the same dispatch a GPU call takes (CPU_THROUGH_OP)."""
    torch.set_num_threads(1)
    device = torch.device(args.device or "cpu")
    x = torch.randn(1, 64, device=device)
    w = torch.rand(64, device=device) + 0.5
    r = torch.randn_like(x)
    dy = torch.randn_like(x)

    @torch.library.custom_op("bench::trivial", mutates_args=())
    def trivial(t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    trivial.register_fake(lambda t: torch.empty_like(t))
    trivial.register_autograd(lambda ctx, g: g)

    class TrivialFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
            return t.clone()

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            return g

    cases: dict[str, Callable[[torch.Tensor], Any]] = {
        "F.rms_norm": lambda t: F.rms_norm(t, (64,), w, 1e-6),
        "minillama rms_norm (public call)": lambda t: rms_norm(t, w, 1e-6),
        "minillama add+rms_norm (public call)": lambda t: rms_norm(t, w, 1e-6, residual=r)[0],
        "minillama layer_norm (public call)": lambda t: layer_norm(t, w, None, 1e-5),
        "minillama::rms_norm_fwd op, called directly": lambda t: rms_norm_fwd(t, w, None, 1e-6, 0.0, False)[0],
        "trivial custom_op + registered autograd": trivial,
        "trivial autograd.Function": TrivialFunction.apply,
    }
    through_op = _common.CPU_THROUGH_OP
    _common.CPU_THROUGH_OP = device.type == "cpu" and not args.torch_path
    print(f"# host overhead per call, [1, 64] fp32 on {device}, 1 thread, torch {torch.__version__}; our calls "
          f"{'through the op dispatch (CPU_THROUGH_OP)' if _common.CPU_THROUGH_OP else 'on their default path'}; "
          f"median [min-max] of {args.repeats} x {args.calls} calls\n")
    print("| call | forward us | forward + backward us |")
    print("|---|---|---|")
    results = []
    try:
        for name, fn in cases.items():
            fwd = eager_time(lambda i: fn(x), device, args.calls, args.repeats)
            xg = x.detach().requires_grad_()

            def train(i: int) -> None:
                fn(xg).backward(dy)

            both = eager_time(train, device, args.calls, args.repeats)
            results.append({"call": name, "fwd_s": fwd, "fwd_bwd_s": both})
            print(f"| {name} | {_us(fwd)} | {_us(both)} |", flush=True)
    finally:
        _common.CPU_THROUGH_OP = through_op
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "torch": torch.__version__,
                                               "results": results}, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--norms", default="rmsnorm,add+rmsnorm,layernorm")
    p.add_argument("--hidden", default="1024,2048,4096,8192,16384")
    p.add_argument("--rows", default=None, help="comma list; default 1,2048,8192 on CUDA, 1,256 on CPU")
    p.add_argument("--dtypes", default="bfloat16")
    p.add_argument("--calls", type=int, default=None, help="calls per sample (default 50 on CUDA, 5 on CPU)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers")
    p.add_argument("--impls", default=None, help="only these implementations (comma-separated row names, "
                   "e.g. 'torch.compile(HF),torch.compile(F.layer_norm)')")
    p.add_argument("--device", default=None)
    p.add_argument("--overhead", action="store_true", help="only the host cost of one call (tiny tensor)")
    p.add_argument("--torch-path", action="store_true", help="--overhead: our calls on their plain CPU path")
    p.add_argument("--json")
    p.add_argument("--plot", help="PNG of GB/s against hidden size")
    args = p.parse_args()
    if args.overhead:
        args.calls = args.calls or 2000
        return overhead(args)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.calls = args.calls or (50 if device.type == "cuda" else 5)
    # The compiled peers: one graph per (norm, size, dtype) case, and a backward timed many times
    # on one autograd graph (retain_graph), which buffer donation forbids.
    torch._dynamo.config.cache_size_limit = 256
    if hasattr(torch._functorch.config, "donated_buffer"):
        torch._functorch.config.donated_buffer = False
    rows_list = [int(v) for v in (args.rows or ("1,2048,8192" if device.type == "cuda" else "1,256")).split(",")]
    peak = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    ours = "Triton" if _common.use_triton(torch.empty(0, device=device)) else "torch path"
    print(f"# bench_kernels on {name}, torch {torch.__version__}; minillama = {ours}; copy bandwidth {peak:.0f} GB/s")
    print(f"# us per call, median [min-max] of {args.repeats} samples of {args.calls} calls; eager = wall clock "
          "from Python, device = CUDA-graph replay; GB/s and % copy from the device time\n")
    print("| norm | dtype | hidden | rows | impl | fwd eager us | fwd device us | fwd GB/s | fwd % copy "
          "| bwd eager us | bwd device us | bwd GB/s | bwd % copy |")
    print("|" + "---|" * 13)
    results: list[dict[str, Any]] = []

    def save(row: dict[str, Any] | None = None) -> None:  # after every row: a stopped run keeps what it measured
        if row is not None:
            results.append(row)
        if args.json:
            write_json(args.json, {"device": name, "torch": torch.__version__, "copy_gb_s": peak,
                                   "results": results})

    save()
    for dtype_name in args.dtypes.split(","):
        for norm in args.norms.split(","):
            for n in map(int, args.hidden.split(",")):
                for rows in rows_list:
                    bench_case(norm, getattr(torch, dtype_name), n, rows, device, args, peak, save)
    if args.plot:
        plot(results, Path(args.plot))


if __name__ == "__main__":
    main()
