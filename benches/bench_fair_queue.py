"""Fair queue against a plain FIFO: does a heavy key delay the light ones?

100 keys share one queued limit, a token bucket of ``--rate`` requests per second with a
burst of ``--burst``. 99 light keys each send Poisson traffic at a rate that alone loads
the limit to ``--load`` (80% by default); one heavy key sends 50 times the traffic of a
light key, which takes the total past the limit. Every request waits in the queue up to
``--timeout`` seconds. Three runs of ``--seconds`` each, in real time on asyncio, with
the same arrival schedule for the light keys:

- **no heavy key**, through the fair queue: the light keys' own waits (the baseline);
- **heavy key, fair queue**: the light keys' p99 wait should stay within 2x the
  baseline, while the heavy key gets what is left of the limit and the rest of its
  requests are refused at once;
- **heavy key, FIFO**: the same queue with every request under one key (what a plain
  first-come-first-served queue does): the heavy key's backlog fills the queue up to
  the deadline and every light request waits behind it, or is refused.

A refused light request counts as having waited the whole timeout (it did not get in).

Run: ``python benches/bench_fair_queue.py`` (about 40 s; ``--quick`` about 12 s). It
exits with status 1 unless the fair queue keeps the light keys' p99 within 2x of the
baseline and FIFO does not. A busy machine's late timers show in every row alike.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from typing import Any, Dict, List, Tuple

import nexus_limits as nl
from nexus_limits.fair import FairQueue, QueueRefused

LIGHT_KEYS = 99
HEAVY_FACTOR = 50


def schedule(rate: float, seconds: float, seed: int) -> List[float]:
    """Poisson arrival times in [0, seconds)."""
    rng = random.Random(seed)
    out: List[float] = []
    t = rng.expovariate(rate)
    while t < seconds:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def percentile(values: List[float], p: float) -> float:
    """The nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


async def run(arrivals: List[Tuple[float, str]], args: argparse.Namespace, fifo: bool) -> Dict[str, Any]:
    limiter = nl.TokenBucket(f"{args.rate}/s", burst=args.burst)
    queue = FairQueue(limiter, limit_key="upstream", timeout=args.timeout, max_waiting=100_000)
    loop = asyncio.get_running_loop()
    waits: Dict[str, List[float]] = {"light": [], "heavy": []}
    refused = {"light": 0, "heavy": 0}

    async def request(key: str) -> None:
        kind = "heavy" if key == "heavy" else "light"
        start = loop.time()
        try:
            await queue.acquire_async("everyone" if fifo else key)
        except QueueRefused:
            refused[kind] += 1
            waits[kind].append(args.timeout)
            return
        waits[kind].append(loop.time() - start)

    tasks = []
    begin = loop.time()
    for at, key in arrivals:
        delay = begin + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(request(key)))
    await asyncio.gather(*tasks)
    return {
        "light_n": len(waits["light"]),
        "light_p50": percentile(waits["light"], 50),
        "light_p99": percentile(waits["light"], 99),
        "light_refused": refused["light"],
        "heavy_n": len(waits["heavy"]),
        "heavy_admitted": len(waits["heavy"]) - refused["heavy"],
        "heavy_refused": refused["heavy"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=100, help="the limit, requests per second (default 100)")
    parser.add_argument("--burst", type=int, default=2, help="the token bucket's burst (default 2)")
    parser.add_argument("--load", type=float, default=0.8, help="the light keys' load on the limit (default 0.8)")
    parser.add_argument("--seconds", type=float, default=12.0, help="length of each run (default 12)")
    parser.add_argument("--timeout", type=float, default=2.0, help="each request's deadline (default 2 s)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="3-second runs")
    args = parser.parse_args()
    seconds = 3.0 if args.quick else args.seconds
    per_light = args.rate * args.load / LIGHT_KEYS
    light = sorted(
        (t, f"light-{k}") for k in range(LIGHT_KEYS) for t in schedule(per_light, seconds, args.seed * 1000 + k)
    )
    heavy = [(t, "heavy") for t in schedule(per_light * HEAVY_FACTOR, seconds, args.seed * 1000 + 999)]
    print(
        f"limit {args.rate}/s, burst {args.burst}; {LIGHT_KEYS} light keys at {per_light:.2f}/s each "
        f"({per_light * LIGHT_KEYS:.0f}/s together), 1 heavy key at {per_light * HEAVY_FACTOR:.1f}/s "
        f"({HEAVY_FACTOR}x); timeout {args.timeout:g} s; {seconds:g} s per run"
    )
    results: Dict[str, Dict[str, Any]] = {}
    for name, arrivals, fifo in (
        ("no heavy key", light, False),
        ("heavy key, fair queue", sorted(light + heavy), False),
        ("heavy key, FIFO", sorted(light + heavy), True),
    ):
        started = time.perf_counter()
        results[name] = asyncio.run(run(arrivals, args, fifo))
        results[name]["elapsed"] = time.perf_counter() - started
    base = results["no heavy key"]["light_p99"]
    columns = ("light p50", "light p99", "p99 vs base", "light refused", "heavy in/out")
    header = f"{'':24} {columns[0]:>10} {columns[1]:>10} {columns[2]:>12} {columns[3]:>14} {columns[4]:>14}"
    print()
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        ratio = r["light_p99"] / base if base > 0 else float("inf")
        heavy_io = f"{r['heavy_admitted']}/{r['heavy_refused']}" if r["heavy_n"] else "-"
        light_refused = f"{r['light_refused']}/{r['light_n']}"
        print(
            f"{name:24} {r['light_p50'] * 1000:8.1f}ms {r['light_p99'] * 1000:8.1f}ms {ratio:11.2f}x "
            f"{light_refused:>14} {heavy_io:>14}"
        )
    fair = results["heavy key, fair queue"]["light_p99"] / base if base > 0 else float("inf")
    fifo = results["heavy key, FIFO"]["light_p99"] / base if base > 0 else float("inf")
    print()
    print(f"fair queue: light p99 {fair:.2f}x the baseline ({'within' if fair <= 2 else 'OVER'} 2x)")
    print(f"FIFO:       light p99 {fifo:.2f}x the baseline ({'within' if fifo <= 2 else 'over'} 2x)")
    return 0 if fair <= 2 < fifo else 1


if __name__ == "__main__":
    sys.exit(main())
