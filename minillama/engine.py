"""Continuous batching: many requests share one model and one static KV cache, a row each.

The cache has `max_batch` rows. A request waits in a bounded queue until a row is free, is
prefilled into that row on its own (its prompt written from slot 0, `prefill_chunk` tokens per
step, so a long prompt never stalls the others for long), and then joins the decode step, which
advances every running row by one token in a single forward pass: rows sit at different slots,
so the step passes each row's own position (model.forward's [batch, 1] `input_pos`) and
attention masks every row to its own length. Newcomers are admitted at every step, so a long
answer never holds up a short one, and a finished or cancelled request frees its row at once.

Log-probabilities (the OpenAI API's `logprobs`) are the model's own: a log-softmax in fp32 of the
raw logits, before temperature, penalties or truncation change them (vLLM's default). A request
that asks for them gets, per sampled token, its logprob and the `logprobs` most likely tokens; one
with `echo` also gets them for every prompt token, computed chunk by chunk during its prefill
(`LOGPROB_CHUNK` positions projected to the vocabulary at a time, never [prompt, vocab] whole).

Prefix reuse: a finished request's row keeps the keys and values it wrote (`resting`: the tokens
they belong to) until a newcomer needs the row. A newcomer takes the free row whose resting tokens
share the longest prefix with its prompt (at least `MIN_PREFIX` tokens) and prefills only the rest,
so a chat client that resends the conversation every turn, or requests behind one system prompt,
prefill their new tokens only; without such a row it takes the free row holding the least. The
unit is the row (llama.cpp's slot cache): a paged cache would hash blocks of tokens instead (vLLM)
or keep a radix tree of them (SGLang), sharing one prefix between rows without copies; the choice
of row (`_pick_row`) is where such a cache would plug in.

Sampling is generate.py's (SamplingConfig, process_logits, sample) and stopping stopping.py's
(a RowStop per request: EOS, stop strings, its grammar, max_tokens), so a request decodes and
ends as it would alone; the grammar masks of a step's structured rows are computed together.
The engine runs on one thread (`start`); `submit` and `cancel` may be called from any other.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .errors import GenerationError
from .generate import (SamplingConfig, check_count, check_logit_bias, common_prefix, eos_ids, process_logits,
                       sample, seen_tokens)
from .model import Transformer, check_token_ids
from .stopping import RowStop, check_stop_strings
from .structured import Grammar, GrammarState, mask_logits

log = logging.getLogger("minillama.engine")

MIN_PREFIX = 4  # shared tokens below which a resting row is not worth reusing
LOGPROB_CHUNK = 128  # prompt positions whose log-softmax is taken at once (fp32 [128, vocab])
MAX_LOGPROBS = 20  # most alternatives a request may ask for per token (OpenAI's and vLLM's bound)


@dataclass
class TokenLogprob:
    """One token's log-probability and the most likely alternatives at its position (None for the
    first prompt token, which nothing predicts)."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] | None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[TokenLogprob]:
    """TokenLogprob of targets [n] under logits [n, vocab] (raw, any dtype): fp32 log-softmax, top k."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, targets[:, None])[:, 0].tolist()
    if k:
        values, ids = lp.topk(k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [TokenLogprob(t, c, top) for t, c, top in zip(targets.tolist(), chosen, tops)]


class QueueFull(GenerationError):
    """Every row is busy and the waiting queue is at its bound."""


@dataclass
class Event:
    """What a request hands its consumer: new text, and once, why it ended."""

    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the tokens sampled since the last event


@dataclass(eq=False)
class Request:
    """One completion: prompt ids, how many tokens at most, how to sample and when to stop.

    `on_event` is called on the engine's thread; it must not block (hand the event to your own
    loop). Counters and timestamps are filled in as the request runs.
    """

    prompt: list[int]
    max_tokens: int
    sampling: SamplingConfig
    stop: Sequence[str] = ()
    ignore_eos: bool = False  # run to max_tokens (benchmarks)
    logprobs: int | None = None  # None: no logprobs; K: each token's logprob and the K likeliest (0..20)
    echo: bool = False  # also every prompt token's logprob (needs logprobs); max_tokens may then be 0
    grammar: Grammar | None = None  # structured output: the output follows this compiled JSON schema
    on_event: Callable[[Event], None] = lambda event: None
    id: int = field(default_factory=itertools.count().__next__)
    tokens: list[int] = field(default_factory=list)  # generated ids, the end-of-sequence id excluded
    finish_reason: str | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None  # when the first token was sampled (time to first token)
    finished: float | None = None
    cancelled: bool = False
    # per-request sampling state, set at prefill
    _stop: RowStop | None = None  # when it ends (EOS, stop strings, its grammar, max_tokens), and its text
    _generator: torch.Generator | None = None
    _seen: torch.Tensor | None = None
    _counts: torch.Tensor | None = None  # [1, V] generated-token counts (presence/frequency penalties)
    _grammar: GrammarState | None = None  # where the output is in `grammar`
    _last: int = 0  # the token the next decode step feeds
    _filled: int = 0  # prompt tokens already in the cache (a long prompt is prefilled in chunks)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # with echo: complete before any event
    sampled_logprobs: list[TokenLogprob] = field(default_factory=list)  # with logprobs: each sampled token's
    _pending: list[TokenLogprob] = field(default_factory=list)  # sampled tokens' logprobs not yet emitted
    reused: int = 0  # prompt tokens whose keys and values a resting row already held (prefix reuse)
    _written: int = 0  # cache slots of its row that hold this request's tokens (prompt, then fed tokens)


def check_settings(max_batch: int, max_queue: int, max_seq_len: int | None, prefill_chunk: int) -> None:
    """GenerationError naming the first engine setting out of range (the CLI calls it before loading)."""
    check_count(max_batch, "max_batch")
    check_count(max_queue, "max_queue", least=0)
    check_count(prefill_chunk, "prefill_chunk")
    if max_seq_len is not None:
        check_count(max_seq_len, "max_seq_len", least=2)


class Engine:
    """The scheduler: a bounded queue of requests, `max_batch` cache rows, one decode step for all."""

    def __init__(self, model: Transformer, tokenizer: Any, *, max_batch: int = 8, max_queue: int = 64,
                 max_seq_len: int | None = None, prefill_chunk: int = 512, prefix_reuse: bool = True) -> None:
        check_settings(max_batch, max_queue, max_seq_len, prefill_chunk)
        self.prefill_chunk = prefill_chunk
        context = model.config.max_position_embeddings
        self.cache_len = min(max_seq_len or context, context)
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.eos = set(eos_ids(model, tokenizer))
        self.device = model.input_device
        model.setup_cache(max_batch, self.cache_len)
        self.rows: list[Request | None] = [None] * max_batch
        self.prefix_reuse = prefix_reuse
        self.resting: list[list[int]] = [[] for _ in range(max_batch)]  # tokens whose KV a free row holds
        self.prefix_hits = self.reused_tokens = 0
        self.queue: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- called from any thread -------------------------------------------------------------
    def check(self, prompt: Sequence[int], max_tokens: int | None, echo: bool = False) -> int:
        """GenerationError unless the prompt and max_tokens fit a cache row; the max_tokens to use
        (None: as many as the row leaves). With echo (score the prompt), max_tokens may be 0."""
        if not prompt:
            raise GenerationError("empty prompt: it needs at least one token")
        check_token_ids(torch.tensor(list(prompt)), self.model.config.vocab_size, "prompt")
        room = self.cache_len - len(prompt)
        if echo and max_tokens == 0 and room >= 0:
            return 0
        if room < 1:
            raise GenerationError(f"the prompt has {len(prompt)} tokens; this server's context is {self.cache_len} "
                                  "tokens, leaving no room to generate")
        if max_tokens is None:
            return room
        if check_count(max_tokens, "max_tokens") > room:
            raise GenerationError(f"the context is {self.cache_len} tokens; the prompt has {len(prompt)} and "
                                  f"max_tokens asks for {max_tokens} more (at most {room})")
        return max_tokens

    def submit(self, request: Request) -> None:
        """Queue a request (checked with `check` first); QueueFull when the queue is at its bound."""
        if request.logprobs is not None:
            check_count(request.logprobs, "logprobs", least=0)
            if request.logprobs > MAX_LOGPROBS:
                raise GenerationError(f"logprobs must be at most {MAX_LOGPROBS}, got {request.logprobs}")
        elif request.echo:
            raise GenerationError("echo needs logprobs (the prompt's log-probabilities are what it returns)")
        request.max_tokens = self.check(request.prompt, request.max_tokens, request.echo)
        check_logit_bias(request.sampling, self.model.config.vocab_size)
        check_stop_strings(request.stop)  # now, not on the engine thread
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            free = self.rows.count(None)
            if len(self.queue) >= self.max_queue + free:
                raise QueueFull(f"server busy: {len(self.queue)} requests waiting for {self.max_batch} slots")
            self.queue.append(request)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """Stop a request (a client that went away): its row is freed at the next step. No event follows."""
        with self._wake:
            request.cancelled = True
            self._wake.notify()

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def start(self) -> None:
        """Run the scheduler on a background thread until `shutdown`."""
        self._thread = threading.Thread(target=self._loop, name="minillama-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Cancel what is queued and running (finish_reason "cancelled") and stop the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the engine's thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.queue and not any(self.rows):
                    self._wake.wait()
                if self._stopping:
                    break
            self.step()
        for i, request in enumerate(self.rows):
            if request is not None:
                self._finish(i, request, Event(finish_reason="cancelled"))
        while self.queue:
            self._finish(None, self.queue.popleft(), Event(finish_reason="cancelled"))

    @torch.no_grad()
    def step(self) -> None:
        """One scheduler step: drop cancelled requests, admit newcomers into free rows, prefill one
        chunk of every prompt still being prefilled, then one decode step over every running row."""
        for i, request in enumerate(self.rows):
            if request is not None and request.cancelled:
                self._finish(i, request, None)
        self._admit()
        for i, request in enumerate(self.rows):
            if request is not None and request._filled < len(request.prompt):
                self._prefill_chunk(i, request)
        rows = [(i, r) for i, r in enumerate(self.rows) if r is not None]
        decoding = [i for i, r in rows if r._filled == len(r.prompt)]
        if not decoding:
            return
        # The step covers rows 0..last running one. The others decode a dummy token at a slot that
        # holds nothing anyone will read: just past an idle row's resting tokens (its kept prefix
        # stays intact), the next prompt slot of a row being prefilled (overwritten by its next chunk).
        width = rows[-1][0] + 1
        tokens, positions = [0] * width, [0] * width
        for i in range(width):
            if len(self.resting[i]) >= self.cache_len:  # a full row gives up its last slot
                self.resting[i] = self.resting[i][:self.cache_len - 1]
            positions[i] = len(self.resting[i])
        for i, request in rows:
            if i in decoding:
                tokens[i], positions[i] = request._last, len(request.prompt) + len(request.tokens) - 1
            else:
                positions[i] = request._filled
        try:
            # kv_len from the host's own positions: no read-back, and on a GPU no attention over
            # the whole --max-seq-len cache.
            logits = self.model(torch.tensor(tokens, device=self.device)[:, None],
                                torch.tensor(positions, device=self.device)[:, None], validate=False,
                                kv_len=max(positions) + 1)[:, -1].float()
        except Exception as e:  # noqa: BLE001 - the server must outlive a failed step; its requests fail
            for i in decoding:
                self._fail(i, self.rows[i], e, "decode step")
            return
        allowed = self._mask_batch(logits, decoding)
        for i in decoding:
            self.rows[i]._written = positions[i] + 1
            self._accept(i, self.rows[i], logits[i:i + 1], None if allowed is None else allowed[i:i + 1])

    def _mask_batch(self, logits: torch.Tensor, decoding: list[int]) -> torch.Tensor | None:
        """The step's logits [B, V] with every structured row's grammar mask applied, all rows' masks
        computed at once; None when no row has a grammar, or when computing them failed (each row
        then masks on its own in _accept, so only a broken row fails)."""
        live = set(decoding)
        states = [self.rows[i]._grammar if i in live else None for i in range(logits.shape[0])]
        if all(s is None for s in states):
            return None
        try:
            return mask_logits(logits.clone(), states)
        except Exception:  # noqa: BLE001 - see the docstring
            return None

    def _fail(self, row: int | None, request: Request, e: Exception, what: str) -> None:
        log.error("request %d: %s failed: %s: %s", request.id, what, type(e).__name__, e)
        self._finish(row, request, Event(finish_reason="error", error=f"{type(e).__name__}: {e}"))

    def _admit(self) -> None:
        while None in self.rows:
            with self._wake:
                if not self.queue:
                    return
                request = self.queue[0]
                if not request.cancelled and self._prefix_coming(request):
                    return  # a running row is writing this prompt's prefix: wait and copy it (below)
                self.queue.popleft()
            if request.cancelled:
                self._finish(None, request, None)
                continue
            sampling = request.sampling
            if sampling.seed is not None and not sampling.greedy:
                request._generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
            if sampling.repetition_penalty != 1.0:
                ids = torch.tensor([request.prompt], device=self.device)
                request._seen = seen_tokens(ids, torch.ones_like(ids), self.model.config.vocab_size)
            if sampling.counts_generated:
                request._counts = torch.zeros(1, self.model.config.vocab_size, device=self.device)
            if request.grammar is not None:
                request._grammar = request.grammar.state()
            request._stop = RowStop(self.tokenizer, request.stop, self.eos, request.max_tokens, request._grammar,
                                    request.ignore_eos)
            # echo scores every prompt token, so it prefills them all
            row, shared = self._pick_row(request.prompt, reuse=self.prefix_reuse and not request.echo)
            source, live = self._live_prefix(request.prompt) if self.prefix_reuse and not request.echo else (None, 0)
            if live > shared:  # a running request's prompt starts the same: copy its keys and values
                row, _ = self._pick_row(request.prompt, reuse=False)  # the emptiest: keep others' prefixes
                self._copy_row(source, row, live)
                shared = live
            if shared:
                # At least the last prompt token is prefilled again: its logits give the first new token.
                request.reused = request._filled = request._written = min(shared, len(request.prompt) - 1)
                self.prefix_hits += 1
                self.reused_tokens += request.reused
            self.resting[row] = []
            self.rows[row] = request

    def _live_prefix(self, prompt: list[int]) -> tuple[int | None, int]:
        """(running row, prompt tokens it has written that this prompt starts with), the longest one."""
        best, shared = None, 0
        for i, r in enumerate(self.rows):
            if r is not None:
                n = min(common_prefix(r.prompt, prompt), r._written)
                if n >= MIN_PREFIX and n > shared:
                    best, shared = i, n
        return best, shared

    def _prefix_coming(self, request: Request) -> bool:
        """Whether a running row is still prefilling a prefix (>= MIN_PREFIX tokens, more than any
        row holds now) that this request's prompt starts with: one system prompt, many users."""
        if not self.prefix_reuse or request.echo:
            return False
        have = max([common_prefix(t, request.prompt) for t in self.resting] + [self._live_prefix(request.prompt)[1]])
        for r in self.rows:
            if r is not None and r._filled < len(r.prompt):
                n = common_prefix(r.prompt, request.prompt)
                if n >= MIN_PREFIX and n > max(have, r._written):
                    return True
        return False

    def _copy_row(self, src: int, dst: int, n: int) -> None:
        """Keys and values of the first n slots of row src into row dst, every layer."""
        for layer in self.model.layers:
            kv = layer.attn.kv_cache
            kv.k[dst, :, :n] = kv.k[src, :, :n]
            kv.v[dst, :, :n] = kv.v[src, :, :n]

    def _pick_row(self, prompt: list[int], reuse: bool) -> tuple[int, int]:
        """(free row, prompt tokens its cache already holds): the resting row sharing the longest
        prefix with the prompt, or (none worth it) the free row holding the fewest tokens."""
        free = [i for i, r in enumerate(self.rows) if r is None]
        best, shared = min(free, key=lambda i: (len(self.resting[i]), i)), 0
        if reuse:
            for i in free:
                n = common_prefix(self.resting[i], prompt)
                if n >= MIN_PREFIX and n > shared:
                    best, shared = i, n
        return best, shared

    def _prefill_chunk(self, row: int, request: Request) -> None:
        """Write the next `prefill_chunk` prompt tokens into the request's row (a long prompt takes
        several steps, so the running requests keep decoding meanwhile); the last chunk's logits
        give the first token."""
        start = request._filled
        end = min(start + self.prefill_chunk, len(request.prompt))
        try:
            h = self.model(torch.tensor([request.prompt[start:end]], device=self.device),
                           torch.arange(start, end, device=self.device), last_only=not request.echo, validate=False,
                           cache_rows=torch.tensor([row], device=self.device), hidden=True)[0]
            if request.echo:
                self._score_prompt(request, start, h)
            logits = self.model.logits(h[-1:]).float()
        except Exception as e:  # noqa: BLE001 - one bad request must not disturb the others
            self._fail(row, request, e, "prefill")
            return
        request._filled = request._written = end
        if end == len(request.prompt):
            if request.max_tokens == 0:  # echo alone: the prompt scored, nothing generated
                self._finish(row, request, Event(finish_reason="length"))
            else:
                self._accept(row, request, logits)

    def _score_prompt(self, request: Request, start: int, h: torch.Tensor) -> None:
        """Logprobs of the prompt tokens that chunk [start, start + len(h)) predicts (hidden states h)."""
        prompt = request.prompt
        if start == 0:
            request.prompt_logprobs.append(TokenLogprob(prompt[0], None, None))
        stop = min(len(h), len(prompt) - 1 - start)  # the last prompt position predicts a new token
        for a in range(0, stop, LOGPROB_CHUNK):
            b = min(a + LOGPROB_CHUNK, stop)
            targets = torch.tensor(prompt[start + a + 1:start + b + 1], device=h.device)
            request.prompt_logprobs += token_logprobs(self.model.logits(h[a:b]), targets, request.logprobs)

    def _accept(self, row: int, request: Request, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> None:
        """Sample the request's next token from its logits [1, V] (`allowed`: the same with its grammar
        mask applied, when the step computed it); emit its text; end it when it is done."""
        sampling = request.sampling
        try:
            if allowed is None:
                allowed = logits if request._grammar is None else mask_logits(logits.clone(), [request._grammar])
            token = int(sample(process_logits(allowed, sampling, request._seen, request._counts), sampling,
                               request._generator))
            if request._grammar is not None:
                request._grammar.advance(token)
        except Exception as e:  # noqa: BLE001 - e.g. non-finite logits: this request fails, not the engine
            self._fail(row, request, e, "sampling")
            return
        if request.first_token is None:
            request.first_token = time.perf_counter()
        if request.logprobs is not None:  # the end-of-sequence token's too, as vLLM returns it
            entry = token_logprobs(logits, torch.tensor([token], device=logits.device), request.logprobs)[0]
            request.sampled_logprobs.append(entry)
            request._pending.append(entry)
        text, finish, kept = request._stop.push(token)
        if kept:
            request.tokens.append(token)
            request._last = token
            if request._seen is not None:
                request._seen[0, token] = True
            if request._counts is not None:
                request._counts[0, token] += 1
        if finish is not None:
            self._finish(row, request, Event(text, finish))
        elif text:
            self._emit(request, Event(text))

    def _finish(self, row: int | None, request: Request, event: Event | None) -> None:
        if row is not None:
            self.rows[row] = None
            # What the row holds stays for a newcomer with the same prefix (not after a failure:
            # a failed step may have written part of a chunk).
            failed = event is not None and event.finish_reason == "error"
            self.resting[row] = [] if failed else (request.prompt + request.tokens)[:request._written]
        request.finished = time.perf_counter()
        if event is None:  # cancelled by its consumer, who waits for nothing
            request.finish_reason = "cancelled"
            return
        request.finish_reason = event.finish_reason
        self._emit(request, event)

    def _emit(self, request: Request, event: Event) -> None:
        event.logprobs, request._pending = request._pending, []
        try:
            request.on_event(event)
        except Exception:  # noqa: BLE001 - a consumer that cannot take events is gone
            log.exception("request %d: its consumer failed; cancelling it", request.id)
            request.cancelled = True
