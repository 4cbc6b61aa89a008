"""Quota leasing (``lease=`` on the Redis rate limiters): a process takes a block of a
key's quota in one round trip and spends it locally.

What is asserted: a cold key costs one round trip per check (counted by the server,
INFO commandstats), a hot one far fewer; blocks shrink near the limit; a key Redis
reported exhausted is denied here until its retry_after without a round trip; unspent
units go back on close, when the key is idle, and not after the block's end; nothing
is ever admitted beyond the quota, whatever mix of leasing and plain limiters share a
key; a forked child never spends its parent's block; the algorithms it is unsound for
are refused. Manual clocks make the arithmetic exact; the idle give-back runs on real
time (a thread, an asyncio task)."""

from __future__ import annotations

import asyncio
import math
import os
import time

import pytest
import redis
import redis.asyncio
from support.servers import RedisServer

import nexus_limits as nl
import nexus_limits.redis as nlr
import nexus_limits.redis.asyncio as nla
from nexus_limits.redis import LeasePolicy

T0 = 472_222 * 3600.0  # a whole hour (and minute): fixed windows start here


def evalsha_calls(client) -> int:
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.fixture
def clock():
    return nl.ManualClock(T0)


# -- the API -------------------------------------------------------------------------


def test_lease_argument_and_policy(redis_client):
    for kind in (nlr.TokenBucket, nlr.FixedWindow, nlr.SlidingWindow, nla.TokenBucket, nla.SlidingWindow):
        assert kind.__init__.__kwdefaults__["lease"] is False
    tb = nlr.TokenBucket(redis_client, "10/s", lease=True)
    assert tb.lease_policy == LeasePolicy() and "leases_taken" in tb.stats()
    assert nlr.TokenBucket(redis_client, "10/s").lease_policy is None
    assert "leases_taken" not in nlr.TokenBucket(redis_client, "10/s").stats()
    policy = LeasePolicy(window=0.2, max_share=0.5, hold=1, idle=0.3, max_keys=7)
    assert nlr.FixedWindow(redis_client, "10/s", lease=policy).lease_policy is policy
    assert nla.LeasePolicy(window=0.2) == LeasePolicy(window=0.2) != LeasePolicy()
    assert "window=0.2" in repr(policy)
    with pytest.raises(ValueError, match="leaky bucket delays each call"):
        nlr.LeakyBucket(redis_client, "10/s", lease=True)
    with pytest.raises(ValueError, match="lease TokenBucket, FixedWindow or SlidingWindow"):
        nla.LeakyBucket(redis.asyncio.Redis(), "10/s", lease=LeasePolicy())
    assert nlr.LeakyBucket(redis_client, "10/s", lease=False).lease_policy is None
    for bad in ("yes", 1, 0.5, object(), [True]):
        with pytest.raises(TypeError, match="lease must be True, False or a LeasePolicy"):
            nlr.TokenBucket(redis_client, "10/s", lease=bad)


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"window": 0}, ValueError, "window must be above 0"),
        ({"window": -1}, ValueError, "window"),
        ({"window": math.nan}, ValueError, "window"),
        ({"window": math.inf}, ValueError, "window"),
        ({"window": 61}, ValueError, "at most 60"),
        ({"window": "1"}, TypeError, "window must be a number"),
        ({"window": True}, TypeError, "window"),
        ({"hold": 0}, ValueError, "hold"),
        ({"hold": 1e300}, ValueError, "hold"),
        ({"idle": -0.1}, ValueError, "idle"),
        ({"idle": None}, TypeError, "idle"),
        ({"max_share": 0}, ValueError, "max_share"),
        ({"max_share": 1.5}, ValueError, "max_share"),
        ({"max_share": math.nan}, ValueError, "max_share"),
        ({"max_share": "0.1"}, TypeError, "max_share"),
        ({"max_keys": 0}, ValueError, "max_keys"),
        ({"max_keys": 10**8}, ValueError, "max_keys"),
        ({"max_keys": 1.0}, TypeError, "max_keys"),
        ({"max_keys": True}, TypeError, "max_keys"),
    ],
)
def test_policy_refuses_bad_values(kw, exc, match):
    with pytest.raises(exc, match=match):
        LeasePolicy(**kw)


