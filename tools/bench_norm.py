#!/usr/bin/env python
"""What swapping the norm costs or saves: op speed, model speed, and the change in the outputs.

Op level: every registered norm over hidden sizes x rows x dtypes, forward (and forward+backward
with --train): median and min-max over repeats, GB/s (forward reads x and writes y; backward also
reads dy and writes dx) and the % of a read+write bandwidth measured in this run.

Model level: the same checkpoint (default: the embedded SmolLM2) loaded with each norm, each in
its own process (peak memory is its own): prefill and decode tok/s, the share of a forward pass
spent inside norm modules (torch profiler), peak memory, and the output effect: perplexity on a
fixed text and the KL divergence of next-token distributions from the checkpoint's own norm.

Like for like: RMSNorm against LayerNorm within each implementation tier (eager ATen, torch.compile,
minillama's kernels: Triton on a GPU, C++ on a CPU), op level and model level, and one verdict line
per tier and dtype next to the paper's 7-64%.

Families (--families): for one tools/make_model.py shape of each family, random weights cut to a
few layers, the norm sites of a block, the norm calls per token (each site runs once per token: a
q/k norm covers every head in one call) and their share of a prefill forward.

Writes a markdown table to stdout and results.json, results.md and PNG plots to --out; results.json
is rewritten as each row finishes (a stopped run keeps what it measured), the plots come last and
only where matplotlib is installed.

    python tools/bench_norm.py                       # full run
    python tools/bench_norm.py --quick --out out     # under a minute
    python tools/bench_norm.py --model DIR --norms rmsnorm,layernorm --train
    python tools/bench_norm.py --no-model --hidden 2048 --rows 128 --families --out out   # per family
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from benchutil import copy_bandwidth, nll_and_kl, pyplot, sync, timed, write_json
from tqdm import tqdm

REFERENCE_NORM = "rmsnorm-torch"  # the checkpoint's own norm, transformers' numerics
# Like for like: in each tier an RMSNorm and a LayerNorm of the same implementation quality, so the
# ratio measures the norm and not whose kernel it is.
TIERS = {
    "eager ATen": ("rmsnorm-native", "layernorm"),  # F.rms_norm vs F.layer_norm
    "torch.compile": ("rmsnorm-compiled", "layernorm-compiled"),  # one Inductor kernel each
    "minillama kernels": ("rmsnorm", "layernorm-triton"),  # Triton on a GPU, C++ (kernels/cpu.py) on a CPU
}
PAPER = "7-64% less time (Zhang & Sennrich 2019)"
# A fixed, public-domain text for perplexity (Jane Austen, Pride and Prejudice, chapter 1).
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters. \"My dear Mr. Bennet,\" said his lady to him "
    "one day, \"have you heard that Netherfield Park is let at last?\" Mr. Bennet replied that he had not. \"But "
    "it is,\" returned she; \"for Mrs. Long has just been here, and she told me all about it.\" Mr. Bennet made "
    "no answer. \"Do you not want to know who has taken it?\" cried his wife impatiently. \"You want to tell me, "
    "and I have no objection to hearing it.\" This was invitation enough."
)


def op_level(args: argparse.Namespace, norms: list[str], device: torch.device, peak: float,
             done: Any = lambda row: None) -> list[dict]:
    """One row per (norm, dtype, hidden, rows); done(row) as each finishes."""
    from minillama.norms import build_norm

    rows = []
    grid = [(d, h, r) for d in args.dtypes.split(",") for h in map(int, args.hidden.split(","))
            for r in map(int, args.rows.split(","))]
    for dtype_name, hidden, nrows in tqdm(grid, desc="op level", file=sys.stderr):
        dtype = getattr(torch, dtype_name)
        x = torch.randn(nrows, hidden, device=device, dtype=dtype)
        dy = torch.randn_like(x)
        for name in norms:
            norm = build_norm(name, hidden, 1e-6).to(device=device, dtype=dtype)
            norm.train(args.train)
            inner = 1 if device.type == "cpu" and nrows * hidden > 2**20 else 5

            def forward() -> None:
                with torch.inference_mode():  # as a model runs its norms when generating
                    norm(x)

            fwd = timed(forward, device, args.repeats, inner)
            row = {"norm": name, "dtype": dtype_name, "hidden": hidden, "rows": nrows,
                   "fwd_s": fwd, "fwd_gb_s": 2 * x.numel() * x.element_size() / statistics.median(fwd) / 1e9}
            if args.train:
                xg = x.detach().requires_grad_()

                def step() -> None:
                    norm(xg).backward(dy)

                train = timed(step, device, args.repeats, inner)
                row.update(train_s=train,
                           train_gb_s=5 * x.numel() * x.element_size() / statistics.median(train) / 1e9)
            row["fwd_pct_peak"] = 100 * row["fwd_gb_s"] / peak
            rows.append(row)
            done(row)
    return rows


def _token_ids(model_dir: Path, vocab: int, n: int) -> torch.Tensor:
    """The fixed text through the checkpoint's tokenizer; a model without one gets its bytes mod vocab."""
    try:
        from minillama import load_tokenizer

        ids = load_tokenizer(model_dir)(TEXT * 8, add_special_tokens=False).input_ids
    except Exception:  # a tokenizer-less test checkpoint
        ids = [b % vocab for b in (TEXT * 8).encode()]
    return torch.tensor([ids[:n]])


