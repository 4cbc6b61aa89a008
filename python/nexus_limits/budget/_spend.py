"""Dollar budgets per key: reserve the estimated cost, settle the actual cost."""

from __future__ import annotations

import math
import re
import time
from decimal import Decimal, InvalidOperation
from typing import Any, Dict, Optional, Union, cast

from .._core import Decision, ManualClock, Rate, SharedMemoryStore
from ..base import Key
from ..tokens import Usage, parse_rate_limit_headers
from ._prices import MICROS, PriceTable, default_prices
from ._tokens import AsyncReservation, Reservation, TokenLimiter, go_duration

__all__ = ["AsyncSpendReservation", "SpendLimiter", "SpendReservation", "UpstreamGuard", "parse_budget"]

_BUDGET = re.compile(r"^\s*\$?\s*(\d+(?:\.\d{1,6})?)\s*(?:/|per\s)\s*(.+?)\s*$", re.IGNORECASE)


def parse_budget(text: str) -> Rate:
    """``"25.00/day"`` -> a Rate of 25,000,000 micro-dollars per day. Also ``"$5 per hour"``,
    ``"0.50/minute"``, ``"100/30d"``."""
    if not isinstance(text, str):
        raise TypeError(f"budget must be a str such as '25.00/day', got {type(text).__name__}")
    match = _BUDGET.match(text)
    if not match:
        raise ValueError(f"invalid budget {text!r}: expected dollars per period, e.g. '25.00/day' or '$5 per hour'")
    try:
        micros = int(Decimal(match.group(1)) * MICROS)
    except InvalidOperation:  # pragma: no cover - the regex admits only numbers
        raise ValueError(f"invalid budget {text!r}") from None
    if micros < 1:
        raise ValueError(f"invalid budget {text!r}: must be at least $0.000001")
    try:
        period = Rate.parse(f"1/{match.group(2)}").period
    except ValueError as error:
        raise ValueError(f"invalid budget {text!r}: {error}") from None
    return Rate(micros, period)


def dollars(micros: int) -> str:
    return f"{Decimal(micros) / MICROS:.6f}".rstrip("0").rstrip(".") if micros % 10_000 else f"{micros / MICROS:.2f}"


class SpendReservation:
    """A reserved cost (in micro-dollars). Finish it once: ``settle(usage or micros)``
    charges the actual cost instead (cached input priced as cached), ``cancel()``
    refunds it. Unsettled, it settles at its estimate after the lease time."""

    __slots__ = ("_inner", "_limiter", "model")

    def __init__(self, limiter: SpendLimiter, inner: Reservation, model: Optional[str]) -> None:
        self._limiter = limiter
        self._inner = inner
        self.model = model

    @property
    def allowed(self) -> bool:
        return self._inner.allowed

    def __bool__(self) -> bool:
        return self.allowed

    @property
    def estimate_micros(self) -> int:
        return int(self._inner.estimate)

    @property
    def retry_after(self) -> float:
        return self._inner.retry_after

    @property
    def decision(self) -> Optional[Decision]:
        """The budget's Decision (amounts in micro-dollars)."""
        return self._inner.tokens

    def settle(self, actual: Union[Usage, int]) -> bool:
        micros = self._limiter.cost(self.model, actual) if isinstance(actual, Usage) else actual
        return self._inner.settle(micros)

    def cancel(self) -> bool:
        return self._inner.cancel()

    def headers(self) -> Dict[str, str]:
        """``x-budget-limit``, ``x-budget-remaining`` (US dollars) and ``x-budget-reset``
        (Go-style duration until fully restored); ``retry-after`` when refused."""
        d = self.decision
        out: Dict[str, str] = {}
        if d is not None:
            out["x-budget-limit"] = dollars(d.limit)
            out["x-budget-remaining"] = dollars(d.remaining)
            out["x-budget-reset"] = go_duration(d.reset_after)
        if not self.allowed and not math.isinf(self.retry_after):
            out["retry-after"] = str(max(1, math.ceil(self.retry_after)))
        return out

    def detail(self) -> str:
        """Why a refusal happened, for a 429 body: which budget ran out and when it resets."""
        budget = self._limiter.budget_text
        if math.isinf(self.retry_after):
            return (
                f"spend budget {budget}: the estimated cost ${dollars(self.estimate_micros)} is above the whole budget"
            )
        return f"spend budget {budget} exhausted; enough is restored in {math.ceil(self.retry_after)} s"


class AsyncSpendReservation(SpendReservation):
    """A :class:`SpendReservation` of an asyncio backend
    (``nexus_limits.redis.asyncio.SpendLimiter``): ``settle`` and ``cancel`` are
    coroutines."""

    __slots__ = ()

    async def settle(self, actual: Union[Usage, int]) -> bool:  # type: ignore[override]
        micros = self._limiter.cost(self.model, actual) if isinstance(actual, Usage) else actual
        return bool(await cast(AsyncReservation, self._inner).settle(micros))

    async def cancel(self) -> bool:  # type: ignore[override]
        return bool(await cast(AsyncReservation, self._inner).cancel())


