"""Autoregressive generation: prefill, then one token at a time through the static KV cache.

Samplers follow transformers' order (repetition penalty, temperature, top-k, top-p, min-p) so a
seeded run means the same thing in both. Batches of prompts of different lengths are left-padded:
each row gets RoPE positions that start at 0 and a padding mask, so it produces the tokens it
would produce alone.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from .compiled import compile_parts, compiled
from .errors import GenerationError
from .model import Transformer, check_token_ids
from .stopping import IncrementalDecoder, StopStrings, check_stop_strings
from .structured import advance_states, mask_logits

# Cache lengths are rounded up so that successive calls reuse one allocation (and one compiled graph).
CACHE_ROUND = 256
# Tokens between checks of "every row done" on a GPU (each check is a host synchronisation).
SYNC_EVERY_GPU = 16


@dataclass
class SamplingConfig:
    """How the next token is chosen. temperature 0 is greedy; the filters apply only when sampling."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    # OpenAI's: subtracted from a token's logit once it has been generated (presence) and per time
    # it has been generated (frequency), counting the generated tokens only, not the prompt.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < float("inf")):
            raise GenerationError(f"temperature must be >= 0 and finite, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise GenerationError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and not (0 <= self.min_p <= 1):
            raise GenerationError(f"min_p must be in [0, 1], got {self.min_p!r}")
        penalty = self.repetition_penalty
        if not (isinstance(penalty, (int, float)) and 0 < penalty < float("inf")):
            raise GenerationError(f"repetition_penalty must be > 0 and finite, got {penalty!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):
            raise GenerationError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
                raise GenerationError(f"{name} must be a number in [-2, 2], got {value!r}")
        for token, bias in (self.logit_bias or {}).items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise GenerationError(f"logit_bias: {token!r} is not a token id")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise GenerationError(f"logit_bias[{token}] must be a number in [-100, 100], got {bias!r}")

    @property
    def counts_generated(self) -> bool:
        """Whether sampling needs each row's counts of generated tokens (presence/frequency penalties)."""
        return bool(self.presence_penalty or self.frequency_penalty)

    @property
    def greedy(self) -> bool:
        # Below fp32's smallest normal number a temperature is 0 to the fp32 logits it divides.
        return self.temperature < 1.1754943508222875e-38


@dataclass
class GenerationStats:
    """Where a generate call's time went, filled in as it runs (pass `stats=GenerationStats()`).

    The first decode step is timed apart: with compile=True it is where compilation happens (and
    on any device where caches warm up), so it never dilutes the decode rate. A compiled prefill is
    compiled (or loaded) before the prompt's clock starts: that time is `prefill_compile_s`.
    """

    prompt_tokens: int = 0  # prefilled (a cached prefix's tokens are not)
    reused_tokens: int = 0  # prompt tokens whose keys and values the cache held already (CachedPrefix)
    prefill_compile_s: float = 0.0  # compiling or loading the compiled prefill (0 when it was ready)
    prefill_s: float = 0.0  # the prompt's forward pass and the first sampled token
    warmup_s: float = 0.0  # the first decode step (compilation, when compiling)
    decode_s: float = 0.0  # every later decode step
    new_tokens: int = 0  # tokens produced (rows x steps counts a batch as one)
    # speculative decoding: tokens guessed, guesses the target kept, the target's verify forwards
    proposed: int = 0
    accepted: int = 0
    target_forwards: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        """New tokens per second after the first decode step (the steady state)."""
        return (self.new_tokens - 2) / self.decode_s if self.new_tokens > 2 and self.decode_s else 0.0


@dataclass
class CachedPrefix:
    """What row 0 of the model's KV cache holds between calls, for a conversation (one prompt a call).

    Pass the same object as `cached=` to each generate/stream call of a chat: a call prefills only
    what follows the longest common prefix of `tokens` and its prompt (the chat template renders
    the history again each turn; only the new messages differ), then records the tokens whose keys
    and values it wrote. Any other use of the model's cache in between (a call without this
    object, a new cache) is noticed, and the next call prefills everything.
    """

    tokens: list[int] = field(default_factory=list)
    reused: int = 0  # prompt tokens the last call did not prefill
    _keys: Any = None  # weakref to the cache tensor `tokens` live in

    def usable(self, model: Transformer, prompt: Sequence[int]) -> int:
        """Prompt tokens whose keys and values are in row 0 already (0 when the cache changed hands).
        At least the last prompt token is prefilled again: its logits give the first new token."""
        cache = model.kv_cache
        if (cache is None or self._keys is None or self._keys() is not cache.k
                or model.__dict__.get("_cache_holder") is not self):
            return 0
        return min(common_prefix(self.tokens, prompt), len(prompt) - 1)

    def clear(self) -> None:
        self.tokens, self.reused, self._keys = [], 0, None


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _grow_cache(model: Transformer, batch: int, length: int, keep: int) -> None:
    """A cache of at least [batch, length] slots (rounded up), keeping row 0's first `keep` slots."""
    old = [(layer.attn.kv_cache.k, layer.attn.kv_cache.v) for layer in model.layers] if keep else []
    model.setup_cache(batch, -(-length // CACHE_ROUND) * CACHE_ROUND)
    for layer, (k, v) in zip(model.layers, old):
        layer.attn.kv_cache.k[:1, :, :keep] = k[:1, :, :keep]
        layer.attn.kv_cache.v[:1, :, :keep] = v[:1, :, :keep]


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def process_logits(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None,
                   counts: torch.Tensor | None = None) -> torch.Tensor:
    """Shape fp32 logits [B, V] for sampling, in vLLM's order: logit_bias, the repetition penalty
    (over `seen`, prompt and generated), presence and frequency penalties (over `counts` [B, V] of
    generated tokens), then, when sampling, temperature/top-k/top-p/min-p."""
    if cfg.logit_bias:
        bias = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
        bias[torch.tensor(list(cfg.logit_bias), device=logits.device)] = torch.tensor(
            list(cfg.logit_bias.values()), dtype=logits.dtype, device=logits.device)
        logits = logits + bias
    if counts is not None and cfg.counts_generated:
        logits = logits - cfg.frequency_penalty * counts - cfg.presence_penalty * (counts > 0)
    if cfg.repetition_penalty != 1.0 and seen is not None:
        # CTRL-style, as transformers: shrink seen tokens' logits toward "less likely" whatever their sign.
        penalized = torch.where(logits < 0, logits * cfg.repetition_penalty, logits / cfg.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if cfg.greedy:
        return logits
    # A tiny temperature overflows logits to +-inf (softmax of inf - inf is NaN). Such rows are
    # divided after subtracting their maximum, which softmax ignores: the top token keeps 0 and the
    # rest go to -inf, the temperature -> 0 limit (greedy). Other rows stay exactly transformers'.
    scaled = logits / cfg.temperature
    overflow = ~torch.isfinite(scaled).all(-1, keepdim=True)
    logits = torch.where(overflow, (logits - logits.amax(-1, keepdim=True)) / cfg.temperature, scaled)
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass strictly before it already reaches top_p (the top one always stays).
        drop = (probs.cumsum(-1) - probs) >= cfg.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if cfg.min_p:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < cfg.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from fp32 logits [B, V] that process_logits has already shaped."""
    if cfg.greedy:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def eos_ids(model: Transformer, tokenizer: Any = None) -> list[int]:
    """Every EOS id the checkpoint declares: generation_config.json, config.json, and the tokenizer's."""
    ids: list[int] = []
    for value in (model.generation_config.get("eos_token_id"), model.config.extra.get("eos_token_id"),
                  getattr(tokenizer, "eos_token_id", None)):
        for i in [value] if isinstance(value, int) else (value or []):
            if i not in ids:
                ids.append(i)
    return ids


def seen_tokens(ids: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [B, V]: which ids occur at unmasked positions of each row (the repetition penalty's "seen").

    Counted with scatter_add, not written with scatter_: when a pad id also occurs as a real token,
    scatter_ would write True and False to one index, and on CUDA the last writer is arbitrary.
    """
    ids = ids.masked_fill(mask == 0, 0)  # pad ids need not be valid tokens; they add 0 anyway
    counts = torch.zeros(ids.shape[0], vocab_size, dtype=torch.int32, device=ids.device)
    return counts.scatter_add_(1, ids, (mask != 0).to(torch.int32)) > 0


def left_pad(
    prompts: torch.Tensor | Sequence[Sequence[int]], attention_mask: torch.Tensor | None, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, S], mask [B, S]) from a tensor (+ optional mask) or a list of token lists of any lengths."""
    if isinstance(prompts, torch.Tensor):
        ids = prompts[None] if prompts.dim() == 1 else prompts
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.reshape(ids.shape).to(ids.device)
        if mask.shape[1] and not bool(mask[:, -1].all()):
            raise GenerationError("prompts must be left-padded: attention_mask has padding at the end of a row")
        return ids.long(), mask.long()
    rows = [list(p) for p in prompts]
    width = max((len(r) for r in rows), default=0)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long).reshape(len(rows), width)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long).reshape(ids.shape)
    return ids, mask


def lay_out(attention_mask: torch.Tensor, cache_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a left-padded batch: (padding mask over the cache's slots [B, cache_len], left padding
    per row [B, 1], each prompt token's RoPE position [B, S], from 0 at the row's first real token)."""
    bsz, prompt_len = attention_mask.shape
    padding_mask = torch.ones(bsz, cache_len, dtype=torch.long, device=attention_mask.device)
    padding_mask[:, :prompt_len] = attention_mask
    pad_count = (attention_mask == 0).sum(-1, keepdim=True)
    positions = (torch.arange(prompt_len, device=attention_mask.device)[None] - pad_count).clamp(min=0)
    return padding_mask, pad_count, positions


def sampling_state(sampling: SamplingConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   vocab_size: int) -> tuple[torch.Generator | None, torch.Tensor | None, torch.Tensor | None]:
    """(the seeded generator, the repetition penalty's seen tokens [B, V], the generated-token counts
    [B, V]) a decode loop starts with; None where the sampling config does not need one."""
    device = input_ids.device
    generator = None
    if sampling.seed is not None and not sampling.greedy:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    seen = seen_tokens(input_ids, attention_mask, vocab_size) if sampling.repetition_penalty != 1.0 else None
    counts = torch.zeros(input_ids.shape[0], vocab_size, device=device) if sampling.counts_generated else None
    return generator, seen, counts


@torch.no_grad()
def decode_tokens(
    model: Transformer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig,
    eos: Sequence[int],
    pad_id: int,
    should_stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
    step_fn: Callable[..., torch.Tensor] | None = None,
    stats: GenerationStats | None = None,
    sync_every: int = 1,
    prefill_fn: Any = None,
    grammar: Any = None,
    cached: CachedPrefix | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row [B] per step; finished rows get `pad_id`.

    should_stop(tokens [B]) -> bool [B] adds stop conditions beyond EOS (stop strings).
    step_fn replaces `model` for the one-token decode step (a compiled version of it).
    prefill_fn replaces it for prompts of two tokens or more (what compile_prefill returns).
    stats, when given, is filled with the time of each phase (model time only, not the caller's).
    sync_every: check whether every row is done once per this many tokens (tokens then arrive in
    bursts); the tokens yielded are the same for any value.
    grammar: a structured.Grammar every row's output must follow (each row gets its own state; a
    row ends once its document is complete).
    cached: the conversation's CachedPrefix (batch 1, no padding): the prompt's first tokens that row
    0 of the cache already holds are not prefilled again; it records what this call writes.
    """
    bsz, prompt_len = input_ids.shape
    device = model.input_device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    total = prompt_len + max_new_tokens
    whole = bsz == 1 and bool(attention_mask.all())  # one unpadded prompt: the only kind a chat reuses
    reuse = take_cache(model, input_ids, total, cached if whole else None)
    padding_mask, pad_count, positions = lay_out(attention_mask, model.cache_len)
    has_padding = bool(pad_count.any())
    generator, seen, counts = sampling_state(sampling, input_ids, attention_mask, model.config.vocab_size)
    eos_t = torch.tensor(list(eos), dtype=torch.long, device=device)
    # Without padding an eager step needs no mask at all; a compiled step always gets one, so that
    # one graph serves padded and unpadded batches alike.
    decode_mask = padding_mask if has_padding or step_fn is not None else None
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    step = step_fn if step_fn is not None else model
    states = [grammar.state() for _ in range(bsz)] if grammar is not None else None
    clock, bursts = _Phases(stats, device), _Bursts(sync_every)

    prompt_ids = input_ids.masked_fill(attention_mask == 0, 0)  # pad slots are masked: any valid id
    logits = _prefill(model, prompt_ids, positions, padding_mask if has_padding else None, reuse, prefill_fn,
                      stats, clock)
    if cached is not None and whole:
        cached.tokens = input_ids[0].tolist()
    # The decode step's slot and positions live on the device and advance in place: a new
    # torch.tensor([pos]) per step would be a host-to-device copy, which waits for the GPU.
    slot = torch.tensor([prompt_len - 1], device=device)
    # longrope switches to its long factors once a call reaches past the original length, which
    # would leave the keys cached before with the short ones: as transformers' generate does, the
    # whole sequence is read again at that point (one long prefill), so every key has the long ones.
    refill_at = _longrope_switch(model)
    history = [prompt_ids] if refill_at is not None and prompt_len <= refill_at < total else None
    for i in range(max_new_tokens):
        # sample
        live = None if states is None else [None if d else s for s, d in zip(states, done.tolist())]
        if live is not None:
            mask_logits(logits, live)
        sampled = sample(process_logits(logits, sampling, seen, counts), sampling, generator)
        token = sampled.masked_fill(done, pad_id)
        clock.token(i)
        # stop
        if live is not None:
            done |= advance_states(live, sampled.tolist(), device)
        done |= torch.isin(token, eos_t)
        if should_stop is not None:
            done |= should_stop(token)
        ready, end = bursts.push(token, done, last=i == max_new_tokens - 1)
        yield from ready
        if end:
            return
        # feed the token back
        clock.restart()  # the caller's time between tokens is not the model's
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        if counts is not None:
            counts.scatter_add_(1, sampled[:, None], torch.ones_like(sampled[:, None], dtype=counts.dtype))
        slot += 1
        if history is not None and prompt_len + i == refill_at:
            seq = torch.cat([*history, sampled[:, None]], dim=1)
            slots = torch.arange(seq.shape[1], device=device)
            logits = model(seq, slots, position_ids=(slots[None] - pad_count).clamp(min=0),
                           padding_mask=padding_mask if has_padding else None, last_only=True,
                           validate=False)[:, -1].float()
            history = None
        else:
            if history is not None:
                history.append(sampled[:, None])
            # Finished rows keep decoding their own (ignored) samples: the pad id need not be valid.
            # validate=False: the token comes from our own logits and the slot from the cache we
            # sized. The eager model is told how many slots are written (the host knows); a compiled
            # step has static shapes and attends over all of them.
            extra = {} if step_fn is not None else {"kv_len": prompt_len + i + 1}
            logits = step(sampled[:, None], slot, position_ids=slot - pad_count, padding_mask=decode_mask,
                          validate=False, **extra)[:, -1].float()
        if cached is not None and whole:  # recorded once fed: a step cut short (Ctrl-C) is not reused
            cached.tokens.append(int(sampled[0]))


def take_cache(model: Transformer, input_ids: torch.Tensor, total: int, cached: CachedPrefix | None) -> int:
    """Size the KV cache for `total` slots and hand row 0 to `cached` (or to nobody); the prompt
    tokens row 0 already holds for it (not prefilled again)."""
    bsz = input_ids.shape[0]
    reuse = cached.usable(model, input_ids[0].tolist()) if cached is not None else 0
    cache = model.kv_cache
    # Grow the cache when needed, never shrink it: a compiled step is guarded on the cache tensors
    # themselves, so new buffers would cost a recompile. model.clear_cache() frees it.
    if cache is None or cache.max_seq_len < total or cache.k.shape[0] < bsz:
        _grow_cache(model, bsz, total, reuse)
    # Whose tokens row 0 holds from now on: this conversation's, or nobody's that can reuse them.
    model.__dict__["_cache_holder"] = cached
    if cached is not None:
        # The prompt's tokens count as held once its prefill is done (a prefill cut short holds part).
        cached.tokens, cached.reused = input_ids[0].tolist()[:reuse], reuse
        cached._keys = weakref.ref(model.kv_cache.k)
    return reuse


def _prefill(model: Transformer, prompt_ids: torch.Tensor, positions: torch.Tensor, padding_mask: torch.Tensor | None,
             reuse: int, prefill_fn: Any, stats: GenerationStats | None, clock: _Phases) -> torch.Tensor:
    """The prompt's forward from slot `reuse` on (compiled when given and worth it): fp32 logits [B, V]."""
    prompt_len = prompt_ids.shape[1]
    slots = torch.arange(prompt_len, device=prompt_ids.device)
    # A prompt whose start is cached prefills the rest eagerly (a few tokens: a chat's new turn).
    if prefill_fn is not None and prompt_len >= 2 and not reuse:
        # One compiled graph serves padded and unpadded batches, so it always gets the mask.
        mask = padding_mask if padding_mask is not None else torch.ones(
            prompt_ids.shape[0], model.cache_len, dtype=torch.long, device=prompt_ids.device)
        compile_start = _clock(prompt_ids.device)
        prefill_fn.prepare(prompt_ids, slots, positions, mask)
        if stats is not None:
            stats.prefill_compile_s += _clock(prompt_ids.device) - compile_start
            stats.prompt_tokens, stats.reused_tokens = prompt_len, 0
        clock.restart()
        return prefill_fn(prompt_ids, slots, position_ids=positions, padding_mask=mask)[:, -1].float()
    if stats is not None:
        stats.prompt_tokens, stats.reused_tokens = prompt_len - reuse, reuse
    clock.restart()
    # validate=False: generate_tokens checked the prompt's ids, and the cache was sized for it.
    return model(prompt_ids[:, reuse:], slots[reuse:], position_ids=positions[:, reuse:], padding_mask=padding_mask,
                 last_only=True, validate=False)[:, -1].float()


class _Phases:
    """Fills GenerationStats as a decode loop runs: the prefill (up to the first token), the first
    decode step (compilation, warm-up) and the steady steps, each apart; nothing without stats."""

    def __init__(self, stats: GenerationStats | None, device: torch.device) -> None:
        self.stats, self.device, self.start = stats, device, 0.0

    def restart(self) -> None:
        if self.stats is not None:
            self.start = _clock(self.device)

    def token(self, i: int) -> None:
        """Token i was sampled: its time goes to prefill (i == 0), warm-up (1) or decode."""
        if self.stats is not None:
            phase = "prefill_s" if i == 0 else "warmup_s" if i == 1 else "decode_s"
            setattr(self.stats, phase, getattr(self.stats, phase) + _clock(self.device) - self.start)
            self.stats.new_tokens = i + 1


class _Bursts:
    """Reads back "every row done" once per `every` tokens (one host sync on a GPU), and releases the
    tokens up to the step where they all were: the output ends exactly where a check after every
    token would have ended it; the extra steps only cost compute."""

    def __init__(self, every: int) -> None:
        self.every, self.held = every, []

    def push(self, token: torch.Tensor, done: torch.Tensor, last: bool) -> tuple[list[torch.Tensor], bool]:
        """(tokens to yield now, whether generation ends after them)."""
        if self.every == 1:
            return [token], last or bool(done.all())
        self.held.append((token, done.all()))
        if not last and len(self.held) < self.every:
            return [], False
        flags = torch.stack([flag for _, flag in self.held]).tolist()
        ready = []
        for (held, _), all_done in zip(self.held, flags):
            ready.append(held)
            if all_done:
                return ready, True
        self.held = []
        return ready, last


def _longrope_switch(model: Transformer) -> int | None:
    """The slot at which a longrope model reads its sequence again (its original length), else None."""
    rope = model.config.rope
    return rope.original_max_position_embeddings if rope.rope_type == "longrope" else None


def check_count(value: Any, name: str, least: int = 1) -> int:
    """`value` when it is an integer >= least, else GenerationError naming it (a bool is no count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise GenerationError(f"{name} must be an integer >= {least}, got {value!r}")
    return value


def check_logit_bias(sampling: SamplingConfig, vocab_size: int) -> None:
    """GenerationError for a logit_bias key outside the vocabulary."""
    bad = [t for t in sampling.logit_bias or {} if t >= vocab_size]
    if bad:
        raise GenerationError(f"logit_bias: {bad[0]} is not a token id (the vocabulary has {vocab_size})")


def generate_tokens(
    model: Transformer,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: dict[int, float] | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    stop: Sequence[str] | None = None,
    json_schema: dict | str | bool | None = None,
    cached: CachedPrefix | None = None,
    speculative: Any = None,
    tokenizer: Any = None,
    step_fn: Callable[..., torch.Tensor] | None = None,
    compile: bool | str = False,
    stats: GenerationStats | None = None,
    sync_every: int | None = None,
) -> tuple[torch.Tensor, Iterator[torch.Tensor]]:
    """Validate everything, then return (left-padded prompt ids [B, S], iterator of new tokens [B]).

    The options are generate()'s; settings that cannot work raise GenerationError here, before
    any compute.
    """
    sampling = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty, seed, presence_penalty,
                              frequency_penalty, logit_bias)
    check_logit_bias(sampling, model.config.vocab_size)
    check_count(max_new_tokens, "max_new_tokens")
    if eos_token_id is None:
        eos = eos_ids(model, tokenizer)
    else:
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if pad_token_id is None:
        pad_token_id = model.generation_config.get("pad_token_id", model.config.extra.get("pad_token_id"))
        if not isinstance(pad_token_id, int):
            pad_token_id = eos[0] if eos else 0
    ids, mask = left_pad(input_ids, attention_mask, pad_token_id)
    if ids.numel() == 0 or bool((mask.sum(-1) == 0).any()):
        raise GenerationError("empty prompt: every row needs at least one token")
    context = model.config.max_position_embeddings
    if ids.shape[1] >= context:
        raise GenerationError(f"prompt has {ids.shape[1]} tokens; the model's context is {context} "
                              "(max_position_embeddings), leaving no room to generate")
    check_token_ids(ids.masked_fill(mask == 0, 0), model.config.vocab_size, "prompt")
    stop = check_stop_strings(stop or [])
    if stop and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer: pass tokenizer=...")
    should_stop = StopStrings(tokenizer, stop, ids.shape[0]) if stop else None
    grammar = None
    if json_schema is not None:
        if tokenizer is None:
            raise GenerationError("json_schema needs a tokenizer: pass tokenizer=...")
        from .structured import Grammar

        grammar = Grammar(json_schema, tokenizer, model.config.vocab_size, eos)
    parts = compile_parts(compile, model.input_device)
    if speculative is not None:
        from .speculative import check_speculative

        check_speculative(speculative, grammar=grammar, cached=cached, model=model)
    if "decode" in parts and step_fn is None:
        step_fn = compiled(model, "decode")
    prefill_fn = compiled(model, "prefill") if "prefill" in parts else None
    if sync_every is None:
        # On a GPU a host read per token stalls the queue of kernels; on a CPU it costs nothing.
        # Stop strings are checked on the host text every token anyway.
        # A grammar's mask is computed on the host from the token before, so it reads every one too.
        sync_every = 1 if stop or grammar or model.input_device.type == "cpu" else SYNC_EVERY_GPU
    check_count(sync_every, "sync_every")
    # Never run past the context the model was trained for.
    max_new_tokens = min(max_new_tokens, context - ids.shape[1])
    if speculative is not None:
        from .speculative import speculative_tokens

        tokens = speculative_tokens(model, ids, mask, max_new_tokens, sampling, eos, pad_token_id, speculative,
                                    should_stop, stats, parts)
        return ids, tokens
    tokens = decode_tokens(model, ids, mask, max_new_tokens, sampling, eos, pad_token_id, should_stop, step_fn,
                           stats, sync_every, prefill_fn, grammar, cached)
    return ids, tokens


def generate(
    model: Transformer, input_ids: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int, **options: Any
) -> torch.Tensor:
    """Prompt ids followed by up to `max_new_tokens` new ones, like transformers' `generate`.

    input_ids: [S], [B, S] (left-padded, with `attention_mask`) or a list of token lists of any
    lengths. Options (see generate_tokens): temperature (0: greedy), top_k, top_p, min_p,
    repetition_penalty, presence_penalty and frequency_penalty (OpenAI's), logit_bias ({id: bias}),
    seed, eos_token_id (None: every EOS id of the checkpoint; []: never stop early), attention_mask,
    pad_token_id (fills rows that finished early), stop (strings; needs tokenizer), json_schema (a
    JSON schema as a dict or JSON text, or True for any JSON object: every row's output follows it,
    enforced token by token; needs tokenizer), cached (a CachedPrefix shared by a conversation's
    calls: the prompt's cached start is not prefilled again), speculative (speculative.PromptLookup(...)
    or DraftModel(draft, k): several tokens checked per forward, the same output), tokenizer, compile (True: the decode step, and on a
    GPU the prefill too; "decode"; "all": both; compiled code is cached on the model), step_fn
    (a decode step of your own), stats (a GenerationStats to fill with per-phase timings),
    sync_every (tokens between host checks for "all rows done"; default 1 on a CPU, 16 on a GPU).
    """
    ids, tokens = generate_tokens(model, input_ids, max_new_tokens, **options)
    new = list(tokens)
    return torch.cat([ids.to(new[0].device), torch.stack(new, dim=1)], dim=1)


def stream(
    model: Transformer, tokenizer: Any, input_ids: torch.Tensor | Sequence[int], max_new_tokens: int,
    **options: Any,
) -> Iterator[str]:
    """Yield one prompt's new text piece by piece as it is generated (options as in generate)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2 and input_ids.shape[0] != 1:
            raise GenerationError("stream() takes one prompt; use generate() for batches")
    else:
        input_ids = [list(input_ids)]
    # Every piece is read back as it comes: bursts of tokens would only delay the text.
    _, tokens = generate_tokens(model, input_ids, max_new_tokens, tokenizer=tokenizer,
                                **{"sync_every": 1, **options})
    text = IncrementalDecoder(tokenizer)
    for token in tokens:
        piece = text.push(int(token[0]))
        if piece:
            yield piece
