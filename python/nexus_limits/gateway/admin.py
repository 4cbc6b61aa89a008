"""The gateway's admin endpoints, behind the admin token: one key's state and a tier's
top keys."""

from __future__ import annotations

import hmac
import json
from inspect import isawaitable
from typing import Any, Dict, Optional
from urllib.parse import parse_qs, unquote

from ..adapters import problem
from ..adapters.asgi import Scope, Send, request_of
from .proxy import reply

__all__ = ["admin", "json_reply"]


async def admin(gateway: Any, scope: Scope, send: Send) -> None:
    """``GET /_nexus/keys/<key>`` (or ``/_nexus/keys?key=<key>``): one key's tier and
    limits (for a key of a team, also its team and org, and the state of each level);
    ``GET /_nexus/top?tier=<t>&n=<n>``: the keys using the largest share of the tier's
    token limit; ``GET /_nexus/upstream``: the upstream's adaptive limit now
    (``adaptive``: null without ``[upstream.adaptive]``). Every path under ``/_nexus``
    needs the bearer admin token (and is a 404 when none is configured); none is ever
    forwarded upstream."""
    req = request_of(scope)
    token = gateway.cfg.admin_token
    given = req.headers.get("authorization", "")
    if token is None or not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        await reply(
            send,
            404 if token is None else 403,
            problem(
                404 if token is None else 403,
                "Not Found" if token is None else "Forbidden",
                "admin endpoints need the admin token",
            ),
        )
        return
    if scope["method"] not in ("GET", "HEAD"):
        await reply(send, 405, problem(405, "Method Not Allowed", "admin endpoints answer GET"), [("allow", "GET")])
        return
    # The app has normalised the path: "//_nexus/keys/x", "/v1/../_nexus/keys/x" and
    # "/%5Fnexus/keys/x" all arrive here as "/_nexus/keys/x", behind the token above.
    path = scope["path"]
    key: Optional[str] = None
    if path.startswith("/_nexus/keys/"):
        # Escapes other than of unreserved characters are still in the path; the app
        # has checked that they decode to UTF-8 and hide no "/", "?", "#" or control
        # character. A key with a "/" is asked for as /_nexus/keys?key=<key>.
        key = unquote(path[len("/_nexus/keys/") :], errors="strict")
    elif path == "/_nexus/keys":
        try:
            values = parse_qs(req.query, keep_blank_values=True, errors="strict").get("key") or []
        except UnicodeDecodeError:
            values = ["", ""]
        if len(values) != 1:
            await reply(send, 400, problem(400, "Bad Request", "give the key once: /_nexus/keys?key=<key>"))
            return
        key = values[0]
    if key is not None:
        if not key or len(key) > 4096 or not key.isprintable():
            detail = "the key must be 1 to 4096 printable characters"
            await reply(send, 400, problem(400, "Bad Request", detail))
            return
        cfg = gateway.cfg
        tier = cfg.keys.get(key, cfg.default_tier)
        doc: Dict[str, Any] = {"key": key, "tier": tier}
        middleware = gateway.tiers.get(tier) if tier is not None else None
        team = cfg.key_teams.get(key)
        if team is not None:
            # "limits" holds each level's state: {"org": ..., "team": ..., "key": ...}.
            doc["team"] = team
            doc["org"] = cfg.teams[team].org
            middleware = gateway.team_tiers.get(tier)
        if middleware is not None and middleware.limiter is not None:
            inspect = getattr(middleware.limiter, "inspect", None)
            if inspect is None:
                doc["limits"] = None
                doc["detail"] = "per-key state is available with the memory backend"
            else:
                limits = inspect(key)
                doc["limits"] = await limits if isawaitable(limits) else limits
        await json_reply(send, 200, doc)
        return
    if path == "/_nexus/top":
        query = parse_qs(req.query)
        tier = (query.get("tier") or [gateway.cfg.default_tier or next(iter(gateway.cfg.tiers))])[0]
        try:
            n = int((query.get("n") or ["10"])[0])
        except ValueError:
            n = -1
        middleware = gateway.tiers.get(tier)
        if middleware is None or not 1 <= n <= 1000:
            await reply(send, 400, problem(400, "Bad Request", "tier must be a tier and n from 1 to 1000"))
            return
        limiter = middleware.limiter
        why = _no_top_keys(gateway, limiter)
        if why is not None:
            await reply(send, 501, problem(501, "Not Implemented", why))
            return
        which = "tokens" if limiter.tokens is not None else "requests" if limiter.requests is not None else None
        if which is None:
            await json_reply(send, 200, {"tier": tier, "top": []})
            return
        names = [k for k, t in gateway.cfg.keys.items() if t == tier]
        await json_reply(send, 200, {"tier": tier, "limit": which, "top": limiter.top_keys(n, names, limit=which)})
        return
    if path == "/_nexus/upstream":
        await json_reply(send, 200, {"upstream": gateway.proxy.name, "adaptive": gateway.proxy.adaptive_stats()})
        return
    await reply(send, 404, problem(404, "Not Found", "unknown admin endpoint"))


async def json_reply(send: Send, status: int, doc: Any) -> None:
    body = json.dumps(doc, default=str).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def _no_top_keys(gateway: Any, limiter: Any) -> Optional[str]:
    """Why ``/_nexus/top`` cannot answer for a tier's limiter, or None when it can."""
    if limiter is None:
        return "the tier has no request or token limit to rank keys by"
    if getattr(limiter, "store_path", None) is not None:
        # A SharedMemoryStore keeps no per-key ranking: each worker would rank only the
        # calls it served.
        return "top keys are not kept in shared memory (workers > 1): run one worker, or read /metrics"
    if gateway.redis is not None:
        return "top keys need the memory backend"
    if not callable(getattr(limiter, "top_keys", None)):
        return "top keys are not ranked for tiers whose keys are in teams or [classes]"
    return None
