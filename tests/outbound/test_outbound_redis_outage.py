"""Issue 19 with issue 17's outage rules: the outbound limiter on Redis when Redis goes
away, with redis-py clients built as users build them (default retries; no socket
timeouts at all, or short ones) and the official openai SDK.

A real redis-server is stopped in the middle of a run and started again, or made to
hang with ``DEBUG SLEEP``. Each SDK call completes as its ``on_error`` policy says —
sent unmetered ("allow"), refused with a 429 the SDK does not retry ("deny"), raised
("raise"), metered in this process against the limits divided by ``replicas``
("local") — within a bounded time: the first call that meets the outage waits at most
the client's socket timeouts (not its retries), and while the breaker is open the
ledger answers without I/O. When the server is back the breaker closes and the
shared buckets on Redis are used again. Times asserted are behaviour with wide
margins: a call that waited for redis-py's retries takes seconds."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from typing import Any, List

import openai
import pytest
import redis
import redis.asyncio
from support.outbound_provider import OutboundProvider, serve
from support.servers import RedisServer

import nexus_limits as nl
from nexus_limits import outbound
from nexus_limits.outbound._redis import RedisLedger
from nexus_limits.tokens import count_request_tokens

WINDOW = 2.0
MODEL = "gpt-4o"
# A request stays counted for 0.6 s: long enough to see it on Redis.
RATES = {"requests": nl.Rate(100, 60), "tokens": nl.Rate(10**6, WINDOW)}
LIMITS = {MODEL: {"requests": "100/minute", "tokens": f"1000000/{WINDOW:g}s"}}
TIMEOUT = 0.3  # the tuned clients' socket timeouts


@pytest.fixture
def server():
    s = RedisServer().start()
    yield s
    s.close()


@pytest.fixture(scope="module")
def provider():
    prov = OutboundProvider({MODEL: {"requests": 1000, "tokens": 10**6}}, window=WINDOW)
    with serve(prov) as srv:
        yield srv.url + "/v1"


@pytest.fixture(autouse=True)
def warm():
    count_request_tokens({"model": MODEL, "messages": [{"role": "user", "content": "warm"}]})


def ask(client: Any, i: int = 0) -> Any:
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"question {i}"}], max_tokens=5
    )


def timed(call: Any, *args: Any) -> Any:
    start = time.monotonic()
    try:
        return call(*args), time.monotonic() - start
    except Exception as error:
        return error, time.monotonic() - start


def shared_usage(port: int) -> float:
    """What another host sees on Redis of the model's requests bucket."""
    probe = redis.Redis(port=port)
    try:
        return RedisLedger(probe).used(MODEL, RATES)["requests"]
    finally:
        probe.close()


def wait_closed(call: Any, limiter: outbound.OutboundLimiter) -> None:
    """Calls until the breaker has closed again (it probes after its cool-down)."""
    deadline = time.monotonic() + 10
    while limiter.stats()["redis"]["breaker_open"] and time.monotonic() < deadline:
        call()
        time.sleep(0.1)
    assert not limiter.stats()["redis"]["breaker_open"], "the breaker did not close after the restart"


def open_answers(limiter: outbound.OutboundLimiter) -> List[float]:
    """The time of the ledger's admission steps while the breaker is open (what each
    call pays before it is sent: the pause check and the charge)."""
    ledger = limiter.ledger
    times = []
    for _ in range(50):
        start = time.perf_counter()
        try:
            ledger.paused(MODEL)
            ledger.charge(MODEL, RATES, {"requests": 1, "tokens": 10})
        except Exception as error:
            assert isinstance(error, (nl.BackendUnavailable, outbound.StoreUnavailable)), error
        times.append(time.perf_counter() - start)
    return times


