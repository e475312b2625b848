"""minillama: a compact LLaMA/Mistral-style decoder with exact Hugging Face parity."""

from .checkpoint import from_pretrained, save_pretrained
from .config import ModelConfig, RopeConfig
from .errors import CheckpointError, ConfigError, GenerationError, MinillamaError
from .generate import SamplingConfig, generate, stream
from .model import Transformer
from .norms import NORMS, register_norm
from .tokenizer import load_tokenizer

__version__ = "0.1.0"
__all__ = [
    "CheckpointError", "ConfigError", "GenerationError", "MinillamaError", "ModelConfig", "NORMS", "RopeConfig",
    "SamplingConfig", "Transformer", "from_pretrained", "generate", "load_tokenizer", "register_norm",
    "save_pretrained", "stream",
]
