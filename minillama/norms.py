"""The norm registry: name -> nn.Module class. Nothing else in minillama branches on norm names.

A norm class takes `(dim, eps)`, maps [..., dim] -> [..., dim] in `forward`, and offers
`add_norm(x, residual)` -> (norm(x + residual), x + residual) for the pre-norm residual stream;
subclasses with a fused kernel override it. Adding a norm is one `@register_norm("name")` class.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch import nn

from .errors import ConfigError
from .kernels import rms_norm

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


def build_norm(name: str, dim: int, eps: float) -> nn.Module:
    """Instantiate the registered norm `name` for hidden size `dim`."""
    try:
        cls = NORMS[name]
    except KeyError:
        raise ConfigError(f"unknown norm {name!r}; registered: {', '.join(sorted(NORMS))}") from None
    return cls(dim, eps)


class Norm(nn.Module):
    """Base class: the unfused residual add; a fused norm overrides `add_norm`."""

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(h), h) with h = x + residual (h = x when residual is None)."""
        h = x if residual is None else x + residual
        return self(h), h


@register_norm("rmsnorm-torch")
class RMSNorm(Norm):
    """y = x / sqrt(mean(x^2) + eps) * weight, with transformers' Llama numerics.

    Statistics and normalisation in fp32, cast back to the input dtype, *then* multiply by the
    weight: the order changes bf16 outputs (transformers#33133), so parity needs exactly this one.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


@register_norm("rmsnorm")
class FusedRMSNorm(RMSNorm):
    """RMSNorm through minillama.kernels.rms_norm: the fused Triton kernel (residual add included)
    on CUDA or under TRITON_INTERPRET=1, the same numbers through torch elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self(x), x
        return rms_norm(x, self.weight, self.eps, residual=residual)
