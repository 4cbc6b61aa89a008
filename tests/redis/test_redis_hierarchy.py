"""nexus_limits.redis.Hierarchy (sync and asyncio) against a real redis-server: the
same answers as the in-process Hierarchy on the same calls, exact under threads,
processes and asyncio tasks, leases shared by processes (a killed holder's expires),
quotas changed in one client seen by another, a cluster running a path on one node, the
on_error answers of a stopped server, and hostile inputs refused before anything is
written."""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Callable, Dict, List

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from support.redis_state import every_node_ready
from support.servers import RedisServer

import nexus_limits as nl
import nexus_limits.redis as nlr
import nexus_limits.redis.asyncio as nla

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KINDS = ["memory", "redis", "asyncio"]

README_LEVELS = [
    ("org", {"requests": "1000/minute", "tokens": "200000/minute"}),
    ("team", {"requests": "6/minute", "concurrency": 20}),
    ("key", "4/minute"),
]
LLM_LEVELS = [
    ("org", {"tokens": "100000/minute", "spend": "50.00/day"}),
    ("team", {"tokens": "20000/minute", "concurrency": 2}),
    ("key", {"requests": "60/minute", "tokens": "5000/minute", "concurrency": 1}),
]


class Blocking:
    """An asyncio object driven from synchronous code on one event loop: every coroutine
    a method returns is run to its end, and an asyncio reservation is wrapped alike, so
    one test body runs on every backend."""

    def __init__(self, obj: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._obj = obj
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._obj, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            out = attr(*args, **kwargs)
            if inspect.isawaitable(out):
                out = self._loop.run_until_complete(out)
            if isinstance(out, nl.hierarchy.AsyncHierarchyReservation):
                return Blocking(out, self._loop)
            return out

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._obj, name, value)


@pytest.fixture(params=KINDS)
def make(request, redis_server) -> Callable[..., Any]:
    """A factory of hierarchies of one kind: in this process, on Redis, on Redis with
    asyncio (driven to its end call by call)."""
    kind = request.param
    redis.Redis(port=redis_server.port).flushall()
    closers: List[Callable[[], Any]] = []
    loop = asyncio.new_event_loop()

    def build(levels: Any, **kw: Any) -> Any:
        if kind == "memory":
            return nl.Hierarchy(levels, **kw)
        if kind == "redis":
            client = redis.Redis(port=redis_server.port, socket_timeout=5)
            closers.append(client.close)
            return nlr.Hierarchy(client, levels, **kw)
        aclient = redis.asyncio.Redis(port=redis_server.port, socket_timeout=5)
        closers.append(lambda: loop.run_until_complete(aclient.aclose()))
        return Blocking(nla.Hierarchy(aclient, levels, **kw), loop)

    build.kind = kind  # type: ignore[attr-defined]
    yield build
    for close in closers:
        close()
    loop.close()


# -- the same answers as in-process --------------------------------------------------


def test_readme_example_quotas(make):
    clock = nl.ManualClock(0.0)
    h = make(README_LEVELS, clock=clock)
    k1, k2 = ("acme", "search", "sk-1"), ("acme", "search", "sk-2")
    assert [h.try_acquire(k1) for _ in range(5)] == [True, True, True, True, False]
    d = h.hit(k1)
    assert (d.allowed, d.policy, d.retry_after) == (False, "key.requests", 15.0)
    assert (d.levels["team"].remaining, d.levels["org"].remaining) == (1, 995)
    assert [h.try_acquire(k2) for _ in range(3)] == [True, True, False]
    d = h.hit(k2)
    assert (d.policy, d.levels["team"].retry_after, d.levels["key"].allowed) == ("team.requests", 10.0, True)
    headers = d.headers()
    assert headers["RateLimit-Policy"] == (
        '"team.requests";q=6;w=60, "org.requests";q=1000;w=60, "org.tokens";q=200000;w=60, "key.requests";q=4;w=60'
    )
    assert headers["Retry-After"] == "10" and headers["x-ratelimit-remaining-requests"] == "0"
    h.set_quota(("acme",), requests="7/minute")
    assert h.hit(("acme", "ads", "sk-9")).allowed
    assert h.hit(("acme", "ads", "sk-9")).policy == "org.requests"
    assert h.stats()["refused_by"] == {"org": 1, "team": 2, "key": 2}
    s = h.stats()
    assert (s["allowed"], s["denied"]) == (7, 5)
    org = h.inspect(("acme",))
    assert org["level"] == "org" and org["requests"]["own_quota"] and org["requests"]["limit"] == 7
    assert org["requests"]["rate"] == nl.Rate(7, 60.0) and org["requests"]["used"] == 7
    assert org["tokens"]["used"] == 0 and not org["tokens"]["own_quota"]
    assert h.clear_quota(("acme",)) is True and h.clear_quota(("acme",)) is False
    assert h.inspect(("acme",))["requests"]["limit"] == 1000


