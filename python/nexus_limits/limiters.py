"""The public limiter classes.

Each is a thin Python subclass of a native class from ``nexus_limits._core``: the
checks (``hit``, ``try_acquire``, ``peek``...) are the native methods themselves, with
no Python frame in between. Python adds only what waits: ``acquire`` and
``acquire_async`` (written once here, sync and async side by side), and the lease
context managers of :class:`Concurrency`.
"""

from __future__ import annotations

# _wait is imported by the methods that wait (not at import: a program that only checks
# rates never loads it).
from . import _core
from .base import RateLimiter
from .errors import RateLimitExceeded

TYPE_CHECKING = False  # typing is for type checkers only: see base.py
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Any, Optional, Type

    from ._core import Decision, Lease
    from .base import Key

__all__ = [
    "Composite",
    "Concurrency",
    "FixedWindow",
    "LeakyBucket",
    "Priority",
    "SlidingWindow",
    "TokenBucket",
]

# Longest single wait for a lease to be released, in seconds. A release wakes a
# blocked `Concurrency.acquire` at once; this cap only bounds the rare race where the
# release happens between the failed attempt and the wait.
_LEASE_POLL = 0.05


class _WaitsForQuota:
    """``acquire``/``acquire_async`` for the rate limiters: retry after ``retry_after``."""

    __slots__ = ()

    def acquire(self, key: Key, cost: int = 1, timeout: Optional[float] = None) -> Decision:
        """Block until ``cost`` is admitted for ``key`` and return the admitting Decision.

        Sleeps exactly ``retry_after`` between attempts. Raises
        :class:`~nexus_limits.RateLimitExceeded` at once, without sleeping, when the wait
        would pass ``timeout`` or when ``cost`` is above the capacity.
        """
        from . import _wait

        return _wait.acquire(self.hit, self.clock, key, cost, timeout)  # type: ignore[attr-defined]

    async def acquire_async(self, key: Key, cost: int = 1, timeout: Optional[float] = None) -> Decision:
        """``acquire`` for asyncio: waits with ``asyncio.sleep``, never blocking the loop."""
        from . import _wait

        return await _wait.acquire_async(self.hit, self.clock, key, cost, timeout)  # type: ignore[attr-defined]


class TokenBucket(_WaitsForQuota, _core.TokenBucket, RateLimiter):
    """Token bucket: ``burst`` tokens (default: the rate's count), refilled continuously.

    A new key starts full. A call of ``cost`` is admitted when ``cost`` tokens are in the
    bucket, and takes them; refill is exact to the nanosecond (no fraction is lost).

    >>> tb = TokenBucket("10/second", burst=20)
    >>> tb.try_acquire("api-key")
    True
    """

    __slots__ = ()


class SlidingWindow(_WaitsForQuota, _core.SlidingWindow, RateLimiter):
    """Sliding window counter: ``previous * (1 - elapsed/period) + current <= limit``.

    Its two windows start where a :class:`FixedWindow`'s do (the Unix epoch, plus
    ``align``).

    >>> sw = SlidingWindow("100/minute")
    >>> sw.hit("api-key").remaining
    99
    """

    __slots__ = ()


class FixedWindow(_WaitsForQuota, _core.FixedWindow, RateLimiter):
    """Fixed window: at most the rate's count per window.

    Windows start at multiples of the period from the Unix epoch: a day at UTC midnight,
    an hour on the hour, the same boundaries as on Redis and in a
    :class:`~nexus_limits.SharedMemoryStore`. ``align`` moves them: seconds (or a
    ``datetime.timedelta``) after those boundaries, or a fixed-offset
    ``datetime.timezone`` (a day then starts at that zone's midnight).

    >>> fw = FixedWindow("1000/day")
    >>> fw.hit("api-key", cost=10).remaining
    990
    >>> import datetime
    >>> FixedWindow("1000/day", align=datetime.timezone(datetime.timedelta(hours=-5))).align
    18000.0
    """

    __slots__ = ()


