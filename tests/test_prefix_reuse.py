"""Prefix reuse in the serving engine (minillama/engine.py): a newcomer whose prompt starts as a
finished request's did prefills only the rest, and nothing changes but speed: greedy and seeded
outputs equal those without reuse and those of generate() alone, with a sliding window shorter
than the shared prefix, a prefix ending mid-chunk, rows at different lengths and a cancelled request
whose row is reused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

import minillama
from conftest import hf_config, randomize
from minillama.engine import Engine, Request
from minillama.generate import SamplingConfig, generate


@pytest.fixture(scope="module")
def windowed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Mistral whose 8-token window is shorter than the shared prefixes, byte tokenizer."""
    from minillama.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    cfg = hf_config("mistral", vocab_size=len(tok), max_position_embeddings=512, num_key_value_heads=2,
                    sliding_window=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    randomize(model, 1)
    path = tmp_path_factory.mktemp("windowed")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def conversation() -> list[list[int]]:
    """Prompts that each start with the previous one (a chat resent every turn), plus a stranger."""
    system = [(i * 11) % 200 + 3 for i in range(23)]  # ends mid-chunk for prefill_chunk=10
    turns = [system + [50, 51, 52]]
    for t in range(3):
        turns.append(turns[-1] + [(t * 13 + j) % 200 + 3 for j in range(9)])
    return turns + [[7, 8, 9, 10, 11]]


def run(engine: Engine, prompts: list[list[int]], sampling: SamplingConfig, together: bool = False,
        cancel_first: bool = False) -> list[list[int]]:
    """Tokens of each request, submitted one after another (each after the previous finished) or all at once."""
    requests = [Request(p, 10, sampling, ignore_eos=True) for p in prompts]
    for i, r in enumerate(requests):
        engine.submit(r)
        if cancel_first and i == 0:
            engine.step()
            engine.step()
            engine.cancel(r)
        if not together:
            while engine.running or engine.waiting:
                engine.step()
    while engine.running or engine.waiting:
        engine.step()
    return [r.tokens for r in requests]


@pytest.mark.parametrize("which", ["llama", "windowed"])
@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.9, top_k=20, seed=3)],
                         ids=["greedy", "seeded"])
def test_reuse_changes_nothing_but_the_prefill(which: str, sampling: SamplingConfig, tiny_chat_dir: Path,
                                              windowed_dir: Path) -> None:
    path = tiny_chat_dir if which == "llama" else windowed_dir
    model = minillama.from_pretrained(path, dtype="float32")
    tok = minillama.load_tokenizer(path)
    prompts = conversation()
    without = run(Engine(model, tok, max_batch=2, prefill_chunk=10, prefix_reuse=False), prompts, sampling)
    engine = Engine(model, tok, max_batch=2, prefill_chunk=10)
    assert run(engine, prompts, sampling) == without
    # every turn after the first found the previous turn's row (its prompt and answer, less the last token)
    assert engine.prefix_hits == 3 and engine.reused_tokens >= sum(len(p) for p in prompts[:3])
    if sampling.greedy:
        model.clear_cache()
        alone = [generate(model, [p], 10, eos_token_id=[])[0, len(p):].tolist() for p in prompts]
        assert without == alone


def test_rows_at_different_lengths_and_a_cancelled_row(tiny_chat_dir: Path) -> None:
    """Requests sharing a prefix run together with others; a cancelled request's row is reused by the
    next one with its prefix; the tokens are those of a run without reuse."""
    model = minillama.from_pretrained(tiny_chat_dir, dtype="float32")
    tok = minillama.load_tokenizer(tiny_chat_dir)
    prompts = conversation()
    order = [prompts[0], prompts[4], prompts[1], prompts[2]]
    sampling = SamplingConfig()
    want = run(Engine(model, tok, max_batch=3, prefill_chunk=10, prefix_reuse=False), order[1:], sampling, True)
    engine = Engine(model, tok, max_batch=3, prefill_chunk=10)
    cancelled = Request(order[0], 10, sampling, ignore_eos=True)
    engine.submit(cancelled)
    for _ in range(4):  # prefilled (3 chunks) and one token decoded, then the client leaves
        engine.step()
    engine.cancel(cancelled)
    engine.step()
    assert engine.resting.count([]) == 2 and max(len(r) for r in engine.resting) >= len(order[0])
    assert run(engine, order[1:], sampling, together=True) == want
    assert engine.prefix_hits >= 1


def test_a_failed_request_leaves_nothing_to_reuse(tiny_chat_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = minillama.from_pretrained(tiny_chat_dir, dtype="float32")
    engine = Engine(model, minillama.load_tokenizer(tiny_chat_dir), max_batch=1, prefill_chunk=10)
    import minillama.engine as engine_module

    monkeypatch.setattr(engine_module, "sample", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    request = Request(conversation()[1], 4, SamplingConfig())
    engine.submit(request)
    while engine.running or engine.waiting:
        engine.step()
    assert request.finish_reason == "error" and engine.resting == [[]]


def test_a_resting_row_keeps_its_prefix_while_the_rows_above_decode(tiny_chat_dir: Path) -> None:
    """Row 0 rests with a conversation while row 1 decodes a stranger (the decode step covers row 0
    too, with a dummy token): the next turn still finds row 0's prefix intact."""
    model = minillama.from_pretrained(tiny_chat_dir, dtype="float32")
    tok = minillama.load_tokenizer(tiny_chat_dir)
    prompts = conversation()
    sampling = SamplingConfig()
    want = run(Engine(model, tok, max_batch=2, prefill_chunk=10, prefix_reuse=False), [prompts[1]], sampling)
    engine = Engine(model, tok, max_batch=2, prefill_chunk=10)
    run(engine, [prompts[0]], sampling)
    stranger = Request(prompts[4], 30, sampling, ignore_eos=True)
    engine.submit(stranger)
    for _ in range(6):
        engine.step()
    assert engine.rows[1] is stranger and engine.rows[0] is None
    assert run(engine, [prompts[1]], sampling) == want and engine.prefix_hits == 1


@pytest.mark.parametrize("which", ["llama", "windowed"])
def test_requests_behind_one_system_prompt_prefill_it_once(which: str, tiny_chat_dir: Path,
                                                          windowed_dir: Path) -> None:
    """Several requests arriving together with one long shared prefix: the first prefills it, the
    others wait for it and copy its keys and values; tokens as without reuse."""
    path = tiny_chat_dir if which == "llama" else windowed_dir
    model = minillama.from_pretrained(path, dtype="float32")
    tok = minillama.load_tokenizer(path)
    system = [(i * 7) % 200 + 3 for i in range(35)]
    prompts = [system + [40 + u, 41 + u, 42] for u in range(4)]
    sampling = SamplingConfig(temperature=0.8, seed=5)
    want = run(Engine(model, tok, max_batch=4, prefill_chunk=10, prefix_reuse=False), prompts, sampling, True)
    engine = Engine(model, tok, max_batch=4, prefill_chunk=10)
    assert run(engine, prompts, sampling, together=True) == want
    assert engine.prefix_hits == 3 and engine.reused_tokens == 3 * len(system)
