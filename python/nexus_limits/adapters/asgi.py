"""Pure ASGI middleware (Starlette, FastAPI, Litestar, Quart...).

    from nexus_limits.adapters.asgi import RateLimitMiddleware
    app.add_middleware(RateLimitMiddleware, limiter=nl.TokenBucket("100/minute"), key="header:x-api-key")

Every limited response carries the rate-limit headers; a refused request gets a 429
with an ``application/problem+json`` body (a 401 when ``missing_key="reject"`` and the
request names no client). Websockets are limited when they connect (a refused one is
closed with code 1008 before it is accepted). A ``Concurrency`` lease is held until the
response has been sent.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Dict, List, MutableMapping, Tuple

from ._common import Check, Limits, Request, check_async, release

__all__ = ["RateLimitMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def request_of(scope: Scope) -> Request:
    headers: Dict[str, str] = {}
    for name, value in scope.get("headers") or ():
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    client = scope.get("client")
    return Request(
        scope.get("method", "GET"),
        scope.get("path", "/"),
        headers,
        (scope.get("query_string") or b"").decode("latin-1"),
        client[0] if client else None,
    )


def _raw(headers: List[Tuple[str, str]]) -> List[Tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]


class RateLimitMiddleware:
    """Limits every HTTP request and websocket connection of an ASGI app.

    ``limiter``: any nexus-limits limiter (in-process, ``nexus_limits.redis`` or
    ``nexus_limits.redis.asyncio``). ``key``: ``"ip"`` (the peer; ``X-Forwarded-For`` /
    ``Forwarded`` only from ``trusted_proxies``), ``"bearer"``, ``"header:<name>"``,
    ``"query:<name>"`` or a callable taking a :class:`~nexus_limits.adapters.Request`.
    Other options: ``tiers``/``tier_of``/``default_tier``, ``routes`` (path prefix ->
    limiter or ``(limiter, cost)``), ``cost``, ``exempt`` (paths; a trailing ``/``
    exempts the prefix), ``missing_key`` (``"reject"``: 401, or ``"anonymous"``: one
    shared key), ``policy_name``, ``headers`` (a ``HeaderOptions``).
    """

    def __init__(self, app: Any, limiter: Any = None, key: Any = "ip", **options: Any) -> None:
        self.app = app
        self.limits = Limits(limiter, key, **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        check = await check_async(self.limits, request_of(scope))
        if check is None:
            await self.app(scope, receive, send)
            return
        if not check.allowed:
            await self._refuse(scope, receive, send, check)
            return
        extra = _raw(check.headers)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), *extra]
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
                await send({"type": "websocket.close", "code": 1008, "reason": "rate limited"})
            return
        await send({"type": "http.response.start", "status": check.status, "headers": _raw(check.headers)})
        await send({"type": "http.response.body", "body": check.body})