class LeakyBucket(_WaitsForQuota, _core.LeakyBucket, RateLimiter):
    """Leaky bucket as a queue (traffic shaping).

    Admits while the bucket has room for ``cost`` units (``capacity``, default the
    rate's count); each admitted call gets ``Decision.delay``, the seconds to wait
    before proceeding so that admitted work leaves at the rate.

    >>> from nexus_limits import ManualClock
    >>> lb = LeakyBucket("10/second", capacity=50, clock=ManualClock())
    >>> [lb.hit("job").delay for _ in range(3)]
    [0.0, 0.1, 0.2]
    """

    __slots__ = ()


class Composite(_WaitsForQuota, _core.Composite, RateLimiter):
    """Several limiters on one key, all or nothing.

    A call is admitted only if every part admits it; then every part is charged, as one
    atomic step even under threads. The Decision reports the most restrictive part
    (``limit`` and ``remaining`` of the part with the least remaining; the longest
    ``retry_after``, ``reset_after`` and ``delay``). All parts must share one clock.

    It counts its own checks (``stats()``, each part's under ``"parts"``), has its own
    ``shadow`` mode, ``inspect`` and ``top_keys`` across the parts. Quotas belong to
    the parts: ``set_quota`` and the like raise ``TypeError`` here; call them on
    ``composite.parts[i]``.

    >>> both = Composite([TokenBucket("10/second"), FixedWindow("1000/day")])
    >>> both.hit("api-key").remaining
    9
    """

    __slots__ = ()


class Priority(_core.Priority, RateLimiter):
    """A rate limiter shared by priority classes, with capacity held back for the higher
    ones.

    ``classes`` maps each class to the share of the limit it may use: with
    ``{"interactive": 1.0, "batch": 0.7}`` a batch call is admitted only if, after it,
    at least 30% of the key's capacity is still free, so batch traffic can never take the
    last 30%; interactive calls may use all of it. The rule is checked and charged in
    the same atomic step as any call of the limiter (in-process, in a
    :class:`~nexus_limits.SharedMemoryStore`), so it holds exactly under any
    concurrency. One class must have share 1.0.

    Every check takes ``cls=``, the class's name; a call that names none gets
    ``default`` (by default the class with the smallest share, so that unlabelled
    traffic never eats into the reserve). A class's Decision is its own view of the
    limit: ``limit`` is the part it may use, ``remaining`` what it may still take,
    ``retry_after`` when its call would fit. ``stats()["classes"]`` counts each class's
    checks. The limiter keeps its own store, quotas (``set_quota``...), shadow mode
    and counters; ``priority.limiter`` is it.

    >>> import nexus_limits as nl
    >>> p = nl.Priority(nl.FixedWindow("10/minute"), {"interactive": 1.0, "batch": 0.7})
    >>> sum(p.try_acquire("api-key", cls="batch") for _ in range(10))
    7
    >>> p.hit("api-key", cls="interactive").remaining
    2
    """

    __slots__ = ()

    def acquire(self, key: Key, cost: int = 1, timeout: Optional[float] = None, cls: Optional[str] = None) -> Decision:
        """Block until ``cost`` of class ``cls`` is admitted (see the limiters' ``acquire``)."""
        from . import _wait

        return _wait.acquire(lambda k, c: self.hit(k, c, cls), self.clock, key, cost, timeout)

    async def acquire_async(
        self, key: Key, cost: int = 1, timeout: Optional[float] = None, cls: Optional[str] = None
    ) -> Decision:
        """``acquire`` for asyncio: waits with ``asyncio.sleep``, never blocking the loop."""
        from . import _wait

        return await _wait.acquire_async(lambda k, c: self.hit(k, c, cls), self.clock, key, cost, timeout)


