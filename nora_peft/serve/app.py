"""The OpenAI-compatible ASGI app (FastAPI) over an :class:`~nora_peft.serve.engine.Engine`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``"stream": true`` SSE), ``GET /v1/models``,
``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (vLLM-style), ``GET /health``, ``GET /metrics``
(Prometheus text; ``?format=json`` for JSON). The request's ``model`` names an adapter or the base model.

A request passes, in order: the role check (:class:`Guard`), the body-size limit (413), field validation,
admission checks that need no tokenizer (unsupported options, well-formed text, prompt length in characters, stop
strings, token ids in the vocabulary, the model exists), tokenizing off the event loop, and the queue (503 with
``Retry-After`` when full, or when it waited ``request_timeout_s`` without a first token). Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``; a client's mistake is never a 500, messages carry no server
paths or internals, and the connection stays usable. See docs/serving.md (security, limits, roles, errors).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..prompt import PLAIN_TEMPLATE
from .engine import Engine, GenRequest
from .errors import AdapterError

log = logging.getLogger("nora_peft.serve")

MAX_TOKENS_LIMIT = 4096
MAX_SEED = 2**63 - 1
MIN_TEMPERATURE = 0.01  # below this (but above 0) logits / T overflow: 0 means greedy
#: OpenAI options nora serve does not implement: refused with a 400 when set to anything but their default.
UNSUPPORTED = (
    "logprobs",
    "top_logprobs",
    "best_of",
    "echo",
    "suffix",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "response_format",
    "audio",
    "modalities",
    "prediction",
)


@dataclass
class Limits:
    """What one request may ask of the server (each one a ``nora serve`` flag; docs/serving.md lists them).

    Attributes:
        max_body_bytes: request body size; larger bodies get a 413 before they are read.
        max_prompt_chars: prompt text length checked before tokenizing (``None``: 32 x the engine's prompt-token
            limit -- a token is rarely longer than 32 characters).
        max_stop_strings, max_stop_chars: how many stop strings a request may send, and how long each may be.
        request_timeout_s: how long a request may wait for its first token (queued, or in prefill) before it is
            dropped with a 503 and ``Retry-After``.
        retry_after_s: the ``Retry-After`` seconds sent with 503s.
        header_timeout_s, body_timeout_s: how long a client may take to send its headers / its body (the
            connection is closed after that); applied by :func:`~nora_peft.serve.cli.uvicorn_config`.
    """

    max_body_bytes: int = 1 << 20
    max_prompt_chars: int | None = None
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    request_timeout_s: float = 120.0
    retry_after_s: int = 2
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0


# -- request bodies ---------------------------------------------------------------------------------------------
class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, but UNSUPPORTED ones are refused

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    n: int = Field(default=1, ge=1, le=1)
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever the model says (benchmarks)


class CompletionRequest(_Sampling):
    prompt: str | list[int]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)


class LoadAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(BaseModel):
    lora_name: str


# -- errors -----------------------------------------------------------------------------------------------------
class _JSON(JSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate a client sent can never break the encoding of an answer."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


_KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error"}


def error_response(status: int, message: str, param: str | None = None, retry_after: int | None = None) -> JSONResponse:
    """OpenAI's error shape; a 503 carries ``Retry-After``."""
    headers = {"Retry-After": str(retry_after)} if status == 503 and retry_after else None
    body = {"error": {"message": message, "type": _KINDS.get(status, "error"), "param": param, "code": status}}
    return _JSON(status_code=status, content=body, headers=headers)


def _safe_message(status: int, message: str) -> str:
    """What a client may read of an engine error: server-side failures are logged, not shown."""
    if status >= 500 and status != 503:
        log.error("request failed: %s", message)
        return "Internal error while generating; the server logged the details."
    return message


