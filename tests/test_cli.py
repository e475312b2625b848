"""The `minillama` command end to end on the embedded model, and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillama.cli import main

pytestmark = pytest.mark.slow


def test_console_script_answers_paris():
    exe = Path(sys.executable).with_name("minillama")
    out = subprocess.run([str(exe), "generate", "--prompt", "What is the capital of France?", "-n", "24"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_generate_from_stdin_with_system_and_stats(capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?"))
    assert main(["generate", "--system", "Answer in one sentence.", "-n", "24", "--stats"]) == 0
    out = capsys.readouterr()
    assert "Paris" in out.out and "prefill" in out.err and "load" in out.err and "tok/s" in out.err


def test_chat_keeps_the_conversation(capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\nAnd of Italy?\n/exit\n"))
    assert main(["chat", "-n", "24"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert "Paris" in lines[0] and "Rome" in lines[1]


def test_stop_string_and_sampling_flags(capsys):
    assert main(["generate", "--prompt", "What is the capital of France?", "-n", "24", "--stop", "Paris"]) == 0
    assert capsys.readouterr().out.strip().endswith("Paris")
    args = ["generate", "--prompt", "Name a colour.", "-n", "8", "--temperature", "0.9", "--top-k", "40",
            "--top-p", "0.9", "--min-p", "0.05", "--repetition-penalty", "1.1", "--seed", "7"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first  # same seed, same text


@pytest.fixture(scope="module")
def short_context_model(smollm2_dir, tmp_path_factory):
    """SmolLM2 with its context cut to 32 tokens (files linked, config edited)."""
    out = tmp_path_factory.mktemp("short")
    for f in smollm2_dir.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f)
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    cfg["max_position_embeddings"] = 32
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("argv,message", [
    (["--prompt", ""], "empty prompt"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["--prompt", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--prompt", "hi", "--top-k", "-1"], "top_k must be an integer >= 0"),
    (["--prompt", "hi", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["--prompt", "hi", "--model", "/no/such/model"], "/no/such/model: not a directory"),
    (["--prompt", "hi", "--device", f"cuda:{torch.cuda.device_count()}"], "not available"),  # one past the last GPU
    (["--prompt", "hi", "--norm", "nonorm"], "unknown norm 'nonorm'"),
    (["--prompt", "hi", "--top-k", "many"], "invalid int value: 'many'"),
    (["--prompt", "hi", "--compile", "prefill"], "invalid choice: 'prefill'"),
])
def test_bad_values_exit_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        sys.exit(main(["generate", *argv]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_prompt_longer_than_context(capsys, short_context_model):
    assert main(["generate", "--model", str(short_context_model), "--prompt", "word " * 40]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the model's context is 32" in err


def test_info_and_convert_errors(capsys, tmp_path):
    assert main(["info"]) == 0
    assert "134,515,008 parameters" in capsys.readouterr().out
    assert main(["convert-gguf", str(tmp_path / "x.gguf"), str(tmp_path / "out")]) == 2
    assert "x.gguf: no such GGUF file" in capsys.readouterr().err


def test_stats_line_names_each_phase_and_what_was_compiled():
    from minillama.cli import format_stats
    from minillama.generate import GenerationStats

    stats = GenerationStats(prompt_tokens=40, prefill_compile_s=0.31, prefill_s=0.05, warmup_s=0.4, decode_s=1.0,
                            new_tokens=12)
    line = format_stats(stats, 2.5, "loaded", "compiled")
    assert line == ("[load 2.50 s; prefill compile 0.31 s (compiled, and cached for the next run); prefill 40 tokens "
                    "in 0.05 s (800 tok/s); first decode step 0.40 s (loaded from the cache); 12 new tokens at "
                    "10.0 tok/s]")
    assert "prefill compile" not in format_stats(GenerationStats(prompt_tokens=3, prefill_s=0.1), None, False)