def test_readme_example_reserve_settle(make):
    h = make(LLM_LEVELS, clock=nl.ManualClock(1000.0))
    key = ("acme", "search", "sk-1")
    res = h.reserve(key, tokens=3000, spend=45_000)
    assert res.allowed and res.quotas["team.tokens"].remaining == 17000
    assert not res.done
    busy = h.reserve(key, tokens=100)
    assert (busy.allowed, busy.policy, busy.done) == (False, "key.concurrency", True)
    assert busy.settle(1) is False, "a refused reservation has nothing to settle"
    assert res.settle(1200, actual_spend=18_000) is True
    assert res.settle(1) is False and res.cancel() is False, "settled once"
    assert h.inspect(("acme",))["tokens"]["used"] == 1200
    assert h.inspect(("acme",))["spend"]["used"] == 18_000
    assert h.inspect(("acme", "search"))["concurrency"] == {"limit": 2, "in_flight": 0, "own_quota": False}
    res = h.reserve(("acme", "search", "sk-2"), tokens=25_000)
    assert (res.allowed, res.policy, res.retry_after) == (False, "team.tokens", math.inf)
    assert h.stats()["refused_by"] == {"org": 0, "team": 1, "key": 1}


def test_cancel_refunds_every_level_and_a_late_settle_stands(make):
    clock = nl.ManualClock(50.0)
    h = make(LLM_LEVELS, clock=clock, lease_ttl=30)
    key = ("acme", "search", "sk-1")
    res = h.reserve(key, tokens=4000, spend=10)
    assert h.inspect(("acme", "search"))["concurrency"]["in_flight"] == 1
    assert res.cancel() is True
    for node, unit in ((("acme",), "tokens"), (("acme", "search"), "tokens"), (key, "requests"), (key, "tokens")):
        assert h.inspect(node)[unit]["used"] == 0, (node, unit)
    late = h.reserve(key, tokens=4000)
    assert late.allowed
    clock.advance(31)
    assert late.done and late.settle(0) is False, "past lease_ttl it stands as charged"
    again = h.reserve(key, tokens=10)
    assert again.allowed, "the expired lease no longer counts"


def test_priority_classes_in_a_hierarchy(make):
    clock = nl.ManualClock(0.0)
    h = make([("org", "100/minute"), ("team", "10/minute")], clock=clock, classes={"interactive": 1.0, "batch": 0.7})
    team = ("acme", "search")
    assert sum(h.try_acquire(team) for _ in range(10)) == 7, "a call naming no class is batch"
    d = h.hit(team, cls="batch")
    assert (d.allowed, d.policy, d.levels["team"].limit, d.levels["team"].remaining) == (False, "team.requests", 7, 0)
    assert sum(h.try_acquire(team, cls="interactive") for _ in range(10)) == 3
    classes = h.stats()["classes"]
    assert (classes["batch"]["allowed"], classes["batch"]["denied"], classes["batch"]["share"]) == (7, 4, 0.7)
    assert (classes["interactive"]["allowed"], classes["interactive"]["denied"]) == (3, 7)
    assert h.default_class == "batch" and h.classes == {"interactive": 1.0, "batch": 0.7}
    res = h.reserve(team, cls="interactive")
    assert not res.allowed and res.policy == "team.requests"


def test_peek_charges_nothing_and_shadow_mode_admits(make):
    clock = nl.ManualClock(0.0)
    h = make([("org", {"requests": "3/minute", "concurrency": 1}), ("key", "2/minute")], clock=clock, shadow=True)
    path = ("o", "k")
    p = h.peek(path, 2)
    assert p.allowed and p.levels["key"].remaining == 0 and p.concurrency["org"].allowed
    assert h.peek(path, 3).policy == "key.requests" and h.peek(path, 3).allowed, "shadow: would refuse"
    assert h.stats()["allowed"] == 0, "peeks are not counted"
    answers = [h.hit(path) for _ in range(4)]
    assert all(d.allowed for d in answers)
    # The third is refused by the key (charged at the org: only the refusing quota is
    # not), the fourth by both, the key freeing up last.
    assert [d.policy for d in answers] == [None, None, "key.requests", "key.requests"]
    assert answers[2].decision.shadow and answers[3].levels["org"].allowed is False
    s = h.stats()
    assert (s["allowed"], s["denied"], s["shadow_denied"]) == (2, 2, 2)
    assert s["refused_by"] == {"org": 0, "key": 2}
    h.shadow = False
    assert not h.hit(path).allowed


