"""The OpenAI-compatible server, through the real `openai` client and raw HTTP: results equal the
library's generate(), continuous batching changes no request's tokens, bad requests get OpenAI's
error shape, a client that leaves frees its row, SIGTERM lets in-flight streams finish."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest
import torch
import uvicorn

import minillama
from minillama.engine import Engine
from minillama.generate import generate
from minillama.serve import Server
from minillama.tokenizer import encode_prompt

NAME = "tiny"


class Running:
    """A server on its own thread, on a free port."""

    def __init__(self, model_dir: Path, **engine_options: Any) -> None:
        self.model = minillama.from_pretrained(model_dir, dtype="float32")
        self.tokenizer = minillama.load_tokenizer(model_dir)
        self.engine = Engine(self.model, self.tokenizer, **engine_options)
        app = Server(self.engine, NAME).app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def alone(self, ids: list[int], max_tokens: int, **options: Any) -> str:
        """What the library's generate() makes of these prompt ids (the reference)."""
        out = generate(self.model, [ids], max_tokens, **options)[0, len(ids):]
        return self.tokenizer.decode(out.tolist(), skip_special_tokens=True)

    def wait_idle(self, timeout: float = 10.0) -> None:
        deadline = time.time() + timeout
        while self.engine.running or self.engine.waiting:
            assert time.time() < deadline, "requests still running"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def server(tiny_chat_dir: Path) -> Iterator[Running]:
    running = Running(tiny_chat_dir, max_batch=4, max_queue=8, max_seq_len=1024)
    yield running
    running.stop()


def chat_ids(server: Running, content: str) -> list[int]:
    return encode_prompt(server.tokenizer, [{"role": "user", "content": content}])


def test_chat_and_completion_equal_generate(server: Running) -> None:
    r = server.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello there"}],
                                              temperature=0, max_tokens=24)
    ids = chat_ids(server, "Hello there")
    assert r.choices[0].message.content == server.alone(ids, 24)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 24, len(ids) + 24)
    assert r.object == "chat.completion" and r.model == NAME and r.id.startswith("chatcmpl-")

    r = server.client.completions.create(model=NAME, prompt="Once upon a time", temperature=0, max_tokens=17)
    ids = server.tokenizer("Once upon a time").input_ids
    assert r.choices[0].text == server.alone(ids, 17)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 17
    # token ids as the prompt, as OpenAI's API allows
    r2 = server.client.completions.create(model=NAME, prompt=ids, temperature=0, max_tokens=17)
    assert r2.choices[0].text == r.choices[0].text


def test_seeded_sampling_equals_generate(server: Running) -> None:
    options = dict(temperature=0.9, top_p=0.9, seed=7)
    r = server.client.completions.create(model=NAME, prompt="abc", max_tokens=20, extra_body={"top_k": 50},
                                         **options)
    ids = server.tokenizer("abc").input_ids
    assert r.choices[0].text == server.alone(ids, 20, top_k=50, **options)


