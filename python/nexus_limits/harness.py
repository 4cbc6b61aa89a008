"""``nexus-limits bench``: nexus-limits next to the limiters Python users pick today,
the same workloads in one run, ratios in front.

Every contender runs in fresh interpreters (one for its speed, thread and accuracy
workloads, one per key count for memory), so no library's allocations or caches
colour another's figures. Peers that are not installed are skipped with a line saying
so (``pip install nexus-limits[bench]`` brings them).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

from . import _bench
from ._peers import OURS, Contender, available, contenders

HUGE = 10**9


def _contender(name: str) -> Contender:
    return next(c for c in contenders() if c.name == name)


# --- workloads (run inside a worker interpreter) ----------------------------------------


def hot(c: Contender, calls: int, repeats: int) -> Dict[str, float]:
    allowed = c.make(HUGE, 1.0).check
    denied = c.make(1, 3600.0).check
    denied("hot-key")
    return {
        "allowed_ns": _bench.ns_per_call(allowed, "hot-key", calls, repeats),
        "denied_ns": _bench.ns_per_call(denied, "hot-key", calls, repeats),
    }


def many(c: Contender, n: int) -> Dict[str, float]:
    keys = [f"client-{i:08d}" for i in range(n)]
    gc.collect()
    before = _bench.rss_bytes()
    made = c.make(HUGE, 1.0)
    insert = _bench.ns_per_key(made.check, keys)
    existing = _bench.ns_per_key(made.check, keys)
    return {"keys": n, "insert_ns": insert, "existing_ns": existing, "bytes_per_key": (_bench.rss_bytes() - before) / n}


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
    c = _contender(name)
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


def _command(name: str, plan: Dict[str, Any]) -> List[str]:
    return [sys.executable, "-m", "nexus_limits.harness", name, json.dumps(plan)]


def _result(name: str, returncode: int, stdout: str, stderr: str) -> Dict[str, Any]:
    if returncode != 0:
        raise RuntimeError(f"{name}: the worker failed:\n{stderr[-2000:]}")
    result: Dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


def _spawn(name: str, plan: Dict[str, Any]) -> Dict[str, Any]:
    proc = subprocess.run(_command(name, plan), capture_output=True, text=True)
    return _result(name, proc.returncode, proc.stdout, proc.stderr)


def _spawn_all(names: Sequence[str], plan: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Runs the (sleep-bound, timing-insensitive) workers of every contender at once."""
    procs = {
        n: subprocess.Popen(_command(n, plan), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in names
    }
    out = {}
    for n, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        out[n] = _result(n, p.returncode, stdout, stderr)
    return out


# --- the run ---------------------------------------------------------------------------


def _progress(done: int, total: int, label: str) -> None:
    if not sys.stderr.isatty() and os.environ.get("CI"):
        return
    width = 24
    filled = int(width * done / total)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label[:50]:<50}")
    sys.stderr.flush()
    if done == total:
        sys.stderr.write("\r" + " " * (width + 60) + "\r")


def run(
    quick: bool = False, key_counts: Optional[Sequence[int]] = None, redis_url: Optional[str] = None
) -> Dict[str, Any]:
    plan = {
        "calls": 20_000 if quick else 200_000,
        "repeats": 3 if quick else 7,
        "thread_seconds": 0.3 if quick else 2.0,
        "accuracy_limit": 20,
        "accuracy_window": 1.0,
        "cleanup_keys": 5_000 if quick else 100_000,
        "cleanup_period": 1.0,
    }
    counts = list(key_counts or ([1_000, 10_000] if quick else [1_000, 10_000, 100_000, 1_000_000]))
    present = [c for c in contenders() if available(c)]
    skipped = [c.name for c in contenders() if not available(c)]
    total = len(present) * (1 + len(counts)) + 1
    done = 0
    results: Dict[str, Any] = {}
    _progress(done, total, "accuracy and idle-key cleanup, every library at once")
    for name, r in _spawn_all([c.name for c in present], {**plan, "phase": "accuracy"}).items():
        results[name] = r
    done += 1
    for c in present:
        _progress(done, total, f"{c.name}: hot key and threads")
        results[c.name].update(_spawn(c.name, {**plan, "phase": "timing"}))
        done += 1
        results[c.name]["many"] = []
        for n in counts:
            _progress(done, total, f"{c.name}: {n:,} keys")
            results[c.name]["many"].append(_spawn(c.name, {"many": n}))
            done += 1
    _progress(total, total, "")
    out: Dict[str, Any] = {
        "machine": _bench.machine(),
        "plan": plan,
        "key_counts": counts,
        "skipped": skipped,
        "contenders": {c.name: {"library": c.library, "family": c.family, **results[c.name]} for c in present},
    }
    if redis_url:
        out["redis"] = redis_peers(redis_url, 500 if quick else 3000)
    return out


