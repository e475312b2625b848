"""Training data: chat conversations (loss on assistant tokens only) or plain text packed into blocks.

Everything is tokenized up front into `Example`s, and the order of rows is a pure function of
(seed, step): resuming needs only the step number to continue with exactly the same batches.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import ConfigError
from .config import DataSection

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    """One row: token ids and, per token, whether the model is trained to predict it."""

    ids: list[int]
    targets: list[bool]

    @property
    def n_targets(self) -> int:
        """Tokens that count in the loss (the first token is never predicted)."""
        return sum(self.targets[1:])


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a malformed line is a ConfigError naming the file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            records.append((lineno, record))
    return records


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """`messages` if it is a non-empty list of {"role", "content"} strings with known roles; else ConfigError."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: \"messages\" must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}: messages[{i}] must be {{\"role\": str, \"content\": str}}")
        if m["role"] not in ROLES:
            raise ConfigError(f"{where}: messages[{i}] has role {m['role']!r} (expected one of {', '.join(ROLES)})")
    return messages


def chat_example(tokenizer: Any, messages: Sequence[dict[str, str]], where: str = "chat") -> Example:
    """Tokenize a conversation through the chat template; targets are the assistant turns' tokens
    (their end-of-turn marker included), so the model learns to answer and to stop."""
    text = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        # The assistant's text is what rendering the turn adds after the prompt that asks for it.
        # That needs a template that renders conversations prefix by prefix (all common ones do).
        before, through = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1], False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ConfigError(f"{where}: the chat template does not render this conversation turn by turn, "
                              "so the assistant tokens cannot be located")
        spans.append((len(before), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    targets = [any(lo <= start < hi for lo, hi in spans) for start, _ in enc["offset_mapping"]]
    return Example(list(enc["input_ids"]), targets)


def pack_text(tokenizer: Any, texts: Sequence[str], block_size: int) -> list[Example]:
    """Concatenate documents (each followed by EOS) and cut them into rows of block_size tokens."""
    stream: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=True)["input_ids"])
        if eos is not None:
            stream.append(eos)
    blocks = [stream[i: i + block_size] for i in range(0, len(stream), block_size)]
    # A short tail (>= 2 tokens) is kept: a tiny corpus may not even fill one block.
    return [Example(b, [True] * len(b)) for b in blocks if len(b) >= 2]


def load_examples(path: str | Path, tokenizer: Any, fmt: str, block_size: int) -> list[Example]:
    """Tokenized rows of one data file (.jsonl chat or text records, or a .txt file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such data file")
    if path.suffix in (".txt", ".md"):
        if fmt == "chat":
            raise ConfigError(f"{path}: data.format is chat but this is a plain text file")
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ConfigError(f"{path}: empty dataset")
        return pack_text(tokenizer, [text], block_size)
    records = read_jsonl(path)
    if not records:
        raise ConfigError(f"{path}: empty dataset (no records)")
    if fmt == "auto":
        fmt = "chat" if "messages" in records[0][1] else "text"
    key = "messages" if fmt == "chat" else "text"
    for lineno, record in records:
        if key not in record:
            raise ConfigError(f"{path}:{lineno}: missing key {key!r} (data.format is {fmt})")
    if fmt == "text":
        for lineno, record in records:
            if not isinstance(record["text"], str):
                raise ConfigError(f"{path}:{lineno}: \"text\" must be a string")
        return pack_text(tokenizer, [r["text"] for _, r in records], block_size)

    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{path}: chat data needs a tokenizer with a chat template (this one has none)")
    examples, truncated, dropped = [], 0, 0
    for lineno, record in records:
        where = f"{path}:{lineno}"
        ex = chat_example(tokenizer, check_messages(record["messages"], where), where)
        if len(ex.ids) > block_size:
            truncated += 1
            ex = Example(ex.ids[:block_size], ex.targets[:block_size])
        if ex.n_targets == 0:
            dropped += 1
            continue
        examples.append(ex)
    if truncated:
        warnings.warn(f"{path}: {truncated} of {len(records)} conversations are longer than block_size "
                      f"{block_size} tokens and were truncated", stacklevel=2)
    if dropped:
        warnings.warn(f"{path}: {dropped} conversations have no assistant tokens (within block_size) and were "
                      "skipped", stacklevel=2)
    if not examples:
        raise ConfigError(f"{path}: no conversation has an assistant turn to train on")
    return examples


def build_datasets(data: DataSection, tokenizer: Any, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation) rows: the validation file, or a seeded val_fraction of the training rows."""
    train = load_examples(data.train, tokenizer, data.format, data.block_size)
    if data.val:
        return train, load_examples(data.val, tokenizer, data.format, data.block_size)
    n_val = round(len(train) * data.val_fraction)
    if data.val_fraction > 0 and len(train) >= 2:
        n_val = max(1, n_val)
    if n_val == 0:
        return train, []
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_val])
    return [ex for i, ex in enumerate(train) if i not in held], [train[i] for i in sorted(held)]


class StepSampler:
    """Rows of each optimizer step: an endless stream of per-epoch shuffles, cut into equal steps.

    rows(step) depends only on (seed, step), so a resumed run sees the same rows as an
    uninterrupted one, mid-epoch included, and every process agrees on the whole step.
    """

    def __init__(self, n: int, rows_per_step: int, seed: int) -> None:
        self.n, self.rows_per_step, self.seed = n, rows_per_step, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=gen).tolist()
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # a step spans <= 2 epochs
        return self._perms[epoch]

    def rows(self, step: int) -> list[int]:
        """Dataset indices of optimizer step `step` (0-based)."""
        first = step * self.rows_per_step
        return [self._perm(i // self.n)[i % self.n] for i in range(first, first + self.rows_per_step)]

    def epoch(self, step: int) -> float:
        """Epochs completed after `step` steps."""
        return step * self.rows_per_step / self.n


def collate(examples: Sequence[Example], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, L], targets [B, L] bool), right-padded to the longest row; padding is never a target."""
    length = max(len(ex.ids) for ex in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    targets = torch.zeros((len(examples), length), dtype=torch.bool)
    for i, ex in enumerate(examples):
        ids[i, : len(ex.ids)] = torch.tensor(ex.ids)
        targets[i, : len(ex.ids)] = torch.tensor(ex.targets)
    return ids, targets
