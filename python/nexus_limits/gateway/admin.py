"""The gateway's admin endpoints, behind the admin token: one key's state and a tier's
top keys."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from inspect import isawaitable
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote

from ..adapters import problem
from ..adapters.asgi import Scope, Send, request_of
from .proxy import reply
from .tree import TreeLimiter

__all__ = ["admin", "json_reply"]

log = logging.getLogger("nexus_limits.gateway")


async def admin(gateway: Any, scope: Scope, send: Send) -> None:
    """``GET /_nexus/keys/<key>`` (or ``/_nexus/keys?key=<key>``): one key's tier and
    limits (for a key of a team, also its team and org, and the state of each level);
    ``GET /_nexus/top?tier=<t>&n=<n>``: the keys using the largest share of the tier's
    token limit (a key of a team: of its node's in the team hierarchy);
    ``GET /_nexus/upstream``: the upstream's adaptive limit now (``adaptive``: null
    without ``[upstream.adaptive]``). Every path under ``/_nexus``
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
        if len(query.get("tier", ())) > 1 or len(query.get("n", ())) > 1:
            await reply(send, 400, problem(400, "Bad Request", "give tier and n at most once each"))
            return
        tier = (query.get("tier") or [gateway.cfg.default_tier or next(iter(gateway.cfg.tiers))])[0]
        text = (query.get("n") or ["10"])[0]
        # Decimal ASCII digits only: int() would also take "1_000", " 5" or other scripts' digits.
        n = int(text) if text.isascii() and text.isdigit() and len(text) <= 4 else -1
        middleware = gateway.tiers.get(tier)
        if middleware is None or not 1 <= n <= 1000:
            await reply(send, 400, problem(400, "Bad Request", "tier must be a tier and n from 1 to 1000"))
            return
        await _top(gateway, send, tier, n, middleware.limiter)
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
    """Why ``/_nexus/top`` cannot rank a tier's keys in its own limiter, or None when it
    can (a hierarchy's keys are ranked apart: see _tree_rows)."""
    if limiter is None:
        return "the tier has no request or token limit to rank keys by"
    if isinstance(limiter, TreeLimiter):
        return None
    if getattr(limiter, "store_path", None) is not None:
        # A SharedMemoryStore keeps no per-key ranking: each worker would rank only the
        # calls it served.
        return "top keys are not kept in shared memory (workers > 1): run one worker, or read /metrics"
    if gateway.redis is not None:
        return "top keys need the memory backend"
    if not callable(getattr(limiter, "top_keys", None)):
        return "top keys are not ranked for this tier's limiter"
    return None


async def _top(gateway: Any, send: Send, tier: str, n: int, limiter: Any) -> None:
    """``/_nexus/top`` for one tier: its keys by the share of the tier's token limit
    (else its request limit) they use now. A key of a team is charged in the org > team
    > key hierarchy, never in the tier's own limiter: its row is its node's state there
    (with its team and org), read from wherever the hierarchy lives (this process, the
    workers' shared memory, Redis); so is a key of a tier whose limits [classes] share.
    Rows: ``{"key", "id", "used", "limit"}`` as for a plain tier (``id`` None for a
    key read from a hierarchy), ``"team"`` and ``"org"`` for a key of a team; keys that
    used nothing are left out."""
    cfg = gateway.cfg
    tree = gateway.team_tree
    in_teams = [k for k, t in cfg.keys.items() if t == tier and k in cfg.key_teams] if tree is not None else []
    plain = [k for k, t in cfg.keys.items() if t == tier and k not in cfg.key_teams]
    why = _no_top_keys(gateway, limiter)
    if why is not None and not in_teams:
        await reply(send, 501, problem(501, "Not Implemented", why))
        return
    own = cfg.tiers[tier]
    which = "tokens" if own.tokens is not None else "requests" if own.requests is not None else None
    if which is None:
        await json_reply(send, 200, {"tier": tier, "top": []})
        return
    doc: Dict[str, Any] = {"tier": tier, "limit": which}
    try:
        found = await _tree_rows(tree.limiter, in_teams, which) if in_teams else []
        if why is not None:
            if plain or tier == cfg.default_tier:
                doc["detail"] = f"the keys of this tier outside teams are not ranked: {why}"
        elif isinstance(limiter, TreeLimiter):
            found += await _tree_rows(limiter, plain, which)
        else:
            # Every key the tier's own limiter counts is outside teams: the configured ones
            # named, others (of the default tier) by id only.
            found += [(r["key"], r["id"], r["used"], r["limit"]) for r in limiter.top_keys(n, plain, limit=which)]
    except Exception as error:  # the store could not be read (Redis away...)
        # Its words may name a node, whose path holds an API key: not in the answer.
        log.warning("/_nexus/top: the limits of tier %s could not be read (%s)", tier, type(error).__name__)
        await reply(send, 503, problem(503, "Service Unavailable", "the tier's limits could not be read now"))
        return
    found.sort(key=lambda r: (-r[2] / max(r[3], 1), -r[2]))
    rows = []
    for key, fp, used, limit in found[:n]:
        row: Dict[str, Any] = {"key": key, "id": fp, "used": used, "limit": limit}
        team = cfg.key_teams.get(key) if key in in_teams else None
        if team is not None:
            row["team"] = team
            row["org"] = cfg.teams[team].org
        rows.append(row)
    doc["top"] = rows
    await json_reply(send, 200, doc)


# How many nodes of a hierarchy on Redis are read at once (one script each).
_READS = 32


async def _tree_rows(limiter: TreeLimiter, keys: List[str], which: str) -> List[Tuple[Any, Any, int, int]]:
    """(key, None, used, limit) of each of ``keys`` that used some of its own ``which``
    quota, read from the key's node (the last of its path) in the limiter's hierarchy."""

    async def read(key: str) -> Optional[Tuple[Any, Any, int, int]]:
        route = limiter.route_of(key)
        if route is None or f"key.{which}" not in route.names:
            return None  # not routed yet (a reload's quotas being written), or no such quota
        state = limiter.hierarchy.inspect(route.path)
        if isawaitable(state):
            state = await state
        quota = state.get(which)
        if not quota or int(quota["used"]) <= 0:
            return None
        return (key, None, int(quota["used"]), int(quota["limit"]))

    out: List[Tuple[Any, Any, int, int]] = []
    for start in range(0, len(keys), _READS):
        for row in await asyncio.gather(*(read(k) for k in keys[start : start + _READS])):
            if row is not None:
                out.append(row)
    return out
