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
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [batch, kv_heads, seq, head_dim] at slots `input_pos`; return the first `kv_len`
        slots of keys and values [batch, kv_heads, kv_len, head_dim].

        input_pos is [seq] (every row writes the same slots) or [batch, seq] (each row its own, as
        continuous batching needs: rows hold requests of different lengths). rows [batch]: which
        cache rows the batch uses (default: the first `batch`), so one request can be prefilled
        into a free row while the others keep theirs.
        """
        batch = k.shape[0]
        if input_pos.dim() == 1 and rows is None:
            self.k[:batch].index_copy_(2, input_pos, k)
            self.v[:batch].index_copy_(2, input_pos, v)
        else:
            index = (torch.arange(batch, device=k.device) if rows is None else rows)[:, None]
            pos = input_pos.expand(batch, -1)
            # Advanced indices on dims 0 and 2 put theirs first: the target is [batch, seq, heads, dim].
            self.k[index, :, pos] = k.transpose(1, 2)
            self.v[index, :, pos] = v.transpose(1, 2)
        if rows is None:
            return self.k[:batch, :, :kv_len], self.v[:batch, :, :kv_len]
        return self.k[rows, :, :kv_len], self.v[rows, :, :kv_len]
