"""on_error="local": while Redis is away, an in-process limiter with the quota divided by
``replicas`` answers, so a long outage neither opens the API wide nor closes it; when
Redis is back its state is used again, unchanged (nothing counted locally is pushed).
The outage here is a hung server (DEBUG SLEEP), which keeps its data."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis
import redis.asyncio
from support.servers import RedisServer

import nexus_limits as nl
import nexus_limits.redis as nlr
import nexus_limits.redis.asyncio as nla


@pytest.fixture
def server():
    s = RedisServer().start()
    yield s
    s.close()


def hang(port: int, seconds: float) -> threading.Thread:
    def run() -> None:
        c = redis.Redis(port=port)
        c.execute_command("DEBUG", "SLEEP", seconds)
        c.close()

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.1)
    return t


def back(call, deadline: float = 5.0):
    """Calls until an answer comes from Redis again (the breaker's cool-down is 1 s)."""
    end = time.monotonic() + deadline
    d = call()
    while d.fallback and time.monotonic() < end:
        time.sleep(0.05)
        d = call()
    return d


def test_local_share_while_redis_is_away(server):
    client = redis.Redis(port=server.port, socket_timeout=0.3, socket_connect_timeout=0.3)
    clock = nl.ManualClock(1_700_000_000.0)
    try:
        tb = nlr.TokenBucket(client, "10/minute", on_error="local", replicas=2, clock=clock, prefix="l")
        fw = nlr.FixedWindow(client, "100/hour", prefix="l", clock=clock)
        both = nlr.Composite([tb, fw], on_error="local", replicas=4)
        cc = nlr.Concurrency(client, 4, on_error="local", replicas=2, clock=clock, prefix="l")
        assert sum(tb.hit("k").allowed for _ in range(3)) == 3
        assert tb.peek("k").remaining == 6
        sleeper = hang(server.port, 2)

        answers = [tb.hit("k") for _ in range(7)]
        assert all(d.fallback for d in answers)
        assert [d.allowed for d in answers] == [True] * 5 + [False] * 2, "half of the quota, locally"
        assert answers[-1].retry_after == pytest.approx(12.0), "the local share refills at half the rate"
        assert tb.peek("other").remaining == 4 and tb.peek("other").fallback
        assert tb.stats()["fail_local"] == 9 and tb.stats()["fail_open"] == 0

        # A composite: a quarter of each part's quota.
        assert [both.hit("j").allowed for _ in range(4)] == [True, True, False, False]
        d, each = both.hit_each("j")
        assert not d.allowed and d.fallback and len(each) == 2

        # Leases: half of the limit, released locally.
        leases = [cc.try_acquire("k") for _ in range(3)]
        assert leases[0] is not None and leases[1] is not None and leases[2] is None
        assert leases[0].fallback and leases[0].release() and not leases[0].release()
        assert cc.try_acquire("k") is not None
        assert cc.stats()["fail_local"] == 4

        sleeper.join()
        d = back(lambda: tb.hit("k"))
        assert d.allowed and not d.fallback
        # Redis's own state: 3 used before, the check that timed out (it sat in the hung
        # server's socket and ran when it woke), 1 now. The 5 admitted locally are not pushed.
        assert d.remaining == 5
        assert back(lambda: cc.hit("k")).lease is not None
    finally:
        client.close()


def test_local_share_asyncio(server):
    async def main() -> None:
        client = redis.asyncio.Redis(port=server.port, socket_timeout=0.3, socket_connect_timeout=0.3)
        clock = nl.ManualClock(1_700_000_000.0)
        try:
            sw = nla.SlidingWindow(client, "9/minute", on_error="local", replicas=3, clock=clock)
            cc = nla.Concurrency(client, 2, on_error="local", replicas=5, clock=clock)
            assert (await sw.hit("k")).allowed
            sleeper = await asyncio.to_thread(hang, server.port, 2)
            answers = [await sw.hit("k") for _ in range(4)]
            assert [d.allowed for d in answers] == [True, True, True, False] and all(d.fallback for d in answers)
            lease = await cc.try_acquire("k")
            assert lease is not None and lease.fallback, "at least one lease per replica"
            assert await cc.try_acquire("k") is None
            async with lease:
                pass
            assert await lease.release() is False
            assert await cc.try_acquire("k") is not None
            await asyncio.to_thread(sleeper.join)
            end = time.monotonic() + 5
            d = await sw.hit("k")
            while d.fallback and time.monotonic() < end:
                await asyncio.sleep(0.05)
                d = await sw.hit("k")
            assert d.allowed and not d.fallback and d.remaining == 6, "1 before, 1 timed out, 1 now"
        finally:
            await client.aclose()

    asyncio.run(main())


def test_local_needs_a_quota_to_divide(redis_client):
    with pytest.raises(ValueError, match="'local'"):
        nlr.TokenBucket(redis_client, "1/s", on_error="locals")
    with pytest.raises(ValueError, match="on_error must be one of 'allow', 'deny', 'raise', got 'local'"):
        nlr.TokenLimiter(redis_client, tokens="100/minute", on_error="local")
    for bad, exc in ((0, ValueError), (-1, ValueError), ("2", TypeError), (True, TypeError), (1.5, TypeError)):
        with pytest.raises(exc, match="replicas"):
            nlr.TokenBucket(redis_client, "1/s", on_error="local", replicas=bad)
        with pytest.raises(exc, match="replicas"):
            nlr.Concurrency(redis_client, 3, on_error="local", replicas=bad)
    # A share is never below one unit.
    tb = nlr.FixedWindow(redis_client, "3/minute", on_error="local", replicas=10)
    assert tb._fallback.local.limit == 1
