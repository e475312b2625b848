"""GGUF import per family: a tiny random transformers model, written as a GGUF file the way llama.cpp's
converter writes it (its tensor names, its q/k permutation for `llama`, Gemma's norms stored as w+1, its
metadata keys), is converted by `minillama convert-gguf` into a directory minillama loads with logits
equal to the original model's. Architectures transformers cannot read are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import hf_config, randomize

import minillama
from minillama.assets import convert_gguf
from minillama.cli import main
from minillama.config import ARCHITECTURES, load_config

gguf = pytest.importorskip("gguf")

TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
LINEAR = dict(rope_type="linear", factor=2.0)
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)
LONGROPE = dict(rope_type="longrope", short_factor=[1.0, 1.3, 1.7, 2.2], long_factor=[2.0, 3.0, 4.5, 6.0])
# HF model_type -> (llama.cpp's architecture, the tokenizer model its files carry, what makes it bite).
# Everything set here is something llama.cpp's converter writes into the file; what it does not
# write (Gemma's query_pre_attn_scalar, Gemma 3's local RoPE base and layer pattern) is left at the
# value llama.cpp assumes, so the original model and the file describe the same network.
FAMILIES = {
    # the q/k rows llama.cpp permutes; linear RoPE scaling
    "llama": ("llama", "gpt2", dict(num_key_value_heads=2, rope_scaling=LINEAR)),
    "qwen2": ("qwen2", "gpt2", dict(num_key_value_heads=2, rope_scaling=YARN)),
    "qwen3": ("qwen3", "gpt2", dict(num_key_value_heads=2, head_dim=24)),  # head_dim != hidden / heads
    "gemma2": ("gemma2", "llama", dict(num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=24,
                                       num_hidden_layers=3, attn_logit_softcapping=2.0,
                                       final_logit_softcapping=3.0, sliding_window=5)),
    # six layers: the sixth is the first full-attention one (llama.cpp's pattern, transformers' default)
    "gemma3_text": ("gemma3", "llama", dict(num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=24,
                                            num_hidden_layers=6, sliding_window=5, rope_theta=1e5,
                                            rope_scaling=LINEAR,
                                            final_logit_softcapping=5.0)),
    "phi3": ("phi3", "llama", dict(num_key_value_heads=2, partial_rotary_factor=0.5,
                                   original_max_position_embeddings=16, rope_scaling=LONGROPE,
                                   sliding_window=12)),
}
NAMES = sorted(FAMILIES)


# ---------------------------------------------------------------- writing a GGUF file like llama.cpp


_PAIRED = "abcdefghijklmnopqrstuvwxyz0123"  # after the single characters: a space and one of these
# The special tokens first (pad, bos, eos at TOKENS' ids), as each family's files name them; a
# tokenizer class that knows more of them (GemmaTokenizer: <unk>, <mask>) would add them past the vocabulary.
_SPECIALS = {"gpt2": ["<|pad|>", "<|im_start|>", "<|endoftext|>"],
             "gemma": ["<pad>", "<bos>", "<eos>", "<unk>", "<mask>"], "phi3": ["<unk>", "<s>", "</s>"]}


def _vocab(kind: str, arch: str) -> tuple[list[str], list[int]]:
    """128 tokens: the special ones, the printable ASCII characters, then a space joined to a character."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if kind == "gpt2":  # byte-level BPE: tokens spelled in the byte alphabet, "Ġ" a space
        specials = _SPECIALS["gpt2"]
        space, chars = bytes_to_unicode()[ord(" ")], [bytes_to_unicode()[b] for b in range(33, 127)]
    else:  # sentencepiece: "▁" a space
        specials = _SPECIALS["gemma" if arch.startswith("gemma") else "phi3"]
        space, chars = "\u2581", [chr(b) for b in range(33, 127)]
    singles = [space, *chars]
    tokens = specials + singles + [space + c for c in _PAIRED[: 128 - len(specials) - len(singles)]]
    assert len(tokens) == 128
    # token types: 3 control, 2 unknown, 1 normal
    return tokens, [2 if t == "<unk>" else 3 for t in specials] + [1] * (len(tokens) - len(specials))


