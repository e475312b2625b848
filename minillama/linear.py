"""Linear layers with a CPU fast path: the weight prepacked for oneDNN, held once, used in eager inference.

Decoding reads every weight once per token, and on a CPU the matrix-vector products run 1.4-3.5x
faster from oneDNN's blocked weight layout than from the plain one (docs/benchmarks.md). That is
most of what `torch.compile` (Inductor freezing) buys on a CPU, and it is available without
compiling: `torch.ops.mkldnn._reorder_linear_weight` once at load, `_linear_pointwise` per call.

Weights resident once. The packed copy is a reordering of the same numbers, so once a layer is
packed its dense `weight` is *released*: the Parameter object stays (same identity, shape, dtype,
so optimizers, tying and hooks still hold it) but its storage is resized to zero bytes, as FSDP
frees a sharded parameter. Anything that reads the weight restores it first, exactly (oneDNN's
`to_dense` is the inverse reordering): attribute access (`layer.weight`), `parameters()`,
`state_dict()`, `.to()`, `load_state_dict`, copies. That works because the released layer's
`_parameters` dict is a `_Released` dict, whose reads restore; the forward pass reads only the
packed copy. Why this design over the others considered: dense weights left as file-backed maps
cannot hold our fused q/k/v and gate/up projections (assembled from several checkpoint tensors)
or a dtype conversion; restoring from the checkpoint files would tie a model to files that may
change or vanish; a packed tensor in place of the Parameter (IPEX's way) changes its identity,
which silently breaks an optimizer made before `train()`. `state_dict()` and `save_pretrained`
unpack a temporary copy per tensor and leave the layer released; counting parameters through
`parameters()` (or any other read) restores the dense copy, and the layer then holds both again
(correct, and what `resident_bytes` reports) until it is packed again.

A restored weight stays the packed copy's twin only while unchanged: the packed copy is used
only under no_grad / inference_mode (as generation runs), outside torch.compile (which packs on
its own under freezing), and while the weight is the tensor it was packed from, unchanged (same
storage, same version counter, same dtype): a weight changed in place (`weight.mul_(2)`), replaced
or cast runs the plain path, as changed. `Transformer.train()` restores the weights and drops the
copies (training never uses them); `MINILLAMA_PREPACK=0` or `from_pretrained(..., prepack=False)`
never make them. A weight something else also holds (a tied lm_head is the embedding; an
optimizer; a view) is never released: in fp32, where packing does not speed the output projection
up, it is not packed either (`pack_layer`).

torch.inference_mode makes "inference tensors": no version counter (so no staleness check), and
no in-place update outside inference mode. A model outlives the block it is loaded or first used
in, so what it keeps is made as ordinary tensors even there (`ordinary_tensors`: from_pretrained,
the KV cache, restoring); an inference-tensor weight (a model built by hand under inference_mode)
is never packed: it runs the plain path.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import weakref
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn


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


class _Released(dict):
    """A released Linear's `_parameters`: every read of a value restores the dense weight first
    (names, membership and length do not). Writes go to the restored layer's plain dict."""

    def __init__(self, owner: Linear, params: dict[str, Any]) -> None:
        super().__init__(params)
        self._owner = weakref.ref(owner)

    def _restored(self) -> dict[str, Any]:
        owner = self._owner()
        if owner is None:
            return self
        owner.restore()
        return owner.__dict__["_parameters"]

    def __getitem__(self, key: str) -> Any:
        return self._restored()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._restored().get(key, default)

    def items(self) -> Any:
        return self._restored().items()

    def values(self) -> Any:
        return self._restored().values()

    def __setitem__(self, key: str, value: Any) -> None:
        self._restored()[key] = value

    def __delitem__(self, key: str) -> None:
        del self._restored()[key]

    def pop(self, key: str, *default: Any) -> Any:
        return self._restored().pop(key, *default)

    def copy(self) -> dict[str, Any]:
        return dict(self._restored())

    def __reduce__(self) -> Any:  # a copy of the dict is an ordinary one, with the weight restored
        return dict, (dict(self._restored()),)


