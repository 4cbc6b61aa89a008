"""TokenLimiter on Redis: the same arithmetic as in-process, shared by every process."""

from __future__ import annotations

import asyncio
import threading

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import nexus_limits as nl
import nexus_limits.redis as nlr
import nexus_limits.redis.asyncio as nla


def both(redis_client, **kw):
    clock = nl.ManualClock(1_700_000_000.0)
    args = {"requests": "10/minute", "tokens": "1000/minute", "clock": clock}
    args.update(kw)
    return clock, nl.TokenLimiter(**args), nlr.TokenLimiter(redis_client, **args)


def same(a, b):
    if a is None or b is None:
        return a is None and b is None
    close = a.retry_after == b.retry_after or abs(a.retry_after - b.retry_after) < 2e-6
    return (a.allowed, a.limit, a.remaining) == (b.allowed, b.limit, b.remaining) and close


def test_matches_in_process(redis_client):
    clock, local, shared = both(redis_client, daily_tokens=3000, concurrency=2)
    script = [("k", 600, 300), ("k", 600, None), ("k", 300, 900), ("j", 5000, 0), ("k", 100, -1), ("k", 0, 0)]
    for key, estimate, actual in script:
        a, b = local.reserve(key, estimate), shared.reserve(key, estimate)
        for part in ("decision", "requests", "tokens", "daily_tokens", "concurrency"):
            assert same(getattr(a, part), getattr(b, part)), (key, estimate, part, getattr(a, part), getattr(b, part))
        if actual is None:
            continue
        if actual < 0:
            assert a.cancel() == b.cancel()
        else:
            assert a.settle(actual) == b.settle(actual)
        clock.advance(1.5)


@pytest.mark.parametrize("seed", range(4))
def test_matches_in_process_at_odd_rates(redis_client, seed):
    """Reservations settled and cancelled at random, at rates of no whole microsecond
    per unit (7 per 3 s: 428571.43 us) on an epoch-scale clock stepped in whole
    microseconds around those intervals: the same answers as in-process. (A settlement
    wrote its bucket as one double, a quarter of a microsecond at the epoch: the next
    answer was sometimes a unit short.)"""
    import random

    rng = random.Random(seed)
    clock = nl.ManualClock(1_700_000_000.0)
    clock.advance(rng.randrange(10**6) / 1e6)  # (a whole microsecond: see now_arg)
    args = {"requests": "7/3s", "tokens": "997/7s", "daily_tokens": 20011, "clock": clock}
    local, shared = nl.TokenLimiter(**args), nlr.TokenLimiter(redis_client, **args, prefix=f"odd{seed}")
    intervals = [3 / 7, 7 / 997, 86400 / 20011]
    held = []
    for step in range(150):
        r = rng.random()
        if r < 0.45:
            estimate = rng.randint(1, 400)
            a, b = local.reserve("k", estimate), shared.reserve("k", estimate)
            for part in ("decision", "requests", "tokens", "daily_tokens"):
                assert same(getattr(a, part), getattr(b, part)), (step, part, getattr(a, part), getattr(b, part))
            if a.allowed:
                held.append((a, b))
        elif r < 0.7 and held:
            a, b = held.pop(rng.randrange(len(held)))
            if rng.random() < 0.3:
                assert a.cancel() == b.cancel(), step
            else:
                actual = rng.randint(1, 500)
                assert a.settle(actual) == b.settle(actual), step
        else:
            units = rng.choice([0.5, 1.0, 1.0, 2.0, rng.random() * 3])
            us = max(int(units * rng.choice(intervals) * 1e6) + rng.randint(-2, 2), 0)
            clock.advance(us / 1e6)
        for key in shared.redis_keys("k"):  # expiry runs on Redis's clock, not the test's
            redis_client.persist(key)


