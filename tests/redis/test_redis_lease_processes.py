"""Quota leasing across real processes: four processes hammer one key with leasing on,
each taking blocks of the quota and spending them locally; together they never admit
more than the quota (a FixedWindow's limit; a TokenBucket's burst plus its refill over
the run). A process that dies holding a block loses its units to the block's end: the
others get fewer, never more. (The benchmark, benches/bench_redis_lease.py, runs this
20 times with more checks.)"""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import redis

import nexus_limits.redis as nlr

QUOTA = 2000
PROCESSES = 4


def _make(kind: str, port: int, prefix: str):
    client = redis.Redis(port=port)
    if kind == "fixed":
        return nlr.FixedWindow(client, f"{QUOTA}/hour", lease=True, prefix=prefix)
    if kind == "sliding":
        return nlr.SlidingWindow(client, f"{QUOTA}/hour", lease=True, prefix=prefix)
    return nlr.TokenBucket(client, "1/s", burst=QUOTA, lease=True, prefix=prefix)


def _hammer(kind: str, port: int, prefix: str, start, out) -> None:
    lim = _make(kind, port, prefix)
    start.wait(10)
    admitted = checks = 0
    end = time.monotonic() + 0.5
    while time.monotonic() < end and checks < 200_000:
        admitted += lim.try_acquire("hot")
        checks += 1
    lim.close()
    out.put((checks, admitted, lim.stats()["round_trips_saved"]))


@pytest.mark.parametrize("kind", ["fixed", "sliding", "bucket"])
def test_processes_never_admit_more_than_the_quota(redis_server, kind):
    ctx = multiprocessing.get_context("fork")
    client = redis.Redis(port=redis_server.port)
    try:
        for run in range(3):
            prefix = f"p{run}"
            start, out = ctx.Event(), ctx.Queue()
            procs = [
                ctx.Process(target=_hammer, args=(kind, redis_server.port, prefix, start, out))
                for _ in range(PROCESSES)
            ]
            for p in procs:
                p.start()
            began = time.monotonic()
            start.set()
            results = [out.get(timeout=30) for _ in procs]
            for p in procs:
                p.join(10)
                assert p.exitcode == 0
            elapsed = time.monotonic() - began
            checks = sum(r[0] for r in results)
            admitted = sum(r[1] for r in results)
            allowed = QUOTA + (int(elapsed) + 1 if kind == "bucket" else 0)  # the refill: 1 a second
            assert admitted <= allowed, f"run {run}: {admitted} admitted, the quota allows {allowed}"
            assert checks > 2 * QUOTA, "the quota was overrun many times over"
            assert admitted >= QUOTA - 100, f"run {run}: {admitted}: blocks left unspent are few"
            assert sum(r[2] for r in results) > checks / 2, "most checks answered without a round trip"
    finally:
        client.close()


def test_a_process_that_dies_holding_a_block_costs_units_not_admissions(redis_server):
    client = redis.Redis(port=redis_server.port)
    fw = nlr.FixedWindow(client, "1000/hour", lease=True, prefix="dies")
    try:
        pid = os.fork()
        if pid == 0:  # takes a block, then dies without giving it back
            child = nlr.FixedWindow(redis.Redis(port=redis_server.port), "1000/hour", lease=True, prefix="dies")
            for _ in range(300):
                child.hit("k")
            os._exit(0 if child._leases.held else 1)
        _, status = os.waitpid(pid, 0)
        assert status == 0, "the child held a block when it died"
        left = fw.peek("k", 0).remaining
        assert left < 700, "the dead process's block is still counted"
        admitted = sum(fw.hit("k").allowed for _ in range(2000))
        assert admitted == left, "the others get what is left, never the lost block"
    finally:
        client.close()
