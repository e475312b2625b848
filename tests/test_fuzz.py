"""Seeded fuzzing of what users hand us: corrupt checkpoints and bad command-line values.

Every case must end in the project's own error (CheckpointError / ConfigError / GenerationError),
or exit status 2 with one line from the CLI: never another exception type, a hang, or a file
written half-way. Loading a corrupt file may also succeed when the damage is in tensor data
(safetensors has no checksums); then the model must still run.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import struct
from pathlib import Path

import pytest
import torch

import minillama
from minillama import CheckpointError, ConfigError, GenerationError
from minillama.cli import main

OURS = (CheckpointError, ConfigError, GenerationError)
SEEDS = range(12)


@pytest.fixture(autouse=True)
def no_hang():
    """A case that takes over 60 s is a hang: fail it instead of stalling the suite."""
    def timeout(*_):
        raise TimeoutError("fuzz case hung")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def ckpt(make_hf) -> Path:
    _, path = make_hf("llama", num_key_value_heads=2)
    return path


# What a file cut short anywhere must give (the checkpoint loader's own words), whatever else it says.
TRUNCATED = r"model\.safetensors: corrupt or truncated safetensors file"
IDS = torch.tensor([[1, 2, 3]])


def _logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return minillama.from_pretrained(path)(IDS)


def _load_or_our_error(path: Path, clean: torch.Tensor | None = None) -> None:
    """For damage that may leave a loadable file: our error naming the file, or a model that runs
    with finite logits; `clean`: the undamaged checkpoint's logits, which a successful load must
    give exactly (header damage that still loads changed nothing the model reads)."""
    try:
        model = minillama.from_pretrained(path)
    except OURS as e:
        assert str(path) in str(e) or path.name in str(e), f"message names no file: {e}"
        return
    with torch.no_grad():
        logits = model(IDS)
    assert logits.shape == (1, 3, model.config.vocab_size) and torch.isfinite(logits).all(), logits
    if clean is not None:
        assert torch.equal(logits, clean), "a damaged header loaded into a different model"


def _header(path: Path) -> tuple[int, dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path: Path, header: dict | str, data: bytes) -> None:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize("seed", SEEDS)
def test_truncated_weights(ckpt, seed):
    file = ckpt / "model.safetensors"
    raw = file.read_bytes()
    rng = random.Random(seed)
    file.write_bytes(raw[:rng.randrange(0, len(raw))])
    with pytest.raises(CheckpointError, match=TRUNCATED):
        minillama.from_pretrained(ckpt)


@pytest.mark.parametrize("seed", SEEDS)
def test_flipped_tensor_data_bytes(ckpt, seed):
    """safetensors has no checksums: flipped bits in the tensor data load, and the model runs. Only
    mantissa bits here (every tensor is fp32, little-endian), so every weight stays finite, and so
    must the logits."""
    clean = minillama.from_pretrained(ckpt).state_dict()
    file = ckpt / "model.safetensors"
    n, _, _ = _header(file)
    raw = bytearray(file.read_bytes())
    rng = random.Random(seed)
    for _ in range(rng.randint(1, 64)):
        bit = rng.randrange(23)  # of the mantissa: bits 0-7 of byte 0, 0-7 of byte 1, 0-6 of byte 2
        raw[8 + n + 4 * rng.randrange((len(raw) - 8 - n) // 4) + bit // 8] ^= 1 << bit % 8
    file.write_bytes(bytes(raw))
    _load_or_our_error(ckpt)
    damaged = minillama.from_pretrained(ckpt).state_dict()
    assert any(not torch.equal(damaged[k], clean[k]) for k in clean)  # the damage was read


@pytest.mark.parametrize("seed", SEEDS)
def test_flipped_header_bytes(ckpt, seed):
    clean = _logits(ckpt)
    file = ckpt / "model.safetensors"
    raw = bytearray(file.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    rng = random.Random(seed)
    for _ in range(rng.randint(1, 4)):
        raw[rng.randrange(0, 8 + n)] ^= 1 << rng.randrange(8)
    file.write_bytes(bytes(raw))
    _load_or_our_error(ckpt, clean)


@pytest.mark.parametrize("seed", SEEDS)
def test_wrong_dtypes_shapes_and_offsets_in_header(ckpt, seed):
    clean = _logits(ckpt)
    file = ckpt / "model.safetensors"
    _, header, data = _header(file)
    rng = random.Random(seed)
    name = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[name]
    kind = seed % 4
    if kind == 0:
        entry["dtype"] = rng.choice(["F64", "I8", "BOOL", "U8", "F8_E4M3", "XX", 7])
    elif kind == 1:
        entry["shape"] = [d + rng.choice([-1, 1, 5]) for d in entry["shape"]] or [2]
    elif kind == 2:
        entry["shape"] = rng.choice([[-3, 4], [2**62, 2**62], [], "many", [1.5]])
    else:
        start, stop = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[stop, start], [start, len(data) + 100], [-8, stop], [0, 2**63]])
    _write(file, header, data)
    _load_or_our_error(ckpt, clean)


def test_header_length_past_the_file(ckpt):
    file = ckpt / "model.safetensors"
    raw = file.read_bytes()
    for length in (len(raw) * 4, len(raw) - 7, 2**64 - 1):  # a header that would end past the file
        file.write_bytes(struct.pack("<Q", length) + raw[8:])
        expected = TRUNCATED + rf" \(header of {length} bytes, file of {len(raw)}\)"
        with pytest.raises(CheckpointError, match=expected):
            minillama.from_pretrained(ckpt)


def test_duplicate_tensor_names(ckpt):
    file = ckpt / "model.safetensors"
    n, header, data = _header(file)
    name = next(k for k in header if k != "__metadata__")
    text = json.dumps(header)
    duplicate = json.dumps({name: header[name]})[1:-1]
    _write(file, text[:-1] + ", " + duplicate + "}", data)
    with pytest.raises(OURS):
        minillama.from_pretrained(ckpt)


BAD_CONFIG_VALUES = [
    ("hidden_size", float("nan")), ("hidden_size", float("inf")), ("hidden_size", -64), ("hidden_size", 0),
    ("hidden_size", "64"), ("num_hidden_layers", -1), ("num_attention_heads", 0), ("num_key_value_heads", 3),
    ("vocab_size", 10**30), ("intermediate_size", -1), ("rms_norm_eps", float("nan")), ("rms_norm_eps", -1e-6),
    ("rope_parameters", {"rope_type": "default", "rope_theta": float("-inf")}),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 0}), ("max_position_embeddings", -5),
    ("head_dim", -16), ("torch_dtype", "float8"), ("torch_dtype", "banana"), ("dtype", 5),
    ("hidden_act", "swish2"), ("rope_parameters", {"rope_type": "nope", "factor": 2.0}),
    ("rope_parameters", {"rope_type": "linear", "rope_theta": 1e4, "factor": -2.0}), ("rope_parameters", "linear"),
    ("tie_word_embeddings", "yes"), ("model_type", "gpt2"),
]


@pytest.mark.parametrize("key,value", BAD_CONFIG_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_CONFIG_VALUES])
def test_bad_config_values(ckpt, key, value):
    cfg_file = ckpt / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("dtype" if key == "torch_dtype" else "torch_dtype", None)
    cfg[key] = value
    cfg_file.write_text(json.dumps(cfg))  # NaN/Infinity as Python's json writes them
    with pytest.raises(OURS) as err:
        minillama.from_pretrained(ckpt)
    assert "config.json" in str(err.value) or key in str(err.value)


@pytest.mark.parametrize("content", [b"\xff\xfe{\x00}", b'{"hidden_size": 64', b"[1, 2]", b"", b"null",
                                     '{"model_type": "llama", "x": "\u00e9"}'.encode("latin-1")])
def test_unreadable_config_json(ckpt, content):
    (ckpt / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match="config.json"):
        minillama.from_pretrained(ckpt)


@pytest.mark.parametrize("content", [b"\xff\xfe", b'{"weight_map": ', b'{"weight_map": [1]}',
                                     b'{"weight_map": {"model.embed_tokens.weight": "../../etc/passwd"}}'])
def test_bad_shard_index(ckpt, content):
    (ckpt / "model.safetensors.index.json").write_bytes(content)
    with pytest.raises(CheckpointError, match="index"):
        minillama.from_pretrained(ckpt)


def test_bad_generation_config(ckpt):
    (ckpt / "generation_config.json").write_bytes(b"\xff{")
    with pytest.raises(CheckpointError, match="generation_config.json"):
        minillama.from_pretrained(ckpt)


# --- the command line -------------------------------------------------------------------------------

BAD_FLAGS = {
    "--max-new-tokens": ["-1", "0", "abc", "1e3", "nan"],
    "--temperature": ["-1", "nan", "inf", "abc", "-inf"],
    "--top-p": ["0", "1.5", "nan", "-0.1", "x"],
    "--top-k": ["-3", "x", "1.5"],
    "--min-p": ["-0.1", "2", "nan"],
    "--repetition-penalty": ["0", "-1", "nan", "inf"],
    "--seed": ["-1", str(2**70), "x"],
    "--dtype": ["int8", "fp8", ""],
    "--device": ["tpu", f"cuda:{torch.cuda.device_count()}", "", "cpu:x", "meta"],  # one past the last GPU
    "--norm": ["nope", "prmsnorm:p=2", "prmsnorm:q=1", "prmsnorm:p=x", "layernorm:eps"],
    "--stop": [""],
}


@pytest.mark.parametrize("seed", range(30))
def test_random_bad_cli_values_exit_2_with_one_line(capsys, tiny_chat_dir, tmp_path, seed):
    rng = random.Random(seed)
    flag = rng.choice(sorted(BAD_FLAGS))
    value = rng.choice(BAD_FLAGS[flag])
    command = rng.choice(["generate", "chat", "generate-batch"])
    argv = [command, "--model", str(tiny_chat_dir), f"{flag}={value}"]
    out = tmp_path / "out.jsonl"
    if command == "generate":
        argv += ["-p", "hello"]
    elif command == "generate-batch":
        (tmp_path / "in.jsonl").write_text('{"prompt": "hello"}\n')
        argv += ["-i", str(tmp_path / "in.jsonl"), "-o", str(out)]
    with pytest.raises(SystemExit) as exit_:
        raise SystemExit(main(argv))
    err = capsys.readouterr().err
    assert exit_.value.code == 2, (argv, err)
    assert err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] in ([], ["in.jsonl"])


@pytest.mark.parametrize("seed", range(4))
def test_garbage_gguf_is_one_error_and_writes_nothing(capsys, tmp_path, seed):
    rng = random.Random(seed)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(rng.choice([b"GGUF", b""]) + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 4096))))
    out = tmp_path / "out"
    assert main(["convert-gguf", str(gguf), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.gguf" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_corrupt_checkpoint_through_the_cli(capsys, ckpt, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    (copy / "model.safetensors").write_bytes(b"\x00" * 7)
    capsys.readouterr()
    assert main(["generate", "--model", str(copy), "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.safetensors" in err
