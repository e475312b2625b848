#!/usr/bin/env python
"""A random-weight checkpoint of a real model's shape, for benchmarks without a download.

Writes an ordinary Hugging Face directory (config.json, safetensors shards, tokenizer) that
transformers and minillama both load. Weights are N(0, 0.02) as transformers initialises them, so
speed and memory are the real model's; the text it generates is noise. Vocabularies are the
tokenizer's (SmolLM2's 49152 when the embedded model is installed, else the byte tokenizer with
the vocabulary kept at 49152), so prompts encode the same way in every shape.

--real-vocab uses the shape's published vocabulary instead (Qwen's 151936, Gemma 3's 262144, ...),
so the embedding and output projection cost what the real model's do; the tokenizer is unchanged and
only its ids are used. A published vocabulary smaller than the tokenizer (Phi-3's 32064 against
SmolLM2's 49152) is an error: pass `--tokenizer byte` for that one.

--tiny divides every width by 16 (hidden, MLP and head size) and keeps the rest of the shape: head
counts, RoPE and its scaling (longrope factor lists thinned to the fewer rotated pairs), windows and
the per-layer pattern, norms, soft-caps and multipliers. For tests that need each family's structure
in a model small enough to build in a second.

    python tools/make_model.py --shape llama-1b --out models/llama-1b --dtype bfloat16
    python tools/make_model.py --shape mistral-7b --out models/mistral-7b --layers 4   # cut to 4 layers
    python tools/make_model.py --shape qwen2.5-0.5b --out models/qwen --real-vocab     # 151936 tokens
    python tools/make_model.py --shape gemma3-1b --out /tmp/g3 --tiny --layers 6 --dtype float32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from minillama import ModelConfig, Transformer, load_tokenizer, save_pretrained
from minillama.config import from_hf_config
from minillama.errors import MinillamaError

# Phi-4-mini's longrope factors, one per rotated pair (head_dim 128 x partial_rotary_factor 0.75 = 96
# dims, 48 pairs), from microsoft/Phi-4-mini-instruct's config.json.
_PHI4_MINI_LONG_FACTOR = [
    1.0, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
    2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845,
    5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158,
    11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105,
    25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71,
    32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
]

# The published shapes: each entry is the model's config.json (the fields that shape the model;
# token ids come from the tokenizer) plus real_vocab_size, the published vocabulary (--real-vocab).
# Per-layer patterns are given as their generators (sliding_window_pattern, no_rope_layer_interval,
# transformers' Gemma 2 default), not as lists, so that --layers cuts them like the real model's.
SHAPES: dict[str, dict[str, Any]] = {
    # HuggingFaceTB/SmolLM2-135M
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
                         real_vocab_size=49152),
    # meta-llama/Llama-3.2-1B
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                     rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                     real_vocab_size=128256),
    # meta-llama/Meta-Llama-3-8B
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                       rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
                       real_vocab_size=128256),
    # mistralai/Mistral-7B-v0.1
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                       rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=32768, sliding_window=4096,
                       real_vocab_size=32000),
    # Qwen/Qwen2.5-0.5B: q/k/v biases; the window is off (use_sliding_window false), as published.
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
                         use_sliding_window=False, sliding_window=32768, max_window_layers=24,
                         real_vocab_size=151936),
    # Qwen/Qwen3-0.6B: q/k RMSNorm per head; 16 heads of 128 on a 1024 residual.
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=40960,
                       attention_bias=False, use_sliding_window=False, sliding_window=None, max_window_layers=28,
                       real_vocab_size=151936),
    # google/gemma-2b: gain 1 + w, embeddings times sqrt(hidden), one kv head. Its config.json says
    # hidden_act "gelu", which transformers reads as the tanh approximation it was trained with.
    "gemma-2b": dict(model_type="gemma", hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                     num_attention_heads=8, num_key_value_heads=1, head_dim=256, tie_word_embeddings=True,
                     rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6, max_position_embeddings=8192,
                     hidden_act="gelu_pytorch_tanh", attention_bias=False, real_vocab_size=256000),
    # google/gemma-2-2b: sandwich norms, soft-caps, sliding layers alternating with full ones
    # (layer 0 slides: transformers' default layer_types), scores scaled by query_pre_attn_scalar.
    "gemma2-2b": dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=256, tie_word_embeddings=True,
                      rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=8192,
                      hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=4096,
                      attn_logit_softcapping=50.0, final_logit_softcapping=30.0, attention_bias=False,
                      real_vocab_size=256000),
    # google/gemma-3-1b-pt: five sliding layers (RoPE base 10000) to one full (base 1e6), q/k norms.
    "gemma3-1b": dict(model_type="gemma3_text", hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=256, tie_word_embeddings=True,
                      rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling=None, rms_norm_eps=1e-6,
                      max_position_embeddings=32768, hidden_activation="gelu_pytorch_tanh",
                      query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6,
                      attn_logit_softcapping=None, final_logit_softcapping=None, attention_bias=False,
                      real_vocab_size=262144),
    # microsoft/Phi-3-mini-4k-instruct: fused qkv and gate/up projections, a 2047 window on every layer.
    "phi3-mini-4k": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
                         rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-5, max_position_embeddings=4096,
                         original_max_position_embeddings=4096, sliding_window=2047, attention_bias=False,
                         real_vocab_size=32064),
    # microsoft/Phi-4-mini-instruct: 3/4 of each head rotated, longrope to 131072 (short factors all 1).
    "phi4-mini": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                      num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True,
                      rope_theta=10000.0, partial_rotary_factor=0.75, rms_norm_eps=1e-5,
                      max_position_embeddings=131072, original_max_position_embeddings=4096,
                      rope_scaling={"type": "longrope", "short_factor": [1.0] * 48,
                                    "long_factor": _PHI4_MINI_LONG_FACTOR},
                      sliding_window=262144, attention_bias=False, mlp_bias=False,
                      real_vocab_size=200064),
    # allenai/OLMo-2-0425-1B: norms on each sublayer's output, q/k RMSNorm over the whole projection.
    "olmo2-1b": dict(model_type="olmo2", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False,
                     rope_theta=500000.0, rope_scaling=None, rms_norm_eps=1e-6, max_position_embeddings=4096,
                     attention_bias=False, real_vocab_size=100352),
    # HuggingFaceTB/SmolLM3-3B: every fourth layer (3, 7, ...) without RoPE.
    "smollm3-3b": dict(model_type="smollm3", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True,
                       rope_theta=5000000.0, rope_scaling=None, rms_norm_eps=1e-6, max_position_embeddings=65536,
                       no_rope_layer_interval=4, use_sliding_window=False, sliding_window=None,
                       max_window_layers=28, attention_bias=False, mlp_bias=False, real_vocab_size=128256),
    # ibm-granite/granite-3.1-2b-base: muP multipliers on embeddings, residuals, scores and logits.
    "granite-3.1-2b": dict(model_type="granite", hidden_size=2048, intermediate_size=8192, num_hidden_layers=40,
                           num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                           rope_theta=5000000.0, rope_scaling=None, rms_norm_eps=1e-5, max_position_embeddings=131072,
                           embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625,
                           logits_scaling=8.0, attention_bias=False, mlp_bias=False, real_vocab_size=49155),
}


SMOLLM2_VOCAB = 49152
TINY_DIVISOR = 16


def default_tokenizer() -> Any:
    """SmolLM2's tokenizer when the embedded model is installed, else the byte tokenizer (say which)."""
    from minillama.assets import default_model_dir

    try:
        return load_tokenizer(default_model_dir())
    except MinillamaError as e:
        print(f"make_model: no embedded SmolLM2 ({e}); using the byte tokenizer, vocabulary still "
              f"{SMOLLM2_VOCAB} so the output projection keeps its real cost", file=sys.stderr)
        return load_tokenizer("byte")


