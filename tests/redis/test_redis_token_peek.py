"""TokenLimiter.peek on Redis (sync and asyncio): the Decision reserve would give now,
from a read-only twin of reserve.lua that charges nothing, takes no lease, writes
nothing (it runs on a full server too); and the LLM middleware, which peeks before
reading a body, refuses a key at its limit on Redis without reading it."""

from __future__ import annotations

import asyncio
import math
import random
import socket
import time

import pytest
import redis
from support.servers import ASGIServer, RedisServer

import nexus_limits as nl
import nexus_limits.redis as nlr
import nexus_limits.redis.asyncio as nla
from nexus_limits.adapters.llm import LLMLimitMiddleware

LIMITS = {"requests": "5/minute", "tokens": "1000/minute", "daily_tokens": 5000, "concurrency": 2}


def same(a: nl.Decision, b: nl.Decision) -> None:
    assert (a.allowed, a.limit, a.remaining) == (b.allowed, b.limit, b.remaining), (a, b)
    assert a.reset_after == pytest.approx(b.reset_after, abs=2e-6), (a, b)
    if math.isinf(a.retry_after):
        assert math.isinf(b.retry_after), (a, b)
    else:
        assert a.retry_after == pytest.approx(b.retry_after, abs=2e-6), (a, b)


def same_reservation(a, b) -> None:
    same(a.decision, b.decision)
    for name in ("requests", "tokens", "daily_tokens", "concurrency"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            same(x, y)
    assert a.headers() == b.headers()


def test_peek_answers_as_in_process_through_a_random_schedule(redis_client):
    """Reserves, settles (over and under the estimate), cancels and time passing, with a
    peek of several sizes after each step: Redis and in-process agree on every one."""
    rng = random.Random(20)
    clock = nl.ManualClock(1_700_000_000.0)
    remote = nlr.TokenLimiter(redis_client, clock=clock, **LIMITS)
    local = nl.TokenLimiter(clock=clock, **LIMITS)
    held = []
    for step in range(250):
        roll = rng.random()
        if roll < 0.4:
            tokens = rng.choice([0, 1, 50, 400, 999, 1000, 1001, 6000])
            pair = (remote.reserve("k", tokens), local.reserve("k", tokens))
            same_reservation(*pair)
            if pair[0].allowed:
                held.append(pair)
        elif roll < 0.6 and held:
            r, q = held.pop(rng.randrange(len(held)))
            actual = rng.choice([0, 10, 700, 2500])
            assert r.settle(actual) == q.settle(actual)
        elif roll < 0.7 and held:
            r, q = held.pop(rng.randrange(len(held)))
            assert r.cancel() == q.cancel()
        else:
            clock.advance(rng.choice([0.5, 3.0, 12.0, 61.0]))
        for tokens in (0, 1, 300, 1000, 2000):
            p, q = remote.peek("k", tokens), local.peek("k", tokens)
            same_reservation(p, q)
            assert p.done and not p.settle(1) and not p.cancel(), step


def test_peek_charges_nothing_and_writes_nothing(redis_client, clock):
    tl = nlr.TokenLimiter(redis_client, clock=clock, **LIMITS)
    held = tl.reserve("k", 900)
    assert held.allowed
    before = (
        int(redis_client.info("persistence")["rdb_changes_since_last_save"]),
        {k: redis_client.dump(k) for k in redis_client.scan_iter()},
    )
    stats = tl.stats()
    for tokens in (0, 100, 101, 5000):
        for _ in range(3):
            p = tl.peek("k", tokens)
            assert p.allowed == (tokens <= 100), tokens
            assert p.concurrency is not None and p.concurrency.remaining == 0, (
                "one of two held: this one would be the last"
            )
    assert tl.peek("fresh").allowed and tl.peek("fresh").tokens.remaining == 1000
    after = (
        int(redis_client.info("persistence")["rdb_changes_since_last_save"]),
        {k: redis_client.dump(k) for k in redis_client.scan_iter()},
    )
    assert after == before, "not one write"
    assert tl.stats() == stats, "a peek is not a check: nothing counted"
    assert held.settle(900)


def test_peek_sees_a_full_concurrency_limit_and_expired_leases(redis_client, clock):
    tl = nlr.TokenLimiter(redis_client, concurrency=1, lease_ttl=10, clock=clock)
    held = tl.reserve("k", 0)
    p = tl.peek("k")
    assert not p.allowed and p.retry_after == pytest.approx(10.0)
    clock.advance(10)  # the lease ran out its lease_ttl: not counted, though still stored
    assert redis_client.zcard(tl.redis_keys("k")[-1]) == 1
    assert tl.peek("k").allowed
    clock.advance(0.001)
    assert not held.settle(0), "too late"


def test_peek_in_debt_and_above_capacity(redis_client, clock):
    tl = nlr.TokenLimiter(redis_client, tokens="100/minute", clock=clock)
    r = tl.reserve("k", 10)
    assert r.settle(160)  # 60 tokens of debt
    p = tl.peek("k")
    assert not p.allowed and p.retry_after == pytest.approx(36.0), "out of debt in 60 tokens' time"
    assert math.isinf(tl.peek("other", 101).retry_after), "never: above the capacity"


def test_peek_refuses_bad_tokens_as_reserve(redis_client):
    tl = nlr.TokenLimiter(redis_client, tokens="100/minute")
    for bad, exc in ((-1, ValueError), (1.5, TypeError), (True, TypeError), ("5", TypeError), (None, TypeError)):
        with pytest.raises(exc, match="tokens must be a non-negative"):
            tl.peek("k", bad)
    with pytest.raises(TypeError, match="key must be str, bytes or int"):
        tl.peek(1.5)


def test_peek_follows_on_error_when_redis_is_away():
    client = redis.Redis(port=1, socket_connect_timeout=0.2, socket_timeout=0.2)  # nothing listens
    opened = nlr.TokenLimiter(client, tokens="100/minute", on_error="allow").peek("k")
    assert opened.allowed and opened.decision.fallback and opened.done
    closed = nlr.TokenLimiter(client, tokens="100/minute", on_error="deny").peek("k")
    assert not closed.allowed and closed.decision.fallback
    with pytest.raises(nl.BackendUnavailable, match="could not be reached"):
        nlr.TokenLimiter(client, tokens="100/minute").peek("k")
    client.close()


@pytest.fixture
def full_server():
    server = RedisServer().start()
    admin = redis.Redis(port=server.port)
    admin.config_set("maxmemory-policy", "noeviction")
    yield server, admin
    admin.config_set("maxmemory", 0)
    admin.close()
    server.close()


def test_peek_answers_on_a_full_server(full_server):
    server, admin = full_server
    client = redis.Redis(port=server.port, socket_timeout=5)
    tl = nlr.TokenLimiter(client, tokens="100/minute", concurrency=3)
    held = tl.reserve("k", 40)
    assert held.allowed
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory", max(used - 512 * 1024, 1024))  # over its limit from now on
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        admin.set("probe", "x")
    p = tl.peek("k", 60)
    assert p.allowed and not p.decision.fallback and p.tokens.remaining == 0
    assert not tl.peek("k", 61).allowed
    with pytest.raises(nl.BackendUnavailable, match="full"):
        tl.reserve("k", 1)
    client.close()


def test_the_asyncio_peek(async_redis_client):
    async def main() -> None:
        client = async_redis_client()
        try:
            clock = nl.ManualClock(1_000.0)
            tl = nla.TokenLimiter(client, requests="1/minute", tokens="100/minute", clock=clock)
            local = nl.TokenLimiter(requests="1/minute", tokens="100/minute", clock=clock)
            p = await tl.peek("k", 30)
            same_reservation(p, local.peek("k", 30))
            assert p.done and await p.settle(1) is False and await p.cancel() is False
            r = await tl.reserve("k", 30)
            local.reserve("k", 30)
            same_reservation(await tl.peek("k"), local.peek("k"))
            assert not (await tl.peek("k")).allowed, "the request limit is spent"
            assert await r.settle(20)
        finally:
            await client.aclose()

    asyncio.run(main())


# ---------------------------------------------------------------- the LLM middleware


async def upstream(scope, receive, send):  # pragma: no cover - never reached in these tests
    CALLED.append(scope["path"])
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})


