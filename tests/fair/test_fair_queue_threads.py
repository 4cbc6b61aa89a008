"""FairQueue from threads: fairness under real threads and a real clock, the limit kept,
deadlines, CancelTokens, a ManualClock shared by threads, and threads and an event loop
waiting in one queue."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest

import nexus_limits as nl
from nexus_limits.fair import CancelToken, FairQueue, QueueCancelled, QueueRefused


def start(target, *args):
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def wait_until(predicate, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the condition"
        time.sleep(0.002)


def test_light_threads_are_not_held_behind_a_heavy_key():
    """Six threads hammer one key through a 40/s limit; three light keys each send a request
    now and then. The light requests wait a slot or two; the heavy ones wait their turn."""
    rate = 40
    queue = FairQueue(nl.TokenBucket(f"{rate}/s", burst=1), limit_key="upstream", timeout=10)
    lock = threading.Lock()
    admitted_at, waits = [], {"heavy": [], "light": []}

    def request(key):
        started = time.monotonic()
        queue.acquire(key)
        now = time.monotonic()
        with lock:
            admitted_at.append(now)
            waits["heavy" if key == "heavy" else "light"].append(now - started)

    def heavy():
        for _ in range(10):
            request("heavy")

    def light(n):
        time.sleep(0.2)
        for _ in range(4):
            request(f"light-{n}")
            time.sleep(0.15)

    threads = [start(heavy) for _ in range(6)] + [start(light, n) for n in range(3)]
    for thread in threads:
        thread.join(30)
    assert len(admitted_at) == 72
    slot = 1 / rate
    # A light request waits behind at most the request being admitted and one of each other
    # key waiting (the heavy key, two light ones): about 4 slots; twice that on a busy machine.
    assert max(waits["light"]) < 8 * slot + 0.1, sorted(waits["light"])[-3:]
    assert sum(waits["heavy"]) / len(waits["heavy"]) > 5 * slot
    # The limit holds: never more than rate + 1 (the burst) in any second.
    admitted_at.sort()
    for i, t in enumerate(admitted_at):
        in_window = sum(1 for u in admitted_at[i:] if u < t + 1.0)
        assert in_window <= rate + 1


def test_a_thread_that_cannot_make_it_is_refused_at_once():
    queue = FairQueue(nl.TokenBucket("1/minute"), timeout=5)
    queue.acquire("k")
    started = time.monotonic()
    with pytest.raises(QueueRefused) as refused:
        queue.acquire("k")
    assert time.monotonic() - started < 0.1
    assert refused.value.retry_after == pytest.approx(60, abs=0.5)


def test_a_thread_waiting_for_a_lease_leaves_at_its_deadline():
    limiter = nl.Concurrency(1, lease_ttl=60)
    held = limiter.try_acquire("k")
    queue = FairQueue(limiter, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(QueueRefused) as refused:
        queue.acquire("k")
    waited = time.monotonic() - started
    assert 0.29 < waited < 1.0
    assert refused.value.reason == "deadline" and 58 < refused.value.retry_after <= 60
    assert held is not None and queue.waiting() == 0


def test_a_released_lease_goes_to_the_waiting_thread_at_once():
    limiter = nl.Concurrency(1)
    held = limiter.try_acquire("k")
    queue = FairQueue(limiter, timeout=10)
    got = []
    thread = start(lambda: got.append((queue.acquire("k"), time.monotonic())))
    wait_until(lambda: queue.waiting() == 1)
    time.sleep(0.1)  # well into its wait
    released = time.monotonic()
    held.release()
    thread.join(5)
    lease, at = got[0]
    assert isinstance(lease, nl.Lease) and at - released < 0.06


def test_one_cancel_token_ends_several_waits():
    queue = FairQueue(nl.TokenBucket("1/minute"), limit_key="upstream", timeout=math.inf)
    queue.acquire("first")
    token = CancelToken()
    outcomes = []

    def wait(key):
        try:
            queue.acquire(key, cancel=token)
        except QueueCancelled:
            outcomes.append(key)

    threads = [start(wait, f"k{i}") for i in range(5)]
    wait_until(lambda: queue.waiting() == 5)
    token.cancel()
    assert queue.waiting() == 0
    for thread in threads:
        thread.join(5)
    assert sorted(outcomes) == [f"k{i}" for i in range(5)]
    assert queue.stats()["cancelled"] == 5 and queue.stats()["lanes"] == 0


def test_threads_on_a_manual_clock_are_admitted_at_exact_times():
    """Whatever the threads' interleaving, 20 requests through 10/s leave 0.1 s apart, each
    key's in its own order, and the clock ends at 1.9 s."""
    clock = nl.ManualClock(0.0)
    queue = FairQueue(nl.TokenBucket("10/s", burst=1, clock=clock), limit_key="upstream", timeout=math.inf)
    lock = threading.Lock()
    admitted = []

    def worker(key):
        for i in range(5):
            queue.acquire(key)
            with lock:
                admitted.append((key, i, round(clock.now, 9)))

    threads = [start(worker, f"k{n}") for n in range(4)]
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert sorted(t for _, _, t in admitted) == [round(0.1 * i, 9) for i in range(20)]
    assert clock.now == pytest.approx(1.9)
    for n in range(4):
        assert [i for key, i, _ in admitted if key == f"k{n}"] == list(range(5))


def test_threads_and_an_event_loop_wait_in_one_queue():
    """Waiters of both kinds wake each other: a thread's admission wakes a coroutine (through
    its loop) and the other way round."""
    queue = FairQueue(nl.TokenBucket("20/s", burst=1), limit_key="upstream", timeout=10)
    lock = threading.Lock()
    order = []

    def thread_worker():
        for _ in range(5):
            queue.acquire("thread")
            with lock:
                order.append("thread")

    async def loop_worker():
        async def one():
            await queue.acquire_async("loop")
            with lock:
                order.append("loop")

        await asyncio.gather(*[one() for _ in range(5)])

    thread = start(thread_worker)
    asyncio.run(asyncio.wait_for(loop_worker(), 10))
    thread.join(10)
    assert sorted(order) == ["loop"] * 5 + ["thread"] * 5
    # Served in turn while both wait (a slot is 50 ms: time enough for the thread to queue
    # its next request): the thread is not left for last.
    assert order[:6].count("thread") >= 2, order
