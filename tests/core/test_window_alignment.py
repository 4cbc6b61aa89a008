"""Windows start on Unix-time boundaries (UTC midnight for a day) on every store:
in-process, in a SharedMemoryStore and on Redis, with `align=` to move them."""

from __future__ import annotations

import datetime
import math
import os
import struct
import subprocess
import sys
import textwrap
import time

import pytest

import nexus_limits as nl
import nexus_limits.redis as nlr

UTC = datetime.timezone.utc
DAY = 86_400.0
FAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def unix(*args: int) -> float:
    return datetime.datetime(*args, tzinfo=UTC).timestamp()


def to_next(period: float, now: float, align: float = 0.0) -> float:
    """Seconds from Unix time `now` to the next boundary `align + k * period`."""
    return period - (now - align) % period


def phase_error(boundary: float, period: float) -> float:
    """How far a Unix time is from the nearest multiple of `period` (0 on a boundary)."""
    off = boundary % period
    return min(off, period - off)


def same(a: nl.Decision, b: nl.Decision) -> None:
    """Two Decisions agree to the microsecond (Redis computes in microseconds)."""
    assert (a.allowed, a.limit, a.remaining) == (b.allowed, b.limit, b.remaining), (a, b)
    assert a.reset_after == pytest.approx(b.reset_after, abs=2e-6), (a, b)
    if math.isinf(a.retry_after):
        assert math.isinf(b.retry_after), (a, b)
    else:
        assert a.retry_after == pytest.approx(b.retry_after, abs=2e-6), (a, b)


# ---------------------------------------------------------------- one clock, every store


@pytest.mark.parametrize("kind", ["FixedWindow", "SlidingWindow"])
def test_every_store_agrees_on_a_manual_clock(kind, redis_client, tmp_path):
    """A ManualClock is read as Unix time by all three stores: the same calls give the
    same Decisions, across UTC midnight."""
    clock = nl.ManualClock(unix(2026, 3, 14, 23, 59, 0))
    store = nl.SharedMemoryStore(path=tmp_path / "store", capacity=1024, ttl=3 * 86_400)
    stores = [
        getattr(nl, kind)("3/day", clock=clock),
        getattr(nl, kind)("3/day", clock=clock, store=store),
        getattr(nlr, kind)(redis_client, "3/day", clock=clock),
    ]

    def hit(cost: int = 1) -> nl.Decision:
        local, shared, remote = (s.hit("user", cost) for s in stores)
        same(local, shared)
        same(local, remote)
        return local

    first = hit(3)
    assert first.allowed
    denied = hit()
    assert not denied.allowed
    if kind == "FixedWindow":
        assert first.reset_after == pytest.approx(60.0), "the day's window ends at UTC midnight"
        assert denied.retry_after == pytest.approx(60.0)
    else:
        assert first.reset_after == pytest.approx(60.0 + DAY), "current window's units weigh until the next ends"
    clock.advance(59.999)
    assert not hit().allowed
    clock.advance(0.001)  # 00:00:00 UTC
    after = hit()
    assert after.allowed == (kind == "FixedWindow")
    clock.advance(DAY / 3)  # the sliding window's previous day now weighs 2 units
    hit()
    hit()


def test_real_clocks_agree_on_utc_boundaries(redis_client, tmp_path):
    """Without a ManualClock: in-process limiters (the monotonic clock plus the epoch
    offset), a SharedMemoryStore (the offset in its header) and Redis (the server's TIME)
    all end a day's window at the next UTC midnight and 2-second windows on even seconds."""
    store = nl.SharedMemoryStore(path=tmp_path / "store", capacity=1024, ttl=3 * 86_400)
    for rate, period in (("1000/day", DAY), ("1/2s", 2.0)):
        limiters = [
            nl.FixedWindow(rate),
            nl.FixedWindow(rate, store=store),
            nlr.FixedWindow(redis_client, rate),
            nl.SlidingWindow(rate),
            nl.SlidingWindow(rate, store=store),
            nlr.SlidingWindow(redis_client, rate),
        ]
        for lim in limiters:
            d = lim.hit("k")
            now = time.time()
            rest = d.reset_after - (period if "Sliding" in type(lim).__name__ else 0.0)
            # Where this limiter ends the current window, in Unix time:
            assert phase_error(now + rest, period) < 0.25, (lim, rest, to_next(period, now))


