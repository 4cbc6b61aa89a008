"""The reference LLM gateway: ``nexus-limits gateway --config gateway.toml``.

An ASGI app (served by uvicorn) that proxies an OpenAI- or Anthropic-compatible API to
one upstream with httpx, streaming, and enforces per-key request, token and
concurrency limits per tier — in-process or on Redis. See ``examples/gateway.toml``.

The config is TOML, or YAML (``.yaml``/``.yml``, with PyYAML installed); every mistake
is reported with the file, the line and the field. The gateway reloads it on SIGHUP
(and, with ``reload = "watch"``, when the file changes), keeping every counter; it
serves Prometheus metrics (``metrics_path``) and, with an admin token, one key's state
and the top keys of a tier.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import signal
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from .adapters._common import PROBLEM_TYPE, problem
from .adapters.asgi import Receive, Scope, Send, _raw, request_of
from .adapters.llm import ANTHROPIC_PATHS, OPENAI_PATHS, LLMLimitMiddleware
from .tokens import OutputEstimate

__all__ = ["ConfigError", "GatewayConfig", "build_app", "load_config"]

log = logging.getLogger("nexus_limits.gateway")

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
    shadow: bool = False

    def shape(self) -> Tuple[bool, ...]:
        """Which limits the tier has: a reload keeps a tier's counters when this stays."""
        return (bool(self.requests), bool(self.tokens), self.daily_tokens is not None, bool(self.concurrency))

    def has_limits(self) -> bool:
        return bool(self.requests or self.tokens or self.daily_tokens or self.concurrency)


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
    reload: str = "sighup"
    reload_interval: float = 2.0
    metrics_path: Optional[str] = "/metrics"
    admin_token: Optional[str] = None


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


class _YamlLocator(_Locator):
    """Finds the line of a field in a YAML document, from the parser's marks."""

    def __init__(self, path: str, text: str) -> None:
        import yaml

        self.path = path
        self.marks: Dict[str, int] = {}

        def walk(node: Any, prefix: str) -> None:
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    name = f"{prefix}.{k.value}" if prefix else str(k.value)
                    self.marks.setdefault(name, k.start_mark.line + 1)
                    walk(v, name)

        walk(yaml.compose(text, Loader=yaml.SafeLoader), "")

    def line(self, table: str, key: Optional[str]) -> int:
        return self.marks.get(f"{table}.{key}" if key else table) or self.marks.get(table) or 1


def _parse(path: str, text: str) -> Tuple[Any, _Locator]:
    """The document and its line finder, for TOML or (by the file's suffix) YAML."""
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: YAML configs need PyYAML: pip install 'nexus-limits[yaml]'") from None
        try:
            doc = yaml.safe_load(text)
            loc: _Locator = _YamlLocator(path, text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            line = f"{mark.line + 1}:" if mark is not None else ""
            raise ConfigError(f"{path}:{line} invalid YAML: {getattr(error, 'problem', None) or error}") from None
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}:1: the config must be a mapping of sections")
        return doc, loc
    toml = _toml()
    try:
        doc = toml.loads(text)
    except toml.TOMLDecodeError as error:
        raise ConfigError(f"{path}: {error}") from None
    return doc, _Locator(path, text)


