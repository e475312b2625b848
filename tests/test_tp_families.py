"""Tensor parallelism for every family: 2 processes, each holding half of every projection (and
half the KV heads), give the logits of the whole model and of transformers, and the same greedy
tokens. What each family adds to the sharding: Qwen2's q/k/v biases (split with their rows),
Qwen3's and Gemma 3's q/k norms over each head (replicated), OLMo 2's over the whole projection
(split, statistics summed over the processes: parallel.ProjectionRMSNorm), Phi-3's fused
qkv_proj / gate_up_proj tensors (several row ranges of one tensor per process), Gemma 2's
sandwich norms, soft-caps and sliding window, Granite's multipliers, SmolLM3's layers without RoPE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minillama.config import ModelConfig
from minillama.errors import ConfigError
from minillama.parallel import shard_config, shard_selector
from test_distributed import launch

SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# model_type -> make_hf overrides: 4 query heads and 2 KV heads, so each process holds 2 and 1.
FAMILIES = {
    "qwen2": dict(num_key_value_heads=2),
    "qwen3": dict(num_key_value_heads=2),
    "olmo2": dict(num_key_value_heads=2),
    "phi3": dict(num_key_value_heads=2, **SPECIAL),
    "gemma2": dict(num_key_value_heads=2, head_dim=16, sliding_window=5),
    "gemma3_text": dict(num_key_value_heads=2, head_dim=16, sliding_window=5),
    "granite": dict(num_key_value_heads=2, embedding_multiplier=2.0, residual_multiplier=0.5,
                    attention_multiplier=0.2, logits_scaling=3.0),
    "smollm3": dict(num_key_value_heads=2, **SPECIAL),
}


@pytest.mark.slow
def test_every_family_shards_to_the_same_logits(make_hf, tmp_path: Path) -> None:
    from tp_families_worker import IDS

    built = {name: make_hf(name, **overrides) for name, overrides in FAMILIES.items()}
    out = tmp_path / "tp"
    launch("tests/tp_families_worker.py", str(out), *(str(path) for _, path in built.values()))
    ranks = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(2)]
    logits = [torch.load(f"{out}.{r}.pt", weights_only=True) for r in range(2)]
    for (name, (hf, path)), per_rank in zip(built.items(), zip(*ranks, strict=True), strict=True):
        with torch.no_grad():
            expected = hf(torch.tensor(IDS)).logits
        for rank, r in enumerate(per_rank):
            assert "refused" not in r, (name, r)
            assert r["max_logit_diff"] < 1e-4, (name, r)
            torch.testing.assert_close(logits[rank][str(path)], expected, rtol=1e-4, atol=1e-4, msg=name)
            assert r["same_tokens"], (name, r)
            assert r["local_heads"] == [2, 1] and r["kv_cache_heads"] == 1, (name, r)
        assert per_rank[0]["tokens"] == per_rank[1]["tokens"], name  # every process generates the same


def tiny(**fields) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16), **fields})


def test_fused_rows_and_projection_norms_are_selected_per_process() -> None:
    """A process's rows of Phi-3's fused tensors are its q, k and v (gate and up) ranges; OLMo 2's
    q/k norm gains are sliced as the q/k rows; per-head gains and o's bias are read whole."""
    phi3 = tiny(model_type="phi3")
    select = [shard_selector(phi3, rank, 2) for rank in range(2)]
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    assert select[0](qkv, (128, 64)) == [(slice(0, 32),), (slice(64, 80),), (slice(96, 112),)]
    assert select[1](qkv, (128, 64)) == [(slice(32, 64),), (slice(80, 96),), (slice(112, 128),)]
    gate_up = "model.layers.0.mlp.gate_up_proj.weight"
    assert select[1](gate_up, (192, 64)) == [(slice(48, 96),), (slice(144, 192),)]
    # One process reads each fused tensor whole, in one range.
    assert shard_selector(phi3, 0, 1)(qkv, (128, 64)) == (slice(0, 128),)
    assert shard_config(phi3, 2).num_key_value_heads == 1

    olmo2 = tiny(model_type="olmo2", qk_norm="proj", norm_placement="post")
    select = shard_selector(olmo2, 1, 2)
    assert select("model.layers.0.self_attn.q_norm.weight", (64,)) == (slice(32, 64),)
    assert select("model.layers.0.self_attn.k_norm.weight", (32,)) == (slice(16, 32),)
    qwen3 = shard_selector(tiny(model_type="qwen3", qk_norm="head"), 1, 2)
    assert qwen3("model.layers.0.self_attn.q_norm.weight", (16,)) is None
    qwen2 = shard_selector(tiny(model_type="qwen2", qkv_bias=True, o_bias=True), 1, 2)
    assert qwen2("model.layers.0.self_attn.k_proj.bias", (32,)) == (slice(16, 32),)
    assert qwen2("model.layers.0.self_attn.o_proj.bias", (64,)) is None


def test_projection_norms_shard_only_as_an_rmsnorm() -> None:
    olmo2 = tiny(model_type="olmo2", qk_norm="proj", norm_placement="post", norm="layernorm")
    with pytest.raises(ConfigError, match="norm 'layernorm' cannot be computed from split features"):
        shard_config(olmo2, 2)
    shard_config(olmo2, 1)  # one process holds every feature
    qwen3 = tiny(model_type="qwen3", qk_norm="head", norm="layernorm")  # per-head norms are replicated
    assert shard_config(qwen3, 2).num_attention_heads == 2
