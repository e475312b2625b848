"""The Triton norm kernels, run on the CPU through TRITON_INTERPRET=1, against fp32 references.

Triton reads TRITON_INTERPRET when it is imported, so these tests run in their own pytest process
with the variable set from the start (`make test` does: `TRITON_INTERPRET=1 pytest -m interpret`);
a plain `pytest` deselects them and says so. On a machine with CUDA, `pytest -m interpret
tests/test_kernels.py` (no interpreter) runs the same tests on the GPU with compiled Triton.

Error rule (flash-attention's): |ours - fp32 reference| <= 2 * |same-dtype torch - fp32 reference| + atol.
Triton cases fail if no kernel launched (conftest's `triton_ran`, and `launches_exactly` per call);
torch-path cases run under `_common.torch_path()` (torch on CUDA too) and fail if any kernel launched.
"""

from __future__ import annotations

import contextlib

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


@contextlib.contextmanager
def launches_exactly(**expected: int):
    """The block must launch these Triton kernels this many times, and no other (a forward or a
    backward falling back to torch alone would still pass `triton_ran`)."""
    before = _common.LAUNCHES.copy()
    yield
    launched = dict(_common.LAUNCHES - before)
    assert launched == expected, f"Triton launches {launched}, expected {expected}"


def hf_rms(h, w, eps, offset=0.0, fp32_gain=False):
    """Same-dtype torch implementation: transformers' Llama formula (cast, then multiply), or with
    fp32_gain Gemma's / OLMo 2's (multiply by w + offset in fp32, cast after)."""
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    out_dtype = torch.promote_types(h.dtype, w.dtype)
    if fp32_gain:
        return (normed * (w.float() + offset)).to(out_dtype)
    normed = normed.to(h.dtype)
    return (normed.float() * (w.float() + offset)).to(out_dtype) if offset else w * normed


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


# The gains families use: Llama's (cast, then w), Gemma's ((1 + w) in fp32, cast after), OLMo 2's
# (w in fp32, cast after), and an offset gain applied after the cast.
GAINS = {"llama": (0.0, False), "gemma": (1.0, True), "olmo2": (0.0, True), "offset-cast-first": (1.0, False)}


