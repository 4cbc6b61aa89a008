"""TokenLimiter on Redis: reserve and settle are each one atomic script."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import nexus_limits as nl

from .._core import ManualClock
from ..base import Key
from ..budget import AsyncReservation, Reservation
from ._common import (
    BACKEND_ERRORS,
    Fallback,
    check_client,
    check_clock,
    check_name,
    check_on_error,
    check_prefix,
    encode_key,
    is_full,
    new_lease_id,
    now_arg,
    to_decision,
)
from ._scripts import RELEASE, RESERVE, SETTLE


class _Spec:
    """The parts of a Redis TokenLimiter that do no I/O."""

    def __init__(
        self,
        client: Any,
        want_async: bool,
        requests: Any,
        tokens: Any,
        daily_tokens: Any,
        concurrency: Any,
        lease_ttl: float,
        prefix: str,
        name: Optional[str],
        on_error: str,
        clock: Optional[ManualClock],
    ) -> None:
        self.client = check_client(client, want_async)
        # Validates exactly like the in-process limiter, and knows the rates.
        self.model = nl.TokenLimiter(requests, tokens, daily_tokens, concurrency, lease_ttl=lease_ttl)
        self.prefix = check_prefix(prefix)
        self.clock = check_clock(clock)
        self.fallback = Fallback(check_on_error(on_error), "TokenLimiter on Redis")
        named = check_name(name)
        base = named or "tl"
        self.buckets: List[Tuple[str, str, str]] = []  # (kind, us per unit, burst) per bucket
        self.suffixes: List[str] = []
        for which, rate in (
            ("requests", self.model.requests),
            ("tokens", self.model.tokens),
            ("daily", self.model.daily_tokens),
        ):
            if rate is not None:
                period_us = rate.period * 1e6
                self.buckets.append(
                    ("requests" if which == "requests" else "tokens", repr(period_us / rate.count), str(rate.count))
                )
                # A named limiter keeps its keys when its quotas change (a config reload);
                # an unnamed one is identified by its quotas.
                self.suffixes.append(f":{base}-{which}" if named else f":{base}-{which}-{rate.count}-{period_us!r}")
        self.concurrency = self.model.concurrency or 0
        if self.concurrency:
            self.suffixes.append(f":{base}-cc")
        self.lease_ttl_us = repr(self.model.lease_ttl * 1e6)
        self.tokens = [0, 0, 0]

    def count(self, reservation: Any, tokens: int) -> None:
        d = reservation.decision
        if d.fallback:
            return
        self.fallback.tally.add("allowed" if d.allowed else "denied")
        if d.allowed:
            self.tally_tokens(tokens, 0, 0)

    def tally_tokens(self, reserved: int, settled: int, refunded: int) -> None:
        with self.fallback.tally.lock:
            self.tokens[0] += reserved
            self.tokens[1] += settled
            self.tokens[2] += refunded

    def stats(self) -> Dict[str, int]:
        out = self.fallback.tally.snapshot()
        del out["shadow_denied"], out["near_limit"]
        out.update(zip(("tokens_reserved", "tokens_settled", "tokens_refunded"), self.tokens))
        return out

    def keys(self, key: Key) -> List[str]:
        tag = f"{self.prefix}:{{{encode_key(key)}}}"
        return [tag + s for s in self.suffixes]

    def reserve_args(self, tokens: Any) -> Tuple[List[str], str]:
        if isinstance(tokens, bool) or not isinstance(tokens, int):
            raise TypeError(f"tokens must be a non-negative int, got {type(tokens).__name__}")
        if tokens < 0:
            raise ValueError(f"tokens must be a non-negative integer, got {tokens}")
        lease = new_lease_id() if self.concurrency else ""
        args = [
            now_arg(self.clock),
            "hit",
            str(tokens),
            str(len(self.buckets)),
            str(self.concurrency),
            self.lease_ttl_us,
            lease,
        ]
        for bucket in self.buckets:
            args.extend(bucket)
        return args, lease

    def reserved(self, reply: Sequence[Any], lease: str) -> Tuple[Any, ...]:
        """The script's reply in the shape Reservation takes."""
        combined = to_decision(reply[0:6])
        each = [to_decision(reply[6 + 6 * i : 12 + 6 * i]) for i in range(len(self.buckets))]
        at = 6 + 6 * len(self.buckets)
        conc = to_decision(reply[at : at + 6]) if self.concurrency else None
        now_us = int(reply[-1])
        named = {}
        i = 0
        for which, rate in (
            ("requests", self.model.requests),
            ("tokens", self.model.tokens),
            ("daily", self.model.daily_tokens),
        ):
            if rate is not None:
                named[which] = each[i]
                i += 1
        charged = (now_us, time.monotonic())
        return (
            combined.allowed,
            combined,
            named.get("requests"),
            named.get("tokens"),
            named.get("daily"),
            conc,
            lease or None,
            charged,
        )

    def fallback_reply(self, error: BaseException) -> Tuple[Any, ...]:
        d = self.fallback.decision(error, 0)
        return (d.allowed, d, None, None, None, None, None, None)

    def settle_args(self, tokens_delta: int, requests_delta: int, charged_at: Any, lease: Optional[str]) -> List[str]:
        args = [
            now_arg(self.clock),
            "hit",
            str(tokens_delta),
            str(requests_delta),
            str(len(self.buckets)),
            str(charged_at[0]),
            self.lease_ttl_us,
            lease or "",
        ]
        for kind, per_unit, _ in self.buckets:
            args.extend((kind, per_unit))
        return args

    def expired(self, charged_at: Any) -> bool:
        if charged_at is None:
            return True
        if self.clock is not None:
            return bool(self.clock.now * 1e6 > charged_at[0] + float(self.lease_ttl_us))
        return bool(time.monotonic() - charged_at[1] > self.model.lease_ttl)


