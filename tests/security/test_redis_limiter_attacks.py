"""Attacks on the plain Redis limiters (TokenBucket, LeakyBucket, FixedWindow,
SlidingWindow, Composite, Concurrency; sync and asyncio) against a real redis-server,
with clients built with redis-py's defaults: state in Redis that this library did not
write (corrupted values, keys of another type), costs past 64 bits, debts whose
expiry would not fit Redis, replies no script returns, and the token bucket's
answers at rates whose unit interval is not a whole number of microseconds."""

from __future__ import annotations

import asyncio
import random
from typing import Any, Callable, List

import pytest
import redis
import redis.asyncio
from support.redis_state import FakeStore, assert_no_script_text, put_foreign, snapshot

import nexus_limits as nl
import nexus_limits.redis as nlr
import nexus_limits.redis.asyncio as nla
from nexus_limits.errors import NexusLimitsError
from nexus_limits.redis._common import now_arg, to_decision
from nexus_limits.redis._scripts import LEASE

EPOCH = 1_700_000_000.0  # a realistic clock, like the server's TIME
RATE_KINDS = ["TokenBucket", "LeakyBucket", "FixedWindow", "SlidingWindow"]
# Values another program (or a hand) could leave at a limiter's state key.
GARBAGE = ["nan", "inf", "-inf", "garbage", "", "1e999", "0x", "1:-5", "5:nan", "1:2:-3", "1:2:x", "nan:1:1"]


@pytest.fixture
def client(redis_client):
    return redis_client


def _limiter(client: Any, kind: str, rate: str = "10/minute", **kw: Any) -> Any:
    return getattr(nlr, kind)(client, rate, **kw)


# -- 1. state this library did not write --------------------------------------------------


@pytest.mark.parametrize("kind", RATE_KINDS)
@pytest.mark.parametrize("garbage", GARBAGE)
def test_a_corrupted_state_is_a_clear_error_and_admits_nothing(client, kind, garbage):
    """nan/inf crashed checks with OverflowError/ValueError; "garbage", "-inf", "" (and,
    for windows, a state that did not parse) were read as a fresh key: a full quota
    admitted. Now every check stops before writing, whatever on_error says, naming the
    key and the fix; the fix works."""
    lim = _limiter(client, kind, on_error="allow")
    key = lim.redis_key("k")
    client.set(key, garbage)
    before = snapshot(client)
    calls: List[Callable[[], Any]] = [
        lambda: lim.hit("k"),
        lambda: lim.hit("k", 3),
        lambda: lim.peek("k"),
        lambda: lim.try_acquire("k"),
        lambda: lim.get_limit("k"),
        lambda: lim.inspect("k"),
        lambda: lim.set_quota("k", "5/minute"),
        lambda: nlr.Composite([lim, nlr.TokenBucket(client, "100/minute")]).hit("k"),
    ]
    for call in calls:
        with pytest.raises(NexusLimitsError) as info:
            call()
        text = str(info.value)
        assert key in text and "reset" in text and "did not write" in text, text
        assert_no_script_text(text)
    assert snapshot(client) == before, "nothing was written"
    assert lim.stats()["fail_open"] == 0 and lim.stats()["errors"] == 0, "not an outage"
    lim.reset("k")  # what the error says to do
    assert lim.hit("k").allowed


@pytest.mark.parametrize("kind", ["TokenBucket", "FixedWindow", "SlidingWindow"])
def test_a_corrupted_state_met_by_a_leased_check(client, kind):
    lim = _limiter(client, kind, on_error="allow", lease=True)
    client.set(lim.redis_key("k"), "garbage")
    for _ in range(3):  # a plain check first, then a block once the key is busy
        with pytest.raises(NexusLimitsError, match="did not write"):
            lim.hit("k")
    assert client.get(lim.redis_key("k")) == b"garbage"