def test_a_shared_store_reads_windows_with_the_offset_in_its_header(tmp_path):
    """Every process of a store reads windows with the epoch offset the store recorded
    at creation, not the one it measured itself: boundaries agree across processes even
    if their wall clocks did not."""
    path = tmp_path / "store"
    nl.SharedMemoryStore(path=path, capacity=64)
    measured = time.time_ns() - time.monotonic_ns()
    skewed = measured + 7_500_000_000  # as if the creator's wall clock was 7.5 s ahead
    data = bytearray(path.read_bytes())
    assert struct.unpack_from("<I", data, 8)[0] == 2, "layout version 2 keeps the offset"
    assert abs(struct.unpack_from("<Q", data, 64)[0] - measured) < 50_000_000
    struct.pack_into("<Q", data, 64, skewed)
    path.write_bytes(bytes(data))
    store = nl.SharedMemoryStore(path=path)
    left = nl.FixedWindow("1/minute", store=store).hit("k").reset_after
    assert left == pytest.approx(to_next(60.0, time.time() + 7.5), abs=0.25)
    assert nl.FixedWindow("1/minute").hit("k").reset_after == pytest.approx(to_next(60.0, time.time()), abs=0.25)


@pytest.mark.skipif(not os.path.exists(FAKETIME), reason="libfaketime is not installed (scripts/setup-test.sh does it)")
def test_wall_clock_jumps_move_no_boundary(tmp_path, redis_server):
    """The process's wall clock jumps two days forwards, then back: windows built before
    and after the jumps keep the boundaries measured at start (the next real UTC
    midnight), on every store, and nothing is refilled or reset."""
    stamp = tmp_path / "faketime"
    stamp.write_text("+0")
    script = tmp_path / "clock.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            import redis
            import nexus_limits as nl
            import nexus_limits.redis as nlr

            store = nl.SharedMemoryStore(path=sys.argv[2], capacity=64, ttl=3 * 86400)
            client = redis.Redis.from_url(sys.argv[1])
            made = [nl.FixedWindow("2/day"), nl.FixedWindow("2/day", store=store), nlr.FixedWindow(client, "2/day")]
            for line in sys.stdin:
                cost = int(line)
                later = nl.FixedWindow("2/day")  # built now, after any jump
                out = [lim.hit("k", cost) for lim in made + [later]]
                print(time.time(), *(f"{d.allowed}:{d.reset_after}" for d in out), flush=True)
            """
        )
    )
    env = dict(
        os.environ,
        LD_PRELOAD=FAKETIME,
        FAKETIME_TIMESTAMP_FILE=str(stamp),
        FAKETIME_NO_CACHE="1",
        FAKETIME_DONT_FAKE_MONOTONIC="1",
    )
    proc = subprocess.Popen(
        [sys.executable, str(script), redis_server.url, str(tmp_path / "store")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:

        def ask(cost):
            proc.stdin.write(f"{cost}\n")
            proc.stdin.flush()
            wall, *rest = proc.stdout.readline().split()
            return float(wall), [(a == "True", float(r)) for a, r in (x.split(":") for x in rest)]

        real = time.time()
        wall0, first = ask(2)
        assert all(allowed for allowed, _ in first)
        for _, left in first:
            assert left == pytest.approx(to_next(DAY, real), abs=2.0), "the next real UTC midnight"
        for jump in ("+2d", "-2d"):
            stamp.write_text(jump)
            real = time.time()
            wall, now = ask(1)
            assert abs(wall - wall0) > DAY, "the process's wall clock really jumped"
            assert [allowed for allowed, _ in now[:3]] == [False] * 3, f"{jump}: nothing refilled or reset"
            assert now[3][0], "a new limiter's key is fresh"
            for _, left in now:
                assert left == pytest.approx(to_next(DAY, real), abs=2.0), f"{jump}: the boundary did not move"
    finally:
        proc.stdin.close()
        proc.wait(10)
        proc.stdout.close()


# ---------------------------------------------------------------- align=


class _DaylightSaving(datetime.tzinfo):
    """A zone without a fixed offset (like a zoneinfo zone with DST): utcoffset(None) is None."""

    def utcoffset(self, dt):
        return None if dt is None else datetime.timedelta(hours=-5)

    def dst(self, dt):
        return None

    def tzname(self, dt):
        return "DST"


@pytest.mark.parametrize(
    "align",
    [
        18_000,
        18_000.0,
        -19 * 3600,  # the same modulo a day
        datetime.timedelta(hours=5),
        datetime.timezone(datetime.timedelta(hours=-5)),  # midnight at UTC-5 is 05:00 UTC
    ],
)
@pytest.mark.parametrize("kind", [nl.FixedWindow, nl.SlidingWindow])
def test_align_moves_the_boundaries(kind, align):
    clock = nl.ManualClock(unix(2026, 7, 1, 12, 0, 0))
    lim = kind("10/day", clock=clock, align=align)
    extra = DAY if kind is nl.SlidingWindow else 0.0
    assert lim.hit("k").reset_after == pytest.approx(17 * 3600 + extra), "the window ends at 05:00 UTC"
    assert lim.align in (18_000.0, -19 * 3600.0)
    assert f"align={lim.align!r}" in repr(lim)
    # Quotas set at run time keep the alignment.
    lim.set_quota("own", "5/day")
    assert lim.hit("own").reset_after == pytest.approx(17 * 3600 + extra)
    lim.set_default_quota("20/day")
    assert lim.hit("new").reset_after == pytest.approx(17 * 3600 + extra)


def test_align_by_a_fixed_offset_zone_and_on_other_periods():
    noon = unix(2026, 7, 1, 12, 0, 0)
    clock = nl.ManualClock(noon)
    india = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
    fw = nl.FixedWindow("10/day", clock=clock, align=india)
    assert fw.align == -19_800.0
    assert fw.hit("k").reset_after == pytest.approx(to_next(DAY, noon, -19_800.0)) == pytest.approx(6.5 * 3600)
    # An alignment is taken modulo the period: 5 h is a whole number of minutes.
    assert nl.FixedWindow("1/minute", clock=clock, align=18_000).hit("k").reset_after == pytest.approx(60.0)
    assert nl.FixedWindow("1/minute", clock=clock, align=15).hit("k").reset_after == pytest.approx(15.0)
    utc = nl.FixedWindow("10/day", clock=clock, align=UTC)
    assert utc.align == 0.0 and "align" not in repr(utc)
    assert utc.hit("k").reset_after == pytest.approx(12 * 3600)


def test_shared_store_keeps_differently_aligned_limits_apart(tmp_path):
    clock = nl.ManualClock(unix(2026, 7, 1, 12, 0, 0))
    store = nl.SharedMemoryStore(path=tmp_path / "s", capacity=1024, ttl=86_400)
    utc = nl.FixedWindow("2/day", clock=clock, store=store)
    est = nl.FixedWindow("2/day", clock=clock, store=store, align=18_000)
    assert utc.hit("k", 2).allowed
    d = est.hit("k", 2)
    assert d.allowed, "another alignment counts other windows: another limit"
    assert d.reset_after == pytest.approx(17 * 3600)
    assert utc.hit("k").reset_after == pytest.approx(12 * 3600)


@pytest.mark.parametrize(
    ("align", "exc", "match"),
    [
        (float("nan"), ValueError, "align must be a finite number of seconds within 36525 days"),
        (float("inf"), ValueError, "align must be a finite number"),
        (-1e300, ValueError, "within 36525 days"),
        (2**80, ValueError, "within 36525 days"),
        ("18000", TypeError, "align must be None, a number of seconds"),
        (True, TypeError, "align must be None, a number of seconds"),
        ([1], TypeError, "align must be None"),
        (_DaylightSaving(), ValueError, "no fixed UTC offset"),
    ],
)
def test_bad_alignments_are_refused(align, exc, match):
    for kind in (nl.FixedWindow, nl.SlidingWindow):
        with pytest.raises(exc, match=match):
            kind("10/day", align=align)


def test_buckets_have_no_windows_to_align():
    with pytest.raises(TypeError, match="align"):
        nl.TokenBucket("10/day", align=0)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="align"):
        nl.LeakyBucket("10/day", align=0)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        nl.FixedWindow("10/day", None, None, None, None, None, 0)  # type: ignore[misc]
