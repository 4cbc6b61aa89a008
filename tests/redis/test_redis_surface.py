"""One surface for every limiter, on Redis too: the README's method table holds for the
Redis classes (sync and asyncio) but for what it names as in-process only, and the
operational methods answer as in-process (see tests/package/test_surface.py)."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest
import redis.cluster
from support.surface import COLUMNS, COUNTERS, INSPECT_KEYS, surface_table

import nexus_limits as nl
import nexus_limits.redis as nlr
import nexus_limits.redis.asyncio as nla

# What only the in-process limiters have: Redis keys expire by themselves (no len,
# sweep, ttl, max_keys), and a Redis limiter's default quota is the one it is built
# with, in every process (no set_default_quota).
IN_PROCESS_ONLY = {"len", "sweep", "ttl", "max_keys", "set_default_quota"}


def every_limiter(module, client, clock):
    return {
        "TokenBucket": module.TokenBucket(client, "2/minute", clock=clock),
        "SlidingWindow": module.SlidingWindow(client, "2/minute", clock=clock),
        "FixedWindow": module.FixedWindow(client, "2/minute", clock=clock),
        "LeakyBucket": module.LeakyBucket(client, "2/minute", clock=clock),
        "Concurrency": module.Concurrency(client, 2, clock=clock),
        "Composite": module.Composite(
            [module.TokenBucket(client, "2/minute", clock=clock), module.FixedWindow(client, "5/minute", clock=clock)]
        ),
    }


@pytest.mark.parametrize("module", [nlr, nla], ids=["sync", "asyncio"])
def test_the_readme_table_holds_for_the_redis_classes(module, redis_client, async_redis_client, clock):
    client = redis_client if module is nlr else async_redis_client()
    limiters = every_limiter(module, client, clock)
    table = surface_table()
    for names, cells in table.items():
        for column, kinds in COLUMNS.items():
            for kind in kinds:
                lim = limiters[kind]
                for name in names:
                    attr = "__len__" if name == "len" else name
                    if name in IN_PROCESS_ONLY:
                        has = False
                    elif name == "align":
                        has = kind in ("FixedWindow", "SlidingWindow")
                    else:
                        has = cells[column] != "—"
                    assert hasattr(lim, attr) is has, f"Redis {kind}.{attr}: the README says {cells[column]!r}"


@pytest.mark.parametrize(
    "kind", ["TokenBucket", "SlidingWindow", "FixedWindow", "LeakyBucket", "Concurrency", "Composite"]
)
def test_the_operational_surface_answers_as_in_process(kind, redis_client, clock, caplog):
    lim = every_limiter(nlr, redis_client, clock)[kind]
    twin = {
        "TokenBucket": lambda: nl.TokenBucket("2/minute", clock=clock),
        "SlidingWindow": lambda: nl.SlidingWindow("2/minute", clock=clock),
        "FixedWindow": lambda: nl.FixedWindow("2/minute", clock=clock),
        "LeakyBucket": lambda: nl.LeakyBucket("2/minute", clock=clock),
        "Concurrency": lambda: nl.Concurrency(2, clock=clock),
        "Composite": lambda: nl.Composite(
            [nl.TokenBucket("2/minute", clock=clock), nl.FixedWindow("5/minute", clock=clock)]
        ),
    }[kind]()
    held = [lim.hit("k"), lim.hit("k"), twin.hit("k"), twin.hit("k")]  # a Concurrency's leases live in these
    assert all(held)
    denied, twin_denied = lim.hit("k"), twin.hit("k")
    assert not denied and denied.retry_after == pytest.approx(twin_denied.retry_after)
    info, twin_info = lim.inspect("k"), twin.inspect("k")
    assert INSPECT_KEYS <= set(info), set(info) ^ INSPECT_KEYS
    same = {k: v for k, v in info.items() if k != "parts"}
    assert same == pytest.approx({k: v for k, v in twin_info.items() if k != "parts"})
    assert (info["used"], info["remaining"], info["allowed"], info["tracked"]) == (2, 0, False, True)
    stats = lim.stats()
    assert {k: stats[k] for k in COUNTERS} == {"allowed": 2, "denied": 1, "near_limit": 1, "shadow_denied": 0}
    top = lim.top_keys(5, keys=["k", "other"])
    assert [(r["key"], r["used"], r["limit"]) for r in top] == [("k", 2, 2)]
    # Shadow mode: never denies, counts, logs the real retry_after.
    assert lim.shadow is False
    lim.shadow = True
    with caplog.at_level(logging.INFO, logger="nexus_limits.shadow"):
        d = lim.hit("k")
    assert d.allowed and d.shadow and d.retry_after == 0.0
    assert "would deny key 'k'" in caplog.text
    assert f"retry after {denied.retry_after:.3f}s" in caplog.text, caplog.text
    assert lim.stats()["shadow_denied"] == 1 and lim.inspect("k")["shadow"]
    assert "shadow=True" in repr(lim) or kind not in ("Concurrency", "Composite")
    lim.shadow = False
    with pytest.raises(TypeError, match="shadow must be True or False"):
        lim.shadow = 1
    assert not lim.hit("k"), "a shadow admission charged nothing"
    lim.reset("k")
    assert lim.hit("k")
    assert isinstance(lim, nl.RateLimiter)


# ---------------------------------------------------------------- Composite


def test_composite_shadow_is_its_own_flag(redis_client, clock, caplog):
    strict = nlr.TokenBucket(redis_client, "1/minute", clock=clock)
    loose = nlr.FixedWindow(redis_client, "10/minute", clock=clock)
    both = nlr.Composite([strict, loose])
    assert both.hit("k") and not both.hit("k")
    stats = both.stats()
    assert {k: stats[k] for k in COUNTERS} == {"allowed": 1, "denied": 1, "near_limit": 1, "shadow_denied": 0}
    assert [p["allowed"] for p in stats["parts"]] == [1, 2], "each part counts its own decisions"
    both.shadow = True
    with caplog.at_level(logging.INFO, logger="nexus_limits.shadow"):
        d = both.hit("k")
    assert d.allowed and d.shadow
    assert "would deny key 'k' (remaining 0 of 1, retry after 60.000s)" in caplog.text
    assert loose.peek("k", 0).remaining == 9, "a shadow admission charges no part"
    assert not strict.shadow and not loose.shadow, "the parts keep their own flags"
    each_d, each = both.hit_each("k")
    assert each_d.shadow and [p.allowed for p in each] == [False, True]
    assert both.stats()["shadow_denied"] == 2 and "shadow=True" in repr(both)
    assert nlr.Composite([strict], shadow=True).shadow
    with pytest.raises(TypeError, match="shadow must be True or False"):
        nlr.Composite([strict], shadow="yes")


def test_a_shadow_part_does_not_make_the_whole_a_shadow_answer(redis_client, clock):
    """As in-process: the part in shadow mode never denies the whole and counts its
    shadow denials; the whole's Decision is an ordinary admission."""
    strict = nlr.TokenBucket(redis_client, "1/minute", clock=clock, shadow=True)
    loose = nlr.TokenBucket(redis_client, "10/minute", clock=clock)
    both = nlr.Composite([strict, loose])
    local = nl.Composite(
        [nl.TokenBucket("1/minute", clock=clock, shadow=True), nl.TokenBucket("10/minute", clock=clock)]
    )
    remote = [both.hit("c") for _ in range(3)]
    inproc = [local.hit("c") for _ in range(3)]
    assert [(d.allowed, d.shadow) for d in remote] == [(d.allowed, d.shadow) for d in inproc]
    assert [d.shadow for d in remote] == [False, False, False]
    assert loose.peek("c", 0).remaining == 7, "the enforcing part is charged"
    assert strict.stats()["shadow_denied"] == 2 and not both.shadow


