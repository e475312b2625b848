"""Weight-only int8 and int4 quantization of the projections: fewer bytes per decoded token.

At batch 1 a decode step reads every weight once, so its time is weight bytes over memory
bandwidth: int8 halves a bf16 model's bytes, int4 quarters them. Activations, norms, embeddings
and the KV cache stay in the model's dtype; only the attention and MLP projections (and, on
request, lm_head) hold integers. Quantized layers are frozen: training reaches them only through
LoRA adapters (QLoRA-style, minillama/train/lora.py).

Formats (also what a quantized checkpoint stores, under the HF projection names):
  int8  weight int8 [out, in], scales [out]: w = q * scale. Symmetric, per output channel:
        scale = max|row| / 127 (-128 unused, so the grid is symmetric about 0).
  int4  weight uint8 [out, in/2] (column 2j in the low nibble, 2j+1 in the high), scales and
        zeros [out, in/group]: w = (q - 8) * scale + zero, q in [0, 15], per group of `group`
        input columns. Asymmetric (min-max) because 16 levels are few: a skewed group spends all
        of them on its own range; it is also the (scale, zero) form torch's int4 kernels take.
Scales and zeros are kept in the model's dtype; the integers are rounded against those stored
values, so dequantizing reproduces exactly what was measured at quantization time.

Kernels, chosen per layer at load by trying them on that layer (a feature probe, not a version
string): on CPU, torch's int8/int4 GEMM ops (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`);
they are fast in bf16 only (fp32 runs 5-8x slower with torch 2.13), so an fp32 model feeds them
bf16 activations. On CUDA, int4 uses `_weight_int4pack_mm` (tensor-core layout) and int8 runs
dequantize-then-matmul, which Inductor fuses into one kernel under torch.compile (gpt-fast's
recipe). Everywhere else, and whenever gradients flow (the ops have no backward), the
dequantize-then-matmul path runs.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import INT4_GROUP_SIZES, ModelConfig, QuantConfig
from .errors import ConfigError
from .linear import Linear, model_tensors

# The projections a quantized model holds as integers (module names inside each block).
PROJECTIONS = ("attn.wqkv", "attn.wo", "mlp.w_gate_up", "mlp.w_down")
_KERNEL_DTYPE = torch.bfloat16  # what the CPU integer GEMMs are fast in
# torch's integer kernels are matrix-vector kernels: their time grows with every row. From about
# this many rows (a prefill) dequantizing once and running the dense matmul is faster (measured at
# SmolLM2's shapes on the 2-core CPU, docs/quantization.md).
KERNEL_MAX_ROWS = 128


def _round_scale(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stored-precision copy of a float32 scale, computed back in float32 for rounding against it."""
    return value.to(dtype).float()


# Rows quantized at a time: the float32 temporaries of a whole 28672 x 4096 projection would be
# several GB beside a model that is being loaded to take less memory.
_ROWS = 512
_PROBE_ROWS = 256  # output rows a kernel is checked on when it is readied


def quantize_int8(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scales [out] in `dtype`): symmetric per-channel quantization of `weight`."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=dtype, device=weight.device)
    for start in range(0, weight.shape[0], _ROWS):
        w = weight[start : start + _ROWS].detach().float()
        amax = w.abs().amax(dim=1)
        scale = _round_scale(torch.where(amax > 0, amax / 127, torch.ones_like(amax)), dtype)
        q[start : start + _ROWS] = torch.round(w / scale[:, None]).clamp_(-127, 127)
        scales[start : start + _ROWS] = scale
    return q, scales


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] from values in [0, 15] [out, in]: column 2j low nibble, 2j+1 high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: int32 [out, in] in [0, 15]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], -1).to(torch.int32)


