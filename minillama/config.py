"""ModelConfig and the translation from/to Hugging Face `config.json`.

This is the only module that knows how transformers spells its config fields
(`rope_theta` + `rope_scaling` in 4.x, `rope_parameters` in 5.x).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")
QUANT_MODES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)
# A quantized checkpoint's config.json: `quantization_config.quant_method` names our format, and the
# top-level model_type is one transformers does not know (it only warns about an unknown
# quant_method, then would load the integers as float weights); the real one moves into
# quantization_config. AutoConfig then refuses the directory, naming the model type.
QUANT_METHOD = "minillama"
QUANTIZED_MODEL_TYPE = "minillama_quantized"


def _positive_int(value: Any) -> bool:
    # The upper bound keeps a corrupt size (1e30) a config error rather than an overflow in torch.
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31


@dataclass
class RopeConfig:
    """Rotary embedding settings; field names follow transformers' `rope_parameters`."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float | None = None  # linear, dynamic, llama3, yarn
    original_max_position_embeddings: int | None = None  # llama3, yarn
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    beta_fast: float | None = None  # yarn
    beta_slow: float | None = None  # yarn
    attention_factor: float | None = None  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool | None = None  # yarn

    def to_hf(self) -> dict[str, Any]:
        """The 5.x `rope_parameters` dict (unset optional fields left out)."""
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        for f in dataclasses.fields(self):
            if f.name in ("rope_type", "theta"):
                continue
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out