def _raw(module: nn.Module, name: str) -> Any:
    """A parameter without restoring it (metadata reads only: shape, dtype, numel)."""
    return dict.get(module.__dict__["_parameters"], name)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) that can run from a prepacked copy of its weight."""

    _packed: torch.Tensor | None = None
    _packed_of: tuple[int, int, torch.dtype] | None = None  # the weight it was packed from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias_tensor())

    def bias_tensor(self) -> torch.Tensor | None:
        """self.bias, without restoring a released weight (nn.Module's attribute read of the
        parameter dict would); the plain attribute under torch.compile, which traces it."""
        return self.bias if torch.compiler.is_compiling() else _raw(self, "bias")

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ weight.T + bias, from the packed copy when it may be used."""
        # Checked cheapest first: this runs ~120 times per decoded token.
        if self._packed is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            if (self.released and x.dtype == self._packed.dtype) or self._fresh(x.dtype):
                return torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")
        return F.linear(x, self.weight, bias)

    @property
    def released(self) -> bool:
        """True while the packed copy is the only one (the dense weight's storage freed)."""
        return type(self.__dict__["_parameters"]) is _Released

    def _fresh(self, dtype: torch.dtype) -> bool:
        weight = _raw(self, "weight")
        try:
            return self._packed_of == (weight.data_ptr(), weight._version, dtype)
        except RuntimeError:  # an inference tensor (no version counter) replaced the packed weight
            return False

    def extra_repr(self) -> str:  # nn.Linear's reads self.bias, which would restore the weight
        bias = _raw(self, "bias") is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"

    def __getstate__(self) -> dict:
        # A copy (copy.deepcopy, pickling) gets the dense weight (restored into the copy only) and
        # leaves the packed copy behind: oneDNN's opaque tensor has no storage to copy. The copy runs
        # the plain path until packed itself.
        state = {**self.__dict__, "_packed": None, "_packed_of": None}
        if self.released:
            params = dict(dict.items(state["_parameters"]))
            params["weight"] = nn.Parameter(self.packed_weight_dense(), params["weight"].requires_grad)
            state["_parameters"] = params
        return state

    def packed_weight_dense(self) -> torch.Tensor:
        """A temporary dense copy of a packed weight (exact), leaving the layer as it is."""
        return self._packed.to_dense()

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if not self.released or keep_vars:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        # A released weight is saved as a temporary unpacked copy: the layer stays released.
        for name, param in dict.items(self.__dict__["_parameters"]):
            if param is not None:
                destination[prefix + name] = self.packed_weight_dense() if name == "weight" else param.detach()

    def pack(self) -> bool:
        """Make (or refresh) the packed copy; False where this torch/CPU cannot (nothing changes then)
        and for an inference-tensor weight (then no copy is kept). A released layer stays as it is."""
        if self.released:
            return True
        weight = _raw(self, "weight")
        if self._packed is not None and self._fresh(weight.dtype):
            return True
        if weight.is_inference():  # no version counter: a later in-place change would go unseen
            self.unpack()
            return False
        if weight.device.type != "cpu" or not can_prepack(weight.dtype):
            return False
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self._packed_of = (weight.data_ptr(), weight._version, weight.dtype)
        return True

    def release(self) -> bool:
        """Free the dense weight's memory once packed (the packed copy becomes the only one). Only
        where nothing else holds the weight: a tied or shared weight, or one with references held
        outside this layer, stays."""
        if self.released or self._packed is None:
            return self.released
        if _shared(self):
            return False
        weight = _raw(self, "weight")
        if not self._fresh(weight.dtype) or weight._base is not None or not weight.is_contiguous():
            return False
        storage = weight.untyped_storage()
        if storage.nbytes() != weight.numel() * weight.element_size() or _storage_users(storage) > 1:
            return False  # a view of a larger buffer, or viewed by another tensor: freeing it frees theirs
        storage.resize_(0)
        self.__dict__["_parameters"] = _Released(self, self.__dict__["_parameters"])
        return True

    @ordinary_tensors()  # restoring inside a caller's inference_mode must not make inference tensors
    def restore(self) -> None:
        """Give a released layer its dense weight back, unpacked exactly; the packed copy is kept and
        stays in use while the weight is unchanged."""
        params = self.__dict__["_parameters"]
        if type(params) is not _Released:
            return
        plain = dict(dict.items(params))
        weight = plain["weight"]
        with torch.no_grad():
            weight.untyped_storage().resize_(weight.numel() * weight.element_size())
            weight.data.copy_(self.packed_weight_dense())
        self.__dict__["_parameters"] = plain
        self._packed_of = (weight.data_ptr(), weight._version, weight.dtype)

    def unpack(self) -> None:
        """Drop the packed copy (and its memory), restoring the dense weight first if released."""
        self.restore()
        self._packed, self._packed_of = None, None


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


