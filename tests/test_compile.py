"""torch.compile(fullgraph=True) through the registered norm ops (their CPU torch implementation)."""

from __future__ import annotations

import pytest
import torch

import minillama
from minillama.kernels import _common, layer_norm


@pytest.fixture
def through_op(monkeypatch):
    monkeypatch.setattr(_common, "CPU_THROUGH_OP", True)


@pytest.mark.slow
def test_model_compiles_without_graph_breaks(make_hf, through_op):
    _, path = make_hf("llama", num_key_value_heads=2)
    model = minillama.from_pretrained(path)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(ids)
        explained = torch._dynamo.explain(model)(ids)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        assert "minillama.rms_norm_fwd" in str(explained.graphs[0].code)
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(ids), eager)


@pytest.mark.slow
def test_training_step_compiles_through_the_backward_ops(through_op):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 32)
    res = torch.randn(4, 6, 32)
    w, b = torch.rand(32) + 0.5, torch.randn(32)

    def step(x, res, w, b):
        y, h = minillama.kernels.rms_norm(x, w, 1e-6, residual=res)
        z, _ = layer_norm(y, w, b, 1e-5, residual=h)
        return (z * z).sum()

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        inputs = [t.clone().requires_grad_() for t in (x, res, w, b)]
        fn(*inputs).backward()
        grads.append([t.grad for t in inputs])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_eager_calls_skip_the_op_dispatch(through_op, monkeypatch):
    """Eager code calls the kernels directly (the custom op's dispatch costs more host time than a
    small kernel): the ops are for torch.compile, which the test above checks."""
    import importlib

    def forbidden(*args, **kwargs):
        raise AssertionError("eager call went through the custom op")

    for name, op in (("rms_norm", "rms_norm_fwd"), ("layer_norm", "layer_norm_fwd")):
        monkeypatch.setattr(importlib.import_module(f"minillama.kernels.{name}"), op, forbidden)
    x, res = torch.randn(3, 32, requires_grad=True), torch.randn(3, 32, requires_grad=True)
    w, b = torch.rand(32, requires_grad=True), torch.randn(32)
    with torch.no_grad():
        minillama.kernels.rms_norm(x, w, residual=res)
        layer_norm(x, w, b)
    y, h = minillama.kernels.rms_norm(x, w, residual=res)
    (layer_norm(y, w, b) * h).sum().backward()
    # the gradients equal autograd through the textbook formulas (so the direct path is the right one)
    xr, rr, wr = (t.detach().clone().requires_grad_() for t in (x, res, w))
    hr = xr + rr
    yr = hr * torch.rsqrt(hr.pow(2).mean(-1, keepdim=True) + 1e-6) * wr
    (torch.nn.functional.layer_norm(yr, (32,), wr, b, 1e-5) * hr).sum().backward()
    for got, want in ((x.grad, xr.grad), (res.grad, rr.grad), (w.grad, wr.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