def test_bad_keys_and_costs_are_refused_as_without_leasing(redis_client, clock):
    leased = nlr.TokenBucket(redis_client, "10/s", lease=True, clock=clock)
    plain = nlr.TokenBucket(redis_client, "10/s", clock=clock)
    for lim in (plain, leased):
        assert lim.hit(1).allowed
        for key, exc in ((True, TypeError), (1.0, TypeError), ([1], TypeError), (None, TypeError)):
            with pytest.raises(exc, match="key must be str, bytes or int"):
                lim.hit(key)
        with pytest.raises(ValueError, match="too long"):
            lim.hit("k" * 2000)
        for cost, exc in ((-1, ValueError), (True, TypeError), (1.5, TypeError), ("1", TypeError)):
            with pytest.raises(exc, match="cost"):
                lim.hit("k", cost)
        d = lim.hit("k", 10**9)
        assert not d.allowed and d.retry_after == math.inf, "more than the burst: never"
        assert lim.hit("k", 0).allowed


# -- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["TokenBucket", "FixedWindow", "SlidingWindow"])
def test_a_cold_key_is_one_round_trip_per_check(redis_client, clock, kind):
    lim = getattr(nlr, kind)(redis_client, "100/s", lease=True, clock=clock)
    lim.hit("warm")  # the script is loaded
    before = evalsha_calls(redis_client)
    for _ in range(20):
        clock.advance(0.1)  # rarer than one check per 50 ms window
        assert lim.hit("cold").allowed
    assert evalsha_calls(redis_client) - before == 20
    stats = lim.stats()
    assert stats["leases_taken"] == 0 and stats["round_trips_saved"] == 0 and stats["allowed"] == 21


@pytest.mark.parametrize("kind", ["TokenBucket", "FixedWindow", "SlidingWindow"])
def test_a_hot_key_takes_blocks(redis_client, clock, kind):
    lim = getattr(nlr, kind)(redis_client, "100000/s", lease=True, clock=clock)
    before = evalsha_calls(redis_client)
    for _ in range(5000):
        clock.advance(0.0001)  # 10,000 checks a second
        assert lim.hit("hot").allowed
    trips = evalsha_calls(redis_client) - before
    stats = lim.stats()
    # Blocks of ~50 ms of traffic: 500 checks each (after the first, plain, check).
    assert trips <= 20, trips
    assert stats["round_trips_saved"] >= 5000 - trips and stats["leases_taken"] >= trips - 3
    # What Redis counted: the units spent plus those still in this process's block.
    held = lim._leases.held["hot"].units
    used = lim.limit - lim.peek("hot", 0).remaining
    assert used >= 5000 + held - 10, "every unit spent or held is counted in Redis (a little refill aside)"


