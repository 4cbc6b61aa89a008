"""``nexus-limits bench``: the benchmark harness.

The rooms: ``measure`` (the instruments and the pure-Python reference), ``peers`` (the
limiters compared), ``workloads`` (what each contender runs, in a fresh interpreter),
``stores`` (shared memory and Redis), ``run`` (the whole run) and ``report`` (tables,
Markdown, plot).
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

from . import measure, report, stores
from . import run as _run

__all__ = ["bench", "bench_redis"]


def bench(
    quick: bool,
    keys: Optional[int],
    json_path: Optional[str],
    redis_url: Optional[str] = None,
    plot_path: Optional[str] = None,
    markdown_path: Optional[str] = None,
) -> Dict[str, Any]:
    counts = None if keys is None else sorted({min(1_000, keys), keys})
    m = measure.machine()
    print(f"nexus-limits {m['nexus_limits']} on {m['implementation']} {m['python']}, {m['cpu']} ({m['cpus']} cpus)")
    data = _run.run(quick=quick, key_counts=counts, redis_url=redis_url)
    for c in data["skipped"]:
        print(f"skipped {c}: not installed (pip install 'nexus-limits[bench]')")
    for block in report.tables(data):
        print(block)
    n = counts[-1] if counts else (10_000 if quick else 1_000_000)
    sw = measure.sweep(n)
    data["sweep"] = sw
    print(
        f"\nSweep: {sw['evicted']:,} of {n:,} idle nexus-limits keys evicted in {sw['sweep_ms']:.1f} ms; "
        f"{sw['checks_during']:,} checks by another thread meanwhile, "
        f"slowest {report.fmt(sw['check_max_us'], '.1f')} us"
    )
    if redis_url:
        bench_redis(redis_url, quick, data)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(data, f, indent=2)
        print(f"\nwrote {json_path}")
    if plot_path:
        report.plot(data, plot_path)
        print(f"wrote {plot_path}")
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(report.markdown(data, plot_path))
        print(f"wrote {markdown_path}")
    return data


def bench_redis(url: str, quick: bool, out: Dict[str, Any]) -> None:
    calls, repeats = (500, 5) if quick else (2_000, 15)
    print(f"\nRedis at {url}: one round trip per check, same client (median of {repeats} turns of {calls:,} calls)")
    rt = stores.redis_round_trips(url, calls=calls, repeats=repeats)
    rows = [[r["call"], f"{r['us']:.1f}", f"{r['vs_incr']:.2f}x", f"{r['vs_script']:.2f}x"] for r in rt["rows"]]
    print(report.table(["call", "us/call", "vs INCR", "vs minimal script"], rows))
    seconds = 1.0 if quick else 3.0
    tp = [stores.redis_throughput(url, n, seconds) for n in (1, 4)]
    print(
        "TokenBucket.try_acquire on one shared key: "
        + ", ".join(f"{t['checks_per_second']:,.0f} checks/s from {t['processes']} process(es)" for t in tp)
    )
    out["redis_vs_incr"] = {"round_trips": rt, "throughput": tp}
