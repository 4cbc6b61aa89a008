"""The gateway's forwarding half: one request to the upstream (``upstream.Upstream``, a
pool of kept-alive HTTP/1.1 connections), streamed back.

What goes upstream is exactly what the gateway decided on: the method and the
normalised path the app put into the scope, after ``[upstream] url``'s own path, and
the client's query string byte for byte — never a host or a scheme from the request.
Headers that describe one connection (hop-by-hop, and any named in ``Connection``)
never cross, in either direction; neither do the client's forwarding headers (the
upstream is a third party: client addresses stay with the operator), nor the
upstream's organisation ids, its own rate-limit headers (the gateway's replace them)
or its cookies (unless ``forward_cookies``).
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Tuple
from urllib.parse import urlsplit

from ..adapters import PROBLEM_TYPE, problem
from ..adapters.asgi import Receive, Scope, Send, _raw
from .config import GatewayConfig
from .upstream import Upstream

__all__ = ["UPSTREAM_URL", "BadTarget", "Proxy", "reply"]

# The scope entry where the app leaves the upstream URL it decided on.
UPSTREAM_URL = "nexus_limits.upstream_url"

Headers = List[Tuple[bytes, bytes]]

# Headers that describe one connection, not the message (RFC 9110 7.6.1), plus the
# framing and routing ones the gateway's client and uvicorn set themselves for their
# own hop.
_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
        b"host",
        b"content-length",
    }
)
# Not forwarded upstream: an expectation is for this hop (uvicorn answers it); the
# forwarding headers come from the client and could say anything, and the client's
# address is not the third-party upstream's business.
_REQUEST_DROP = _HOP | {
    b"expect",
    b"forwarded",
    b"x-forwarded-for",
    b"x-forwarded-host",
    b"x-forwarded-proto",
    b"x-forwarded-port",
    b"x-real-ip",
}
# Not returned to clients: uvicorn writes its own date (and server); the upstream's
# organisation and its alternative services are the operator's business.
_RESPONSE_DROP = _HOP | {
    b"date",
    b"server",
    b"alt-svc",
    b"openai-organization",
    b"openai-project",
    b"anthropic-organization-id",
    b"ratelimit",
    b"ratelimit-policy",
}
_RESPONSE_DROP_SUFFIXES = (b"-organization", b"-organization-id", b"-org-id")
# The upstream's rate limits are the operator's organisation-wide ones: the gateway
# answers with its own, per key (the LLM middleware adds them).
_RATE_PREFIXES = (b"x-ratelimit-", b"anthropic-ratelimit-", b"ratelimit-", b"x-budget-")
# On a success they describe the upstream's limits too; on an error (a 429 or 503 of
# the upstream) they tell the client when to come back, so they stay, once.
_RETRY = (b"retry-after", b"retry-after-ms")

# What may go on the wire as it is, in the path and in the query: printable ASCII
# except what the WHATWG URL standard percent-encodes there (the sets httpx applies).
# A target with anything else is refused rather than re-encoded: the upstream must get
# exactly the target the limits were decided on.
_PATH_NOT = b' "#<>?`{}'
_QUERY_NOT = b' "#<>'
_PATH = re.compile(b"[" + re.escape(bytes(c for c in range(0x21, 0x7F) if c not in _PATH_NOT)) + b"]*")
_QUERY = re.compile(b"[" + re.escape(bytes(c for c in range(0x21, 0x7F) if c not in _QUERY_NOT)) + b"]*")
_MAX_TARGET = 65536


# What response_headers does with a header name (lower case): keep it, drop it, or keep
# it on an error answer only, once (the retry headers).
_KEEP, _DROP, _RETRY_ONLY = 0, 1, 2
# Names remembered with their decision, per proxy: the upstream could send any number
# of distinct names, the ones past this are decided each time.
_DECIDED = 1024


def _connection_tokens(headers: Iterable[Tuple[bytes, bytes]]) -> FrozenSet[bytes]:
    """The header names a ``Connection`` header lists: hop-by-hop for this message."""
    out: List[bytes] = []
    for name, value in headers:
        if name.lower() == b"connection":
            out.extend(t.strip().lower() for t in value.split(b","))
    return frozenset(out)


class BadTarget(ValueError):
    """A request target that cannot be forwarded as it was decided on."""


class Proxy:
    """Forwards a request to the upstream, streaming the response back.

    The app gives it the normalised method and path in the scope (``method``,
    ``raw_path``) and the upstream URL it decided on; the body (at most ``max_body``
    bytes, else a 413) arrives through ``receive``.
    """

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.max_body = cfg.max_body_bytes  # the app updates it on a reload
        base = urlsplit(cfg.upstream_url)
        self.prefix = base.path.rstrip("/").encode("ascii")
        self.api_key = cfg.upstream_api_key.encode() if cfg.upstream_api_key else None
        drop = set(_REQUEST_DROP)
        if self.api_key is not None:
            # The client's gateway key, wherever the key spec reads it, stays here.
            drop |= {b"authorization", b"x-api-key", b"api-key"}
            specs = cfg.key if isinstance(cfg.key, list) else [cfg.key]
            drop |= {s.split(":", 1)[1].lower().encode() for s in specs if s.startswith("header:")}
        self.response_drop = set(_RESPONSE_DROP)
        if not cfg.forward_cookies:
            # The upstream's cookies are never kept, nor sent on another client's request.
            drop.add(b"cookie")
            self.response_drop.add(b"set-cookie")
        self.request_drop = frozenset(drop)
        self.request_extra = b""
        if self.api_key is not None:
            self.request_extra = b"authorization: Bearer %s\r\nx-api-key: %s\r\n" % (self.api_key, self.api_key)
        self._decided: Dict[bytes, int] = {}
        # One connection per request the server admits: a key's slow requests are
        # capped per key, so the pool can never be what makes another key wait.
        self.client = Upstream(
            base.scheme,
            base.hostname or "",
            base.port,
            max_connections=cfg.max_connections,
            timeout=cfg.upstream_timeout,
        )
        # The upstream's name in metrics and the admin stats: its host (and port).
        self.name = base.netloc.rsplit("@", 1)[-1]
        # [upstream.adaptive]: an AIMD limit on the calls sent upstream, fed every
        # answer, enforced by an in-process bucket whose rate follows it.
        self.aimd: Any = None
        self.gate: Any = None
        self.window = 60.0
        if cfg.upstream_adaptive is not None:
            import nexus_limits as nl

            from ..outbound import AIMD

            settings = dict(cfg.upstream_adaptive)
            self.window = settings.pop("window")
            self.gate = nl.TokenBucket(nl.Rate(max(1, round(settings["ceiling"])), self.window))
            self.aimd = AIMD(**settings, on_change=self._follow)

    def _follow(self, value: float) -> None:
        """The AIMD value changed: the gate's rate follows (never above the ceiling)."""
        import nexus_limits as nl

        self.gate.set_default_quota(nl.Rate(max(1, round(value)), self.window))

    def adaptive_stats(self) -> Optional[Dict[str, Any]]:
        """The adaptive limit now (requests per ``window`` seconds), or None without one."""
        if self.aimd is None:
            return None
        return {"upstream": self.name, "window": self.window, **self.aimd.stats()}

    def url(self, raw_path: bytes, query: bytes) -> bytes:
        """The upstream target (``[upstream] url``'s path, the normalised path, the
        client's query) exactly as it goes on the wire; BadTarget when a byte of it
        would have to be percent-encoded first."""
        target = self.prefix + raw_path + (b"?" + query if query else b"")
        if len(target) > _MAX_TARGET:
            raise BadTarget(f"the request target is longer than {_MAX_TARGET} bytes")
        if not _PATH.fullmatch(self.prefix + raw_path) or (query and not _QUERY.fullmatch(query)):
            raise BadTarget("the request target has characters that must be percent-encoded")
        return target

    def request_lines(self, headers: Iterable[Tuple[bytes, bytes]]) -> bytes:
        """The request's headers that go upstream (the scope's: names in lower case),
        as header lines, the upstream key's own added."""
        drop = self.request_drop
        kept: List[Tuple[bytes, bytes]] = []
        connection = False
        for k, v in headers:
            if k in drop:
                connection = connection or k == b"connection"
            else:
                kept.append((k, v))
        if connection:
            named = _connection_tokens(headers)
            kept = [(k, v) for k, v in kept if k not in named]
        return b"".join([b"%s: %s\r\n" % (k, v) for k, v in kept]) + self.request_extra

    def _decide(self, name: bytes) -> int:
        """What becomes of a response header (``name`` in lower case), remembered."""
        if name in self.response_drop or name.endswith(_RESPONSE_DROP_SUFFIXES) or name.startswith(_RATE_PREFIXES):
            decision = _DROP
        elif name in _RETRY:
            decision = _RETRY_ONLY
        else:
            decision = _KEEP
        if len(self._decided) < _DECIDED:
            self._decided[name] = decision
        return decision

    def response_headers(self, status: int, headers: Iterable[Tuple[bytes, bytes]]) -> Headers:
        """The upstream's headers that go to the client, names in lower case."""
        decided = self._decided
        out: Headers = []
        retry_seen: Tuple[bytes, ...] = ()
        connection = False
        for name, value in headers:
            decision = decided.get(name)
            if decision is None:
                name = name.lower()  # the upstream client's are already
                decision = decided.get(name)
                if decision is None:
                    decision = self._decide(name)
            if decision == _KEEP:
                out.append((name, value))
            elif decision == _DROP:
                connection = connection or name == b"connection"
            elif status >= 300 and name not in retry_seen:
                retry_seen += (name,)
                out.append((name, value))
        if connection:
            named = _connection_tokens(headers)
            out = [(k, v) for k, v in out if k not in named]
        return out

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        parts: List[bytes] = []
        left = self.max_body
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            if chunk:
                left -= len(chunk)
                if left < 0:
                    # Refused as soon as the limit is passed: no more than the limit and
                    # one chunk is ever held. The server reads and drops the rest.
                    detail = f"the request body is larger than {self.max_body} bytes"
                    await reply(send, 413, problem(413, "Content Too Large", detail))
                    return
                parts.append(chunk)
            if not message.get("more_body", False):
                break
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        method = scope["method"]
        target = scope.get(UPSTREAM_URL)
        if target is None:
            try:
                target = self.url(scope["raw_path"], scope.get("query_string", b""))
            except BadTarget as error:
                await reply(send, 400, problem(400, "Bad Request", str(error)))
                return
        headers = self.request_lines(scope.get("headers") or ())
        if self.gate is not None:
            from ..errors import RateLimitExceeded

            try:
                await self.gate.acquire_async("upstream", timeout=self.cfg.upstream_timeout)
            except RateLimitExceeded as error:
                wait = float(error.retry_after)
                detail = f"the upstream's adaptive limit has no room within {self.cfg.upstream_timeout:g} s"
                extra = [("retry-after", str(max(1, math.ceil(wait))))] if math.isfinite(wait) else []
                await reply(send, 503, problem(503, "Service Unavailable", detail), extra)
                return
        try:
            response = await self.client.request(method, target, headers, body)
        except Exception as error:  # UpstreamError, and anything else the connect raised
            await reply(send, 502, problem(502, "Bad Gateway", f"the upstream could not be reached: {error}"))
            return
        if self.aimd is not None:
            try:
                seen = {k.decode("latin-1"): v.decode("latin-1") for k, v in response.headers}
                self.aimd.observe(response.status, seen)
            except Exception:  # the upstream's headers must never break the answer
                self.aimd.observe(response.status)
        # A client that goes away needs no watch here: the LLM middleware, which every
        # request passes through, cancels this at once (and the connection with it).
        try:
            out_headers = self.response_headers(response.status, response.headers)
            await send({"type": "http.response.start", "status": response.status, "headers": out_headers})
            chunk = await response.read()
            while chunk:
                if response.done:
                    # The last piece ends the response (no empty message after it). The
                    # upstream connection goes back to the pool first: the response is
                    # written to the client at once, whose next request must find it.
                    response.close()
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                chunk = await response.read()
            response.close()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            response.close()


async def reply(send: Send, status: int, body: bytes, extra: Optional[List[Tuple[str, str]]] = None) -> None:
    """A problem+json answer; ``extra`` headers (such as ``connection: close``) added."""
    headers = _raw([PROBLEM_TYPE, *(extra or ())])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
