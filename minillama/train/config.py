"""Fine-tuning recipes: dataclasses read from YAML, with dotted command-line overrides.

Relative paths inside a YAML file are relative to that file; paths given on the command line are
relative to the current directory. An unknown key or a value of the wrong type is a ConfigError
naming the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import QuantConfig
from ..errors import ConfigError
from ..hub import is_repo_id

LORA_TARGETS = ["wqkv", "wo", "w_gate_up", "w_down"]


@dataclass
class ModelSection:
    """Which model to fine-tune."""

    path: str | None = None  # local HF checkpoint directory; "default": the embedded SmolLM2
    config: dict | None = None  # HF config.json fields of a freshly initialised model (instead of path)
    tokenizer: str | None = None  # a checkpoint directory or "byte"; default: path
    dtype: str = "float32"  # the trained (master) weights; compute precision is mixed_precision
    norm: str | None = None  # a registered norm name replacing RMSNorm
    # int8 / int4[-gGROUP]: a frozen quantized base under LoRA adapters (QLoRA-style; needs lora.enabled).
    # The export dequantizes it and merges the adapters into an ordinary HF checkpoint.
    quantize: str | None = None


@dataclass
class DataSection:
    """Training data: JSONL chat ({"messages": [...]}), JSONL text ({"text": ...}) or a .txt file."""

    train: str = ""
    val: str | None = None  # a separate validation file; else val_fraction of train is held out
    val_fraction: float = 0.05
    format: str = "auto"  # chat | text | auto (chat when the first record has "messages")
    block_size: int = 512  # tokens per row: text is packed into blocks, chats are truncated to it


@dataclass
class OptimSection:
    """AdamW with linear warmup then cosine decay to min_lr_ratio * lr over decay_steps."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    # Schedule length. Default: the recipe's max_steps, fixed before command-line overrides, so
    # `--max-steps` only moves the end of a run: 50 steps, then --resume to 100, equals 100 straight.
    decay_steps: int | None = None
    grad_clip: float | None = 1.0  # max global gradient norm; null: no clipping