CALLED: list = []


def head_only(port: int, key: str) -> bytes:
    """Sends a request's head announcing a 1 MB body, and never the body: the answer
    comes only if the middleware decides without reading it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer "
            + key.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
        )
        deadline = time.monotonic() + 5
        data = b""
        while b"\r\n\r\n" not in data and time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break  # no answer: the middleware waits for the body
            if not chunk:
                break
            data += chunk
        return data


def with_lifespan(app, on_shutdown):
    """``app``, closing what ``on_shutdown`` closes on uvicorn's own loop when it stops
    (an asyncio client's connections live on that loop)."""

    async def wrapped(scope, receive, send):
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await on_shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    return wrapped


@pytest.mark.parametrize("side", ["sync", "asyncio"])
def test_the_middleware_refuses_a_key_at_its_limit_before_reading_the_body(side, redis_server, redis_client):
    import redis.asyncio

    limits = {"requests": "1/minute", "tokens": "10000/minute"}
    client = redis.asyncio.Redis(port=redis_server.port)
    tl = nlr.TokenLimiter(redis_client, **limits) if side == "sync" else nla.TokenLimiter(client, **limits)
    spender = nlr.TokenLimiter(redis_client, **limits)
    assert spender.reserve("sk-spent", 10).allowed  # another process spent the key's requests
    CALLED.clear()
    app = with_lifespan(LLMLimitMiddleware(upstream, limiter=tl), client.aclose)
    with ASGIServer(app, lifespan="on") as server:
        answer = head_only(server.port, "sk-spent")
    assert answer.startswith(b"HTTP/1.1 429"), answer[:200]
    assert b"retry-after" in answer.lower()
    assert CALLED == [], "the upstream never saw it"
