"""The workloads of ``nexus-limits bench``, each run inside a fresh worker interpreter
(``python -m nexus_limits.bench.workloads NAME PLAN``) so that no library's allocations
or caches colour another's figures."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List

from .measure import ALGORITHMS, HUGE, ns_per_call, ns_per_key, rss_bytes
from .peers import Contender, _nexus, contenders


def contender(name: str) -> Contender:
    """A contender by its name; a bare algorithm name (``"LeakyBucket"``) is nexus-limits'."""
    for c in contenders():
        if c.name == name:
            return c
    if name in ALGORITHMS:
        return Contender(name, "nexus-limits", "bucket", _nexus(name))
    raise KeyError(f"no contender named {name!r}")


def hot(c: Contender, calls: int, repeats: int) -> Dict[str, float]:
    allowed = c.make(HUGE, 1.0).check
    denied = c.make(1, 3600.0).check
    denied("hot-key")
    return {
        "allowed_ns": ns_per_call(allowed, "hot-key", calls, repeats),
        "denied_ns": ns_per_call(denied, "hot-key", calls, repeats),
    }


def many(c: Contender, n: int) -> Dict[str, float]:
    keys = [f"client-{i:08d}" for i in range(n)]
    gc.collect()
    before = rss_bytes()
    made = c.make(HUGE, 1.0)
    insert = ns_per_key(made.check, keys)
    existing = ns_per_key(made.check, keys)
    return {"keys": n, "insert_ns": insert, "existing_ns": existing, "bytes_per_key": (rss_bytes() - before) / n}


def threads(c: Contender, workers: int, seconds: float) -> Dict[str, float]:
    check = c.make(HUGE, 1.0).check
    counts = [0] * workers
    denials = [0] * workers
    stop = time.monotonic() + seconds

    def run(i: int) -> None:
        n = d = 0
        while time.monotonic() < stop:
            for _ in range(200):
                if not check("shared-key"):
                    d += 1
            n += 200
        counts[i], denials[i] = n, d

    ts = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    total = sum(counts)
    return {"threads": workers, "checks_per_second": total / seconds, "spurious_denials": sum(denials) / max(1, total)}


def _max_in_window(times: List[float], window: float) -> int:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def accuracy(c: Contender, limit: int, window: float) -> Dict[str, float]:
    """Admitted calls in the busiest sliding window of ``window`` seconds, over the limit:
    a steady stream at twice the rate, and bursts half a window apart."""
    check = c.make(limit, window).check
    admitted: List[float] = []
    end = time.monotonic() + 2 * window
    step = window / (2 * limit)
    while time.monotonic() < end:
        if check("steady"):
            admitted.append(time.monotonic())
        time.sleep(step)
    steady = _max_in_window(admitted, window) / limit
    check = c.make(limit, window).check
    admitted = []
    for _ in range(2):
        for _ in range(2 * limit):
            if check("burst"):
                admitted.append(time.monotonic())
        time.sleep(window / 2)
    return {"steady": steady, "burst": _max_in_window(admitted, window) / limit}


def cleanup(c: Contender, n: int, period: float) -> Dict[str, Any]:
    made = c.make(1, period)
    for i in range(n):
        made.check(i)
    time.sleep(period * 2.5)
    start = time.perf_counter_ns()
    if made.cleanup is not None:
        made.cleanup()
    took = (time.perf_counter_ns() - start) / 1e6
    left = made.tracked() if made.tracked is not None else None
    return {"keys": n, "left": left, "cleanup_ms": took if made.cleanup is not None else None}


def worker(name: str, plan: Dict[str, Any]) -> Dict[str, Any]:
    c = contender(name)
    if "many" in plan:
        return many(c, plan["many"])
    if plan.get("phase") == "timing":
        return {
            "hot": hot(c, plan["calls"], plan["repeats"]),
            "threads": [threads(c, w, plan["thread_seconds"]) for w in (1, 2)],
        }
    return {
        "accuracy": accuracy(c, plan["accuracy_limit"], plan["accuracy_window"]),
        "cleanup": cleanup(c, plan["cleanup_keys"], plan["cleanup_period"]),
    }


def command(name: str, plan: Dict[str, Any]) -> List[str]:
    return [sys.executable, "-m", "nexus_limits.bench.workloads", name, json.dumps(plan)]


def result(name: str, returncode: int, stdout: str, stderr: str) -> Dict[str, Any]:
    if returncode != 0:
        raise RuntimeError(f"{name}: the worker failed:\n{stderr[-2000:]}")
    out: Dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return out


def spawn(name: str, plan: Dict[str, Any]) -> Dict[str, Any]:
    """Runs one contender's workload in a fresh interpreter."""
    proc = subprocess.run(command(name, plan), capture_output=True, text=True)
    return result(name, proc.returncode, proc.stdout, proc.stderr)


def many_keys_in_subprocess(name: str, n: int) -> Dict[str, Any]:
    """ns per check over ``n`` distinct keys and resident bytes per key, in a fresh
    interpreter (``name``: a contender or an algorithm)."""
    return {"limiter": name, **spawn(name, {"many": n})}


if __name__ == "__main__":
    print(json.dumps(worker(sys.argv[1], json.loads(sys.argv[2]))))
