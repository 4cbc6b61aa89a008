"""The hot path of two builds of the native core, side by side in one process.

    python benches/ab_core.py OLD.so [NEW.so] [--rounds 15]

Loads both extension modules (NEW defaults to the one the package imports) under
their own names, then times the same calls on each, interleaved round by round, so
that the machine's drift lands on both alike: hot ``try_acquire`` on one key
(TokenBucket, FixedWindow, SlidingWindow), ``try_acquire`` over 1,000,000 distinct
keys, and ``sweep`` of 1,000,000 idle keys. Prints the median ns per operation of
each and the ratio NEW/OLD. Keep a build to compare against before changing the core:

    cp python/nexus_limits/_core*.so /tmp/old_core.so
"""

from __future__ import annotations

import argparse
import gc
import importlib.machinery
import importlib.util
import statistics
import sys
import time
from typing import Any, Callable, Dict, List


def load(path: str, name: str) -> Any:
    # The init symbol is PyInit__core whatever the file is called, so the module must
    # be loaded under a name ending in "_core"; a distinct package prefix keeps the two
    # builds apart in sys.modules.
    loader = importlib.machinery.ExtensionFileLoader(f"{name}._core", path)
    spec = importlib.util.spec_from_file_location(f"{name}._core", path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def hot(core: Any, cls: str) -> Callable[[], float]:
    limiter = getattr(core, cls)("1000000000/s")
    call = limiter.try_acquire
    n = 200_000

    def run() -> float:
        start = time.perf_counter_ns()
        for _ in range(n):
            call("k")
        return (time.perf_counter_ns() - start) / n

    return run


def many_keys(core: Any) -> Callable[[], float]:
    n = 1_000_000
    keys = list(range(n))

    def run() -> float:
        limiter = core.TokenBucket("10/s")
        call = limiter.try_acquire
        start = time.perf_counter_ns()
        for k in keys:
            call(k)
        return (time.perf_counter_ns() - start) / n

    return run


def sweep(core: Any) -> Callable[[], float]:
    n = 1_000_000

    def run() -> float:
        clock = core.ManualClock(0.0)
        limiter = core.TokenBucket("10/s", clock=clock)
        for k in range(n):
            limiter.try_acquire(k)
        clock.advance(7200.0)
        start = time.perf_counter_ns()
        limiter.sweep()
        return (time.perf_counter_ns() - start) / n

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new", nargs="?")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if args.new is None:
        import nexus_limits._core as current

        args.new = current.__file__
    builds = {"old": load(args.old, "old_build"), "new": load(args.new, "new_build")}
    cases: Dict[str, Dict[str, Callable[[], float]]] = {}
    for label, core in builds.items():
        for cls in ("TokenBucket", "FixedWindow", "SlidingWindow"):
            cases.setdefault(f"hot try_acquire {cls}", {})[label] = hot(core, cls)
        cases.setdefault("try_acquire, 1M new keys", {})[label] = many_keys(core)
        cases.setdefault("sweep, per idle key (1M)", {})[label] = sweep(core)
    results: Dict[str, Dict[str, List[float]]] = {c: {"old": [], "new": []} for c in cases}
    for r in range(args.rounds):
        for case, runs in cases.items():
            order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
            for label in order:
                gc.collect()
                results[case][label].append(runs[label]())
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    print(f"{'case':32} {'old ns':>9} {'new ns':>9} {'new/old':>8}")
    for case, by in results.items():
        old, new = statistics.median(by["old"]), statistics.median(by["new"])
        print(f"{case:32} {old:9.1f} {new:9.1f} {new / old:8.3f}")


if __name__ == "__main__":
    main()
