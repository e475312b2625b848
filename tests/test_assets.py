"""The embedded SmolLM2: where it is found, where it is cached, and that conversion is atomic."""

from __future__ import annotations

import pytest

from minillama import assets
from minillama.errors import CheckpointError


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MINILLAMA_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MINILLAMA_CACHE")
    assert assets.cache_dir().parts[-2:] == (".cache", "minillama")


def test_gguf_is_found_in_the_wheel():
    path = assets.smollm2_gguf()
    assert path.name == assets.SMOLLM2_GGUF and path.stat().st_size > 50_000_000


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not gguf at all")
    with pytest.raises(CheckpointError, match="bad.gguf: cannot read as a GGUF checkpoint"):
        assets.convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_interrupted_conversion_leaves_nothing(monkeypatch, tmp_path):
    """Interrupted after the weights are written, before the tokenizer: nothing is left behind.
    (Reading the real GGUF costs ~20 s and is what the smollm2_dir fixture does; here a tiny
    model stands in for what it reads, so the test is about convert_gguf's atomic write.)"""
    import transformers
    from conftest import hf_config

    from minillama.tokenizer import byte_tokenizer

    tiny = transformers.AutoModelForCausalLM.from_config(hf_config("llama"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: byte_tokenizer())
    saved = []
    real_save = type(tiny).save_pretrained
    monkeypatch.setattr(type(tiny), "save_pretrained", lambda self, d, **k: saved.append(d) or real_save(self, d, **k))

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        assets.convert_gguf(assets.smollm2_gguf(), tmp_path / "smol")
    assert len(saved) == 1  # the weights were written (into the temporary sibling) before the interrupt
    assert list(tmp_path.iterdir()) == []
