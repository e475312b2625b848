"""The `minillama` command: a thin argparse front over the library. Errors print as one line, exit 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import GenerationError, MinillamaError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def deferred_sigint() -> Any:
    """Hold Ctrl-C until the block ends, then raise KeyboardInterrupt from Python.

    Importing torch and loading a checkpoint run C++ that calls back into Python; a
    KeyboardInterrupt raised inside such a callback aborts the process (SIGABRT, "terminate called
    after throwing pybind11::error_already_set"), which no `except` can catch.
    """
    if sys.gettrace() is not None or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield  # someone else (a debugger, an embedding program) owns SIGINT
        return
    pending: list[int] = []
    signal.signal(signal.SIGINT, lambda *_: pending.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    with deferred_sigint():
        from .checkpoint import from_pretrained
        from .hub import model_path
        from .tokenizer import load_tokenizer

        start = time.perf_counter()
        model_dir = model_path(args.model)
        model = from_pretrained(model_dir, dtype=args.dtype, device=args.device, norm=args.norm,
                                quantize=args.quantize, tensor_parallel=(getattr(args, "tp", None) or 1) > 1)
        tokenizer = load_tokenizer(model_dir)
        args.load_s = time.perf_counter() - start
    return model, tokenizer


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


def unescape(text: str) -> str:
    r"""Process C-style escapes as llama.cpp's CLI does: \n \t \r \\ \' \" \xHH \uHHHH.

    A shell passes `--stop "\n\n"` as backslashes and letters; an unknown escape stays as typed.
    """
    def one(m: re.Match[str]) -> str:
        code = m.group(1)
        return chr(int(code[1:], 16)) if code[0] in "xu" and len(code) > 1 else _ESCAPES.get(code, m.group(0))

    return re.sub(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|.)", one, text, flags=re.DOTALL)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """Generation options from flags, validated before any model is loaded."""
    from .generate import SamplingConfig, check_count
    from .stopping import check_stop_strings

    if args.max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty, args.seed,
                              args.presence_penalty, args.frequency_penalty)
    stop = check_stop_strings([unescape(s) for s in args.stop])
    schema = None
    if args.json_schema is not None:
        from .structured import check_schema

        try:
            text = Path(args.json_schema).read_text()
        except OSError as e:
            raise GenerationError(f"--json-schema {args.json_schema}: {e.strerror or e}") from None
        try:
            schema, _ = check_schema(text)
        except GenerationError as e:
            raise GenerationError(f"--json-schema {args.json_schema}: {e}") from None
    options = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                   min_p=sampling.min_p, repetition_penalty=sampling.repetition_penalty, seed=sampling.seed,
                   stop=stop or None, presence_penalty=sampling.presence_penalty,
                   frequency_penalty=sampling.frequency_penalty, json_schema=schema, compile=args.compile)
    if args.draft_compile and args.draft is None:
        raise GenerationError("--draft-compile compiles the --draft model's steps: give --draft DIR too")
    if args.prompt_lookup is not None or args.draft is not None:
        from .speculative import PromptLookup

        if args.prompt_lookup is not None and args.draft is not None:
            raise GenerationError("--prompt-lookup and --draft are two ways to guess tokens: choose one")
        if schema:
            raise GenerationError("speculative decoding (--prompt-lookup / --draft) does not combine with "
                                  "--json-schema yet")
        check_count(args.draft_tokens, "--draft-tokens")
        if args.prompt_lookup is not None:
            options["speculative"] = PromptLookup(tokens=check_count(args.prompt_lookup, "--prompt-lookup"))
    return options


def _attach_draft(args: argparse.Namespace, tokenizer: Any, options: dict[str, Any]) -> None:
    """Load --draft (with --draft-quantize) as the speculative proposer; its tokenizer must be the model's."""
    if args.draft is None:
        return
    from .checkpoint import from_pretrained
    from .hub import model_path
    from .speculative import DraftModel
    from .tokenizer import load_tokenizer

    draft_dir = model_path(args.draft)
    if load_tokenizer(draft_dir).get_vocab() != tokenizer.get_vocab():
        raise GenerationError(f"--draft {args.draft}: its tokenizer is not the model's (the vocabularies differ)")
    draft = from_pretrained(draft_dir, dtype=args.dtype, device=args.device, quantize=args.draft_quantize)
    options["speculative"] = DraftModel(draft, args.draft_tokens, compile=args.draft_compile)


def _stream_reply(model: Any, tokenizer: Any, ids: list[int], args: argparse.Namespace,
                  options: dict[str, Any]) -> str:
    from .generate import GenerationStats, stream

    stats = GenerationStats()
    pieces = []
    quiet = getattr(args, "quiet", False)  # a tensor-parallel process other than the first
    try:
        for piece in stream(model, tokenizer, ids, args.max_new_tokens, stats=stats, **options):
            pieces.append(piece)
            if not quiet:
                print(piece, end="", flush=True)
    finally:  # Ctrl-C included: what was generated stays on screen, the prompt starts on a new line
        if not quiet:
            print(flush=True)
    if options.get("json_schema") is not None and not quiet and not _is_json("".join(pieces)):
        print(f"minillama: the reply reached --max-new-tokens ({args.max_new_tokens}) before its JSON was complete",
              file=sys.stderr)
    if args.stats and not quiet:
        compiled = [bool(args.compile) and (getattr(model.__dict__.get(key), "status", None) or True)
                    for key in ("_compiled_step", "_compiled_prefill")]
        from .linear import memory_summary

        load_s = getattr(args, "load_s", None)
        memory = f" [{memory_summary(model)}]" if load_s is not None else ""  # once, with the load
        print(format_stats(stats, load_s, *compiled) + memory, file=sys.stderr)
        args.load_s = None  # a chat loads once: later turns report no load time
    return "".join(pieces)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


COMPILE_NOTES = {True: " (compile)", "compiled": " (compiled, and cached for the next run)",
                 "loaded": " (loaded from the cache)", "fallback": " (compile, in-process)"}


def format_stats(stats: Any, load_s: float | None, compiled: bool | str, prefill_compiled: bool | str = False) -> str:
    """One line: load, prefill (and its compilation), first decode step (compile/warm-up) and
    steady decode, each apart. compiled, prefill_compiled: False, True, or what the compiled decode
    step / prefill did (aot.PackagedStep.status)."""
    parts = [f"load {load_s:.2f} s"] if load_s is not None else []
    if stats.prefill_compile_s:
        parts.append(f"prefill compile {stats.prefill_compile_s:.2f} s" + COMPILE_NOTES.get(prefill_compiled, ""))
    reused = f", {stats.reused_tokens} more reused from the cache" if stats.reused_tokens else ""
    parts.append(f"prefill {stats.prompt_tokens} tokens{reused} in {stats.prefill_s:.2f} s "
                 f"({stats.prefill_tok_s:.0f} tok/s)")
    if stats.new_tokens > 1:
        parts.append(f"first decode step {stats.warmup_s:.2f} s" + COMPILE_NOTES.get(compiled, ""))
    rate = f" at {stats.decode_tok_s:.1f} tok/s" if stats.decode_tok_s else ""
    parts.append(f"{stats.new_tokens} new tokens{rate}")
    if stats.target_forwards:
        parts.append(f"speculative: {stats.accepted} of {stats.proposed} guesses accepted ({stats.acceptance:.0%}), "
                     f"{stats.new_tokens / (stats.target_forwards + 1):.2f} tokens per forward")
    return "[" + "; ".join(parts) + "]"


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate a reply to one prompt (--prompt or stdin), streamed to stdout."""
    from .tokenizer import encode_prompt

    options = _sampling(args)
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            raise GenerationError("no prompt: pass --prompt TEXT or pipe text on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise GenerationError("empty prompt")
    if args.tp is not None and args.tp > 1:
        _join_tensor_parallel(args)
    elif args.tp is not None and args.tp < 1:
        raise GenerationError(f"--tp must be >= 1, got {args.tp}")
    model, tokenizer = _load(args)
    _attach_draft(args, tokenizer, options)
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": prompt})
    _stream_reply(model, tokenizer, encode_prompt(tokenizer, messages, args.chat), args, options)
    return 0


def _join_tensor_parallel(args: argparse.Namespace) -> None:
    """Join the launcher's processes (torchrun / accelerate launch) as one of --tp shards."""
    from .dist import process_state

    state = process_state()
    if state.num_processes != args.tp:
        raise GenerationError(f"--tp {args.tp} needs {args.tp} processes; this launch has {state.num_processes} "
                              f"(e.g. torchrun --nproc_per_node {args.tp} -m minillama.cli generate --tp {args.tp} ...)")
    if args.device is None:
        args.device = str(state.device)
    args.quiet = not state.is_main_process


def fit_conversation(
    encode: Callable[[list[dict[str, str]]], list[int]], history: list[dict[str, str]], reserve: int,
    context: int,
) -> tuple[list[dict[str, str]], list[int]]:
    """The newest turns of `history` whose ids leave `reserve` tokens of `context` for the reply,
    dropping the oldest user/assistant pairs first (the last message always stays), and their ids."""
    ids = encode(history)
    while len(ids) + reserve > context and len(history) > 1:
        history = history[2:]
        ids = encode(history)
    return history, ids


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive multi-turn chat in the terminal (/reset clears the history, /exit or Ctrl-D quits;
    Ctrl-C cancels the answer being written). The conversation's KV cache stays between turns: a
    turn prefills only what its chat template rendering adds to the last one."""
    from .generate import CachedPrefix
    from .tokenizer import encode_prompt

    options = _sampling(args)
    conversation = CachedPrefix()
    # (speculative decoding keeps its own cache rows: no reuse across turns with it yet)
    if args.prefix_reuse and args.prompt_lookup is None and args.draft is None:
        options["cached"] = conversation
    model, tokenizer = _load(args)
    _attach_draft(args, tokenizer, options)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    context = model.config.max_position_embeddings
    interactive = sys.stdin.isatty()

    def encode(turns: list[dict[str, str]]) -> list[int]:
        return encode_prompt(tokenizer, system + turns, chat=args.chat)

    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit quits)", file=sys.stderr)
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history.clear()
            conversation.clear()
            continue
        if not line.strip():
            continue
        # The history changes only once an answer is complete: a message that cannot be sent, or an
        # answer cancelled with Ctrl-C, leaves the conversation as it was.
        turns, ids = fit_conversation(encode, history + [{"role": "user", "content": line}],
                                      args.max_new_tokens, context)
        if len(ids) >= context:
            print(f"minillama: message too long ({len(ids)} tokens, context {context}); not sent",
                  file=sys.stderr)
            continue
        held = len(conversation.tokens)  # the last turn's prompt and reply, as the cache holds them
        try:
            reply = _stream_reply(model, tokenizer, ids, args, options)
        except KeyboardInterrupt:
            print("[cancelled]", file=sys.stderr)
            continue
        if args.stats and args.prefix_reuse and held and conversation.reused < min(held, len(ids)) - 2:
            # A template that renders earlier turns differently next time (or history dropped to fit
            # the context) leaves only the common start reusable; the rest is prefilled again.
            print(f"[prefix reuse: the prompt diverged from the cached conversation after {conversation.reused} "
                  f"of {held} tokens (the chat template re-rendered earlier turns, or old turns were dropped); "
                  "the rest was prefilled again]", file=sys.stderr)
        history = turns + [{"role": "assistant", "content": reply}]


def cmd_convert_gguf(args: argparse.Namespace) -> int:
    """Dequantize a GGUF file (llama, qwen2, qwen3, gemma2, gemma3, phi3) into an HF safetensors directory."""
    from .assets import convert_gguf

    print(f"wrote {convert_gguf(args.file, args.outdir)}")
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    """Write a checkpoint as a GGUF file for llama.cpp / Ollama (llama, mistral, qwen2, qwen3), with its
    tokenizer and chat template; a quantized minillama checkpoint is dequantized, then quantized to --type."""
    from .checkpoint import from_pretrained
    from .gguf_export import check_exportable, save_gguf
    from .hub import model_path

    directory = model_path(args.model)
    model = from_pretrained(directory, dtype="float32", prepack=False)
    check_exportable(model.config, args.type)  # before reading the tokenizer
    for note in save_gguf(model, args.out, directory, type=args.type, name=args.name or Path(str(args.model)).name):
        print(f"note: {note}", file=sys.stderr)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out} ({args.type}, {size / 1e6:.0f} MB)")
    return 0


def cmd_generate_batch(args: argparse.Namespace) -> int:
    """Generate for a JSONL file of prompts; under `accelerate launch` the prompts split across processes."""
    from .batch import generate_file
    from .dist import process_state

    options = _sampling(args)
    if args.device is None:
        args.device = process_state().device
    model, tokenizer = _load(args)
    _attach_draft(args, tokenizer, options)
    n = generate_file(model, tokenizer, args.prompts, args.out, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, chat=args.chat, system=args.system, **options)
    if process_state().is_main_process:
        print(f"wrote {n} completions to {args.out}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /v1/models, /health), many clients at once through continuous batching (docs/serving.md)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MinillamaError("serving needs FastAPI and uvicorn: pip install 'minillama[serve]'") from None
    from .assets import SMOLLM2_NAME
    from .engine import Engine, check_settings
    from .serve import listen, serve

    check_settings(args.max_batch, args.max_queue, args.max_seq_len, args.prefill_chunk)  # before the load
    sock = listen(args.host, args.port)  # --port 0: a free port, named in the line below
    model, tokenizer = _load(args)

    name = args.served_model_name or (args.model.rstrip("/") if args.model else SMOLLM2_NAME)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                    max_seq_len=args.max_seq_len, prefill_chunk=args.prefill_chunk, prefix_reuse=args.prefix_reuse)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"minillama: serving {name} on http://{host}:{sock.getsockname()[1]}/v1 ({args.max_batch} slots of "
          f"{engine.cache_len} tokens; loaded in {args.load_s:.1f} s)", file=sys.stderr, flush=True)
    aliases = (SMOLLM2_NAME, f"HuggingFaceTB/{SMOLLM2_NAME}") if not args.model else (Path(args.model).name,)
    serve(engine, name, sock, aliases=aliases, shutdown_timeout=args.shutdown_timeout, log_level=args.log_level)
    return 0


def _lm_eval() -> Any:
    """minillama.evaluate (which registers the "minillama" model with lm-eval), or one line naming the install."""
    try:
        with deferred_sigint():
            from . import evaluate
    except ImportError as e:
        if "lm_eval" not in str(e):
            raise
        raise MinillamaError("evaluation needs lm-evaluation-harness: pip install 'minillama[eval]'") from None
    return evaluate


def cmd_eval(args: argparse.Namespace) -> int:
    """Score the model on lm-evaluation-harness tasks in-process (docs/evaluation.md): lm-eval's task
    registry, metrics, results table and output files."""
    evaluate = _lm_eval()
    from lm_eval.utils import make_table

    if args.limit is not None and args.limit <= 0:
        raise MinillamaError(f"--limit must be > 0, got {args.limit:g}")
    from .assets import SMOLLM2_NAME

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    manager = evaluate.task_manager(tasks, args.include_path)  # an unknown task fails before the load
    model, tokenizer = _load(args)
    lm = evaluate.MinillamaLM(args.model or SMOLLM2_NAME, model=model, tokenizer=tokenizer,
                              batch_size=args.batch_size, compile=args.compile, max_length=args.max_length)
    results = evaluate.evaluate(lm, tasks, manager=manager, num_fewshot=args.num_fewshot,
                                limit=int(args.limit) if args.limit and args.limit >= 1 else args.limit,
                                include_path=args.include_path, output_path=args.output_path,
                                log_samples=args.log_samples, apply_chat_template=args.apply_chat_template)
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if args.output_path:
        print(f"results written under {args.output_path}", file=sys.stderr)
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    """lm-eval's own command line with minillama registered: `minillama lm-eval run --model minillama
    --model_args pretrained=DIR --tasks ...` (lm-eval's CLI discovers no plugins itself)."""
    _lm_eval()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *args.lm_eval_args]
    cli_evaluate()
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune from a YAML recipe (configs/finetune/); run it through `accelerate launch` for several
    processes or GPUs."""
    from .train import finetune, load_finetune_config
    from .train.config import parse_override

    overrides = dict(parse_override(item) for item in args.set)
    for key in ("max_steps", "save_every", "eval_every", "stop_after", "out", "resume"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    finetune(load_finetune_config(args.config, overrides), progress=not args.no_progress)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Save a checkpoint with int8/int4 projections that loads back quantized (minillama only:
    transformers cannot load it)."""
    with deferred_sigint():
        from .checkpoint import from_pretrained, save_pretrained
        from .errors import CheckpointError
        from .quant import weight_bytes
        from .tokenizer import load_tokenizer

        model = from_pretrained(args.model, dtype=args.dtype, quantize=args.mode, prepack=False)
        try:
            tokenizer = load_tokenizer(args.model)
        except CheckpointError:
            tokenizer = None  # a checkpoint without one: weights and config only
    save_pretrained(model, args.out, tokenizer=tokenizer)
    print(f"wrote {args.out} ({model.config.quantization.name}, {weight_bytes(model) / 1e6:.0f} MB)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Print a checkpoint's architecture and parameter count."""
    import torch

    from .linear import memory_summary, model_tensors
    from .quant import QuantLinear

    model, _ = _load(args)
    cfg = model.config
    n_params = sum(t.numel() for t in model_tensors(model) if isinstance(t, torch.nn.Parameter)) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    from .config import ARCHITECTURES

    print(f"{cfg.model_type}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} (q/kv), head_dim {cfg.head_dim}, "
          f"vocab {cfg.vocab_size}, context {cfg.max_position_embeddings}, rope {cfg.rope.rope_type} "
          f"(theta {cfg.rope.theta:g}), sliding window {_windows(cfg)}, tied {cfg.tie_word_embeddings}, "
          f"norm {cfg.norm}, quantization {cfg.quantization.name if cfg.quantization else 'none'}")
    print(f"{n_params:,} parameters, {model.embed.weight.dtype}, {model.embed.weight.device}; {memory_summary(model)}")
    sites = model.norm_sites()
    gain = (f"w + {cfg.norm_offset:g}" if cfg.norm_offset else "w") + (" in fp32" if cfg.norm_fp32_gain else "")
    print(f"family {cfg.model_type} ({ARCHITECTURES[cfg.model_type]}): norms {cfg.norm_placement}, per block "
          f"{', '.join(sites[:-1])}; {len(sites) - 1} x {cfg.num_hidden_layers} + 1 final = "
          f"{(len(sites) - 1) * cfg.num_hidden_layers + 1} norm calls per forward; gain {gain}")
    return 0


def _windows(cfg: Any) -> str:
    """"None", "4096" (every layer) or "512 on 22 of 26 layers"."""
    sliding = sum(cfg.layer_window(i) is not None for i in range(cfg.num_hidden_layers))
    if cfg.sliding_window is None or sliding == cfg.num_hidden_layers:
        return str(cfg.sliding_window)
    return f"{cfg.sliding_window} on {sliding} of {cfg.num_hidden_layers} layers"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF checkpoint directory or Hugging Face id, e.g. HuggingFaceTB/SmolLM2-135M "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: the checkpoint's")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    from .norms import NORMS

    p.add_argument("--norm", default=None, help=f"replace the checkpoint's RMSNorm: {', '.join(sorted(NORMS))} "
                   "(options in the name, e.g. prmsnorm:p=0.125)")
    p.add_argument("--quantize", default=None, metavar="MODE", help=QUANTIZE_HELP)


QUANTIZE_HELP = ("weight-only quantization of the projections: int8 (per channel) or int4 (groups of 64 "
                 "input columns); int4-g32/-g128/-g256 set the group; +lm_head also quantizes the output "
                 "projection, e.g. int4-g32+lm_head")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", "-n", type=int, default=256)
    p.add_argument("--temperature", "--temp", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", "--repeat-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="OpenAI's: subtracted from the logit of every token generated so far, in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="OpenAI's: subtracted once per time a token was generated so far, in [-2, 2]")
    p.add_argument("--seed", "-s", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help=r"stop string (repeatable); escapes \n \t \r \\ \xHH \uHHHH are processed, so "
                        r"--stop '\n\n' stops at a blank line")
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="the reply is JSON that follows this JSON schema, enforced token by token "
                        "(e.g. configs/schemas/person.json; a file holding {\"type\": \"object\"} asks for any object)")
    p.add_argument("--prompt-lookup", nargs="?", type=int, const=10, default=None, metavar="N",
                   help="speculative decoding by prompt lookup: guess up to N (default 10) tokens a step by "
                        "copying what followed the last few tokens earlier in the text; the same output, faster "
                        "where the answer repeats the input")
    p.add_argument("--draft", default=None, metavar="DIR_OR_ID",
                   help="speculative decoding with this smaller model (same tokenizer) guessing the tokens")
    p.add_argument("--draft-tokens", type=int, default=4, metavar="K", help="tokens the draft guesses a step")
    p.add_argument("--draft-quantize", default=None, metavar="MODE", help="load the draft quantized (e.g. int8)")
    p.add_argument("--draft-compile", action="store_true",
                   help="compile the draft's one-token steps (batch 1; cached on disk like --compile's)")
    p.add_argument("--system", default=None, help="system message (chat template only)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="use the tokenizer's chat template (default: when it has one)")
    p.add_argument("--compile", nargs="?", const=True, default=False, choices=("decode", "all"),
                   help="compile the decode step, and on a GPU the prefill too (CPU: ~45 s the first time, then "
                        "loaded from the cache in < 1 s); --compile all: the prefill on a CPU as well (one "
                        "compilation for every prompt length); --compile decode: the decode step only")
    p.add_argument("--stats", action="store_true",
                   help="print load time, prefill (and its compilation), first decode step (compile) and decode "
                        "speed to stderr")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="minillama", description=__doc__)
    parser.add_argument("--version", action="version", version=f"minillama {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, extra in [("generate", cmd_generate, _add_generation_args), ("chat", cmd_chat, _add_generation_args),
                              ("info", cmd_info, None)]:
        p = sub.add_parser(name, help=func.__doc__, description=func.__doc__)
        _add_model_args(p)
        if extra:
            extra(p)
        if name == "generate":
            p.add_argument("--prompt", "-p", default=None, help="the prompt (default: read stdin)")
            p.add_argument("--tp", type=int, default=None, metavar="N",
                           help="tensor parallel over N processes started by torchrun or accelerate launch: "
                                "each holds 1/N of every projection (docs/distributed.md)")
        if name == "chat":
            p.add_argument("--prefix-reuse", action=argparse.BooleanOptionalAction, default=True,
                           help="keep the conversation's KV cache across turns, so each turn prefills only its "
                                "new messages (--no-prefix-reuse: prefill the whole history every turn)")
        p.set_defaults(func=func)
    p = sub.add_parser("generate-batch", help=cmd_generate_batch.__doc__, description=cmd_generate_batch.__doc__)
    _add_model_args(p)
    _add_generation_args(p)
    p.add_argument("--prompts", "--input", "-i", dest="prompts", required=True,
                   help='JSONL: {"prompt": ...} (or "text") or {"messages": [...]} per line')
    p.add_argument("--out", "--output", "-o", dest="out", required=True,
                   help="output JSONL (input records + completion, in input order)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward (per process)")
    p.set_defaults(func=cmd_generate_batch)
    p = sub.add_parser("serve", help=cmd_serve.__doc__, description=cmd_serve.__doc__)
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the startup line names it)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV-cache rows)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row; more get HTTP 503")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="tokens per request, prompt included (default: the model's context)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens prefilled per step: a long prompt takes several steps while the others decode")
    p.add_argument("--prefix-reuse", action=argparse.BooleanOptionalAction, default=True,
                   help="a request whose prompt starts as a finished one's did reuses that row's cached keys and "
                        "values and prefills only the rest (default: on)")
    p.add_argument("--served-model-name", default=None, help="the model id clients name (default: --model)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGINT/SIGTERM, seconds in-flight requests get to finish before they are cancelled")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("eval", help=cmd_eval.__doc__, description=cmd_eval.__doc__)
    _add_model_args(p)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. hellaswag,arc_easy "
                   "(shipped offline tasks: minillama_mc,minillama_hamlet with --include-path configs/eval)")
    p.add_argument("--include-path", default=None, metavar="DIR", help="a directory of task YAML files of your own")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None,
                   help="evaluate the first N documents of each task (a number below 1: that fraction)")
    p.add_argument("--batch-size", type=int, default=64, help="continuations scored per forward pass")
    p.add_argument("--max-length", type=int, default=None, help="context in tokens (default: the model's)")
    p.add_argument("--compile", nargs="?", const=True, default=False, choices=("decode", "all"),
                   help="compile generation tasks' decode step")
    p.add_argument("--apply-chat-template", action="store_true", help="render prompts with the chat template")
    p.add_argument("--output-path", default=None, metavar="DIR", help="write lm-eval's results (and samples) here")
    p.add_argument("--log-samples", action="store_true", help="with --output-path: also each sample's requests")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("lm-eval", help=cmd_lm_eval.__doc__, description=cmd_lm_eval.__doc__, add_help=False)
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_lm_eval)
    p = sub.add_parser("finetune", help=cmd_finetune.__doc__, description=cmd_finetune.__doc__)
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/finetune/tiny.yaml")
    p.add_argument("--out", default=None, help="run directory: metrics, checkpoints, final/ (export)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--stop-after", type=int, default=None, help="stop after this step (checkpointed); the LR "
                   "schedule still spans --max-steps; continue later with --resume")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from the newest complete checkpoint in OUT/checkpoints (or this one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe key, e.g. --set optim.lr=1e-4 --set lora.enabled=true")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune)
    p = sub.add_parser("quantize", help=cmd_quantize.__doc__, description=cmd_quantize.__doc__)
    p.add_argument("model", help="HF checkpoint directory or Hugging Face id (unquantized)")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--mode", required=True, metavar="MODE", help=QUANTIZE_HELP)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the scales and of everything left unquantized (default: the checkpoint's)")
    p.set_defaults(func=cmd_quantize)
    p = sub.add_parser("convert-gguf", help=cmd_convert_gguf.__doc__)
    p.add_argument("file", help="a .gguf file")
    p.add_argument("outdir", help="output directory (written atomically)")
    p.set_defaults(func=cmd_convert_gguf)
    p = sub.add_parser("export-gguf", help=cmd_export_gguf.__doc__, description=cmd_export_gguf.__doc__)
    p.add_argument("model", help="HF checkpoint directory or Hugging Face id")
    p.add_argument("out", help="the .gguf file to write (atomically)")
    p.add_argument("--type", default="f16", metavar="TYPE",
                   help="f32, f16, bf16, q8_0 or q4_0: the weights' type (default f16; norms stay f32; q4_0 keeps "
                        "the embedding and output matrices in q8_0)")
    p.add_argument("--name", default=None, help="general.name in the file (default: the model directory's name)")
    p.set_defaults(func=cmd_export_gguf)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `minillama` console script.

    Exit status: 0 done, 2 bad input (one line on stderr), 130 interrupted (Ctrl-C), 141 the
    reader of stdout went away (`| head`).
    """
    # Library warnings (e.g. a norm swap) as one line, without Python's source-line echo.
    warnings.formatwarning = lambda message, *_, **__: f"minillama: warning: {message}\n"
    rc = _run(argv)
    if "torch.distributed" in sys.modules:  # finetune / generate-batch / --tp under a launcher
        from .dist import finish

        finish(rc)
    return rc


def _run(argv: Sequence[str] | None) -> int:
    try:
        with deferred_sigint():  # build_parser imports torch
            parser = build_parser()
        args = parser.parse_args(argv)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except MinillamaError as e:
        print(f"minillama: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
