"""A static (preallocated) key/value cache: one buffer per layer, written by position."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Keys and values of one attention layer, shape [batch, kv_heads, max_seq_len, head_dim].

    Preallocated once so that decoding allocates nothing per token and shapes stay static
    (what CUDA graphs and torch.compile want). Slots are addressed by `input_pos`.
    """

    def __init__(
        self, batch: int, kv_heads: int, max_seq_len: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (batch, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [batch, kv_heads, seq, head_dim] at slots `input_pos` [seq]; return the whole cache."""
        batch = k.shape[0]
        self.k[:batch].index_copy_(2, input_pos, k)
        self.v[:batch].index_copy_(2, input_pos, v)
        return self.k[:batch], self.v[:batch]
