"""The server's outer wall: API-key roles, the body-size limit, the request and connection limits, and read deadlines.

:class:`Guard` is the ASGI middleware (roles, body size, requests in progress, the last line against unexpected
exceptions); :func:`guarded_h11_protocol` is uvicorn's h11 protocol with read deadlines and a connection book (a
limit per client address, and idle sockets make room rather than lock others out); :func:`uvicorn_config` puts the
two together the way ``nora serve`` runs.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import HEALTH_ROOM, ServeConfig
from .protocol import error_body, error_response

log = logging.getLogger("nora_peft.serve")

OPEN_PATHS = frozenset({"/health"})
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})


def bearer_token(headers: Any) -> bytes:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme in any case, as RFC 7235 says)."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip()
    return b""


class Guard:
    """Pure ASGI middleware: API-key roles, the body-size limit, requests in progress, unexpected exceptions.

    Roles: ``/health`` is open. ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` need the admin key (with
    no admin key set they are refused when a user key is set, and open when neither is). Everything else
    (generation, ``/v1/models``, ``/metrics``, ``/docs``, ``/openapi.json``) needs the user key when one is set;
    the admin key is accepted there too. Keys are compared in constant time.

    A body over ``max_body_bytes`` gets a 413: at once when its ``Content-Length`` says so (the body is never
    read), else as soon as the bytes received pass the limit. More than ``max_connections`` requests in progress
    get a JSON 503 with ``Retry-After`` (``/health`` is never counted nor refused).

    An exception that escapes the app becomes a logged 500 without internals; it is not re-raised (so the
    keep-alive connection stays open).
    """

    def __init__(self, app: ASGIApp, config: ServeConfig, on_reject: Callable[[str], None] = lambda r: None) -> None:
        self.app = app
        self.config = config
        self.on_reject = on_reject
        self.user_key = config.api_key.encode() if config.api_key else None
        self.admin_key = config.admin_key.encode() if config.admin_key else None
        self.in_progress = 0

    def _denied(self, scope: Scope) -> tuple[int, str] | None:
        path = scope["path"]
        if path in OPEN_PATHS:
            return None
        got = bearer_token(scope.get("headers", ()))
        is_admin = self.admin_key is not None and hmac.compare_digest(got, self.admin_key)
        is_user = self.user_key is not None and hmac.compare_digest(got, self.user_key)
        if path in ADMIN_PATHS:
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

    def _refusal(self, scope: Scope) -> Any:
        """The response that ends a request before the app sees it, or ``None``."""
        denied = self._denied(scope)
        if denied is not None:
            self.on_reject("unauthorized" if denied[0] == 401 else "forbidden")
            return error_response(*denied)
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), b"0")
        if not declared.isdigit() or int(declared) > self.config.max_body_bytes:
            self.on_reject("too_large")
            response = too_large(self.config)
            response.headers["Connection"] = "close"  # the unread body would follow on this connection
            return response
        if scope["path"] not in OPEN_PATHS and self.in_progress >= self.config.max_connections:
            self.on_reject("busy")
            message = f"The server has {self.in_progress} requests in progress (--max-connections); retry later."
            return error_response(503, message, retry_after=self.config.retry_after_s)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        counted = scope["path"] not in OPEN_PATHS
        self.in_progress += counted
        try:
            await self._forward(scope, receive, send)
        finally:
            self.in_progress -= counted

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        started, received = False, 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.config.max_body_bytes:
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


def too_large(config: ServeConfig) -> Any:
    """The 413 for a body over ``max_body_bytes``."""
    message = f"The request body is larger than the limit of {config.max_body_bytes} bytes (--max-body-bytes)."
    return error_response(413, message, "body")


# -- connections --------------------------------------------------------------------------------------------------
class ConnectionBook:
    """The open sockets, oldest first, and how many each client address holds.

    A new socket past ``max_connections + HEALTH_ROOM`` (or past ``max_connections_per_client`` for its address)
    closes the oldest idle one (no request in progress: it sent nothing, or only part of its headers, or waits
    between keep-alive requests) -- so sockets that send nothing cannot lock out those that do. When none is idle
    the new socket is refused with a JSON 503.
    """

    def __init__(self, config: ServeConfig) -> None:
        self.total = config.max_connections + HEALTH_ROOM
        self.per_client = config.max_connections_per_client
        self.open: OrderedDict[Any, str] = OrderedDict()  # protocol -> client address
        self.count: dict[str, int] = {}

    def admit(self, conn: Any, host: str) -> bool:
        """Record ``conn`` from ``host``, closing an idle socket to make room; ``False``: refuse it."""
        if self.count.get(host, 0) >= self.per_client and not self._close_idle(host):
            return False
        if len(self.open) >= self.total and not self._close_idle(None):
            return False
        self.open[conn] = host
        self.count[host] = self.count.get(host, 0) + 1
        return True

    def release(self, conn: Any) -> None:
        host = self.open.pop(conn, None)
        if host is not None:
            self.count[host] -= 1
            if not self.count[host]:
                del self.count[host]

    def _close_idle(self, host: str | None) -> bool:
        victim = next((c for c, h in self.open.items() if (host is None or h == host) and c.is_idle()), None)
        if victim is None:
            return False
        self.release(victim)
        victim.transport.close()
        return True


def _busy_reply(config: ServeConfig) -> bytes:
    body = json.dumps(error_body(503, "Too many open connections (--max-connections); retry later.")).encode()
    head = (
        f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"retry-after: {config.retry_after_s}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def guarded_h11_protocol(config: ServeConfig) -> type:  # long: a class factory, its length is the class body
    """uvicorn's h11 protocol with read deadlines and a :class:`ConnectionBook`.

    Read deadlines: a client gets ``header_timeout_s`` to send a request's headers and ``body_timeout_s`` to send
    its body, else the connection is closed (uvicorn itself only times out idle keep-alive connections, so a client
    sending one header line every few seconds would hold a socket forever).
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    book = ConnectionBook(config)
    refusal = _busy_reply(config)

    class GuardedH11Protocol(H11Protocol):
        _read_timer: asyncio.TimerHandle | None = None
        _read_phase: Any = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            host = self.client[0] if self.client else ""
            if not book.admit(self, host):
                self.logger.warning("refusing a connection from %s: connection limit reached", host)
                transport.write(refusal)
                transport.close()
                return
            self._update_read_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._update_read_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._update_read_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            book.release(self)
            if self._read_timer is not None:
                self._read_timer.cancel()
            super().connection_lost(exc)

        def is_idle(self) -> bool:
            """No request in progress: nothing (or only part of the headers) received, no response being sent."""
            return self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE

        def _update_read_timer(self) -> None:
            state = self.conn.their_state
            phase = state if state in (h11.IDLE, h11.SEND_BODY) else None
            if phase is self._read_phase:
                return
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None
            self._read_phase = phase
            if phase is not None:
                limit = config.header_timeout_s if phase is h11.IDLE else config.body_timeout_s
                self._read_timer = self.loop.call_later(limit, self._read_timed_out, phase)

        def _read_timed_out(self, phase: Any) -> None:
            if self.conn.their_state is phase and not self.transport.is_closing():
                self.logger.info(
                    "closing a connection that sent no complete request %s in time",
                    "headers" if phase is h11.IDLE else "body",
                )
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(app: Any, config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> Any:
    """The uvicorn settings ``nora serve`` runs with: the guarded h11 protocol (read deadlines, connection book); the
    request limit is :class:`Guard`'s, so uvicorn's own ``limit_concurrency`` (plain-text 503s, idle sockets
    counted) stays off."""
    import uvicorn

    options = {"log_level": "info", "timeout_keep_alive": 5, **kwargs}
    return uvicorn.Config(app, host=host, port=port, http=guarded_h11_protocol(config), **options)
