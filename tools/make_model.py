#!/usr/bin/env python
"""A random-weight checkpoint of a real model's shape, for benchmarks without a download.

Writes an ordinary Hugging Face directory (config.json, safetensors shards, tokenizer) that
transformers and minillama both load. Weights are N(0, 0.02) as transformers initialises them, so
speed and memory are the real model's; the text it generates is noise. Vocabularies are the
tokenizer's (SmolLM2's 49152 when the embedded model is installed, else the byte tokenizer with
the vocabulary kept at 49152), so prompts encode the same way in every shape.

    python tools/make_model.py --shape llama-1b --out models/llama-1b --dtype bfloat16
    python tools/make_model.py --shape mistral-7b --out models/mistral-7b --layers 4   # cut to 4 layers
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

# The published shapes (hidden, MLP, layers, heads, kv heads, RoPE); vocabulary from the tokenizer.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192),
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                     rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                       rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                       rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=32768, sliding_window=4096),
}


SMOLLM2_VOCAB = 49152


def default_tokenizer() -> Any:
    """SmolLM2's tokenizer when the embedded model is installed, else the byte tokenizer (say which)."""
    from minillama.assets import default_model_dir

    try:
        return load_tokenizer(default_model_dir())
    except MinillamaError as e:
        print(f"make_model: no embedded SmolLM2 ({e}); using the byte tokenizer, vocabulary still "
              f"{SMOLLM2_VOCAB} so the output projection keeps its real cost", file=sys.stderr)
        return load_tokenizer("byte")


@torch.no_grad()
def make_model(shape: str, out: str | Path, *, dtype: str = "bfloat16", layers: int | None = None,
               tokenizer: Any = None, seed: int = 0) -> Path:
    """Write a random `shape` checkpoint (optionally cut to `layers` layers) to `out`; returns `out`."""
    if shape not in SHAPES:
        raise MinillamaError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
    # A vocabulary at least SmolLM2's: the output projection is a large share of a small model's cost.
    hf = {**SHAPES[shape], "vocab_size": max(len(tokenizer), SMOLLM2_VOCAB),
          "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if layers is not None:
        hf["num_hidden_layers"] = layers
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
            p.fill_(1.0)
    return save_pretrained(model, out, tokenizer=tokenizer)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--layers", type=int, default=None, help="keep only this many layers (a smaller test model)")
    p.add_argument("--tokenizer", default=None, help="a directory with a tokenizer, or 'byte' (default: SmolLM2's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    try:
        tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
        out = make_model(args.shape, args.out, dtype=args.dtype, layers=args.layers, tokenizer=tok, seed=args.seed)
    except MinillamaError as e:
        print(f"make_model: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
