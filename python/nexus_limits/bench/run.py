"""``nexus-limits bench``: nexus-limits next to the limiters Python users pick today,
the same workloads in one run, ratios in front.

Every contender runs in fresh interpreters (one for its speed, thread and accuracy
workloads, one per key count for memory). Peers that are not installed are skipped with
a line saying so (``pip install nexus-limits[bench]`` brings them).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Dict, Optional, Sequence

from .measure import machine
from .peers import available, contenders
from .stores import redis_peers
from .workloads import command, result, spawn


def spawn_all(names: Sequence[str], plan: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Runs the (sleep-bound, timing-insensitive) workers of every contender at once."""
    procs = {
        n: subprocess.Popen(command(n, plan), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in names
    }
    out = {}
    for n, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        out[n] = result(n, p.returncode, stdout, stderr)
    return out


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
    for name, r in spawn_all([c.name for c in present], {**plan, "phase": "accuracy"}).items():
        results[name] = r
    done += 1
    for c in present:
        _progress(done, total, f"{c.name}: hot key and threads")
        results[c.name].update(spawn(c.name, {**plan, "phase": "timing"}))
        done += 1
        results[c.name]["many"] = []
        for n in counts:
            _progress(done, total, f"{c.name}: {n:,} keys")
            results[c.name]["many"].append(spawn(c.name, {"many": n}))
            done += 1
    _progress(total, total, "")
    out: Dict[str, Any] = {
        "machine": machine(),
        "plan": plan,
        "key_counts": counts,
        "skipped": skipped,
        "contenders": {c.name: {"library": c.library, "family": c.family, **results[c.name]} for c in present},
    }
    if redis_url:
        out["redis"] = redis_peers(redis_url, 500 if quick else 3000)
    return out