def quantize_int4(
    weight: torch.Tensor, group_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [out, in/2], scales, zeros [out, in/group] in `dtype`): min-max quantization
    per group of `group_size` input columns."""
    out, inp = weight.shape
    packed = torch.empty(out, inp // 2, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(out, inp // group_size, dtype=dtype, device=weight.device)
    zeros = torch.empty_like(scales)
    for start in range(0, out, _ROWS):
        w = weight[start : start + _ROWS].detach().float()
        w = w.view(w.shape[0], inp // group_size, group_size)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scale = _round_scale((hi - lo).clamp(min=1e-6) / 15, dtype)
        zero = _round_scale(lo + 8 * scale, dtype)
        q = torch.round((w - (zero - 8 * scale)[..., None]) / scale[..., None]).clamp_(0, 15)
        packed[start : start + _ROWS] = pack_int4(q.view(w.shape[0], inp))
        scales[start : start + _ROWS], zeros[start : start + _ROWS] = scale, zero
    return packed, scales, zeros


class QuantLinear(nn.Module):
    """A frozen linear layer whose weight is stored as integers (see the module docstring).

    The integer weight and its scales are buffers (saved, never trained); a bias stays a float
    Parameter. `pack()` readies the device's integer kernel; without one (or with gradients
    flowing) the layer dequantizes and runs F.linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantConfig,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.config = in_features, out_features, config
        dtype = dtype or torch.get_default_dtype()
        if config.mode == "int8":
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
            self.zeros = None
        else:
            groups = in_features // config.group_size
            self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                                       device=device))
            self.register_buffer("scales", torch.empty(out_features, groups, dtype=dtype, device=device))
            self.register_buffer("zeros", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self._kernel: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._packed_of: tuple[int, torch.device] | None = None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> QuantLinear:
        """Quantize a float linear layer (its dtype is the scales' and the outputs')."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, config, w.dtype, w.device)
        if config.mode == "int8":
            layer.weight, layer.scales = quantize_int8(w, w.dtype)
        else:
            layer.weight, layer.scales, layer.zeros = quantize_int4(w, config.group_size, w.dtype)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.config.name}"

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (that of the scales)."""
        return self.scales.dtype

    def dequantize(self, dtype: torch.dtype | None = None, rows: int | None = None) -> torch.Tensor:
        """The float weight [out, in] this layer computes with (in `dtype`, default its own); only
        its first `rows` output rows if given."""
        dtype = dtype or self.dtype
        weight, scales = self.weight[:rows], self.scales[:rows]
        if self.config.mode == "int8":
            return (weight.float() * scales.float()[:, None]).to(dtype)
        g = self.config.group_size
        q = unpack_int4(weight).view(weight.shape[0], -1, g).float()
        w = (q - 8) * scales.float()[..., None] + self.zeros[:rows].float()[..., None]
        return w.view(weight.shape[0], self.in_features).to(dtype)

    def _dequant_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.mode == "int8":
            # Scale after the matmul: one multiply per output, and the form Inductor fuses into the
            # matmul's epilogue.
            return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self._kernel
        # A symbolic row count (a compiled prefill, one graph for every prompt length) takes the
        # dense path: a branch on it would split that graph in two.
        few_rows = isinstance(x.numel(), int) and x.numel() < KERNEL_MAX_ROWS * self.in_features
        if kernel is not None and few_rows and not torch.is_grad_enabled() and (
                torch.compiler.is_compiling() or self._packed_of == (self.weight.data_ptr(), x.device)):
            y = kernel(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features).to(x.dtype)
        else:
            y = self._dequant_forward(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def __getstate__(self) -> dict:
        # A copy does not share the original's kernel state: it dequantizes until packed itself.
        return {**self.__dict__, "_kernel": None, "_packed_of": None}

    @torch.no_grad()
    def pack(self) -> bool:
        """Ready this device's integer kernel for the layer; False (dequantize path) where none
        exists for this torch, device or shape, or where it disagrees with the dequantized weight."""
        self._kernel, self._packed_of = None, None
        make = _KERNELS.get((self.weight.device.type, self.config.mode))
        if make is None:
            return False
        try:
            kernel = make(self)
            probe = torch.randn(3, self.in_features, generator=torch.Generator().manual_seed(0))
            probe = probe.to(self.weight.device, _KERNEL_DTYPE)
            # The first rows only: a whole float32 copy of the layer would be the load's peak.
            got = kernel(probe).float()[:, :_PROBE_ROWS]
            want = F.linear(probe.float(), self.dequantize(torch.float32, rows=_PROBE_ROWS))
        except (RuntimeError, NotImplementedError):
            return False
        # Both sides see the same bf16 inputs; the kernel's rounding of its output (and of
        # intermediate sums) is the only difference.
        if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max().clamp(min=1))):
            return False
        self._kernel, self._packed_of = kernel, (self.weight.data_ptr(), self.weight.device)
        return True


def _cpu_int8(layer: QuantLinear) -> Callable[[torch.Tensor], torch.Tensor]:
    weight, scales = layer.weight, layer.scales.to(_KERNEL_DTYPE)
    return lambda x: torch.ops.aten._weight_int8pack_mm(x.to(_KERNEL_DTYPE), weight, scales)


def _scales_and_zeros(layer: QuantLinear) -> torch.Tensor:
    """[in/group, out, 2]: the layout torch's int4 kernels take."""
    return torch.stack([layer.scales, layer.zeros], dim=-1).transpose(0, 1).contiguous().to(_KERNEL_DTYPE)


def _cpu_int4(layer: QuantLinear) -> Callable[[torch.Tensor], torch.Tensor]:
    # The op's own weight layout; costs a second copy of the int4 weight (the plain one is what
    # state_dict and save_pretrained see).
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(layer.weight), 1)
    sz, g = _scales_and_zeros(layer), layer.config.group_size
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(_KERNEL_DTYPE), packed, g, sz)


