"""Hierarchical quotas (nl.Hierarchy) in this process and in a shared-memory store:
every level charged or none, refusals naming the level and when each level frees up,
reservations settled at every level, quotas per node at run time, exactness under
threads, processes (one of them killed mid-run) and asyncio, concurrency leases shared
by processes (a killed holder's ending with lease_ttl), and hostile arguments.

This file is also the worker of its process tests: ``python test_hierarchy.py worker ...``
(and ``lease-worker``, ``lease-holder``).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

import nexus_limits as nl

ORG, TEAM, KEY = "300/day", "200/day", "40/day"
TEAMS, KEYS_PER_TEAM = ("a", "b"), 10


def three(clock=None, **kw):
    return nl.Hierarchy(
        levels=[
            ("org", {"requests": "10/minute", "tokens": "1000/minute"}),
            ("team", {"requests": "6/minute", "concurrency": 2}),
            ("key", {"requests": "4/minute", "concurrency": 1}),
        ],
        clock=clock,
        **kw,
    )


def daily(store=None, name="t"):
    """Quotas that do not refill during a test: the org binds (300 < 2 x 200 < 20 x 40)."""
    levels = [("org", ORG), ("team", TEAM), ("key", KEY)]
    if store is None:
        return nl.Hierarchy(levels)
    return nl.Hierarchy(levels, store=store, name=name)


def paths():
    return [("o", t, f"{t}-{k}") for t in TEAMS for k in range(KEYS_PER_TEAM)]


def used(h, node, quota="requests"):
    return h.inspect(node)[quota]["used"]


_SPAWNED: list = []


@pytest.fixture(autouse=True)
def _no_worker_left():
    """Whatever a test spawned is gone after it, passed or failed."""
    yield
    while _SPAWNED:
        proc = _SPAWNED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def store_name():
    name = f"test-h-{uuid.uuid4().hex[:12]}"
    yield name
    try:
        nl.SharedMemoryStore(name).unlink()
    except ValueError:
        pass


# --- one process, a manual clock ---------------------------------------------------


def test_every_level_is_charged_or_none(clock):
    h = three(clock)
    k1, k2 = ("acme", "search", "k1"), ("acme", "search", "k2")
    assert [h.try_acquire(k1) for _ in range(5)] == [True] * 4 + [False]
    refused = h.hit(k1)
    assert not refused and refused.level == "key" and refused.quota == "requests"
    assert refused.policy == "key.requests"
    assert refused.retry_after == pytest.approx(15.0), "4/minute: the key frees up one request in 15 s"
    assert refused.levels["key"].retry_after == pytest.approx(15.0)
    assert refused.levels["team"].allowed and refused.levels["org"].allowed
    # The team has 2 of its 6 left: k2 gets 2, then the team refuses; the refused calls
    # were charged nowhere.
    assert [h.try_acquire(k2) for _ in range(3)] == [True, True, False]
    team = h.hit(k2)
    assert team.policy == "team.requests"
    assert team.levels["team"].retry_after == pytest.approx(10.0), "6/minute"
    assert used(h, k2) == 2 and used(h, ("acme", "search")) == 6 and used(h, ("acme",)) == 6
    assert h.inspect(("acme",))["level"] == "org"
    stats = h.stats()
    assert (stats["allowed"], stats["denied"]) == (6, 4)
    assert stats["refused_by"] == {"org": 0, "team": 2, "key": 2}
    assert stats["levels"]["org"]["requests"]["allowed"] == 10, "each quota counts its own decisions"
    # Another team of the org is limited by the org only.
    other = ("acme", "ads", "k9")
    assert [h.try_acquire(other) for _ in range(5)] == [True] * 4 + [False]
    assert h.hit(("acme", "ads", "k8")).policy == "org.requests"


def test_the_refusal_names_the_level_that_frees_up_last(clock):
    h = nl.Hierarchy([("org", "2/minute"), ("key", "1/hour")], clock=clock)
    assert h.try_acquire(("o", "k"))
    assert h.try_acquire(("o", "j"))
    d = h.hit(("o", "k"))
    # Both refuse; the org frees up in 30 s, the key in an hour: the key is named.
    assert (d.level, d.retry_after) == ("key", pytest.approx(3600.0))
    assert d.levels["org"].retry_after == pytest.approx(30.0)
    clock.advance(30)
    assert h.hit(("o", "k")).policy == "key.requests"
    assert h.try_acquire(("o", "x")), "the org freed up after 30 s"


def test_a_cost_above_a_level_can_never_be_admitted(clock):
    h = three(clock)
    d = h.hit(("a", "b", "c"), cost=5)
    assert d.policy == "key.requests" and math.isinf(d.retry_after)
    with pytest.raises(nl.RateLimitExceeded, match="can never be admitted"):
        h.acquire(("a", "b", "c"), cost=5)


def test_headers_name_the_refusing_policy(clock):
    h = three(clock)
    for _ in range(4):
        ok = h.hit(("acme", "search", "k1"))
    headers = ok.headers()
    assert headers["RateLimit-Policy"].split(", ")[0] == '"org.requests";q=10;w=60'
    assert '"key.requests";r=0;t=60' in headers["RateLimit"], "t: until the quota is whole again"
    assert "Retry-After" not in headers
    refused = h.hit(("acme", "search", "k1")).headers()
    assert refused["RateLimit-Policy"].startswith('"key.requests";q=4;w=60, ')
    assert refused["Retry-After"] == "15"
    assert refused["x-ratelimit-remaining-requests"] == "0"
    assert refused["x-ratelimit-limit-tokens"] == "1000"


@pytest.mark.parametrize("shared", [False, True], ids=["in-process", "shared-memory"])
def test_reservations_settle_and_cancel_at_every_level(clock, tmp_path, shared):
    store = nl.SharedMemoryStore(path=str(tmp_path / "s"), capacity=256) if shared else None
    h = three(clock, store=store)
    k1 = ("acme", "search", "k1")
    r = h.reserve(k1, tokens=600)
    assert r and r.estimate == 600 and not r.done
    assert r.levels["key"].remaining == 0, "the key's one lease"
    busy = h.reserve(k1, tokens=10)
    assert busy.policy == "key.concurrency" and busy.done
    assert h.inspect(("acme", "search"))["concurrency"] == {"limit": 2, "in_flight": 1, "own_quota": False}
    assert h.stats()["levels"]["team"]["concurrency"]["held"] == 1
    assert h.quotas("team") == {"requests": nl.Rate(6, 60), "concurrency": 2}
    assert r.settle(100) and not r.settle(100) and r.done
    assert h.inspect(("acme",))["tokens"]["used"] == 100, "500 tokens came back to the org"
    assert h.inspect(k1)["concurrency"]["in_flight"] == 0
    # Two keys hold the team's two leases; a third key waits for the team, charged nowhere.
    r1, r2 = h.reserve(k1, tokens=1), h.reserve(("acme", "search", "k2"), tokens=1)
    third = h.reserve(("acme", "search", "k3"), tokens=1)
    assert third.policy == "team.concurrency"
    assert used(h, ("acme", "search", "k3")) == 0 and used(h, ("acme",)) == 3
    assert r2.cancel()
    assert used(h, ("acme",)) == 2 and h.inspect(("acme",))["tokens"]["used"] == 101
    # Past lease_ttl (600 s by default) a reservation stands as charged; its leases end.
    assert h.inspect(("acme", "search"))["concurrency"]["in_flight"] == 1
    clock.advance(601)
    assert r1.done and not r1.settle(0)
    assert h.inspect(("acme", "search"))["concurrency"]["in_flight"] == 0
    assert h.stats()["levels"]["team"]["concurrency"]["held"] == 0
    with pytest.raises(ValueError, match="non-negative"):
        h.reserve(k1, tokens=1).settle(-1)
    with pytest.raises(TypeError, match="actual_tokens must be an int"):
        h.reserve(("x", "y", "z"), tokens=1).settle(1.5)  # type: ignore[arg-type]


def test_spend_is_a_budget_at_every_level(clock):
    h = nl.Hierarchy(
        [("org", {"spend": "1.00/day"}), ("key", {"spend": "0.50/day", "requests": "100/day"})], clock=clock
    )
    r = h.reserve(("o", "k"), tokens=0, spend=400_000)  # $0.40
    assert r.quotas["key.spend"].remaining == 100_000
    assert r.settle(0, actual_spend=450_000)
    assert h.inspect(("o",))["spend"]["used"] == 450_000
    refused = h.reserve(("o", "k"), spend=100_000)
    assert refused.policy == "key.spend"
    assert h.reserve(("o", "k2"), spend=400_000).settle(0)
    assert h.reserve(("o", "k3"), spend=200_000).policy == "org.spend", "$0.85 of the org's $1 spent"
    assert h.reserve(("o", "k3"), spend=150_000)
    h.set_quota(("o",), spend="2.00/day")
    assert h.reserve(("o", "k4"), spend=500_000), "the org's own $2: $1 spent"
    h.set_default_quota("key", spend="0.10/day")
    assert h.reserve(("o", "k5"), spend=200_000).policy == "key.spend"


@pytest.mark.parametrize("amount", [2**63 - 1, 2**63, 2**64, 2**70, 10**400])
def test_a_settlement_past_64_bits_is_the_largest_debt_as_on_redis(clock, redis_client, amount):
    """settle() takes any non-negative int: past what a node can owe, the debt is the
    largest (its answers stop growing), in this process as on Redis."""
    from nexus_limits.redis import Hierarchy as RedisHierarchy

    levels = [
        ("org", {"requests": "10/minute", "tokens": "1000/minute"}),
        ("key", {"tokens": "100/minute", "spend": "1.00/day"}),
    ]
    answers = []
    for h in (nl.Hierarchy(levels, clock=clock), RedisHierarchy(redis_client, levels, clock=clock)):
        r = h.reserve(("o", "k"), tokens=10, spend=5)
        assert r.settle(amount, actual_spend=amount)
        refused = h.hit(("o", "k"))
        answers.append((refused.policy, refused.retry_after, h.inspect(("o",)), h.inspect(("o", "k"))))
    assert answers[0] == answers[1]
    policy, retry_after, org, key = answers[0]
    assert policy == "org.tokens" and org["tokens"]["used"] == 1000 and key["spend"]["remaining"] == 0
    assert retry_after == org["tokens"]["retry_after"] > 1e10, "no one can wait that debt out"


def test_an_unchanged_quota_keeps_a_debt_as_on_redis(clock, tmp_path, redis_client):
    """set_quota/clear_quota with the quota a node already has (a gateway reload of an
    unchanged config) keeps its debt: converting the state would cap it at two bursts."""
    from nexus_limits.redis import Hierarchy as RedisHierarchy

    levels = [("org", {"tokens": "1000/minute"}), ("key", {"requests": "100/minute"})]
    store = nl.SharedMemoryStore(path=str(tmp_path / "s"), capacity=256)
    hierarchies = {
        "in-process": nl.Hierarchy(levels, clock=clock),
        "shared-memory": nl.Hierarchy(levels, clock=clock, store=store),
        "redis": RedisHierarchy(redis_client, levels, clock=clock),
    }
    waits = {}
    for where, h in hierarchies.items():
        r = h.reserve(("acme", "k"), tokens=10)
        assert r.settle(100_000), where  # 100 minutes of the org's tokens
        wait = [h.peek(("acme", "k"), 0).levels["org"].retry_after]
        h.set_quota(("acme",), tokens="1000/minute")
        assert h.inspect(("acme",))["tokens"]["own_quota"], where
        wait.append(h.peek(("acme", "k"), 0).levels["org"].retry_after)
        assert h.clear_quota(("acme",)), where
        wait.append(h.peek(("acme", "k"), 0).levels["org"].retry_after)
        if where != "shared-memory":
            h.set_default_quota("org", tokens="1000/minute")
            wait.append(h.peek(("acme", "k"), 0).levels["org"].retry_after)
        assert wait == [99 * 60.0] * len(wait), (where, wait)
        waits[where] = wait
        # Another quota does convert: the debt is kept in tokens, at most two bursts.
        h.set_quota(("acme",), tokens="2000/minute")
        waits[where].append(h.peek(("acme", "k"), 0).levels["org"].retry_after)
    assert waits["in-process"] == waits["redis"] and waits["shared-memory"] == waits["redis"][:3] + waits["redis"][4:]


def test_quotas_per_node_at_run_time(clock):
    h = three(clock)
    k = ("acme", "search", "k1")
    assert h.hit(k, cost=3)
    h.set_quota(("acme",), requests="4/minute")
    assert h.inspect(("acme",))["requests"]["own_quota"]
    assert h.try_acquire(k) and h.hit(k).policy == "org.requests", "3 of acme's new 4 were used"
    assert h.try_acquire(("other", "t", "k"), cost=4), "another org keeps the level's quota"
    h.set_quota(("acme", "search"), concurrency=5)
    assert h.inspect(("acme", "search"))["concurrency"]["own_quota"]
    assert h.clear_quota(("acme",)) and not h.clear_quota(("acme",))
    h.set_default_quota("key", requests="100/minute")
    assert h.quotas("key") == {"requests": nl.Rate(100, 60), "concurrency": 1}
    assert h.try_acquire(k, cost=2), "the key level was raised (the team has 2 left)"
    with pytest.raises(ValueError, match='level "org" has no spend quota'):
        h.set_quota(("acme",), spend="1/day")
    with pytest.raises(ValueError, match='level "org" has no concurrency limit'):
        h.set_quota(("acme",), concurrency=3)
    with pytest.raises(ValueError, match="give at least one of"):
        h.set_quota(("acme",))
    with pytest.raises(ValueError, match='unknown level "nope"'):
        h.set_default_quota("nope", requests="1/s")
    h.reset(("acme",))
    assert used(h, ("acme",)) == 0 and used(h, ("acme", "search")) == 6, "one node only"


def test_priority_classes_keep_a_reserve_at_every_level(clock, tmp_path):
    for store in (None, nl.SharedMemoryStore(path=str(tmp_path / "s"), capacity=256, ttl=3600)):
        h = nl.Hierarchy(
            [("org", "10/hour"), ("key", "100/hour")],
            store=store,
            clock=clock,
            classes={"interactive": 1.0, "batch": 0.7},
        )
        assert (h.classes, h.default_class) == ({"interactive": 1.0, "batch": 0.7}, "batch")
        assert [h.try_acquire(("o", "k"), cls="batch") for _ in range(8)] == [True] * 7 + [False]
        refused = h.hit(("o", "j"))
        assert refused.policy == "org.requests" and refused.quotas["org.requests"].limit == 7, "the default: batch"
        assert sum(h.try_acquire(("o", "k"), cls="interactive") for _ in range(5)) == 3
        classes = h.stats()["classes"]
        assert (classes["batch"]["allowed"], classes["batch"]["denied"], classes["interactive"]["allowed"]) == (7, 2, 3)
        r = h.reserve(("p", "k"), cls="batch")
        assert r and r.cancel()
        with pytest.raises(ValueError, match='unknown class "gold": the classes are "interactive", "batch"'):
            h.hit(("o", "k"), cls="gold")
        with pytest.raises(TypeError, match="cls must be a class name"):
            h.hit(("o", "k"), cls=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no priority classes"):
        three(clock).hit(("a", "b", "c"), cls="batch")
    with pytest.raises(ValueError, match=r"one class must have share 1\.0"):
        nl.Hierarchy([("a", "1/s")], classes={"batch": 0.5})
    with pytest.raises(ValueError, match='default class "gold" is not one of the classes'):
        nl.Hierarchy([("a", "1/s")], classes={"top": 1.0}, default_class="gold")
    with pytest.raises(ValueError, match="default_class needs classes="):
        nl.Hierarchy([("a", "1/s")], default_class="top")


def test_threads_keep_the_class_reserve_at_the_org(store_name):
    h = nl.Hierarchy(
        [("org", "1000/day"), ("key", "1000/day")],
        store=nl.SharedMemoryStore(store_name, capacity=1024, ttl=86400),
        classes={"interactive": 1.0, "batch": 0.7},
    )
    counts, lock = {}, threading.Lock()

    def run(cls, calls, seed):
        rng = random.Random(seed)
        n = sum(h.try_acquire(("o", f"k{rng.randrange(4)}"), cls=cls) for _ in range(calls))
        with lock:
            counts[cls] = counts.get(cls, 0) + n

    threads = [threading.Thread(target=run, args=("batch", 300, i)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert counts["batch"] == 700
    threads = [threading.Thread(target=run, args=(c, 200, i)) for i, c in enumerate(["batch", "interactive"] * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert (counts["batch"], counts["interactive"]) == (700, 300)


def test_shadow_mode_admits_and_names_the_level(clock, caplog):
    h = three(clock, shadow=True)
    results = [h.hit(("a", "b", "c")) for _ in range(5)]
    assert all(results) and results[4].decision.shadow and results[4].policy == "key.requests"
    assert h.stats()["shadow_denied"] == 1
    h.shadow = False
    assert not h.hit(("a", "b", "c"))


def test_acquire_waits_for_every_level(clock):
    h = nl.Hierarchy([("org", "2/minute"), ("key", "1/10s")], clock=clock)
    start = clock.now
    for _ in range(3):
        h.acquire(("o", "k"), timeout=100)
    assert clock.now - start == pytest.approx(30.0), "the org's 2/minute after two calls"
    with pytest.raises(nl.RateLimitExceeded):
        h.acquire(("o", "k"), timeout=1)


def test_acquire_async_waits_on_the_loop(clock):
    h = nl.Hierarchy([("org", "2/minute"), ("key", "1/10s")], clock=clock)

    async def main():
        return [await h.acquire_async(("o", "k"), timeout=100) for _ in range(3)]

    assert all(asyncio.run(main()))
    assert clock.now == pytest.approx(30.0)


def test_a_full_store_refuses_the_whole_path():
    h = nl.Hierarchy([("org", "10/minute"), ("key", "5/minute")], max_keys=1)
    assert h.try_acquire(("o", "k1"))
    d = h.hit(("o", "k2"))
    assert not d and d.level == "key"
    assert used(h, ("o",)) == 1


def test_repr_and_levels():
    h = three()
    assert h.levels == ["org", "team", "key"]
    assert repr(h).startswith("Hierarchy([('org': requests='10/minute', tokens='1000/minute'), ")
    assert "concurrency=2" in repr(h)
    assert "refused by user.requests" in repr(nl.Hierarchy([("user", "1/hour")]).hit(("a",), cost=2))


# --- hostile arguments ---------------------------------------------------------------


@pytest.mark.parametrize(
    "path, error, match",
    [
        ("acme", TypeError, "path must be a tuple of keys"),
        (b"acme", TypeError, "path must be a tuple of keys"),
        ({"a": 1}, TypeError, "path must be a tuple of keys"),
        (iter(["a", "b", "c"]), TypeError, "path must be a tuple of keys"),
        (("a", "b"), ValueError, r"org > team > key\): expected 3 elements, got 2"),
        ((), ValueError, "expected 3 elements, got 0"),
        (("a",) * 4, ValueError, "at most one element per level"),
        (tuple(range(10**6)), ValueError, "at most one element per level"),
        (("a", ("b",), "c"), TypeError, "each element of a path must be a key"),
        (("a", 1.5, "c"), TypeError, "each element of a path must be a key"),
        (("a", True, "c"), TypeError, "each element of a path must be a key"),
        (("a", None, "c"), TypeError, "each element of a path must be a key"),
        (("a", 2**200, "c"), ValueError, "int keys must fit in 128 bits"),
    ],
)
def test_bad_paths(path, error, match):
    h = three()
    with pytest.raises(error, match=match):
        h.hit(path)


def test_path_elements_are_keys():
    h = nl.Hierarchy([("org", "1/hour"), ("key", "5/hour")])
    assert h.try_acquire(("5", "k")) and h.try_acquire((5, "k")) and h.try_acquire((b"5", "k")), "three orgs"
    assert h.try_acquire(["x" * 1_000_000, "k"])
    assert not h.try_acquire(("x" * 1_000_000, "k2"))
    # An element with the separator's bytes cannot stand for two.
    assert h.try_acquire(("a", "bc")) and h.try_acquire(("ab", "c"))


@pytest.mark.parametrize("cost", [-1, 1.0, True, "1", None, 2**64, float("nan")])
def test_bad_costs(cost):
    h = three()
    with pytest.raises((TypeError, ValueError), match="cost must be a non-negative"):
        h.hit(("a", "b", "c"), cost=cost)


@pytest.mark.parametrize("tokens", [-1, 1.5, True, 2**64, float("inf")])
def test_bad_tokens(tokens):
    with pytest.raises((TypeError, ValueError), match="tokens must be a non-negative"):
        three().reserve(("a", "b", "c"), tokens=tokens)


def _endless():
    i = 0
    while True:
        i += 1
        yield (f"l{i}", "1/s")


@pytest.mark.parametrize(
    "levels, error, match",
    [
        ([], ValueError, "from 1 to 16 levels, got 0"),
        ("org", TypeError, "levels must be a list"),
        ({"org": "1/s"}, TypeError, "levels must be a list"),
        (5, TypeError, "levels must be a list"),
        ([("org",)], ValueError, r"\(name, quotas\) pair, got 1 items"),
        (["org"], TypeError, r"each level must be a \(name, quotas\) pair"),
        ([(5, "1/s")], TypeError, "a level name must be a str"),
        ([("", "1/s")], ValueError, "level name must not be empty"),
        ([("a", "1/s"), ("a", "2/s")], ValueError, 'level "a" is given twice'),
        ([("a", {})], ValueError, 'level "a" has no quota'),
        ([("a", {"requests": None})], ValueError, 'level "a" has no quota'),
        ([("a", {"dollars": "1/s"})], ValueError, "a quota is one of 'requests'"),
        ([("a", {5: "1/s"})], TypeError, "a quota name must be a str"),
        ([("a", {"requests": "nope"})], ValueError, "invalid rate"),
        ([("a", {"requests": 5})], TypeError, "rate must be a str"),
        ([("a", {"daily_tokens": 0})], ValueError, "daily_tokens must be at least 1"),
        ([("a", {"concurrency": 0})], ValueError, "concurrency must be at least 1"),
        ([("a", {"concurrency": 1.5})], TypeError, "concurrency must be an int"),
        ([("a", {"spend": "free"})], ValueError, "invalid budget"),
        ([("a", [("requests", "1/s")])], TypeError, "the quotas of level"),
        ([(f"l{i}", "1/s") for i in range(17)], ValueError, "from 1 to 16 levels, got 17"),
        (_endless(), ValueError, "from 1 to 16 levels"),
    ],
)
def test_bad_levels(levels, error, match):
    with pytest.raises(error, match=match):
        nl.Hierarchy(levels)


def test_sixteen_levels_of_every_quota():
    units = ("requests", "tokens", "daily_tokens", "spend")
    h = nl.Hierarchy([(f"l{i}", {u: "10/s" for u in units}) for i in range(16)])
    assert h.reserve(tuple(range(16)), tokens=10, spend=10)
    assert h.reserve(tuple(range(16)), tokens=1).policy.endswith(".tokens")


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match="lease_ttl must be a finite"):
        nl.Hierarchy([("a", "1/s")], lease_ttl=float("nan"))
    with pytest.raises(TypeError, match="clock must be None or a ManualClock"):
        nl.Hierarchy([("a", "1/s")], clock="now")
    with pytest.raises(TypeError, match="store must be a SharedMemoryStore"):
        nl.Hierarchy([("a", "1/s")], store="/dev/shm/x")
    store = nl.SharedMemoryStore(path=str(tmp_path / "s"), capacity=64)
    with pytest.raises(ValueError, match="max_keys does not apply with store="):
        nl.Hierarchy([("a", "1/s")], store=store, max_keys=5)
    # Leases in a store: a lease must not outlive the store's ttl (it would forget it).
    assert nl.Hierarchy([("a", {"concurrency": 2})], store=store, lease_ttl=3600).quotas("a") == {"concurrency": 2}
    with pytest.raises(ValueError, match=r"lease_ttl \(3601 s\) is above the store's ttl \(3600 s\)"):
        nl.Hierarchy([("a", {"concurrency": 2})], store=store, lease_ttl=3601)
    with pytest.raises(ValueError, match="from 1 to 65535, got 65536"):
        nl.Hierarchy([("a", {"concurrency": 65536})], store=store)
    h = nl.Hierarchy([("a", {"concurrency": 2}), ("b", "1/s")], store=store)
    for bad, error in ((0, ValueError), (65536, ValueError), (2**64, ValueError), (1.5, TypeError), ("2", TypeError)):
        with pytest.raises(error):
            h.set_quota(("x",), concurrency=bad)
    with pytest.raises(ValueError, match='level "b" has no concurrency limit'):
        h.set_quota(("x", "y"), concurrency=1)
    assert h.inspect(("x",))["concurrency"] == {"limit": 2, "in_flight": 0, "own_quota": False}
    every = {"requests": "1/s", "tokens": "1/s", "concurrency": 1}
    with pytest.raises(ValueError, match="at most 64 rate quotas and twice its concurrency limits"):
        nl.Hierarchy([(f"l{i}", {**every, "spend": "1/s"} if i == 0 else every) for i in range(16)], store=store)
    with pytest.raises(ValueError, match="needs 86400s to forget a key but the store's ttl is 3600s"):
        nl.Hierarchy([("a", "1/day")], store=store)
    with pytest.raises(TypeError, match="name must be a str"):
        nl.Hierarchy([("a", "1/s")], store=store, name=5)


# --- exactness under threads, processes, asyncio -------------------------------------


def _hammer(h, calls, seed, admitted, lock):
    rng = random.Random(seed)
    mine = {}
    for _ in range(calls):
        p = rng.choice(paths())
        if h.try_acquire(p):
            mine[p] = mine.get(p, 0) + 1
    with lock:
        for p, n in mine.items():
            admitted[p] = admitted.get(p, 0) + n


def _check_exact(h, admitted):
    per_team = {t: sum(n for p, n in admitted.items() if p[1] == t) for t in TEAMS}
    assert all(n <= 40 for n in admitted.values()), admitted
    assert all(n <= 200 for n in per_team.values()), per_team
    assert sum(per_team.values()) == 300, "the org's 300 all went, no more"
    # Every admitted call was charged at every level, and nothing else was.
    assert used(h, ("o",)) == 300
    for t in TEAMS:
        assert used(h, ("o", t)) == per_team[t]
    for p in paths():
        assert used(h, p) == admitted.get(p, 0)


def test_threads_never_overspend_any_level():
    h = daily()
    admitted, lock = {}, threading.Lock()
    threads = [threading.Thread(target=_hammer, args=(h, 600, i, admitted, lock)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    _check_exact(h, admitted)


def test_threads_in_a_shared_memory_store(store_name):
    h = daily(nl.SharedMemoryStore(store_name, capacity=4096, ttl=86400))
    admitted, lock = {}, threading.Lock()
    threads = [threading.Thread(target=_hammer, args=(h, 600, i, admitted, lock)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    _check_exact(h, admitted)


def test_leases_are_held_at_every_level_at_once():
    """Threads reserve and settle: at no moment does a node hold more leases than its
    limit, and a reservation refused for leases takes none."""
    h = nl.Hierarchy(
        [
            ("org", {"concurrency": 3, "tokens": "1000000/minute"}),
            ("team", {"concurrency": 2}),
            ("key", {"concurrency": 1}),
        ]
    )
    in_flight, peak, lock = {}, {}, threading.Lock()
    errors = []

    def node_counts(p, delta):
        with lock:
            for depth in (1, 2, 3):
                node = p[:depth]
                in_flight[node] = in_flight.get(node, 0) + delta
                peak[node] = max(peak.get(node, 0), in_flight[node])

    def run(seed):
        rng = random.Random(seed)
        for _ in range(300):
            p = ("o", rng.choice("ab"), rng.choice("xyz"))
            r = h.reserve(p, tokens=10)
            if r:
                node_counts(p, +1)
                time.sleep(0)
                node_counts(p, -1)
                if not r.settle(5):
                    errors.append(p)
            elif r.quota != "concurrency":
                errors.append(r.policy)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    limits = {1: 3, 2: 2, 3: 1}
    assert all(n <= limits[len(node)] for node, n in peak.items()), peak
    assert h.inspect(("o",))["concurrency"]["in_flight"] == 0, "every lease ended"
    assert h.stats()["levels"]["org"]["concurrency"]["held"] == 0


def test_asyncio_tasks_share_the_levels():
    h = nl.Hierarchy([("org", "20/s"), ("team", "20/s"), ("key", "5/s")])

    async def task(p):
        await h.acquire_async(p, timeout=5)
        return time.monotonic()

    async def main():
        ps = [("o", "t", f"k{i % 4}") for i in range(28)]
        return await asyncio.gather(*(task(p) for p in ps))

    start = time.monotonic()
    times = sorted(asyncio.run(main()))
    assert len(times) == 28
    # 20 at once (the org's burst), then 20/s: the last 8 need 0.4 s at least.
    assert times[-1] - start >= 0.35
    assert times[19] - start < 0.3


def big(store):
    """Quotas no test reaches, refilling less than one unit in a test (100 years)."""
    levels = [("org", "10000000/36500d"), ("team", "6000000/36500d"), ("key", "1000000/36500d")]
    return nl.Hierarchy(levels, store=store, name="big")


def _worker(store_name, calls, record, seed, forever):
    store = nl.SharedMemoryStore(store_name)
    h = big(store) if forever else daily(store)
    rng = random.Random(seed)
    fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    # "forever" until killed, and never past a minute should the test fail to kill it.
    deadline = time.monotonic() + 60
    i = 0
    while (forever and time.monotonic() < deadline) or i < calls:
        p = rng.choice(paths())
        if h.try_acquire(p):
            os.write(fd, (",".join(p) + "\n").encode())
        i += 1


def _spawn(store_name, calls, record, seed, forever=False):
    args = [sys.executable, __file__, "worker", store_name, str(calls), str(record), str(seed)]
    proc = subprocess.Popen(args + (["--forever"] if forever else []))
    _SPAWNED.append(proc)
    return proc


def _records(files):
    admitted = {}
    for f in files:
        if os.path.exists(f):
            with open(f) as lines:
                for line in lines.read().split():
                    p = tuple(line.split(","))
                    admitted[p] = admitted.get(p, 0) + 1
    return admitted


def _wait_for_file(path, timeout=20.0):
    """Until a worker has recorded an admission (it is then in its loop)."""
    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and os.path.getsize(path) > 0):
        assert time.monotonic() < deadline, f"no admission recorded in {path} after {timeout} s"
        time.sleep(0.01)


def test_processes_never_overspend_any_level(store_name, tmp_path):
    nl.SharedMemoryStore(store_name, capacity=4096, ttl=86400)
    files = [tmp_path / f"r{i}" for i in range(4)]
    procs = [_spawn(store_name, 400, f, i) for i, f in enumerate(files)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    h = daily(nl.SharedMemoryStore(store_name))
    _check_exact(h, _records(files))


# About one kill in eight lands while the victim holds the store's lock (measured).
VICTIMS = 8


def test_processes_killed_mid_check_leave_every_level_consistent(store_name, tmp_path):
    """kill -9 processes while they charge paths, one after the other: whatever instant
    each dies at (holding the store's lock or not, its writes made or not), its last call
    is charged at every level or at none: the next process replays its journal, and
    nobody waits for the dead."""
    nl.SharedMemoryStore(store_name, capacity=4096, ttl=36525 * 86400)
    for i in range(VICTIMS):
        record = tmp_path / f"victim{i}"
        victim = _spawn(store_name, 0, record, 100 + i, forever=True)
        try:
            _wait_for_file(record)
            time.sleep(random.uniform(0.01, 0.1))
        finally:
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)
    h = big(nl.SharedMemoryStore(store_name))
    teams = {t: used(h, ("o", t)) for t in TEAMS}
    assert used(h, ("o",)) == sum(teams.values()) > 0
    for t in TEAMS:
        assert teams[t] == sum(used(h, p) for p in paths() if p[1] == t)
    # What the victims recorded was admitted, and charged (a call admitted but killed
    # before its line was written is charged and not recorded).
    admitted = _records([tmp_path / f"victim{i}" for i in range(VICTIMS)])
    assert all(used(h, p) >= admitted.get(p, 0) for p in paths())
    assert sum(used(h, p) for p in paths()) - sum(admitted.values()) <= VICTIMS
    # The lock is free and the daily hierarchy on the same store works.
    assert daily(nl.SharedMemoryStore(store_name)).try_acquire(("o", "a", "a-0"))


# --- concurrency leases shared by processes ---------------------------------------------

TEAM_LEASES = 2


def leased(store, lease_ttl=None):
    """A team of TEAM_LEASES calls in flight, one per key, under rate quotas that refill
    less than one unit in a test (100 years: the store needs as long a ttl)."""
    levels = [
        ("org", {"requests": "1000000/36500d", "tokens": "10000000/36500d"}),
        ("team", {"requests": "1000000/36500d", "concurrency": TEAM_LEASES}),
        ("key", {"concurrency": 1}),
    ]
    return nl.Hierarchy(levels, store=store, name="leased", lease_ttl=lease_ttl)


def _bump(fd, delta):
    """Adds delta to the calls in flight recorded in the file (locked), and keeps the
    highest count seen: two 8-byte numbers."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        raw = os.pread(fd, 16, 0).ljust(16, b"\0")
        now, peak = int.from_bytes(raw[:8], "little") + delta, int.from_bytes(raw[8:], "little")
        os.pwrite(fd, now.to_bytes(8, "little") + max(peak, now).to_bytes(8, "little"), 0)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _lease_worker(store_name, counter, seed, rounds):
    """Reserves on the team's keys, holding each admitted call a moment: the counter
    goes up after the leases were taken and down before they end, so it never counts
    more calls than leases are held."""
    h = leased(nl.SharedMemoryStore(store_name))
    rng = random.Random(seed)
    fd = os.open(counter, os.O_RDWR)
    settled = cancelled = refused = 0
    deadline = time.monotonic() + 60
    for _ in range(rounds):
        if time.monotonic() > deadline:
            break
        r = h.reserve(("o", "t", f"k{rng.randrange(3)}"), tokens=10)
        if not r:
            assert r.quota == "concurrency", r.policy
            refused += 1
            time.sleep(0.0002)
            continue
        _bump(fd, +1)
        time.sleep(rng.uniform(0, 0.002))
        _bump(fd, -1)
        if rng.random() < 0.5:
            assert r.settle(5)
            settled += 1
        else:
            assert r.cancel()
            cancelled += 1
    print(json.dumps({"settled": settled, "cancelled": cancelled, "refused": refused}))


def test_processes_never_hold_more_leases_than_a_team_has(store_name, tmp_path):
    """3 processes reserve on one team (2 calls in flight) and its keys (1 each): never
    more than 2 of their calls are in flight at once, refusals name a concurrency limit
    and are charged nowhere, and every lease ends with its settle or cancel."""
    nl.SharedMemoryStore(store_name, capacity=4096, ttl=36525 * 86400)
    counter = tmp_path / "in-flight"
    counter.write_bytes(bytes(16))
    args = [sys.executable, __file__, "lease-worker", store_name, str(counter)]
    procs = [subprocess.Popen([*args, str(seed), "300"], stdout=subprocess.PIPE, text=True) for seed in range(3)]
    _SPAWNED.extend(procs)
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        results.append(json.loads(out))
    raw = counter.read_bytes()
    now, peak = int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")
    assert now == 0 and peak == TEAM_LEASES, f"at most {TEAM_LEASES} calls in flight, reached: {peak}"
    assert all(r["settled"] + r["cancelled"] > 0 for r in results), results
    assert sum(r["refused"] for r in results) > 0, "the processes contended for the team's leases"
    h = leased(nl.SharedMemoryStore(store_name))
    assert h.inspect(("o", "t"))["concurrency"] == {"limit": TEAM_LEASES, "in_flight": 0, "own_quota": False}
    assert all(h.inspect(("o", "t", f"k{k}"))["concurrency"]["in_flight"] == 0 for k in range(3))
    # Settled calls stand (one request, 5 tokens each), cancelled and refused ones charged nowhere.
    settled = sum(r["settled"] for r in results)
    assert used(h, ("o", "t")) == used(h, ("o",)) == settled
    assert h.inspect(("o",))["tokens"]["used"] == 5 * settled


def _lease_holder(store_name, ready, lease_ttl):
    """Takes both of the team's leases, says so, and waits to be killed."""
    h = leased(nl.SharedMemoryStore(store_name), lease_ttl=lease_ttl)
    held = [h.reserve(("o", "t", k), tokens=1) for k in ("a", "b")]
    assert all(held), [r.policy for r in held]
    with open(ready, "w") as f:
        f.write("held")
    time.sleep(60)


def test_a_killed_holders_leases_end_after_lease_ttl(store_name, tmp_path):
    nl.SharedMemoryStore(store_name, capacity=4096, ttl=36525 * 86400)
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, __file__, "lease-holder", store_name, str(ready), "1.5"])
    _SPAWNED.append(holder)
    deadline = time.monotonic() + 30
    while not ready.exists() and holder.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ready.exists(), "the holder took no lease"
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=10) == -signal.SIGKILL
    h = leased(nl.SharedMemoryStore(store_name), lease_ttl=1.5)
    assert h.inspect(("o", "t"))["concurrency"]["in_flight"] == TEAM_LEASES, "the dead holder's leases count"
    refused = h.reserve(("o", "t", "c"), tokens=1)
    assert refused.policy == "team.concurrency" and 0 < refused.retry_after <= 1.5
    assert refused.levels["team"].retry_after == refused.retry_after, "when the team frees up"
    time.sleep(refused.retry_after + 0.05)
    assert h.inspect(("o", "t"))["concurrency"]["in_flight"] == 0
    again = h.reserve(("o", "t", "c"), tokens=1)
    assert again, "the dead holder's leases ran out"
    assert used(h, ("o", "t")) == 3, "its two requests stand"
    assert h.stats()["levels"]["team"]["concurrency"]["held"] == 1, "this process's lease"
    assert again.cancel() and h.stats()["levels"]["team"]["concurrency"]["held"] == 0


