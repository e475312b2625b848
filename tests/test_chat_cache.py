"""A conversation's KV cache kept across turns (generate.CachedPrefix, `minillama chat`): each turn
prefills only what follows the cached tokens, and answers exactly as a fresh full prefill would."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

import minillama
from minillama.cli import main
from minillama.generate import CachedPrefix, GenerationStats, generate, generate_tokens


@pytest.mark.parametrize("family, extra", [("llama", {}), ("mistral", {"sliding_window": 8})])
def test_each_turn_prefills_only_what_is_new_and_answers_as_a_full_prefill(make_hf, family: str,
                                                                           extra: dict) -> None:
    _, path = make_hf(family, max_position_embeddings=512, **extra)
    model = minillama.from_pretrained(path, dtype="float32")
    fresh = minillama.from_pretrained(path, dtype="float32")  # the reference: a full prefill every turn
    conversation, history = CachedPrefix(), [5, 6, 7, 8, 9]
    for turn in range(4):
        held = len(conversation.tokens)
        stats = GenerationStats()
        out = generate(model, [history], 7, eos_token_id=[], cached=conversation, stats=stats)[0].tolist()
        assert out == generate(fresh, [history], 7, eos_token_id=[])[0].tolist()
        assert (stats.reused_tokens, stats.prompt_tokens) == (held, len(history) - held)
        assert conversation.tokens == out[:-1]  # the prompt and six fed tokens (the seventh never fed)
        # the next prompt: this one, its whole answer, then a new "message", past the window of 8
        history = out + [10 + turn] * (3 + 4 * turn)
    generate(model, [[1, 2, 3]], 2)  # the cache used by someone else in between: nothing is reused
    stats = GenerationStats()
    out = generate(model, [history], 7, eos_token_id=[], cached=conversation, stats=stats)
    assert out.tolist() == generate(fresh, [history], 7, eos_token_id=[]).tolist()
    assert (stats.reused_tokens, stats.prompt_tokens) == (0, len(history))


def test_a_diverging_prompt_a_grown_cache_and_a_stopped_stream(make_hf) -> None:
    _, path = make_hf("llama", max_position_embeddings=2048)
    model = minillama.from_pretrained(path, dtype="float32")
    fresh = minillama.from_pretrained(path, dtype="float32")
    conversation = CachedPrefix()
    prompt = list(range(3, 40))
    generate(model, [prompt], 5, eos_token_id=[], cached=conversation)
    other = prompt[:20] + [77] * 10  # diverges after 20 tokens: 20 reused, the rest prefilled
    stats = GenerationStats()
    out = generate(model, [other], 5, eos_token_id=[], cached=conversation, stats=stats)
    assert out.tolist() == generate(fresh, [other], 5, eos_token_id=[]).tolist()
    assert (stats.reused_tokens, stats.prompt_tokens) == (20, 10)
    # a prompt that grows the cache past its first allocation keeps what the row held
    long = conversation.tokens + [50 + i % 70 for i in range(300)]
    stats = GenerationStats()
    out = generate(model, [long], 3, eos_token_id=[], cached=conversation, stats=stats)
    assert stats.reused_tokens == len(long) - 300 and model.cache_len > 256
    assert out.tolist() == generate(fresh, [long], 3, eos_token_id=[]).tolist()
    # a consumer that stops after three tokens: two were fed, so two are recorded
    start = list(conversation.tokens)
    _, tokens = generate_tokens(model, [start + [5]], 50, eos_token_id=[], cached=conversation)
    got = [int(next(tokens)[0]) for _ in range(3)]
    tokens.close()
    assert conversation.tokens == start + [5] + got[:2]
    nxt = start + [5] + got + [6]
    stats = GenerationStats()
    out = generate(model, [nxt], 4, eos_token_id=[], cached=conversation, stats=stats)
    assert stats.reused_tokens == len(start) + 3 and out.tolist() == generate(fresh, [nxt], 4, eos_token_id=[]).tolist()


def _chat(tiny_chat_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, lines: list[str],
          *flags: str) -> tuple[str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", "--model", str(tiny_chat_dir), "-n", "12", "--stats", *flags]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_minillama_chat_reuses_the_conversation(tiny_chat_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    lines = ["hello there", "and a second message", "a third one", "/reset", "hello there"]
    out, err = _chat(tiny_chat_dir, monkeypatch, capsys, lines)
    plain_out, plain_err = _chat(tiny_chat_dir, monkeypatch, capsys, lines, "--no-prefix-reuse")
    assert out == plain_out  # the same answers, turn by turn
    prefilled = [int(n) for n in re.findall(r"prefill (\d+) tokens", err)]
    full = [int(n) for n in re.findall(r"prefill (\d+) tokens", plain_err)]
    reused = [int(n) for n in re.findall(r"(\d+) more reused", err)]
    assert len(prefilled) == len(full) == 4 and "reused" not in plain_err
    # turns 2 and 3 prefill only their new part; after /reset the first message is prefilled whole
    assert prefilled[0] == full[0] and prefilled[3] == full[3]
    for k in (1, 2):
        assert prefilled[k] < full[k] - full[k - 1] + 4 and prefilled[k] + reused[k - 1] == full[k]
    tok = minillama.load_tokenizer(tiny_chat_dir)
    first_prompt = len(tok.apply_chat_template([{"role": "user", "content": "hello there"}],
                                               add_generation_prompt=True, return_dict=True)["input_ids"])
    assert reused[0] >= first_prompt  # the first turn's whole prompt, and some of its answer
