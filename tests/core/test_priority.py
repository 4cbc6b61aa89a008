"""Priority classes with reserved capacity (nl.Priority) in this process and in a
shared-memory store: the reserved share held for the top class on every algorithm,
each class's view of the limit, per-class counters, exactness under threads,
processes and asyncio, and hostile arguments.

This file is also the worker of its process tests: ``python test_priority.py worker ...``.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import threading
import uuid

import pytest

import nexus_limits as nl

CLASSES = {"interactive": 1.0, "batch": 0.7}
ALGORITHMS = {
    "token_bucket": lambda **kw: nl.TokenBucket("100/hour", **kw),
    "leaky_bucket": lambda **kw: nl.LeakyBucket("100/hour", **kw),
    "fixed_window": lambda **kw: nl.FixedWindow("100/hour", **kw),
    "sliding_window": lambda **kw: nl.SlidingWindow("100/hour", **kw),
}


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
    name = f"test-p-{uuid.uuid4().hex[:12]}"
    yield name
    try:
        nl.SharedMemoryStore(name).unlink()
    except ValueError:
        pass


def admitted(p, cls, n, key="k", cost=1):
    return sum(p.try_acquire(key, cost, cls) for _ in range(n))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("where", ["in-process", "shared memory"])
def test_the_reserved_share_is_held_for_the_top_class(algorithm, where, clock, tmp_path):
    kw = {"clock": clock}
    if where == "shared memory":
        kw["store"] = nl.SharedMemoryStore(path=str(tmp_path / "store"), capacity=64, ttl=86400)
    p = nl.Priority(ALGORITHMS[algorithm](**kw), CLASSES)
    assert admitted(p, "batch", 200) == 70
    d = p.hit("k", cls="batch")
    assert not d and d.limit == 70 and d.remaining == 0 and d.retry_after > 0
    assert admitted(p, "interactive", 200) == 30, "the top class takes the 30 held back, and no more"
    assert admitted(p, "batch", 5) == 0
    classes = p.stats()["classes"]
    assert (classes["batch"]["allowed"], classes["interactive"]["allowed"]) == (70, 30)
    assert classes["batch"]["share"] == 0.7
    assert p.stats()["allowed"] == 100, "the limiter counts every class"


def test_a_class_sees_its_part_of_the_limit(clock):
    p = nl.Priority(nl.TokenBucket("100/minute", clock=clock), {"top": 1.0, "half": 0.5})
    d = p.hit("k", 10, cls="half")
    assert (d.limit, d.remaining) == (50, 40)
    assert d.reset_after == pytest.approx(6.0), "the key's real state: 10 units at 100/minute"
    refused = p.hit("k", 45, cls="half")
    # 90 free of 100, 50 held back: 40 for the class; 45 fits once 5 more refill (3 s).
    assert (refused.remaining, refused.retry_after) == (40, pytest.approx(3.0))
    assert math.isinf(p.hit("k", 51, cls="half").retry_after), "above the class's part of the limit"
    assert p.peek("k", 40, cls="half").allowed and p.peek("k", 90, cls="top").allowed
    assert p.get_limit("k", cls="half") == (True, 40)
    clock.advance(3)
    assert p.acquire("k", 45, cls="half", timeout=0)


def test_three_classes_nest(clock):
    p = nl.Priority(nl.FixedWindow("10/minute", clock=clock), {"gold": 1.0, "silver": 0.8, "bronze": 0.5})
    assert admitted(p, "bronze", 10) == 5
    assert admitted(p, "silver", 10) == 3
    assert admitted(p, "gold", 10) == 2
    assert p.default == "bronze", "a call that names no class gets the smallest share"
    assert not p.hit("j", 6)
    assert nl.Priority(nl.FixedWindow("10/minute"), CLASSES, default="interactive").hit("j", 10)


def test_a_key_with_its_own_quota_keeps_the_same_share(clock):
    tb = nl.FixedWindow("10/minute", clock=clock)
    p = nl.Priority(tb, CLASSES)
    tb.set_quota("big", "40/minute")
    assert admitted(p, "batch", 40, key="big") == 28
    assert admitted(p, "batch", 40, key="small") == 7


def test_shadow_mode_admits_and_counts(clock, caplog):
    tb = nl.FixedWindow("10/minute", clock=clock, shadow=True)
    p = nl.Priority(tb, CLASSES)
    with caplog.at_level("INFO", logger="nexus_limits.shadow"):
        results = [p.hit("k", cls="batch") for _ in range(8)]
    assert all(results) and results[7].shadow and not results[6].shadow
    assert p.stats()["classes"]["batch"]["shadow_denied"] == 1
    assert "(class 'batch')" in caplog.text or '(class "batch")' in caplog.text


def test_reset_and_repr(clock):
    p = nl.Priority(nl.TokenBucket("10/minute", clock=clock), CLASSES)
    assert admitted(p, "batch", 10) == 7
    p.reset("k")
    assert admitted(p, "batch", 10) == 7
    assert repr(p) == (
        "Priority(TokenBucket('10/minute', burst=10, ttl=3600.0), {'interactive': 1.0, 'batch': 0.7}, default='batch')"
    )
    assert p.classes == CLASSES
    assert p.limiter.rate == nl.Rate(10, 60)
    assert isinstance(p, nl.RateLimiter)


def test_acquire_async_waits_for_the_class(clock):
    p = nl.Priority(nl.TokenBucket("10/minute", clock=clock), CLASSES)

    async def main():
        return [await p.acquire_async("k", cls="batch", timeout=60) for _ in range(8)]

    assert all(asyncio.run(main()))
    assert clock.now == pytest.approx(6.0), "the 8th batch call waited for one refill"


# --- exactness under concurrency -----------------------------------------------------


def _race(p, counts, lock, cls, calls):
    n = sum(p.try_acquire("hot", 1, cls) for _ in range(calls))
    with lock:
        counts[cls] = counts.get(cls, 0) + n


@pytest.mark.parametrize("where", ["in-process", "shared memory"])
def test_threads_keep_the_reserve_exactly(where, tmp_path):
    kw = {}
    if where == "shared memory":
        kw["store"] = nl.SharedMemoryStore(path=str(tmp_path / "store"), capacity=64, ttl=86400)
    p = nl.Priority(nl.TokenBucket("1000/day", **kw), CLASSES)
    counts, lock = {}, threading.Lock()
    threads = [threading.Thread(target=_race, args=(p, counts, lock, "batch", 500)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert counts["batch"] == 700, "batch alone stops at exactly 70%"
    threads = [threading.Thread(target=_race, args=(p, counts, lock, cls, 300)) for cls in ("batch", "interactive") * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert counts["batch"] == 700 and counts["interactive"] == 300


def test_asyncio_tasks_share_the_classes():
    p = nl.Priority(nl.FixedWindow("20/hour"), {"interactive": 1.0, "batch": 0.5})

    async def one(cls):
        return p.hit("k", cls=cls).allowed

    async def main():
        return await asyncio.gather(*(one("batch" if i % 2 else "interactive") for i in range(60)))

    results = asyncio.run(main())
    batch = sum(r for i, r in enumerate(results) if i % 2)
    assert sum(results) == 20 and batch <= 10


def _worker(store_name, cls, calls, record):
    p = nl.Priority(nl.TokenBucket("1000/day", store=nl.SharedMemoryStore(store_name)), CLASSES)
    n = sum(p.try_acquire("hot", 1, cls) for _ in range(calls))
    with open(record, "w") as f:
        f.write(str(n))


def _spawn(store_name, cls, calls, record):
    proc = subprocess.Popen([sys.executable, __file__, "worker", store_name, cls, str(calls), str(record)])
    _SPAWNED.append(proc)
    return proc


def test_processes_keep_the_reserve_exactly(store_name, tmp_path):
    nl.SharedMemoryStore(store_name, capacity=1024, ttl=86400)
    files = [tmp_path / f"b{i}" for i in range(3)]
    for proc in [_spawn(store_name, "batch", 400, f) for f in files]:
        assert proc.wait(timeout=120) == 0
    assert sum(int(f.read_text()) for f in files) == 700
    more = [tmp_path / "i0", tmp_path / "b3"]
    procs = [_spawn(store_name, "interactive", 400, more[0]), _spawn(store_name, "batch", 400, more[1])]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    assert (int(more[0].read_text()), int(more[1].read_text())) == (300, 0)


# --- hostile arguments ---------------------------------------------------------------


def _endless():
    i = 0
    while True:
        i += 1
        yield (f"c{i}", 1.0)


@pytest.mark.parametrize(
    "classes, error, match",
    [
        ({}, ValueError, "give from 1 to 32 classes, got 0"),
        ({"a": 0.5}, ValueError, "one class must have share 1.0"),
        ({"a": 1.0, "b": 0.0}, ValueError, "above 0 and at most 1, got 0"),
        ({"a": 1.0, "b": -0.5}, ValueError, "above 0 and at most 1"),
        ({"a": 1.0, "b": 1.5}, ValueError, "above 0 and at most 1"),
        ({"a": 1.0, "b": float("nan")}, ValueError, "above 0 and at most 1, got NaN"),
        ({"a": 1.0, "b": float("inf")}, ValueError, "above 0 and at most 1"),
        ({"a": 1.0, "b": 10**400}, OverflowError, "too large"),
        ({"a": True}, TypeError, 'the share of class "a" must be a number'),
        ({"a": "1.0"}, TypeError, "must be a number"),
        ({"a": None}, TypeError, "must be a number"),
        ({1: 1.0}, TypeError, "a class name must be a str"),
        ({"": 1.0}, ValueError, "a class name must not be empty"),
        ([("a", 1.0), ("a", 0.5)], ValueError, 'class "a" is given twice'),
        ([("a", 1.0, 3)], ValueError, "classes must be a dict"),
        ("a", TypeError, "classes must be a dict"),
        (5, TypeError, "classes must be a dict"),
        ({f"c{i}": 1.0 for i in range(33)}, ValueError, "give from 1 to 32 classes, got 33"),
        (_endless(), ValueError, "give from 1 to 32 classes"),
    ],
)
def test_bad_classes(classes, error, match):
    with pytest.raises(error, match=match):
        nl.Priority(nl.TokenBucket("1/s"), classes)


@pytest.mark.parametrize(
    "limiter",
    [
        lambda: nl.Composite([nl.TokenBucket("1/s")]),
        lambda: nl.Concurrency(2),
        lambda: nl.TokenLimiter(tokens="1/s"),
        lambda: "TokenBucket",
        lambda: None,
    ],
)
def test_bad_limiters(limiter):
    with pytest.raises(TypeError, match="limiter must be a TokenBucket, SlidingWindow, FixedWindow or LeakyBucket"):
        nl.Priority(limiter(), CLASSES)


def test_bad_calls():
    p = nl.Priority(nl.TokenBucket("10/s"), CLASSES)
    with pytest.raises(ValueError, match='unknown class "gold": the classes are "interactive", "batch"'):
        p.hit("k", cls="gold")
    with pytest.raises(TypeError, match="cls must be a class name"):
        p.hit("k", cls=1)
    with pytest.raises(ValueError, match="unknown class"):
        nl.Priority(nl.TokenBucket("10/s"), CLASSES, default="gold")
    with pytest.raises(ValueError, match="cost must be a non-negative integer"):
        p.hit("k", -1, "batch")
    with pytest.raises(TypeError, match="cost must be a non-negative int"):
        p.hit("k", 1.5, "batch")
    with pytest.raises(TypeError, match="key must be str, bytes or int"):
        p.hit(("k",), 1, "batch")
    assert not p.hit("k", 2**64 - 1, "interactive")


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    os._exit(0)