def tiny_shape(shape: str, hf: dict[str, Any]) -> dict[str, Any]:
    """`hf` with hidden, MLP and head sizes divided by TINY_DIVISOR; everything else kept."""
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    out = dict(hf)
    for name, value in (("hidden_size", hf["hidden_size"]), ("intermediate_size", hf["intermediate_size"]),
                        ("head_dim", head_dim)):
        if value % TINY_DIVISOR:
            raise MinillamaError(f"shape {shape}: {name} {value} does not divide by {TINY_DIVISOR}; no --tiny")
        out[name] = value // TINY_DIVISOR
    scaling = hf.get("rope_scaling")
    if isinstance(scaling, dict) and "long_factor" in scaling:
        # One factor per rotated pair: keep every k-th, so the low-to-high frequency spread survives.
        pairs = int(out["head_dim"] * hf.get("partial_rotary_factor", 1.0)) // 2
        step = len(scaling["long_factor"]) // pairs
        out["rope_scaling"] = {**scaling, **{k: scaling[k][::step][:pairs] for k in ("short_factor", "long_factor")}}
    return out


def shape_config(shape: str, tokenizer: Any, *, layers: int | None = None, real_vocab: bool = False,
                 tiny: bool = False) -> dict[str, Any]:
    """The config.json dict make_model builds `shape` from (token ids from `tokenizer`)."""
    if shape not in SHAPES:
        raise MinillamaError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    hf = dict(SHAPES[shape])
    published = hf.pop("real_vocab_size")
    if real_vocab:
        if len(tokenizer) > published:
            raise MinillamaError(f"shape {shape}: its published vocabulary ({published}) is smaller than the "
                                 f"tokenizer's ({len(tokenizer)}); pass --tokenizer byte")
        vocab = published
    else:
        # A vocabulary at least SmolLM2's: the output projection is a large share of a small model's cost.
        vocab = max(len(tokenizer), SMOLLM2_VOCAB)
    # Token ids are the tokenizer's: the families' defaults (Phi-3's pad 32000, SmolLM3's 128004)
    # may lie past a 49152 vocabulary, which transformers refuses.
    hf.update(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id)
    if tiny:
        hf = tiny_shape(shape, hf)
    if layers is not None:
        hf["num_hidden_layers"] = layers
    return hf


