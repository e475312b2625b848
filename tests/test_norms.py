"""The norm registry: every norm builds into a model, RMSNorm variants agree, swaps load and are stated."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import minillama
from minillama import CheckpointError, ConfigError
from minillama.norms import NORMS, build_norm

RMS_FAMILY = ["rmsnorm", "rmsnorm-torch", "rmsnorm-native", "rmsnorm-compiled", "prmsnorm:p=1"]
LAYERNORMS = ["layernorm", "layernorm-triton"]


@pytest.mark.parametrize("name", sorted(NORMS))
def test_every_norm_loads_into_a_pretrained_model_and_runs(make_hf, name):
    _, path = make_hf("llama", num_key_value_heads=2)
    base = minillama.from_pretrained(path)
    if base.layers[0].attn_norm.hf_compatible and name in RMS_FAMILY:
        model = minillama.from_pretrained(path, norm=name)
    else:
        with pytest.warns(UserWarning, match=f"RMSNorm gains loaded into '{name}'"):
            model = minillama.from_pretrained(path, norm=name)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()
    # gamma comes from the checkpoint; any beta starts at zero
    torch.testing.assert_close(model.layers[1].mlp_norm.weight, base.layers[1].mlp_norm.weight)
    bias = getattr(model.layers[1].mlp_norm, "bias", None)
    assert bias is None or not bias.any()
    extra = sum(p.numel() for n, p in model.named_parameters() if n.endswith("norm.bias"))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters()) + extra


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_rmsnorm_variants_agree(dtype, tol):
    x = torch.randn(3, 5, 64, dtype=dtype)
    weight = (torch.rand(64) + 0.5).to(dtype)
    outs = []
    for name in RMS_FAMILY:
        norm = build_norm(name, 64, 1e-6).to(dtype)
        norm.weight.data.copy_(weight)
        outs.append(norm(x).float())
    for name, out in zip(RMS_FAMILY[1:], outs[1:], strict=True):
        torch.testing.assert_close(out, outs[0], atol=tol, rtol=tol, msg=name)


def test_partial_rmsnorm_uses_the_first_p_features():
    norm = build_norm("prmsnorm:p=0.25", 64, 1e-6)
    x = torch.randn(2, 64)
    expected = x * torch.rsqrt(x[:, :16].pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), expected)
    assert norm.k == 16


@pytest.mark.parametrize("name", LAYERNORMS)
def test_layernorm_variants_agree_with_f_layer_norm(name):
    norm = build_norm(name, 48, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x, r = torch.randn(4, 48), torch.randn(4, 48)
    torch.testing.assert_close(norm(x), F.layer_norm(x, (48,), norm.weight, norm.bias, 1e-5))
    y, h = norm.add_norm(x, r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (48,), norm.weight, norm.bias, 1e-5))


def test_batchnorm_statistics_span_batch_and_positions():
    norm = build_norm("batchnorm", 8, 1e-5).train()
    x = torch.randn(4, 6, 8) * 3 + 1
    y = norm(x)
    torch.testing.assert_close(y.mean((0, 1)), torch.zeros(8), atol=1e-5, rtol=0)
    assert not torch.equal(norm(x[:1]), y[:1])  # one sequence's output depends on the batch


def test_swapped_norm_cannot_be_saved_as_llama(make_hf, tmp_path):
    _, path = make_hf("llama")
    with pytest.warns(UserWarning):
        model = minillama.from_pretrained(path, norm="layernorm")
    with pytest.raises(CheckpointError, match="norm 'layernorm' has no Llama/Mistral equivalent"):
        minillama.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec,message", [
    ("groupnorm", "unknown norm 'groupnorm'"),
    ("prmsnorm:p", "option 'p' is not key=number"),
    ("prmsnorm:p=x", "option 'p=x' is not key=number"),
    ("prmsnorm:p=2", "p must be in (0, 1]"),
    ("rmsnorm:q=1", "unexpected keyword argument 'q'"),
])
def test_bad_norm_names(spec, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_norm(spec, 8, 1e-6)


@pytest.mark.slow
def test_smollm2_parameter_counts_match_the_docs(smollm2_dir):
    docs = (Path(__file__).resolve().parent.parent / "docs" / "norms.md").read_text()
    for name in ("rmsnorm", "layernorm"):
        model = minillama.from_pretrained(smollm2_dir, norm=name) if name == "rmsnorm" else None
        if model is None:
            with pytest.warns(UserWarning, match="61 x 576|35,136"):
                model = minillama.from_pretrained(smollm2_dir, norm=name)
        count = sum(p.numel() for p in model.parameters())
        assert re.search(rf"\| `{name}` \|[^\n]*\| {count:,} \|", docs), (name, count)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 576), (7, 64), (3, 5, 2048), (512, 576), (2, 4099)])
def test_cpu_rmsnorm_is_transformers_bit_for_bit(dtype, shape):
    """The CPU path normalises with F.rms_norm (one kernel): it must stay transformers' formula exactly."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from minillama.kernels import rms_norm

    gen = torch.Generator().manual_seed(shape[-1])
    x = (3 * torch.randn(shape, generator=gen)).to(dtype)
    res = torch.randn(shape, generator=gen).to(dtype)
    hf = LlamaRMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.2 * torch.randn(shape[-1], generator=gen))
        hf.to(dtype)
        assert torch.equal(rms_norm(x, hf.weight, 1e-5), hf(x))
        y, h = rms_norm(x, hf.weight, 1e-5, residual=res)
        assert torch.equal(h, x + res) and torch.equal(y, hf(x + res))