@dataclass
class LoraSection:
    """Low-rank adapters (peft) on the named linear layers; merged into the weights on export."""

    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class FinetuneConfig:
    """A whole fine-tuning run. batch_size is per process; one optimizer step sees
    batch_size * grad_accum * processes rows."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    lora: LoraSection = field(default_factory=LoraSection)
    out: str = "runs/finetune"
    seed: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 100  # length of the run (and, by default, of the LR schedule: optim.decay_steps)
    stop_after: int | None = None  # stop (checkpointed) after this step, e.g. for time-sliced jobs
    mixed_precision: str | None = None  # no | bf16 | fp16; null: the accelerate config's (else no)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder block (regional compilation: Transformer.compile_blocks)
    log_every: int = 1
    eval_every: int = 50  # also evaluated after the last step; 0: only then
    eval_max_batches: int | None = None  # cap on validation batches per evaluation
    save_every: int = 50  # also saved after the last step
    keep_last: int = 2
    resume: str | None = None  # "auto": the newest complete checkpoint in out/checkpoints; or a path
    export: bool = True  # write the merged HF model to out/final at the end

    def validate(self, source: str = "config") -> None:
        """Raise ConfigError naming the first impossible setting."""
        checks = [
            ("batch_size", self.batch_size >= 1, ">= 1"), ("grad_accum", self.grad_accum >= 1, ">= 1"),
            ("max_steps", self.max_steps >= 1, ">= 1"), ("log_every", self.log_every >= 1, ">= 1"),
            ("eval_every", self.eval_every >= 0, ">= 0"), ("save_every", self.save_every >= 0, ">= 0"),
            ("keep_last", self.keep_last >= 1, ">= 1"),
            ("stop_after", self.stop_after is None or self.stop_after >= 1, ">= 1 or null"),
            ("eval_max_batches", self.eval_max_batches is None or self.eval_max_batches >= 1, ">= 1 or null"),
            ("mixed_precision", self.mixed_precision in (None, "no", "bf16", "fp16"), "one of no, bf16, fp16 or null"),
            ("model.dtype", self.model.dtype in ("float32", "bfloat16", "float16"),
             "one of float32, bfloat16, float16"),
            ("data.format", self.data.format in ("auto", "chat", "text"), "one of auto, chat, text"),
            ("data.block_size", self.data.block_size >= 2, ">= 2"),
            ("data.val_fraction", 0.0 <= self.data.val_fraction < 1.0, "in [0, 1)"),
            ("optim.lr", self.optim.lr > 0, "> 0"), ("optim.weight_decay", self.optim.weight_decay >= 0, ">= 0"),
            ("optim.betas", len(self.optim.betas) == 2 and all(0 <= b < 1 for b in self.optim.betas),
             "two numbers in [0, 1)"),
            ("optim.eps", self.optim.eps > 0, "> 0"), ("optim.warmup_steps", self.optim.warmup_steps >= 0, ">= 0"),
            ("optim.min_lr_ratio", 0 <= self.optim.min_lr_ratio <= 1, "in [0, 1]"),
            ("optim.decay_steps", self.optim.decay_steps is None or self.optim.decay_steps >= 1, ">= 1 or null"),
            ("optim.grad_clip", self.optim.grad_clip is None or self.optim.grad_clip > 0, "> 0 or null"),
            ("model.quantize", self.model.quantize is None or self.lora.enabled,
             "null unless lora.enabled (quantized weights are frozen: only adapters can train)"),
            ("lora.r", self.lora.r >= 1, ">= 1"), ("lora.alpha", self.lora.alpha > 0, "> 0"),
            ("lora.dropout", 0 <= self.lora.dropout < 1, "in [0, 1)"),
            ("lora.targets", bool(self.lora.targets), "a non-empty list of module names"),
        ]
        for key, ok, want in checks:
            if not ok:
                raise ConfigError(f"{source}: {key} must be {want}, got {_get(self, key)!r}")
        if self.model.quantize is not None:
            try:
                QuantConfig.parse(self.model.quantize)
            except ConfigError as e:
                raise ConfigError(f"{source}: model.quantize: {e}") from None
        if (self.model.path is None) == (self.model.config is None):
            raise ConfigError(f"{source}: set exactly one of model.path (a checkpoint) and model.config "
                              "(a fresh random model)")
        if self.model.config is not None and self.model.tokenizer is None:
            raise ConfigError(f"{source}: model.config needs model.tokenizer (a checkpoint directory or 'byte')")
        if not self.data.train:
            raise ConfigError(f"{source}: data.train is required (a .jsonl or .txt file)")


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` as the annotated type, or ConfigError. YAML reads 1e-4 as a string, so numbers may be strings."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list or hint is list:
        if isinstance(value, (list, tuple)):
            inner = args[0] if args else Any
            return [v if inner is Any else _coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    elif hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{where}: expected {name}, got {value!r}")


def _merge(obj: Any, values: dict[str, Any], source: str, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"{source}: unknown key {dotted!r}{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {dotted} must be a mapping, got {value!r}")
            _merge(current, value, source, f"{dotted}.")
        elif isinstance(current, dict) and isinstance(value, dict):  # model.config: override key by key
            setattr(obj, key, {**current, **value})
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{source}: {dotted}"))


# Keys whose values are paths: relative ones are taken relative to the YAML file that sets them.
PATH_KEYS = {("model", "path"), ("model", "tokenizer"), ("data", "train"), ("data", "val")}


def _resolve_paths(values: dict[str, Any], base: Path) -> None:
    for section, key in PATH_KEYS:
        sub = values.get(section)
        if isinstance(sub, dict) and isinstance(sub.get(key), str):
            raw = sub[key]
            if raw in ("default", "byte") or Path(raw).expanduser().is_absolute():
                continue
            # A model may be a Hugging Face id; a directory of that name beside the recipe wins.
            if section == "model" and is_repo_id(raw) and not (base / raw).exists():
                continue
            sub[key] = str(base / raw)


def load_finetune_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """A FinetuneConfig from a YAML recipe (or defaults) plus {dotted.key: value} overrides, validated."""
    import yaml

    cfg = FinetuneConfig()
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
        _resolve_paths(values, path.parent)
        _merge(cfg, values, source)
    if cfg.optim.decay_steps is None:
        cfg.optim.decay_steps = cfg.max_steps  # the recipe's, not a --max-steps override (see OptimSection)
    for dotted, value in (overrides or {}).items():
        nested: Any = value
        for part in reversed(dotted.split(".")):
            nested = {part: nested}
        _merge(cfg, nested, "command line")
    cfg.validate(source)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=1e-4' -> ('optim.lr', 0.0001): the value is read as YAML."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        return key.strip(), raw


def to_dict(cfg: FinetuneConfig) -> dict[str, Any]:
    """The config as plain data (for checkpoints and logs)."""
    return dataclasses.asdict(cfg)
