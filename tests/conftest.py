from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import nexus_limits as nl

NS = 1_000_000_000


def as_tuple(d: nl.Decision) -> tuple:
    """A Decision in the reference's units: times in integer ns, None for never."""
    to_ns = lambda s: round(s * NS)  # noqa: E731
    retry = None if d.retry_after == float("inf") else to_ns(d.retry_after)
    return (d.allowed, d.limit, d.remaining, to_ns(d.reset_after), retry, to_ns(d.delay))


@pytest.fixture
def clock() -> nl.ManualClock:
    return nl.ManualClock(0.0)


@pytest.fixture(scope="session")
def redis_server():
    """One Redis server for the session (tests that stop servers start their own)."""
    from support.servers import RedisServer

    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def redis_client(redis_server):
    import redis

    client = redis.Redis(port=redis_server.port, socket_timeout=5)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def async_redis_client(redis_server):
    import redis.asyncio

    redis.Redis(port=redis_server.port).flushall()
    return lambda: redis.asyncio.Redis(port=redis_server.port, socket_timeout=5)


@pytest.fixture(scope="session")
def redis_cluster():
    from support.servers import RedisCluster

    cluster = RedisCluster().start()
    yield cluster
    cluster.close()
