"""``@limit``: rate limits for plain functions, sync or async — to protect them, or to
throttle outbound calls (``wait=True``).

Also the pieces the per-route limits of ``nexus_limits.adapters.fastapi`` and
``nexus_limits.adapters.flask`` share: the 429 answer to a ``RateLimitExceeded``, the
merging of several limits' headers, the limiter a rate string stands for.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

from ..base import AsyncRateLimiter, RateLimiter
from ..errors import RateLimitExceeded
from ..limiters import Composite, SlidingWindow
from ._common import PROBLEM_TYPE, problem
from .headers import ALL_HEADERS, HeaderOptions, Policy, merge_rate_limit_headers, policy_of, rate_limit_headers

__all__ = ["exceeded_answer", "limit", "limiter_of", "merge_headers"]

F = TypeVar("F", bound=Callable[..., Any])

_NAMED = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
_Call = Callable[[Tuple[Any, ...], Dict[str, Any]], Any]
Headers = List[Tuple[str, str]]


def _signature(fn: Callable[..., Any]) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and C callables may have none
        return None


def _binder(fn: Callable[..., Any], helper: Callable[..., Any], role: str) -> _Call:
    """How to call ``helper`` (the key or cost callable) for one call of ``fn``.

    The call's arguments are bound to ``fn``'s signature (defaults applied), and the
    helper gets the parameters it names, by name: ``key=lambda user: user`` works for
    ``fetch("ann")`` and ``fetch(user="ann")`` alike; a ``**kwargs`` of the helper gets
    the other arguments by name too. A helper that names nothing but takes ``*args``
    gets the call's arguments as they were passed."""
    fsig, hsig = _signature(fn), _signature(helper)
    if fsig is None or hsig is None:
        return lambda args, kwargs: helper(*args, **kwargs)
    hparams = list(hsig.parameters.values())
    named = [p for p in hparams if p.kind in _NAMED]
    takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in hparams)
    takes_var_args = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in hparams)
    if not hparams:
        return lambda args, kwargs: helper()
    if not named and takes_var_args:
        return lambda args, kwargs: helper(*args, **kwargs)
    fparams = fsig.parameters
    fn_var_kw = next((p.name for p in fparams.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    fn_name = getattr(fn, "__qualname__", repr(fn))
    for p in named:
        if p.name not in fparams and fn_var_kw is None and p.default is inspect.Parameter.empty:
            raise TypeError(
                f"{role} takes {p.name!r}, but {fn_name}{fsig} has no parameter of that name: "
                f"the {role} gets the function's arguments by name, so name its parameters after them"
            )

    def call(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        bound = fsig.bind(*args, **kwargs)  # the TypeError the function itself would raise
        bound.apply_defaults()
        values = dict(bound.arguments)
        extra: Dict[str, Any] = values.pop(fn_var_kw, {}) if fn_var_kw is not None else {}
        positional: List[Any] = []
        keywords: Dict[str, Any] = {}
        for p in named:
            if p.name in values:
                value = values[p.name]
            elif p.name in extra:
                value = extra[p.name]
            elif p.default is not inspect.Parameter.empty:
                if p.kind is not inspect.Parameter.POSITIONAL_ONLY:
                    continue
                value = p.default
            else:
                raise TypeError(f"{role} takes {p.name!r}, which this call of {fn_name} did not pass")
            if p.kind is inspect.Parameter.POSITIONAL_ONLY:
                positional.append(value)
            else:
                keywords[p.name] = value
        if takes_var_kw:
            for name, value in {**values, **extra}.items():
                keywords.setdefault(name, value)
        return helper(*positional, **keywords)

    return call


def _policy_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__name__", "")
    return name if isinstance(name, str) and name.isascii() and name.isprintable() and name else "default"


def _exceeded(error: RateLimitExceeded, limiter: Any, policy: str) -> RateLimitExceeded:
    """Tags the error with the limiter and the function's name, so that the framework
    handlers (``nexus_limits.adapters.fastapi``/``flask``) can describe the policy in
    the rate-limit headers of their 429."""
    setattr(error, "limiter", limiter)  # noqa: B010 - RateLimitExceeded declares neither
    setattr(error, "policy", policy)  # noqa: B010
    return error


def limit(
    limiter: Any,
    key: Union[str, bytes, int, Callable[..., Any]] = "default",
    cost: Union[int, Callable[..., int]] = 1,
    wait: bool = False,
    timeout: Optional[float] = None,
) -> Callable[[F], F]:
    """Limit calls of the decorated function.

    ``key`` is a constant (one shared limit, e.g. ``"openai"`` to throttle outbound
    calls) or a callable that gets the call's arguments **by name**: its parameters are
    named after the function's (``key=lambda user: user`` on ``def fetch(user, fmt)``,
    whether called ``fetch("ann", "csv")`` or ``fetch(user="ann", fmt="csv")``; defaults
    are applied; a ``**kwargs`` of the callable gets the other arguments by name; a
    callable that names nothing but takes ``*args`` gets the arguments as passed).
    ``cost`` likewise.

    With ``wait=False`` a refused call raises :class:`~nexus_limits.RateLimitExceeded` at
    once; with ``wait=True`` it waits like ``acquire`` (``asyncio.sleep`` for async
    functions) and raises only when ``timeout`` would pass. On a web route, turn the
    exception into a 429 with the handler of your framework's adapter
    (``nexus_limits.adapters.fastapi.install`` or ``nexus_limits.adapters.flask.install``);
    the exception carries ``.limiter`` and ``.policy`` (the function's name) for it.

    >>> import nexus_limits as nl
    >>> @nl.limit(nl.TokenBucket("2/minute"), key=lambda user: user)
    ... def fetch(user, fmt="json"): return "ok"
    >>> fetch("ann"), fetch(user="ann")
    ('ok', 'ok')
    """
    if not isinstance(limiter, (RateLimiter, AsyncRateLimiter)):
        raise TypeError(f"limiter must be a nexus_limits limiter, got {type(limiter).__name__}")
    is_async_limiter = isinstance(limiter, AsyncRateLimiter)

    def decorate(fn: F) -> F:
        key_of: _Call = _binder(fn, key, "key") if callable(key) else (lambda args, kwargs: key)
        cost_of: _Call = _binder(fn, cost, "cost") if callable(cost) else (lambda args, kwargs: cost)
        policy = _policy_name(fn)

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                k, c = key_of(args, kwargs), cost_of(args, kwargs)
                held: Any
                if wait:
                    try:
                        held = await limiter.acquire_async(k, c, timeout)
                    except RateLimitExceeded as error:
                        _exceeded(error, limiter, policy)
                        raise
                else:
                    result = limiter.hit(k, c)
                    held = await result if inspect.isawaitable(result) else result
                    if not held.allowed:
                        raise _exceeded(RateLimitExceeded(k, held, None), limiter, policy)
                try:
                    return await fn(*args, **kwargs)
                finally:
                    pending = _release(held)
                    if pending is not None:
                        await pending

            return async_wrapper  # type: ignore[return-value]
        if is_async_limiter:
            raise TypeError("an asyncio limiter can only limit async functions")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            k, c = key_of(args, kwargs), cost_of(args, kwargs)
            held: Any
            if wait:
                try:
                    held = limiter.acquire(k, c, timeout)
                except RateLimitExceeded as error:
                    _exceeded(error, limiter, policy)
                    raise
            else:
                held = limiter.hit(k, c)
                if not held.allowed:
                    raise _exceeded(RateLimitExceeded(k, held, None), limiter, policy)
            try:
                return fn(*args, **kwargs)
            finally:
                _release(held)

        return wrapper  # type: ignore[return-value]

    return decorate


def _release(held: Any) -> Any:
    """Ends the Concurrency lease that admitted a call, once the call is over: ``held`` is
    what ``acquire`` returned (a Lease, or a Decision) or ``hit``'s Decision. Returns the
    awaitable of an asyncio lease, if any."""
    lease = held if callable(getattr(held, "release", None)) else getattr(held, "lease", None)
    if lease is None:
        return None
    result = lease.release()
    return result if inspect.isawaitable(result) else None


def merge_headers(groups: Sequence[Headers]) -> Headers:
    """One value per rate-limit header for several limits that judged one request (see
    :func:`~nexus_limits.adapters.headers.merge_rate_limit_headers`: every policy listed,
    the legacy headers of the most restrictive, the longest ``Retry-After``)."""
    merged: Headers = []
    for group in groups:
        merged = merge_rate_limit_headers(merged, group)
    return merged


def exceeded_answer(exc: RateLimitExceeded, options: HeaderOptions = ALL_HEADERS) -> Tuple[Headers, bytes]:
    """Headers (Content-Type included) and problem+json body of the 429 for a
    ``RateLimitExceeded`` (raised by ``@nl.limit`` or ``acquire``), the same as the
    middleware's: the policy is the limited function's name. Used by the FastAPI and
    Flask handlers."""
    decision = exc.decision
    name = getattr(exc, "policy", None) or "default"
    limiter = getattr(exc, "limiter", None)
    policy = policy_of(limiter, name) if limiter is not None else Policy(name, int(decision.limit), 0)
    headers = rate_limit_headers([(policy, decision)], options, denied_by=decision)
    retry = exc.retry_after
    detail = "Too many requests" + ("" if math.isinf(retry) else f"; retry after {max(1, math.ceil(retry))} s")
    return [PROBLEM_TYPE, *headers], problem(429, "Too Many Requests", detail, {"policy": name})


# Shared by the per-route limits of nexus_limits.adapters.fastapi and .flask.


def limiter_of(rate: str) -> Any:
    """The limiter a rate string stands for: a ``SlidingWindow`` (at most about N in
    any window of the period, with no burst of 2N where two fixed windows meet);
    ``"10/minute;1000/day"`` is a ``Composite`` of both (charged together or not at
    all). For another algorithm, pass ``limiter=``."""
    if not isinstance(rate, str):
        raise TypeError(f"rate must be a str such as '10/minute', got {type(rate).__name__}")
    parts = [part.strip() for part in rate.split(";")]
    if not all(parts):
        raise ValueError(f"rate must be rates separated by ';' such as '10/minute;1000/day', got {rate!r}")
    if len(parts) == 1:
        return SlidingWindow(parts[0])
    return Composite([SlidingWindow(part) for part in parts])


def default_policy_name(limiter: Any, rate: Optional[str]) -> str:
    if rate is not None:
        return rate
    own = getattr(limiter, "rate", None)
    return str(own) if own is not None else "default"


class LabelledMetrics:
    """Passes the limiter object along, so that ``Metrics`` labels the request with the
    name the limiter is watched under."""

    def __init__(self, metrics: Any, source: Any) -> None:
        self.metrics = metrics
        self.source = source

    def observe(self, limiter: str, tier: str, route: str, seconds: float, decision: Any, source: Any = None) -> None:
        label_of = getattr(self.metrics, "label_of", None)
        name = label_of(self.source, limiter) if callable(label_of) else limiter
        self.metrics.observe(name, tier, route, seconds, decision)
