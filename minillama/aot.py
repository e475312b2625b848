"""Compiled CPU decode steps that start in a second: AOTInductor packages cached on disk.

What makes a compiled CPU step fast is Inductor's freezing: the weights become constants, so it
prepacks them for oneDNN and fuses around the matmuls. torch.compile's frozen graphs bypass
Inductor's caches, though, so every process paid the whole compilation again (~30 s for
SmolLM2). Here the decode step is exported once (torch.export), compiled ahead of time by
AOTInductor with freezing, and its shared library (code and prepacked weights in one file) is
stored under the minillama cache; a later process loads it in well under a second
(docs/benchmarks.md). The library is kept unpacked: loading a .pt2 package would extract
hundreds of MB to a temporary directory every time (1.5 s for SmolLM2 bf16, measured).

The KV cache is an input of the exported step, written in place, so the eager prefill and the
packaged step share the model's own cache tensors. A prefill (compile="all") is exported the
same way with the prompt's length as a dynamic dimension: one library serves every length. A
package holds frozen weights, so its key hashes everything it depends on: the weights' bytes, the
config, the cache shape, minillama's model code, the torch version and the CPU; anything else is
a new key, never a stale package.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger("minillama.aot")

# Packages kept in the cache (each holds the model's weights, prepacked): the least recently used go.
KEEP = int(os.environ.get("MINILLAMA_AOT_KEEP", "4"))


def enabled() -> bool:
    """MINILLAMA_AOT=0 turns packaged steps off (then compile=True uses torch.compile in-process)."""
    return os.environ.get("MINILLAMA_AOT", "1").strip().lower() not in ("0", "false", "no", "off")


def supported(model: nn.Module) -> bool:
    """A plain single-process CPU model, on a torch that has AOTInductor packaging."""
    from .parallel import is_tensor_parallel

    import torch._inductor  # noqa: F401 - a submodule: loaded on demand

    return (enabled() and model.embed.weight.device.type == "cpu"
            and hasattr(torch._inductor, "aoti_compile_and_package") and hasattr(_runtime(), "AOTIModelContainerRunnerCpu")
            and not is_tensor_parallel(model) and getattr(model, "hf_device_map", None) is None)


def _runtime() -> Any:
    return getattr(torch._C, "_aoti", None)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def step_key(model: nn.Module, batch: int | tuple) -> str:
    """A hash of everything a packaged decode step depends on (weights by content); batch: the
    batch size, or a verify step's input shapes."""
    h = hashlib.sha1(usedforsecurity=False)
    cache = model.kv_cache
    for part in (repr(model.config), str(batch), str(tuple(cache.k.shape)), str(cache.k.dtype), torch.__version__,
                 platform.machine(), _cpu_name(), str(torch.backends.cpu.get_cpu_capability()),
                 str(torch.get_num_threads())):
        h.update(part.encode() + b"\0")
    package = Path(__file__).resolve().parent
    for source in sorted(package.rglob("*.py")):  # the model's code, the norm kernels' CPU paths, this file
        h.update(source.read_bytes())
    unique = {t.data_ptr(): (name, t) for name, t in model.state_dict(keep_vars=False).items()}
    for name, t in sorted(unique.values(), key=lambda item: item[0]):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().data)
    return h.hexdigest()


def _cache_names(model: nn.Module) -> list[str]:
    return [f"layers.{i}.attn.kv_cache.{kv}" for i in range(len(model.layers)) for kv in "kv"]


def _caches(model: nn.Module) -> list[torch.Tensor]:
    return [t for layer in model.layers for t in (layer.attn.kv_cache.k, layer.attn.kv_cache.v)]


