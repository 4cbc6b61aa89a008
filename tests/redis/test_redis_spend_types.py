"""The asyncio SpendLimiter's reservations say what they are: ``settle`` and ``cancel``
are coroutines returning bool (an AsyncSpendReservation), while the synchronous and
in-process ones return bool at once."""

from __future__ import annotations

import asyncio
import inspect

import redis
import redis.asyncio

import nexus_limits as nl
import nexus_limits.redis as nlr
import nexus_limits.redis.asyncio as nla
from nexus_limits.spend import SpendLimiter, SpendReservation
from nexus_limits.spend._limiter import AsyncSpendReservation
from nexus_limits.tokens import Usage


def test_the_asyncio_reservation_is_awaited_and_typed_so(redis_server):
    async def main() -> None:
        client = redis.asyncio.Redis(port=redis_server.port)
        try:
            spend = nla.SpendLimiter(client, "1.00/hour", prefix="types", clock=nl.ManualClock(1_000.0))
            res = await spend.reserve("k", "gpt-4o", 1000, 100)
            assert isinstance(res, AsyncSpendReservation) and isinstance(res, SpendReservation)
            assert inspect.iscoroutinefunction(res.settle) and inspect.iscoroutinefunction(res.cancel)
            assert await res.settle(Usage(1000, 50)) is True  # priced from the usage
            assert await res.cancel() is False, "already settled"
            other = await spend.reserve("k", "gpt-4o", 10, 0)
            assert await other.cancel() is True
            await spend.reset("k")
        finally:
            await client.aclose()

    asyncio.run(main())
    hints = inspect.get_annotations(AsyncSpendReservation.settle, eval_str=True)
    assert hints["return"] is bool


def test_the_sync_reservations_return_bool_at_once(redis_client):
    clock = nl.ManualClock(1_000.0)
    for spend in (nlr.SpendLimiter(redis_client, "1.00/hour", clock=clock), SpendLimiter("1.00/hour", clock=clock)):
        res = spend.reserve("k", "gpt-4o", 1000, 100)
        assert type(res) is SpendReservation
        assert res.settle(Usage(1000, 50)) is True and res.cancel() is False