def test_node_quotas_in_a_shared_memory_store(store_name):
    """set_quota on a shared-memory store: kept in the store for every process, the
    node's usage carried over."""
    store = nl.SharedMemoryStore(store_name, capacity=256, ttl=3600)
    a = nl.Hierarchy([("org", "10/hour"), ("key", "5/hour")], store=store)
    code = f"""
import nexus_limits as nl
h = nl.Hierarchy([("org", "10/hour"), ("key", "5/hour")], store=nl.SharedMemoryStore({store_name!r}))
h.set_quota(("acme",), requests="3/hour")
"""
    assert a.hit(("acme", "k"), cost=2)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert a.inspect(("acme",))["requests"]["own_quota"]
    assert a.try_acquire(("acme", "k")) and a.hit(("acme", "k")).policy == "org.requests", "2 of 3 were used"
    assert a.try_acquire(("other", "k"), cost=5), "another org keeps the level's quota"
    assert a.clear_quota(("acme",)) and not a.clear_quota(("acme",))
    assert a.try_acquire(("acme", "j"), cost=5) and a.try_acquire(("acme", "i"), cost=2), "back to 10: 7 left"
    assert a.hit(("acme", "i")).policy == "org.requests"
    with pytest.raises(ValueError, match='level "org" has no tokens quota'):
        a.set_quota(("acme",), tokens="1/s")


