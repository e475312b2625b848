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
                          env={**os.environ, "MINILLAMA_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})


def warmup_s(stderr: str) -> float:
    return float(re.search(r"first decode step ([\d.]+) s", stderr).group(1))


@pytest.mark.slow
def test_second_process_loads_the_compiled_step(tiny_chat_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    eager = run_cli(tiny_chat_dir, cache, "--dtype", "float32")
    first = run_cli(tiny_chat_dir, cache, "--dtype", "float32", "--compile")
    assert first.returncode == 0, first.stderr
    assert "(compiled, and cached for the next run)" in first.stderr
    assert first.stdout == eager.stdout  # fp32: the compiled step decodes the eager tokens
    second = run_cli(tiny_chat_dir, cache, "--dtype", "float32", "--compile")
    assert "first decode step" in second.stderr and "(loaded from the cache)" in second.stderr, second.stderr
    assert second.stdout == first.stdout
    assert warmup_s(second.stderr) < 5 and warmup_s(second.stderr) < warmup_s(first.stderr) / 3
    libraries = list((cache / "compiled").glob("decode-*.so"))
    assert len(libraries) == 1

    # --compile all adds the prefill (one library for every prompt length), cached the same way
    with_prefill = run_cli(tiny_chat_dir, cache, "--dtype", "float32", "--compile", "all")
    assert re.search(r"prefill compile [\d.]+ s \(compiled, and cached", with_prefill.stderr), with_prefill.stderr
    assert with_prefill.stdout == eager.stdout
    again = run_cli(tiny_chat_dir, cache, "--dtype", "float32", "--compile", "all")
    loaded = re.search(r"prefill compile ([\d.]+) s \(loaded from the cache\)", again.stderr)
    assert loaded and float(loaded.group(1)) < 5 and again.stdout == eager.stdout, again.stderr
    assert len(list((cache / "compiled").glob("prefill-*.so"))) == 1

    other_dtype = run_cli(tiny_chat_dir, cache, "--dtype", "bfloat16", "--compile")
    assert "(compiled, and cached for the next run)" in other_dtype.stderr  # a miss, not the fp32 library
    assert len(list((cache / "compiled").glob("decode-*.so"))) == 2

    libraries[0].write_bytes(b"not a shared library")  # damaged (e.g. a full disk): rebuilt, not fatal
    rebuilt = run_cli(tiny_chat_dir, cache, "--dtype", "float32", "--compile")
    assert rebuilt.returncode == 0 and "(compiled, and cached for the next run)" in rebuilt.stderr
    assert rebuilt.stdout == eager.stdout and "Traceback" not in rebuilt.stderr


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


def test_a_model_that_cannot_be_packaged_compiles_in_process(tiny_chat_dir: Path, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("MINILLAMA_CACHE", str(tmp_path))

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
