"""Attacks on nexus_limits.redis.Hierarchy and Priority (sync and asyncio) against a
real redis-server, with clients built with redis-py's defaults: paths that try to
land on another node's keys (or another org's hash slot), settlements with absurd
amounts, state in Redis that is corrupted or of the wrong type, a client clock that
disagrees with the server's, concurrent reserve/settle/cancel from threads, processes
and asyncio tasks, a cluster, and keys that must expire."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
import unicodedata
from typing import Any, Dict, List, Set, Tuple

import pytest
import redis
import redis.asyncio
import redis.cluster
from redis.crc import key_slot
from support.redis_state import FakeStore, assert_no_script_text, every_node_ready, put_foreign, snapshot

import nexus_limits as nl
import nexus_limits.redis as nlr
import nexus_limits.redis.asyncio as nla
from conftest import as_tuple
from nexus_limits.errors import NexusLimitsError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LEVELS = [
    ("org", {"tokens": "1000/minute", "daily_tokens": "1000000/day"}),
    ("team", {"requests": "10/minute", "concurrency": 2}),
    ("key", "5/minute"),
]
PATH = ("acme", "search", "sk-1")


@pytest.fixture
def client(redis_server):
    c = redis.Redis(port=redis_server.port)
    c.flushall()
    yield c
    c.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- a path maps to exactly its nodes' keys -----------------------------------------------

VARIANTS: List[Any] = [
    "acme",
    "ACME",
    "Acme",
    unicodedata.normalize("NFC", "caf\u00e9"),
    unicodedata.normalize("NFD", "caf\u00e9"),
    "a:b",
    "a/b",
    "a%3Ab",
    "{acme}",
    "acme}",
    "{acme",
    "}{",
    "a{b}c",
    "#" + "0" * 64,
    "",
    " ",
    "5",
    5,
    b"5",
    b"acme",
    -5,
    2**127,
    "x" * 300,
    "x" * 301,
]


def _paths() -> List[Tuple[Any, Any, Any]]:
    """Paths whose elements differ only in the ways an attacker would try: each org
    with the same team and key, each team under one org, each key under one team."""
    out: List[Tuple[Any, Any, Any]] = []
    out += [(v, "t", "k") for v in VARIANTS]
    out += [("o", v, "k") for v in VARIANTS]
    out += [("o", "t", v) for v in VARIANTS]
    # A separator moved between levels must not name the same node.
    out += [("a", "b/c", "d"), ("a", "b", "c/d"), ("a/b", "c", "d"), ("a:b", "c", "d"), ("a", "b:c", "d")]
    return out


def test_every_path_has_its_own_keys_in_its_orgs_slot(client):
    """No two distinct paths share a key at any level, and every key of a path is in
    the slot of its org (braces in any name never move a key to another slot)."""
    h = nlr.Hierarchy(client, [("org", "1/day"), ("team", "1/day"), ("key", "1/day")])
    owner: Dict[str, Tuple[Any, ...]] = {}
    for path in _paths():
        keys = h.redis_keys(path)
        assert len({key_slot(k.encode()) for k in keys}) == 1, path
        head = h.redis_keys(path[:1])
        assert keys[:6] == head, "a path's first six keys are its org's"
        for level in range(3):
            node = tuple(path[: level + 1])
            for k in keys[level * 6 : level * 6 + 6]:
                seen = owner.setdefault(k, node)
                assert seen == node, f"{node!r} and {seen!r} share {k}"


def test_variants_are_charged_apart_exactly_as_in_process(client):
    """Every key variant of a one-a-day key level is its own node on Redis, as in-process:
    the same answers for the same calls, and no variant refuses another."""
    levels = [("org", "100000/day"), ("team", "100000/day"), ("key", "1/day")]
    clock = nl.ManualClock(1_700_000_000.0)
    mem = nl.Hierarchy(levels, clock=clock)
    h = nlr.Hierarchy(client, levels, clock=clock)
    for key in VARIANTS:
        path = ("o", "t", key)
        a, b = mem.hit(path), h.hit(path)
        assert (a.allowed, a.policy, a.remaining) == (b.allowed, b.policy, b.remaining) == (True, None, 0), key
    for key in VARIANTS:
        assert h.hit(("o", "t", key)).policy == mem.hit(("o", "t", key)).policy == "key.requests"
    assert h.inspect(("o", "t"))["requests"]["used"] == len(VARIANTS), "the refusals charged nothing"


def test_a_lone_surrogate_is_refused_as_in_process(client):
    """In-process a path with a lone surrogate is refused (it is no text); on Redis it
    was a node of its own: the twins disagreed on which paths exist."""
    levels = [("org", "10/day"), ("team", "10/day")]
    h, mem = nlr.Hierarchy(client, levels), nl.Hierarchy(levels)
    for path in (("\ud800", "t"), ("o", "a\udfffb")):
        for o in (mem, h):
            with pytest.raises(ValueError):
                o.hit(path)
    assert client.keys("*") == []


# -- settlements with absurd amounts ---------------------------------------------------


@pytest.mark.parametrize("actual", [2 * 10**15, 10**19, 10**40])
def test_a_huge_settlement_is_debt_not_a_crash(client, actual):
    """A settlement far above any quota charges the debt at every level (as in-process:
    the node is refused for as long as the arithmetic can say) and ends the leases; it
    never fails half-way with a Lua error leaving the team's lease held."""
    h = nlr.Hierarchy(client, LEVELS)
    res = h.reserve(PATH, tokens=10)
    assert res.allowed
    assert res.settle(actual) is True
    assert h.inspect(PATH[:2])["concurrency"]["in_flight"] == 0, "the lease ended"
    after = h.reserve(PATH, tokens=1)
    assert not after.allowed and after.policy in ("org.tokens", "org.daily_tokens")
    assert 1e9 < after.retry_after < 1e11, after.retry_after
    tokens = h.inspect(PATH[:1])["tokens"]
    assert tokens["remaining"] == 0 and 1e9 < tokens["reset_after"] < 1e11
    for k in client.keys("*"):
        assert client.pttl(k) > 0, k  # the debt's keys expire too
    # In-process answers the same (its times saturate at 2**64 ns).
    mem = nl.Hierarchy(LEVELS)
    if actual < 2**63:
        r = mem.reserve(PATH, tokens=10)
        assert r.settle(actual) is True
        assert mem.reserve(PATH, tokens=1).policy == after.policy


