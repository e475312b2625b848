"""Compiled decode steps cached across processes (minillama/aot.py): the second process loads what
the first compiled, a different model/dtype/shape never reuses it, a damaged file is rebuilt, and
processes compiling the same step build it once. (A model that cannot be packaged compiles
in-process: test_generate.py's test_compiled_prefill_is_one_compilation_for_every_prompt_length.)"""

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
def test_second_process_loads_the_compiled_step(tiny_chat_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """The first run compiles (in this process, ~15 s), a second process loads its library. The
    decode step only: a prefill library is cached the same way, and its reuse by a second model is
    test_generate.py's test_compiled_prefill_is_one_compilation_for_every_prompt_length[aot]."""
    from minillama.cli import main

    common = ["generate", "--model", str(tiny_chat_dir), "-p", "hello", "-n", "12", "--no-chat", "--dtype", "float32"]
    assert main(common) == 0
    eager = capsys.readouterr().out
    cache = tmp_path / "cache"
    monkeypatch.setenv("MINILLAMA_COMPILE_CACHE", str(cache / "compiled"))
    assert main([*common, "--stats", "--compile"]) == 0
    first = capsys.readouterr()
    assert stats_note(first.err, "decode") == "compiled"
    assert first.out == eager  # fp32: the compiled step decodes the eager tokens
    assert len(list((cache / "compiled").glob("decode-*.so"))) == 1

    # a second process loads what the first compiled (the cache's status, not a wall-clock
    # threshold: timings belong in tools/bench_generate.py)
    second = run_cli(tiny_chat_dir, cache, "--dtype", "float32", "--compile")
    assert second.returncode == 0 and "Traceback" not in second.stderr, second.stderr
    assert stats_note(second.stderr, "decode") == "loaded"
    assert second.stdout == eager
    assert len(list((cache / "compiled").glob("*.so"))) == 1
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


def test_processes_compiling_the_same_step_build_it_once(tiny_chat_dir: Path, monkeypatch, tmp_path) -> None:
    """Two steps preparing the same key at once (the ranks of a launch, a server and a CLI): one
    builds, the other waits on the key's lock and loads the library. Stand-ins as above."""
    import threading
    import time

    monkeypatch.setenv("MINILLAMA_COMPILE_CACHE", str(tmp_path))
    model = minillama.from_pretrained(tiny_chat_dir, dtype="float32")
    model.setup_cache(1, 64)
    built = []

    def slow_build(model, out, example, kind):
        built.append(out)
        time.sleep(0.5)  # long enough that the second step arrives while the first builds
        out.write_bytes(b"compiled")

    class Runner:
        def __init__(self, file: str, _threads: int) -> None:
            assert Path(file).read_bytes() == b"compiled"

    monkeypatch.setattr(aot, "build_library", slow_build)
    monkeypatch.setattr(aot, "_runtime", lambda: type("Runtime", (), {"AOTIModelContainerRunnerCpu": Runner}))
    example = (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
               torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 64, dtype=torch.long))
    steps = [aot.PackagedStep(model, fallback=lambda: pytest.fail("no fallback")) for _ in range(2)]
    threads = [threading.Thread(target=step.prepare, args=example) for step in steps]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert len(built) == 1 and sorted(s.status for s in steps) == ["compiled", "loaded"]
