"""nexus_limits.redis.Priority (sync and asyncio) against a real redis-server: the same
answers as the in-process Priority on every algorithm, the reserve held exactly under
threads, processes and asyncio tasks, keys with quotas of their own, shadow mode, the
on_error answers of a stopped server, a cluster, and hostile inputs."""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Callable, List

import pytest
import redis
import redis.asyncio
import redis.cluster
from support.redis_state import every_node_ready
from support.servers import RedisServer

import nexus_limits as nl
import nexus_limits.redis as nlr
import nexus_limits.redis.asyncio as nla

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALGORITHMS = ["TokenBucket", "FixedWindow", "SlidingWindow", "LeakyBucket"]
CLASSES = {"interactive": 1.0, "batch": 0.7}


class Blocking:
    """An asyncio object driven from synchronous code on one event loop."""

    def __init__(self, obj: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._obj = obj
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._obj, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            out = attr(*args, **kwargs)
            return self._loop.run_until_complete(out) if inspect.isawaitable(out) else out

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._obj, name, value)


@pytest.fixture(params=["memory", "redis", "asyncio"])
def make(request, redis_server) -> Callable[..., Any]:
    """A factory of (limiter, Priority) of one kind, the limiter built from its class
    name and arguments."""
    kind = request.param
    redis.Redis(port=redis_server.port).flushall()
    closers: List[Callable[[], Any]] = []
    loop = asyncio.new_event_loop()

    def build(algorithm: str, rate: str, classes: Any = CLASSES, default: Any = None, **kw: Any) -> Any:
        if kind == "memory":
            limiter = getattr(nl, algorithm)(rate, **kw)
            return limiter, nl.Priority(limiter, classes, default)
        if kind == "redis":
            client = redis.Redis(port=redis_server.port, socket_timeout=5)
            closers.append(client.close)
            limiter = getattr(nlr, algorithm)(client, rate, **kw)
            return limiter, nlr.Priority(limiter, classes, default)
        aclient = redis.asyncio.Redis(port=redis_server.port, socket_timeout=5)
        closers.append(lambda: loop.run_until_complete(aclient.aclose()))
        limiter = getattr(nla, algorithm)(aclient, rate, **kw)
        return Blocking(limiter, loop), Blocking(nla.Priority(limiter, classes, default), loop)

    build.kind = kind  # type: ignore[attr-defined]
    yield build
    for close in closers:
        close()
    loop.close()


def view(d: nl.Decision) -> tuple:
    """A decision to the microsecond (the scripts answer in whole microseconds)."""
    r = lambda s: s if s == float("inf") else round(s, 5)  # noqa: E731
    return (d.allowed, d.limit, d.remaining, r(d.reset_after), r(d.retry_after), r(d.delay))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_readme_example_on_every_algorithm(make, algorithm):
    _, p = make(algorithm, "100/minute", clock=nl.ManualClock(0.0))
    assert sum(p.try_acquire("upstream", cls="batch") for _ in range(100)) == 70
    d = p.hit("upstream", cls="batch")
    assert (d.allowed, d.limit, d.remaining) == (False, 70, 0)
    assert sum(p.try_acquire("upstream", cls="interactive") for _ in range(100)) == 30
    stats = p.stats()["classes"]
    assert (stats["batch"]["allowed"], stats["batch"]["denied"], stats["batch"]["share"]) == (70, 31, 0.7)
    assert (stats["interactive"]["allowed"], stats["interactive"]["denied"]) == (30, 70)
    assert p.stats()["allowed"] == 100, "the limiter counts every class's calls"
    assert p.default == "batch" and p.classes == CLASSES


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_same_decisions_as_in_process(redis_server, algorithm):
    """Step by step on a manual clock, every answer (to the microsecond) is the
    in-process one: hits, peeks, costs above the class's part, time passing."""
    redis.Redis(port=redis_server.port).flushall()
    client = redis.Redis(port=redis_server.port)
    try:
        c1, c2 = nl.ManualClock(1_000.0), nl.ManualClock(1_000.0)
        classes = {"gold": 1.0, "silver": 0.8, "bronze": 0.45}
        mem = nl.Priority(getattr(nl, algorithm)("20/minute", clock=c1), classes)
        red = nlr.Priority(getattr(nlr, algorithm)(client, "20/minute", clock=c2), classes)
        steps = [("bronze", 3), ("bronze", 5), ("silver", 4), ("bronze", 1), ("gold", 6), ("silver", 17)]
        steps += [("gold", 21), ("silver", 1), ("gold", 0), (None, 2)]
        for i in range(3):
            for cls, cost in steps:
                assert view(mem.peek("k", cost, cls)) == view(red.peek("k", cost, cls)), (i, cls, cost)
                assert view(mem.hit("k", cost, cls)) == view(red.hit("k", cost, cls)), (i, cls, cost)
                assert mem.get_limit("k", cls) == red.get_limit("k", cls)
            c1.advance(7.5)
            c2.advance(7.5)
        assert mem.stats()["classes"] == red.stats()["classes"]
    finally:
        client.close()