def _answers(d: Any) -> Tuple[Any, ...]:
    return (d.allowed, d.policy, *((q, *as_tuple(x)) for q, x in sorted(d.quotas.items())))


def test_a_huge_debt_gets_the_in_process_answers(client):
    """In-process a debt's times saturate at 2**64 ns, every quota in debt alike (so the
    refusing quota is the same tie); Redis held the debt itself at that horizon, which
    gave another refusing quota and other times."""
    clock = nl.ManualClock(1_700_000_000.0)
    mem, h = nl.Hierarchy(LEVELS, clock=clock), nlr.Hierarchy(client, LEVELS, clock=clock)
    for o in (mem, h):
        assert o.reserve(PATH, tokens=10).settle(10**13) is True
    clock.advance(30)
    assert _answers(h.hit(PATH)) == _answers(mem.hit(PATH))
    assert _answers(h.peek(PATH, tokens=5)) == _answers(mem.peek(PATH, tokens=5))


def test_a_quota_change_carries_a_debt_over_as_in_process(client):
    """In-process a node's new quota takes over at most two bursts of its debt
    (Gcra::convert); Redis carried the whole debt over: a node refused for days on
    Redis was admitted in-process two minutes later."""
    clock = nl.ManualClock(1_700_000_000.0)
    mem, h = nl.Hierarchy(LEVELS, clock=clock), nlr.Hierarchy(client, LEVELS, clock=clock)
    for o in (mem, h):
        assert o.reserve(PATH, tokens=10).settle(10**6) is True
        o.set_quota(PATH[:1], tokens="600/minute")
    assert _answers(h.peek(PATH, tokens=5)) == _answers(mem.peek(PATH, tokens=5))
    clock.advance(121)
    assert _answers(h.peek(PATH, tokens=5)) == _answers(mem.peek(PATH, tokens=5))
    assert h.inspect(PATH[:1])["tokens"]["remaining"] == mem.inspect(PATH[:1])["tokens"]["remaining"] == 600
    for o in (mem, h):
        o.clear_quota(PATH[:1])
    assert _answers(h.peek(PATH, tokens=5)) == _answers(mem.peek(PATH, tokens=5))


