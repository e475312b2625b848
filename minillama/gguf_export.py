"""Write a model as a GGUF file that llama.cpp (and Ollama, LM Studio) loads: `save_gguf`.

The `gguf` package does the file: its writer lays out the header, metadata and tensors, its
quantizers pack Q8_0 / Q4_0 / BF16 blocks, its vocabulary helpers read the tokenizer's merges,
special tokens and chat template. What is ours is the mapping: HF tensor names (the layout
`save_pretrained` writes, checkpoint.py) to llama.cpp's through gguf's own name map, the
architecture metadata, and one reordering of the q/k rows for llama.cpp's "llama" architecture.

Tensors stream one at a time (read, convert, written, freed), so a model is never held twice;
the file appears atomically (a temporary sibling renamed in).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .checkpoint import _checkpoint_tensors, _dense, hf_layout
from .config import ModelConfig, RopeConfig
from .errors import CheckpointError, ConfigError
from .model import Transformer


@dataclass(frozen=True)
class GGUFArch:
    """How one of our families is written for llama.cpp."""

    name: str  # llama.cpp's general.architecture
    # llama.cpp's "llama" rotates adjacent pairs (GPT-J style) where HF rotates halves (NeoX):
    # each head's q and k rows are reordered so that both compute the same rotation.
    interleave_qk: bool
    qk_norm: str | None = None  # the q/k norms the architecture has (None: none)


# model_type -> its llama.cpp architecture (Mistral's files are "llama" ones, as llama.cpp's own
# converter writes them).
GGUF_EXPORT: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", interleave_qk=True),
    "mistral": GGUFArch("llama", interleave_qk=True),
    "qwen2": GGUFArch("qwen2", interleave_qk=False),
    "qwen3": GGUFArch("qwen3", interleave_qk=False, qk_norm="head"),
}

# --type -> (the 2-D weights' GGML type, general.file_type). 1-D tensors (norms, biases) stay F32,
# as in llama.cpp's files. Q4_0 keeps the embedding and output matrices in Q8_0 (llama.cpp's own
# quantizer keeps them above 4 bits too: they carry most of the quality loss).
TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
         "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}
_KEEP_8BIT = ("token_embd.weight", "output.weight")

# What llama.cpp's architectures compute; a model configured otherwise would run differently there.
_PLAIN = {"norm": "rmsnorm", "norm_placement": "pre", "norm_offset": 0.0, "hidden_act": "silu", "embed_scale": None,
          "residual_scale": 1.0, "attn_scale": None, "attn_softcap": None, "final_softcap": None,
          "logits_divisor": 1.0, "partial_rotary_factor": 1.0, "nope_layers": [], "rope_local": None,
          "o_bias": False, "mlp_bias": False}

# llama.cpp names a BPE pre-tokenizer by the hash of how it tokenizes this text (its converter's
# check, convert_hf_to_gguf.py's get_vocab_base_pre); those of the families exported here.
_PRE_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}


def check_exportable(cfg: ModelConfig, type: str) -> GGUFArch:
    """The GGUFArch for cfg, or ConfigError naming what llama.cpp would not run the same."""
    if type not in TYPES:
        raise ConfigError(f"GGUF type {type!r} is not supported (supported: {', '.join(TYPES)})")
    arch = GGUF_EXPORT.get(cfg.model_type)
    if arch is None:
        raise ConfigError(f"model_type {cfg.model_type!r} has no GGUF export yet (supported: "
                          f"{', '.join(GGUF_EXPORT)})")
    for name, plain in _PLAIN.items():
        if getattr(cfg, name) != plain:
            raise ConfigError(f"{cfg.model_type}: config field {name!r} = {getattr(cfg, name)!r} has no llama.cpp "
                              f"{arch.name!r} equivalent (it computes {plain!r}): not exported")
    if cfg.qk_norm != arch.qk_norm:
        raise ConfigError(f"{cfg.model_type}: q/k norms {cfg.qk_norm!r} do not match llama.cpp's {arch.name!r} "
                          f"({arch.qk_norm!r})")
    if cfg.qkv_bias and arch.name == "qwen3":
        raise ConfigError(f"{cfg.model_type}: q/k/v biases have no place in llama.cpp's qwen3 architecture")
    if cfg.rope.rope_type not in ("default", "linear"):
        raise ConfigError(f"{cfg.model_type}: RoPE scaling {cfg.rope.rope_type!r} is not exported yet (default and "
                          "linear are)")
    return arch


def save_gguf(model: Transformer, path: str | Path, tokenizer: Any, *, type: str = "f16",
              name: str | None = None) -> list[str]:
    """Write `model` (with `tokenizer`: an HF tokenizer, or its directory) to the GGUF file `path`.

    type: f32, f16, bf16, q8_0 or q4_0 (see TYPES). A quantized minillama model is dequantized and
    quantized again to `type` (its rounding and the new one both apply). Returns notes worth
    telling the user (e.g. a sliding window llama.cpp's "llama" does not apply). Nothing is
    written when the model or type cannot be exported (ConfigError, CheckpointError).
    """
    import gguf

    cfg = model.config
    arch = check_exportable(cfg, type)
    from .norms import Norm
    from .parallel import is_tensor_parallel

    if is_tensor_parallel(model):
        raise CheckpointError(f"{path}: this model is one tensor-parallel shard; export the checkpoint it was "
                              "loaded from instead")
    if any("lora" in n.lower() for n, _ in model.named_modules()):
        raise CheckpointError(f"{path}: the model holds LoRA adapters: merge them first (the fine-tune's export "
                              "does) and export the merged checkpoint")
    if any(isinstance(m, Norm) and not m.hf_compatible for m in model.modules()):
        raise ConfigError(f"{path}: norm {cfg.norm!r} has no llama.cpp equivalent: only RMSNorm models export")
    notes = []
    sliding = cfg.layer_types is None or "sliding" in cfg.layer_types
    if cfg.sliding_window is not None and sliding and cfg.sliding_window < cfg.max_position_embeddings:
        notes.append(f"sliding window {cfg.sliding_window}: llama.cpp's {arch.name!r} attends over the whole "
                     "context (as for its own Mistral files): outputs differ past the window")
    path = Path(path)
    with _tokenizer_dir(tokenizer) as tok_dir:
        tokens, types, scores, model_kind, pre, special = _vocabulary(tok_dir, cfg.vocab_size)
        if pre == "default" and model_kind == "gpt2":
            notes.append("the tokenizer's pre-tokenizer is not one llama.cpp names: written as 'default' "
                         "(llama.cpp then splits text its own way before the BPE merges)")
        weight_type, file_type = TYPES[type]
        tensors = list(_gguf_tensors(model, arch))
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            writer = gguf.GGUFWriter(str(tmp), arch.name)
            _write_metadata(writer, cfg, arch, name or "minillama export", getattr(gguf.LlamaFileType, file_type))
            writer.add_tokenizer_model(model_kind)
            writer.add_tokenizer_pre(pre)
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            if scores is not None:
                writer.add_token_scores(scores)
            special.add_to_gguf(writer, quiet=True)
            plan = [(gguf_name, shape, _ggml_type(gguf_name, shape, weight_type)) for gguf_name, shape, _ in tensors]
            for gguf_name, shape, qtype in plan:
                qtype = getattr(gguf.GGMLQuantizationType, qtype)
                byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype) if qtype not in (
                    gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else shape
                itemsize = 4 if qtype == gguf.GGMLQuantizationType.F32 else (
                    2 if qtype == gguf.GGMLQuantizationType.F16 else 1)
                writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8 if itemsize == 1 else
                                                                         np.float32 if itemsize == 4 else np.float16),
                                       int(np.prod(byte_shape)) * itemsize,
                                       raw_dtype=qtype if itemsize == 1 else None)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for (gguf_name, shape, read), (_, _, qtype) in zip(tensors, plan):
                data = read()  # fp32 [out, in] as llama.cpp's layout wants it
                writer.write_tensor_data(_pack(data, getattr(gguf.GGMLQuantizationType, qtype)))
            writer.close()
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return notes


def _ggml_type(gguf_name: str, shape: tuple[int, ...], weight_type: str) -> str:
    """A tensor's GGML type: F32 for 1-D ones; quantized types where the row splits into 32-wide
    blocks (else F16, as llama.cpp's converter falls back); Q4_0's embedding/output in Q8_0."""
    if len(shape) == 1:
        return "F32"
    if weight_type in ("Q8_0", "Q4_0"):
        if shape[-1] % 32:
            return "F16"
        if weight_type == "Q4_0" and gguf_name in _KEEP_8BIT:
            return "Q8_0"
    return weight_type


def _pack(data: np.ndarray, qtype: Any) -> np.ndarray:
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def _gguf_tensors(model: Transformer, arch: GGUFArch) -> Iterator[tuple[str, tuple[int, ...], Any]]:
    """(llama.cpp name, shape, read() -> fp32 numpy array) for every tensor, in checkpoint order;
    read() materialises one tensor (dequantized, reordered) only when it is written."""
    import gguf

    cfg = model.config
    plain = dataclasses.replace(cfg, quantization=None)  # HF's names for the float weights
    layout = hf_layout(plain)
    params = _checkpoint_tensors(model)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.name.upper()), cfg.num_hidden_layers)
    for key, target in layout.items():
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"{key}: no llama.cpp {arch.name!r} tensor holds it: not exported")
        owner = model.get_submodule(target.name.rpartition(".")[0])
        full = (owner.out_features, owner.in_features) if hasattr(owner, "dequantize") and key.endswith(
            "weight") else tuple(params[target.name].shape)
        rows = full[0] if target.start is None else target.stop - target.start
        shape = (rows, *full[1:])
        yield gguf_name, shape, _reader(model, params, target, key, cfg, arch)


def _reader(model: Transformer, params: dict, target: Any, key: str, cfg: ModelConfig, arch: GGUFArch) -> Any:
    def read() -> np.ndarray:
        owner = model.get_submodule(target.name.rpartition(".")[0])
        if hasattr(owner, "dequantize") and key.endswith("weight"):  # a quantized projection
            weight = owner.dequantize(torch.float32)
            t = weight if target.start is None else weight[target.start:target.stop]
        else:
            t = _dense(model, params, target)
        t = t.float()
        if arch.interleave_qk and (".q_proj." in key or ".k_proj." in key):
            heads = cfg.num_attention_heads if ".q_proj." in key else cfg.num_key_value_heads
            t = interleave_rows(t, heads)
        return t.contiguous().numpy()
    return read


def interleave_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows [heads * head_dim, ...] from HF's rotate-half order (pairs i, i + head_dim/2) to
    llama.cpp's adjacent pairs (2i, 2i + 1); transformers' GGUF loader undoes exactly this."""
    rows = t.shape[0]
    return t.reshape(heads, 2, rows // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _write_metadata(writer: Any, cfg: ModelConfig, arch: GGUFArch, name: str, file_type: int) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope.theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    rope: RopeConfig = cfg.rope
    if rope.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope.factor)


class _tokenizer_dir:
    """A directory holding the tokenizer's files: the given one, or the tokenizer saved to a
    temporary one (gguf's vocabulary helpers read files)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.tmp = tokenizer, None

    def __enter__(self) -> Path:
        if isinstance(self.tokenizer, (str, Path)):
            path = Path(self.tokenizer)
            if not (path / "tokenizer.json").is_file():
                raise CheckpointError(f"{path}: no tokenizer.json (a GGUF file carries its tokenizer)")
            return path
        if self.tokenizer is None or not hasattr(self.tokenizer, "save_pretrained"):
            raise CheckpointError("save_gguf needs the model's tokenizer (a GGUF file carries it)")
        self.tmp = tempfile.TemporaryDirectory(prefix="minillama-gguf-tok-")
        self.tokenizer.save_pretrained(self.tmp.name)
        return Path(self.tmp.name)

    def __exit__(self, *exc: Any) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()


def _vocabulary(tok_dir: Path, vocab_size: int) -> tuple[list, list, list | None, str, str, Any]:
    """(tokens, token types, scores or None, tokenizer.ggml.model, tokenizer.ggml.pre, gguf's
    SpecialVocab) for the model's `vocab_size` ids (ids past the tokenizer's: unused pads)."""
    import gguf
    from transformers import AutoTokenizer

    spec = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    kind = spec.get("model", {}).get("type")
    byte_fallback = bool(spec.get("model", {}).get("byte_fallback"))
    if kind != "BPE":
        raise ConfigError(f"{tok_dir}: a {kind} tokenizer is not exported yet (BPE ones are: GPT-2 style and "
                          "SentencePiece-style with byte fallback)")
    special = gguf.SpecialVocab(tok_dir, load_merges=not byte_fallback, n_vocab=vocab_size)
    if byte_fallback:  # Llama 2 / Mistral style: llama.cpp's "llama" tokenizer, with scores
        vocab = gguf.LlamaHfVocab(tok_dir)
        tokens, scores, types = [], [], []
        for text, score, kind_ in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind_)
        model_kind, pre = "llama", "default"
    else:
        tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        by_id = {i: t for t, i in tok.get_vocab().items()}
        added = tok.added_tokens_decoder
        tokens, types, scores = [], [], None
        for i in range(min(vocab_size, max(by_id) + 1)):
            if i not in by_id:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            else:
                tokens.append(by_id[i])
                types.append(gguf.TokenType.NORMAL if i not in added else
                             gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        if not special.merges:
            raise ConfigError(f"{tok_dir}: a BPE tokenizer without merges: llama.cpp's loader requires them")
        digest = hashlib.sha256(str(tok.encode(_PRE_CHECK_TEXT)).encode()).hexdigest()
        model_kind, pre = "gpt2", _PRE_TOKENIZERS.get(digest, "default")
    if len(tokens) > vocab_size:
        raise ConfigError(f"{tok_dir}: the tokenizer has {len(tokens)} tokens, the model's vocabulary {vocab_size}")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
        if scores is not None:
            scores.append(-1000.0)
    return tokens, types, scores, model_kind, pre, special
