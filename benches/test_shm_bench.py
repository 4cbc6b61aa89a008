"""The shared-memory store next to the in-process store and to Redis.

Goals (issue #8): a check on the shared-memory store costs at most 1.5x one on the
in-process store, and is at least 50x faster than one on Redis.

Run: python -m pytest benches/test_shmmeasure.py --benchmark-only -s
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.servers import RedisServer

import nexus_limits as nl
from nexus_limits.bench import measure, stores


@pytest.fixture(scope="module")
def store():
    s = nl.SharedMemoryStore(f"bench-{uuid.uuid4().hex[:8]}", capacity=1 << 20)
    yield s
    s.unlink()


@pytest.mark.parametrize("name", list(measure.ALGORITHMS))
def test_shm_try_acquire_hot_key(benchmark, store, name):
    lim = getattr(nl, name)(measure.ALWAYS, store=store)
    benchmark(lim.try_acquire, "hot-key")


@pytest.mark.parametrize("name", list(measure.ALGORITHMS))
def test_in_process_try_acquire_hot_key(benchmark, name):
    lim = getattr(nl, name)(measure.ALWAYS)
    benchmark(lim.try_acquire, "hot-key")


def test_stores_interleaved(benchmark):
    """In-process, shared memory and Redis taking turns; ratios in extra_info."""
    server = RedisServer().start()
    out = {}
    try:
        benchmark.pedantic(lambda: out.update(stores.store_comparison(server.url)), rounds=1)
    finally:
        server.close()
    for row in out["rows"]:
        distinct = f", {row['distinct_ns']:.0f} ns over 100k keys" if row["distinct_ns"] else ""
        line = f"{row['store']}: {row['hot_ns']:.0f} ns hot key ({row['vs_in_process']:.2f}x in-process){distinct}"
        benchmark.extra_info[row["store"]] = line
        print("\n" + line, end="")
    print(f"\nshared memory / in-process: {out['shm_vs_in_process']:.2f}x (goal <= 1.5x)", end="")
    print(f"\nRedis / shared memory: {out['redis_vs_shm']:.0f}x (goal >= 50x)")
    benchmark.extra_info["shm_vs_in_process"] = out["shm_vs_in_process"]
    benchmark.extra_info["redis_vs_shm"] = out["redis_vs_shm"]
