"""Hugging Face checkpoint directory <-> minillama model.

One table (`hf_layout`) maps each HF tensor name to a parameter of ours, or to a row range of
one (q/k/v and gate/up are fused here). Loading streams tensors one at a time through
safetensors' mmap and copies them into a model built on the meta device, so peak memory stays
near one copy of the model. Saving walks the same table backwards, shard by shard, into a
temporary directory that is renamed into place only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_directory, recover_directory
from .config import ModelConfig, checkpoint_dtype, load_config, parse_dtype, to_hf_config
from .errors import CheckpointError, ConfigError
from .hub import resolve_model
from .linear import Linear, ordinary_tensors, pack_layer, packs_shared, prepack_enabled, prepack_model
from .model import Transformer
from .norms import Norm
from .quant import (QuantConfig, as_quant_config, pack_quantized, quantizable_layers, quantize_layer, quantize_model,
                    quantized_layers)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Old checkpoints carry the rotary frequencies; they are derived from config.json, never loaded.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Target:
    """Where one HF tensor lives in our model: a parameter, or rows [start, stop) of a fused one."""

    name: str
    start: int | None = None
    stop: int | None = None


@dataclass(frozen=True)
class Names:
    """A family's HF tensor names, where they differ from Llama's."""

    fused_qkv: bool = False  # one self_attn.qkv_proj (rows q, k, v) instead of q_proj, k_proj, v_proj
    fused_gate_up: bool = False  # one mlp.gate_up_proj (rows gate, up) instead of gate_proj, up_proj


# model_type -> its names; a family not listed uses Llama's. Norm names follow ModelConfig.norm_placement.
NAMES: dict[str, Names] = {"phi3": Names(fused_qkv=True, fused_gate_up=True)}
# HF's per-layer norm names -> ours, by where the norms sit. HF's "post_attention_layernorm" is
# Llama's pre-MLP norm but Gemma 2's and OLMo 2's norm of the attention output.
NORM_SITES = {
    "pre": {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"},
    "sandwich": {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attn_norm",
                 "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "post_mlp_norm"},
    "post": {"post_attention_layernorm": "post_attn_norm", "post_feedforward_layernorm": "post_mlp_norm"},
}


def hf_layout(cfg: ModelConfig) -> dict[str, Target]:
    """HF tensor name -> Target, for every tensor a checkpoint of `cfg` holds."""
    hd, q, kv, inter = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    names = NAMES.get(cfg.model_type, Names())
    # Checkpoints hold RMSNorm gains only; a swapped-in norm takes them as its `weight` and starts
    # its other parameters from Norm.reset_unloaded().
    layout: dict[str, Target] = {"model.embed_tokens.weight": Target("embed.weight")}
    if not cfg.tie_word_embeddings:
        layout["lm_head.weight"] = Target("lm_head.weight")
    layout["model.norm.weight"] = Target("norm.weight")
    qkv_params = ["weight", "bias"] if cfg.qkv_bias else ["weight"]
    o_params = ["weight", "bias"] if cfg.o_bias else ["weight"]
    mlp_params = ["weight", "bias"] if cfg.mlp_bias else ["weight"]
    for i in range(cfg.num_hidden_layers):
        hf, ours = f"model.layers.{i}", f"layers.{i}"
        for hf_norm, our_norm in NORM_SITES[cfg.norm_placement].items():
            layout[f"{hf}.{hf_norm}.weight"] = Target(f"{ours}.{our_norm}.weight")
        if cfg.qk_norm is not None:
            for n in ("q_norm", "k_norm"):
                layout[f"{hf}.self_attn.{n}.weight"] = Target(f"{ours}.attn.{n}.weight")
        rows = {"q_proj": (0, q * hd), "k_proj": (q * hd, (q + kv) * hd), "v_proj": ((q + kv) * hd, (q + 2 * kv) * hd)}
        for p in qkv_params:
            if names.fused_qkv:
                layout[f"{hf}.self_attn.qkv_proj.{p}"] = Target(f"{ours}.attn.wqkv.{p}")
            else:
                for proj, (start, stop) in rows.items():
                    layout[f"{hf}.self_attn.{proj}.{p}"] = Target(f"{ours}.attn.wqkv.{p}", start, stop)
        for p in o_params:
            layout[f"{hf}.self_attn.o_proj.{p}"] = Target(f"{ours}.attn.wo.{p}")
        for p in mlp_params:
            if names.fused_gate_up:
                layout[f"{hf}.mlp.gate_up_proj.{p}"] = Target(f"{ours}.mlp.w_gate_up.{p}")
            else:
                layout[f"{hf}.mlp.gate_proj.{p}"] = Target(f"{ours}.mlp.w_gate_up.{p}", 0, inter)
                layout[f"{hf}.mlp.up_proj.{p}"] = Target(f"{ours}.mlp.w_gate_up.{p}", inter, 2 * inter)
            layout[f"{hf}.mlp.down_proj.{p}"] = Target(f"{ours}.mlp.w_down.{p}")
    if cfg.quantization is not None:
        _add_quantized(layout, cfg)
    return layout


def _add_quantized(layout: dict[str, Target], cfg: ModelConfig) -> None:
    """A quantized checkpoint keeps HF's names: each quantized `X.weight` holds integers, beside
    `X.scales` (and `X.zeros` for int4), sliced by rows as the weight is (minillama/quant.py)."""
    q = cfg.quantization
    if q.lm_head and cfg.tie_word_embeddings:  # a quantized lm_head is its own tensor
        layout["lm_head.weight"] = Target("lm_head.weight")
    quantized = {f"{name}.weight" for name in quantized_layers(cfg.num_hidden_layers, q)}
    extra = ["scales", "zeros"] if q.mode == "int4" else ["scales"]
    for key, target in list(layout.items()):
        if target.name in quantized:
            for suffix in extra:
                layout[f"{key.removesuffix('weight')}{suffix}"] = Target(
                    f"{target.name.removesuffix('weight')}{suffix}", target.start, target.stop)


def _checkpoint_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name: what the layout's targets point at (quantized layers keep
    their integers and scales as buffers). Read without restoring a released weight
    (minillama/linear.py): such a tensor has its shape and dtype but no memory; `_dense` reads it."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        for name, t in [*dict.items(module.__dict__["_parameters"]), *dict.items(module.__dict__["_buffers"])]:
            if t is not None:
                tensors.setdefault(f"{prefix}.{name}" if prefix else name, t)
    return tensors


def _view(params: dict[str, torch.Tensor], target: Target) -> torch.Tensor:
    tensor = params[target.name]
    return tensor if target.start is None else tensor[target.start : target.stop]


def _nbytes(params: dict[str, torch.Tensor], target: Target) -> int:
    """The bytes of a target, from its shape alone."""
    tensor = params[target.name]
    rows = tensor.shape[0] if target.start is None else target.stop - target.start
    return tensor.nbytes // max(tensor.shape[0], 1) * rows if tensor.dim() else tensor.nbytes


def _dense(model: Transformer, params: dict[str, torch.Tensor], target: Target) -> torch.Tensor:
    """A target's values as a contiguous CPU tensor; a released weight is unpacked for the call
    and stays released."""
    owner, _, name = target.name.rpartition(".")
    module = model.get_submodule(owner)
    if isinstance(module, Linear) and module.released and name == "weight":
        tensor = module.packed_weight_dense()
        return (tensor if target.start is None else tensor[target.start : target.stop]).contiguous()
    return _view(params, target).detach().to("cpu").contiguous()


def weight_files(ckpt_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards its index names, or model.safetensors."""
    index = ckpt_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        absent = [n for n in names if not (ckpt_dir / n).is_file()]
        if absent:
            raise CheckpointError(f"{index}: names shard(s) that do not exist: {', '.join(absent)}")
        return [ckpt_dir / n for n in names]
    single = ckpt_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in ckpt_dir.glob("*.bin")) + sorted(p.name for p in ckpt_dir.glob("*.pt*"))
    hint = f" (found {', '.join(pickles)}: pickle checkpoints are never loaded; convert to safetensors)" if pickles else ""
    raise CheckpointError(f"{ckpt_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def check_header(file: Path) -> tuple[dict[str, Any], int]:
    """The safetensors header of `file` and where its data starts. CheckpointError for a header that
    safetensors itself would accept or misreport: a length past the end of the file, text that is
    not UTF-8 JSON, a tensor name given twice (the JSON parser would silently keep the last one)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({size} bytes, no header)")
        length = int.from_bytes(head, "little")
        if length > size - 8:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file (header of {length} bytes, "
                                  f"file of {size})")
        raw = f.read(length)

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        header = dict(pairs)
        if len(header) < len(pairs):
            dup = next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i]))
            raise CheckpointError(f"{file}: tensor {dup!r} appears twice in the header")
        return header

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    return header, 8 + length


def _map_tensor(file: Path, header: dict[str, Any], data_start: int, key: str,
                dst: torch.Tensor) -> tuple[torch.Tensor, mmap.mmap] | None:
    """Tensor `key` of `file` as `dst`'s shape over a private (copy-on-write) map of the file, or
    None where the file holds it in another dtype: its pages are read when touched, and the map can
    give them back (`mmap.madvise`) while the tensor stays valid."""
    info = header.get(key, {})
    if _SAFETENSORS_DTYPES.get(info.get("dtype")) != dst.dtype or list(info.get("shape", [])) != list(dst.shape):
        return None
    start, stop = info["data_offsets"]
    with open(file, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    tensor = torch.frombuffer(mapped, dtype=dst.dtype, count=(stop - start) // dst.element_size(),
                              offset=data_start + start)
    return tensor.view(dst.shape), mapped


def _list(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# select(HF name, its shape in the file) -> the index of the part to read (None: all of it), or a
# list of indices whose parts are read and concatenated along the first dimension (a
# tensor-parallel shard's q, k and v rows of one fused qkv_proj: minillama/parallel.py).
Index = tuple[slice, ...] | list[tuple[slice, ...]] | None
Selector = Callable[[str, tuple[int, ...]], Index]


def _sliced_shape(shape: tuple[int, ...], index: Index) -> tuple[int, ...]:
    if index is None:
        return shape
    if isinstance(index, list):
        parts = [_sliced_shape(shape, i) for i in index]
        return (sum(p[0] for p in parts),) + parts[0][1:]
    return tuple(len(range(*s.indices(n))) for s, n in zip(index, shape)) + shape[len(index):]


def _read(f: Any, key: str, index: Index) -> torch.Tensor:
    """Tensor `key` of the open file `f`, or only the part(s) `index` selects, read from the file alone."""
    if index is None:
        return f.get_tensor(key)
    if isinstance(index, list):
        part = f.get_slice(key)
        return torch.cat([part[i] for i in index])
    return f.get_slice(key)[index]


_SAFETENSORS_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32,
                       "I64": torch.int64, "BOOL": torch.bool, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F32": torch.float32, "F64": torch.float64}
_CHUNK_BYTES = 64 << 20  # read a tensor this many bytes of the file at a time


def _is_float(file_dtype: str) -> bool:
    """Whether a safetensors dtype name ("F32", "BF16", "F8_E4M3", "I8", ...) is a float."""
    return file_dtype.startswith(("F", "BF"))


def _copy_into(dst: torch.Tensor, file: Path, key: str, index: Index) -> None:
    """Copy tensor `key` (or the part `index` selects) of `file` into `dst`, cast to its dtype.

    Rows are read a chunk at a time, each through its own mapping of the file: every page a mapping
    touches stays resident until it is unmapped, so reading a tensor whole would hold it twice (the
    mapped file and the copy) and one open over the whole file would hold a second model."""
    rows = dst.shape[0] if dst.dim() else 1
    step = max(1, _CHUNK_BYTES // max(1, dst.numel() // max(rows, 1) * 4))  # rows per chunk (fp32 rows at most)
    if index is not None or dst.dim() == 0 or rows <= step:
        with safe_open(file, framework="pt", device="cpu") as f:
            dst.copy_(_read(f, key, index))
        return
    for start in range(0, rows, step):
        with safe_open(file, framework="pt", device="cpu") as f:
            dst[start : start + step].copy_(f.get_slice(key)[start : start + step])


def _defer(tensor: torch.Tensor) -> None:
    """Free a not-yet-loaded tensor's memory, keeping its shape, dtype and identity (`_allocate`
    gives it back); left as it is where its storage is not its own alone."""
    storage = tensor.untyped_storage()
    if tensor.device.type != "meta" and storage.resizable() and storage.nbytes() == tensor.nbytes \
            and not tensor.storage_offset() and tensor.is_contiguous():
        storage.resize_(0)


def _allocate(tensor: torch.Tensor) -> None:
    """Give a deferred tensor its memory back (uninitialised)."""
    storage = tensor.untyped_storage()
    if storage.nbytes() < tensor.nbytes:
        storage.resize_(tensor.nbytes)


@torch.no_grad()
def load_weights(model: Transformer, ckpt_dir: str | Path, select: Selector | None = None,
                 loaded: Callable[[str], None] | None = None, mapped: dict[str, Any] | None = None) -> None:
    """Copy a checkpoint's tensors into `model` (cast to its dtype and device), strictly.

    select: read only part of each tensor (tensor-parallel shards: minillama/parallel.py); the
    part is read from the file alone, never the whole tensor. loaded(module_name) runs as soon as
    the last tensor of that module is in, while the rest still streams (from_pretrained packs or
    quantizes each projection there, so the whole dense model is never held beside its packed or
    quantized form); the loader keeps no reference to a finished module's tensors. mapped: the
    parameters it names are not copied but left as copy-on-write maps of the file where the file
    holds them in the model's dtype (each map is put in the dict, for `madvise`). Missing,
    unexpected, shape-mismatched and integer-vs-float tensors are all reported, by name, in one
    CheckpointError.
    """
    ckpt_dir = Path(ckpt_dir)
    layout = hf_layout(model.config)
    params = _checkpoint_tensors(model)
    pending: dict[str, set[str]] = {}  # module name -> its checkpoint keys not read yet
    for key, target in layout.items():
        pending.setdefault(target.name.rpartition(".")[0], set()).add(key)
    seen: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    wrong_dtype: list[str] = []
    # Each tensor gets its memory when it is read, not all at once before: the memory a finished
    # layer frees (its dense weight, packed or quantized by `loaded`) is then reused by the next
    # one, where memory touched up front would stay resident after it is freed.
    for name in {target.name for target in layout.values()}:
        _defer(params[name])
    try:
        for file in weight_files(ckpt_dir):
            try:
                header, data_start = check_header(file)
                with safe_open(file, framework="pt", device="cpu") as f:
                    shapes = {key: (tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype())
                              for key in f.keys()}
                for key, (shape, file_dtype) in shapes.items():
                    target = layout.get(key)
                    if target is None:
                        if not (_IGNORED.match(key) or (key == "lm_head.weight" and model.config.tie_word_embeddings)):
                            unexpected.append(key)
                        continue
                    if key in seen:
                        unexpected.append(f"{key} (again in {file.name})")
                        continue
                    seen.add(key)
                    _allocate(params[target.name])
                    dst = _view(params, target)
                    index = select(key, shape) if select is not None else None
                    if _sliced_shape(shape, index) != tuple(dst.shape):
                        part = f" (part {list(_sliced_shape(shape, index))})" if index is not None else ""
                        mismatched.append(f"{key} (checkpoint {list(shape)}{part}, model {list(dst.shape)})")
                        continue
                    if _is_float(file_dtype) != dst.is_floating_point() or (
                            not dst.is_floating_point() and _SAFETENSORS_DTYPES.get(file_dtype) != dst.dtype):
                        # Integers are quantized values: casting them from or to floats would be nonsense.
                        wrong_dtype.append(f"{key} (checkpoint {_SAFETENSORS_DTYPES.get(file_dtype, file_dtype)}, "
                                           f"model {dst.dtype})")
                        continue
                    view = None
                    if mapped is not None and target.name in mapped and index is None and target.start is None:
                        view = _map_tensor(file, header, data_start, key, dst)
                    if view is not None:
                        params[target.name].data, mapped[target.name] = view
                    else:
                        _copy_into(dst, file, key, index)
                    del dst, view  # no reference outlives the copy (a finished layer may free its weight)
                    module = target.name.rpartition(".")[0]
                    pending[module].discard(key)
                    if not pending[module]:
                        for name in [n for n in params if n.rpartition(".")[0] == module]:
                            del params[name]
                        if loaded is not None:
                            loaded(module)
            except SafetensorError as e:
                raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
            except OSError as e:
                raise CheckpointError(f"{file}: cannot read ({e})") from None
    finally:
        for tensor in params.values():  # unfinished modules (a failed load): memory back, contents undefined
            _allocate(tensor)
    missing = [k for k in layout if k not in seen]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {len(mismatched)}: {_list(mismatched)}")
    if wrong_dtype:
        problems.append(f"dtype mismatch {len(wrong_dtype)}: {_list(wrong_dtype)}")
    if problems:
        raise CheckpointError(f"{ckpt_dir}: checkpoint does not match config.json; " + "; ".join(problems))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A torch.device that exists on this machine (default: cpu); ConfigError naming it otherwise."""
    try:
        dev = torch.device(device or "cpu")
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device {device!r} is not available on this machine "
                          f"({torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA devices)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return dev


