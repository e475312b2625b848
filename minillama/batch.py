"""Generation for a file of prompts, split across processes (`accelerate launch`) and gathered in order.

Batches are planned once for the whole file (prompts sorted by length, cut into batch_size
groups) and whole batches are handed to processes, so every batch, and with it every output,
is the same whatever the number of processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from .dist import process_state
from .errors import ConfigError, GenerationError
from .generate import eos_ids, generate
from .tokenizer import encode_prompt

PROMPT_KEYS = ("prompt", "text")


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL prompt file: {"prompt": str} ({"text": str}) or {"messages": [{"role", "content"}, ...]}."""
    from .train.data import check_messages, read_jsonl

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such prompt file")
    records = []
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        if "messages" in record:
            check_messages(record["messages"], where)
        elif not any(isinstance(record.get(k), str) and record[k] for k in PROMPT_KEYS):
            raise ConfigError(f"{where}: expected a non-empty \"prompt\" (or \"text\") string or a \"messages\" list")
        records.append(record)
    if not records:
        raise ConfigError(f"{path}: no prompts")
    return records


def encode_record(tokenizer: Any, record: dict[str, Any], chat: bool | None, system: str | None = None) -> list[int]:
    """Prompt ids of one record (chat template when there is one, as `minillama generate` does)."""
    messages = record.get("messages") or [
        {"role": "user", "content": next(record[k] for k in PROMPT_KEYS if isinstance(record.get(k), str))}]
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return encode_prompt(tokenizer, messages, chat)


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Prompt indices grouped into batches of similar length (less padding), in a fixed order."""
    if batch_size < 1:
        raise GenerationError(f"batch size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def run_batches(model: Any, tokenizer: Any, prompts: Sequence[list[int]], batches: Sequence[list[int]],
                max_new_tokens: int, **options: Any) -> list[tuple[int, str, int]]:
    """(index, completion text, new token count) for every prompt in `batches`."""
    stops = set(eos_ids(model, tokenizer))
    results = []
    for batch in batches:
        out = generate(model, [prompts[i] for i in batch], max_new_tokens, tokenizer=tokenizer, **options)
        width = out.shape[1] - max(len(prompts[i]) for i in batch)
        for i, row in zip(batch, out[:, -width:].tolist() if width else [[]] * len(batch)):
            new = []
            for token in row:
                if token in stops:
                    break
                new.append(token)
            results.append((i, tokenizer.decode(new, skip_special_tokens=True), len(new)))
    return results


def generate_file(model: Any, tokenizer: Any, prompts_path: str | Path, out_path: str | Path, *,
                  max_new_tokens: int, batch_size: int = 8, chat: bool | None = None, system: str | None = None,
                  **options: Any) -> int:
    """Generate for every prompt of a JSONL file with this process's share of the batches, gather all
    results on the main process and write them, in input order, as JSONL (input record + "completion",
    "new_tokens"). Returns the number of prompts. Run it in every process of an `accelerate launch`."""
    from accelerate.utils import gather_object

    state = process_state()
    records = read_prompts(prompts_path)
    prompts = [encode_record(tokenizer, r, chat, system) for r in records]
    batches = plan_batches([len(p) for p in prompts], batch_size)
    with state.split_between_processes(batches) as mine:
        local = run_batches(model, tokenizer, prompts, mine, max_new_tokens, **options)
    gathered = gather_object(local) if state.num_processes > 1 else local
    if state.is_main_process:
        by_index = {i: (text, n) for i, text, n in gathered}
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(f".{out_path.name}.tmp")
        with open(tmp, "w") as f:
            for i, record in enumerate(records):
                text, n = by_index[i]
                f.write(json.dumps({"index": i, **record, "completion": text, "new_tokens": n}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(out_path)  # readers see the whole file or the previous one, never half
    state.wait_for_everyone()
    return len(records)
