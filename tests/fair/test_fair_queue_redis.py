"""FairQueue over Redis limiters (a real redis-server): the order of admission, the round
trips per admission, refusals predicted without a round trip, cancellation, queues of
several "hosts" sharing one limit, leases, and exact times on a ManualClock."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import nexus_limits as nl
import nexus_limits.redis as nlr
import nexus_limits.redis.asyncio as nla
from nexus_limits.fair import FairQueue, QueueRefused


def run(coro, limit: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, limit))


def evals(client) -> int:
    """Scripts the server ran: each check is one EVALSHA (or EVAL after a NOSCRIPT)."""
    stats = client.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))


def test_asyncio_queue_serves_keys_in_turn_with_two_round_trips_per_admission(redis_client, async_redis_client):
    async def scenario():
        client = async_redis_client()
        try:
            limiter = nla.TokenBucket(client, "50/s", burst=1, prefix="fq")
            queue = FairQueue(limiter, limit_key="upstream", timeout=10)
            order = []

            async def one(key):
                await queue.acquire_async(key)
                order.append(key)

            before = evals(redis_client)
            await asyncio.gather(*[one("heavy") for _ in range(20)], *[one(f"light-{n}") for n in range(3)])
            return order, evals(redis_client) - before, queue.stats()
        finally:
            await client.aclose()

    order, trips, stats = run(scenario())
    # Every light key's one request among the first five: not behind the 20 heavy ones.
    assert sorted(order[:5]).count("heavy") <= 2 and {f"light-{n}" for n in range(3)} <= set(order[:5])
    # One check admits; at most one more, by the next head, learns how long to wait.
    assert trips <= 2 * len(order), trips
    assert stats["admitted"] == 23 and stats["waiting"] == 0


def test_threads_with_a_sync_client(redis_client):
    limiter = nlr.TokenBucket(redis_client, "40/s", burst=1, prefix="fq")
    queue = FairQueue(limiter, limit_key="upstream", timeout=10)
    lock = threading.Lock()
    order = []

    def worker(key, n):
        for _ in range(n):
            queue.acquire(key)
            with lock:
                order.append(key)

    before = evals(redis_client)
    threads = [threading.Thread(target=worker, args=("heavy", 6)) for _ in range(4)]
    threads += [threading.Thread(target=worker, args=(f"light-{n}", 2)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    trips = evals(redis_client) - before
    assert len(order) == 28 and trips <= 2 * 28 + 2
    # The light keys' four requests were done long before the heavy key's 24.
    assert max(i for i, key in enumerate(order) if key != "heavy") < 14, order


def test_a_refusal_is_predicted_without_a_round_trip(redis_client, async_redis_client):
    async def scenario():
        client = async_redis_client()
        try:
            limiter = nla.TokenBucket(client, "10/s", burst=1, prefix="fq")
            queue = FairQueue(limiter, limit_key="upstream", timeout=10)
            waiting = [asyncio.ensure_future(queue.acquire_async("a")) for _ in range(6)]
            for _ in range(200):  # until the head has checked: the lane knows the limit's state
                if queue.waiting() == 5 and queue.stats()["admitted"] == 1:
                    break
                await asyncio.sleep(0.001)
            before = evals(redis_client)
            started = time.monotonic()
            with pytest.raises(QueueRefused) as refused:
                await queue.acquire_async("a", timeout=0.3)  # 5 waiting and itself: about 0.6 s
            elapsed = time.monotonic() - started
            trips = evals(redis_client) - before
            await asyncio.gather(*waiting)
            return refused.value, elapsed, trips
        finally:
            await client.aclose()

    error, elapsed, trips = run(scenario())
    assert trips == 0 and elapsed < 0.05
    assert 0.45 < error.retry_after <= 0.61 and error.reason == "deadline"


def test_a_cancelled_waiter_leaves_and_the_next_one_moves_up(async_redis_client):
    async def scenario():
        client = async_redis_client()
        try:
            limiter = nla.TokenBucket(client, "2/s", burst=1, prefix="fq")
            queue = FairQueue(limiter, limit_key="upstream", timeout=10)
            await queue.acquire_async("a")
            first = asyncio.ensure_future(queue.acquire_async("a"))
            second = asyncio.ensure_future(queue.acquire_async("b"))
            for _ in range(200):
                if queue.waiting() == 2:
                    break
                await asyncio.sleep(0.001)
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            assert queue.waiting() == 1
            started = time.monotonic()
            await second
            return time.monotonic() - started, queue.stats()
        finally:
            await client.aclose()

    waited, stats = run(scenario())
    assert waited < 0.8 and stats["cancelled"] == 1 and stats["waiting"] == 0


def test_queues_on_several_hosts_share_one_limit_exactly(redis_server):
    """Three queues with their own clients (three hosts, as far as Redis can tell) over one
    Redis limit: together they never pass it, and each gets a share."""
    import redis

    clients = [redis.Redis(port=redis_server.port, socket_timeout=5) for _ in range(3)]
    clients[0].flushall()
    queues = [
        FairQueue(nlr.TokenBucket(c, "30/s", burst=1, prefix="fq"), limit_key="upstream", timeout=5) for c in clients
    ]
    lock = threading.Lock()
    admitted = {0: [], 1: [], 2: []}

    def worker(n):
        for _ in range(15):
            queues[n].acquire(f"host-{n}")
            with lock:
                admitted[n].append(time.monotonic())

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    times = sorted(t for ts in admitted.values() for t in ts)
    assert len(times) == 45
    for i, t in enumerate(times):
        assert sum(1 for u in times[i:] if u < t + 1.0) <= 31
    assert times[-1] - times[0] > 44 / 30 - 0.1  # the limit held them back
    for client in clients:
        client.close()


def test_a_redis_concurrency_lease_goes_to_the_next_in_turn(async_redis_client):
    async def scenario():
        client = async_redis_client()
        try:
            limiter = nla.Concurrency(client, 1, prefix="fq")
            queue = FairQueue(limiter, limit_key="model", timeout=10)
            held = await queue.acquire_async("first")
            order = []

            async def one(key):
                lease = await queue.acquire_async(key)
                order.append(key)
                await lease.release()

            tasks = [asyncio.ensure_future(one(k)) for k in ("A", "A", "B")]
            for _ in range(200):
                if queue.waiting() == 3:
                    break
                await asyncio.sleep(0.001)
            await held.release()
            await asyncio.gather(*tasks)
            return order
        finally:
            await client.aclose()

    assert run(scenario()) == ["A", "B", "A"]


def test_a_sync_client_from_asyncio_does_not_block_the_loop(redis_client):
    limiter = nlr.TokenBucket(redis_client, "20/s", burst=1, prefix="fq")
    queue = FairQueue(limiter, limit_key="upstream", timeout=10)

    async def scenario():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        tick = asyncio.ensure_future(ticker())
        await asyncio.gather(*[queue.acquire_async(k) for k in ("a", "b", "a", "b", "c")])
        tick.cancel()
        return ticks

    assert run(scenario()) > 20  # the loop kept turning through 0.2 s of waits


def test_exact_times_on_a_manual_clock(redis_client, async_redis_client):
    clock = nl.ManualClock(1_000_000.0)

    async def scenario():
        client = async_redis_client()
        try:
            limiter = nla.TokenBucket(client, "10/s", burst=1, prefix="fq", clock=clock)
            queue = FairQueue(limiter, limit_key="upstream", timeout=10)
            admitted = []

            async def one(key):
                await queue.acquire_async(key)
                admitted.append((key, round(clock.now - 1_000_000.0, 6)))

            await asyncio.gather(*[one("A") for _ in range(4)], *[one("B") for _ in range(2)])
            with pytest.raises(QueueRefused) as refused:
                await asyncio.gather(*[queue.acquire_async("C", timeout=0.25) for _ in range(4)])
            return admitted, refused.value
        finally:
            await client.aclose()

    admitted, error = run(scenario())
    # All queued at once (the first check is a round trip, so all six wait in the queue):
    # in turn, 0.1 s apart.
    assert admitted == [("A", 0.0), ("B", 0.1), ("A", 0.2), ("B", 0.3), ("A", 0.4), ("A", 0.5)]
    assert error.reason == "deadline"


def test_a_redis_outage_reaches_the_waiters_and_leaves_the_queue_empty():
    import redis
    from support.servers import RedisServer

    server = RedisServer().start()
    try:
        client = redis.Redis(port=server.port, socket_timeout=0.2, socket_connect_timeout=0.2)
        raising = FairQueue(nlr.TokenBucket(client, "10/s", burst=1, prefix="fq"), limit_key="upstream", timeout=5)
        failing_closed = FairQueue(
            nlr.TokenBucket(client, "10/s", burst=1, prefix="fq", on_error="deny"), limit_key="upstream", timeout=0.5
        )
        assert raising.acquire("k").allowed
        server.stop()
        with pytest.raises(nl.BackendUnavailable):
            raising.acquire("k")
        # Failing closed, the store's answer is "retry in 1 s": past the deadline, so refused at once.
        with pytest.raises(QueueRefused) as refused:
            failing_closed.acquire("k")
        assert refused.value.retry_after == pytest.approx(1.0)
        for queue in (raising, failing_closed):
            stats = queue.stats()
            assert stats["waiting"] == 0 and stats["lanes"] == 0
        assert raising.stats()["errors"] == 1
        client.close()
    finally:
        server.close()
