"""The core's hot paths next to the 12-line pure-Python GCRA reference.

Run: python -m pytest benches/ --benchmark-only
The reference is nexus_limits.measure.ReferenceGCRA (shipped in the package so that
`nexus-limits bench` can run it too).
"""

from __future__ import annotations

import pytest

import nexus_limits as nl
from nexus_limits.bench import measure, workloads

ALWAYS = measure.ALWAYS
LIMITERS = {name: make for name, make in measure.ALGORITHMS.items()}
N_KEYS = 1_000_000


def test_reference_gcra_hot_key(benchmark):
    ref = measure.ReferenceGCRA(10**9, 1.0)
    benchmark(ref.try_acquire, "hot-key")


@pytest.mark.parametrize("name", LIMITERS)
def test_try_acquire_hot_key(benchmark, name):
    lim = LIMITERS[name](ALWAYS)
    benchmark(lim.try_acquire, "hot-key")


@pytest.mark.parametrize("name", LIMITERS)
def test_hit_hot_key(benchmark, name):
    lim = LIMITERS[name](ALWAYS)
    benchmark(lim.hit, "hot-key")


def test_try_acquire_denied(benchmark):
    tb = nl.TokenBucket("1/hour")
    tb.hit("hot-key")
    benchmark(tb.try_acquire, "hot-key")


def test_composite_hot_key(benchmark):
    both = nl.Composite([nl.TokenBucket(ALWAYS), nl.FixedWindow(ALWAYS)])
    benchmark(both.try_acquire, "hot-key")


@pytest.fixture(scope="module")
def keys():
    return [f"client-{i:08d}" for i in range(N_KEYS)]


@pytest.mark.parametrize("name", ["reference", *LIMITERS])
def test_million_distinct_keys(benchmark, keys, name):
    """One check per key over 1M keys (each round inserts them into a new limiter)."""

    def setup():
        lim = measure.ReferenceGCRA(10**9, 1.0) if name == "reference" else LIMITERS[name](ALWAYS)
        return (lim.try_acquire,), {}

    def run(check):
        for k in keys:
            check(k)

    benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    benchmark.extra_info["ns_per_check"] = benchmark.stats.stats.median / N_KEYS * 1e9
    print(f"\n{name}: {benchmark.extra_info['ns_per_check']:.0f} ns/check")


@pytest.mark.parametrize("name", [measure.REFERENCE, *LIMITERS])
def test_resident_bytes_per_key(benchmark, name):
    """1M keys in a fresh interpreter: resident bytes per key (and ns/check) in extra_info."""
    rows = []
    benchmark.pedantic(lambda: rows.append(workloads.many_keys_in_subprocess(name, N_KEYS)), rounds=1, iterations=1)
    benchmark.extra_info.update(rows[0])
    row = rows[0]
    print(f"\n{name}: {row['bytes_per_key']:.1f} bytes/key, {row['insert_ns']:.0f}/{row['existing_ns']:.0f} ns/check")


def test_sweep_million_idle_keys(benchmark):
    """Sweep 1M idle keys while another thread checks; the slowest check is in extra_info."""
    results = []

    def run():
        results.append(measure.sweep(N_KEYS))

    benchmark.pedantic(run, rounds=3, iterations=1)
    worst = max(r["check_max_us"] for r in results)
    benchmark.extra_info["sweep_ms_max"] = max(r["sweep_ms"] for r in results)
    benchmark.extra_info["check_max_us"] = worst
    print(f"\nsweep: {benchmark.extra_info['sweep_ms_max']:.1f} ms at most, slowest concurrent check {worst:.1f} us")
