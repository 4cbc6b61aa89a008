"""The Redis limiters take their arithmetic from the core's Quota: script arguments,
key names, own quotas read back, the in-process twin's share. Key names and stored
quotas must stay what earlier releases wrote, or existing data would be orphaned."""

from __future__ import annotations

import pytest

import nexus_limits as nl
import nexus_limits.redis as nlr
from nexus_limits._core import Quota

ALGORITHMS = {
    "TokenBucket": "token_bucket",
    "LeakyBucket": "leaky_bucket",
    "FixedWindow": "fixed_window",
    "SlidingWindow": "sliding_window",
}


def old_id(kind: str, rate: nl.Rate, limit: int) -> str:
    """The limit id earlier releases computed in Python."""
    period_us = rate.period * 1e6
    short = {"TokenBucket": "tb", "LeakyBucket": "lb", "FixedWindow": "fw", "SlidingWindow": "sw"}[kind]
    if kind in ("TokenBucket", "LeakyBucket"):
        return f"{short}-{rate.count}-{period_us!r}-{limit}"
    return f"{short}-{rate.count}-{period_us!r}"


@pytest.mark.parametrize("rate", ["100/minute", "3/s", "7/day", "1/250us", "5/2h", "999999/30d"])
@pytest.mark.parametrize("kind", ["TokenBucket", "LeakyBucket", "FixedWindow", "SlidingWindow"])
def test_key_names_are_those_earlier_releases_wrote(redis_client, kind, rate):
    lim = getattr(nlr, kind)(redis_client, rate, prefix="gw")
    parsed = nl.Rate.parse(rate)
    assert lim.redis_key("sk-ann") == f"gw:{{ssk-ann}}:{old_id(kind, parsed, parsed.count)}"
    if kind == "TokenBucket":
        burst = nlr.TokenBucket(redis_client, rate, burst=3, prefix="gw")
        assert burst.redis_key(5) == f"gw:{{i5}}:{old_id(kind, parsed, 3)}"
    assert lim.quota == getattr(nl, kind)(rate).quota
    assert (lim.rate, lim.limit) == (parsed, parsed.count)


def test_the_readme_key_is_unchanged(redis_client):
    tb = nlr.TokenBucket(redis_client, "100/minute", burst=20, prefix="example")
    assert tb.redis_key("sk-ann") == "example:{ssk-ann}:tb-100-60000000.0-20"


@pytest.mark.parametrize(
    ("kind", "rate", "stored", "limit"),
    [
        ("TokenBucket", "10/minute", "600000.0 3", 3),  # 3 units, one per 0.6 s
        ("LeakyBucket", "10/minute", "1000000.0 2", 2),
        ("FixedWindow", "10/minute", "60000000.0 4", 4),
        ("SlidingWindow", "10/minute", "3600000000.0 5", 5),
    ],
)
def test_a_quota_stored_by_an_earlier_release_is_read(redis_client, clock, kind, rate, stored, limit):
    """A key's own quota is "micros capacity" in its quota key, as it always was."""
    lim = getattr(nlr, kind)(redis_client, rate, clock=clock)
    redis_client.set(lim.redis_key("k") + ":q", stored)
    assert lim.peek("k").limit == limit
    info = lim.inspect("k")
    assert info["own_quota"] and info["limit"] == limit
    micros = float(stored.split()[0])
    period = micros * limit / 1e6 if kind in ("TokenBucket", "LeakyBucket") else micros / 1e6
    assert info["rate"] == nl.Rate(limit, period)
    assert info["algorithm"] == getattr(nl, kind)(rate).quota.name
    # What set_quota writes is the same text.
    lim.set_quota("other", nl.Rate(limit, period), limit if kind in ("TokenBucket", "LeakyBucket") else None)
    assert redis_client.get(lim.redis_key("other") + ":q").decode() == stored


def test_a_stored_quota_that_is_not_one_is_ignored_by_scripts_and_inspect(redis_client, clock):
    tb = nlr.TokenBucket(redis_client, "10/minute", clock=clock)
    for junk in ("nonsense", "1 2 3", "", "abc 5", "inf 5", "0 5", "-600000 5", "600000 0", "600000 2.5", "nan 5"):
        redis_client.set(tb.redis_key("k") + ":q", junk)
        assert tb.peek("k").limit == 10, junk
        assert tb.inspect("k")["own_quota"] is False, junk


@pytest.mark.parametrize(
    ("build", "exc", "why"),
    [
        (lambda c: nlr.LeakyBucket(c, "1/s", capacity=0), ValueError, "capacity must be at least 1, got 0"),
        (lambda c: nlr.LeakyBucket(c, "1/s", capacity="5"), TypeError, "capacity must be an int"),
        (lambda c: nlr.LeakyBucket(c, "1/s", capacity=2**70), ValueError, "capacity .* is too large"),
        (lambda c: nlr.LeakyBucket(c, "zero"), ValueError, "invalid rate"),
        (lambda c: nlr.TokenBucket(c, "1/s", burst=True), TypeError, "burst must be an int"),
        (lambda c: nlr.FixedWindow(c, "1/s").set_quota("k", "2/s", 3), ValueError, "a fixed window has no burst"),
        (lambda c: nlr.SlidingWindow(c, "1/s").set_quota("k", "nope"), ValueError, "invalid rate"),
        (lambda c: nlr.TokenBucket(c, "1/s").set_quota("k", "2/s", 0), ValueError, "burst must be at least 1"),
    ],
)
def test_quotas_are_refused_as_in_process(redis_client, build, exc, why):
    with pytest.raises(exc, match=why):
        build(redis_client)


@pytest.mark.parametrize("kind", ["TokenBucket", "LeakyBucket", "FixedWindow", "SlidingWindow"])
def test_the_local_twin_gets_a_share_of_the_quota(kind):
    import redis

    client = redis.Redis(port=1, socket_connect_timeout=0.2, socket_timeout=0.2)  # nothing listens
    clock = nl.ManualClock(1_000_000.0)
    lim = getattr(nlr, kind)(client, "10/minute", on_error="local", replicas=3, clock=clock)
    d = lim.hit("k")
    assert d.fallback and d.allowed and d.limit == 3, "10 // 3 units"
    twin = lim._fallback.local
    bucket = kind in ("TokenBucket", "LeakyBucket")
    assert twin.quota == Quota(ALGORITHMS[kind], nl.Rate(3, 60.0), 3 if bucket else None)
    client.close()
