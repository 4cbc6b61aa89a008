"""The Redis backend next to a bare INCR on the same client, and checks per second
from 1 and 4 processes. Starts its own redis-server on a free loopback port.

Run: python -m pytest benches/test_redismeasure.py --benchmark-only -s
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import redis
from servers import RedisServer

import nexus_limits.redis as nlr
from nexus_limits.bench import measure, stores


@pytest.fixture(scope="module")
def server():
    s = RedisServer().start()
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    c = redis.Redis(port=server.port)
    yield c
    c.close()


def test_incr_round_trip(benchmark, client):
    benchmark(client.incr, "bench-incr")


@pytest.mark.parametrize("name", list(measure.ALGORITHMS))
def test_redis_try_acquire(benchmark, client, name):
    lim = getattr(nlr, name)(client, measure.ALWAYS, prefix="bench")
    benchmark(lim.try_acquire, "hot-key")


def test_redis_composite(benchmark, client):
    both = nlr.Composite([nlr.TokenBucket(client, measure.ALWAYS), nlr.FixedWindow(client, measure.ALWAYS)])
    benchmark(both.try_acquire, "hot-key")


def test_redis_vs_incr_interleaved(benchmark, server):
    """INCR and every limiter taking turns; ratios in extra_info."""
    out = {}
    benchmark.pedantic(lambda: out.update(stores.redis_round_trips(f"redis://127.0.0.1:{server.port}/0")), rounds=1)
    for row in out["rows"]:
        benchmark.extra_info[row["call"]] = f"{row['us']:.1f} us ({row['vs_incr']:.2f}x INCR)"
        print(f"\n{row['call']}: {row['us']:.1f} us, {row['vs_incr']:.2f}x INCR", end="")


@pytest.mark.parametrize("processes", [1, 4])
def test_redis_checks_per_second(benchmark, server, processes):
    out = {}
    url = f"redis://127.0.0.1:{server.port}/0"
    benchmark.pedantic(lambda: out.update(stores.redis_throughput(url, processes, 3.0)), rounds=1)
    benchmark.extra_info["checks_per_second"] = out["checks_per_second"]
    print(f"\n{processes} process(es): {out['checks_per_second']:,.0f} checks/s")
