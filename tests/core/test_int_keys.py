"""Int keys: every value from -2**127 to 2**128 - 1 is its own key (every signed and
unsigned 128-bit value, so every uuid.UUID.int), on every limiter and store; beyond that
range a clear ValueError."""

from __future__ import annotations

import random
import uuid

import pytest

import nexus_limits as nl
import nexus_limits.redis as nlr

LOW, HIGH = -(2**127), 2**128 - 1
EDGES = [LOW, LOW + 1, -1, 0, 1, 2**63, 2**64, 2**127 - 1, 2**127, 2**127 + 1, HIGH - 1, HIGH]


def limiters(clock, tmp_path):
    store = nl.SharedMemoryStore(path=tmp_path / "keys", capacity=1 << 16, ttl=3600)
    return [
        nl.TokenBucket("1/hour", clock=clock),
        nl.FixedWindow("1/hour", clock=clock),
        nl.SlidingWindow("1/hour", clock=clock),
        nl.LeakyBucket("1/hour", clock=clock),
        nl.TokenBucket("1/hour", clock=clock, store=store),
        nl.Composite([nl.TokenBucket("1/hour", clock=clock), nl.FixedWindow("5/hour", clock=clock)]),
    ]


def test_random_uuids_are_all_accepted_and_distinct(clock, tmp_path):
    keys = [uuid.uuid4().int for _ in range(5000)]
    assert sum(k >= 2**127 for k in keys) > 2000, "about half of all UUIDs need the 128th bit"
    for lim in limiters(clock, tmp_path):
        assert all(lim.try_acquire(k) for k in keys), lim
        assert not any(lim.try_acquire(k) for k in keys), f"{lim}: each UUID is its own key, charged once"


def test_the_range_edges_are_distinct_keys(clock, tmp_path):
    for lim in limiters(clock, tmp_path):
        assert [lim.try_acquire(k) for k in EDGES] == [True] * len(EDGES), lim
        assert [lim.try_acquire(k) for k in EDGES] == [False] * len(EDGES), lim


def test_values_sharing_their_16_bytes_stay_apart(clock):
    """-1 and 2**128 - 1 (and -2**127 and 2**127) have the same 16 bytes."""
    tb = nl.TokenBucket("1/hour", clock=clock)
    for a, b in [(-1, HIGH), (LOW, 2**127), (-(2**64), 2**128 - 2**64)]:
        assert a.to_bytes(16, "little", signed=True) == b.to_bytes(16, "little")
        assert tb.try_acquire(a) and tb.try_acquire(b), (a, b)
        assert not tb.try_acquire(a) and not tb.try_acquire(b)


def test_random_ints_over_the_whole_range(clock):
    rng = random.Random(20)
    keys = {rng.randint(LOW, HIGH) for _ in range(20_000)}
    tb = nl.FixedWindow("1/hour", clock=clock)
    assert sum(map(tb.try_acquire, keys)) == len(keys)
    assert len(tb) == len(keys)


@pytest.mark.parametrize("key", [HIGH + 1, LOW - 1, 2**200, -(2**200), 10**100])
def test_ints_beyond_the_range_are_refused_clearly(key, clock, tmp_path):
    for lim in [*limiters(clock, tmp_path), nl.Concurrency(1, clock=clock)]:
        with pytest.raises(ValueError, match=r"int keys must fit in 128 bits: from -2\*\*127 to 2\*\*128 - 1") as err:
            lim.hit(key)
        assert f"{key.bit_length()} bits" in str(err.value)
        assert "str(key)" in str(err.value)


def test_int_subclasses_and_bools(clock):
    class Id(int):
        pass

    tb = nl.TokenBucket("1/hour", clock=clock)
    assert tb.try_acquire(Id(HIGH)) and not tb.try_acquire(HIGH), "an int subclass is the same int key"
    with pytest.raises(TypeError, match="key must be str, bytes or int, got bool"):
        tb.hit(True)


def test_every_surface_takes_the_whole_range(clock):
    c = nl.Concurrency(1, clock=clock)
    tb = nl.TokenBucket("1/hour", clock=clock)
    for key in (HIGH, LOW, 2**127):
        lease = c.try_acquire(key)
        assert lease is not None and lease.key == key and c.try_acquire(key) is None
        tb.set_quota(key, "2/hour")
        assert tb.inspect(key)["own_quota"] and tb.hit(key).remaining == 1
        assert [r["key"] for r in tb.top_keys(10, keys=[key]) if r["key"] is not None] == [key]
        lease.release()


def test_redis_takes_the_same_keys(redis_client):
    tb = nlr.TokenBucket(redis_client, "1/hour")
    keys = [uuid.uuid4().int for _ in range(50)] + EDGES
    assert all(tb.try_acquire(k) for k in keys)
    assert not any(tb.try_acquire(k) for k in keys)