def test_streaming_chunks_assemble_to_the_whole_text(server: Running) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}]
    whole = server.client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=40)
    chunks = list(server.client.chat.completions.create(model=NAME, messages=messages, temperature=0,
                                                        max_tokens=40, stream=True,
                                                        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens

    stream = server.client.completions.create(model=NAME, prompt="xyz", temperature=0, max_tokens=30, stream=True)
    pieces = list(stream)
    assert "".join(p.choices[0].text for p in pieces) == server.alone(server.tokenizer("xyz").input_ids, 30)
    assert pieces[-1].choices[0].finish_reason == "length"


def test_stop_strings_end_the_text_before_them(server: Running) -> None:
    ids = server.tokenizer("stop here").input_ids
    full = server.alone(ids, 60)
    stop = full[20:23]
    expected = full[:full.index(stop)]
    r = server.client.completions.create(model=NAME, prompt="stop here", temperature=0, max_tokens=60,
                                         stop=[stop, "never-there"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 60
    streamed = list(server.client.completions.create(model=NAME, prompt="stop here", temperature=0,
                                                     max_tokens=60, stop=stop, stream=True))
    assert "".join(p.choices[0].text for p in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_concurrent_requests_return_what_each_returns_alone(server: Running) -> None:
    # 6 requests, 4 rows: two wait and are admitted while the others decode.
    prompts = [("a", 50), ("bb bb", 9), ("the quick brown fox", 33), ("hello", 70), ("zz", 5), ("x y z w", 41)]
    expected = [server.alone(server.tokenizer(p).input_ids, n) for p, n in prompts]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        p, n = prompts[i]
        results[i] = server.client.completions.create(model=NAME, prompt=p, temperature=0, max_tokens=n).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results.get(i) for i in range(len(prompts))] == expected
    server.wait_idle()


def test_a_client_that_disconnects_frees_its_row(server: Running, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="minillama.serve")
    body = {"model": NAME, "prompt": "go on", "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            assert server.engine.running == 1
    server.wait_idle(5)  # far sooner than 1000 tokens would take
    record = next(r for r in caplog.records if "cancelled" in r.getMessage())
    assert "1000 new tokens" not in record.getMessage()
    # the row is usable again
    r = server.client.completions.create(model=NAME, prompt="again", temperature=0, max_tokens=5)
    assert r.choices[0].text == server.alone(server.tokenizer("again").input_ids, 5)


def _error(status: int, response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("body, status, param", [
    ({"n": 100}, 400, "n"),
    ({"best_of": 2}, 400, "best_of"),
    ({"model": "other"}, 404, "model"),
    ({"temperature": -1}, 400, "temperature"),
    ({"top_p": 1.5}, 400, "top_p"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": "many"}, 400, "max_tokens"),
    ({"stop": [""]}, 400, "stop"),
    ({"frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ({"logit_bias": {"x": 1}}, 400, "logit_bias"),
    ({"logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ({"unknown_field": 1}, 400, "unknown_field"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x" * 2000}]}, 400, "messages"),
    ({"max_tokens": 1020}, 400, "messages"),
])
def test_bad_requests_get_their_status_and_openai_error_shape(server: Running, body: dict, status: int,
                                                              param: str) -> None:
    request = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], **body}
    error = _error(status, httpx.post(f"{server.url}/v1/chat/completions", json=request, timeout=30))
    assert error["param"] == param
    if "x" * 2000 in json.dumps(body) or body.get("max_tokens") == 1020:
        assert error["code"] == "context_length_exceeded" and "1024" in error["message"]


def test_malformed_bodies_unknown_routes_and_the_client_errors(server: Running) -> None:
    r = httpx.post(f"{server.url}/v1/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    _error(400, r)
    _error(400, httpx.post(f"{server.url}/v1/completions", json={"model": NAME}, timeout=30))  # no prompt
    _error(400, httpx.post(f"{server.url}/v1/completions", json={"prompt": [5, 10**6]}, timeout=30))
    _error(400, httpx.post(f"{server.url}/v1/completions", json={"prompt": []}, timeout=30))
    _error(400, httpx.post(f"{server.url}/v1/completions", json={"prompt": [[5], [10**6]]}, timeout=30))
    _error(404, httpx.get(f"{server.url}/v1/nothing", timeout=30))
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="n must be in 1..4"):
        server.client.chat.completions.create(model=NAME, n=30, messages=[{"role": "user", "content": "hi"}])
    # after all that, requests still work
    models = server.client.models.list()
    assert [m.id for m in models.data] == [NAME] and server.client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        server.client.models.retrieve("gpt-4")
    assert httpx.get(f"{server.url}/health", timeout=30).json()["status"] == "ok"


def test_a_full_queue_answers_503(tiny_chat_dir: Path) -> None:
    running = Running(tiny_chat_dir, max_batch=1, max_queue=0, max_seq_len=4096)
    step, gate = running.model.forward, threading.Event()

    def held_step(*args: Any, **kwargs: Any) -> torch.Tensor:
        gate.wait(60)  # the engine holds the first request in its row until the second was refused
        return step(*args, **kwargs)

    running.model.forward = held_step
    try:
        first = threading.Thread(target=lambda: httpx.post(
            f"{running.url}/v1/completions", json={"model": NAME, "prompt": "long", "max_tokens": 50}, timeout=120))
        first.start()
        deadline = time.time() + 30
        while running.engine.rows.count(None):  # admitted: the one row is taken, its prefill held
            assert time.time() < deadline, "the first request never took the row"
            time.sleep(0.01)
        with httpx.Client(timeout=30) as http:
            error = _error(503, http.post(f"{running.url}/v1/completions",
                                          json={"model": NAME, "prompt": "x", "max_tokens": 2}))
            assert error["code"] == "queue_full"
        gate.set()
        first.join(60)
        running.wait_idle(5)
        assert running.client.completions.create(model=NAME, prompt="x", max_tokens=2).usage.completion_tokens == 2
    finally:
        gate.set()
        running.stop()


@pytest.mark.slow
def test_cli_serve_finishes_in_flight_streams_on_sigterm(tiny_chat_dir: Path) -> None:
    # --port 0: the server binds a free port itself and names it (no free-port guess that can collide)
    proc = subprocess.Popen([sys.executable, "-m", "minillama.cli", "serve", "--model", str(tiny_chat_dir),
                             "--port", "0", "--max-seq-len", "2048", "--dtype", "float32"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        startup = []
        while not (url := re.search(r" on (http://127\.0\.0\.1:[1-9]\d*)/v1 ", startup[-1] if startup else "")):
            startup.append(proc.stdout.readline())
            assert startup[-1], "".join(startup)  # the process ended before it served
        url = url.group(1)
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        body = {"model": tiny_chat_dir.name, "prompt": "a", "max_tokens": 1500, "temperature": 0, "stream": True}
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    if not events:
                        proc.send_signal(signal.SIGTERM)  # mid-stream
                    events.append(line[5:].strip())
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal once it has shut down gracefully: the usual "killed by SIGTERM" status
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        proc.kill()
        proc.wait()
    assert "Traceback" not in proc.stdout.read()


def test_engine_stops_at_eos_and_keeps_per_row_positions(tiny_chat_dir: Path) -> None:
    """Engine alone: an EOS id ends a request ("stop", not counted); rows at different lengths decode
    in one step exactly as they do alone."""
    from minillama.engine import Request
    from minillama.generate import SamplingConfig

    model = minillama.from_pretrained(tiny_chat_dir, dtype="float32")
    tok = minillama.load_tokenizer(tiny_chat_dir)
    prompts = [[5, 6, 7], list(range(40, 60)), [9]]
    alone = [generate(model, [p], 12, eos_token_id=[])[0, len(p):].tolist() for p in prompts]
    engine = Engine(model, tok, max_batch=2)
    engine.eos = {alone[1][4]}  # the second request meets "EOS" at its 5th token
    events: list[list[Any]] = [[] for _ in prompts]
    requests = [Request(p, 12, SamplingConfig(), on_event=events[i].append) for i, p in enumerate(prompts)]
    for r in requests:
        engine.submit(r)
    while engine.running or engine.waiting:
        engine.step()
    stop_at = alone[1].index(alone[1][4])
    assert requests[1].tokens == alone[1][:stop_at] and requests[1].finish_reason == "stop"
    for i in (0, 2):
        cut = next((j for j, t in enumerate(alone[i]) if t in engine.eos), 12)
        assert requests[i].tokens == alone[i][:cut]
    assert all(e[-1].finish_reason in ("stop", "length") for e in events)
    assert engine.running == 0 and engine.rows == [None, None]


def test_a_failing_request_fails_alone(server: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampling that raises for one request answers 500 for it; the server goes on serving."""
    import minillama.engine as engine_module

    real = engine_module.sample

    def broken(logits, cfg, generator):
        if cfg.top_k == 13:
            raise RuntimeError("probability tensor contains inf")
        return real(logits, cfg, generator)

    monkeypatch.setattr(engine_module, "sample", broken)
    error = _error(500, httpx.post(f"{server.url}/v1/completions", timeout=30,
                                   json={"prompt": "x", "max_tokens": 4, "top_k": 13}))
    assert "probability tensor" in error["message"] and error["type"] == "server_error"
    r = server.client.completions.create(model=NAME, prompt="fine", temperature=0, max_tokens=6)
    assert r.choices[0].text == server.alone(server.tokenizer("fine").input_ids, 6)


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(tiny_chat_dir: Path) -> None:
    """prefill_chunk: a long prompt enters the cache a chunk per step; the running request keeps
    getting tokens meanwhile, and both end as they do alone."""
    from minillama.engine import Request
    from minillama.generate import SamplingConfig

    model = minillama.from_pretrained(tiny_chat_dir, dtype="float32")
    tok = minillama.load_tokenizer(tiny_chat_dir)
    short, long = [5, 6, 7], [(i * 7) % 250 for i in range(300)]
    alone = [generate(model, [p], 20, eos_token_id=[])[0, len(p):].tolist() for p in (short, long)]
    engine = Engine(model, tok, max_batch=2, max_seq_len=512, prefill_chunk=64)
    engine.eos = set()
    order: list[str] = []
    first = Request(short, 20, SamplingConfig(), on_event=lambda e: order.append("short"))
    engine.submit(first)
    engine.step()
    second = Request(long, 20, SamplingConfig(), on_event=lambda e: order.append("long"))
    engine.submit(second)
    for _ in range(4):  # 300 tokens in chunks of 64: four steps without a first token
        engine.step()
        assert second.first_token is None and second._filled < len(long)
    while engine.running or engine.waiting:
        engine.step()
    assert first.tokens == alone[0] and second.tokens == alone[1]
    assert order.index("long") > 4  # the short request got text while the long prompt was prefilled


def test_a_port_in_use_is_one_line_before_loading(capsys: pytest.CaptureFixture) -> None:
    import socket

    from minillama.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), "--model", "/no/such/model"]) == 2  # the port is checked first
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}: Address already in use" in err, err
