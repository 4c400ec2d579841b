"""The OpenAI-compatible ASGI app (FastAPI) over an :class:`~nora_peft.serve.engine.Engine`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``"stream": true`` SSE), ``GET /v1/models``,
``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (vLLM-style), ``GET /health``, ``GET /metrics``.
The request's ``model`` names an adapter or the base model. Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``: 400 bad fields (named), 401 no/wrong API key, 404 unknown
model, 503 queue full.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, GenRequest
from .errors import AdapterError

MAX_TOKENS_LIMIT = 4096


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)


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


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}.get(status, "error")
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": status}}
    )


def format_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt for a chat: the tokenizer's chat template if it has one, else the plain template adapters are
    trained with (``nora_peft.lab.data.formatting.PLAIN_TEMPLATE`` per user turn; system text and earlier assistant
    replies as plain paragraphs)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    from ..lab.data.formatting import PLAIN_TEMPLATE

    parts = []
    for m in messages:
        if m["role"] in ("user", "tool"):
            parts.append(PLAIN_TEMPLATE.format(prompt=m["content"]))
        else:  # system / developer / assistant
            parts.append(m["content"] + "\n\n")
    return "".join(parts)


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    """The FastAPI app; the engine's batching loop starts and stops with the app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="nora serve", lifespan=lifespan)

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "Missing or wrong API key: send the header 'Authorization: Bearer <key>'.")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"The request body is not valid JSON: {first.get('msg', '')}.", "body")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if not loc:
            return _error(400, "The request body must be a JSON object (send Content-Type: application/json).", "body")
        field = ".".join(loc) or "body"
        return _error(400, f"Invalid field '{field}': {first.get('msg', 'invalid value')}.", field)

    @app.exception_handler(AdapterError)
    async def adapter_error(request: Request, exc: AdapterError) -> JSONResponse:
        return _error(exc.status, str(exc), exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"Internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> dict:
        return engine.snapshot_metrics()

    @app.get("/v1/models")
    async def models() -> dict:
        now = int(time.time())
        data = [
            {"id": n, "object": "model", "created": now, "owned_by": "nora-peft", "root": engine.base_name}
            | ({"parent": engine.base_name} if n != engine.base_name else {"parent": None})
            for n in engine.model_names()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    def load_adapter(body: LoadAdapterRequest) -> dict:  # sync: runs in the threadpool (waits for the engine lock)
        engine.load_adapter(body.lora_name, body.lora_path)
        return {"status": "ok", "lora_name": body.lora_name}

    @app.post("/v1/unload_lora_adapter")
    def unload_adapter(body: UnloadAdapterRequest) -> dict:
        engine.unload_adapter(body.lora_name)
        return {"status": "ok", "lora_name": body.lora_name}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _generate(body, body.prompt, body.max_tokens or 16, chat=False, request=request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        prompt = format_chat(engine.tokenizer, [m.model_dump() for m in body.messages])
        max_tokens = body.max_completion_tokens or body.max_tokens or 256
        return await _generate(body, prompt, max_tokens, chat=True, request=request)

    async def _generate(body: _Sampling, prompt: str | list[int], max_tokens: int, *, chat: bool, request: Request):
        adapter = engine.check_model(body.model)
        ids = engine.encode(prompt)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req = GenRequest(
            prompt_ids=ids,
            adapter=adapter,
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
            seed=body.seed,
            on_event=lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload)),
        )
        engine.submit(req)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if not body.stream:
            try:
                while True:
                    kind, payload = await events.get()
                    if kind != "delta":
                        break
            except asyncio.CancelledError:
                req.cancelled = True
                raise
            if kind == "error":
                return _error(*payload)
            choice: dict[str, Any] = {"index": 0, "finish_reason": payload["finish_reason"], "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": payload["text"]}
            else:
                choice["text"] = payload["text"]
            usage = {
                "prompt_tokens": payload["prompt_tokens"],
                "completion_tokens": payload["completion_tokens"],
                "total_tokens": payload["prompt_tokens"] + payload["completion_tokens"],
            }
            return {
                "id": rid,
                "object": obj,
                "created": created,
                "model": body.model,
                "choices": [choice],
                "usage": usage,
            }

        def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if first else {}
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            data = {"id": rid, "object": obj + (".chunk" if chat else ""), "created": created, "model": body.model}
            return f"data: {json.dumps(data | {'choices': [choice]})}\n\n"

        async def stream() -> AsyncIterator[str]:
            try:
                if chat:
                    yield chunk("", None, first=True)
                while True:
                    kind, payload = await events.get()
                    if kind == "delta":
                        yield chunk(payload, None)
                    elif kind == "done":
                        yield chunk(None if chat else "", payload["finish_reason"])
                        break
                    else:
                        status, message = payload
                        yield f"data: {json.dumps({'error': {'message': message, 'code': status}})}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                req.cancelled = req.finished is None  # client went away: the engine drops the row

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app
