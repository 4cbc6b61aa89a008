"""Quota leasing on a full server (``maxmemory``, ``noeviction``): the lease script
declares itself with ``#!lua`` like every writing script, so a full server refuses it
before it runs. A new block is an outage (on_error answers), a block already held is
spent (it is this process's), and giving units back is refused without a write (they
count as spent: never more admitted). The server's write counter proves nothing was
written while full."""

from __future__ import annotations

import pytest
import redis
from support.servers import RedisServer

import nexus_limits as nl
import nexus_limits.redis as nlr

T0 = 472_222 * 3600.0


@pytest.fixture
def admin():
    server = RedisServer().start()
    client = redis.Redis(port=server.port)
    client.config_set("maxmemory-policy", "noeviction")
    yield client
    client.close()
    server.close()


def fill(admin) -> None:
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory", used + 256 * 1024)
    for i in range(4000):
        try:
            admin.set(f"fill:{i}", b"x" * 4096)
        except redis.exceptions.OutOfMemoryError:
            break
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory", used - 512 * 1024)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        admin.set("probe", "x")


def writes(admin) -> int:
    return int(admin.info("persistence")["rdb_changes_since_last_save"])


@pytest.mark.parametrize("kind", ["TokenBucket", "FixedWindow", "SlidingWindow"])
def test_leasing_on_a_full_server(admin, kind):
    clock = nl.ManualClock(T0)
    policy = nlr.LeasePolicy(hold=60)
    extra = {"burst": 100000} if kind == "TokenBucket" else {}
    lim = getattr(nlr, kind)(admin, "100000/hour", lease=policy, clock=clock, **extra)
    deny = getattr(nlr, kind)(admin, "100000/hour", lease=True, clock=clock, on_error="deny", prefix="d")
    for _ in range(200):
        clock.advance(0.0001)
        assert lim.hit("k").allowed
    held = lim._leases.held["k"].units
    assert held > 0
    fill(admin)
    before = writes(admin)
    spent = [lim.hit("k") for _ in range(held)]
    assert all(d.allowed and not d.fallback for d in spent), "a block held is spent"
    with pytest.raises(nl.BackendUnavailable, match="full"):
        lim.hit("k")  # a new block: refused by the full server, on_error="raise"
    for _ in range(3):
        clock.advance(0.001)
        d = deny.hit("j")
        assert not d.allowed and d.fallback
    lim.close()
    assert writes(admin) == before, "nothing was written while full"
    assert lim.peek("k", 0).fallback is False, "peeks still answer"
