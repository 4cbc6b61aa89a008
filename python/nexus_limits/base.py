"""The :class:`RateLimiter` interface every limiter satisfies."""

from __future__ import annotations

import abc

# typing is not imported at run time (it costs `import nexus_limits` several
# milliseconds); mypy reads the imports below. TYPE_CHECKING is False when the program
# runs and taken as True by type checkers.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Optional, Tuple, Union

    Key = Union[str, bytes, int]
else:
    # Annotations are strings (``from __future__ import annotations``): at run time the
    # alias is only a name that other modules import.
    Key = "Union[str, bytes, int]"

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

    def middleware(self, app: Any, key: Any = "ip", **options: Any) -> Any:
        """``app`` wrapped with this limiter: an ASGI or a WSGI app, detected (an ASGI
        app's call is a coroutine function). ``key`` and ``options`` are those of the
        adapters' middleware (``"ip"``, ``"bearer"``, ``"header:<name>"``, a list of
        them or a callable; ``exempt=``, ``cost=``, ``trusted_proxies=``...).

        >>> import nexus_limits as nl
        >>> def hello(environ, start_response):
        ...     start_response("200 OK", [("Content-Type", "text/plain")])
        ...     return [b"hello"]
        >>> app = nl.TokenBucket("100/minute").middleware(hello, key="header:x-api-key")
        >>> type(app).__module__
        'nexus_limits.adapters.wsgi'
        """
        return _wrap(self, app, key, options)

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

    def middleware(self, app: Any, key: Any = "ip", **options: Any) -> Any:
        """``app`` wrapped with this limiter: an ASGI app (an asyncio limiter can
        only serve one). ``key`` and ``options`` are those of the
        adapters' middleware (``"ip"``, ``"bearer"``, ``"header:<name>"``, a list of
        them or a callable; ``exempt=``, ``cost=``, ``trusted_proxies=``...).
        """
        return _wrap(self, app, key, options)

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


def _wrap(limiter: Any, app: Any, key: Any, options: Any) -> Any:
    """The adapter middleware for ``app``: ASGI when its call is a coroutine function
    (Starlette, FastAPI, Quart, Django's ASGI handler), WSGI otherwise (Flask, Django's
    WSGI handler); an asyncio limiter needs an ASGI app."""
    import inspect

    call = app if inspect.isfunction(app) or inspect.ismethod(app) else getattr(app, "__call__", None)  # noqa: B004
    if call is None:
        raise TypeError(f"app must be an ASGI or a WSGI application, got {type(app).__name__}")
    if inspect.iscoroutinefunction(call):
        from .adapters.asgi import RateLimitMiddleware as Asgi

        return Asgi(app, limiter, key, **options)
    if isinstance(limiter, AsyncRateLimiter):
        raise TypeError("an asyncio limiter can only wrap an ASGI app (its __call__ is a coroutine function)")
    from .adapters.wsgi import RateLimitMiddleware as Wsgi

    return Wsgi(app, limiter, key, **options)