@dataclass
class QuantConfig:
    """Weight-only quantization of the attention and MLP projections (minillama/quant.py).

    mode: int8 (symmetric, per output channel) or int4 (group-wise, scale and zero point per group).
    group_size: int4 only: input columns per group, one of 32, 64, 128, 256 (default 64).
    lm_head: also quantize the output projection (off by default: see docs/quantization.md).
    """

    mode: str
    group_size: int | None = None
    lm_head: bool = False

    def __post_init__(self) -> None:
        if self.mode not in QUANT_MODES:
            raise ConfigError(f"unknown quantization mode {self.mode!r}; choose {' or '.join(QUANT_MODES)}")
        if self.mode == "int8" and self.group_size is not None:
            raise ConfigError("int8 is quantized per output channel; a group size applies to int4 only")
        if self.mode == "int4":
            self.group_size = 64 if self.group_size is None else self.group_size
            if self.group_size not in INT4_GROUP_SIZES:
                raise ConfigError(f"int4 group size {self.group_size!r}; choose one of "
                                  f"{', '.join(map(str, INT4_GROUP_SIZES))}")
        if not isinstance(self.lm_head, bool):
            raise ConfigError(f"quantization lm_head must be true or false, got {self.lm_head!r}")

    @classmethod
    def parse(cls, spec: str) -> QuantConfig:
        """From a name as `name` writes it: MODE[-gGROUP][+lm_head], e.g. int8, int4, int4-g32+lm_head."""
        import re

        m = re.fullmatch(r"(int8|int4)(?:-g(\d+))?(\+lm_head)?", spec.strip().lower())
        if not m:
            raise ConfigError(f"unknown quantization {spec!r}; expected int8, int4 or int4-gGROUP "
                              f"(GROUP {', '.join(map(str, INT4_GROUP_SIZES))}), optionally followed by +lm_head")
        return cls(m.group(1), int(m.group(2)) if m.group(2) else None, m.group(3) is not None)

    @property
    def name(self) -> str:
        """int8, int4-g64, ... (+lm_head): what `parse` reads."""
        return self.mode + (f"-g{self.group_size}" if self.group_size else "") + ("+lm_head" if self.lm_head else "")

    def to_hf(self) -> dict[str, Any]:
        """The `quantization_config` entry of config.json."""
        return {"quant_method": QUANT_METHOD, "mode": self.mode, "group_size": self.group_size,
                "lm_head": self.lm_head}

    @classmethod
    def from_hf(cls, entry: Any, source: str = "config.json") -> QuantConfig:
        """Read config.json's `quantization_config`; another library's method is a ConfigError."""
        method = entry.get("quant_method") if isinstance(entry, dict) else None
        if method != QUANT_METHOD:
            raise ConfigError(f"{source}: field 'quantization_config' (quant_method {method!r}) is not supported "
                              f"by minillama; it loads unquantized checkpoints and its own ({QUANT_METHOD!r})")
        unknown = sorted(set(entry) - {"quant_method", "mode", "group_size", "lm_head", "model_type"})
        if unknown:
            raise ConfigError(f"{source}: quantization_config: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(entry.get("mode"), entry.get("group_size"), entry.get("lm_head", False))
        except ConfigError as e:
            raise ConfigError(f"{source}: quantization_config: {e}") from None


@dataclass
class ModelConfig:
    """Everything needed to build a minillama Transformer. Field names follow HF's LlamaConfig."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    sliding_window: int | None = None  # Mistral: a query sees the last `sliding_window` keys, itself included
    rope: RopeConfig = field(default_factory=RopeConfig)
    hidden_act: str = "silu"
    model_type: str = "llama"
    norm: str = "rmsnorm"  # a key of minillama.norms.NORMS
    quantization: QuantConfig | None = None  # weight-only int8/int4 projections (minillama/quant.py)
    # HF fields we do not interpret (token ids, dtype, ...), written back on save.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and _positive_int(self.hidden_size) and _positive_int(self.num_attention_heads):
            self.head_dim = self.hidden_size // self.num_attention_heads
        if isinstance(self.rope, dict):
            self.rope = RopeConfig(**self.rope)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first field with an impossible value."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not _positive_int(value):
                limit = " below 2**31" if isinstance(value, int) and value >= 2**31 else ""
                raise ConfigError(f"config field '{name}' must be a positive integer{limit}, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field 'num_attention_heads' ({self.num_attention_heads}) must be a multiple of "
                f"'num_key_value_heads' ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config field 'head_dim' must be even for rotary embeddings, got {self.head_dim}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ConfigError(f"config field 'rms_norm_eps' must be a positive number, got {self.rms_norm_eps!r}")
        if self.sliding_window is not None and not _positive_int(self.sliding_window):
            raise ConfigError(
                f"config field 'sliding_window' must be a positive integer or null, got {self.sliding_window!r}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"config field 'hidden_act' is {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        if self.model_type not in ARCHITECTURES:
            raise ConfigError(
                f"config field 'model_type' is {self.model_type!r}; supported: {', '.join(ARCHITECTURES)}"
            )
        _validate_rope(self.rope)

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (1: MHA, num_attention_heads: MQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a transformers config dict; errors name `source` and the field."""
        return from_hf_config(hf, source)

    def to_hf(self) -> dict[str, Any]:
        """A transformers-loadable config dict (5.x spelling, which 4.x also reads for rope_theta)."""
        return to_hf_config(self)


# Fields we read; everything else in config.json is kept verbatim in ModelConfig.extra.
_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_READ = set(_INT_FIELDS) | {
    "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "max_position_embeddings", "sliding_window", "rope_theta", "rope_scaling", "rope_parameters",
    "hidden_act", "model_type", "architectures", "use_sliding_window", "partial_rotary_factor", "layer_types",
    "quantization_config",
}
# Fields whose non-default value would change the math in a way we do not implement.
_UNSUPPORTED = {
    "partial_rotary_factor": (None, 1, 1.0),
    "layer_types": (None,),
}


def _validate_rope(rope: RopeConfig) -> None:
    where = "rope_parameters"
    if rope.rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"config field '{where}.rope_type' is {rope.rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
        )
    if not (isinstance(rope.theta, (int, float)) and rope.theta > 0):
        raise ConfigError(f"config field '{where}.rope_theta' must be a positive number, got {rope.theta!r}")
    needs = {
        "linear": ("factor",),
        "dynamic": ("factor",),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        "yarn": ("factor", "original_max_position_embeddings"),
    }.get(rope.rope_type, ())
    for name in needs:
        value = getattr(rope, name)
        if value is None:
            raise ConfigError(f"config field '{where}.{name}' is required for rope_type {rope.rope_type!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"config field '{where}.{name}' must be a positive number, got {value!r}")
    if rope.rope_type == "llama3" and rope.high_freq_factor <= rope.low_freq_factor:
        raise ConfigError(
            f"config field '{where}.high_freq_factor' ({rope.high_freq_factor}) must exceed "
            f"'low_freq_factor' ({rope.low_freq_factor})"
        )


def _rope_from_hf(hf: dict[str, Any], source: str) -> RopeConfig:
    # 5.x: rope_parameters holds everything; 4.x: rope_theta at top level + optional rope_scaling
    # (whose type key was once spelled "type").
    params = hf.get("rope_parameters")
    key = "rope_parameters"
    if params is None:
        params = hf.get("rope_scaling")
        key = "rope_scaling"
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: field '{key}' must be an object or null, got {params!r}")
    params = dict(params)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{source}: field '{key}.partial_rotary_factor' is not supported (only 1.0)")
    params.pop("partial_rotary_factor", None)
    if rope_type in ("llama3", "yarn"):
        # transformers fills this from max_position_embeddings when absent.
        params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    known = {f.name for f in dataclasses.fields(RopeConfig)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"{source}: field '{key}' has unsupported key(s) {unknown} for rope_type {rope_type!r}")
    try:
        rope = RopeConfig(rope_type=rope_type, theta=theta, **params)
        _validate_rope(rope)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return rope


def from_hf_config(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Translate a transformers Llama/Mistral config dict into a ModelConfig."""
    if not isinstance(hf, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    if hf.get("model_type") == QUANTIZED_MODEL_TYPE:
        entry = hf.get("quantization_config")
        hf = {**hf, "model_type": entry.get("model_type") if isinstance(entry, dict) else None}
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"{source}: unsupported architecture: field 'model_type' is {model_type!r}; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    archs = hf.get("architectures") or [ARCHITECTURES[model_type]]
    if any(a != ARCHITECTURES[model_type] for a in archs):
        raise ConfigError(
            f"{source}: unsupported architecture: field 'architectures' is {archs!r}; "
            f"expected [{ARCHITECTURES[model_type]!r}]"
        )
    for name in _INT_FIELDS:
        if name not in hf:
            raise ConfigError(f"{source}: required field '{name}' is missing")
    for name, allowed in _UNSUPPORTED.items():
        if hf.get(name) not in allowed:
            raise ConfigError(f"{source}: field '{name}' = {hf[name]!r} is not supported by minillama")
    for name in ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window"):
        if hf.get(name) is not None and not isinstance(hf[name], bool):
            raise ConfigError(f"{source}: field '{name}' must be true or false, got {hf[name]!r}")

    is_mistral = model_type == "mistral"
    sliding_window = hf.get("sliding_window") if is_mistral else None
    if is_mistral and hf.get("use_sliding_window") is False:
        sliding_window = None
    kwargs = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        # transformers' Mistral has no biases whatever the config says.
        attention_bias=False if is_mistral else bool(hf.get("attention_bias", False)),
        mlp_bias=False if is_mistral else bool(hf.get("mlp_bias", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        sliding_window=sliding_window,
        rope=_rope_from_hf(hf, source),
        hidden_act=hf.get("hidden_act", "silu"),
        model_type=model_type,
        quantization=(None if hf.get("quantization_config") is None
                      else QuantConfig.from_hf(hf["quantization_config"], source)),
        extra={k: v for k, v in hf.items() if k not in _READ},
    )
    try:
        return ModelConfig(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The inverse of from_hf_config: a dict transformers' AutoConfig accepts."""
    out: dict[str, Any] = dict(cfg.extra)
    out.update(
        architectures=[ARCHITECTURES[cfg.model_type]],
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_act=cfg.hidden_act,
        rope_parameters=cfg.rope.to_hf(),
        # 4.x readers look for these two at top level.
        rope_theta=cfg.rope.theta,
        rope_scaling=None if cfg.rope.rope_type == "default" else cfg.rope.to_hf(),
    )
    if cfg.quantization is not None:
        out["quantization_config"] = {**cfg.quantization.to_hf(), "model_type": cfg.model_type}
        out["model_type"] = QUANTIZED_MODEL_TYPE
    if cfg.model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    else:
        out.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    return out


def load_config(path: str | Path) -> ModelConfig:
    """Read `<dir>/config.json` (or a config.json path) into a ModelConfig."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{file}: config.json not found")
    try:
        hf = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    return from_hf_config(hf, str(file))


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """'bfloat16' / 'bf16' / torch.bfloat16 -> torch.bfloat16; ConfigError for anything else."""
    if isinstance(value, torch.dtype):
        if value in _DTYPES.values():
            return value
        raise ConfigError(f"unsupported dtype {value}; use float32, bfloat16 or float16")
    key = str(value).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"unknown dtype {value!r}; use float32, bfloat16 or float16")
    return _DTYPES[key]


def checkpoint_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype config.json says the weights were saved in (float32 when it says none).

    An unknown one is a ConfigError: guessing would load a checkpoint in a dtype nobody chose.
    """
    key = "dtype" if cfg.extra.get("dtype") is not None else "torch_dtype"
    value = cfg.extra.get(key) or "float32"
    try:
        return parse_dtype(value)
    except ConfigError:
        raise ConfigError(f"config field '{key}' is {value!r}, not float32, bfloat16 or float16; "
                          "pass a dtype to load it in one of those") from None