_SECTIONS = ("upstream", "server", "gateway", "backend", "tiers", "prices", "keys")


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
    doc, loc = _parse(path, text)
    for section in doc:
        if section not in _SECTIONS:
            raise loc.error(str(section), None, f"unknown section (expected one of: {', '.join(_SECTIONS)})")

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
    known(
        "gateway",
        gateway,
        (
            "key",
            "default_tier",
            "lease_ttl",
            "learn_output",
            "reload",
            "reload_interval",
            "metrics_path",
            "admin_token_env",
        ),
    )
    reload = typed("gateway", gateway, "reload", str, "'sighup', 'watch' or 'off'")
    if reload is not None:
        if reload not in ("sighup", "watch", "off"):
            raise loc.error("gateway", "reload", f"must be 'sighup', 'watch' or 'off', got {reload!r}")
        cfg.reload = reload
    interval = typed("gateway", gateway, "reload_interval", (int, float), "a number of seconds")
    if interval is not None:
        if not 0 < interval <= 3600:
            raise loc.error("gateway", "reload_interval", f"must be above 0 and at most 3600, got {interval!r}")
        cfg.reload_interval = float(interval)
    if "metrics_path" in gateway:
        metrics_path = gateway["metrics_path"]
        if metrics_path is False or metrics_path == "":
            cfg.metrics_path = None
        elif not isinstance(metrics_path, str) or not metrics_path.startswith("/"):
            raise loc.error(
                "gateway", "metrics_path", f"must be a path such as '/metrics' or false, got {metrics_path!r}"
            )
        else:
            cfg.metrics_path = metrics_path
    admin_env = typed("gateway", gateway, "admin_token_env", str, "the name of an environment variable")
    if admin_env is not None:
        if not os.environ.get(admin_env):
            raise loc.error("gateway", "admin_token_env", f"the environment variable {admin_env} is not set")
        cfg.admin_token = os.environ[admin_env]
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
        known(
            where,
            spec,
            ("requests", "tokens", "daily_tokens", "concurrency", "default_output_tokens", "spend", "shadow"),
        )
        tier = Tier(name)
        shadow = typed(where, spec, "shadow", bool, "true or false")
        if shadow:
            if cfg.backend == "redis":
                raise loc.error(where, "shadow", "shadow mode needs the memory backend (type = 'memory')")
            tier.shadow = True
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
        if not (tier.has_limits() or tier.spend):
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
        if not isinstance(tier_name, str) or tier_name not in cfg.tiers:
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
        return nl.TokenLimiter(shadow=tier.shadow, **kwargs)
    from .redis.asyncio import TokenLimiter

    return TokenLimiter(
        redis_client, prefix=cfg.redis_prefix, name=f"tier-{tier.name}", on_error=cfg.on_error, **kwargs
    )


def _prices(cfg: GatewayConfig) -> Any:
    from .spend import default_prices

    prices = default_prices()
    for model, price in cfg.prices.items():
        prices.set(model, price)
    return prices


def _spend(cfg: GatewayConfig, tier: Tier) -> Any:
    if tier.spend is None:
        return None
    from .spend import SpendLimiter

    if cfg.backend == "redis":
        import redis

        from .redis import SpendLimiter as RedisSpend

        client = redis.Redis.from_url(str(cfg.redis_url))
        return RedisSpend(
            client,
            tier.spend,
            prices=_prices(cfg),
            prefix=cfg.redis_prefix,
            name=f"spend-{tier.name}",
            on_error=cfg.on_error,
            lease_ttl=cfg.lease_ttl,
        )
    return SpendLimiter(tier.spend, prices=_prices(cfg), lease_ttl=cfg.lease_ttl)


# What a reload cannot change: these need a restart.
_RESTART_FIELDS = (
    "upstream_url",
    "upstream_api_key",
    "upstream_timeout",
    "host",
    "port",
    "backend",
    "redis_url",
    "redis_prefix",
    "on_error",
    "lease_ttl",
    "reload",
    "metrics_path",
    "admin_token",
)


