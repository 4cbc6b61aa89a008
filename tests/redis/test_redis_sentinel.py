"""A Sentinel-managed primary (``redis.sentinel.Sentinel(...).master_for(...)``), failed
over mid-traffic: a primary, its replica and one sentinel (``redis-server --sentinel``,
down-after-milliseconds 200), all started here on loopback.

When the primary dies, the limiters' checks answer their on_error policy (the circuit
breaker opens: no call waits more than the client's socket timeouts), then the sentinel
promotes the replica, the breaker's probe reaches the new primary through the sentinel
and closes, and checks are decided by Redis again, with the state the replica had
copied. A leasing limiter spends its block through the outage. Sync and asyncio, with
a client built with defaults and a tuned one."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import threading
import time

import pytest
import redis
import redis.asyncio.sentinel
import redis.sentinel
from support.servers import RedisServer, free_port, redis_binary

import nexus_limits.redis as nlr
import nexus_limits.redis.asyncio as nla

SERVICE = "nl-primary"
TIMEOUTS = {"socket_timeout": 0.3, "socket_connect_timeout": 0.3}


class SentinelServer:
    """One sentinel watching ``primary`` (quorum 1: it alone decides the failover)."""

    def __init__(self, primary: int) -> None:
        self.primary = primary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix=f"nl-sentinel-{self.port}-")
        self.proc = None

    def start(self) -> SentinelServer:
        conf = os.path.join(self.dir, "sentinel.conf")
        with open(conf, "w") as f:
            f.write(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary} 1\n"
                f"sentinel down-after-milliseconds {SERVICE} 200\n"
                f"sentinel failover-timeout {SERVICE} 2000\n"
            )
        self.proc = subprocess.Popen(
            [redis_binary(), conf, "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, **TIMEOUTS).ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("the sentinel did not answer PING within 10 s")

    def replicas_known(self) -> bool:
        c = redis.Redis(port=self.port, **TIMEOUTS, decode_responses=True)
        try:
            return any("s_down" not in r.get("flags", "") for r in c.sentinel_slaves(SERVICE))
        finally:
            c.close()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def setup():
    primary = RedisServer().start()
    replica = RedisServer().start()
    sentinel = None
    try:
        # The first sync would wait 5 s for more replicas to share a diskless transfer.
        redis.Redis(port=primary.port).config_set("repl-diskless-sync-delay", 0)
        r = redis.Redis(port=replica.port)
        r.replicaof("127.0.0.1", primary.port)
        deadline = time.monotonic() + 10
        while r.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica did not sync"
            time.sleep(0.05)
        r.close()
        sentinel = SentinelServer(primary.port).start()
        deadline = time.monotonic() + 15
        while not sentinel.replicas_known():
            assert time.monotonic() < deadline, "the sentinel did not find the replica"
            time.sleep(0.1)
        yield primary, replica, sentinel
    finally:
        if sentinel is not None:
            sentinel.close()
        replica.close()
        primary.close()


def failover_sync(tuned: bool, primary: RedisServer, replica: RedisServer, sentinel: SentinelServer) -> None:
    kw = TIMEOUTS if tuned else {}
    manager = redis.sentinel.Sentinel([("127.0.0.1", sentinel.port)], sentinel_kwargs=dict(kw), **kw)
    client = manager.master_for(SERVICE, **kw)
    try:
        tb = nlr.TokenBucket(client, "100/hour", burst=100_000, on_error="allow", prefix="sf")
        leased = nlr.FixedWindow(client, "1000000/hour", on_error="deny", lease=True, prefix="sf")
        for _ in range(50):
            assert not tb.hit("k").fallback
            assert leased.hit("k").allowed
        used = 100_000 - tb.peek("k", 0).remaining
        primary.stop()
        answers, slowest, started = [], 0.0, time.monotonic()
        while time.monotonic() - started < 30:
            t = time.monotonic()
            d = tb.hit("k")
            slowest = max(slowest, time.monotonic() - t)
            answers.append(d.fallback)
            if len(answers) > 3 and not any(answers[-3:]) and any(answers):
                break  # decided by Redis again, after an outage
            time.sleep(0.01)
        assert any(answers), "the dead primary was noticed"
        assert not any(answers[-3:]), "checks are decided by the new primary"
        assert slowest < 1.5, f"a call waited {slowest:.2f}s: one attempt, then the breaker"
        stats = tb.stats()
        assert stats["breaker_trips"] >= 1 and stats["breaker_open"] == 0
        assert manager.discover_master(SERVICE)[1] == replica.port
        # The replica had the state: the 50 checks before the failover are still counted.
        assert 100_000 - tb.peek("k", 0).remaining >= used - 1
        d = leased.hit("k")
        assert d.allowed and not d.fallback
    finally:
        client.close()


@pytest.mark.parametrize("tuned", [False, True], ids=["default-client", "tuned-client"])
def test_failover_sync(setup, tuned):
    failover_sync(tuned, *setup)


def test_a_hung_primary_costs_one_socket_timeout(setup):
    """The primary hangs (DEBUG SLEEP) and is failed over while it sleeps: the first check
    waits one socket timeout, the next ones none (redis-py's Sentinel-managed clients
    make one attempt by default; the limiters' own connections, made like the client's
    and asking the sentinels for the primary, do too)."""
    primary, replica, sentinel = setup
    manager = redis.sentinel.Sentinel([("127.0.0.1", sentinel.port)], sentinel_kwargs=dict(TIMEOUTS), **TIMEOUTS)
    client = manager.master_for(SERVICE, **TIMEOUTS)
    try:
        tb = nlr.TokenBucket(client, "100/hour", burst=1000, on_error="deny", prefix="sh")
        assert not tb.hit("k").fallback

        def hang() -> None:
            c = redis.Redis(port=primary.port, socket_timeout=10)
            try:
                c.execute_command("DEBUG", "SLEEP", 4)
            except redis.RedisError:  # a failover may close the connection
                pass
            c.close()

        sleeper = threading.Thread(target=hang)
        sleeper.start()
        time.sleep(0.1)
        t = time.monotonic()
        d = tb.hit("k")
        first = time.monotonic() - t
        assert d.fallback and not d.allowed
        assert first < 0.8, f"{first:.2f}s: one attempt of 0.3 s, not the client's retries"
        t = time.monotonic()
        assert tb.hit("k").fallback and time.monotonic() - t < 0.05, "the breaker answers at once"
        started = time.monotonic()
        while tb.hit("k").fallback:
            assert time.monotonic() - started < 30, "decided again once the replica is promoted"
            time.sleep(0.02)
        assert manager.discover_master(SERVICE)[1] == replica.port
        sleeper.join()
    finally:
        client.close()


def test_failover_asyncio(setup):
    primary, replica, sentinel = setup

    async def main() -> None:
        manager = redis.asyncio.sentinel.Sentinel(
            [("127.0.0.1", sentinel.port)], sentinel_kwargs=dict(TIMEOUTS), **TIMEOUTS
        )
        client = manager.master_for(SERVICE, **TIMEOUTS)
        try:
            tb = nla.TokenBucket(client, "1000/s", burst=100_000, on_error="deny", prefix="sa")
            # A block that outlives the failover, of the same size on any machine: the
            # share cap (100 units), which any rate over 2 checks/s asks for in a window
            # of 60 s. (A block sized by the rate seen over the default 50 ms is a few
            # units on a loaded machine, often spent before the loop below ends: then
            # there was no block to spend through the outage.)
            policy = nlr.LeasePolicy(window=60, max_share=0.0001, hold=10, idle=10)
            leased = nla.FixedWindow(client, "1000000/hour", on_error="deny", lease=policy, prefix="sa")
            for _ in range(50):
                assert (await tb.hit("k")).allowed
                assert (await leased.hit("k")).allowed
            slot = leased._leases.held.get("k")
            held = 0 if slot is None else slot.units
            assert held > 0, "a block is held"
            primary.stop()
            # The block is this process's: spent through the outage.
            spent = [await leased.hit("k") for _ in range(held)]
            assert all(d.allowed and not d.fallback for d in spent)
            answers, slowest, started = [], 0.0, time.monotonic()
            while time.monotonic() - started < 30:
                t = time.monotonic()
                d = await tb.hit("k")
                slowest = max(slowest, time.monotonic() - t)
                answers.append(d.fallback)
                if len(answers) > 3 and not any(answers[-3:]) and any(answers):
                    break
                await asyncio.sleep(0.01)
            assert any(answers) and not any(answers[-3:])
            assert slowest < 1.5, f"a call waited {slowest:.2f}s"
            assert tb.stats()["breaker_trips"] >= 1 and tb.stats()["breaker_open"] == 0
            assert (await manager.discover_master(SERVICE))[1] == replica.port
            assert not (await leased.hit("k")).fallback
            await leased.close()
        finally:
            await client.aclose()

    asyncio.run(main())
