from __future__ import annotations

import pytest

import nexus_limits as nl


def test_all_or_nothing(clock):
    per_second = nl.TokenBucket("10/second", clock=clock)
    per_day = nl.FixedWindow("12/day", clock=clock)
    both = nl.Composite([per_second, per_day])
    d = both.hit("k", 10)
    assert d.allowed and d.remaining == 0 and d.limit == 10
    d = both.hit("k", 1)
    assert not d.allowed and d.retry_after == pytest.approx(0.1)
    assert per_day.get_limit("k") == (True, 2), "the denied call charged no part"
    clock.advance(1)
    d = both.hit("k", 3)
    assert not d.allowed and d.limit == 12 and d.remaining == 2
    assert d.retry_after == pytest.approx(86400 - 1)
    assert both.hit("k", 2).allowed
    assert per_second.get_limit("k") == (True, 8)


def test_reports_the_most_restrictive_part(clock):
    sliding = nl.SlidingWindow("100/minute", clock=clock)
    both = nl.Composite([sliding, nl.LeakyBucket("1/s", capacity=5, clock=clock)])
    d = both.hit("k", 3)
    assert (d.limit, d.remaining) == (5, 2)
    assert d.reset_after == pytest.approx(120.0)  # the sliding window's, the longest
    d = both.hit("k")
    assert d.delay == pytest.approx(3.0)


def test_peek_get_limit_reset_sweep_len(clock):
    both = nl.Composite([nl.TokenBucket("2/s", clock=clock), nl.FixedWindow("3/minute", clock=clock)])
    assert both.peek("k", 2).allowed
    assert len(both) == 0
    both.hit("k", 2)
    assert both.get_limit("k") == (False, 0)
    both.reset("k")
    assert both.get_limit("k") == (True, 2)
    both.hit("k")
    clock.advance(7200)
    assert both.sweep() == 2
    assert len(both) == 0


def test_nested_composites_flatten_and_keep_parts(clock):
    a, b, c = (
        nl.TokenBucket("5/s", clock=clock),
        nl.FixedWindow("4/s", clock=clock),
        nl.SlidingWindow("3/s", clock=clock),
    )
    inner = nl.Composite([a, b])
    outer = nl.Composite([inner, c])
    assert outer.parts == (inner, c)
    assert outer.clock is clock
    assert outer.hit("k", 3).remaining == 0
    assert not outer.try_acquire("k")
    assert repr(outer).startswith("Composite([Composite([TokenBucket(")


def test_acquire_waits_for_every_part(clock):
    both = nl.Composite([nl.TokenBucket("1/s", clock=clock), nl.FixedWindow("2/10s", clock=clock)])
    both.acquire("k")
    both.acquire("k")  # waits 1 s for the bucket
    assert clock.now == pytest.approx(1.0)
    both.acquire("k")  # the window is full until t = 10 s
    assert clock.now == pytest.approx(10.0)


def test_full_store_denies_composite_atomically(clock):
    a = nl.TokenBucket("1/minute", clock=clock, max_keys=1)
    b = nl.FixedWindow("10/minute", clock=clock)
    both = nl.Composite([b, a])
    assert both.try_acquire("first")
    d = both.hit("second")
    assert not d.allowed
    assert b.get_limit("second") == (True, 10), "no part was charged"
    assert len(b) == 1, "nor did any part take room for the refused key"
    assert both.stats()["denied"] == 1 and a.stats()["keys"] == 1