class _AsyncLease:
    """``async with concurrency.lease_async(key):`` — acquires on enter, releases on exit."""

    __slots__ = ("_key", "_lease", "_limiter", "_timeout")

    def __init__(self, limiter: Any, key: Key, timeout: Optional[float]) -> None:
        from . import _wait

        self._limiter = limiter
        self._key = key
        self._timeout = _wait.check_timeout(timeout)
        self._lease: Optional[Lease] = None

    async def __aenter__(self) -> Lease:
        self._lease = await self._limiter.acquire_async(self._key, timeout=self._timeout)
        return self._lease

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self._lease is not None:
            self._lease.release()


class Concurrency(_core.Concurrency, RateLimiter):
    """At most ``limit`` leases held at once per key (in-flight requests, streams...).

    ``try_acquire`` returns a :class:`~nexus_limits.Lease` (true) or ``None`` (false),
    and ``hit`` a Decision carrying it in ``.lease``. **A lease is held while its object
    lives**: it ends when released (or its ``with`` block exits), when the Lease (or the
    Decision holding it) is garbage-collected unreleased, or after ``lease_ttl`` seconds,
    so no lease can leak. ``if c.try_acquire(key):`` on its own therefore takes a lease
    and gives it back at once; keep the lease for as long as the work runs.

    The quota is the limit: ``set_quota(key, limit)``, ``clear_quota(key)``,
    ``set_default_quota(limit)``. ``stats()``, ``inspect(key)``, ``top_keys(n)`` and
    ``shadow`` work as on the rate limiters.

    >>> c = Concurrency(2)
    >>> with c.lease("api-key"):
    ...     c.get_limit("api-key")
    (True, 1)
    >>> lease = c.try_acquire("api-key")
    >>> c.inspect("api-key")["used"]
    1
    >>> lease.release()
    True
    """

    __slots__ = ()

    def acquire(self, key: Key, cost: int = 1, timeout: Optional[float] = None) -> Lease:
        """Block until a lease is free and return it.

        Wakes as soon as a lease of this limiter is released. Raises
        :class:`~nexus_limits.RateLimitExceeded` when ``timeout`` passes first.
        """
        from . import _wait

        deadline = _wait.Deadline(self.clock, timeout)
        while True:
            decision = self.hit(key, cost)
            if decision.lease is not None:
                return decision.lease  # type: ignore[no-any-return]
            wait = min(decision.retry_after, deadline.left())
            if wait <= 0:
                raise RateLimitExceeded(key, decision, deadline.timeout)
            if deadline.clock is not None:
                deadline.clock.advance(wait)
            else:
                self._wait_for_release(min(wait, _LEASE_POLL))

    async def acquire_async(self, key: Key, cost: int = 1, timeout: Optional[float] = None) -> Lease:
        """``acquire`` for asyncio: polls with ``asyncio.sleep`` (1 ms, doubling to 50 ms)."""
        import asyncio  # here, so that `import nexus_limits` does not load asyncio

        from . import _wait

        deadline = _wait.Deadline(self.clock, timeout)
        poll = 0.001
        while True:
            decision = self.hit(key, cost)
            if decision.lease is not None:
                return decision.lease  # type: ignore[no-any-return]
            wait = min(decision.retry_after, deadline.left())
            if wait <= 0:
                raise RateLimitExceeded(key, decision, deadline.timeout)
            if deadline.clock is not None:
                await deadline.sleep_async(wait)
            else:
                await asyncio.sleep(min(wait, poll))
                poll = min(poll * 2, _LEASE_POLL)

    def lease(self, key: Key, timeout: Optional[float] = None) -> Lease:
        """``with c.lease(key): ...`` — blocks like ``acquire``, releases on exit."""
        return self.acquire(key, timeout=timeout)

    def lease_async(self, key: Key, timeout: Optional[float] = None) -> Any:
        """``async with c.lease_async(key): ...`` — waits like ``acquire_async``."""
        return _AsyncLease(self, key, timeout)