def _cuda_int4(layer: QuantLinear) -> Callable[[torch.Tensor], torch.Tensor]:
    # The CUDA converter takes uint8 with column 2j in the *high* nibble (torch >= 2.5).
    swapped = (layer.weight >> 4) | (layer.weight << 4)
    packed = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), 8)
    sz, g = _scales_and_zeros(layer), layer.config.group_size
    return lambda x: torch.ops.aten._weight_int4pack_mm(x.to(_KERNEL_DTYPE), packed, g, sz)


_KERNELS: dict[tuple[str, str], Callable[[QuantLinear], Callable[[torch.Tensor], torch.Tensor]]] = {
    ("cpu", "int8"): _cpu_int8,
    ("cpu", "int4"): _cpu_int4,
    ("cuda", "int4"): _cuda_int4,
}


def as_quant_config(spec: str | QuantConfig | dict) -> QuantConfig:
    """A QuantConfig from itself, a name ("int8", "int4", "int4-g32+lm_head") or a dict of its fields."""
    if isinstance(spec, QuantConfig):
        return spec
    if isinstance(spec, str):
        return QuantConfig.parse(spec)
    if isinstance(spec, dict):
        return QuantConfig(**spec)
    raise ConfigError(f"quantize: expected a name such as 'int8' or 'int4-g64', or a QuantConfig; got {spec!r}")


def quantized_layers(num_layers: int, config: QuantConfig) -> list[str]:
    """Names of the layers `config` quantizes in a model of `num_layers` blocks."""
    names = [f"layers.{i}.{p}" for i in range(num_layers) for p in PROJECTIONS]
    return names + (["lm_head"] if config.lm_head else [])


def unquantizable(model_config: ModelConfig, config: QuantConfig) -> str | None:
    """Why `config` cannot quantize a model of `model_config` (an int4 group that does not divide a
    layer's input features), or None."""
    if config.mode != "int4":
        return None
    inputs = {"attn.wqkv": model_config.hidden_size,
              "attn.wo": model_config.num_attention_heads * model_config.head_dim,
              "mlp.w_gate_up": model_config.hidden_size, "mlp.w_down": model_config.intermediate_size}
    if config.lm_head:
        inputs["lm_head"] = model_config.hidden_size
    for name, features in inputs.items():
        if features % config.group_size:
            where = name if name == "lm_head" else f"layers.0.{name}"
            return (f"int4 group size {config.group_size} does not divide {where}'s {features} input features; "
                    f"choose one that does ({', '.join(str(g) for g in INT4_GROUP_SIZES if features % g == 0) or 'none'})")
    return None


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantizable_layers(model: nn.Module, config: QuantConfig) -> list[str]:
    """The names of the layers `config` quantizes in `model`, after checking that it can: the
    model is not quantized already, the int4 group divides every layer, each is a plain Linear."""
    if model.config.quantization is not None:
        raise ConfigError(f"the model is already quantized ({model.config.quantization.name}); "
                          "quantize its original checkpoint instead")
    problem = unquantizable(model.config, config)
    if problem:
        raise ConfigError(problem)
    names = quantized_layers(model.config.num_hidden_layers, config)
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, Linear):
            raise ConfigError(f"{name}: cannot quantize a {type(layer).__name__} (apply LoRA after quantizing)")
    return names


def quantize_layer(model: nn.Module, name: str, config: QuantConfig, *, empty: bool = False) -> None:
    """Replace the Linear `name` of `model` with its quantized layer (empty: unquantized, to load into)."""
    layer = model.get_submodule(name)
    if empty:
        new = QuantLinear(layer.in_features, layer.out_features, layer.bias is not None, config,
                          layer.weight.dtype, layer.weight.device)
    else:
        new = QuantLinear.from_linear(layer, config)
    _replace(model, name, new)


def quantize_model(model: nn.Module, spec: str | QuantConfig | dict, *, empty: bool = False) -> nn.Module:
    """Replace the projections of a minillama Transformer with quantized layers, in place.

    empty: build the layers without quantizing (on the meta device, before loading a quantized
    checkpoint). Every layer is checked before any is replaced, so an error leaves the model as it was.
    """
    config = as_quant_config(spec)
    for name in quantizable_layers(model, config):
        quantize_layer(model, name, config, empty=empty)
    model.config.quantization = config
    return model


def pack_quantized(model: nn.Module) -> int:
    """Ready every quantized layer's kernel; returns how many have one (the rest dequantize)."""
    return sum(m.pack() for m in model.modules() if isinstance(m, QuantLinear))


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized layer (a LoRA adapter's base layer included) with a float Linear
    holding its dequantized weight, in place; the model is then an ordinary one."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, QuantLinear):
            plain = Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=layer.weight.device, dtype=layer.dtype)
            plain.weight.copy_(layer.dequantize())
            if layer.bias is not None:
                plain.bias.copy_(layer.bias)
            _replace(model, name, plain)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization"):
        config.quantization = None
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model saves (a tied matrix counted once; KV caches never), from
    shapes alone: a released weight (minillama/linear.py) stays released."""
    return sum(t.numel() * t.element_size() for t in model_tensors(model))