@pytest.mark.parametrize("garbage", ["nan", "inf", "-inf", "garbage", ""])
def test_a_corrupted_token_budget_state_is_a_clear_error_and_admits_nothing(client, garbage):
    """A TokenLimiter bucket holding garbage was "bad argument #1 to 'floor'" (before
    that: a full quota admitted); nan/inf a ValueError building the Decision."""
    lim = nlr.TokenLimiter(client, requests="10/minute", tokens="1000/minute", on_error="allow")
    key = lim.redis_keys("k")[0]
    client.set(key, garbage)
    before = snapshot(client)
    for call in (lambda: lim.reserve("k", 10), lambda: lim.peek("k", 10)):
        with pytest.raises(NexusLimitsError) as info:
            call()
        assert key in str(info.value) and "did not write" in str(info.value), str(info.value)
        assert_no_script_text(str(info.value))
    assert snapshot(client) == before, "nothing was written"
    client.delete(key)
    res = lim.reserve("k", 10)
    assert res.allowed
    tokens_key = lim.redis_keys("k")[1]  # what a settle of 5 tokens (of 10) adjusts
    client.set(tokens_key, garbage)
    with pytest.raises(NexusLimitsError, match="did not write"):
        res.settle(5)


def test_a_foreign_window_state_never_counts_as_fresh(client):
    """A window state with a negative count would have admitted past the limit."""
    for kind, state in (("FixedWindow", "{w}:-1000"), ("SlidingWindow", "{w}:-1000:-1000")):
        lim = _limiter(client, kind, "5/minute", clock=nl.ManualClock(EPOCH))
        window = int(EPOCH * 1e6 // 60e6)
        client.set(lim.redis_key("k"), state.format(w=window))
        with pytest.raises(NexusLimitsError, match="not a state of this limiter"):
            lim.hit("k", 5)


@pytest.mark.parametrize("kind", RATE_KINDS)
def test_an_enormous_finite_state_is_a_refusal_with_numeric_answers(client, kind):
    """A huge but finite state is a debt (or a full window): refused, with times held
    within 2**64 ns as in-process, and no raw error from a reply or an expiry."""
    lim = _limiter(client, kind, clock=nl.ManualClock(EPOCH))
    window = int(EPOCH * 1e6 // 60e6)
    state = {"FixedWindow": f"{window}:1e300", "SlidingWindow": f"{window}:1e300:1e300"}.get(kind, "1e300")
    client.set(lim.redis_key("k"), state)
    for d in (lim.hit("k"), lim.peek("k", 5)):
        assert not d.allowed and d.remaining == 0, d
        assert 0 < d.retry_after <= 2**64 / 1e9 and 0 < d.reset_after <= 2**64 / 1e9, d
    if kind in ("TokenBucket", "LeakyBucket"):
        assert d.retry_after > 1e9


@pytest.mark.parametrize("kind", [*RATE_KINDS, "Composite"])
@pytest.mark.parametrize("which", ["state", "quota"])
def test_a_key_of_the_wrong_type_is_a_clear_error(client, kind, which):
    """A raw Lua WRONGTYPE error leaked, even with on_error='allow'."""
    if kind == "Composite":
        part = nlr.FixedWindow(client, "10/minute")
        lim = nlr.Composite([nlr.TokenBucket(client, "10/minute"), part], on_error="allow")
    else:
        lim = part = _limiter(client, kind, on_error="allow")
    key = part.redis_key("k") + (":q" if which == "quota" else "")
    put_foreign(client, key, "hash")
    for call in (lambda: lim.hit("k"), lambda: lim.peek("k", 2), lambda: lim.inspect("k")):
        with pytest.raises(NexusLimitsError) as info:
            call()
        text = str(info.value)
        assert key in text and "holds a hash" in text, text
        assert ("set_quota writes it again" in text) == (which == "quota"), "the fix that works"
        assert_no_script_text(text)
    if kind != "Composite":
        with pytest.raises(NexusLimitsError, match="holds a hash"):
            lim.set_quota("k", "5/minute")
    assert client.type(key) == b"hash" and client.hgetall(key) == {b"a": b"b"}


def test_concurrency_on_keys_of_the_wrong_type(client):
    cc = nlr.Concurrency(client, 2, on_error="allow")
    lease = cc.acquire("k")
    key = cc.redis_key("k")
    put_foreign(client, key, "string")
    for call in (lambda: cc.hit("k"), lambda: cc.peek("k"), lambda: cc.inspect("k"), lease.release):
        with pytest.raises(NexusLimitsError) as info:
            call()
        text = str(info.value)
        assert key in text and "holds a string" in text, text
        assert_no_script_text(text)
    cc.reset("k")
    put_foreign(client, key + ":q", "hash")
    with pytest.raises(NexusLimitsError, match="set_quota writes it again"):
        cc.hit("k")
    assert client.get(key) is None


def test_concurrency_with_a_hand_written_endless_lease(client):
    """An expiry of +inf (or far past 2**64 ns) made PEXPIRE fail and the times overflow."""
    cc = nlr.Concurrency(client, 2)
    key = cc.redis_key("k")
    client.zadd(key, {"forever": float("inf"), "long": 1e30})
    d = cc.hit("k")
    assert not d.allowed and 1e9 < d.retry_after <= 2**64 / 1e9
    cc.set_quota("k", 3)
    lease = cc.acquire("k")
    assert lease.release() and 0 < client.pttl(key) <= 2**64 // 10**6 + 1


def test_asyncio_limiters_name_foreign_state(async_redis_client):
    async def main() -> None:
        ac = async_redis_client()
        try:
            tb = nla.TokenBucket(ac, "10/minute", on_error="allow")
            await ac.set(tb.redis_key("k"), "nan")
            with pytest.raises(NexusLimitsError, match="did not write"):
                await tb.hit("k")
            cc = nla.Concurrency(ac, 2, on_error="allow")
            await ac.set(cc.redis_key("k"), "x")
            with pytest.raises(NexusLimitsError, match="holds a string"):
                await cc.hit("k")
        finally:
            await ac.aclose()

    asyncio.run(main())


def test_top_keys_over_a_foreign_key_names_it(client):
    tb = nlr.TokenBucket(client, "10/minute")
    tb.hit("a")
    client.set(tb.redis_key("b"), "garbage")
    with pytest.raises(NexusLimitsError, match="did not write"):
        tb.top_keys()


# -- 2. costs past 64 bits -----------------------------------------------------------------


@pytest.mark.parametrize("kind", [*RATE_KINDS, "Composite"])
def test_a_cost_past_64_bits_is_refused_as_in_process(client, kind):
    def both() -> List[Any]:
        if kind == "Composite":
            return [
                nl.Composite([nl.TokenBucket("10/minute"), nl.FixedWindow("10/minute")]),
                nlr.Composite([nlr.TokenBucket(client, "10/minute"), nlr.FixedWindow(client, "10/minute")]),
            ]
        return [getattr(nl, kind)("10/minute"), _limiter(client, kind)]

    for lim in both():
        d = lim.hit("k", 2**64 - 1)
        assert not d.allowed and d.retry_after == float("inf")
        for cost in (2**64, 10**30):
            for call in (lim.hit, lim.peek, lim.try_acquire):
                with pytest.raises(ValueError, match="cost must be a non-negative integer"):
                    call("k", cost)
    with pytest.raises(ValueError, match="an int of 16610 bits"):
        both()[1].hit("k", 10**5000)
    leased = nlr.TokenBucket(client, "10/minute", lease=True)
    with pytest.raises(ValueError, match="cost must be a non-negative integer"):
        leased.hit("k", 2**64)
    assert client.keys("*") == []


# -- 3. expiries that must stay integers ---------------------------------------------------


def test_a_huge_carried_debt_still_expires(client):
    """set_quota carried a backlog over at the new rate without bound: a million units
    at one unit per century made SET PX get "3.2e+18" (a raw 'not an integer' error);
    in-process keeps at most two bursts of the new quota."""
    clock = nl.ManualClock(EPOCH)
    mem = nl.TokenBucket("1000000/second", clock=clock)
    tb = nlr.TokenBucket(client, "1000000/second", clock=clock)
    for lim in (mem, tb):
        assert lim.hit("k", 1_000_000).allowed
        lim.set_quota("k", "1/36500 days")
    a, b = mem.peek("k"), tb.peek("k")
    assert (a.allowed, a.remaining) == (b.allowed, b.remaining) == (False, 0)
    assert abs(a.retry_after - b.retry_after) < 1e-3, (a, b)
    assert 0 < client.pttl(tb.redis_key("k")) <= 2**64 // 10**6 + 1


def test_a_state_far_in_the_future_never_breaks_an_expiry(client):
    for kind in ("TokenBucket", "LeakyBucket"):
        lim = _limiter(client, kind, "1000000/second")
        client.set(lim.redis_key("k"), "1e17")
        lim.set_quota("k", "1/36500 days")
        assert not lim.hit("k").allowed
        assert 0 < client.pttl(lim.redis_key("k")) <= 2**64 // 10**6 + 1


# -- 4. token bucket answers at rates of no whole microsecond --------------------------------


def _same(a: nl.Decision, b: nl.Decision) -> bool:
    """The same decision; times to the microsecond (the scripts count in whole us, the
    core in ns)."""
    near = lambda x, y: x == y or abs(x - y) <= 1.5e-6  # noqa: E731
    return (a.allowed, a.limit, a.remaining) == (b.allowed, b.limit, b.remaining) and all(
        near(x, y) for x, y in ((a.reset_after, b.reset_after), (a.retry_after, b.retry_after), (a.delay, b.delay))
    )


ODD_RATES = [
    "7/second",
    "3/second",
    "11/3s",
    "13/minute",
    "7/minute",
    "1000/hour",
    "997/hour",
    "7/day",
    "3/7s",
    "19/minute",
    "1/second",
]


@pytest.mark.parametrize("seed", range(6))
def test_the_token_bucket_gets_the_in_process_answers_at_odd_rates(client, seed):
    """Random odd rates and bursts, random costs, random whole-microsecond sleeps at an
    epoch-scale clock (the server's TIME is as large): every answer is the in-process
    one. Before, the state lost the fraction of a unit at 1.7e15 us (a quarter of a
    microsecond is all a double keeps there): remaining was often one lower, and a
    call in-process admits was refused."""
    rng = random.Random(seed)
    for round_ in range(6):
        rate = rng.choice(ODD_RATES)
        burst = rng.choice([1, 2, 3, 7, 10, 64, 1000])
        kind = rng.choice(["TokenBucket", "LeakyBucket"])
        clock = nl.ManualClock(EPOCH)  # (whole us: EPOCH + a fraction would not be)
        clock.advance(rng.randrange(10**6) / 1e6)
        kw = {"burst": burst} if kind == "TokenBucket" else {"capacity": burst}
        mem = getattr(nl, kind)(rate, clock=clock, **kw)
        red = getattr(nlr, kind)(client, rate, clock=clock, prefix=f"odd{seed}x{round_}", **kw)
        interval = mem.rate.period / mem.rate.count
        key = red.redis_key("k")

        def kept(d: nl.Decision, key: str = key) -> nl.Decision:
            # Redis expires keys on its own (real) clock, not the manual one the test
            # steps: the state is kept for as long as the test's time says.
            client.persist(key)
            return d

        for step in range(60):
            what = (rate, burst, kind, step)
            r = rng.random()
            if r < 0.45:
                # (no hit of 0: it writes the state back with what is left of its expiry,
                # which runs out on Redis's own clock between the script and persist)
                cost = rng.choice([1, 1, 1, 2, burst, burst + 1, rng.randint(1, burst)])
                a, b = mem.hit("k", cost), kept(red.hit("k", cost))
                assert _same(a, b), (what, cost, a, b)
            elif r < 0.65:
                cost = rng.randint(0, burst)
                a, b = mem.peek("k", cost), red.peek("k", cost)
                assert _same(a, b), (what, cost, a, b)
            else:
                # sleeps around a unit's interval (and its multiples), in whole us
                units = rng.choice([0.0, 0.5, 1.0, 1.0, 2.0, rng.random() * 3])
                us = max(int(units * interval * 1e6) + rng.randint(-2, 2), 0)
                clock.advance(us / 1e6)


@pytest.mark.parametrize("seed", range(4))
def test_composites_and_quota_changes_get_the_in_process_answers_at_odd_rates(client, seed):
    """The same at odd rates through a Composite of two buckets, with the first part's
    quota changed now and then (its usage carried over, as in-process)."""
    rng = random.Random(seed)
    rates = ["7/second", "13/minute", "3/7s", "11/3s", "997/hour"]
    clock = nl.ManualClock(EPOCH)
    clock.advance(rng.randrange(10**6) / 1e6)
    first, burst = rng.choice(rates), rng.choice([1, 3, 7, 10])
    mem_parts = [nl.TokenBucket(first, burst=burst, clock=clock), nl.LeakyBucket("11/3s", capacity=5, clock=clock)]
    red_parts = [
        nlr.TokenBucket(client, first, burst=burst, clock=clock, prefix=f"c{seed}"),
        nlr.LeakyBucket(client, "11/3s", capacity=5, clock=clock, prefix=f"c{seed}"),
    ]
    mem, red = nl.Composite(mem_parts), nlr.Composite(red_parts)
    for step in range(60):
        if rng.random() < 0.15:
            rate, size = rng.choice(rates), rng.choice([1, 3, 7, 10])
            mem_parts[0].set_quota("k", rate, size)
            red_parts[0].set_quota("k", rate, size)
        else:
            cost = rng.randint(1, 4)
            a, b = mem.hit("k", cost), red.hit("k", cost)
            assert _same(a, b), (step, cost, a, b)
        for part in red_parts:  # expiry runs on Redis's clock, not the test's
            client.persist(part.redis_key("k"))
        a, b = mem.peek("k"), red.peek("k")
        assert _same(a, b), (step, a, b)
        clock.advance(rng.randrange(0, 600_000) / 1e6)


@pytest.mark.parametrize("rate", ["7/second", "3/second", "13/minute", "7/day"])
def test_a_drained_bucket_refills_on_time_at_odd_rates(client, rate):
    """Drain the bucket, then wait exactly what the in-process limiter says to retry
    after, in whole microseconds: both admit then, and neither a microsecond earlier."""
    clock = nl.ManualClock(EPOCH)
    mem = nl.TokenBucket(rate, clock=clock)
    red = nlr.TokenBucket(client, rate, clock=clock)
    burst = mem.limit
    for lim in (mem, red):
        assert lim.hit("k", burst).allowed
    for _ in range(20):
        client.persist(red.redis_key("k"))  # expiry runs on Redis's clock, not the test's
        a, b = mem.peek("k"), red.peek("k")
        assert _same(a, b), (a, b)
        wait_us = -(-round(a.retry_after * 1e9) // 1000)  # ceil to a whole us
        clock.advance((wait_us - 1) / 1e6)
        a, b = mem.hit("k"), red.hit("k")
        assert _same(a, b) and not a.allowed, (a, b)
        clock.advance(1 / 1e6)
        a, b = mem.hit("k"), red.hit("k")
        assert _same(a, b) and a.allowed, (a, b)


def _leased_check(client: Any, red: Any, clock: nl.ManualClock, cost: int) -> nl.Decision:
    """A check of ``cost`` by the lease script (what a leased TokenBucket runs), asking
    for no unit beyond the check's (no block spent later): the same step as a plain
    check of ``cost``, reading and writing the state the same key holds."""
    plan = red._plan
    argv = [now_arg(clock), *plan.quota_args, cost, cost, 10**6, 0, 0]
    granted, limit, remaining, reset, retry = (
        int(x) for x in client.eval(LEASE["gcra"].source, 2, *plan.keys("k"), *argv)[:5]
    )
    return to_decision([int(granted > 0), limit, remaining, reset, retry, 0])


@pytest.mark.parametrize("seed", range(6))
def test_a_leased_and_a_plain_bucket_read_each_others_state_at_odd_rates(client, seed):
    """A leased and a plain TokenBucket on one key at odd rates: each reads what the
    other wrote to its fraction of a microsecond, and every answer is the in-process
    one. Before, the lease script read the state as one double (a quarter of a
    microsecond at the epoch) and wrote it with 17 digits (a tenth of one): after a
    leased check, remaining was sometimes one lower than in-process."""
    rng = random.Random(seed)
    for round_ in range(4):
        rate, burst = rng.choice(ODD_RATES), rng.choice([1, 3, 7, 10, 64])
        clock = nl.ManualClock(EPOCH)
        clock.advance(rng.randrange(10**6) / 1e6)
        mem = nl.TokenBucket(rate, burst=burst, clock=clock)
        red = nlr.TokenBucket(client, rate, burst=burst, clock=clock, prefix=f"lease{seed}x{round_}")
        interval = mem.rate.period / mem.rate.count
        for step in range(60):
            r = rng.random()
            if r < 0.65:
                cost = rng.choice([1, 1, 2, burst, burst + 1, rng.randint(1, burst)])
                leased = r < 0.35
                b = _leased_check(client, red, clock, cost) if leased else red.hit("k", cost)
                a = mem.hit("k", cost)
                assert _same(a, b), (rate, burst, step, "leased" if leased else "plain", cost, a, b)
                client.persist(red.redis_key("k"))  # expiry runs on Redis's clock, not the test's
            else:
                units = rng.choice([0.5, 1.0, 1.0, 2.0, rng.random() * 3])
                clock.advance(max(int(units * interval * 1e6) + rng.randint(-2, 2), 0) / 1e6)


# -- 5. a store that answers what no script returns -----------------------------------------


REPLIES = [b"*2\r\n:1\r\n:2\r\n", b"$3\r\nabc\r\n", b":5\r\n", b"*20\r\n" + b"$3\r\nxyz\r\n" * 20, b"*0\r\n", b"_\r\n"]


@pytest.mark.parametrize("reply", REPLIES, ids=["short", "string", "int", "garbage", "empty", "null"])
def test_a_reply_no_script_returns_is_a_clear_error(reply):
    """IndexError, ValueError, TypeError from the depths of reply parsing became a clear
    error showing the reply."""
    store = FakeStore(reply)
    client = redis.Redis(port=store.port)
    try:
        calls: List[Callable[[], Any]] = []
        for kind in RATE_KINDS:
            lim = _limiter(client, kind)
            calls += [lambda lim=lim: lim.hit("k"), lambda lim=lim: lim.peek("k", 2), lambda lim=lim: lim.inspect("k")]
        tb = nlr.TokenBucket(client, "10/minute", lease=True, clock=nl.ManualClock(EPOCH))
        calls += [lambda: tb.hit("k"), lambda: tb.hit("k")]  # a plain check, then a block
        both = nlr.Composite([nlr.TokenBucket(client, "10/minute"), nlr.FixedWindow(client, "10/minute")])
        calls += [lambda: both.hit("k"), lambda: both.peek("k"), lambda: both.hit_each("k")]
        cc = nlr.Concurrency(client, 2)
        calls += [lambda: cc.hit("k"), lambda: cc.peek("k"), lambda: cc.inspect("k")]
        for call in calls:
            with pytest.raises(NexusLimitsError, match="reply is not what this library's script returns"):
                call()
    finally:
        client.close()
        store.close()


def test_a_reply_no_script_returns_asyncio():
    async def main() -> None:
        store = FakeStore(b"*2\r\n:1\r\n:2\r\n")
        ac = redis.asyncio.Redis(port=store.port)
        try:
            for lim in (nla.TokenBucket(ac, "10/minute"), nla.Concurrency(ac, 2)):
                with pytest.raises(NexusLimitsError, match=r"\[1, 2\]"):
                    await lim.hit("k")
        finally:
            await ac.aclose()
            store.close()

    asyncio.run(main())
