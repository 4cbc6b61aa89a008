"""Every algorithm against its pure-Python reference model, and its documented semantics."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.reference import FixedWindowRef, SlidingWindowRef, TokenBucketRef

import nexus_limits as nl
from conftest import NS, as_tuple

PERIODS_NS = [1_000_000, 1 * NS, 7 * NS, 60 * NS, 3_600 * NS, 86_400 * NS]

ops = st.lists(
    st.tuples(
        st.one_of(st.just(0), st.integers(0, 10**6), st.integers(0, 3 * NS), st.integers(0, 10**14)),
        st.integers(0, 3),  # key
        st.integers(0, 70),  # cost
        st.sampled_from(["hit", "hit", "peek", "try", "get_limit"]),
    ),
    max_size=60,
)

KEYS = ["alice", b"alice", 7, "bob"]


def run(limiter: nl.RateLimiter, ref, clock: nl.ManualClock, schedule, shaping: bool = False) -> None:
    now = 0
    for advance, k, cost, op in schedule:
        clock.advance(advance / NS)
        now += advance
        key = KEYS[k]
        if op == "hit":
            extra = {"shaping": True} if shaping else {}
            assert as_tuple(limiter.hit(key, cost)) == ref.step(key, now, cost, **extra), (now, key, cost)
        elif op == "peek":
            extra = {"shaping": True} if shaping else {}
            assert as_tuple(limiter.peek(key, cost)) == ref.step(key, now, cost, charge=False, **extra)
        elif op == "try":
            assert limiter.try_acquire(key, cost) == ref.step(key, now, cost)[0]
        else:
            remaining = ref.step(key, now, 0, charge=False)[2]
            assert limiter.get_limit(key) == (remaining >= 1, remaining)


@settings(max_examples=150, deadline=None)
@given(count=st.integers(1, 50), period=st.sampled_from(PERIODS_NS), burst=st.integers(1, 60), schedule=ops)
def test_token_bucket_matches_reference(count, period, burst, schedule):
    clock = nl.ManualClock()
    tb = nl.TokenBucket(nl.Rate(count, period / NS), burst=burst, clock=clock)
    run(tb, TokenBucketRef(count, period, burst), clock, schedule)


@settings(max_examples=150, deadline=None)
@given(count=st.integers(1, 50), period=st.sampled_from(PERIODS_NS), capacity=st.integers(1, 60), schedule=ops)
def test_leaky_bucket_matches_reference(count, period, capacity, schedule):
    clock = nl.ManualClock()
    lb = nl.LeakyBucket(nl.Rate(count, period / NS), capacity=capacity, clock=clock)
    run(lb, TokenBucketRef(count, period, capacity), clock, schedule, shaping=True)


@settings(max_examples=150, deadline=None)
@given(count=st.integers(1, 50), period=st.sampled_from(PERIODS_NS), schedule=ops)
def test_fixed_window_matches_reference(count, period, schedule):
    clock = nl.ManualClock()
    fw = nl.FixedWindow(nl.Rate(count, period / NS), clock=clock)
    run(fw, FixedWindowRef(count, period), clock, schedule)


@settings(max_examples=150, deadline=None)
@given(count=st.integers(1, 50), period=st.sampled_from(PERIODS_NS), schedule=ops)
def test_sliding_window_matches_reference(count, period, schedule):
    clock = nl.ManualClock()
    sw = nl.SlidingWindow(nl.Rate(count, period / NS), clock=clock)
    run(sw, SlidingWindowRef(count, period), clock, schedule)


@settings(max_examples=100, deadline=None)
@given(count=st.integers(1, 20), burst=st.integers(1, 20), schedule=ops)
def test_retry_after_is_exactly_enough(count, burst, schedule):
    """Waiting `retry_after` always admits; waiting 1 ns less never does."""
    for make in (
        lambda c: nl.TokenBucket(nl.Rate(count, 7.0), burst=burst, clock=c),
        lambda c: nl.SlidingWindow(nl.Rate(count, 7.0), clock=c),
        lambda c: nl.FixedWindow(nl.Rate(count, 7.0), clock=c),
    ):
        clock = nl.ManualClock()
        lim = make(clock)
        for advance, k, cost, _ in schedule:
            clock.advance(advance / NS)
            d = lim.hit(KEYS[k], cost)
            if d.allowed or math.isinf(d.retry_after):
                continue
            wait_ns = round(d.retry_after * NS)
            clock.advance((wait_ns - 1) / NS)
            assert not lim.peek(KEYS[k], cost).allowed
            clock.advance(1 / NS)
            assert lim.hit(KEYS[k], cost).allowed


def test_token_bucket_example(clock):
    tb = nl.TokenBucket("100/minute", burst=20, clock=clock)
    d = tb.hit("api-key", cost=20)
    assert d and d.limit == 20 and d.remaining == 0
    assert d.reset_after == pytest.approx(12.0)  # 20 tokens at 0.6 s each
    denied = tb.hit("api-key")
    assert not denied and denied.retry_after == pytest.approx(0.6)
    assert tb.peek("other").remaining == 19, "keys are isolated"
    clock.advance(0.6)
    assert tb.try_acquire("api-key")
    assert not tb.try_acquire("api-key")


def test_default_burst_is_the_count(clock):
    tb = nl.TokenBucket("5/second", clock=clock)
    assert tb.limit == 5
    assert [tb.try_acquire("k") for _ in range(6)] == [True] * 5 + [False]


def test_cost_above_capacity_is_never_admitted(clock):
    for lim in (
        nl.TokenBucket("10/s", burst=5, clock=clock),
        nl.LeakyBucket("10/s", capacity=5, clock=clock),
        nl.FixedWindow("5/s", clock=clock),
        nl.SlidingWindow("5/s", clock=clock),
    ):
        d = lim.hit("k", 6)
        assert not d.allowed and d.retry_after == math.inf
        assert lim.hit("k", 5).allowed, "the denied call charged nothing"
        with pytest.raises(nl.RateLimitExceeded, match="never"):
            lim.acquire("k", 6)


def test_denied_calls_do_not_consume(clock):
    fw = nl.FixedWindow("3/minute", clock=clock)
    assert fw.hit("k", 3)
    for _ in range(100):
        assert not fw.hit("k")
    clock.advance(60)
    assert fw.hit("k", 3).allowed, "retries while limited did not extend the lockout"


def test_sliding_window_boundary(clock):
    sw = nl.SlidingWindow("10/10s", clock=clock)
    clock.advance(5)
    assert sw.hit("k", 10)
    clock.advance(7)  # t = 12 s: estimate 10 * 0.8 = 8
    d = sw.hit("k", 3)
    assert not d.allowed and d.remaining == 2 and d.retry_after == pytest.approx(1.0)
    assert sw.hit("k", 2).allowed


def test_fixed_windows_align_to_the_period(clock):
    fw = nl.FixedWindow("2/10s", clock=clock)
    clock.advance(9.5)
    assert fw.hit("k", 2).reset_after == pytest.approx(0.5)
    clock.advance(0.5)
    assert fw.hit("k", 2).allowed


def test_leaky_bucket_delays_spread_admitted_work(clock):
    lb = nl.LeakyBucket("10/second", capacity=3, clock=clock)
    delays = [lb.hit("job").delay for _ in range(3)]
    assert delays == pytest.approx([0.0, 0.1, 0.2])
    d = lb.hit("job")
    assert not d.allowed and d.delay == 0.0 and d.retry_after == pytest.approx(0.1)
    assert nl.TokenBucket("10/s", clock=clock).hit("x").delay == 0.0


def test_decision_fields_and_repr(clock):
    d = nl.TokenBucket("1/s", clock=clock).hit("k")
    assert bool(d) is True
    assert "allowed=True" in repr(d) and "retry_after=0.0" in repr(d)
    d2 = nl.TokenBucket("1/s", burst=1, clock=clock).hit("k", 2)
    assert "retry_after=inf" in repr(d2)
    made = nl.Decision(False, 10, 0, 1.5, 2.5)
    assert not made and made.retry_after == 2.5 and made.delay == 0.0 and made.lease is None
    with pytest.raises(ValueError, match="retry_after"):
        nl.Decision(True, 1, 1, 0.0, -1.0)
    with pytest.raises(ValueError, match="reset_after"):
        nl.Decision(True, 1, 1, float("nan"), 0.0)


def test_reset_and_len(clock):
    tb = nl.TokenBucket("1/minute", clock=clock)
    assert len(tb) == 0
    tb.hit("a")
    tb.hit(b"a")
    tb.hit(1)
    assert len(tb) == 3
    assert not tb.try_acquire("a")
    tb.reset("a")
    assert tb.try_acquire("a")
    tb.reset("never-seen")
    assert len(tb) == 3


def test_keys_of_each_type_are_distinct(clock):
    tb = nl.TokenBucket("1/minute", clock=clock)
    for key in ("5", b"5", 5, -5, 2**100, "", b""):
        assert tb.try_acquire(key), key
    assert not tb.try_acquire(2**100)


def test_properties_and_repr(clock):
    tb = nl.TokenBucket("100/minute", burst=20, ttl=7200, clock=clock, max_keys=10)
    assert tb.rate == nl.Rate(100, 60.0)
    assert tb.limit == 20 and tb.ttl == 7200.0 and tb.max_keys == 10 and tb.clock is clock
    assert repr(tb) == "TokenBucket('100/minute', burst=20, ttl=7200.0, max_keys=10)"
    assert repr(nl.LeakyBucket("10/s", capacity=50)) == "LeakyBucket('10/second', capacity=50, ttl=3600.0)"
    assert repr(nl.SlidingWindow("5/2s")) == "SlidingWindow('5/2s', ttl=3600.0)"
    assert nl.FixedWindow("1/s").clock is None
    for cls in (nl.TokenBucket, nl.SlidingWindow, nl.FixedWindow, nl.LeakyBucket, nl.Composite, nl.Concurrency):
        assert issubclass(cls, nl.RateLimiter)


# ---------------------------------------------------------------- quotas as values

quota_rates = st.builds(
    nl.Rate, st.integers(1, 10**9), st.one_of(st.floats(1e-6, 3e9), st.sampled_from([1.0, 60.0, 3600.0, 86400.0]))
)


@settings(max_examples=300, deadline=None)
@given(rate=quota_rates, burst=st.one_of(st.none(), st.integers(1, 10**6)), parts=st.integers(1, 50))
def test_a_quota_speaks_the_redis_backends_language(rate, burst, parts):
    """Script arguments, key names and shares are exactly what the Redis backend has
    always computed in Python from a model limiter."""
    from nexus_limits._core import Quota

    try:
        bucket = Quota("token_bucket", rate, burst)
    except ValueError:
        return  # a burst that takes over 146 years to refill
    window = Quota("fixed_window", rate)
    period_us = rate.period * 1e6
    limit = burst or rate.count
    assert bucket.script_args == ("gcra", repr(period_us / rate.count), str(limit))
    assert window.script_args == ("fixed", repr(period_us), str(rate.count))
    assert bucket.redis_id == f"tb-{rate.count}-{period_us!r}-{limit}"
    assert window.redis_id == f"fw-{rate.count}-{period_us!r}"
    # The same quotas, or the same refusal, as the limiters the backend built by hand.
    assert outcome(lambda: (lambda q: (q.rate, q.limit))(bucket.share(parts))) == outcome(
        lambda: (lambda t: (t.rate, t.limit))(
            nl.TokenBucket(nl.Rate(max(rate.count // parts, 1), rate.period), burst=max(limit // parts, 1))
        )
    )
    # What a script's arguments describe, read back as the Redis backend reads them.
    a, b = float(bucket.script_args[1]), int(bucket.script_args[2])
    assert outcome(lambda: (lambda q: (q.rate, q.limit))(Quota.from_script_args("gcra", a, b))) == outcome(
        lambda: (nl.Rate(b, b * a / 1e6), b)
    )


def outcome(make):
    try:
        return make()
    except ValueError:
        return ValueError


def test_quota_values(clock):
    from nexus_limits._core import Quota

    tb = Quota("token_bucket", "100/minute", burst=20)
    assert (tb.algorithm, tb.name, tb.rate, tb.limit, tb.align) == (
        "token_bucket",
        "token bucket",
        nl.Rate(100, 60),
        20,
        None,
    )
    assert tb.window == 12.0 and tb.time_to_fresh == 12.0 and str(tb) == "token bucket 100/minute"
    assert repr(tb) == "Quota('token_bucket', '100/minute', burst=20)"
    sw = Quota("sliding_window", "7/day", align=3600)
    assert (sw.window, sw.time_to_fresh, sw.align) == (86400.0, 172800.0, 3600.0)
    assert repr(sw) == "Quota('sliding_window', '7/day', align=3600.0)"
    assert sw == Quota("sliding_window", nl.Rate(7, 86400), align=3600 - 86400) and hash(sw) == hash(
        Quota("sliding_window", "7/day", align=3600 + 86400)
    )
    assert sw != Quota("sliding_window", "7/day") and len({tb, tb, sw}) == 2
    # The limiters' own quotas are these values.
    assert nl.TokenBucket("100/minute", burst=20, clock=clock).quota == tb
    lb = nl.LeakyBucket("10/s", capacity=3, clock=clock)
    lb.set_default_quota("20/s", burst=5)
    assert lb.quota == Quota("leaky_bucket", "20/s", 5)
    assert nl.FixedWindow("7/day", clock=clock, align=3600).quota.align == 3600.0
    for bad, err in [
        (("gcra", "1/s"), "algorithm must be 'token_bucket'"),
        (("fixed_window", "1/s", 3), "a fixed window has no burst"),
        (("token_bucket", "1/s", 0), "burst must be at least 1"),
        (("token_bucket", "nonsense"), "invalid rate"),
    ]:
        with pytest.raises(ValueError, match=err):
            Quota(*bad)
    with pytest.raises(TypeError, match="algorithm must be a str"):
        Quota(1, "1/s")
    with pytest.raises(ValueError, match="at least 1"):
        tb.share(0)
    with pytest.raises(ValueError, match="script algorithm must be"):
        Quota.from_script_args("token_bucket", 1.0, 1)
