"""The gateway's config: a TOML (or YAML) file read and checked once, with every mistake
reported by file, line and field.

The config's shape is data: :data:`SCHEMA` lists every table and, for each, its fields
(:class:`~.schema.Field`: type, bounds or choices, a parser for rates and durations,
whether it is required, where its value goes). The one loader of :mod:`.schema` walks a
document against it; the rules that tie fields together (a queue needs a rate, a key's
tier must exist...) run after the walk, in :func:`_cross_checks`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlsplit

from .schema import MIB, ConfigError, Field, FieldError, Loader, Locator, Parts, Table, read, sections, show

__all__ = ["SCHEMA", "ConfigError", "GatewayConfig", "Tier", "load_config"]


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
    # The priority class of the tier's requests (one of [classes]; None: the default).
    cls: Optional[str] = None

    def shape(self) -> Tuple[bool, ...]:
        """Which limits the tier has: a reload keeps a tier's counters when this stays."""
        return (bool(self.requests), bool(self.tokens), self.daily_tokens is not None, bool(self.concurrency))

    def has_limits(self) -> bool:
        return bool(self.requests or self.tokens or self.daily_tokens or self.concurrency)

    def quotas(self) -> Dict[str, Any]:
        """The tier's limits as a hierarchy level takes them (spend stays apart)."""
        return {k: v for k, v in _quotas(self).items() if k != "spend"}


# The highest concurrency limit a node may have in a SharedMemoryStore (several workers
# on the memory backend): a lease names its slot in 16 bits.
SHARED_MAX_CONCURRENCY = 65_535

QUOTA_NAMES = ("requests", "tokens", "daily_tokens", "spend", "concurrency")


def _quotas(node: Any) -> Dict[str, Any]:
    return {k: getattr(node, k) for k in QUOTA_NAMES if getattr(node, k) is not None}


@dataclass
class Group:
    """An org (``[orgs.<name>]``) or a team (``[teams.<name>]``, in ``org`` if given):
    quotas shared by every key below it."""

    name: str
    org: Optional[str] = None
    requests: Optional[str] = None
    tokens: Optional[str] = None
    daily_tokens: Optional[Any] = None
    spend: Optional[str] = None
    concurrency: Optional[int] = None

    def quotas(self) -> Dict[str, Any]:
        return _quotas(self)


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
    # Microseconds the event loop polls for I/O before it sleeps, after a request
    # arrives and after its response ends (0: off); see gateway/poll.py.
    busy_poll_us: int = 300
    key: Union[str, List[str]] = "bearer"
    max_in_flight_per_key: int = 32
    default_tier: Optional[str] = None
    keys: Dict[str, str] = field(default_factory=dict)
    tiers: Dict[str, Tier] = field(default_factory=dict)
    backend: str = "memory"
    redis_url: Optional[str] = None
    redis_prefix: str = "nlgw"
    on_error: str = "raise"
    # [backend] lease: LeasePolicy options for the tiers that can lease (None: no leasing).
    lease: Optional[Dict[str, Any]] = None
    lease_ttl: float = 600.0
    learn_output: bool = False
    prices: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    reload: str = "sighup"
    reload_interval: float = 2.0
    metrics_path: Optional[str] = "/metrics"
    admin_token: Optional[str] = None
    # [orgs], [teams] and the keys mapped to a team: quotas charged at org > team > key.
    orgs: Dict[str, Group] = field(default_factory=dict)
    teams: Dict[str, Group] = field(default_factory=dict)
    key_teams: Dict[str, str] = field(default_factory=dict)
    # [classes]: each priority class's share of every quota; how a request gets its class.
    classes: Dict[str, float] = field(default_factory=dict)
    default_class: Optional[str] = None
    class_header: Optional[str] = None
    routes: List[Tuple[str, str]] = field(default_factory=list)

    def leases(self, tier: Tier) -> bool:
        """Whether ``tier`` is served by a leased Redis TokenBucket: leasing is on and
        its one limit is ``requests`` (no classes)."""
        only_requests = tier.requests is not None and not (tier.tokens or tier.daily_tokens or tier.concurrency)
        return self.lease is not None and self.backend == "redis" and not self.classes and only_requests

    def uses_tree(self) -> bool:
        """Whether limits go through hierarchies (teams or priority classes)."""
        return bool(self.teams or self.classes)