def _evalsha_sync(client: Any, script: Any, keys: List[str], args: List[str]) -> Any:
    from . import evalsha

    return evalsha(client, script, keys, args)


class TokenLimiter:
    """:class:`nexus_limits.TokenLimiter` on Redis: every process shares one budget per key.

    ``reserve`` and ``settle``/``cancel`` are each one atomic script; the lease time is
    judged on the server's clock. When the server is away, ``on_error`` decides as for
    the other Redis limiters (a fail-open reservation has ``decision.fallback`` set and
    settles to nothing)."""

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
        self._spec = _Spec(
            client, False, requests, tokens, daily_tokens, concurrency, lease_ttl, prefix, name, on_error, clock
        )

    def reserve(self, key: Key, tokens: int) -> Reservation:
        """Reserve one request and ``tokens`` tokens for ``key`` on every limit at once."""
        spec = self._spec
        keys = spec.keys(key)
        args, lease = spec.reserve_args(tokens)
        try:
            reply = spec.reserved(_evalsha_sync(spec.client, RESERVE, keys, args), lease)
        except BACKEND_ERRORS as error:
            reply = spec.fallback_reply(error)
        reservation = Reservation(self, key, tokens, reply)
        spec.count(reservation, tokens)
        return reservation

    def _settle(self, key: Key, tokens_delta: int, requests_delta: int, charged_at: Any, lease: Optional[str]) -> bool:
        spec = self._spec
        if charged_at is None:
            return False
        try:
            args = spec.settle_args(tokens_delta, requests_delta, charged_at, lease)
            return bool(_evalsha_sync(spec.client, SETTLE, spec.keys(key), args))
        except BACKEND_ERRORS as error:
            if lease and is_full(error):
                # The buckets cannot be written, but ending the lease only frees memory.
                try:
                    _evalsha_sync(spec.client, RELEASE, spec.keys(key)[-1:], [now_arg(spec.clock), lease])
                except BACKEND_ERRORS:
                    pass
            if spec.fallback.on_error == "raise":
                spec.fallback.decision(error, 0)
            return False

    def _expired(self, charged_at: Any) -> bool:
        return self._spec.expired(charged_at)

    def reset(self, key: Key) -> None:
        self._spec.client.delete(*self._spec.keys(key))

    @property
    def requests(self) -> Optional[nl.Rate]:
        return self._spec.model.requests

    @property
    def tokens(self) -> Optional[nl.Rate]:
        return self._spec.model.tokens

    @property
    def daily_tokens(self) -> Optional[nl.Rate]:
        return self._spec.model.daily_tokens

    @property
    def concurrency(self) -> Optional[int]:
        return self._spec.model.concurrency

    @property
    def lease_ttl(self) -> float:
        return float(self._spec.model.lease_ttl)

    def redis_keys(self, key: Key) -> List[str]:
        return self._spec.keys(key)

    def stats(self) -> Dict[str, int]:
        """Counters of this object (this process): reservations allowed and denied, tokens
        reserved, settled and refunded, store errors and on_error answers."""
        return self._spec.stats()

    def _tally(self, reserved: int, settled: int, refunded: int) -> None:
        self._spec.tally_tokens(reserved, settled, refunded)


class AsyncTokenLimiter:
    """The asyncio mirror of the Redis :class:`TokenLimiter` (exported under that name by
    :mod:`nexus_limits.redis.asyncio`); reservations settle with ``await``."""

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
        self._spec = _Spec(
            client, True, requests, tokens, daily_tokens, concurrency, lease_ttl, prefix, name, on_error, clock
        )

    async def reserve(self, key: Key, tokens: int) -> AsyncReservation:
        from .asyncio import evalsha

        spec = self._spec
        keys = spec.keys(key)
        args, lease = spec.reserve_args(tokens)
        try:
            reply = spec.reserved(await evalsha(spec.client, RESERVE, keys, args), lease)
        except BACKEND_ERRORS as error:
            reply = spec.fallback_reply(error)
        reservation = AsyncReservation(self, key, tokens, reply)
        spec.count(reservation, tokens)
        return reservation

    async def _settle(
        self, key: Key, tokens_delta: int, requests_delta: int, charged_at: Any, lease: Optional[str]
    ) -> bool:
        from .asyncio import evalsha

        spec = self._spec
        if charged_at is None:
            return False
        try:
            args = spec.settle_args(tokens_delta, requests_delta, charged_at, lease)
            return bool(await evalsha(spec.client, SETTLE, spec.keys(key), args))
        except BACKEND_ERRORS as error:
            if lease and is_full(error):
                try:
                    await evalsha(spec.client, RELEASE, spec.keys(key)[-1:], [now_arg(spec.clock), lease])
                except BACKEND_ERRORS:
                    pass
            if spec.fallback.on_error == "raise":
                spec.fallback.decision(error, 0)
            return False

    def _expired(self, charged_at: Any) -> bool:
        return self._spec.expired(charged_at)

    async def reset(self, key: Key) -> None:
        await self._spec.client.delete(*self._spec.keys(key))

    @property
    def lease_ttl(self) -> float:
        return float(self._spec.model.lease_ttl)

    def redis_keys(self, key: Key) -> List[str]:
        return self._spec.keys(key)

    def stats(self) -> Dict[str, int]:
        """Counters of this object (this process): reservations allowed and denied, tokens
        reserved, settled and refunded, store errors and on_error answers."""
        return self._spec.stats()

    def _tally(self, reserved: int, settled: int, refunded: int) -> None:
        self._spec.tally_tokens(reserved, settled, refunded)