def model_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One norm, one process: speed, norm share, peak memory and (vs saved reference log-probs) KL/ppl."""
    import warnings

    import minillama
    from minillama.generate import generate
    from minillama.norms import Norm

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    device = torch.device(args.device)
    from safetensors.torch import load_file

    model = minillama.from_pretrained(args.model, dtype=args.dtype, device=device, norm=args.norm)
    # The parent tokenised the text once (workers never import transformers) and saved the reference.
    saved = load_file(args.reference)
    ids, ref = saved["ids"].to(device), saved["logprobs"].to(device)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).float(), -1)[0]
    nll, kl = nll_and_kl(logprobs, ids[0], ref)
    # A norm without usable statistics (BatchNorm on a pretrained model) can overflow: report None.
    result: dict[str, Any] = {"norm": args.norm, "perplexity": math.exp(nll) if math.isfinite(nll) else None,
                              "kl_from_reference": kl if math.isfinite(kl) else None}

    prompt = ids[:, :16]
    prefill = timed(lambda: generate(model, ids, 1, eos_token_id=[]), device, args.repeats)
    full = timed(lambda: generate(model, prompt, args.new_tokens, eos_token_id=[]), device, args.repeats)
    one = timed(lambda: generate(model, prompt, 1, eos_token_id=[]), device, args.repeats)
    result["prefill_tok_s"] = ids.shape[1] / statistics.median(prefill)
    result["decode_tok_s"] = (args.new_tokens - 1) / max(statistics.median(full) - statistics.median(one), 1e-9)

    result["norm_time_share"] = norm_share(model, ids, device)
    result["norm_calls_per_forward"] = sum(isinstance(m, Norm) for m in model.modules())
    result["params"] = sum(p.numel() for p in model.parameters())
    result["peak_mem_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                             else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return result


def norm_share(model: torch.nn.Module, ids: torch.Tensor, device: torch.device) -> float:
    """Share of one forward pass spent inside norm modules (torch profiler). Every norm call goes
    through a norm's add_norm (pre-norms, fused or not) or its forward (post and q/k norms, the
    unfused add_norm's inner call): a record_function span around both on each instance, entered
    once per call (a span inside a span would count twice), catches them all."""
    from torch.profiler import ProfilerActivity, profile

    from minillama.norms import Norm

    inside = [False]

    def spanned(fn):
        def wrapper(*a, **k):
            if inside[0]:
                return fn(*a, **k)
            inside[0] = True
            try:
                with torch.profiler.record_function("norm"):
                    return fn(*a, **k)
            finally:
                inside[0] = False
        return wrapper

    for m in model.modules():
        if isinstance(m, Norm):
            m.add_norm, m.forward = spanned(m.add_norm), spanned(m.forward)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        model(ids)
        sync(device)
    events = {e.key: e for e in prof.key_averages()}
    total = sum(e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total for e in events.values())
    norm_event = events.get("norm")
    norm_time = 0 if norm_event is None else (
        norm_event.device_time_total if device.type == "cuda" else norm_event.cpu_time_total)
    return norm_time / max(total, 1)


def families(args: argparse.Namespace, done: Any = lambda row: None) -> list[dict]:
    """Per family (a make_model shape of each, random weights, cut to --family-layers layers): norm
    calls per token and their share of a prefill forward, with the checkpoint's own norm."""
    sys.path.insert(0, str(Path(__file__).parent))
    from make_model import SHAPES, shape_config

    from minillama import load_tokenizer
    from minillama.config import from_hf_config
    from minillama.model import Transformer
    from minillama.norms import Norm

    first = {}
    for shape, hf in SHAPES.items():  # one shape per family: the first listed
        first.setdefault(hf["model_type"], shape)
    tokenizer = load_tokenizer("byte")
    device, dtype = torch.device(args.device), getattr(torch, args.dtypes.split(",")[0])
    rows = []
    for family, shape in tqdm(sorted(first.items()), desc="families", file=sys.stderr):
        cfg = from_hf_config(shape_config(shape, tokenizer, layers=args.family_layers), f"shape {shape}")
        torch.manual_seed(0)
        with torch.device(device):
            model = Transformer(cfg).to(dtype).eval()
        ids = torch.randint(0, cfg.vocab_size, (1, args.prefill), device=device)
        with torch.no_grad():
            model(ids)  # warm-up
        calls = sum(isinstance(m, Norm) for m in model.modules())
        row = {"family": family, "shape": shape, "layers": cfg.num_hidden_layers, "dtype": str(dtype).split(".")[-1],
               "norm_sites_per_block": model.norm_sites()[:-1], "norm_calls_per_token": calls,
               "norm_time_share": statistics.median(norm_share(model, ids, device) for _ in range(args.repeats))}
        del model
        rows.append(row)
        done(row)
    return rows


