"""Measurements behind ``nexus-limits bench`` and the pytest-benchmark suites.

The reference every figure is put next to is :class:`ReferenceGCRA`: twelve lines of
pure Python over a dict, with no lock and no expiry — the floor of any limiter
written in Python.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

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


def hot_key(calls: int = 200_000, repeats: int = 7) -> List[Dict[str, Any]]:
    """try_acquire and hit on one always-admitted key, next to the reference."""
    ref = ReferenceGCRA(10**9, 1.0)
    rows = [
        {
            "limiter": REFERENCE,
            "try_acquire_ns": ns_per_call(ref.try_acquire, "hot-key", calls, repeats),
            "hit_ns": None,
        }
    ]
    for name, make in ALGORITHMS.items():
        lim = make(ALWAYS)
        rows.append(
            {
                "limiter": name,
                "try_acquire_ns": ns_per_call(lim.try_acquire, "hot-key", calls, repeats),
                "hit_ns": ns_per_call(lim.hit, "hot-key", calls, repeats),
            }
        )
    return rows


def one_limiter_many_keys(name: str, n: int) -> Dict[str, Any]:
    """ns per check over `n` distinct keys (first touch inserts, second finds) and the
    resident bytes per key, for one limiter in this process."""
    keys = [f"client-{i:08d}" for i in range(n)]
    gc.collect()
    before = rss_bytes()
    lim: Any = ReferenceGCRA(10**9, 1.0) if name == REFERENCE else ALGORITHMS[name](ALWAYS)
    insert = ns_per_key(lim.try_acquire, keys)
    existing = ns_per_key(lim.try_acquire, keys)
    per_key = (rss_bytes() - before) / n
    return {"limiter": name, "keys": n, "insert_ns": insert, "existing_ns": existing, "bytes_per_key": per_key}


def many_keys(n: int) -> List[Dict[str, Any]]:
    """`one_limiter_many_keys` for the reference and every algorithm, each in a fresh
    interpreter so that memory freed by one cannot hide the next one's."""
    return [many_keys_in_subprocess(name, n) for name in [REFERENCE, *ALGORITHMS]]


def many_keys_in_subprocess(name: str, n: int) -> Dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "nexus_limits._bench", name, str(n)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: Dict[str, Any] = json.loads(out.stdout)
    return result


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


if __name__ == "__main__":
    print(json.dumps(one_limiter_many_keys(sys.argv[1], int(sys.argv[2]))))


def redis_round_trips(url: str, calls: int = 2_000, repeats: int = 15) -> Dict[str, Any]:
    """µs per call on one client: a bare INCR next to each Redis limiter's try_acquire.

    The targets take turns, batch by batch, so that drift in the machine's speed (a
    loopback round trip varies a lot on a shared VM) falls on all of them alike; each
    figure is the median of its batches."""
    import redis

    from . import redis as nlr

    client = redis.Redis.from_url(url)
    client.ping()
    targets: List[Any] = [("INCR (bare round trip)", lambda k: client.incr(k), "nl-bench-incr")]
    for name in ALGORITHMS:
        lim = getattr(nlr, name)(client, ALWAYS, prefix="nl-bench")
        targets.append((f"{name}.try_acquire", lim.try_acquire, "hot-key"))
    samples: Dict[str, List[float]] = {name: [] for name, _, _ in targets}
    for _ in range(repeats):
        for name, fn, arg in targets:
            samples[name].append(ns_per_call(fn, arg, calls, 1) / 1e3)
    base = statistics.median(samples[targets[0][0]])
    rows = [
        {"call": name, "us": statistics.median(samples[name]), "vs_incr": statistics.median(samples[name]) / base}
        for name, _, _ in targets
    ]
    client.delete("nl-bench-incr")
    client.close()
    return {"url": url, "rows": rows}


def store_comparison(
    redis_url: Optional[str] = None, calls: int = 20_000, repeats: int = 15, keys: int = 100_000
) -> Dict[str, Any]:
    """ns per try_acquire of a TokenBucket kept in-process, in a SharedMemoryStore and
    (with ``redis_url``) on Redis: one hot key, and ``keys`` distinct keys. Turns are
    interleaved, each figure the median of its batches."""
    import uuid

    import nexus_limits as nl

    name = f"bench-{uuid.uuid4().hex[:8]}"
    store = nl.SharedMemoryStore(name, capacity=4 * keys)
    try:
        targets: List[Tuple[str, Any]] = [
            ("in-process", nl.TokenBucket(ALWAYS)),
            ("shared memory", nl.TokenBucket(ALWAYS, store=store)),
        ]
        client = None
        if redis_url is not None:
            import redis

            from . import redis as nlr

            client = redis.Redis.from_url(redis_url)
            targets.append(("Redis", nlr.TokenBucket(client, ALWAYS, prefix="nl-bench")))
        hot: Dict[str, List[float]] = {t: [] for t, _ in targets}
        for _ in range(repeats):
            for t, lim in targets:
                n = calls if t != "Redis" else max(calls // 100, 50)
                hot[t].append(ns_per_call(lim.try_acquire, "hot-key", n, 1))
        spread: Dict[str, float] = {}
        names = [f"client-{i:08d}" for i in range(keys)]
        for t, lim in targets:
            if t == "Redis":
                continue
            f = lim.try_acquire
            started = time.perf_counter()
            for k in names:
                f(k)
            spread[t] = (time.perf_counter() - started) / keys * 1e9
        rows = []
        base = statistics.median(hot["in-process"])
        for t, _ in targets:
            ns = statistics.median(hot[t])
            rows.append({"store": t, "hot_ns": ns, "vs_in_process": ns / base, "distinct_ns": spread.get(t)})
        shm = statistics.median(hot["shared memory"])
        out: Dict[str, Any] = {"rows": rows, "shm_vs_in_process": shm / base}
        if client is not None:
            out["redis_vs_shm"] = statistics.median(hot["Redis"]) / shm
            client.close()
        return out
    finally:
        store.unlink()


def _redis_worker(url: str, seconds: float, queue: Any) -> None:
    import redis

    from . import redis as nlr

    client = redis.Redis.from_url(url)
    lim = nlr.TokenBucket(client, ALWAYS, prefix="nl-bench")
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(100):
            lim.try_acquire("shared-key")
        n += 100
    queue.put(n)


def redis_throughput(url: str, processes: int, seconds: float = 3.0) -> Dict[str, Any]:
    """Checks per second on one shared key from `processes` OS processes."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_redis_worker, args=(url, seconds, queue)) for _ in range(processes)]
    for p in procs:
        p.start()
    total = sum(queue.get(timeout=seconds + 60) for _ in procs)
    for p in procs:
        p.join(10)
    return {"processes": processes, "checks_per_second": total / seconds}
