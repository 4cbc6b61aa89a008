"""What the ASGI, WSGI and Django adapters share: who the client is, which limits
apply to it, checking them, and the 400, 401 and 429 answers."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import math
import time
from http import HTTPStatus
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple, Union

from .._core import Decision
from ..base import AsyncRateLimiter, RateLimiter
from ..errors import BadRequest
from ._keys import KeyFunc, Request, client_ip, parse_key_spec
from ._target import match_form, normalize_target, quote_decoded
from .headers import ALL_HEADERS, HeaderOptions, Policy, check_policy_name, policy_of, rate_limit_headers

__all__ = ["Check", "KeyFunc", "Limits", "Request", "client_ip", "parse_key_spec"]

ANONYMOUS = "anonymous"


def _config_path(option: str, path: Any) -> Tuple[str, str]:
    """(normalised path, its match form) of a path given in ``routes=`` or ``exempt=``:
    written as in a URL or decoded, normalised as requests are."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"{option}: {path!r} is not a path starting with '/'")
    try:
        # Escapes in the text are kept; anything else a URL could not hold is encoded.
        _, normal = normalize_target("GET", quote_decoded(path).replace("%25", "%"))
    except BadRequest as error:
        raise ValueError(f"{option}: {path!r} cannot be a request path ({error})") from None
    return normal, match_form(normal)


def _paths(option: str, paths: Any) -> List[Tuple[str, str]]:
    if isinstance(paths, (str, bytes)):
        raise TypeError(f"{option} must be a list of paths, not one string: [{paths!r}]")
    return [_config_path(option, p) for p in paths]


class Limits:
    """Which limits apply to a request: per-route limiters with costs, tiers, exempt
    paths. Shared by every adapter."""

    def __init__(
        self,
        limiter: Any = None,
        key: Any = "ip",
        *,
        tiers: Optional[Mapping[str, Any]] = None,
        tier_of: Union[Mapping[Any, str], Callable[[Any], Optional[str]], None] = None,
        default_tier: Optional[str] = None,
        routes: Optional[Mapping[str, Any]] = None,
        cost: Union[int, Callable[[Request], int]] = 1,
        exempt: Iterable[str] = (),
        missing_key: str = "reject",
        trusted_proxies: Iterable[str] = (),
        forwarded_header: str = "x-forwarded-for",
        ipv6_prefix: int = 64,
        policy_name: str = "default",
        headers: HeaderOptions = ALL_HEADERS,
        metrics: Any = None,
    ) -> None:
        if limiter is None and not tiers and not routes:
            raise ValueError("give a limiter, tiers or routes")
        self.key_func = parse_key_spec(key, trusted_proxies, forwarded_header=forwarded_header, ipv6_prefix=ipv6_prefix)
        if missing_key not in ("reject", ANONYMOUS):
            raise ValueError(f"missing_key must be 'reject' or 'anonymous', got {missing_key!r}")
        self.missing_key = missing_key
        self.limiter = limiter
        self.tiers = dict(tiers or {})
        if tiers and default_tier is not None and default_tier not in self.tiers:
            raise ValueError(f"default_tier {default_tier!r} is not one of the tiers")
        for name in [policy_name, *self.tiers]:
            check_policy_name(name)
        self.tier_of = tier_of
        self.default_tier = default_tier
        if isinstance(routes, (str, bytes)) or (routes is not None and not hasattr(routes, "items")):
            raise TypeError("routes must be a dict: path prefix -> limiter or (limiter, cost)")
        # (match form without a trailing "/", the same + "/", policy name, limiter or
        # (limiter, cost)); longest first, so the most specific prefix wins.
        self.routes: List[Tuple[str, str, str, Any]] = []
        for prefix, value in (routes or {}).items():
            normal, match = _config_path("routes", prefix)
            base = match.rstrip("/")
            self.routes.append((base, base + "/", normal, value))
        self.routes.sort(key=lambda r: -len(r[0]))
        self.cost = cost
        exempt_paths = _paths("exempt", exempt)
        self.exempt = tuple(normal for normal, _ in exempt_paths)
        # "/health" exempts that path only; "/docs/" every path under it.
        self._exempt_exact = frozenset(m for _, m in exempt_paths if not m.endswith("/"))
        self._exempt_under = tuple(m for _, m in exempt_paths if m.endswith("/"))
        self.policy_name = policy_name
        self.header_options = headers
        if metrics is not None and not callable(getattr(metrics, "observe", None)):
            raise TypeError(f"metrics must be a nexus_limits.metrics.Metrics, got {type(metrics).__name__}")
        self.metrics = metrics
        for lim in self._all_limiters():
            if not isinstance(lim, (RateLimiter, AsyncRateLimiter)):
                raise TypeError(f"limiters must be nexus_limits limiters, got {type(lim).__name__}")

    def _all_limiters(self) -> List[Any]:
        out = [self.limiter] if self.limiter is not None else []
        out += list(self.tiers.values())
        out += [v[0] if isinstance(v, tuple) else v for *_, v in self.routes]
        return out

    def exempted(self, path: str) -> bool:
        """Whether a normalised path is exempt."""
        match = match_form(path)
        return match in self._exempt_exact or (bool(self._exempt_under) and match.startswith(self._exempt_under))

    def unlimited(self, path: str) -> bool:
        """Whether no limit applies to a normalised path whoever asks (only ``routes=``
        given, none of them holding it): such a request needs no client key."""
        return self.limiter is None and not self.tiers and self.route_of(path) is None

    def route_of(self, path: str) -> Optional[Tuple[str, Any]]:
        """(policy name, limiter or (limiter, cost)) of the route a normalised path is
        on: the longest prefix that is the path or one of its parent paths, segment by
        segment (``/search`` holds ``/search/x``, not ``/search-advanced``)."""
        if not self.routes:
            return None
        match = match_form(path)
        for base, under, name, value in self.routes:
            if match == base or match.startswith(under):
                return name, value
        return None

    def select(self, request: Request, client: Any) -> Tuple[Any, int, str]:
        """(limiter, cost, policy name) for this request."""
        limiter, n, name, _, _ = self.select_labelled(request, client)
        return limiter, n, name

    def select_labelled(self, request: Request, client: Any) -> Tuple[Any, int, str, str, str]:
        """(limiter, cost, policy name, tier, route) for this request: the tier and the
        matched route prefix ("" when none) label the metrics."""
        cost: Union[int, Callable[[Request], int]] = self.cost
        limiter = self.limiter
        name = self.policy_name
        route = tier_name = ""
        matched = self.route_of(request.path)
        if matched is not None:
            name, value = matched
            limiter, cost = value if isinstance(value, tuple) else (value, cost)
            route = name
        elif self.tiers:
            tier = None
            if callable(self.tier_of):
                tier = self.tier_of(client)
            elif self.tier_of is not None:
                tier = self.tier_of.get(client)
            tier = tier if tier in self.tiers else self.default_tier
            if tier is not None:
                limiter, name, tier_name = self.tiers[tier], tier, tier
        n = cost(request) if callable(cost) else cost
        return limiter, n, name, tier_name, route