def _add_tokenizer(w, kind: str, arch: str) -> None:
    tokens, types = _vocab(kind, arch)
    w.add_tokenizer_model(kind)
    w.add_tokenizer_pre("qwen2" if arch.startswith("qwen") else "smollm" if kind == "gpt2" else "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    if kind == "gpt2":
        w.add_token_merges([f"{tokens[3]} {t[1:]}" for t in tokens if len(t) == 2])
    else:
        w.add_token_scores([-float(i) for i in range(len(tokens))])
        w.add_add_space_prefix(False)
    if "<unk>" in tokens:
        w.add_unk_token_id(tokens.index("<unk>"))
    w.add_pad_token_id(TOKENS["pad_token_id"])
    w.add_bos_token_id(TOKENS["bos_token_id"])
    w.add_eos_token_id(TOKENS["eos_token_id"])


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's rotary halves interleaved (its rope is GPT-J style)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: transformers.PreTrainedModel, arch: str, tokenizer: str, path: Path,
               dtype: np.dtype = np.float32, extra: dict[str, np.ndarray] | None = None) -> Path:
    """`model` as llama.cpp's convert_hf_to_gguf.py would write it (F32 or F16; norms always F32),
    plus the `extra` tensors."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == np.float32 else gguf.LlamaFileType.MOSTLY_F16)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    w.add_rope_freq_base(rope["rope_theta"])
    if arch in ("llama", "phi3"):
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * head_dim))
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    if arch in ("gemma2", "gemma3", "phi3"):
        w.add_sliding_window(c.sliding_window or 0)
    if arch == "gemma3" and c.final_logit_softcapping:
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    if arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
    _add_tokenizer(w, tokenizer, arch)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        data = tensor.detach().float().numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = _permute(data, c.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            data = _permute(data, c.num_key_value_heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1.0  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp's by what it stores
        w.add_tensor(gguf_name, data.astype(dtype if data.ndim > 1 else np.float32))
    if arch == "phi3" and rope.get("rope_type") == "longrope":
        for kind in ("long", "short"):
            w.add_tensor(f"rope_factors_{kind}.weight", np.asarray(rope[f"{kind}_factor"], dtype=np.float32))
    for name, data in (extra or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_model(model_type: str, seed: int = 0) -> transformers.PreTrainedModel:
    cfg = hf_config(model_type, **TOKENS, **FAMILIES[model_type][2])
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    randomize(model, seed)
    return model


# ---------------------------------------------------------------- the families, converted


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """converted(name, dtype) -> (original model, GGUF file, converted directory), built once per module."""
    built: dict = {}

    def get(name: str, dtype: np.dtype = np.float32):
        if (name, dtype) not in built:
            arch, tokenizer, _ = FAMILIES[name]
            root = tmp_path_factory.mktemp(f"gguf-{name}")
            model = tiny_model(name)
            file = write_gguf(model, arch, tokenizer, root / f"{name}.gguf", dtype)
            built[name, dtype] = model, file, convert_gguf(file, root / "converted")
        return built[name, dtype]

    return get


def _ids(batch: int = 2, seq: int = 24) -> torch.Tensor:
    # 24 positions: past every sliding window above (5, 12) and Phi-3's original length (16)
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(1))


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal within `rel` of the logits' scale (their largest magnitude)."""
    torch.testing.assert_close(got, ref, rtol=0, atol=rel * float(ref.abs().max()))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "gemma3_text" else n
                                  for n in NAMES])  # Gemma 3's six layers: 3-4 s
def test_fp32_logits_match_the_original(converted, name):
    model, _, out = converted(name)
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == name and hf["architectures"] == [ARCHITECTURES[name]]
    ours = minillama.from_pretrained(out)
    ids = _ids()
    with torch.no_grad():
        _close(ours(ids), model(ids).logits)


# What the converted config must say that transformers' GGUF loader alone would not (each read back
# from the metadata llama.cpp writes; the logits above are what proves them right).
SAYS = {
    "llama": dict(qkv_bias=False),
    "qwen3": dict(head_dim=24),
    "qwen2": dict(qkv_bias=True),
    "gemma2": dict(attn_scale=24**-0.5, attn_softcap=2.0, final_softcap=3.0, sliding_window=5),
    "gemma3_text": dict(attn_scale=24**-0.5, final_softcap=5.0, sliding_window=5,
                        layer_types=["sliding"] * 5 + ["full"]),
    "phi3": dict(sliding_window=12, partial_rotary_factor=0.5, layer_types=None),
}


