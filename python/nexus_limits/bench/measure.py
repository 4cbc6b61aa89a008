"""The measuring instruments of ``nexus-limits bench`` and the pytest-benchmark suites,
and the reference every figure is put next to: :class:`ReferenceGCRA`, twelve lines of
pure Python over a dict, with no lock and no expiry — the floor of any limiter written
in Python."""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import nexus_limits as nl


class ReferenceGCRA:
    """A 12-line pure-Python GCRA over a dict: no lock, no expiry."""

    def __init__(self, count: int, period: float, burst: Optional[int] = None) -> None:
        self.t = period / count
        self.tau = self.t * (burst or count)
        self.tat: Dict[Any, float] = {}

    def try_acquire(self, key: Any, cost: int = 1) -> bool:
        now = time.monotonic()
        tat = max(self.tat.get(key, now), now)
        new = tat + cost * self.t
        if new - now > self.tau:
            return False
        self.tat[key] = new
        return True


ALGORITHMS: Dict[str, Callable[[str], Any]] = {
    "TokenBucket": lambda rate: nl.TokenBucket(rate),
    "SlidingWindow": lambda rate: nl.SlidingWindow(rate),
    "FixedWindow": lambda rate: nl.FixedWindow(rate),
    "LeakyBucket": lambda rate: nl.LeakyBucket(rate),
}

REFERENCE = "reference (pure-Python GCRA)"

# So high that a hot key is always admitted during a benchmark.
ALWAYS = "1000000000/s"
HUGE = 10**9


def ns_per_call(fn: Callable[[Any], Any], arg: Any, calls: int, repeats: int) -> float:
    """Median over `repeats` of the mean time of `calls` calls of fn(arg), loop included,
    after a warm-up of up to 2,000 calls."""
    for _ in range(min(calls, 2_000)):
        fn(arg)
    loop = range(calls)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in loop:
            fn(arg)
        samples.append((time.perf_counter_ns() - start) / calls)
    return statistics.median(samples)


def ns_per_key(fn: Callable[[Any], Any], keys: List[Any]) -> float:
    start = time.perf_counter_ns()
    for k in keys:
        fn(k)
    return (time.perf_counter_ns() - start) / len(keys)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sweep(n: int) -> Dict[str, Any]:
    """Sweep `n` idle keys while another thread checks a live key; report both."""
    clock = nl.ManualClock()
    tb = nl.TokenBucket(ALWAYS, ttl=60, clock=clock)
    checker_limiter = nl.TokenBucket(ALWAYS)
    for i in range(n):
        tb.try_acquire(i)
    clock.advance(61)
    latencies: List[int] = []
    running = threading.Event()
    stop = threading.Event()

    def check() -> None:
        running.set()
        while not stop.is_set():
            t0 = time.perf_counter_ns()
            checker_limiter.try_acquire("live")
            tb.try_acquire("live")
            latencies.append(time.perf_counter_ns() - t0)

    t = threading.Thread(target=check)
    t.start()
    running.wait()
    start = time.perf_counter_ns()
    evicted = tb.sweep()
    total = time.perf_counter_ns() - start
    stop.set()
    t.join()
    latencies.sort()
    return {
        "keys": n,
        "evicted": evicted,
        "sweep_ms": total / 1e6,
        "checks_during": len(latencies),
        "check_max_us": latencies[-1] / 1e3 if latencies else None,
        "check_p999_us": latencies[int(len(latencies) * 0.999)] / 1e3 if latencies else None,
    }


def machine() -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover - not Linux
        pass
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "nexus_limits": nl.__version__,
    }
