"""Token budgets: :class:`TokenLimiter` reserves requests, tokens and a concurrency
lease together before an LLM call; its :class:`Reservation` settles them from the
response."""

from __future__ import annotations

import math
import threading
from typing import Any, Dict, Optional

from .. import _core
from .._core import Decision
from ..base import Key
from ._protocol import AsyncReservationBackend, ReservationBackend, ReservedAnswer

__all__ = ["AsyncReservation", "Reservation", "TokenLimiter", "go_duration"]


def go_duration(seconds: float) -> str:
    """Seconds as a Go-style duration, the format of OpenAI's reset headers: ``"20ms"``,
    ``"1s"``, ``"6m0s"``, ``"1h2m3.5s"``."""
    if 0 <= seconds < 1:  # the common case first (a reset within the second)
        return f"{math.ceil(seconds * 1000)}ms"
    if math.isinf(seconds):
        return "inf"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    seconds = math.ceil(seconds * 1000) / 1000
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    out = ""
    if hours:
        out += f"{int(hours)}h"
    if hours or minutes:
        out += f"{int(minutes)}m"
    return out + f"{secs:.3f}".rstrip("0").rstrip(".") + "s"


# The header names of each limit, made once.
_REQUESTS_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")
_TOKENS_HEADERS = ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")
_ceil = math.ceil
_isinf = math.isinf

# Guards the done flag of every reservation: held for two steps, so one lock for all
# of them costs nothing in waiting and spares each reservation its own.
_TAKE_LOCK = threading.Lock()


class Reservation:
    """The outcome of :meth:`TokenLimiter.reserve`.

    When ``allowed``, one request and ``estimate`` tokens were charged to every limit,
    and a concurrency lease is held. Finish it exactly once:

    - ``settle(actual_tokens)``: charges the difference between the actual and the
      estimated tokens (a refund when the estimate was high, an extra charge when it was
      low — the key may then go into debt and wait for it) and ends the lease;
    - ``cancel()``: refunds the request and every estimated token (upstream error,
      client gone) and ends the lease.

    A reservation neither settled nor cancelled within the limiter's ``lease_ttl``
    settles at its estimate: the charge already stands, the lease expires, and a late
    ``settle``/``cancel`` changes nothing (it returns False).

    ``requests``, ``tokens``, ``daily_tokens`` and ``concurrency`` are each limit's own
    Decision (None for a limit that is not set); ``decision`` combines them.
    """

    __slots__ = ("_backend", "_done", "_result", "decision", "estimate", "key")

    _backend: ReservationBackend

    def __init__(self, backend: ReservationBackend, key: Key, estimate: int, result: ReservedAnswer) -> None:
        self._backend = backend
        self.key = key
        self.estimate = estimate
        # Kept whole, each limit's decision read when asked (most callers read the
        # combined one only).
        self._result = result
        self.decision: Decision = result.decision
        self._done = not result.held

    @property
    def requests(self) -> Optional[Decision]:
        return self._result.requests

    @property
    def tokens(self) -> Optional[Decision]:
        return self._result.tokens

    @property
    def daily_tokens(self) -> Optional[Decision]:
        return self._result.daily_tokens

    @property
    def concurrency(self) -> Optional[Decision]:
        return self._result.concurrency

    @property
    def allowed(self) -> bool:
        return bool(self.decision.allowed)

    def __bool__(self) -> bool:
        return self.allowed

    @property
    def retry_after(self) -> float:
        """Seconds until the same reservation could be admitted (``math.inf``: never, the
        estimate is above a limit's capacity)."""
        return float(self.decision.retry_after)

    @property
    def done(self) -> bool:
        """Settled, cancelled, expired, or never admitted."""
        return self._done or self._backend._expired(self._result.charged_at)

    def _take(self) -> bool:
        with _TAKE_LOCK:
            if self._done:
                return False
            self._done = True
            return True

    @staticmethod
    def _check_actual(actual_tokens: Any) -> int:
        if isinstance(actual_tokens, bool) or not isinstance(actual_tokens, int):
            raise TypeError(f"actual_tokens must be an int, got {type(actual_tokens).__name__}")
        if actual_tokens < 0:
            raise ValueError(f"actual_tokens must be non-negative, got {actual_tokens}")
        return actual_tokens

    def settle(self, actual_tokens: int) -> bool:
        """Charge the actual token count instead of the estimate. True if applied."""
        actual = (
            actual_tokens if type(actual_tokens) is int and actual_tokens >= 0 else self._check_actual(actual_tokens)
        )
        if not self._take():
            return False
        r = self._result
        done = bool(self._backend._settle(self.key, actual - self.estimate, 0, r.charged_at, r.lease))
        if done:
            self._backend._tally(0, actual, 0)
        return done

    def cancel(self) -> bool:
        """Refund the request and all its estimated tokens. True if applied."""
        if not self._take():
            return False
        r = self._result
        done = bool(self._backend._settle(self.key, -self.estimate, -1, r.charged_at, r.lease))
        if done:
            self._backend._tally(0, 0, self.estimate)
        return done

    def headers(self) -> Dict[str, str]:
        """OpenAI-style rate-limit headers for this reservation's key, as the limits stand
        after it (``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``), with
        ``retry-after`` (whole seconds, rounded up) when denied."""
        out: Dict[str, str] = {}
        result = self._result
        for names, d in ((_REQUESTS_HEADERS, result.requests), (_TOKENS_HEADERS, result.tokens)):
            if d is not None:
                out[names[0]] = str(d.limit)
                out[names[1]] = str(d.remaining)
                reset = d.reset_after
                out[names[2]] = f"{_ceil(reset * 1000)}ms" if 0 <= reset < 1 else go_duration(reset)
        decision = self.decision
        if not decision.allowed:
            retry_after = float(decision.retry_after)
            if not _isinf(retry_after):
                out["retry-after"] = str(max(1, _ceil(retry_after)))
        return out

    def __repr__(self) -> str:
        state = "done" if self.done else "open"
        return f"Reservation(key={self.key!r}, allowed={self.allowed}, estimate={self.estimate}, {state})"


