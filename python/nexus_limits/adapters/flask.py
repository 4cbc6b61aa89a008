"""Flask: a limit per view, as a decorator, with flask-limiter's habits.

    from flask import Flask
    from nexus_limits.adapters.flask import RateLimit, install

    app = Flask(__name__)
    install(app)   # @nl.limit on a view: 429, not 500

    @app.route("/search")
    @RateLimit("10/minute", key="header:x-api-key")
    def search(): ...

Where flask-limiter writes ``@limiter.limit("10/minute")``, write
``@RateLimit("10/minute")``: under ``@app.route``, one decorator per limit object. An
allowed response gets the rate-limit headers of the WSGI middleware
(``nexus_limits.adapters.wsgi.RateLimitMiddleware``); a refused request gets the same
429 with the same ``application/problem+json`` body, raised as a werkzeug
``HTTPException`` so that ``@app.errorhandler(429)`` still applies.
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any, Callable, List, Optional, Sequence, Tuple, TypeVar, Union

from werkzeug.exceptions import BadRequest as _HTTPBadRequest
from werkzeug.exceptions import HTTPException, TooManyRequests, Unauthorized

from .._core import Decision
from ..errors import BadRequest, RateLimitExceeded
from ._common import PROBLEM_TYPE, Check, Limits, check_sync, problem, release
from .decorators import LabelledMetrics, default_policy_name, exceeded_answer, limiter_of, merge_headers
from .headers import ALL_HEADERS, HeaderOptions
from .wsgi import request_of

__all__ = ["RateLimit", "RateLimitRefused", "install", "rate_limit_exceeded_handler"]

F = TypeVar("F", bound=Callable[..., Any])
Headers = List[Tuple[str, str]]

_G_KEY = "_nexus_limits_headers"


def _response(status: int, headers: Headers, body: bytes) -> Any:
    from flask import Response

    response = Response(body, status=status, mimetype=PROBLEM_TYPE[1])
    for name, value in headers:
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


class RateLimitRefused(HTTPException):
    """A request a :class:`RateLimit` refused: 429 (over the limit), 401 (no client key,
    with ``missing_key="reject"``) or 400 (a request that cannot be judged, e.g. two
    different API keys). Flask answers it with the middleware's status, headers and
    problem+json body (``.get_response()``); ``@app.errorhandler(429)`` (or 401, 400,
    or ``RateLimitRefused``) may replace it. Each refusal is also the werkzeug
    exception of its status (``TooManyRequests``...). ``.decision`` is the limiter's
    Decision (None for 400/401), ``.headers`` the rate-limit headers."""

    def __init__(self, status: int, headers: Headers, body: bytes, decision: Optional[Decision] = None) -> None:
        try:
            detail = str(json.loads(body).get("detail", ""))
        except (ValueError, AttributeError):
            detail = ""
        super().__init__(description=detail, response=_response(status, headers, body))
        self.code = status
        self.headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
        self.body = body
        self.decision = decision


class _TooManyRequests(RateLimitRefused, TooManyRequests):
    pass


class _Unauthorized(RateLimitRefused, Unauthorized):
    pass


class _BadRequest(RateLimitRefused, _HTTPBadRequest):
    pass


# Flask finds an errorhandler(429) by the class's code, so each status has its class.
_BY_STATUS = {429: _TooManyRequests, 401: _Unauthorized, 400: _BadRequest}


def refusal(status: int, headers: Headers, body: bytes, decision: Optional[Decision] = None) -> RateLimitRefused:
    """The exception to raise for a refused request."""
    return _BY_STATUS.get(status, RateLimitRefused)(status, headers, body, decision)


def _takes_argument(fn: Callable[..., Any]) -> bool:
    try:
        return bool(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return True


class RateLimit:
    """A decorator that limits a Flask view (put it under ``@app.route``).

    ``RateLimit("10/minute")`` makes its own limiter (a ``SlidingWindow``: about 10 in
    any minute, where flask-limiter's default fixed windows let 20 through across the
    turn of a minute; ``"10/minute;1000/day"``: both, charged together or not at all,
    where flask-limiter checks one after the other); ``RateLimit(limiter=...)`` takes
    any nexus-limits limiter
    (in-process, shared-memory or ``nexus_limits.redis``; a ``Concurrency`` lease is
    held until the server closes the response). One ``RateLimit`` object is one limit:
    decorate several views with the same object to share it.

    ``key``: the middleware's specs (``"ip"``, ``"bearer"``, ``"header:<name>"``,
    ``"query:<name>"``, or a list of them), or a callable returning the client's key
    (``str``, ``bytes`` or ``int``) or None: called with no argument, like
    flask-limiter's ``key_func`` (read ``flask.request``, ``flask.g``,
    ``request.view_args``...), or with the ``flask.request`` when it takes one. It may
    raise ``nexus_limits.BadRequest`` for a 400. ``cost``: an int, or a callable
    likewise. ``missing_key``, ``trusted_proxies``, ``headers``, ``metrics``: as for the
    middleware. ``policy_name``: the name in the headers and the 429 body (default: the
    rate string, or the limiter's rate).
    """

    def __init__(
        self,
        rate: Optional[str] = None,
        key: Any = "ip",
        *,
        limiter: Any = None,
        cost: Union[int, Callable[..., Any]] = 1,
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
        if type(limiter).__module__.startswith("nexus_limits.redis.asyncio"):
            raise TypeError("Flask views are synchronous: use nexus_limits.redis (not .asyncio) limiters")
        self.limiter = limiter
        self._key = key if callable(key) else None
        self._cost = cost if callable(cost) else None
        if metrics is not None and not callable(getattr(metrics, "observe", None)):
            raise TypeError(f"metrics must be a nexus_limits.metrics.Metrics, got {type(metrics).__name__}")
        # The key and cost callables take the flask request (or nothing), not the
        # adapters' Request: they are called in check(), and the Limits reads the
        # values from this request's flask.g.
        key_spec: Any = (lambda _r: _g_value("_nexus_limits_key")) if self._key is not None else key
        cost_spec: Any = (lambda _r: _g_value("_nexus_limits_cost")) if self._cost is not None else cost
        self.limits = Limits(
            limiter,
            key_spec,
            cost=cost_spec,
            missing_key=missing_key,
            trusted_proxies=trusted_proxies,
            policy_name=policy_name if policy_name is not None else default_policy_name(limiter, rate),
            headers=headers,
            metrics=LabelledMetrics(metrics, limiter) if metrics is not None else None,
        )

    def __repr__(self) -> str:
        return f"RateLimit(limiter={self.limiter!r}, policy_name={self.limits.policy_name!r})"

    def _call(self, fn: Callable[..., Any]) -> Any:
        from flask import request

        return fn(request) if _takes_argument(fn) else fn()

    def check(self) -> Optional[Check]:
        """Judge the current request (charging the limiter when admitted); raises
        :class:`RateLimitRefused` for a 400 (None when nothing applies)."""
        from flask import g, request

        try:
            if self._key is not None:
                setattr(g, "_nexus_limits_key", self._call(self._key))  # noqa: B010
            if self._cost is not None:
                setattr(g, "_nexus_limits_cost", self._call(self._cost))  # noqa: B010
            return check_sync(self.limits, request_of(request.environ))
        except BadRequest as error:
            raise refusal(400, [PROBLEM_TYPE], problem(400, "Bad Request", str(error))) from None

    def _admit(self) -> Optional[Check]:
        from flask import g

        check = self.check()
        if check is None:
            return None
        groups: List[Headers] = g.setdefault(_G_KEY, [])
        if not check.allowed:
            headers = check.headers
            if check.status == 429:
                headers = [PROBLEM_TYPE, *merge_headers([*groups, check.headers])]  # the limits passed too
                _keep_on_any_answer(headers)
            raise refusal(check.status, headers, check.body, check.decision)
        groups.append(check.headers)
        return check

    def _finish(self, check: Check, rv: Any) -> Any:
        from flask import g, make_response

        try:
            response = make_response(rv)
        except BaseException:
            release(check.decision)
            raise
        # Stacked RateLimit decorators: the outermost finishes last and writes every
        # limit's headers, merged.
        for name, value in merge_headers(g.get(_G_KEY) or [check.headers]):
            response.headers[name] = value
        response.call_on_close(lambda: release(check.decision))
        return response

    def __call__(self, view: F) -> F:
        if inspect.iscoroutinefunction(view):

            @functools.wraps(view)
            async def async_wrapped(*args: Any, **kwargs: Any) -> Any:
                check = self._admit()
                if check is None:
                    return await view(*args, **kwargs)
                try:
                    rv = await view(*args, **kwargs)
                except BaseException:
                    release(check.decision)
                    raise
                return self._finish(check, rv)

            return async_wrapped  # type: ignore[return-value]

        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            check = self._admit()
            if check is None:
                return view(*args, **kwargs)
            try:
                rv = view(*args, **kwargs)
            except BaseException:
                release(check.decision)
                raise
            return self._finish(check, rv)

        return wrapped  # type: ignore[return-value]


def _keep_on_any_answer(headers: Headers) -> None:
    """The rate-limit headers on the answer to this request whatever makes it: an
    ``@app.errorhandler(429)`` of the app's builds its own response."""
    from flask import after_this_request

    def add(response: Any) -> Any:
        for name, value in headers:
            if name.lower() != "content-type" and name not in response.headers:
                response.headers[name] = value
        return response

    after_this_request(add)


def _g_value(name: str) -> Any:
    from flask import g

    return g.get(name)


def rate_limit_exceeded_handler(error: Exception) -> Any:
    """Flask error handler turning ``nexus_limits.RateLimitExceeded`` (from ``@nl.limit``
    on a view, or ``acquire``) into a 429 with the rate-limit headers and problem+json
    body, instead of a 500:
    ``app.register_error_handler(nl.RateLimitExceeded, rate_limit_exceeded_handler)``."""
    if not isinstance(error, RateLimitExceeded):
        raise TypeError(f"rate_limit_exceeded_handler handles RateLimitExceeded, got {type(error).__name__}")
    headers, body = exceeded_answer(error)
    return _response(429, headers, body)


def install(app: Any) -> Any:
    """The one line that turns ``nexus_limits.RateLimitExceeded`` into a 429 on a Flask
    app (``@nl.limit`` on a view, ``acquire`` timing out). Returns the app."""
    app.register_error_handler(RateLimitExceeded, rate_limit_exceeded_handler)
    return app
