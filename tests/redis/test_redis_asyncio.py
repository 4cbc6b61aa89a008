"""nexus_limits.redis.asyncio: the same semantics, every method a coroutine."""

from __future__ import annotations

import asyncio
import math
import time
import uuid

import pytest
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

import nexus_limits as nl
import nexus_limits.redis.asyncio as nla


def run(coro):
    return asyncio.run(coro)


def test_same_semantics_as_sync(async_redis_client):
    async def main() -> None:
        client = async_redis_client()
        clock = nl.ManualClock(1_700_000_000.0)
        tb = nla.TokenBucket(client, "100/minute", burst=20, clock=clock, prefix=f"a{uuid.uuid4().hex[:6]}")
        d = await tb.hit("k", 20)
        assert d.allowed and d.remaining == 0 and d.reset_after == pytest.approx(12.0)
        d = await tb.hit("k")
        assert not d.allowed and d.retry_after == pytest.approx(0.6)
        assert (await tb.peek("other")).remaining == 19
        assert (await tb.hit("k", 21)).retry_after == math.inf
        assert not await tb.try_acquire("k")
        clock.advance(0.6)
        assert await tb.try_acquire("k")
        await tb.reset("k")
        assert await tb.get_limit("k") == (True, 20)
        before = clock.now
        await tb.acquire("j", 20)
        await tb.acquire_async("j")
        assert clock.now - before == pytest.approx(0.6)
        with pytest.raises(nl.RateLimitExceeded):
            await tb.acquire("j", timeout=0.1)

        both = nla.Composite(
            [nla.FixedWindow(client, "3/minute", clock=clock), nla.LeakyBucket(client, "1/s", clock=clock)]
        )
        assert (await both.hit("c")).allowed
        assert not (await both.hit("c")).allowed, "the leaky bucket (capacity 1) is full"
        assert both.limit == 1 and len(both.parts) == 2
        await both.reset("c")
        assert (await both.get_limit("c")) == (True, 1)
        sw = nla.SlidingWindow(client, "10/10s", clock=clock)
        assert (await sw.hit("s", 10)).allowed
        assert isinstance(tb, nl.AsyncRateLimiter)
        assert repr(tb).startswith("TokenBucket(<Redis>, '100/minute'")
        assert (tb.rate, tb.limit, tb.on_error, tb.clock, tb.client) == (nl.Rate(100, 60), 20, "raise", clock, client)
        assert tb.redis_key("k").startswith(tb.prefix + ":{sk}")
        await client.aclose()

    run(main())


def test_the_event_loop_keeps_running(async_redis_client):
    async def main() -> float:
        client = async_redis_client()
        tb = nla.TokenBucket(client, "20/s", burst=1)
        ticks = []

        async def ticker() -> None:
            for _ in range(5):
                ticks.append(1)
                await asyncio.sleep(0.005)

        await tb.hit("k")
        start = time.monotonic()
        task = asyncio.ensure_future(ticker())
        await tb.acquire("k", timeout=1)
        await task
        await client.aclose()
        assert len(ticks) == 5
        return time.monotonic() - start

    assert run(main()) >= 0.03


def test_concurrency_leases(async_redis_client):
    async def main() -> None:
        client = async_redis_client()
        clock = nl.ManualClock(1_700_000_000.0)
        c = nla.Concurrency(client, 1, lease_ttl=10, clock=clock)
        lease = await c.try_acquire("k")
        assert lease is not None and await c.try_acquire("k") is None
        d = await c.hit("k")
        assert not d.allowed and d.retry_after == pytest.approx(10.0)
        assert await c.get_limit("k") == (False, 0)
        assert (await c.peek("k")).remaining == 0
        assert await lease.release() and not await lease.release()
        async with c.lease("k") as held:
            assert not held.released
            assert await c.try_acquire("k") is None
        assert held.released
        await c.try_acquire("k")
        got = await c.acquire_async("k")  # waits for the expiry on the manual clock
        assert got.key == "k" and clock.now == pytest.approx(1_700_000_010.0)
        await c.reset("k")
        async with c.lease_async("k"):
            pass
        with pytest.raises(ValueError, match="cost must be 1"):
            await c.hit("k", 3)
        real = nla.Concurrency(client, 1)
        first = await real.acquire("r")
        with pytest.raises(nl.RateLimitExceeded):
            await real.acquire("r", timeout=0.03)
        await first.release()
        assert "Lease(key='r'" in repr(first) and real.limit == 1 and real.lease_ttl == 300.0
        assert real.on_error == "raise" and "Concurrency(<Redis>, 1" in repr(real)
        await client.aclose()

    run(main())


def test_outage_policies():
    async def main() -> None:
        client = redis.asyncio.Redis(port=1, socket_connect_timeout=0.3, retry=Retry(NoBackoff(), 0))
        allow = nla.TokenBucket(client, "1/s", on_error="allow")
        deny = nla.FixedWindow(client, "1/s", on_error="deny")
        fail = nla.SlidingWindow(client, "1/s")
        d = await allow.hit("k")
        assert d.allowed and d.fallback
        d = await deny.hit("k")
        assert not d.allowed and d.fallback
        with pytest.raises(nl.BackendUnavailable):
            await fail.hit("k")
        with pytest.raises(nl.BackendUnavailable):
            await fail.reset("k")
        await deny.reset("k")  # fail-closed limiters do not raise on reset
        cc = nla.Concurrency(client, 1, on_error="allow")
        lease = await cc.try_acquire("k")
        assert lease is not None and lease.fallback and not await lease.release()
        assert (await cc.peek("k")).fallback
        await cc.reset("k")
        assert not await cc._release("k", "x")
        closed = nla.Concurrency(client, 1, on_error="deny")
        assert (await closed.hit("k")).lease is None
        with pytest.raises(nl.BackendUnavailable):
            await nla.Concurrency(client, 1).reset("k")
        await client.aclose()

    run(main())


def test_bad_clients_and_arguments(redis_server):
    sync_client = redis.Redis(port=redis_server.port)
    with pytest.raises(TypeError, match="use nexus_limits.redis with it"):
        nla.TokenBucket(sync_client, "1/s")
    with pytest.raises(TypeError, match="client must be"):
        nla.Concurrency(object(), 1)
    client = redis.asyncio.Redis(port=redis_server.port)
    with pytest.raises(ValueError, match="prefix"):
        nla.TokenBucket(client, "1/s", prefix="{}")
    with pytest.raises(TypeError, match="each Composite part"):
        nla.Composite([nl.TokenBucket("1/s")])

    async def calls() -> None:
        tb = nla.TokenBucket(client, "1/s")
        with pytest.raises(TypeError, match="key must be"):
            await tb.hit(None)
        with pytest.raises(ValueError, match="cost must be"):
            await tb.hit("k", -2)
        await client.aclose()

    run(calls())
