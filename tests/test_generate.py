"""Generation: parity with transformers' generate, batching, samplers, stopping, streaming."""

from __future__ import annotations

import contextlib

import pytest
import torch
import transformers
from transformers.generation import logits_process as hf_lp

import minillama
from minillama import GenerationError
from minillama.generate import SamplingConfig, generate, process_logits, stream
from minillama.stopping import IncrementalDecoder

PROMPTS = [[5, 17, 3], [9, 8, 7, 6, 5, 4, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
# The model of the compiled-step tests (one compile cache serves them all): Gemma 2 puts the most
# into a compiled graph: a sliding window shorter than the prompts on one layer and none on the
# other, tanh soft-caps on scores and logits that saturate, a score scale other than head_dim's,
# four norms a block with the (1 + w) fp32 gain.
COMPILED = ("gemma2", dict(num_key_value_heads=2, head_dim=16, sliding_window=5, max_position_embeddings=512,
                           query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _hf_greedy(ref: transformers.PreTrainedModel, ids: torch.Tensor, n: int) -> torch.Tensor:
    return ref.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=-1, pad_token_id=0)


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", dict(num_key_value_heads=2)),
    ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    ("mistral", dict(num_key_value_heads=2, sliding_window=6)),  # 32 new tokens run far past the window
])
def test_greedy_equals_transformers_generate(make_hf, model_type, overrides):
    ref, path = make_hf(model_type, **overrides)
    model = minillama.from_pretrained(path)
    ids = torch.tensor([PROMPTS[1]])
    expected = _hf_greedy(ref, ids, 32)
    got = generate(model, ids, 32, eos_token_id=[])
    assert got.shape == (1, 7 + 32)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", dict(num_key_value_heads=2)),
    ("mistral", dict(num_key_value_heads=2, sliding_window=5)),
])
def test_batched_left_padded_equals_one_by_one(make_hf, model_type, overrides):
    _, path = make_hf(model_type, **overrides)
    model = minillama.from_pretrained(path)
    batched = generate(model, PROMPTS, 12, eos_token_id=[], pad_token_id=0)
    width = max(map(len, PROMPTS))
    for row, prompt in zip(batched, PROMPTS, strict=True):
        alone = generate(model, torch.tensor([prompt]), 12, eos_token_id=[])[0]
        assert torch.equal(row[width - len(prompt):], alone)
    # the same through a left-padded tensor and its attention mask
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    assert torch.equal(generate(model, ids, 12, attention_mask=mask, eos_token_id=[], pad_token_id=0), batched)


def test_eos_stops_and_pads_finished_rows(make_hf):
    _, path = make_hf("llama", num_key_value_heads=2)
    model = minillama.from_pretrained(path)
    free = generate(model, PROMPTS, 10, eos_token_id=[], pad_token_id=0)
    width = max(map(len, PROMPTS))
    eos = int(free[0, width + 2])  # row 0's third new token
    out = generate(model, PROMPTS, 10, eos_token_id=[eos], pad_token_id=-1)
    # Each row is its free-running tokens up to and including its first EOS, then padding; the
    # batch ends once every row has stopped.
    expected, stops = [], []
    for r in range(3):
        new = free[r, width:].tolist()
        stop = new.index(eos) + 1 if eos in new else len(new)
        stops.append(stop)
        expected.append(new[:stop] + [-1] * (len(new) - stop))
    assert stops[0] <= 3
    assert out[:, width:].tolist() == [row[:max(stops)] for row in expected]
    assert generate(model, PROMPTS[:1], 10, eos_token_id=[int(free[0, width])]).shape[1] == 3 + 1


def test_default_eos_comes_from_generation_config(make_hf):
    _, path = make_hf("llama")
    model = minillama.from_pretrained(path)
    first = int(generate(model, [PROMPTS[0]], 1, eos_token_id=[])[0, -1])
    model.generation_config = {"eos_token_id": [first, 99999]}
    model.config.extra.pop("eos_token_id", None)
    assert generate(model, [PROMPTS[0]], 8).shape[1] == len(PROMPTS[0]) + 1


def test_top_k_1_equals_greedy_and_seeds_reproduce(make_hf):
    _, path = make_hf("llama", num_key_value_heads=2)
    model = minillama.from_pretrained(path)
    greedy = generate(model, PROMPTS, 16, eos_token_id=[])
    assert torch.equal(generate(model, PROMPTS, 16, temperature=1.3, top_k=1, seed=3, eos_token_id=[]), greedy)
    kwargs = dict(temperature=1.5, top_p=0.95, seed=123, eos_token_id=[])
    a, b = generate(model, PROMPTS, 16, **kwargs), generate(model, PROMPTS, 16, **kwargs)
    assert torch.equal(a, b)
    others = [generate(model, PROMPTS, 16, **{**kwargs, "seed": s}) for s in (1, 2)]
    assert any(not torch.equal(a, o) for o in others)