# -- a stopped server, sync ------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["allow", "deny", "raise", "local"])
@pytest.mark.parametrize("tuned", [False, True], ids=["default-client", "tuned-client"])
def test_stopped_server_each_policy_sync(server, provider, policy, tuned):
    url = provider
    kw = {"socket_timeout": TIMEOUT, "socket_connect_timeout": TIMEOUT} if tuned else {}
    store = redis.Redis(host="127.0.0.1", port=server.port, **kw)
    client = outbound.wrap(
        openai.OpenAI(api_key="sk-test", base_url=url), store=store, limits=LIMITS, window=WINDOW, on_error=policy
    )
    limiter = outbound.limiter_of(client)
    try:
        for i in range(3):
            assert ask(client, i).usage.completion_tokens == 5
        assert shared_usage(server.port) >= 3, "the calls are counted on Redis"
        assert limiter.stats()["redis"]["breaker_open"] == 0

        server.stop()
        result, first = timed(ask, client, 10)
        # redis-py's default retries would make this seconds.
        assert first < 1.0, f"the first call took {first:.2f} s"
        if policy in ("allow", "local"):
            assert result.usage.completion_tokens == 5, result
        elif policy == "deny":
            assert isinstance(result, openai.RateLimitError), result
            assert "on_error='deny'" in result.message and "could not be reached" in result.message
            assert result.response.headers["x-nexus-limits-refused"] == "store_unavailable"
        else:
            # The SDK lets the transport's own errors through, unretried.
            assert isinstance(result, nl.BackendUnavailable), result
            assert "could not be reached" in str(result) and isinstance(result.__cause__, redis.RedisError)
        stats = limiter.stats()["redis"]
        assert stats["on_error"] == policy and stats["breaker_open"] == 1 and stats["breaker_trips"] == 1
        assert stats["errors"] >= 1
        if policy != "raise":
            assert stats["fallbacks"] >= 1
            assert stats[{"allow": "fail_open", "deny": "fail_closed", "local": "fail_local"}[policy]] >= 1

        # While the breaker is open the ledger does no I/O.
        times = open_answers(limiter)
        median = statistics.median(times)
        print(f"\n{policy}: first call {first * 1000:.0f} ms, ledger steps while open: median {median * 1e6:.0f} us")
        assert median < 0.001 and max(times) < 0.05, f"median {median * 1e3:.2f} ms, worst {max(times) * 1e3:.1f} ms"
        for i in range(3):  # and SDK calls keep answering by the policy, promptly
            result, took = timed(ask, client, 20 + i)
            assert took < 0.5
            assert (policy in ("allow", "local")) == (not isinstance(result, Exception)), result

        server.start()
        wait_closed(lambda: timed(ask, client, 30), limiter)
        before = shared_usage(server.port)
        assert ask(client, 40).usage.completion_tokens == 5
        assert shared_usage(server.port) > before, "after the restart the shared buckets are used again"
    finally:
        client.close()
        store.close()


def test_local_fallback_divides_the_limits_by_replicas(server):
    """While Redis is away, on_error="local" meters in this process against each limit
    divided by replicas: 4 requests per 2 s here (8 / 2), so 8 calls take at least 2 s
    where the whole limit (8) would have let them go at once."""
    prov = OutboundProvider({MODEL: {"requests": 1000, "tokens": 10**6}}, window=WINDOW)
    store = redis.Redis(host="127.0.0.1", port=server.port)
    with serve(prov) as srv:
        client = outbound.wrap(
            openai.OpenAI(api_key="sk-test", base_url=srv.url + "/v1"),
            store=store,
            limits={MODEL: {"requests": f"8/{WINDOW:g}s", "tokens": "1000000/2s"}},
            window=WINDOW,
            on_error="local",
            replicas=2,
        )
        try:
            server.stop()
            start = time.monotonic()
            for i in range(8):
                assert ask(client, i).usage.completion_tokens == 5
            took = time.monotonic() - start
            assert 1.5 <= took < 6.0, f"8 calls took {took:.2f} s against a local share of 4 per 2 s"
            stats = outbound.limiter_of(client).stats()
            assert stats["redis"]["fail_local"] >= 8 and stats["redis"]["replicas"] == 2
            assert stats["models"][MODEL]["waited_seconds"] > 1.0
        finally:
            client.close()
            store.close()


