"""Models bigger than one device: layers placed on GPUs, CPU memory or disk (Accelerate's big-model tools).

`from_pretrained(path, device_map=..., offload_folder=...)` loads the checkpoint on the CPU, then
`accelerate.dispatch_model` moves each module where the map says: a GPU (it runs there), "cpu"
(kept in host memory, copied to the main GPU for each forward), or "disk" (written to the offload
folder, read back for each forward; the CPU copy is freed). Hooks move activations between
devices, so the model's code is unchanged; each layer's KV cache lives on the device that layer
runs on. Slow (weights cross the bus every token) but correct: tested equal to the in-memory model.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

# Modules a device map places (the unit "auto" never splits is one decoder block).
NO_SPLIT = ["Block"]


def placeable(model: nn.Module) -> list[str]:
    """The module names a device map may name: embed, layers.N, norm, lm_head."""
    return ["embed", *(f"layers.{i}" for i in range(len(model.layers))), "norm", "lm_head"]


def resolve_device_map(model: nn.Module, device_map: str | dict[str, Any], max_memory: dict | None = None,
                       dtype: torch.dtype | None = None, offload_folder: str | Path | None = None) -> dict[str, Any]:
    """A complete {module name: device} map: "auto" through Accelerate, or a given dict checked
    (with an offload folder for whatever goes to "disk")."""
    if device_map == "auto":
        from accelerate import infer_auto_device_map

        mapping = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=NO_SPLIT, dtype=dtype)
    elif isinstance(device_map, dict):
        mapping = dict(device_map)
    else:
        raise ConfigError(f"device_map must be 'auto' or a dict of module name -> device, got {device_map!r}")
    names = placeable(model)

    def covers(key: str, name: str) -> bool:  # "" (the whole model) and "layers" cover several names
        return key in ("", name) or name.startswith(key + ".")

    unknown = [k for k in mapping if k != "rope" and not any(covers(k, n) for n in names)]
    if unknown:
        raise ConfigError(f"device_map: no module named {', '.join(map(repr, unknown))}; name "
                          f"{', '.join(names[:3])}, ..., {names[-2]}, {names[-1]}")
    missing = [n for n in names if not any(covers(k, n) for k in mapping)]
    if missing:
        raise ConfigError(f"device_map: no device for {', '.join(missing)}")
    # One entry per placeable module, from the most specific key that covers it.
    mapping = {n: mapping[max((k for k in mapping if covers(k, n)), key=len)] for n in names}
    for name, device in mapping.items():
        if device != "disk":
            try:
                torch.device(device)
            except (RuntimeError, TypeError):
                raise ConfigError(f"device_map: {name}: unknown device {device!r}; use cpu, cuda:N, N or 'disk'") \
                    from None
    # The final norm is called through `add_norm`, not forward, so an offload hook on it would never
    # fire: it (one vector) stays where the model runs.
    gpus = [d for d in mapping.values() if d not in ("cpu", "disk")]
    mapping["norm"] = gpus[0] if gpus else "cpu"
    if model.config.tie_word_embeddings and mapping["embed"] != mapping["lm_head"]:
        raise ConfigError(f"device_map: the embedding and lm_head share one matrix (tied embeddings) but are mapped "
                          f"to {mapping['embed']!r} and {mapping['lm_head']!r}; give them the same device")
    if "disk" in mapping.values() and offload_folder is None:
        raise ConfigError("device_map puts modules on 'disk': pass offload_folder=DIR")
    return mapping


def dispatch(model: nn.Module, device_map: dict[str, Any], offload_folder: str | Path | None) -> nn.Module:
    """Place a loaded (CPU) model's modules per `device_map`; "disk" modules go to a fresh
    subfolder of `offload_folder`, removed when the model is freed."""
    from accelerate import dispatch_model

    folder = None
    if "disk" in device_map.values():  # resolve_device_map made sure there is a folder
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
        # A fresh folder every time: Accelerate reuses any index.json it finds, which would serve
        # another model's (or an older version's) weights.
        folder = tempfile.mkdtemp(prefix="minillama-offload-", dir=offload_folder)
    # A block's norms are also called through `add_norm`: an offloaded block loads all its weights
    # when it starts (one block in memory at a time), not leaf by leaf.
    model = dispatch_model(model, device_map=device_map, offload_dir=folder, preload_module_classes=NO_SPLIT)
    if folder is not None:
        weakref.finalize(model, shutil.rmtree, folder, True)
    model.hf_device_map = device_map
    return model


def execution_device(module: nn.Module) -> torch.device | None:
    """The device a dispatched module runs on (None when it is not dispatched)."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    return torch.device(device) if device is not None else None
