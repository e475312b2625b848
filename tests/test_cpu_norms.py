"""The CPU norm kernels (kernels/csrc/cpu_norms.cpp): bit for bit the torch formula they replace
(transformers' numerics), near fp64, taken where they apply, and a clean fallback where they
cannot be built."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from minillama.kernels import _common, cpu, layer_norm, rms_norm
from minillama.kernels.layer_norm import _fwd_torch as layer_torch
from minillama.kernels.rms_norm import _fwd_torch as rms_torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WIDTHS = [64, 576, 2048, 5120, 7, 1001]
# (offset, fp32_gain): Llama, Gemma (1 + w, fp32 gain), OLMo 2 (fp32 gain), and the offset with
# Llama's cast order (a swapped norm on a Gemma checkpoint).
GAINS = [(0.0, False), (1.0, True), (0.0, True), (1.0, False)]

pytestmark = pytest.mark.skipif(cpu.load() is None, reason="no C++ toolchain: the fallback test covers this")


def _inputs(rows: int, n: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + n)
    x = (3 * torch.randn(rows, n, generator=gen)).to(dtype)
    res = torch.randn(rows, n, generator=gen).to(dtype)
    w = (1 + 0.3 * torch.randn(n, generator=gen)).to(dtype)
    return x, res, w


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("gain", GAINS, ids=["llama", "gemma", "olmo2", "offset-cast"])
def test_rms_norm_matches_the_torch_formula_and_fp64(dtype, n, gain):
    offset, fp32_gain = gain
    x, res, w = _inputs(33, n, dtype)
    if offset:
        w = (w.float() - 1).to(dtype)
    with torch.no_grad():
        before = cpu.CALLS["rms_norm"]
        y = rms_norm(x, w, 1e-6, offset=offset, fp32_gain=fp32_gain)
        y2, h = rms_norm(x, w, 1e-6, residual=res, offset=offset, fp32_gain=fp32_gain)
        assert cpu.CALLS["rms_norm"] == before + 2  # the kernels ran, not the torch code
        want, _, _ = rms_torch(x, w, None, 1e-6, offset, fp32_gain)
        want2, want_h, _ = rms_torch(x, w, res, 1e-6, offset, fp32_gain)
    assert torch.equal(y, want) and torch.equal(y2, want2)  # torch's summation order replayed
    assert torch.equal(h, want_h)  # the residual sum rounds as `x + residual` does
    # fp64 reference: the output's own rounding (and the normalised value's, in Llama's order)
    h64 = h.double()
    ref = h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-6) * (w.double() + offset)
    tol = 2 * torch.finfo(dtype).eps * (1 + (w.double() + offset).abs().max())
    assert ((y2.double() - ref).abs() / ref.abs().clamp_min(1e-3)).max() < tol * 4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [64, 576, 2048, 1001])
def test_layer_norm_matches_the_torch_formula(dtype, n):
    x, res, w = _inputs(17, n, dtype, seed=1)
    b = (0.1 * torch.randn(n, generator=torch.Generator().manual_seed(2))).to(dtype)
    with torch.no_grad():
        before = cpu.CALLS["layer_norm"]
        y, h = layer_norm(x, w, b, 1e-5, residual=res)
        y1 = layer_norm(x, w, None, 1e-5)
        assert cpu.CALLS["layer_norm"] == before + 2
        want, want_h, _, _ = layer_torch(x, w, b, res, 1e-5)
        want1, _, _, _ = layer_torch(x, w, None, None, 1e-5)
    assert torch.equal(h, want_h) and torch.equal(y, want) and torch.equal(y1, want1)


def test_strided_rows_mixed_weight_and_unsupported_dtypes_fall_back_or_match():
    base = torch.randn(6, 3, 800).to(torch.bfloat16)
    x = base[:, 1, :576]  # rows 2400 elements apart: read in place
    res = torch.randn(6, 576).to(torch.bfloat16)
    w32 = 1 + 0.1 * torch.randn(576)  # an fp32 weight on bf16 activations: fp32 out, as torch promotes
    with torch.no_grad():
        y, h = rms_norm(x, w32, 1e-5, residual=res)
        want, want_h, _ = rms_torch(x, w32, res, 1e-5, 0.0, False)
        assert y.dtype == torch.float32 and torch.equal(y, want) and torch.equal(h, want_h)
        xt = torch.randn(576, 4).to(torch.bfloat16).t()  # column stride 4: copied to rows
        want_t = rms_torch(xt, w32.bfloat16(), None, 1e-5, 0.0, False)[0]
        assert torch.equal(rms_norm(xt, w32.bfloat16(), 1e-5), want_t)
        before = cpu.CALLS["rms_norm"]
        x64 = torch.randn(3, 64, dtype=torch.float64)  # not a kernel dtype: the torch code
        assert torch.equal(rms_norm(x64, torch.ones(64, dtype=torch.float64), 1e-5),
                           rms_torch(x64, torch.ones(64, dtype=torch.float64), None, 1e-5, 0.0, False)[0])
        mixed = rms_norm(x, w32.bfloat16(), 1e-5, residual=res.float())  # fp32 residual on bf16: torch code
        assert mixed[1].dtype == torch.float32
        wide = torch.randn(1, 40000)  # torch splits one row this wide between threads: the torch code
        want_w = rms_torch(wide, torch.ones(40000), None, 1e-5, 0.0, False)[0]
        assert torch.equal(rms_norm(wide, torch.ones(40000), 1e-5), want_w)
        assert cpu.CALLS["rms_norm"] == before
        assert rms_norm(torch.empty(3, 0), torch.ones(0), 1e-5).shape == (3, 0)  # no features: torch code
        assert rms_norm(torch.empty(0, 576, dtype=torch.bfloat16), w32, 1e-5).shape == (0, 576)


def test_gradients_and_compilation_take_the_torch_code():
    x, res, w = _inputs(4, 64, torch.float32)
    x.requires_grad_(True)
    before = cpu.CALLS["rms_norm"]
    y = rms_norm(x, w, 1e-6)
    y.sum().backward()
    assert cpu.CALLS["rms_norm"] == before and x.grad is not None
    with torch.inference_mode():  # the common way to write inference code
        rms_norm(x.detach(), w, 1e-6)
    assert cpu.CALLS["rms_norm"] == before + 1


def test_a_model_runs_its_norms_on_the_kernels(tiny_chat_dir):
    import minillama

    model = minillama.from_pretrained(tiny_chat_dir)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    sites = 2 * model.config.num_hidden_layers + 1
    before = cpu.CALLS["rms_norm"]
    with torch.inference_mode():
        fast = model(ids)
    assert cpu.CALLS["rms_norm"] - before == sites
    with torch.inference_mode(), _common.torch_path():
        slow = model(ids)
    assert torch.equal(fast, slow)


def test_build_failure_warns_once_and_keeps_the_output(monkeypatch):
    x, res, w = _inputs(8, 576, torch.bfloat16)
    with torch.no_grad():
        want = rms_torch(x, w, res, 1e-6, 0.0, False)
    monkeypatch.setattr(cpu, "_ops", None)

    def broken():
        raise RuntimeError("Error building extension 'minillama_cpu_norms': g++ not found\nmore lines")

    monkeypatch.setattr(cpu, "_build", broken)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = [rms_norm(x, w, 1e-6, residual=res) for _ in range(3)]
    msgs = [str(c.message) for c in caught]
    assert len(msgs) == 1 and "g++ not found" in msgs[0] and "more lines" not in msgs[0], msgs
    for y, h in got:
        assert torch.equal(y, want[0]) and torch.equal(h, want[1])
    monkeypatch.setenv("MINILLAMA_CPU_KERNELS", "0")
    monkeypatch.setattr(cpu, "_ops", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu.load() is None  # switched off: silent


def test_a_later_process_loads_the_built_kernels_without_compiling():
    """A warm start pays the import of one extension module (issue #30: under ~1 s), no compiler."""
    code = ("import time; import torch; from minillama.kernels import cpu; t = time.perf_counter(); "
            "m = cpu.load(); print(m is not None, round(time.perf_counter() - t, 3))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded, seconds = out.stdout.split()
    assert loaded == "True" and "building" not in out.stderr, out.stderr
    assert float(seconds) < 1.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_rows_match_the_torch_code(dtype):
    x, res, w = _inputs(4, 600, dtype)
    x[0, 3], x[1, 599], x[2, 10] = float("nan"), float("inf"), -float("inf")
    with torch.no_grad():
        for got, want in [(rms_norm(x, w, 1e-6), rms_torch(x, w, None, 1e-6, 0.0, False)[0]),
                          (layer_norm(x, w, None, 1e-5), layer_torch(x, w, None, None, 1e-5)[0])]:
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
            assert got[3].isfinite().all()  # the clean row stays clean


def test_tensor_subclasses_take_the_torch_code():
    """The module reads memory directly; a subclass (an in-flight AsyncCollectiveTensor under tensor
    parallelism, FakeTensor, DTensor) dispatches through the torch code instead."""

    class Wrapped(torch.Tensor):
        pass

    x, res, w = _inputs(4, 576, torch.bfloat16)
    before = cpu.CALLS["rms_norm"]
    with torch.inference_mode():
        y, h = rms_norm(x, w, 1e-6, residual=res.as_subclass(Wrapped))
        y2 = rms_norm(x.as_subclass(Wrapped), torch.nn.Parameter(w, requires_grad=False), 1e-6)
        want, want_h, _ = rms_torch(x, w, res, 1e-6, 0.0, False)
    assert cpu.CALLS["rms_norm"] == before + 0 and torch.equal(y, want) and torch.equal(h, want_h)
    assert torch.equal(y2, rms_torch(x, w, None, 1e-6, 0.0, False)[0])
    with torch.inference_mode():
        rms_norm(x, torch.nn.Parameter(w, requires_grad=False), 1e-6)  # a Parameter weight: the kernel
    assert cpu.CALLS["rms_norm"] == before + 1
