"""The gateway's config: a TOML (or YAML) file read and checked once, with every mistake
reported by file, line and field."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlsplit

__all__ = ["ConfigError", "GatewayConfig", "Tier", "load_config"]


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
    # Seconds a refused LLM call may wait for its turn (a fair queue) instead of a 429.
    queue: Optional[float] = None

    def shape(self) -> Tuple[bool, ...]:
        """Which limits the tier has: a reload keeps a tier's counters when this stays."""
        return (bool(self.requests), bool(self.tokens), self.daily_tokens is not None, bool(self.concurrency))

    def has_limits(self) -> bool:
        return bool(self.requests or self.tokens or self.daily_tokens or self.concurrency)


MIB = 1024 * 1024


@dataclass
class GatewayConfig:
    path: str
    upstream_url: str
    upstream_api_key: Optional[str] = None
    upstream_timeout: float = 600.0
    # [upstream.adaptive]: the AIMD settings of the outbound limit (None: no limit).
    # Limits are requests per ``window`` seconds (the ceiling's period).
    upstream_adaptive: Optional[Dict[str, float]] = None
    # Whether Set-Cookie from the upstream reaches clients, and clients' Cookie the
    # upstream: off by default, as one upstream session would be shared by every client.
    forward_cookies: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    # [server]: what one client may make the gateway hold.
    max_body_bytes: int = 8 * MIB
    body_timeout: float = 30.0
    header_timeout: float = 10.0
    keep_alive_timeout: int = 5
    max_connections: int = 512
    max_header_bytes: int = 32 * 1024
    # Server processes sharing the port (and, through the backend, every limit).
    workers: int = 1
    # uvicorn's line per request on stdout.
    access_log: bool = True
    key: Union[str, List[str]] = "bearer"
    max_in_flight_per_key: int = 32
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


_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_KEY_FORMS = "'bearer', 'header:<name>' or a list of them"


def _key_problem(value: Any) -> Optional[str]:
    """Why ``[gateway] key`` is not a key spec, or None: a string or a non-empty list of
    distinct strings, each 'bearer' or 'header:<header name>'."""
    specs = value if isinstance(value, list) else [value]
    if not specs or len(specs) > 8:
        return f"must be {_KEY_FORMS} (1 to 8 of them)"
    for spec in specs:
        if not isinstance(spec, str):
            return f"must be {_KEY_FORMS}"
        kind, sep, name = spec.partition(":")
        if spec != "bearer" and not (kind == "header" and sep and _TOKEN.match(name)):
            return f"must be {_KEY_FORMS}; {spec!r} is neither"
    lowered = [s.lower() for s in specs]
    if len(set(lowered)) != len(lowered):
        return "names the same source twice"
    from ..adapters import parse_key_spec

    try:
        parse_key_spec(value)
    except (ValueError, TypeError) as error:
        return str(error)
    return None


def _upstream_url_problem(url: Any) -> Optional[str]:
    """Why ``[upstream] url`` cannot be the base of every upstream request, or None."""
    if not isinstance(url, str) or not url:
        return "must be an http:// or https:// URL"
    if not url.isascii() or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        return "must be an http:// or https:// URL of printable ASCII"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as error:
        return f"must be an http:// or https:// URL ({error})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL"
    if parts.username is not None or parts.password is not None:
        return "must not hold credentials (give the key with api_key_env)"
    if parts.query or parts.fragment or url.rstrip("/").endswith(("?", "#")):
        return "must not have a query or a fragment"
    path = parts.path.rstrip("/")
    if path and not re.match(r"^(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+$", path):
        return "must have a plain path prefix"
    if any(segment in (".", "..") for segment in path.split("/")):
        return "must not have . or .. segments"
    return None


_SECTIONS = ("upstream", "server", "gateway", "backend", "tiers", "prices", "keys")


# The longest a request may wait in a tier's queue: a client holds a connection meanwhile.
MAX_QUEUE_SECONDS = 300.0
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m)?")


