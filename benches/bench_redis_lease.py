"""Quota leasing on Redis: processes hammering one hot key, with and without leasing.

    python benches/bench_redis_lease.py                 # all three parts
    python benches/bench_redis_lease.py --seconds 3 --runs 20 --processes 4

Starts its own redis-server on a free loopback port. Prints:

1. checks per second of ``--processes`` processes hammering one key of a TokenBucket
   whose quota never runs out: each check a round trip (``lease=False``), then with
   quota leasing (``lease=True``); the ratio, and round trips per 1,000 checks (EVALSHA
   calls counted by the server, INFO commandstats);
2. ``--runs`` runs of the processes hammering a key of a finite quota (a FixedWindow of
   ``--quota`` per hour, then a TokenBucket of that burst refilling at 1/s): the total
   admitted by all of them against what the quota allows (never more);
3. a cold key (a check every 100 ms, rarer than one per block window of 50 ms): round
   trips per check (1.0: no block is taken, each check is one round trip as without
   leasing).

Not a timed test: it prints figures; ``benches/test_redis_bench.py`` runs a short
version under pytest-benchmark.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

HUGE = "1000000000/s"


def _make(kind: str, port: int, quota: int, lease: bool, prefix: str) -> Any:
    import redis

    import nexus_limits.redis as nlr

    client = redis.Redis(port=port)
    if kind == "huge":
        return nlr.TokenBucket(client, HUGE, lease=lease, prefix=prefix)
    if kind == "fixed":
        return nlr.FixedWindow(client, f"{quota}/hour", lease=lease, prefix=prefix)
    return nlr.TokenBucket(client, "1/s", burst=quota, lease=lease, prefix=prefix)


def _worker(kind: str, port: int, quota: int, lease: bool, prefix: str, start: Any, seconds: float, out: Any) -> None:
    lim = _make(kind, port, quota, lease, prefix)
    check = lim.try_acquire
    lim.peek("hot")  # connected and scripts loaded before the clock starts
    start.wait()
    admitted = checks = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(100):
            admitted += check("hot")
        checks += 100
    lim.close()
    out.put((checks, admitted))


def hammer(
    kind: str, port: int, processes: int, seconds: float, lease: bool, quota: int = 0, prefix: str = "bench"
) -> Tuple[int, int, float]:
    """(checks, admitted, seconds) of ``processes`` processes checking one key."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(kind, port, quota, lease, prefix, start, seconds, out))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    time.sleep(1.0 + 0.3 * processes)  # spawned interpreters importing the package
    start.set()
    results = [out.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join(30)
    return sum(c for c, _ in results), sum(a for _, a in results), seconds


def evalsha_calls(client: Any) -> int:
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def throughput(port: int, processes: int, seconds: float) -> Dict[str, Any]:
    import redis

    client = redis.Redis(port=port)
    out: Dict[str, Any] = {}
    for lease in (False, True):
        client.flushall()
        before = evalsha_calls(client)
        checks, _, secs = hammer("huge", port, processes, seconds, lease)
        trips = evalsha_calls(client) - before
        out["lease" if lease else "single"] = {
            "checks_per_second": checks / secs,
            "round_trips_per_1000": 1000 * trips / max(checks, 1),
        }
    out["ratio"] = out["lease"]["checks_per_second"] / out["single"]["checks_per_second"]
    client.close()
    return out


def admitted_runs(port: int, processes: int, seconds: float, runs: int, quota: int) -> List[Dict[str, Any]]:
    import redis

    client = redis.Redis(port=port)
    rows = []
    for kind in ("fixed", "bucket"):
        for run in range(runs):
            client.flushall()
            started = time.monotonic()
            checks, admitted, _ = hammer(kind, port, processes, seconds, True, quota, prefix=f"run{run}")
            elapsed = time.monotonic() - started
            # The most the quota allows: the window's limit; a full bucket plus its refill
            # (1 unit a second) over the whole run, start-up included.
            allowed = quota if kind == "fixed" else quota + int(elapsed) + 1
            rows.append({"kind": kind, "run": run, "checks": checks, "admitted": admitted, "quota": allowed})
    client.close()
    return rows


def cold_key(port: int, checks: int = 30, every: float = 0.1) -> float:
    import redis

    import nexus_limits.redis as nlr

    client = redis.Redis(port=port)
    lim = nlr.TokenBucket(client, "100/s", lease=True, prefix="cold")
    lim.peek("cold")
    before = evalsha_calls(client)
    for _ in range(checks):
        lim.try_acquire("cold")
        time.sleep(every)
    trips = evalsha_calls(client) - before
    lim.close()
    client.close()
    return trips / checks


def main(argv: List[str]) -> int:
    from support.servers import RedisServer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--quota", type=int, default=20_000)
    args = parser.parse_args(argv)
    server = RedisServer().start()
    try:
        tp = throughput(server.port, args.processes, args.seconds)
        print(f"{args.processes} processes, one hot key, {args.seconds:g} s each:")
        for name in ("single", "lease"):
            row = tp[name]
            print(
                f"  {name:7s} {row['checks_per_second']:>12,.0f} checks/s"
                f"  {row['round_trips_per_1000']:8.2f} round trips per 1,000 checks"
            )
        print(f"  leasing: {tp['ratio']:.1f}x the checks/s of the single-check path")
        rows = admitted_runs(server.port, args.processes, min(args.seconds, 1.0), args.runs, args.quota)
        worst = {}
        for row in rows:
            over = row["admitted"] - row["quota"]
            worst[row["kind"]] = max(worst.get(row["kind"], -(10**9)), over)
            print(f"  {row['kind']:6s} run {row['run']:2d}: admitted {row['admitted']:>7,} of {row['quota']:>7,}")
        for kind, over in worst.items():
            verdict = "never above the quota" if over <= 0 else f"ABOVE THE QUOTA by {over}"
            print(f"  {kind}: {args.runs} runs, {verdict} (closest: {-over} under)")
        print(f"cold key (a check every 100 ms): {cold_key(server.port):.2f} round trips per check")
        return 0 if all(o <= 0 for o in worst.values()) else 1
    finally:
        server.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
