"""The norm registry: name -> nn.Module class. Nothing else in minillama branches on norm names.

A norm class takes `(dim, eps, **options)`, maps [..., dim] -> [..., dim] in `forward`, and offers
`add_norm(x, residual)` -> (norm(x + residual), x + residual) for the pre-norm residual stream;
subclasses with a fused kernel override it. Adding a norm is one `@register_norm("name")` class.

Names may carry options: "prmsnorm:p=0.125". Every norm has a `weight` (gamma), which is what a
checkpoint's RMSNorm provides; other parameters (a LayerNorm's beta) start from `reset_unloaded()`
when a checkpoint is loaded into them.

Families differ in the gain (ModelConfig.norm_offset, norm_fp32_gain): Gemma multiplies by
(1 + w) in fp32 and casts after, OLMo 2 by w in fp32. The RMSNorm classes take both as options;
a swapped-in norm that has no offset (LayerNorm, ...) takes w + offset as its weight instead, so
it starts from the same gain (`absorb_offset`).
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .kernels import layer_norm, rms_norm

NORMS: dict[str, type[nn.Module]] = {}
T = TypeVar("T", bound=type[nn.Module])


def register_norm(name: str) -> Callable[[T], T]:
    """Class decorator: make a norm selectable as `ModelConfig.norm = name`."""

    def wrap(cls: T) -> T:
        if name in NORMS:
            raise ValueError(f"norm {name!r} is already registered")
        NORMS[name] = cls
        return cls

    return wrap


def parse_norm(spec: str) -> tuple[str, dict[str, float]]:
    """"prmsnorm:p=0.125" -> ("prmsnorm", {"p": 0.125}); ConfigError for unknown names or bad options."""
    name, _, opts = str(spec).partition(":")
    if name not in NORMS:
        raise ConfigError(f"unknown norm {name!r}; registered: {', '.join(sorted(NORMS))}")
    options: dict[str, float] = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        try:
            options[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"norm {spec!r}: option {item!r} is not key=number") from None
        if not eq:
            raise ConfigError(f"norm {spec!r}: option {item!r} is not key=number")
    return name, options


def build_norm(spec: str, dim: int, eps: float, offset: float = 0.0, fp32_gain: bool = False) -> nn.Module:
    """Instantiate the registered norm `spec` ("name" or "name:key=value,...") for size `dim`.

    offset, fp32_gain: the family's gain (see the module docstring); a norm without these options
    records the offset to fold into its weight when a checkpoint is loaded.
    """
    name, options = parse_norm(spec)
    cls = NORMS[name]
    gain = {"offset": offset, "fp32_gain": fp32_gain} if getattr(cls, "takes_gain", False) else {}
    try:
        norm = cls(dim, eps, **options, **gain)
    except TypeError as e:
        raise ConfigError(f"norm {spec!r}: {e}") from None
    if not gain:
        norm.absorb_offset = float(offset)
    return norm


class Norm(nn.Module):
    """Base class: the unfused residual add; a fused norm overrides `add_norm`."""

    # True when the family's RMSNorm in transformers computes the same function (up to rounding),
    # so a model with this norm can be saved as a checkpoint of its family.
    hf_compatible = False
    # True when the class takes the family's gain (offset=, fp32_gain=) itself.
    takes_gain = False
    # What a checkpoint's gain lacks for this norm's weight (Gemma's 1 in 1 + w, for a LayerNorm).
    absorb_offset = 0.0

    def reset_unloaded(self) -> None:
        """Initialise what an RMSNorm checkpoint does not provide (everything but `weight`), and fold
        the family's gain offset into the weight."""
        if self.absorb_offset:
            with torch.no_grad():
                self.weight.add_(self.absorb_offset)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(h), h) with h = x + residual (h = x when residual is None)."""
        h = x if residual is None else x + residual
        return self(h), h


@register_norm("rmsnorm-torch")
class RMSNorm(Norm):
    """y = x / sqrt(mean(x^2) + eps) * (weight + offset), with transformers' numerics.

    Statistics and normalisation in fp32; Llama casts that back to the input dtype, *then*
    multiplies by the weight; Gemma and OLMo 2 (fp32_gain) multiply in fp32 and cast after. The
    order changes bf16 outputs (transformers#33133, #29402), so parity needs each family's own.
    """

    hf_compatible = True
    takes_gain = True

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0, fp32_gain: bool = False) -> None:
        super().__init__()
        self.eps, self.offset, self.fp32_gain = eps, float(offset), bool(fp32_gain)
        # A Gemma gain of 1 + w starts at w = 0 (the identity), as transformers initialises it.
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - self.offset))

    def _gain(self, normed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The weight applied to the fp32 normalised value, in the family's order and rounding."""
        if self.fp32_gain:
            return (normed * (self.weight.float() + self.offset)).to(dtype)
        if self.offset:
            return (normed.to(dtype).float() * (self.weight.float() + self.offset)).to(
                torch.promote_types(dtype, self.weight.dtype))
        return self.weight * normed.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self._gain(x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps), x.dtype)

    def extra_repr(self) -> str:
        gain = (f", gain=w+{self.offset:g}" if self.offset else "") + (", fp32 gain" if self.fp32_gain else "")
        return f"{self.weight.shape[0]}, eps={self.eps}{gain}"


