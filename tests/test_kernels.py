"""The Triton norm kernels, run on the CPU through TRITON_INTERPRET=1, against fp32 references.

Triton reads TRITON_INTERPRET when it is imported, so these tests run in their own pytest process
with the variable set from the start (`make test` does: `TRITON_INTERPRET=1 pytest -m interpret`);
a plain `pytest` deselects them and says so. On a machine with CUDA, `pytest -m interpret
tests/test_kernels.py` (no interpreter) runs the same tests on the GPU with compiled Triton.

Error rule (flash-attention's): |ours - fp32 reference| <= 2 * |same-dtype torch - fp32 reference| + atol.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minillama.kernels import layer_norm, rms_norm
from minillama.kernels import _common
from minillama.kernels.layer_norm import layer_norm_bwd, layer_norm_fwd
from minillama.kernels.rms_norm import rms_norm_bwd, rms_norm_fwd

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


pytestmark = pytest.mark.interpret
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def on_device():
    """Every tensor a test makes lives where the kernels run: the GPU if there is one."""
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device("cpu")


@pytest.fixture
def interpret():
    """The Triton path: the process runs under TRITON_INTERPRET=1 (see the module docstring).
    The test fails if no Triton kernel was launched (a silent fallback to the torch path)."""
    before = sum(_common.LAUNCHES.values())
    yield
    assert sum(_common.LAUNCHES.values()) > before, "no Triton kernel ran: the test took the torch path"


def hf_rms(h, w, eps, offset=0.0):
    """Same-dtype torch implementation (transformers' Llama formula, Gemma offset in fp32)."""
    hf = h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return (normed.float() * (w.float() + offset)).to(torch.promote_types(h.dtype, w.dtype)) if offset else w * normed


def run(fn, x, w, extra, residual, dy, dh):
    """Forward + backward; returns outputs and gradients of every input, as fp32."""
    inputs = [t.detach().clone().requires_grad_() for t in (x, w, *extra)]
    res = residual.detach().clone().requires_grad_() if residual is not None else None
    out = fn(*inputs, res)
    if res is not None:
        y, h = out
        torch.autograd.backward([y, h], [dy.to(y.dtype), dh.to(h.dtype)])
    else:
        y, h = out, None
        y.backward(dy.to(y.dtype))
    grads = [t.grad for t in inputs] + ([res.grad] if res is not None else [])
    return [t.float() for t in [y] + ([h] if h is not None else []) + grads]


def check(ours, same_dtype, ref, atol, what):
    for i, (o, s, r) in enumerate(zip(ours, same_dtype, ref, strict=True)):
        err, base = (o - r).abs().max().item(), (s - r).abs().max().item()
        assert err <= 2 * base + atol, f"{what} output {i}: error {err:.3g} > 2 * {base:.3g} + {atol}"


def _inputs(shape, dtype, seed=0, w_dtype=None):
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU, so every device sees the same numbers
    n = shape[-1]

    def randn(*size):
        return torch.randn(*size, generator=g, device="cpu")

    x = randn(shape).to(dtype)
    w = (1 + 0.3 * randn(n)).to(w_dtype or dtype)
    b = (0.2 * randn(n)).to(w_dtype or dtype)
    r = randn(shape).to(dtype)
    dy, dh = randn(shape), randn(shape)
    return tuple(t.to(DEVICE) for t in (x, w, b, r, dy, dh))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (3, 1), (4, 7), (2, 3, 96), (5, 1000), (2, 2, 4099)])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_forward_backward(interpret, dtype, shape, with_residual, offset):
    x, w, _, r, dy, dh = _inputs(shape, dtype)
    if offset:
        w = (0.01 * torch.randn(shape[-1])).to(dtype)  # Gemma stores w with 1 + w the gain
    residual = r if with_residual else None
    eps = 1e-6

    def ours(x, w, res):
        return rms_norm(x, w, eps, residual=res, offset=offset)

    def torch_same(x, w, res):
        h = x if res is None else x + res
        y = hf_rms(h, w, eps, offset)
        return (y, h) if res is not None else y

    def reference(x, w, res):
        return torch_same(x.double(), w.double(), None if res is None else res.double())

    check(run(ours, x, w, [], residual, dy, dh), run(torch_same, x, w, [], residual, dy, dh),
          run(reference, x, w, [], residual, dy, dh), ATOL[dtype], f"rms {dtype} {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (4, 7), (2, 3, 96), (5, 1000), (2, 2, 4099)])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_layer_norm_forward_backward(interpret, dtype, shape, with_residual, with_bias):
    x, w, b, r, dy, dh = _inputs(shape, dtype)
    residual = r if with_residual else None
    extra = [b] if with_bias else []
    eps = 1e-5

    def ours(x, w, *rest):
        *bias, res = rest
        return layer_norm(x, w, bias[0] if bias else None, eps, residual=res)

    def torch_same(x, w, *rest):
        *bias, res = rest
        h = x if res is None else x + res
        y = F.layer_norm(h, (h.shape[-1],), w, bias[0] if bias else None, eps)
        return (y, h) if res is not None else y

    def reference(x, w, *rest):
        *bias, res = rest
        return torch_same(x.double(), w.double(), *[t.double() for t in bias], None if res is None else res.double())

    check(run(ours, x, w, extra, residual, dy, dh), run(torch_same, x, w, extra, residual, dy, dh),
          run(reference, x, w, extra, residual, dy, dh), ATOL[dtype], f"layernorm {dtype} {shape}")


def test_weight_gradient_against_fp32(interpret):
    """dweight in bf16 from fp32 partial sums over 512 rows: within one bf16 rounding of the exact sum.

    (A bf16 accumulator, Liger-Kernel PR #950's bug, is off by far more.)
    """
    x, w, _, _, dy, _ = _inputs((512, 256), torch.bfloat16)
    dyb = dy.bfloat16()
    wq = w.detach().clone().requires_grad_()
    rms_norm(x, wq).backward(dyb)
    xf = x.double()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()  # what the forward multiplied
    exact = (dyb.double() * normed.double()).sum(0)
    torch.testing.assert_close(wq.grad.double(), exact, rtol=2 ** -8, atol=1e-3 * exact.abs().max().item())


@pytest.mark.parametrize("n", [65536, 65537])
def test_hidden_sizes_past_one_block(interpret, n):
    x, w, b, r, dy, dh = _inputs((2, n), torch.float32)
    y, h = rms_norm(x, w, 1e-6, residual=r)
    torch.testing.assert_close(y, hf_rms(x + r, w, 1e-6))
    torch.testing.assert_close(layer_norm(x, w, b), F.layer_norm(x, (n,), w, b))
    xg = x.clone().requires_grad_()
    rms_norm(xg, w).backward(dy)
    xr = x.clone().requires_grad_()
    hf_rms(xr, w, 1e-6).backward(dy)
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weight_dtype", DTYPES, ids=str)
def test_weight_in_any_dtype(interpret, weight_dtype):
    x, w, b, _, _, _ = _inputs((3, 64), torch.bfloat16, w_dtype=weight_dtype)
    y = rms_norm(x, w)
    assert y.dtype == torch.promote_types(torch.bfloat16, weight_dtype)
    torch.testing.assert_close(y, hf_rms(x, w, 1e-6))
    assert layer_norm(x, w, b).dtype == torch.bfloat16


def test_strided_inputs_against_an_fp64_reference(interpret):
    """Strided inputs checked against an independent reference, not against our own contiguous result."""
    base, rbase = torch.randn(6, 200), torch.randn(6, 200)
    x, r = base[::2, 10:138], rbase[::2, 50:178]  # row strides 400, unit column stride: used in place
    w = torch.rand(128) + 0.5
    xt = torch.randn(128, 3).t()  # column stride 3: copied

    def ref_rms(h):
        return hf_rms(h.double(), w.double(), 1e-6).float()

    torch.testing.assert_close(rms_norm(x, w), ref_rms(x))
    torch.testing.assert_close(rms_norm(xt, w), ref_rms(xt))
    y, h = rms_norm(x, w, residual=r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, ref_rms(x.double() + r.double()))
    torch.testing.assert_close(layer_norm(x, w, None), F.layer_norm(x.double(), (128,), w.double()).float())
    xg = x.clone().requires_grad_()
    dy = torch.randn(6, 200)[::2, 20:148]
    rms_norm(xg, w).backward(dy)
    xr = x.double().requires_grad_()
    hf_rms(xr, w.double(), 1e-6).backward(dy.double())
    torch.testing.assert_close(xg.grad, xr.grad.float())


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_wider_residual_keeps_h_in_the_promoted_dtype(interpret, monkeypatch, norm):
    """bf16 sublayer output + fp32 residual stream (bf16 autocast): h = x + residual stays fp32, as in
    an unfused model, forward and backward, on the Triton path and the torch path alike."""
    x, w, b, r, dy, dh = _inputs((6, 96), torch.bfloat16)
    r = r.float() + 1e-3 * torch.randn(r.shape)  # fp32 bits that a bf16 h would lose
    dy, dh = dy.float(), dh.float()

    def call(x, w, res):
        if norm == "rms":
            return rms_norm(x, w, 1e-6, residual=res)
        return layer_norm(x, w, b, 1e-5, residual=res)

    def reference(x, w, res):  # fp64, unfused
        h = x.double() + res.double()
        y = hf_rms(h, w.double(), 1e-6) if norm == "rms" else F.layer_norm(h, (96,), w.double(), b.double(), 1e-5)
        return y, h

    results = []
    for triton_path in (True, False):
        if not triton_path:
            monkeypatch.setattr(_common, "INTERPRET", False)  # the torch implementation (on CPU)
        xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
        y, h = call(xs, w, rs)
        assert h.dtype == torch.float32 and y.dtype == torch.float32
        assert torch.equal(h, x.float() + r)
        torch.autograd.backward([y, h], [dy, dh])
        results.append((y.detach(), xs.grad, rs.grad))
    xr, rr = x.double().requires_grad_(), r.double().requires_grad_()
    y_ref, h_ref = reference(xr, w, rr)
    torch.autograd.backward([y_ref, h_ref], [dy.double(), dh.double()])
    for y, dx, dr in results:
        assert dx.dtype == torch.bfloat16 and dr.dtype == torch.float32
        torch.testing.assert_close(y, y_ref.float())
        torch.testing.assert_close(dr, rr.grad.float(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(dx, rr.grad.bfloat16())  # d/dx = d/dresidual, rounded to x's dtype
    torch.testing.assert_close(results[0][0], results[1][0])  # fp32 sums in another order: ulps apart


def test_stride_zero_gradient(interpret):
    x = torch.randn(4, 33, requires_grad=True)
    w = torch.rand(33, requires_grad=True)
    rms_norm(x, w).sum().backward()  # dy is an expanded scalar: every stride 0
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    hf_rms(xr, wr, 1e-6).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)


def test_backward_is_deterministic(interpret):
    x, w, b, r, dy, dh = _inputs((37, 300), torch.bfloat16)

    def grads():
        xs, ws, bs, rs = (t.clone().requires_grad_() for t in (x, w, b, r))
        y, h = rms_norm(xs, ws, residual=rs)
        y2, _ = layer_norm(y, ws, bs, residual=h)
        y2.backward(dy.bfloat16())
        return [t.grad for t in (xs, ws, bs, rs)]

    for a, c in zip(grads(), grads(), strict=True):
        assert torch.equal(a, c)


def test_residual_gradients_do_not_share_storage(interpret):
    x, w, _, r, dy, dh = _inputs((3, 16), torch.float32)
    xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
    y, h = rms_norm(xs, w, residual=rs)
    torch.autograd.backward([y, h], [dy, dh])
    assert xs.grad.data_ptr() != rs.grad.data_ptr()
    torch.testing.assert_close(xs.grad, rs.grad)


@pytest.mark.parametrize("with_interpreter", [False, True], ids=["torch", "triton"])
def test_opcheck(monkeypatch, with_interpreter):
    if not with_interpreter:
        monkeypatch.setattr(_common, "INTERPRET", False)  # the torch implementation of the same ops
    x, w, b, r, dy, dh = _inputs((3, 40), torch.float32)
    rstd = torch.rand(3) + 0.5
    mean = torch.randn(3)
    req = [t.clone().requires_grad_() for t in (x, w, b, r)]
    for args in [(req[0], req[1], None, 1e-6, 0.0), (req[0], req[1], req[3], 1e-6, 1.0)]:
        torch.library.opcheck(rms_norm_fwd, args)
    for args in [(req[0], req[1], req[2], None, 1e-5), (req[0], req[1], None, req[3], 1e-5)]:
        torch.library.opcheck(layer_norm_fwd, args)
    torch.library.opcheck(rms_norm_bwd, (dy, dh, x, w, rstd, 0.0, True))
    torch.library.opcheck(layer_norm_bwd, (dy, None, x, w, mean, rstd, True, False))


def test_shape_errors():
    with pytest.raises(ValueError, match="does not match hidden size"):
        rms_norm(torch.randn(2, 8), torch.ones(7))
    with pytest.raises(ValueError, match="residual shape"):
        layer_norm(torch.randn(2, 8), torch.ones(8), None, residual=torch.randn(8))


def _every_launch(n: int) -> list[tuple[_common.Launch, int]]:
    """(configuration, row count) for every launch configuration the dispatcher picks for hidden size
    n: tile heights 1, 2, 4, ... (each with a partial last tile where possible), and the tallest tile
    again with rows spread over several backward programs, the last one short."""
    cases, height = [], 1
    while True:
        m = height - 1 if height > 2 else height  # next_pow2(m) == height: a partial tile
        cfg = _common.launch_config(n, _common.row_bucket(m))
        cases.append((cfg, m))
        if cfg.rows < height or cfg.rows == _common.TILE_ELEMS // cfg.block or not cfg.single:
            break
        height *= 2
    tallest, m = cases[-1][0], 5 * cases[-1][0].rows + 1
    while m % _common.bwd_grid(m, tallest, torch.device(DEVICE))[1] == 0:
        m += 1
    return cases + [(tallest, m)]


@pytest.mark.parametrize("n", [40, 300, 1000, 3000, 9000])
def test_every_launch_configuration(interpret, n):
    """Forward and backward of both norms, residual and not, in every configuration the dispatcher can
    choose for this width (tile heights 1..max, one-block and looped rows, partial last tiles)."""
    cases = _every_launch(n)
    heights = sorted({cfg.rows for cfg, _ in cases})
    assert heights == [2 ** i for i in range(len(heights))]  # 1, 2, 4, ... up to the tallest tile
    assert heights[-1] == (_common.TILE_ELEMS // cases[0][0].block if n <= _common.MAX_BLOCK else 1)
    assert all(cfg.single for cfg, _ in cases) == (n <= _common.MAX_BLOCK)
    programs, per_program = _common.bwd_grid(cases[-1][1], cases[-1][0], torch.device(DEVICE))
    assert programs > 1 and cases[-1][1] % per_program  # several backward programs, the last one short
    for cfg, m in cases:
        assert _common.launch_config(n, _common.row_bucket(m)) == cfg
        x, w, b, r, dy, dh = _inputs((m, n), torch.float32, seed=m)
        run_ours = run(lambda x, w, res: rms_norm(x, w, 1e-6, residual=res), x, w, [], r, dy, dh)
        run_ref = run(lambda x, w, res: (hf_rms(x.double() + res.double(), w.double(), 1e-6), x.double() + res.double()),
                      x, w, [], r, dy, dh)
        for a, e in zip(run_ours, run_ref, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * max(1.0, m / 64))
        y = layer_norm(x, w, b, 1e-5)
        torch.testing.assert_close(y, F.layer_norm(x.double(), (n,), w.double(), b.double(), 1e-5).float(),
                                   rtol=1e-4, atol=1e-4)
        xg = x.clone().requires_grad_()
        layer_norm(xg, w, b, 1e-5).backward(dy)
        xr = x.double().requires_grad_()
        F.layer_norm(xr, (n,), w.double(), b.double(), 1e-5).backward(dy.double())
        torch.testing.assert_close(xg.grad, xr.grad.float(), rtol=1e-4, atol=1e-4)
