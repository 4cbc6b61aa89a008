"""Windows moved by `align=` start at the same moments on every store: in-process, in a
SharedMemoryStore and on Redis (checks, composites, quotas set at run time, quota
leasing and the on_error="local" twin). See tests/core/test_window_alignment.py for the
boundaries without align."""

from __future__ import annotations

import datetime
import math
import time

import pytest

import nexus_limits as nl
import nexus_limits.redis as nlr

UTC = datetime.timezone.utc
DAY = 86_400.0
FIVE_H = 18_000.0


def unix(*args: int) -> float:
    return datetime.datetime(*args, tzinfo=UTC).timestamp()


def same(a: nl.Decision, b: nl.Decision) -> None:
    """Two Decisions agree to the microsecond (Redis computes in microseconds)."""
    assert (a.allowed, a.limit, a.remaining) == (b.allowed, b.limit, b.remaining), (a, b)
    assert a.reset_after == pytest.approx(b.reset_after, abs=2e-6), (a, b)
    if math.isinf(a.retry_after):
        assert math.isinf(b.retry_after), (a, b)
    else:
        assert a.retry_after == pytest.approx(b.retry_after, abs=2e-6), (a, b)


ALIGNS = [
    FIVE_H,
    -19 * 3600,  # the same modulo a day
    FIVE_H + 3 * DAY,
    datetime.timedelta(hours=5),
    datetime.timezone(datetime.timedelta(hours=-5)),  # midnight at UTC-5 is 05:00 UTC
]


@pytest.mark.parametrize("align", ALIGNS)
@pytest.mark.parametrize("kind", ["FixedWindow", "SlidingWindow"])
def test_every_store_agrees_on_aligned_windows(kind, align, redis_client, tmp_path):
    """The same calls give the same Decisions, across the aligned boundary (05:00 UTC)."""
    clock = nl.ManualClock(unix(2026, 3, 14, 4, 59, 0))
    store = nl.SharedMemoryStore(path=tmp_path / "store", capacity=1024, ttl=3 * DAY)
    stores = [
        getattr(nl, kind)("3/day", clock=clock, align=align),
        getattr(nl, kind)("3/day", clock=clock, store=store, align=align),
        getattr(nlr, kind)(redis_client, "3/day", clock=clock, align=align),
    ]
    assert stores[2].align == stores[0].align
    assert stores[2].redis_key("u").endswith("-a18000000000000"), "the key id names the alignment"

    def hit(cost: int = 1) -> nl.Decision:
        local, shared, remote = (s.hit("u", cost) for s in stores)
        same(local, shared)
        same(local, remote)
        return local

    first = hit(3)
    assert first.allowed
    extra = DAY if kind == "SlidingWindow" else 0.0
    assert first.reset_after == pytest.approx(60.0 + extra), "the window ends at 05:00 UTC, not at midnight"
    assert not hit().allowed
    clock.advance(59.999)
    assert not hit().allowed
    clock.advance(0.001)  # 05:00:00 UTC
    assert hit().allowed == (kind == "FixedWindow")
    clock.advance(DAY / 3)
    hit()
    hit()
    for s in stores:
        same(s.peek("u", 0), stores[0].peek("u", 0))


def test_aligns_a_whole_period_apart_share_keys_and_windows(redis_client, clock):
    clock.advance(unix(2026, 3, 14, 12, 0, 0))
    a = nlr.FixedWindow(redis_client, "2/day", clock=clock, align=FIVE_H)
    b = nlr.FixedWindow(redis_client, "2/day", clock=clock, align=FIVE_H - 2 * DAY)
    utc = nlr.FixedWindow(redis_client, "2/day", clock=clock)
    assert a.redis_key("k") == b.redis_key("k") != utc.redis_key("k")
    assert a.hit("k", 2).allowed
    d = b.hit("k")
    assert not d.allowed and d.retry_after == pytest.approx(17 * 3600), "one window, counted once"
    assert utc.hit("k", 2).allowed, "another alignment counts other windows: another limit"


def test_real_clocks_agree_on_aligned_boundaries(redis_client, tmp_path):
    """Without a ManualClock: 2-second windows moved by 1 s end on odd seconds, and a
    day moved to UTC+05:30 ends at its local midnight, on every store."""
    store = nl.SharedMemoryStore(path=tmp_path / "store", capacity=1024, ttl=3 * DAY)
    india = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
    for rate, period, align, offset in (("1/2s", 2.0, 1.0, 1.0), ("1000/day", DAY, india, -19_800.0)):
        for kind in ("FixedWindow", "SlidingWindow"):
            limiters = [
                getattr(nl, kind)(rate, align=align),
                getattr(nl, kind)(rate, store=store, align=align),
                getattr(nlr, kind)(redis_client, rate, align=align),
            ]
            for lim in limiters:
                d = lim.hit("k")
                now = time.time()
                rest = d.reset_after - (period if kind == "SlidingWindow" else 0.0)
                off = (now + rest - offset) % period
                assert min(off, period - off) < 0.25, (lim, rest)