def test_composite_inspect_and_top_keys_span_the_parts(redis_client, clock):
    tokens = nlr.TokenBucket(redis_client, "10/minute", clock=clock)
    daily = nlr.FixedWindow(redis_client, "100/day", clock=clock)
    both = nlr.Composite([tokens, daily])
    local = nl.Composite([nl.TokenBucket("10/minute", clock=clock), nl.FixedWindow("100/day", clock=clock)])
    both.hit("a", 9)  # 90% of the bucket
    local.hit("a", 9)
    both.hit("b", 5)
    daily.hit("c", 95)  # 95% of the day, through the part alone
    info = both.inspect("a")
    want = local.inspect("a")
    assert info["algorithm"] == "composite" and info["limit"] == 10 and info["remaining"] == 1
    assert {k: v for k, v in info.items() if k != "parts"} == pytest.approx(
        {k: v for k, v in want.items() if k != "parts"}
    )
    assert [p["algorithm"] for p in info["parts"]] == ["token bucket", "fixed window"]
    assert [p["used"] for p in info["parts"]] == [9, 9]
    assert both.inspect("nobody")["tracked"] is False
    top = both.top_keys(2)
    assert [(r["key"], r["used"], r["limit"]) for r in top] == [("c", 95, 100), ("a", 9, 10)]
    assert both.top_keys(0) == []


