"""Linear layers with a CPU fast path: the weight prepacked once for oneDNN, used in eager inference.

Decoding reads every weight once per token, and on a CPU the matrix-vector products run 1.4-3.5x
faster from oneDNN's blocked weight layout than from the plain one (docs/benchmarks.md). That is
most of what `torch.compile` (Inductor freezing) buys on a CPU, and it is available without
compiling: `torch.ops.mkldnn._reorder_linear_weight` once at load, `_linear_pointwise` per call.

The packed copy is inference-only. The module's `weight` stays the ordinary Parameter that
training, LoRA, `state_dict()` and `save_pretrained` see (oneDNN's layout cannot be viewed as a
dense matrix, so the copy costs memory: see `packed_bytes`). It is used only under no_grad /
inference_mode (as generation runs), outside torch.compile (which packs on its own under
freezing), and only while the weight is the tensor it was packed from, unchanged (same storage,
same version counter, same dtype): otherwise the plain path runs. `Transformer.train()` drops the copies (training never uses them,
and they would go stale); `MINILLAMA_PREPACK=0` or `from_pretrained(..., prepack=False)` never
make them.

torch.inference_mode makes "inference tensors": no version counter (so no staleness check), and
no in-place update outside inference mode. A model outlives the block it is loaded or first used
in, so what it keeps is made as ordinary tensors even there (`ordinary_tensors`: from_pretrained,
the KV cache); an inference-tensor weight (a model built by hand under inference_mode) is never
packed: it runs the plain path.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) that can run from a prepacked copy of its weight."""

    _packed: torch.Tensor | None = None
    _packed_of: tuple[int, int, torch.dtype] | None = None  # the weight it was packed from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ weight.T + bias, from the packed copy when it may be used."""
        # Checked cheapest first: this runs ~120 times per decoded token.
        if self._packed is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            weight = self.weight
            try:
                fresh = self._packed_of == (weight.data_ptr(), weight._version, x.dtype)
            except RuntimeError:  # an inference tensor (no version counter) replaced the packed weight
                fresh = False
            if fresh:
                return torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")
        return F.linear(x, self.weight, bias)

    def __getstate__(self) -> dict:
        # A copy (copy.deepcopy, pickling) leaves the packed copy behind: oneDNN's opaque tensor
        # has no storage to copy. The copy runs the plain path until packed again.
        return {**self.__dict__, "_packed": None, "_packed_of": None}

    def pack(self) -> bool:
        """Make (or refresh) the packed copy; False where this torch/CPU cannot (nothing changes then)
        and for an inference-tensor weight (then no copy is kept)."""
        weight = self.weight
        if weight.is_inference():  # no version counter: a later in-place change would go unseen
            self.unpack()
            return False
        if weight.device.type != "cpu" or not can_prepack(weight.dtype):
            return False
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self._packed_of = (weight.data_ptr(), weight._version, weight.dtype)
        return True

    def unpack(self) -> None:
        """Drop the packed copy (and its memory)."""
        self._packed, self._packed_of = None, None


@contextlib.contextmanager
def ordinary_tensors() -> Iterator[None]:
    """Leave torch.inference_mode for the block, when it is on (gradients stay off): for state a model
    keeps (parameters, prepacked copies, the KV cache), which must stay usable after the caller's
    inference_mode block, where inference tensors could be neither updated in place nor trained.
    A no-op otherwise. Also a decorator: `@ordinary_tensors()`."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    with torch.inference_mode(False), torch.no_grad():
        yield


@functools.lru_cache(maxsize=None)
def can_prepack(dtype: torch.dtype) -> bool:
    """Feature probe, not a version check: the ops exist, run, and agree with F.linear for this dtype."""
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(24, 40, generator=gen).to(dtype)
        x = torch.randn(3, 40, generator=gen).to(dtype)
        got = ops._linear_pointwise(x, ops._reorder_linear_weight(w, None), None, "none", [], "")
        ref = F.linear(x.float(), w.float())
        return bool(torch.allclose(got.float(), ref, rtol=2e-2, atol=2e-2))
    except (RuntimeError, NotImplementedError):
        return False


def prepack_enabled(prepack: bool | None) -> bool:
    """The keyword if given, else the environment: MINILLAMA_PREPACK=0 turns prepacking off."""
    if prepack is not None:
        return prepack
    return os.environ.get("MINILLAMA_PREPACK", "1").strip().lower() not in ("0", "false", "no", "off")


def prepack_model(model: nn.Module) -> int:
    """Pack every Linear of a CPU model; returns how many were packed (0 where unsupported)."""
    return sum(m.pack() for m in model.modules() if isinstance(m, Linear))


def unpack_model(model: nn.Module) -> None:
    """Drop every packed copy."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.unpack()


def packed_bytes(model: nn.Module) -> int:
    """Memory held by packed copies (the price of the fast path)."""
    return sum(m._packed.numel() * m._packed.element_size() for m in model.modules()
               if isinstance(m, Linear) and m._packed is not None)
