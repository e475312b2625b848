"""Structured output: every output follows its JSON schema (library, CLI and server; greedy, sampled,
batched, streamed), the mask is exactly the grammar's, and bad schemas fail in one line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import jsonschema
import pytest
import torch

import minillama
from minillama.cli import main
from minillama.engine import Engine, Request
from minillama.errors import GenerationError
from minillama.generate import SamplingConfig, generate
from minillama.structured import Grammar, allowed_tokens, check_schema, mask_logits
from test_serve import NAME, Running

SCHEMAS = Path(__file__).resolve().parent.parent / "configs" / "schemas"
# For the random tiny model, whose strings would otherwise run on for hundreds of bytes: every string
# short, every count bounded. Nested objects, arrays, enums, required fields, integers and numbers.
TINY = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "level": {"enum": ["low", "mid", "high"]},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                                   "ok": {"type": "boolean"}},
                  "required": ["id", "ok"], "additionalProperties": False},
    },
    "required": ["name", "level", "owner"],
    "additionalProperties": False,
}
SMALL_ENUM = {"type": "object", "properties": {"x": {"enum": [1, 2, 3]}}, "required": ["x"],
              "additionalProperties": False}


def _texts(tokenizer, out: torch.Tensor, prompt_len: int) -> list[str]:
    return [tokenizer.decode(row[prompt_len:].tolist(), skip_special_tokens=True) for row in out]


@pytest.fixture(scope="module")
def tiny(tiny_chat_dir: Path):
    return minillama.from_pretrained(tiny_chat_dir, dtype="float32"), minillama.load_tokenizer(tiny_chat_dir)


def test_every_output_of_the_tiny_model_validates(tiny) -> None:
    model, tok = tiny
    prompts = [tok("a").input_ids, tok("bcd efg").input_ids, tok("hi").input_ids]  # different lengths: padded
    runs = [dict(), dict(temperature=1.0, seed=1), dict(temperature=1.0, seed=2, top_p=0.9),
            dict(temperature=0.7, seed=3, repetition_penalty=1.3)]
    texts, width = [], max(map(len, prompts))
    for options in runs:
        texts += _texts(tok, generate(model, prompts, 400, tokenizer=tok, json_schema=TINY, **options), width)
    for text in texts:
        jsonschema.validate(json.loads(text), TINY)
    assert len(set(texts)) > 4  # sampling still samples: the schema did not pin one answer
    # without the mask the same model writes no JSON at all (the test would catch a mask not applied)
    free = _texts(tok, generate(model, prompts, 60, tokenizer=tok), width)
    assert not any(t.startswith("{") for t in free)


def test_the_mask_allows_exactly_what_the_grammar_accepts(tiny) -> None:
    model, tok = tiny
    grammar = Grammar(SMALL_ENUM, tok, model.config.vocab_size, [tok.eos_token_id])
    state = grammar.state()
    for t in tok('{"x": ').input_ids:
        state.advance(t)
    allowed = allowed_tokens([state], model.config.vocab_size)[0]
    assert allowed.nonzero().flatten().tolist() == tok("123", add_special_tokens=False).input_ids
    logits = torch.zeros(2, model.config.vocab_size)
    mask_logits(logits, [None, state])
    assert logits[0].eq(0).all() and logits[1].isfinite().eq(allowed).all()
    # several rows at once (llguidance's thread pool): each row's mask as computed alone
    fresh, other = grammar.state(), Grammar(TINY, tok, model.config.vocab_size, [tok.eos_token_id]).state()
    for t in tok('{"').input_ids:
        other.advance(t)
    together = allowed_tokens([fresh, state, other], model.config.vocab_size)
    assert torch.equal(together, torch.cat([allowed_tokens([s], model.config.vocab_size) for s in (fresh, state, other)]))
    assert torch.equal(together[1], allowed) and not torch.equal(together[0], together[2])
    state.advance(tok("2").input_ids[0])
    state.advance(tok("}").input_ids[0])
    assert state.complete and state.stopped
    with pytest.raises(GenerationError, match="rejected"):
        state.advance(tok("x").input_ids[0])


@pytest.mark.parametrize("bad, message", [
    ({"type": "nonsense"}, "Invalid type"),
    ({"type": "object", "properties": {"a": {"$ref": "#/nope"}}}, "does not exist"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "Unsatisfiable"),
    ("{not json", "not valid JSON"),
    ([1, 2], "must be a JSON object"),
])
def test_invalid_schemas_fail_in_one_line(bad, message: str) -> None:
    with pytest.raises(GenerationError, match=message):
        check_schema(bad)


@pytest.mark.slow
def test_smollm2_fills_the_shipped_schemas_in_one_batch(smollm2) -> None:
    """Each request its own schema, greedy and sampled, decoded together by the serving engine."""
    tok, model = smollm2
    ids = tok.apply_chat_template([{"role": "user", "content": "Write one realistic example as JSON."}],
                                  add_generation_prompt=True, return_dict=True)["input_ids"]
    engine = Engine(model, tok, max_batch=4, max_seq_len=512)
    schemas = {p.stem: json.loads(p.read_text()) for p in sorted(SCHEMAS.glob("*.json"))}
    requests = []
    for k, (name, schema) in enumerate([*schemas.items(), ("person", schemas["person"])]):
        grammar = Grammar(schema, tok, model.config.vocab_size, sorted(engine.eos))
        sampling = SamplingConfig(temperature=0.8, seed=k) if k % 2 else SamplingConfig()
        requests.append((schema, Request(list(ids), 200, sampling, grammar=grammar)))
        engine.submit(requests[-1][1])
    try:
        while any(r.finished is None for _, r in requests):
            engine.step()
    finally:
        model.clear_cache()
    for schema, request in requests:
        assert request.finish_reason == "stop"
        jsonschema.validate(json.loads(tok.decode(request.tokens, skip_special_tokens=True)), schema)


def test_cli_json_schema(tiny_chat_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(TINY))
    assert main(["generate", "--model", str(tiny_chat_dir), "--prompt", "x", "-n", "400", "--json-schema",
                 str(schema), "--temperature", "1", "--seed", "5"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), TINY)
    assert main(["generate", "--model", str(tiny_chat_dir), "--prompt", "x", "-n", "3", "--json-schema",
                 str(schema)]) == 0
    assert "before its JSON was complete" in capsys.readouterr().err
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "bcd"}\n')
    assert main(["generate-batch", "--model", str(tiny_chat_dir), "--prompts", str(prompts), "--out", str(out),
                 "-n", "400", "--json-schema", str(schema), "--temperature", "1", "--seed", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        jsonschema.validate(json.loads(row["completion"]), TINY)
    capsys.readouterr()
    schema.write_text('{"type": "objekt"}')
    assert main(["generate", "--model", str(tiny_chat_dir), "--prompt", "x", "--json-schema", str(schema)]) != 0
    err = capsys.readouterr().err
    assert f"--json-schema {schema}: json_schema: Invalid type" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def server(tiny_chat_dir: Path):
    running = Running(tiny_chat_dir, max_batch=4, max_seq_len=1024)
    yield running
    running.stop()


def _format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}


def test_server_response_format(server: Running, tiny_chat_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="minillama.serve")
    messages = [{"role": "user", "content": "give me json"}]
    chat = server.client.chat.completions.create(model=NAME, messages=messages, max_tokens=400, temperature=1.0,
                                                 seed=3, n=3, response_format=_format(TINY))
    texts = [c.message.content for c in chat.choices]
    assert all(c.finish_reason == "stop" for c in chat.choices)
    streamed = server.client.chat.completions.create(model=NAME, messages=messages, max_tokens=400, temperature=1.0,
                                                     seed=4, stream=True, response_format=_format(TINY))
    texts.append("".join(c.choices[0].delta.content or "" for c in streamed if c.choices))
    completion = server.client.completions.create(model=NAME, prompt="json:", max_tokens=400, temperature=0,
                                                  extra_body={"response_format": _format(TINY)})
    texts.append(completion.choices[0].text)
    for text in texts:
        jsonschema.validate(json.loads(text), TINY)
    # a seeded request samples what the library samples with that seed (the mask is in the sampler)
    reference = minillama.from_pretrained(tiny_chat_dir, dtype="float32")  # the engine owns its model's cache
    ids = server.tokenizer("json:").input_ids
    out = generate(reference, [ids], 400, tokenizer=server.tokenizer, json_schema=TINY, temperature=1.0, seed=9)
    seeded = server.client.completions.create(model=NAME, prompt="json:", max_tokens=400, temperature=1.0, seed=9,
                                              extra_body={"response_format": _format(TINY)})
    assert seeded.choices[0].text == _texts(server.tokenizer, out, len(ids))[0]
    # any object: the random model's strings would run long, so a bias (applied with the mask) closes them
    close = {str(server.tokenizer(c, add_special_tokens=False).input_ids[0]): 8 for c in '"}'}
    anything = server.client.chat.completions.create(model=NAME, messages=messages, max_tokens=400, temperature=0,
                                                     logit_bias=close, response_format={"type": "json_object"})
    assert isinstance(json.loads(anything.choices[0].message.content), dict)
    cut = server.client.chat.completions.create(model=NAME, messages=messages, max_tokens=4,
                                                response_format=_format(TINY))
    assert cut.choices[0].finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(cut.choices[0].message.content)
    server.wait_idle(5)
    assert any("length (JSON incomplete)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("fmt, message", [
    (_format({"type": "nonsense"}), "Invalid type"),
    ({"type": "json_schema"}, "json_schema must be an object"),
    ({"type": "yaml"}, "response_format.type"),
])
def test_server_bad_response_format_is_a_400(server: Running, fmt: dict, message: str) -> None:
    response = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": "x"}], "response_format": fmt})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "response_format" and message in error["message"]