def test_a_huge_settlement_asyncio(async_redis_client):
    async def main() -> None:
        ac = async_redis_client()
        try:
            h = nla.Hierarchy(ac, LEVELS)
            res = await h.reserve(PATH, tokens=10)
            assert await res.settle(2 * 10**15) is True
            assert (await h.inspect(PATH[:2]))["concurrency"]["in_flight"] == 0
            assert not (await h.hit(PATH)).allowed
        finally:
            await ac.aclose()

    run(main())


# -- corrupted and hostile state --------------------------------------------------------


def _org_tokens_key(h: Any) -> str:
    return h.redis_keys(PATH[:1])[3]


@pytest.mark.parametrize("garbage", ["nan 60000", "inf 60000", "-inf 60000", "nan", "garbage", "1 nan", "5 -1", ""])
def test_a_corrupted_state_is_a_clear_error_and_admits_nothing(client, garbage):
    h = nlr.Hierarchy(client, LEVELS, on_error="allow")
    key = _org_tokens_key(h)
    client.set(key, garbage)
    before = snapshot(client)
    for call in (lambda: h.reserve(PATH, tokens=5), lambda: h.hit(PATH), lambda: h.peek(PATH, tokens=5)):
        with pytest.raises(NexusLimitsError) as info:
            call()
        text = str(info.value)
        assert key in text and "reset" in text, text
        assert_no_script_text(text)
    with pytest.raises(NexusLimitsError, match="holds"):
        h.inspect(PATH[:1])
    with pytest.raises(NexusLimitsError, match="holds"):
        h.set_quota(PATH[:1], tokens="10/minute")
    assert snapshot(client) == before, "nothing was written"
    h.reset(PATH[:1])  # what the error says to do
    assert h.reserve(PATH, tokens=5).allowed


def test_a_corrupted_state_met_by_a_settlement_writes_no_level(client):
    """A settlement that meets a corrupted state at the key level changes no other
    level (all or nothing) and says so."""
    h = nlr.Hierarchy(client, LEVELS)
    res = h.reserve(PATH, tokens=100)
    assert res.allowed
    client.set(h.redis_keys(PATH)[12 + 2], "nan 1")  # the key level's requests state
    before = snapshot(client)
    with pytest.raises(NexusLimitsError, match="holds"):
        res.cancel()
    assert snapshot(client) == before


def test_an_enormous_finite_state_is_debt_not_garbage(client):
    h = nlr.Hierarchy(client, LEVELS)
    client.set(_org_tokens_key(h), "1e300 60000")
    d = h.reserve(PATH, tokens=5)
    assert (d.allowed, d.policy) == (False, "org.tokens")
    assert 1e9 < d.retry_after < 1e11
    info = h.inspect(PATH[:1])["tokens"]
    assert info["remaining"] == 0 and info["used"] == 1000 and 1e9 < info["retry_after"] < 1e11