@pytest.mark.parametrize("name", sorted(SAYS))
def test_config_reads_what_the_loader_leaves_out(converted, name):
    cfg = load_config(converted(name)[2])
    for field, value in SAYS[name].items():
        assert getattr(cfg, field) == (pytest.approx(value) if isinstance(value, float) else value), field
    if name == "llama":
        assert (cfg.rope.rope_type, cfg.rope.factor) == ("linear", 2.0)
    if name == "qwen2":
        rope = cfg.rope
        assert (rope.rope_type, rope.factor, rope.original_max_position_embeddings) == ("yarn", 4.0, 16)
    if name == "gemma3_text":  # the file's linear scaling on the full-attention layers only
        assert (cfg.rope.rope_type, cfg.rope.factor, cfg.rope.theta) == ("linear", 2.0, 1e5)
        assert (cfg.rope_local.rope_type, cfg.rope_local.theta) == ("default", 1e4)
    if name == "phi3":
        assert cfg.rope.rope_type == "longrope" and cfg.rope.original_max_position_embeddings == 16
        assert cfg.rope.long_factor == pytest.approx(LONGROPE["long_factor"])
        assert cfg.rope.short_factor == pytest.approx(LONGROPE["short_factor"])


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text"])
def test_gemma_norms_stored_plus_one_come_back(converted, name):
    """llama.cpp stores Gemma's RMSNorm gains as w + 1 (its norm multiplies by the weight);
    transformers' loader subtracts the 1 again: the converted checkpoint holds w."""
    from safetensors.torch import load_file

    model, file, out = converted(name)
    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(file)).tensors}
    saved = load_file(str(out / "model.safetensors"))
    norms = [n for n in model.state_dict() if n.endswith("norm.weight")]
    assert len(norms) == (6 if name == "gemma3_text" else 4) * model.config.num_hidden_layers + 1
    arch = gguf.MODEL_ARCH[FAMILIES[name][0].upper()]
    names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    for n in norms:
        original = model.state_dict()[n]
        in_file = torch.from_numpy(stored[names.get_name(n, try_suffixes=(".weight",))])
        torch.testing.assert_close(in_file, original + 1, rtol=0, atol=1e-6)
        torch.testing.assert_close(saved[n], original, rtol=0, atol=1e-6)


def test_f16_file_dequantizes_to_the_rounded_weights(converted):
    """A half-precision file: the converted weights are the original's rounded to fp16 (norms kept in
    F32, as llama.cpp keeps 1-D tensors), and so are the logits."""
    model, _, out = converted("qwen3", np.float16)
    hf = json.loads((out / "config.json").read_text())
    assert hf["dtype"] == "float32"
    rounded = tiny_model("qwen3")
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim > 1:
                p.copy_(p.half().float())
    ids = _ids()
    with torch.no_grad():
        ref = rounded(ids).logits
        _close(minillama.from_pretrained(out)(ids), ref)
        assert (ref - model(ids).logits).abs().max() > 1e-4  # the rounding shows: the check above has teeth


@pytest.mark.parametrize("name", ["qwen2", "gemma2", "phi3"])
def test_tokenizer_comes_along(converted, name):
    """The file's vocabulary becomes the directory's tokenizer, as transformers builds it from the file."""
    _, file, out = converted(name)
    ours = transformers.AutoTokenizer.from_pretrained(out)
    theirs = transformers.AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    assert len(ours) == 128
    assert (ours.pad_token_id, ours.bos_token_id, ours.eos_token_id) == (0, 1, 2)
    text = "hello abc 012"
    ids = ours.encode(text, add_special_tokens=False)
    assert ids == theirs.encode(text, add_special_tokens=False) and max(ids) < 128
    assert ours.decode(ids) == text


def test_cli_converts(tmp_path, capsys):
    file = write_gguf(tiny_model("qwen2"), "qwen2", "gpt2", tmp_path / "tiny.gguf")
    assert main(["convert-gguf", str(file), str(tmp_path / "out")]) == 0
    assert f"wrote {tmp_path / 'out'}" in capsys.readouterr().out
    assert (tmp_path / "out" / "config.json").is_file()


# ---------------------------------------------------------------- refused, in one line


def _bare_gguf(path: Path, arch: str) -> Path:
    """A file with a header and a token embedding, of any architecture llama.cpp names."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch,says", [
    ("rwkv6", "is not supported (supported: llama, qwen2, qwen3, gemma2, gemma3, phi3)"),
    ("mamba", "is not supported"),  # transformers reads it, minillama does not run it
    ("gemma", "cannot be imported: transformers' GGUF loader has no tensor map for it"),
    ("olmo2", "cannot be imported"),
])
def test_unsupported_architecture_one_line(tmp_path, capsys, arch, says):
    file = _bare_gguf(tmp_path / f"{arch}.gguf", arch)
    assert main(["convert-gguf", str(file), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("minillama: error: "), err
    assert f"{file}: GGUF architecture {arch!r} {says}" in err
    assert not (tmp_path / "out").exists()


def test_llama3_rope_factors_refused(tmp_path, capsys):
    """A `rope_freqs` tensor (llama.cpp's form of Llama 3.1's RoPE scaling) is one transformers' loader
    drops: refused, not silently lost."""
    file = write_gguf(tiny_model("llama"), "llama", "gpt2", tmp_path / "llama31.gguf",
                      extra={"rope_freqs.weight": np.linspace(1.0, 8.0, 8, dtype=np.float32)})
    assert main(["convert-gguf", str(file), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{file}: its RoPE scaling is a per-frequency factor tensor" in err
    assert not (tmp_path / "out").exists()