def _hit(limiter: Any, item: Any) -> Any:
    return lambda key: limiter.hit(item, key)


def redis_peers(url: str, calls: int) -> List[Dict[str, Any]]:
    """µs per check on one hot key, each library's own Redis backend, same server."""
    import redis

    from . import redis as nlr

    rows: List[Dict[str, Any]] = []
    client = redis.Redis.from_url(url)
    ours = nlr.TokenBucket(client, "1000000000/second", prefix="nl-peers")
    rows.append(
        {"name": "nexus-limits TokenBucket (Redis)", "us": _bench.ns_per_call(ours.try_acquire, "hot", calls, 3) / 1e3}
    )
    ours_sw = nlr.SlidingWindow(client, "1000000000/second", prefix="nl-peers")
    rows.append(
        {
            "name": "nexus-limits SlidingWindow (Redis)",
            "us": _bench.ns_per_call(ours_sw.try_acquire, "hot", calls, 3) / 1e3,
        }
    )
    try:
        from limits import parse, storage, strategies

        store = storage.RedisStorage(url)
        item = parse("1000000000/second")
        for strategy in ("MovingWindowRateLimiter", "FixedWindowRateLimiter", "SlidingWindowCounterRateLimiter"):
            lim = getattr(strategies, strategy)(store)
            rows.append(
                {
                    "name": f"limits {strategy.replace('RateLimiter', '')} (Redis)",
                    "us": _bench.ns_per_call(_hit(lim, item), f"hot-{strategy}", calls, 3) / 1e3,
                }
            )
    except ImportError:
        pass
    try:
        import throttled

        store_t = throttled.RedisStore(server=url)
        th = throttled.Throttled(using="token_bucket", quota=throttled.rate_limiter.per_sec(HUGE), store=store_t)
        rows.append(
            {
                "name": "throttled-py TokenBucket (Redis)",
                "us": _bench.ns_per_call(lambda k: th.limit(k), "hot-throttled", calls, 3) / 1e3,
            }
        )
    except ImportError:
        pass
    client.close()
    base = rows[0]["us"]
    for row in rows:
        row["vs_nexus"] = row["us"] / base
    return rows