class _Step(nn.Module):
    """A decode step, a prefill or a verify step (speculative decoding's several tokens at once, every
    position's logits) as export sees it: the KV caches come in as inputs (written in place)."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        self.model, self.kind = model, kind
        self.names = _cache_names(model)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, position_ids: torch.Tensor,
                padding_mask: torch.Tensor, caches: list[torch.Tensor]) -> torch.Tensor:
        options = {"position_ids": position_ids, "padding_mask": padding_mask, "validate": False,
                   **(prefill_options(tokens) if self.kind == "prefill" else {})}
        return torch.func.functional_call(self.model, dict(zip(self.names, caches)), (tokens, input_pos), options,
                                          strict=False)


def prefill_options(tokens: torch.Tensor) -> dict[str, Any]:
    """model() options of a compiled prefill: the last position's logits, over kv_len = the prompt's
    own length, so that it stays the same symbol as the dynamic dimension (a number passed in would
    be a second symbol, and every comparison with it a guard)."""
    return {"last_only": True, "kv_len": tokens.shape[1]}


def prefill_lengths(model: nn.Module) -> tuple[int, int]:
    """The prompt lengths one compiled prefill covers: from 2 (one token is a decode step's shape) to
    one short of the cache (a prompt always leaves a slot to generate into; a full cache would also
    make the slice of written slots a special case)."""
    return 2, model.cache_len - 1


def build_library(model: nn.Module, path: Path, example: tuple[torch.Tensor, ...], kind: str = "decode") -> None:
    """Export the decode step (or, kind="prefill", the prefill for every prompt length) for these
    example inputs and compile it, frozen, into the shared library `path` (written atomically)."""
    caches = [torch.zeros_like(t) for t in _caches(model)]  # inputs must not alias the model's buffers
    dynamic = None
    if kind == "prefill":
        low, high = prefill_lengths(model)
        seq = torch.export.Dim("prompt_len", min=low, max=high)
        dynamic = ({1: seq}, {0: seq}, {1: seq}, None, [None] * len(caches))
    package = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")
    tmp = package.with_suffix(".so")
    try:
        # Freezing (weights as constants, prepacked) applies only to graphs compiled without grad.
        with torch.no_grad():
            program = torch.export.export(_Step(model, kind).eval(), (*example, caches), dynamic_shapes=dynamic,
                                          strict=False)
            torch._inductor.aoti_compile_and_package(program, package_path=str(package),
                                                     inductor_configs={"freezing": True})
        with zipfile.ZipFile(package) as archive:
            libraries = [n for n in archive.namelist() if n.endswith(".so")]
            if len(libraries) != 1:
                raise RuntimeError(f"expected one shared library in the AOTInductor package, found {libraries}")
            with archive.open(libraries[0]) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
        os.replace(tmp, path)
    finally:
        package.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


def _evict(folder: Path, kind: str, keep: int) -> None:
    packages = sorted(folder.glob(f"{kind}-*.so"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in packages[keep:]:
        old.unlink(missing_ok=True)
        old.with_suffix(".lock").unlink(missing_ok=True)


class PackagedStep:
    """compile=True's decode step on a CPU (kind="prefill": the compiled prefill; "verify": the
    speculative verify step, one per input width): one AOTInductor library per (batch, cache shape), loaded from the cache ($MINILLAMA_COMPILE_CACHE, default the
    minillama cache's compiled/) or compiled and stored there on first use.

    `status` says what the last new shape did: "loaded" (from the cache), "compiled" (and
    cached) or "fallback" (packaging failed on this model or torch; torch.compile runs instead).
    """

    def __init__(self, model: nn.Module, fallback: Callable[[], Callable[..., torch.Tensor]],
                 kind: str = "decode") -> None:
        from .assets import cache_dir

        self.model, self.fallback, self.kind = model, fallback, kind
        self.folder = Path(os.environ.get("MINILLAMA_COMPILE_CACHE") or cache_dir() / "compiled")
        self.runners: dict[tuple[int, ...], Any] = {}
        self.status: str | None = None
        self._fallback_step: Callable[..., torch.Tensor] | None = None

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, *, position_ids: torch.Tensor,
                 padding_mask: torch.Tensor, validate: bool = False) -> torch.Tensor:
        inputs = (tokens, input_pos, position_ids, padding_mask)
        runner = self.prepare(*inputs)
        if runner is None:
            return self._fallback_step(tokens, input_pos, position_ids=position_ids, padding_mask=padding_mask,
                                       validate=False)
        return runner.run([*inputs, *_caches(self.model)])[0]

    def prepare(self, *example: torch.Tensor) -> Any:
        """The library for these inputs' shapes, loaded or compiled now if it is not yet; None once
        packaging has failed and the fallback runs instead (prepared too, where it can be)."""
        if self._fallback_step is None:
            shape = (self._inputs(example), *self.model.kv_cache.k.shape)
            try:
                if shape not in self.runners:
                    self.runners[shape] = self._runner(*example)
                return self.runners[shape]
            except Exception as e:  # noqa: BLE001 - export/AOTInductor limits vary by model and torch
                warnings.warn(f"compiled {self.kind}: ahead-of-time packaging failed ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); compiling in-process instead")
                self.status, self._fallback_step = "fallback", self.fallback()
        prepare = getattr(self._fallback_step, "prepare", None)
        if prepare is not None:
            prepare(*example)
        return None

    def _inputs(self, example: tuple[torch.Tensor, ...]) -> int | tuple:
        """What of the inputs' shapes a library is made for: the batch; a verify step's width and
        slots' layout too (one shared slot row, or one per row)."""
        if self.kind == "verify":
            return tuple(example[0].shape), tuple(example[1].shape)
        return example[0].shape[0]

    def _runner(self, *example: torch.Tensor) -> Any:
        path = self.folder / f"{self.kind}-{step_key(self.model, self._inputs(example))}.so"
        tried = path.is_file()  # a file that fails to load here is rebuilt, not tried again
        if tried and (runner := self._load(path)) is not None:
            return runner
        self.folder.mkdir(parents=True, exist_ok=True)
        from filelock import FileLock

        # One build per key: processes starting together (the ranks of a launch, a server and a
        # CLI) compile it once; the others wait for the library and load it.
        with FileLock(str(path.with_suffix(".lock"))):
            if not tried and path.is_file() and (runner := self._load(path)) is not None:
                return runner  # built by another process while this one waited
            build_library(self.model, path, example, self.kind)
            _evict(self.folder, self.kind, KEEP)
        self.status = "compiled"
        return _runtime().AOTIModelContainerRunnerCpu(str(path), 1)

    def _load(self, path: Path) -> Any:
        """The cached library at `path` as a runner; None (with a warning) where it does not load."""
        try:
            runner = _runtime().AOTIModelContainerRunnerCpu(str(path), 1)
        except Exception as e:  # noqa: BLE001 - a damaged file is rebuilt, not fatal
            log.warning("%s: cannot load (%s); compiling again", path, e)
            return None
        os.utime(path)  # most recently used
        self.status = "loaded"
        return runner
