"""Structured output: a JSON schema enforced token by token (llguidance).

A `Grammar` is a schema compiled for one tokenizer (immutable, shared by every row and request that
asks for it); `Grammar.state()` is one row's position in it. Before each sample, `mask_logits`
sets the logits of the tokens the grammar does not allow to -inf; after it, `GrammarState.advance`
consumes the chosen token. The mask is applied ahead of the library's samplers (generate.py), so
temperature, top-p, seeds and batching mean what they mean for free text; once the document is
complete, only an end-of-sequence token is allowed.

Why llguidance: measured per token on our CPU with `tools/bench_grammar.py` (docs/serving.md),
it computes the mask lazily from the parser's state over a token trie, so a schema compiles in
about a millisecond (no per-schema vocabulary pass, unlike outlines-core's index or xgrammar's mask
cache) and each token costs tens of microseconds.
"""

from __future__ import annotations

import json
import weakref
from typing import Any, Sequence

import torch

from .errors import GenerationError

# Compact JSON (", " and ": " between items, no other whitespace): a small model given free
# whitespace can spend its whole budget on newlines; a schema's own "x-guidance" overrides these.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Any JSON object: what OpenAI's response_format {"type": "json_object"} asks for.
ANY_OBJECT: dict[str, Any] = {"type": "object"}

_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _ll_tokenizer(tokenizer: Any, vocab_size: int, eos: Sequence[int]) -> Any:
    """llguidance's view of a Hugging Face tokenizer (~1 s to build, so kept per tokenizer object)."""
    import llguidance.hf

    key = (vocab_size, tuple(eos))
    cached = _tokenizers.get(tokenizer, {})
    if key not in cached:
        if getattr(tokenizer, "backend_tokenizer", None) is None:
            raise GenerationError("structured output needs a fast (Rust) Hugging Face tokenizer")
        if len(tokenizer) > vocab_size:
            raise GenerationError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's "
                                  f"vocabulary ({vocab_size})")
        cached[key] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(eos))
        _tokenizers[tokenizer] = cached
    return cached[key]


def check_schema(schema: dict | str | bool) -> tuple[dict, str]:
    """(the schema as a dict, llguidance's grammar for it) from a dict, JSON text, or True for any
    JSON object; GenerationError naming the problem otherwise. Needs no tokenizer, so the CLI checks
    a schema before it loads a model."""
    try:
        import llguidance
    except ImportError:
        raise GenerationError("structured output needs llguidance: pip install llguidance") from None
    if schema is True:
        schema = dict(ANY_OBJECT)
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise GenerationError(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise GenerationError(f"json_schema must be a JSON object (a schema), got {type(schema).__name__}")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise GenerationError(f"json_schema: {e}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise GenerationError(f"json_schema: {error.strip().splitlines()[0]}")
    return schema, grammar


class Grammar:
    """A JSON schema compiled for one tokenizer and vocabulary size; GenerationError if it is invalid."""

    def __init__(self, schema: dict | str | bool, tokenizer: Any, vocab_size: int, eos: Sequence[int]) -> None:
        self.schema, self.grammar = check_schema(schema)
        self.vocab_size = vocab_size
        eos = list(eos) or [tokenizer.eos_token_id]  # generate(eos_token_id=[]) still ends a document
        self.tokenizer = _ll_tokenizer(tokenizer, vocab_size, eos)

    def state(self) -> GrammarState:
        """A fresh position at the start of the document, for one row."""
        return GrammarState(self)


class GrammarState:
    """One row's position in a Grammar: which tokens may come next, and the tokens consumed so far."""

    def __init__(self, grammar: Grammar) -> None:
        import llguidance

        self.grammar = grammar
        self.matcher = llguidance.LLMatcher(grammar.tokenizer, grammar.grammar, log_level=0)

    def advance(self, token: int) -> None:
        """Consume the sampled token (always one the mask allowed)."""
        if not self.matcher.consume_token(token) or self.matcher.is_error():
            raise GenerationError(f"structured output: token {token} rejected: {self.matcher.get_error()}")

    @property
    def stopped(self) -> bool:
        """The document is complete and nothing may follow it: the row ends here."""
        return self.matcher.is_stopped()

    @property
    def complete(self) -> bool:
        """The document so far is a whole value the schema accepts."""
        return self.matcher.is_accepting()


_SHIFTS = torch.arange(32, dtype=torch.int32)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [B, V] from llguidance's int32 bitmask [B, ceil(V / 32)] (bit j of word w: token 32w + j).
    Unpacked here rather than with llguidance.torch's helper, which torch.compiles on first use."""
    bits = (bitmask.unsqueeze(-1) >> _SHIFTS.to(bitmask.device)) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


_executor = None


def allowed_tokens(states: Sequence[GrammarState], vocab_size: int) -> torch.Tensor:
    """bool [len(states), V]: which tokens each state allows next (computed on the CPU).

    Several rows are computed at once by llguidance's own thread pool (outside the GIL), one row
    on the calling thread. (llguidance.torch's fill_next_token_bitmask[_par] does this too, but
    importing that module runs torch.compile's decorator: ~2 s of Dynamo import for two helpers.)
    """
    global _executor
    words = (vocab_size + 31) // 32
    bitmask = torch.full((len(states), words), -1, dtype=torch.int32)
    if len(states) == 1:
        states[0].matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), words * 4)
    else:
        if _executor is None:
            import llguidance

            _executor = llguidance.LLExecutor()
        _executor.unsafe_compute_mask_ptr([(s.matcher, i) for i, s in enumerate(states)], bitmask.data_ptr(),
                                          words * 4, len(states))
    return unpack_bitmask(bitmask, vocab_size)


def mask_logits(logits: torch.Tensor, states: Sequence[GrammarState | None]) -> torch.Tensor:
    """Set logits [B, V] to -inf where row i's grammar forbids the token, in place; rows whose state
    is None are left alone. Returns logits."""
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return logits
    forbidden = ~allowed_tokens([states[i] for i in rows], logits.shape[-1]).to(logits.device)
    if len(rows) == logits.shape[0]:
        return logits.masked_fill_(forbidden, float("-inf"))
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(forbidden, float("-inf"))
    return logits


def advance_states(states: Sequence[GrammarState | None], tokens: Sequence[int], device: torch.device) -> torch.Tensor:
    """Consume each live row's sampled token; bool [B] on `device`: which rows' documents just ended."""
    ended = []
    for state, token in zip(states, tokens):
        if state is not None:
            state.advance(token)
        ended.append(state is not None and state.stopped)
    return torch.tensor(ended, device=device)