# --- output ----------------------------------------------------------------------------


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def tables(data: Dict[str, Any]) -> List[str]:
    """The result as text tables (also used for docs/benchmarks.md)."""
    from .cli import _table

    cs = data["contenders"]
    out: List[str] = []

    def ratio(name: str, value: float, pick: Any) -> str:
        ours = cs.get(OURS[cs[name]["family"]])
        if ours is None or not value:
            return "-"
        return f"{value / pick(ours):.1f}x"

    rows = []
    for name, r in cs.items():
        rows.append(
            [
                name,
                f"{r['hot']['allowed_ns']:.0f}",
                f"{r['hot']['denied_ns']:.0f}",
                ratio(name, r["hot"]["allowed_ns"], lambda o: o["hot"]["allowed_ns"]),
            ]
        )
    out.append("Hot key: ns per check (median of repeats, loop included); ratio = time / nexus-limits' same family\n")
    out.append(_table(["limiter", "allowed ns", "denied ns", "vs nexus-limits"], rows))
    largest = data["key_counts"][-1]
    rows = []
    for name, r in cs.items():
        cells = [name]
        for m in r["many"]:
            cells.append(f"{m['insert_ns']:.0f}")
        last = r["many"][-1]
        cells += [
            _fmt(last["bytes_per_key"], ".0f"),
            ratio(name, last["insert_ns"], lambda o: o["many"][-1]["insert_ns"]),
        ]
        rows.append(cells)
    head = ["limiter", *(f"{n:,} keys ns" for n in data["key_counts"]), f"bytes/key @{largest:,}", "vs nexus-limits"]
    out.append("\nMany keys: ns per check on first touch, and resident bytes per key\n")
    out.append(_table(head, rows))
    rows = []
    for name, r in cs.items():
        t1, t2 = r["threads"]
        rows.append(
            [
                name,
                f"{t1['checks_per_second']:,.0f}",
                f"{t2['checks_per_second']:,.0f}",
                f"{t2['spurious_denials']:.2%}",
                f"{r['accuracy']['steady']:.2f}",
                f"{r['accuracy']['burst']:.2f}",
                _fmt(r["cleanup"]["left"], ","),
                _fmt(r["cleanup"]["cleanup_ms"], ".1f"),
            ]
        )
    out.append(
        "\nThreads: checks/s on one key from 1 and 2 threads, spurious denials under 2 threads."
        "\nAccuracy: admitted in the busiest window / limit (a steady stream at 2x the rate; bursts)."
        "\nIdle keys left 2.5 periods after their last use (and the ms of the cleanup call, if any).\n"
    )
    out.append(
        _table(
            ["limiter", "1 thread/s", "2 threads/s", "spurious", "steady", "burst", "idle keys left", "cleanup ms"],
            rows,
        )
    )
    if data.get("skipped"):
        out.append("\nskipped (not installed): " + ", ".join(data["skipped"]))
    if data.get("redis"):
        rows = [[r["name"], f"{r['us']:.1f}", f"{r['vs_nexus']:.2f}x"] for r in data["redis"]]
        out.append("\nRedis: us per check on one key, each library's own Redis backend, one server\n")
        out.append(_table(["limiter", "us", "vs nexus-limits"], rows))
    return out


def plot(data: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5))
    for name, r in data["contenders"].items():
        ns = [m["keys"] for m in r["many"]]
        style = "-o" if name.startswith("nexus") else "--."
        a.plot(ns, [m["insert_ns"] for m in r["many"]], style, label=name)
        b.plot(ns, [max(m["bytes_per_key"], 1) for m in r["many"]], style, label=name)
    for ax, title in ((a, "ns per check (first touch)"), (b, "resident bytes per key")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("distinct keys")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=7)
    fig.suptitle(f"nexus-limits bench — {data['machine']['cpu']}, Python {data['machine']['python']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(data: Dict[str, Any], plot_path: Optional[str]) -> str:
    m = data["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Regenerated by `nexus-limits bench --markdown docs/benchmarks.md --plot docs/benchmarks.png`.",
        f"Machine: {m['cpu']} ({m['cpus']} cpus), {m['implementation']} {m['python']}, {m['platform']};"
        f" nexus-limits {m['nexus_limits']}.",
        "",
        "```",
        *tables(data),
        "```",
    ]
    if plot_path:
        lines += ["", f"![latency and memory against the number of keys]({os.path.basename(plot_path)})"]
    lines += ["", *NOTES]
    return "\n".join(lines) + "\n"


NOTES = [
    "Reading the figures:",
    "",
    "- Each contender runs in fresh interpreters; a low resident size can also mean a library dropped",
    "  keys during the run: limits' fixed-window memory storage expires them on a timer, and",
    "  throttled-py's memory store keeps at most 1,024 keys (an LRU that forgets live limits).",
    "- Accuracy is what each algorithm lets through in the busiest 1-second window, over its limit: a",
    "  token bucket starts full (burst + refill can reach 2x), a fixed window can admit 2x across a",
    "  boundary, a sliding-window counter up to about 2x in the worst case; moving windows and logs stay",
    "  at 1x.",
    "- Spurious denials: calls refused although the limit was never reached (pyrate-limiter, when a",
    "  non-blocking acquire meets lock contention).",
    "- This VM is noisy and slow at memory access (a plain dict lookup among a million keys costs",
    "  ~420 ns here): compare columns of one run, not runs with each other.",
]


if __name__ == "__main__":
    print(json.dumps(worker(sys.argv[1], json.loads(sys.argv[2]))))
