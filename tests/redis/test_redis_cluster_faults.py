"""Quota leasing and the circuit breaker on a real 3-node Redis Cluster.

Leasing: the keys of one limit share a hash tag, so a block is taken and given back on
the node serving the key, for keys spread over every node; the quota holds there as on
one server. Faults (a cluster started here, as nodes are stopped and hung): a cluster
client's check goes straight to the node serving its key, once, so a hung node costs
one socket timeout even though the cluster client retries 10 times by default; the
breaker opens for that node only, and the keys on the other nodes are decided as
before; a leasing limiter spends its block through the node's outage."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis
import redis.asyncio.cluster
import redis.cluster
from support.redis_state import every_node_ready
from support.servers import RedisCluster

import nexus_limits as nl
import nexus_limits.redis as nlr
import nexus_limits.redis.asyncio as nla

T0 = 472_222 * 3600.0
TIMEOUTS = {"socket_timeout": 0.3, "socket_connect_timeout": 0.3}


def keys_by_node(client, limiter, count: int = 300) -> dict:
    """A user key served by each node (by port)."""
    found = {}
    for i in range(count):
        key = f"user-{i}"
        found.setdefault(client.get_node_from_key(limiter.redis_key(key)).port, key)
    assert len(found) == 3
    return found


def evalsha_calls(cluster) -> int:
    total = 0
    for node in cluster.nodes:
        c = redis.Redis(port=node.port)
        total += int(c.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
        c.close()
    return total


def test_leasing_on_a_cluster_sync(redis_cluster):
    every_node_ready(redis_cluster)
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster.port)
    clock = nl.ManualClock(T0)
    try:
        fw = nlr.FixedWindow(client, "500/hour", lease=True, clock=clock, prefix="lc")
        tb = nlr.TokenBucket(client, "100000/s", lease=True, clock=clock, prefix="lc")
        keys = keys_by_node(client, fw)
        before = evalsha_calls(redis_cluster)
        for key in keys.values():
            admitted = 0
            for _ in range(2000):
                clock.advance(0.0001)
                admitted += fw.hit(key).allowed
                assert tb.hit(key).allowed
            assert admitted == 500, "the window's limit, exactly, on every node"
            fw.close()
            tb.close()
            assert fw.peek(key, 0).remaining == 0
        trips = evalsha_calls(redis_cluster) - before
        assert trips < 3 * 2 * 2000 / 10, f"{trips} round trips for 12,000 checks"
        assert fw.stats()["leases_taken"] > 0 and tb.stats()["units_returned"] > 0
    finally:
        client.close()


def test_leasing_on_a_cluster_asyncio(redis_cluster):
    every_node_ready(redis_cluster)

    async def main() -> None:
        client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster.port)
        clock = nl.ManualClock(T0)
        try:
            sw = nla.SlidingWindow(client, "300/hour", lease=True, clock=clock, prefix="la")
            for i in range(6):
                admitted = 0
                for _ in range(600):
                    clock.advance(0.0001)
                    admitted += (await sw.hit(f"user-{i}")).allowed
                assert admitted == 300
            assert sw.stats()["round_trips_saved"] > 6 * 500
            await sw.close()
        finally:
            await client.aclose()

    asyncio.run(main())


@pytest.fixture
def cluster():
    c = RedisCluster().start()
    try:
        every_node_ready(c)
        yield c
    finally:
        c.close()


def hang(port: int, seconds: float) -> threading.Thread:
    def run() -> None:
        c = redis.Redis(port=port, socket_timeout=seconds + 5)
        c.execute_command("DEBUG", "SLEEP", seconds)
        c.close()

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.1)
    return t


def test_a_hung_node_costs_one_socket_timeout_and_trips_its_keys_only(cluster):
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster.port, **TIMEOUTS)  # 10 retries
    try:
        tb = nlr.TokenBucket(client, "100/s", on_error="deny", prefix="h")
        # A block that outlives the hang, of the share cap (1,000 units) on any machine:
        # sized by the rate seen over the default 50 ms, it is a few units on a loaded
        # machine, which the last checks may have spent (no block to spend below).
        policy = nlr.LeasePolicy(window=60, max_share=0.01, hold=10, idle=10)
        leased = nlr.FixedWindow(client, "100000/hour", lease=policy, prefix="h")
        keys = keys_by_node(client, tb)
        for key in keys.values():
            assert not tb.hit(key).fallback
            for _ in range(300):
                assert leased.hit(key).allowed
        victim, victim_key = next(iter(keys.items()))
        slot = leased._leases.held.get(victim_key)
        held = 0 if slot is None else slot.units
        assert held > 0, "a block is held"
        sleeper = hang(victim, 3)
        t = time.monotonic()
        d = tb.hit(victim_key)
        first = time.monotonic() - t
        assert d.fallback and not d.allowed
        assert first < 0.8, f"{first:.2f}s: one attempt, not the cluster client's 10 retries"
        t = time.monotonic()
        assert tb.hit(victim_key).fallback and time.monotonic() - t < 0.05
        assert tb.stats()["breaker_open"] == 1, "one node's breaker"
        for port, key in keys.items():
            if port != victim:
                d = tb.hit(key)
                assert d.allowed and not d.fallback, "the other nodes decide as before"
        spent = [leased.hit(victim_key) for _ in range(held)]
        assert all(d.allowed and not d.fallback for d in spent), "the block is spent through the outage"
        sleeper.join()
        started = time.monotonic()
        while tb.hit(victim_key).fallback:
            assert time.monotonic() - started < 10
            time.sleep(0.05)
        assert tb.stats()["breaker_open"] == 0 and tb.stats()["breaker_trips"] == 1
    finally:
        client.close()


@pytest.mark.parametrize("tuned", [False, True], ids=["default-client", "tuned-client"])
def test_a_stopped_node(cluster, tuned):
    kw = TIMEOUTS if tuned else {}
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster.port, **kw)
    try:
        tb = nlr.TokenBucket(client, "100/s", on_error="allow", prefix="s")
        keys = keys_by_node(client, tb)
        for key in keys.values():
            tb.hit(key)
        victim, victim_key = next(iter(keys.items()))
        node = next(n for n in cluster.nodes if n.port == victim)
        node.stop()
        t = time.monotonic()
        assert tb.hit(victim_key).fallback
        assert time.monotonic() - t < 1.0
        t = time.monotonic()
        for _ in range(20):
            assert tb.hit(victim_key).fallback
        assert time.monotonic() - t < 0.1, "the open breaker answers without I/O"
        assert all(not tb.hit(k).fallback for p, k in keys.items() if p != victim)
        node.start()
        started = time.monotonic()
        while tb.hit(victim_key).fallback:  # the node rejoins (CLUSTERDOWN for a moment)
            assert time.monotonic() - started < 15
            time.sleep(0.05)
    finally:
        client.close()


def test_a_hung_node_asyncio(cluster):
    async def main() -> None:
        client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=cluster.port, **TIMEOUTS)
        try:
            tb = nla.SlidingWindow(client, "100/s", on_error="allow", prefix="a")
            await tb.hit("warm")
            keys = keys_by_node(client, tb)
            for key in keys.values():
                assert not (await tb.hit(key)).fallback
            victim, victim_key = next(iter(keys.items()))
            sleeper = await asyncio.to_thread(hang, victim, 2)
            t = time.monotonic()
            d = await tb.hit(victim_key)
            first = time.monotonic() - t
            assert d.fallback and first < 0.8, f"{first:.2f}s"
            assert tb.stats()["breaker_open"] == 1
            for port, key in keys.items():
                if port != victim:
                    assert not (await tb.hit(key)).fallback
            await asyncio.to_thread(sleeper.join)
            started = time.monotonic()
            while (await tb.hit(victim_key)).fallback:
                assert time.monotonic() - started < 10
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    asyncio.run(main())
