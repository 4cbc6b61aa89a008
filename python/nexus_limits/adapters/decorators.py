"""``@limit``: rate limits for plain functions, sync or async — to protect them, or to
throttle outbound calls (``wait=True``)."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional, TypeVar, Union

from ..base import AsyncRateLimiter, RateLimiter
from ..errors import RateLimitExceeded

__all__ = ["limit"]

F = TypeVar("F", bound=Callable[..., Any])


def limit(
    limiter: Any,
    key: Union[str, bytes, int, Callable[..., Any]] = "default",
    cost: Union[int, Callable[..., int]] = 1,
    wait: bool = False,
    timeout: Optional[float] = None,
) -> Callable[[F], F]:
    """Limit calls of the decorated function.

    ``key`` is a constant (one shared limit, e.g. ``"openai"`` to throttle outbound
    calls) or a callable receiving the call's arguments. ``cost`` likewise. With
    ``wait=False`` a refused call raises :class:`~nexus_limits.RateLimitExceeded` at once;
    with ``wait=True`` it waits like ``acquire`` (``asyncio.sleep`` for async functions)
    and raises only when ``timeout`` would pass.

    >>> import nexus_limits as nl
    >>> @nl.limit(nl.TokenBucket("2/minute"), key=lambda user: user)
    ... def fetch(user): return "ok"
    >>> fetch("ann"), fetch("ann")
    ('ok', 'ok')
    """
    if not isinstance(limiter, (RateLimiter, AsyncRateLimiter)):
        raise TypeError(f"limiter must be a nexus_limits limiter, got {type(limiter).__name__}")
    is_async_limiter = isinstance(limiter, AsyncRateLimiter)

    def resolve(args: Any, kwargs: Any) -> Any:
        k = key(*args, **kwargs) if callable(key) else key
        c = cost(*args, **kwargs) if callable(cost) else cost
        return k, c

    def decorate(fn: F) -> F:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                k, c = resolve(args, kwargs)
                if wait:
                    await limiter.acquire_async(k, c, timeout)
                else:
                    result = limiter.hit(k, c)
                    d: Any = await result if inspect.isawaitable(result) else result
                    if not d.allowed:
                        raise RateLimitExceeded(k, d, None)
                return await fn(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]
        if is_async_limiter:
            raise TypeError("an asyncio limiter can only limit async functions")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            k, c = resolve(args, kwargs)
            if wait:
                limiter.acquire(k, c, timeout)
            else:
                d: Any = limiter.hit(k, c)
                if not d.allowed:
                    raise RateLimitExceeded(k, d, None)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
