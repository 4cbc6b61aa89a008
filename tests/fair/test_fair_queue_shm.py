"""FairQueue across the processes of one host: each process keeps its own queue, the limit
is a SharedMemoryStore's. The limit holds exactly across the processes; within each one,
light keys are not held behind a heavy key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

import nexus_limits as nl

RATE = 40

WORKER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    import nexus_limits as nl
    from nexus_limits.fair import FairQueue, QueueRefused

    store_name, start_at, heavy_count = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    store = nl.SharedMemoryStore(store_name, capacity=1024)
    limiter = nl.TokenBucket("{rate}/s", burst=1, store=store)
    queue = FairQueue(limiter, limit_key="upstream", timeout=1.5)
    out = {{"admitted": [], "light_waits": [], "heavy_waits": [], "heavy_refused": 0, "light_refused": 0}}

    async def request(key):
        started = time.monotonic()
        try:
            await queue.acquire_async(key)
        except QueueRefused:
            out["heavy_refused" if key == "heavy" else "light_refused"] += 1
            return
        now = time.monotonic()
        out["admitted"].append(now)
        out["heavy_waits" if key == "heavy" else "light_waits"].append(now - started)

    async def light(n):
        for _ in range(4):
            await request(f"light-{{n}}")
            await asyncio.sleep(0.25)

    async def main():
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        heavy = [asyncio.ensure_future(request("heavy")) for _ in range(heavy_count)]
        await asyncio.gather(*heavy, *[light(n) for n in range(3)])

    asyncio.run(main())
    print(json.dumps(out))
    """
).format(rate=RATE)


def run_workers(name: str, count: int, heavy: int) -> list:
    start_at = time.monotonic() + 1.5  # CLOCK_MONOTONIC is one clock for the whole host
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, name, repr(start_at), str(heavy)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        for _ in range(count)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    return results


@pytest.fixture
def store_name():
    name = f"fq-test-{uuid.uuid4().hex[:12]}"
    yield name
    try:
        nl.SharedMemoryStore(name).unlink()
    except (OSError, ValueError):
        pass


def test_processes_keep_one_limit_and_each_serves_its_light_keys_first(store_name):
    results = run_workers(store_name, count=2, heavy=60)
    admitted = sorted(t for r in results for t in r["admitted"])
    # Exactly the limit across both processes: at most RATE (+1, the burst) in any second.
    for i, t in enumerate(admitted):
        assert sum(1 for u in admitted[i:] if u < t + 1.0) <= RATE + 1
    # The limit was the bottleneck: 120 heavy requests for ~2 s of capacity, so most of the
    # heavy key's were refused, in each process, at once (their deadline could not be met).
    assert all(r["heavy_refused"] > 20 for r in results)
    # Each process served its light keys ahead of its heavy backlog: a light request waits a
    # few slots, not the backlog. Between the processes, each freed slot goes to the head
    # that checks first, so a process may lose a few races in a row: hence the looser max.
    for r in results:
        light, heavy = sorted(r["light_waits"]), r["heavy_waits"]
        assert r["light_refused"] == 0 and len(light) == 12
        assert light[6] < 8 / RATE, light
        assert light[-1] < 0.6, light
        assert sum(heavy) / len(heavy) > 3 * sum(light) / len(light)
    # And the capacity was used: about RATE per second while both were busy.
    busy = [t for t in admitted if t < admitted[0] + 1.0]
    assert len(busy) >= RATE * 0.7


def test_one_process_alone_gets_the_whole_limit(store_name):
    (result,) = run_workers(store_name, count=1, heavy=30)
    admitted = sorted(result["admitted"])
    assert len(admitted) >= 30  # 30 heavy in 0.75 s of capacity, within the 1.5 s timeout
    for i, t in enumerate(admitted):
        assert sum(1 for u in admitted[i:] if u < t + 1.0) <= RATE + 1
