"""Every bad argument raises a ValueError or TypeError that names it."""

from __future__ import annotations

import asyncio

import pytest

import nexus_limits as nl

RATE_LIMITERS = [
    lambda **kw: nl.TokenBucket("10/s", **kw),
    lambda **kw: nl.SlidingWindow("10/s", **kw),
    lambda **kw: nl.FixedWindow("10/s", **kw),
    lambda **kw: nl.LeakyBucket("10/s", **kw),
]


@pytest.mark.parametrize("make", RATE_LIMITERS)
@pytest.mark.parametrize(
    ("kwargs", "exc", "why"),
    [
        ({"ttl": 0}, ValueError, "ttl must be a finite number of seconds above 0"),
        ({"ttl": -1.0}, ValueError, "ttl must be"),
        ({"ttl": float("nan")}, ValueError, "ttl must be"),
        ({"ttl": float("inf")}, ValueError, "ttl must be"),
        ({"ttl": "1h"}, TypeError, "ttl must be a number of seconds, got str"),
        ({"clock": 5}, TypeError, "clock must be None or a ManualClock, got int"),
        ({"max_keys": 0}, ValueError, "max_keys must be at least 1"),
        ({"max_keys": -3}, ValueError, "max_keys must be at least 1"),
        ({"max_keys": 1.5}, TypeError, "max_keys must be an int"),
    ],
)
def test_bad_constructor_arguments(make, kwargs, exc, why):
    with pytest.raises(exc, match=why):
        make(**kwargs)


@pytest.mark.parametrize(
    ("make", "exc", "why"),
    [
        (lambda: nl.TokenBucket("10/s", burst=0), ValueError, "burst must be at least 1"),
        (lambda: nl.TokenBucket("10/s", burst=-1), ValueError, "burst must be at least 1"),
        (lambda: nl.TokenBucket("10/s", burst=2.5), TypeError, "burst must be an int"),
        (lambda: nl.TokenBucket("1/w", burst=2**50), ValueError, "146 years"),
        (lambda: nl.LeakyBucket("10/s", capacity=0), ValueError, "capacity must be at least 1"),
        (lambda: nl.LeakyBucket("10/s", capacity="5"), TypeError, "capacity must be an int"),
        (lambda: nl.SlidingWindow(nl.Rate(2**41, 1.0)), ValueError, "sliding window limit"),
        (lambda: nl.TokenBucket("ten/s"), ValueError, "invalid rate"),
        (lambda: nl.TokenBucket(None), TypeError, "rate must be a str"),
        (lambda: nl.Concurrency(0), ValueError, "limit must be at least 1"),
        (lambda: nl.Concurrency("3"), TypeError, "limit must be an int"),
        (lambda: nl.Concurrency(3, lease_ttl=0), ValueError, "lease_ttl must be"),
        (lambda: nl.Concurrency(3, lease_ttl=float("nan")), ValueError, "lease_ttl must be"),
        (lambda: nl.Concurrency(3, clock="x"), TypeError, "clock must be None or a ManualClock"),
        (lambda: nl.Composite([]), ValueError, "at least one limiter"),
        (lambda: nl.Composite(5), TypeError, "limiters must be an iterable"),
        (lambda: nl.Composite([nl.Concurrency(2)]), TypeError, "each Composite part must be"),
        (lambda: nl.Composite(["10/s"]), TypeError, "each Composite part must be"),
        (lambda: nl.ManualClock(-1), ValueError, "start must be a finite, non-negative"),
        (lambda: nl.ManualClock("0"), TypeError, "start must be a number of seconds"),
    ],
)
def test_bad_arguments(make, exc, why):
    with pytest.raises(exc, match=why):
        make()


def test_same_limiter_twice_in_a_composite():
    tb = nl.TokenBucket("1/s")
    with pytest.raises(ValueError, match="appears twice"):
        nl.Composite([tb, tb])
    with pytest.raises(ValueError, match="appears twice"):
        nl.Composite([nl.Composite([tb]), tb])


def test_composite_parts_must_share_a_clock():
    with pytest.raises(ValueError, match="same clock"):
        nl.Composite([nl.TokenBucket("1/s", clock=nl.ManualClock()), nl.TokenBucket("1/s")])
    with pytest.raises(ValueError, match="same clock"):
        nl.Composite([nl.TokenBucket("1/s", clock=nl.ManualClock()), nl.TokenBucket("1/s", clock=nl.ManualClock())])


LIMITERS = [
    nl.TokenBucket("10/s"),
    nl.SlidingWindow("10/s"),
    nl.FixedWindow("10/s"),
    nl.LeakyBucket("10/s"),
    nl.Composite([nl.TokenBucket("10/s"), nl.FixedWindow("100/minute")]),
]


@pytest.mark.parametrize("lim", LIMITERS, ids=lambda lim: type(lim).__name__)
@pytest.mark.parametrize("method", ["hit", "try_acquire", "peek"])
def test_bad_keys_and_costs(lim, method):
    call = getattr(lim, method)
    for key in (1.5, None, ["a"], ("a",), True, object()):
        with pytest.raises(TypeError, match="key must be str, bytes or int"):
            call(key)
    with pytest.raises(ValueError, match="int keys must fit in 128 bits"):
        call(2**200)
    with pytest.raises(ValueError, match="cost must be a non-negative integer, got -1"):
        call("k", -1)
    with pytest.raises(ValueError, match="cost must be a non-negative integer"):
        call("k", 2**70)
    for cost in (1.0, "1", True, [1]):
        with pytest.raises(TypeError, match="cost must be a non-negative int"):
            call("k", cost)
    assert len(lim) == 0, "nothing was charged by the bad calls"


@pytest.mark.parametrize("lim", LIMITERS, ids=lambda lim: type(lim).__name__)
def test_bad_keys_elsewhere(lim):
    for call in (lim.get_limit, lim.reset):
        with pytest.raises(TypeError, match="key must be"):
            call(3.5)


@pytest.mark.parametrize("lim", [*LIMITERS, nl.Concurrency(2)], ids=lambda lim: type(lim).__name__)
def test_bad_timeouts(lim):
    for timeout, exc in ((-1, ValueError), (float("nan"), ValueError), ("1", TypeError), (True, TypeError)):
        with pytest.raises(exc, match="timeout must be None or a"):
            lim.acquire("k", timeout=timeout)
        with pytest.raises(exc, match="timeout must be None or a"):
            asyncio.run(lim.acquire_async("k", timeout=timeout))


def test_concurrency_bad_input():
    c = nl.Concurrency(2)
    with pytest.raises(ValueError, match="cost must be 1, got 2"):
        c.hit("k", 2)
    with pytest.raises(ValueError, match="cost must be 1"):
        c.try_acquire("k", 0)
    with pytest.raises(TypeError, match="key must be"):
        c.try_acquire(1.5)
    with pytest.raises(ValueError, match="timeout must be a finite"):
        c._wait_for_release(-1.0)
    with pytest.raises(TypeError, match="timeout must be None or a"):
        c.lease_async("k", timeout="soon")


def test_manual_clock_bad_advance():
    clock = nl.ManualClock()
    for bad, exc in ((-1, ValueError), (float("inf"), ValueError), (float("nan"), ValueError), ("1", TypeError)):
        with pytest.raises(exc, match="seconds"):
            clock.advance(bad)
    assert clock.now == 0.0
