"""The checkpoint's own Hugging Face tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import CheckpointError


def load_tokenizer(path: str | Path) -> Any:
    """Load the tokenizer saved in a local checkpoint directory (never from a hub)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (minillama loads local checkpoints only)")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: no usable tokenizer ({first})") from None