class Gateway:
    """Routes each request to its key's tier and that tier's limits, then the upstream."""

    def __init__(self, cfg: GatewayConfig) -> None:
        from prometheus_client import CollectorRegistry, Counter

        from .metrics import Metrics

        self.cfg = cfg
        self.proxy = _Proxy(cfg)
        redis_client = None
        if cfg.backend == "redis":
            import redis.asyncio

            redis_client = redis.asyncio.Redis.from_url(str(cfg.redis_url))
        self.redis = redis_client
        self.metrics = Metrics(registry=CollectorRegistry())
        self.reloads = Counter(
            "config_reloads", "Config reloads by result", ("result",), namespace="nexus_limits", registry=None
        )
        self.metrics.registry.register(self.reloads)
        self.tiers: Dict[str, Any] = {}
        self._outputs: Dict[str, Tuple[Tuple[Any, ...], OutputEstimate]] = {}
        self._build(cfg, None)
        self.key_header = cfg.key.split(":", 1)[1].lower() if cfg.key.startswith("header:") else None
        self._watcher: Optional[asyncio.Task[None]] = None

    def _output(self, cfg: GatewayConfig, tier: Tier) -> OutputEstimate:
        """The tier's output estimate; kept across reloads (a learned one keeps what it learned)."""
        spec = (cfg.learn_output, tier.default_output_tokens)
        kept = self._outputs.get(tier.name)
        if kept is not None and kept[0] == spec:
            return kept[1]
        output: OutputEstimate
        if cfg.learn_output:
            from .spend import LearnedOutputEstimate

            output = LearnedOutputEstimate(default=tier.default_output_tokens)
        else:
            output = OutputEstimate(default=tier.default_output_tokens)
        self._outputs[tier.name] = (spec, output)
        return output

    def _build(self, cfg: GatewayConfig, old: Optional[GatewayConfig]) -> None:
        """Builds every tier's middleware; on a reload (``old`` given) a tier whose set of
        limits is unchanged keeps its limiters, and so its counters, with the new quotas."""
        tiers: Dict[str, Any] = {}
        for name, tier in cfg.tiers.items():
            before = old.tiers.get(name) if old is not None else None
            current = self.tiers.get(name)
            limiter = current.limiter if current is not None else None
            spend = current.spend if current is not None else None
            if before is None or current is None or before.shape() != tier.shape():
                if before is not None:
                    log.warning("tier %s: its set of limits changed; its counters start again", name)
                limiter = _limiter(cfg, tier, self.redis) if tier.has_limits() else None
            elif limiter is not None and before != tier:
                self._requota(cfg, tier, limiter)
                limiter = limiter if self.redis is None else _limiter(cfg, tier, self.redis)
            if tier.spend is None:
                spend = None
            elif before is None or before.spend is None or spend is None:
                spend = _spend(cfg, tier)
            elif tier.spend != before.spend:
                if cfg.backend == "redis":
                    spend = _spend(cfg, tier)  # the same name: the same keys, the new budget
                else:
                    spend.set_budget(tier.spend)
            if old is not None and cfg.prices != old.prices and spend is not None:
                spend.prices = _prices(cfg)
            tiers[name] = LLMLimitMiddleware(
                self.proxy,
                limiter=limiter,
                spend=spend,
                key=cfg.key,
                output=self._output(cfg, tier),
                metrics=self.metrics,
                metrics_labels=(f"tier-{name}", name),
            )
            for label, watched in ((f"tier-{name}", limiter), (f"spend-{name}", spend)):
                if watched is not None:
                    self.metrics.watch(watched, label)
                else:
                    self.metrics.unwatch(label)
        for name in set(self.tiers) - set(tiers):
            self.metrics.unwatch(f"tier-{name}")
            self.metrics.unwatch(f"spend-{name}")
        self.tiers = tiers

    @staticmethod
    def _requota(cfg: GatewayConfig, tier: Tier, limiter: Any) -> None:
        if callable(getattr(limiter, "set_default_quota", None)):
            limiter.set_default_quota(
                requests=tier.requests,
                tokens=tier.tokens,
                daily_tokens=tier.daily_tokens,
                concurrency=tier.concurrency,
            )
            limiter.shadow = tier.shadow

    def reload(self) -> bool:
        """Reads the config again and applies it, keeping every counter. A broken config
        is logged and changes nothing. Returns True when the new config is in force."""
        try:
            cfg = load_config(self.cfg.path)
            for name in _RESTART_FIELDS:
                if getattr(cfg, name) != getattr(self.cfg, name):
                    log.warning("config reload: %s changed; it takes effect at the next restart", name)
                    setattr(cfg, name, getattr(self.cfg, name))
            if cfg.key != self.cfg.key:
                log.warning("config reload: gateway.key changed; it takes effect at the next restart")
                cfg.key = self.cfg.key
            self._build(cfg, self.cfg)
        except (ConfigError, ValueError, TypeError) as error:
            log.error("config reload failed, keeping the running config: %s", error)
            self.reloads.labels("error").inc()
            return False
        self.cfg = cfg
        self.reloads.labels("ok").inc()
        log.info("config reloaded from %s", cfg.path)
        return True

    async def _watch(self) -> None:
        """Polls the config file's modification time; reloads when it changes."""
        path = self.cfg.path

        def stamp() -> Optional[Tuple[int, int]]:
            try:
                st = os.stat(path)
            except OSError:
                return None
            return st.st_mtime_ns, st.st_size

        seen = stamp()
        while True:
            await asyncio.sleep(self.cfg.reload_interval)
            now = stamp()
            if now is not None and now != seen:
                seen = now
                self.reload()

    def _start_reloading(self) -> None:
        if self.cfg.reload == "off":
            return
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)
        except (NotImplementedError, RuntimeError, ValueError, AttributeError):
            # Not the main thread (an embedding server) or no SIGHUP (Windows).
            log.info("SIGHUP reload unavailable here; use reload = 'watch'")
        if self.cfg.reload == "watch":
            self._watcher = asyncio.ensure_future(self._watch())

    def _api_key(self, scope: Scope) -> Optional[str]:
        req = request_of(scope)
        if self.key_header is not None:
            return req.headers.get(self.key_header) or None
        scheme, _, token = req.headers.get("authorization", "").partition(" ")
        return token.strip() or None if scheme.lower() == "bearer" else None

    async def _admin(self, scope: Scope, send: Send) -> None:
        """``GET /_nexus/keys/<key>``: one key's tier and limits; ``GET /_nexus/top?tier=<t>&n=<n>``:
        the keys using the largest share of the tier's token limit. Bearer admin token."""
        from urllib.parse import parse_qs, unquote

        req = request_of(scope)
        token = self.cfg.admin_token
        given = req.headers.get("authorization", "")
        if token is None or not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            await _reply(
                send,
                404 if token is None else 403,
                problem(
                    404 if token is None else 403,
                    "Not Found" if token is None else "Forbidden",
                    "admin endpoints need the admin token",
                ),
            )
            return
        path = scope["path"]
        if path.startswith("/_nexus/keys/"):
            key = unquote(path[len("/_nexus/keys/") :])
            tier = self.cfg.keys.get(key, self.cfg.default_tier)
            doc: Dict[str, Any] = {"key": key, "tier": tier}
            middleware = self.tiers.get(tier) if tier is not None else None
            if middleware is not None and middleware.limiter is not None:
                inspect = getattr(middleware.limiter, "inspect", None)
                if inspect is None:
                    doc["limits"] = None
                    doc["detail"] = "per-key state is available with the memory backend"
                else:
                    doc["limits"] = inspect(key)
            await _json(send, 200, doc)
            return
        if path == "/_nexus/top":
            query = parse_qs(req.query)
            tier = (query.get("tier") or [self.cfg.default_tier or next(iter(self.cfg.tiers))])[0]
            try:
                n = int((query.get("n") or ["10"])[0])
            except ValueError:
                n = -1
            middleware = self.tiers.get(tier)
            if middleware is None or not 1 <= n <= 1000:
                await _reply(send, 400, problem(400, "Bad Request", "tier must be a tier and n from 1 to 1000"))
                return
            limiter = middleware.limiter
            if limiter is None or not callable(getattr(limiter, "top_keys", None)):
                await _reply(send, 501, problem(501, "Not Implemented", "top keys need the memory backend"))
                return
            which = "tokens" if limiter.tokens is not None else "requests" if limiter.requests is not None else None
            if which is None:
                await _json(send, 200, {"tier": tier, "top": []})
                return
            names = [k for k, t in self.cfg.keys.items() if t == tier]
            await _json(send, 200, {"tier": tier, "limit": which, "top": limiter.top_keys(n, names, limit=which)})
            return
        await _reply(send, 404, problem(404, "Not Found", "unknown admin endpoint"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self._start_reloading()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self._watcher is not None:
                        self._watcher.cancel()
                    await self.proxy.client.aclose()
                    if self.redis is not None:
                        await self.redis.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope.get("path")
        if path in ("/healthz", "/health"):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        if self.cfg.metrics_path is not None and path == self.cfg.metrics_path:
            from prometheus_client import CONTENT_TYPE_LATEST

            body = self.metrics.render()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        if isinstance(path, str) and path.startswith("/_nexus/"):
            await self._admin(scope, send)
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


async def _json(send: Send, status: int, doc: Any) -> None:
    body = json.dumps(doc, default=str).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def build_app(config_path: str) -> Gateway:
    return Gateway(load_config(config_path))


def run(config_path: str, host: Optional[str] = None, port: Optional[int] = None) -> None:  # pragma: no cover
    import uvicorn

    app = build_app(config_path)
    uvicorn.run(app, host=host or app.cfg.host, port=port or app.cfg.port, proxy_headers=False)
