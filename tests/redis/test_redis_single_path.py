"""The single-check path: a check of cost 1 on the server's clock is one EVALSHA whose
bytes are packed once (but for the key), sent on the limiters' own connections.

It must be exactly the command redis-py would send, one command per check, survive a
server restart without opening the breaker (an idle connection the server closed is
noticed before it is used), and never share a socket with a forked child."""

from __future__ import annotations

import asyncio
import os

import pytest
import redis
import redis.asyncio
from redis.connection import Connection
from support.servers import RedisServer

import nexus_limits as nl
import nexus_limits.redis as nlr
import nexus_limits.redis.asyncio as nla

KEYS = ["plain", "with space", "{braces}", "ünïcödé", b"\x00bytes\xff", 12345, -7, "a" * 1024, ""]


@pytest.fixture
def server():
    s = RedisServer().start()
    yield s
    s.close()


@pytest.mark.parametrize("kind", ["TokenBucket", "LeakyBucket", "FixedWindow", "SlidingWindow"])
def test_packed_bytes_are_what_redis_py_sends(redis_client, kind):
    lim = getattr(nlr, kind)(redis_client, "10/minute", prefix="p:x/y", name="n-1.2")
    conn = Connection()
    for key in KEYS:
        for mode in ("hit", "peek"):
            keys, packed = lim._plan.unit_call(mode, key)
            assert keys == [lim.redis_key(key), lim.redis_key(key) + ":q"]
            sha = lim._script.for_mode(mode).sha
            expected = b"".join(conn.pack_command("EVALSHA", sha, 2, *keys, *lim._plan.unit))
            assert packed == expected, (key, mode)


def test_one_command_per_check_and_the_same_answers_as_the_slow_path(redis_client):
    fast = nlr.TokenBucket(redis_client, "10/minute", prefix="f")
    clock = nl.ManualClock(1_700_000_000.0)
    slow = nlr.TokenBucket(redis_client, "10/minute", prefix="s", clock=clock)
    fast.peek("warm"), fast.hit("warm"), slow.hit("warm")  # the scripts are loaded
    redis_client.config_resetstat()
    for key in KEYS:
        got = [fast.hit(key) for _ in range(11)]
        want = [slow.hit(key) for _ in range(11)]
        assert [d.allowed for d in got] == [d.allowed for d in want] == [True] * 10 + [False]
        assert [d.remaining for d in got] == [d.remaining for d in want]
        assert fast.peek(key).remaining == 0
    stats = redis_client.info("commandstats")
    checks = len(KEYS) * (12 + 11)
    assert stats["cmdstat_evalsha"]["calls"] == checks, "one EVALSHA per check"
    inside = {"cmdstat_time", "cmdstat_get", "cmdstat_set"}  # what the scripts run
    assert set(stats) - inside == {"cmdstat_evalsha", "cmdstat_config|resetstat"}, "no PING, no SCRIPT LOAD"


def test_noscript_after_a_flush_is_loaded_again(redis_client):
    tb = nlr.TokenBucket(redis_client, "10/minute")
    assert tb.hit("k").remaining == 9
    redis_client.script_flush()
    assert tb.hit("k").remaining == 8
    assert tb.peek("k").remaining == 7, "what a hit would leave"


@pytest.mark.parametrize("tuned", [False, True], ids=["default-client", "tuned-client"])
def test_a_restart_does_not_open_the_breaker(server, tuned):
    kw = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5} if tuned else {}
    client = redis.Redis(port=server.port, **kw)
    try:
        tb = nlr.TokenBucket(client, "10/minute", on_error="deny")
        assert tb.hit("k").allowed
        server.stop()
        server.start()
        d = tb.hit("k")
        assert d.allowed and not d.fallback, "the closed idle connection was replaced before use"
        assert tb.stats()["breaker_trips"] == 0 and tb.stats()["errors"] == 0
        assert d.remaining == 9, "a fresh server"
    finally:
        client.close()


def test_a_forked_child_uses_its_own_connections(redis_client):
    tb = nlr.FixedWindow(redis_client, "100000/hour", prefix="fork")
    assert tb.hit("parent").allowed  # the parent has an idle connection now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: checks while the parent does too
        ok = 1
        try:
            for i in range(300):
                d = tb.hit("child")
                ok &= d.allowed and d.remaining == 100000 - 1 - i
        except BaseException:
            ok = 0
        os.write(write, bytes([ok]))
        os._exit(0)
    os.close(write)
    for i in range(300):
        d = tb.hit("parent")
        assert d.allowed and d.remaining == 100000 - 2 - i, "no reply meant for the child"
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 1) == b"\x01" and status == 0
    os.close(read)
    assert tb.peek("child").remaining == 100000 - 301, "what a hit would leave"


def test_asyncio_packed_check(async_redis_client, redis_client):
    async def main() -> None:
        client = async_redis_client()
        try:
            tb = nla.SlidingWindow(client, "5/minute", prefix="a")
            await tb.peek("warm"), await tb.hit("warm")  # the scripts are loaded
            redis_client.config_resetstat()
            got = [await tb.hit(key) for key in KEYS for _ in range(6)]
            assert [d.allowed for d in got] == ([True] * 5 + [False]) * len(KEYS)
            assert (await tb.peek("plain")).remaining == 0
            assert redis_client.info("commandstats")["cmdstat_evalsha"]["calls"] == 6 * len(KEYS) + 1
            redis_client.script_flush()
            assert not (await tb.hit("plain")).allowed
        finally:
            await client.aclose()

    asyncio.run(main())
