"""`minillama serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the continuous-batching engine.

Endpoints: POST /v1/chat/completions and /v1/completions (`stream: true` answers with server-sent
events), GET /v1/models and /health. Requests go to one Engine (minillama/engine.py) on its own
thread; each HTTP request waits on an asyncio queue that the engine feeds. Errors use OpenAI's
shape, {"error": {"message", "type", "param", "code"}}, with the status a client expects.
"""

from __future__ import annotations

import asyncio
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

from .engine import Engine, Event, QueueFull, Request
from .errors import GenerationError, MinillamaError
from .generate import SamplingConfig, check_stop_strings
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
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


# Fields we accept only when they ask for nothing: name -> the values that ask for nothing.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,), "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
    "echo": (False,), "suffix": (None, ""), "best_of": (None, 1),
    "response_format": (None, {"type": "text"}),
}
HINTS = {"presence_penalty": " (use repetition_penalty)", "frequency_penalty": " (use repetition_penalty)",
         "n": " (one choice per request)", "best_of": " (one choice per request)"}


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
                    "waiting": self.engine.waiting, "slots": self.engine.max_batch}

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

    def _text_prompt(self, body: CompletionBody) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise APIError(400, f"one prompt per request, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt).input_ids)
        return list(prompt)  # token ids

    def _sampling(self, body: _Body) -> SamplingConfig:
        values = {k: getattr(body, k) if getattr(body, k) is not None else self.defaults.get(k) for k in SAMPLING_KEYS}
        try:
            return SamplingConfig(values["temperature"], values["top_k"], values["top_p"], values["min_p"],
                                  values["repetition_penalty"] if values["repetition_penalty"] is not None else 1.0,
                                  body.seed)
        except GenerationError as e:
            raise APIError(400, str(e), param=str(e).split()[0]) from None

    async def _complete(self, body: _Body, kind: str, http: HTTPRequest) -> Any:
        """Check the request, queue it, and answer: one JSON response, or events as they come."""
        _check_fields(body)
        if body.model is not None and body.model not in self.names:
            raise APIError(404, f"The model `{body.model}` does not exist (this server has `{self.model_name}`)",
                           param="model", code="model_not_found")
        max_tokens = getattr(body, "max_completion_tokens", None)
        max_tokens = body.max_tokens if max_tokens is None else max_tokens
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        sampling = self._sampling(body)
        try:
            stop = check_stop_strings(body.stop or [])
        except GenerationError as e:
            raise APIError(400, str(e), param="stop") from None
        prompt = self._chat_prompt(body) if kind == "chat" else self._text_prompt(body)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        request = Request(prompt, max_tokens, sampling, stop, body.ignore_eos,
                          on_event=lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        try:
            self.engine.submit(request)
        except QueueFull as e:
            raise APIError(503, str(e), code="queue_full", kind="server_error") from None
        except GenerationError as e:
            context = "context" in str(e)
            raise APIError(400, str(e), param="messages" if kind == "chat" else "prompt",
                           code="context_length_exceeded" if context else None) from None
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(request, queue, kind, rid, include_usage),
                                     media_type="text/event-stream")
        try:
            text = await self._collect(request, queue, http)
        finally:
            self.engine.cancel(request)  # a no-op once it finished; frees the row if the client left
            self._log(request, rid)
        return self._response(request, kind, rid, text)

    async def _collect(self, request: Request, queue: asyncio.Queue, http: HTTPRequest) -> str:
        pieces = []
        while True:
            try:
                event: Event = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    raise APIError(499, "client disconnected") from None
                continue
            pieces.append(event.text)
            if event.finish_reason is not None:
                failure = _failure(event)
                if failure is not None:
                    raise failure
                return "".join(pieces)

    async def _stream(self, request: Request, queue: asyncio.Queue, kind: str, rid: str,
                      include_usage: bool) -> AsyncIterator[str]:
        # Starlette cancels this generator when the client disconnects; `finally` frees the row.
        try:
            if kind == "chat":
                yield _sse(self._chunk(kind, rid, {"role": "assistant", "content": ""}))
            while True:
                event: Event = await queue.get()
                failure = _failure(event)
                if failure is not None:  # the status line went out already: the error is an event
                    yield _sse(failure.payload())
                    break
                if event.text:
                    yield _sse(self._chunk(kind, rid, {"content": event.text} if kind == "chat" else event.text))
                if event.finish_reason is not None:
                    yield _sse(self._chunk(kind, rid, "" if kind == "text" else {}, event.finish_reason))
                    if include_usage:
                        yield _sse({**self._chunk(kind, rid, None), "choices": [], "usage": _usage(request)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            self.engine.cancel(request)
            self._log(request, rid)

    # ---- responses -----------------------------------------------------------------------------
    def _chunk(self, kind: str, rid: str, delta: Any, finish: str | None = None) -> dict[str, Any]:
        choice = ({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish} if kind == "chat"
                  else {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish})
        return {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": [choice]}

    def _response(self, request: Request, kind: str, rid: str, text: str) -> dict[str, Any]:
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": request.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": request.finish_reason}
        return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": [choice], "usage": _usage(request)}

    def _log(self, request: Request, rid: str) -> None:
        end = request.finished or time.perf_counter()
        ttft = f"{(request.first_token - request.submitted) * 1e3:.0f} ms" if request.first_token else "-"
        log.info("%s: %d prompt + %d new tokens, %s, first token %s, %.2f s", rid, len(request.prompt),
                 len(request.tokens), request.finish_reason or "cancelled", ttft, end - request.submitted)


def _failure(event: Event) -> APIError | None:
    """The error a request that ended this way answers with (None: it completed)."""
    if event.finish_reason == "cancelled":
        return APIError(503, "the server is shutting down", code="shutting_down", kind="server_error")
    if event.finish_reason == "error":
        return APIError(500, f"generation failed: {event.error}", kind="server_error")
    return None


def _usage(request: Request) -> dict[str, int]:
    return {"prompt_tokens": len(request.prompt), "completion_tokens": len(request.tokens),
            "total_tokens": len(request.prompt) + len(request.tokens)}


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

