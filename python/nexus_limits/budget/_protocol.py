"""What a reservation is made of, and what its backend must do.

A :class:`~nexus_limits.budget.Reservation` is built from a backend's named answer
(:class:`ReservedAnswer`: the native limiter's own answer object, or a
:class:`Reserved` from the Redis backends) and finished through its backend: the
in-process native limiter, a shared-memory one, or a Redis one (synchronous or
asyncio). Each backend satisfies :class:`ReservationBackend` (or
:class:`AsyncReservationBackend`); mypy checks it where the reservation is made.
"""

from __future__ import annotations

from typing import Any, Awaitable, NamedTuple, Optional, Protocol

from .._core import Decision
from ..base import Key

__all__ = ["AsyncReservationBackend", "ReservationBackend", "Reserved", "ReservedAnswer"]


class ReservedAnswer(Protocol):
    """A backend's answer to a reservation (or a peek), by name; see :class:`Reserved`."""

    @property
    def held(self) -> bool: ...
    @property
    def decision(self) -> Decision: ...
    @property
    def requests(self) -> Optional[Decision]: ...
    @property
    def tokens(self) -> Optional[Decision]: ...
    @property
    def daily_tokens(self) -> Optional[Decision]: ...
    @property
    def concurrency(self) -> Optional[Decision]: ...
    @property
    def lease(self) -> Any: ...
    @property
    def charged_at(self) -> Any: ...


class Reserved(NamedTuple):
    """A backend's answer to a reservation (or a peek), by name.

    ``held``: a charge was made that the reservation must finish (False when refused,
    for a peek, and for an answer that charged nothing, such as a store's fallback).
    ``decision`` combines the limits' own decisions ``requests``, ``tokens``,
    ``daily_tokens`` and ``concurrency`` (None for a limit that is not set or not
    decided). ``lease`` and ``charged_at`` are the backend's handles for settling: the
    concurrency lease taken (None: none) and when the charge was made (None: never).
    """

    held: bool
    decision: Decision
    requests: Optional[Decision] = None
    tokens: Optional[Decision] = None
    daily_tokens: Optional[Decision] = None
    concurrency: Optional[Decision] = None
    lease: Any = None
    charged_at: Any = None


class ReservationBackend(Protocol):
    """What a synchronous token limiter does for its reservations."""

    def _settle(self, key: Key, tokens_delta: int, requests_delta: int, charged_at: Any, lease: Any) -> bool:
        """Charges ``tokens_delta`` more tokens and ``requests_delta`` more requests (a
        refund when negative) to a reservation charged at ``charged_at`` and ends its
        lease; False, doing nothing, once it has expired."""
        ...

    def _expired(self, charged_at: Any) -> bool:
        """True once a reservation charged at ``charged_at`` has outlived the lease ttl
        (or was never charged: ``charged_at`` None)."""
        ...

    def _tally(self, reserved: int, settled: int, refunded: int) -> None:
        """Adds to the token counters that ``stats()`` reports."""
        ...


class AsyncReservationBackend(Protocol):
    """:class:`ReservationBackend` of an asyncio limiter: ``_settle`` is awaited."""

    def _settle(
        self, key: Key, tokens_delta: int, requests_delta: int, charged_at: Any, lease: Any
    ) -> Awaitable[bool]: ...

    def _expired(self, charged_at: Any) -> bool: ...

    def _tally(self, reserved: int, settled: int, refunded: int) -> None: ...