def test_on_error_and_replicas_are_checked():
    with pytest.raises(ValueError, match="on_error must be one of"):
        outbound.OutboundLimiter(store=redis.Redis(port=1), on_error="ignore")
    with pytest.raises(ValueError, match="replicas must be at least 1"):
        outbound.OutboundLimiter(store=redis.Redis(port=1), on_error="local", replicas=0)
    with pytest.raises(TypeError, match="replicas must be a positive int"):
        outbound.OutboundLimiter(store=redis.Redis(port=1), replicas=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="apply only when store= is a Redis client"):
        outbound.OutboundLimiter(on_error="local")
    with pytest.raises(ValueError, match="apply only when store= is a Redis client"):
        outbound.LimitedTransport(replicas=3)


def test_a_script_error_is_not_an_outage(server):
    """A key of the wrong type is a bug to see, not an outage to paper over: it raises
    whatever on_error says, and the breaker stays closed."""
    store = redis.Redis(port=server.port)
    try:
        ledger = RedisLedger(store, on_error="allow")
        key = ledger._keys(MODEL, ["requests"])[0]
        store.lpush(key, "x")
        with pytest.raises(redis.ResponseError):
            ledger.take(MODEL, RATES, {"requests": 1})
        assert ledger.stats()["breaker_open"] == 0 and ledger.stats()["errors"] == 0
    finally:
        store.close()


# -- a hung server (DEBUG SLEEP) --------------------------------------------------------------


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


def test_hung_server_sync_costs_one_socket_timeout(server, provider):
    url = provider
    store = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
    client = outbound.wrap(
        openai.OpenAI(api_key="sk-test", base_url=url), store=store, limits=LIMITS, window=WINDOW, on_error="allow"
    )
    limiter = outbound.limiter_of(client)
    try:
        assert ask(client).usage.completion_tokens == 5
        sleeper = hang(server.port, 3)
        result, first = timed(ask, client, 1)
        assert result.usage.completion_tokens == 5
        # One socket timeout (0.3 s) and the provider's answer; redis-py's retries
        # (with backoff) would hold it past the server's 3 s sleep.
        assert first < 1.0, f"the first call waited {first:.2f} s"
        times = open_answers(limiter)
        print(
            f"\nDEBUG SLEEP, sync: first call {first * 1000:.0f} ms, while open {statistics.median(times) * 1e6:.0f} us"
        )
        assert statistics.median(times) < 0.001 and max(times) < 0.05
        for i in range(5):
            result, took = timed(ask, client, 2 + i)
            assert result.usage.completion_tokens == 5 and took < 0.5
        sleeper.join(10)
        wait_closed(lambda: timed(ask, client, 9), limiter)
        before = shared_usage(server.port)
        assert ask(client, 10).usage.completion_tokens == 5
        assert shared_usage(server.port) > before
        assert limiter.stats()["redis"]["breaker_trips"] >= 1
    finally:
        client.close()
        store.close()


# -- asyncio ------------------------------------------------------------------------------------


async def aask(client: Any, i: int = 0) -> Any:
    return await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"question {i}"}], max_tokens=5
    )


async def atimed(coro: Any) -> Any:
    start = time.monotonic()
    try:
        return await coro, time.monotonic() - start
    except Exception as error:
        return error, time.monotonic() - start


async def await_closed(client: Any, limiter: outbound.OutboundLimiter) -> None:
    deadline = time.monotonic() + 10
    while limiter.stats()["redis"]["breaker_open"] and time.monotonic() < deadline:
        await atimed(aask(client))
        await asyncio.sleep(0.1)
    assert not limiter.stats()["redis"]["breaker_open"], "the breaker did not close after the restart"


