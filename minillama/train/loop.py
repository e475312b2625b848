"""The fine-tuning loop, through Accelerate: one process or many (DDP, FSDP), CPU or GPU.

One optimizer step takes batch_size * grad_accum * processes rows, chosen by StepSampler from
(seed, step) alone. The loss is the sum over target tokens divided by the step's total number of
target tokens (known to every process up front), so accumulation and data parallelism give the
gradient of one big batch, however ragged the rows are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .. import dist
from ..checkpoint import empty_model, from_pretrained, save_pretrained
from ..config import ModelConfig, parse_dtype
from ..errors import ConfigError
from ..loss import shift_labels
from ..model import Transformer
from ..norms import Norm
from ..quant import quantize_model
from ..tokenizer import load_tokenizer
from .checkpointing import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .config import FinetuneConfig, ModelSection, to_dict
from .data import Example, StepSampler, build_datasets, collate
from .lora import apply_lora, merge_lora
from .metrics import MetricsLog


def token_loss(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over target positions (fp32), the projection fused with the loss."""
    return model(ids, labels=shift_labels(ids, targets))


def build_model(spec: ModelSection, seed: int) -> tuple[Transformer, Any]:
    """(model on the CPU in training mode, tokenizer) from a checkpoint or a fresh random config."""
    from ..hub import model_path

    tokenizer_path = spec.tokenizer
    if spec.path is not None:
        path = model_path(None if spec.path == "default" else spec.path)
        model = from_pretrained(path, dtype=spec.dtype, device="cpu", norm=spec.norm, quantize=spec.quantize)
        tokenizer_path = tokenizer_path or path
    else:
        cfg = ModelConfig.from_hf({"model_type": "llama", **spec.config}, source="model.config")
        if spec.norm:
            cfg.norm = spec.norm
        torch.manual_seed(seed)
        model = Transformer(cfg).to(parse_dtype(spec.dtype))
        if spec.quantize:
            quantize_model(model, spec.quantize)
    if tokenizer_path == "default":
        tokenizer_path = model_path(None)
    tokenizer = load_tokenizer(tokenizer_path)
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer_path} has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{model.config.vocab_size}")
    return model.train(), tokenizer


def make_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norm gains or biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak LR at `step`: linear warmup, then cosine down to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train_step(
    accelerator: Any, model: nn.Module, optimizer: Any, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    n_targets: int, grad_clip: float | None,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = token_loss,
) -> tuple[torch.Tensor, float]:
    """One optimizer step over this process's micro-batches [(ids, targets)]: forward, backward
    (gradients all-reduced once, on the last micro-batch), clip, step. `n_targets` counts the target
    tokens of the whole step on all processes. Returns (this process's summed loss, gradient norm).
    loss_fn(model, ids, targets) -> summed loss; the benchmark passes one for transformers' models."""
    world = accelerator.num_processes
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for i, (ids, targets) in enumerate(micro_batches):
        ids, targets = ids.to(accelerator.device), targets.to(accelerator.device)
        sync = contextlib.nullcontext() if i == len(micro_batches) - 1 else accelerator.no_sync(model)
        with sync:
            loss = loss_fn(model, ids, targets)
            # DDP averages gradients over processes: scale by `world` to get the step's token mean.
            accelerator.backward(loss * (world / max(n_targets, 1)))
        loss_sum += loss.detach().double()
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip if grad_clip is not None else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, float(grad_norm)


def _shard(rows: Sequence[Example], micro: int, rank: int, world: int, batch_size: int) -> list[Example]:
    start = (micro * world + rank) * batch_size
    return list(rows[start: start + batch_size])


@torch.no_grad()
def evaluate(accelerator: Any, model: nn.Module, examples: list[Example], batch_size: int,
             max_batches: int | None = None) -> float:
    """Mean validation loss per target token, over every process's share of the batches."""
    batches = [examples[i: i + batch_size] for i in range(0, len(examples), batch_size)][:max_batches]
    rank, world = accelerator.process_index, accelerator.num_processes
    per_rank = math.ceil(len(batches) / world)
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    model.eval()
    for i in range(per_rank):
        b = i * world + rank
        # Every process runs the same number of forwards (FSDP gathers weights collectively); a
        # process with no batch left recomputes batch 0 and counts nothing.
        ids, targets = collate(batches[b if b < len(batches) else 0])
        ids, targets = ids.to(accelerator.device), targets.to(accelerator.device)
        loss = token_loss(model, ids, targets)
        if b < len(batches):
            total += torch.stack([loss.double(), targets[:, 1:].sum().double()])
    model.train()
    total = accelerator.reduce(total, "sum")
    return float(total[0] / total[1])


