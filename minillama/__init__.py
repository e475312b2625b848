"""minillama: a compact LLaMA/Mistral-style decoder with exact Hugging Face parity.

The public names load on first use (PEP 562), so `minillama --help` and the CLI's first lines run
before torch is imported, and a Ctrl-C during that import is handled like any other.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, ConfigError, GenerationError, MinillamaError

__version__ = "0.1.0"

# Installed, kernels/ is the subpackage minillama.kernels (pyproject's package-dir). From a plain
# checkout (a machine without a package index: a directory on PYTHONPATH holding a link to
# <checkout>/minillama, as tools/gpu_check.sh makes), the checkout's kernels/ is found as
# minillama.kernels and as nothing else: the checkout root itself never goes on a search path,
# where kernels/ would also be a top-level `kernels` (Hugging Face's package of that name, which
# transformers imports when it finds one) and every other directory there a minillama.* package.
_KERNELS = Path(__file__).resolve().parent.parent / "kernels"


class _CheckoutKernels:
    """sys.meta_path finder for `minillama.kernels` alone, from the checkout's kernels/."""

    @staticmethod
    def find_spec(fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != f"{__name__}.kernels":
            return None
        return importlib.util.spec_from_file_location(fullname, _KERNELS / "__init__.py",
                                                      submodule_search_locations=[str(_KERNELS)])


if importlib.util.find_spec(f"{__name__}.kernels") is None and (_KERNELS / "__init__.py").is_file():
    sys.meta_path.append(_CheckoutKernels())

_LAZY = {
    "from_pretrained": "checkpoint", "save_pretrained": "checkpoint", "ModelConfig": "config",
    "RopeConfig": "config", "SamplingConfig": "generate", "generate": "generate", "stream": "generate",
    "Transformer": "model", "NORMS": "norms", "register_norm": "norms", "load_tokenizer": "tokenizer",
    "QuantConfig": "config", "quantize_model": "quant",
}
__all__ = [
    "CheckpointError", "ConfigError", "GenerationError", "MinillamaError", "ModelConfig", "NORMS", "QuantConfig",
    "RopeConfig", "SamplingConfig", "Transformer", "from_pretrained", "generate", "load_tokenizer",
    "quantize_model", "register_norm", "save_pretrained", "stream",
]

if TYPE_CHECKING:
    from .checkpoint import from_pretrained, save_pretrained
    from .config import ModelConfig, QuantConfig, RopeConfig
    from .generate import SamplingConfig, generate, stream
    from .model import Transformer
    from .norms import NORMS, register_norm
    from .quant import quantize_model
    from .tokenizer import load_tokenizer


class _Package(types.ModuleType):
    """Importing a submodule makes it an attribute of its package: `import minillama.generate`
    anywhere would turn the function `minillama.generate` into the module generate.py."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'minillama' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
