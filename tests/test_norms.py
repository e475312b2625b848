"""The norm registry: every norm builds into a model, RMSNorm variants agree, swaps load and are stated."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import minillama
from minillama import CheckpointError, ConfigError
from minillama.norms import NORMS, build_norm

RMS_FAMILY = ["rmsnorm", "rmsnorm-torch", "rmsnorm-native", "rmsnorm-compiled", "prmsnorm:p=1"]
LAYERNORMS = ["layernorm", "layernorm-triton", "layernorm-compiled"]

# SmolLM2-135M (vocab 49152, hidden 576, 30 layers, MLP 1536, 9 query / 3 key-value heads of 64,
# tied embeddings), counted by hand: 49152 * 576 = 28,311,552 embedding; per layer q, o 576 * 576
# and k, v 576 * 192 (884,736), MLP 3 * 576 * 1536 (2,654,208), two norms 2 * 576: 3,540,096; x 30
# = 106,202,880; final norm 576. A norm with a bias adds 61 norms x 576 = 35,136.
SMOLLM2_RMS = 28_311_552 + 30 * 3_540_096 + 576  # 134,515,008
SMOLLM2_2D = SMOLLM2_RMS + 61 * 576  # 134,550,144
# Every registered norm and what docs/norms.md's table must say of it: parameters per norm, and
# SmolLM2-135M's parameter count with it (reference_norm below is each one's formula).
NORM_TABLE = {
    "rmsnorm": ("d", SMOLLM2_RMS),
    "rmsnorm-torch": ("d", SMOLLM2_RMS),
    "rmsnorm-native": ("d", SMOLLM2_RMS),
    "rmsnorm-compiled": ("d", SMOLLM2_RMS),
    "prmsnorm": ("d", SMOLLM2_RMS),
    "layernorm": ("2d", SMOLLM2_2D),
    "layernorm-triton": ("2d", SMOLLM2_2D),
    "layernorm-compiled": ("2d", SMOLLM2_2D),
    "batchnorm": ("2d", SMOLLM2_2D),
}


def reference_norm(name: str, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The named norm's formula in fp64 over the last dimension, with gain w; a beta loaded from an
    RMSNorm checkpoint is 0, so none appears (batchnorm: in eval, with the running statistics a
    checkpoint load leaves, mean 0 and variance 1)."""
    x, w = x.double(), w.double()
    if name.startswith("rmsnorm"):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    if name == "prmsnorm":  # default p = 0.0625: the first max(1, int(d * p)) features
        k = max(1, int(x.shape[-1] * 0.0625))
        return x * torch.rsqrt(x[..., :k].pow(2).mean(-1, keepdim=True) + eps) * w
    if name.startswith("layernorm"):
        mean = x.mean(-1, keepdim=True)
        return (x - mean) * torch.rsqrt((x - mean).pow(2).mean(-1, keepdim=True) + eps) * w
    if name == "batchnorm":
        return x / (1.0 + eps) ** 0.5 * w
    raise AssertionError(f"no reference for {name!r}: add it to NORM_TABLE and reference_norm")


