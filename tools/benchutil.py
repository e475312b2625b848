"""Timing helpers shared by the scripts in tools/ (imported as a sibling module)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


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
