"""Logits parity with transformers (eager attention) on tiny random Llama and Mistral checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import minillama

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
CASES = {
    "llama-mha": ("llama", {}),
    "llama-gqa": ("llama", dict(num_key_value_heads=2)),
    "llama-mqa": ("llama", dict(num_key_value_heads=1)),
    "llama-tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-rope-linear": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})),
    # max_position_embeddings below the sequence length, so the dynamic NTK base actually grows
    "llama-rope-dynamic": ("llama", dict(max_position_embeddings=16,
                                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})),
    "llama-rope-llama3": ("llama", dict(rope_parameters={**LLAMA3, "rope_theta": 5e5})),
    "llama-rope-yarn": ("llama", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                       "original_max_position_embeddings": 16})),
    "llama-head-dim": ("llama", dict(num_key_value_heads=2, head_dim=24)),
    "llama-bias": ("llama", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "mistral-window": ("mistral", dict(num_key_value_heads=2, sliding_window=5)),
    "mistral-window-tied": ("mistral", dict(num_key_value_heads=1, sliding_window=7, tie_word_embeddings=True)),
    "mistral-no-window": ("mistral", dict(num_key_value_heads=2, sliding_window=None)),
}


def _ids(batch: int = 3, seq: int = 24, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp32_logits_match_transformers(make_hf, case):
    model_type, overrides = CASES[case]
    ref_model, path = make_hf(model_type, **overrides)
    ours = minillama.from_pretrained(path)
    ids = _ids()
    with torch.no_grad():
        ref = ref_model(ids).logits
        got = ours(ids)
    assert got.shape == (3, 24, 128)
    torch.testing.assert_close(got, ref)


def test_transformers_4x_config_spelling(make_hf):
    """rope_theta + rope_scaling (with the old 'type' key) load the same model as rope_parameters."""
    ref_model, path = make_hf("llama", num_key_value_heads=2,
                              rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=500.0, rope_scaling={"type": "linear", "factor": 2.0}, torch_dtype="float32")
    (path / "config.json").write_text(json.dumps(cfg))
    ours = minillama.from_pretrained(path)
    assert ours.config.rope.rope_type == "linear" and ours.config.rope.theta == 500.0
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref_model(ids).logits)


# Low-precision tolerance: transformers' eager attention rounds the softmax to bf16/fp16 before
# the value matmul while SDPA keeps it in fp32, and matmul blocking differs; both sides are one
# rounding step (2^-8 bf16, 2^-11 fp16) per op from fp32. The bound is a fraction of the logit scale.
LOW_PRECISION = {torch.bfloat16: 0.05, torch.float16: 0.01}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["llama-gqa", "mistral-window"])
def test_low_precision_logits_match_transformers(make_hf, case, dtype):
    model_type, overrides = CASES[case]
    _, path = make_hf(model_type, **overrides)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    ours = minillama.from_pretrained(path, dtype=dtype)
    assert ours.embed.weight.dtype == dtype
    ids = _ids()
    with torch.no_grad():
        ref = ref_model(ids).logits.float()
        got = ours(ids).float()
        exact = minillama.from_pretrained(path)(ids)
    scale = exact.abs().max()
    assert (got - ref).abs().max() <= LOW_PRECISION[dtype] * scale
    # ours is no further from the fp32 truth than transformers is (plus one rounding step)
    assert (got - exact).abs().max() <= 2 * (ref - exact).abs().max() + LOW_PRECISION[dtype] * scale / 4
