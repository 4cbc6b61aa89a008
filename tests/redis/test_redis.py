"""The Redis backend against real servers: conformance with the in-process limiters,
several processes on one key, outages, a cluster, and bad input."""

from __future__ import annotations

import math
import multiprocessing
import time
import uuid

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.backoff import NoBackoff
from redis.retry import Retry
from support.redis_state import every_node_ready

import nexus_limits as nl
import nexus_limits.redis as nlr
from conftest import NS

# Rates whose unit interval is a whole number of microseconds, so that the Lua twin
# (microseconds in doubles) and the Rust core (nanoseconds, exact) must agree exactly.
RATES = [(1, 1), (2, 1), (5, 1), (10, 1), (3, 6), (4, 60), (20, 60), (50, 3600), (8, 86400)]

KINDS = {
    "TokenBucket": (nl.TokenBucket, nlr.TokenBucket, "burst"),
    "LeakyBucket": (nl.LeakyBucket, nlr.LeakyBucket, "capacity"),
    "FixedWindow": (nl.FixedWindow, nlr.FixedWindow, None),
    "SlidingWindow": (nl.SlidingWindow, nlr.SlidingWindow, None),
}

schedules = st.lists(
    st.tuples(
        st.one_of(st.just(0), st.integers(0, 2_000_000), st.integers(0, 90_000_000)),  # advance, us
        st.integers(0, 2),  # key
        st.integers(0, 12),  # cost
        st.sampled_from(["hit", "hit", "peek", "try", "get_limit"]),
    ),
    max_size=40,
)
KEYS = ["alice", b"alice", 7]


def same(a: nl.Decision, b: nl.Decision) -> bool:
    def close(x: float, y: float) -> bool:
        return (math.isinf(x) and math.isinf(y)) or abs(x - y) <= 1.5e-6

    return (
        (a.allowed, a.limit, a.remaining) == (b.allowed, b.limit, b.remaining)
        and close(a.reset_after, b.reset_after)
        and close(a.retry_after, b.retry_after)
        and close(a.delay, b.delay)
    )


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rate=st.sampled_from(RATES), size=st.integers(1, 12), schedule=schedules)
def test_redis_matches_in_process(redis_client, kind, rate, size, schedule):
    """One conformance suite: the same schedule on both backends gives the same Decisions."""
    local_cls, redis_cls, size_kw = KINDS[kind]
    count, period = rate
    clock = nl.ManualClock(1_700_000_000.0)  # a realistic epoch, like the server's TIME
    extra = {size_kw: size} if size_kw else {}
    local = local_cls(nl.Rate(count, period), clock=clock, **extra)
    shared = redis_cls(redis_client, nl.Rate(count, period), prefix=f"t{uuid.uuid4().hex}", clock=clock, **extra)
    for advance_us, k, cost, op in schedule:
        clock.advance(advance_us / 1e6)
        key = KEYS[k]
        if op == "hit":
            a, b = local.hit(key, cost), shared.hit(key, cost)
        elif op == "peek":
            a, b = local.peek(key, cost), shared.peek(key, cost)
        elif op == "try":
            assert local.try_acquire(key, cost) == shared.try_acquire(key, cost)
            continue
        else:
            assert local.get_limit(key) == shared.get_limit(key)
            continue
        assert same(a, b), (op, key, cost, a, b)


@pytest.fixture(params=["memory", "redis"])
def make(request, redis_client):
    """Builds a limiter of either backend with the same arguments."""
    clock = nl.ManualClock(1_700_000_000.0)

    def build(kind: str, *args, **kwargs):
        local_cls, redis_cls, _ = KINDS[kind] if kind in KINDS else (None, None, None)
        if request.param == "memory":
            if kind == "Composite":
                return nl.Composite(args[0])
            return local_cls(*args, clock=clock, **kwargs)
        if kind == "Composite":
            return nlr.Composite(args[0])
        return redis_cls(redis_client, *args, clock=clock, prefix=f"t{uuid.uuid4().hex[:8]}", **kwargs)

    build.clock = clock  # type: ignore[attr-defined]
    build.backend = request.param  # type: ignore[attr-defined]
    return build


