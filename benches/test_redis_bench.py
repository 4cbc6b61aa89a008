"""The Redis backend next to a bare INCR and a minimal Lua script on the same client,
and checks per second from 1 and 4 processes. Starts its own redis-server on a free
loopback port.

Run: python -m pytest benches/test_redis_bench.py --benchmark-only -s
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis
from support.servers import RedisServer

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
        text = f"{row['us']:.1f} us ({row['vs_script']:.2f}x the minimal script, {row['vs_incr']:.2f}x INCR)"
        benchmark.extra_info[row["call"]] = text
        print(f"\n{row['call']}: {text}", end="")


def test_single_check_vs_minimal_script(benchmark, server):
    """TokenBucket.try_acquire next to the minimal script (TIME, GET, SET PX) sent two
    ways: as a user would (``client.evalsha``) and through the limiters' own channel
    (the same connections and prepacked bytes as a check), so that what is left is the
    server's work in the script and the Decision. Interleaved, medians of batches."""
    import random
    import statistics
    import time

    client = redis.Redis(port=server.port)
    sha = client.script_load(
        '#!lua\nlocal t = redis.call("TIME")\nlocal v = redis.call("GET", KEYS[1])\n'
        'redis.call("SET", KEYS[1], t[1], "PX", 60000)\nreturn 1'
    )
    tb = nlr.TokenBucket(client, measure.ALWAYS, prefix="bench-single")
    channel = tb._channel
    targets = [
        ("INCR", lambda: client.incr("bench-incr")),
        ("minimal script, client.evalsha", lambda: client.evalsha(sha, 1, "bench-min")),
        ("minimal script, limiters' channel", lambda: channel.evalsha(sha, ["bench-min"], [])),
        ("TokenBucket.try_acquire", lambda: tb.try_acquire("hot-key")),
    ]
    samples = {name: [] for name, _ in targets}

    def run() -> None:
        for _ in range(40):
            random.shuffle(targets)
            for name, fn in targets:
                start = time.perf_counter_ns()
                for _ in range(500):
                    fn()
                samples[name].append((time.perf_counter_ns() - start) / 500 / 1e3)

    benchmark.pedantic(run, rounds=1)
    us = {name: statistics.median(v) for name, v in samples.items()}
    check = us["TokenBucket.try_acquire"]
    for name, value in us.items():
        print(f"\n{name}: {value:.1f} us", end="")
        benchmark.extra_info[name] = round(value, 2)
    ratios = {
        "vs minimal script (client.evalsha)": check / us["minimal script, client.evalsha"],
        "vs minimal script (same channel)": check / us["minimal script, limiters' channel"],
        "vs INCR": check / us["INCR"],
    }
    for name, value in ratios.items():
        print(f"\ntry_acquire {name}: {value:.2f}x", end="")
        benchmark.extra_info[f"try_acquire {name}"] = round(value, 3)
    client.close()


@pytest.mark.parametrize("processes", [1, 4])
def test_redis_checks_per_second(benchmark, server, processes):
    out = {}
    url = f"redis://127.0.0.1:{server.port}/0"
    benchmark.pedantic(lambda: out.update(stores.redis_throughput(url, processes, 3.0)), rounds=1)
    benchmark.extra_info["checks_per_second"] = out["checks_per_second"]
    print(f"\n{processes} process(es): {out['checks_per_second']:,.0f} checks/s")