def export_model(accelerator: Any, model: nn.Module, cfg: FinetuneConfig, model_config: ModelConfig,
                 generation_config: dict, tokenizer: Any, out_dir: Path) -> Path | None:
    """Save the trained model (LoRA merged) as an HF checkpoint directory; every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from .checkpointing import FULL

    state = get_model_state_dict(model, options=FULL)  # collective under FSDP
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return None
    fresh: nn.Module = empty_model(model_config, parse_dtype(cfg.model.dtype), "cpu")
    if cfg.lora.enabled:
        fresh = apply_lora(fresh, cfg.lora)
    fresh.load_state_dict(state, strict=True)
    plain = merge_lora(fresh)
    plain.generation_config = dict(generation_config)
    save_pretrained(plain, out_dir, tokenizer=tokenizer)
    accelerator.wait_for_everyone()
    return out_dir


def weights_digest(model: nn.Module) -> str:
    """sha256 of the trainable parameters (this process's copy): equal across DDP ranks when in sync."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _resume(accelerator: Any, cfg: FinetuneConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Any, ckpt_root: Path) -> tuple[int, int]:
    """(step, tokens seen) to continue from: 0, 0 for a fresh run, else those of the checkpoint loaded."""
    if not cfg.resume:
        return 0, 0
    path = latest_checkpoint(ckpt_root) if cfg.resume == "auto" else Path(cfg.resume)
    if path is None:
        _say(accelerator, f"--resume: no complete checkpoint in {ckpt_root}; starting from step 0")
        return 0, 0
    state = load_checkpoint(accelerator, model, optimizer, scheduler, path)
    saved, now = state.get("config", {}), to_dict(cfg)
    # Settings that shape the trajectory (max_steps does not: it only ends the run).
    for key in ("seed", "batch_size", "grad_accum", "mixed_precision", "model", "data", "optim", "lora"):
        if key in saved and saved[key] != now[key] and accelerator.is_main_process:
            warnings.warn(f"{path}: saved with {key}={saved[key]}, resumed with {now[key]}: "
                          "the run will not match an uninterrupted one", stacklevel=2)
    _say(accelerator, f"resumed from {path} (step {state['step']})")
    return state["step"], state.get("tokens", 0)


def _say(accelerator: Any, message: str) -> None:
    if accelerator.is_main_process:
        print(f"minillama finetune: {message}", file=sys.stderr, flush=True)


def finetune(cfg: FinetuneConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a fine-tuning run; returns the summary also written to out/summary.json."""
    from accelerate.utils import DistributedType, gather_object, set_seed
    from tqdm import tqdm

    accelerator = dist.accelerator(mixed_precision=cfg.mixed_precision)
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    if not cfg.resume and list_checkpoints(ckpt_root):
        raise ConfigError(f"{ckpt_root}: holds checkpoints of an earlier run; pass --resume to continue it "
                          "or choose another --out")
    set_seed(cfg.seed)  # same seed on every process: identical initial weights
    with warnings.catch_warnings():
        if not accelerator.is_main_process:  # every process reads the same data: warn once
            warnings.simplefilter("ignore")
        with accelerator.main_process_first():  # the first use of the embedded model converts it, once
            model, tokenizer = build_model(cfg.model, cfg.seed)
        train_rows, val_rows = build_datasets(cfg.data, tokenizer, cfg.seed)
    if model.config.quantization is not None and not cfg.lora.enabled:
        raise ConfigError(f"model.path {cfg.model.path} is quantized ({model.config.quantization.name}): its "
                          "weights are frozen; set lora.enabled: true to train adapters on it")
    if cfg.export and any(isinstance(m, Norm) and not m.hf_compatible for m in model.modules()):
        raise ConfigError(f"model.norm {model.config.norm!r} cannot be exported to the Hugging Face format; "
                          "set export: false")
    model_config, generation_config = model.config, model.generation_config
    world = accelerator.num_processes
    rows_per_step = cfg.batch_size * cfg.grad_accum * world
    sampler = StepSampler(len(train_rows), rows_per_step, cfg.seed)
    _say(accelerator, f"{len(train_rows)} training rows, {len(val_rows)} validation rows; {world} process(es) "
                      f"x {cfg.batch_size} rows x {cfg.grad_accum} accumulation = {rows_per_step} rows per step")

    model.gradient_checkpointing = cfg.gradient_checkpointing
    base = model
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    if cfg.compile:
        base.compile_blocks()  # after LoRA: the adapters are part of each block's graph
    optimizer = make_optimizer(model, cfg)
    decay_steps = cfg.optim.decay_steps or cfg.max_steps
    if cfg.max_steps > decay_steps:
        _say(accelerator, f"max_steps {cfg.max_steps} > optim.decay_steps {decay_steps}: the learning rate stays "
                          f"at {cfg.optim.min_lr_ratio} x lr after step {decay_steps}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.optim.warmup_steps, decay_steps, cfg.optim.min_lr_ratio))
    # The scheduler stays unprepared: Accelerate's wrapper would step it once per process.
    model, prepared_optimizer = accelerator.prepare(model, optimizer)

    metrics = MetricsLog(out, enabled=accelerator.is_main_process)
    start, tokens = _resume(accelerator, cfg, model, optimizer, scheduler, ckpt_root)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        metrics.truncate(start)
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    last = min(cfg.max_steps, cfg.stop_after or cfg.max_steps)
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not (progress and accelerator.is_main_process),
               desc="finetune", unit="step", dynamic_ncols=True)
    row: dict[str, Any] = {}
    began = time.perf_counter()
    for step in range(start, last):
        t0 = time.perf_counter()
        rows = [train_rows[i] for i in sampler.rows(step)]
        n_targets = sum(ex.n_targets for ex in rows)
        micro_batches = [collate(_shard(rows, micro, accelerator.process_index, world, cfg.batch_size))
                         for micro in range(cfg.grad_accum)]
        loss_sum, grad_norm = train_step(accelerator, model, prepared_optimizer, micro_batches, n_targets,
                                         cfg.optim.grad_clip)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        loss_value = float(accelerator.reduce(loss_sum, "sum")) / max(n_targets, 1)
        step_tokens = sum(len(ex.ids) for ex in rows)
        tokens += step_tokens
        done = step + 1
        row = {"step": done, "epoch": round(sampler.epoch(done), 4), "loss": loss_value, "lr": lr,
               "grad_norm": grad_norm, "tokens": tokens,
               "tokens_per_s": round(step_tokens / (time.perf_counter() - t0), 1)}
        if val_rows and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps):
            val = evaluate(accelerator, model, val_rows, cfg.batch_size, cfg.eval_max_batches)
            row.update(val_loss=val, val_ppl=math.exp(min(val, 50.0)))
        if done % cfg.log_every == 0 or "val_loss" in row or done in (last, cfg.max_steps):
            metrics.log(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if (cfg.save_every and done % cfg.save_every == 0) or done == last:
            # The data position is the step: rows come from StepSampler(seed, step); the rest is for people.
            position = {"rows_seen": done * rows_per_step, "epoch": sampler.epoch(done), "seed": cfg.seed}
            save_checkpoint(accelerator, model, optimizer, scheduler, ckpt_root, done,
                            {"tokens": tokens, "data_position": position, "config": to_dict(cfg)}, cfg.keep_last)
    bar.close()
    finished = last == cfg.max_steps

    digests = gather_object([weights_digest(accelerator.unwrap_model(model))]) \
        if accelerator.distributed_type != DistributedType.FSDP else []
    exported = None
    if finished and cfg.export:
        exported = export_model(accelerator, model, cfg, model_config, generation_config, tokenizer, out / "final")
    summary = {
        "steps": last, "finished": finished, "processes": world, "rows_per_step": rows_per_step,
        "train_loss": row.get("loss"), "val_loss": row.get("val_loss"), "val_ppl": row.get("val_ppl"),
        "tokens": tokens, "seconds": round(time.perf_counter() - began, 2),
        "weights_sha256_per_process": digests, "processes_in_sync": len(set(digests)) <= 1,
        "export": str(exported) if exported else None,
        "config": to_dict(cfg),
    }
    if accelerator.is_main_process:
        metrics.plot()
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        _say(accelerator, f"{'done' if finished else f'stopped after step {last}'}: train loss "
                          f"{summary['train_loss']}, val loss {summary['val_loss']}"
                          + (f"; exported to {exported}" if exported else ""))
    accelerator.wait_for_everyone()
    return summary
