"""The gateway's forwarding half: one request to the upstream with httpx, streamed both
ways."""

from __future__ import annotations

import asyncio

from ..adapters._common import PROBLEM_TYPE, problem
from ..adapters.asgi import Receive, Scope, Send, _raw
from .config import GatewayConfig

__all__ = ["Proxy", "reply"]

# Headers that describe one connection, not the message (RFC 9110 7.6.1), and the ones
# httpx sets itself.
_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"host",
    b"content-length",
}


class Proxy:
    """Forwards a request to the upstream with httpx, streaming both ways."""

    def __init__(self, cfg: GatewayConfig) -> None:
        import httpx

        self.cfg = cfg
        self.client = httpx.AsyncClient(base_url=cfg.upstream_url, timeout=cfg.upstream_timeout)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in _HOP]
        if self.cfg.upstream_api_key:
            headers = [(k, v) for k, v in headers if k.lower() not in (b"authorization", b"x-api-key")]
            headers.append((b"authorization", b"Bearer " + self.cfg.upstream_api_key.encode()))
            headers.append((b"x-api-key", self.cfg.upstream_api_key.encode()))
        query = scope.get("query_string", b"").decode("latin-1")
        url = scope["path"] + (f"?{query}" if query else "")
        request = self.client.build_request(scope["method"], url, headers=headers, content=body)
        try:
            response = await self.client.send(request, stream=True)
        except Exception as error:  # httpx.HTTPError and OS errors
            await reply(
                send, 502, problem(502, "Bad Gateway", f"the upstream could not be reached: {type(error).__name__}")
            )
            return
        # Watch for the client going away, so a stream it no longer reads is cut at once.
        gone = asyncio.ensure_future(receive())
        try:
            out_headers = [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out_headers})
            async for chunk in response.aiter_raw():
                if gone.done() and gone.result().get("type") == "http.disconnect":
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()
            await response.aclose()


async def reply(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _raw([PROBLEM_TYPE])})
    await send({"type": "http.response.body", "body": body})