def test_lease_hot_key_four_processes(benchmark, server):
    """Quota leasing: 4 processes on one hot key, with and without leasing (the full
    run, with 20 runs checking the quota, is ``python benches/bench_redis_lease.py``)."""
    import bench_redis_lease as lease_bench

    out = {}
    benchmark.pedantic(lambda: out.update(lease_bench.throughput(server.port, 4, 2.0)), rounds=1)
    for name in ("single", "lease"):
        row = out[name]
        benchmark.extra_info[f"{name} checks/s"] = round(row["checks_per_second"])
        benchmark.extra_info[f"{name} round trips per 1000"] = round(row["round_trips_per_1000"], 2)
        trips = row["round_trips_per_1000"]
        print(f"\n{name}: {row['checks_per_second']:,.0f} checks/s, {trips:.2f} round trips per 1,000", end="")
    benchmark.extra_info["ratio"] = round(out["ratio"], 1)
    print(f"\nleasing: {out['ratio']:.1f}x", end="")
    rows = lease_bench.admitted_runs(server.port, 4, 0.5, 2, 5000)
    assert all(r["admitted"] <= r["quota"] for r in rows), rows


def _outage_figures(make_client, outage: str, is_async: bool) -> dict:
    """Seconds of the first check that meets the outage, and the median and slowest of
    200 checks while the breaker is open (a server of its own, stopped or hung)."""
    import asyncio
    import statistics
    import threading
    import time

    import nexus_limits.redis.asyncio as nla

    srv = RedisServer().start()
    sleeper = None
    try:

        def hang() -> None:
            c = redis.Redis(port=srv.port, socket_timeout=30)
            try:
                c.execute_command("DEBUG", "SLEEP", 7)
            except redis.RedisError:
                pass
            c.close()

        def start_outage() -> None:
            nonlocal sleeper
            if outage == "stopped":
                srv.stop()
            else:
                sleeper = threading.Thread(target=hang)
                sleeper.start()
                time.sleep(0.2)

        async def run_async() -> dict:
            client = make_client(srv.port)
            lim = nla.TokenBucket(client, "100/s", on_error="allow")
            await lim.hit("k")
            await asyncio.to_thread(start_outage)
            t = time.perf_counter()
            await lim.hit("k")
            first = time.perf_counter() - t
            times = []
            for _ in range(200):
                t = time.perf_counter()
                await lim.hit("k")
                times.append(time.perf_counter() - t)
            await client.aclose()
            return {"first": first, "open_median": statistics.median(times), "open_max": max(times)}

        if is_async:
            return asyncio.run(run_async())
        client = make_client(srv.port)
        lim = nlr.TokenBucket(client, "100/s", on_error="allow")
        lim.hit("k")
        start_outage()
        t = time.perf_counter()
        lim.hit("k")
        first = time.perf_counter() - t
        times = []
        for _ in range(200):
            t = time.perf_counter()
            lim.hit("k")
            times.append(time.perf_counter() - t)
        client.close()
        return {"first": first, "open_median": statistics.median(times), "open_max": max(times)}
    finally:
        if sleeper is not None:
            sleeper.join()
        srv.close()


def test_outage_latency(benchmark):
    """What a check costs during an outage: the first one that meets it (at most the
    client's socket timeout: redis-py 8's default is 5 s) and those while the breaker is
    open (no I/O). Default and tuned (0.3 s timeouts) clients, sync and asyncio."""
    import redis.asyncio

    tuned = {"socket_timeout": 0.3, "socket_connect_timeout": 0.3}
    cases = [
        ("sync, default client", lambda p: redis.Redis(port=p), False),
        ("sync, tuned client", lambda p: redis.Redis(port=p, **tuned), False),
        ("asyncio, default client", lambda p: redis.asyncio.Redis(port=p), True),
        ("asyncio, tuned client", lambda p: redis.asyncio.Redis(port=p, **tuned), True),
    ]
    rows = []

    def run() -> None:
        for outage in ("stopped", "hung"):
            for name, make, is_async in cases:
                rows.append((f"{name}, {outage} server", _outage_figures(make, outage, is_async)))

    benchmark.pedantic(run, rounds=1)
    for name, f in rows:
        text = (
            f"first call {f['first'] * 1e3:.1f} ms; while open: median {f['open_median'] * 1e6:.1f} us, "
            f"slowest {f['open_max'] * 1e6:.1f} us"
        )
        benchmark.extra_info[name] = text
        print(f"\n{name}: {text}", end="")