def test_set_default_quota_keeps_usage(make):
    clock = nl.ManualClock(0.0)
    h = make([("org", "100/minute"), ("team", {"requests": "10/minute", "concurrency": 3})], clock=clock)
    team = ("acme", "search")
    assert sum(h.try_acquire(team) for _ in range(6)) == 6
    h.set_default_quota("team", requests="20/minute", concurrency=5)
    assert h.quotas("team") == {"requests": nl.Rate(20, 60.0), "concurrency": 5}
    assert sum(h.try_acquire(team) for _ in range(20)) == 14, "the 6 used are kept"
    assert h.inspect(team)["concurrency"]["limit"] == 5
    h.reset(team)
    assert h.inspect(team)["requests"]["used"] == 0
    assert h.inspect(("acme",))["requests"]["used"] == 20, "reset forgets one node only"


def test_acquire_waits_on_a_manual_clock(make):
    clock = nl.ManualClock(0.0)
    h = make([("org", "2/minute"), ("key", "10/minute")], clock=clock)
    path = ("o", "k")
    assert h.try_acquire(path, 2)
    d = h.acquire(path, timeout=60)
    assert d.allowed and clock.now == pytest.approx(30.0)
    with pytest.raises(nl.RateLimitExceeded):
        h.acquire(path, timeout=1)
    with pytest.raises(nl.RateLimitExceeded):
        h.acquire(path, 3, timeout=1000), "above the capacity: never"


# -- hostile inputs ------------------------------------------------------------------

HOSTILE_CALLS = [
    (lambda h: h.hit("acme/search/sk-1"), TypeError, "path must be a tuple"),
    (lambda h: h.hit(("a", "b", "c", "d")), ValueError, "at most one element per level (3)"),
    (lambda h: h.hit(("a", "b")), ValueError, "one node per level (org > team > key): expected 3 elements, got 2"),
    (lambda h: h.hit(("a", "b", 1.5)), TypeError, "str, bytes or int"),
    (lambda h: h.hit(("a", None, "c")), TypeError, "got NoneType"),
    (lambda h: h.hit(("a", True, "c")), TypeError, "got bool"),
    (lambda h: h.hit(("a", "b", "c"), float("nan")), TypeError, "cost must be a non-negative int"),
    (lambda h: h.hit(("a", "b", "c"), float("inf")), TypeError, "cost must be a non-negative int"),
    (lambda h: h.hit(("a", "b", "c"), -1), ValueError, "non-negative"),
    (lambda h: h.hit(("a", "b", "c"), 2**64), ValueError, "non-negative"),
    (lambda h: h.hit(("a", "b", "c"), True), TypeError, "got bool"),
    (lambda h: h.reserve(("a", "b", "c"), tokens=-5), ValueError, "tokens"),
    (lambda h: h.reserve(("a", "b", "c"), tokens=1, spend=1.5), TypeError, "spend"),
    (lambda h: h.hit(("a", "b", "c"), cls="gold"), ValueError, "no priority classes"),
    (lambda h: h.inspect(()), ValueError, "one element or more"),
    (lambda h: h.set_quota(("a",)), ValueError, "give at least one of"),
    (lambda h: h.set_quota(("a",), concurrency=2), ValueError, 'level "org" has no concurrency limit'),
    (lambda h: h.set_quota(("a", "b"), tokens="1/s"), ValueError, 'level "team" has no tokens quota'),
    (lambda h: h.set_quota(("a",), requests="lots"), ValueError, ""),
    (lambda h: h.set_quota(("a", "b"), concurrency=-1), (ValueError, OverflowError, TypeError), ""),
    (lambda h: h.set_default_quota("nope", requests="1/s"), ValueError, 'unknown level "nope"'),
]