def test_blocks_shrink_near_the_limit(redis_client, clock):
    fw = nlr.FixedWindow(redis_client, "1000/hour", lease=True, clock=clock)
    sizes = []
    admitted = 0
    for _ in range(1500):
        clock.advance(0.0001)
        before = fw.stats()["units_leased"]
        admitted += fw.hit("k").allowed
        grown = fw.stats()["units_leased"] - before
        if grown:
            sizes.append(grown)
    assert admitted == 1000, "exactly the window's limit"
    assert max(sizes) == 99, "a tenth of the limit (max_share) with the asking check's unit"
    assert sizes[-1] < 10 and sizes[-1] < sizes[len(sizes) // 2], f"smaller blocks at the end: {sizes}"


def test_an_exhausted_key_is_denied_here_until_retry_after(redis_client, clock):
    fw = nlr.FixedWindow(redis_client, "10/hour", lease=True, clock=clock)
    for _ in range(10):
        clock.advance(0.001)
        assert fw.hit("k").allowed
    d = fw.hit("k")
    assert not d.allowed and d.retry_after == pytest.approx(3600 - 0.010, abs=0.002)
    before = evalsha_calls(redis_client)
    for i in range(200):
        clock.advance(1.0)
        d = fw.hit("k")
        assert not d.allowed and d.retry_after == pytest.approx(3600 - 0.010 - (i + 1), abs=0.002)
    assert evalsha_calls(redis_client) == before, "no round trip while Redis said no"
    clock.advance(3600)
    assert fw.hit("k").allowed and evalsha_calls(redis_client) == before + 1, "a new window: asked again"

    # A denial for a large cost does not deny smaller ones.
    tb = nlr.TokenBucket(redis_client, "1/s", burst=10, lease=True, clock=clock)
    assert tb.hit("j", 8).allowed
    assert not tb.hit("j", 5).allowed
    assert tb.hit("j", 2).allowed, "2 units were left"


# -- giving back -------------------------------------------------------------------------


def test_close_gives_the_block_back(redis_client, clock):
    fw = nlr.FixedWindow(redis_client, "1000/hour", lease=True, clock=clock)
    for _ in range(200):
        clock.advance(0.001)
        fw.hit("k")
    held = fw._leases.held["k"].units
    assert held > 0
    assert fw.peek("k", 0).remaining == 1000 - 200 - held
    fw.close()
    assert fw.peek("k", 0).remaining == 800, "the unspent units are back"
    assert fw.stats()["units_returned"] == held and not fw._leases.held
    fw.close()  # nothing left: nothing to do
    assert fw.stats()["units_returned"] == held
    plain = nlr.TokenBucket(redis_client, "1/s")
    plain.close()  # no leasing: a no-op


def test_a_block_past_its_end_is_not_refunded(redis_client, clock):
    tb = nlr.TokenBucket(redis_client, "1000/s", burst=10_000, lease=True, clock=clock)
    for _ in range(100):
        clock.advance(0.0001)
        tb.hit("k")
    held = tb._leases.held["k"].units
    assert held > 0
    clock.advance(0.2)  # past the block's end (hold 0.1 s)
    before = tb.peek("k", 0).remaining
    tb.close()
    assert tb.stats()["units_returned"] == 0, "too late: the units count as spent"
    assert tb.peek("k", 0).remaining == before


def test_the_next_block_carries_the_last_one_back(redis_client, clock):
    fw = nlr.FixedWindow(redis_client, "100000/hour", lease=True, clock=clock)
    for _ in range(100):
        clock.advance(0.001)
        fw.hit("k")
    slot = fw._leases.held["k"]
    held = slot.units
    # Past the block's spending time (three quarters of its life), before its end.
    clock.advance(slot.spend_until - clock.now + 0.001)
    assert clock.now * 1e6 < slot.srv_until
    before = evalsha_calls(redis_client)
    assert fw.hit("k").allowed
    assert evalsha_calls(redis_client) == before + 1, "given back in the same round trip"
    assert fw.stats()["units_returned"] == held


def test_token_bucket_block_pays_the_hold_only_when_not_behind(redis_client, clock):
    # 1 unit per ms, burst 1000 (tau 1 s): hold 0.1 s is 100 units of refill.
    tb = nlr.TokenBucket(redis_client, "1000/s", burst=1000, lease=True, clock=clock)
    assert tb.hit("k").remaining == 999
    clock.advance(0.001)
    d = tb.hit("k")  # a block: want 50 (1000/s for 50 ms); need 1 now, 49 at the block's end
    assert d.allowed
    extra = tb._leases.held["k"].units
    assert extra == 49
    # Charged: the first unit (refilled by now), the asking unit at once, the block at
    # its end: tat = now + 0.1 s + 49 ms.
    assert tb.peek("k", 0).remaining == 1000 - 100 - 49
    tb.close()
    assert tb.peek("k", 0).remaining == 1000 - 100, "the block's units are back, not its hold"


# -- the invariant -----------------------------------------------------------------------


def _mixed_traffic(lims, clock, until: float, fast: float, slow: float):
    """Checks from each limiter in turn, in bursts and lulls; the times admitted."""
    times = []
    step = 0
    while clock.now < T0 + until:
        step += 1
        clock.advance(fast if step % 1000 < 700 else slow)
        lim = lims[step % 4] if step % 3 else lims[0]
        if lim.hit("k").allowed:
            times.append(clock.now - T0)
    return times


@pytest.mark.parametrize("kind", ["FixedWindow", "SlidingWindow"])
def test_leasing_and_plain_windows_never_admit_more_than_the_quota(redis_client, clock, kind):
    """Three leasing limiters (three processes, as far as Redis can tell) and a plain one
    on one key, over two windows: never more than the limit in a window."""
    make = getattr(nlr, kind)
    lims = [make(redis_client, "300/minute", lease=LeasePolicy(max_share=0.5), clock=clock) for _ in range(3)]
    lims.append(make(redis_client, "300/minute", clock=clock))
    times = _mixed_traffic(lims, clock, 120, 0.0005, 0.05)
    assert len(times) > 400
    for w in (0, 1):
        assert sum(1 for t in times if 60 * w <= t < 60 * (w + 1)) <= 300
    if kind == "SlidingWindow":  # the previous window's weight never lets a second one through
        assert sum(1 for t in times if t < 60) + sum(1 for t in times if 60 <= t < 61) <= 300 * 2


def test_leasing_and_plain_buckets_never_admit_more_than_the_quota(redis_client, clock):
    """The same on a token bucket refilling fast (a block's hold, 0.1 s, is 60 units of
    refill): in every interval, at most the burst plus the refill."""
    make = nlr.TokenBucket
    lims = [make(redis_client, "600/s", burst=300, lease=LeasePolicy(max_share=0.5), clock=clock) for _ in range(3)]
    lims.append(make(redis_client, "600/s", burst=300, clock=clock))
    times = _mixed_traffic(lims, clock, 3, 0.0002, 0.001)
    assert len(times) > 1000
    worst = 0.0
    for i, start in enumerate(times):
        for j in range(i + 1, len(times)):
            over = (j - i + 1) - (300 + 600 * (times[j] - start))
            worst = max(worst, over)
            if over < -300:
                break
    assert worst <= 1e-6, f"{worst:.2f} units above the quota in some interval"


def test_a_block_spent_late_never_adds_to_a_refilled_bucket(redis_client, clock):
    """The case that makes a token bucket's blocks dangerous: a process takes a block,
    the bucket refills meanwhile, then others take all there is and the block is spent
    at the same moment. The block is charged as if spent at its end, so the bucket never
    gives away the refill the block's units stand on: at one instant, at most the burst."""
    policy = LeasePolicy(max_share=0.5)
    a = nlr.TokenBucket(redis_client, "600/s", burst=300, lease=policy, clock=clock)
    b = nlr.TokenBucket(redis_client, "600/s", burst=300, clock=clock)
    for _ in range(20):  # a at 10,000 checks a second: it takes a block
        clock.advance(0.0001)
        assert a.hit("k").allowed
    held = a._leases.held["k"].units
    assert held >= 50
    clock.advance(0.07)  # a lull: the bucket refills (42 units), a's block is still spendable
    burst = 0
    while b.hit("k").allowed:
        burst += 1
    while a.hit("k").allowed:
        burst += 1
    assert burst <= 300, f"{burst} admitted at one instant"
    assert burst >= 300 - 100 - 1, "the price: at most the hold's refill (0.1 s = 60 units) and a unit"


def test_a_forked_child_does_not_spend_its_parents_block(redis_client):
    fw = nlr.FixedWindow(redis_client, "100000/hour", lease=True, prefix="fork")
    for _ in range(200):
        fw.hit("k")
    assert fw._leases.held, "the parent holds a block"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        ok = 0
        try:
            before = fw.stats()["round_trips_saved"]
            fw.hit("k")
            ok = int(not fw._leases.held.get("k") or fw.stats()["round_trips_saved"] == before)
        finally:
            os.write(write, bytes([ok]))
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"\x01", "the child's first check went to Redis"
    os.close(read)


def test_reset_and_quota_changes_drop_the_block(redis_client, clock):
    fw = nlr.FixedWindow(redis_client, "1000/hour", lease=True, clock=clock)
    for _ in range(100):
        clock.advance(0.001)
        fw.hit("k")
    assert fw._leases.held
    fw.reset("k")
    assert not fw._leases.held and fw.peek("k", 0).remaining == 1000
    for _ in range(100):
        clock.advance(0.001)
        fw.hit("k")
    fw.set_quota("k", "10/hour")
    assert not fw._leases.held
    assert not fw.hit("k").allowed, "the new quota is used up: no old block spent"


def test_composite_of_leased_parts_sees_their_blocks(redis_client, clock):
    tb = nlr.TokenBucket(redis_client, "100/hour", lease=True, clock=clock)
    fw = nlr.FixedWindow(redis_client, "1000/hour", clock=clock)
    both = nlr.Composite([tb, fw])
    for _ in range(50):
        clock.advance(0.001)
        tb.hit("k")
    held = tb._leases.held["k"].units
    _, (part_tb, _) = both.hit_each("k")
    assert part_tb.remaining <= 100 - 50 - held - 1


def test_shadow_mode_with_leasing(redis_client, clock, caplog):
    fw = nlr.FixedWindow(redis_client, "5/hour", lease=True, clock=clock, shadow=True)
    answers = []
    for _ in range(20):
        clock.advance(0.001)
        answers.append(fw.hit("k"))
    assert all(d.allowed for d in answers)
    assert sum(d.shadow for d in answers) == 15 and fw.stats()["shadow_denied"] == 15


def test_an_outage_spends_the_block_then_answers_on_error(clock):
    server = RedisServer().start()
    client = redis.Redis(port=server.port, socket_timeout=0.3, socket_connect_timeout=0.3)
    try:
        fw = nlr.FixedWindow(client, "100000/hour", lease=True, clock=clock, on_error="deny")
        for _ in range(100):
            clock.advance(0.001)
            assert fw.hit("k").allowed
        held = fw._leases.held["k"].units
        server.stop()
        for _ in range(held):
            d = fw.hit("k")
            assert d.allowed and not d.fallback, "the block is this process's: spent without Redis"
        d = fw.hit("k")
        assert not d.allowed and d.fallback
    finally:
        client.close()
        server.close()


# -- the idle give-back, on real time ----------------------------------------------------


# A block of the same size on any machine: the share cap (100 units of 100,000), which
# any rate over 2 checks/s asks for in a window of 60 s. (A block sized by the rate seen
# over the default 50 ms is a few units on a loaded machine, often spent by the last
# check: then no block was held to go back.)
FIXED_BLOCK = {"window": 60, "max_share": 0.001}


def test_idle_blocks_go_back_sync(redis_client):
    # (idle 0.5 s: a check delayed longer than the idle time on a loaded machine would
    # see its block go back before the test looks at it)
    fw = nlr.FixedWindow(redis_client, "100000/hour", lease=LeasePolicy(hold=5, idle=0.5, **FIXED_BLOCK))
    for _ in range(20):
        fw.hit("k")
    slot = fw._leases.held.get("k")
    held = 0 if slot is None else slot.units
    used = 100000 - fw.peek("k", 0).remaining
    assert held > 0, "a block is held"
    deadline = time.monotonic() + 5
    while fw._leases.held and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not fw._leases.held and fw.stats()["units_returned"] == held
    assert 100000 - fw.peek("k", 0).remaining == used - held
    assert fw._reaper is not None
    fw._reaper.join(2)
    assert not fw._reaper.is_alive(), "the thread ends when nothing is held"


def test_idle_blocks_go_back_asyncio(async_redis_client):
    async def main() -> None:
        client = async_redis_client()
        try:
            tb = nla.TokenBucket(client, "100000/s", lease=LeasePolicy(hold=5, idle=0.05, **FIXED_BLOCK))
            for _ in range(20):
                await tb.hit("k")
            slot = tb._leases.held.get("k")
            held = 0 if slot is None else slot.units
            assert held > 0, "a block is held"
            deadline = time.monotonic() + 5
            while tb._leases.held and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert not tb._leases.held and tb.stats()["units_returned"] == held
            await asyncio.wait_for(tb._reaper, 2)
            for _ in range(100):
                await tb.hit("j")
            await tb.close()
            assert not tb._leases.held
        finally:
            await client.aclose()

    asyncio.run(main())


def test_asyncio_leasing_counts(async_redis_client, redis_client):
    async def main() -> None:
        client = async_redis_client()
        clock = nl.ManualClock(T0)
        try:
            fw = nla.FixedWindow(client, "500/hour", lease=True, clock=clock)
            admitted = 0
            for _ in range(2000):
                clock.advance(0.001)
                admitted += (await fw.hit("k")).allowed
            assert admitted == 500
            stats = fw.stats()
            assert stats["round_trips_saved"] > 1500 and stats["denied"] == 1500
            await fw.close()
        finally:
            await client.aclose()

    asyncio.run(main())