class AsyncReservation(Reservation):
    """A :class:`Reservation` of an asyncio backend: ``settle`` and ``cancel`` are coroutines."""

    __slots__ = ()
    _backend: AsyncReservationBackend  # type: ignore[assignment]

    def __init__(self, backend: AsyncReservationBackend, key: Key, estimate: int, result: ReservedAnswer) -> None:
        super().__init__(backend, key, estimate, result)  # type: ignore[arg-type]

    async def settle(self, actual_tokens: int) -> bool:  # type: ignore[override]
        actual = (
            actual_tokens if type(actual_tokens) is int and actual_tokens >= 0 else self._check_actual(actual_tokens)
        )
        if not self._take():
            return False
        r = self._result
        done = bool(await self._backend._settle(self.key, actual - self.estimate, 0, r.charged_at, r.lease))
        if done:
            self._backend._tally(0, actual, 0)
        return done

    async def cancel(self) -> bool:  # type: ignore[override]
        if not self._take():
            return False
        r = self._result
        done = bool(await self._backend._settle(self.key, -self.estimate, -1, r.charged_at, r.lease))
        if done:
            self._backend._tally(0, 0, self.estimate)
        return done


class TokenLimiter(_core.TokenLimiter):
    """Per-key request, token and concurrency limits for LLM calls, reserved together.

    ``requests`` and ``tokens`` are rates (``"500/minute"``, ``"30000/minute"``);
    ``daily_tokens`` a rate or an int (tokens per day); ``concurrency`` the number of
    calls in flight per key. Each rate is a token bucket whose burst is its count (so
    ``"30000/minute"`` allows 30,000 tokens at once, refilled continuously, like the
    providers' own limits). ``reserve`` admits a call only if every limit admits it,
    charging all of them in one atomic step.

    By default the limits live in this process. With ``store=`` a
    :class:`~nexus_limits.SharedMemoryStore`, every process of the host that builds the
    same limiter (same ``name`` and rates) on the same store shares each key's limits
    exactly: a reservation, its settle or cancel, and a ``set_quota`` are each one
    transaction of the store (concurrency leases included), and a process killed at any
    point leaves each of them done in full or not at all; a lease held by a process that
    died ends after ``lease_ttl``. The store's ttl must cover the longest limit
    (``daily_tokens`` needs ``ttl=86400``) and ``lease_ttl``. ``set_default_quota`` and
    ``top_keys`` raise ``ValueError`` with a store (the rates are part of the limiter's
    identity there): build the limiter with the new rates in every process.
    """

    __slots__ = ()

    def reserve(self, key: Key, tokens: int) -> Reservation:
        """Reserve one request and ``tokens`` tokens for ``key``; see :class:`Reservation`."""
        answer = self._reserve(key, tokens)
        reservation = Reservation(self, key, tokens, answer)
        if answer.held:
            self._tally(tokens, 0, 0)
        return reservation

    def peek(self, key: Key, tokens: int = 0) -> Reservation:
        """What ``reserve(key, tokens)`` would decide now, charging nothing and taking no
        lease. The answer is a :class:`Reservation` that is already ``done`` (its
        ``allowed``, per-limit decisions and ``headers()`` are those a reservation would
        get; ``settle``/``cancel`` do nothing).

        ``peek(key)`` (no tokens) tells whether the key could be admitted at all —
        request limit, concurrency, and a token limit in debt — before its request
        body is even read."""
        return Reservation(self, key, tokens, self._reserve(key, tokens, False))

    def __repr__(self) -> str:
        parts = [
            f"{name}='{rate}'"
            for name, rate in (
                ("requests", self.requests),
                ("tokens", self.tokens),
                ("daily_tokens", self.daily_tokens),
            )
            if rate is not None
        ]
        if self.concurrency is not None:
            parts.append(f"concurrency={self.concurrency}")
        if self.store_path is not None:
            parts.append(f"store={self.store_path!r}")
        return f"TokenLimiter({', '.join(parts)}, lease_ttl={self.lease_ttl})"
