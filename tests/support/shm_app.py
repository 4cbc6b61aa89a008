"""The ASGI app served by ``uvicorn --workers 4`` in the shared-memory tests: one limit
shared by every worker through the store named in ``NL_SHM_NAME``."""

from __future__ import annotations

import os

import nexus_limits as nl
from nexus_limits.adapters.asgi import RateLimitMiddleware


async def hello(scope, receive, send):
    body = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


store = nl.SharedMemoryStore(os.environ["NL_SHM_NAME"], capacity=4096)
app = RateLimitMiddleware(hello, limiter=nl.FixedWindow("40/hour", store=store), key="header:x-api-key")