def test_conformance_semantics(make):
    clock = make.clock
    tb = make("TokenBucket", "100/minute", burst=20)
    d = tb.hit("k", 20)
    assert d.allowed and d.limit == 20 and d.remaining == 0
    assert d.reset_after == pytest.approx(12.0)
    denied = tb.hit("k")
    assert not denied and denied.retry_after == pytest.approx(0.6)
    assert tb.peek("other").remaining == 19
    assert tb.hit("k", 21).retry_after == math.inf
    for _ in range(10):
        assert not tb.try_acquire("k")
    clock.advance(0.6)
    assert tb.try_acquire("k"), "denied calls consumed nothing"
    tb.reset("k")
    assert tb.get_limit("k") == (True, 20)

    fw = make("FixedWindow", "3/minute")
    assert fw.hit("k", 3).remaining == 0
    assert not fw.hit("k").allowed
    sw = make("SlidingWindow", "10/10s")
    clock.advance(10 - clock.now % 10 + 5)  # the middle of a window
    assert sw.hit("k", 10)
    clock.advance(7)
    d = sw.hit("k", 3)
    assert not d.allowed and d.remaining == 2 and d.retry_after == pytest.approx(1.0)
    lb = make("LeakyBucket", "10/second", capacity=3)
    assert [lb.hit("job").delay for _ in range(3)] == pytest.approx([0.0, 0.1, 0.2])


def test_conformance_composite(make):
    a = make("TokenBucket", "10/second")
    b = make("FixedWindow", "12/day")
    both = make("Composite", [a, b])
    assert both.hit("k", 10).remaining == 0
    d = both.hit("k", 1)
    assert not d.allowed and d.retry_after == pytest.approx(0.1)
    assert b.get_limit("k") == (True, 2), "no part was charged by the denied call"
    make.clock.advance(1)
    assert not both.hit("k", 3).allowed
    assert both.hit("k", 2).allowed
    both.reset("k")
    assert a.get_limit("k") == (True, 10) and b.get_limit("k") == (True, 12)


def test_conformance_acquire(make):
    tb = make("TokenBucket", "2/s", burst=1)
    start = make.clock.now
    tb.acquire("k")
    tb.acquire("k")
    assert make.clock.now - start == pytest.approx(0.5)
    with pytest.raises(nl.RateLimitExceeded):
        tb.acquire("k", timeout=0.1)


def test_keys_expire_when_fresh(redis_client):
    tb = nlr.TokenBucket(redis_client, "10/s", burst=5)
    tb.hit("k", 5)
    ttl = redis_client.pttl(tb.redis_key("k"))
    assert 400 <= ttl <= 500, "the key lives exactly until the bucket is full again"
    fw = nlr.FixedWindow(redis_client, "5/minute")
    fw.hit("k")
    assert 0 < redis_client.pttl(fw.redis_key("k")) <= 60_000
    assert not redis_client.exists(tb.redis_key("never-admitted")), "denied and peeked keys write nothing"
    tb.peek("p")
    tb.hit("q", 6)
    assert redis_client.dbsize() == 2


def test_server_time_is_used(redis_client):
    """Without a clock the script reads TIME: limits work whatever the client clock says."""
    tb = nlr.TokenBucket(redis_client, "1/s", burst=1)
    assert tb.hit("k").allowed
    d = tb.hit("k")
    assert not d.allowed and 0.9 < d.retry_after <= 1.0
    time.sleep(d.retry_after + 0.01)
    assert tb.hit("k").allowed


def test_key_encoding_is_injective_and_safe(redis_client):
    tb = nlr.TokenBucket(redis_client, "1/minute", prefix="app:v1")
    keys = ["a:b", "a%3Ab", b"a:b", "a b", "{x}", "}{", "", b"", 0, -1, "i0", "s", "\x00\n", "é", 2**100]
    redis_keys = {tb.redis_key(k) for k in keys}
    assert len(redis_keys) == len(keys)
    for rk in redis_keys:
        assert rk.startswith("app:v1:{") and rk.count("{") == 1 and rk.count("}") == 1
        assert " " not in rk and "\n" not in rk
    for k in keys:
        assert tb.try_acquire(k), k
    for k in keys:
        assert not tb.try_acquire(k), k
    with pytest.raises(ValueError, match="key is too long"):
        tb.hit("x" * 2000)


def _hammer(port: int, tries: int, queue) -> None:
    client = redis.Redis(port=port)
    tb = nlr.TokenBucket(client, "1000/day", prefix="xproc")
    queue.put(sum(1 for _ in range(tries) if tb.try_acquire("shared-key")))


