"""OpenAI's sampling fields through the library's sampler: presence and frequency penalties over
the generated tokens, logit_bias, and the server's n choices (each seeded choice reproducible)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

import minillama
from minillama.generate import GenerationError, SamplingConfig, generate, process_logits
from test_serve import NAME, Running


def test_process_logits_matches_an_independent_reference() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 12)
    counts = torch.tensor([[0, 2, 0, 1, 0, 0, 0, 0, 3, 0, 0, 0], [1] + [0] * 11], dtype=torch.float32)
    cfg = SamplingConfig(presence_penalty=0.7, frequency_penalty=-0.3, logit_bias={4: 5.0, 8: -100})
    got = process_logits(logits, cfg, None, counts)
    want = logits.clone().tolist()
    for b in range(2):
        for v in range(12):
            want[b][v] += {4: 5.0, 8: -100.0}.get(v, 0.0)
            c = counts[b, v].item()
            want[b][v] -= -0.3 * c + (0.7 if c > 0 else 0.0)
    assert torch.allclose(got, torch.tensor(want), atol=1e-5)
    assert process_logits(logits, SamplingConfig(), None, counts).equal(logits)  # nothing asked: untouched


@pytest.mark.parametrize("bad", [{"presence_penalty": 2.5}, {"frequency_penalty": -3}, {"logit_bias": {1: 101}},
                                 {"logit_bias": {-1: 1.0}}, {"presence_penalty": True}])
def test_out_of_range_values_are_refused(bad: dict) -> None:
    with pytest.raises(GenerationError):
        SamplingConfig(**bad)


def test_generate_applies_them_as_a_step_by_step_reference_does(tiny_chat_dir: Path) -> None:
    model = minillama.from_pretrained(tiny_chat_dir, dtype="float32")
    prompt = [5, 6, 7, 8]
    options = dict(presence_penalty=0.5, frequency_penalty=1.5, logit_bias={9: 0.3})
    got = generate(model, [prompt], 10, eos_token_id=[], **options)[0, len(prompt):].tolist()
    ids, counts = list(prompt), {}
    with torch.no_grad():
        for _ in range(10):
            logits = model(torch.tensor([ids]))[0, -1].float().tolist()
            scores = [x + (0.3 if v == 9 else 0.0) - 1.5 * counts.get(v, 0) - (0.5 if v in counts else 0.0)
                      for v, x in enumerate(logits)]
            token = max(range(len(scores)), key=scores.__getitem__)
            counts[token] = counts.get(token, 0) + 1
            ids.append(token)
    assert got == ids[len(prompt):]
    plain = generate(model, [prompt], 10, eos_token_id=[])[0, len(prompt):].tolist()
    assert got != plain  # the penalties changed something
    with pytest.raises(GenerationError, match="logit_bias"):
        generate(model, [prompt], 2, logit_bias={10**6: 1.0})


@pytest.fixture(scope="module")
def server(tiny_chat_dir: Path):
    running = Running(tiny_chat_dir, max_batch=4, max_seq_len=512)
    yield running
    running.stop()


def test_server_penalties_bias_and_n(server: Running, tiny_chat_dir: Path) -> None:
    ids = server.tokenizer("hello").input_ids
    reference = minillama.from_pretrained(tiny_chat_dir, dtype="float32")  # the server's engine owns its model's cache
    out = server.client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0,
                                           frequency_penalty=1.5, presence_penalty=0.5)
    want = generate(reference, [ids], 8, eos_token_id=[], frequency_penalty=1.5, presence_penalty=0.5)
    assert out.choices[0].text == server.tokenizer.decode(want[0, len(ids):].tolist(), skip_special_tokens=True)
    a = server.tokenizer("A", add_special_tokens=False).input_ids[0]
    biased = server.client.completions.create(model=NAME, prompt=ids, max_tokens=5, temperature=0,
                                              logit_bias={str(a): 100})
    assert biased.choices[0].text == "AAAAA"
    three = server.client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=1.0, seed=7, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    for j, choice in enumerate(three.choices):
        alone = server.client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=1.0, seed=7 + j)
        assert choice.text == alone.choices[0].text
    assert len({c.text for c in three.choices}) > 1
    chat = server.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                                 max_tokens=3, n=2, temperature=1.0, seed=1)
    assert [c.index for c in chat.choices] == [0, 1]


@pytest.mark.parametrize("body", [{"n": 5}, {"n": 0}, {"logit_bias": {"65": 101}}, {"logit_bias": {"abc": 1}},
                                  {"logit_bias": {"1000000": 1}}, {"presence_penalty": 3},
                                  {"frequency_penalty": -2.5}])
def test_bad_sampling_fields_get_a_400(server: Running, body: dict) -> None:
    response = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, **body}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == next(iter(body))