def test_a_key_with_its_own_quota_keeps_the_shares(make):
    limiter, p = make("FixedWindow", "10/minute", {"top": 1.0, "low": 0.5}, clock=nl.ManualClock(0.0))
    limiter.set_quota("big", "40/minute")
    assert sum(p.try_acquire("big", cls="low") for _ in range(40)) == 20
    assert sum(p.try_acquire("big", cls="top") for _ in range(40)) == 20
    p.reset("big")
    assert p.get_limit("big", "low") == (True, 20)


def test_shadow_mode_admits_and_counts(make):
    limiter, p = make("TokenBucket", "10/minute", clock=nl.ManualClock(0.0))
    limiter.shadow = True
    answers = [p.hit("k", cls="batch") for _ in range(9)]
    assert all(d.allowed for d in answers) and answers[-1].shadow
    assert p.stats()["classes"]["batch"]["shadow_denied"] == 2


def test_acquire_waits_for_the_class(make):
    clock = nl.ManualClock(0.0)
    _, p = make("TokenBucket", "10/minute", clock=clock)
    assert sum(p.try_acquire("k", cls="batch") for _ in range(10)) == 7
    d = p.acquire("k", 1, 60, "batch")
    assert d.allowed and clock.now == pytest.approx(6.0)
    with pytest.raises(nl.RateLimitExceeded):
        p.acquire("k", 8, 1000, "batch")


@pytest.mark.parametrize(
    "call,error,text",
    [
        (lambda p: p.hit("k", cls="gold"), ValueError, 'unknown class "gold": the classes are "interactive", "batch"'),
        (lambda p: p.hit("k", cls=5), TypeError, "cls must be a class name"),
        (lambda p: p.hit("k", float("nan")), (TypeError, ValueError), ""),
        (lambda p: p.hit("k", -1), (TypeError, ValueError, OverflowError), ""),
        (lambda p: p.hit(None), TypeError, ""),
        (lambda p: p.hit(1.5, cls="batch"), TypeError, ""),
    ],
)
def test_hostile_inputs(make, redis_server, call, error, text):
    _, p = make("TokenBucket", "10/minute")
    with pytest.raises(error) as caught:
        call(p)
    assert text in str(caught.value)
    assert redis.Redis(port=redis_server.port).dbsize() == 0


def test_bad_construction(redis_client):
    tb = nlr.TokenBucket(redis_client, "10/minute")
    for classes, error in (
        ({}, ValueError),
        ({"a": 0.5}, ValueError),
        ({"a": 1.0, "b": float("nan")}, ValueError),
        ({"a": 1.0, "b": "half"}, TypeError),
        ("a", TypeError),
    ):
        with pytest.raises(error):
            nl.Priority(nl.TokenBucket("10/minute"), classes)
        with pytest.raises(error):
            nlr.Priority(tb, classes)
    with pytest.raises(ValueError):
        nlr.Priority(tb, CLASSES, default="gold")
    with pytest.raises(TypeError, match="TokenBucket, SlidingWindow, FixedWindow or LeakyBucket"):
        nlr.Priority(nl.TokenBucket("10/minute"), CLASSES)
    with pytest.raises(TypeError):
        nlr.Priority(nla.TokenBucket(redis.asyncio.Redis(), "10/minute"), CLASSES)
    with pytest.raises(ValueError, match="without lease="):
        nlr.Priority(nlr.TokenBucket(redis_client, "10/minute", lease=nlr.LeasePolicy()), CLASSES)
    assert nlr.Priority(tb, CLASSES, default="interactive").default == "interactive"


