"""Per-token cost of JSON-schema constrained decoding with each grammar library, on this CPU.

    python tools/bench_grammar.py [--model DIR] [--tokens 96] [--out bench_grammar]

For llguidance, xgrammar and outlines-core (each where installed): the one-off costs (wrapping the
tokenizer, compiling each schema in configs/schemas/) and the cost per generated token (the
allowed-token mask computed, applied to [1, vocab] fp32 logits, the chosen token consumed). The
tokens are chosen by random logits under the mask (the same seed for every library), so each
library walks a valid document of its own. This is how minillama chose its grammar library
(docs/serving.md); decode tok/s with a schema end to end is tools/bench_serve.py's `structured`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import write_json  # noqa: E402

SCHEMAS = Path(__file__).resolve().parent.parent / "configs" / "schemas"


class Backend:
    """One library: setup(tokenizer, vocab) once, compile(schema) per schema, then per token
    new_state(compiled) / mask(state, logits) in place / advance(state, token) / done(state)."""

    name = ""

    def available(self) -> bool:
        try:
            __import__(self.module)
        except ImportError:
            return False
        return True


class LLGuidance(Backend):
    name, module = "llguidance", "llguidance"

    def setup(self, tokenizer: Any, vocab: int, eos: list[int]) -> None:
        import llguidance.hf

        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos)

    def compile(self, schema: dict) -> Any:
        import llguidance

        return llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})

    def new_state(self, compiled: Any) -> Any:
        import llguidance

        return llguidance.LLMatcher(self.tok, compiled)

    def mask(self, state: Any, logits: torch.Tensor) -> None:
        from minillama.structured import allowed_tokens

        logits.masked_fill_(~allowed_tokens([SimpleNamespace(matcher=state)], logits.shape[-1]),
                            float("-inf"))

    def advance(self, state: Any, token: int) -> None:
        assert state.consume_token(token), state.get_error()

    def done(self, state: Any) -> bool:
        return state.is_stopped()


class XGrammar(Backend):
    name, module = "xgrammar", "xgrammar"

    def setup(self, tokenizer: Any, vocab: int, eos: list[int]) -> None:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=eos)
        self.compiler = xgr.GrammarCompiler(info)
        self.bitmask = None

    def compile(self, schema: dict) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                 separators=(", ", ": "))

    def new_state(self, compiled: Any) -> Any:
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled)

    def mask(self, state: Any, logits: torch.Tensor) -> None:
        import xgrammar as xgr

        if self.bitmask is None:
            self.bitmask = xgr.allocate_token_bitmask(1, logits.shape[-1])
        state.fill_next_token_bitmask(self.bitmask)
        xgr.apply_token_bitmask_inplace(logits, self.bitmask)

    def advance(self, state: Any, token: int) -> None:
        assert state.accept_token(token)

    def done(self, state: Any) -> bool:
        return state.is_terminated()


class OutlinesCore(Backend):
    name, module = "outlines-core", "outlines_core"

    def setup(self, tokenizer: Any, vocab: int, eos: list[int]) -> None:
        from outlines_core import Vocabulary

        # outlines-core takes the vocabulary as token bytes -> ids (its from_pretrained reads the hub).
        tokens: dict[bytes, list[int]] = {}
        for i in range(len(tokenizer)):
            if i in eos or i in tokenizer.all_special_ids:
                continue
            piece = tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(i)]).encode()
            if piece and b"\xef\xbf\xbd" not in piece:  # partial UTF-8 pieces: skipped here (a simplification)
                tokens.setdefault(piece, []).append(i)
        self.vocabulary = Vocabulary(eos[0], tokens)
        self.vocab = vocab

    def compile(self, schema: dict) -> Any:
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema

        return Index(build_regex_from_schema(json.dumps(schema), whitespace_pattern=r"[ ]?"), self.vocabulary)

    def new_state(self, compiled: Any) -> Any:
        from outlines_core import Guide

        return Guide(compiled)

    def mask(self, state: Any, logits: torch.Tensor) -> None:
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
        allowed[torch.tensor(state.get_tokens())] = True
        logits.masked_fill_(~allowed, float("-inf"))

    def advance(self, state: Any, token: int) -> None:
        state.advance(token)

    def done(self, state: Any) -> bool:
        return state.is_finished()


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def walk(backend: Backend, compiled: Any, vocab: int, tokens: int, seed: int) -> tuple[list[float], float]:
    """(seconds per token after the first, seconds to the first token: the state built, its first
    mask) for one document walked by random logits (mask + apply + argmax + advance per token)."""
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    state, times = backend.new_state(compiled), [time.perf_counter() - start]
    for _ in range(tokens):
        logits = torch.randn(1, vocab, generator=generator)
        start = time.perf_counter()
        backend.mask(state, logits)
        token = int(logits.argmax(-1))
        backend.advance(state, token)
        times.append(time.perf_counter() - start)
        if backend.done(state):
            break
    first = times[0] + times[1]
    return times[2:], first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory whose tokenizer to use (default: SmolLM2)")
    parser.add_argument("--tokens", type=int, default=96, help="tokens per walk (a walk ends early when complete)")
    parser.add_argument("--seeds", type=int, default=3, help="walks per schema")
    parser.add_argument("--out", default="bench_grammar")
    args = parser.parse_args()

    from transformers import AutoConfig, AutoTokenizer

    from minillama.assets import default_model_dir

    model_dir = args.model or str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    eos = [tokenizer.eos_token_id]
    schemas = {p.stem: json.loads(p.read_text()) for p in sorted(SCHEMAS.glob("*.json"))}
    results: dict[str, Any] = {"vocab": vocab, "torch_threads": torch.get_num_threads(), "backends": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for backend in (LLGuidance(), XGrammar(), OutlinesCore()):
        if not backend.available():
            print(f"{backend.name}: not installed, skipped", file=sys.stderr)
            continue
        _, setup_s = _timed(lambda: backend.setup(tokenizer, vocab, eos))
        entry: dict[str, Any] = {"setup_s": setup_s, "schemas": {}}
        per_token: list[float] = []
        for name, schema in schemas.items():
            compiled, compile_s = _timed(lambda: backend.compile(schema))
            times: list[float] = []
            firsts = []
            for seed in range(args.seeds):
                t, first = walk(backend, compiled, vocab, args.tokens, seed)
                times += t
                firsts.append(first)
            # compile + the first walk's first token: what a new schema costs before its first token
            entry["schemas"][name] = {"compile_s": compile_s, "first_token_s": firsts,
                                      "new_schema_s": compile_s + firsts[0],
                                      "token_ms_median": 1e3 * statistics.median(times),
                                      "token_ms_p90": 1e3 * sorted(times)[int(0.9 * len(times))],
                                      "tokens": len(times)}
            per_token += times
            print(f"{backend.name:14s} {name:8s} compile {compile_s * 1e3:8.1f} ms  first token "
                  f"{firsts[0] * 1e3:8.1f} / {firsts[-1] * 1e3:6.1f} ms  per token "
                  f"{1e3 * statistics.median(times):6.3f} ms median", file=sys.stderr)
        entry["token_ms_median"] = 1e3 * statistics.median(per_token)
        entry["token_ms_p90"] = 1e3 * sorted(per_token)[int(0.9 * len(per_token))]
        schemas_run = list(entry["schemas"].values())
        first_schema = schemas_run[0]["new_schema_s"]  # includes any per-tokenizer work done lazily
        later = max(s["new_schema_s"] for s in schemas_run[1:]) if len(schemas_run) > 1 else float("nan")
        results["backends"][backend.name] = entry
        rows.append(f"| {backend.name} | {setup_s:.2f} s | {first_schema * 1e3:.0f} ms | {later * 1e3:.1f} ms | "
                    f"{entry['token_ms_median']:.3f} ms | {entry['token_ms_p90']:.3f} ms |")
        write_json(out / "results.json", results)
    table = ["| library | tokenizer setup | first schema to its first token | later schemas (slowest) "
             "| per token, median | per token, p90 |", "|---|---|---|---|---|---|", *rows]
    (out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