# -- field parsers ------------------------------------------------------------------------


def _rate(text: str) -> str:
    """A rate such as "100/minute", kept as written once it parses."""
    import nexus_limits as nl

    nl.Rate.parse(text)  # ValueError names the mistake
    return text


def _daily_tokens(value: Any) -> Any:
    import nexus_limits as nl

    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise FieldError(f"must be an int or a rate, got {show(value)}")
    try:
        nl.TokenLimiter(daily_tokens=value)
    except (TypeError, OverflowError) as error:
        raise FieldError(str(error)) from None
    return value


def _budget(text: str) -> str:
    from ..spend import parse_budget

    parse_budget(text)
    return text


def _env_value(name: str) -> str:
    """The value of the environment variable ``name``, which must hold a key usable as
    a header value: a line break in it would add headers."""
    if name not in os.environ:
        raise FieldError(f"the environment variable {name} is not set")
    value = os.environ[name]
    if not value or not all(0x21 <= ord(c) <= 0x7E for c in value):
        raise FieldError(f"the environment variable {name} must hold a key of printable ASCII without spaces")
    return value


def _admin_token(name: str) -> str:
    if not os.environ.get(name):
        raise FieldError(f"the environment variable {name} is not set")
    return os.environ[name]


def _metrics_path(value: Any) -> Optional[str]:
    if value is False or value == "":
        return None
    if not isinstance(value, str) or not value.startswith("/"):
        raise FieldError(f"must be a path such as '/metrics' or false, got {show(value)}")
    return value


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
            return f"must be {_KEY_FORMS}; {show(spec)} is neither"
    lowered = [s.lower() for s in specs]
    if len(set(lowered)) != len(lowered):
        return "names the same source twice"
    from ..adapters import parse_key_spec

    try:
        parse_key_spec(value)
    except (ValueError, TypeError) as error:
        return str(error)
    return None


def _key(value: Any) -> Any:
    problem = _key_problem(value)
    if problem:
        raise FieldError(f"{problem}, got {show(value)}")
    return value


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


def _upstream_url(url: str) -> str:
    problem = _upstream_url_problem(url)
    if problem:
        raise FieldError(f"{problem}, got {show(url)}")
    return url.rstrip("/")


def _header_name(name: str) -> str:
    if not _TOKEN.match(name) or len(name) > 256:
        raise FieldError(f"must be a header name such as 'x-nexus-priority', got {show(name)}")
    return name.lower()


