"""Tokenizers: the checkpoint's own Hugging Face tokenizer, a byte-level one for tiny models, prompt encoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .errors import CheckpointError, GenerationError

# ChatML, the format SmolLM2 and Qwen use; the byte tokenizer carries it so tiny models can chat.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer() -> Any:
    """A byte-level tokenizer (ids 0-255 bytes, 256 <|im_end|> = EOS, 257 <|endoftext|> = pad,
    258 <|im_start|>) with a ChatML template.

    Needs no training and no files, so a tiny random model can be fine-tuned on chat data and
    exported with a tokenizer that transformers loads.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # A BPE with no merges over the byte alphabet is exactly "one token per byte".
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_TEMPLATE
    return fast


def load_tokenizer(path: str | Path) -> Any:
    """Load the tokenizer of a checkpoint directory or Hugging Face id (minillama/hub.py); "byte": byte_tokenizer()."""
    from transformers import AutoTokenizer

    from .atomic import recover_directory
    from .hub import resolve_model

    if str(path) == "byte":
        return byte_tokenizer()
    path = resolve_model(path)
    recover_directory(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (a checkpoint directory or a Hugging Face model id)")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: no usable tokenizer ({first})") from None


def _ids(encoded: Any) -> list[int]:
    # apply_chat_template returns a list, or a BatchEncoding in newer transformers.
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def encode_prompt(tokenizer: Any, messages: Sequence[dict[str, str]], chat: bool | None = None) -> list[int]:
    """Token ids of a conversation: through the chat template (generation prompt added) when there is one,
    else the messages' text joined by blank lines."""
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise GenerationError("chat template requested but this checkpoint's tokenizer has none")
        return _ids(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True))
    return tokenizer("\n\n".join(m["content"] for m in messages)).input_ids
