"""Every Lua script on a real 3-node Redis Cluster, sync and asyncio.

The scripts are declared with ``#!lua`` (so a full server refuses them before they
run); such scripts may touch only the keys they are given, all in one slot. This runs
each of them — every algorithm's check and its read-only peek, a Composite, leases,
quota changes, token reservations and their settlement, spend — over keys spread on
every node."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import redis.asyncio.cluster
import redis.cluster
from support.redis_state import every_node_ready

import nexus_limits as nl
import nexus_limits.redis as nlr
import nexus_limits.redis.asyncio as nla

KEYS = [f"user-{i}" for i in range(12)]  # spread over the three nodes' slots


async def done(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def every_script(m: Any, client: Any, prefix: str) -> None:
    clock = nl.ManualClock(1_700_000_000.0)
    kinds = [
        m.TokenBucket(client, "5/minute", prefix=prefix, clock=clock),
        m.LeakyBucket(client, "5/minute", prefix=prefix, clock=clock),
        m.FixedWindow(client, "5/minute", prefix=prefix, clock=clock),
        m.SlidingWindow(client, "5/minute", prefix=prefix, clock=clock),
    ]
    composite = m.Composite(
        [
            m.TokenBucket(client, "4/minute", prefix=prefix + "c", clock=clock),
            m.FixedWindow(client, "9/hour", prefix=prefix + "c", clock=clock),
        ]
    )
    for key in KEYS:
        for lim in kinds:
            assert (await done(lim.peek(key))).remaining == 4
            assert (await done(lim.hit(key, 5))).allowed
            assert not (await done(lim.hit(key))).allowed
            await done(lim.set_quota(key, "10/minute"))
            assert (await done(lim.hit(key))).allowed, "the new quota has room"
            assert await done(lim.clear_quota(key))
        d, each = await done(composite.hit_each(key, 4))
        assert d.allowed and [p.remaining for p in each] == [0, 5]
        assert not (await done(composite.hit(key))).allowed
        assert (await done(composite.peek(key, 0))).remaining == 0
    assert len(await done(kinds[0].top_keys(n=100))) == len(KEYS)

    cc = m.Concurrency(client, 1, lease_ttl=30, prefix=prefix, clock=clock)
    for key in KEYS:
        lease = (await done(cc.hit(key))).lease
        assert lease is not None
        assert (await done(cc.hit(key))).lease is None
        assert not (await done(cc.peek(key))).allowed
        assert await done(lease.release())
        assert (await done(cc.peek(key))).allowed

    tl = m.TokenLimiter(client, requests="3/minute", tokens="1000/minute", concurrency=1, prefix=prefix, clock=clock)
    for key in KEYS:
        res = await done(tl.reserve(key, 600))
        assert res.allowed and res.tokens.remaining == 400
        assert not (await done(tl.reserve(key, 1))).allowed, "the lease is held"
        assert await done(res.settle(100))
        again = await done(tl.reserve(key, 900))
        assert again.allowed and again.tokens.remaining == 0, "500 were refunded"
        assert await done(again.cancel())


def test_every_script_on_a_cluster_sync(redis_cluster):
    every_node_ready(redis_cluster)
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster.port)
    try:
        asyncio.run(every_script(nlr, client, "sync"))
        spend = nlr.SpendLimiter(client, "1.00/hour", prefix="sync", clock=nl.ManualClock(1e9))
        for key in KEYS:
            res = spend.reserve(key, "gpt-4o", 1000, 100)
            assert res.allowed and res.settle(10)
        assert {client.keyslot(k) for k in KEYS} != {client.keyslot(KEYS[0])}
    finally:
        client.close()


def test_every_script_on_a_cluster_asyncio(redis_cluster):
    every_node_ready(redis_cluster)

    async def main() -> None:
        client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster.port)
        try:
            await every_script(nla, client, "async")
        finally:
            await client.aclose()

    asyncio.run(main())
