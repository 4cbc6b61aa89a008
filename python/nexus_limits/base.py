"""The :class:`RateLimiter` interface every limiter satisfies."""

from __future__ import annotations

import abc
from typing import Any, Optional, Tuple, Union

Key = Union[str, bytes, int]

__all__ = ["Key", "RateLimiter"]


class RateLimiter(abc.ABC):
    """What every limiter offers, whatever its algorithm or store.

    A limiter keeps a separate state per key (an API key, a user id, a client IP...).
    Keys are ``str``, ``bytes`` or ``int`` (from -2**127 to 2**128 - 1: every signed or
    unsigned 128-bit value, such as ``uuid.UUID.int``); ``"5"``, ``b"5"`` and ``5`` are
    different keys. A denied call is a return value (a falsy
    :class:`~nexus_limits.Decision`); exceptions are only for misuse, and for
    ``acquire`` giving up.

    Besides the methods below, the limiters share an operational surface: ``stats()``,
    ``inspect(key)``, ``top_keys(n)``, ``shadow``, ``set_quota``/``clear_quota``/
    ``set_default_quota``, ``sweep()`` and ``len()``. The README's table says exactly
    which limiter has which (a ``Concurrency``'s quota is its limit; a ``Composite``'s
    quotas are its parts').
    """

    __slots__ = ()

    @abc.abstractmethod
    def hit(self, key: Key, cost: int = 1) -> Any:
        """Decide a call of ``cost`` units for ``key``; charge it only if admitted."""

    @abc.abstractmethod
    def try_acquire(self, key: Key, cost: int = 1) -> Any:
        """The hot path: like ``hit`` but answers only whether the call was admitted."""

    @abc.abstractmethod
    def peek(self, key: Key, cost: int = 1) -> Any:
        """The Decision ``hit`` would give now, consuming nothing."""

    @abc.abstractmethod
    def get_limit(self, key: Key) -> Tuple[bool, int]:
        """``(allowed, remaining)`` for one unit now, consuming nothing."""

    @abc.abstractmethod
    def reset(self, key: Key) -> None:
        """Put ``key`` back to its fresh state."""

    @abc.abstractmethod
    def acquire(self, key: Key, cost: int = 1, timeout: Optional[float] = None) -> Any:
        """Block until admitted; raise RateLimitExceeded when it cannot be in time."""

    @abc.abstractmethod
    async def acquire_async(self, key: Key, cost: int = 1, timeout: Optional[float] = None) -> Any:
        """``acquire`` without blocking the event loop."""


class AsyncRateLimiter(abc.ABC):
    """The asyncio mirror of :class:`RateLimiter`: the same methods, as coroutines."""

    __slots__ = ()

    @abc.abstractmethod
    async def hit(self, key: Key, cost: int = 1) -> Any:
        """Decide a call of ``cost`` units for ``key``; charge it only if admitted."""

    @abc.abstractmethod
    async def try_acquire(self, key: Key, cost: int = 1) -> Any:
        """Like ``hit`` but answers only whether the call was admitted."""

    @abc.abstractmethod
    async def peek(self, key: Key, cost: int = 1) -> Any:
        """The Decision ``hit`` would give now, consuming nothing."""

    @abc.abstractmethod
    async def get_limit(self, key: Key) -> Tuple[bool, int]:
        """``(allowed, remaining)`` for one unit now, consuming nothing."""

    @abc.abstractmethod
    async def reset(self, key: Key) -> None:
        """Put ``key`` back to its fresh state."""

    @abc.abstractmethod
    async def acquire(self, key: Key, cost: int = 1, timeout: Optional[float] = None) -> Any:
        """Wait until admitted; raise RateLimitExceeded when it cannot be in time."""

    @abc.abstractmethod
    async def acquire_async(self, key: Key, cost: int = 1, timeout: Optional[float] = None) -> Any:
        """The same as ``acquire`` (both names exist so sync and async code read alike)."""