def test_samplers_match_transformers_processors():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=gen) * 3
    seen_ids = torch.randint(0, 300, (4, 20), generator=gen)
    seen = torch.zeros(4, 300, dtype=torch.bool).scatter_(1, seen_ids, True)
    cases = [
        (SamplingConfig(temperature=0.7, top_k=20), [hf_lp.TemperatureLogitsWarper(0.7), hf_lp.TopKLogitsWarper(20)]),
        (SamplingConfig(temperature=1.2, top_p=0.8), [hf_lp.TemperatureLogitsWarper(1.2), hf_lp.TopPLogitsWarper(0.8)]),
        (SamplingConfig(temperature=0.9, min_p=0.1), [hf_lp.TemperatureLogitsWarper(0.9), hf_lp.MinPLogitsWarper(0.1)]),
        (SamplingConfig(temperature=1.0, repetition_penalty=1.3, top_k=50, top_p=0.9, min_p=0.05),
         [hf_lp.RepetitionPenaltyLogitsProcessor(1.3), hf_lp.TopKLogitsWarper(50), hf_lp.TopPLogitsWarper(0.9),
          hf_lp.MinPLogitsWarper(0.05)]),
        (SamplingConfig(repetition_penalty=0.8), [hf_lp.RepetitionPenaltyLogitsProcessor(0.8)]),
    ]
    for cfg, processors in cases:
        expected = logits.clone()
        for proc in processors:
            expected = proc(seen_ids, expected)
        got = process_logits(logits.clone(), cfg, seen)
        assert torch.equal(torch.isinf(got), torch.isinf(expected)), cfg
        finite = ~torch.isinf(got)
        torch.testing.assert_close(got[finite], expected[finite])


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.2), "top_p must be in (0, 1]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(min_p=2.0), "min_p must be in [0, 1]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(stop=["x"]), "stop strings need a tokenizer"),
])
def test_impossible_settings_are_refused(make_hf, kwargs, message):
    _, path = make_hf("llama")
    model = minillama.from_pretrained(path)
    with pytest.raises(GenerationError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        generate(model, [PROMPTS[0]], 4, **kwargs)


def test_bad_lengths_are_refused_and_context_is_bounded(make_hf):
    _, path = make_hf("llama", max_position_embeddings=16)
    model = minillama.from_pretrained(path)
    with pytest.raises(GenerationError, match="max_new_tokens must be an integer >= 1, got 0"):
        generate(model, [PROMPTS[0]], 0)
    with pytest.raises(GenerationError, match="empty prompt"):
        generate(model, [[]], 4)
    with pytest.raises(GenerationError, match="prompt has 16 tokens; the model's context is 16"):
        generate(model, [list(range(16))], 4)
    out = generate(model, [PROMPTS[2]], 100, eos_token_id=[])
    assert out.shape[1] == 16  # 12 prompt tokens + 4: never past max_position_embeddings


def test_incremental_decoder_never_splits_a_character(smollm2_dir):
    tok = minillama.load_tokenizer(smollm2_dir)
    text = "Ça coûte 5 € — 日本語のテキスト 🙂👍 naïve"
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in tok(text, add_special_tokens=False).input_ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p == "") > 0  # some tokens held back half a character


@pytest.fixture(scope="module")
def smol(smollm2):
    tok, model = smollm2
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    return model, tok, ids


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers(smollm2_hf, smol):
    model, tok, ids = smol
    ref = smollm2_hf
    expected = _hf_greedy(ref, ids, 32)
    assert torch.equal(generate(model, ids, 32, eos_token_id=[]), expected)
    # with the checkpoint's own EOS both stop at the same place, after "Paris."
    stopped = generate(model, ids, 32, tokenizer=tok)
    assert torch.equal(stopped, ref.generate(ids, max_new_tokens=32, do_sample=False))
    assert "Paris" in tok.decode(stopped[0, ids.shape[1]:])


