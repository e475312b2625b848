"""What the norm kernels share: when to run Triton, the rounding helper, how rows are laid out."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
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


def use_triton(x: torch.Tensor) -> bool:
    """Triton on CUDA tensors, and on any tensor under the interpreter; torch otherwise."""
    return triton is not None and (x.is_cuda or INTERPRET)


def use_op(x: torch.Tensor) -> bool:
    """Whether a call goes through the registered torch.library op (always, where Triton runs)."""
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
def load_h(X, R, H, cols, mask, HAS_RES: tl.constexpr):
    """One chunk of h = x (+ residual, rounded to H's dtype = promote(x, residual), stored there) in fp32."""
    h = tl.load(X + cols, mask=mask, other=0.0)
    if HAS_RES:
        h = to_dtype(h.to(tl.float32) + tl.load(R + cols, mask=mask, other=0.0).to(tl.float32), H.dtype.element_ty)
        tl.store(H + cols, h, mask=mask)
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


def block_size(n: int) -> tuple[int, bool]:
    """(BLOCK, SINGLE): one register-resident block when the row fits, else a loop of MAX_BLOCK chunks."""
    block = triton.next_power_of_2(n)
    return (block, True) if block <= MAX_BLOCK else (MAX_BLOCK, False)


def num_warps(block: int) -> int:
    return max(1, min(16, block // 256))


def bwd_programs(rows: int, device: torch.device) -> int:
    """Programs for the backward pass; each owns a contiguous range of rows and one dW partial row."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 4))  # interpreter: few, long programs
