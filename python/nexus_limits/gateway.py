"""The reference LLM gateway: ``nexus-limits gateway --config gateway.toml``.

An ASGI app (served by uvicorn) that proxies an OpenAI- or Anthropic-compatible API to
one upstream with httpx, streaming, and enforces per-key request, token and
concurrency limits per tier — in-process or on Redis. See ``examples/gateway.toml``.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from .adapters._common import PROBLEM_TYPE, problem
from .adapters.asgi import Receive, Scope, Send, _raw, request_of
from .adapters.llm import ANTHROPIC_PATHS, OPENAI_PATHS, LLMLimitMiddleware
from .tokens import OutputEstimate

__all__ = ["ConfigError", "GatewayConfig", "build_app", "load_config"]

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


class ConfigError(ValueError):
    """A mistake in the gateway's config, located by file, line and field."""


@dataclass
class Tier:
    name: str
    requests: Optional[str] = None
    tokens: Optional[str] = None
    daily_tokens: Optional[Any] = None
    concurrency: Optional[int] = None
    default_output_tokens: int = 1024
    spend: Optional[str] = None


@dataclass
class GatewayConfig:
    path: str
    upstream_url: str
    upstream_api_key: Optional[str] = None
    upstream_timeout: float = 600.0
    host: str = "127.0.0.1"
    port: int = 8080
    key: str = "bearer"
    default_tier: Optional[str] = None
    keys: Dict[str, str] = field(default_factory=dict)
    tiers: Dict[str, Tier] = field(default_factory=dict)
    backend: str = "memory"
    redis_url: Optional[str] = None
    redis_prefix: str = "nlgw"
    on_error: str = "raise"
    lease_ttl: float = 600.0
    learn_output: bool = False
    prices: Dict[str, Dict[str, Any]] = field(default_factory=dict)