class SpendLimiter:
    """A dollar budget per key, e.g. ``SpendLimiter("25.00/day")``.

    ``reserve(key, model, input_tokens, output_tokens)`` reserves the estimated cost
    before the call (priced from ``prices``, the shipped table by default); the
    reservation settles at the actual cost from the response's usage. Money is kept as
    integer micro-dollars, rounded up, never floats. The budget is a bucket holding the
    whole amount, refilled continuously over the period (a rolling day, not a calendar
    day). In-process by default; with ``store=`` a
    :class:`~nexus_limits.SharedMemoryStore` every process of the host shares it (named
    ``name``, ``"spend"`` by default; the store's ttl must cover the budget's period:
    ``ttl=86400`` for a daily budget); ``nexus_limits.redis.SpendLimiter`` shares it
    through Redis.
    """

    def __init__(
        self,
        budget: str,
        *,
        prices: Optional[PriceTable] = None,
        clock: Optional[ManualClock] = None,
        lease_ttl: float = 600.0,
        concurrency: Optional[int] = None,
        store: Optional[SharedMemoryStore] = None,
        name: Optional[str] = None,
        _engine: Any = None,
    ) -> None:
        self.budget = parse_budget(budget)
        self.budget_text = budget.strip()
        if prices is not None and not isinstance(prices, PriceTable):
            raise TypeError(f"prices must be a PriceTable, got {type(prices).__name__}")
        self.prices = prices if prices is not None else default_prices()
        if store is None and name is not None:
            raise ValueError("name applies with store=: it names the budget's keys in the store")
        shared: Dict[str, Any] = {} if store is None else {"store": store, "name": name or "spend"}
        self._engine = _engine or TokenLimiter(
            tokens=self.budget, concurrency=concurrency, clock=clock, lease_ttl=lease_ttl, **shared
        )

    def estimate(
        self, model: Optional[str], input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
    ) -> int:
        """Micro-dollars a call is expected to cost."""
        return self.prices.get(model).micros(input_tokens, output_tokens, cached_input_tokens)

    def cost(self, model: Optional[str], usage: Usage) -> int:
        """Micro-dollars a finished call cost."""
        return self.prices.cost(model, usage)

    def reserve(
        self, key: Key, model: Optional[str], input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
    ) -> SpendReservation:
        micros = self.estimate(model, input_tokens, output_tokens, cached_input_tokens)
        return SpendReservation(self, self._engine.reserve(key, micros), model)

    def reset(self, key: Key) -> None:
        self._engine.reset(key)

    def set_budget(self, budget: str) -> None:
        """Changes the budget of every key at run time, keeping what each has spent
        (in-process; on Redis build a new limiter with the same ``name``; in a
        SharedMemoryStore build a new limiter in every process)."""
        rate = parse_budget(budget)
        if not callable(getattr(self._engine, "set_default_quota", None)):
            raise TypeError("set_budget works in-process; on Redis build a SpendLimiter with the same name")
        if getattr(self._engine, "store_path", None) is not None:
            # The budget is part of its keys' identity in the store.
            raise ValueError(
                "set_budget is not available with a SharedMemoryStore: build a SpendLimiter with the new budget "
                "in every process (its keys start again)"
            )
        self._engine.set_default_quota(tokens=rate)
        self.budget, self.budget_text = rate, budget.strip()

    def stats(self) -> Dict[str, Any]:
        """The engine's counters; ``tokens_*`` count micro-dollars here."""
        return self._engine.stats()


class UpstreamGuard:
    """Follows a provider's own limits, so clients are told to wait before the provider
    refuses them.

    ``observe(upstream_key, headers, status)`` after each upstream response reads
    OpenAI's ``x-ratelimit-*`` / Anthropic's ``anthropic-ratelimit-*`` headers and
    ``retry-after`` on a 429; ``check(upstream_key, tokens)`` then refuses while the
    provider reported no requests left (or fewer tokens than asked), or while its
    ``retry-after`` runs, and admits again once the reported reset time has passed.
    """

    def __init__(self, clock: Optional[ManualClock] = None, margin: int = 0) -> None:
        if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
            raise ValueError(f"margin must be a non-negative int, got {margin!r}")
        self.clock = clock
        self.margin = margin
        self._state: Dict[Any, Dict[str, Any]] = {}

    def _now(self) -> float:
        return self.clock.now if self.clock is not None else time.monotonic()

    def observe(self, upstream_key: Any, headers: Any, status: int = 200) -> None:
        limits = parse_rate_limit_headers(headers)
        now = self._now()
        state = self._state.setdefault(upstream_key, {})
        for name in ("requests", "tokens"):
            limit = getattr(limits, name)
            if limit is not None and limit.remaining is not None:
                state[name] = (limit.remaining, now + (limit.reset or 0.0))
        if status == 429:
            wait = limits.retry_after
            if wait is None:
                resets = [until - now for _, until in (state.get("requests", (0, now)), state.get("tokens", (0, now)))]
                wait = max([r for r in resets if r > 0], default=1.0)
            state["blocked"] = now + wait

    def check(self, upstream_key: Any, tokens: int = 0) -> Decision:
        now = self._now()
        state = self._state.get(upstream_key, {})
        waits = []
        blocked = state.get("blocked", 0.0)
        if now < blocked:
            waits.append(blocked - now)
        requests = state.get("requests")
        if requests is not None and now < requests[1] and requests[0] <= self.margin:
            waits.append(requests[1] - now)
        budget = state.get("tokens")
        if budget is not None and now < budget[1] and budget[0] - self.margin < tokens:
            waits.append(budget[1] - now)
        if waits:
            return Decision(False, 0, 0, max(waits), max(waits))
        return Decision(True, 0, 0, 0.0, 0.0)
