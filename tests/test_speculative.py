"""Speculative decoding gives the tokens plain decoding gives (greedy), or the target's distribution
(sampled), with prompt lookup and with a draft model, single and batched."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_families import FAMILIES, TOKENS

import minillama
from minillama.cli import main
from minillama.errors import GenerationError
from minillama.generate import GenerationStats, SamplingConfig, generate, process_logits
from minillama.speculative import DraftModel, PromptLookup

PROMPTS = [[5, 9, 3, 7, 1, 2, 8, 5, 9, 3], [4, 6], [11, 12, 13, 11, 12]]  # ragged: left-padded


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    """(target, a copy of it, an unrelated random draft, a sliding-window target), tiny and random."""
    import transformers
    from conftest import hf_config, randomize

    out = []
    for seed, family, extra in ((0, "llama", {}), (1, "llama", {}), (2, "mistral", {"sliding_window": 8})):
        cfg = hf_config(family, max_position_embeddings=512, **extra)
        torch.manual_seed(seed)
        hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        randomize(hf, seed)
        path = tmp_path_factory.mktemp(f"spec-{family}-{seed}")
        hf.save_pretrained(path)
        out.append(path)
    target, draft, window = out
    load = lambda p: minillama.from_pretrained(p, dtype="float32")  # noqa: E731
    return {"target": load(target), "copy": load(target), "draft": load(draft), "window": load(window),
            "window_copy": load(window), "dir": target}


def _plain(model, prompts, n, **kw):
    return generate(model, prompts, n, eos_token_id=kw.pop("eos_token_id", []), **kw)


@pytest.mark.parametrize("proposer", ["lookup", "copy", "draft"])
@pytest.mark.parametrize("batched", [False, True])
def test_greedy_is_plain_greedy(models, proposer: str, batched: bool) -> None:
    target = models["target"]
    prompts = PROMPTS if batched else PROMPTS[:1]
    spec = {"lookup": lambda: PromptLookup(4), "copy": lambda: DraftModel(models["copy"], 3),
            "draft": lambda: DraftModel(models["draft"], 3)}[proposer]()
    stats = GenerationStats()
    got = generate(target, prompts, 40, eos_token_id=[], speculative=spec, stats=stats)
    assert got.tolist() == _plain(target, prompts, 40).tolist()
    assert stats.new_tokens == 40 and stats.target_forwards < 40
    if proposer == "copy":  # the draft is the target: every guess stands
        assert stats.accepted == stats.proposed > 0
        assert stats.target_forwards <= -(-40 // 4) + 1


def test_eos_and_the_token_limit_inside_an_accepted_run(models) -> None:
    target, copy = models["target"], models["copy"]
    plain = _plain(target, PROMPTS, 30)
    # an end-of-sequence id that the first row produces mid-answer: the output ends on it exactly
    eos = plain[0, -20:].tolist()[7]
    want = _plain(target, PROMPTS, 30, eos_token_id=eos)
    for spec in (PromptLookup(6), DraftModel(copy, 5)):
        got = generate(target, PROMPTS, 30, eos_token_id=eos, speculative=spec)
        assert got.tolist() == want.tolist()
        for n in (1, 2, 7, 13):  # limits that fall inside runs of 6 accepted guesses
            assert generate(target, PROMPTS, n, eos_token_id=[], speculative=spec).tolist() \
                == _plain(target, PROMPTS, n).tolist()


def test_a_sliding_window_shorter_than_the_output(models) -> None:
    window = models["window"]
    for spec in (PromptLookup(5), DraftModel(models["window_copy"], 4)):
        assert generate(window, PROMPTS, 40, eos_token_id=[], speculative=spec).tolist() \
            == _plain(window, PROMPTS, 40).tolist()


def test_stop_strings_end_the_output_where_plain_decoding_does(tiny_chat_dir: Path) -> None:
    model = minillama.from_pretrained(tiny_chat_dir, dtype="float32")
    tok = minillama.load_tokenizer(tiny_chat_dir)
    prompt = [tok("abcabcabcabc").input_ids]
    plain = generate(model, prompt, 40, tokenizer=tok)
    text = tok.decode(plain[0, len(prompt[0]):].tolist())
    stop = text[10:12]  # something the answer writes
    want = generate(model, prompt, 40, tokenizer=tok, stop=[stop])
    assert generate(model, prompt, 40, tokenizer=tok, stop=[stop], speculative=PromptLookup(8)).tolist() \
        == want.tolist()


def test_the_cache_after_rejections_is_the_cache_of_plain_decoding(models) -> None:
    target = models["target"]
    out = generate(target, PROMPTS[:1], 25, eos_token_id=[], speculative=DraftModel(models["draft"], 4))
    seq = out[0].tolist()
    # one more step from the cache the speculative run left (rejected guesses wrote past the end)
    with torch.no_grad():
        step = target(torch.tensor([[seq[-1]]]), torch.tensor([len(seq) - 1]), kv_len=len(seq))[0, -1]
        full = models["copy"](torch.tensor([seq]))[0, -1]
    assert torch.allclose(step, full, atol=1e-4)


def _exact_distribution(model, prompt: list[int], cfg: SamplingConfig, n: int) -> dict[tuple[int, ...], float]:
    """The target's exact probability of every sequence of n new tokens (small supports only)."""
    dist: dict[tuple[int, ...], float] = {(): 1.0}
    with torch.no_grad():
        for _ in range(n):
            seqs = list(dist)
            logits = model(torch.tensor([prompt + list(s) for s in seqs]))[:, -1].float()
            probs = process_logits(logits, cfg, None).softmax(-1)
            dist = {s + (t,): dist[s] * float(probs[i, t]) for i, s in enumerate(seqs)
                    for t in probs[i].nonzero().flatten().tolist()}
    return dist