def test_reserve_settle_cancel_expiry(redis_client):
    clock, _, tl = both(redis_client, requests="2/minute", concurrency=1, lease_ttl=30)
    res = tl.reserve("k", 800)
    assert res.allowed and res.tokens.remaining == 200
    denied = tl.reserve("k", 1)
    assert not denied.allowed and not denied.concurrency.allowed
    assert res.settle(100) and not res.settle(100)
    again = tl.reserve("k", 900)
    assert again.allowed and again.tokens.remaining == 0, "700 were refunded"
    assert again.cancel()
    third = tl.reserve("k", 900)
    assert third.allowed, "the cancelled request and its tokens came back"
    assert third.settle(900)
    fourth = tl.reserve("k", 1)
    assert not fourth.allowed and not fourth.requests.allowed, "2 requests per minute are spent"
    clock.advance(30)
    late = tl.reserve("other", 10)
    clock.advance(31)
    assert late.done and late.settle(0) is False, "past the lease time the estimate stands"
    assert tl.reserve("other", 10).allowed, "the lease expired on the server"
    keys = tl.redis_keys("k")
    assert len(keys) == 3 and all(k.startswith("nl:{sk}:tl-") for k in keys)
    tl.reset("k")
    assert tl.reserve("k", 1000).allowed
    assert (tl.requests, tl.tokens, tl.daily_tokens, tl.concurrency, tl.lease_ttl) == (
        nl.Rate(2, 60),
        nl.Rate(1000, 60),
        None,
        1,
        30.0,
    )


def test_threads_share_one_budget(redis_client):
    tl = nlr.TokenLimiter(redis_client, tokens="10000/day", concurrency=8, name="shared")
    admitted = []

    def worker() -> None:
        for _ in range(60):
            r = tl.reserve("k", 100)
            if r.allowed:
                r.settle(50)
                admitted.append(1)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 199


def test_outage_policies():
    client = redis.Redis(port=1, socket_connect_timeout=0.3, retry=Retry(NoBackoff(), 0))
    open_tl = nlr.TokenLimiter(client, tokens="10/s", on_error="allow")
    res = open_tl.reserve("k", 5)
    assert res.allowed and res.decision.fallback and res.settle(5) is False
    closed = nlr.TokenLimiter(client, tokens="10/s", on_error="deny")
    assert not closed.reserve("k", 5).allowed
    with pytest.raises(nl.BackendUnavailable, match="TokenLimiter on Redis"):
        nlr.TokenLimiter(client, tokens="10/s").reserve("k", 5)


def test_settle_during_an_outage_reports_it(redis_server):
    from support.servers import RedisServer

    server = RedisServer().start()
    try:
        client = redis.Redis(port=server.port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
        tl = nlr.TokenLimiter(client, tokens="10/s")
        quiet = nlr.TokenLimiter(client, tokens="10/s", on_error="allow", name="quiet")
        res, res2 = tl.reserve("k", 5), quiet.reserve("k", 5)
        server.stop()
        with pytest.raises(nl.BackendUnavailable):
            res.settle(1)
        assert res2.settle(1) is False
    finally:
        server.close()


def test_bad_input(redis_client):
    with pytest.raises(ValueError, match="at least one of"):
        nlr.TokenLimiter(redis_client)
    with pytest.raises(TypeError, match="use nexus_limits.redis.asyncio"):
        nlr.TokenLimiter(redis.asyncio.Redis(), tokens="1/s")
    tl = nlr.TokenLimiter(redis_client, tokens="1/s")
    with pytest.raises(TypeError, match="tokens must be a non-negative int"):
        tl.reserve("k", "5")
    with pytest.raises(ValueError, match="tokens must be a non-negative integer"):
        tl.reserve("k", -5)
    with pytest.raises(ValueError, match="prefix"):
        nlr.TokenLimiter(redis_client, tokens="1/s", prefix="{x}")


def test_asyncio_mirror(async_redis_client):
    async def main() -> None:
        client = async_redis_client()
        clock = nl.ManualClock(1_700_000_000.0)
        tl = nla.TokenLimiter(
            client, requests="5/minute", tokens="1000/minute", concurrency=1, clock=clock, lease_ttl=20
        )
        res = await tl.reserve("k", 700)
        assert res.allowed and not (await tl.reserve("k", 1)).allowed
        assert await res.settle(200) and not await res.settle(200)
        again = await tl.reserve("k", 800)
        assert again.allowed and again.tokens.remaining == 0
        assert await again.cancel()
        clock.advance(21)
        assert again.done
        late = await tl.reserve("j", 1)
        clock.advance(21)
        assert late.done and await late.settle(1) is False
        await tl.reset("k")
        assert tl.lease_ttl == 20.0 and len(tl.redis_keys("k")) == 3
        down = nla.TokenLimiter(
            redis.asyncio.Redis(port=1, socket_connect_timeout=0.3, retry=Retry(NoBackoff(), 0)),
            tokens="1/s",
            on_error="allow",
        )
        r = await down.reserve("k", 1)
        assert r.allowed and r.decision.fallback and await r.cancel() is False
        await client.aclose()

    asyncio.run(main())
