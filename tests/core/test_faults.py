"""Redis faults: a slow server (DEBUG SLEEP), timeouts, a cluster node killed. Each
on_error mode answers as documented, within the client's timeouts: nothing hangs."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry
from support.servers import RedisCluster, RedisServer

import nexus_limits as nl
import nexus_limits.redis as nlr
import nexus_limits.redis.asyncio as nla

MODES = ("allow", "deny", "raise")


@pytest.fixture
def server():
    s = RedisServer().start()
    yield s
    s.close()


def sleep_server(port: int, seconds: float) -> threading.Thread:
    """Makes the server unresponsive for `seconds` (DEBUG SLEEP blocks its event loop)."""

    def run():
        c = redis.Redis(port=port)
        c.execute_command("DEBUG", "SLEEP", seconds)
        c.close()

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.1)  # the SLEEP has begun
    return t


def check_modes(limiters, composite, concurrency):
    started = time.monotonic()
    d = limiters["allow"].hit("k")
    assert d.allowed and d.fallback
    d = limiters["deny"].hit("k")
    assert not d.allowed and d.fallback and d.retry_after == 1.0
    with pytest.raises(nl.BackendUnavailable, match="could not be reached"):
        limiters["raise"].hit("k")
    assert not composite.hit("k").allowed
    lease = concurrency.try_acquire("k")
    assert lease is not None and lease.fallback
    assert time.monotonic() - started < 3, "each call gave up at its socket timeout"
    assert limiters["allow"].stats()["fail_open"] == 1 and limiters["deny"].stats()["fail_closed"] == 1
    assert limiters["raise"].stats()["errors"] == 1


def test_slow_server_times_out_into_each_mode(server):
    client = redis.Redis(port=server.port, socket_timeout=0.2, retry=Retry(NoBackoff(), 0))
    limiters = {m: nlr.TokenBucket(client, "100/s", on_error=m, prefix=m) for m in MODES}
    composite = nlr.Composite([limiters["allow"], nlr.FixedWindow(client, "5/s")], on_error="deny")
    concurrency = nlr.Concurrency(client, 2, on_error="allow")
    for lim in limiters.values():
        assert lim.hit("k").allowed
    sleeper = sleep_server(server.port, 2)
    check_modes(limiters, composite, concurrency)
    sleeper.join()
    # The server is back: the next calls are decided by it again.
    for lim in limiters.values():
        for _ in range(3):  # a connection that timed out is replaced on the next call
            d = lim.hit("k")
            if not d.fallback:
                break
        assert d.allowed and not d.fallback
    client.close()


def test_slow_server_with_the_asyncio_client(server):
    async def main():
        client = redis.asyncio.Redis(port=server.port, socket_timeout=0.2, retry=Retry(NoBackoff(), 0))
        try:
            limiters = {m: nla.TokenBucket(client, "100/s", on_error=m, prefix=f"a{m}") for m in MODES}
            tl = nla.TokenLimiter(client, tokens="1000/minute", on_error="allow")
            sleeper = await asyncio.to_thread(sleep_server, server.port, 1.5)
            started = time.monotonic()
            assert (await limiters["allow"].hit("k")).fallback
            assert not (await limiters["deny"].hit("k")).allowed
            with pytest.raises(nl.BackendUnavailable):
                await limiters["raise"].hit("k")
            r = await tl.reserve("k", 10)
            assert r.allowed and r.decision.fallback and tl.stats()["fail_open"] == 1
            assert time.monotonic() - started < 3
            await asyncio.to_thread(sleeper.join)
        finally:
            await client.aclose()

    asyncio.run(main())


def test_restart_mid_traffic_loses_nothing_admitted(server):
    """A restart of a server without persistence forgets its counters (documented); the
    limiter keeps working across it without a new client and without hanging."""
    client = redis.Redis(port=server.port, socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    tb = nlr.TokenBucket(client, "5/minute", on_error="deny")
    assert sum(tb.hit("k").allowed for _ in range(7)) == 5
    server.stop()
    started = time.monotonic()
    assert all(not tb.hit("k").allowed for _ in range(3))
    assert time.monotonic() - started < 3
    server.start()
    deadline = time.monotonic() + 5
    while tb.hit("k").fallback:
        assert time.monotonic() < deadline
    assert tb.stats()["fail_closed"] >= 3


def test_cluster_node_killed():
    cluster = RedisCluster().start()
    try:
        client = redis.cluster.RedisCluster(
            host="127.0.0.1",
            port=cluster.port,
            socket_timeout=0.3,
            socket_connect_timeout=0.3,
            retry=Retry(NoBackoff(), 0),
        )
        limiters = {m: nlr.TokenBucket(client, "100/minute", on_error=m, prefix="c") for m in MODES}
        # A key on each node: the limiter's keys share the user key's hash tag.
        by_node = {}
        for i in range(200):
            key = f"user-{i}"
            node = client.get_node_from_key(limiters["allow"].redis_key(key))
            by_node.setdefault(node.port, key)
        assert len(by_node) == 3
        for key in by_node.values():
            assert limiters["allow"].hit(key).allowed
        victim_port, victim_key = next(iter(by_node.items()))
        survivor_key = next(k for p, k in by_node.items() if p != victim_port)
        next(n for n in cluster.nodes if n.port == victim_port).stop()
        started = time.monotonic()
        d = limiters["allow"].hit(victim_key)
        assert d.allowed and d.fallback
        d = limiters["deny"].hit(victim_key)
        assert not d.allowed and d.fallback
        with pytest.raises(nl.BackendUnavailable):
            limiters["raise"].hit(victim_key)
        assert time.monotonic() - started < 10, "nothing hung on the dead node"
        # Keys on the nodes still up are still decided by them.
        d = limiters["raise"].hit(survivor_key)
        assert d.allowed and not d.fallback
        client.close()
    finally:
        cluster.close()