def _route_path(path: str) -> str:
    if not re.fullmatch(r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+/?", path) or len(path) > 1024:
        raise FieldError(f"must be a path such as '/v1/batches', got {show(path)}")
    if any(segment in (".", "..") for segment in path.split("/")):
        raise FieldError(f"must not have . or .. segments, got {show(path)}")
    # Kept in the form every request path is matched in: escapes of unreserved
    # characters decoded ("/v1/%62atches" is "/v1/batches"), the others in upper case;
    # kept as written, such a route would never match and its calls would get another class.
    from ..adapters import normalize_target
    from ..errors import BadRequest

    try:
        _, normal = normalize_target("GET", path)
    except BadRequest as error:
        raise FieldError(f"must be a path a request can have ({error}), got {show(path)}") from None
    return normal.rstrip("/") or "/"


LEASE_FIELDS = ("window", "max_share", "hold", "idle", "max_keys")


def _lease(value: Any) -> Optional[Dict[str, Any]]:
    """``[backend] lease``: true (LeasePolicy's defaults), false, or a table of
    LeasePolicy fields; the options the policy is built with (None: no leasing)."""
    if isinstance(value, bool):
        return {} if value else None
    if not isinstance(value, dict):
        raise FieldError(f"must be true, false or a table of {', '.join(LEASE_FIELDS)}, got {show(value)}")
    from ..redis import LeasePolicy

    for name, field_value in value.items():
        if name not in LEASE_FIELDS:
            raise FieldError(str(name), f"unknown field (expected one of: {', '.join(LEASE_FIELDS)})")
        try:
            LeasePolicy(**{name: field_value})  # names the bound the field breaks
        except (ValueError, TypeError, OverflowError) as error:
            raise FieldError(name, str(error)) from None
    LeasePolicy(**value)  # the fields together
    return dict(value)


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


def _queue(value: Any) -> float:
    seconds = _duration(value)
    if seconds is None or not 0 < seconds <= MAX_QUEUE_SECONDS:  # NaN fails both
        raise FieldError(
            f'must be a wait above 0 and at most {MAX_QUEUE_SECONDS:g} s, such as "5s" or "500ms", got {show(value)}'
        )
    return seconds


def _adaptive(spec: Dict[str, Any]) -> Dict[str, float]:
    """``[upstream.adaptive]``: an AIMD limit on the calls to the upstream, in requests
    per the ceiling's period; ``floor`` and ``increase`` are rates too, converted to it."""
    import nexus_limits as nl

    ceiling = nl.Rate.parse(spec["ceiling"])
    window = float(ceiling.period)
    out: Dict[str, float] = {"window": window, "ceiling": float(ceiling.count)}
    for key in ("floor", "increase"):
        if key in spec:
            r = nl.Rate.parse(spec[key])
            out[key] = r.count * window / r.period
            if not out[key] > 0:
                raise FieldError(key, f"must be above 0, got {show(spec[key])}")
    if out.get("floor", 0.0) > out["ceiling"]:
        raise FieldError("floor", f"must not be above the ceiling, got {show(spec['floor'])}")
    for key in ("decrease", "low_water", "interval", "cooldown"):
        if key in spec:
            out[key] = float(spec[key])
    return out


_RATE = 'a rate such as "100/minute"'

ADAPTIVE = Table(
    "adaptive",
    (
        Field(
            "ceiling", "str", 'a rate such as "500/minute"', parse=_rate,
            required='needs ceiling, the most requests ever sent, such as "500/minute"',
        ),
        Field("floor", "str", 'a rate such as "500/minute"', parse=_rate),
        Field("increase", "str", 'a rate such as "500/minute"', parse=_rate),
        Field("decrease", "number", "a number", low=0, high=0.99, above=True),
        Field("low_water", "number", "a fraction from 0 to 0.99", low=0, high=0.99, range="a fraction from 0 to 0.99"),
        Field("interval", "number", "a number of seconds", low=0, high=3600, range="from 0 to 3600 seconds"),
        Field("cooldown", "number", "a number of seconds", low=0, high=3600, range="from 0 to 3600 seconds"),
    ),
    finish=_adaptive,
)  # fmt: skip
_ADAPTIVE_FIELDS = ADAPTIVE.names

TIER_FIELDS = (
    Field("requests", "str", _RATE, parse=_rate),
    Field("tokens", "str", _RATE, parse=_rate),
    Field("daily_tokens", "any", parse=_daily_tokens),
    Field("concurrency", "int", "a whole number", low=1, high=1_000_000),
    Field("default_output_tokens", "int", "a whole number", low=0, high=10_000_000),
    Field("spend", "str", 'dollars per period, such as "25.00/day"', parse=_budget),
    Field("shadow", "bool", "true or false"),
    Field("queue", "any", parse=_queue),
    Field("class", "str", "a class name from [classes]", attr="cls"),
)
_SHAPE_FIELDS = ("requests", "tokens", "daily_tokens", "concurrency", "spend")

# The quotas of an org or a team: as a tier's, charged at that level for every key below.
QUOTA_FIELDS = tuple(f for f in TIER_FIELDS if f.name in QUOTA_NAMES)
KEY_FIELDS = (Field("tier", "any"), Field("team", "str", "a team name from [teams]"))

PRICE = Table(
    "prices",
    tuple(
        Field(name, "any")  # PriceTable checks the values, in _cross_checks
        for name in ("input", "output", "cached_input", "cache_write")
    ),
)

SCHEMA: Tuple[Table, ...] = (
    Table(
        "upstream",
        (
            Field("url", "str", "a URL string", parse=_upstream_url, attr="upstream_url",
                  required="needs url, the upstream API's http:// or https:// URL"),
            Field("api_key_env", "str", "the name of an environment variable", parse=_env_value,
                  attr="upstream_api_key"),
            Field("timeout", "number", "a number", low=0, high=86400, above=True, attr="upstream_timeout"),
            Field("forward_cookies", "bool", "true or false"),
            Field("adaptive", "table", "a table", table=ADAPTIVE, attr="upstream_adaptive"),
        ),
        required=True,
    ),
    Table(
        "server",
        (
            Field("host", "str", "a host name or address"),
            Field("port", "int", "a port number", low=1, high=65535, range="from 1 to 65535"),
            Field("max_body_bytes", "int", "a whole number", low=1, high=2**40),
            Field("body_timeout", "number", "a number", low=0, high=86400, above=True),
            Field("header_timeout", "number", "a number", low=0, high=3600, above=True),
            Field("keep_alive_timeout", "int", "a whole number", low=1, high=3600),
            Field("max_connections", "int", "a whole number", low=1, high=1_000_000),
            Field("max_header_bytes", "int", "a whole number", low=1024, high=16 * MIB),
            Field("workers", "int", "a whole number", low=1, high=1024),
            Field("access_log", "bool", "true or false"),
            Field("busy_poll_us", "int", "a whole number of microseconds", low=0, high=10_000),
        ),
    ),
    Table(
        "gateway",
        (
            Field("key", "any", parse=_key),
            Field("default_tier", "str", "a tier name"),
            Field("lease_ttl", "number", "a number", low=0, high=7 * 86400, above=True),
            Field("learn_output", "bool", "true or false"),
            Field("reload", "str", "'sighup', 'watch' or 'off'", choices=("sighup", "watch", "off")),
            Field("reload_interval", "number", "a number", low=0, high=3600, above=True),
            Field("metrics_path", "any", parse=_metrics_path),
            Field("admin_token_env", "str", "the name of an environment variable", parse=_admin_token,
                  attr="admin_token"),
            Field("max_in_flight_per_key", "int", "a whole number", low=1, high=1_000_000),
            Field("class_header", "str", "a header name", parse=_header_name),
            Field("default_class", "str", "a class name from [classes]"),
        ),
    ),
    Table(
        "backend",
        (
            Field("type", "str", "'memory' or 'redis'", choices=("memory", "redis"), attr="backend"),
            Field("url", "str", "a redis:// URL", attr="redis_url"),
            Field("prefix", "str", "a key prefix", attr="redis_prefix"),
            Field("on_error", "str", "'allow', 'deny' or 'raise'", choices=("allow", "deny", "raise")),
            Field("lease", "any", parse=_lease),
        ),
    ),
    Table("tiers", TIER_FIELDS, named=True, required=True, nonempty="define at least one tier"),
    Table("prices", PRICE.fields, named=True),
    # Its names are API keys: every message shows them masked (keys["sk-l…23"]).
    Table("keys", KEY_FIELDS, named=True, shorthand="tier", secret=True),
    Table("orgs", QUOTA_FIELDS, named=True),
    Table("teams", (Field("org", "str", "an org name from [orgs]"), *QUOTA_FIELDS), named=True),
    Table("classes", named=True, value=Field(
        "share", "number", "a share of every quota from 0 to 1, such as 0.7", low=0, high=1, above=True,
        range="a share above 0 and at most 1 (1.0: the whole quota)")),
    Table("routes", (
        Field("path", "str", "a path such as '/v1/batches'", parse=_route_path, required="needs path"),
        Field("class", "str", "a class name from [classes]", attr="cls", required="needs class"),
    ), array=True),
)  # fmt: skip
_SECTIONS = tuple(t.name for t in SCHEMA)
_SECRET = tuple(t.name for t in SCHEMA if t.secret)


def load_config(path: str) -> GatewayConfig:
    """Reads and checks a gateway config; every mistake names the file, line and field
    (an API key masked: ``keys["sk-l…23"].team``, see :func:`.schema.mask`)."""
    doc, loc = read(path, _SECRET)
    sections(doc, loc, SCHEMA)
    loader = Loader(path, loc)
    values = {spec.name: loader.section(spec, doc) for spec in SCHEMA}
    cfg = GatewayConfig(path=path, **values["upstream"])
    for name in ("server", "gateway", "backend"):
        for attr, value in values[name].items():
            setattr(cfg, attr, value)
    cfg.tiers = {name: Tier(name, **spec) for name, spec in values["tiers"].items()}
    cfg.prices = values["prices"]
    cfg.orgs = {name: Group(name, **spec) for name, spec in values["orgs"].items()}
    cfg.teams = {name: Group(name, **spec) for name, spec in values["teams"].items()}
    cfg.classes = values["classes"]
    cfg.routes = [(route["path"], route["cls"]) for route in values["routes"]]
    for api_key, spec in values["keys"].items():
        tier = spec.get("tier", cfg.default_tier)
        if tier is None:
            raise loc.error(("keys", api_key), "needs a tier (or set [gateway] default_tier)")
        cfg.keys[api_key] = tier
        if "team" in spec:
            cfg.key_teams[api_key] = spec["team"]
    _cross_checks(cfg, doc, loc)
    _tree_checks(cfg, loc)
    return cfg


def _cross_checks(cfg: GatewayConfig, doc: Mapping[str, Any], loc: Locator) -> None:
    """The rules that tie fields together, each reported at the field that breaks it."""
    if cfg.backend == "redis" and not (cfg.redis_url or "").startswith(("redis://", "rediss://", "unix://")):
        raise loc.error(("backend", "url"), f"must be a redis:// URL for the redis backend, got {show(cfg.redis_url)}")
    for name, tier in cfg.tiers.items():
        if tier.shadow and cfg.backend == "redis":
            raise loc.error(("tiers", name, "shadow"), "shadow mode needs the memory backend (type = 'memory')")
        if not (tier.has_limits() or tier.spend):
            raise loc.error(("tiers", name), f"set at least one of {', '.join(_SHAPE_FIELDS)}")
        # A TokenLimiter's concurrency refusal names no time a place frees up (its
        # retry_after is the lease TTL): a queue can only wait for rates.
        if tier.queue is not None and not (tier.requests or tier.tokens or tier.daily_tokens is not None):
            raise loc.error(("tiers", name, "queue"), "needs one of requests, tokens, daily_tokens to wait for")
    if cfg.default_tier is not None and cfg.default_tier not in cfg.tiers:
        raise loc.error(("gateway", "default_tier"), f"{cfg.default_tier!r} is not a tier")
    # workers > 1 with the memory backend: the workers share every limit (tiers, orgs,
    # teams, classes) through a SharedMemoryStore the supervisor makes (see
    # app.create_shared_store), whose leases name their slot in 16 bits.
    if cfg.workers > 1 and cfg.backend != "redis":
        for table, groups in (("tiers", cfg.tiers), ("orgs", cfg.orgs), ("teams", cfg.teams)):
            for name, group in groups.items():
                if (group.concurrency or 0) > SHARED_MAX_CONCURRENCY:
                    raise loc.error(
                        (table, name, "concurrency"),
                        f"must be at most {SHARED_MAX_CONCURRENCY:,} with {cfg.workers} workers on the memory "
                        f"backend (their leases live in shared memory), got {group.concurrency:,}",
                    )
    from ..spend import PriceTable

    for model, price in cfg.prices.items():
        try:
            PriceTable({model: price})
        except (ValueError, TypeError, OverflowError) as error:
            raise loc.error(("prices", model), str(error)) from None
    for api_key, tier_name in cfg.keys.items():
        if not isinstance(tier_name, str) or tier_name not in cfg.tiers:
            raise loc.error(("keys", api_key), f"tier {show(tier_name)} is not defined")


# Headers that say something else about a request: never its class.
_NOT_CLASS_HEADERS = frozenset(
    (
        "host", "content-length", "content-type", "content-encoding", "transfer-encoding", "connection",
        "keep-alive", "te", "trailer", "upgrade", "expect", "cookie", "proxy-authorization", "authorization",
        "x-api-key",
    )
)  # fmt: skip
_CLASS_NAME = re.compile(r"[\x21-\x7e]{1,64}")


def _tree_checks(cfg: GatewayConfig, loc: Locator) -> None:
    """The rules of orgs, teams and priority classes."""
    for kind, groups in (("orgs", cfg.orgs), ("teams", cfg.teams)):
        for name in groups:
            if not name:
                raise loc.error((kind,), "names must not be empty")
    for name, team in cfg.teams.items():
        if team.org is not None and team.org not in cfg.orgs:
            raise loc.error(("teams", name, "org"), f"org {show(team.org)} is not defined in [orgs]")
    for api_key, team_name in cfg.key_teams.items():
        if team_name not in cfg.teams:
            raise loc.error(("keys", api_key, "team"), f"team {show(team_name)} is not defined in [teams]")
        tier = cfg.tiers[cfg.keys[api_key]]
        # A hierarchy decides for every level at once: one tier's options cannot change
        # how the others' levels are charged.
        for option, value in (("queue", tier.queue), ("shadow", tier.shadow or None)):
            if value is not None:
                raise loc.error(
                    ("tiers", tier.name, option),
                    f"{option} is not available for keys in a team (a key of this tier is in team {show(team_name)})",
                )
    for name in cfg.classes:
        # A class travels in a header (compared as sent, at most 64 bytes) and in
        # metrics labels: a name no header can carry could never be chosen by one.
        if not _CLASS_NAME.fullmatch(name):
            raise loc.error(
                ("classes", name),
                f"a class name must be 1 to 64 printable ASCII characters without spaces, got {show(name)}",
            )
    if cfg.classes:
        if not any(share == 1.0 for share in cfg.classes.values()):
            raise loc.error(("classes",), "one class must have the whole quota (a share of 1.0)")
        if len(cfg.classes) > 16:
            raise loc.error(("classes",), f"at most 16 classes, got {len(cfg.classes)}")
    routed: Dict[str, int] = {}
    for i, (prefix, _) in enumerate(cfg.routes):
        if prefix in routed:
            raise loc.error(("routes", i, "path"), f"the path {prefix!r} is routed twice (routes[{routed[prefix]}])")
        routed[prefix] = i
    uses: List[Tuple[Parts, Optional[str]]] = [(("gateway", "default_class"), cfg.default_class)]
    uses += [(("tiers", name, "class"), tier.cls) for name, tier in cfg.tiers.items()]
    uses += [(("routes", i, "class"), cls) for i, (_, cls) in enumerate(cfg.routes)]
    for where, cls in uses:
        if cls is not None and cls not in cfg.classes:
            known = ", ".join(cfg.classes) or "none: add a [classes] table"
            raise loc.error(where, f"class {show(cls)} is not defined in [classes] (defined: {known})")
    if cfg.class_header is not None and not cfg.classes:
        raise loc.error(("gateway", "class_header"), "needs a [classes] table")
    if cfg.class_header is not None:
        # A header that carries something else would make every request a 400 (its
        # value is not a class), or tie a request's class to its key or its framing.
        specs = cfg.key if isinstance(cfg.key, list) else [cfg.key]
        taken = {"authorization" if spec == "bearer" else spec.partition(":")[2].lower() for spec in specs}
        if cfg.class_header in taken | _NOT_CLASS_HEADERS:
            raise loc.error(
                ("gateway", "class_header"),
                f"{cfg.class_header!r} carries something else (the API key or the request's framing): "
                "name a header of its own, such as 'x-nexus-priority'",
            )
    if cfg.classes:
        for name, tier in cfg.tiers.items():
            if tier.queue is not None:
                raise loc.error(("tiers", name, "queue"), "queue is not available with [classes]")

    if cfg.lease is not None:
        if cfg.backend != "redis":
            raise loc.error(("backend", "lease"), "needs type = 'redis' (in-process checks need no leasing)")
        if cfg.classes:
            raise loc.error(("backend", "lease"), "is not available with [classes] (their quotas are hierarchies)")
        if not any(cfg.leases(tier) for tier in cfg.tiers.values()):
            raise loc.error(
                ("backend", "lease"),
                "no tier can lease: a block of quota is exact only for a tier whose one limit is requests (a "
                "token bucket); tokens and daily_tokens are reserved per call and settled at the usage, and "
                "concurrency is held per call, which a block spent in one process cannot do",
            )
