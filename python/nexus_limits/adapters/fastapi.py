"""FastAPI and Starlette: a limit per route, as a dependency, and the handlers that turn
refusals into 429s.

    from fastapi import Depends, FastAPI
    from nexus_limits.adapters.fastapi import RateLimit, install

    app = FastAPI()
    install(app)   # problem+json bodies, @nl.limit -> 429, headers on Response objects

    @app.get("/search", dependencies=[Depends(RateLimit("10/minute", key="header:x-api-key"))])
    def search(q: str): ...

An allowed request gets the rate-limit headers of the middleware
(``nexus_limits.adapters.asgi.RateLimitMiddleware``) on its response; a refused one gets
the same 429 (status, headers and, with :func:`install`, the same
``application/problem+json`` body). The dependency needs FastAPI 0.118 or later (where
the code after a dependency's ``yield`` runs once the response has been sent); the
handlers and the middleware need only Starlette.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the annotations of
# ``RateLimit.__call__`` (Request, Response) at run time to inject them.

import contextvars
import inspect
import json
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, List, MutableMapping, Optional, Sequence, Tuple, Union

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from .._core import Decision
from ..errors import BadRequest, RateLimitExceeded
from ._common import PROBLEM_TYPE, Check, Limits, check_async, problem, release
from .asgi import request_of, target_of
from .decorators import LabelledMetrics, default_policy_name, exceeded_answer, limiter_of, merge_headers
from .headers import ALL_HEADERS, HeaderOptions

__all__ = [
    "RateLimit",
    "RateLimitHeadersMiddleware",
    "RateLimitRefused",
    "install",
    "rate_limit_exceeded_handler",
    "refusal_handler",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = List[Tuple[str, str]]

# Where this request's RateLimit dependencies leave their headers, for
# RateLimitHeadersMiddleware (a response the endpoint built itself never sees the
# headers set on the injected Response).
SCOPE_KEY = "nexus_limits.headers"

# The key and cost a callable computed for this request, read by the Limits' key and
# cost functions inside check_async (same task, so a context variable is per request).
_KEY: contextvars.ContextVar[Any] = contextvars.ContextVar("nexus_limits_key")
_COST: contextvars.ContextVar[int] = contextvars.ContextVar("nexus_limits_cost")


class RateLimitRefused(HTTPException):
    """A request a :class:`RateLimit` refused: 429 (over the limit), 401 (no client key,
    with ``missing_key="reject"``) or 400 (a request that cannot be judged, e.g. two
    different API keys).

    An ``HTTPException``, so FastAPI answers it with its status and headers even with no
    handler installed (body ``{"detail": "..."}``); :func:`install` (or
    :func:`refusal_handler`) answers with the middleware's ``application/problem+json``
    body, kept in ``.body``. ``.decision`` is the limiter's Decision (None for 400/401).
    """

    def __init__(self, status: int, headers: Headers, body: bytes, decision: Optional[Decision] = None) -> None:
        try:
            detail = str(json.loads(body).get("detail", ""))
        except (ValueError, AttributeError):
            detail = ""
        super().__init__(status, detail=detail, headers=_without_content_type(headers))
        self.body = body
        self.decision = decision


def _without_content_type(headers: Headers) -> Dict[str, str]:
    return {k: v for k, v in headers if k.lower() != "content-type"}


def _refused(check: Check) -> RateLimitRefused:
    return RateLimitRefused(check.status, check.headers, check.body, check.decision)


def _bad_request(error: BadRequest) -> RateLimitRefused:
    return RateLimitRefused(400, [PROBLEM_TYPE], problem(400, "Bad Request", str(error)))


def _from_context(var: "contextvars.ContextVar[Any]") -> Callable[[Any], Any]:
    return lambda _request: var.get()


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class RateLimit:
    """A FastAPI dependency that limits the routes it is attached to.

    ``RateLimit("10/minute")`` makes its own limiter (a ``SlidingWindow``;
    ``"10/minute;1000/day"``: both, charged together or not at all; see
    :func:`~nexus_limits.adapters.decorators.limiter_of`); ``RateLimit(limiter=...)`` takes any
    nexus-limits limiter (in-process, shared-memory, ``nexus_limits.redis`` or
    ``nexus_limits.redis.asyncio``; a ``Concurrency`` lease is held until the response
    has been sent). One ``RateLimit`` object is one limit: attach the same object to
    several routes to share it, build one per route to keep them apart.

    ``key``: the middleware's specs (``"ip"``, ``"bearer"``, ``"header:<name>"``,
    ``"query:<name>"``, or a list of them), or a callable that gets the Starlette/FastAPI
    ``Request`` (so it can read ``request.path_params``, ``request.state.user`` set by
    your authentication, ``request.scope``...) and returns the client's key (``str``,
    ``bytes`` or ``int``) or None; it may be ``async`` (a plain function runs on the
    event loop: make it ``async`` if it waits for I/O). It may raise
    ``nexus_limits.BadRequest`` for a 400. ``cost``: an int, or a callable of the
    ``Request`` likewise. ``missing_key``, ``trusted_proxies``, ``headers``,
    ``metrics``: as for the middleware. ``policy_name``: the name in the headers and
    the 429 body (default: the rate string, or the limiter's rate).

    Use it in ``dependencies=[Depends(...)]``, on a router
    (``APIRouter(dependencies=[...])``), or as a parameter
    (``decision: Decision = Depends(limit)``) to read the Decision.
    """

    def __init__(
        self,
        rate: Optional[str] = None,
        key: Any = "ip",
        *,
        limiter: Any = None,
        cost: Union[int, Callable[[Request], Any]] = 1,
        missing_key: str = "reject",
        trusted_proxies: Sequence[str] = (),
        policy_name: Optional[str] = None,
        headers: HeaderOptions = ALL_HEADERS,
        metrics: Any = None,
    ) -> None:
        if (rate is None) == (limiter is None):
            raise TypeError("give either a rate such as '10/minute' or limiter=, not both and not neither")
        if limiter is None:
            assert rate is not None
            limiter = limiter_of(rate)
        self.limiter = limiter
        self._key_callable = key if callable(key) else None
        self._cost_callable = cost if callable(cost) else None
        fixed_cost: Any = _from_context(_COST) if self._cost_callable is not None else cost
        if metrics is not None and not callable(getattr(metrics, "observe", None)):
            raise TypeError(f"metrics must be a nexus_limits.metrics.Metrics, got {type(metrics).__name__}")
        self.limits = Limits(
            limiter,
            _from_context(_KEY) if self._key_callable is not None else key,
            cost=fixed_cost,
            missing_key=missing_key,
            trusted_proxies=trusted_proxies,
            policy_name=policy_name if policy_name is not None else default_policy_name(limiter, rate),
            headers=headers,
            metrics=LabelledMetrics(metrics, limiter) if metrics is not None else None,
        )

    def __repr__(self) -> str:
        return f"RateLimit(limiter={self.limiter!r}, policy_name={self.limits.policy_name!r})"

    async def check(self, request: Request) -> Optional[Check]:
        """Judge one request (charging the limiter when admitted); raises
        :class:`RateLimitRefused` for a 400 (None when nothing applies)."""
        try:
            if self._key_callable is not None:
                _KEY.set(await _maybe_await(self._key_callable(request)))
            if self._cost_callable is not None:
                _COST.set(await _maybe_await(self._cost_callable(request)))
            return await check_async(self.limits, request_of(request.scope, target_of(request.scope)))
        except BadRequest as error:
            raise _bad_request(error) from None

    async def __call__(self, request: Request, response: Response) -> AsyncIterator[Optional[Decision]]:
        check = await self.check(request)
        if check is None:
            yield None
            return
        groups: List[Headers] = request.scope.setdefault(SCOPE_KEY, [])
        if not check.allowed:
            if check.status == 429 and groups:  # list the limits already passed too
                raise RateLimitRefused(429, merge_headers([*groups, check.headers]), check.body, check.decision)
            raise _refused(check)
        groups.append(check.headers)
        for name, value in merge_headers(groups):
            response.headers[name] = value
        try:
            yield check.decision
        finally:
            pending = release(check.decision)
            if pending is not None:
                await pending


def refusal_response(exc: RateLimitRefused) -> Response:
    """The answer to a refusal: the middleware's status, headers and problem+json body."""
    return Response(exc.body, exc.status_code, headers=exc.headers, media_type=PROBLEM_TYPE[1])


async def refusal_handler(request: Request, exc: Exception) -> Response:
    """Starlette/FastAPI exception handler for :class:`RateLimitRefused`."""
    assert isinstance(exc, RateLimitRefused)
    return refusal_response(exc)


async def rate_limit_exceeded_handler(request: Request, exc: Exception) -> Response:
    """Starlette/FastAPI exception handler turning ``nexus_limits.RateLimitExceeded``
    (from ``@nl.limit`` on a route, or ``acquire``) into a 429 instead of a 500:
    ``app.add_exception_handler(nl.RateLimitExceeded, rate_limit_exceeded_handler)``."""
    assert isinstance(exc, RateLimitExceeded)
    headers, body = exceeded_answer(exc)
    return Response(body, 429, headers=_without_content_type(headers), media_type=PROBLEM_TYPE[1])


class RateLimitHeadersMiddleware:
    """Adds the headers of this request's :class:`RateLimit` dependencies to responses
    that lack them: those the endpoint built itself (``return JSONResponse(...)``,
    ``StreamingResponse``...), which never see the injected ``Response``.
    :func:`install` adds it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            groups = scope.get(SCOPE_KEY)
            if message["type"] == "http.response.start" and groups:
                present = {name.lower() for name, _ in message.get("headers", ())}
                extra = [
                    (name.lower().encode("latin-1"), value.encode("latin-1"))
                    for name, value in merge_headers(groups)
                    if name.lower().encode("latin-1") not in present
                ]
                if extra:
                    message = dict(message)
                    message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install(app: Any) -> Any:
    """The one line that makes rate limits answer like the middleware, on a FastAPI or
    Starlette app (before it starts):

    - a :class:`RateLimitRefused` answers with the problem+json body (not FastAPI's
      ``{"detail": ...}``);
    - ``nexus_limits.RateLimitExceeded`` (``@nl.limit`` on a route, ``acquire`` timing
      out) answers 429 with the rate-limit headers, not 500;
    - responses the endpoint builds itself get the headers of the route's
      :class:`RateLimit` too (:class:`RateLimitHeadersMiddleware`).

    Returns the app."""
    app.add_exception_handler(RateLimitRefused, refusal_handler)
    app.add_exception_handler(RateLimitExceeded, rate_limit_exceeded_handler)
    app.add_middleware(RateLimitHeadersMiddleware)
    return app
