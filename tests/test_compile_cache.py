"""Compiled decode steps cached across processes (minillama/aot.py): the second process loads what
the first compiled, a different model/dtype/shape never reuses it, a damaged file is rebuilt, and
a model that cannot be packaged still compiles in-process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minillama
from minillama import aot
from minillama.generate import generate


def run_cli(model_dir: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "minillama.cli", "generate", "--model", str(model_dir), "-p", "hello", "-n", "12",
           "--no-chat", "--stats", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MINILLAMA_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
                               "MINILLAMA_COMPILE_CACHE": str(cache / "compiled")})


def stats_note(stderr: str, part: str) -> str:
    """What the --stats line says of the compiled decode step / prefill: compiled, or loaded."""
    label = "first decode step" if part == "decode" else "prefill compile"
    found = re.search(rf"{label} [\d.]+ s \((compiled, and cached for the next run|loaded from the cache)\)", stderr)
    assert found, stderr
    return "loaded" if found.group(1).startswith("loaded") else "compiled"


@pytest.mark.slow
def test_second_process_loads_the_compiled_step(tiny_chat_dir: Path, tmp_path: Path, capsys) -> None:
    """Each process is a real start (~5 s) and each compilation ~20 s: two processes, two builds."""
    from minillama.cli import main

    assert main(["generate", "--model", str(tiny_chat_dir), "-p", "hello", "-n", "12", "--no-chat",
                 "--dtype", "float32"]) == 0
    eager = capsys.readouterr().out
    cache = tmp_path / "cache"
    # --compile all: the decode step and the prefill (one library for every prompt length)
    first = run_cli(tiny_chat_dir, cache, "--dtype", "float32", "--compile", "all")
    assert first.returncode == 0, first.stderr
    assert stats_note(first.stderr, "decode") == stats_note(first.stderr, "prefill") == "compiled"
    assert first.stdout == eager  # fp32: the compiled step decodes the eager tokens
    decode, prefill = (list((cache / "compiled").glob(f"{kind}-*.so")) for kind in ("decode", "prefill"))
    assert len(decode) == len(prefill) == 1

    # the second process loads what the first compiled (the cache's status, not a wall-clock
    # threshold: timings belong in tools/bench_generate.py)
    second = run_cli(tiny_chat_dir, cache, "--dtype", "float32", "--compile", "all")
    assert second.returncode == 0 and "Traceback" not in second.stderr, second.stderr
    assert stats_note(second.stderr, "decode") == stats_note(second.stderr, "prefill") == "loaded"
    assert second.stdout == eager
    assert len(list((cache / "compiled").glob("*.so"))) == 2
    # (another dtype, batch or cache shape is another key: test_the_key_follows_weights_dtype_and_cache_shape)


def test_the_key_follows_weights_dtype_and_cache_shape(tiny_chat_dir: Path) -> None:
    model = minillama.from_pretrained(tiny_chat_dir, dtype="float32", prepack=False)
    model.setup_cache(1, 256)
    key = aot.step_key(model, 1)
    again = minillama.from_pretrained(tiny_chat_dir, dtype="float32", prepack=False)
    again.setup_cache(1, 256)
    assert aot.step_key(again, 1) == key  # the same checkpoint in another process: a hit
    assert aot.step_key(model, 2) != key
    model.setup_cache(2, 256)
    assert aot.step_key(model, 1) != key
    model.setup_cache(1, 512)
    assert aot.step_key(model, 1) != key
    model.setup_cache(1, 256)
    with torch.no_grad():
        model.layers[0].mlp.w_down.weight[0, 0] += 1e-3  # a changed weight: frozen constants would be stale
    assert aot.step_key(model, 1) != key
    bf16 = minillama.from_pretrained(tiny_chat_dir, dtype="bfloat16", prepack=False)
    bf16.setup_cache(1, 256)
    assert aot.step_key(bf16, 1) != key


@pytest.mark.slow
def test_a_model_that_cannot_be_packaged_compiles_in_process(tiny_chat_dir: Path, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("MINILLAMA_COMPILE_CACHE", str(tmp_path))  # empty: the step must be built

    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(aot, "build_library", refuse)
    model = minillama.from_pretrained(tiny_chat_dir, dtype="float32")
    prompts = [[1, 2, 3, 4], [5, 6]]
    eager = generate(model, prompts, 8, eos_token_id=[], pad_token_id=0)
    with pytest.warns(UserWarning, match="packaging failed .*unsupported operator.*in-process"):
        compiled = generate(model, prompts, 8, eos_token_id=[], pad_token_id=0, compile=True)
    assert torch.equal(compiled, eager) and model._compiled_step.status == "fallback"


def test_packaged_steps_only_where_they_apply(tiny_chat_dir: Path, monkeypatch) -> None:
    model = minillama.from_pretrained(tiny_chat_dir, dtype="float32")
    assert aot.supported(model)
    monkeypatch.setenv("MINILLAMA_AOT", "0")
    assert not aot.supported(model)


def test_a_damaged_library_is_rebuilt_not_fatal(tiny_chat_dir: Path, monkeypatch, tmp_path, caplog) -> None:
    """A library that does not load (a full disk, a crash mid-write elsewhere) is compiled again.
    The build and the loader stand in for AOTInductor here: the real ones are the test above's."""
    monkeypatch.setenv("MINILLAMA_COMPILE_CACHE", str(tmp_path))
    model = minillama.from_pretrained(tiny_chat_dir, dtype="float32")
    model.setup_cache(1, 64)
    step = aot.PackagedStep(model, fallback=lambda: pytest.fail("no fallback: the library is rebuilt"))
    path = tmp_path / f"decode-{aot.step_key(model, 1)}.so"
    path.write_bytes(b"not a shared library")
    built = []

    class Runner:
        def __init__(self, file: str, _threads: int) -> None:
            if Path(file).read_bytes() != b"compiled":
                raise RuntimeError("invalid ELF header")

    monkeypatch.setattr(aot, "build_library", lambda model, out, example, kind: built.append(out) or
                        out.write_bytes(b"compiled"))
    monkeypatch.setattr(aot, "_runtime", lambda: type("Runtime", (), {"AOTIModelContainerRunnerCpu": Runner}))
    example = (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
               torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 64, dtype=torch.long))
    with caplog.at_level("WARNING"):
        assert isinstance(step.prepare(*example), Runner)
    assert built == [path] and step.status == "compiled" and "cannot load" in caplog.text
    again = aot.PackagedStep(model, fallback=lambda: pytest.fail("no fallback"))
    assert isinstance(again.prepare(*example), Runner) and again.status == "loaded" and built == [path]
