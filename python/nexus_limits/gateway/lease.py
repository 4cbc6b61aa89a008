"""Quota leasing for the gateway's tiers (``[backend] lease``, Redis only).

A tier whose one limit is ``requests`` is a token bucket per key: it is served by a
``nexus_limits.redis.asyncio.TokenBucket`` with ``lease=``, which takes blocks of a
key's quota from Redis in one round trip and spends them in this process. Exact: the
blocks come out of the shared bucket (lease.lua), so every gateway process together
never admits more than the quota; what leasing costs is units taken and not spent,
given back when the key goes idle and at shutdown.

Tiers with ``tokens``, ``daily_tokens`` or ``concurrency`` keep their Redis
TokenLimiter (a round trip per check): a token reservation is settled later at the
real usage and a concurrency place is held per call, which a block of quota spent in
one process cannot do exactly.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

from ..base import Key

__all__ = ["LeasedLimiter", "LeasedReservation"]


class LeasedReservation:
    """One request decided from a leased block, as the LLM middleware reads a
    TokenLimiter reservation: only ``requests`` is decided. ``settle`` has nothing to
    charge (no token limit); ``cancel`` cannot hand a unit back to a block (it stays
    charged: a refund of a failed call is lost, never an extra admission)."""

    __slots__ = ("decision", "estimate", "rate")

    def __init__(self, decision: Any, estimate: int, rate: str) -> None:
        self.decision = decision
        self.estimate = estimate
        self.rate = rate

    @property
    def allowed(self) -> bool:
        return bool(self.decision.allowed)

    def __bool__(self) -> bool:
        return self.allowed

    @property
    def retry_after(self) -> float:
        return float(self.decision.retry_after)

    @property
    def requests(self) -> Any:
        return self.decision

    tokens = daily_tokens = concurrency = None

    def headers(self) -> Dict[str, str]:
        """As a TokenLimiter's: ``x-ratelimit-{limit,remaining,reset}-requests``, and
        ``retry-after`` when refused."""
        from ..budget import go_duration

        d = self.decision
        out = {
            "x-ratelimit-limit-requests": str(d.limit),
            "x-ratelimit-remaining-requests": str(d.remaining),
            "x-ratelimit-reset-requests": go_duration(d.reset_after),
        }
        if not self.allowed and not math.isinf(self.retry_after):
            out["retry-after"] = str(max(1, math.ceil(self.retry_after)))
        return out

    def settle(self, actual_tokens: int) -> bool:
        return True

    def cancel(self) -> bool:
        return False


class LeasedLimiter:
    """The TokenLimiter interface the LLM middleware uses, over a leased Redis
    TokenBucket with the tier's ``requests`` rate."""

    tokens: Optional[str] = None
    daily_tokens: Optional[str] = None

    def __init__(self, client: Any, rate: str, *, prefix: str, name: str, on_error: str, lease: Dict[str, Any]):
        from ..redis.asyncio import LeasePolicy, TokenBucket

        self.requests = rate
        self.bucket = TokenBucket(
            client, rate, prefix=prefix, name=name, on_error=on_error, lease=LeasePolicy(**lease) if lease else True
        )

    async def reserve(self, key: Key, tokens: int) -> LeasedReservation:
        return LeasedReservation(await self.bucket.hit(key), tokens, self.requests)

    def stats(self) -> Dict[str, Any]:
        """The bucket's counters, leases included (blocks taken, units returned, round
        trips saved)."""
        stats: Dict[str, Any] = self.bucket.stats()
        return stats

    async def close(self) -> None:
        """Gives back the unspent units of every block (at shutdown, or when replaced)."""
        await self.bucket.close()
