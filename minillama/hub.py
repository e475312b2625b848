"""Model names: a local checkpoint directory, or a Hugging Face id resolved through huggingface_hub.

An id (`HuggingFaceTB/SmolLM2-135M-Instruct`) is fetched into, or found in, the Hugging Face
cache by `snapshot_download`: downloaded when online, read from the cache offline
(`HF_HUB_OFFLINE=1`). Only what a checkpoint directory needs is fetched (config, safetensors,
tokenizer files), never the other formats a repository may also carry. A local directory always
wins over an id spelt the same.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CheckpointError

# What from_pretrained and load_tokenizer read; a repository's .bin/.gguf/.onnx copies are skipped,
# and so are the original-format duplicates some carry beside the HF weights (Mistral's
# consolidated.safetensors, Llama 3's original/): the same weights again, gigabytes of them.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
NOT_CHECKPOINT_FILES = ["consolidated*", "original/*"]
# A Hub repository id: "name" or "org/name", letters, digits, "-", "_", ".".
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_repo_id(name: str) -> bool:
    """True when `name` is spelt like a Hub id (it may still not exist)."""
    return bool(_REPO_ID.fullmatch(name)) and ".." not in name and not name.endswith(".")


def resolve_model(name: str | Path) -> Path:
    """The local directory for `name`: itself when it exists (or is not spelt like an id), else the
    Hub id's snapshot in the Hugging Face cache. CheckpointError naming the id when neither works."""
    path = Path(name)
    if path.exists() or not is_repo_id(str(name)):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    cache, offline = _hub_settings()
    try:
        return Path(snapshot_download(str(name), cache_dir=cache, local_files_only=offline,
                                      allow_patterns=CHECKPOINT_FILES, ignore_patterns=NOT_CHECKPOINT_FILES))
    except RepositoryNotFoundError:
        raise CheckpointError(f"{name}: no such local directory, and no model with that id on the Hugging Face "
                              "Hub (or it is private or gated: log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        where = "offline (HF_HUB_OFFLINE=1)" if offline else "the Hub could not be reached"
        raise CheckpointError(f"{name}: no such local directory, and not in the Hugging Face cache "
                              f"({cache}); {where}, so nothing was downloaded") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{name}: no such local directory, and the Hugging Face Hub could not provide it "
                              f"({first})") from None


def _hub_settings() -> tuple[str, bool]:
    """(cache directory, offline) as the environment says now: huggingface_hub reads its variables
    once, on import (usually transformers' import, before a program sets them)."""
    from huggingface_hub import constants

    env = os.environ
    cache = env.get("HF_HUB_CACHE") or (os.path.join(env["HF_HOME"], "hub") if env.get("HF_HOME") else None)
    offline = any(env.get(v, "").strip().lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return cache or constants.HF_HUB_CACHE, offline or constants.is_offline_mode()


def model_path(name: str | Path | None) -> Path:
    """The checkpoint directory a `--model` value names: None is the embedded SmolLM2."""
    if name is None or str(name) == "":
        from .assets import default_model_dir

        return default_model_dir()
    return resolve_model(name)
