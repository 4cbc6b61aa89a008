"""What the ASGI, WSGI and Django adapters share: who the client is, which limits
apply to it, checking them, and the 429 answer."""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import json
import math
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union
from urllib.parse import parse_qs

from .._core import Decision
from ..base import AsyncRateLimiter, RateLimiter
from .headers import ALL_HEADERS, HeaderOptions, Policy, policy_of, rate_limit_headers

__all__ = ["Check", "KeyFunc", "Limits", "Request", "parse_key_spec"]

ANONYMOUS = "anonymous"


class Request(NamedTuple):
    """The parts of a request the adapters look at (header names lower-case)."""

    method: str
    path: str
    headers: Mapping[str, str]
    query: str
    peer: Optional[str]


KeyFunc = Callable[[Request], Optional[Union[str, bytes, int]]]

_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def _networks(trusted: Iterable[str]) -> List[_Network]:
    nets = []
    for item in trusted:
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"trusted_proxies: {item!r} is not an IP address or network") from None
    return nets


def _ip(text: str) -> Optional[str]:
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text[1:]
    elif text.count(":") == 1:  # "1.2.3.4:5678"
        text = text.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def client_ip(request: Request, trusted: Sequence[_Network]) -> Optional[str]:
    """The client's address: the peer, unless the peer is a trusted proxy; then the
    right-most address of ``Forwarded``/``X-Forwarded-For`` that is not itself trusted.
    Headers from untrusted peers are ignored, so they cannot be spoofed."""
    peer = _ip(request.peer) if request.peer else None

    def is_trusted(addr: Optional[str]) -> bool:
        if addr is None:
            return False
        ip = ipaddress.ip_address(addr)
        return any(ip in net for net in trusted)

    if peer is None or not is_trusted(peer):
        return peer
    hops: List[Optional[str]] = []
    forwarded = request.headers.get("forwarded")
    if forwarded:
        for element in forwarded.split(","):
            for pair in element.split(";"):
                k, _, v = pair.partition("=")
                if k.strip().lower() == "for":
                    hops.append(_ip(v))
    else:
        xff = request.headers.get("x-forwarded-for")
        if xff:
            hops = [_ip(h) for h in xff.split(",")]
    for hop in reversed(hops):
        if hop is None:
            return peer  # malformed chain: do not trust any of it
        if not is_trusted(hop):
            return hop
    return hops[0] if hops else peer


_KEY_FORMS = "'ip', 'bearer', 'header:<name>', 'query:<name>'"


def parse_key_spec(key: Union[str, KeyFunc], trusted_proxies: Iterable[str] = ()) -> KeyFunc:
    """``"ip"``, ``"bearer"``, ``"header:<name>"``, ``"query:<name>"`` or a callable."""
    if callable(key):
        return key
    if not isinstance(key, str):
        raise TypeError(f"key must be a callable or one of {_KEY_FORMS}, got {type(key).__name__}")
    trusted = _networks(trusted_proxies)
    if key == "ip":
        return lambda r: client_ip(r, trusted)
    if key == "bearer":

        def bearer(r: Request) -> Optional[str]:
            auth = r.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            return token.strip() or None if scheme.lower() == "bearer" else None

        return bearer
    kind, _, name = key.partition(":")
    if kind == "header" and name:
        header = name.lower()
        return lambda r: r.headers.get(header) or None
    if kind == "query" and name:
        return lambda r: next(iter(parse_qs(r.query).get(name) or ()), None)
    raise ValueError(f"key must be a callable or one of {_KEY_FORMS}, got {key!r}")


