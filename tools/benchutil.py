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