def _duration(value: Any) -> Optional[float]:
    """Seconds from "5s", "500ms", "1m" or a plain number of seconds; None when malformed."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str) or len(value) > 32:
        return None
    match = _DURATION.fullmatch(value.strip())
    if match is None:
        return None
    return float(match.group(1)) * {"ms": 0.001, "m": 60.0}.get(match.group(2) or "s", 1.0)


_ADAPTIVE_FIELDS = ("ceiling", "floor", "increase", "decrease", "low_water", "interval", "cooldown")


def _adaptive(spec: Any, loc: _Locator, typed: Any, number: Any) -> Dict[str, float]:
    """``[upstream.adaptive]``: an AIMD limit on the calls to the upstream, in requests
    per the ceiling's period; ``floor`` and ``increase`` are rates too, converted to it."""
    import nexus_limits as nl

    where = "upstream.adaptive"
    if not isinstance(spec, dict):
        raise loc.error("upstream", "adaptive", "must be a table")
    for key in spec:
        if key not in _ADAPTIVE_FIELDS:
            raise loc.error(where, key, f"unknown field (expected one of: {', '.join(_ADAPTIVE_FIELDS)})")
    if "ceiling" not in spec:
        raise loc.error(where, None, 'needs ceiling, the most requests ever sent, such as "500/minute"')

    def rate(key: str) -> Optional[Any]:
        text = typed(where, spec, key, str, 'a rate such as "500/minute"')
        if text is None:
            return None
        try:
            return nl.Rate.parse(text)
        except ValueError as error:
            raise loc.error(where, key, str(error)) from None

    ceiling = rate("ceiling")
    assert ceiling is not None
    window = float(ceiling.period)
    out: Dict[str, float] = {"window": window, "ceiling": float(ceiling.count)}
    for key in ("floor", "increase"):
        r = rate(key)
        if r is not None:
            out[key] = r.count * window / r.period
            if not out[key] > 0:
                raise loc.error(where, key, f"must be above 0, got {spec[key]!r}")
    if out.get("floor", 0.0) > out["ceiling"]:
        raise loc.error(where, "floor", f"must not be above the ceiling, got {spec['floor']!r}")
    decrease = number(where, spec, "decrease", 0, 0.99)
    if decrease is not None:
        out["decrease"] = float(decrease)
    low_water = typed(where, spec, "low_water", (int, float), "a fraction from 0 to 0.99")
    if low_water is not None:
        if not 0 <= low_water <= 0.99:  # NaN fails
            raise loc.error(where, "low_water", f"must be a fraction from 0 to 0.99, got {low_water!r}")
        out["low_water"] = float(low_water)
    for key in ("interval", "cooldown"):
        seconds = typed(where, spec, key, (int, float), "a number of seconds")
        if seconds is not None:
            if not 0 <= seconds <= 3600:
                raise loc.error(where, key, f"must be from 0 to 3600 seconds, got {seconds!r}")
            out[key] = float(seconds)
    return out


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

    def number(name: str, value: Mapping[str, Any], key: str, low: float, high: float, whole: bool = False) -> Any:
        """A number of seconds or bytes from ``low`` (excluded when 0) to ``high``; NaN,
        infinities and booleans are refused."""
        kind: Any = int if whole else (int, float)
        v = typed(name, value, key, kind, "a whole number" if whole else "a number")
        if v is None:
            return None
        if not (v > low if low == 0 else v >= low) or not v <= high:
            bound = "above 0" if low == 0 else f"at least {low}"
            raise loc.error(name, key, f"must be {bound} and at most {high}, got {v!r}")
        return v

    upstream = table("upstream", required=True)
    known("upstream", upstream, ("url", "api_key_env", "timeout", "forward_cookies", "adaptive"))
    url = typed("upstream", upstream, "url", str, "a URL string")
    problem = _upstream_url_problem(url)
    if problem:
        raise loc.error("upstream", "url", f"{problem}, got {url!r}")
    cfg = GatewayConfig(path=path, upstream_url=url.rstrip("/"))
    env = typed("upstream", upstream, "api_key_env", str, "the name of an environment variable")
    if env is not None:
        if env not in os.environ:
            raise loc.error("upstream", "api_key_env", f"the environment variable {env} is not set")
        key = os.environ[env]
        # The key goes into request headers as it is: a line break in it would add headers.
        if not key or not all(0x21 <= ord(c) <= 0x7E for c in key):
            raise loc.error(
                "upstream",
                "api_key_env",
                f"the environment variable {env} must hold a key of printable ASCII without spaces",
            )
        cfg.upstream_api_key = key
    timeout = number("upstream", upstream, "timeout", 0, 86400)
    if timeout is not None:
        cfg.upstream_timeout = float(timeout)
    cfg.forward_cookies = bool(typed("upstream", upstream, "forward_cookies", bool, "true or false"))
    if "adaptive" in upstream:
        cfg.upstream_adaptive = _adaptive(upstream["adaptive"], loc, typed, number)

    server = table("server")
    known(
        "server",
        server,
        (
            "host",
            "port",
            "max_body_bytes",
            "body_timeout",
            "header_timeout",
            "keep_alive_timeout",
            "max_connections",
            "max_header_bytes",
            "workers",
            "access_log",
        ),
    )
    cfg.host = typed("server", server, "host", str, "a host name or address") or cfg.host
    port = typed("server", server, "port", int, "a port number")
    if port is not None:
        if not 0 < port < 65536:
            raise loc.error("server", "port", f"must be from 1 to 65535, got {port}")
        cfg.port = port
    for name, low, high, whole in (
        ("max_body_bytes", 1, 2**40, True),
        ("body_timeout", 0, 86400, False),
        ("header_timeout", 0, 3600, False),
        ("keep_alive_timeout", 1, 3600, True),
        ("max_connections", 1, 1_000_000, True),
        ("max_header_bytes", 1024, 16 * MIB, True),
        ("workers", 1, 1024, True),
    ):
        v = number("server", server, name, low, high, whole)
        if v is not None:
            setattr(cfg, name, v if whole else float(v))

    access_log = typed("server", server, "access_log", bool, "true or false")
    if access_log is not None:
        cfg.access_log = access_log

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
            "max_in_flight_per_key",
        ),
    )
    reload = typed("gateway", gateway, "reload", str, "'sighup', 'watch' or 'off'")
    if reload is not None:
        if reload not in ("sighup", "watch", "off"):
            raise loc.error("gateway", "reload", f"must be 'sighup', 'watch' or 'off', got {reload!r}")
        cfg.reload = reload
    interval = number("gateway", gateway, "reload_interval", 0, 3600)
    if interval is not None:
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
    if "key" in gateway:
        key_problem = _key_problem(gateway["key"])
        if key_problem:
            raise loc.error("gateway", "key", f"{key_problem}, got {gateway['key']!r}")
        cfg.key = gateway["key"]
    in_flight = number("gateway", gateway, "max_in_flight_per_key", 1, 1_000_000, whole=True)
    if in_flight is not None:
        cfg.max_in_flight_per_key = in_flight
    cfg.default_tier = typed("gateway", gateway, "default_tier", str, "a tier name")
    lease_ttl = number("gateway", gateway, "lease_ttl", 0, 7 * 86400)
    if lease_ttl is not None:
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
            (
                "requests",
                "tokens",
                "daily_tokens",
                "concurrency",
                "default_output_tokens",
                "spend",
                "shadow",
                "queue",
            ),
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
            from ..spend import parse_budget

            try:
                parse_budget(spend)
            except ValueError as error:
                raise loc.error(where, "spend", str(error)) from None
            tier.spend = spend
        if not (tier.has_limits() or tier.spend):
            raise loc.error("tiers", name, "set at least one of requests, tokens, daily_tokens, concurrency, spend")
        if "queue" in spec:
            seconds = _duration(spec["queue"])
            if seconds is None or not 0 < seconds <= MAX_QUEUE_SECONDS:  # NaN fails both
                raise loc.error(
                    where,
                    "queue",
                    f'must be a wait above 0 and at most {MAX_QUEUE_SECONDS:g} s, such as "5s" or "500ms", '
                    f"got {spec['queue']!r}",
                )
            # A TokenLimiter's concurrency refusal names no time a place frees up (its
            # retry_after is the lease TTL): a queue can only wait for rates.
            if not (tier.requests or tier.tokens or tier.daily_tokens is not None):
                raise loc.error(where, "queue", "needs one of requests, tokens, daily_tokens to wait for")
            tier.queue = seconds
        cfg.tiers[name] = tier
    if cfg.default_tier is not None and cfg.default_tier not in cfg.tiers:
        raise loc.error("gateway", "default_tier", f"{cfg.default_tier!r} is not a tier")

    if cfg.workers > 1 and cfg.backend != "redis":
        # Each worker would count on its own: every limit would be multiplied by N.
        # TokenLimiter and SpendLimiter do not take a SharedMemoryStore, so the
        # processes share their limits through Redis.
        raise loc.error(
            "server",
            "workers",
            f"{cfg.workers} workers must share their limits: set [backend] type = 'redis' "
            "(with the memory backend each worker would count alone, multiplying every limit)",
        )

    prices = table("prices")
    from ..spend import PriceTable

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