def test_composite_quotas_still_belong_to_the_parts(redis_client, clock):
    both = nlr.Composite([nlr.TokenBucket(redis_client, "1/minute", clock=clock)])
    for call in (lambda: both.set_quota("k", "5/minute"), lambda: both.clear_quota("k")):
        with pytest.raises(TypeError, match=r"no quota of its own: call \w+ on its parts \(composite.parts\[i\]"):
            call()


# ---------------------------------------------------------------- Concurrency


def test_concurrency_quotas_are_shared_by_every_process(redis_client, clock):
    c = nlr.Concurrency(redis_client, 1, lease_ttl=10, clock=clock)
    other = nlr.Concurrency(redis_client, 1, lease_ttl=10, clock=clock)  # another process, the same limit
    c.set_quota("vip", 3)
    held = [c.try_acquire("vip"), other.try_acquire("vip"), c.try_acquire("vip"), other.try_acquire("vip")]
    assert [h is not None for h in held] == [True, True, True, False]
    info = c.inspect("vip")
    assert (info["limit"], info["own_quota"], info["used"], info["remaining"]) == (3, True, 3, 0)
    assert info["rate"] is None and info["algorithm"] == "concurrency" and not info["allowed"]
    assert info["retry_after"] == pytest.approx(10.0) and info["reset_after"] == pytest.approx(10.0)
    assert redis_client.get(c.redis_key("vip") + ":q") == b"3"
    assert c.clear_quota("vip") is True and c.clear_quota("vip") is False
    assert c.peek("vip").limit == 1 and not c.peek("vip").allowed, "3 held, the default is 1: none free"
    assert not c.inspect("vip")["own_quota"]
    with pytest.raises(ValueError, match="at least 1"):
        c.set_quota("vip", 0)
    with pytest.raises(TypeError, match="limit must be an int"):
        c.set_quota("vip", "3")
    with pytest.raises(TypeError, match="limit must be an int"):
        c.set_quota("vip", True)
    with pytest.raises(ValueError, match="too large"):
        c.set_quota("vip", 2**70)
    with pytest.raises(TypeError):
        c.set_quota("vip", "5/minute", None)  # a Concurrency's quota is a number of leases
    assert not hasattr(c, "set_default_quota"), "the limit it is built with is every process's"
    clock.advance(10)
    info = c.inspect("vip")
    assert (info["used"], info["tracked"], info["reset_after"]) == (0, False, 0.0)
    c.set_quota("vip", 2)
    c.reset("vip")
    assert c.inspect("vip")["own_quota"], "reset ends the leases, the limit stays"


def test_concurrency_ignores_an_own_limit_it_did_not_write(redis_client, clock):
    c = nlr.Concurrency(redis_client, 2, clock=clock)
    for junk, limit in (("nonsense", 2), ("", 2), ("0", 2), ("-3", 2), ("2.5", 2), ("inf", 2), ("3", 3)):
        redis_client.set(c.redis_key("k") + ":q", junk)
        d = c.hit("k")
        assert d.allowed and d.limit == limit, junk
        assert c.inspect("k")["own_quota"] is (limit == 3), junk
        c.reset("k")


def test_concurrency_top_keys(redis_client, clock):
    c = nlr.Concurrency(redis_client, 4, clock=clock, name="top")
    other = nlr.Concurrency(redis_client, 4, clock=clock, name="other")
    kept = [c.try_acquire("a") for _ in range(3)] + [c.try_acquire(b"\x00b")] + [other.try_acquire("a")]
    c.set_quota("vip", 10)
    kept += [c.try_acquire("vip") for _ in range(4)]
    assert all(kept)
    top = c.top_keys(5)
    assert [(r["key"], r["used"], r["limit"]) for r in top] == [("a", 3, 4), ("vip", 4, 10), (b"\x00b", 1, 4)]
    assert c.top_keys(1, scan=1)[0]["used"] > 0 and c.top_keys(0) == []


