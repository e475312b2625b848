"""ModelConfig from/to transformers' config.json, in both spellings, and its errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import transformers

from minillama import ConfigError, ModelConfig, RopeConfig
from minillama.config import from_hf_config, parse_dtype, to_hf_config

BASE = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4)


def test_defaults_follow_transformers():
    cfg = from_hf_config(dict(BASE))
    assert cfg.num_key_value_heads == 4 and cfg.head_dim == 16
    assert cfg.rope == RopeConfig("default", 10000.0) and cfg.sliding_window is None and cfg.norm == "rmsnorm"


@pytest.mark.parametrize("v4,v5", [
    (dict(rope_theta=5e5), dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5})),
    (dict(rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0}),
     dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})),
    (dict(rope_theta=5e5, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
     dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "rope_theta": 5e5,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
])
def test_both_rope_spellings_agree(v4, v5):
    assert from_hf_config({**BASE, **v4}).rope == from_hf_config({**BASE, **v5}).rope


def test_yarn_original_length_defaults_to_max_positions():
    cfg = from_hf_config({**BASE, "max_position_embeddings": 4096,
                          "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    assert cfg.rope.original_max_position_embeddings == 4096


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 1e4},
    {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
    {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "original_max_position_embeddings": 16,
     "beta_fast": 16.0, "beta_slow": 2.0},
])
@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_round_trip_through_transformers_config(tmp_path, rope, model_type):
    hf = {**BASE, "model_type": model_type, "num_key_value_heads": 2, "rope_parameters": rope,
          "tie_word_embeddings": True}
    if model_type == "mistral":
        hf["sliding_window"] = 7
    cfg = from_hf_config(hf)
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert loaded.model_type == model_type and loaded.num_key_value_heads == 2 and loaded.tie_word_embeddings
    assert loaded.rope_parameters["rope_type"] == rope["rope_type"]
    # transformers adds fields of its own (token ids, dtype, ...): those land in `extra`
    assert dataclasses.replace(from_hf_config(loaded.to_dict()), extra={}) == cfg
    assert from_hf_config(to_hf_config(cfg)) == cfg


def test_mistral_reads_sliding_window_llama_ignores_it():
    assert from_hf_config({**BASE, "model_type": "mistral", "sliding_window": 4096}).sliding_window == 4096
    assert from_hf_config({**BASE, "model_type": "mistral", "sliding_window": None}).sliding_window is None
    assert from_hf_config({**BASE, "sliding_window": 4096}).sliding_window is None


@pytest.mark.parametrize("change,message", [
    (dict(model_type="mamba"), "field 'model_type' is 'mamba'"),
    (dict(model_type=None), "field 'model_type' is None"),
    (dict(architectures=["LlamaForSequenceClassification"]), "field 'architectures'"),
    (dict(hidden_size=None), "'hidden_size' must be a positive integer, got None"),
    (dict(num_key_value_heads=3), "'num_attention_heads' (4) must be a multiple of 'num_key_value_heads' (3)"),
    (dict(head_dim=15), "'head_dim' must be even"),
    (dict(hidden_act="swish"), "'hidden_act' is 'swish'"),
    (dict(rms_norm_eps=-1), "'rms_norm_eps' must be a positive number"),
    (dict(rope_scaling={"rope_type": "ntk-by-parts", "factor": 2.0}), "'rope_parameters.rope_type' is 'ntk-by-parts'"),
    (dict(max_position_embeddings=64, rope_scaling={"rope_type": "longrope", "factor": 2.0}),
     "'rope_parameters.short_factor' must list"),
    (dict(rope_scaling={"rope_type": "linear"}), "'rope_parameters.factor' is required for rope_type 'linear'"),
    (dict(rope_scaling={"rope_type": "linear", "factor": -2}), "'rope_parameters.factor' must be a positive"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "bogus": 1}), "unsupported key(s) ['bogus']"),
    (dict(rope_scaling="linear"), "field 'rope_scaling' must be an object"),
    (dict(partial_rotary_factor=0.5), "field 'partial_rotary_factor' = 0.5 is not supported"),
    (dict(quantization_config={"quant_method": "gptq"}), "field 'quantization_config'"),
])
def test_bad_fields_are_named(change, message):
    with pytest.raises(ConfigError) as err:
        from_hf_config({**BASE, **change}, "some/dir/config.json")
    assert str(err.value).startswith("some/dir/config.json: ")
    assert message in str(err.value)


def test_missing_required_field_is_named():
    hf = dict(BASE)
    del hf["intermediate_size"]
    with pytest.raises(ConfigError, match="required field 'intermediate_size' is missing"):
        from_hf_config(hf)


def test_model_config_validates_directly():
    with pytest.raises(ConfigError, match="'sliding_window' must be a positive integer or null"):
        ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                    num_attention_heads=2, sliding_window=0)


def test_parse_dtype():
    import torch

    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("torch.float16") is torch.float16
    assert parse_dtype(torch.float32) is torch.float32
    with pytest.raises(ConfigError, match="unknown dtype 'int8'"):
        parse_dtype("int8")