@register_norm("rmsnorm")
class FusedRMSNorm(RMSNorm):
    """RMSNorm through minillama.kernels.rms_norm, residual add fused: the Triton kernel on CUDA or
    under TRITON_INTERPRET=1; on a CPU the C++ kernel of kernels/cpu.py in eager inference, torch's
    ops otherwise (training, torch.compile), all with transformers' numerics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, offset=self.offset, fp32_gain=self.fp32_gain)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self(x), x
        return rms_norm(x, self.weight, self.eps, residual=residual, offset=self.offset, fp32_gain=self.fp32_gain)


@register_norm("rmsnorm-native")
class NativeRMSNorm(RMSNorm):
    """torch.nn.functional.rms_norm: one fused torch op (one rounding, not transformers' two)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset or self.fp32_gain:  # the gain in fp32, one rounding after
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float() + self.offset, self.eps).to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def compiled_forward(forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> Callable:
    """`forward` through torch.compile with dynamic shapes, compiled on the first call."""
    compiled = None

    def run(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(forward, dynamic=True)
        return compiled(self, x)

    return run


@register_norm("rmsnorm-compiled")
class CompiledRMSNorm(RMSNorm):
    """transformers' formula through torch.compile: the peer a hand-written kernel must beat."""

    forward = compiled_forward(RMSNorm.forward)


@register_norm("prmsnorm")
class PartialRMSNorm(RMSNorm):
    """pRMSNorm (Zhang & Sennrich 2019): the RMS estimated from the first p of the features only."""

    hf_compatible = False

    def __init__(self, dim: int, eps: float = 1e-6, p: float = 0.0625, offset: float = 0.0,
                 fp32_gain: bool = False) -> None:
        super().__init__(dim, eps, offset, fp32_gain)
        if not 0 < p <= 1:
            raise ConfigError(f"prmsnorm: p must be in (0, 1], got {p}")
        self.p, self.k = p, max(1, int(dim * p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self._gain(x32 * torch.rsqrt(x32[..., : self.k].pow(2).mean(-1, keepdim=True) + self.eps), x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, p={self.p} ({self.k} features)"


@register_norm("layernorm")
class LayerNorm(Norm):
    """torch.nn.functional.layer_norm: y = (x - mean) / sqrt(var + eps) * weight + bias."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def reset_unloaded(self) -> None:
        super().reset_unloaded()
        with torch.no_grad():
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


@register_norm("layernorm-triton")
class FusedLayerNorm(LayerNorm):
    """LayerNorm through minillama.kernels.layer_norm, residual add fused: Triton where it runs, the
    C++ kernel of kernels/cpu.py in eager CPU inference (the same code as the default RMSNorm's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self(x), x
        return layer_norm(x, self.weight, self.bias, self.eps, residual=residual)


@register_norm("layernorm-compiled")
class CompiledLayerNorm(LayerNorm):
    """F.layer_norm through torch.compile: rmsnorm-compiled's peer, one Inductor kernel each."""

    forward = compiled_forward(LayerNorm.forward)


@register_norm("batchnorm")
class BatchNorm(Norm):
    """BatchNorm over the features, statistics across batch and positions (running averages in eval).

    For from-scratch training only: its output for one sequence depends on the others in the batch.
    """

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def reset_unloaded(self) -> None:
        super().reset_unloaded()
        with torch.no_grad():
            self.bias.zero_()
            self.running_mean.zero_()
            self.running_var.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(x.reshape(-1, x.shape[-1]), self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return y.reshape(x.shape)
