"""tools/make_model.py's published shapes: every family has one; each reads into a ModelConfig with its
family's distinctive fields (at full size, config only) and, built --tiny with a few layers, loads in
transformers and minillama with the same logits."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import minillama
from minillama.config import FAMILIES, ModelConfig, from_hf_config
from minillama.errors import MinillamaError
from minillama.tokenizer import byte_tokenizer

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))
try:
    import make_model as mm
finally:
    sys.path.pop(0)

# Layers to build: enough for each per-layer pattern to show (Gemma 3's sixth layer is its first
# full one, SmolLM3's fourth its first without RoPE).
LAYERS = {"gemma3-1b": 6, "smollm3-3b": 4}


def full_config(shape: str, *, real_vocab: bool = False) -> ModelConfig:
    """The shape at its published size and layer count, as minillama reads it (no weights)."""
    return from_hf_config(mm.shape_config(shape, byte_tokenizer(), real_vocab=real_vocab), shape)


# What makes each shape its family, read back from config.json at full size.
DISTINCTIVE: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(model_type="llama", num_key_value_heads=3, tie_word_embeddings=True),
    "llama-1b": dict(model_type="llama", tie_word_embeddings=True, max_position_embeddings=131072),
    "llama-3-8b": dict(model_type="llama", tie_word_embeddings=False, num_key_value_heads=8),
    "mistral-7b": dict(model_type="mistral", sliding_window=4096, layer_types=None),
    "qwen2.5-0.5b": dict(qkv_bias=True, o_bias=False, mlp_bias=False, sliding_window=None, head_dim=64),
    "qwen3-0.6b": dict(qk_norm="head", qkv_bias=False, head_dim=128, num_attention_heads=16, hidden_size=1024),
    "gemma-2b": dict(norm_offset=1.0, norm_fp32_gain=True, embed_scale=2048**0.5, embed_scale_in_dtype=True,
                     hidden_act="gelu_pytorch_tanh", num_key_value_heads=1, head_dim=256, norm_placement="pre"),
    "gemma2-2b": dict(norm_placement="sandwich", attn_softcap=50.0, final_softcap=30.0, attn_scale=256**-0.5,
                      sliding_window=4096, norm_offset=1.0, hidden_act="gelu_pytorch_tanh", qk_norm=None,
                      layer_types=["sliding", "full"] * 13),
    "gemma3-1b": dict(norm_placement="sandwich", qk_norm="head", sliding_window=512, attn_softcap=None,
                      final_softcap=None, attn_scale=256**-0.5, num_key_value_heads=1,
                      layer_types=(["sliding"] * 5 + ["full"]) * 4 + ["sliding"] * 2),
    "phi3-mini-4k": dict(sliding_window=2047, layer_types=None, partial_rotary_factor=1.0, num_key_value_heads=32,
                         tie_word_embeddings=False),
    "phi4-mini": dict(partial_rotary_factor=0.75, tie_word_embeddings=True, num_key_value_heads=8,
                      max_position_embeddings=131072, head_dim=128),
    "olmo2-1b": dict(norm_placement="post", qk_norm="proj", norm_fp32_gain=True, norm_offset=0.0),
    "smollm3-3b": dict(nope_layers=list(range(3, 36, 4)), sliding_window=None, num_key_value_heads=4),
    "granite-3.1-2b": dict(embed_scale=12.0, residual_scale=0.22, attn_scale=0.015625, logits_divisor=8.0),
}


def test_every_family_has_a_shape_and_every_shape_its_checks():
    assert {s["model_type"] for s in mm.SHAPES.values()} == set(FAMILIES)
    assert set(DISTINCTIVE) == set(mm.SHAPES)


@pytest.mark.parametrize("shape", sorted(mm.SHAPES))
def test_full_size_config_has_the_family_fields(shape):
    cfg = full_config(shape)
    assert cfg.model_type == mm.SHAPES[shape]["model_type"]
    assert cfg.num_hidden_layers == mm.SHAPES[shape]["num_hidden_layers"] and cfg.vocab_size == 49152
    for name, want in DISTINCTIVE[shape].items():
        assert getattr(cfg, name) == want, name
    assert full_config(shape, real_vocab=True).vocab_size == mm.SHAPES[shape]["real_vocab_size"]


def test_rope_of_the_scaled_and_dual_rope_shapes():
    phi4 = full_config("phi4-mini").rope
    assert phi4.rope_type == "longrope" and phi4.original_max_position_embeddings == 4096
    assert len(phi4.long_factor) == len(phi4.short_factor) == 48  # 96 rotated dims of 128
    assert phi4.long_factor[-1] == 47.77 and set(phi4.short_factor) == {1.0}
    llama = full_config("llama-1b").rope
    assert (llama.rope_type, llama.factor, llama.original_max_position_embeddings) == ("llama3", 32.0, 8192)
    gemma3 = full_config("gemma3-1b")
    assert (gemma3.rope.theta, gemma3.rope_local.theta) == (1000000.0, 10000.0)
    assert gemma3.layer_rope(0) == "local" and gemma3.layer_rope(5) == "global"
    assert full_config("smollm3-3b").layer_rope(3) is None


# Fields --tiny changes (widths, and what follows from them); everything else must be the shape's.
_WIDTHS = {"hidden_size", "intermediate_size", "head_dim", "embed_scale", "rope", "extra"}


@pytest.mark.parametrize("shape", sorted(mm.SHAPES))
def test_tiny_keeps_the_structure(shape):
    tok = byte_tokenizer()
    layers = LAYERS.get(shape, 2)
    full = from_hf_config(mm.shape_config(shape, tok, layers=layers), shape)
    tiny = from_hf_config(mm.shape_config(shape, tok, layers=layers, tiny=True), shape)
    assert (tiny.hidden_size, tiny.intermediate_size, tiny.head_dim) == (
        full.hidden_size // 16, full.intermediate_size // 16, full.head_dim // 16)
    for f in dataclasses.fields(ModelConfig):
        if f.name not in _WIDTHS:
            assert getattr(tiny, f.name) == getattr(full, f.name), f.name
    assert (tiny.rope.rope_type, tiny.rope.theta) == (full.rope.rope_type, full.rope.theta)
    if tiny.rope.long_factor is not None:  # one factor per rotated pair of the smaller head
        assert len(tiny.rope.long_factor) == tiny.rotary_dim // 2


def test_real_vocab_smaller_than_the_tokenizer_is_refused():
    class Big:  # SmolLM2's tokenizer, as far as make_model looks
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 2

        def __len__(self) -> int:
            return 49152

    with pytest.raises(MinillamaError, match=r"phi3-mini-4k: its published vocabulary \(32064\).*--tokenizer byte"):
        mm.shape_config("phi3-mini-4k", Big(), real_vocab=True)
    # The family's own default pad id (32000, 128004) never survives past a smaller vocabulary.
    for shape in ("phi3-mini-4k", "smollm3-3b"):
        assert mm.shape_config(shape, Big())["pad_token_id"] == 2


# At the tokenizer's vocabulary: the published one only changes the embedding's rows (up to
# 262144, seconds a build), which test_cli_tiny_real_vocab checks once.
@pytest.mark.parametrize("shape", sorted(mm.SHAPES))
def test_tiny_shape_loads_in_transformers_and_minillama_with_equal_logits(shape, tmp_path, real_vocab=False):
    out = mm.make_model(shape, tmp_path / shape, dtype="float32", layers=LAYERS.get(shape, 2), tiny=True,
                        real_vocab=real_vocab, tokenizer=byte_tokenizer())
    written = json.loads((out / "config.json").read_text())
    assert written["vocab_size"] == (mm.SHAPES[shape]["real_vocab_size"] if real_vocab else 49152)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = minillama.from_pretrained(out, prepack=False)
    for name, want in DISTINCTIVE[shape].items():
        if name not in ("hidden_size", "head_dim", "embed_scale", "layer_types", "nope_layers"):  # widths, layers
            assert getattr(ours.config, name) == want, name
    ids = torch.randint(0, written["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.slow
def test_cli_tiny_real_vocab(tmp_path):
    out = tmp_path / "g3"
    run = subprocess.run([sys.executable, str(TOOLS / "make_model.py"), "--shape", "gemma3-1b", "--tiny",
                          "--real-vocab", "--layers", "6", "--tokenizer", "byte", "--dtype", "float32",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["head_dim"], cfg["sliding_window"]) == (262144, 72, 16, 512)
    assert cfg["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
