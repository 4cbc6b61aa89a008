"""Token and spend budgets on Redis, written once, for asyncio: the source of
``_sync_budget.py`` (see ``_async.py`` for how the synchronous side is generated).
What does no I/O is in ``_budget.py``."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import nexus_limits as nl

from .._core import ManualClock
from ..base import Key
from ..budget import AsyncReservation
from ..budget._prices import PriceTable
from ..budget._spend import AsyncSpendReservation, parse_budget
from ..budget._spend import SpendLimiter as _InProcessSpend
from ._async import ASYNC, evalsha
from ._budget import BudgetPlan
from ._channel import channel_for
from ._common import BACKEND_ERRORS, check_client, is_full, is_outage, now_arg
from ._scripts import RELEASE, RESERVE, SETTLE


class TokenLimiter:
    """:class:`nexus_limits.TokenLimiter` on Redis: every process shares one budget per key.

    ``reserve`` and ``settle``/``cancel`` are each one atomic script; the lease time is
    judged on the server's clock. When the server is away or full, ``on_error`` decides
    as for the other Redis limiters (a fallback reservation has ``decision.fallback``
    set and settles to nothing)."""

    def __init__(
        self,
        client: Any,
        requests: Any = None,
        tokens: Any = None,
        daily_tokens: Any = None,
        concurrency: Optional[int] = None,
        lease_ttl: float = 600.0,
        *,
        prefix: str = "nl",
        name: Optional[str] = None,
        on_error: str = "raise",
        clock: Optional[ManualClock] = None,
    ) -> None:
        client = check_client(client, want_async=ASYNC)
        self._channel = channel_for(client, want_async=ASYNC)
        self._plan = BudgetPlan(
            requests,
            tokens,
            daily_tokens,
            concurrency,
            lease_ttl,
            prefix,
            name,
            on_error,
            clock,
        )

    async def reserve(self, key: Key, tokens: int) -> AsyncReservation:
        """Reserve one request and ``tokens`` tokens for ``key`` on every limit at once."""
        plan = self._plan
        keys = plan.keys(key)
        args, lease = plan.reserve_args(tokens)
        try:
            reply = plan.reserved(await evalsha(self._channel, RESERVE, keys, args), lease)
        except BACKEND_ERRORS as error:
            reply = plan.fallback_reply(error)
        reservation = AsyncReservation(self, key, tokens, reply)
        plan.count(reservation, tokens)
        return reservation

    async def peek(self, key: Key, tokens: int = 0) -> AsyncReservation:
        """What ``reserve(key, tokens)`` would decide now, charging nothing and taking no
        lease: a Reservation that is already ``done`` (its ``allowed``, per-limit
        decisions and ``headers()`` are those a reservation would get; ``settle`` and
        ``cancel`` do nothing). One round trip of a read-only script, which a full server
        runs too. ``peek(key)`` (no tokens) tells whether the key could be admitted at
        all (request limit, concurrency, a token limit in debt) before its request body
        is even read: the LLM middleware asks it first."""
        plan = self._plan
        args, _ = plan.reserve_args(tokens, "peek")
        try:
            reply = plan.reserved(await evalsha(self._channel, RESERVE.for_mode("peek"), plan.keys(key), args), "")
        except BACKEND_ERRORS as error:
            reply = plan.fallback_reply(error)
        return AsyncReservation(self, key, tokens, reply._replace(held=False, lease=None, charged_at=None))

    async def _settle(
        self, key: Key, tokens_delta: int, requests_delta: int, charged_at: Any, lease: Optional[str]
    ) -> bool:
        plan = self._plan
        if charged_at is None:
            return False
        keys = plan.keys(key)
        try:
            args = plan.settle_args(tokens_delta, requests_delta, charged_at, lease)
            return bool(await evalsha(self._channel, SETTLE, keys, args))
        except BACKEND_ERRORS as error:
            if lease and is_full(error):
                # The buckets cannot be written, but ending the lease only frees memory.
                try:
                    await evalsha(self._channel, RELEASE, keys[-1:], [now_arg(plan.clock), lease])
                except BACKEND_ERRORS:
                    pass
            if plan.fallback.on_error == "raise" or not is_outage(error):
                plan.fallback.decision(error, 0)  # raises: the policy, or state not ours
            return False

    def _expired(self, charged_at: Any) -> bool:
        return self._plan.expired(charged_at)

    async def reset(self, key: Key) -> None:
        await self._channel.call("DEL", *self._plan.keys(key))

    @property
    def requests(self) -> Optional[nl.Rate]:
        return self._plan.model.requests

    @property
    def tokens(self) -> Optional[nl.Rate]:
        return self._plan.model.tokens

    @property
    def daily_tokens(self) -> Optional[nl.Rate]:
        return self._plan.model.daily_tokens

    @property
    def concurrency(self) -> Optional[int]:
        return self._plan.model.concurrency

    @property
    def lease_ttl(self) -> float:
        return float(self._plan.model.lease_ttl)

    @property
    def on_error(self) -> str:
        return self._plan.fallback.on_error

    def redis_keys(self, key: Key) -> List[str]:
        """The Redis keys of ``key``'s buckets, then of its lease set (with a concurrency limit)."""
        return self._plan.keys(key)

    def stats(self) -> Dict[str, int]:
        """Counters of this object (this process): reservations allowed and denied, tokens
        reserved, settled and refunded, store errors and on_error answers, and its
        client's circuit breaker (breaker_open, breaker_trips)."""
        return {**self._plan.stats(), **self._channel.stats()}

    def _tally(self, reserved: int, settled: int, refunded: int) -> None:
        self._plan.tally_tokens(reserved, settled, refunded)


class SpendLimiter(_InProcessSpend):
    """:class:`nexus_limits.spend.SpendLimiter` on Redis: ``reserve`` and ``settle`` are
    each one atomic script; amounts are integer micro-dollars. On the asyncio side,
    ``reserve``, ``reset`` and the reservation's ``settle``/``cancel`` are awaited."""

    def __init__(
        self,
        client: Any,
        budget: str,
        *,
        prices: Optional[PriceTable] = None,
        prefix: str = "nl",
        name: Optional[str] = None,
        on_error: str = "raise",
        clock: Optional[ManualClock] = None,
        lease_ttl: float = 600.0,
        concurrency: Optional[int] = None,
    ) -> None:
        engine = TokenLimiter(
            client,
            tokens=parse_budget(budget),
            concurrency=concurrency,
            lease_ttl=lease_ttl,
            prefix=prefix,
            name=name or "spend",
            on_error=on_error,
            clock=clock,
        )
        super().__init__(budget, prices=prices, _engine=engine)

    async def reserve(  # type: ignore[override]  # unasync: def reserve(
        self, key: Key, model: Optional[str], input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
    ) -> AsyncSpendReservation:
        """Reserve the estimated cost of a call for ``key``; settle it with the actual usage."""
        micros = self.estimate(model, input_tokens, output_tokens, cached_input_tokens)
        engine: Any = self._engine  # this module's TokenLimiter
        return AsyncSpendReservation(self, await engine.reserve(key, micros), model)

    async def reset(self, key: Key) -> None:  # type: ignore[override]  # unasync: def reset(self, key: Key) -> None:
        engine: Any = self._engine  # this module's TokenLimiter
        await engine.reset(key)
