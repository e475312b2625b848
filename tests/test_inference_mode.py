"""Loading and generating under torch.inference_mode() give what they give under torch.no_grad().

inference_mode makes "inference tensors": no version counter, and no in-place update outside
inference mode. A model (its parameters, prepacked copies and KV cache) outlives the block it
was loaded or first used in, so every mode mix is checked: loaded and used inside, loaded
normally and used inside then outside, loaded inside then used under no_grad (and trained).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import minillama
from minillama import generate, stream
from minillama.linear import can_prepack, packed_bytes

MODES: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
PROMPTS = [[5, 17, 3, 40], [9, 8]]  # ragged: left padding, per-row positions
SAMPLED = dict(temperature=0.8, top_p=0.9, repetition_penalty=1.2, seed=3)
PREPACK = can_prepack(torch.float32)


@pytest.fixture(params=list(MODES))
def mode(request: pytest.FixtureRequest) -> Callable[[], contextlib.AbstractContextManager]:
    return MODES[request.param]


def _run(model: Any, tok: Any) -> dict[str, Any]:
    """Everything compared: greedy and sampled ids of a ragged batch, streamed text, one forward's logits."""
    return {
        "greedy": generate(model, PROMPTS, 10, eos_token_id=[]).tolist(),
        "sampled": generate(model, PROMPTS, 10, eos_token_id=[], **SAMPLED).tolist(),
        "text": "".join(stream(model, tok, tok("Hello").input_ids, 8, eos_token_id=[])),
        "logits": model(torch.tensor(PROMPTS[:1])),
    }


def _same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["greedy"] == want["greedy"]
    assert got["sampled"] == want["sampled"]
    assert got["text"] == want["text"]
    assert torch.equal(got["logits"], want["logits"])  # exactly: the same kernels ran


@pytest.fixture(scope="module")
def reference(tiny_chat_dir: Path) -> dict[str, Any]:
    """What a model loaded plainly and used under no_grad gives (per quantization mode)."""
    tok = minillama.load_tokenizer(tiny_chat_dir)
    out = {}
    for quantize in (None, "int8", "int4-g32"):
        model = minillama.from_pretrained(tiny_chat_dir, dtype="float32", quantize=quantize)
        with torch.no_grad():
            out[quantize] = _run(model, tok)
    return out


@pytest.fixture
def packed_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls of the prepacked fast path (minillama/linear.py)."""
    calls: list[int] = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or real(*a))
    return calls


def _check_packed(model: Any, calls: list[int], expect_calls: bool = True) -> None:
    if not PREPACK:
        return
    assert packed_bytes(model) > 0
    if expect_calls:
        assert calls, "the prepacked fast path was not used"
    calls.clear()


def test_load_and_generate_under(mode, tiny_chat_dir: Path, reference, packed_calls) -> None:
    tok = minillama.load_tokenizer(tiny_chat_dir)
    with mode():
        model = minillama.from_pretrained(tiny_chat_dir, dtype="float32")
        _check_packed(model, packed_calls, expect_calls=False)
        got = _run(model, tok)
        _check_packed(model, packed_calls)
    _same(got, reference[None])
    # The model outlives the block: ordinary parameters, used under no_grad and by generate alone ...
    assert not any(t.is_inference() for t in [*model.parameters(), *model.buffers()])
    with torch.no_grad():
        _same(_run(model, tok), reference[None])
    _check_packed(model, packed_calls)
    # ... and trained (autograd reaches the parameters).
    model.train()
    ids = torch.tensor(PROMPTS[:1])
    model(ids, labels=ids).backward()
    assert model.layers[0].attn.wqkv.weight.grad is not None


def test_loaded_normally_then_used_under_and_outside(mode, tiny_chat_dir: Path, reference,
                                                     packed_calls) -> None:
    """The KV cache is allocated in the first mode and reused in the next (it is grown, never remade)."""
    tok = minillama.load_tokenizer(tiny_chat_dir)
    model = minillama.from_pretrained(tiny_chat_dir, dtype="float32")
    with mode():
        first = _run(model, tok)
    _check_packed(model, packed_calls)
    with torch.no_grad():
        second = _run(model, tok)
    assert not any(t.is_inference() for t in model.buffers())  # the KV cache included
    with mode():
        third = _run(model, tok)
    _check_packed(model, packed_calls)
    for got in (first, second, third):
        _same(got, reference[None])


@pytest.mark.parametrize("quantize", ["int8", "int4-g32"])
def test_quantized_under(mode, quantize: str, tiny_chat_dir: Path, reference) -> None:
    tok = minillama.load_tokenizer(tiny_chat_dir)
    with mode():
        model = minillama.from_pretrained(tiny_chat_dir, dtype="float32", quantize=quantize)
        inside = _run(model, tok)
    with torch.no_grad():
        outside = _run(model, tok)
    _same(inside, reference[quantize])
    _same(outside, reference[quantize])


def test_engine_under(mode, tiny_chat_dir: Path) -> None:
    """The serving engine made inside the block; its steps run inside, then outside (as its own
    thread runs them: grad modes are per thread)."""
    from minillama.engine import Engine, Request
    from minillama.generate import SamplingConfig

    tok = minillama.load_tokenizer(tiny_chat_dir)
    prompts = [[5, 6, 7], list(range(40, 60)), [9]]
    with mode():
        model = minillama.from_pretrained(tiny_chat_dir, dtype="float32")
        alone = [generate(model, [p], 8, eos_token_id=[])[0, len(p):].tolist() for p in prompts]
        engine = Engine(model, tok, max_batch=2, max_seq_len=128)
    engine.eos = set()

    def serve_all(inside: bool) -> list[list[int]]:
        requests = [Request(p, 8, SamplingConfig()) for p in prompts]
        for r in requests:
            engine.submit(r)
        with mode() if inside else contextlib.nullcontext():
            while engine.running or engine.waiting:
                engine.step()
        assert all(r.finish_reason == "length" for r in requests), [r.finish_reason for r in requests]
        return [r.tokens for r in requests]

    assert serve_all(inside=True) == alone
    assert serve_all(inside=False) == alone
