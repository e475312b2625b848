"""`minillama serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the continuous-batching engine.

Endpoints: POST /v1/chat/completions and /v1/completions (`stream: true` answers with server-sent
events), GET /v1/models and /health, and vLLM's POST /tokenize, /detokenize and GET /tokenizer_info
(lm-eval's `local-completions` tokenizes through them when it finds them). Logprobs: chat's
`logprobs` + `top_logprobs` and completions' `logprobs: K` (OpenAI's legacy shape), `echo` with the
prompt's logprobs, `max_tokens: 0` with echo to score a prompt alone; several prompts in one
completions request answer as choices in prompt order. Requests go to one Engine (minillama/engine.py) on its own
thread; each HTTP request waits on an asyncio queue that the engine feeds. Errors use OpenAI's
shape, {"error": {"message", "type", "param", "code"}}, with the status a client expects.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import socket
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from .engine import MAX_LOGPROBS, Engine, Event, QueueFull, Request, TokenLogprob
from .errors import GenerationError, MinillamaError
from .generate import SamplingConfig
from .stopping import check_stop_strings
from .structured import Grammar
from .tokenizer import encode_prompt

log = logging.getLogger("minillama.serve")

# Sampling defaults when a request names none: OpenAI's (temperature 1), then the checkpoint's
# generation_config.json, as vLLM does. temperature=0 is greedy.
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def payload(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=self.payload())


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Body(BaseModel):
    """Fields both endpoints take. Unknown fields are refused (as OpenAI does); known ones we cannot
    honour are accepted only at their neutral value (NEUTRAL)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM, llama.cpp)
    min_p: float | None = None  # extension
    repetition_penalty: float | None = None  # extension
    ignore_eos: bool = False  # extension (vLLM's): generate max_tokens whatever the model says
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None  # structured output; completions take it too (as vLLM)


class TokenizeBody(BaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeBody(BaseModel):
    model: str | None = None
    tokens: list[int]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: Any = None  # an integer 0..20; checked by hand, since pydantic would take `true` for 1
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


# Fields we accept only when they ask for nothing: name -> the values that ask for nothing.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "tools": (None, []), "tool_choice": (None, "none"), "suffix": (None, ""), "best_of": (None, 1),
}
GRAMMARS_KEPT = 32  # compiled response_format schemas kept for requests that send the same one
HINTS = {"best_of": " (use n)"}


def _check_fields(body: _Body) -> None:
    extra = sorted(body.model_extra or {})
    if extra:
        raise APIError(400, f"unrecognized request argument(s): {', '.join(extra)}", param=extra[0])
    for name, neutral in NEUTRAL.items():
        value = getattr(body, name, None)
        if name in type(body).model_fields and value not in neutral:
            raise APIError(400, f"{name}={value!r} is not supported by this server{HINTS.get(name, '')}", param=name)