WORKER = textwrap.dedent(
    """
    import sys, redis, nexus_limits.redis as nlr
    p = nlr.Priority(nlr.FixedWindow(redis.Redis(port=int(sys.argv[1])), "200/day", prefix="px"),
                     {"interactive": 1.0, "batch": 0.6})
    print(sum(p.try_acquire("upstream", cls="batch") for _ in range(int(sys.argv[2]))))
    """
)


def test_the_reserve_holds_under_threads_processes_and_tasks(redis_server):
    """Batch calls from threads, processes and asyncio tasks: exactly 60% of the 200 go
    to batch; then interactive calls take exactly the 80 held back."""
    redis.Redis(port=redis_server.port).flushall()
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "python")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(redis_server.port), "80"], stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    client = redis.Redis(port=redis_server.port, socket_timeout=10)
    p = nlr.Priority(nlr.FixedWindow(client, "200/day", prefix="px"), {"interactive": 1.0, "batch": 0.6})
    counts: List[int] = []
    lock = threading.Lock()

    def thread() -> None:
        got = sum(p.try_acquire("upstream", cls="batch") for _ in range(40))
        with lock:
            counts.append(got)

    async def tasks() -> int:
        aclient = redis.asyncio.Redis(port=redis_server.port, socket_timeout=10)
        ap = nla.Priority(nla.FixedWindow(aclient, "200/day", prefix="px"), {"interactive": 1.0, "batch": 0.6})
        try:

            async def worker() -> int:
                return sum([await ap.try_acquire("upstream", cls="batch") for _ in range(10)])

            return sum(await asyncio.gather(*(worker() for _ in range(8))))
        finally:
            await aclient.aclose()

    threads = [threading.Thread(target=thread) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        from_tasks = asyncio.run(tasks())
        for t in threads:
            t.join(60)
        from_procs = [int(proc.communicate(timeout=60)[0]) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    try:
        assert sum(counts) + from_tasks + sum(from_procs) == 120, (counts, from_tasks, from_procs)
        assert sum(p.try_acquire("upstream", cls="interactive") for _ in range(100)) == 80
    finally:
        client.close()


def test_a_stopped_server_is_answered_by_the_limiters_on_error():
    server = RedisServer().start()
    client = redis.Redis(port=server.port, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        allow = nlr.Priority(nlr.TokenBucket(client, "10/minute", on_error="allow", prefix="a"), CLASSES)
        deny = nlr.Priority(nlr.TokenBucket(client, "10/minute", on_error="deny", prefix="d"), CLASSES)
        boom = nlr.Priority(nlr.TokenBucket(client, "10/minute", prefix="r"), CLASSES)
        assert allow.hit("k").allowed
        server.stop()
        started = time.monotonic()
        d = allow.hit("k", cls="batch")
        assert d.allowed and d.fallback
        for _ in range(20):
            d = deny.hit("k")
            assert not d.allowed and d.fallback
            with pytest.raises(nl.BackendUnavailable):
                boom.hit("k")
        assert time.monotonic() - started < 1.5
        assert deny.stats()["fail_closed"] == 20
    finally:
        client.close()
        server.close()


def test_on_a_cluster(redis_cluster):
    every_node_ready(redis_cluster)
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster.port)
    try:
        for algorithm in ALGORITHMS:
            lim = getattr(nlr, algorithm)(client, "10/minute", prefix="pc", clock=nl.ManualClock(0.0))
            p = nlr.Priority(lim, {"top": 1.0, "low": 0.5})
            for key in (f"user-{i}" for i in range(6)):
                assert sum(p.try_acquire(key, cls="low") for _ in range(10)) == 5
                assert p.peek(key, cls="top").remaining == 4
    finally:
        client.close()


def test_sync_acquire_async_runs_in_threads(redis_client):
    clock = nl.ManualClock(0.0)
    p = nlr.Priority(nlr.TokenBucket(redis_client, "10/minute", clock=clock), CLASSES)
    assert p.hit("k", None, "interactive").remaining == 9, "cost None is 1, as in-process"

    async def main() -> None:
        assert sum([(await p.acquire_async("k", 1, 1, "batch")).allowed for _ in range(6)]) == 6
        d = await p.acquire_async("k", 1, 60, "batch")
        assert d.allowed and clock.now == pytest.approx(6.0)
        with pytest.raises(nl.RateLimitExceeded):
            await p.acquire_async("k", 1, 1, "batch")

    asyncio.run(main())
