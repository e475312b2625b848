"""Resumable training checkpoints: atomic, self-checking, the newest k kept; no pickles.

A checkpoint is `out/checkpoints/step-NNNNNN/` holding
  model.safetensors       the trainable parameters (all of them, or only the LoRA adapters)
  optimizer.safetensors   the optimizer's per-parameter tensors; optimizer.json the rest
  rng-rankR.safetensors   each process's torch RNG states (+ rng-rankR.json: Python's)
  trainer_state.json      step, scheduler, run facts and a manifest of every file with its size
The main process writes it (every process's RNG state gathered to it) into a hidden temporary
directory renamed into place only when complete (atomic.atomic_directory), and
trainer_state.json is written last: a directory without it, or whose files do not match its
manifest, is skipped on resume in favour of the previous one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..atomic import atomic_directory
from ..errors import CheckpointError

STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"step-(\d+)")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Wrapper prefixes that DDP/FSDP/activation checkpointing add to parameter names.
_WRAPPERS = re.compile(r"(^|\.)(module|_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def clean_name(name: str) -> str:
    """A parameter's name without distributed-wrapper prefixes (as state-dict helpers report it)."""
    return _WRAPPERS.sub(r"\1", name)


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters the optimizer updates (shared ones once)."""
    return [clean_name(n) for n, p in model.named_parameters() if p.requires_grad]


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1))


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)


def _all_processes(obj: Any) -> list[Any]:
    """`obj` of every process, in rank order (just [obj] without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _flatten_optimizer(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for name, state in osd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value
            else:
                scalars[f"{name}/{key}"] = value
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *rest["scalars"].items()]:
        name, key = flat.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict[str, torch.Tensor], Any]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return tensors, random.getstate()


def _set_rng_state(tensors: dict[str, torch.Tensor], python: Any) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    version, internal, gauss = python
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(
    accelerator: Any, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    root: Path, step: int, extra: dict[str, Any], keep_last: int,
) -> Path | None:
    """Write step `step`'s checkpoint atomically under `root`; every process must call it.
    Returns the directory (on the main process)."""
    # Collectives first: every process takes part in gathering full (unsharded) state dicts and
    # hands its RNG states to the main process, which alone writes.
    model_sd = get_model_state_dict(model, options=FULL)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=FULL)
    rng_states = _all_processes(_rng_state())
    final = root / f"step-{step:06d}"
    if accelerator.is_main_process:
        for stale in root.glob(".step-*.tmp-*"):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        # A step saved again (a resumed run) replaces its old directory only if that has our marker.
        with atomic_directory(final, marker=STATE_FILE) as tmp:
            for rank, (rng_tensors, rng_python) in enumerate(rng_states):
                _save_tensors(rng_tensors, tmp / f"rng-rank{rank}.safetensors")
                _write_json(tmp / f"rng-rank{rank}.json", rng_python)
            names = trainable_names(accelerator.unwrap_model(model))
            _save_tensors({n: model_sd[n] for n in names}, tmp / "model.safetensors")
            tensors, rest = _flatten_optimizer(optim_sd)
            _save_tensors(tensors, tmp / "optimizer.safetensors")
            _write_json(tmp / "optimizer.json", rest)
            manifest = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
            _write_json(tmp / STATE_FILE, {"step": step, "scheduler": scheduler.state_dict(),
                                           "num_processes": accelerator.num_processes, "files": manifest, **extra})
        for old in list_checkpoints(root)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final if accelerator.is_main_process else None


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under `root`, newest step first (complete or not)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def check_checkpoint(path: Path) -> dict[str, Any]:
    """The trainer state of a complete checkpoint; CheckpointError saying what is wrong otherwise."""
    state_file = path / STATE_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not state_file.is_file():
        raise CheckpointError(f"{path}: incomplete (no {STATE_FILE})")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{state_file}: not valid JSON ({e.msg})") from None
    for name, size in state.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, expected {size} (truncated?)")
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(file), "pt"):
                    pass
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{file}: unreadable ({e})") from None
    if "model.safetensors" not in state.get("files", {}):
        raise CheckpointError(f"{state_file}: lists no model.safetensors")
    return state


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, skipping (with a warning) broken newer ones."""
    for path in list_checkpoints(root):
        try:
            check_checkpoint(path)
            return path
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint {e}", stacklevel=2)
    return None


def load_checkpoint(
    accelerator: Any, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, path: Path,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG states from `path`; returns its trainer state."""
    state = check_checkpoint(path)
    names = set(trainable_names(accelerator.unwrap_model(model)))
    weights = load_file(str(path / "model.safetensors"))
    if set(weights) != names:
        missing, unexpected = sorted(names - set(weights)), sorted(set(weights) - names)
        raise CheckpointError(f"{path / 'model.safetensors'}: does not match this run's trainable parameters "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]}); was it saved with another "
                              "model or LoRA setting?")
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    rest = json.loads((path / "optimizer.json").read_text())
    osd = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), rest)
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    rank = accelerator.process_index
    rng_file = path / f"rng-rank{rank}.safetensors"
    if state.get("num_processes") == accelerator.num_processes and rng_file.is_file():
        _set_rng_state(load_file(str(rng_file)), json.loads((path / f"rng-rank{rank}.json").read_text()))
    elif accelerator.is_main_process:
        warnings.warn(f"{path}: saved by {state.get('num_processes')} processes, resumed by "
                      f"{accelerator.num_processes}: random states start fresh", stacklevel=2)
    return state