def test_processes_share_one_limit(redis_server, redis_client):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(redis_server.port, 400, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    admitted = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    assert sum(admitted) == 1000, admitted


def test_outage_and_recovery():
    from support.servers import RedisServer

    server = RedisServer().start()
    try:
        # No client-side retries: each failed call then costs at most one connect timeout.
        client = redis.Redis(port=server.port, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
        modes = {m: nlr.TokenBucket(client, "100/s", on_error=m, prefix=f"o{m}") for m in ("allow", "deny", "raise")}
        composite = nlr.Composite([modes["allow"], nlr.FixedWindow(client, "5/s")], on_error="deny")
        cc = nlr.Concurrency(client, 2, on_error="allow")
        for lim in modes.values():
            assert lim.hit("k").allowed and not lim.hit("k").fallback
        server.stop()
        start = time.monotonic()
        d = modes["allow"].hit("k")
        assert d.allowed and d.fallback
        d = modes["deny"].hit("k")
        assert not d.allowed and d.fallback and d.retry_after > 0
        with pytest.raises(nl.BackendUnavailable, match="could not be reached") as err:
            modes["raise"].hit("k")
        assert isinstance(err.value.__cause__, redis.RedisError)
        with pytest.raises(nl.BackendUnavailable):
            modes["raise"].reset("k")
        assert not composite.hit("k").allowed
        lease = cc.try_acquire("k")
        assert lease is not None and lease.fallback and lease.release() is False
        assert time.monotonic() - start < 10, "no call hung past the socket timeouts"
        server.start()
        # The client's circuit breaker answers on_error until its cool-down (1 s) is over;
        # then one probe finds the server back and every check is decided by it again.
        deadline = time.monotonic() + 5
        for lim in modes.values():
            d = lim.hit("k")
            while d.fallback and time.monotonic() < deadline:
                time.sleep(0.05)
                d = lim.hit("k")
            assert d.allowed and not d.fallback
        assert composite.hit("k").allowed
    finally:
        server.close()


def test_unreachable_server_is_a_clear_error():
    client = redis.Redis(port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    tb = nlr.TokenBucket(client, "1/s")
    with pytest.raises(nl.BackendUnavailable, match="TokenBucket on Redis: the store could not be reached"):
        tb.hit("k")
    with pytest.raises(nl.BackendUnavailable):
        nlr.Concurrency(client, 1).try_acquire("k")


def test_cluster(redis_cluster):
    every_node_ready(redis_cluster)
    from redis.cluster import RedisCluster

    client = RedisCluster(host="127.0.0.1", port=redis_cluster.port)
    try:
        both = nlr.Composite([nlr.TokenBucket(client, "5/s"), nlr.SlidingWindow(client, "8/minute")])
        for i in range(50):
            assert both.hit(f"user-{i}", 5).allowed
            assert not both.hit(f"user-{i}").allowed
        assert {client.keyslot(p.redis_key("user-1")) for p in both.parts} == {client.keyslot("{suser-1}")}
        both.reset("user-1")
        assert both.hit("user-1").allowed
        cc = nlr.Concurrency(client, 1)
        with cc.lease("k"):
            assert cc.try_acquire("k") is None
        assert cc.get_limit("k") == (True, 1)
    finally:
        client.close()


def test_concurrency_on_redis(redis_client):
    clock = nl.ManualClock(1_700_000_000.0)
    c = nlr.Concurrency(redis_client, 2, lease_ttl=30, clock=clock)
    a, b = c.try_acquire("k"), c.try_acquire("k")
    assert a is not None and b is not None
    d = c.hit("k")
    assert not d.allowed and d.lease is None and d.retry_after == pytest.approx(30.0)
    assert c.get_limit("k") == (False, 0)
    assert a.release() and not a.release()
    assert c.peek("k").remaining == 0 and c.get_limit("k") == (True, 1)
    clock.advance(30)
    assert not b.release(), "an expired lease is already gone"
    assert c.get_limit("k") == (True, 2)
    lease = c.acquire("k")
    c.try_acquire("k")
    assert c.acquire("k").key == "k"  # waited for expiry on the manual clock
    assert clock.now - 1_700_000_030.0 == pytest.approx(30.0)
    c.reset("k")
    assert c.get_limit("k") == (True, 2)
    assert "released=False" in repr(lease) and c.limit == 2 and c.lease_ttl == 30.0
    with pytest.raises(ValueError, match="cost must be 1"):
        c.hit("k", 2)


def test_concurrency_acquire_polls_real_time(redis_client):
    c = nlr.Concurrency(redis_client, 1)
    first = c.acquire("k")
    with pytest.raises(nl.RateLimitExceeded):
        c.acquire("k", timeout=0.05)
    first.release()
    with c.lease("k", timeout=1) as again:
        assert not again.released
    assert again.released


BAD = [
    (lambda c: nlr.TokenBucket({}, "1/s"), TypeError, "client must be a redis.Redis"),
    (lambda c: nlr.TokenBucket(redis.asyncio.Redis(), "1/s"), TypeError, "use nexus_limits.redis.asyncio"),
    (lambda c: nlr.TokenBucket(c, "1/s", prefix=""), ValueError, "prefix '' must be"),
    (lambda c: nlr.TokenBucket(c, "1/s", prefix="a{b}"), ValueError, "no braces"),
    (lambda c: nlr.TokenBucket(c, "1/s", prefix="a b"), ValueError, "prefix 'a b' must be"),
    (lambda c: nlr.TokenBucket(c, "1/s", prefix=5), TypeError, "prefix must be a str"),
    (lambda c: nlr.TokenBucket(c, "1/s", name="x y"), ValueError, "name 'x y' must be"),
    (lambda c: nlr.TokenBucket(c, "1/s", name=3), TypeError, "name must be None or a str"),
    (lambda c: nlr.TokenBucket(c, "1/s", on_error="ignore"), ValueError, "on_error must be one of"),
    (lambda c: nlr.TokenBucket(c, "1/s", clock=1.0), TypeError, "clock must be None"),
    (lambda c: nlr.TokenBucket(c, "1/fortnight"), ValueError, "invalid rate"),
    (lambda c: nlr.TokenBucket(c, "1/s", burst=0), ValueError, "burst must be at least 1"),
    (lambda c: nlr.LeakyBucket(c, "1/s", capacity=-1), ValueError, "capacity must be at least 1"),
    (lambda c: nlr.Concurrency(c, 0), ValueError, "limit must be at least 1"),
    (lambda c: nlr.Concurrency(c, 1, lease_ttl=-1), ValueError, "lease_ttl must be"),
    (lambda c: nlr.Composite([]), ValueError, "at least one limiter"),
    (lambda c: nlr.Composite(3), TypeError, "limiters must be an iterable"),
    (lambda c: nlr.Composite([nl.TokenBucket("1/s")]), TypeError, "each Composite part must be a Redis"),
    (lambda c: nlr.Composite([nlr.TokenBucket(c, "1/s"), nlr.TokenBucket(redis.Redis(), "1/s")]), ValueError, "same Redis client"),
    (lambda c: nlr.Composite([nlr.TokenBucket(c, "1/s", clock=nl.ManualClock()), nlr.FixedWindow(c, "1/s")]), ValueError, "same clock"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "exc", "why"), BAD)
def test_bad_input(redis_client, build, exc, why):
    with pytest.raises(exc, match=why):
        build(redis_client)


def test_bad_calls(redis_client):
    tb = nlr.TokenBucket(redis_client, "1/s")
    with pytest.raises(TypeError, match="key must be str, bytes or int"):
        tb.hit(1.5)
    with pytest.raises(ValueError, match="cost must be a non-negative integer"):
        tb.hit("k", -1)
    with pytest.raises(TypeError, match="cost must be a non-negative int"):
        tb.hit("k", 1.0)
    with pytest.raises(ValueError, match="timeout must be None or a non-negative"):
        tb.acquire("k", timeout=-1)
    tb2 = nlr.TokenBucket(redis_client, "1/s")
    same_tb = nlr.Composite([tb])
    with pytest.raises(ValueError, match="appears twice"):
        nlr.Composite([same_tb, tb])
    assert tb2.redis_key("k") == tb.redis_key("k"), "the same limit on the same prefix is shared"


def test_properties_and_repr(redis_client):
    tb = nlr.TokenBucket(redis_client, "100/minute", burst=20, prefix="app", on_error="allow")
    assert (tb.rate, tb.limit, tb.prefix, tb.on_error, tb.clock, tb.client) == (
        nl.Rate(100, 60),
        20,
        "app",
        "allow",
        None,
        redis_client,
    )
    assert repr(tb) == "TokenBucket(<Redis>, '100/minute', limit=20, prefix='app')"
    both = nlr.Composite([tb, nlr.FixedWindow(redis_client, "5/s", name="per-second")])
    assert both.limit == 5 and both.on_error == "raise" and len(both.parts) == 2
    assert both.parts[1].redis_key(1) == "nl:{i1}:per-second"
    assert repr(both).startswith("Composite([TokenBucket(")
    assert isinstance(tb, nl.RateLimiter)
    assert "Concurrency(<Redis>, 3" in repr(nlr.Concurrency(redis_client, 3))


def test_acquire_async_with_a_sync_client(redis_client):
    import asyncio

    tb = nlr.TokenBucket(redis_client, "20/s", burst=1)
    c = nlr.Concurrency(redis_client, 1)

    async def main() -> None:
        await tb.acquire_async("k")
        start = time.monotonic()
        await tb.acquire_async("k", timeout=1)
        assert time.monotonic() - start >= 0.03
        lease = await c.acquire_async("k")
        with pytest.raises(nl.RateLimitExceeded):
            await c.acquire_async("k", timeout=0.03)
        lease.release()
        async with c.lease_async("k") as held:
            assert not held.released

    asyncio.run(main())


def test_many_keys_per_second_from_one_client(redis_client):
    """A smoke check that a pipeline of checks keeps working over many keys."""
    sw = nlr.SlidingWindow(redis_client, "3/s")
    assert all(sw.try_acquire(i) for i in range(500))
    assert redis_client.dbsize() == 500
    assert NS == 1_000_000_000
