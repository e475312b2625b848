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


def _longrope(rope: RopeConfig, dim: int, max_len: int, long: bool) -> tuple[torch.Tensor, float]:
    # Phi-3: per-frequency divisors, the short ones up to the original length, the long ones past it;
    # cos/sin scaled by sqrt(1 + log(factor) / log(original length)) at every length.
    orig = rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_len / orig
    scale = rope.attention_factor
    if scale is None:
        scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    ext = torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext * rope.theta**exponents), scale


def rope_parameters(
    cfg: ModelConfig, seq_len: int | None = None, rope: RopeConfig | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (fp32, shape [rotary_dim/2]) and the cos/sin scale for `rope` (default
    cfg.rope; Gemma 3's sliding layers pass cfg.rope_local).

    `seq_len` matters only for dynamic NTK scaling, whose base grows once a sequence passes
    `max_position_embeddings`, and longrope, whose long factors apply past the original length.
    """
    rope, dim = rope or cfg.rope, cfg.rotary_dim
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
    if rope.rope_type == "longrope":
        long = seq_len is not None and seq_len > rope.original_max_position_embeddings
        return _longrope(rope, dim, cfg.max_position_embeddings, long)
    raise AssertionError(rope.rope_type)  # ModelConfig.validate rejects other types


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) for given positions; the decoder shares one instance across layers.

    The frequencies live on the model's device from the start (moved by model.to / .cuda /
    .to_empty, and placed by Transformer.setup_cache): moving them inside the first forward would
    make a torch.compile'd forward guard on their old device and compile a second time.
    """

    def __init__(self, cfg: ModelConfig, rope: RopeConfig | None = None) -> None:
        super().__init__()
        self.cfg, self.rope = cfg, rope or cfg.rope
        inv_freq, self.scale = rope_parameters(cfg, rope=self.rope)
        # Plain attributes rather than buffers: model.to(bfloat16) must not round the frequencies.
        # The CPU copy keeps the exact values for a model built on (or moved through) the meta device.
        self._inv_freq_cpu = inv_freq
        self.inv_freq = inv_freq
        # longrope: the frequencies past the original length, chosen on the device (no host read,
        # so a compiled step keeps one graph).
        self._long_cpu = self.long_inv_freq = None
        if self.rope.rope_type == "longrope":
            self._long_cpu = self.long_inv_freq = rope_parameters(
                cfg, self.rope.original_max_position_embeddings + 1, self.rope)[0]

    def place(self, device: torch.device | str) -> None:
        """Put the frequencies on `device` (fp32, the exact values)."""
        device = torch.device(device)
        if self.inv_freq.device != device:
            self.inv_freq = self._inv_freq_cpu.to(device)
            if self._long_cpu is not None:
                self.long_inv_freq = self._long_cpu.to(device)

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
        """cos, sin of shape [*position_ids.shape, rotary_dim], cast to `dtype` (as transformers does)."""
        if self.inv_freq.device != position_ids.device:  # e.g. a model spread by a device map
            self.place(position_ids.device)
        inv_freq, scale = self.inv_freq, self.scale
        if self.rope.rope_type == "dynamic":
            # Stateless version of transformers' dynamic update: frequencies follow the longest position
            # in this call, so a model's output never depends on what it was called with before.
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.cfg.max_position_embeddings:
                inv_freq, scale = rope_parameters(self.cfg, seq_len, self.rope)
                inv_freq = inv_freq.to(position_ids.device)
        elif self.long_inv_freq is not None:
            # As transformers' longrope update: the long factors once this call reaches past the
            # original length (keys cached before keep the short ones, there as here).
            past = position_ids.max() >= self.rope.original_max_position_embeddings
            inv_freq = torch.where(past, self.long_inv_freq, inv_freq)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension (the HF/NeoX half-split layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., head_dim] by cos/sin broadcastable to it (the model passes [batch, seq, 1, rotary_dim]
    for x [batch, seq, heads, head_dim]). With partial rotary (rotary_dim < head_dim) only the
    first rotary_dim features of each head turn; the rest pass through."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