@pytest.mark.parametrize(
    "index, kind",
    [(0, "string"), (6 + 1, "string"), (6 + 2, "hash"), (3, "list"), (12, "set")],
    ids=["org-quota", "team-leases", "team-requests", "org-tokens", "key-quota"],
)
def test_a_key_of_the_wrong_type_is_a_clear_error(client, index, kind):
    h = nlr.Hierarchy(client, LEVELS, on_error="allow")
    key = h.redis_keys(PATH)[index]
    put_foreign(client, key, kind)
    with pytest.raises(NexusLimitsError) as info:
        h.reserve(PATH, tokens=5)
    text = str(info.value)
    assert key in text and "could not reach" not in text, text
    assert_no_script_text(text)
    assert ("own quotas" in text) == (index % 6 == 0), "the fix named is the one that works"
    node = (PATH[: index // 6 + 1],)
    with pytest.raises(NexusLimitsError, match="holds"):
        h.inspect(*node)
    if index % 6 != 1:  # set_quota does not read the lease set
        with pytest.raises(NexusLimitsError) as info:
            h.set_quota(*node, requests="1/minute") if index // 6 else h.set_quota(*node, tokens="1/minute")
        assert key in str(info.value) and "could not reach" not in str(info.value)


def test_a_settlement_on_a_wrong_type_key_is_a_clear_error(client):
    h = nlr.Hierarchy(client, LEVELS)
    res = h.reserve(PATH, tokens=5)
    key = h.redis_keys(PATH)[6 + 2]
    put_foreign(client, key, "hash")
    with pytest.raises(NexusLimitsError, match="holds"):
        res.cancel()


def test_a_hostile_lease_that_never_ends_is_bounded(client):
    """A lease written by hand with an infinite expiry holds one slot (never more), the
    set still expires and every answer is a number."""
    h = nlr.Hierarchy(client, LEVELS)
    leases = h.redis_keys(PATH)[6 + 1]
    client.zadd(leases, {"intruder": float("inf")})
    res = h.reserve(PATH, tokens=5)
    assert res.allowed
    busy = h.reserve(PATH, tokens=5)
    assert (busy.allowed, busy.policy) == (False, "team.concurrency")
    assert 0 < busy.retry_after <= 1e11
    assert 0 < client.pttl(leases)
    assert res.settle(5) is True


def test_a_corrupted_default_quota_is_ignored(client):
    """The levels' quotas hash edited by hand: values set_default_quota would refuse
    are ignored (a huge concurrency would lift the limit)."""
    levels = [("org", "10/minute"), ("team", {"requests": "10/minute", "concurrency": 2})]
    h = nlr.Hierarchy(client, levels, refresh=0)
    client.hset(
        f"nl:{{{h.name}}}:hierarchy-defaults",
        mapping={"1|concurrency": "9" * 30, "0|requests": "1 99999999999999999999999 1"},
    )
    assert h.quotas("team")["concurrency"] == 2
    assert h.quotas("org")["requests"] == nl.Rate(10, 60.0)
    assert [h.reserve(("a", "b")).allowed for _ in range(3)] == [True, True, False]


def test_a_defaults_key_of_the_wrong_type_is_a_clear_error(client):
    h = nlr.Hierarchy(client, LEVELS, refresh=0)
    client.set(f"nl:{{{h.name}}}:hierarchy-defaults", "x")
    with pytest.raises(NexusLimitsError, match="hierarchy-defaults"):
        h.hit(PATH)


# -- time --------------------------------------------------------------------------------


def test_done_follows_the_servers_clock_not_the_clients(client, monkeypatch):
    """A client whose clock runs an hour ahead of the server still sees its fresh
    reservation open (the lease time is the server's), and can settle it."""
    h = nlr.Hierarchy(client, LEVELS, lease_ttl=60)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    res = h.reserve(PATH, tokens=5)
    assert res.allowed and not res.done
    assert res.settle(3) is True and res.done
    behind = h.reserve(PATH, tokens=5)
    monkeypatch.setattr(time, "time", lambda: real() - 3600)
    assert not behind.done
    assert behind.cancel() is True


def test_settle_after_the_lease_time_stands_as_charged(client):
    levels = [("org", {"tokens": "1000/day"}), ("team", {"concurrency": 2})]
    h = nlr.Hierarchy(client, levels, lease_ttl=0.2)
    res = h.reserve(PATH[:2], tokens=50)
    assert res.allowed
    deadline = time.monotonic() + 3
    while not res.done and time.monotonic() < deadline:
        time.sleep(0.05)
    assert res.done
    assert res.settle(0) is False and res.cancel() is False
    assert h.inspect(PATH[:1])["tokens"]["used"] == 50
    assert h.inspect(PATH[:2])["concurrency"]["in_flight"] == 0


def test_double_settle_and_settle_after_cancel_charge_once(client):
    clock = nl.ManualClock(1_700_000_000.0)
    h = nlr.Hierarchy(client, LEVELS, clock=clock)
    mem = nl.Hierarchy(LEVELS, clock=clock)
    for o in (h, mem):
        a = o.reserve(PATH, tokens=100)
        assert a.settle(40) is True and a.settle(0) is False and a.cancel() is False
        b = o.reserve(PATH, tokens=100)
        assert b.cancel() is True and b.settle(1000) is False and b.cancel() is False
    assert h.inspect(PATH[:1])["tokens"]["used"] == mem.inspect(PATH[:1])["tokens"]["used"] == 40


# -- concurrency -------------------------------------------------------------------------

MIX_WORKER = textwrap.dedent(
    """
    import random, sys, redis, nexus_limits as nl, nexus_limits.redis as nlr
    clock = nl.ManualClock(1_700_000_000.0)
    h = nlr.Hierarchy(redis.Redis(port=int(sys.argv[1])), eval(sys.argv[2]), prefix="mix", clock=clock)
    rng = random.Random(int(sys.argv[3]))
    charged = 0
    for i in range(int(sys.argv[4])):
        res = h.reserve(("acme", "search", f"p{i % 4}"), tokens=10)
        if not res.allowed:
            continue
        if rng.random() < 0.5:
            actual = rng.randrange(0, 30)
            assert res.settle(actual) is True
            charged += actual
        else:
            assert res.cancel() is True
    print(charged)
    """
)

MIX_LEVELS = [
    ("org", {"tokens": "10000000/day"}),
    ("team", {"tokens": "1000000/day", "concurrency": 3}),
    ("key", {"requests": "1000000/day"}),
]


def test_reserve_settle_cancel_is_exact_across_threads_processes_and_tasks(redis_server):
    """On a frozen clock nothing refills: once every reservation is settled or
    cancelled, the team has been charged exactly the settled tokens, and its leases
    were never more than its limit at once."""
    redis.Redis(port=redis_server.port).flushall()
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "python")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MIX_WORKER, str(redis_server.port), repr(MIX_LEVELS), str(seed), "60"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for seed in range(2)
    ]
    clock = nl.ManualClock(1_700_000_000.0)
    client = redis.Redis(port=redis_server.port)
    h = nlr.Hierarchy(client, MIX_LEVELS, prefix="mix", clock=clock)
    charged: List[int] = []
    most: List[int] = [0]
    lock = threading.Lock()
    held: Set[int] = set()

    def thread(seed: int) -> None:
        got = 0
        for i in range(60):
            res = h.reserve(("acme", "search", f"t{(seed + i) % 3}"), tokens=10)
            if not res.allowed:
                continue
            with lock:
                held.add(id(res))
                most[0] = max(most[0], len(held))
            time.sleep(0.001)
            with lock:
                held.discard(id(res))
            if i % 2:
                assert res.settle(i % 25) is True
                got += i % 25
            else:
                assert res.cancel() is True
        with lock:
            charged.append(got)

    async def tasks() -> int:
        ac = redis.asyncio.Redis(port=redis_server.port)
        ah = nla.Hierarchy(ac, MIX_LEVELS, prefix="mix", clock=clock)

        async def worker(w: int) -> int:
            got = 0
            for i in range(15):
                res = await ah.reserve(("acme", "search", f"a{w}"), tokens=10)
                if res.allowed:
                    await asyncio.sleep(0)
                    if i % 3:
                        assert await res.settle(7) is True
                        got += 7
                    else:
                        assert await res.cancel() is True
            return got

        try:
            return sum(await asyncio.gather(*(worker(w) for w in range(4))))
        finally:
            await ac.aclose()

    threads = [threading.Thread(target=thread, args=(s,)) for s in range(3)]
    try:
        for t in threads:
            t.start()
        from_tasks = run(tasks())
        for t in threads:
            t.join(60)
        from_procs = [int(p.communicate(timeout=60)[0]) for p in procs]
    finally:
        for p in procs:
            p.kill()
    try:
        assert all(not t.is_alive() for t in threads)
        total = sum(charged) + from_tasks + sum(from_procs)
        team = h.inspect(("acme", "search"))
        assert team["tokens"]["used"] == total
        assert team["concurrency"]["in_flight"] == 0
        assert h.inspect(("acme",))["tokens"]["used"] == total
        assert most[0] <= 3
    finally:
        client.close()


