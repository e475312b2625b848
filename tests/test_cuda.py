"""The GPU-only decode paths against the eager ones, on a real GPU: compile=True (a CUDA-graph
decode step through mode="reduce-overhead" and the compiled prefill), the read-back of "all rows
done" every 16 tokens, and a decode step captured by hand (CUDAGraphStep).

Deselected where there is no CUDA (conftest.py); tools/gpu_check.sh runs them on a GPU machine.
Their CPU counterparts (same functions, compiled with the CPU's default mode, and an injected
capture) are in test_generate.py and test_gpu_check.py.

Tolerance. The model is fp32, but the paths do not round alike: a compiled one-token step computes
attention as two matmuls and an fp32 softmax that Inductor fuses (Attention._one_query), eager
decoding calls SDPA over the same masked cache, and the compiled prefill fuses its own kernels.
So each compiled or captured step is checked against the eager model on the very same inputs,
logits within LOGITS (far below what a wrong slot, mask or position does: O(0.1) on this random
model), and tokens must equal eager's up to the first step where eager's choice was a near tie:
greedy, the two tokens' eager logits within TIE; sampled (same seed, same draws), a draw can only
pick differently where it falls within the logits' difference of a boundary between two tokens,
and the token picked must then be one eager could sample there (in its top_k). After that step
the two continuations are different texts and are not compared. Comparisons of one path with
itself (read-back every 16 tokens vs every token) stay exact.
"""

from __future__ import annotations

import pytest
import torch

import minillama
from minillama.compiled import compiled as _compiled
from minillama.cudagraph import CUDAGraphStep
from minillama.generate import GenerationStats, generate, left_pad

