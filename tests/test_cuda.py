"""The GPU-only decode paths against the eager ones, on a real GPU: compile=True (a CUDA-graph
decode step through mode="reduce-overhead" and the compiled prefill), the read-back of "all rows
done" every 16 tokens, and a decode step captured by hand (CUDAGraphStep).

Deselected where there is no CUDA (conftest.py); tools/gpu_check.sh runs them on a GPU machine.
Their CPU counterparts (same functions, compiled with the CPU's default mode, and an injected
capture) are in test_generate.py.
"""

from __future__ import annotations

import pytest
import torch

import minillama
from minillama.cudagraph import CUDAGraphStep
from minillama.generate import GenerationStats, generate

pytestmark = pytest.mark.cuda
PROMPTS = [[5, 17, 3], [9, 8, 7, 6, 5, 4, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
SAMPLED = {"temperature": 0.9, "top_k": 20, "seed": 5}


@pytest.fixture
def model(make_hf):
    _, path = make_hf("mistral", num_key_value_heads=2, sliding_window=5, max_position_embeddings=512)
    return minillama.from_pretrained(path, dtype="float32", device="cuda")


@pytest.mark.parametrize("options", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_compiled_decode_and_prefill_give_the_eager_tokens(model, options):
    eager = generate(model, PROMPTS, 24, eos_token_id=[], pad_token_id=0, sync_every=1, **options)
    compiled = generate(model, PROMPTS, 24, eos_token_id=[], pad_token_id=0, compile=True, **options)
    assert torch.equal(compiled, eager)
    assert model._compiled_prefill is not None  # compile=True compiles the prefill on a GPU


def test_eos_read_back_every_16_tokens_ends_on_the_exact_token(model):
    new = generate(model, PROMPTS, 24, eos_token_id=[], pad_token_id=0)[:, -24:]
    eos = [int(new[0, 3]), int(new[1, 9]), int(new[2, 17])]
    every_token = generate(model, PROMPTS, 24, eos_token_id=eos, pad_token_id=0, sync_every=1)
    for compile in (False, True):
        assert torch.equal(generate(model, PROMPTS, 24, eos_token_id=eos, pad_token_id=0, compile=compile),
                           every_token), compile


def test_one_prefill_compilation_for_every_length(model):
    from torch._dynamo.utils import counters

    generate(model, [[1, 2]], 4, eos_token_id=[], compile=True)
    graphs = counters["stats"]["unique_graphs"]
    for n in (3, 17, 60, 200):
        prompt = [[(7 * i) % 120 + 1 for i in range(n)]]
        stats = GenerationStats()
        compiled = generate(model, prompt, 6, eos_token_id=[], compile=True, stats=stats)
        assert torch.equal(compiled, generate(model, prompt, 6, eos_token_id=[])), n
    assert counters["stats"]["unique_graphs"] == graphs  # same batch and cache: nothing new compiled


@pytest.mark.parametrize("compiled_inner", [False, True], ids=["eager-step", "compiled-step"])
def test_hand_captured_graph_gives_the_eager_tokens(model, compiled_inner):
    inner = torch.compile(model, fullgraph=True, dynamic=False) if compiled_inner else None
    step = CUDAGraphStep(model, inner)
    for options in ({}, SAMPLED):
        eager = generate(model, PROMPTS, 16, eos_token_id=[], pad_token_id=0, **options)
        assert torch.equal(generate(model, PROMPTS, 16, eos_token_id=[], pad_token_id=0, step_fn=step, **options),
                           eager), options
    assert len(step.graphs) == 1

