"""ModelConfig and the translation from/to Hugging Face `config.json`.

This is the only module that knows how transformers spells its config fields (`rope_theta` +
`rope_scaling` in 4.x, `rope_parameters` in 5.x) and how each family's fields say what its model
does: `FAMILIES` is the one table of `model_type`s. The model reads ModelConfig's fields (bias per
projection, where the norms sit, soft-caps, per-layer windows and RoPE, ...), never a model_type.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
NORM_PLACEMENTS = ("pre", "post", "sandwich")
QK_NORMS = (None, "head", "proj")
LAYER_TYPES = ("full", "sliding")
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
    short_factor: list[float] | None = None  # longrope: per-frequency divisors up to the original length
    long_factor: list[float] | None = None  # longrope: past it

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
    """Everything needed to build a minillama Transformer: what the model does, in our words.

    Size fields follow HF's LlamaConfig; the rest says what a family does differently (the
    FAMILIES table below translates each family's config.json into these fields and back).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2 has these, not o's)
    o_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    # A query on a sliding layer sees the last `sliding_window` keys, itself included.
    sliding_window: int | None = None
    # Per layer "full" or "sliding"; None: every layer slides when sliding_window is set (Mistral).
    layer_types: list[str] | None = None
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_local: RopeConfig | None = None  # RoPE of the sliding layers when it differs (Gemma 3)
    partial_rotary_factor: float = 1.0  # the first fraction of each head is rotated (Phi-4-mini: 0.75)
    nope_layers: list[int] = field(default_factory=list)  # layers without RoPE (SmolLM3)
    hidden_act: str = "silu"
    # Norms: where they sit ("pre": before each sublayer; "post": on each sublayer's output, OLMo 2;
    # "sandwich": both, Gemma 2/3), q/k norms (None, "head": over each head, "proj": over the whole
    # projection), and the gain: weight + norm_offset (Gemma: 1), multiplied in fp32 and cast after
    # (norm_fp32_gain: Gemma, OLMo 2) or after casting the normalised value (Llama).
    norm_placement: str = "pre"
    qk_norm: str | None = None
    norm_offset: float = 0.0
    norm_fp32_gain: bool = False
    # Scales: embeddings (Gemma: sqrt(hidden) rounded to the model dtype, embed_scale_in_dtype;
    # Granite: a multiplier), sublayer outputs before the residual add, attention scores (None:
    # head_dim ** -0.5), logits divided by logits_divisor; tanh soft-caps on scores and logits.
    embed_scale: float | None = None
    embed_scale_in_dtype: bool = False
    residual_scale: float = 1.0
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    logits_divisor: float = 1.0
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
        if isinstance(self.rope_local, dict):
            self.rope_local = RopeConfig(**self.rope_local)
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
        if self.layer_types is not None:
            if not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers:
                raise ConfigError(f"config field 'layer_types' must list one type per layer "
                                  f"({self.num_hidden_layers}), got {self.layer_types!r}")
            bad = [t for t in self.layer_types if t not in LAYER_TYPES]
            if bad:
                raise ConfigError(f"config field 'layer_types' has {bad[0]!r}; supported: full, sliding")
        if not (isinstance(self.partial_rotary_factor, (int, float)) and 0 < self.partial_rotary_factor <= 1):
            raise ConfigError(f"config field 'partial_rotary_factor' must be in (0, 1], got "
                              f"{self.partial_rotary_factor!r}")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ConfigError(f"config field 'partial_rotary_factor' ({self.partial_rotary_factor}) rotates "
                              f"{self.rotary_dim} of {self.head_dim} dimensions; that must be even and positive")
        if any(not isinstance(i, int) or not 0 <= i < self.num_hidden_layers for i in self.nope_layers):
            raise ConfigError(f"config field 'nope_layers' must hold layer indices below {self.num_hidden_layers}, "
                              f"got {self.nope_layers!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"config field 'hidden_act' is {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        if self.norm_placement not in NORM_PLACEMENTS:
            raise ConfigError(f"config field 'norm_placement' is {self.norm_placement!r}; "
                              f"supported: {', '.join(NORM_PLACEMENTS)}")
        if self.qk_norm not in QK_NORMS:
            raise ConfigError(f"config field 'qk_norm' is {self.qk_norm!r}; supported: none, head, proj")
        for name in ("embed_scale", "attn_scale", "attn_softcap", "final_softcap", "residual_scale", "logits_divisor"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"config field '{name}' must be a positive number, got {value!r}")
        if self.model_type not in FAMILIES:
            raise ConfigError(
                f"config field 'model_type' is {self.model_type!r}; supported: {', '.join(FAMILIES)}"
            )
        for where, rope in (("rope_parameters", self.rope), ("rope_local", self.rope_local)):
            if rope is not None:
                _validate_rope(rope, where, self.rotary_dim // 2)

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (1: MHA, num_attention_heads: MQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (all of them unless partial_rotary_factor < 1)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer i (None: it attends to every earlier token)."""
        sliding = self.layer_types is None or self.layer_types[i] == "sliding"
        return self.sliding_window if sliding else None

    def layer_rope(self, i: int) -> str | None:
        """Which RoPE layer i uses: "global", "local" (rope_local) or None (no RoPE)."""
        if i in self.nope_layers:
            return None
        return "local" if self.rope_local is not None and self.layer_window(i) is not None else "global"

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a transformers config dict; errors name `source` and the field."""
        return from_hf_config(hf, source)

    def to_hf(self) -> dict[str, Any]:
        """A transformers-loadable config dict (5.x spelling, which 4.x also reads for rope_theta)."""
        return to_hf_config(self)


# Fields the common reader takes; everything else in config.json is kept verbatim in
# ModelConfig.extra, except what a family's reader takes (Family.keys).
_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_READ = set(_INT_FIELDS) | {
    "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "max_position_embeddings", "sliding_window", "rope_theta", "rope_scaling", "rope_parameters",
    "hidden_act", "model_type", "architectures", "use_sliding_window", "partial_rotary_factor", "layer_types",
    "quantization_config",
}
# Fields whose non-default value would change the math in a way no family here implements.
_UNSUPPORTED = {
    "num_experts": "mixture-of-experts layers", "num_local_experts": "mixture-of-experts layers",
    "n_routed_experts": "mixture-of-experts layers", "moe_intermediate_size": "mixture-of-experts layers",
    "vision_config": "a vision tower", "text_config": "a multimodal wrapper (load its text model)",
    "use_bidirectional_attention": "bidirectional attention",
}


def _validate_rope(rope: RopeConfig, where: str = "rope_parameters", pairs: int | None = None) -> None:
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
        "longrope": ("original_max_position_embeddings",),
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
    if rope.rope_type == "longrope":
        for name in ("short_factor", "long_factor"):
            value = getattr(rope, name)
            if (not isinstance(value, list) or (pairs is not None and len(value) != pairs)
                    or not all(isinstance(v, (int, float)) and v > 0 for v in value)):
                raise ConfigError(f"config field '{where}.{name}' must list {pairs or 'one'} positive "
                                  f"number(s) (one per rotated pair), got {value!r}")


def _rope_from_params(params: Any, key: str, hf: dict[str, Any], source: str) -> RopeConfig:
    """A RopeConfig from one rope_parameters / rope_scaling dict (None: default RoPE)."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: field '{key}' must be an object or null, got {params!r}")
    params = dict(params)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type in ("su",):  # Phi-3's early name for longrope
        rope_type = "longrope"
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{source}: field '{key}.partial_rotary_factor' is not supported (only 1.0)")
    params.pop("partial_rotary_factor", None)
    if rope_type in ("llama3", "yarn", "longrope"):
        # transformers fills this from the top-level field (Phi-3) or max_position_embeddings.
        params.setdefault("original_max_position_embeddings", hf.get("original_max_position_embeddings")
                          or hf.get("max_position_embeddings"))
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


def _rope_from_hf(hf: dict[str, Any], source: str) -> RopeConfig:
    # 5.x: rope_parameters holds everything; 4.x: rope_theta at top level + optional rope_scaling
    # (whose type key was once spelled "type").
    if hf.get("rope_parameters") is not None:
        return _rope_from_params(hf["rope_parameters"], "rope_parameters", hf, source)
    return _rope_from_params(hf.get("rope_scaling"), "rope_scaling", hf, source)


# ---------------------------------------------------------------- the families

HFConfig = Any  # a transformers PretrainedConfig (its family's class, defaults and derived fields filled)


@dataclass(frozen=True)
class Family:
    """How one transformers `model_type` reads into ModelConfig fields and writes back.

    read(hf, tc, source) returns the fields this family sets beyond the common ones (Llama's
    meaning of each config.json field); tc() builds transformers' own config object for the dict,
    so defaults and derived fields (layer_types, standardised rope_parameters) are transformers'
    own. write(cfg) returns the config.json fields that say the same. keys: fields `read` takes,
    so they are not also kept verbatim in `extra`.
    """

    architecture: str
    read: Callable[[dict[str, Any], Callable[[], HFConfig], str], dict[str, Any]] | None = None
    write: Callable[[ModelConfig], dict[str, Any]] | None = None
    keys: tuple[str, ...] = ()
    has_bias_fields: bool = True  # config.json says attention_bias / mlp_bias


def _layer_types_from_hf(types: list[str] | None, source: str) -> list[str] | None:
    if types is None:
        return None
    names = {"full_attention": "full", "sliding_attention": "sliding"}
    bad = [t for t in types if t not in names]
    if bad:
        raise ConfigError(f"{source}: field 'layer_types' has {bad[0]!r} layers, which minillama does not "
                          "implement (full_attention and sliding_attention only)")
    return [names[t] for t in types]


def _layer_types_to_hf(cfg: ModelConfig) -> list[str]:
    return ["sliding_attention" if cfg.layer_window(i) is not None else "full_attention"
            for i in range(cfg.num_hidden_layers)]


def _common_tc(tc: HFConfig) -> dict[str, Any]:
    """Fields whose defaults differ between families, as transformers' config class fills them."""
    out = dict(head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
               num_key_value_heads=tc.num_key_value_heads, rms_norm_eps=tc.rms_norm_eps,
               tie_word_embeddings=bool(tc.tie_word_embeddings), max_position_embeddings=tc.max_position_embeddings,
               hidden_act=getattr(tc, "hidden_activation", None) or tc.hidden_act)
    bias = bool(getattr(tc, "attention_bias", False))
    out.update(qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(tc, "mlp_bias", False)))
    return out


def _windows(tc: HFConfig, source: str) -> dict[str, Any]:
    """sliding_window and layer_types as transformers derived them (use_sliding_window, max_window_layers,
    sliding_window_pattern: all folded into layer_types)."""
    types = _layer_types_from_hf(getattr(tc, "layer_types", None), source)
    window = getattr(tc, "sliding_window", None)
    if window is None or (types is not None and "sliding" not in types):
        return dict(sliding_window=None, layer_types=None)
    return dict(sliding_window=window, layer_types=types)


def _tc_rope(tc: HFConfig, hf: dict[str, Any], source: str) -> dict[str, Any]:
    """rope (and rope_local, partial_rotary_factor) from transformers' standardised rope_parameters."""
    params = tc.rope_parameters or {}
    out: dict[str, Any] = {}
    if "full_attention" in params or "sliding_attention" in params:
        out["rope"] = _rope_from_params(params.get("full_attention"), "rope_parameters.full_attention", hf, source)
        local = _rope_from_params(params.get("sliding_attention"), "rope_parameters.sliding_attention", hf, source)
        out["rope_local"] = None if local == out["rope"] else local
        return out
    params = dict(params)
    partial = params.pop("partial_rotary_factor", None) or getattr(tc, "partial_rotary_factor", None) or 1.0
    if partial != 1.0:
        out["partial_rotary_factor"] = float(partial)
    out["rope"] = _rope_from_params(params, "rope_parameters", hf, source)
    return out


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.rope_local is not None:
        return {"rope_parameters": {"full_attention": cfg.rope.to_hf(), "sliding_attention": cfg.rope_local.to_hf()}}
    params = cfg.rope.to_hf()
    if cfg.partial_rotary_factor != 1.0:
        params["partial_rotary_factor"] = cfg.partial_rotary_factor
    out = {"rope_parameters": params}
    if cfg.rope.rope_type == "longrope":
        out["original_max_position_embeddings"] = cfg.rope.original_max_position_embeddings
    return out


def _read_mistral(hf, tc, source):
    window = hf.get("sliding_window")
    if hf.get("use_sliding_window") is False:
        window = None
    # transformers' Mistral has no biases whatever the config says.
    return dict(sliding_window=window, qkv_bias=False, o_bias=False, mlp_bias=False)


def _read_qwen2(hf, tc, source):
    c = tc()
    out = {**_common_tc(c), **_windows(c, source), **_tc_rope(c, hf, source)}
    if hf.get("model_type") == "qwen2":  # q/k/v biases always, none on o or the MLP
        out.update(qkv_bias=True, o_bias=False, mlp_bias=False)
    else:  # qwen3: RMSNorm over each head of q and k, before RoPE
        out.update(qk_norm="head", mlp_bias=False)
    return out


def _write_windows(cfg: ModelConfig) -> dict[str, Any]:
    sliding = cfg.sliding_window is not None
    return dict(use_sliding_window=sliding, sliding_window=cfg.sliding_window,
                layer_types=_layer_types_to_hf(cfg), max_window_layers=cfg.num_hidden_layers)


def _gemma_common(c: HFConfig) -> dict[str, Any]:
    # RMSNorm x * (1 + w) in fp32, cast after; embeddings times sqrt(hidden) rounded to the model dtype.
    return dict(norm_offset=1.0, norm_fp32_gain=True, embed_scale=c.hidden_size**0.5, embed_scale_in_dtype=True,
                mlp_bias=False)


def _read_gemma(hf, tc, source):
    c = tc()
    return {**_common_tc(c), **_gemma_common(c), **_tc_rope(c, hf, source)}


def _read_gemma2(hf, tc, source):
    c = tc()
    out = {**_common_tc(c), **_gemma_common(c), **_windows(c, source), **_tc_rope(c, hf, source)}
    out.update(norm_placement="sandwich", attn_scale=c.query_pre_attn_scalar**-0.5)
    if hf.get("model_type") == "gemma2":
        out.update(attn_softcap=c.attn_logit_softcapping, final_softcap=c.final_logit_softcapping)
    else:  # gemma3_text: q/k norms; transformers ignores attn_logit_softcapping for Gemma 3
        out.update(qk_norm="head", final_softcap=c.final_logit_softcapping)
    return out


def _write_gemma2(cfg: ModelConfig) -> dict[str, Any]:
    out = dict(sliding_window=cfg.sliding_window, layer_types=_layer_types_to_hf(cfg),
               query_pre_attn_scalar=_pre_attn_scalar(cfg), final_logit_softcapping=cfg.final_softcap,
               hidden_activation=cfg.hidden_act)
    if cfg.model_type == "gemma2":
        out["attn_logit_softcapping"] = cfg.attn_softcap
    return out


def _pre_attn_scalar(cfg: ModelConfig) -> float | int:
    if cfg.attn_scale is None:
        return cfg.head_dim
    value = cfg.attn_scale**-2
    return round(value) if abs(value - round(value)) < 1e-6 * value else value


def _read_phi3(hf, tc, source):
    c = tc()
    out = {**_common_tc(c), **_tc_rope(c, hf, source), "qkv_bias": False, "o_bias": False, "mlp_bias": False}
    # Phi-3's window applies to every layer.
    out.update(sliding_window=getattr(c, "sliding_window", None), layer_types=None)
    return out


def _read_olmo2(hf, tc, source):
    c = tc()
    return {**_common_tc(c), **_tc_rope(c, hf, source), "norm_placement": "post", "qk_norm": "proj",
            "norm_fp32_gain": True}


def _read_smollm3(hf, tc, source):
    c = tc()
    out = {**_common_tc(c), **_tc_rope(c, hf, source)}
    out.update(_windows(c, source) if c.use_sliding_window else dict(sliding_window=None, layer_types=None))
    out["nope_layers"] = [i for i, use in enumerate(c.no_rope_layers) if not use]
    return out


def _write_smollm3(cfg: ModelConfig) -> dict[str, Any]:
    return {**_write_windows(cfg), "no_rope_layers": [int(i not in cfg.nope_layers) for i in range(cfg.num_hidden_layers)]}


def _read_granite(hf, tc, source):
    c = tc()
    return {**_common_tc(c), **_tc_rope(c, hf, source), "embed_scale": float(c.embedding_multiplier),
            "residual_scale": float(c.residual_multiplier), "attn_scale": float(c.attention_multiplier),
            "logits_divisor": float(c.logits_scaling)}


def _write_granite(cfg: ModelConfig) -> dict[str, Any]:
    return dict(embedding_multiplier=cfg.embed_scale or 1.0, residual_multiplier=cfg.residual_scale,
                attention_multiplier=cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim**-0.5,
                logits_scaling=cfg.logits_divisor)


_WINDOW_KEYS = ("use_sliding_window", "max_window_layers", "layer_types", "sliding_window")
FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM"),
    "mistral": Family("MistralForCausalLM", _read_mistral, lambda cfg: dict(sliding_window=cfg.sliding_window),
                      has_bias_fields=False),
    "qwen2": Family("Qwen2ForCausalLM", _read_qwen2, _write_windows, _WINDOW_KEYS),
    "qwen3": Family("Qwen3ForCausalLM", _read_qwen2, _write_windows, _WINDOW_KEYS),
    "gemma": Family("GemmaForCausalLM", _read_gemma, lambda cfg: dict(hidden_activation=cfg.hidden_act),
                    ("hidden_activation",)),
    "gemma2": Family("Gemma2ForCausalLM", _read_gemma2, _write_gemma2,
                     ("sliding_window", "layer_types", "query_pre_attn_scalar", "attn_logit_softcapping",
                      "final_logit_softcapping", "hidden_activation")),
    "gemma3_text": Family("Gemma3ForCausalLM", _read_gemma2, _write_gemma2,
                          ("sliding_window", "layer_types", "query_pre_attn_scalar", "attn_logit_softcapping",
                           "final_logit_softcapping", "hidden_activation", "rope_local_base_freq",
                           "sliding_window_pattern", "_sliding_window_pattern")),
    "phi3": Family("Phi3ForCausalLM", _read_phi3, lambda cfg: dict(sliding_window=cfg.sliding_window),
                   ("original_max_position_embeddings",), has_bias_fields=False),
    "olmo2": Family("Olmo2ForCausalLM", _read_olmo2),
    "smollm3": Family("SmolLM3ForCausalLM", _read_smollm3, _write_smollm3,
                      _WINDOW_KEYS + ("no_rope_layers", "no_rope_layer_interval")),
    "granite": Family("GraniteForCausalLM", _read_granite, _write_granite,
                      ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")),
}
ARCHITECTURES = {name: family.architecture for name, family in FAMILIES.items()}


def _transformers_config(hf: dict[str, Any], source: str) -> Callable[[], HFConfig]:
    """A function building transformers' own config object for `hf` once (ConfigError if it refuses)."""
    built: list[HFConfig] = []

    def get() -> HFConfig:
        if not built:
            import transformers

            fields = {k: v for k, v in hf.items() if k not in ("model_type", "quantization_config")}
            try:
                built.append(transformers.AutoConfig.for_model(hf["model_type"], **fields))
            except Exception as e:  # its validators raise ValueError, TypeError and their own types
                first = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()
                raise ConfigError(f"{source}: transformers rejects this {hf['model_type']} config: {first}") from None
        return built[0]

    return get


def from_hf_config(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Translate a transformers config dict of any family in FAMILIES into a ModelConfig."""
    if not isinstance(hf, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    if hf.get("model_type") == QUANTIZED_MODEL_TYPE:
        entry = hf.get("quantization_config")
        hf = {**hf, "model_type": entry.get("model_type") if isinstance(entry, dict) else None}
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(
            f"{source}: unsupported architecture: field 'model_type' is {model_type!r}; "
            f"supported: {', '.join(FAMILIES)}"
        )
    family = FAMILIES[model_type]
    archs = hf.get("architectures") or [family.architecture]
    if any(a != family.architecture for a in archs):
        raise ConfigError(
            f"{source}: unsupported architecture: field 'architectures' is {archs!r}; "
            f"expected [{family.architecture!r}]"
        )
    for name in _INT_FIELDS:
        if name not in hf:
            raise ConfigError(f"{source}: required field '{name}' is missing")
    for name, what in _UNSUPPORTED.items():
        if hf.get(name):
            raise ConfigError(f"{source}: field '{name}' = {hf[name]!r}: {what} is not supported by minillama")
    if family.read is None:  # Llama: no partial rotary, no per-layer types
        for name, allowed in (("partial_rotary_factor", (None, 1, 1.0)), ("layer_types", (None,))):
            if hf.get(name) not in allowed:
                raise ConfigError(f"{source}: field '{name}' = {hf[name]!r} is not supported by minillama")
    for name in ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window"):
        if hf.get(name) is not None and not isinstance(hf[name], bool):
            raise ConfigError(f"{source}: field '{name}' must be true or false, got {hf[name]!r}")

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
        qkv_bias=bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope=None,
        hidden_act=hf.get("hidden_act", "silu"),
        model_type=model_type,
        quantization=(None if hf.get("quantization_config") is None
                      else QuantConfig.from_hf(hf["quantization_config"], source)),
        extra={k: v for k, v in hf.items() if k not in _READ and k not in family.keys},
    )
    if family.read is not None:
        # Sizes are checked before transformers' config class sees them (its errors are less clear).
        try:
            ModelConfig(**{**kwargs, "rope": RopeConfig(), "extra": {}})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        kwargs.update(family.read(hf, _transformers_config(hf, source), source))
    if kwargs["rope"] is None:
        kwargs["rope"] = _rope_from_hf(hf, source)
    try:
        return ModelConfig(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The inverse of from_hf_config: a dict transformers' AutoConfig accepts."""
    family = FAMILIES[cfg.model_type]
    if family.read is None and (cfg.qkv_bias != cfg.o_bias):
        raise ConfigError(f"{cfg.model_type}: q/k/v and o biases differ, which its config.json cannot say")
    out: dict[str, Any] = dict(cfg.extra)
    out.update(
        architectures=[family.architecture],
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
        attention_bias=cfg.qkv_bias,
        mlp_bias=cfg.mlp_bias,
        **_rope_to_hf(cfg),
    )
    if cfg.rope_local is None:
        # 4.x readers look for these two at top level.
        out.update(rope_theta=cfg.rope.theta,
                   rope_scaling=None if cfg.rope.rope_type == "default" else out["rope_parameters"])
    if not family.has_bias_fields:
        out.pop("attention_bias")
        out.pop("mlp_bias")
    if family.write is not None:
        out.update(family.write(cfg))
    if cfg.quantization is not None:
        out["quantization_config"] = {**cfg.quantization.to_hf(), "model_type": cfg.model_type}
        out["model_type"] = QUANTIZED_MODEL_TYPE
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
