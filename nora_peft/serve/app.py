"""The OpenAI-compatible ASGI app (FastAPI) over an :class:`~nora_peft.serve.engine.Engine`: ``create_app`` and the
routes.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``"stream": true`` SSE),
``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``
(vLLM-style), ``GET``/``HEAD /health``, ``GET /metrics`` (Prometheus text; ``?format=json`` for JSON). The
request's ``model`` names an adapter or the base model.

A request passes, in order: :class:`~nora_peft.serve.guard.Guard` (roles, body size, requests in progress), field
validation (:mod:`~nora_peft.serve.protocol`, strict types), :class:`~nora_peft.serve.admission.Admission` (checks
that need no tokenizer, then tokenizing off the event loop), and :func:`~nora_peft.serve.serving.generate` (the
queue: 503 with ``Retry-After`` when full, or when it waited ``request_timeout_s`` without a first token). Errors use
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``; a client's mistake is never a 500, messages carry
no server paths or internals, and the connection stays usable. See docs/serving.md (security, limits, roles, errors).
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .admission import Admission
from .engine import Engine
from .errors import AdapterError
from .guard import Guard, too_large
from .protocol import (
    ChatRequest,
    CompletionRequest,
    LoadAdapterRequest,
    SafeJSON,
    UnloadAdapterRequest,
    error_response,
    safe_message,
)
from .serving import generate, rejection_counter


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI app (wrapped by :class:`~nora_peft.serve.guard.Guard`) with the settings of ``engine.config``;
    the engine's loop starts and stops with the app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="nora serve", lifespan=lifespan)
    _add_error_handlers(app, engine)
    _add_info_routes(app, engine)
    _add_adapter_routes(app, engine)
    _add_generation_routes(app, engine)
    app.add_middleware(Guard, config=engine.config, on_reject=rejection_counter(engine))
    return app


def _add_error_handlers(app: FastAPI, engine: Engine) -> None:
    reject = rejection_counter(engine)

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
        message = safe_message(exc.status, str(exc))
        return error_response(exc.status, message, exc.param, engine.config.retry_after_s)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:
            reject("too_large")
            return too_large(engine.config)
        return error_response(exc.status_code, str(exc.detail))


def _model_card(engine: Engine, name: str, created: int) -> dict[str, Any]:
    parent = None if name == engine.base_name else engine.base_name
    return {"id": name, "object": "model", "created": created, "owned_by": "nora-peft", "root": engine.base_name} | {
        "parent": parent
    }


def _add_info_routes(app: FastAPI, engine: Engine) -> None:
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.head("/health", include_in_schema=False)
    async def health_head() -> Response:  # load balancers probe with HEAD
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics(request: Request, format: str = "prometheus") -> Response:
        """Prometheus text by default; JSON with ``?format=json`` or ``Accept: application/json``."""
        wants_json = format == "json" or "application/json" in request.headers.get("accept", "")
        if wants_json or not hasattr(engine, "prometheus_metrics"):
            return SafeJSON(engine.snapshot_metrics())
        return PlainTextResponse(engine.prometheus_metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        now = int(time.time())
        return {"object": "list", "data": [_model_card(engine, n, now) for n in engine.model_names()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        name = engine.check_model(model_id) or engine.base_name  # 404 in OpenAI's shape when unknown
        return _model_card(engine, name, int(time.time()))


def _add_adapter_routes(app: FastAPI, engine: Engine) -> None:
    @app.post("/v1/load_lora_adapter")
    def load_adapter(body: LoadAdapterRequest) -> dict:  # sync: runs in the threadpool (reads files, takes the lock)
        engine.load_adapter(body.lora_name, body.lora_path)
        return {"status": "ok", "lora_name": body.lora_name}

    @app.post("/v1/unload_lora_adapter")
    def unload_adapter(body: UnloadAdapterRequest) -> dict:
        engine.unload_adapter(body.lora_name)
        return {"status": "ok", "lora_name": body.lora_name}


def _add_generation_routes(app: FastAPI, engine: Engine) -> None:
    admission = Admission(engine)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        stop = admission.check(body)
        prompts = admission.completion_prompts(body)
        adapter = engine.check_model(body.model)
        ids = [await admission.encode(p) for p in prompts]
        max_tokens = [body.max_tokens or 16] * len(ids)  # OpenAI's default for completions
        return await generate(engine, body, ids, max_tokens, stop, adapter=adapter, chat=False, request=request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        stop = admission.check(body)
        messages = admission.chat_messages(body)
        adapter = engine.check_model(body.model)
        ids = await admission.encode_chat(messages)
        # without a limit a chat may fill the model's context, as in vLLM
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, engine.context_len - len(ids))
        return await generate(engine, body, [ids], [max_tokens], stop, adapter=adapter, chat=True, request=request)
