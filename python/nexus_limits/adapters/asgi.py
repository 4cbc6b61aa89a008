"""Pure ASGI middleware (Starlette, FastAPI, Litestar, Quart...).

    from nexus_limits.adapters.asgi import RateLimitMiddleware
    app.add_middleware(RateLimitMiddleware, limiter=nl.TokenBucket("100/minute"), key="header:x-api-key")

Every limited response carries the rate-limit headers (merged with those an inner
middleware or the app already set: one header of each name); a refused request gets a
429 with an ``application/problem+json`` body (a 401 when ``missing_key="reject"`` and
the request names no client, a 400 when it cannot be judged: a target that is not a
plain path, a key given twice with different values). Websockets are limited when they
connect (a refused one is closed with code 1008 before it is accepted). A
``Concurrency`` lease is held until the response has been sent.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Awaitable, Callable, Dict, List, MutableMapping, Optional, Sequence, Tuple

from ..errors import BadRequest
from ._common import Check, Limits, Request, bad_request, check_async, release
from ._target import normalize_target, quote_decoded
from .headers import RATE_LIMIT_HEADERS, merge_rate_limit_headers

__all__ = ["RateLimitMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def target_of(scope: Scope) -> Tuple[str, str]:
    """The scope's ``(METHOD, path)``, normalised (see
    :func:`~nexus_limits.adapters.normalize_target`): from ``raw_path`` when the server
    gives it, else from the decoded ``path``. Raises BadRequest."""
    raw = scope.get("raw_path")
    path = scope.get("path", "/")
    return normalize_target(scope.get("method", "GET"), path if raw is not None else quote_decoded(path), raw)


def request_of(scope: Scope, target: Optional[Tuple[str, str]] = None) -> Request:
    """The Request of a scope; a header sent several times is one value, the values
    joined with ", " in order. Method and path are the scope's as they are, or
    ``target`` (from :func:`target_of`)."""
    headers: Dict[str, str] = {}
    for name, value in scope.get("headers") or ():
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    client = scope.get("client")
    method, path = target if target is not None else (scope.get("method", "GET"), scope.get("path", "/"))
    return Request(
        method,
        path,
        headers,
        (scope.get("query_string") or b"").decode("latin-1"),
        client[0] if client else None,
    )


def _raw(headers: List[Tuple[str, str]]) -> List[Tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]


_MERGED = frozenset(name.encode() for name in RATE_LIMIT_HEADERS)


def _merged(headers: Sequence[Tuple[bytes, bytes]], ours: List[Tuple[str, str]]) -> List[Tuple[bytes, bytes]]:
    """The response's headers with its rate-limit headers and ours made one of each."""
    kept: List[Tuple[bytes, bytes]] = []
    present: List[Tuple[str, str]] = []
    for name, value in headers:
        if bytes(name).lower() in _MERGED:
            present.append((bytes(name).decode("latin-1"), bytes(value).decode("latin-1")))
        else:
            kept.append((name, value))
    return kept + _raw(merge_rate_limit_headers(present, ours))


class RateLimitMiddleware:
    """Limits every HTTP request and websocket connection of an ASGI app.

    ``limiter``: any nexus-limits limiter (in-process, ``nexus_limits.redis`` or
    ``nexus_limits.redis.asyncio``). ``key``: ``"ip"`` (the peer; behind
    ``trusted_proxies``, the address in ``forwarded_header``; IPv6 per
    ``/ipv6_prefix``), ``"bearer"``, ``"header:<name>"``, ``"query:<name>"``, a callable
    taking a :class:`~nexus_limits.adapters.Request`, or a list of these (see
    :func:`~nexus_limits.adapters.parse_key_spec`). Other options:
    ``tiers``/``tier_of``/``default_tier``, ``routes`` (path prefix -> limiter or
    ``(limiter, cost)``; a prefix holds its sub-paths, segment by segment), ``cost``,
    ``exempt`` (paths; a trailing ``/`` exempts every path under it), ``missing_key``
    (``"reject"``: 401, or ``"anonymous"``: one shared key), ``policy_name``,
    ``headers`` (a ``HeaderOptions``). Paths are compared after normalisation (dot
    segments, repeated slashes and escapes of unreserved characters resolved).
    """

    def __init__(self, app: Any, limiter: Any = None, key: Any = "ip", **options: Any) -> None:
        self.app = app
        self.limits = Limits(limiter, key, **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        try:
            target = target_of(scope)
        except BadRequest as error:
            await self._refuse(scope, receive, send, bad_request(error))
            return
        check = await check_async(self.limits, request_of(scope, target))
        if check is None:
            await self.app(scope, receive, send)
            return
        if not check.allowed:
            await self._refuse(scope, receive, send, check)
            return
        ours = check.headers
        extra = _raw(ours)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                headers = message.get("headers") or ()
                for name, _ in headers:
                    if name in _MERGED or bytes(name).lower() in _MERGED:
                        message["headers"] = _merged(headers, ours)
                        break
                else:
                    message["headers"] = [*headers, *extra]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            pending = release(check.decision)
            if pending is not None:
                await pending

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, check: Check) -> None:
        if scope["type"] == "websocket":
            message = await receive()
            if message["type"] == "websocket.connect":
                reason = "rate limited" if check.status == 429 else HTTPStatus(check.status).phrase.lower()
                await send({"type": "websocket.close", "code": 1008, "reason": reason})
            return
        headers = [*_raw(check.headers), (b"content-length", str(len(check.body)).encode())]
        await send({"type": "http.response.start", "status": check.status, "headers": headers})
        await send({"type": "http.response.body", "body": check.body})
