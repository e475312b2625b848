"""The CPU fast path: projections prepacked for oneDNN at load, used only for inference."""

from __future__ import annotations

import warnings

import pytest
import torch

import minillama
from minillama import generate
from minillama.linear import Linear, can_prepack, packed_bytes

pytestmark = pytest.mark.skipif(not can_prepack(torch.float32), reason="oneDNN prepacking unavailable here")

PROMPTS = [[5, 17, 3], [9, 8, 7, 6, 5, 4, 3]]


def _pair(path, **kwargs):
    return minillama.from_pretrained(path, **kwargs), minillama.from_pretrained(path, prepack=False, **kwargs)


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", dict(num_key_value_heads=2)),
    ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    ("mistral", dict(num_key_value_heads=2, sliding_window=5)),
])
def test_prepacked_equals_plain(make_hf, model_type, overrides):
    _, path = make_hf(model_type, **overrides)
    for dtype, tol in ((torch.float32, dict(rtol=1e-5, atol=1e-5)), (torch.bfloat16, dict(rtol=2e-2, atol=4e-2))):
        packed, plain = _pair(path, dtype=dtype)
        # oneDNN packs bf16 only on CPUs with AVX-512 (or AVX-NE-CONVERT): elsewhere the probe says
        # no and the model runs the plain path, as it must
        assert (packed_bytes(packed) > 0) == can_prepack(dtype) and packed_bytes(plain) == 0
        ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(packed(ids), plain(ids), **tol)
        if dtype == torch.float32:  # greedy tokens identical, batched and ragged
            assert torch.equal(generate(packed, PROMPTS, 24, eos_token_id=[]),
                               generate(plain, PROMPTS, 24, eos_token_id=[]))


def test_packed_path_is_taken_only_for_inference(make_hf, monkeypatch):
    _, path = make_hf("llama", num_key_value_heads=2)
    model = minillama.from_pretrained(path)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or real(*a))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        before = model(ids)
    assert len(calls) == sum(isinstance(m, Linear) for m in model.modules())  # every projection
    calls.clear()
    logits = model(ids)  # gradients wanted: the ordinary parameters, so autograd reaches them
    logits.sum().backward()
    assert not calls and model.layers[0].attn.wo.weight.grad is not None
    torch.testing.assert_close(logits.detach(), before, rtol=1e-5, atol=1e-5)


def test_state_dict_save_and_training_see_the_original_parameters(make_hf, tmp_path):
    _, path = make_hf("llama", num_key_value_heads=2)
    packed, plain = _pair(path)
    sd, ref = packed.state_dict(), plain.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    assert all(t.layout == torch.strided for t in sd.values())
    minillama.save_pretrained(packed, tmp_path / "saved")
    again = minillama.from_pretrained(tmp_path / "saved", prepack=False)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ref.values(), strict=True))

    # a training step: train() drops the packed copies, the optimizer updates the parameters
    packed.train()
    assert packed_bytes(packed) == 0
    opt = torch.optim.SGD(packed.parameters(), lr=0.1)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    packed(ids).logsumexp(-1).mean().backward()
    opt.step()
    packed.eval()
    trained = {k: v.clone() for k, v in packed.state_dict().items()}
    plain.load_state_dict(trained)
    with torch.no_grad():
        torch.testing.assert_close(packed(ids), plain(ids))


def test_a_changed_weight_never_uses_a_stale_packed_copy(make_hf):
    _, path = make_hf("llama", num_key_value_heads=2)
    packed, plain = _pair(path)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        for model in (packed, plain):
            model.layers[0].mlp.w_down.weight.mul_(1.5)  # in place: a new version of the same tensor
        torch.testing.assert_close(packed(ids), plain(ids), rtol=1e-5, atol=1e-5)
        packed.to(torch.bfloat16)  # a new tensor in another dtype
        plain.to(torch.bfloat16)
        torch.testing.assert_close(packed(ids), plain(ids), rtol=0, atol=0)


def test_lora_sees_and_merges_the_original_weights(make_hf):
    from minillama.train.config import LoraSection
    from minillama.train.lora import apply_lora, merge_lora

    _, path = make_hf("llama", num_key_value_heads=2)
    packed, plain = _pair(path)
    ids = torch.tensor([[2, 7, 1, 8]])
    outs = []
    for model in (packed, plain):
        torch.manual_seed(0)
        lora = apply_lora(model, LoraSection(r=4, alpha=8, targets=["wqkv", "w_down"]))
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.2)
            unmerged = lora(ids)
            merged = merge_lora(lora)(ids)
        torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
        outs.append(merged)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_fallback_when_the_ops_are_missing(make_hf, monkeypatch):
    _, path = make_hf("llama", num_key_value_heads=2)
    plain = minillama.from_pretrained(path, prepack=False)
    can_prepack.cache_clear()
    monkeypatch.delattr(torch.ops.mkldnn, "_reorder_linear_weight", raising=False)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing alarming is said
            model = minillama.from_pretrained(path)
        assert packed_bytes(model) == 0
        assert torch.equal(generate(model, PROMPTS, 8, eos_token_id=[]), generate(plain, PROMPTS, 8, eos_token_id=[]))
    finally:
        can_prepack.cache_clear()


def test_environment_opt_out(make_hf, monkeypatch):
    _, path = make_hf("llama")
    monkeypatch.setenv("MINILLAMA_PREPACK", "0")
    assert packed_bytes(minillama.from_pretrained(path)) == 0
    assert packed_bytes(minillama.from_pretrained(path, prepack=True)) > 0


def test_linear_is_an_nn_linear():
    layer = Linear(8, 4)
    assert isinstance(layer, torch.nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}


def test_a_copy_of_a_prepacked_model_works(make_hf):
    import copy

    packed, plain = _pair(make_hf("llama", num_key_value_heads=2)[1])
    clone = copy.deepcopy(packed)  # oneDNN's packed tensor cannot be copied: the clone runs plain
    assert packed_bytes(clone) == 0 and packed_bytes(packed) > 0
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        torch.testing.assert_close(clone(ids), plain(ids), rtol=0, atol=0)