class Check(NamedTuple):
    """The outcome for one request."""

    allowed: bool
    status: int
    headers: List[Tuple[str, str]]
    body: bytes
    decision: Optional[Decision]


def problem(status: int, title: str, detail: str, extra: Optional[Dict[str, Any]] = None) -> bytes:
    """An RFC 9457 ``application/problem+json`` body (send it with :data:`PROBLEM_TYPE`);
    ``extra`` adds members (``retry_after``, ``budget``...)."""
    doc: Dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    doc.update(extra or {})
    return json.dumps(doc).encode()


PROBLEM_TYPE = ("Content-Type", "application/problem+json")


def flat_parts(limiter: Any) -> List[Any]:
    """A composite's limiters, nested composites expanded (the order of ``hit_each``)."""
    out: List[Any] = []
    for part in limiter.parts:
        out.extend(flat_parts(part) if hasattr(part, "hit_each") else [part])
    return out


def entries_of(
    limiter: Any, decision: Decision, name: str, each: Optional[List[Decision]]
) -> List[Tuple[Policy, Decision]]:
    """(policy, decision) per policy: one for a limiter, one per part for a composite
    (named after the part's rate), so that every policy is listed in the headers."""
    if each is None:
        return [(policy_of(limiter, name), decision)]
    out: List[Tuple[Policy, Decision]] = []
    seen = set()
    for part, d in zip(flat_parts(limiter), each):
        label = str(part.rate)
        if label in seen:
            label = f"{label}#{len(out) + 1}"
        seen.add(label)
        out.append((policy_of(part, label), d))
    return out


def answer(limits: Limits, limiter: Any, decision: Decision, name: str, each: Optional[List[Decision]] = None) -> Check:
    entries = entries_of(limiter, decision, name, each)
    if decision.allowed:
        return Check(True, 200, rate_limit_headers(entries, limits.header_options), b"", decision)
    headers = rate_limit_headers(entries, limits.header_options, denied_by=decision)
    retry = decision.retry_after
    detail = "Too many requests" + ("" if math.isinf(retry) else f"; retry after {max(1, math.ceil(retry))} s")
    body = problem(429, "Too Many Requests", detail, {"policy": name})
    return Check(False, 429, [PROBLEM_TYPE, *headers], body, decision)