@torch.no_grad()
def make_model(shape: str, out: str | Path, *, dtype: str = "bfloat16", layers: int | None = None,
               tokenizer: Any = None, seed: int = 0, real_vocab: bool = False, tiny: bool = False) -> Path:
    """Write a random `shape` checkpoint (optionally cut to `layers` layers, at its published
    vocabulary, or --tiny) to `out`; returns `out`."""
    if shape not in SHAPES:  # before the tokenizer loads
        raise MinillamaError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
    hf = shape_config(shape, tokenizer, layers=layers, real_vocab=real_vocab, tiny=tiny)
    cfg: ModelConfig = from_hf_config(hf, f"shape {shape}")
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(cfg)
    # Initialised tensor by tensor in the target dtype: an 8B model never exists in fp32.
    model = model.to(dtype=getattr(torch, dtype)).to_empty(device="cpu")
    model.tie_weights()
    model.init_weights()
    for name, p in model.named_parameters():
        if "norm" in name:
            # A gain of 1: Gemma's norms multiply by 1 + w, so their w starts at 0 (as transformers').
            p.fill_(1.0 - cfg.norm_offset)
    # 2 GB shards: the save materialises one shard at a time, beside the model (an 8B bf16 model is 16 GB).
    return save_pretrained(model, out, tokenizer=tokenizer, max_shard_size="2GB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--layers", type=int, default=None, help="keep only this many layers (a smaller test model)")
    p.add_argument("--tokenizer", default=None, help="a directory with a tokenizer, or 'byte' (default: SmolLM2's)")
    p.add_argument("--real-vocab", action="store_true", help="the shape's published vocabulary, not the tokenizer's")
    p.add_argument("--tiny", action="store_true", help=f"every width divided by {TINY_DIVISOR}, the structure kept")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    try:
        tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
        out = make_model(args.shape, args.out, dtype=args.dtype, layers=args.layers, tokenizer=tok, seed=args.seed,
                         real_vocab=args.real_vocab, tiny=args.tiny)
    except MinillamaError as e:
        print(f"make_model: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
