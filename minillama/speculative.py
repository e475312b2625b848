"""Speculative decoding: propose several tokens cheaply, check them all in one forward of the model.

A decode step at small batch is bound by reading the weights, so scoring k + 1 positions costs
about what one does. Each round a proposer guesses up to k next tokens per row; the target model
runs once over [last token, guesses] at the row's own cache slots; `accept` keeps the longest run
of guesses the target agrees with and adds one token of its own (the correction, or a bonus when
every guess stood). Greedy output is the plain greedy output; sampled output follows the target's
distribution exactly (speculative sampling: Leviathan et al. 2023, Chen et al. 2023), with the
proposer's own distribution q (one-hot for prompt lookup).

Rows accept different numbers of tokens, so they sit at different slots, which the model supports
(continuous batching's per-row `input_pos`). A rejected guess leaves keys at slots past the row's
end: the causal mask hides them and the next round overwrites them; nothing is copied back.

Compiled (generate(compile=...)), the verify forward is one static-shape graph: every round feeds
the same width (1 + the proposer's most guesses, short rows padded; a padded position's key lands
past the row's end like a rejected guess's), and a round with no guess at batch 1 is a plain
compiled decode step.

Proposers: `PromptLookup` (n-grams of the text so far, transformers' prompt-lookup decoding) and
`DraftModel` (a smaller model with the same vocabulary and its own static cache, kept in step with
the target by slot).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from .compiled import compiled
from .errors import GenerationError
from .generate import GenerationStats, SamplingConfig, lay_out, process_logits, sampling_state, take_cache
from .model import Transformer


@dataclass
class PromptLookup:
    """Guess the tokens that followed the latest earlier occurrence of the row's last n tokens (n from
    `ngram` down to 1), up to `tokens` of them. Backs off per row: a round whose guesses all fail
    halves the row's guess length (down to none, retried after `retry` plain steps), a round that
    keeps them all doubles it back."""

    tokens: int = 10
    ngram: int = 3
    retry: int = 8

    def __post_init__(self) -> None:
        for name in ("tokens", "ngram"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GenerationError(f"prompt lookup: {name} must be an integer >= 1, got {value!r}")

    def start(self, model: Transformer, rows: int, prompt: torch.Tensor, mask: torch.Tensor, cache_len: int) -> None:
        self.limit = [self.tokens] * rows
        self.idle = [0] * rows
        self.pads = (mask == 0).sum(-1).tolist()  # left padding: never part of a match
        self.where: list[dict[int, list[int]]] = [{} for _ in range(rows)]  # token -> positions
        self.indexed = [0] * rows  # tokens of each row's text already in `where`

    def propose(self, seqs: list[list[int]], room: list[int], sampling: SamplingConfig,
                generator: torch.Generator | None) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        out = []
        for i, seq in enumerate(seqs):
            k = min(self.limit[i], room[i])
            if self.limit[i] == 0:
                self.idle[i] += 1
                if self.idle[i] >= self.retry:
                    self.limit[i], self.idle[i] = 1, 0
            text = seq[self.pads[i]:]
            for pos in range(self.indexed[i], len(text)):
                self.where[i].setdefault(text[pos], []).append(pos)
            self.indexed[i] = len(text)
            out.append(_lookup(text, self.where[i], self.ngram, k) if k > 0 else [])
        return out, [None] * len(seqs)

    def update(self, proposed: list[list[int]], accepted: list[int], seqs: list[list[int]]) -> None:
        for i, (p, a) in enumerate(zip(proposed, accepted)):
            if p and a == 0:
                self.limit[i] //= 2
            elif p and a == len(p):
                self.limit[i] = min(self.tokens, max(1, self.limit[i] * 2))


def _lookup(seq: list[int], where: dict[int, list[int]], ngram: int, k: int) -> list[int]:
    """The k tokens after the latest earlier occurrence of seq's last n tokens (the longest n that
    occurs), or []. where: token -> its positions in seq, ascending (so only candidates are tried)."""
    last = seq[-1]
    candidates = [p for p in reversed(where.get(last, [])) if p < len(seq) - 1]
    for n in range(min(ngram, len(seq) - 1), 0, -1):
        tail = seq[-n:]
        for end in candidates:  # an earlier occurrence ending at `end`
            if end - n + 1 >= 0 and seq[end - n + 1:end + 1] == tail:
                return seq[end + 1:end + 1 + k]
    return []


# Catch-ups of up to this many tokens run as compiled one-token steps (a compiled draft step costs
# ~15 ms against ~38 ms for an eager forward of SmolLM2's int8 copy); the prompt's runs eagerly.
COMPILED_CATCH_UP = 4


@dataclass
class DraftModel:
    """A smaller model with the target's vocabulary guesses `tokens` tokens a round, one forward each.

    Its cache is kept in step with the target's by slot: after a round it holds the row's tokens up
    to the last guess the target kept; what follows is rewritten the next round.

    compile: the draft's one-token steps through its compiled decode step (compiled.py: on a CPU an
    AOTInductor library cached on disk), at batch 1. A small draft is bound by per-op overhead, not
    by reading its weights, so eagerly it is barely faster than its target; compiled, several times.
    (Batched rows sit at different slots, which the compiled step's one shared slot cannot express:
    they take the eager step. The target's verify forward is always eager.)"""

    model: Transformer
    tokens: int = 4
    compile: bool = False
    _valid: list[int] = field(default_factory=list)  # per row: cache slots holding the row's tokens
    _step: Any = None  # the compiled one-token step, when it applies

    def __post_init__(self) -> None:
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise GenerationError(f"draft tokens must be an integer >= 1, got {self.tokens!r}")
        if not isinstance(self.compile, bool):
            raise GenerationError(f"DraftModel(compile=...) is True or False, got {self.compile!r}")

    def start(self, model: Transformer, rows: int, prompt: torch.Tensor, mask: torch.Tensor, cache_len: int) -> None:
        if self.model is model:
            raise GenerationError("the draft is the target model itself: load a second copy (each keeps its own cache)")
        if self.model.config.vocab_size != model.config.vocab_size:
            raise GenerationError(f"the draft model's vocabulary ({self.model.config.vocab_size}) is not the "
                                  f"target's ({model.config.vocab_size}): they must share a tokenizer")
        if self.model.input_device != model.input_device:
            raise GenerationError(f"the draft model is on {self.model.input_device}, the target on "
                                  f"{model.input_device}")
        self.model.setup_cache(rows, cache_len)
        self.padding_mask, self.pad_count, _ = lay_out(mask, cache_len)
        self.has_padding = bool(self.pad_count.any())
        self._valid = [0] * rows  # the prompt is fed in the first round's catch-up
        self._step = compiled(self.model, "decode") if self.compile and rows == 1 else None

    def propose(self, seqs: list[list[int]], room: list[int], sampling: SamplingConfig,
                generator: torch.Generator | None) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        device = self.model.input_device
        rows = len(seqs)
        k = min(self.tokens, max(room))
        if k <= 0:
            return [[] for _ in seqs], [None] * rows
        # Catch up: feed every row its tokens the cache lacks, as one [rows, m] forward. Rows that lack
        # fewer feed some tokens they hold again (same token, same slot: the same keys and values).
        m = max(len(s) - v for s, v in zip(seqs, self._valid))
        ids = torch.tensor([s[len(s) - m:] for s in seqs], device=device)
        slots = torch.tensor([[len(s) - m + j for j in range(m)] for s in seqs], device=device)
        logits = self._forward(ids, slots)
        guesses: list[list[int]] = [[] for _ in range(rows)]
        dists: list[list[torch.Tensor]] = [[] for _ in range(rows)]
        for step in range(k):
            shaped = process_logits(logits[:, -1].float(), sampling, None)
            if sampling.greedy:
                chosen = shaped.argmax(-1)
                probs = None
            else:
                probs = shaped.softmax(-1)
                chosen = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            for i, t in enumerate(chosen.tolist()):
                guesses[i].append(t)
                if probs is not None:
                    dists[i].append(probs[i])
            if step + 1 < k:
                logits = self._forward(chosen[:, None], torch.tensor([[len(s) + step] for s in seqs], device=device))
        for i, s in enumerate(seqs):
            self._valid[i] = len(s) + k - 1  # the last guess was never fed
        cut = [g[:max(0, r)] for g, r in zip(guesses, room)]
        return cut, [torch.stack(d[:len(c)]) if d and c else None for d, c in zip(dists, cut)]

    def update(self, proposed: list[list[int]], accepted: list[int], seqs: list[list[int]]) -> None:
        # `seqs` is each row before this round: its guesses past the accepted ones are stale now.
        for i, (s, a) in enumerate(zip(seqs, accepted)):
            self._valid[i] = min(self._valid[i], len(s) + a)

    def _forward(self, ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        if self._step is not None and ids.shape[1] <= COMPILED_CATCH_UP:
            # A short catch-up (the last guess and the target's own token) as compiled steps too: two
            # of them cost less than one eager forward. generate's calling convention for the step.
            for j in range(ids.shape[1]):
                slot = slots[:, j]
                logits = self._step(ids[:, j:j + 1], slot, position_ids=slot - self.pad_count,
                                    padding_mask=self.padding_mask, validate=False)
            return logits
        return self.model(ids, slots, position_ids=(slots - self.pad_count).clamp(min=0), validate=False,
                          padding_mask=self.padding_mask if self.has_padding else None, kv_len=int(slots.max()) + 1)


Proposer = PromptLookup | DraftModel


def accept(logits: torch.Tensor, guesses: list[int], q: torch.Tensor | None, sampling: SamplingConfig,
           generator: torch.Generator | None, shape: Callable[[torch.Tensor, list[int]], torch.Tensor]
           ) -> list[int]:
    """The tokens one row keeps from a verify forward: the accepted guesses, then one of the target's.

    logits [len(guesses) + 1, V]: the target's fp32 logits after the row's last token and after each
    guess. q [len(guesses), V]: the distribution each guess was drawn from (None: chosen for sure,
    as prompt lookup's are). shape(logits [1, V], tokens so far this round) -> processed logits.
    """
    kept: list[int] = []
    for j in range(len(guesses) + 1):
        target = shape(logits[j:j + 1], kept)
        if sampling.greedy:
            token = int(target.argmax(-1))
            if j < len(guesses) and token == guesses[j]:
                kept.append(token)
                continue
            kept.append(token)
            return kept
        p = target.softmax(-1)[0]
        if j == len(guesses):  # every guess stood: a bonus token from the target itself
            kept.append(int(torch.multinomial(p, 1, generator=generator)))
            return kept
        x = guesses[j]
        qx = 1.0 if q is None else float(q[j, x])
        u = float(torch.rand((), generator=generator, device=p.device))
        if u * qx < float(p[x]):  # accept with probability min(1, p(x) / q(x))
            kept.append(x)
            continue
        # rejected: sample from the residual max(p - q, 0), renormalised
        residual = p.clone()
        if q is None:
            residual[x] = 0.0
        else:
            residual = (p - q[j]).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: any sample from p is exact
            residual = p
        kept.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return kept
    return kept


@torch.no_grad()
def speculative_tokens(
    model: Transformer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig,
    eos: Sequence[int],
    pad_id: int,
    proposer: Proposer,
    should_stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stats: GenerationStats | None = None,
    compile_parts: Sequence[str] = (),
) -> Iterator[torch.Tensor]:
    """decode_tokens with speculation: the same tokens [B] per position, several positions a forward.
    compile_parts: what generate(compile=...) compiles ("decode": the verify step and the one-token
    step; "prefill": the prompt's forward)."""
    bsz, prompt_len = input_ids.shape
    device = model.input_device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    # room for every row's last round to write a guess-wide run past its end; no conversation holds
    # row 0 afterwards (a chat's cached prefix is overwritten)
    take_cache(model, input_ids, prompt_len + max_new_tokens + 1 + proposer.tokens, None)
    cache_len = model.cache_len
    padding_mask, pad_count, positions = lay_out(attention_mask, cache_len)
    has_padding = bool(pad_count.any())
    generator, seen, counts = sampling_state(sampling, input_ids, attention_mask, model.config.vocab_size)
    proposer.start(model, bsz, input_ids, attention_mask, cache_len)
    eos_set = set(eos)

    # Prompt lookup backs off to guess-free rounds; a draft always guesses (unless at the very end).
    verify = _Verify(model, bsz, proposer.tokens + 1, padding_mask, has_padding, "decode" in compile_parts,
                     one_token=isinstance(proposer, PromptLookup))
    prompt_ids = input_ids.masked_fill(attention_mask == 0, 0)
    if "prefill" in compile_parts and prompt_len >= 2:
        prefill = compiled(model, "prefill")
        prefill.prepare(prompt_ids, torch.arange(prompt_len, device=device), positions, padding_mask)
    else:
        prefill = None
    start = time.perf_counter()
    verify.prepare()  # compiles (or loads) here: not the prefill's time, nor the decode's
    if stats is not None:
        stats.warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    if prefill is not None:
        logits = prefill(prompt_ids, torch.arange(prompt_len, device=device), position_ids=positions,
                         padding_mask=padding_mask)[:, -1].float()
    else:
        logits = model(prompt_ids, torch.arange(prompt_len, device=device), position_ids=positions,
                       padding_mask=padding_mask if has_padding else None, last_only=True,
                       validate=False)[:, -1].float()
    # Each row's tokens in slot order (left padding included, as the cache holds them).
    seqs = [row for row in prompt_ids.tolist()]
    pending: list[list[int]] = [[] for _ in range(bsz)]  # accepted, not yet yielded
    generated = [0] * bsz  # accepted so far per row (yielded or pending)
    finished = [False] * bsz
    yielded = 0

    def shape(row: int) -> Callable[[torch.Tensor, list[int]], torch.Tensor]:
        """process_logits for `row` with this round's kept tokens counted as generated."""
        def run(one: torch.Tensor, kept: list[int]) -> torch.Tensor:
            row_seen = None if seen is None else seen[row:row + 1].clone()
            row_counts = None if counts is None else counts[row:row + 1].clone()
            for t in kept:
                if row_seen is not None:
                    row_seen[0, t] = True
                if row_counts is not None:
                    row_counts[0, t] += 1
            return process_logits(one, sampling, row_seen, row_counts)
        return run

    first = [accept(logits[i:i + 1], [], None, sampling, generator, shape(i)) for i in range(bsz)]
    if stats is not None:
        stats.prompt_tokens, stats.prefill_s = prompt_len, time.perf_counter() - start
    round_start = time.perf_counter()
    new_round = first
    while True:
        for i, kept in enumerate(new_round):
            if finished[i]:
                continue
            kept = new_round[i] = kept[:max_new_tokens - generated[i]]
            pending[i] += kept
            generated[i] += len(kept)
            for t in kept:
                if seen is not None:
                    seen[i, t] = True
                if counts is not None:
                    counts[i, t] += 1
        if stats is not None:
            stats.decode_s += time.perf_counter() - round_start
        # Yield every position that each unfinished row has reached.
        while all(finished[i] or pending[i] for i in range(bsz)):
            token = torch.tensor([pad_id if finished[i] else pending[i].pop(0) for i in range(bsz)], device=device)
            for i, t in enumerate(token.tolist()):
                if not finished[i] and t in eos_set:
                    finished[i] = True
            if should_stop is not None:
                for i, stop in enumerate(should_stop(token).tolist()):
                    finished[i] = finished[i] or stop
            yielded += 1
            if stats is not None:
                stats.new_tokens = yielded
            yield token
            for i in range(bsz):
                if finished[i]:
                    pending[i].clear()
            if yielded == max_new_tokens or all(finished):
                return
        round_start = time.perf_counter()
        # Every row's sequence gains its new tokens; the target's cache holds all but the newest.
        for i in range(bsz):
            seqs[i] += new_round[i] if not finished[i] else []
        live = [not f and generated[i] < max_new_tokens for i, f in enumerate(finished)]
        room = [max_new_tokens - generated[i] - 1 if live[i] else 0 for i in range(bsz)]
        guesses, dists = proposer.propose(seqs, room, sampling, generator)
        guesses = [g if live[i] else [] for i, g in enumerate(guesses)]
        out = verify(seqs, guesses, pad_count)
        new_round = []
        for i in range(bsz):
            if not live[i]:
                new_round.append([])
                continue
            kept = accept(out[i, :len(guesses[i]) + 1], guesses[i], dists[i], sampling, generator, shape(i))
            new_round.append(kept)
        accepted = [max(0, len(k) - 1) for k in new_round]
        proposer.update(guesses, accepted, seqs)
        if stats is not None:
            stats.proposed += sum(len(g) for g in guesses)
            stats.accepted += sum(a for a, ok in zip(accepted, live) if ok)
            stats.target_forwards += 1


class _Verify:
    """The target's forward over each row's [last token, guesses] at the row's own slots: fp32
    logits [rows, width, V]. Eager, as wide as the round's most guesses; compiled, always `width`
    wide (static shapes), and (one_token) a guess-free round at batch 1 the compiled one-token step."""

    def __init__(self, model: Transformer, rows: int, width: int, padding_mask: torch.Tensor,
                 has_padding: bool, compile: bool, one_token: bool) -> None:
        self.model, self.rows, self.width = model, rows, width
        self.padding_mask, self.has_padding = padding_mask, has_padding
        self.wide = compiled(model, "verify") if compile else None
        self.step = compiled(model, "decode") if compile and one_token and rows == 1 else None

    def prepare(self) -> None:
        """Compile (or load) the compiled steps for this batch and cache now, by shapes alone."""
        device = self.model.input_device
        for fn, w in ((self.wide, self.width), (self.step, 1)):
            if fn is not None and hasattr(fn, "prepare"):
                slots = torch.zeros(w, dtype=torch.long, device=device)
                fn.prepare(torch.zeros(self.rows, w, dtype=torch.long, device=device),
                           slots if self.rows == 1 or w == 1 else slots.expand(self.rows, w).contiguous(),
                           torch.zeros(self.rows, w, dtype=torch.long, device=device), self.padding_mask)

    def __call__(self, seqs: list[list[int]], guesses: list[list[int]], pad_count: torch.Tensor) -> torch.Tensor:
        device = self.model.input_device
        most = max(len(g) for g in guesses)
        w = 1 + most if self.wide is None or (most == 0 and self.step is not None) else self.width
        ids = torch.tensor([[s[-1]] + g + [0] * (w - 1 - len(g)) for s, g in zip(seqs, guesses)], device=device)
        slots = torch.tensor([[len(s) - 1 + j for j in range(w)] for s in seqs], device=device)
        # One row: its slots as [w], the call plain decoding makes when there is no guess (the same
        # attention path, so the same rounding); rows at different slots need [rows, w].
        row_slots = slots[0] if self.rows == 1 else slots
        if self.wide is None:
            return self.model(ids, row_slots, position_ids=slots - pad_count, validate=False,
                              padding_mask=self.padding_mask if self.has_padding else None,
                              kv_len=int(slots.max()) + 1).float()
        fn = self.step if w == 1 else self.wide
        return fn(ids, row_slots, position_ids=slots - pad_count, padding_mask=self.padding_mask,
                  validate=False).float()


def check_speculative(proposer: Any, *, grammar: Any, cached: Any, model: Transformer) -> None:
    """GenerationError for what speculation does not combine with yet."""
    if not isinstance(proposer, (PromptLookup, DraftModel)):
        raise GenerationError(f"speculative must be PromptLookup(...) or DraftModel(...), got {proposer!r}")
    if grammar is not None:
        raise GenerationError("speculative decoding does not combine with json_schema yet")
    if cached is not None:
        raise GenerationError("speculative decoding does not combine with a cached conversation (cached=) yet")
    if model.config.rope.rope_type == "longrope":
        raise GenerationError("speculative decoding does not support longrope models yet")
