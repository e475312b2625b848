"""Rotary position embeddings: inverse frequencies for each scaling type, and their application.

The formulas follow transformers' `modeling_rope_utils` so that cos/sin agree to the last bit in fp32.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import ModelConfig, RopeConfig


def _base_inv_freq(theta: float | torch.Tensor, dim: int) -> torch.Tensor:
    # int64 arange then float, as transformers does: float arange can differ in the last bit.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (theta**exponents)


def _llama3(rope: RopeConfig, dim: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(rope.theta, dim)
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are interpolated by `factor`, short ones kept, the band between blended smoothly.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    factor, base = rope.factor, rope.theta
    orig_len = rope.original_max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim))
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast or 32), correction_dim(rope.beta_slow or 1)
    if rope.truncate is None or rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, attention_factor


def rope_parameters(cfg: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (fp32, shape [head_dim/2]) and the cos/sin scale for `cfg.rope`.

    `seq_len` matters only for dynamic NTK scaling, whose base grows once a sequence
    passes `max_position_embeddings`.
    """
    rope, dim = cfg.rope, cfg.head_dim
    if rope.rope_type == "default":
        return _base_inv_freq(rope.theta, dim), 1.0
    if rope.rope_type == "linear":
        return _base_inv_freq(rope.theta, dim) / rope.factor, 1.0
    if rope.rope_type == "dynamic":
        max_len = cfg.max_position_embeddings
        # A 0-d int64 tensor, as transformers passes it: the base is then computed in fp32, bit for bit.
        seq_len = torch.tensor(max(seq_len or max_len, max_len))
        base = rope.theta * ((rope.factor * seq_len / max_len) - (rope.factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if rope.rope_type == "llama3":
        return _llama3(rope, dim), 1.0
    if rope.rope_type == "yarn":
        return _yarn(rope, dim)
    raise AssertionError(rope.rope_type)  # ModelConfig.validate rejects other types


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) for given positions; the decoder shares one instance across layers.

    The frequencies live on the model's device from the start (moved by model.to / .cuda /
    .to_empty, and placed by Transformer.setup_cache): moving them inside the first forward would
    make a torch.compile'd forward guard on their old device and compile a second time.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        inv_freq, self.scale = rope_parameters(cfg)
        # Plain attributes rather than buffers: model.to(bfloat16) must not round the frequencies.
        # The CPU copy keeps the exact values for a model built on (or moved through) the meta device.
        self._inv_freq_cpu = inv_freq
        self.inv_freq = inv_freq

    def place(self, device: torch.device | str) -> None:
        """Put the frequencies on `device` (fp32, the exact values)."""
        device = torch.device(device)
        if self.inv_freq.device != device:
            self.inv_freq = self._inv_freq_cpu.to(device)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> RotaryEmbedding:
        # Module.to / cuda / to_empty reach every submodule through _apply: follow the device the
        # conversion sends a float tensor to, never its dtype.
        try:
            device = fn(torch.empty(0, device=self.inv_freq.device)).device
        except Exception:  # a conversion that is not about devices (e.g. share_memory_)
            device = None
        if device is not None:
            self.place(device)
        return super()._apply(fn, *args, **kwargs)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [*position_ids.shape, head_dim], cast to `dtype` (as transformers does)."""
        if self.inv_freq.device != position_ids.device:  # e.g. a model spread by a device map
            self.place(position_ids.device)
        inv_freq, scale = self.inv_freq, self.scale
        if self.cfg.rope.rope_type == "dynamic":
            # Stateless version of transformers' dynamic update: frequencies follow the longest position
            # in this call, so a model's output never depends on what it was called with before.
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.cfg.max_position_embeddings:
                inv_freq, scale = rope_parameters(self.cfg, seq_len)
                inv_freq = inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension (the HF/NeoX half-split layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., head_dim] by cos/sin broadcastable to it (the model passes [batch, seq, 1, head_dim]
    for x [batch, seq, heads, head_dim])."""
    return x * cos + rotate_half(x) * sin