@pytest.mark.parametrize("call,error,text", HOSTILE_CALLS)
def test_hostile_inputs_are_refused_and_nothing_is_written(make, redis_server, call, error, text):
    h = make(README_LEVELS)
    with pytest.raises(error) as caught:
        call(h)
    assert text in str(caught.value)
    assert redis.Redis(port=redis_server.port).dbsize() == 0, "nothing written"


def test_node_names_empty_binary_or_huge(make, redis_server):
    h = make(README_LEVELS, clock=nl.ManualClock(0.0))
    odd = ("", b"\x00{}:/", -(2**63))
    assert h.hit(odd).allowed and h.inspect(odd)["requests"]["used"] == 1
    assert h.inspect(("", b"\x00{}:/", 2**63))["requests"]["used"] == 0, "another node"
    assert h.inspect(("",))["requests"]["used"] == 1 and h.inspect((b"",))["requests"]["used"] == 0
    with pytest.raises(ValueError, match="128 bits"):
        h.hit(("acme", 2**200, "k"))
    if make.kind != "memory":
        long = ("o" * 1000, "t" * 1000, b"k" * 1000)
        assert h.hit(long).allowed and h.inspect(long)["requests"]["used"] == 1
        assert h.inspect(long[:2])["requests"]["used"] == 1 and h.inspect(("o" * 999,))["requests"]["used"] == 0
        assert max(len(k) for k in h.redis_keys(long)) < 400, "a long path is named by its digest"
        with pytest.raises(ValueError, match="too long"):
            h.hit(("acme", "x" * 5000, "k"))
        # (not the key count: the other nodes' states expire on Redis's own clock, 60 ms
        # after their 1000/minute hit, which a loaded machine can take to get here)
        assert redis.Redis(port=redis_server.port).keys("*acme*") == [], "nothing written"


def test_bad_construction_is_refused_as_in_process(redis_client):
    for levels, error in (
        ([], ValueError),
        ("org", TypeError),
        ([("org", {"requests": "1/s"})] * 2, ValueError),
        ([("org", {"bogus": "1/s"})], ValueError),
        ([(f"l{i}", "1/s") for i in range(17)], ValueError),
    ):
        with pytest.raises(error):
            nl.Hierarchy(levels)
        with pytest.raises(error):
            nlr.Hierarchy(redis_client, levels)
    with pytest.raises(ValueError):
        nlr.Hierarchy(redis_client, README_LEVELS, prefix="bad prefix")
    with pytest.raises(ValueError):
        nlr.Hierarchy(redis_client, README_LEVELS, on_error="maybe")
    with pytest.raises(ValueError):
        nlr.Hierarchy(redis_client, README_LEVELS, refresh=math.nan)
    with pytest.raises(TypeError, match="asyncio client"):
        nlr.Hierarchy(redis.asyncio.Redis(), README_LEVELS)
    with pytest.raises(ValueError, match="one class must have share 1.0"):
        nlr.Hierarchy(redis_client, README_LEVELS, classes={"a": 0.5})
    assert redis_client.dbsize() == 0


# -- shared by clients and processes ---------------------------------------------------


def test_set_quota_and_default_quota_are_seen_by_another_client(redis_server):
    a_client, b_client = redis.Redis(port=redis_server.port), redis.Redis(port=redis_server.port)
    try:
        a_client.flushall()
        clock = nl.ManualClock(0.0)
        a = nlr.Hierarchy(a_client, README_LEVELS, clock=clock, prefix="sq")
        b = nlr.Hierarchy(b_client, README_LEVELS, clock=clock, prefix="sq", refresh=0)
        a.set_quota(("acme", "search"), requests="2/minute", concurrency=1)
        assert sum(b.try_acquire(("acme", "search", f"k{i}")) for i in range(5)) == 2
        assert b.inspect(("acme", "search"))["concurrency"] == {"limit": 1, "in_flight": 0, "own_quota": True}
        a.set_default_quota("key", "1/minute")
        assert b.try_acquire(("acme", "ads", "k1")) and not b.try_acquire(("acme", "ads", "k1"))
        assert b.quotas("key") == {"requests": nl.Rate(1, 60.0)}
        assert '"key.requests";q=1;w=60' in b.hit(("acme", "ads", "k1")).headers()["RateLimit-Policy"]
    finally:
        a_client.close()
        b_client.close()


WORKER = textwrap.dedent(
    """
    import sys, redis, nexus_limits.redis as nlr
    h = nlr.Hierarchy(redis.Redis(port=int(sys.argv[1])), eval(sys.argv[2]), prefix="ex")
    print(sum(h.try_acquire(("acme", "search", f"p{i % 7}")) for i in range(int(sys.argv[3]))))
    """
)


