"""Every kernel variant compiles for an H100/H200 (sm_90) with Triton's own compiler and bundled ptxas,
in the launch configurations the dispatcher picks, without spilling registers.

The interpreter tests check the numbers; this checks that the same source is valid compiled
Triton (the interpreter accepts some code the compiler rejects) and that no variant spills (a
spill turns a bandwidth-bound kernel into a local-memory-bound one), with no GPU needed.
`pytest -s tests/test_kernels_sm90.py` prints the registers per thread of each variant.
"""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from minillama.kernels import _common  # noqa: E402

pytestmark = pytest.mark.slow

RMS = importlib.import_module("minillama.kernels.rms_norm")
LN = importlib.import_module("minillama.kernels.layer_norm")
SCALARS = {"eps": "fp32", "offset": "fp32"}
# Triton bundles ptxas builds for several PTX versions; the newest reads what this Triton emits.
PTXAS = sorted((Path(triton.__file__).parent / "backends" / "nvidia" / "bin").glob("ptxas*"), reverse=True)
# Hidden sizes of real models (SmolLM2 576 ... Llama-3-70B 8192, wider for the looped path) x a
# decode step (1 row) and a large batch (8192 rows).
HIDDEN_SIZES = (64, 576, 1024, 2048, 4096, 8192, 16384)
ROW_COUNTS = (1, 8192)
L = _common.Launch
# Every distinct configuration the dispatcher should pick for them, worked out by hand from the rule
# in kernels/_common.py (launch_config): block = next_pow2(n) up to 8192 (576 -> 1024), else looped
# rows in 8192 chunks with 16 warps; rows per tile = min(tile // block, next_pow2(rows)), at least 1,
# tile = 8192 elements forward, 4096 backward; warps = rows * block / 512, clamped to 1..16.
CONFIGS = [
    ("bwd", L(64, 1, True, 1)),       # n 64, 1 row: 64 / 512 -> at least 1 warp
    ("bwd", L(64, 64, True, 8)),      # n 64, 8192 rows: 4096 / 64 = 64 rows, 4096 / 512 = 8 warps
    ("bwd", L(1024, 1, True, 2)),     # n 576 or 1024, 1 row: 1024 / 512 = 2 warps
    ("bwd", L(1024, 4, True, 8)),     # n 576 or 1024, 8192 rows: 4096 / 1024 = 4 rows
    ("bwd", L(2048, 1, True, 4)),     # n 2048, 1 row
    ("bwd", L(2048, 2, True, 8)),     # n 2048, 8192 rows: 4096 / 2048 = 2 rows
    ("bwd", L(4096, 1, True, 8)),     # n 4096, 1 row or 8192 rows (4096 / 4096 = 1 row either way)
    ("bwd", L(8192, 1, True, 16)),    # n 8192: 4096 // 8192 = 0 -> 1 row; 8192 / 512 = 16 warps
    ("bwd", L(8192, 1, False, 16)),   # n 16384 > 8192: looped
    ("fwd", L(64, 1, True, 1)),       # n 64, 1 row
    ("fwd", L(64, 128, True, 16)),    # n 64, 8192 rows: 8192 / 64 = 128 rows, 8192 / 512 = 16 warps
    ("fwd", L(1024, 1, True, 2)),     # n 576 or 1024, 1 row
    ("fwd", L(1024, 8, True, 16)),    # n 576 or 1024, 8192 rows: 8 rows
    ("fwd", L(2048, 1, True, 4)),
    ("fwd", L(2048, 4, True, 16)),
    ("fwd", L(4096, 1, True, 8)),
    ("fwd", L(4096, 2, True, 16)),
    ("fwd", L(8192, 1, True, 16)),    # n 8192, 1 row or 8192 rows
    ("fwd", L(8192, 1, False, 16)),   # n 16384: looped
]
# q/k norms (Qwen3, Gemma 3) run on rows of head_dim: 64, 128 or 256, one token's heads (16 rows)
# in a decode step, 8192 in a prefill. Only RMSNorm runs there, so only its kernels are compiled.
HEAD_DIMS = (64, 128, 256)
HEAD_ROWS = (1, 16, 8192)
QK_CONFIGS = [
    ("fwd", L(64, 16, True, 2)), ("fwd", L(128, 1, True, 1)), ("fwd", L(128, 16, True, 4)),
    ("fwd", L(128, 64, True, 16)), ("fwd", L(256, 1, True, 1)), ("fwd", L(256, 16, True, 8)),
    ("fwd", L(256, 32, True, 16)),
    ("bwd", L(64, 16, True, 2)), ("bwd", L(128, 1, True, 1)), ("bwd", L(128, 16, True, 4)),
    ("bwd", L(128, 32, True, 8)), ("bwd", L(256, 1, True, 1)), ("bwd", L(256, 16, True, 8)),
]


