"""One generation request from submission to its answer: queue each choice, wait for the first tokens (the
``request_timeout_s`` deadline is enforced here), then reply whole or as a server-sent event stream; a client that
leaves has its rows dropped."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from .config import ServeConfig
from .errors import timeout_message
from .protocol import Reply, SafeJSON, SamplingRequest, error_body, error_response, safe_message, sse
from .scheduler import GenRequest

Event = tuple[int, str, Any]  # (choice index, kind, payload); index -1 for "timeout" / "disconnect"


def rejection_counter(engine: Any) -> Callable[[str], None]:
    """``reject(reason)``: count a refused request in the engine's metrics (``nora_rejections_total``)."""
    metrics = getattr(engine, "metrics", None)
    if metrics is None or not hasattr(metrics, "rejected"):
        return lambda reason: None
    return metrics.rejected


class Call:
    """The events of one request's choices, seen from the event loop, plus whether its client is still there."""

    def __init__(self, request: Request) -> None:
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.request = request
        self.gone = asyncio.ensure_future(self._wait_disconnect())

    def listener(self, index: int) -> Callable[[str, Any], None]:
        """The ``on_event`` of choice ``index`` (called from the scheduler thread)."""

        def on_event(kind: str, payload: Any) -> None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (index, kind, payload))

        return on_event

    async def _wait_disconnect(self) -> None:
        while (await self.request.receive())["type"] != "http.disconnect":
            pass

    async def next(self, timeout: float | None = None) -> Event:
        """The next event; ``(-1, "disconnect", None)`` when the client left, ``(-1, "timeout", None)`` after
        ``timeout`` seconds."""
        get = asyncio.ensure_future(self.events.get())
        done, _ = await asyncio.wait({get, self.gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        return (-1, "disconnect", None) if self.gone in done else (-1, "timeout", None)

    def close(self) -> None:
        self.gone.cancel()


async def generate(
    engine: Any,
    body: SamplingRequest,
    prompts: list[list[int]],
    max_tokens: list[int],
    stop: list[str],
    *,
    adapter: str | None,
    chat: bool,
    request: Request,
) -> Response:
    """Queue one row per prompt (choice ``i`` gets ``max_tokens[i]``), wait for every first token, then answer."""
    call = Call(request)
    reqs = [
        GenRequest(
            prompt_ids=ids,
            adapter=adapter,
            max_tokens=n,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=stop,
            seed=body.seed,
            ignore_eos=body.ignore_eos,
            on_event=call.listener(i),
            model=body.model,
        )
        for i, (ids, n) in enumerate(zip(prompts, max_tokens))
    ]
    try:
        for req in reqs:
            engine.submit(req)
        early = await _first_events(call, reqs, engine)
    except BaseException:
        _cancel(reqs)
        call.close()
        raise
    if early[-1][1] in ("error", "timeout", "disconnect"):
        _cancel(reqs)
        call.close()
        return _failed(early[-1], engine.config)
    reply = Reply(body.model, chat)
    if body.stream:
        call.close()  # the streaming response watches the connection itself
        return StreamingResponse(_stream(call, reqs, reply, early, body.include_usage), media_type="text/event-stream")
    try:
        return await _whole(call, reqs, reply, early, engine.config)
    finally:
        call.close()


def _cancel(reqs: list[GenRequest]) -> None:
    for req in reqs:
        req.cancelled = req.finished is None


async def _first_events(call: Call, reqs: list[GenRequest], engine: Any) -> list[Event]:
    """The events up to the first of every choice (or up to the first failure, which ends the list). A choice with no
    token ``request_timeout_s`` after queueing fails the request with ``timeout``; so does a client that leaves."""
    timeout_s = engine.config.request_timeout_s
    deadline = min(r.enqueued for r in reqs) + timeout_s
    events: list[Event] = []
    seen: set[int] = set()
    while len(seen) < len(reqs):
        waiting = any(reqs[i].first_token_at is None for i in range(len(reqs)) if i not in seen)
        event = await call.next(max(0.0, deadline - time.monotonic()) if waiting else None)
        if event[1] == "timeout" and all(r.first_token_at is not None for r in reqs):
            continue  # all started in time; a first text is held back (a possible stop string)
        if event[1] == "timeout":
            rejection_counter(engine)("timeout")
            return [*events, (-1, "timeout", timeout_s)]
        events.append(event)
        if event[1] in ("error", "disconnect"):
            return events
        seen.add(event[0])
    return events


def _failed(event: Event, config: ServeConfig) -> Response:
    _, kind, payload = event
    if kind == "timeout":
        return error_response(
            503,
            timeout_message(config.request_timeout_s),
            retry_after=config.retry_after_s,
        )
    if kind == "disconnect":
        return Response(status_code=499)  # nobody reads it: the client left
    status, message = payload
    return error_response(status, safe_message(status, message), retry_after=config.retry_after_s)


async def _whole(call: Call, reqs: list[GenRequest], reply: Reply, early: list[Event], config: ServeConfig) -> Response:
    """The non-streaming answer: every choice's ``done`` payload, or the first failure."""
    done: dict[int, dict] = {}
    pending = list(early)
    while len(done) < len(reqs):
        index, kind, payload = pending.pop(0) if pending else await call.next()
        if kind == "done":
            done[index] = payload
        elif kind != "delta":
            _cancel(reqs)
            return _failed((index, kind, payload), config)
    return SafeJSON(reply.full([done[i] for i in range(len(reqs))]))


async def _stream(
    call: Call, reqs: list[GenRequest], reply: Reply, early: list[Event], include_usage: bool
) -> AsyncIterator[str]:
    """SSE chunks, starting with the events already received; the rows are dropped if the client leaves."""
    try:
        if reply.chat:
            yield reply.chunk(0, "", None, first=True)
        done: dict[int, dict] = {}
        pending = list(early)
        while len(done) < len(reqs):
            index, kind, payload = pending.pop(0) if pending else await call.events.get()
            if kind == "delta":
                yield reply.chunk(index, payload, None)
            elif kind == "done":
                done[index] = payload
                yield reply.chunk(index, None if reply.chat else "", payload["finish_reason"])
            else:
                status, message = payload
                body = error_body(status, safe_message(status, message))
                yield sse(body)
                break
        else:
            if include_usage:
                yield reply.usage_chunk([done[i] for i in range(len(reqs))])
        yield "data: [DONE]\n\n"
    finally:
        _cancel(reqs)  # client went away (or one choice failed): the scheduler drops the rows
