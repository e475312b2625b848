"""What generate(compile=...) compiles, and how: the one-token decode step and the prefill.

On a CPU both are AOTInductor libraries cached on disk (aot.py) with Inductor's freezing (the
weights folded in and prepacked for oneDNN); elsewhere torch.compile in-process, the decode step
replayed as a CUDA graph on a GPU (cudagraph.py has the hand-captured alternative). Compiled code
is cached on the model, so repeated calls compile once.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from .errors import GenerationError
from .model import Transformer

# generate(compile=...): what each value compiles. True: the decode step everywhere, and the prefill
# where its compilation pays for itself (a GPU; on a CPU it doubles the first start and keeps a
# second frozen copy of the weights for 1.05-1.25x on the prompt: docs/benchmarks.md).
COMPILE_MODES = {False: (), "decode": ("decode",), "all": ("decode", "prefill")}


def compile_parts(compile: bool | str, device: torch.device) -> tuple[str, ...]:
    """What generate(compile=...) compiles on this device: a tuple of "decode" and "prefill" (None: nothing)."""
    if compile is True:
        return COMPILE_MODES["all" if device.type == "cuda" else "decode"]
    if compile is None:
        return ()
    if compile is not False and not (isinstance(compile, str) and compile in COMPILE_MODES):
        raise GenerationError(f"compile must be True, False, 'decode' or 'all', got {compile!r}")
    return COMPILE_MODES[compile]


def compiled(model: Transformer, part: str) -> Any:
    """The model's compiled "decode" step, "prefill" or speculative "verify" step, compiled on first
    use and cached on the model (`_compiled_step`, `_compiled_prefill`, `_compiled_verify`), so
    repeated generate(compile=...) calls compile once."""
    key = f"_compiled_{'step' if part == 'decode' else part}"
    if key not in model.__dict__:
        model.__dict__[key] = compile_prefill(model) if part == "prefill" else compile_decode_step(model, part)
    return model.__dict__[key]


def compile_decode_step(model: Transformer, kind: str = "decode") -> Callable[..., torch.Tensor]:
    """Compile the one-token decode step: static shapes, one fused graph per (batch, cache length).

    kind="verify": the same for speculative decoding's verify step (several tokens at their cache
    slots, every position's logits, attending over every slot): one graph per input width.

    Inductor's `freezing` folds the weights into the graph as constants, which lets it prepack them
    for the CPU matmul library (oneDNN/MKL): that, not Python overhead, is most of the gain on a CPU.
    The compiled step therefore snapshots the weights: compile again after changing them.
    On a CPU the step is an AOTInductor package cached on disk (minillama/aot.py), so only the
    first process pays the compilation; elsewhere, or with MINILLAMA_AOT=0, it is torch.compile'd
    in-process. Dynamic NTK RoPE reads a position back to Python every call, so it stays eager.
    """
    if model.config.rope.rope_type == "dynamic":
        return model
    from . import aot
    from .linear import unpack_model

    # The frozen graph packs the weights itself; the eager prepacked copies would be a third one.
    unpack_model(model)
    if aot.supported(model):
        return aot.PackagedStep(model, fallback=lambda: _torch_compiled_step(model), kind=kind)
    return _torch_compiled_step(model)


def compile_prefill(model: Transformer) -> Any:
    """Compile the prefill once for every prompt length (2 to the cache length - 1): the prompt's
    dimension is dynamic, so a new length is no new compilation. As for the decode step: frozen and
    cached on disk on a CPU (an AOTInductor library, minillama/aot.py), torch.compile'd elsewhere;
    None (eager) for dynamic NTK RoPE. Its prepare(ids, input_pos, position_ids, padding_mask)
    compiles or loads what those shapes need, so that generate can time that apart."""
    if model.config.rope.rope_type == "dynamic":
        return None
    from . import aot
    from .linear import unpack_model

    unpack_model(model)
    if aot.supported(model):
        return aot.PackagedStep(model, fallback=lambda: _TorchCompiledPrefill(model), kind="prefill")
    return _TorchCompiledPrefill(model)


def _frozen(model: Transformer) -> contextlib.AbstractContextManager:
    """Inductor's freezing on a CPU (weights folded as constants and prepacked for oneDNN).
    Compilation is lazy (first call, and each new shape), so the setting must be live at call time;
    torch.compile(options={"freezing": True}) is not honoured for it."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True) if model.input_device.type == "cpu" else contextlib.nullcontext()


class _TorchCompiledPrefill:
    """The prefill torch.compile'd in-process, its prompt dimension marked dynamic: frozen on a CPU,
    plain Inductor kernels on a GPU (a prefill is compute-bound: CUDA graphs would need one graph
    per length and save only launches)."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.compiled = torch.compile(self._forward, fullgraph=True)
        self.ready: set[tuple[int, ...]] = set()

    def _forward(self, ids: torch.Tensor, input_pos: torch.Tensor, position_ids: torch.Tensor,
                 padding_mask: torch.Tensor) -> torch.Tensor:
        from .aot import prefill_options

        return self.model(ids, input_pos, position_ids=position_ids, padding_mask=padding_mask, validate=False,
                          **prefill_options(ids))

    def __call__(self, ids: torch.Tensor, input_pos: torch.Tensor, *, position_ids: torch.Tensor,
                 padding_mask: torch.Tensor, **_: Any) -> torch.Tensor:
        from .aot import prefill_lengths

        low, high = prefill_lengths(self.model)
        for t in (ids, input_pos, position_ids):
            torch._dynamo.mark_dynamic(t, t.dim() - 1, min=low, max=high)
        with _frozen(self.model):
            return self.compiled(ids, input_pos, position_ids, padding_mask)

    def prepare(self, ids: torch.Tensor, input_pos: torch.Tensor, position_ids: torch.Tensor,
                padding_mask: torch.Tensor) -> None:
        """Compile for this batch and cache shape now (by running once), unless done before."""
        key = (ids.shape[0], *self.model.kv_cache.k.shape)
        if key not in self.ready:
            self(ids, input_pos, position_ids=position_ids, padding_mask=padding_mask)
            self.ready.add(key)


def _torch_compiled_step(model: Transformer) -> Callable[..., torch.Tensor]:
    """torch.compile in-process: frozen on a CPU; on a GPU replayed as a CUDA graph
    ("reduce-overhead": one launch per token instead of hundreds; its inputs are copied into the
    graph's static buffers, the KV cache is a module buffer the graph writes in place). A new
    batch size or cache length is a new graph; cache lengths are rounded to CACHE_ROUND."""
    gpu = model.input_device.type == "cuda"
    compiled = torch.compile(model, fullgraph=True, dynamic=False, mode="reduce-overhead" if gpu else None)
    if gpu:
        return compiled  # freezing buys a GPU little, and would pin the weights into the graph

    def step(*args: Any, **kwargs: Any) -> torch.Tensor:
        with _frozen(model):
            return compiled(*args, **kwargs)

    return step