class Limits:
    """Which limits apply to a request: per-route limiters with costs, tiers, exempt
    paths. Shared by every adapter."""

    def __init__(
        self,
        limiter: Any = None,
        key: Union[str, KeyFunc] = "ip",
        *,
        tiers: Optional[Mapping[str, Any]] = None,
        tier_of: Union[Mapping[Any, str], Callable[[Any], Optional[str]], None] = None,
        default_tier: Optional[str] = None,
        routes: Optional[Mapping[str, Any]] = None,
        cost: Union[int, Callable[[Request], int]] = 1,
        exempt: Iterable[str] = (),
        missing_key: str = "reject",
        trusted_proxies: Iterable[str] = (),
        policy_name: str = "default",
        headers: HeaderOptions = ALL_HEADERS,
        metrics: Any = None,
    ) -> None:
        if limiter is None and not tiers and not routes:
            raise ValueError("give a limiter, tiers or routes")
        self.key_func = parse_key_spec(key, trusted_proxies)
        if missing_key not in ("reject", ANONYMOUS):
            raise ValueError(f"missing_key must be 'reject' or 'anonymous', got {missing_key!r}")
        self.missing_key = missing_key
        self.limiter = limiter
        self.tiers = dict(tiers or {})
        if tiers and default_tier is not None and default_tier not in self.tiers:
            raise ValueError(f"default_tier {default_tier!r} is not one of the tiers")
        self.tier_of = tier_of
        self.default_tier = default_tier
        self.routes = sorted((routes or {}).items(), key=lambda kv: -len(kv[0]))
        self.cost = cost
        self.exempt = tuple(exempt)
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
        out += [v[0] if isinstance(v, tuple) else v for _, v in self.routes]
        return out

    def exempted(self, path: str) -> bool:
        return any(path == p or (p.endswith("/") and path.startswith(p)) for p in self.exempt)

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
        for prefix, value in self.routes:
            if request.path.startswith(prefix):
                limiter, cost = value if isinstance(value, tuple) else (value, cost)
                name = prefix.strip("/") or "default"
                route = prefix
                break
        else:
            if self.tiers:
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
    return Check(False, 401, [PROBLEM_TYPE], problem(401, "Unauthorized", "no client key in the request"), None)


def client_key(limits: Limits, request: Request) -> Optional[Any]:
    key = limits.key_func(request)
    if key is None:
        return ANONYMOUS if limits.missing_key == ANONYMOUS else None
    return key


def check_sync(limits: Limits, request: Request) -> Optional[Check]:
    """None when the request is exempt; otherwise the Check (for WSGI and Django)."""
    if limits.exempted(request.path):
        return None
    key = client_key(limits, request)
    if key is None:
        return unauthorized()
    limiter, cost, name, tier, route = limits.select_labelled(request, key)
    if limiter is None:
        return None
    started = time.perf_counter()
    each: Optional[List[Decision]] = None
    if hasattr(limiter, "hit_each"):
        decision, parts = limiter.hit_each(key, cost)
        each = list(parts)
    else:
        decision = limiter.hit(key, cost)
    if limits.metrics is not None:
        limits.metrics.observe(name, tier, route, time.perf_counter() - started, decision)
    return answer(limits, limiter, decision, name, each)


async def check_async(limits: Limits, request: Request) -> Optional[Check]:
    """The same for ASGI: asyncio limiters are awaited; synchronous Redis limiters run
    in a worker thread; in-process limiters are called directly (they never block)."""
    if limits.exempted(request.path):
        return None
    key = client_key(limits, request)
    if key is None:
        return unauthorized()
    limiter, cost, name, tier, route = limits.select_labelled(request, key)
    if limiter is None:
        return None
    started = time.perf_counter()
    method = limiter.hit_each if hasattr(limiter, "hit_each") else limiter.hit
    if isinstance(limiter, AsyncRateLimiter):
        result = await method(key, cost)
    elif type(limiter).__module__.startswith("nexus_limits.redis"):
        result = await asyncio.to_thread(method, key, cost)
    else:
        result = method(key, cost)
    decision, each = (result[0], list(result[1])) if isinstance(result, tuple) else (result, None)
    if limits.metrics is not None:
        limits.metrics.observe(name, tier, route, time.perf_counter() - started, decision)
    return answer(limits, limiter, decision, name, each)


def release(decision: Optional[Decision]) -> Any:
    """Ends the lease a Concurrency limiter gave, if any (may return an awaitable)."""
    lease = decision.lease if decision is not None else None
    if lease is None:
        return None
    result = lease.release()
    return result if inspect.isawaitable(result) else None