SHAPES = [(1,), (3, 1), (4, 7), (2, 3, 96), (5, 1000), (2, 2, 4099)]
# Llama's gain on every shape; the others on one short-row, one tiled and one looped shape (the
# interpreter is slow, and the gain changes no indexing).
GAIN_SHAPES = [("llama", shape) for shape in SHAPES] + [
    (gain, shape) for gain in ("gemma", "olmo2") for shape in ((4, 7), (2, 3, 96), (2, 2, 4099))] + [
    ("offset-cast-first", (2, 3, 96))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gain,shape", GAIN_SHAPES, ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)))
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_forward_backward(triton_ran, dtype, shape, with_residual, gain):
    offset, fp32_gain = GAINS[gain]
    x, w, _, r, dy, dh = _inputs(shape, dtype)
    if offset:
        w = (0.01 * torch.randn(shape[-1])).to(dtype)  # Gemma stores w with 1 + w the gain
    residual = r if with_residual else None
    eps = 1e-6

    def ours(x, w, res):
        return rms_norm(x, w, eps, residual=res, offset=offset, fp32_gain=fp32_gain)

    def torch_same(x, w, res):
        h = x if res is None else x + res
        y = hf_rms(h, w, eps, offset, fp32_gain)
        return (y, h) if res is not None else y

    def reference(x, w, res):
        return torch_same(x.double(), w.double(), None if res is None else res.double())

    with launches_exactly(rms_norm_fwd=1, rms_norm_bwd=1):
        got = run(ours, x, w, [], residual, dy, dh)
    check(got, run(torch_same, x, w, [], residual, dy, dh),
          run(reference, x, w, [], residual, dy, dh), ATOL[dtype], f"rms {dtype} {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (4, 7), (2, 3, 96), (5, 1000), (2, 2, 4099)])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_layer_norm_forward_backward(triton_ran, dtype, shape, with_residual, with_bias):
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

    with launches_exactly(layer_norm_fwd=1, layer_norm_bwd=1):
        got = run(ours, x, w, extra, residual, dy, dh)
    check(got, run(torch_same, x, w, extra, residual, dy, dh),
          run(reference, x, w, extra, residual, dy, dh), ATOL[dtype], f"layernorm {dtype} {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [16, 256])
@pytest.mark.parametrize("gain", ["llama", "gemma"])
def test_qk_norm_rows_of_head_dim(triton_ran, dtype, head_dim, gain):
    """q/k norms (Qwen3: Llama's gain; Gemma 3: (1 + w) in fp32) run over each head of a
    [batch, seq, heads, head_dim] view cut from the fused qkv projection (strided rows): one launch
    forward and one backward, within 2x of torch's error against fp64."""
    offset, fp32_gain = GAINS[gain]
    g = torch.Generator().manual_seed(head_dim)
    qkv = torch.randn(2, 5, 7 * head_dim, generator=g, device="cpu").to(dtype).to(DEVICE)
    q = qkv[..., : 4 * head_dim].view(2, 5, 4, head_dim)  # 4 query heads of the 7 (4 q, 2 k, 1 v)
    w = (0.1 * torch.randn(head_dim, generator=g, device="cpu")).to(dtype).to(DEVICE)
    dy = torch.randn(q.shape, generator=g, device="cpu").to(DEVICE)

    def ours(x, w, res):
        return rms_norm(x, w, 1e-6, offset=offset, fp32_gain=fp32_gain)

    def torch_same(x, w, res):
        return hf_rms(x, w, 1e-6, offset, fp32_gain)

    def reference(x, w, res):
        return torch_same(x.double(), w.double(), None)

    with launches_exactly(rms_norm_fwd=1, rms_norm_bwd=1):
        got = run(ours, q, w, [], None, dy, None)
    check(got, run(torch_same, q, w, [], None, dy, None), run(reference, q, w, [], None, dy, None), ATOL[dtype],
          f"q/k norm {dtype} head_dim {head_dim} {gain}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_forward_rounds_to_nearest_like_torch(triton_ran, dtype):
    """Outputs are rounded once, to nearest even, as torch rounds (to_dtype's job: the interpreter
    truncates fp32 -> bf16). Within 2x of torch's error, a truncating kernel would pass; here the
    forward must equal the same-dtype torch result except where fp32 sums in another order land on
    the other side of a rounding boundary (a handful of elements), and h = x + residual exactly."""
    x, w, b, r, _, _ = _inputs((64, 1000), dtype)
    y, h = rms_norm(x, w, 1e-6, residual=r)
    assert torch.equal(h, x + r), "h != x + residual rounded to nearest"  # one fp32 add, one rounding
    outputs = {"rms": (y, hf_rms(x + r, w, 1e-6)),
               "layernorm": (layer_norm(x, w, b, 1e-5), F.layer_norm(x, (1000,), w, b, 1e-5))}
    for what, (ours, same_dtype) in outputs.items():
        equal = (ours == same_dtype).double().mean().item()
        assert equal >= 0.99, f"{what} {dtype}: only {equal:.1%} of the outputs equal torch's (rounding?)"


def test_weight_gradient_against_fp32(triton_ran):
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
def test_hidden_sizes_past_one_block(triton_ran, n):
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
def test_weight_in_any_dtype(triton_ran, weight_dtype):
    x, w, b, _, _, _ = _inputs((3, 64), torch.bfloat16, w_dtype=weight_dtype)
    y = rms_norm(x, w)
    assert y.dtype == torch.promote_types(torch.bfloat16, weight_dtype)
    torch.testing.assert_close(y, hf_rms(x, w, 1e-6))
    assert layer_norm(x, w, b).dtype == torch.bfloat16


def test_strided_inputs_against_an_fp64_reference(triton_ran):
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
def test_wider_residual_keeps_h_in_the_promoted_dtype(triton_ran, norm):
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
        kernel = "rms_norm" if norm == "rms" else "layer_norm"
        expected = {f"{kernel}_fwd": 1, f"{kernel}_bwd": 1} if triton_path else {}  # torch: no launch at all
        with launches_exactly(**expected), contextlib.nullcontext() if triton_path else _common.torch_path():
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


def test_stride_zero_gradient(triton_ran):
    x = torch.randn(4, 33, requires_grad=True)
    w = torch.rand(33, requires_grad=True)
    rms_norm(x, w).sum().backward()  # dy is an expanded scalar: every stride 0
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    hf_rms(xr, wr, 1e-6).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)


def test_backward_is_deterministic(triton_ran):
    x, w, b, r, dy, dh = _inputs((37, 300), torch.bfloat16)

    def grads():
        xs, ws, bs, rs = (t.clone().requires_grad_() for t in (x, w, b, r))
        y, h = rms_norm(xs, ws, residual=rs)
        y2, _ = layer_norm(y, ws, bs, residual=h)
        y2.backward(dy.bfloat16())
        return [t.grad for t in (xs, ws, bs, rs)]

    for a, c in zip(grads(), grads(), strict=True):
        assert torch.equal(a, c)


def test_residual_gradients_do_not_share_storage(triton_ran):
    x, w, _, r, dy, dh = _inputs((3, 16), torch.float32)
    xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
    y, h = rms_norm(xs, w, residual=rs)
    torch.autograd.backward([y, h], [dy, dh])
    assert xs.grad.data_ptr() != rs.grad.data_ptr()
    torch.testing.assert_close(xs.grad, rs.grad)


@pytest.mark.parametrize("triton_path", [False, True], ids=["torch", "triton"])
def test_opcheck(triton_path):
    before = _common.LAUNCHES.copy()
    with contextlib.nullcontext() if triton_path else _common.torch_path():  # torch: the same ops' torch code
        _opcheck_all()
    launched = set(_common.LAUNCHES - before)
    if triton_path:
        assert launched == {"rms_norm_fwd", "rms_norm_bwd", "layer_norm_fwd", "layer_norm_bwd"}, launched
    else:
        assert not launched, f"the torch case launched Triton kernels: {launched}"


def _opcheck_all():
    x, w, b, r, dy, dh = _inputs((3, 40), torch.float32)
    rstd = torch.rand(3) + 0.5
    mean = torch.randn(3)
    req = [t.clone().requires_grad_() for t in (x, w, b, r)]
    for args in [(req[0], req[1], None, 1e-6, 0.0, False), (req[0], req[1], req[3], 1e-6, 1.0, False),
                 (req[0], req[1], req[3], 1e-6, 1.0, True)]:
        torch.library.opcheck(rms_norm_fwd, args)
    for args in [(req[0], req[1], req[2], None, 1e-5), (req[0], req[1], None, req[3], 1e-5)]:
        torch.library.opcheck(layer_norm_fwd, args)
    torch.library.opcheck(rms_norm_bwd, (dy, dh, x, w, rstd, 0.0, False, True))
    torch.library.opcheck(rms_norm_bwd, (dy, None, x, w, rstd, 1.0, True, False))
    torch.library.opcheck(layer_norm_bwd, (dy, None, x, w, mean, rstd, True, False))


def test_shape_errors():
    with pytest.raises(ValueError, match="does not match hidden size"):
        rms_norm(torch.randn(2, 8), torch.ones(7))
    with pytest.raises(ValueError, match="residual shape"):
        layer_norm(torch.randn(2, 8), torch.ones(8), None, residual=torch.randn(8))


# The launch rule (kernels/_common.py), applied by hand below: block = next_pow2(n) holds a whole row
# while block <= MAX_BLOCK = 8192 (else one row per program, looped in 8192 chunks, 16 warps); a
# tile is rows = min(tile // block, next_pow2(rows)) rows, at least 1, with tile = TILE_ELEMS = 8192
# elements forward and BWD_TILE_ELEMS = 4096 backward; warps = rows * block / 512 (16 fp32 values
# per thread, 32 threads a warp), clamped to 1..16. Launch(block, rows, single, num_warps).
L = _common.Launch
FWD, BWD = "fwd", "bwd"  # tile: TILE_ELEMS (8192) forward, BWD_TILE_ELEMS (4096) backward
LAUNCH_RULE = [  # (hidden n, rows, direction, expected)
    (40, 1, FWD, L(64, 1, True, 1)),          # block 64 = next_pow2(40); one row: 64 / 512 -> at least 1 warp
    (40, 3, FWD, L(64, 4, True, 1)),          # next_pow2(3) = 4 rows; 4 * 64 = 256 elements -> 1 warp
    (40, 100, FWD, L(64, 128, True, 16)),     # next_pow2(100) = 128 = 8192 / 64: full tile, 16 warps
    (40, 100_000, FWD, L(64, 128, True, 16)),  # more rows: still 8192 / 64 = 128 (rows bucketed at 8192)
    (40, 100, BWD, L(64, 64, True, 8)),       # backward: 4096 / 64 = 64 rows, 4096 / 512 = 8 warps
    (300, 7, FWD, L(512, 8, True, 8)),        # block 512; 8 rows x 512 = 4096 elements -> 8 warps
    (300, 16, BWD, L(512, 8, True, 8)),       # backward cap 4096 / 512 = 8 rows, 8 warps
    (576, 1, FWD, L(1024, 1, True, 2)),       # SmolLM2 decode: block 1024, 1024 / 512 = 2 warps
    (576, 8192, FWD, L(1024, 8, True, 16)),   # SmolLM2 prefill: 8192 / 1024 = 8 rows, 16 warps
    (576, 8192, BWD, L(1024, 4, True, 8)),    # 4096 / 1024 = 4 rows, 8 warps
    (3000, 2, FWD, L(4096, 2, True, 16)),     # block 4096: 2 rows fill the 8192 tile, 16 warps
    (3000, 2, BWD, L(4096, 1, True, 8)),      # 4096 / 4096 = 1 row, 8 warps
    (8192, 64, FWD, L(8192, 1, True, 16)),    # n = MAX_BLOCK: still one block; 8192 / 8192 = 1 row; 16 warps
    (8192, 64, BWD, L(8192, 1, True, 16)),    # 4096 // 8192 = 0 -> at least 1 row; 8192 / 512 = 16 warps
    (9000, 1, FWD, L(8192, 1, False, 16)),    # next_pow2(9000) = 16384 > 8192: looped 8192-chunks, 16 warps
    (65537, 1000, BWD, L(8192, 1, False, 16)),  # looped in the backward too, one row per program
]


@pytest.mark.parametrize("n,rows,direction,expected", LAUNCH_RULE,
                         ids=[f"n{n}-m{m}-{d}" for n, m, d, _ in LAUNCH_RULE])
def test_launch_config_follows_the_documented_rule(n, rows, direction, expected):
    tile = _common.TILE_ELEMS if direction == FWD else _common.BWD_TILE_ELEMS
    assert _common.launch_config(n, _common.row_bucket(rows), tile) == expected


def test_backward_grid_on_the_cpu():
    """bwd_grid off CUDA: at most 4 programs, each a whole number of tiles (ceil(tiles / programs))."""
    cpu = torch.device("cpu")
    assert _common.bwd_grid(641, L(64, 64, True, 8), cpu) == (4, 192)  # 11 tiles -> 3 each: 192, 192, 192, 65
    assert _common.bwd_grid(128, L(64, 64, True, 8), cpu) == (2, 64)  # 2 tiles: 2 programs of one tile
    assert _common.bwd_grid(9, L(8192, 1, False, 16), cpu) == (3, 3)  # 9 one-row tiles: ceil(9 / 4) = 3 each


# For each width: the row counts the tests run with, and the forward and backward configurations the
# rule gives them: every forward tile height 1, 2, 4, ... up to the widest tile (a partial last tile
# where possible: m = height - 1), then the tallest tile again with rows over several backward
# programs, the last one short (on the CPU the row count as written; on a GPU it grows until so).
EVERY_LAUNCH = {
    40: [  # block 64: up to 128 rows forward (warps rows / 8, at least 1), 64 backward
        (1, L(64, 1, True, 1), L(64, 1, True, 1)), (2, L(64, 2, True, 1), L(64, 2, True, 1)),
        (3, L(64, 4, True, 1), L(64, 4, True, 1)), (7, L(64, 8, True, 1), L(64, 8, True, 1)),
        (15, L(64, 16, True, 2), L(64, 16, True, 2)), (31, L(64, 32, True, 4), L(64, 32, True, 4)),
        (63, L(64, 64, True, 8), L(64, 64, True, 8)), (127, L(64, 128, True, 16), L(64, 64, True, 8)),
        (641, L(64, 128, True, 16), L(64, 64, True, 8)),  # backward: 11 tiles over 4 programs of 3
    ],
    300: [  # block 512: up to 16 rows forward (warps = rows), 8 backward
        (1, L(512, 1, True, 1), L(512, 1, True, 1)), (2, L(512, 2, True, 2), L(512, 2, True, 2)),
        (3, L(512, 4, True, 4), L(512, 4, True, 4)), (7, L(512, 8, True, 8), L(512, 8, True, 8)),
        (15, L(512, 16, True, 16), L(512, 8, True, 8)), (81, L(512, 16, True, 16), L(512, 8, True, 8)),
    ],
    1000: [  # block 1024: up to 8 rows forward (warps 2 x rows), 4 backward
        (1, L(1024, 1, True, 2), L(1024, 1, True, 2)), (2, L(1024, 2, True, 4), L(1024, 2, True, 4)),
        (3, L(1024, 4, True, 8), L(1024, 4, True, 8)), (7, L(1024, 8, True, 16), L(1024, 4, True, 8)),
        (41, L(1024, 8, True, 16), L(1024, 4, True, 8)),
    ],
    3000: [  # block 4096: up to 2 rows forward (warps 8 x rows), 1 backward
        (1, L(4096, 1, True, 8), L(4096, 1, True, 8)), (2, L(4096, 2, True, 16), L(4096, 1, True, 8)),
        (11, L(4096, 2, True, 16), L(4096, 1, True, 8)),
    ],
    9000: [  # past MAX_BLOCK: one looped row per program, forward and backward
        (1, L(8192, 1, False, 16), L(8192, 1, False, 16)), (7, L(8192, 1, False, 16), L(8192, 1, False, 16)),
    ],
}


def _short_last_program(m: int, bwd: _common.Launch) -> int:
    """m, or the next row count at which the backward grid has several programs, the last one short
    (a GPU's grid is 2 programs per SM, so small row counts give one tile per program there)."""
    while True:
        programs, per_program = _common.bwd_grid(m, bwd, torch.device(DEVICE))
        if programs > 1 and m % per_program:
            return m
        m += 1


@pytest.mark.parametrize("n", sorted(EVERY_LAUNCH))
def test_every_launch_configuration(triton_ran, n):
    """Forward and backward of both norms, residual and not, in every configuration the dispatcher can
    choose for this width (tile heights 1..max, one-block and looped rows, partial last tiles)."""
    cases = EVERY_LAUNCH[n]
    m_last, fwd_last, bwd_last = cases[-1]
    cases = cases[:-1] + [(_short_last_program(m_last, bwd_last), fwd_last, bwd_last)]
    for m, fwd, bwd in cases:
        assert _common.launch_config(n, _common.row_bucket(m)) == fwd, (n, m)
        assert _common.launch_config(n, _common.row_bucket(m), _common.BWD_TILE_ELEMS) == bwd, (n, m)
        x, w, b, r, dy, dh = _inputs((m, n), torch.float32, seed=m)
        with launches_exactly(rms_norm_fwd=1, rms_norm_bwd=1):
            run_ours = run(lambda x, w, res: rms_norm(x, w, 1e-6, residual=res), x, w, [], r, dy, dh)
        run_ref = run(lambda x, w, res: (hf_rms(x.double() + res.double(), w.double(), 1e-6), x.double() + res.double()),
                      x, w, [], r, dy, dh)
        for a, e in zip(run_ours, run_ref, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * max(1.0, m / 64))
        with launches_exactly(layer_norm_fwd=1):
            y = layer_norm(x, w, b, 1e-5)
        torch.testing.assert_close(y, F.layer_norm(x.double(), (n,), w.double(), b.double(), 1e-5).float(),
                                   rtol=1e-4, atol=1e-4)
        xg = x.clone().requires_grad_()
        with launches_exactly(layer_norm_fwd=1, layer_norm_bwd=1):
            layer_norm(xg, w, b, 1e-5).backward(dy)
        xr = x.double().requires_grad_()
        F.layer_norm(xr, (n,), w.double(), b.double(), 1e-5).backward(dy.double())
        torch.testing.assert_close(xg.grad, xr.grad.float(), rtol=1e-4, atol=1e-4)
