"""One surface for every limiter: what the README's table says each limiter has, it
has, and the operational methods of Concurrency and Composite do what they say."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading

import pytest
from support.surface import COLUMNS, COUNTERS, INSPECT_KEYS, surface_table

import nexus_limits as nl


def every_limiter(clock):
    return {
        "TokenBucket": nl.TokenBucket("2/minute", clock=clock),
        "SlidingWindow": nl.SlidingWindow("2/minute", clock=clock),
        "FixedWindow": nl.FixedWindow("2/minute", clock=clock),
        "LeakyBucket": nl.LeakyBucket("2/minute", clock=clock),
        "Concurrency": nl.Concurrency(2, clock=clock),
        "Composite": nl.Composite([nl.TokenBucket("2/minute", clock=clock), nl.FixedWindow("5/minute", clock=clock)]),
    }


def test_the_readme_table_says_exactly_what_each_limiter_has(clock):
    table = surface_table()
    assert len(table) >= 15
    limiters = every_limiter(clock)
    for names, cells in table.items():
        for column, kinds in COLUMNS.items():
            for kind in kinds:
                lim = limiters[kind]
                cell = cells[column]
                for name in names:
                    attr = "__len__" if name == "len" else name
                    if name == "align":
                        has = kind in ("FixedWindow", "SlidingWindow")
                        assert ("FixedWindow" in cell) is (column == "rate limiters")
                    else:
                        has = cell != "—"
                    assert hasattr(lim, attr) is has, f"{kind}.{attr}: the README says {cell!r}"


@pytest.mark.parametrize(
    "kind", ["TokenBucket", "SlidingWindow", "FixedWindow", "LeakyBucket", "Concurrency", "Composite"]
)
def test_the_operational_surface_answers_alike(kind, clock, caplog):
    lim = every_limiter(clock)[kind]
    held = [lim.hit("k"), lim.hit("k")]  # a Concurrency's leases live in these Decisions
    assert all(held)
    denied = lim.hit("k")
    assert not denied and denied.retry_after > 0
    info = lim.inspect("k")
    assert INSPECT_KEYS <= set(info), set(info) ^ INSPECT_KEYS
    assert (info["used"], info["remaining"], info["allowed"], info["tracked"]) == (2, 0, False, True)
    assert info["retry_after"] == pytest.approx(denied.retry_after)
    stats = lim.stats()
    assert {k: stats[k] for k in COUNTERS} == {"allowed": 2, "denied": 1, "near_limit": 1, "shadow_denied": 0}
    assert stats["keys"] == 1
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
    lim.shadow = False
    with pytest.raises(TypeError, match="shadow must be True or False"):
        lim.shadow = 1
    assert not lim.hit("k"), "a shadow admission charged nothing"
    lim.reset("k")
    assert lim.hit("k")
    assert isinstance(lim, nl.RateLimiter)


# ---------------------------------------------------------------- Concurrency


def test_if_try_acquire_cannot_leak_a_lease(clock):
    c = nl.Concurrency(1, clock=clock)
    for _ in range(3):
        if c.try_acquire("k"):
            pass  # the lease was not kept: it is given back at once
    assert c.get_limit("k") == (True, 1) and len(c) == 0
    assert c.stats()["dropped"] == 3
    if c.hit("k"):
        pass
    assert c.inspect("k")["used"] == 0, "a Decision holding a lease gives it back when dropped"


def test_a_kept_lease_is_held_until_released(clock):
    c = nl.Concurrency(1, clock=clock)
    lease = c.try_acquire("k")
    assert lease and not lease.shadow
    gc.collect()
    assert c.try_acquire("k") is None, "held while the object lives"
    decision = c.hit("other")
    lease_of = decision.lease
    del decision
    assert c.inspect("other")["used"] == 1, "the lease outlives the Decision it came in"
    assert lease.release() and lease_of.release()
    assert c.stats()["dropped"] == 0 and c.stats()["held"] == 0


def test_a_thread_that_dies_holding_a_lease_gives_it_back(clock):
    c = nl.Concurrency(1, clock=clock)

    def work():
        lease = c.try_acquire("k")
        assert lease is not None
        raise RuntimeError("crashed while holding it")

    errors = []

    def run() -> None:
        try:
            work()
        except RuntimeError as error:
            errors.append(error)

    t = threading.Thread(target=run)
    t.start()
    t.join(5)
    assert errors, "the thread crashed"
    errors.clear()  # the traceback references the frame; dropping it frees the lease
    gc.collect()
    assert c.get_limit("k") == (True, 1)
    assert c.stats()["dropped"] == 1


def test_concurrency_quotas(clock):
    c = nl.Concurrency(1, lease_ttl=10, clock=clock)
    c.set_quota("vip", 3)
    held = [c.try_acquire("vip") for _ in range(4)]
    assert [h is not None for h in held] == [True, True, True, False]
    info = c.inspect("vip")
    assert (info["limit"], info["own_quota"], info["used"], info["remaining"]) == (3, True, 3, 0)
    assert info["rate"] is None and info["algorithm"] == "concurrency"
    assert c.stats()["own_quotas"] == 1
    assert c.clear_quota("vip") is True and c.clear_quota("vip") is False
    assert c.peek("vip").limit == 1 and not c.peek("vip").allowed, "3 held, the default is 1: none free"
    c.set_default_quota(5)
    more = c.try_acquire("vip")
    assert c.limit == 5 and more is not None
    with pytest.raises(ValueError, match="at least 1"):
        c.set_quota("vip", 0)
    with pytest.raises(TypeError, match="limit must be an int"):
        c.set_quota("vip", "3")
    with pytest.raises(TypeError):
        c.set_quota("vip", "5/minute", None)  # a Concurrency's quota is a number of leases
    # Leases that run out their lease_ttl are counted.
    clock.advance(10)
    assert c.sweep() == 1
    assert c.stats()["expired"] == 4 and c.stats()["held"] == 0
    assert c.inspect("vip")["tracked"] is False


def test_a_raised_limit_wakes_a_blocked_acquire():
    c = nl.Concurrency(1)
    first = c.acquire("k")
    got = []
    t = threading.Thread(target=lambda: got.append(c.acquire("k", timeout=5)))
    t.start()
    t.join(0.05)
    assert not got
    c.set_quota("k", 2)
    t.join(5)
    assert got and got[0] is not None
    got[0].release()
    first.release()


def test_concurrency_shadow_leases_hold_no_place(clock, caplog):
    c = nl.Concurrency(1, lease_ttl=30, clock=clock, shadow=True)
    assert c.shadow and "shadow=True" in repr(c)
    real = c.try_acquire("k")
    with caplog.at_level(logging.INFO, logger="nexus_limits.shadow"):
        extra = c.try_acquire("k")
    assert extra is not None and extra.shadow and "shadow=True" in repr(extra)
    assert "Concurrency(1) would deny key 'k' (remaining 0 of 1, retry after 30.000s)" in caplog.text
    assert c.inspect("k")["used"] == 1, "the shadow lease holds no place"
    assert extra.release() is False
    assert c.stats()["shadow_denied"] == 1
    c.shadow = False
    assert c.try_acquire("k") is None
    real.release()


def test_concurrency_acquire_returns_shadow_leases_too(clock):
    c = nl.Concurrency(1, clock=clock, shadow=True)
    kept = c.acquire("k")
    assert c.acquire("k", timeout=0).shadow

    async def main() -> None:
        assert (await c.acquire_async("k", timeout=0)).shadow

    asyncio.run(main())
    kept.release()


# ---------------------------------------------------------------- Composite


def test_composite_counts_and_shadows_as_a_whole(clock, caplog):
    strict = nl.TokenBucket("1/minute", clock=clock)
    loose = nl.FixedWindow("10/minute", clock=clock)
    both = nl.Composite([strict, loose])
    assert both.hit("k") and not both.hit("k")
    stats = both.stats()
    assert {k: stats[k] for k in COUNTERS} == {"allowed": 1, "denied": 1, "near_limit": 1, "shadow_denied": 0}
    assert [p["allowed"] for p in stats["parts"]] == [1, 2], "each part counts its own decisions"
    both.shadow = True
    with caplog.at_level(logging.INFO, logger="nexus_limits.shadow"):
        d = both.hit("k")
    assert d.allowed and d.shadow
    assert "Composite would deny key 'k' (remaining 0 of 1, retry after 60.000s)" in caplog.text
    assert loose.peek("k", 0).remaining == 9, "a shadow admission charges no part"
    assert not strict.shadow and not loose.shadow, "the parts keep their own flags"
    each_d, each = both.hit_each("k")
    assert each_d.shadow and [p.allowed for p in each] == [False, True]
    assert both.stats()["shadow_denied"] == 2 and "shadow=True" in repr(both)


def test_composite_quotas_belong_to_the_parts(clock):
    part = nl.TokenBucket("1/minute", clock=clock)
    both = nl.Composite([part, nl.FixedWindow("10/minute", clock=clock)])
    for call in (
        lambda: both.set_quota("k", "5/minute"),
        lambda: both.clear_quota("k"),
        lambda: both.set_default_quota("5/minute"),
    ):
        with pytest.raises(TypeError, match=r"no quota of its own: call \w+ on its parts \(composite.parts\[i\]"):
            call()
    both.parts[0].set_quota("k", "3/minute")
    assert both.hit("k", 3)
    assert both.inspect("k")["parts"][0]["own_quota"]
    assert both.limit == 1


def test_composite_inspect_and_top_keys_span_the_parts(clock):
    tokens = nl.TokenBucket("10/minute", clock=clock)
    daily = nl.FixedWindow("100/day", clock=clock)
    both = nl.Composite([tokens, daily])
    both.hit("a", 9)  # 90% of the bucket
    both.hit("b", 5)
    daily.hit("c", 95)  # 95% of the day, through the part alone
    info = both.inspect("a")
    assert info["algorithm"] == "composite" and info["limit"] == 10 and info["remaining"] == 1
    assert [p["algorithm"] for p in info["parts"]] == ["token bucket", "fixed window"]
    assert [p["used"] for p in info["parts"]] == [9, 9]
    top = both.top_keys(2, keys=["a", "b", "c"])
    assert [(r["key"], r["used"], r["limit"]) for r in top] == [("c", 95, 100), ("a", 9, 10)]
    assert both.top_keys(0) == []
