"""Threads on one key: exactly the quota, no spurious denials, no partial composites."""

from __future__ import annotations

import threading

import nexus_limits as nl

THREADS = 8


def hammer(fn, per_thread: int) -> list:
    results: list = [0] * THREADS
    barrier = threading.Barrier(THREADS)

    def work(i: int) -> None:
        barrier.wait()
        results[i] = sum(1 for _ in range(per_thread) if fn())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_threads_admit_exactly_the_quota(clock):
    for lim in (
        nl.TokenBucket("1000/hour", clock=clock),
        nl.SlidingWindow("1000/hour", clock=clock),
        nl.FixedWindow("1000/hour", clock=clock),
        nl.LeakyBucket("1000/hour", clock=clock),
    ):
        admitted = hammer(lambda lim=lim: lim.try_acquire("hot"), 500)
        assert sum(admitted) == 1000, type(lim).__name__


def test_no_spurious_denials_under_threads(clock):
    tb = nl.TokenBucket("8000/hour", clock=clock)
    admitted = hammer(lambda: tb.try_acquire("hot"), 1000)
    assert admitted == [1000] * THREADS


def test_composite_is_atomic_under_threads(clock):
    a = nl.TokenBucket("300/hour", clock=clock)
    b = nl.FixedWindow("500/hour", clock=clock)
    both = nl.Composite([a, b])
    other = nl.Composite([b, a])  # the same parts in the other order: no deadlock
    admitted = hammer(lambda: both.try_acquire("k") or other.try_acquire("k"), 200)
    assert sum(admitted) == 300
    assert a.get_limit("k") == (False, 0)
    assert b.get_limit("k") == (True, 200), "denied composite calls charged no part"


def test_concurrency_never_exceeds_its_limit():
    c = nl.Concurrency(3)
    held = []
    peak = [0]
    lock = threading.Lock()

    def once() -> bool:
        lease = c.try_acquire("k")
        if lease is None:
            return False
        with lock:
            held.append(lease)
            peak[0] = max(peak[0], len(held))
        with lock:
            held.remove(lease)
        lease.release()
        return True

    admitted = hammer(once, 300)
    assert peak[0] <= 3
    assert sum(admitted) > 0
    assert len(c) == 0