def empty_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> Transformer:
    """A model of `cfg` (quantized layers included) in `dtype` on `device`, its tensors allocated
    but not initialised: ready to load weights into."""
    quantization = cfg.quantization
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(cfg, quantization=None))
        if quantization is not None:
            quantize_model(model, quantization, empty=True)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    return model


@ordinary_tensors()  # the model outlives a caller's torch.inference_mode block (linear.py)
def from_pretrained(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    norm: str | None = None,
    prepack: bool | None = None,
    quantize: str | QuantConfig | None = None,
    tensor_parallel: bool = False,
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | Path | None = None,
    max_memory: dict[Any, Any] | None = None,
) -> Transformer:
    """Load an HF Llama/Mistral checkpoint into a minillama Transformer: a local directory, or a
    Hugging Face id (`org/name`) found in or downloaded to the HF cache (minillama/hub.py).

    dtype: defaults to the dtype config.json records (float32 if none). norm: a registered norm
    name that replaces the checkpoint's RMSNorm. prepack (CPU): also keep each projection's weight
    in oneDNN's packed layout for fast inference (minillama/linear.py); None follows
    MINILLAMA_PREPACK (default on). quantize: "int8", "int4" or a QuantConfig: quantize the
    projections after loading (minillama/quant.py). A checkpoint saved quantized loads quantized.
    tensor_parallel: this process's shard of the model across torch.distributed's processes
    (minillama/parallel.py); only that shard is read from disk.
    device_map: "auto" or {module: device} over embed, layers.N, norm, lm_head (devices: cuda:N,
    "cpu", "disk"): spread a model bigger than one device (minillama/offload.py); "disk" needs
    offload_folder; "auto" fills devices up to max_memory (Accelerate's format). Overrides device.
    """
    path = resolve_model(path)
    recover_directory(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (a checkpoint directory or a Hugging Face model id)")
    cfg = load_config(path)
    if norm is not None:
        cfg.norm = norm
    if dtype is not None:
        dtype = parse_dtype(dtype)
    else:
        try:
            dtype = checkpoint_dtype(cfg)
        except ConfigError as e:
            raise ConfigError(f"{path / 'config.json'}: {e}") from None
    if quantize is not None:
        quantize = as_quant_config(quantize)
        if cfg.quantization is not None:
            raise ConfigError(f"{path}: already quantized ({cfg.quantization.name}); quantize its original "
                              "checkpoint instead")
    # Each spreads or reshapes the layers its own way; none is written for the others' layers.
    chosen = [name for name, on in (("quantization", quantize is not None or cfg.quantization is not None),
                                    ("tensor_parallel", tensor_parallel), ("device_map", device_map is not None)) if on]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join(chosen)} do not combine: choose one")
    if device_map is not None:
        device, prepack = "cpu", False  # loaded on the CPU, then dispatched; hooks swap weights in and out
    device = resolve_device(device)
    select = None
    if tensor_parallel:
        from .parallel import make_row_parallel, rank_and_world, shard_config, shard_selector

        rank, world = rank_and_world()
        shard = shard_config(cfg, world)
        select = shard_selector(cfg, rank, world)
        cfg = shard
    model = empty_model(cfg, dtype, device)
    if tensor_parallel:
        make_row_parallel(model)
    if device_map is not None:  # checked before the (long) load
        from .offload import resolve_device_map

        device_map = resolve_device_map(model, device_map, max_memory, dtype, offload_folder)
    pack = device.type == "cpu" and prepack_enabled(prepack)
    to_quantize = set(quantizable_layers(model, quantize)) if quantize is not None else set()

    def loaded(name: str) -> None:  # each projection is packed or quantized as soon as it is in
        if name in to_quantize:
            quantize_layer(model, name, quantize)
            to_quantize.discard(name)
        elif pack and isinstance(layer := model.get_submodule(name), Linear):
            pack_layer(layer)

    # A tied output projection is packed beside the embedding it shares, which then stays a map of
    # the file: only the rows of the tokens looked up become resident (dropped once packed, below).
    share = pack and cfg.tie_word_embeddings and select is None and packs_shared(dtype)
    mapped: dict[str, Any] = {"embed.weight": None} if share else {}
    load_weights(model, path, select, loaded, mapped)
    swapped = [m for m in model.modules() if isinstance(m, Norm) and not m.hf_compatible]
    for norm_module in swapped:
        norm_module.reset_unloaded()
    if swapped:
        extra = sum(p.numel() for m in swapped for n, p in m.named_parameters() if n != "weight")
        warnings.warn(f"{path}: RMSNorm gains loaded into {cfg.norm!r} as its weight (gamma)"
                      + (f"; its other {extra:,} parameters (beta) start at 0" if extra else ""), stacklevel=2)
    if quantize is not None:
        for name in sorted(to_quantize):  # the ones with no tensor of their own (a tied lm_head)
            quantize_layer(model, name, quantize)
        model.config.quantization = quantize
    if model.config.quantization is not None:
        pack_quantized(model)
    if pack:
        prepack_model(model)  # the rest: a tied lm_head
    for pages in mapped.values():
        if pages is not None:  # read while packing; what stays resident is what lookups touch
            pages.madvise(mmap.MADV_DONTNEED)
    if device_map is not None:
        from .offload import dispatch

        model = dispatch(model, device_map, offload_folder)
    generation = path / "generation_config.json"
    if generation.is_file():
        try:
            model.generation_config = json.loads(generation.read_bytes().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{generation}: not valid JSON ({e})") from None
        if not isinstance(model.generation_config, dict):
            raise CheckpointError(f"{generation}: expected a JSON object")
    _return_freed_memory()
    return model.eval()


def _return_freed_memory() -> None:
    """Hand the memory the load freed back to the OS. glibc keeps freed blocks below its mmap
    threshold (the dense layers packed or quantized away, the conversion temporaries) in its heap,
    resident, until trimmed: 25-110 MB for SmolLM2. A no-op where the C library has no malloc_trim."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or e.g. '500MB', '5GB'")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    return int(float(m.group(1)) * units[(m.group(2) or "").upper()])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@torch.no_grad()
def save_pretrained(
    model: Transformer,
    path: str | Path,
    *,
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write `model` as an HF checkpoint directory that transformers loads unchanged.

    A quantized model is written in minillama's quantized format instead (integer weights under
    HF's names, config.json's `quantization_config`), which only minillama loads: its model_type
    `minillama_quantized` makes transformers refuse it. Tensors past `max_shard_size` go to
    numbered shards with a `model.safetensors.index.json`.
    The directory appears (or is replaced) atomically. Returns its path.
    """
    limit = _parse_size(max_shard_size)
    cfg = model.config
    from .parallel import is_tensor_parallel

    if is_tensor_parallel(model):
        raise CheckpointError(f"{path}: this model is one tensor-parallel shard; save the checkpoint it was "
                              "loaded from instead")
    if any(isinstance(m, Norm) and not m.hf_compatible for m in model.modules()):
        raise CheckpointError(f"{path}: norm {cfg.norm!r} has no Llama/Mistral equivalent in transformers; "
                              "only RMSNorm models save to the Hugging Face format")
    layout = hf_layout(cfg)
    params = _checkpoint_tensors(model)
    shards: list[list[str]] = [[]]
    size = 0
    for key, target in layout.items():
        nbytes = _nbytes(params, target)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    total = sum(_nbytes(params, t) for t in layout.values())
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    dtype = model.embed.weight.dtype
    hf_config = to_hf_config(cfg)  # with quantization_config when quantized
    hf_config.pop("torch_dtype", None)
    hf_config["dtype"] = _dtype_name(dtype)

    with atomic_directory(path) as tmp:
        for name, keys in zip(names, shards):
            # One shard materialised at a time: fused tensors are sliced into contiguous copies here.
            tensors = {k: _dense(model, params, layout[k]) for k in keys}
            save_file(tensors, tmp / name, metadata={"format": "pt"})
        if len(names) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: n for n, keys in zip(names, shards) for k in keys}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if model.generation_config:
            (tmp / "generation_config.json").write_text(json.dumps(model.generation_config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(path)
