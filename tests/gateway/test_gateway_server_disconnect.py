"""The gateway's own server tells the LLM middleware when a client's connection is lost
(the ``nexus_limits.on_disconnect`` scope extension), instead of a task per request
waiting on ``receive()``. Served exactly as ``nexus-limits gateway`` serves it, against
the fake provider: a client that goes away while the upstream is silent — before its
answer's head, mid-stream, just after sending its request — has the upstream request
cancelled and its concurrency lease freed at once; one that stays is never taken for
gone."""

from __future__ import annotations

import time
from typing import Iterator

import pytest
from support.fake_provider import FakeProvider, serve
from support.gateway_harness import GatewayServer, connect, read_response, wait_until

from nexus_limits.adapters.llm import ON_DISCONNECT

KEY = "sk-watch"
BODY = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}'
STREAM = b'{"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "Say hello"}]}'


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    fake = FakeProvider()
    with serve(fake) as server:
        fake.url = server.url  # type: ignore[attr-defined]
        yield fake


CONFIG = """
[upstream]
url = "{url}"

[gateway]
key = "bearer"
reload = "off"

[tiers.t]
requests = "1000/minute"
tokens = "1000000/minute"
concurrency = 1

[keys]
"{key}" = "t"
"""


@pytest.fixture
def gw(tmp_path, provider) -> Iterator[GatewayServer]:
    provider.clear()
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG.format(url=provider.url, key=KEY))
    with GatewayServer(str(path)) as server:
        yield server


def request(body: bytes, fake: str = "") -> bytes:
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n"
        + (f"x-fake: {fake}\r\n" if fake else "")
        + "\r\n"
    )
    return head.encode() + body


def lease_free(gw: GatewayServer) -> bool:
    probe = gw.app.tiers["t"].limiter.reserve(KEY, 0)
    if probe.allowed:
        probe.cancel()
    return bool(probe.allowed)


def upstream_cancelled(provider: FakeProvider, seconds: float) -> bool:
    return wait_until(lambda: provider.for_key(KEY) and provider.for_key(KEY)[-1].disconnected is not None, seconds)


def follow_up_is_admitted(gw: GatewayServer) -> None:
    with connect(gw.port) as sock:
        sock.sendall(request(BODY))
        status, _, body = read_response(sock)
    assert status == 200, body


def test_the_extension_is_offered_to_the_app(gw):
    seen = []
    middleware = gw.app.tiers["t"]
    app = middleware.app

    async def spy(scope, receive, send):
        seen.append(scope.get("extensions") or {})
        await app(scope, receive, send)

    middleware.app = spy
    try:
        follow_up_is_admitted(gw)
    finally:
        middleware.app = app
    assert seen and callable(seen[0].get(ON_DISCONNECT))


def test_a_client_gone_before_the_answers_head_frees_its_lease_at_once(gw, provider):
    with connect(gw.port) as sock:
        sock.sendall(request(BODY, "pause_headers=5"))
        assert wait_until(lambda: len(provider.for_key(KEY)) == 1, 5), "the call reached the upstream"
        assert not lease_free(gw), "the lease is held while the upstream thinks"
        closed = time.monotonic()
    assert wait_until(lambda: lease_free(gw), 1.0), "freed when the client left, not when the upstream answers"
    assert upstream_cancelled(provider, 1.0), "the upstream request was cancelled"
    assert provider.for_key(KEY)[-1].disconnected - closed < 1.0
    assert wait_until(lambda: gw.app.in_flight == {}, 1.0)
    follow_up_is_admitted(gw)


def test_a_stream_closed_during_upstream_silence_frees_its_lease_at_once(gw, provider):
    with connect(gw.port) as sock:
        sock.sendall(request(STREAM, "pause_mid=5"))
        sock.settimeout(5)
        got = b""
        while b"Hello" not in got:
            chunk = sock.recv(65536)
            assert chunk, got
            got += chunk
        assert not lease_free(gw), "the lease is held while streaming"
        closed = time.monotonic()
    assert wait_until(lambda: lease_free(gw), 1.0), "freed when the client left, not when the upstream speaks again"
    assert upstream_cancelled(provider, 1.0)
    assert provider.for_key(KEY)[-1].disconnected - closed < 1.0
    follow_up_is_admitted(gw)


def test_a_client_gone_right_after_its_request_frees_its_lease(gw, provider):
    # The gateway reads the request whole, then the end of the connection: whether it
    # admits the call before it notices depends on timing. When it did, the watch it
    # starts after admitting fires at once (the connection is already lost).
    limiter = gw.app.tiers["t"].limiter
    for _ in range(3):
        with connect(gw.port) as sock:
            sock.sendall(request(BODY, "pause_headers=5"))
        admitted = wait_until(lambda: limiter.peek(KEY).requests.remaining < 999, 2.0)
        assert wait_until(lambda: gw.app.in_flight == {} and lease_free(gw), 1.0)
        if admitted and provider.for_key(KEY):
            assert upstream_cancelled(provider, 1.0), "an upstream request that started was cancelled"
        follow_up_is_admitted(gw)
        provider.clear()
        limiter.reset(KEY)


def test_a_client_that_stays_is_answered_and_a_kept_alive_connection_is_not_taken_for_gone(gw, provider):
    with connect(gw.port) as sock:
        for _ in range(5):
            sock.sendall(request(BODY, "pause_headers=0.2"))
            status, _, body = read_response(sock)
            assert status == 200 and b"Hello there" in body
            assert wait_until(lambda: lease_free(gw), 1.0), "each call ends its lease"
        assert all(r.disconnected is None for r in provider.for_key(KEY)), "no call was cancelled"
