"""The circuit breaker of each Redis client: an outage costs one socket timeout, not the
client's retries; while the breaker is open every check answers its on_error policy at
once; one probe at a time tests the server; the first success closes it.

Clients are built as users build them (redis-py's defaults, retries with backoff
included) and tuned (short socket timeouts), against a stopped server and a hung one
(``DEBUG SLEEP``), sync and asyncio. Times asserted are behaviour, with wide margins: a
call that waited for the client's retries takes seconds, one that did not takes at most
its socket timeout, and an answer from an open breaker does no I/O at all."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis
import redis.asyncio
from support.servers import RedisServer

import nexus_limits as nl
import nexus_limits.redis as nlr
import nexus_limits.redis.asyncio as nla
from nexus_limits.redis._breaker import MAX_COOLDOWN, Breaker, CircuitOpen

TIMEOUT = 0.3  # the tuned clients' socket timeouts


@pytest.fixture
def server():
    s = RedisServer().start()
    yield s
    s.close()


def hang(port: int, seconds: float) -> threading.Thread:
    """The server stops answering for ``seconds`` (DEBUG SLEEP blocks its event loop)."""

    def run() -> None:
        c = redis.Redis(port=port)
        c.execute_command("DEBUG", "SLEEP", seconds)
        c.close()

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.1)
    return t


def timed(call, *args):
    start = time.monotonic()
    try:
        return call(*args), time.monotonic() - start
    except nl.BackendUnavailable as error:
        return error, time.monotonic() - start


async def atimed(call, *args):
    start = time.monotonic()
    try:
        return await call(*args), time.monotonic() - start
    except nl.BackendUnavailable as error:
        return error, time.monotonic() - start


# -- the state machine, without I/O ------------------------------------------------


def test_breaker_states():
    b = Breaker()
    failure = redis.exceptions.ConnectionError("refused")
    assert b.admit() is False and b.stats() == {"breaker_open": 0, "breaker_trips": 0}
    b.failed(failure, False)
    assert b.stats() == {"breaker_open": 1, "breaker_trips": 1}
    with pytest.raises(CircuitOpen, match="refused") as err:
        b.admit()
    assert err.value.__cause__ is failure, "the failure that opened it is the cause"
    b.opened_at -= 1.0  # the cool-down is over: one probe, and only one
    assert b.admit() is True
    with pytest.raises(CircuitOpen):
        b.admit()
    b.failed(failure, True)  # the probe failed: twice as long
    assert b.wait == 2.0 and b.stats()["breaker_trips"] == 1
    for _ in range(10):
        b.opened_at -= b.wait
        assert b.admit() is True
        b.failed(redis.exceptions.TimeoutError("slow"), True)
    assert b.wait == MAX_COOLDOWN
    b.opened_at -= b.wait
    assert b.admit() is True
    b.failed(asyncio.CancelledError(), True)  # a cancelled probe teaches nothing
    assert b.admit() is True, "and lets the next call probe"
    b.failed(redis.exceptions.ResponseError("WRONGTYPE"), True)  # an answer: the server is there
    assert b.stats()["breaker_open"] == 0 and b.wait == 1.0 and b.admit() is False
    b.failed(redis.exceptions.OutOfMemoryError("full"), False)
    assert b.stats()["breaker_open"] == 0, "a full server answers: no outage of the connection"


# -- sync ----------------------------------------------------------------------------


@pytest.mark.parametrize("tuned", [False, True], ids=["default-client", "tuned-client"])
def test_stopped_server_sync(server, tuned):
    kw = {"socket_timeout": TIMEOUT, "socket_connect_timeout": TIMEOUT} if tuned else {}
    client = redis.Redis(port=server.port, **kw)
    try:
        modes = {m: nlr.TokenBucket(client, "100/s", on_error=m, prefix=m) for m in ("allow", "deny", "raise")}
        cc = nlr.Concurrency(client, 2, on_error="deny")
        tl = nlr.TokenLimiter(client, tokens="1000/minute", on_error="allow")
        for lim in modes.values():
            assert lim.hit("k").allowed
        server.stop()
        d, first = timed(modes["allow"].hit, "k")
        assert d.allowed and d.fallback
        assert first < 1.0, f"the first call waited {first:.2f}s: the client's retries were not skipped"
        assert modes["allow"].stats()["breaker_open"] == 1
        assert modes["deny"].stats()["breaker_open"] == 1, "one breaker per client"
        worst = 0.0
        for _ in range(50):
            d, took = timed(modes["deny"].hit, "k")
            assert not d.allowed and d.fallback and d.retry_after == 1.0
            worst = max(worst, took)
            err, took = timed(modes["raise"].hit, "k")
            assert isinstance(err, nl.BackendUnavailable) and "circuit breaker is open" in str(err)
            assert isinstance(err.__cause__, redis.RedisError)
            worst = max(worst, took)
        d, took = timed(cc.hit, "k")
        assert not d.allowed and d.fallback and d.lease is None
        res, took2 = timed(tl.reserve, "k", 10)
        assert res.allowed and res.decision.fallback
        worst = max(worst, took, took2)
        assert worst < 0.05, f"an answer from the open breaker took {worst * 1000:.1f} ms"
        assert modes["deny"].stats()["fail_closed"] == 50 and tl.stats()["breaker_open"] == 1

        server.start()
        deadline = time.monotonic() + 5
        d = modes["allow"].hit("k")
        while d.fallback and time.monotonic() < deadline:
            time.sleep(0.05)
            d = modes["allow"].hit("k")
        assert d.allowed and not d.fallback, "the first probe after the cool-down closes it"
        assert modes["deny"].stats()["breaker_open"] == 0 and modes["deny"].stats()["breaker_trips"] == 1
        assert not modes["raise"].hit("k").fallback and cc.hit("k").lease is not None
    finally:
        client.close()


def test_hung_server_costs_one_socket_timeout_and_one_probe_at_a_time(server):
    client = redis.Redis(port=server.port, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
    try:
        tb = nlr.TokenBucket(client, "100/s", on_error="allow")
        assert not tb.hit("k").fallback
        sleeper = hang(server.port, 4)
        d, first = timed(tb.hit, "k")
        assert d.fallback and first < TIMEOUT + 0.5, f"{first:.2f}s: one socket timeout, not the retries"
        d, took = timed(tb.hit, "k")
        assert d.fallback and took < 0.05

        # After the cool-down, of many concurrent calls one probes (and waits its socket
        # timeout); the others answer at once.
        time.sleep(1.05)
        times = []

        def call() -> None:
            times.append(timed(tb.hit, "k")[1])

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        slow = [t for t in times if t > TIMEOUT / 2]
        assert len(slow) == 1, f"one probe at a time: {sorted(times)}"
        # The probe failed: the next cool-down is 2 s, so a call 1.1 s later does not probe.
        time.sleep(1.1)
        d, took = timed(tb.hit, "k")
        assert d.fallback and took < 0.05
        sleeper.join()
        deadline = time.monotonic() + 5
        while tb.hit("k").fallback:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert tb.stats()["breaker_open"] == 0
    finally:
        client.close()


# -- asyncio -------------------------------------------------------------------------


@pytest.mark.parametrize("tuned", [False, True], ids=["default-client", "tuned-client"])
def test_stopped_server_asyncio(server, tuned):
    async def main() -> None:
        kw = {"socket_timeout": TIMEOUT, "socket_connect_timeout": TIMEOUT} if tuned else {}
        client = redis.asyncio.Redis(port=server.port, **kw)
        try:
            allow = nla.TokenBucket(client, "100/s", on_error="allow", prefix="a")
            deny = nla.SlidingWindow(client, "100/s", on_error="deny", prefix="a")
            raising = nla.Concurrency(client, 2, on_error="raise", prefix="a")
            spend = nla.SpendLimiter(client, "1.00/hour", on_error="deny", prefix="a")
            assert (await allow.hit("k")).allowed and (await raising.hit("k")).lease is not None
            server.stop()
            d, first = await atimed(allow.hit, "k")
            assert d.allowed and d.fallback
            assert first < 1.0, f"the first call waited {first:.2f}s: the client's retries were not skipped"
            worst = 0.0
            for _ in range(50):
                d, took = await atimed(deny.hit, "k")
                assert not d.allowed and d.fallback
                worst = max(worst, took)
                err, took = await atimed(raising.hit, "k")
                assert isinstance(err, nl.BackendUnavailable) and isinstance(err.__cause__, redis.RedisError)
                worst = max(worst, took)
            res = await spend.reserve("k", "gpt-4o", 100, 100)
            assert not res.allowed and spend.stats()["breaker_open"] == 1
            assert worst < 0.05, f"an answer from the open breaker took {worst * 1000:.1f} ms"
            server.start()
            deadline = time.monotonic() + 5
            d = await allow.hit("k")
            while d.fallback and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                d = await allow.hit("k")
            assert d.allowed and not d.fallback
            assert deny.stats()["breaker_open"] == 0 and deny.stats()["breaker_trips"] == 1
            assert (await raising.hit("k")).lease is not None
        finally:
            await client.aclose()

    asyncio.run(main())


def test_hung_server_asyncio(server):
    async def main() -> None:
        client = redis.asyncio.Redis(port=server.port, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
        try:
            tb = nla.FixedWindow(client, "100/s", on_error="deny")
            assert not (await tb.hit("k")).fallback
            sleeper = await asyncio.to_thread(hang, server.port, 2)
            d, first = await atimed(tb.hit, "k")
            assert d.fallback and first < TIMEOUT + 0.5
            # Concurrent calls after the cool-down: one probe, the others at once.
            await asyncio.sleep(1.05)
            results = await asyncio.gather(*(atimed(tb.hit, "k") for _ in range(8)))
            assert all(d.fallback for d, _ in results)
            assert len([t for _, t in results if t > TIMEOUT / 2]) == 1
            await asyncio.to_thread(sleeper.join)
            deadline = time.monotonic() + 5
            while (await tb.hit("k")).fallback:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            # The client's own connections were given back with their retry policy.
            conns = client.connection_pool._available_connections
            assert conns and all(c.retry.get_retries() > 0 for c in conns)
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_cancelled_probe_lets_the_next_call_probe(server):
    async def main() -> None:
        client = redis.asyncio.Redis(port=server.port, socket_timeout=2, socket_connect_timeout=2)
        try:
            tb = nla.TokenBucket(client, "100/s", on_error="allow")
            assert not (await tb.hit("k")).fallback
            sleeper = await asyncio.to_thread(hang, server.port, 1.5)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(tb.hit("k"), 0.2)  # cancelled mid-command
            await asyncio.to_thread(sleeper.join)
            d = await tb.hit("k")
            assert not d.fallback, "a cancelled call is no outage: the breaker stayed closed"
        finally:
            await client.aclose()

    asyncio.run(main())