def pack_layer(layer: Linear) -> bool:
    """Pack one projection and release its dense weight; False where it stays plain.

    A weight shared with another module (a tied lm_head is the embedding) cannot be released, so
    packing it would hold it twice: that is done only where the packed matrix-vector product is
    much faster than the plain one (bf16/fp16: 1.5-2.7x on an AVX-512 VM for the 49k-262k-row
    output projections; fp32: the same speed, so a shared fp32 weight stays plain).
    """
    # No local reference to the weight here: _shared counts references.
    if layer.released or _raw(layer, "weight") is None:
        return layer.released
    if not packs_shared(_raw(layer, "weight").dtype) and _shared(layer):
        return False
    if not layer.pack():
        return False
    layer.release()
    return True


def packs_shared(dtype: torch.dtype) -> bool:
    """Whether a weight held elsewhere too (a tied output projection) is packed anyway: where the
    packed product is much faster than the plain one (bf16, fp16), not in fp32 (the same speed)."""
    return dtype != torch.float32 and can_prepack(dtype)


def _shared(layer: Linear) -> bool:
    """True if the layer's weight is also another holder's (a tied embedding, an outside reference).
    Callers must hold no reference to the weight themselves while asking."""
    weight = _raw(layer, "weight")
    return sys.getrefcount(weight) > _ONE_HOLDER


def _storage_users(storage: torch.UntypedStorage) -> int:
    """How many tensors use `storage` (1 if the function to ask is missing: then views go unseen)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return count(storage._cdata) - 1 if count is not None else 1  # minus the `storage` object itself


def _refcount_with_one_holder() -> int:
    # What sys.getrefcount reports for an object held by one dict and read as `_shared` reads it
    # (the count's baseline differs between Python versions).
    class Probe(nn.Module):
        pass

    probe = Probe()
    probe.__dict__["_parameters"]["weight"] = torch.empty(0)
    weight = _raw(probe, "weight")
    return sys.getrefcount(weight)


_ONE_HOLDER = _refcount_with_one_holder()


def prepack_model(model: nn.Module) -> int:
    """Pack every Linear of a CPU model and release the dense weights (`pack_layer`); returns how
    many are packed (0 where unsupported)."""
    return sum(pack_layer(m) for m in model.modules() if isinstance(m, Linear))


def unpack_model(model: nn.Module) -> None:
    """Restore every dense weight and drop every packed copy: an ordinary model again."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.unpack()


def packed_bytes(model: nn.Module) -> int:
    """Memory held by packed copies (the fast path's copy of each projection)."""
    return sum(m._packed.numel() * m._packed.element_size() for m in model.modules()
               if isinstance(m, Linear) and m._packed is not None)


def model_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and saved buffer once (a tied matrix once), read without restoring a
    released weight: for shapes, dtypes and sizes."""
    tensors: dict[int, torch.Tensor] = {}
    for m in model.modules():
        buffers = [t for n, t in dict.items(m.__dict__["_buffers"]) if n not in m._non_persistent_buffers_set]
        for t in list(dict.values(m.__dict__["_parameters"])) + buffers:
            if t is not None:
                tensors[id(t)] = t
    return list(tensors.values())


def _storages(model: nn.Module, mapped: bool) -> int:
    """Bytes of the model's ordinary tensors' storages (each once; a released weight has none):
    allocated ones, or (mapped) those over a map of a file (not resizable), resident only where read."""
    storages: dict[int, int] = {}
    for t in model_tensors(model):
        if t.layout == torch.strided and t.device.type != "meta" and t.untyped_storage().nbytes() and \
                (not t.untyped_storage().resizable()) == mapped:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def dense_bytes(model: nn.Module) -> int:
    """Memory held by the model's ordinary tensors (each storage once; a released weight holds none)."""
    return _storages(model, mapped=False)


def resident_bytes(model: nn.Module) -> dict[str, int]:
    """What the weights hold: dense tensors, packed copies and their total in memory; apart, the
    tensors left as maps of the checkpoint file (a tied embedding: only the rows read are resident)."""
    dense, packed = dense_bytes(model), packed_bytes(model)
    return {"dense": dense, "packed": packed, "total": dense + packed, "mapped": _storages(model, mapped=True)}


def memory_summary(model: nn.Module) -> str:
    """One line for `info` and `--stats`: the weights' bytes and what they hold resident."""
    from .quant import weight_bytes

    weights, held = weight_bytes(model), resident_bytes(model)
    line = f"weights {weights / 1e6:.0f} MB, resident {held['total'] / 1e6:.0f} MB"
    if held["packed"]:
        line += (f" (dense {held['dense'] / 1e6:.0f} MB + prepacked {held['packed'] / 1e6:.0f} MB: the fast path "
                 f"costs {(held['total'] - weights) / 1e6:+.0f} MB)")
    if held["mapped"]:
        line += f", {held['mapped'] / 1e6:.0f} MB read from the file as needed"
    return line