@pytest.mark.parametrize("policy", ["deny", "local"])
def test_stopped_server_asyncio_default_client(server, provider, policy):
    url = provider

    async def main() -> None:
        store = redis.asyncio.Redis(host="127.0.0.1", port=server.port)
        client = outbound.wrap(
            openai.AsyncOpenAI(api_key="sk-test", base_url=url),
            store=store,
            limits=LIMITS,
            window=WINDOW,
            on_error=policy,
            replicas=2,
        )
        limiter = outbound.limiter_of(client)
        try:
            results = await asyncio.gather(*[aask(client, i) for i in range(5)])
            assert [r.usage.completion_tokens for r in results] == [5] * 5
            server.stop()
            # 20 coroutines meet the outage at once: each answers by the policy, at once.
            start = time.monotonic()
            outcomes = await asyncio.gather(*[aask(client, 10 + i) for i in range(20)], return_exceptions=True)
            took = time.monotonic() - start
            assert took < 2.0, f"20 calls during the outage took {took:.2f} s"
            if policy == "local":
                assert all(r.usage.completion_tokens == 5 for r in outcomes), outcomes
            else:
                assert all(isinstance(r, openai.RateLimitError) for r in outcomes), outcomes
                assert all("on_error='deny'" in r.message for r in outcomes)
            stats = limiter.stats()["redis"]
            assert stats["breaker_open"] == 1 and stats["fallbacks"] >= 20
            server.start()
            await await_closed(client, limiter)
            before = shared_usage(server.port)
            assert (await aask(client, 40)).usage.completion_tokens == 5
            assert shared_usage(server.port) > before, "after the restart the shared buckets are used again"
        finally:
            await client.close()
            await store.aclose()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_hung_server_asyncio_costs_one_socket_timeout(server, provider):
    url = provider

    async def main() -> None:
        store = redis.asyncio.Redis(
            host="127.0.0.1", port=server.port, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT
        )
        client = outbound.wrap(
            openai.AsyncOpenAI(api_key="sk-test", base_url=url),
            store=store,
            limits=LIMITS,
            window=WINDOW,
            on_error="local",
        )
        limiter = outbound.limiter_of(client)
        try:
            assert (await aask(client)).usage.completion_tokens == 5
            sleeper = hang(server.port, 3)
            result, first = await atimed(aask(client, 1))
            assert result.usage.completion_tokens == 5
            assert first < 1.0, f"the first call waited {first:.2f} s"
            print(f"\nDEBUG SLEEP, asyncio: first call {first * 1000:.0f} ms")
            for i in range(5):
                result, took = await atimed(aask(client, 2 + i))
                assert result.usage.completion_tokens == 5 and took < 0.5
            assert limiter.stats()["redis"]["breaker_open"] == 1
            await asyncio.get_running_loop().run_in_executor(None, sleeper.join, 10)
            await await_closed(client, limiter)
            before = shared_usage(server.port)
            assert (await aask(client, 10)).usage.completion_tokens == 5
            assert shared_usage(server.port) > before
        finally:
            await client.close()
            await store.aclose()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_local_share_while_redis_is_away():
    """The in-process ledger of on_error="local": each limit divided by replicas; a call
    above a share but within the whole limit goes when the share is full and leaves it
    in debt; one above the whole limit never fits (as on Redis); the provider's counts
    (every replica's) count for a replica's share."""
    import math

    from nexus_limits.outbound._redis import _Shares

    shares = _Shares(4)
    rates = {"requests": nl.Rate(8, 60), "tokens": nl.Rate(1000, 60)}
    assert shares.take("m", rates, {"requests": 1, "tokens": 1001}) == math.inf
    assert shares.take("m", rates, {"requests": 1, "tokens": 600}) == 0
    used = shares.used("m", rates)
    assert round(used["tokens"]) == 600 and round(used["requests"]) == 1
    wait = shares.take("m", rates, {"requests": 1, "tokens": 10})
    assert 80 < wait < 90, "600 + 10 tokens against a share of 250 per minute: (610 - 250) / (250 / 60 s)"
    assert shares.sync("m", rates, {"requests": (6.0, 8.0)}) == 1, "8 of 8 counted by the provider: 2 of this share"
    assert round(shares.used("m", rates)["requests"]) == 2
    shares.pause("m", 5)
    assert 4 < shares.paused("m") <= 5