def test_exact_under_threads_processes_and_tasks(redis_server):
    """Threads, processes and asyncio tasks hammer one team (quota 300 a day: nothing
    refills during the test): exactly 300 are admitted, never one more."""
    levels = [("org", "100000/day"), ("team", "300/day"), ("key", "100000/day")]
    redis.Redis(port=redis_server.port).flushall()
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "python")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(redis_server.port), repr(levels), "150"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    client = redis.Redis(port=redis_server.port, socket_timeout=10)
    h = nlr.Hierarchy(client, levels, prefix="ex")
    counts: List[int] = []
    lock = threading.Lock()

    def thread(n: int) -> None:
        got = sum(h.try_acquire(("acme", "search", f"t{i % 5}")) for i in range(n))
        with lock:
            counts.append(got)

    async def tasks() -> int:
        aclient = redis.asyncio.Redis(port=redis_server.port, socket_timeout=10)
        ah = nla.Hierarchy(aclient, levels, prefix="ex")
        try:
            # 10 tasks at a time (the client's pool bounds its connections), 150 calls.
            async def worker(w: int) -> int:
                return sum([await ah.try_acquire(("acme", "search", f"a{w % 3}")) for _ in range(15)])

            got = await asyncio.gather(*(worker(w) for w in range(10)))
        finally:
            await aclient.aclose()
        return sum(got)

    threads = [threading.Thread(target=thread, args=(100,)) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        from_tasks = asyncio.run(tasks())
        for t in threads:
            t.join(60)
        from_procs = [int(p.communicate(timeout=60)[0]) for p in procs]
    finally:
        for p in procs:
            p.kill()
        client.close()
    assert all(not t.is_alive() for t in threads)
    assert sum(counts) + from_tasks + sum(from_procs) == 300, (counts, from_tasks, from_procs)
    assert h.inspect(("acme", "search"))["requests"]["used"] == 300


HOLDER = textwrap.dedent(
    """
    import sys, time, redis, nexus_limits.redis as nlr
    h = nlr.Hierarchy(redis.Redis(port=int(sys.argv[1])), eval(sys.argv[2]), prefix="lz", lease_ttl=1.5)
    res = h.reserve(("acme", "search"), tokens=10)
    print("held" if res.allowed else "refused", flush=True)
    time.sleep(60)
    """
)


def test_leases_are_shared_by_processes_and_a_killed_holders_lease_expires(redis_server):
    levels = [("org", {"tokens": "1000/day"}), ("team", {"concurrency": 1})]
    redis.Redis(port=redis_server.port).flushall()
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "python")}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(redis_server.port), repr(levels)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    client = redis.Redis(port=redis_server.port, socket_timeout=5)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        h = nlr.Hierarchy(client, levels, prefix="lz", lease_ttl=1.5)
        busy = h.reserve(("acme", "search"))
        assert (busy.allowed, busy.policy) == (False, "team.concurrency")
        assert 0 < busy.retry_after <= 1.5
        assert h.inspect(("acme", "search"))["concurrency"]["in_flight"] == 1
        holder.kill()
        holder.wait(10)
        deadline = time.monotonic() + 5
        res = h.reserve(("acme", "search"))
        while not res.allowed and time.monotonic() < deadline:
            time.sleep(min(max(res.retry_after, 0.01), 0.2))
            res = h.reserve(("acme", "search"))
        assert res.allowed, "the killed holder's lease expired"
        assert h.inspect(("acme",))["tokens"]["used"] == 10, "its charge stands"
        assert res.settle(0) is True
    finally:
        holder.kill()
        holder.communicate(timeout=10)
        client.close()


# -- cluster, outages -------------------------------------------------------------------


