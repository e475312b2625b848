"""What the norm kernels share: when to run Triton, the rounding helper, how rows are laid out."""

from __future__ import annotations

import contextlib
import functools
import os
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:  # triton is Linux-only; elsewhere every call takes the torch path
    triton = None
    tl = SimpleNamespace(constexpr=None)  # kernel annotations still evaluate

    def jit(fn):  # type: ignore[no-redef]
        return fn

# Triton reads TRITON_INTERPRET once, when it is imported (its own helpers such as tl.sum are
# built for one mode), so dispatch reads it once too.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Largest row chunk one program holds in registers; wider rows loop over chunks of this size.
MAX_BLOCK = 8192


# Without Triton, calls run plain torch code rather than the registered op: same numbers, and
# Inductor can fuse it with its neighbours (an opaque op costs a compiled CPU decode step ~20%).
# True routes them through the op's own torch implementation (for opcheck/compile checks on CPU).
CPU_THROUGH_OP = False


# Kernel launches by name: tests assert that Triton really ran (a silent torch fallback fails them).
LAUNCHES: Counter[str] = Counter()


def launch_guard(t: torch.Tensor, name: str) -> contextlib.AbstractContextManager:
    """Count a launch and make `t`'s GPU the current one for it: Triton launches on the current
    device, so a model on cuda:1 would otherwise run its kernels on cuda:0's stream."""
    LAUNCHES[name] += 1
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


# True sends every call down the torch path, on CUDA as on the CPU (tests compare the two paths
# on one device: patching INTERPRET alone would leave CUDA tensors on Triton). torch_path() sets it.
FORCE_TORCH = False


@contextlib.contextmanager
def torch_path():
    """Within the block every kernel call takes the torch implementation, whatever the device."""
    global FORCE_TORCH
    previous, FORCE_TORCH = FORCE_TORCH, True
    try:
        yield
    finally:
        FORCE_TORCH = previous


def use_triton(x: torch.Tensor) -> bool:
    """Triton on CUDA tensors, and on any tensor under the interpreter; torch otherwise, and always
    while FORCE_TORCH is set."""
    return triton is not None and not FORCE_TORCH and (x.is_cuda or INTERPRET)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will want gradients of a call on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def use_op(x: torch.Tensor) -> bool:
    """Whether a call takes the kernels' dispatch (where Triton runs): the torch.library op under
    torch.compile, the same implementation called directly in eager code."""
    return CPU_THROUGH_OP or use_triton(x)


@jit
def to_dtype(x, dtype: tl.constexpr):
    """fp32 -> dtype, rounding to nearest even as torch does.

    Compiled Triton already rounds so; the interpreter truncates fp32 -> bf16, so the rounding
    is done here on the bits (and the final conversion is then exact on both).
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@jit
def load_h(x_ptrs, r_ptrs, h_ptrs, mask, HAS_RES: tl.constexpr):
    """A tile of h = x (+ residual, rounded to h's dtype = promote(x, residual), stored there), in fp32."""
    h = tl.load(x_ptrs, mask=mask, other=0.0)
    if HAS_RES:
        h = to_dtype(h.to(tl.float32) + tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32),
                     h_ptrs.dtype.element_ty)
        tl.store(h_ptrs, h, mask=mask)
    return h.to(tl.float32)


def as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """View t as [rows, n] with unit column stride, copying only when that is impossible.

    Any row stride is kept (the kernels take it as an argument); a stride-0 last dimension, as an
    expanded gradient has, is copied since the kernels read columns contiguously.
    """
    t2 = t.reshape(-1, n)
    if t2.stride(-1) != 1 and n > 1:
        t2 = t2.contiguous()
    return t2


@dataclass(frozen=True)
class Launch:
    """How a kernel covers a [rows, n] tensor: tiles of `rows` x `block` (the whole row when `single`,
    else one row in chunks of `block`), with `num_warps` warps per program."""

    block: int
    rows: int
    single: bool
    num_warps: int


# A program (forward) or one step of a backward program's row loop should move tens of kilobytes:
# several short rows per tile, one long row alone, at 16 fp32 values per thread for each live
# array. The backward keeps about twice as many arrays live, so it takes half the tile (and half
# the warps): at 16 warps a thread may hold only 128 registers, and its LayerNorm spilled there
# (tests/test_kernels_sm90.py checks every variant with ptxas).
TILE_ELEMS = 8192
BWD_TILE_ELEMS = 4096


@functools.lru_cache(maxsize=None)
def launch_config(n: int, rows_hint: int, tile: int = TILE_ELEMS) -> Launch:
    """The tile for hidden size n when there are about `rows_hint` rows (cached: no per-call work).

    Decode (1 row) gets a one-row tile; rows_hint only matters below the tile's row count.
    """
    block = triton.next_power_of_2(n)
    if block > MAX_BLOCK:
        return Launch(MAX_BLOCK, 1, False, 16)
    rows = min(max(1, tile // block), triton.next_power_of_2(max(1, rows_hint)))
    return Launch(block, rows, True, max(1, min(16, rows * block // 512)))


def row_bucket(rows: int) -> int:
    """rows_hint for launch_config: exact up to the largest tile height, so the cache stays small."""
    return min(rows, TILE_ELEMS)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def bwd_grid(rows: int, cfg: Launch, device: torch.device) -> tuple[int, int]:
    """(programs, rows per program) for a backward pass: a persistent grid of two programs per SM
    (enough to hide latency; the dW partials to sum afterwards stay ~2-4% of the traffic), each
    owning a contiguous range of whole tiles and one row of dW partials."""
    tiles = -(-rows // cfg.rows)
    if device.type == "cuda":
        programs = max(1, min(tiles, 2 * _sm_count(device.index if device.index is not None else 0)))
    else:
        programs = max(1, min(tiles, 4))  # interpreter: few, long programs
    per_program = -(-tiles // programs) * cfg.rows
    return -(-rows // per_program), per_program


# Software pipelining of the backward's row loop (loads of the next tile overlap this one's math).
BWD_STAGES = 2