@pytest.mark.parametrize("options", [dict(temperature=1.0, top_k=2), dict(temperature=0.7, top_k=3, top_p=0.7)])
def test_sampled_tokens_follow_the_target_distribution(models, options: dict) -> None:
    """1,500 rows sampled at once (i.i.d. draws from one generator), 4 new tokens each: the first
    comes from the prompt's forward, the next three through guesses accepted or rejected. The
    empirical distribution of those three is within total variation 0.1 of the exact one
    (measured 0.03-0.04; always accepting a guess, or sampling a rejection from p instead of the
    residual, gives 0.15-1.0)."""
    target, prompt, rows = models["target"], [5, 9, 3, 5, 9, 3, 5], 1500
    exact: dict[tuple[int, ...], float] = {}
    for seq, prob in _exact_distribution(target, prompt, SamplingConfig(**options), 4).items():
        exact[seq[1:]] = exact.get(seq[1:], 0.0) + prob
    # a random draft (its guesses mostly rejected), the target's copy (q = p: all kept), prompt lookup
    for spec in (DraftModel(models["draft"], 3), DraftModel(models["copy"], 3), PromptLookup(3)):
        stats = GenerationStats()
        out = generate(target, [prompt] * rows, 4, eos_token_id=[], seed=0, speculative=spec, stats=stats, **options)
        assert stats.proposed > rows // 4  # guesses were made (and judged)
        counts: dict[tuple[int, ...], int] = {}
        for seq in out[:, -3:].tolist():
            counts[tuple(seq)] = counts.get(tuple(seq), 0) + 1
        tv = 0.5 * sum(abs(exact.get(k, 0.0) - counts.get(k, 0) / rows) for k in set(exact) | set(counts))
        assert set(counts) <= set(exact) and tv < 0.1, (type(spec).__name__, tv)
    # seeded: the same seed gives the same tokens
    a = generate(target, [prompt], 12, eos_token_id=[], seed=3, speculative=DraftModel(models["draft"], 3), **options)
    b = generate(target, [prompt], 12, eos_token_id=[], seed=3, speculative=DraftModel(models["draft"], 3), **options)
    assert a.tolist() == b.tolist()