def test_hierarchies_in_one_store_are_apart(store_name, clock):
    store = nl.SharedMemoryStore(store_name, capacity=256, ttl=3600)
    a = nl.Hierarchy([("org", "2/hour"), ("key", "2/hour")], store=store, name="a", clock=clock)
    b = nl.Hierarchy([("org", "2/hour"), ("key", "2/hour")], store=store, name="b", clock=clock)
    again = nl.Hierarchy([("org", "2/hour"), ("key", "2/hour")], store=store, name="a", clock=clock)
    assert a.try_acquire(("o", "k")) and b.try_acquire(("o", "k"))
    assert again.try_acquire(("o", "k")) and not a.try_acquire(("o", "k")), "built alike: the same nodes"
    assert a.hit(("o", "j")).policy == "org.requests"
    assert a.store_path == store.path
    with pytest.raises(ValueError, match="set_default_quota is not available with a SharedMemoryStore"):
        a.set_default_quota("org", requests="5/hour")
    a.reset(("o",))
    assert a.try_acquire(("o", "j"))
    r = a.reserve(("o", "j"))
    assert r and r.cancel() and a.inspect(("o",))["requests"]["used"] == 1


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    name, calls, record, seed = sys.argv[2:6]
    _worker(name, int(calls), record, int(seed), "--forever" in sys.argv)
elif __name__ == "__main__" and sys.argv[1:2] == ["lease-worker"]:
    name, counter, seed, rounds = sys.argv[2:6]
    _lease_worker(name, counter, int(seed), int(rounds))
elif __name__ == "__main__" and sys.argv[1:2] == ["lease-holder"]:
    name, ready, lease_ttl = sys.argv[2:5]
    _lease_holder(name, ready, float(lease_ttl))