pytestmark = pytest.mark.cuda
PROMPTS = [[5, 17, 3], [9, 8, 7, 6, 5, 4, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
SAMPLED = {"temperature": 0.9, "top_k": 20, "seed": 5}
LOGITS = {"rtol": 1e-4, "atol": 1e-4}  # compiled or captured step vs eager, fp32, same inputs
TIE = 1e-3  # greedy: eager's two best logits closer than this may be ordered either way by the other path


@pytest.fixture
def model(make_hf):
    _, path = make_hf("mistral", num_key_value_heads=2, sliding_window=5, max_position_embeddings=512)
    return minillama.from_pretrained(path, dtype="float32", device="cuda")


class AgainstEager:
    """step_fn: the eager model's step on these inputs (SDPA over every slot, masked), then `step` on
    the same ones, their last-position logits compared within LOGITS; returns `step`'s output (both
    write the same cache slot; the step's values stay). A CUDA graph's output is read at once."""

    def __init__(self, model, step):
        self.model, self.step, self.calls, self.worst = model, step, 0, 0.0

    def __call__(self, tokens, input_pos, **kwargs):
        with torch.no_grad():
            ref = self.model(tokens, input_pos, **kwargs)[:, -1].float().clone()
        out = self.step(tokens, input_pos, **kwargs)
        got = out[:, -1].float()
        self.worst = max(self.worst, (got - ref).abs().max().item())
        torch.testing.assert_close(got, ref, **LOGITS, msg=lambda m: f"decode step {self.calls}: {m}")
        self.calls += 1
        return out


def assert_eager_tokens(model, got, want, prompts, options):
    """got == want token for token, or each row first differs where eager's choice was a near tie
    (module docstring); the rows' later tokens are then not compared."""
    assert got.shape == want.shape
    width = max(map(len, prompts))
    pad = torch.tensor([width - len(p) for p in prompts], device=want.device)
    slots = torch.arange(want.shape[1], device=want.device)[None]
    with torch.no_grad():  # eager logits at every position of eager's own sequences
        logits = model(want, position_ids=(slots - pad[:, None]).clamp(min=0),
                       padding_mask=(slots >= pad[:, None]).long()).float()
    for row in range(len(prompts)):
        differ = (got[row, width:] != want[row, width:]).nonzero()
        if not len(differ):
            continue
        j = int(differ[0, 0])
        theirs, ours = int(want[row, width + j]), int(got[row, width + j])
        scores = logits[row, width + j - 1]
        if options.get("temperature", 0) == 0:
            gap = (scores[theirs] - scores[ours]).item()
            assert gap <= TIE, f"row {row}, new token {j}: {ours} instead of eager's {theirs}, {gap:.3g} below it"
        else:
            allowed = scores.topk(options["top_k"]).indices.tolist()
            assert ours in allowed, f"row {row}, new token {j}: {ours} is not in eager's top_k there"


def prefill_inputs(model, prompts):
    """What generate passes a prefill: left-padded ids, their slots, positions and the padding mask."""
    ids, mask = left_pad(prompts, None, 0)
    ids, mask = ids.cuda(), mask.cuda()
    width = ids.shape[1]
    pad = (mask == 0).sum(-1, keepdim=True)
    padding_mask = torch.ones(ids.shape[0], model.cache_len, dtype=torch.long, device="cuda")
    padding_mask[:, :width] = mask
    positions = (torch.arange(width, device="cuda")[None] - pad).clamp(min=0)
    return ids, torch.arange(width, device="cuda"), positions, padding_mask


@pytest.mark.parametrize("options", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_compiled_decode_and_prefill_give_the_eager_tokens(model, options):
    eager = generate(model, PROMPTS, 24, eos_token_id=[], pad_token_id=0, sync_every=1, **options)
    compiled = generate(model, PROMPTS, 24, eos_token_id=[], pad_token_id=0, compile=True, **options)
    assert model._compiled_prefill is not None  # compile=True compiles the prefill on a GPU
    assert_eager_tokens(model, compiled, eager, PROMPTS, options)
    # step by step: the CUDA-graph step against eager SDPA on the same inputs
    check = AgainstEager(model, _compiled(model, "decode"))
    generate(model, PROMPTS, 24, eos_token_id=[], pad_token_id=0, compile=True, step_fn=check, **options)
    assert check.calls == 23
    # the compiled prefill against the eager one, on the same prompts and cache
    ids, slots, positions, padding_mask = prefill_inputs(model, PROMPTS)
    with torch.no_grad():
        got = model._compiled_prefill(ids, slots, position_ids=positions, padding_mask=padding_mask)[:, -1].float()
        want = model(ids, slots, position_ids=positions, padding_mask=padding_mask, last_only=True,
                     validate=False)[:, -1].float()
    torch.testing.assert_close(got, want, **LOGITS)


def test_eos_read_back_every_16_tokens_ends_on_the_exact_token(model):
    new = generate(model, PROMPTS, 24, eos_token_id=[], pad_token_id=0)[:, -24:]
    eos = [int(new[0, 3]), int(new[1, 9]), int(new[2, 17])]
    for compile in (False, True):  # each path against itself, reading back after every token: exact
        every_token = generate(model, PROMPTS, 24, eos_token_id=eos, pad_token_id=0, sync_every=1, compile=compile)
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
        assert_eager_tokens(model, compiled, generate(model, prompt, 6, eos_token_id=[]), prompt, {})
    assert counters["stats"]["unique_graphs"] == graphs  # same batch and cache: nothing new compiled


def test_rope_on_the_gpu_from_the_load_and_the_first_prefill_compiled_once(model):
    """The frequencies are on the GPU before any forward (moving them inside the first compiled
    prefill made Dynamo guard on their CPU copy and compile the prefill a second time)."""
    from torch._dynamo.utils import counters

    assert model.rope.inv_freq.is_cuda and model.rope.inv_freq.dtype == torch.float32
    model.setup_cache(1, 256)
    assert model.rope.inv_freq.is_cuda
    before = counters["stats"]["unique_graphs"]
    generate(model, [[3, 1, 4, 1, 5]], 4, eos_token_id=[], compile=True)
    first = counters["stats"]["unique_graphs"]
    assert first > before
    generate(model, [[2, 7, 1, 8, 2, 8, 1]], 4, eos_token_id=[], compile=True)
    assert counters["stats"]["unique_graphs"] == first  # the second call compiled nothing


@pytest.mark.parametrize("compiled_inner", [False, True], ids=["eager-step", "compiled-step"])
def test_hand_captured_graph_gives_the_eager_tokens(model, compiled_inner):
    inner = torch.compile(model, fullgraph=True, dynamic=False) if compiled_inner else None
    step = CUDAGraphStep(model, inner)
    for options in ({}, SAMPLED):
        eager = generate(model, PROMPTS, 16, eos_token_id=[], pad_token_id=0, **options)
        got = generate(model, PROMPTS, 16, eos_token_id=[], pad_token_id=0, step_fn=step, **options)
        # (even the captured eager step attends over every slot, masked, where eager decoding reads
        # only the slots written: SDPA over another length may round differently)
        assert_eager_tokens(model, got, eager, PROMPTS, options)
        check = AgainstEager(model, step)
        generate(model, PROMPTS, 16, eos_token_id=[], pad_token_id=0, step_fn=check, **options)
        assert check.calls == 15
    assert len(step.graphs) == 1
