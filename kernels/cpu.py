"""CPU norm kernels: csrc/cpu_norms.cpp, built on first use with torch.utils.cpp_extension.

What they are for: on a CPU, torch's RMSNorm (transformers' formula, or F.rms_norm) is several
passes over the data, and in bf16 9x slower than F.layer_norm's one fused kernel, so swapping the
norm measured torch's kernels, not the norm. These do RMSNorm and LayerNorm (residual add fused,
every family's gain) in one pass each, written the same way, so the two compare like for like.
They reproduce the torch code bit for bit, torch's own order of the fp32 sums included.

Why a C++ extension and not Inductor: the eager path calls a norm 61 times per SmolLM2 token, at
widths from 64 to 8192, so it needs one binary that covers every (width, dtype, variant) with a
few microseconds of call overhead. A compiled function per variant would cost a Dynamo trace per
process (seconds at start) and a guard check per call; this is one Python extension module
(pybind11, not a torch.ops library: ~1.5 us less per call, and nothing here needs the
dispatcher), compiled once per machine (~20 s) into the minillama cache, then loaded in ~2 ms by
every later process.
Rows run on torch's own intra-op threads (at::parallel_for), as F.layer_norm's do.

Where it cannot be built (no C++ compiler, no ninja, a read-only cache), on CPUs whose torch
kernels are not AVX2 or AVX-512 (the sums' order is known for those), or with
MINILLAMA_CPU_KERNELS=0, the callers take their torch code; a failed build warns once, in one line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch

from . import _common

SOURCE = Path(__file__).parent / "csrc" / "cpu_norms.cpp"
# Instruction sets the binary is built for, by torch's own probe: a cache shared by machines of
# different CPUs keeps one build per set instead of running an AVX-512 build on an AVX2 machine.
ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
             "AVX2": ["-mavx2", "-mfma", "-mf16c"]}
# The dtypes the kernels take (input, residual); anything else goes to the torch code.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows this wide go to the torch code: torch splits a single row of 32768+ elements (its reduction
# grain) between threads, an order the kernels do not replay.
WIDEST = 32768

_ops = None  # the extension module once loaded; False when it cannot be
# The kernels replay torch's fp32 sums, whose order is that of its AVX2 kernel on AVX2 and AVX-512
# machines alike (torch gives its sum no AVX-512 kernel). Elsewhere (no AVX2) the torch code runs.
_CAPABILITY = torch.backends.cpu.get_cpu_capability()
_replayable = _CAPABILITY.startswith(("AVX2", "AVX512"))
# Calls by kernel name (tests assert the fast path really ran, as LAUNCHES does for Triton).
CALLS: dict[str, int] = {"rms_norm": 0, "layer_norm": 0}
# The weight and bias types the kernels read directly (applies(): subclasses dispatch instead).
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _build_dir() -> Path:
    root = os.environ.get("MINILLAMA_CACHE") or Path.home() / ".cache" / "minillama"
    return Path(root) / "cpu_kernels"


def load():
    """The kernels' extension module, building it the first time on this machine; None where it cannot."""
    global _ops
    if _ops is None:
        _ops = False
        if os.environ.get("MINILLAMA_CPU_KERNELS", "1") == "0":
            return None
        try:
            _ops = _build()
        except Exception as e:  # noqa: BLE001 - any build failure means "use the torch code"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            warnings.warn(f"minillama: CPU norm kernels unavailable ({first[:200]}); using torch's ops",
                          stacklevel=3)
    return _ops or None


def _build():
    # The library's name carries a hash of everything that goes into it, so a second process loads
    # the file without touching the compiler, and a changed source or torch never loads a stale one.
    isa = next((k for k in ISA_FLAGS if _CAPABILITY.startswith(k)), "DEFAULT")
    # -ffp-contract=off: no fused multiply-adds, so every product rounds as torch's kernels round it.
    # -fopenmp: at::parallel_for is inline OpenMP; the libgomp.so.1 it links is the one torch loaded.
    cflags = ["-O3", "-ffp-contract=off", "-fopenmp", *ISA_FLAGS.get(isa, [])]
    stamp = " ".join([torch.__version__, *cflags]).encode()
    key = hashlib.sha256(SOURCE.read_bytes() + stamp).hexdigest()[:12]
    name = f"minillama_cpu_norms_{isa.lower()}_{key}"
    folder = _build_dir() / name
    library = folder / f"{name}.so"
    if not library.exists() or (folder / "lock").exists():  # cpp_extension's lock: a build in progress
        from torch.utils import cpp_extension

        try:  # the ninja wheel (a dependency) when its binary is not on PATH, as in an unactivated venv
            import ninja

            if ninja.BIN_DIR not in os.environ.get("PATH", ""):
                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except (ImportError, AttributeError):
            pass
        folder.mkdir(parents=True, exist_ok=True)
        print(f"minillama: building the CPU norm kernels once for this machine (~20 s) in {folder}",
              file=sys.stderr, flush=True)
        # cpp_extension locks the folder: processes starting together build once, the others wait
        return cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(folder), extra_cflags=cflags,
                                  extra_ldflags=["-fopenmp"], verbose=False)
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def applies(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None,
            bias: torch.Tensor | None = None) -> bool:
    """Whether a norm call takes the kernels: eager inference on CPU tensors of the kernels' dtypes
    (the weight and bias in x's dtype or fp32, a residual in x's), and the kernels load.

    Never under torch.compile or torch.export (Inductor fuses the torch code with its neighbours,
    and an exported program must not call this library), never when gradients are needed (the
    kernels have no backward), never under kernels.torch_path() (tests compare against it).
    Checked cheapest first: a decode step makes dozens of norm calls.
    """
    if torch.compiler.is_compiling():  # first: Dynamo then reads no module state (no guard on _ops)
        return False
    if _ops is False or not _replayable or _common.FORCE_TORCH or not x.is_cpu or x.dtype not in DTYPES:
        return False
    w_dtype = weight.dtype
    if (w_dtype != x.dtype and w_dtype != torch.float32) or not 0 < x.shape[-1] < WIDEST:
        return False
    if residual is not None and residual.dtype != x.dtype:
        return False  # h = x + residual promotes (the torch code rounds it so)
    if bias is not None and bias.dtype != w_dtype:
        return False  # mixed gains are rare
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (
            residual is not None and residual.requires_grad) or (bias is not None and bias.requires_grad)):
        return False
    # Plain tensors only: the module reads their memory directly, which a subclass (FakeTensor, an
    # AsyncCollectiveTensor whose all-reduce is still in flight under tensor parallelism, a
    # DTensor) may not hold; those take the torch code and dispatch as usual.
    if type(x) is not torch.Tensor or (residual is not None and type(residual) is not torch.Tensor):
        return False
    if type(weight) not in _PLAIN or (bias is not None and type(bias) not in _PLAIN):
        return False
    return load() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float,
             offset: float, fp32_gain: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h) shaped as x, y in weight's dtype; h is None without a residual."""
    CALLS["rms_norm"] += 1
    return _ops.rms_norm(x, weight, residual, eps, offset, fp32_gain)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h) shaped as x, y in h's dtype; h is None without a residual."""
    CALLS["layer_norm"] += 1
    return _ops.layer_norm(x, weight, bias, residual, eps)