@pytest.mark.slow
def test_smollm2_stream_and_stop_strings(smol):
    model, tok, ids = smol
    full = generate(model, ids, 24, tokenizer=tok)
    text = tok.decode(full[0, ids.shape[1]:], skip_special_tokens=True)
    pieces = list(stream(model, tok, ids, 24))
    assert len(pieces) > 3 and "".join(pieces) == text
    cut = generate(model, ids, 24, tokenizer=tok, stop=["France"])
    cut_text = tok.decode(cut[0, ids.shape[1]:], skip_special_tokens=True)
    assert cut_text.endswith("France") and len(cut_text) < len(text)
    assert "".join(stream(model, tok, ids, 24, stop=["France"])) == cut_text
    with pytest.raises(GenerationError, match="one prompt"):
        list(stream(model, tok, torch.cat([ids, ids]), 4))


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens(make_hf):
    # the prefill test's model: the session's compile cache serves both the same decode library
    _, path = make_hf(COMPILED[0], **COMPILED[1])
    model = minillama.from_pretrained(path)
    eager = generate(model, PROMPTS, 12, eos_token_id=[], pad_token_id=0)
    assert torch.equal(generate(model, PROMPTS, 12, eos_token_id=[], pad_token_id=0, compile=True), eager)
    assert model._compiled_step.status in ("compiled", "loaded")  # the packaged library ran, not the fallback
    # "every row done?" read back once per 5 tokens, as on a GPU: EOS still lands on the same token
    new = eager[:, -12:]
    eos = [int(new[0, 3]), int(new[1, 6]), int(new[2, 8])]
    for options in ({}, {"temperature": 0.9, "top_k": 20, "seed": 5}):
        every_token = generate(model, PROMPTS, 12, eos_token_id=eos, pad_token_id=0, **options)
        if not options:  # greedy: every row meets its EOS, so the output ends early
            assert every_token.shape[1] < eager.shape[1]
        for compiled in (False, True):
            bursts = generate(model, PROMPTS, 12, eos_token_id=eos, pad_token_id=0, sync_every=5,
                              compile=compiled, **options)
            assert torch.equal(bursts, every_token), (options, compiled)