class Server:
    """The FastAPI app and what its routes share: the engine, the tokenizer, the model's name."""

    def __init__(self, engine: Engine, model_name: str, aliases: tuple[str, ...] = ()) -> None:
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.model_name, self.names = model_name, {model_name, *aliases}
        config = engine.model.generation_config
        self.defaults: dict[str, Any] = {"temperature": 1.0}
        self.defaults.update({k: config[k] for k in SAMPLING_KEYS if config.get(k) is not None})
        self.created = int(time.time())
        self.grammars: collections.OrderedDict[str, Grammar] = collections.OrderedDict()
        self.app = self._build()

    def _build(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            self.engine.start()
            try:
                yield
            finally:
                # uvicorn has let in-flight requests finish (or cancelled them after its grace period)
                self.engine.shutdown(timeout=10)

        app = FastAPI(title="minillama", lifespan=lifespan)

        @app.exception_handler(APIError)
        async def api_error(request: HTTPRequest, exc: APIError) -> JSONResponse:
            return exc.response()

        @app.exception_handler(RequestValidationError)
        async def bad_body(request: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
            first = exc.errors()[0] if exc.errors() else {}
            where = [str(p) for p in first.get("loc", ()) if p != "body"]
            message = first.get("msg", "invalid request")
            return APIError(400, f"{'.'.join(where)}: {message}" if where else message,
                            param=where[0] if where else None).response()

        @app.exception_handler(HTTPException)
        async def http_error(request: HTTPRequest, exc: HTTPException) -> JSONResponse:
            return APIError(exc.status_code, str(exc.detail)).response()

        @app.get("/health")
        async def health() -> dict[str, Any]:
            return {"status": "ok", "model": self.model_name, "running": self.engine.running,
                    "waiting": self.engine.waiting, "slots": self.engine.max_batch,
                    "prefix_hits": self.engine.prefix_hits, "reused_tokens": self.engine.reused_tokens}

        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "minillama",
                "max_model_len": self.engine.cache_len}

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [card]}

        @app.get("/v1/models/{model_id:path}")
        async def model(model_id: str) -> dict[str, Any]:
            if model_id not in self.names:
                raise APIError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
            return card

        @app.post("/v1/chat/completions")
        async def chat(body: ChatBody, http: HTTPRequest) -> Any:
            return await self._complete(body, "chat", http)

        @app.post("/v1/completions")
        async def completions(body: CompletionBody, http: HTTPRequest) -> Any:
            return await self._complete(body, "text", http)

        # vLLM's tokenizer endpoints (lm-eval's remote tokenizer uses them)
        @app.post("/tokenize")
        async def tokenize(body: TokenizeBody) -> dict[str, Any]:
            ids = list(self.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens).input_ids)
            return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.cache_len}

        @app.post("/detokenize")
        async def detokenize(body: DetokenizeBody) -> dict[str, Any]:
            vocab = self.engine.model.config.vocab_size
            bad = [t for t in body.tokens if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"tokens: {bad[0]} is not a token id (0..{vocab - 1})", param="tokens")
            return {"prompt": self.tokenizer.decode(body.tokens)}

        @app.get("/tokenizer_info")
        async def tokenizer_info() -> dict[str, Any]:
            tok = self.tokenizer
            return {"eos_token": tok.eos_token, "bos_token": tok.bos_token, "pad_token": tok.pad_token,
                    "chat_template": getattr(tok, "chat_template", None), "model_max_length": self.engine.cache_len}

        return app

    # ---- requests -> engine ------------------------------------------------------------------
    def _chat_prompt(self, body: ChatBody) -> list[int]:
        messages = []
        for i, m in enumerate(body.messages):
            role = "system" if m.role == "developer" else m.role
            if role not in ("system", "user", "assistant"):
                raise APIError(400, f"messages[{i}].role {m.role!r} is not supported (system, user, assistant)",
                               param=f"messages.{i}.role")
            content = m.content or ""
            if not isinstance(content, str):
                if any(part.type != "text" for part in content):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported",
                                   param=f"messages.{i}.content")
                content = "".join(part.text or "" for part in content)
            messages.append({"role": role, "content": content})
        try:
            return encode_prompt(self.tokenizer, messages)
        except Exception as e:  # noqa: BLE001 - a template that rejects the conversation (e.g. role order)
            raise APIError(400, f"messages: the chat template cannot render them ({e})", param="messages") from None

    def _text_prompts(self, body: CompletionBody) -> list[list[int]]:
        """The prompts of a completions request: a string, token ids, or a list of either (one choice each)."""
        prompt = body.prompt
        many = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
        if not many:
            raise APIError(400, "prompt: empty list", param="prompt")
        return [list(self.tokenizer(p).input_ids) if isinstance(p, str) else list(p) for p in many]

    def _sampling(self, body: _Body, seed: int | None) -> SamplingConfig:
        values = {k: getattr(body, k) if getattr(body, k) is not None else self.defaults.get(k) for k in SAMPLING_KEYS}
        bias = {}
        for key, value in (body.logit_bias or {}).items():  # JSON keys are strings: "50256": -100
            if not key.strip().isdigit():
                raise APIError(400, f"logit_bias: {key!r} is not a token id", param="logit_bias")
            bias[int(key)] = value
        try:
            return SamplingConfig(values["temperature"], values["top_k"], values["top_p"], values["min_p"],
                                  values["repetition_penalty"] if values["repetition_penalty"] is not None else 1.0,
                                  seed, body.presence_penalty or 0.0, body.frequency_penalty or 0.0, bias or None)
        except GenerationError as e:
            raise APIError(400, str(e), param=str(e).split()[0].rstrip(":").split("[")[0]) from None

    def _logprobs_asked(self, body: _Body, kind: str) -> tuple[int | None, bool]:
        """(alternatives per token or None for no logprobs, echo), or a 400 naming the bad field."""
        if kind == "chat":
            top = body.top_logprobs
            if top is not None and (isinstance(top, bool) or not 0 <= top <= MAX_LOGPROBS):
                raise APIError(400, f"top_logprobs must be an integer 0..{MAX_LOGPROBS}, got {top!r}",
                               param="top_logprobs")
            if top and not body.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            return (top or 0) if body.logprobs else None, False
        if body.top_logprobs is not None:
            raise APIError(400, "top_logprobs is a chat completions field; completions take logprobs: N",
                           param="top_logprobs")
        k = body.logprobs
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS):
            raise APIError(400, f"logprobs must be an integer 0..{MAX_LOGPROBS} (alternatives per token), got {k!r}",
                           param="logprobs")
        if body.echo and k is None:
            raise APIError(400, "echo needs logprobs: N (the prompt's logprobs are what echo returns here)",
                           param="echo")
        return k, bool(body.echo)

    async def _grammar(self, body: _Body) -> Grammar | None:
        """The compiled schema `response_format` asks for (None for text), or a 400 naming the problem.
        Compiled off the event loop (the first one also wraps the tokenizer, ~1 s); kept by schema."""
        fmt = body.response_format
        if fmt is None or fmt == {"type": "text"}:
            return None
        kind = fmt.get("type")
        if kind == "json_object":
            schema: Any = True
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise APIError(400, "response_format.json_schema must be an object with a `schema` object",
                               param="response_format")
            schema = spec.get("schema", {})
        else:
            raise APIError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                           param="response_format")
        key = json.dumps(schema, sort_keys=True)
        if key not in self.grammars:
            model = self.engine.model
            try:
                grammar = await asyncio.to_thread(Grammar, schema, self.tokenizer, model.config.vocab_size,
                                                  sorted(self.engine.eos))
            except GenerationError as e:
                raise APIError(400, f"response_format: {e}", param="response_format") from None
            self.grammars[key] = grammar
            while len(self.grammars) > GRAMMARS_KEPT:
                self.grammars.popitem(last=False)
        self.grammars.move_to_end(key)
        return self.grammars[key]

    async def _complete(self, body: _Body, kind: str, http: HTTPRequest) -> Any:
        """Check the request, queue one engine request per prompt, and answer: one JSON response, or
        events as they come (each choice's, tagged with its index)."""
        _check_fields(body)
        if body.model is not None and body.model not in self.names:
            raise APIError(404, f"The model `{body.model}` does not exist (this server has `{self.model_name}`)",
                           param="model", code="model_not_found")
        logprobs, echo = self._logprobs_asked(body, kind)
        max_tokens = getattr(body, "max_completion_tokens", None)
        max_tokens = body.max_tokens if max_tokens is None else max_tokens
        if max_tokens is not None and max_tokens < (0 if echo else 1):
            raise APIError(400, f"max_tokens must be >= {0 if echo else 1}{'' if echo else ' (0 only with echo)'}, "
                           f"got {max_tokens}", param="max_tokens")
        if not 1 <= body.n <= self.engine.max_batch:
            raise APIError(400, f"n must be in 1..{self.engine.max_batch} (this server's --max-batch), got {body.n}",
                           param="n")
        # With a seed, choice j samples with seed + j: each choice reproducible on its own.
        samplings = [self._sampling(body, None if body.seed is None else (body.seed + j) % 2**64)
                     for j in range(body.n)]
        try:
            stop = check_stop_strings(body.stop or [])
        except GenerationError as e:
            raise APIError(400, str(e), param="stop") from None
        prompts = [self._chat_prompt(body)] if kind == "chat" else self._text_prompts(body)
        grammar = await self._grammar(body)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        requests = []
        try:
            # Choice index = prompt index * n + j, as OpenAI numbers them; the n copies of a prompt share
            # its prefill (the engine copies the first one's keys and values).
            for i, (prompt, sampling) in enumerate((p, s) for p in prompts for s in samplings):
                request = Request(prompt, max_tokens, sampling, stop, body.ignore_eos, logprobs=logprobs, echo=echo,
                                  grammar=grammar,
                                  on_event=lambda event, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, event)))
                self.engine.submit(request)
                requests.append(request)
        except (QueueFull, GenerationError) as e:
            for request in requests:
                self.engine.cancel(request)
            if isinstance(e, QueueFull):
                raise APIError(503, str(e), code="queue_full", kind="server_error") from None
            param = "logit_bias" if "logit_bias" in str(e) else "messages" if kind == "chat" else "prompt"
            raise APIError(400, str(e), param=param,
                           code="context_length_exceeded" if "context" in str(e) else None) from None
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(requests, queue, kind, rid, include_usage, echo),
                                     media_type="text/event-stream")
        try:
            texts = await self._collect(requests, queue, http)
        finally:
            for request in requests:
                self.engine.cancel(request)  # a no-op once it finished; frees the row if the client left
                self._log(request, rid)
        return self._response(requests, kind, rid, texts, echo)

    async def _collect(self, requests: list[Request], queue: asyncio.Queue, http: HTTPRequest) -> list[str]:
        pieces: list[list[str]] = [[] for _ in requests]
        running = len(requests)
        while running:
            try:
                i, event = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    raise APIError(499, "client disconnected") from None
                continue
            pieces[i].append(event.text)
            if event.finish_reason is not None:
                failure = _failure(event)
                if failure is not None:
                    raise failure
                running -= 1
        return ["".join(p) for p in pieces]

    async def _stream(self, requests: list[Request], queue: asyncio.Queue, kind: str, rid: str,
                      include_usage: bool, echo: bool) -> AsyncIterator[str]:
        # Starlette cancels this generator when the client disconnects; `finally` frees the rows.
        try:
            if kind == "chat":
                for i in range(len(requests)):
                    yield _sse(self._chunk(kind, rid, i, {"role": "assistant", "content": ""}))
            running, offsets, prompt_sent = len(requests), [0] * len(requests), [False] * len(requests)
            while running:
                i, event = await queue.get()
                failure = _failure(event)
                if failure is not None:  # the status line went out already: the error is an event
                    yield _sse(failure.payload())
                    break
                request, logprobs = requests[i], None
                if echo and not prompt_sent[i]:  # the prompt first, with its logprobs, as vLLM streams it
                    prompt_sent[i] = True
                    text = self.tokenizer.decode(request.prompt)
                    entries = self._legacy_logprobs(request.prompt_logprobs, 0)
                    offsets[i] = len(text)
                    yield _sse(self._chunk(kind, rid, i, text, logprobs=entries))
                if request.logprobs is not None and event.logprobs:
                    logprobs = (self._chat_logprobs(event.logprobs) if kind == "chat"
                                else self._legacy_logprobs(event.logprobs, offsets[i]))
                    offsets[i] += sum(len(t) for t in self._token_texts(event.logprobs))
                if event.text or logprobs:
                    yield _sse(self._chunk(kind, rid, i, {"content": event.text} if kind == "chat" else event.text,
                                           logprobs=logprobs))
                if event.finish_reason is not None:
                    yield _sse(self._chunk(kind, rid, i, "" if kind == "text" else {}, event.finish_reason))
                    running -= 1
            else:
                if include_usage:
                    yield _sse({**self._chunk(kind, rid, 0, None), "choices": [], "usage": _usage(requests)})
            yield "data: [DONE]\n\n"
        finally:
            for request in requests:
                self.engine.cancel(request)
                self._log(request, rid)

    # ---- responses -----------------------------------------------------------------------------
    def _token_texts(self, entries: list[TokenLogprob]) -> list[str]:
        return [self.tokenizer.decode([e.token]) for e in entries]

    def _chat_logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        """Chat's shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
        def one(token: int, logprob: float) -> dict[str, Any]:
            text = self.tokenizer.decode([token])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top or []]}
                            for e in entries], "refusal": None}

    def _legacy_logprobs(self, entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
        """Completions' shape: tokens, token_logprobs, top_logprobs ({token text: logprob}) and
        text_offset (where each token starts in the choice's text)."""
        texts = self._token_texts(entries)
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        tops = [None if e.top is None else {self.tokenizer.decode([t]): lp for t, lp in e.top} for e in entries]
        return {"tokens": texts, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops,
                "text_offset": offsets}

    def _chunk(self, kind: str, rid: str, index: int, delta: Any, finish: str | None = None,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        choice = ({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish} if kind == "chat"
                  else {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish})
        return {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": [choice]}

    def _response(self, requests: list[Request], kind: str, rid: str, texts: list[str], echo: bool) -> dict[str, Any]:
        choices = []
        for i, (request, text) in enumerate(zip(requests, texts)):
            emitted = request.sampled_logprobs
            if kind == "chat":
                logprobs = self._chat_logprobs(emitted) if request.logprobs is not None else None
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                                "finish_reason": request.finish_reason})
                continue
            logprobs = None
            if echo:
                prompt_text = self.tokenizer.decode(request.prompt)
                logprobs = self._legacy_logprobs(request.prompt_logprobs + emitted, 0)
                text = prompt_text + text
            elif request.logprobs is not None:
                logprobs = self._legacy_logprobs(emitted, 0)
            choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": request.finish_reason})
        return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": choices, "usage": _usage(requests)}

    def _log(self, request: Request, rid: str) -> None:
        end = request.finished or time.perf_counter()
        ttft = f"{(request.first_token - request.submitted) * 1e3:.0f} ms" if request.first_token else "-"
        finish = request.finish_reason or "cancelled"
        if request.grammar is not None:  # a JSON document cut by max_tokens is no document
            finish += " (JSON complete)" if request._grammar and request._grammar.complete else " (JSON incomplete)"
        log.info("%s: %d prompt (%d reused) + %d new tokens, %s, first token %s, %.2f s", rid, len(request.prompt),
                 request.reused, len(request.tokens), finish, ttft, end - request.submitted)


def _failure(event: Event) -> APIError | None:
    """The error a request that ended this way answers with (None: it completed)."""
    if event.finish_reason == "cancelled":
        return APIError(503, "the server is shutting down", code="shutting_down", kind="server_error")
    if event.finish_reason == "error":
        return APIError(500, f"generation failed: {event.error}", kind="server_error")
    return None


def _usage(requests: list[Request]) -> dict[str, int]:
    prompt = sum(len(r.prompt) for r in requests)
    completion = sum(len(r.tokens) for r in requests)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; port 0 lets the system pick a free one (read it back with
    getsockname). Bound before the model loads, so a port in use fails at once, and so whoever
    started the server learns the real port from the line it prints, with no port race."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise MinillamaError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(engine: Engine, model_name: str, sock: socket.socket, *, aliases: tuple[str, ...] = (),
          shutdown_timeout: float = 30.0, log_level: str = "info") -> None:
    """Run the server on `sock` (from `listen`) until SIGINT/SIGTERM: new connections stop,
    in-flight requests get `shutdown_timeout` seconds to finish, then the rest are cancelled."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    app = Server(engine, model_name, aliases).app
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)
    uvicorn.Server(config).run(sockets=[sock])

