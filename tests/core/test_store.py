"""Idle-key expiry and the max_keys bound."""

from __future__ import annotations

import nexus_limits as nl


def test_idle_keys_are_swept_after_ttl(clock):
    tb = nl.TokenBucket("10/s", ttl=60, clock=clock)
    for i in range(1000):
        tb.hit(f"k{i}")
    assert len(tb) == 1000
    clock.advance(60)
    assert tb.sweep() == 0, "a key idle for exactly ttl is kept"
    tb.hit("k0")  # seen again: not idle
    clock.advance(1.5)
    assert tb.sweep() == 999
    assert len(tb) == 1


def test_ttl_is_raised_so_eviction_never_changes_a_decision(clock):
    fw = nl.FixedWindow("5/day", ttl=10, clock=clock)
    assert fw.ttl == 86400.0
    assert nl.TokenBucket("1/minute", burst=30, ttl=1).ttl == 1800.0
    assert nl.SlidingWindow("1/minute", ttl=1).ttl == 120.0
    fw.hit("k", 5)
    clock.advance(3600)
    assert fw.sweep() == 0
    assert not fw.hit("k").allowed, "the key still remembers its window"


def test_new_keys_sweep_their_shard_without_a_thread(clock):
    tb = nl.TokenBucket("10/s", ttl=4, clock=clock)
    for i in range(20_000):
        tb.hit(i)
    clock.advance(100)
    for i in range(20_000, 22_000):
        tb.hit(i)
    assert len(tb) < 5_000, "inserting into a shard whose sweep is due evicts its idle keys"


def test_max_keys_bounds_memory_without_resetting_tracked_keys(clock):
    tb = nl.TokenBucket("10/minute", max_keys=100, clock=clock)
    assert tb.hit("victim", 9).remaining == 1
    flood_admitted = sum(tb.try_acquire(f"flood-{i}") for i in range(10_000))
    assert len(tb) <= 100
    assert flood_admitted <= 99
    d = tb.hit("victim", 2)
    assert not d.allowed and d.remaining == 1, "the flood did not reset the victim"
    assert tb.hit("victim").allowed


def test_max_keys_reclaims_keys_back_at_their_fresh_state(clock):
    tb = nl.TokenBucket("10/s", max_keys=10, clock=clock)
    for i in range(10):
        assert tb.try_acquire(i)
    d = tb.hit("new")
    assert not d.allowed and d.retry_after > 0
    clock.advance(0.1)  # every key refilled its one token: fresh again
    assert tb.try_acquire("new")
    assert len(tb) <= 10


def test_peek_and_denied_calls_do_not_track_keys(clock):
    sw = nl.SlidingWindow("3/s", clock=clock)
    sw.peek("a")
    sw.get_limit("b")
    sw.hit("c", 4)
    assert len(sw) == 0