def model_level(args: argparse.Namespace, norms: list[str], model_dir: Path, done: Any = lambda row: None) -> list[dict]:
    """One row per norm (each in its own process unless --quick); done(row) as each finishes."""
    import warnings

    import minillama
    from safetensors.torch import save_file

    warnings.simplefilter("ignore")
    dtype = args.dtypes.split(",")[0]
    with tempfile.TemporaryDirectory() as tmp:
        reference = Path(tmp) / "reference.safetensors"
        ref_model = minillama.from_pretrained(model_dir, dtype=dtype, device=args.device, norm=REFERENCE_NORM)
        ids = _token_ids(model_dir, ref_model.config.vocab_size, args.prefill).to(args.device)
        with torch.no_grad():
            save_file({"logprobs": torch.log_softmax(ref_model(ids).float(), -1)[0].cpu().contiguous(),
                       "ids": ids.cpu().contiguous()}, reference)
        del ref_model
        rows = []
        for name in tqdm(norms, desc="model level", file=sys.stderr):
            worker_args = ["--worker", "--model", str(model_dir), "--norm", name, "--dtype", dtype,
                           "--device", args.device, "--reference", str(reference), "--prefill", str(args.prefill),
                           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
            if args.quick:  # one process for all (a smoke run): peak memory is then the shared maximum
                row = model_worker(parser().parse_args(worker_args))
                row["peak_mem_shared"] = True
            else:
                out = subprocess.run([sys.executable, __file__, *worker_args], capture_output=True, text=True,
                                     env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if out.returncode:
                    sys.exit(f"model-level worker for {name} failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
            row["dtype"] = dtype
            rows.append(row)
            done(row)
    return rows


def tier_rows(ops: list[dict], models: list[dict]) -> list[dict]:
    """RMSNorm against LayerNorm within each tier: per (dtype, hidden, rows) at op level, and per
    model-level metric; `saving` is 1 - t_rms / t_layer (the paper's "less running time")."""
    out = []
    for tier, (rms, layer) in TIERS.items():
        for key in ("fwd_s", "train_s"):
            pairs = {}
            for r in ops:
                if key in r and r["norm"] in (rms, layer):
                    pairs.setdefault((r["dtype"], r["hidden"], r["rows"]), {})[r["norm"]] = statistics.median(r[key])
            for (dtype, hidden, nrows), t in sorted(pairs.items()):
                if len(t) == 2:
                    out.append({"tier": tier, "level": "op", "what": "fwd" if key == "fwd_s" else "fwd+bwd",
                                "dtype": dtype, "hidden": hidden, "rows": nrows, "rms_s": t[rms], "layer_s": t[layer],
                                "saving": 1 - t[rms] / t[layer]})
        by_norm = {r["norm"]: r for r in models}
        if rms in by_norm and layer in by_norm:
            for metric in ("prefill_tok_s", "decode_tok_s"):
                a, b = by_norm[rms][metric], by_norm[layer][metric]
                out.append({"tier": tier, "level": "model", "what": metric.split("_")[0], "dtype": by_norm[rms]["dtype"],
                            "rms_s": 1 / a, "layer_s": 1 / b, "saving": 1 - b / a})
    return out


def verdicts(tiers: list[dict]) -> list[str]:
    """One line per tier and dtype: RMSNorm's time over LayerNorm's, median over the op-level shapes
    (forward), and the model-level prefill/decode difference where both norms ran."""
    lines = []
    for tier in TIERS:
        for dtype in sorted({r["dtype"] for r in tiers if r["tier"] == tier}):
            ratios = [r["rms_s"] / r["layer_s"] for r in tiers if r["tier"] == tier and r["dtype"] == dtype
                      and r["level"] == "op" and r["what"] == "fwd"]
            model = {r["what"]: r["saving"] for r in tiers if r["tier"] == tier and r["dtype"] == dtype
                     and r["level"] == "model"}
            if not ratios and not model:
                continue
            text = f"- **{tier}, {dtype}**: "
            if ratios:
                med = statistics.median(ratios)
                text += (f"RMSNorm takes {med:.2f}x LayerNorm's time ({100 * abs(1 - med):.0f}% "
                         f"{'less' if med <= 1 else 'more'}; median of {len(ratios)} shapes, forward, "
                         f"{min(ratios):.2f}x-{max(ratios):.2f}x)")
            if model:
                text += ("; " if ratios else "") + "model time saved: " + ", ".join(
                    f"{k} {100 * v:+.1f}%" for k, v in sorted(model.items()))
            lines.append(text + f". Paper: {PAPER}.")
    return lines


def markdown(meta: dict, ops: list[dict], models: list[dict], train: bool, fams: list[dict] = ()) -> str:
    lines = [f"# bench_norm on {meta['device']} (torch {meta['torch']}); copy bandwidth {meta['bandwidth_gb_s']:.0f} "
             "GB/s; median [min-max]", "", "## Op level", ""]
    head = "| norm | dtype | hidden | rows | fwd us | fwd GB/s | % of bandwidth |" + (" fwd+bwd us |" if train else "")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in ops:
        f = r["fwd_s"]
        line = (f"| {r['norm']} | {r['dtype']} | {r['hidden']} | {r['rows']} | {statistics.median(f) * 1e6:.1f} "
                f"[{min(f) * 1e6:.1f}-{max(f) * 1e6:.1f}] | {r['fwd_gb_s']:.1f} | {r['fwd_pct_peak']:.0f}% |")
        if train:
            t = r["train_s"]
            line += f" {statistics.median(t) * 1e6:.1f} [{min(t) * 1e6:.1f}-{max(t) * 1e6:.1f}] |"
        lines.append(line)
    if models:
        lines += ["", f"## Model level: {meta['model']} ({models[0]['dtype']})", "",
                  "| norm | params | prefill tok/s | decode tok/s | norm share of forward | peak MB | perplexity "
                  "| KL from checkpoint norm |", "|---|---|---|---|---|---|---|---|"]
        for r in models:
            ppl, kl = r["perplexity"], r.get("kl_from_reference")
            lines.append(f"| {r['norm']} | {r['params']:,} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} "
                         f"| {100 * r['norm_time_share']:.1f}% | {r['peak_mem_mb']:.0f} "
                         f"| {'diverged' if ppl is None else f'{ppl:.2f}'} | {'n/a' if kl is None else f'{kl:.3g}'} |")
    tiers = tier_rows(ops, models)
    if tiers:
        lines += ["", "## RMSNorm vs LayerNorm, like for like", "", *verdicts(tiers), "",
                  "| tier | level | what | dtype | hidden | rows | RMSNorm us | LayerNorm us | RMSNorm saves |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in tiers:
            lines.append(f"| {r['tier']} | {r['level']} | {r['what']} | {r['dtype']} | {r.get('hidden', '')} "
                         f"| {r.get('rows', '')} | {r['rms_s'] * 1e6:.1f} | {r['layer_s'] * 1e6:.1f} "
                         f"| {100 * r['saving']:+.0f}% |")
    if fams:
        lines += ["", f"## Norms per family ({fams[0]['dtype']}, random weights, {fams[0]['layers']} layers, one "
                  "prefill forward)", "", "| family | shape | sites per block | norm calls per token | norm share of "
                  "forward |", "|---|---|---|---|---|"]
        for r in fams:
            lines.append(f"| {r['family']} | {r['shape']} | {', '.join(r['norm_sites_per_block'])} "
                         f"| {r['norm_calls_per_token']} | {100 * r['norm_time_share']:.1f}% |")
    return "\n".join(lines) + "\n"


def plots(out: Path, ops: list[dict], models: list[dict]) -> list[str]:
    """The PNGs written (none without matplotlib)."""
    plt = pyplot()
    if plt is None or not ops:
        return []
    written = []
    rows_max = max(r["rows"] for r in ops)
    for dtype in sorted({r["dtype"] for r in ops}):
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in sorted({r["norm"] for r in ops}):
            pts = sorted((r["hidden"], r["fwd_gb_s"]) for r in ops
                         if r["norm"] == name and r["dtype"] == dtype and r["rows"] == rows_max)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set(xscale="log", xlabel="hidden size", ylabel="GB/s (forward)",
               title=f"Norm forward, {rows_max} rows, {dtype}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"op_{dtype}.png", dpi=120)
        plt.close(fig)
        written.append(f"op_{dtype}.png")
    if models:
        fig, axes = plt.subplots(1, 3, figsize=(12, 4))
        names = [r["norm"] for r in models]
        for ax, key, label in zip(axes, ("prefill_tok_s", "decode_tok_s", "kl_from_reference"),
                                  ("prefill tok/s", "decode tok/s", "KL from checkpoint norm")):
            ax.barh(names, [r.get(key) or 0.0 for r in models])
            ax.set_xlabel(label)
        fig.tight_layout()
        fig.savefig(out / "model.png", dpi=120)
        plt.close(fig)
        written.append("model.png")
    return written


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--norms", default=None, help="comma-separated registry names (default: all)")
    p.add_argument("--hidden", default="576,2048,4096,8192")
    p.add_argument("--rows", default="1,128,2048")
    p.add_argument("--dtypes", default=None, help="default: bfloat16,float32 on CUDA, float32,bfloat16 on CPU")
    p.add_argument("--train", action="store_true", help="also time forward+backward")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prefill", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--no-model", action="store_true", help="op level only")
    p.add_argument("--families", action="store_true",
                   help="also report, per family (a tools/make_model.py shape of each), norm calls per token "
                        "and their share of a forward pass")
    p.add_argument("--family-layers", type=int, default=4, help="layers of each family's model (--families)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes, few repeats, model level in one process: a smoke run, about a minute")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench_norm_out")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--norm", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--reference", help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = parser().parse_args()
    if args.worker:
        print(json.dumps(model_worker(args)))
        return

    from minillama.norms import NORMS

    if args.quick:
        args.hidden, args.rows, args.repeats, args.prefill, args.new_tokens = "576", "1,128", 2, 32, 4
    args.dtypes = args.dtypes or ("bfloat16,float32" if args.device == "cuda" else "float32,bfloat16")
    norms = args.norms.split(",") if args.norms else sorted(NORMS)
    device = torch.device(args.device)
    model_dir = Path(args.model) if args.model else None
    if model_dir is None and not args.no_model:
        from minillama.assets import default_model_dir

        model_dir = default_model_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "bandwidth_gb_s": copy_bandwidth(device),
            "model": str(model_dir) if model_dir else None, "byte_model": "fwd: read x + write y; "
            "fwd+bwd: + read x, dy, write dx"}
    results: dict[str, Any] = {"meta": meta, "op_level": [], "model_level": [], "families": [], "plots": []}

    def save(section: str, row: dict) -> None:  # after every row, before any plotting
        results[section].append(row)
        write_json(out / "results.json", results)

    write_json(out / "results.json", results)
    ops = op_level(args, norms, device, meta["bandwidth_gb_s"], lambda row: save("op_level", row))
    models = [] if args.no_model else model_level(args, norms, model_dir, lambda row: save("model_level", row))
    fams = families(args, lambda row: save("families", row)) if args.families else []
    results["tiers"] = tier_rows(ops, models)
    results["verdicts"] = verdicts(results["tiers"])
    table = markdown(meta, ops, models, args.train, fams)
    print(table)
    (out / "results.md").write_text(table)
    results["plots"] = plots(out, ops, models)
    write_json(out / "results.json", results)


if __name__ == "__main__":
    main()