def test_a_path_is_one_slot_on_a_cluster_sync_and_asyncio(redis_cluster):
    every_node_ready(redis_cluster)
    from redis.crc import key_slot

    clock = nl.ManualClock(1_700_000_000.0)
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster.port)
    try:
        h = nlr.Hierarchy(client, LLM_LEVELS, clock=clock, prefix="cl", classes={"top": 1.0, "low": 0.5})
        slots = set()
        for org in (f"org-{i}" for i in range(9)):
            path = (org, "team", "key")
            assert len({key_slot(k.encode()) for k in h.redis_keys(path)}) == 1
            slots.add(key_slot(h.redis_keys(path)[0].encode()))
            res = h.reserve(path, tokens=1000, spend=5, cls="top")
            assert res.allowed and res.settle(500) is True
            assert h.peek(path, tokens=10).allowed
            assert h.hit(path).allowed
            h.set_quota((org, "team"), tokens="100/minute", concurrency=3)
            assert h.inspect((org, "team"))["tokens"]["own_quota"]
            assert h.clear_quota((org, "team"))
            h.reset((org, "team", "key"))
        assert len(slots) > 1, "the orgs are spread over the nodes"
        h.set_default_quota("team", tokens="30000/minute")
        assert h.quotas("team")["tokens"] == nl.Rate(30000, 60.0)
    finally:
        client.close()

    async def main() -> None:
        aclient = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster.port)
        try:
            ah = nla.Hierarchy(aclient, LLM_LEVELS, clock=clock, prefix="cla")
            for org in (f"org-{i}" for i in range(6)):
                res = await ah.reserve((org, "t", "k"), tokens=10)
                assert res.allowed and await res.cancel() is True
                assert (await ah.inspect((org, "t")))["concurrency"]["in_flight"] == 0
        finally:
            await aclient.aclose()

    asyncio.run(main())


TIMEOUT = 0.5


