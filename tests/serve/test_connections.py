"""Connections on loopback with raw sockets: idle sockets cannot lock out health checks or clients that send, one
client address holds a bounded number of sockets, requests in progress are bounded while ``/health`` keeps room, and
every refusal is OpenAI's JSON error shape. Each test waits a few seconds at most."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from tests.serve.conftest import MAX_TOKENS, PROMPTS, make_engine, serve


@pytest.fixture
def started(serve_env):
    servers = []

    def start(**settings):
        srv = serve(make_engine(serve_env, header_timeout_s=5.0, **settings))
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def _idle_sockets(port: int, n: int) -> list[socket.socket]:
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if i % 2:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        socks.append(s)
    return socks


def _reply(s: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of what the server sent on ``s`` before closing it."""
    s.settimeout(5)
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _complete(url: str) -> httpx.Response:
    body = {"model": "base", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=30)


def test_idle_sockets_do_not_lock_out_health_or_senders(started, serve_env):
    srv = started(max_connections=8, max_connections_per_client=1000)
    socks = _idle_sockets(srv.port, 41)  # past max_connections + HEALTH_ROOM: the oldest idle ones make room
    try:
        for _ in range(16):
            r = httpx.get(f"{srv.url}/health", timeout=5)
            assert r.status_code == 200 and r.json() == {"status": "ok"}
        r = _complete(srv.url)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == serve_env.expected[("base", PROMPTS[0])]
    finally:
        for s in socks:
            s.close()


def test_one_client_address_is_bounded_and_refused_as_json(started):
    srv = started(max_connections=64, max_connections_per_client=3)
    results: list[httpx.Response] = []
    with srv.engine.lock:  # the three requests stay in progress: none of their sockets is idle
        workers = [threading.Thread(target=lambda: results.append(_complete(srv.url))) for _ in range(3)]
        for w in workers:
            w.start()
        time.sleep(0.5)
        status, body = _reply(socket.create_connection(("127.0.0.1", srv.port), timeout=5))
        assert (
            status == 503
            and body["error"]["type"] == "server_error"
            and "--max-connections" in body["error"]["message"]
        )
    for w in workers:
        w.join(30)
    assert [r.status_code for r in results] == [200, 200, 200]
    idle = _idle_sockets(srv.port, 3)  # idle sockets of the same client give way to a new one
    try:
        assert httpx.get(f"{srv.url}/health", timeout=5).status_code == 200
    finally:
        for s in idle:
            s.close()


def test_requests_in_progress_are_bounded_and_health_keeps_room(started):
    srv = started(max_connections=2, max_connections_per_client=1000)
    results: list[httpx.Response] = []
    with srv.engine.lock:
        workers = [threading.Thread(target=lambda: results.append(_complete(srv.url))) for _ in range(2)]
        for w in workers:
            w.start()
        time.sleep(0.5)
        busy = _complete(srv.url)
        assert busy.status_code == 503 and busy.headers["Retry-After"] == str(srv.engine.config.retry_after_s)
        assert busy.json()["error"]["code"] == "server_busy"
        assert httpx.get(f"{srv.url}/health", timeout=5).status_code == 200
    for w in workers:
        w.join(30)
    assert [r.status_code for r in results] == [200, 200]
    assert srv.engine.snapshot_metrics()["rejections"].get("busy") == 1
