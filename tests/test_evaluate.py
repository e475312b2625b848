"""lm-evaluation-harness on minillama (minillama/evaluate.py) and the server's logprobs: per-request
loglikelihoods equal lm-eval's own `hf` backend (transformers) on SmolLM2 and on tiny random Llama
and Mistral models, through our in-process backend and through `local-completions` against a
`minillama serve` process; the OpenAI logprobs fields through the real client; `minillama eval`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

import minillama  # noqa: E402
from minillama.evaluate import MinillamaLM, evaluate  # noqa: E402

from conftest import hf_config, randomize  # noqa: E402
from test_serve import NAME, Running  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MC = [json.loads(line) for line in (ROOT / "configs/eval/mc.jsonl").read_text().splitlines()]
HAMLET = [json.loads(line)["text"] for line in (ROOT / "configs/eval/hamlet.jsonl").read_text().splitlines()]


def mc_requests(n: int) -> list[Instance]:
    """The shipped multiple-choice task's first n questions, as lm-eval's task would ask them (plus an
    empty context, which lm-eval scores after the prefix token)."""
    out = [Instance("loglikelihood", {}, (f"Question: {d['question']}\nAnswer:", f" {c}"), i)
           for d in MC[:n] for i, c in enumerate(d["choices"])]
    return out + [Instance("loglikelihood", {}, ("", "Hello world"), 0)]


def rolling_requests(n: int, chars: int) -> list[Instance]:
    return [Instance("loglikelihood_rolling", {}, (text[:chars],), 0) for text in HAMLET[:n]]


def accuracy(scores: list[tuple[float, bool]], n: int) -> float:
    right = [max(range(4), key=lambda c: scores[4 * q + c][0]) == MC[q]["answer"] for q in range(n)]
    return sum(right) / n


def assert_same(ours: list[Any], theirs: list[Any], tol: float = 1e-4) -> None:
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        a, b = (a, b) if isinstance(a, tuple) else ((a, None), (b, None))
        assert abs(a[0] - b[0]) <= tol * max(1.0, abs(b[0])), (i, a, b)
        assert a[1] == b[1], (i, a, b)  # is_greedy


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random Llama and Mistral (a 16-token window, shorter than the prompts) with the byte tokenizer."""
    from minillama.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    dirs = {}
    for name, extra in (("llama", {}), ("mistral", {"sliding_window": 16})):
        cfg = hf_config(name, vocab_size=len(tok), max_position_embeddings=512, num_key_value_heads=2,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
        randomize(model, 0)
        dirs[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    return dirs


@pytest.mark.slow
def test_smollm2_scores_equal_lm_eval_hf_backend(smollm2, smollm2_hf, smollm2_dir: Path) -> None:
    tok, model = smollm2
    ours = MinillamaLM(model=model, tokenizer=tok, batch_size=8)
    theirs = HFLM(pretrained=smollm2_hf, tokenizer=minillama.load_tokenizer(smollm2_dir), batch_size=8, device="cpu")
    requests = mc_requests(12)
    a, b = ours.loglikelihood(requests), theirs.loglikelihood(requests)
    assert_same(a, b)
    assert accuracy(a, 12) == accuracy(b, 12) >= 0.5  # a real model knows these
    assert model.kv_cache is None  # the scoring cache is freed
    # rolling windows: a short max_length cuts each passage into several
    ours._max_length = theirs._max_length = 96
    rolling = rolling_requests(2, 900)
    assert_same(ours.loglikelihood_rolling(rolling), theirs.loglikelihood_rolling(rolling))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_tiny_models_score_as_lm_eval_hf_backend(family: str, tiny_dirs: dict[str, Path]) -> None:
    path = tiny_dirs[family]
    ours = MinillamaLM(str(path), dtype="float32", batch_size=5)
    theirs = HFLM(pretrained=str(path), dtype="float32", batch_size=5, device="cpu")
    requests = mc_requests(6)
    a = ours.loglikelihood(requests)
    assert_same(a, theirs.loglikelihood(requests))
    ours._max_length = theirs._max_length = 40
    rolling = rolling_requests(2, 150)
    assert_same(ours.loglikelihood_rolling(rolling), theirs.loglikelihood_rolling(rolling))


def test_generate_until_stops_where_the_task_says(tiny_dirs: dict[str, Path]) -> None:
    path = tiny_dirs["llama"]
    ours = MinillamaLM(str(path), dtype="float32", batch_size=2)
    theirs = HFLM(pretrained=str(path), dtype="float32", batch_size=2, device="cpu")
    requests = [Instance("generate_until", {}, (ctx, {"until": ["e"], "max_gen_toks": 12}), 0)
                for ctx in ("abc", "Question: hello\nAnswer:", "x")]
    got = ours.generate_until(requests)
    assert got == theirs.generate_until(requests)
    assert all("e" not in text for text in got)


@pytest.mark.slow
def test_local_completions_against_minillama_serve_equals_in_process(tiny_chat_dir: Path) -> None:
    """lm-eval's `local-completions` backend (its remote tokenizer over /tokenize) against a server process."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    proc = subprocess.Popen([sys.executable, "-m", "minillama.cli", "serve", "--model", str(tiny_chat_dir),
                             "--port", "0", "--dtype", "float32", "--max-seq-len", "1024"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        while not (m := re.search(r" on (http://127\.0\.0\.1:\d+)/v1 ", lines[-1] if lines else "")):
            lines.append(proc.stdout.readline())
            assert lines[-1], "".join(lines)
        api = LocalCompletionsAPI(base_url=f"{m.group(1)}/v1/completions", model=tiny_chat_dir.name,
                                  batch_size=3, max_length=1024)
        assert api.tokenizer_backend == "remote"
        requests = mc_requests(3)[:-1]
        ours = MinillamaLM(str(tiny_chat_dir), dtype="float32")
        assert_same(api.loglikelihood(requests), ours.loglikelihood(requests))
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(tiny_chat_dir: Path):
    running = Running(tiny_chat_dir, max_batch=4, max_seq_len=512, prefill_chunk=7)  # prompts span chunks
    yield running
    running.stop()


def test_chat_logprobs_are_the_model_log_softmax(server: Running) -> None:
    out = server.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi there"}],
                                                max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0])  # greedy: the chosen token is the likeliest
        assert entry.token == entry.top_logprobs[0].token


def test_echo_scores_the_prompt_as_the_model_does(server: Running) -> None:
    ids = server.tokenizer("the quick brown fox jumps").input_ids
    out = server.client.completions.create(model=NAME, prompt=ids, max_tokens=0, echo=True, logprobs=2)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == server.tokenizer.decode(ids) and out.usage.completion_tokens == 0
    with torch.no_grad():
        want = torch.log_softmax(server.model(torch.tensor([ids])).float()[0], -1)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = [float(want[i, t]) for i, t in enumerate(ids[1:])]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # several prompts: one choice each, in order; echo with a generated token appends its entry
    two = server.client.completions.create(model=NAME, prompt=[ids, ids[:3]], max_tokens=1, echo=True, logprobs=0,
                                           temperature=0)
    assert [c.index for c in two.choices] == [0, 1]
    assert len(two.choices[0].logprobs.token_logprobs) == len(ids) + 1
    assert two.choices[0].logprobs.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-4)


def test_streamed_logprobs_come_with_each_chunk(server: Running) -> None:
    stream = server.client.completions.create(model=NAME, prompt="abc", max_tokens=6, logprobs=1, temperature=0,
                                              stream=True)
    chunks = [c for c in stream if c.choices and c.choices[0].logprobs]
    assert sum(len(c.choices[0].logprobs.token_logprobs) for c in chunks) == 6
    whole = server.client.completions.create(model=NAME, prompt="abc", max_tokens=6, logprobs=1, temperature=0)
    streamed = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(whole.choices[0].logprobs.token_logprobs, abs=1e-5)
    chat = server.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                                 temperature=0, logprobs=True, stream=True)
    assert sum(len(c.choices[0].logprobs.content) for c in chat if c.choices and c.choices[0].logprobs) == 4


@pytest.mark.parametrize("body", [
    {"kind": "chat", "logprobs": True, "top_logprobs": 21},
    {"kind": "chat", "top_logprobs": 2},
    {"kind": "text", "logprobs": True},
    {"kind": "text", "logprobs": -1},
    {"kind": "text", "logprobs": 21},
    {"kind": "text", "echo": True},
    {"kind": "text", "max_tokens": 0},
    {"kind": "text", "top_logprobs": 2},
])
def test_bad_logprobs_requests_get_a_400(server: Running, body: dict[str, Any]) -> None:
    import httpx

    kind = body.pop("kind")
    if kind == "chat":
        url, base = "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}
    else:
        url, base = "/v1/completions", {"prompt": "x"}
    response = httpx.post(server.url + url, json={**base, "max_tokens": 2, **body}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


def test_tokenizer_endpoints(server: Running) -> None:
    import httpx

    ids = httpx.post(server.url + "/tokenize", json={"prompt": "hello", "add_special_tokens": False}).json()["tokens"]
    assert ids == server.tokenizer("hello", add_special_tokens=False).input_ids
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"] == "hello"
    assert httpx.get(server.url + "/tokenizer_info").json()["eos_token"] == server.tokenizer.eos_token
    assert httpx.post(server.url + "/detokenize", json={"tokens": [10 ** 9]}).status_code == 400


@pytest.mark.slow
def test_minillama_eval_writes_lm_eval_results(tiny_chat_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from minillama.cli import main

    monkeypatch.chdir(ROOT)  # the shipped task's data path is relative to the checkout
    out = tmp_path / "results"
    assert main(["eval", "--model", str(tiny_chat_dir), "--dtype", "float32", "--tasks", "minillama_mc",
                 "--include-path", "configs/eval", "--limit", "6", "--output-path", str(out)]) == 0
    assert "minillama_mc" in capsys.readouterr().out
    files = list(out.rglob("results_*.json"))
    assert len(files) == 1 and list(out.rglob("samples_minillama_mc_*.jsonl"))
    written = json.loads(files[0].read_text())["results"]["minillama_mc"]["acc,none"]
    direct = evaluate(MinillamaLM(str(tiny_chat_dir), dtype="float32"), ["minillama_mc"], limit=6,
                      include_path="configs/eval")
    assert written == direct["results"]["minillama_mc"]["acc,none"]
    scores = MinillamaLM(str(tiny_chat_dir), dtype="float32").loglikelihood(mc_requests(6)[:-1])
    assert written == accuracy(scores, 6)


@pytest.mark.slow
def test_minillama_eval_refuses_an_unknown_task_in_one_line(tiny_chat_dir: Path, capsys) -> None:
    from minillama.cli import main

    assert main(["eval", "--model", str(tiny_chat_dir), "--tasks", "no_such_task"]) == 2
    assert "unknown lm-eval task(s): no_such_task" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local-completions", "local-chat-completions"])
def test_generation_task_through_the_server_equals_in_process(server: Running, backend: str, tiny_chat_dir: Path,
                                                              monkeypatch) -> None:
    """The shipped generation task (minillama_qa) through lm-eval's API backends: the same answers as in-process."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)
    chat = backend == "local-chat-completions"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    tasks = TaskManager(include_path="configs/eval", include_defaults=False)
    args = f"base_url={server.url}{path},model={NAME}" + (",tokenizer_backend=None" if chat else "")
    common = {"tasks": ["minillama_qa"], "limit": 3, "task_manager": tasks, "log_samples": True,
              "apply_chat_template": chat}
    remote = lm_eval.simple_evaluate(model=backend, model_args=args, **common)
    local = lm_eval.simple_evaluate(model=MinillamaLM(str(tiny_chat_dir), dtype="float32"), **common)  # its own model:
    # the server's engine owns the KV cache of server.model
    answers = [[s["resps"] for s in r["samples"]["minillama_qa"]] for r in (remote, local)]
    assert answers[0] == answers[1] and any(a[0][0] for a in answers[0])
