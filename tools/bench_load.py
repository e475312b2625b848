#!/usr/bin/env python
"""Memory a load takes: peak resident memory added by `from_pretrained` and one forward, per
weight byte, for minillama and transformers, each in a fresh process, same checkpoint.

The ratio says how many copies of the weights a load holds at its peak (1.0: each weight once);
"kept after" is what stays resident once the load and the forward are over.
Each implementation runs in its own subprocess so that the peak is its own; the figure is the
peak RSS while loading and running one 16-token forward minus the RSS before, over the bytes of
the weights in the load dtype; each worker first loads and runs a tiny model, so the figure leaves
out imports and one-time set-up.

    python tools/bench_load.py --model DIR                       # the checkpoint's dtype
    python tools/bench_load.py --shape qwen3-0.6b --layers 8     # a tools/make_model.py shape
    python tools/bench_load.py --families --layers 4 --json out.json   # one shape of every family
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from benchutil import PeakRSS, write_json

IMPLS = ("minillama", "transformers")


def _load(impl: str, model_dir: str | Path, dtype: str) -> Any:
    if impl == "transformers":
        import transformers

        return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    import minillama

    return minillama.from_pretrained(model_dir, dtype=dtype)


def worker(impl: str, model_dir: str, dtype: str, warm: str) -> dict[str, Any]:
    """Load `model_dir` with `impl` in `dtype`, run one forward; the peak RSS it added. A tiny model
    of the same kind is loaded and run first, so that imports and one-time set-up (oneDNN, OpenMP,
    kernels) are not counted as the load's."""
    from minillama.quant import weight_bytes

    ids = torch.arange(16)[None] % 100
    with torch.no_grad():
        _load(impl, warm, dtype)(ids)
    with PeakRSS() as rss:
        model = _load(impl, model_dir, dtype)
        with torch.no_grad():
            model(ids)
    after = PeakRSS.current() - rss.start  # what the loaded model keeps, once the load is over
    weights = weight_bytes(model)  # from shapes: reads (and so restores) no weight
    return {"impl": impl, "dtype": dtype, "weight_bytes": weights, "peak_added_bytes": rss.peak - rss.start,
            "ratio": (rss.peak - rss.start) / weights, "after_bytes": after, "after_ratio": after / weights}


def measure(model_dir: Path, dtype: str, impls: list[str], warm: Path) -> list[dict[str, Any]]:
    rows = []
    for impl in impls:
        out = subprocess.run([sys.executable, __file__, "--worker", impl, "--model", str(model_dir), "--dtypes", dtype,
                              "--warm", str(warm)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"bench_load: the {impl} worker failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--shape", help="a tools/make_model.py shape instead of --model (random weights)")
    p.add_argument("--families", action="store_true", help="the first make_model shape of every family")
    p.add_argument("--layers", type=int, default=None, help="cut --shape / --families models to this many layers")
    p.add_argument("--dtypes", default="bfloat16")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--json", help="also write the rows here (rewritten as each finishes)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--warm", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.dtypes, args.warm)))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from make_model import SHAPES, make_model

    from minillama import load_tokenizer

    shapes = [args.shape] if args.shape else []
    if args.families:
        first: dict[str, str] = {}
        for shape, hf in SHAPES.items():
            first.setdefault(hf["model_type"], shape)
        shapes = list(first.values())
    rows: list[dict[str, Any]] = []
    print("| model | dtype | impl | weights MB | peak added MB | x weights | kept after MB | x weights |\n"
          "|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        warm = make_model("smollm2-135m", Path(tmp) / "warm", tiny=True, layers=1, tokenizer=load_tokenizer("byte"))
        targets = [(shape, None) for shape in shapes] or [(None, args.model)]
        for shape, model_dir in targets:
            for dtype in args.dtypes.split(","):
                if shape is not None:
                    model_dir = Path(tmp) / f"{shape}-{dtype}"
                    if not model_dir.is_dir():
                        make_model(shape, model_dir, dtype=dtype, layers=args.layers, tokenizer=load_tokenizer("byte"))
                elif model_dir is None:
                    from minillama.assets import default_model_dir

                    model_dir = default_model_dir()
                for row in measure(Path(model_dir), dtype, args.impls.split(","), warm):
                    row["model"] = shape or str(model_dir)
                    rows.append(row)
                    print(f"| {row['model']} | {dtype} | {row['impl']} | {row['weight_bytes'] / 1e6:.0f} "
                          f"| {row['peak_added_bytes'] / 1e6:.0f} | {row['ratio']:.2f} | {row['after_bytes'] / 1e6:.0f} "
                          f"| {row['after_ratio']:.2f} |", flush=True)
                    if args.json:
                        write_json(Path(args.json), {"rows": rows, "layers": args.layers})


if __name__ == "__main__":
    main()