def test_configs_are_the_dispatchers_choices():
    """The list compiled below is exactly what launch_config picks for those sizes (no variant the
    dispatcher can reach goes uncompiled, and none is compiled that it never picks)."""
    picked = {(direction, _common.launch_config(n, _common.row_bucket(m), tile))
              for direction, tile in (("fwd", _common.TILE_ELEMS), ("bwd", _common.BWD_TILE_ELEMS))
              for n in HIDDEN_SIZES for m in ROW_COUNTS}
    assert len(set(CONFIGS)) == len(CONFIGS)
    listed = set(CONFIGS)
    assert picked == listed, (sorted(picked - listed, key=str), sorted(listed - picked, key=str))
    picked_qk = {(direction, _common.launch_config(n, _common.row_bucket(m), tile))
                 for direction, tile in (("fwd", _common.TILE_ELEMS), ("bwd", _common.BWD_TILE_ELEMS))
                 for n in HEAD_DIMS for m in HEAD_ROWS} - listed
    assert picked_qk == set(QK_CONFIGS) and len(QK_CONFIGS) == len(set(QK_CONFIGS)), sorted(picked_qk, key=str)


def _compile(kernel, pointers: dict[str, str], constexprs: dict[str, object], num_warps: int,
             tmp: Path) -> tuple[int, int]:
    """Compile for sm_90; (registers per thread, bytes spilled) from `ptxas -v` on the generated PTX."""
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        sig[name] = ("constexpr" if name in constexprs else pointers.get(name) or SCALARS.get(name, "i32"))
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert compiled.asm["cubin"]
    ptx = tmp / "kernel.ptx"
    ptx.write_text(compiled.asm["ptx"])
    for ptxas in PTXAS:
        run = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(tmp / "k.cubin")],
                             capture_output=True, text=True)
        if run.returncode == 0:
            break
    assert run.returncode == 0, run.stderr
    report = run.stderr
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return regs, spills


@pytest.mark.parametrize("direction,cfg", CONFIGS, ids=lambda c: c if isinstance(c, str) else (
    f"{'one' if c.single else 'looped'}-b{c.block}-r{c.rows}-w{c.num_warps}"))
def test_kernels_compile_for_sm90_without_spills(direction, cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # really compile, never reuse a cached binary
    t = "*bf16"
    shape = dict(BLOCK=cfg.block, ROWS=cfg.rows, SINGLE=cfg.single)
    stages = dict(STAGES=_common.BWD_STAGES)
    variants = {}
    for residual in (False, True):
        # Gemma's fp32 gain drops a rounding (fewer live values): compiled where registers are
        # tightest, the widest tiles and the looped rows, with the residual.
        gains = (False, True) if residual and cfg.block >= 4096 else (False,)
        variants.update(_rms_variants(direction, cfg, residual, gains, tmp_path))
        if direction == "fwd":
            variants[f"ln res={residual}"] = _compile(
                LN._fwd_kernel, dict(X=t, R=t, W=t, B=t, Y=t, H=t, MEAN="*fp32", RSTD="*fp32"),
                dict(HAS_RES=residual, HAS_BIAS=True, **shape), cfg.num_warps, tmp_path)
        else:
            variants[f"ln res={residual}"] = _compile(
                LN._bwd_kernel, dict(DY=t, DH=t, H=t, W=t, MEAN="*fp32", RSTD="*fp32", DX=t, DR=t, DW="*fp32",
                                     DB="*fp32"),
                dict(HAS_DH=residual, STORE_DR=residual, HAS_BIAS=True, **shape, **stages), cfg.num_warps,
                tmp_path)
    _report(direction, cfg, variants)


def _rms_variants(direction: str, cfg: _common.Launch, residual: bool, gains: tuple[bool, ...],
                  tmp: Path) -> dict[str, tuple[int, int]]:
    """The RMSNorm kernels in both gain orders asked for (FP32_GAIN: Gemma's and OLMo 2's)."""
    t = "*bf16"
    shape = dict(BLOCK=cfg.block, ROWS=cfg.rows, SINGLE=cfg.single)
    out = {}
    for fp32_gain in gains:
        name = f"rms res={residual} fp32_gain={fp32_gain}"
        if direction == "fwd":
            out[name] = _compile(RMS._fwd_kernel, dict(X=t, R=t, W=t, Y=t, H=t, RSTD="*fp32"),
                                 dict(HAS_RES=residual, FP32_GAIN=fp32_gain, **shape), cfg.num_warps, tmp)
        else:
            out[name] = _compile(RMS._bwd_kernel, dict(DY=t, DH=t, H=t, W=t, RSTD="*fp32", DX=t, DR=t, DW="*fp32"),
                                 dict(HAS_DH=residual, STORE_DR=residual, FP32_GAIN=fp32_gain, **shape,
                                      STAGES=_common.BWD_STAGES), cfg.num_warps, tmp)
    return out


def _report(direction: str, cfg: _common.Launch, variants: dict[str, tuple[int, int]]) -> None:
    print(f"\n{direction} {cfg}: " + ", ".join(f"{k} {r} regs" for k, (r, _) in variants.items()))
    spilling = {k: s for k, (_, s) in variants.items() if s}
    assert not spilling, f"{direction} {cfg}: register spills (bytes) {spilling}"


@pytest.mark.parametrize("direction,cfg", QK_CONFIGS, ids=lambda c: c if isinstance(c, str) else (
    f"b{c.block}-r{c.rows}-w{c.num_warps}"))
def test_qk_norm_kernels_compile_for_sm90_without_spills(direction, cfg, tmp_path, monkeypatch):
    """q/k norms: no residual, both gain orders (Qwen3 casts first, Gemma 3 multiplies in fp32)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    _report(direction, cfg, _rms_variants(direction, cfg, False, (False, True), tmp_path))