@pytest.mark.slow
@pytest.mark.parametrize("packaged", [True, False], ids=["aot", "in-process"])
def test_compiled_prefill_is_one_compilation_for_every_prompt_length(make_hf, monkeypatch, tmp_path, packaged):
    """compile="all": the prefill compiles once per (batch, cache shape), whatever the prompt's length,
    and gives the eager tokens: ragged batches, a sliding window shorter than the prompts, sampling.
    In-process: torch.compile, as where a model cannot be packaged (packaging fails here: a
    warning, then the same tokens)."""
    from torch._dynamo.utils import counters

    from minillama import aot
    from minillama.generate import GenerationStats

    builds = []
    build = aot.build_library

    def counted(*args, **kwargs):
        builds.append(args[-1])
        if not packaged:
            raise RuntimeError("unsupported operator")
        return build(*args, **kwargs)

    monkeypatch.setattr(aot, "build_library", counted)
    if not packaged:  # an empty cache: the libraries the other tests built must not load
        monkeypatch.setenv("MINILLAMA_COMPILE_CACHE", str(tmp_path))
    _, path = make_hf(COMPILED[0], **COMPILED[1])
    model = minillama.from_pretrained(path)
    for options in ({}, {"temperature": 0.9, "top_k": 20, "seed": 5}):
        eager = generate(model, PROMPTS, 12, eos_token_id=[], pad_token_id=0, **options)
        stats = GenerationStats()
        with contextlib.nullcontext() if packaged or options else pytest.warns(
                UserWarning, match="packaging failed .*unsupported operator.*in-process") as refused:
            compiled = generate(model, PROMPTS, 12, eos_token_id=[], pad_token_id=0, compile="all", stats=stats,
                                **options)
        assert torch.equal(compiled, eager), options
        if not options:
            assert stats.prefill_compile_s > stats.prefill_s  # the first call compiles, timed apart
        if packaged:  # the libraries ran (a packaging failure would fall back and still match)
            assert {model._compiled_step.status, model._compiled_prefill.status} <= {"compiled", "loaded"}
        else:  # each part tried packaging once, then compiled in-process
            assert model._compiled_step.status == model._compiled_prefill.status == "fallback"
            assert options or sum("packaging failed" in str(w.message) for w in refused) == 2  # both parts
    graphs = counters["stats"]["unique_graphs"]
    # Ragged batches of 3 at other lengths: the same compiled prefill (each compilation costs CI
    # ~20 s, so the batch and the cache stay the same; a new cache shape is a new compilation).
    for n in (2, 5, 9, 40):
        prompts = [[(7 * i + r) % 120 + 1 for i in range(m)] for r, m in enumerate((n, max(1, n // 2), n))]
        compiled = generate(model, prompts, 6, eos_token_id=[], pad_token_id=0, compile="all")
        assert torch.equal(compiled, generate(model, prompts, 6, eos_token_id=[], pad_token_id=0)), n
    # one prefill for every length, never one per length
    assert builds.count("prefill") == 1, builds  # (in-process: the one refused attempt)
    if packaged:
        # a second model of the same checkpoint (as in the next process) loads both libraries
        again = minillama.from_pretrained(path)
        assert torch.equal(generate(again, PROMPTS, 12, eos_token_id=[], pad_token_id=0, compile="all"),
                           generate(model, PROMPTS, 12, eos_token_id=[], pad_token_id=0))
        assert again._compiled_step.status == again._compiled_prefill.status == "loaded"
        assert builds.count("prefill") == 1
    else:
        assert counters["stats"]["unique_graphs"] == graphs


def test_compile_takes_true_false_decode_or_all(make_hf):
    from minillama.compiled import compile_parts

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_parts(True, cpu) == ("decode",) and compile_parts(True, cuda) == ("decode", "prefill")
    assert compile_parts("all", cpu) == ("decode", "prefill") and compile_parts(False, cuda) == ()
    assert compile_parts(None, cuda) == () and compile_parts("decode", cuda) == ("decode",)
    _, path = make_hf("llama")
    model = minillama.from_pretrained(path)
    for bad in ("yes", 1, 0, "prefill", "ALL"):
        with pytest.raises(GenerationError, match="compile must be"):
            generate(model, PROMPTS, 4, compile=bad)


@pytest.mark.slow
def test_explicit_graph_step_replays_static_buffers(make_hf):
    """CUDAGraphStep's logic on a CPU: inputs copied into static buffers, the step's output read from
    the static output that each replay overwrites, one capture per (batch, cache); same tokens."""
    from minillama.cudagraph import CUDAGraphStep

    captures = []

    def capture(run):  # a "graph" that replays by running the step again into the same output
        out = run()
        captures.append(out)
        return out, lambda: out.copy_(run())

    _, path = make_hf(COMPILED[0], **COMPILED[1])
    model = minillama.from_pretrained(path)
    step = CUDAGraphStep(model, capture=capture)
    for options in ({}, {"temperature": 0.9, "top_k": 20, "seed": 5}):
        eager = generate(model, PROMPTS, 12, eos_token_id=[], pad_token_id=0, **options)
        assert torch.equal(generate(model, PROMPTS, 12, eos_token_id=[], pad_token_id=0, step_fn=step, **options),
                           eager)
    assert len(captures) == 1
    long = [[i % 120 + 1 for i in range(300)]]  # the cache grows: a new capture
    assert torch.equal(generate(model, long, 6, eos_token_id=[], step_fn=step), generate(model, long, 6, eos_token_id=[]))
    assert len(captures) == 2 and len(step.graphs) == 1  # the old cache's graph is dropped with it
    # (around a torch.compile'd step, as bench_generate's minillama-compiled-cudagraph row runs it:
    # tests/test_cuda.py, with real graphs)


def test_sync_every_must_be_a_positive_integer(make_hf):
    _, path = make_hf("llama")
    model = minillama.from_pretrained(path)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(GenerationError, match="sync_every"):
            generate(model, PROMPTS, 4, sync_every=bad)


def test_stats_time_each_phase_apart(make_hf):
    from minillama.generate import GenerationStats

    _, path = make_hf("llama", num_key_value_heads=2)
    model = minillama.from_pretrained(path)
    stats = GenerationStats()
    out = generate(model, [PROMPTS[1]], 10, eos_token_id=[], stats=stats)
    assert stats.prompt_tokens == 7 and stats.new_tokens == 10 == out.shape[1] - 7
    assert stats.prefill_s > 0 and stats.warmup_s > 0 and stats.decode_s > 0
    assert stats.decode_tok_s == pytest.approx(8 / stats.decode_s) and stats.prefill_tok_s > 0
    one = GenerationStats()
    generate(model, [PROMPTS[1]], 1, eos_token_id=[], stats=one)
    assert one.new_tokens == 1 and one.warmup_s == 0 and one.decode_tok_s == 0


def test_tiny_temperature_is_greedy_not_noise(make_hf):
    _, path = make_hf("llama", num_key_value_heads=2)
    model = minillama.from_pretrained(path)
    greedy = generate(model, PROMPTS, 12, eos_token_id=[])
    for t in (1e-30, 1e-40, 5e-324):
        assert torch.equal(generate(model, PROMPTS, 12, temperature=t, seed=0, eos_token_id=[]), greedy), t