class Guard:
    """Pure ASGI middleware: API-key roles, the body-size limit, and the last line against unexpected exceptions.

    Roles: ``/health`` is open. ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` need the admin key (with
    no admin key set they are refused when a user key is set, and open when neither is). Everything else
    (generation, ``/v1/models``, ``/metrics``, ``/docs``, ``/openapi.json``) needs the user key when one is set;
    the admin key is accepted there too. Keys are compared in constant time.

    A body over ``max_body_bytes`` gets a 413: at once when its ``Content-Length`` says so (the body is never
    read), else as soon as the bytes received pass the limit.

    An exception that escapes the app becomes a logged 500 without internals; it is not re-raised (so the
    keep-alive connection stays open).
    """

    OPEN = frozenset({"/health"})
    ADMIN = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})

    def __init__(
        self,
        app: ASGIApp,
        user_key: str | None = None,
        admin_key: str | None = None,
        max_body_bytes: int = 1 << 20,
        on_reject: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.on_reject = on_reject
        self.user_key = user_key.encode() if user_key else None
        self.admin_key = admin_key.encode() if admin_key else None

    def _denied(self, scope: Scope) -> tuple[int, str] | None:
        path = scope["path"]
        if path in self.OPEN:
            return None
        got = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization" and value.startswith(b"Bearer "):
                got = value[len(b"Bearer ") :]
        is_admin = self.admin_key is not None and hmac.compare_digest(got, self.admin_key)
        is_user = self.user_key is not None and hmac.compare_digest(got, self.user_key)
        if path in self.ADMIN:
            if self.admin_key is None:
                if self.user_key is None:
                    return None
                return 403, "Loading and unloading adapters is disabled: start the server with --admin-key."
            if is_admin:
                return None
            if is_user:
                return 403, "This route needs the admin key; the user key can generate and list models."
            return 401, "Missing or wrong admin key: send the header 'Authorization: Bearer <admin key>'."
        if self.user_key is None or is_user or is_admin:
            return None
        return 401, "Missing or wrong API key: send the header 'Authorization: Bearer <key>'."

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        denied = self._denied(scope)
        if denied is not None:
            self.on_reject("unauthorized" if denied[0] == 401 else "forbidden")
            await error_response(*denied)(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), b"0")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            self.on_reject("too_large")
            response = self._too_large()
            response.headers["Connection"] = "close"  # the unread body would follow on this connection
            await response(scope, receive, send)
            return
        started, received = False, 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise StarletteHTTPException(413)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Exception:
            log.exception("unhandled error on %s", scope.get("path"))
            if not started:
                await error_response(500, "Internal error; the server logged the details.")(scope, receive, send)

    def _too_large(self) -> JSONResponse:
        message = f"The request body is larger than the limit of {self.max_body_bytes} bytes (--max-body-bytes)."
        return error_response(413, message, "body")


