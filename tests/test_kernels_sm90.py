"""Every kernel variant compiles for an H100 (sm_90) with Triton's own compiler and bundled ptxas.

The interpreter tests check the numbers; this checks that the same source is valid compiled
Triton (the interpreter accepts some code the compiler rejects), with no GPU needed.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

pytestmark = pytest.mark.slow

RMS = importlib.import_module("minillama.kernels.rms_norm")
LN = importlib.import_module("minillama.kernels.layer_norm")
SCALARS = {"eps": "fp32", "offset": "fp32"}


def _compile(kernel, pointers: dict[str, str], constexprs: dict[str, object]) -> None:
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        sig[name] = ("constexpr" if name in constexprs else pointers.get(name) or SCALARS.get(name, "i32"))
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]


@pytest.mark.parametrize("single", [True, False], ids=["one-block", "looped"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_kernels_compile_for_sm90(single, residual, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # really compile, never reuse a cached binary
    t = "*bf16"
    block = 4096 if single else 8192
    _compile(RMS._fwd_kernel, dict(X=t, R=t, W=t, Y=t, H=t, RSTD="*fp32"),
             dict(HAS_RES=residual, BLOCK=block, SINGLE=single))
    _compile(RMS._bwd_kernel, dict(DY=t, DH=t, H=t, W=t, RSTD="*fp32", DX=t, DR=t, DW="*fp32"),
             dict(HAS_DH=residual, STORE_DR=residual, BLOCK=block, SINGLE=single))
    for bias in (False, True):
        _compile(LN._fwd_kernel, dict(X=t, R=t, W=t, B=t, Y=t, H=t, MEAN="*fp32", RSTD="*fp32"),
                 dict(HAS_RES=residual, HAS_BIAS=bias, BLOCK=block, SINGLE=single))
        _compile(LN._bwd_kernel, dict(DY=t, DH=t, H=t, W=t, MEAN="*fp32", RSTD="*fp32", DX=t, DR=t, DW="*fp32",
                                      DB="*fp32"),
                 dict(HAS_DH=residual, STORE_DR=residual, HAS_BIAS=bias, BLOCK=block, SINGLE=single))
