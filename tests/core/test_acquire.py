"""Blocking and async acquire, and concurrency leases."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import nexus_limits as nl


def test_acquire_advances_a_manual_clock_by_exactly_the_wait(clock):
    tb = nl.TokenBucket("2/s", burst=1, clock=clock)
    assert tb.acquire("k").allowed
    d = tb.acquire("k")
    assert d.allowed
    assert clock.now == pytest.approx(0.5)


def test_acquire_raises_at_once_when_the_wait_exceeds_timeout(clock):
    fw = nl.FixedWindow("1/minute", clock=clock)
    fw.hit("k")
    with pytest.raises(nl.RateLimitExceeded, match="past timeout=5") as err:
        fw.acquire("k", timeout=5)
    assert clock.now == 0.0, "it did not wait for nothing"
    assert err.value.key == "k" and err.value.timeout == 5
    assert err.value.retry_after == pytest.approx(60.0)
    assert not err.value.decision.allowed
    assert fw.acquire("k", timeout=60).allowed


def test_acquire_real_clock_sleeps():
    tb = nl.TokenBucket("20/s", burst=1)
    tb.acquire("k")
    start = time.monotonic()
    tb.acquire("k", timeout=1.0)
    assert 0.04 <= time.monotonic() - start < 2.0


def test_acquire_async_does_not_block_the_loop():
    tb = nl.TokenBucket("20/s", burst=1)
    ticks = []

    async def ticker() -> None:
        for _ in range(5):
            ticks.append(time.monotonic())
            await asyncio.sleep(0.005)

    async def main() -> float:
        tb.hit("k")
        start = time.monotonic()
        t = asyncio.ensure_future(ticker())
        d = await tb.acquire_async("k", timeout=1)
        await t
        assert d.allowed
        return time.monotonic() - start

    elapsed = asyncio.run(main())
    assert elapsed >= 0.04
    assert len(ticks) == 5


def test_acquire_async_manual_clock_and_timeout(clock):
    lb = nl.LeakyBucket("1/s", capacity=1, clock=clock)

    async def main() -> None:
        await lb.acquire_async("k")
        await lb.acquire_async("k")
        assert clock.now == pytest.approx(1.0)
        lb.hit("k2", 1)
        with pytest.raises(nl.RateLimitExceeded):
            await lb.acquire_async("k2", timeout=0.5)
        with pytest.raises(nl.RateLimitExceeded, match="never"):
            await lb.acquire_async("k2", cost=2)

    asyncio.run(main())


def test_concurrency_leases(clock):
    c = nl.Concurrency(2, lease_ttl=30, clock=clock)
    a = c.try_acquire("k")
    b = c.try_acquire("k")
    assert a is not None and b is not None and a.key == "k"
    assert c.try_acquire("k") is None
    d = c.peek("k")
    assert not d.allowed and d.remaining == 0 and d.retry_after == pytest.approx(30.0)
    assert c.get_limit("k") == (False, 0)
    assert a.release() is True
    assert a.release() is False, "releasing twice is harmless"
    assert a.released and not b.released
    assert c.get_limit("k") == (True, 1)
    d = c.hit("k")
    assert d.allowed and isinstance(d.lease, nl.Lease) and d.remaining == 0
    assert "released=False" in repr(d.lease)
    clock.advance(30)
    assert c.get_limit("k") == (True, 2), "expired leases free their places"
    assert b.release() is False
    assert len(c) == 0, "a key without live leases is dropped"
    crashed = c.try_acquire("crashed-holder")
    assert crashed
    clock.advance(30)
    assert len(c) == 1
    assert c.sweep() == 1 and len(c) == 0
    c.try_acquire("x")
    c.reset("x")
    assert c.get_limit("x") == (True, 2)
    assert repr(c) == "Concurrency(2, lease_ttl=30.0)"
    assert c.limit == 2 and c.lease_ttl == 30.0 and c.clock is clock


def test_lease_context_managers(clock):
    c = nl.Concurrency(1, clock=clock)
    with c.lease("k") as lease:
        assert c.try_acquire("k") is None
    assert lease.released
    with pytest.raises(ValueError):
        with c.lease("k"):
            raise ValueError("the body failed")
    assert c.get_limit("k") == (True, 1), "released on error too"

    async def main() -> None:
        async with c.lease_async("k") as held:
            assert c.try_acquire("k") is None
        assert held.released

    asyncio.run(main())


def test_acquire_on_manual_clock_waits_for_expiry(clock):
    c = nl.Concurrency(1, lease_ttl=10, clock=clock)
    held = c.try_acquire("k")
    assert held
    lease = c.acquire("k")
    assert clock.now == pytest.approx(10.0)
    with pytest.raises(nl.RateLimitExceeded):
        c.acquire("k", timeout=0)
    lease.release()

    async def main() -> None:
        held_j = c.try_acquire("j")
        assert held_j
        await c.acquire_async("j")
        assert clock.now == pytest.approx(20.0)

    asyncio.run(main())


def test_blocked_acquire_wakes_on_release():
    c = nl.Concurrency(1)
    first = c.acquire("k")
    got = []

    def waiter() -> None:
        got.append(c.acquire("k", timeout=5))

    t = threading.Thread(target=waiter)
    start = time.monotonic()
    t.start()
    time.sleep(0.05)
    assert not got
    first.release()
    t.join(5)
    assert got and time.monotonic() - start < 3.0, "woken by the release, not by the 300 s lease expiry"
    with pytest.raises(nl.RateLimitExceeded):
        c.acquire("k", timeout=0.05)
    got[0].release()


def test_async_acquire_polls_until_release():
    c = nl.Concurrency(1)

    async def main() -> None:
        first = await c.acquire_async("k")
        loop = asyncio.get_running_loop()
        loop.call_later(0.03, first.release)
        second = await c.acquire_async("k", timeout=2)
        second.release()
        held = c.try_acquire("k")
        assert held
        with pytest.raises(nl.RateLimitExceeded):
            await c.acquire_async("k", timeout=0.02)

    asyncio.run(main())