def unauthorized() -> Check:
    # RFC 9110 15.5.2: a 401 names the scheme the server accepts.
    headers = [PROBLEM_TYPE, ("WWW-Authenticate", 'Bearer realm="api"')]
    return Check(False, 401, headers, problem(401, "Unauthorized", "no client key in the request"), None)


def bad_request(error: BadRequest) -> Check:
    """The 400 answer to a request that cannot be judged; the detail names the problem."""
    return Check(False, 400, [PROBLEM_TYPE], problem(400, "Bad Request", str(error)), None)


def status_line(status: int) -> str:
    """``"429 Too Many Requests"``: a WSGI status."""
    return f"{status} {HTTPStatus(status).phrase}"


def client_key(limits: Limits, request: Request) -> Optional[Any]:
    key = limits.key_func(request)
    if key is None:
        return ANONYMOUS if limits.missing_key == ANONYMOUS else None
    return key


LONG_KEY = 256


def limiter_key(key: Any) -> Any:
    """The key the limiter is charged under: a key longer than 256 characters (a JWT,
    or a client padding its header) by its SHA-256, so that any length works on every
    backend (Redis refuses keys over 1 KiB) and costs the same memory. As bytes: no str
    key, whatever a client sends, can name it."""
    if isinstance(key, (str, bytes)) and len(key) > LONG_KEY:
        raw = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key
        return b"sha256:" + hashlib.sha256(raw).digest()
    return key


def target_request(
    method: str, path: str, headers: Mapping[str, str], query: str, peer: Optional[str], raw_path: Any = None
) -> Request:
    """A Request with its method and path normalised (raises BadRequest)."""
    method, path = normalize_target(method, path, raw_path)
    return Request(method, path, headers, query, peer)


def check_sync(limits: Limits, request: Request) -> Optional[Check]:
    """None when the request is exempt; otherwise the Check (for WSGI and Django). The
    request's path must be normalised (:func:`target_request`)."""
    if limits.exempted(request.path) or limits.unlimited(request.path):
        return None
    try:
        key = client_key(limits, request)
        if key is None:
            return unauthorized()
        limiter, cost, name, tier, route = limits.select_labelled(request, key)
    except BadRequest as error:
        return bad_request(error)
    if limiter is None:
        return None
    started = time.perf_counter()
    each: Optional[List[Decision]] = None
    if hasattr(limiter, "hit_each"):
        decision, parts = limiter.hit_each(limiter_key(key), cost)
        each = list(parts)
    else:
        decision = limiter.hit(limiter_key(key), cost)
    if limits.metrics is not None:
        limits.metrics.observe(name, tier, route, time.perf_counter() - started, decision, source=limiter)
    return answer(limits, limiter, decision, name, each)


async def check_async(limits: Limits, request: Request) -> Optional[Check]:
    """The same for ASGI: asyncio limiters are awaited; synchronous Redis limiters run
    in a worker thread; in-process limiters are called directly (they never block)."""
    if limits.exempted(request.path) or limits.unlimited(request.path):
        return None
    try:
        key = client_key(limits, request)
        if key is None:
            return unauthorized()
        limiter, cost, name, tier, route = limits.select_labelled(request, key)
    except BadRequest as error:
        return bad_request(error)
    if limiter is None:
        return None
    started = time.perf_counter()
    method = limiter.hit_each if hasattr(limiter, "hit_each") else limiter.hit
    key = limiter_key(key)
    if isinstance(limiter, AsyncRateLimiter):
        result = await method(key, cost)
    elif type(limiter).__module__.startswith("nexus_limits.redis"):
        result = await asyncio.to_thread(method, key, cost)
    else:
        result = method(key, cost)
    decision, each = (result[0], list(result[1])) if isinstance(result, tuple) else (result, None)
    if limits.metrics is not None:
        limits.metrics.observe(name, tier, route, time.perf_counter() - started, decision, source=limiter)
    return answer(limits, limiter, decision, name, each)


def release(decision: Optional[Decision]) -> Any:
    """Ends the lease a Concurrency limiter gave, if any (may return an awaitable)."""
    lease = decision.lease if decision is not None else None
    if lease is None:
        return None
    result = lease.release()
    return result if inspect.isawaitable(result) else None