# -- one request in flight ----------------------------------------------------------------------------------------
class _Call:
    """The events of one submitted request, seen from the event loop, plus whether its client is still there."""

    def __init__(self, request: Request) -> None:
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.request = request
        self.gone = asyncio.ensure_future(self._wait_disconnect())

    def on_event(self, kind: str, payload: Any) -> None:  # called from the scheduler thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

    async def _wait_disconnect(self) -> None:
        while (await self.request.receive())["type"] != "http.disconnect":
            pass

    async def next(self, timeout: float | None = None) -> tuple[str, Any]:
        """The next event; ``("disconnect", None)`` when the client left, ``("timeout", None)`` after ``timeout``."""
        get = asyncio.ensure_future(self.events.get())
        done, _ = await asyncio.wait({get, self.gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        return ("disconnect", None) if self.gone in done else ("timeout", None)

    def close(self) -> None:
        self.gone.cancel()


# -- the app --------------------------------------------------------------------------------------------------------
def create_app(
    engine: Engine, api_key: str | None = None, admin_key: str | None = None, limits: Limits | None = None
) -> FastAPI:
    """The FastAPI app (wrapped by :class:`Guard`); the engine's loop starts and stops with the app."""
    limits = limits or Limits()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="nora serve", lifespan=lifespan)
    _add_error_handlers(app, engine, limits)
    _add_info_routes(app, engine)
    _add_adapter_routes(app, engine)
    _add_generation_routes(app, Admission(engine, limits))
    app.add_middleware(
        Guard,
        user_key=api_key,
        admin_key=admin_key,
        max_body_bytes=limits.max_body_bytes,
        on_reject=_rejection_counter(engine),
    )
    return app


def _rejection_counter(engine: Engine) -> Callable[[str], None]:
    """``reject(reason)``: count a refused request in the engine's metrics (``nora_rejections_total``)."""
    metrics = getattr(engine, "metrics", None)
    if metrics is None or not hasattr(metrics, "rejected"):
        return lambda reason: None
    return metrics.rejected


def _add_error_handlers(app: FastAPI, engine: Engine, limits: Limits) -> None:
    reject = _rejection_counter(engine)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        reject("invalid_request")
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, "The request body is not valid JSON.", "body")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if not loc:
            return error_response(
                400, "The request body must be a JSON object (Content-Type: application/json).", "body"
            )
        field = ".".join(loc)[:100]
        return error_response(400, f"Invalid field '{field}': {str(first.get('msg', 'invalid value'))[:200]}.", field)

    @app.exception_handler(AdapterError)
    async def adapter_error(request: Request, exc: AdapterError) -> JSONResponse:
        if exc.status != 503:  # the scheduler counts a full queue itself
            reject("unknown_model" if exc.status == 404 else "invalid_request")
        return error_response(exc.status, _safe_message(exc.status, str(exc)), exc.param, limits.retry_after_s)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:
            reject("too_large")
            message = f"The request body is larger than the limit of {limits.max_body_bytes} bytes (--max-body-bytes)."
            return error_response(413, message, "body")
        return error_response(exc.status_code, str(exc.detail))