def test_a_stopped_server_is_answered_by_on_error(redis_server):
    server = RedisServer().start()
    client = redis.Redis(port=server.port, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
    try:
        modes = {m: nlr.Hierarchy(client, LLM_LEVELS, on_error=m, prefix=m) for m in ("allow", "deny", "raise")}
        path = ("acme", "search", "sk-1")
        for h in modes.values():
            assert h.hit(path).allowed
        server.stop()
        started = time.monotonic()
        d = modes["allow"].hit(path)
        assert d.allowed and d.decision.fallback and d.level is None and d.levels == {}
        assert time.monotonic() - started < TIMEOUT + 1.0
        started = time.monotonic()
        for _ in range(20):
            d = modes["deny"].hit(path)
            assert not d.allowed and d.decision.fallback and d.retry_after == 1.0
            assert d.headers()["Retry-After"] == "1"
            res = modes["allow"].reserve(path, tokens=10)
            assert res.allowed and res.decision.fallback and res.done
            assert res.settle(5) is False, "a fallback reservation settles to nothing"
            with pytest.raises(nl.BackendUnavailable):
                modes["raise"].hit(path)
        assert time.monotonic() - started < 1.0, "the open breaker answers at once"
        assert modes["deny"].stats()["fail_closed"] == 20 and modes["deny"].stats()["breaker_open"] == 1
        with pytest.raises(nl.BackendUnavailable):
            modes["allow"].set_quota(("acme",), tokens="1/s")
    finally:
        client.close()
        server.close()


def test_a_stopped_server_asyncio():
    async def main() -> None:
        server = RedisServer().start()
        client = redis.asyncio.Redis(port=server.port, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
        try:
            h = nla.Hierarchy(client, LLM_LEVELS, on_error="deny")
            assert (await h.hit(("a", "b", "c"))).allowed
            server.stop()
            started = time.monotonic()
            d = await h.hit(("a", "b", "c"))
            assert not d.allowed and d.decision.fallback
            res = await h.reserve(("a", "b", "c"), tokens=1)
            assert not res.allowed and await res.settle(1) is False
            assert time.monotonic() - started < TIMEOUT + 1.0
        finally:
            await client.aclose()
            server.close()

    asyncio.run(main())


def test_sync_acquire_async_runs_in_threads(redis_client):
    h = nlr.Hierarchy(redis_client, [("org", "1/minute")], clock=nl.ManualClock(0.0))

    async def main() -> Dict[str, Any]:
        d = await h.acquire_async(("o",))
        assert d.allowed
        with pytest.raises(nl.RateLimitExceeded):
            await h.acquire_async(("o",), timeout=1)
        return {"ok": True}

    assert asyncio.run(main()) == {"ok": True}


def _close(a: nl.Decision, b: nl.Decision) -> bool:
    """The same decision, times to the microsecond (the scripts count in whole us)."""
    near = lambda x, y: x == y or abs(x - y) <= 2e-6  # noqa: E731
    return (a.allowed, a.limit, a.remaining) == (b.allowed, b.limit, b.remaining) and all(
        near(x, y) for x, y in ((a.reset_after, b.reset_after), (a.retry_after, b.retry_after), (a.delay, b.delay))
    )


def _same(m: Any, r: Any, what: str) -> None:
    assert (m.allowed, m.policy) == (r.allowed, r.policy), what
    assert _close(m.decision, r.decision), (what, m.decision, r.decision)
    for name in ("levels", "quotas", "concurrency"):
        mine, theirs = getattr(m, name), getattr(r, name)
        assert mine.keys() == theirs.keys(), (what, name)
        for k in mine:
            assert _close(mine[k], theirs[k]), (what, name, k, mine[k], theirs[k])
    assert m.headers()["RateLimit-Policy"] == r.headers()["RateLimit-Policy"], what


# Quotas of whole microseconds per unit, on a clock near its zero; and quotas of no
# whole microsecond per unit (7 per 3 s: 428571.43 us) on an epoch-scale clock, where
# a double keeps only a quarter of a microsecond of a time (the server's TIME is as
# large), so a state that drops the fraction of a unit refuses early.
RANDOM_QUOTAS = {
    "round": (
        [
            ("org", {"requests": "50/minute", "tokens": "5000/minute", "spend": "1.00/hour"}),
            ("team", {"requests": "20/minute", "tokens": "2000/minute", "concurrency": 3}),
            ("key", {"requests": "8/minute", "daily_tokens": 20000, "concurrency": 2}),
        ],
        {1: {"tokens": "8000/minute"}, 2: {"requests": "30/minute"}, 3: {"concurrency": 1}},
        1_000_000.0,
    ),
    "odd": (
        [
            ("org", {"requests": "1000/7minute", "tokens": "4999/minute", "spend": "0.97/hour"}),
            ("team", {"requests": "7/3s", "tokens": "2003/minute", "concurrency": 3}),
            ("key", {"requests": "13/minute", "daily_tokens": 20011, "concurrency": 2}),
        ],
        {1: {"tokens": "8009/minute"}, 2: {"requests": "11/7s"}, 3: {"concurrency": 1}},
        1_700_000_000.0,
    ),
}


# Every key kept (its expiry removed), in one script.
PERSIST_ALL = "for _, k in ipairs(redis.call('KEYS', '*')) do redis.call('PERSIST', k) end"


@pytest.mark.parametrize("quotas", RANDOM_QUOTAS)
@pytest.mark.parametrize("seed", range(3))
def test_random_calls_get_the_in_process_answers(redis_client, seed, quotas):
    """Hits, reservations, settlements, cancellations, peeks, classes, time passing and
    quota changes drawn at random, at round and at odd rates: every answer is the
    in-process class's."""
    import random

    rng = random.Random(seed)
    levels, changes, start = RANDOM_QUOTAS[quotas]
    classes = {"gold": 1.0, "silver": 0.75, "bronze": 0.4}
    c1, c2 = nl.ManualClock(start), nl.ManualClock(start)
    # (advanced, not built at start + a fraction: a double at the epoch holds no whole
    # microsecond, and the scripts get the clock in whole microseconds)
    fraction = rng.randrange(10**6) / 1e6
    c1.advance(fraction)
    c2.advance(fraction)
    mem = nl.Hierarchy(levels, clock=c1, classes=classes, lease_ttl=90)
    red = nlr.Hierarchy(redis_client, levels, clock=c2, classes=classes, lease_ttl=90)
    # Time is stepped in whole microseconds around the quotas' unit intervals at odd
    # rates, which leaves states a microsecond from fresh; a call of 0 units writes such
    # a state back with the shortest expiry Redis takes (1 ms of its own clock), which
    # could pass before the test keeps it: no amount is 0 there.
    least = 0 if quotas == "round" else 1
    intervals = [r.period / r.count for n in mem.levels for u, r in mem.quotas(n).items() if u != "concurrency"]
    paths = [(o, t, k) for o in "ab" for t in "xy" for k in "12"]
    held: List[Any] = []
    for step in range(400):
        op, path, cls = rng.random(), rng.choice(paths), rng.choice([None, *classes])
        what = f"step {step}"
        if op < 0.3:
            cost = rng.randint(least, 4)
            _same(mem.hit(path, cost, cls=cls), red.hit(path, cost, cls=cls), what)
        elif op < 0.6:
            tokens, spend = rng.randint(least, 1500), rng.randint(least, 400_000)
            m, r = mem.reserve(path, tokens, spend=spend, cls=cls), red.reserve(path, tokens, spend=spend, cls=cls)
            _same(m, r, what)
            if m.allowed:
                held.append((m, r))
        elif op < 0.75 and held:
            m, r = held.pop(rng.randrange(len(held)))
            if rng.random() < 0.5:
                actual, spent = rng.randint(0, 2500), rng.randint(0, 500_000)
                assert m.settle(actual, actual_spend=spent) == r.settle(actual, actual_spend=spent), what
            else:
                assert m.cancel() == r.cancel(), what
        elif op < 0.85:
            tokens = rng.randint(0, 3000)
            _same(mem.peek(path, 1, tokens=tokens, cls=cls), red.peek(path, 1, tokens=tokens, cls=cls), what)
        elif op < 0.9:
            node = path[: rng.randint(1, 3)]
            quota = changes[len(node)]
            if rng.random() < 0.5:
                mem.set_quota(node, **quota)
                red.set_quota(node, **quota)
            else:
                assert mem.clear_quota(node) == red.clear_quota(node), what
        elif quotas == "round":
            dt = rng.uniform(0, 8)
            c1.advance(dt)
            c2.advance(dt)
        else:
            # whole microseconds, around a unit's interval (and its multiples)
            units = rng.choice([0.5, 1.0, 1.0, 2.0, rng.random() * 3])
            us = max(int(units * rng.choice(intervals) * 1e6) + rng.randint(-2, 2), 0)
            c1.advance(us / 1e6)
            c2.advance(us / 1e6)
        # Redis expires keys on its own (real) clock, not the manual one the test steps:
        # the states are kept for as long as the test's time says (in one round trip, as
        # soon as can be: a state a microsecond from fresh gets the shortest expiry, 1 ms).
        redis_client.eval(PERSIST_ALL, 0)
        if step % 50 == 0:
            for node in (path[:1], path[:2], path):
                mi, ri = mem.inspect(node), red.inspect(node)
                for unit in mi:
                    if unit in ("level", "concurrency"):
                        assert mi[unit] == ri[unit], (what, node, unit)
                    else:
                        assert (mi[unit]["used"], mi[unit]["limit"]) == (ri[unit]["used"], ri[unit]["limit"])
    ms, rs = mem.stats(), red.stats()
    for name in ("allowed", "denied", "near_limit", "refused_by", "classes"):
        assert ms[name] == rs[name], name


def test_leases_never_exceed_the_limit_under_threads_and_tasks(redis_server):
    """Threads and asyncio tasks reserve (a lease at the team, 3 at most), mark the work
    as running in a Redis counter, and settle: the counter never passes 3."""
    levels = [("org", {"tokens": "1000000/day"}), ("team", {"concurrency": 3})]
    redis.Redis(port=redis_server.port).flushall()
    client = redis.Redis(port=redis_server.port, socket_timeout=10)
    h = nlr.Hierarchy(client, levels, prefix="lc")
    peak: List[int] = [0]
    settled: List[bool] = []
    lock = threading.Lock()

    def work(res: Any, running: int) -> None:
        with lock:
            peak[0] = max(peak[0], running)

    def thread() -> None:
        for _ in range(40):
            res = h.reserve(("acme", "search"), tokens=1)
            if res.allowed:
                work(res, client.incr("lc-running"))
                time.sleep(0.001)
                client.decr("lc-running")
                settled.append(res.settle(1))

    async def tasks() -> None:
        aclient = redis.asyncio.Redis(port=redis_server.port, socket_timeout=10)
        ah = nla.Hierarchy(aclient, levels, prefix="lc")

        async def task() -> None:
            for _ in range(40):
                res = await ah.reserve(("acme", "search"), tokens=1)
                if res.allowed:
                    work(res, await aclient.incr("lc-running"))
                    await asyncio.sleep(0.001)
                    await aclient.decr("lc-running")
                    settled.append(await res.settle(1))

        try:
            await asyncio.gather(*(task() for _ in range(4)))
        finally:
            await aclient.aclose()

    threads = [threading.Thread(target=thread) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        asyncio.run(tasks())
        for t in threads:
            t.join(60)
        assert all(not t.is_alive() for t in threads)
        assert 1 <= peak[0] <= 3, peak
        assert settled and all(settled), "every admitted reservation settled"
        assert h.inspect(("acme", "search"))["concurrency"]["in_flight"] == 0
        assert h.stats()["allowed"] > 0
    finally:
        client.close()
