"""LoRA through peft: adapters on the fused linear layers, merged back into plain weights for export."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .config import LoraSection

# transformers' projection names -> ours. q/k/v (and gate/up) are one fused matmul here, so an
# adapter on any of them adapts the fused projection.
HF_NAMES = {"q_proj": "wqkv", "k_proj": "wqkv", "v_proj": "wqkv", "o_proj": "wo",
            "gate_proj": "w_gate_up", "up_proj": "w_gate_up", "down_proj": "w_down"}


def lora_targets(model: nn.Module, names: list[str]) -> list[str]:
    """Our module names for `names` (ours or transformers'); an unknown name is a ConfigError."""
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = []
    for name in names:
        ours = HF_NAMES.get(name, name)
        if ours not in linear:
            raise ConfigError(f"lora.targets: no linear layer named {name!r} (choose from {', '.join(sorted(linear))}"
                              f" or {', '.join(HF_NAMES)})")
        if ours not in targets:
            targets.append(ours)
    return targets


def apply_lora(model: nn.Module, cfg: LoraSection) -> nn.Module:
    """Wrap `model` with LoRA adapters (peft): only the adapters train, the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=lora_targets(model, cfg.targets), bias="none")
    return get_peft_model(model, config)


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain model with every adapter folded into its weights (the model itself if it has none)."""
    from ..linear import unpack_model

    unpack_model(model)  # peft rewrites weights through .data, unseen by a packed copy's checks
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
