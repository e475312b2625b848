"""LoRA through peft: adapters on the fused linear layers, merged back into plain weights for export."""

from __future__ import annotations

import warnings

from torch import nn

from ..errors import ConfigError
from ..quant import QuantLinear, dequantize_model
from .config import LoraSection

# transformers' projection names -> ours, for every family (Phi-3 names its fused ones qkv_proj and
# gate_up_proj). q/k/v (and gate/up) are one fused matmul here, so an adapter on any of them
# adapts the fused projection.
HF_NAMES = {"q_proj": "wqkv", "k_proj": "wqkv", "v_proj": "wqkv", "qkv_proj": "wqkv", "o_proj": "wo",
            "gate_proj": "w_gate_up", "up_proj": "w_gate_up", "gate_up_proj": "w_gate_up", "down_proj": "w_down"}


def lora_targets(model: nn.Module, names: list[str]) -> list[str]:
    """Our module names for `names` (ours or transformers'); an unknown name is a ConfigError."""
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}
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

    from peft.tuners.lora.layer import Linear as LoraLinear

    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=lora_targets(model, cfg.targets), bias="none")
    # A quantized base (QLoRA-style) takes peft's plain LoRA layer: it only calls the base layer's
    # forward and reads in_features/out_features. Merging is ours (merge_lora), never peft's, which
    # would add the update to the integer weight.
    config._register_custom_module({QuantLinear: LoraLinear})
    with warnings.catch_warnings():  # peft warns about any layer class it does not know by name
        warnings.filterwarnings("ignore", message="Unsupported layer type .*QuantLinear")
        return get_peft_model(model, config)


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain model with every adapter folded into its weights (the model itself if it has none).
    A quantized base is dequantized first: the result is an ordinary float model."""
    from ..linear import unpack_model

    dequantize_model(model)
    unpack_model(model)  # peft rewrites weights through .data, unseen by a packed copy's checks
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
