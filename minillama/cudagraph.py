"""A decode step captured into a CUDA graph by hand (torch.cuda.CUDAGraph), the other way to the
one `compile=True` takes on a GPU (torch.compile's mode="reduce-overhead").

Decoding one token of a small model is a few hundred short kernels: launched one by one from
Python, the host is the bottleneck. Replayed as one graph, the launches cost one call. Explicit
capture keeps the step as it is (the eager model with its Triton norms, or a torch.compile'd
step without CUDA graphs), needs no compilation when the step is eager, and copies exactly four
small inputs per token into static buffers; torch.compile's CUDA-graph trees also check and copy
their inputs, and manage a memory pool per graph. tools/bench_generate.py measures both.

    from minillama.cudagraph import CUDAGraphStep
    generate(model, ids, 128, step_fn=CUDAGraphStep(model))

A graph is captured per (batch, every layer's KV-cache tensors): the graph reads and writes those
addresses, so a grown cache is a new capture, and a rebuilt one (setup_cache, even of the same
shape, or one layer's cache replaced) drops every graph captured on the old. The tensor a
step returns is the graph's static output, overwritten by the next step: read it before then
(generate's loop does: it turns the last position into fp32 logits at once).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import nn

from .errors import GenerationError

Capture = Callable[[Callable[[], torch.Tensor]], tuple[torch.Tensor, Callable[[], None]]]


def cuda_capture(run: Callable[[], torch.Tensor], warmup: int = 2) -> tuple[torch.Tensor, Callable[[], None]]:
    """(static output, replay) of `run` captured into a CUDA graph, after `warmup` runs on a side
    stream (lazy initialisation, Triton's first launches and allocations must happen outside)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return out, graph.replay


class CUDAGraphStep:
    """step_fn for generate(): the one-token decode step of `model` (or `step`, e.g. a torch.compile'd
    model without CUDA graphs) replayed from a captured graph.

    The step runs with static shapes (every cache slot, masked), which is what a graph needs: the
    model takes that path for one token on a GPU when no kv_len is given. `capture` is how a graph
    is made (cuda_capture; the tests pass one that runs on a CPU).
    """

    def __init__(self, model: nn.Module, step: Callable[..., torch.Tensor] | None = None,
                 capture: Capture = cuda_capture) -> None:
        self.model, self.capture = model, capture
        self.step = step if step is not None else model  # (a compiled module has no truth value)
        self.graphs: dict[tuple[Any, ...], tuple[list[torch.Tensor], torch.Tensor, Callable[[], None]]] = {}
        self._caches: list[weakref.ref] = []  # the KV-cache objects the graphs were captured on

    def _key(self, batch: int) -> tuple[Any, ...]:
        """(batch, cache shape, every layer's k and v addresses); clears the graphs when the model's
        caches are not the objects they were captured on (setup_cache rebuilt them: the old
        addresses may since hold anything, the caching allocator hands freed blocks out again)."""
        caches = [layer.attn.kv_cache for layer in self.model.layers]
        if any(c is None for c in caches):
            raise GenerationError("CUDAGraphStep: the model has no KV cache (setup_cache first)")
        if len(caches) != len(self._caches) or any(ref() is not c for ref, c in zip(self._caches, caches)):
            self.graphs.clear()
            self._caches = [weakref.ref(c) for c in caches]
        return (batch, tuple(caches[0].k.shape), tuple(t.data_ptr() for c in caches for t in (c.k, c.v)))

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, *, position_ids: torch.Tensor,
                 padding_mask: torch.Tensor, validate: bool = False) -> torch.Tensor:
        inputs = (tokens, input_pos, position_ids, padding_mask)
        key = self._key(tokens.shape[0])
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(inputs)
        static, out, replay = entry
        for buffer, value in zip(static, inputs):
            buffer.copy_(value)
        replay()
        return out

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], torch.Tensor, Callable[[], None]]:
        # The capture's own runs write the cache at this step's slot with this step's token: the
        # replay that follows writes the same values there.
        static = [t.clone() for t in inputs]
        tokens, input_pos, position_ids, padding_mask = static

        def run() -> torch.Tensor:
            return self.step(tokens, input_pos, position_ids=position_ids, padding_mask=padding_mask, validate=False)

        out, replay = self.capture(run)
        return static, out, replay