def test_leases_never_pass_the_limit_while_settling_concurrently(redis_server):
    """Threads reserve and settle on one team (limit 2) with several keys; a lease
    count read between reserve and settle never passes the limit."""
    redis.Redis(port=redis_server.port).flushall()
    client = redis.Redis(port=redis_server.port)
    h = nlr.Hierarchy(client, LEVELS)
    inflight = [0]
    worst = [0]
    lock = threading.Lock()

    def go(n: int) -> None:
        for i in range(40):
            res = h.reserve(("o", "t", f"k{(n + i) % 5}"), tokens=1)
            if res.allowed:
                with lock:
                    inflight[0] += 1
                    worst[0] = max(worst[0], inflight[0])
                time.sleep(0.001)
                with lock:
                    inflight[0] -= 1
                assert res.cancel() is True

    threads = [threading.Thread(target=go, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert worst[0] <= 2
        assert h.inspect(("o", "t"))["concurrency"]["in_flight"] == 0
    finally:
        client.close()


def test_set_quota_while_traffic_runs_never_admits_past_the_largest_quota(redis_server):
    """Threads charge one team while another changes its own quota back and forth
    (10, 20 a day, then the level's 20): usage is carried over at every change, so no
    more than 20 are ever admitted, and the team's usage is exactly what was admitted."""
    levels = [("org", "100000/day"), ("team", "20/day"), ("key", "100000/day")]
    client = redis.Redis(port=redis_server.port)
    client.flushall()
    clock = nl.ManualClock(1_700_000_000.0)
    h = nlr.Hierarchy(client, levels, clock=clock)
    admitted: List[int] = []
    lock = threading.Lock()

    def traffic(n: int) -> None:
        got = sum(h.try_acquire(("o", "t", f"k{(n + i) % 4}")) for i in range(30))
        with lock:
            admitted.append(got)

    def admin() -> None:
        for i in range(30):
            if i % 3 == 0:
                h.set_quota(("o", "t"), requests="10/day")
            elif i % 3 == 1:
                h.set_quota(("o", "t"), requests="20/day")
            else:
                h.clear_quota(("o", "t"))

    threads = [threading.Thread(target=traffic, args=(n,)) for n in range(3)] + [threading.Thread(target=admin)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert all(not t.is_alive() for t in threads)
        assert 10 <= sum(admitted) <= 20, admitted
        assert h.inspect(("o", "t"))["requests"]["used"] == sum(admitted)
    finally:
        client.close()


def test_a_lease_time_of_centuries_still_expires(client):
    h = nlr.Hierarchy(client, [("org", {"tokens": "1000/day"}), ("team", {"concurrency": 1})], lease_ttl=2.0**64)
    res = h.reserve(("a", "t"), tokens=5)
    assert res.allowed and not h.reserve(("a", "t")).allowed
    assert all(client.pttl(k) > 0 for k in client.keys("*"))
    assert res.settle(1) is True and h.reserve(("a", "t")).allowed


# -- memory -------------------------------------------------------------------------------


def test_every_key_expires_and_a_node_has_at_most_six(client):
    """After every kind of call, each key has an expiry but a node's own quotas (kept
    until clear_quota) and the levels' quotas hash; after clear_quota only the latter."""
    h = nlr.Hierarchy(client, LEVELS, lease_ttl=30)
    nodes: Set[Tuple[Any, ...]] = set()
    for i in range(20):
        path = (f"o{i % 3}", f"t{i % 4}", f"k{i}")
        nodes |= {path[:1], path[:2], path}
        res = h.reserve(path, tokens=5)
        if i % 3 == 0:
            res.settle(50)
        elif i % 3 == 1:
            res.cancel()
        h.hit(path)
        h.peek(path, tokens=3)
    h.set_quota(("o0",), tokens="50/minute")
    h.set_quota(("o1", "t1"), concurrency=5, requests="3/minute")
    h.set_default_quota("key", "7/minute")
    h.inspect(("o0",))
    h.reset(("o2",))
    forever = sorted(k.decode() for k in client.keys("*") if client.pttl(k) == -1)
    assert forever == sorted(
        [h.redis_keys(("o0",))[0], h.redis_keys(("o1", "t1"))[6], f"nl:{{{h.name}}}:hierarchy-defaults"]
    )
    assert h.clear_quota(("o0",)) and h.clear_quota(("o1", "t1"))
    assert [k.decode() for k in client.keys("*") if client.pttl(k) == -1] == [f"nl:{{{h.name}}}:hierarchy-defaults"]
    # A node has its six keys at most, and its lease set no more members than its limit.
    allowed = {k for n in nodes for k in h.redis_keys(n)}
    assert {k.decode() for k in client.keys("*")} - allowed == {f"nl:{{{h.name}}}:hierarchy-defaults"}


def test_a_lease_set_stays_bounded_by_its_limit(client):
    clock = nl.ManualClock(1_700_000_000.0)
    h = nlr.Hierarchy(client, LEVELS, clock=clock, lease_ttl=1)
    leases = h.redis_keys(PATH)[6 + 1]
    for _ in range(200):
        h.reserve(PATH, tokens=0)  # never settled: each expires after a second
        h.reserve(("acme", "search", "sk-2"), tokens=0)
        clock.advance(0.6)
        assert client.zcard(leases) <= 2
    assert 0 < client.pttl(leases) <= 1000


# -- cluster -------------------------------------------------------------------------------


def test_hostile_names_never_cross_slots_on_a_cluster(redis_cluster):
    every_node_ready(redis_cluster)
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster.port)
    try:
        h = nlr.Hierarchy(client, MIX_LEVELS, prefix="atk")
        for path in _paths()[:: max(1, len(_paths()) // 25)]:
            res = h.reserve(path, tokens=5)
            assert res.allowed, path
            assert res.settle(3) is True
            assert h.hit(path).allowed
            h.peek(path, tokens=1)
            h.set_quota(path[:2], concurrency=3)
            assert h.inspect(path[:2])["concurrency"]["own_quota"]
            assert h.clear_quota(path[:2])
            h.reset(path)
    finally:
        client.close()


# -- Priority ------------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", ["nan", "inf", "-inf", "garbage", ""])
def test_priority_on_a_corrupted_state_is_a_clear_error(client, garbage):
    tb = nlr.TokenBucket(client, "10/minute", on_error="allow")
    p = nlr.Priority(tb, {"hi": 1.0, "lo": 0.5})
    key = tb._plan.keys("k")[0]
    client.set(key, garbage)
    for call in (lambda: p.hit("k", 1, "lo"), lambda: p.peek("k")):
        with pytest.raises(NexusLimitsError) as info:
            call()
        assert key in str(info.value)
        assert_no_script_text(str(info.value))
    assert client.get(key) == garbage.encode()


def test_priority_on_a_huge_finite_state_refuses(client):
    tb = nlr.TokenBucket(client, "10/minute")
    p = nlr.Priority(tb, {"hi": 1.0, "lo": 0.5})
    client.set(tb._plan.keys("k")[0], "1e300")
    d = p.hit("k", 1, "hi")
    assert not d.allowed and d.remaining == 0 and 1e9 < d.retry_after < 1e11


@pytest.mark.parametrize("algorithm", ["TokenBucket", "FixedWindow", "SlidingWindow", "LeakyBucket"])
def test_priority_on_a_wrong_type_key_is_a_clear_error(client, algorithm):
    limiter = getattr(nlr, algorithm)(client, "10/minute", on_error="allow")
    p = nlr.Priority(limiter, {"hi": 1.0, "lo": 0.5})
    key = limiter._plan.keys("k")[0]
    put_foreign(client, key, "hash")
    with pytest.raises(NexusLimitsError) as info:
        p.hit("k")
    assert key in str(info.value)
    assert_no_script_text(str(info.value))


def test_priority_asyncio_on_a_wrong_type_key(async_redis_client):
    async def main() -> None:
        ac = async_redis_client()
        try:
            tb = nla.TokenBucket(ac, "10/minute")
            p = nla.Priority(tb, {"hi": 1.0, "lo": 0.5})
            await ac.hset(tb._plan.keys("k")[0], "a", "b")
            with pytest.raises(NexusLimitsError, match="holds"):
                await p.hit("k")
        finally:
            await ac.aclose()

    run(main())


# -- asyncio cancellation ---------------------------------------------------------------------

CANCEL_LEVELS = [("org", {"tokens": "1000/day"}), ("team", {"concurrency": 1})]
BUSY = """
local t = redis.call("TIME")
local start = t[1] * 1000000 + t[2]
while true do
    t = redis.call("TIME")
    if t[1] * 1000000 + t[2] - start > tonumber(ARGV[1]) then return 1 end
end
"""


def _busy_server(port: int, us: int) -> threading.Thread:
    """Keeps the server busy for ``us`` microseconds (a script from another client), so
    a command sent meanwhile is on its way when its task is cancelled."""
    thread = threading.Thread(target=lambda: redis.Redis(port=port).eval(BUSY, 0, us))
    thread.start()
    return thread


async def _cancelled_midway(port: int, job: Any) -> Any:
    busy = _busy_server(port, 80_000)
    await asyncio.sleep(0.02)
    task = asyncio.ensure_future(job)
    await asyncio.sleep(0.02)
    task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        return None
    finally:
        busy.join(10)


async def _until_free(h: Any, node: Any) -> int:
    for _ in range(200):
        held = int((await h.inspect(node))["concurrency"]["in_flight"])
        if held == 0:
            break
        await asyncio.sleep(0.01)
    return held


@pytest.mark.parametrize("refresh", [0.0, 3600.0], ids=["quotas-read-first", "script-on-the-way"])
def test_a_cancelled_settle_still_ends_its_leases(redis_server, refresh):
    """A task cancelled while its settlement is on the way (a client that went away)
    left the lease held for lease_ttl and the estimate charged, the reservation being
    done already (no second try): the settlement now runs to its end."""

    async def main() -> None:
        ac = redis.asyncio.Redis(port=redis_server.port)
        await ac.flushall()
        h = nla.Hierarchy(ac, CANCEL_LEVELS, clock=nl.ManualClock(1_700_000_000.0), refresh=refresh)
        try:
            for i in range(2):
                res = await h.reserve(("a", "t"), tokens=10)
                assert res.allowed, i
                assert await _cancelled_midway(redis_server.port, res.settle(0)) is None
                assert res.done
                assert await _until_free(h, ("a", "t")) == 0, i
                assert (await h.inspect(("a",)))["tokens"]["used"] == 0, i
        finally:
            await ac.aclose()

    run(main())


def test_a_cancelled_reserve_holds_nothing(redis_server):
    """A task cancelled while its reservation is on the way never sees it: what the
    script charged and leased is taken back (it held the team's one lease until
    lease_ttl)."""

    async def main() -> None:
        ac = redis.asyncio.Redis(port=redis_server.port)
        await ac.flushall()
        h = nla.Hierarchy(ac, CANCEL_LEVELS, clock=nl.ManualClock(1_700_000_000.0), refresh=3600)
        try:
            await h.peek(("a", "t"))  # the levels' quotas read: the next call is one script
            for i in range(2):
                assert await _cancelled_midway(redis_server.port, h.reserve(("a", "t"), tokens=10)) is None
                assert await _until_free(h, ("a", "t")) == 0, i
                assert (await h.inspect(("a",)))["tokens"]["used"] == 0, i
        finally:
            await ac.aclose()

    run(main())


def test_priority_refuses_a_cost_past_64_bits_as_in_process(client):
    """In-process a cost past 2**64 - 1 is a ValueError; the Redis Priority took it
    (any int, however many digits, went to the script as text)."""
    mem = nl.Priority(nl.TokenBucket("10/minute"), {"hi": 1.0, "lo": 0.5})
    red = nlr.Priority(nlr.TokenBucket(client, "10/minute"), {"hi": 1.0, "lo": 0.5})
    for p in (mem, red):
        d = p.hit("k", 2**64 - 1, "hi")
        assert not d.allowed and d.retry_after == float("inf")
        for cost in (2**64, 10**30):
            with pytest.raises(ValueError, match="non-negative integer"):
                p.hit("k", cost, "lo")
            with pytest.raises(ValueError, match="non-negative integer"):
                p.peek("k", cost)
    with pytest.raises(ValueError, match="an int of 16610 bits"):
        red.hit("k", 10**5000)
    assert client.keys("*") == []


# -- a store that answers what no script returns --------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [b"*2\r\n:1\r\n:2\r\n", b"$3\r\nabc\r\n", b":5\r\n", b"*20\r\n" + b"$3\r\nxyz\r\n" * 20, b"*0\r\n", b"_\r\n"],
    ids=["short", "string", "int", "garbage", "empty", "null"],
)
def test_a_reply_no_script_returns_is_a_clear_error(reply):
    """IndexError, ValueError, TypeError from the depths of reply parsing became a clear
    error naming the reply."""
    store = FakeStore(reply, {b"HGETALL": b"*0\r\n"})
    client = redis.Redis(port=store.port)
    try:
        h = nlr.Hierarchy(client, LEVELS)
        p = nlr.Priority(nlr.TokenBucket(client, "10/minute"), {"hi": 1.0, "lo": 0.5})
        calls = [lambda: h.hit(PATH), lambda: h.reserve(PATH, 5), lambda: h.peek(PATH), lambda: h.inspect(PATH[:1])]
        for call in [*calls, lambda: p.hit("k"), lambda: p.peek("k", cls="lo")]:
            with pytest.raises(NexusLimitsError, match="reply is not what this library's script returns"):
                call()
    finally:
        client.close()
        store.close()