def test_bad_settings_fail_in_one_line(models, tiny_chat_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    target = models["target"]
    with pytest.raises(GenerationError, match="vocabulary"):
        generate(target, PROMPTS, 4, speculative=DraftModel(minillama.from_pretrained(tiny_chat_dir), 2))
    with pytest.raises(GenerationError, match="draft tokens"):
        DraftModel(models["draft"], 0)
    with pytest.raises(GenerationError, match="tokens must be"):
        PromptLookup(0)
    other = tmp_path / "other-tokenizer"  # the tiny chat model beside a tokenizer with one more token
    shutil.copytree(tiny_chat_dir, other)
    tok = minillama.load_tokenizer(tiny_chat_dir)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object"}')
    for flags, message in ((["--prompt-lookup", "--draft", str(other)], "choose one"),
                           (["--draft-tokens", "0", "--draft", str(other)], "--draft-tokens"),
                           (["--prompt-lookup", "--json-schema", str(schema)], "does not combine with --json-schema"),
                           (["--draft", str(other)], "tokenizer is not the model's")):
        assert main(["generate", "--model", str(tiny_chat_dir), "-p", "x", "-n", "3", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_prompt_lookup_and_draft_print_what_plain_decoding_prints(tiny_chat_dir: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    base = ["generate", "--model", str(tiny_chat_dir), "-p", "abcabcabc abcabc", "-n", "24"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    for flags in (["--prompt-lookup", "6"], ["--draft", str(tiny_chat_dir), "--draft-tokens", "3"]):
        assert main([*base, *flags, "--stats"]) == 0
        captured = capsys.readouterr()
        assert captured.out == plain and "speculative:" in captured.err


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_and_a_quantized_model(make_hf, name: str) -> None:
    _, path = make_hf(name, **TOKENS, **FAMILIES[name])
    model = minillama.from_pretrained(path, dtype="float32", quantize="int8" if name == "qwen3" else None)
    if model.config.rope.rope_type == "longrope":
        with pytest.raises(GenerationError, match="longrope"):
            generate(model, PROMPTS, 4, speculative=PromptLookup(4))
        return
    assert generate(model, PROMPTS, 24, eos_token_id=[], speculative=PromptLookup(4)).tolist() \
        == _plain(model, PROMPTS, 24).tolist()


def test_a_compiled_draft_steps_through_the_compiled_decode_step(models, monkeypatch) -> None:
    """DraftModel(compile=True) at batch 1 calls the compiled step with generate's convention (one
    shared slot, the padding mask, no kv_len); here the "compiled" step is the eager model behind a
    counter (the real library is generate's, tested in test_generate), so the plumbing is what runs."""
    from minillama import speculative

    calls = []

    def fake_compiled(model, part):
        assert part == "decode"

        def step(ids, slot, *, position_ids, padding_mask, validate):
            assert ids.shape == (1, 1) and slot.shape == (1,) and padding_mask is not None
            calls.append(int(slot))
            return model(ids, slot, position_ids=position_ids, padding_mask=padding_mask, validate=validate)
        return step

    monkeypatch.setattr(speculative, "compiled", fake_compiled)
    target, draft = models["target"], models["draft"]
    want = _plain(target, PROMPTS[:1], 24)
    got = _plain(target, PROMPTS[:1], 24, speculative=DraftModel(draft, 3, compile=True))
    assert torch.equal(got, want) and len(calls) > 10
    calls.clear()
    batched = _plain(target, PROMPTS, 12, speculative=DraftModel(draft, 3, compile=True))
    assert torch.equal(batched, _plain(target, PROMPTS, 12)) and not calls  # batched rows: the eager step
    with pytest.raises(GenerationError, match="compile"):
        DraftModel(draft, 3, compile="yes")


def test_the_compiled_verify_step_gives_plain_greedy_tokens(models) -> None:
    """compile=True: the target's verify forward through its compiled (AOTInductor) step, one width
    for every round, and guess-free rounds through the compiled one-token step: plain tokens."""
    target, copy = models["target"], models["copy"]
    want = _plain(target, PROMPTS[:1], 30)
    stats = GenerationStats()
    got = _plain(target, PROMPTS[:1], 30, speculative=DraftModel(copy, 3), compile=True, stats=stats)
    assert torch.equal(got, want) and stats.target_forwards < 15
    assert target.__dict__["_compiled_verify"].status in ("compiled", "loaded", "fallback")


def test_batched_compiled_verify_feeds_one_width_at_each_rows_slots(models, monkeypatch) -> None:
    """Batched and compiled, every verify call is [rows, tokens + 1] at per-row slots with the padding
    mask and no kv_len (static shapes); the "compiled" step here is the eager model attending over
    the whole cache, as the compiled one does, so the plumbing is what runs."""
    from minillama import speculative

    widths = []

    def fake_compiled(model, part):
        assert part in ("verify", "decode")

        def step(ids, slots, *, position_ids, padding_mask, validate):
            assert padding_mask is not None and slots.shape == ids.shape == position_ids.shape
            widths.append(ids.shape)
            return model(ids, slots, position_ids=position_ids, padding_mask=padding_mask, validate=validate,
                         kv_len=model.cache_len)
        return step

    monkeypatch.setattr(speculative, "compiled", fake_compiled)
    target = models["target"]
    for spec in (PromptLookup(4), DraftModel(models["copy"], 3)):
        widths.clear()
        got = _plain(target, PROMPTS, 30, speculative=spec, compile="decode")
        assert torch.equal(got, _plain(target, PROMPTS, 30))
        assert widths and set(widths) == {(len(PROMPTS), spec.tokens + 1)}