class _Locator:
    """Finds the line of a field in the TOML text, for error messages."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def line(self, table: str, key: Optional[str]) -> int:
        current = ""
        found_table = 0
        subtable = 0
        for number, raw in enumerate(self.lines, 1):
            line = raw.strip()
            header = re.match(r"^\[\s*([^\]]+?)\s*\]$", line)
            if header:
                current = header.group(1).replace('"', "")
                if current == table:
                    found_table = number
                if key is not None and current == f"{table}.{key}" and not subtable:
                    subtable = number
                continue
            if key is not None and current == table:
                name = line.split("=", 1)[0].strip().strip('"')
                if "=" in line and name == key:
                    return number
        return subtable or found_table or 1

    def error(self, table: str, key: Optional[str], message: str) -> ConfigError:
        where = ".".join(p for p in (table, key) if p)
        return ConfigError(f"{self.path}:{self.line(table, key)}: {where}: {message}")


def _toml() -> Any:
    try:
        import tomllib

        return tomllib
    except ImportError:  # pragma: no cover - Python < 3.11
        import tomli  # type: ignore[import-not-found]

        return tomli


def load_config(path: str) -> GatewayConfig:
    """Reads and checks a gateway config; every mistake names the file, line and field."""
    import nexus_limits as nl

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config: {error.strerror}") from None
    toml = _toml()
    try:
        doc = toml.loads(text)
    except toml.TOMLDecodeError as error:
        raise ConfigError(f"{path}: {error}") from None
    loc = _Locator(path, text)

    def table(name: str, required: bool = False) -> Dict[str, Any]:
        value = doc.get(name, {})
        if required and name not in doc:
            raise ConfigError(f"{path}:1: [{name}] is missing")
        if not isinstance(value, dict):
            raise loc.error(name, None, "must be a table")
        return value

    def known(name: str, value: Mapping[str, Any], allowed: Tuple[str, ...]) -> None:
        for key in value:
            if key not in allowed:
                raise loc.error(name, key, f"unknown field (expected one of: {', '.join(allowed)})")

    def typed(name: str, value: Mapping[str, Any], key: str, kind: Any, what: str) -> Any:
        if key not in value:
            return None
        v = value[key]
        if (isinstance(v, bool) and kind is not bool) or not isinstance(v, kind):
            raise loc.error(name, key, f"must be {what}, got {v!r}")
        return v

    upstream = table("upstream", required=True)
    known("upstream", upstream, ("url", "api_key_env", "timeout"))
    url = typed("upstream", upstream, "url", str, "a URL string")
    if not url or not re.match(r"^https?://[^/\s]+", url):
        raise loc.error("upstream", "url", f"must be an http:// or https:// URL, got {url!r}")
    cfg = GatewayConfig(path=path, upstream_url=url.rstrip("/"))
    env = typed("upstream", upstream, "api_key_env", str, "the name of an environment variable")
    if env is not None:
        if env not in os.environ:
            raise loc.error("upstream", "api_key_env", f"the environment variable {env} is not set")
        cfg.upstream_api_key = os.environ[env]
    timeout = typed("upstream", upstream, "timeout", (int, float), "a number of seconds")
    if timeout is not None:
        if timeout <= 0:
            raise loc.error("upstream", "timeout", f"must be above 0, got {timeout!r}")
        cfg.upstream_timeout = float(timeout)

    server = table("server")
    known("server", server, ("host", "port"))
    cfg.host = typed("server", server, "host", str, "a host name or address") or cfg.host
    port = typed("server", server, "port", int, "a port number")
    if port is not None:
        if not 0 < port < 65536:
            raise loc.error("server", "port", f"must be from 1 to 65535, got {port}")
        cfg.port = port

    gateway = table("gateway")
    known("gateway", gateway, ("key", "default_tier", "lease_ttl", "learn_output"))
    learn = typed("gateway", gateway, "learn_output", bool, "true or false")
    cfg.learn_output = bool(learn)
    cfg.key = typed("gateway", gateway, "key", str, "'bearer' or 'header:<name>'") or cfg.key
    if cfg.key != "bearer" and not cfg.key.startswith("header:"):
        raise loc.error("gateway", "key", f"must be 'bearer' or 'header:<name>', got {cfg.key!r}")
    cfg.default_tier = typed("gateway", gateway, "default_tier", str, "a tier name")
    lease_ttl = typed("gateway", gateway, "lease_ttl", (int, float), "a number of seconds")
    if lease_ttl is not None:
        if lease_ttl <= 0:
            raise loc.error("gateway", "lease_ttl", f"must be above 0, got {lease_ttl!r}")
        cfg.lease_ttl = float(lease_ttl)

    backend = table("backend")
    known("backend", backend, ("type", "url", "prefix", "on_error"))
    cfg.backend = typed("backend", backend, "type", str, "'memory' or 'redis'") or "memory"
    if cfg.backend not in ("memory", "redis"):
        raise loc.error("backend", "type", f"must be 'memory' or 'redis', got {cfg.backend!r}")
    cfg.redis_url = typed("backend", backend, "url", str, "a redis:// URL")
    if cfg.backend == "redis" and not (cfg.redis_url or "").startswith(("redis://", "rediss://", "unix://")):
        raise loc.error("backend", "url", f"must be a redis:// URL for the redis backend, got {cfg.redis_url!r}")
    cfg.redis_prefix = typed("backend", backend, "prefix", str, "a key prefix") or cfg.redis_prefix
    cfg.on_error = typed("backend", backend, "on_error", str, "'allow', 'deny' or 'raise'") or cfg.on_error
    if cfg.on_error not in ("allow", "deny", "raise"):
        raise loc.error("backend", "on_error", f"must be 'allow', 'deny' or 'raise', got {cfg.on_error!r}")

    tiers = table("tiers", required=True)
    if not tiers:
        raise loc.error("tiers", None, "define at least one tier")
    for name, spec in tiers.items():
        where = f"tiers.{name}"
        if not isinstance(spec, dict):
            raise loc.error("tiers", name, "must be a table")
        known(where, spec, ("requests", "tokens", "daily_tokens", "concurrency", "default_output_tokens", "spend"))
        tier = Tier(name)
        for key in ("requests", "tokens"):
            rate = typed(where, spec, key, str, 'a rate such as "100/minute"')
            if rate is not None:
                try:
                    nl.Rate.parse(rate)
                except ValueError as error:
                    raise loc.error(where, key, str(error)) from None
                setattr(tier, key, rate)
        daily = spec.get("daily_tokens")
        if daily is not None:
            if isinstance(daily, bool) or not isinstance(daily, (int, str)):
                raise loc.error(where, "daily_tokens", f"must be an int or a rate, got {daily!r}")
            try:
                nl.TokenLimiter(daily_tokens=daily)
            except (ValueError, TypeError) as error:
                raise loc.error(where, "daily_tokens", str(error)) from None
            tier.daily_tokens = daily
        concurrency = typed(where, spec, "concurrency", int, "a whole number")
        if concurrency is not None and concurrency < 1:
            raise loc.error(where, "concurrency", f"must be at least 1, got {concurrency}")
        tier.concurrency = concurrency
        out = typed(where, spec, "default_output_tokens", int, "a whole number")
        if out is not None:
            if out < 0:
                raise loc.error(where, "default_output_tokens", f"must be non-negative, got {out}")
            tier.default_output_tokens = out
        spend = typed(where, spec, "spend", str, 'dollars per period, such as "25.00/day"')
        if spend is not None:
            from .spend import parse_budget

            try:
                parse_budget(spend)
            except ValueError as error:
                raise loc.error(where, "spend", str(error)) from None
            tier.spend = spend
        if not (tier.requests or tier.tokens or tier.daily_tokens or tier.concurrency or tier.spend):
            raise loc.error("tiers", name, "set at least one of requests, tokens, daily_tokens, concurrency, spend")
        cfg.tiers[name] = tier
    if cfg.default_tier is not None and cfg.default_tier not in cfg.tiers:
        raise loc.error("gateway", "default_tier", f"{cfg.default_tier!r} is not a tier")

    prices = table("prices")
    from .spend import PriceTable

    for model, price in prices.items():
        if not isinstance(price, dict):
            raise loc.error("prices", model, "must be a table with input and output (dollars per 1M tokens)")
        known(f"prices.{model}", price, ("input", "output", "cached_input", "cache_write"))
        try:
            PriceTable({model: price})
        except (ValueError, TypeError) as error:
            raise loc.error(f"prices.{model}", None, str(error)) from None
        cfg.prices[model] = price

    keys = table("keys")
    for api_key, tier_name in keys.items():
        if tier_name not in cfg.tiers:
            raise loc.error("keys", api_key, f"tier {tier_name!r} is not defined")
        cfg.keys[api_key] = tier_name
    return cfg


class _Proxy:
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
            await _reply(
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


async def _reply(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _raw([PROBLEM_TYPE])})
    await send({"type": "http.response.body", "body": body})


def _limiter(cfg: GatewayConfig, tier: Tier, redis_client: Any) -> Any:
    import nexus_limits as nl

    kwargs: Dict[str, Any] = {
        "requests": tier.requests,
        "tokens": tier.tokens,
        "daily_tokens": tier.daily_tokens,
        "concurrency": tier.concurrency,
        "lease_ttl": cfg.lease_ttl,
    }
    if redis_client is None:
        return nl.TokenLimiter(**kwargs)
    from .redis.asyncio import TokenLimiter

    return TokenLimiter(
        redis_client, prefix=cfg.redis_prefix, name=f"tier-{tier.name}", on_error=cfg.on_error, **kwargs
    )


def _spend(cfg: GatewayConfig, tier: Tier) -> Any:
    if tier.spend is None:
        return None
    from .spend import SpendLimiter, default_prices

    prices = default_prices()
    for model, price in cfg.prices.items():
        prices.set(model, price)
    if cfg.backend == "redis":
        import redis

        from .redis import SpendLimiter as RedisSpend

        client = redis.Redis.from_url(str(cfg.redis_url))
        return RedisSpend(
            client,
            tier.spend,
            prices=prices,
            prefix=cfg.redis_prefix,
            name=f"spend-{tier.name}",
            on_error=cfg.on_error,
            lease_ttl=cfg.lease_ttl,
        )
    return SpendLimiter(tier.spend, prices=prices, lease_ttl=cfg.lease_ttl)


class Gateway:
    """Routes each request to its key's tier and that tier's limits, then the upstream."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.proxy = _Proxy(cfg)
        redis_client = None
        if cfg.backend == "redis":
            import redis.asyncio

            redis_client = redis.asyncio.Redis.from_url(str(cfg.redis_url))
        self.redis = redis_client
        self.tiers: Dict[str, Any] = {}
        for name, tier in cfg.tiers.items():
            limiter = (
                _limiter(cfg, tier, redis_client)
                if (tier.requests or tier.tokens or tier.daily_tokens or tier.concurrency)
                else None
            )
            output: OutputEstimate
            if cfg.learn_output:
                from .spend import LearnedOutputEstimate

                output = LearnedOutputEstimate(default=tier.default_output_tokens)
            else:
                output = OutputEstimate(default=tier.default_output_tokens)
            self.tiers[name] = LLMLimitMiddleware(
                self.proxy, limiter=limiter, spend=_spend(cfg, tier), key=cfg.key, output=output
            )
        self.key_header = cfg.key.split(":", 1)[1].lower() if cfg.key.startswith("header:") else None

    def _api_key(self, scope: Scope) -> Optional[str]:
        req = request_of(scope)
        if self.key_header is not None:
            return req.headers.get(self.key_header) or None
        scheme, _, token = req.headers.get("authorization", "").partition(" ")
        return token.strip() or None if scheme.lower() == "bearer" else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.proxy.client.aclose()
                    if self.redis is not None:
                        await self.redis.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope.get("path") in ("/healthz", "/health"):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        key = self._api_key(scope)
        tier = self.cfg.keys.get(key or "", self.cfg.default_tier) if key else None
        if tier is None:
            await _reply(send, 401, problem(401, "Unauthorized", "unknown or missing API key"))
            return
        if scope.get("path") not in (*OPENAI_PATHS, *ANTHROPIC_PATHS):
            await self.proxy(scope, receive, send)
            return
        await self.tiers[tier](scope, receive, send)


def build_app(config_path: str) -> Gateway:
    return Gateway(load_config(config_path))


def run(config_path: str, host: Optional[str] = None, port: Optional[int] = None) -> None:  # pragma: no cover
    import uvicorn

    app = build_app(config_path)
    uvicorn.run(app, host=host or app.cfg.host, port=port or app.cfg.port, proxy_headers=False)