def _add_info_routes(app: FastAPI, engine: Engine) -> None:
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request, format: str = "prometheus") -> Response:
        """Prometheus text by default; JSON with ``?format=json`` or ``Accept: application/json``."""
        wants_json = format == "json" or "application/json" in request.headers.get("accept", "")
        if wants_json or not hasattr(engine, "prometheus_metrics"):
            return _JSON(engine.snapshot_metrics())
        return PlainTextResponse(engine.prometheus_metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        now = int(time.time())
        data = [
            {"id": n, "object": "model", "created": now, "owned_by": "nora-peft", "root": engine.base_name}
            | ({"parent": engine.base_name} if n != engine.base_name else {"parent": None})
            for n in engine.model_names()
        ]
        return {"object": "list", "data": data}


def _add_adapter_routes(app: FastAPI, engine: Engine) -> None:
    @app.post("/v1/load_lora_adapter")
    def load_adapter(body: LoadAdapterRequest) -> dict:  # sync: runs in the threadpool (reads files, takes the lock)
        engine.load_adapter(body.lora_name, body.lora_path)
        return {"status": "ok", "lora_name": body.lora_name}

    @app.post("/v1/unload_lora_adapter")
    def unload_adapter(body: UnloadAdapterRequest) -> dict:
        engine.unload_adapter(body.lora_name)
        return {"status": "ok", "lora_name": body.lora_name}


def format_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt for a chat: the tokenizer's chat template if it has one, else the plain template adapters are
    trained with (:data:`nora_peft.prompt.PLAIN_TEMPLATE` per user turn; system text and earlier assistant replies
    as plain paragraphs)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = []
    for m in messages:
        if m["role"] in ("user", "tool"):
            parts.append(PLAIN_TEMPLATE.format(prompt=m["content"]))
        else:  # system / developer / assistant
            parts.append(m["content"] + "\n\n")
    return "".join(parts)


class Admission:
    """The checks a generation request passes before it is queued, none of which needs the tokenizer until the
    last; then tokenizing in a worker thread (one at a time, so a burst of long prompts cannot take every core)."""

    def __init__(self, engine: Engine, limits: Limits) -> None:
        self.engine = engine
        self.limits = limits
        embeddings = engine.model.get_input_embeddings()
        self.vocab_size = int(getattr(embeddings, "num_embeddings", 0) or engine.model.config.vocab_size)
        max_tokens = getattr(engine, "max_prompt_tokens", 4096)
        self.max_prompt_chars = limits.max_prompt_chars or 32 * max_tokens
        self._tokenize_lock = threading.Lock()

    def check(self, body: _Sampling) -> list[str]:
        """Unsupported options, sampling bounds and stop strings; returns the stop strings."""
        for name in UNSUPPORTED:
            value = (body.model_extra or {}).get(name)
            if value in (None, False, 0, [], {}) or (name == "response_format" and value == {"type": "text"}):
                continue
            raise AdapterError(f"'{name}' is not supported by nora serve; leave it out of the request.", param=name)
        if 0 < body.temperature < MIN_TEMPERATURE:
            raise AdapterError(
                f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}; got {body.temperature:g}.",
                param="temperature",
            )
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > self.limits.max_stop_strings:
            raise AdapterError(
                f"stop has {len(stop)} strings, over the limit of {self.limits.max_stop_strings}.", param="stop"
            )
        for s in stop:
            if not s or len(s) > self.limits.max_stop_chars:
                raise AdapterError(
                    f"Each stop string must have 1 to {self.limits.max_stop_chars} characters; got {len(s)}.",
                    param="stop",
                )
            _check_text(s, "stop")
        return stop

    def check_prompt(self, prompt: str | list[int], param: str = "prompt") -> None:
        """Length in characters (before tokenizing), well-formed text, token ids inside the vocabulary."""
        if isinstance(prompt, str):
            if len(prompt) > self.max_prompt_chars:
                raise AdapterError(
                    f"{param} has {len(prompt)} characters, over the limit of {self.max_prompt_chars} "
                    "(--max-prompt-chars); shorten it.",
                    param=param,
                )
            _check_text(prompt, param)
            return
        if len(prompt) > getattr(self.engine, "max_prompt_tokens", len(prompt)):
            return  # the engine names the token limit
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise AdapterError(
                f"prompt holds token id {bad}, outside the vocabulary [0, {self.vocab_size}).", param=param
            )

    async def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids, tokenized in a worker thread (the event loop keeps answering)."""

        def run() -> list[int]:
            with self._tokenize_lock:
                return self.engine.encode(prompt)

        return await run_in_threadpool(run)


def _check_text(value: str, param: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise AdapterError(
            f"{param} is not valid Unicode text (it holds a lone surrogate); send UTF-8 text.", param=param
        ) from None


def _add_generation_routes(app: FastAPI, admission: Admission) -> None:
    engine = admission.engine

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        stop = admission.check(body)
        admission.check_prompt(body.prompt)
        return await _generate(admission, body, body.prompt, body.max_tokens or 16, stop, chat=False, request=request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        stop = admission.check(body)
        for i, m in enumerate(body.messages):
            _check_text(m.content, f"messages.{i}.content")
        total = "".join(m.content for m in body.messages)
        admission.check_prompt(total, "messages")
        prompt = format_chat(engine.tokenizer, [m.model_dump() for m in body.messages])
        max_tokens = body.max_completion_tokens or body.max_tokens or 256
        return await _generate(admission, body, prompt, max_tokens, stop, chat=True, request=request)


async def _generate(
    admission: Admission,
    body: _Sampling,
    prompt: str | list[int],
    max_tokens: int,
    stop: list[str],
    *,
    chat: bool,
    request: Request,
) -> Response:
    engine, limits = admission.engine, admission.limits
    adapter = engine.check_model(body.model)
    ids = await admission.encode(prompt)
    call = _Call(request)
    req = GenRequest(
        prompt_ids=ids,
        adapter=adapter,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=stop,
        seed=body.seed,
        ignore_eos=body.ignore_eos,
        on_event=call.on_event,
        model=body.model,
    )
    try:
        engine.submit(req)
        first = await _first_event(call, req, engine, limits)
    except BaseException:
        req.cancelled = True
        call.close()
        raise
    if first[0] in ("error", "timeout", "disconnect"):
        call.close()
        return _failed(first, limits)
    reply = _Reply(body.model, chat)
    if body.stream:
        call.close()  # the streaming response watches the connection itself
        return StreamingResponse(_stream(call, req, reply, first), media_type="text/event-stream")
    try:
        kind, payload = first
        while kind == "delta":
            kind, payload = await call.next()
        if kind != "done":
            req.cancelled = True
            return _failed((kind, payload), limits)
        return _JSON(reply.full(payload))
    finally:
        call.close()


async def _first_event(call: _Call, req: GenRequest, engine: Engine, limits: Limits) -> tuple[str, Any]:
    """The first event of ``req``; gives up (cancelling it) when it has no token ``request_timeout_s`` after queueing
    or when its client leaves."""
    deadline = req.enqueued + limits.request_timeout_s
    while True:
        waiting = getattr(req, "first_token_at", None) is None
        timeout = max(0.0, deadline - time.monotonic()) if waiting else None
        kind, payload = await call.next(timeout)
        if kind == "timeout" and getattr(req, "first_token_at", None) is not None:
            continue  # started in time; its first text is held back (a possible stop string)
        if kind in ("timeout", "disconnect"):
            req.cancelled = True
            if kind == "timeout":
                _rejection_counter(engine)("timeout")
                return "timeout", limits.request_timeout_s
        return kind, payload


def _failed(event: tuple[str, Any], limits: Limits) -> Response:
    kind, payload = event
    if kind == "timeout":
        return error_response(
            503,
            f"The request waited over {limits.request_timeout_s:g}s for a free place in the batch; retry later.",
            retry_after=limits.retry_after_s,
        )
    if kind == "disconnect":
        return Response(status_code=499)  # nobody reads it: the client left
    status, message = payload
    return error_response(status, _safe_message(status, message), retry_after=limits.retry_after_s)


class _Reply:
    """The OpenAI response objects for one request (full or streamed chunks)."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model, self.chat = model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def full(self, done: dict) -> dict:
        choice: dict[str, Any] = {"index": 0, "finish_reason": done["finish_reason"], "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": done["text"]}
        else:
            choice["text"] = done["text"]
        usage = {
            "prompt_tokens": done["prompt_tokens"],
            "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"],
        }
        head = {"id": self.id, "object": self.object, "created": self.created, "model": self.model}
        return head | {"choices": [choice], "usage": usage}

    def chunk(self, text: str | None, finish: str | None, first: bool = False) -> str:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        obj = self.object + (".chunk" if self.chat else "")
        data = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}
        return f"data: {json.dumps(data)}\n\n"


async def _stream(call: _Call, req: GenRequest, reply: _Reply, first: tuple[str, Any]) -> AsyncIterator[str]:
    """SSE chunks, starting with the already received first event; the row is dropped if the client leaves."""
    try:
        if reply.chat:
            yield reply.chunk("", None, first=True)
        kind, payload = first
        while True:
            if kind == "delta":
                yield reply.chunk(payload, None)
            elif kind == "done":
                yield reply.chunk(None if reply.chat else "", payload["finish_reason"])
                break
            else:
                status, message = payload
                error = {"message": _safe_message(status, message), "code": status}
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
            kind, payload = await call.events.get()
        yield "data: [DONE]\n\n"
    finally:
        req.cancelled = req.finished is None  # client went away: the scheduler drops the row