def test_concurrency_shadow_leases_hold_no_place(redis_client, clock, caplog):
    c = nlr.Concurrency(redis_client, 1, lease_ttl=30, clock=clock, shadow=True)
    assert c.shadow and "shadow=True" in repr(c)
    real = c.try_acquire("k")
    with caplog.at_level(logging.INFO, logger="nexus_limits.shadow"):
        extra = c.try_acquire("k")
    assert extra is not None and extra.shadow and "shadow=True" in repr(extra) and not real.shadow
    assert "would deny key 'k' (remaining 0 of 1, retry after 30.000s)" in caplog.text
    assert c.inspect("k")["used"] == 1, "the shadow lease holds no place"
    assert extra.release() is False
    assert c.acquire("k", timeout=0).shadow
    assert c.stats()["shadow_denied"] == 2
    c.shadow = False
    assert c.try_acquire("k") is None
    assert real.release()
    with pytest.raises(TypeError, match="shadow must be True or False"):
        nlr.Concurrency(redis_client, 1, shadow=1)


def test_a_dropped_redis_lease_is_held_until_its_lease_ttl(redis_client, clock):
    """Releasing is a round trip: a Redis Lease is never released on garbage collection
    (unlike in-process); its lease_ttl ends it."""
    c = nlr.Concurrency(redis_client, 1, lease_ttl=20, clock=clock)
    if c.try_acquire("k"):
        pass
    gc.collect()
    assert c.inspect("k")["used"] == 1 and c.try_acquire("k") is None
    clock.advance(20)
    assert c.try_acquire("k") is not None


# ---------------------------------------------------------------- asyncio, cluster


def test_the_asyncio_side_has_the_same_surface(async_redis_client, clock, caplog):
    async def main() -> None:
        client = async_redis_client()
        try:
            tb = nla.TokenBucket(client, "1/minute", clock=clock)
            both = nla.Composite([tb, nla.FixedWindow(client, "10/minute", clock=clock)])
            assert (await both.hit("k")).allowed
            both.shadow = True
            d = await both.hit("k")
            assert d.allowed and d.shadow and not tb.shadow
            info = await both.inspect("k")
            assert info["algorithm"] == "composite" and info["shadow"] and len(info["parts"]) == 2
            assert [r["key"] for r in await both.top_keys(3)] == ["k"]
            assert both.stats()["shadow_denied"] == 1 and both.stats()["parts"][0]["denied"] == 1
            c = nla.Concurrency(client, 1, clock=clock, shadow=True)
            real = await c.try_acquire("k")
            extra = await c.try_acquire("k")
            assert extra.shadow and not await extra.release()
            await c.set_quota("k", 2)
            info = await c.inspect("k")
            assert (info["used"], info["limit"], info["own_quota"]) == (1, 2, True)
            assert [(r["key"], r["used"], r["limit"]) for r in await c.top_keys()] == [("k", 1, 2)]
            assert await c.clear_quota("k") and await real.release()
        finally:
            await client.aclose()

    asyncio.run(main())


def test_concurrency_and_composite_top_keys_on_a_cluster(redis_cluster, clock):
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster.port)
    try:
        c = nlr.Concurrency(client, 3, clock=clock, prefix="surf")
        leases = [c.try_acquire(f"user-{i}") for i in range(20) for _ in range(i % 3 + 1)]
        assert all(leases)
        top = c.top_keys(3)
        assert [r["used"] for r in top] == [3, 3, 3] and all(r["limit"] == 3 for r in top)
        assert c.inspect("user-2")["used"] == 3
        both = nlr.Composite(
            [
                nlr.TokenBucket(client, "10/minute", clock=clock, prefix="surf"),
                nlr.FixedWindow(client, "5/h", clock=clock, prefix="surf"),
            ]
        )
        for i in range(10):
            both.hit(f"user-{i}", i % 5 + 1)
        assert [(r["used"], r["limit"]) for r in both.top_keys(2)] == [(5, 5), (5, 5)]
        for i in range(20):
            c.reset(f"user-{i}")
            both.reset(f"user-{i}")
    finally:
        client.close()
