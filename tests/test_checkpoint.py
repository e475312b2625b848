"""Loading sharded/tied checkpoints, saving back to the HF format, atomic writes, strict errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import minillama
from minillama import CheckpointError, ConfigError
from minillama import checkpoint as ckpt


def _ids(batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(7))


def _assert_same_logits(ours: minillama.Transformer, ref: transformers.PreTrainedModel) -> None:
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits)


def test_sharded_checkpoint_loads(make_hf):
    ref, path = make_hf("llama", num_key_value_heads=2, max_shard_size="40KB")
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (path / ckpt.INDEX_FILE).is_file()
    _assert_same_logits(minillama.from_pretrained(path), ref)


def test_tied_checkpoint_without_lm_head(make_hf):
    ref, path = make_hf("llama", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    ours = minillama.from_pretrained(path)
    assert ours.lm_head.weight is ours.embed.weight
    _assert_same_logits(ours, ref)


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    ("llama", dict(tie_word_embeddings=True, head_dim=24,
                   rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                    "original_max_position_embeddings": 16})),
    ("mistral", dict(num_key_value_heads=1, sliding_window=5)),
])
def test_save_round_trip_through_transformers(make_hf, tmp_path, model_type, overrides):
    _, path = make_hf(model_type, **overrides)
    ours = minillama.from_pretrained(path)
    out = ckpt.save_pretrained(ours, tmp_path / "saved", max_shard_size="30KB")
    assert (out / ckpt.INDEX_FILE).is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    index = json.loads((out / ckpt.INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(ckpt.hf_layout(ours.config))
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(ref).__name__ == {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[model_type]
    _assert_same_logits(ours, ref)
    # and back into minillama: bit-identical weights
    again = minillama.from_pretrained(out)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_save_keeps_dtype_and_generation_config(make_hf, tmp_path):
    _, path = make_hf("llama")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5], "bos_token_id": 1}))
    ours = minillama.from_pretrained(path, dtype="bfloat16")
    out = ckpt.save_pretrained(ours, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_file(out / "model.safetensors")["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 5]
    assert minillama.from_pretrained(out).embed.weight.dtype == torch.bfloat16  # default: the saved dtype


def test_dtype_and_device_arguments(make_hf):
    _, path = make_hf("llama")
    model = minillama.from_pretrained(path, dtype=torch.float16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert model.rope.inv_freq.dtype == torch.float32  # frequencies are never rounded to the model dtype
    with pytest.raises(ConfigError, match="'float8'"):
        minillama.from_pretrained(path, dtype="float8")


def test_crash_mid_save_leaves_nothing_half_written(make_hf, tmp_path, monkeypatch):
    _, path = make_hf("llama")
    ours = minillama.from_pretrained(path)
    target = tmp_path / "out"
    ckpt.save_pretrained(ours, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    def failing_save(tensors, file, metadata=None):
        if "-00002-of-" in str(file):  # the first shard is written, the second fails
            raise OSError("disk full")
        save_file(tensors, file, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", failing_save)
    ours.embed.weight.data.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_pretrained(ours, target, max_shard_size="30KB")
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_pretrained(ours, tmp_path / "fresh", max_shard_size="30KB")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # old checkpoint intact
    assert not (tmp_path / "fresh").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_save_refuses_to_replace_an_unrelated_directory(make_hf, tmp_path):
    _, path = make_hf("llama")
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing to replace"):
        ckpt.save_pretrained(minillama.from_pretrained(path), precious)
    assert (precious / "notes.txt").read_text() == "keep me"


# --- bad checkpoints: one clear CheckpointError/ConfigError naming the file or key ---------------


def _rewrite(path: Path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_and_unexpected_keys_are_named_together(make_hf):
    _, path = make_hf("llama")

    def edit(t):
        del t["model.layers.1.self_attn.k_proj.weight"]
        del t["model.norm.weight"]
        t["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)

    _rewrite(path, edit)
    with pytest.raises(CheckpointError) as err:
        minillama.from_pretrained(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing 2" in msg and "model.layers.1.self_attn.k_proj.weight" in msg and "model.norm.weight" in msg
    assert "unexpected 1" in msg and "model.layers.0.self_attn.extra.weight" in msg


def test_shape_mismatch_is_named(make_hf):
    _, path = make_hf("llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatch 6: .*model\.layers\.0\.mlp\.gate_proj\.weight "
                                              r"\(checkpoint \[96, 64\], model \[80, 64\]\)") as err:
        minillama.from_pretrained(path)
    assert "missing" not in str(err.value)


def test_truncated_file_is_named(make_hf):
    _, path = make_hf("llama")
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated"):
        minillama.from_pretrained(path)


def test_garbage_file_is_named(make_hf):
    _, path = make_hf("llama")
    (path / "model.safetensors").write_bytes(b"\x00not a safetensors file")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated"):
        minillama.from_pretrained(path)


def test_shard_named_in_index_but_absent(make_hf):
    _, path = make_hf("llama", max_shard_size="40KB")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"index\.json: names shard\(s\) that do not exist: {victim.name}"):
        minillama.from_pretrained(path)


def test_corrupt_index(make_hf):
    _, path = make_hf("llama", max_shard_size="40KB")
    (path / ckpt.INDEX_FILE).write_text("{\"metadata\": {}}")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not a valid safetensors index"):
        minillama.from_pretrained(path)


def test_missing_config_json(make_hf):
    _, path = make_hf("llama")
    (path / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json: config\.json not found"):
        minillama.from_pretrained(path)


def test_config_json_not_json(make_hf):
    _, path = make_hf("llama")
    (path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        minillama.from_pretrained(path)


def test_unsupported_architecture(make_hf):
    _, path = make_hf("llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: unsupported architecture: field 'model_type' is 'gpt2'"):
        minillama.from_pretrained(path)


def test_pickle_only_directory_is_refused(make_hf, tmp_path):
    _, path = make_hf("llama")
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: pickle checkpoints are never loaded"):
        minillama.from_pretrained(path)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        minillama.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a directory"):
        minillama.load_tokenizer(tmp_path / "nope")


def test_directory_without_tokenizer(make_hf):
    _, path = make_hf("llama")
    with pytest.raises(CheckpointError, match="no usable tokenizer"):
        minillama.load_tokenizer(path)


def test_ignores_rotary_inv_freq_from_old_checkpoints(make_hf):
    ref, path = make_hf("llama")
    _rewrite(path, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8)))
    _assert_same_logits(minillama.from_pretrained(path), ref)


def test_copy_of_a_directory_loads(make_hf, tmp_path):
    """Nothing absolute is recorded: a moved checkpoint loads the same."""
    ref, path = make_hf("mistral", sliding_window=3)
    moved = tmp_path / "moved"
    shutil.copytree(path, moved)
    _assert_same_logits(minillama.from_pretrained(moved), ref)


# one past the last GPU: absent here and on any node, however many GPUs it has
MISSING_GPU = f"cuda:{torch.cuda.device_count()}"


@pytest.mark.parametrize("device,message", [("gpu7", "unknown device 'gpu7'"), (MISSING_GPU, "not available")])
def test_bad_device_is_named(make_hf, device, message):
    _, path = make_hf("llama")
    with pytest.raises(ConfigError, match=message):
        minillama.from_pretrained(path, device=device)