@pytest.mark.parametrize("kind", ["FixedWindow", "SlidingWindow"])
def test_quotas_set_at_run_time_keep_the_alignment(kind, redis_client, clock):
    clock.advance(unix(2026, 7, 1, 12, 0, 0))
    local = getattr(nl, kind)("10/day", clock=clock, align=FIVE_H)
    remote = getattr(nlr, kind)(redis_client, "10/day", clock=clock, align=FIVE_H)
    for lim in (local, remote):
        lim.hit("own", 4)
        lim.set_quota("own", "5/day")  # the same period: the count is kept
        lim.hit("other", 3)
        lim.set_quota("other", "20/2d")  # another period: the units used are carried over
    for key in ("own", "other"):
        same(local.peek(key, 0), remote.peek(key, 0))
        same(local.hit(key, 2), remote.hit(key, 2))
    extra = DAY if kind == "SlidingWindow" else 0.0
    assert remote.peek("own", 0).reset_after == pytest.approx(17 * 3600 + extra)
    clock.advance(17 * 3600)  # 05:00 UTC
    for key in ("own", "other"):
        same(local.hit(key), remote.hit(key))
    assert remote.clear_quota("own")
    local.clear_quota("own")
    same(local.hit("own"), remote.hit("own"))


def test_a_composite_of_aligned_parts_agrees_with_in_process(redis_client, clock):
    clock.advance(unix(2026, 7, 1, 4, 59, 0))
    local = nl.Composite(
        [nl.FixedWindow("3/day", clock=clock, align=FIVE_H), nl.SlidingWindow("5/h", clock=clock, align=1800)]
    )
    remote = nlr.Composite(
        [
            nlr.FixedWindow(redis_client, "3/day", clock=clock, align=FIVE_H),
            nlr.SlidingWindow(redis_client, "5/h", clock=clock, align=1800),
        ]
    )
    for step in (0, 1, 1, 30, 30, 1, 1800, 1, 1):
        clock.advance(step)
        same(local.hit("k"), remote.hit("k"))
    same(local.peek("k", 2), remote.peek("k", 2))


@pytest.mark.parametrize("kind", ["FixedWindow", "SlidingWindow"])
def test_leased_blocks_end_with_the_aligned_window(kind, redis_client, clock):
    """Quota leasing admits what the limit admits, window by window, with windows
    moved by align: a block never outlives its aligned window."""
    clock.advance(unix(2026, 7, 1, 4, 59, 59))
    policy = nlr.LeasePolicy(window=60.0, max_share=1.0, hold=30.0, idle=60.0)
    leased = getattr(nlr, kind)(redis_client, "50/day", clock=clock, align=FIVE_H, lease=policy)
    local = getattr(nl, kind)("50/day", clock=clock, align=FIVE_H)
    admitted = []
    for i in range(200):
        clock.advance(1 / 64)  # exact in binary: no step lands a float's width off the boundary
        d = leased.hit("k")
        assert d.allowed == local.hit("k").allowed, i
        admitted.append(d.allowed)
    assert sum(admitted[:63]) == 50, "05:00:00 UTC is 64 steps in"
    assert sum(admitted[63:]) == (50 if kind == "FixedWindow" else 0)
    assert leased.stats()["round_trips_saved"] > 0
    leased.close()


@pytest.mark.parametrize("kind", ["FixedWindow", "SlidingWindow"])
def test_the_local_twin_keeps_the_alignment(kind):
    import redis

    client = redis.Redis(port=1, socket_connect_timeout=0.2, socket_timeout=0.2)  # nothing listens
    clock = nl.ManualClock(unix(2026, 7, 1, 12, 0, 0))
    lim = getattr(nlr, kind)(client, "10/day", align=FIVE_H, on_error="local", replicas=2, clock=clock)
    d = lim.hit("k")
    extra = DAY if kind == "SlidingWindow" else 0.0
    assert d.fallback and d.limit == 5 and d.reset_after == pytest.approx(17 * 3600 + extra)
    client.close()


@pytest.mark.parametrize(
    ("align", "exc", "match"),
    [
        (float("nan"), ValueError, "align must be a finite number of seconds within 36525 days"),
        (float("inf"), ValueError, "align must be a finite number"),
        (2**80, ValueError, "within 36525 days"),
        ("18000", TypeError, "align must be None, a number of seconds"),
        (True, TypeError, "align must be None, a number of seconds"),
        ([1], TypeError, "align must be None"),
    ],
)
def test_bad_alignments_are_refused_as_in_process(redis_client, align, exc, match):
    for kind in ("FixedWindow", "SlidingWindow"):
        with pytest.raises(exc, match=match):
            getattr(nlr, kind)(redis_client, "10/day", align=align)


def test_buckets_have_no_windows_to_align(redis_client):
    for kind in ("TokenBucket", "LeakyBucket"):
        with pytest.raises(TypeError, match="align"):
            getattr(nlr, kind)(redis_client, "10/day", align=0)
        assert not hasattr(getattr(nlr, kind)(redis_client, "10/day"), "align")
    fw = nlr.FixedWindow(redis_client, "10/day")
    assert fw.align == 0.0 and "align" not in repr(fw)
    assert "align=18000.0" in repr(nlr.FixedWindow(redis_client, "10/day", align=FIVE_H))
