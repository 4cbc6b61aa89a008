"""FairQueue on asyncio (and its rules, whatever the runtime): admission order across
keys, weights, refusals with the time needed, deadlines, cancellation, a full queue,
every kind of limiter, hostile arguments, and an ASGI client that leaves while it waits.

Timing-sensitive tests use a ManualClock: the queue moves it to the next time one of its
waiters waits for once all of them are blocked, so admissions happen at exact times."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import httpx
import pytest
from support.servers import ASGIServer

import nexus_limits as nl
from nexus_limits.fair import CancelToken, FairQueue, QueueCancelled, QueueRefused


def run(coro, limit: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, limit))


async def admit_all(queue, requests, clock, **kw):
    """Queues every (key, cost) at the current time; returns [(key, index, time admitted)]
    in admission order, and the refusals by index."""
    admitted, refused = [], {}

    async def one(i, key, cost):
        try:
            await queue.acquire_async(key, cost, **kw)
        except QueueRefused as error:
            refused[i] = error
            return
        admitted.append((key, i, round(clock.now, 9)))

    await asyncio.gather(*(one(i, key, cost) for i, (key, cost) in enumerate(requests)))
    return admitted, refused


# ---- order ---------------------------------------------------------------------------


def test_a_shared_limit_serves_waiting_keys_in_turn(clock):
    queue = FairQueue(nl.TokenBucket("10/s", burst=1, clock=clock), limit_key="upstream", timeout=10)
    requests = [("A", 1)] * 6 + [("B", 1)] * 2
    admitted, refused = run(admit_all(queue, requests, clock))
    assert not refused
    assert [key for key, _, _ in admitted] == ["A", "A", "B", "A", "B", "A", "A", "A"]
    assert [t for _, _, t in admitted] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    # Within a key, arrival order.
    assert [i for key, i, _ in admitted if key == "A"] == [0, 1, 2, 3, 4, 5]
    stats = queue.stats()
    assert stats["admitted"] == 8 and stats["admitted_at_once"] == 1 and stats["waiting"] == 0
    assert stats["lanes"] == 0 and stats["keys"] == 0


def test_a_plain_fifo_is_one_key(clock):
    """The same requests all under one key wait in arrival order: the FIFO the benchmark
    compares with."""
    queue = FairQueue(nl.TokenBucket("10/s", burst=1, clock=clock), limit_key="upstream", timeout=10)
    admitted, _ = run(admit_all(queue, [("everyone", 1)] * 8, clock))
    assert [i for _, i, _ in admitted] == list(range(8))


def test_a_key_with_a_thousand_waiting_does_not_delay_a_key_with_one(clock):
    queue = FairQueue(nl.TokenBucket("1000/s", burst=1, clock=clock), limit_key="upstream", timeout=10)
    requests = [("heavy", 1)] * 1000 + [("light", 1)]
    admitted, refused = run(admit_all(queue, requests, clock), limit=120)
    assert not refused
    light = [t for key, _, t in admitted if key == "light"]
    heavy = [t for key, _, t in admitted if key == "heavy"]
    # The light request arrived with 999 heavy ones waiting: it goes second.
    assert light == [0.002]
    assert heavy[-1] == pytest.approx(1.0)
    # FIFO, for contrast: the same request behind the thousand waits a whole second.
    fifo = FairQueue(nl.TokenBucket("1000/s", burst=1, clock=clock), limit_key="upstream", timeout=10)
    start = clock.now
    admitted, _ = run(admit_all(fifo, [("everyone", 1)] * 1001, clock), limit=120)
    assert admitted[-1][1] == 1000 and admitted[-1][2] - start == pytest.approx(1.0)


def test_a_key_that_comes_back_is_not_charged_for_its_past(clock):
    """A key that had nothing waiting starts at the lane's time: a key that waited a lot
    earlier is not held back later for it."""
    queue = FairQueue(nl.TokenBucket("10/s", burst=1, clock=clock), limit_key="upstream", timeout=30)
    run(admit_all(queue, [("A", 1)] * 10, clock))
    admitted, _ = run(admit_all(queue, [("B", 1)] * 3 + [("A", 1)] * 3, clock))
    assert [key for key, _, _ in admitted] == ["B", "A", "B", "A", "B", "A"]


def test_weights_are_shares_while_keys_compete(clock):
    queue = FairQueue(nl.TokenBucket("10/s", burst=1, clock=clock), {"gold": 3}, limit_key="upstream", timeout=30)
    admitted, _ = run(admit_all(queue, [("gold", 1)] * 12 + [("silver", 1)] * 12, clock))
    first = [key for key, _, _ in admitted[:16]]
    assert first.count("gold") == 12 and first.count("silver") == 4
    # Over any stretch where both wait, three gold for one silver.
    window = [key for key, _, _ in admitted[1:9]]
    assert window.count("gold") == 6 and window.count("silver") == 2


def test_a_weight_per_call_and_a_weight_function(clock):
    queue = FairQueue(
        nl.TokenBucket("10/s", burst=1, clock=clock),
        lambda key: 4.0 if key.startswith("vip-") else None,
        limit_key="upstream",
        timeout=30,
    )
    admitted, _ = run(admit_all(queue, [("vip-1", 1)] * 8 + [("std", 1)] * 8, clock))
    # After the first (admitted on arrival), four vip requests for each standard one.
    assert [key for key, _, _ in admitted[1:6]] == ["vip-1"] * 4 + ["std"]

    async def per_call():
        order = []

        async def one(key, weight):
            await queue.acquire_async(key, weight=weight)
            order.append(key)

        await asyncio.gather(*[one("x", 1.0) for _ in range(6)], *[one("y", 2.0) for _ in range(6)])
        return order

    order = run(per_call())
    assert order[1:7].count("y") == 4


def test_costs_are_weighed(clock):
    """A key sending cost 4 gets a quarter as many requests through as a key sending cost 1:
    fairness is in units."""
    queue = FairQueue(nl.TokenBucket("10/s", burst=4, clock=clock), limit_key="upstream", timeout=60)
    clock.advance(0)
    queue.limiter.hit("upstream", cost=4)  # empty: every request waits
    admitted, _ = run(admit_all(queue, [("big", 4)] * 4 + [("small", 1)] * 16, clock))
    first = [key for key, _, _ in admitted[:10]]
    units = {"big": 4 * first.count("big"), "small": first.count("small")}
    assert abs(units["big"] - units["small"]) <= 4, first


# ---- refusals ---------------------------------------------------------------------------


def test_a_request_that_cannot_make_its_deadline_is_refused_at_once_with_the_time_needed(clock):
    queue = FairQueue(nl.TokenBucket("10/s", burst=1, clock=clock), limit_key="upstream", timeout=10)

    async def scenario():
        waiting = [asyncio.ensure_future(queue.acquire_async("A")) for _ in range(5)]  # at 0, 0.1 ... 0.4
        await asyncio.sleep(0)
        assert queue.waiting() == 4
        before = clock.now
        with pytest.raises(QueueRefused) as refused:
            await queue.acquire_async("A", timeout=0.45)  # 5 units ahead of it and its own: 0.5 s
        assert clock.now == before  # refused without waiting
        error = refused.value
        assert error.retry_after == pytest.approx(0.5) and error.reason == "deadline"
        assert isinstance(error, nl.RateLimitExceeded) and error.key == "A" and error.timeout == 0.45
        assert "0.5 s" in str(error) and "0.45" in str(error)
        ok = asyncio.ensure_future(queue.acquire_async("A", timeout=0.5))  # exactly in time: admitted at 0.5
        await asyncio.gather(*waiting, ok)
        return ok.result()

    decision = run(scenario())
    assert decision.allowed and clock.now == pytest.approx(0.5)
    assert queue.stats()["refused_at_once"] == 1 and queue.stats()["refused"] == 1


def test_the_first_request_refused_needs_what_the_limiter_says(clock):
    tb = nl.TokenBucket("1/minute", clock=clock)
    queue = FairQueue(tb, timeout=5)

    async def scenario():
        await queue.acquire_async("k")
        with pytest.raises(QueueRefused) as refused:
            await queue.acquire_async("k")
        return refused.value

    error = run(scenario())
    assert error.retry_after == pytest.approx(60.0) and error.decision.limit == 1
    assert clock.now == 0.0 and queue.stats()["waiting"] == 0


def test_a_cost_above_the_capacity_is_refused_at_once_as_never(clock):
    queue = FairQueue(nl.TokenBucket("10/s", burst=5, clock=clock), limit_key="upstream", timeout=math.inf)

    async def scenario():
        errors = []
        for _ in range(2):  # with nobody waiting, then with someone waiting
            with pytest.raises(QueueRefused) as refused:
                await queue.acquire_async("k", cost=6)
            errors.append(refused.value)
            queue.limiter.hit("upstream", cost=5)
            waiting = asyncio.ensure_future(queue.acquire_async("other"))
            await asyncio.sleep(0)
        await waiting
        return errors

    for error in run(scenario()):
        assert error.reason == "never" and math.isinf(error.retry_after)
        assert "can never be admitted" in str(error)


def test_waiters_pushed_back_are_refused_as_soon_as_they_cannot_make_it(clock):
    """Five requests of one key fit their 0.6 s deadline when they arrive; three other keys
    then come ahead of the last ones, which no longer can: they are refused then, with the
    time they would need, not at their deadline."""
    queue = FairQueue(nl.TokenBucket("10/s", burst=1, clock=clock), limit_key="upstream", timeout=10)

    async def scenario():
        refused_at = {}

        async def heavy(i):
            try:
                await queue.acquire_async("heavy", timeout=0.6)
            except QueueRefused as error:
                refused_at[i] = (clock.now, error)

        tasks = [asyncio.ensure_future(heavy(i)) for i in range(6)]  # 0.0 ... 0.5
        await asyncio.sleep(0)
        tasks += [asyncio.ensure_future(queue.acquire_async(f"light-{n}")) for n in range(3)]
        await asyncio.gather(*tasks)
        return refused_at

    refused_at = run(scenario())
    assert sorted(refused_at) == [4, 5]
    for at, error in refused_at.values():
        assert at < 0.6 - 0.05  # well before the deadline
        assert error.reason == "deadline" and error.retry_after > 0.6 - at
    stats = queue.stats()
    assert stats["timed_out"] == 2 and stats["admitted"] == 7


def test_a_deadline_that_passes_while_waiting_for_a_lease(clock):
    """A Concurrency lease may come back any time, so nobody is refused early: the waiter
    leaves at its deadline, with the time until the oldest lease expires."""
    limiter = nl.Concurrency(1, lease_ttl=30, clock=clock)
    queue = FairQueue(limiter, timeout=0.3)
    held = limiter.try_acquire("k")

    async def scenario():
        with pytest.raises(QueueRefused) as refused:
            await queue.acquire_async("k")
        return refused.value

    error = run(scenario())
    assert clock.now == pytest.approx(0.3)
    assert error.reason == "deadline" and error.retry_after == pytest.approx(29.7)
    assert held is not None and queue.stats()["timed_out"] == 1


# ---- leaving ------------------------------------------------------------------------------


def test_a_cancelled_task_leaves_the_queue_at_once():
    queue = FairQueue(nl.TokenBucket("2/s", burst=1), limit_key="upstream", timeout=10)

    async def scenario():
        await queue.acquire_async("A")  # the token: the next one in 0.5 s
        first = asyncio.ensure_future(queue.acquire_async("A"))
        second = asyncio.ensure_future(queue.acquire_async("B"))
        for _ in range(100):
            if queue.waiting() == 2:
                break
            await asyncio.sleep(0.001)
        assert queue.waiting() == 2
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert queue.waiting() == 1 and queue.waiting("A") == 0  # at once
        started = time.monotonic()
        await second  # the head now: admitted when the token is back, not a turn later
        return time.monotonic() - started

    waited = run(scenario())
    assert waited < 0.8
    stats = queue.stats()
    assert stats["cancelled"] == 1 and stats["waiting"] == 0 and stats["lanes"] == 0


def test_cancelling_every_waiter_leaves_nothing_behind():
    queue = FairQueue(nl.TokenBucket("1/minute"), limit_key="upstream", timeout=math.inf)

    async def scenario():
        await queue.acquire_async("x")
        tasks = [asyncio.ensure_future(queue.acquire_async(f"k{i % 7}")) for i in range(50)]
        for _ in range(100):
            if queue.waiting() == 50:
                break
            await asyncio.sleep(0.001)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    run(scenario())
    stats = queue.stats()
    assert (stats["waiting"], stats["waiting_units"], stats["keys"], stats["lanes"]) == (0, 0, 0, 0)
    assert stats["cancelled"] == 50 and queue._blocked == set()


def test_a_cancel_token_from_another_thread_wakes_an_asyncio_free_wait():
    """acquire with a CancelToken: the waiting thread leaves at once."""
    queue = FairQueue(nl.TokenBucket("1/minute"), timeout=120)
    queue.acquire("k")
    token = CancelToken()
    outcome = []

    def wait():
        try:
            queue.acquire("k", cancel=token)
        except QueueCancelled as error:
            outcome.append((time.monotonic(), error))

    thread = threading.Thread(target=wait)
    thread.start()
    for _ in range(200):
        if queue.waiting() == 1:
            break
        time.sleep(0.005)
    cancelled_at = time.monotonic()
    token.cancel()
    assert queue.waiting() == 0  # out of the queue before cancel() returned
    thread.join(5)
    assert outcome and outcome[0][0] - cancelled_at < 0.5
    assert token.cancelled and queue.stats()["cancelled"] == 1
    with pytest.raises(QueueCancelled):  # a cancelled token refuses new waits at once
        queue.acquire("other", cancel=token)


# ---- a full queue ----------------------------------------------------------------------------


def test_a_full_queue_makes_room_from_the_key_with_the_most_waiting(clock):
    queue = FairQueue(nl.TokenBucket("10/s", burst=1, clock=clock), limit_key="upstream", timeout=10, max_waiting=4)

    async def scenario():
        await queue.acquire_async("heavy")
        heavy = [asyncio.ensure_future(queue.acquire_async("heavy")) for _ in range(4)]
        await asyncio.sleep(0)
        assert queue.waiting() == 4
        with pytest.raises(QueueRefused) as own:  # the heavy key itself: refused at once
            await queue.acquire_async("heavy")
        light = asyncio.ensure_future(queue.acquire_async("light"))  # takes the heavy key's latest place
        results = await asyncio.gather(*heavy, light, return_exceptions=True)
        return own.value, results

    own, results = run(scenario())
    assert own.reason == "full" and "full" in str(own)
    assert [type(r).__name__ for r in results] == ["Decision", "Decision", "Decision", "QueueRefused", "Decision"]
    assert results[3].reason == "full"
    stats = queue.stats()
    assert stats["pushed_out"] == 1 and stats["refused_at_once"] == 1 and stats["peak_waiting"] == 4


# ---- kinds of limiters -------------------------------------------------------------------------


def test_each_key_waits_for_its_own_limit_by_default(clock):
    queue = FairQueue(nl.TokenBucket("10/s", burst=1, clock=clock), timeout=10)
    admitted, _ = run(admit_all(queue, [("A", 1)] * 3 + [("B", 1)] * 3, clock))
    times = {}
    for key, _, t in admitted:
        times.setdefault(key, []).append(t)
    assert times == {"A": [0.0, 0.1, 0.2], "B": [0.0, 0.1, 0.2]}


def test_a_limit_key_function_groups_keys(clock):
    queue = FairQueue(nl.TokenBucket("10/s", burst=1, clock=clock), limit_key=lambda k: k.split("/")[0], timeout=10)
    admitted, _ = run(admit_all(queue, [("acme/a", 1)] * 3 + [("acme/b", 1)] * 3 + [("zeta/c", 1)] * 2, clock))
    acme = [(key, t) for key, _, t in admitted if key.startswith("acme")]
    assert [t for _, t in acme] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert [key for key, _ in acme][:4] == ["acme/a", "acme/a", "acme/b", "acme/a"]
    assert [t for key, _, t in admitted if key.startswith("zeta")] == [0.0, 0.1]


def test_a_fixed_window_admits_a_whole_window_at_once(clock):
    """The prediction follows the limiter: 30 waiting fit the next window, so a request with a
    deadline just past that window start is not refused."""
    queue = FairQueue(nl.FixedWindow("30/10s", clock=clock), limit_key="upstream", timeout=20)

    async def scenario():
        clock.advance(5)  # 5 s into a window
        queue.limiter.hit("upstream", cost=30)
        waiting = [asyncio.ensure_future(queue.acquire_async(f"k{i}")) for i in range(29)]
        await asyncio.sleep(0)
        last = await queue.acquire_async("late", timeout=5.0)  # the 30th: at the window start, 5 s away
        await asyncio.gather(*waiting)
        with pytest.raises(QueueRefused) as refused:
            await queue.acquire_async("later", timeout=5.0)
        return last, refused.value

    last, error = run(scenario())
    assert last.allowed
    assert error.retry_after == pytest.approx(10.0)  # the window after: 10 s from 10 s


def test_a_composite_predicts_from_its_slowest_part(clock):
    limiter = nl.Composite([nl.TokenBucket("10/s", burst=2, clock=clock), nl.FixedWindow("100/minute", clock=clock)])
    queue = FairQueue(limiter, limit_key="upstream", timeout=60)

    async def scenario():
        limiter.hit("upstream", cost=2)
        waiting = [asyncio.ensure_future(queue.acquire_async("a")) for _ in range(5)]
        await asyncio.sleep(0)
        with pytest.raises(QueueRefused) as refused:
            # 5 ahead and its own: past the token bucket's burst of 2, so the composite's own
            # peek says never; its slowest part says 0.2 s for 2 and 0.1 s for each more.
            await queue.acquire_async("a", timeout=0.3)
        await asyncio.gather(*waiting)
        return refused.value

    error = run(scenario())
    assert error.retry_after == pytest.approx(0.6) and error.reason == "deadline"


def test_a_concurrency_limiter_hands_out_leases_in_turn():
    limiter = nl.Concurrency(1)
    queue = FairQueue(limiter, limit_key="model", timeout=5)
    held = limiter.try_acquire("model")
    order = []

    async def scenario():
        async def one(key):
            lease = await queue.acquire_async(key)
            assert isinstance(lease, nl.Lease)
            order.append(key)
            await asyncio.sleep(0.01)
            lease.release()

        tasks = [asyncio.ensure_future(one(k)) for k in ("A", "A", "A", "B")]
        for _ in range(100):
            if queue.waiting() == 4:
                break
            await asyncio.sleep(0.001)
        held.release()
        await asyncio.gather(*tasks)

    run(scenario())
    assert order == ["A", "B", "A", "A"]


def test_a_token_limiter_queues_by_tokens_and_returns_the_reservation(clock):
    tl = nl.TokenLimiter(tokens="1000/minute", clock=clock)
    queue = FairQueue(tl, limit_key="tenant", timeout=120)

    async def scenario():
        first = await queue.acquire_async("a", 900)
        later = await queue.acquire_async("a", 600)  # 500 more tokens needed: 30 s
        return first, later

    first, later = run(scenario())
    assert isinstance(first, nl.Reservation) and first.allowed and later.allowed
    assert clock.now == pytest.approx(30.0)
    assert later.settle(100)


def test_a_leaky_bucket_decision_keeps_its_delay(clock):
    """Admitted when the bucket has room; the Decision still says how long to wait before
    proceeding (the caller sleeps it, as with the limiter alone)."""
    queue = FairQueue(nl.LeakyBucket("10/s", capacity=2, clock=clock), limit_key="jobs", timeout=10)

    async def scenario():
        async def one():
            decision = await queue.acquire_async("a")
            return round(clock.now, 9), round(decision.delay, 9)

        return await asyncio.gather(*[one() for _ in range(5)])

    assert run(scenario()) == [(0.0, 0.0), (0.0, 0.1), (0.1, 0.1), (0.2, 0.1), (0.3, 0.1)]


def test_a_shared_memory_limiter_in_one_process(clock):
    store = nl.SharedMemoryStore(f"fq-{threading.get_ident()}-{time.monotonic_ns()}", capacity=1024)
    try:
        queue = FairQueue(nl.TokenBucket("10/s", burst=1, store=store), limit_key="upstream", timeout=5)

        async def scenario():
            started = time.monotonic()
            await asyncio.gather(*[queue.acquire_async(k) for k in ("a", "a", "b")])
            return time.monotonic() - started

        assert 0.15 < run(scenario()) < 1.0
    finally:
        store.unlink()


# ---- stats ----------------------------------------------------------------------------------


def test_stats_count_waits_in_a_histogram(clock):
    queue = FairQueue(nl.TokenBucket("10/s", burst=1, clock=clock), limit_key="upstream", timeout=10)
    run(admit_all(queue, [("a", 1)] * 4, clock))
    stats = queue.stats()
    assert stats["admitted"] == stats["wait_seconds_count"] == 4
    assert stats["wait_seconds_sum"] == pytest.approx(0.6) and stats["wait_seconds_max"] == pytest.approx(0.3)
    buckets = dict(stats["wait_seconds_buckets"])
    assert buckets[0.001] == 1 and buckets[0.1] == 2 and buckets[0.25] == 3 and buckets[0.5] == 4
    assert buckets[math.inf] == 4 and list(buckets) == sorted(buckets)


# ---- hostile arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"key": None}, TypeError),
        ({"key": 1.5}, TypeError),
        ({"key": True}, TypeError),
        ({"key": ["a"]}, TypeError),
        ({"key": 2**200}, ValueError),  # the limiter's own bound on int keys
        ({"cost": -1}, ValueError),
        ({"cost": 1.0}, TypeError),
        ({"cost": True}, TypeError),
        ({"cost": "1"}, TypeError),
        ({"cost": 2**64}, ValueError),
        ({"timeout": float("nan")}, ValueError),
        ({"timeout": -1}, ValueError),
        ({"timeout": "5"}, TypeError),
        ({"timeout": True}, TypeError),
        ({"weight": 0}, ValueError),
        ({"weight": -1}, ValueError),
        ({"weight": float("nan")}, ValueError),
        ({"weight": float("inf")}, ValueError),
        ({"weight": 1e300}, ValueError),
        ({"weight": "2"}, TypeError),
        ({"weight": False}, TypeError),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_error(kwargs, error):
    queue = FairQueue(nl.TokenBucket("10/s"), timeout=1)
    args = {"key": "k", **kwargs}
    with pytest.raises(error) as raised:
        queue.acquire(**args)
    assert str(raised.value)
    with pytest.raises(error):
        run(queue.acquire_async(**args))
    assert queue.stats()["waiting"] == 0 and queue.stats()["admitted"] == 0


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"limiter": object()}, TypeError),
        ({"limiter": None}, TypeError),
        ({"weights": 3}, TypeError),
        ({"weights": {"a": 0}}, ValueError),
        ({"weights": {"a": float("nan")}}, ValueError),
        ({"weights": {1.5: 2}}, TypeError),
        ({"weights": {"a": "x"}}, TypeError),
        ({"limit_key": 1.5}, TypeError),
        ({"limit_key": ["x"]}, TypeError),
        ({"timeout": -1}, ValueError),
        ({"max_waiting": 0}, ValueError),
        ({"max_waiting": 1.5}, ValueError),
        ({"max_waiting": True}, ValueError),
    ],
)
def test_bad_queue_arguments_are_refused(kwargs, error):
    args = {"limiter": nl.TokenBucket("10/s"), **kwargs}
    limiter = args.pop("limiter")
    with pytest.raises(error):
        FairQueue(limiter, **args)


def test_bad_answers_from_the_weight_and_limit_key_functions():
    queue = FairQueue(nl.TokenBucket("10/s"), lambda key: float("nan"))
    with pytest.raises(ValueError):
        queue.acquire("k")
    queue = FairQueue(nl.TokenBucket("10/s"), limit_key=lambda key: None)
    with pytest.raises(TypeError):
        queue.acquire("k")
    assert queue.stats()["waiting"] == 0


def test_a_concurrency_cost_must_be_one():
    queue = FairQueue(nl.Concurrency(2))
    with pytest.raises(ValueError, match="cost must be 1"):
        queue.acquire("k", cost=2)


def test_a_cancel_token_must_be_a_cancel_token():
    queue = FairQueue(nl.TokenBucket("10/s"))
    with pytest.raises(TypeError):
        queue.acquire("k", cancel=threading.Event())
    assert queue.stats()["waiting"] == 0


def test_huge_keys_and_many_keys_stay_bounded(clock):
    queue = FairQueue(nl.TokenBucket("1/minute", clock=clock), limit_key="upstream", timeout=1e9, max_waiting=100)

    async def scenario():
        await queue.acquire_async(b"x" * 1_000_000)
        tasks = [asyncio.ensure_future(queue.acquire_async(b"%d" % i + b"y" * 10_000)) for i in range(300)]
        await asyncio.sleep(0)
        assert queue.waiting() <= 100
        for task in tasks:
            task.cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = run(scenario())
    assert sum(isinstance(r, QueueRefused) and r.reason == "full" for r in results) == 200
    assert queue.stats()["waiting"] == 0


# ---- an ASGI client that leaves -------------------------------------------------------------------


def make_app(queue):
    async def app(scope, receive, send):
        assert scope["type"] == "http"
        while True:  # the body, to its end
            message = await receive()
            if not message.get("more_body"):
                break
        try:
            await queue.acquire_asgi(receive, scope["path"])
        except QueueRefused as error:
            await send(
                {
                    "type": "http.response.start",
                    "status": 429,
                    "headers": [(b"retry-after", b"%d" % math.ceil(error.retry_after))],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        except QueueCancelled:
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def test_an_asgi_client_that_disconnects_leaves_the_queue_at_once():
    limiter = nl.Concurrency(1)
    queue = FairQueue(limiter, limit_key="upstream", timeout=30)
    held = limiter.try_acquire("upstream")
    with ASGIServer(make_app(queue)) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/a", content=b"x" * 100_000, timeout=0.5)
        left = time.monotonic()
        for _ in range(200):
            if queue.stats()["cancelled"] == 1:
                break
            time.sleep(0.005)
        assert queue.stats()["cancelled"] == 1 and queue.waiting() == 0
        assert time.monotonic() - left < 0.5
        # A client that stays gets the lease when it is released.
        result = []
        thread = threading.Thread(target=lambda: result.append(httpx.post(server.url + "/b", timeout=10)))
        thread.start()
        for _ in range(200):
            if queue.waiting() == 1:
                break
            time.sleep(0.005)
        held.release()
        thread.join(10)
        assert result and result[0].status_code == 200
        # A deadline that cannot be met is a 429 with the time needed.
        lease = limiter.try_acquire("upstream")
        quick = FairQueue(limiter, limit_key="upstream", timeout=0.2)
        with ASGIServer(make_app(quick)) as other:
            response = httpx.get(other.url + "/c", timeout=10)
        assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
        assert lease is not None


# ---- edges ----------------------------------------------------------------------------------------


def test_a_timeout_of_zero_checks_once(clock):
    queue = FairQueue(nl.TokenBucket("10/s", burst=1, clock=clock), timeout=0)
    assert queue.acquire("k").allowed
    with pytest.raises(QueueRefused) as refused:
        queue.acquire("k")
    assert refused.value.retry_after == pytest.approx(0.1) and clock.now == 0.0
    assert queue.stats()["refused_at_once"] == 1


def test_lane_time_is_brought_back_to_zero_without_changing_the_order(clock, monkeypatch):
    from nexus_limits import fair

    monkeypatch.setattr(fair, "_REBASE_AT", 5.0)
    queue = FairQueue(nl.TokenBucket("10/s", burst=1, clock=clock), limit_key="upstream", timeout=60)
    admitted, _ = run(admit_all(queue, [("A", 1)] * 15 + [("B", 1)] * 15, clock))
    keys = [key for key, _, _ in admitted]
    assert keys[1:29] == ["A", "B"] * 14 and len(keys) == 30


def test_predictions_past_any_cost_do_not_overflow(clock):
    queue = FairQueue(nl.TokenBucket("10/s", burst=5, clock=clock), limit_key="upstream", timeout=60)

    async def scenario():
        queue.limiter.hit("upstream", cost=5)
        waiting = asyncio.ensure_future(queue.acquire_async("a"))
        await asyncio.sleep(0)
        lane = queue._lanes["upstream"]
        need = queue._predict(lane, 2**70, clock.now)
        await waiting
        return need

    need = run(scenario())
    assert need == pytest.approx(0.5 + (2**70 - 5) / 10)


def test_acquire_asgi_before_the_body_was_read_is_an_error():
    queue = FairQueue(nl.TokenBucket("1/minute"), limit_key="upstream", timeout=120)
    queue.acquire("first")
    messages = [{"type": "http.request", "body": b"more", "more_body": True}]

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)

    with pytest.raises(RuntimeError, match="before the request body was read"):
        run(queue.acquire_asgi(receive, "k"))
    assert queue.waiting() == 0 and queue.stats()["cancelled"] == 1


def test_on_a_manual_clock_time_moves_on_when_a_lane_empties(clock):
    """Two keys waiting for their own limits in one queue, due at 0.1 s and 0.5 s: once the
    first is admitted and gone, the clock moves on to the second."""
    queue = FairQueue(nl.TokenBucket("10/s", burst=5, clock=clock), timeout=10)
    queue.limiter.hit("a", cost=5)
    queue.limiter.hit("b", cost=5)

    async def scenario():
        times = []

        async def one(key, cost):
            await queue.acquire_async(key, cost)
            times.append((key, round(clock.now, 9)))

        await asyncio.gather(one("a", 1), one("b", 5))
        return times

    assert run(scenario(), limit=10) == [("a", 0.1), ("b", 0.5)]

    clock.advance(1.0)  # both buckets full again
    assert queue.limiter.hit("a", cost=5).allowed and queue.limiter.hit("b", cost=5).allowed
    start = clock.now
    times = []

    def in_thread(key, cost):
        queue.acquire(key, cost)
        times.append((key, round(clock.now - start, 9)))

    threads = [threading.Thread(target=in_thread, args=args) for args in (("a", 1), ("b", 5))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(times) == [("a", 0.1), ("b", 0.5)]


def test_another_queue_on_the_same_limit_takes_the_capacity_first(clock):
    """Two queues over one limit (as two processes would be): the head that loses the race is
    told to wait again, and refused then if that is past its deadline."""
    limiter = nl.TokenBucket("10/s", burst=1, clock=clock)
    first = FairQueue(limiter, limit_key="upstream", timeout=10)
    second = FairQueue(limiter, limit_key="upstream", timeout=0.15)

    async def scenario():
        limiter.hit("upstream")
        winner = asyncio.ensure_future(first.acquire_async("a"))
        loser = asyncio.ensure_future(second.acquire_async("b"))
        results = await asyncio.gather(winner, loser, return_exceptions=True)
        return results

    decision, error = run(scenario())
    assert decision.allowed
    assert isinstance(error, QueueRefused) and error.reason == "deadline"
    assert error.retry_after == pytest.approx(0.1) and error.waited == pytest.approx(0.1)
    assert second.stats()["timed_out"] == 1 and second.stats()["waiting"] == 0


class Flaky(nl.TokenBucket):
    """A limiter whose store fails for its next check, as a Redis server that went away."""

    __slots__ = ()
    fail_next = threading.Event()

    def hit(self, key, cost=1):
        if self.fail_next.is_set():
            self.fail_next.clear()
            raise nl.BackendUnavailable("the store went away")
        return super().hit(key, cost)


def test_a_failing_check_raises_to_its_waiter_and_the_queue_goes_on(clock):
    limiter = Flaky("10/s", burst=1, clock=clock)
    queue = FairQueue(limiter, limit_key="upstream", timeout=10)

    async def scenario():
        limiter.hit("upstream")
        waiting = [asyncio.ensure_future(queue.acquire_async(k)) for k in ("a", "b", "c")]
        await asyncio.sleep(0)
        Flaky.fail_next.set()
        return await asyncio.gather(*waiting, return_exceptions=True)

    try:
        error, *rest = run(scenario())
    finally:
        Flaky.fail_next.clear()
    assert isinstance(error, nl.BackendUnavailable)  # the head's check failed: its waiter hears it
    assert all(d.allowed for d in rest)  # the next ones were admitted in turn
    assert clock.now == pytest.approx(0.2)
    stats = queue.stats()
    assert stats["errors"] == 1 and stats["admitted"] == 2 and stats["waiting"] == 0


class Gated(nl.Concurrency):
    """A Concurrency whose check can be held half-way, to cancel a wait while it runs."""

    __slots__ = ()
    entered = threading.Event()
    go = threading.Event()
    hold = threading.Event()

    def hit(self, key, cost=1):
        if self.hold.is_set():
            self.entered.set()
            self.go.wait(5)
        return super().hit(key, cost)


def test_a_wait_cancelled_while_its_check_runs_gives_back_what_it_got():
    limiter = Gated(1)
    queue = FairQueue(limiter, limit_key="model", timeout=10)
    held = limiter.try_acquire("model")
    token = CancelToken()
    outcome = []

    def wait():
        try:
            outcome.append(queue.acquire("k", cancel=token))
        except QueueCancelled as error:
            outcome.append(error)

    thread = threading.Thread(target=wait)
    thread.start()
    for _ in range(500):
        if queue.waiting() == 1:
            break
        time.sleep(0.002)
    Gated.hold.set()
    try:
        assert Gated.entered.wait(5)  # its check is under way now
        held.release()  # the check will get the lease...
        token.cancel()  # ...for a client that is gone
        Gated.go.set()
        thread.join(5)
    finally:
        Gated.hold.clear()
        Gated.go.set()
    assert isinstance(outcome[0], QueueCancelled)
    assert limiter.inspect("model")["used"] == 0  # the lease went back
    assert queue.stats()["cancelled"] == 1 and queue.stats()["admitted"] == 0 and queue.waiting() == 0


def test_messages_show_a_long_key_cut_short():
    queue = FairQueue(nl.TokenBucket("1/minute"), timeout=1)
    key = "k" * 100_000
    queue.acquire(key)
    with pytest.raises(QueueRefused) as refused:
        queue.acquire(key)
    assert len(str(refused.value)) < 300 and refused.value.key == key
