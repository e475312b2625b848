"""Models spread over devices: modules on "disk" (and CPU) through Accelerate's dispatch, equal to
the in-memory model."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from minillama import from_pretrained, generate
from minillama.errors import ConfigError

HALF_ON_DISK = {"embed": "cpu", "layers.0": "cpu", "layers.1": "disk", "layers.2": "cpu", "layers.3": "disk",
                "norm": "disk", "lm_head": "disk"}


def _dir(make_hf, **overrides) -> Path:
    return make_hf("llama", num_key_value_heads=2, num_hidden_layers=4, **overrides)[1]


def test_half_the_layers_on_disk_give_the_in_memory_logits(make_hf, tmp_path):
    path = _dir(make_hf)
    ref = from_pretrained(path, prepack=False)
    model = from_pretrained(path, device_map=HALF_ON_DISK, offload_folder=tmp_path / "offload")
    assert model.layers[1].attn.wqkv.weight.device.type == "meta"  # not held in memory
    assert model.layers[0].attn.wqkv.weight.device.type == "cpu"
    (folder,) = (tmp_path / "offload").iterdir()
    assert (folder / "index.json").is_file() and (folder / "layers.3.mlp.w_down.weight.dat").is_file()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))
    prompts = [[5, 9, 3, 7, 1, 2, 8], [4, 6]]
    assert torch.equal(generate(model, prompts, 8, eos_token_id=[]), generate(ref, prompts, 8, eos_token_id=[]))
    assert model.kv_cache.k.device.type == "cpu"
    del model
    gc.collect()
    assert not folder.exists()  # the offloaded copy goes with the model


def test_auto_map_spills_to_disk_under_a_memory_limit(make_hf, tmp_path):
    path = _dir(make_hf)
    ref = from_pretrained(path, prepack=False)
    model = from_pretrained(path, device_map="auto", max_memory={"cpu": 60_000}, offload_folder=tmp_path)
    assert "disk" in model.hf_device_map.values() and "cpu" in model.hf_device_map.values()
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))


def test_bad_device_maps_are_named(make_hf, tmp_path):
    path = _dir(make_hf, tie_word_embeddings=True)
    cases = [
        ({**HALF_ON_DISK, "layers.9": "cpu"}, "no module named 'layers.9'"),
        ({k: v for k, v in HALF_ON_DISK.items() if k != "layers.2"}, "no device for layers.2"),
        ({**HALF_ON_DISK, "layers.0": "tpu:0"}, "layers.0: unknown device 'tpu:0'"),
        (HALF_ON_DISK, "tied embeddings"),  # embed on cpu, lm_head on disk
    ]
    for device_map, match in cases:
        with pytest.raises(ConfigError, match=match):
            from_pretrained(path, device_map=device_map, offload_folder=tmp_path)
    untied = _dir(make_hf)
    with pytest.raises(ConfigError, match="pass offload_folder"):
        from_pretrained(untied, device_map=HALF_ON_DISK)
    with pytest.raises(ConfigError, match="quantization and device_map do not combine"):
        from_pretrained(untied, device_map=HALF_ON_DISK, offload_folder=tmp_path, quantize="int8")