class _ReferenceNorm(torch.nn.Module):
    """A transformers norm module replaced by reference_norm (same gain, same eps)."""

    def __init__(self, name: str, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.name, self.w, self.eps = name, weight.detach().clone(), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference_norm(self.name, x, self.w, self.eps).to(x.dtype)


def test_registry_is_the_documented_list():
    assert sorted(NORMS) == sorted(NORM_TABLE)


@pytest.mark.parametrize("name", sorted(NORM_TABLE))
def test_parameters_per_norm(name):
    per_norm, _ = NORM_TABLE[name]
    norm = build_norm(name, 576, 1e-6)
    params = dict(norm.named_parameters())
    assert sorted(params) == (["bias", "weight"] if per_norm == "2d" else ["weight"])
    assert sum(p.numel() for p in params.values()) == (2 * 576 if per_norm == "2d" else 576)


@pytest.mark.parametrize("name", sorted(NORMS))
def test_every_norm_loads_into_a_pretrained_model_and_runs(make_hf, name):
    hf, path = make_hf("llama", num_key_value_heads=2)
    base = minillama.from_pretrained(path)
    if base.layers[0].attn_norm.hf_compatible and name in RMS_FAMILY:
        model = minillama.from_pretrained(path, norm=name)
    else:
        with pytest.warns(UserWarning, match=f"RMSNorm gains loaded into '{name}'"):
            model = minillama.from_pretrained(path, norm=name)
    # The logits are transformers' model's with each of its norms replaced by the named norm's
    # formula (tests' own, fp64), with the checkpoint's gains and eps.
    eps = hf.config.rms_norm_eps
    for layer in hf.model.layers:
        for attr in ("input_layernorm", "post_attention_layernorm"):
            setattr(layer, attr, _ReferenceNorm(name, getattr(layer, attr).weight, eps))
    hf.model.norm = _ReferenceNorm(name, hf.model.norm.weight, eps)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    # gamma comes from the checkpoint; a norm with a beta (2d parameters) starts it at zero
    per_norm, _ = NORM_TABLE[name]
    torch.testing.assert_close(model.layers[1].mlp_norm.weight, base.layers[1].mlp_norm.weight)
    biases = {n: p for n, p in model.named_parameters() if n.endswith("bias")}
    assert len(biases) == (5 if per_norm == "2d" else 0)  # 2 per block x 2 blocks + the final norm
    for n, bias in biases.items():
        assert torch.equal(bias, torch.zeros(64)), n
    # 128 x 64 embedding and LM head, per layer q, o 64 x 64 + k, v 64 x 32 + MLP 3 x 64 x 96 + norms
    # 2 x 64 (30,848), 2 layers, a final norm of 64: 78,144; a beta adds 5 x 64.
    assert sum(p.numel() for p in model.parameters()) == 78_144 + len(biases) * 64


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_rmsnorm_variants_agree(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=gen).to(dtype)
    weight = (torch.rand(64, generator=gen) + 0.5).to(dtype)
    outs = []
    for name in RMS_FAMILY:
        norm = build_norm(name, 64, 1e-6).to(dtype)
        norm.weight.data.copy_(weight)
        outs.append(norm(x).float())
    for name, out in zip(RMS_FAMILY[1:], outs[1:], strict=True):
        torch.testing.assert_close(out, outs[0], atol=tol, rtol=tol, msg=lambda m, n=name: f"{n} vs rmsnorm: {m}")
    # Each against the formula in fp64: in bf16 at most two roundings (the normalised value, then the
    # product), each within half an ulp, 2^-8 of the value: 2^-7 in all (+10%).
    ref = reference_norm("rmsnorm", x, weight, 1e-6).float()
    rtol = 1e-5 if dtype == torch.float32 else 1.1 * 2 ** -7
    for name, out in zip(RMS_FAMILY, outs, strict=True):
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=rtol, msg=lambda m, n=name: f"{n} vs fp64: {m}")


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

    def batch_norm(x, mean, var):  # gain 1, bias 0 as built
        return ((x.double() - mean) / torch.sqrt(var + 1e-5)).float()

    def stats(x):  # over batch and positions: (mean, biased variance, unbiased variance) per feature
        rows = x.double().reshape(-1, 8)
        return rows.mean(0), rows.var(0, unbiased=False), rows.var(0, unbiased=True)

    y = norm(x)
    torch.testing.assert_close(y.mean((0, 1)), torch.zeros(8), atol=1e-5, rtol=0)
    mean, var, var_unbiased = stats(x)
    torch.testing.assert_close(y, batch_norm(x, mean, var))
    y1 = norm(x[:1])
    mean1, var1, var1_unbiased = stats(x[:1])
    torch.testing.assert_close(y1, batch_norm(x[:1], mean1, var1))  # its own sequence's statistics
    assert not torch.equal(y1, y[:1])  # one sequence's output depends on the batch
    # running averages (momentum 0.1, from mean 0 / variance 1), unbiased variance, then used in eval
    running_mean = 0.9 * (0.1 * mean) + 0.1 * mean1
    running_var = 0.9 * (0.9 + 0.1 * var_unbiased) + 0.1 * var1_unbiased
    torch.testing.assert_close(norm.running_mean, running_mean.float())
    torch.testing.assert_close(norm.running_var, running_var.float())
    torch.testing.assert_close(norm.eval()(x), batch_norm(x, running_mean, running_var))


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


DOCS = Path(__file__).resolve().parent.parent / "docs" / "norms.md"


def test_docs_table_states_every_norm_and_its_parameter_counts():
    """docs/norms.md's norm table: one row per registered norm, with the counts worked out above."""
    rows = re.findall(r"^\| `([^`]+)` \|[^\n]*\| (\w+) \| ([\d,]+) \|$", DOCS.read_text(), re.M)
    assert {name: (per_norm, int(count.replace(",", ""))) for name, per_norm, count in rows} == NORM_TABLE
    assert len(rows) == len(NORM_TABLE)  # no norm listed twice


@pytest.mark.slow
def test_smollm2_parameter_counts_match_the_docs(smollm2_dir):
    docs = DOCS.read_text()
    for name in ("rmsnorm", "layernorm"):
        model = minillama.from_pretrained(smollm2_dir, norm=name) if name == "rmsnorm" else None
        if model is None:
            with pytest.warns(UserWarning, match="61 x 576|35,136"):
                model = minillama.from_pretrained(smollm2_dir, norm=name)
        count = sum(p.numel() for p in model.parameters())
        assert count == NORM_TABLE[name][1], (name, count)  # the hand count above
        assert re.search(rf"\| `{name}` \|[^\n]*\| {count:,} \|", docs), (name, count)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 576), (7, 64), (3, 5, 2048), (512, 576), (2, 4099)])
def test_cpu_rmsnorm_is_transformers_bit_for_bit(dtype, shape):
    """Both CPU paths must stay transformers' formula exactly: the torch code (F.rms_norm, one kernel)
    and the C++ kernels of eager inference (tests/test_cpu_norms.py)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from minillama.kernels import rms_norm, torch_path

    gen = torch.Generator().manual_seed(shape[-1])
    x = (3 * torch.randn(shape, generator=gen)).to(dtype)
    res = torch.randn(shape, generator=gen).to(dtype)
    hf = LlamaRMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.2 * torch.randn(shape[-1], generator=gen))
        hf.to(dtype)
        for path in (torch_path, contextlib.nullcontext):  # the torch code, then the C++ kernels
            with path():
                assert torch.equal(rms_norm(x, hf.weight, 1e-5), hf(x))
                y, h = rms_norm(x, hf.weight, 1e-5, residual=res)
            assert torch.equal(h, x + res) and torch.equal(y, hf(x + res))
