"""The `minillama` command: thin argparse front over the library. Errors print as one line, exit 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from .errors import MinillamaError


def _model_dir(arg: str | None) -> Path:
    from .assets import default_model_dir

    return Path(arg) if arg else default_model_dir()


def cmd_convert_gguf(args: argparse.Namespace) -> int:
    """Dequantize a LLaMA-architecture GGUF file into an HF safetensors directory."""
    from .assets import convert_gguf

    out = convert_gguf(args.file, args.outdir)
    print(f"wrote {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Print a checkpoint's architecture and parameter count."""
    from .checkpoint import from_pretrained

    model = from_pretrained(_model_dir(args.model), dtype=args.dtype, device=args.device, norm=args.norm)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{cfg.model_type}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} (q/kv), head_dim {cfg.head_dim}, "
          f"vocab {cfg.vocab_size}, rope {cfg.rope.rope_type} (theta {cfg.rope.theta:g}), "
          f"sliding window {cfg.sliding_window}, tied {cfg.tie_word_embeddings}, norm {cfg.norm}")
    print(f"{n_params:,} parameters, {model.embed.weight.dtype}, {model.embed.weight.device}")
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local HF checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--norm", default=None, help="replace the checkpoint's norm by a registered one")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="minillama", description=__doc__)
    parser.add_argument("--version", action="version", version=f"minillama {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert-gguf", help=cmd_convert_gguf.__doc__)
    p.add_argument("file", help="a .gguf file")
    p.add_argument("outdir", help="output directory (written atomically)")
    p.set_defaults(func=cmd_convert_gguf)

    p = sub.add_parser("info", help=cmd_info.__doc__)
    _add_model_args(p)
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `minillama` console script."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except MinillamaError as e:
        print(f"minillama: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
