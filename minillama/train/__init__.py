"""Fine-tuning through Accelerate: recipes (config), data, LoRA, resumable checkpoints, the loop."""

from .config import FinetuneConfig, load_finetune_config
from .loop import finetune

__all__ = ["FinetuneConfig", "finetune", "load_finetune_config"]
