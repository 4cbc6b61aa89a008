"""The gateway app: routes each request to its key's tier and that tier's limits, then the
upstream; reloads its config on SIGHUP or when the file changes, keeping every counter."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional, Set, Tuple

from ..adapters import normalize_target, parse_key_spec, problem
from ..adapters.asgi import Message, Receive, Scope, Send, request_of
from ..adapters.llm import GIVEN, LLMLimitMiddleware, _Resumed
from ..errors import BadRequest
from ..fair import FairQueue
from ..tokens import OutputEstimate, warm_encodings
from .admin import admin
from .config import ConfigError, GatewayConfig, Tier, load_config
from .lease import LeasedLimiter
from .proxy import UPSTREAM_URL, BadTarget, Proxy, reply
from .teams import RedisPlace, TeamTree, requota_tier, tier_limiter, tree_store_ttl
from .tree import REQUEST_CLASS, KeyRemoved, TreeLimiter, TreeSpend

__all__ = ["Gateway", "build_app"]

log = logging.getLogger("nexus_limits.gateway")


def shared_store_name(cfg: GatewayConfig) -> str:
    """The SharedMemoryStore whose limits the workers of a memory-backend gateway share:
    one per config file and port (/dev/shm/nexus-limits.<name>)."""
    import hashlib

    where = f"{os.path.realpath(cfg.path)}|{cfg.port}".encode()
    return "gateway-" + hashlib.sha256(where).hexdigest()[:16]


def shared_store_ttl(cfg: GatewayConfig) -> int:
    """How long the store must remember an idle key: the longest period of any limit
    (a day with daily_tokens) of a tier, an org or a team, and the lease ttl."""
    import math

    from .._core import Rate
    from ..spend import parse_budget

    periods = [3600.0, float(cfg.lease_ttl), float(tree_store_ttl(cfg))]
    for tier in cfg.tiers.values():
        for rate in (tier.requests, tier.tokens):
            if rate is not None:
                periods.append((Rate.parse(rate) if isinstance(rate, str) else rate).period)
        if tier.daily_tokens is not None:
            periods.append(86400.0)
        if tier.spend is not None:
            periods.append(parse_budget(tier.spend).period)
    return math.ceil(max(periods))


def create_shared_store(cfg: GatewayConfig) -> Any:
    """Made by the supervisor before it starts the workers; None when nothing is shared
    that way (one worker, or Redis). A store left by a run whose limits needed another
    ttl is made anew (its counters start again)."""
    if cfg.workers <= 1 or cfg.backend == "redis":
        return None
    from .._core import SharedMemoryStore

    name, ttl = shared_store_name(cfg), shared_store_ttl(cfg)
    try:
        return SharedMemoryStore(name, ttl=ttl)
    except ValueError as error:
        if "exists with" not in str(error):
            raise
        log.warning("shared-memory store %s: %s; making it anew", name, error)
        SharedMemoryStore(name).unlink()
        return SharedMemoryStore(name, ttl=ttl)


_STORES: Dict[str, Any] = {}


def _shared_store(cfg: GatewayConfig) -> Any:
    """This worker's handle on the store the supervisor made (None: limits in-process)."""
    if cfg.workers <= 1 or cfg.backend == "redis":
        return None
    from .._core import SharedMemoryStore

    name = shared_store_name(cfg)
    if name not in _STORES:
        _STORES[name] = SharedMemoryStore(name)
    return _STORES[name]


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
        store = _shared_store(cfg)
        if store is not None:
            return nl.TokenLimiter(shadow=tier.shadow, store=store, name=f"tier-{tier.name}", **kwargs)
        return nl.TokenLimiter(shadow=tier.shadow, **kwargs)
    from ..redis.asyncio import TokenLimiter

    return TokenLimiter(
        redis_client, prefix=cfg.redis_prefix, name=f"tier-{tier.name}", on_error=cfg.on_error, **kwargs
    )


def _prices(cfg: GatewayConfig) -> Any:
    from ..spend import default_prices

    prices = default_prices()
    for model, price in cfg.prices.items():
        prices.set(model, price)
    return prices


def _spend(cfg: GatewayConfig, tier: Tier, redis_client: Any) -> Any:
    """The tier's spend budget: in-process, or on Redis through the gateway's asyncio
    client, so that no spend check ever blocks the event loop."""
    if tier.spend is None:
        return None
    if redis_client is not None:
        from ..redis.asyncio import SpendLimiter as RedisSpend

        return RedisSpend(
            redis_client,
            tier.spend,
            prices=_prices(cfg),
            prefix=cfg.redis_prefix,
            name=f"spend-{tier.name}",
            on_error=cfg.on_error,
            lease_ttl=cfg.lease_ttl,
        )
    from ..spend import SpendLimiter

    store = _shared_store(cfg)
    if store is not None:
        return SpendLimiter(
            tier.spend, prices=_prices(cfg), lease_ttl=cfg.lease_ttl, store=store, name=f"spend-{tier.name}"
        )
    return SpendLimiter(tier.spend, prices=_prices(cfg), lease_ttl=cfg.lease_ttl)


# What a reload cannot change: these need a restart.
_RESTART_FIELDS = (
    "upstream_url",
    "upstream_api_key",
    "upstream_timeout",
    "upstream_adaptive",
    "host",
    "port",
    "backend",
    "redis_url",
    "redis_prefix",
    "on_error",
    "lease",
    "lease_ttl",
    "reload",
    "metrics_path",
    "admin_token",
    "forward_cookies",
    "header_timeout",
    "keep_alive_timeout",
    "max_connections",
    "max_header_bytes",
    "workers",
    "access_log",
)


class Gateway:
    """Routes each request to its key's tier and that tier's limits, then the upstream."""

    def __init__(self, cfg: GatewayConfig) -> None:
        from prometheus_client import CollectorRegistry, Counter

        from ..metrics import Metrics

        self.cfg = cfg
        self.proxy = Proxy(cfg)
        redis_client = None
        if cfg.backend == "redis":
            import redis.asyncio

            redis_client = redis.asyncio.Redis.from_url(str(cfg.redis_url))
        self.redis = redis_client
        # Where hierarchies (teams, classes) live on Redis.
        self.place = RedisPlace(cfg, redis_client) if redis_client is not None else None
        self.metrics = Metrics(registry=CollectorRegistry())
        self.reloads = Counter(
            "config_reloads", "Config reloads by result", ("result",), namespace="nexus_limits", registry=None
        )
        self.metrics.registry.register(self.reloads)
        if self.proxy.aimd is not None:
            self.metrics.watch_upstream(self.proxy.aimd, self.proxy.name)
        self.tiers: Dict[str, Any] = {}
        # Keys of a team: their tier's middleware over the org > team > key hierarchy.
        self.team_tree: Optional[TeamTree] = None
        # The dollar budgets of orgs and teams (and their keys' tiers), when one has any.
        self.spend_tree: Optional[TeamTree] = None
        self.team_tiers: Dict[str, Any] = {}
        self._outputs: Dict[str, Tuple[Tuple[Any, ...], OutputEstimate]] = {}
        self._build(cfg, None)
        self.key_func = parse_key_spec(cfg.key)
        # Requests in flight per key (a key leaves when it has none: bounded by the
        # requests being served).
        self.in_flight: Dict[Any, int] = {}
        self._watcher: Optional[asyncio.Task[None]] = None
        # Leased limiters giving their blocks back after a reload replaced them.
        self._closing: Set[Any] = set()
        self._warming: Optional[asyncio.Task[None]] = None

    def _output(self, cfg: GatewayConfig, tier: Tier) -> OutputEstimate:
        """The tier's output estimate; kept across reloads (a learned one keeps what it learned)."""
        spec = (cfg.learn_output, tier.default_output_tokens)
        kept = self._outputs.get(tier.name)
        if kept is not None and kept[0] == spec:
            return kept[1]
        output: OutputEstimate
        if cfg.learn_output:
            from ..spend import LearnedOutputEstimate

            output = LearnedOutputEstimate(default=tier.default_output_tokens)
        else:
            output = OutputEstimate(default=tier.default_output_tokens)
        self._outputs[tier.name] = (spec, output)
        return output

    def _build(self, cfg: GatewayConfig, old: Optional[GatewayConfig]) -> None:
        """Builds every tier's middleware; on a reload (``old`` given) a tier whose set of
        limits is unchanged keeps its limiters, and so its counters, with the new quotas."""
        tiers: Dict[str, Any] = {}
        # Priority classes are part of each tier's hierarchy: changing them builds anew.
        classes = (cfg.classes, cfg.default_class)
        reclassed = old is not None and classes != (old.classes, old.default_class)
        for name, tier in cfg.tiers.items():
            before = old.tiers.get(name) if old is not None else None
            current = self.tiers.get(name)
            limiter = current.limiter if current is not None else None
            spend = current.spend if current is not None else None
            if before is None or current is None or before.shape() != tier.shape() or reclassed:
                if before is not None:
                    log.warning("tier %s: its set of limits or classes changed; its counters start again", name)
                    if limiter is not None:
                        self._retire(limiter)
                limiter = self._tier_limiter(cfg, tier) if tier.has_limits() else None
            elif limiter is not None and before != tier:
                self._requota(cfg, tier, limiter)
                shared = getattr(limiter, "store_path", None) is not None
                if (self.redis is not None or shared) and not isinstance(limiter, TreeLimiter):
                    # Redis limiters are built anew with the new quotas, on the same keys.
                    self._retire(limiter)
                    limiter = self._tier_limiter(cfg, tier)
            if tier.spend is None:
                spend = None
            elif before is None or before.spend is None or spend is None:
                spend = _spend(cfg, tier, self.redis)
            elif tier.spend != before.spend:
                if cfg.backend == "redis" or _shared_store(cfg) is not None:
                    spend = _spend(cfg, tier, self.redis)  # the same name: the same keys, the new budget
                else:
                    spend.set_budget(tier.spend)
            if old is not None and cfg.prices != old.prices and spend is not None:
                spend.prices = _prices(cfg)
            queue = None
            if tier.queue is not None and limiter is not None:
                kept = current.queue if current is not None else None
                if kept is not None and kept.limiter is limiter and kept.timeout == tier.queue:
                    queue = kept  # its waiting requests stay in it
                else:
                    queue = FairQueue(limiter, timeout=tier.queue)
            tiers[name] = LLMLimitMiddleware(
                self.proxy,
                limiter=limiter,
                spend=spend,
                key=cfg.key,
                output=self._output(cfg, tier),
                metrics=self.metrics,
                metrics_labels=(f"tier-{name}", name),
                # Every request of the key is charged (one request, 0 tokens off the
                # LLM paths) when there is a limiter to charge it to; a spend-only tier
                # prices LLM calls only.
                meter_all=limiter is not None,
                max_body=cfg.max_body_bytes,
                queue=queue,
            )
            if queue is not None:
                self.metrics.watch_queue(queue, f"tier-{name}")
            else:
                self.metrics.unwatch_queue(f"tier-{name}")
            for label, watched in ((f"tier-{name}", limiter), (f"spend-{name}", spend)):
                if watched is not None:
                    self.metrics.watch(watched, label)
                else:
                    self.metrics.unwatch(label)
        for name in set(self.tiers) - set(tiers):
            self.metrics.unwatch(f"tier-{name}")
            self.metrics.unwatch(f"spend-{name}")
            self.metrics.unwatch_queue(f"tier-{name}")
        self._build_teams(cfg, tiers)
        self.tiers = tiers

    def _retire(self, limiter: Any) -> None:
        """A leased limiter being replaced gives its unspent units back."""
        if not isinstance(limiter, LeasedLimiter):
            return
        try:
            task = asyncio.get_running_loop().create_task(limiter.close())
        except RuntimeError:
            return  # no loop (a reload outside the server): the blocks end by themselves
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _tier_limiter(self, cfg: GatewayConfig, tier: Tier) -> Any:
        """A tier's limiter: a TokenLimiter, or with [classes] a one-level hierarchy
        whose quotas the classes share."""
        if cfg.classes:
            return tier_limiter(cfg, tier, self.place)
        if cfg.leases(tier) and self.redis is not None:
            return LeasedLimiter(
                self.redis,
                str(tier.requests),
                prefix=cfg.redis_prefix,
                name=f"tier-{tier.name}-requests",
                on_error=cfg.on_error,
                lease=cfg.lease or {},
            )
        return _limiter(cfg, tier, self.redis)

    def _build_teams(self, cfg: GatewayConfig, tiers: Dict[str, Any]) -> None:
        """The hierarchy of orgs, teams and their keys, and a middleware over it for each
        tier its keys are in. A reload applies the new quotas to the same hierarchy,
        keeping every node's usage, unless the kinds of quota of a level or the classes
        changed (then its counters start again)."""
        if not cfg.key_teams:
            self.team_tree = self.spend_tree = None
            self.team_tiers = {}
            self.metrics.unwatch("teams")
            self.metrics.unwatch("teams-spend")
            return
        tree = self._tree(cfg, self.team_tree, spend=False)
        self.team_tree = tree
        self.metrics.watch(tree.limiter, "teams")
        spend_tree: Optional[TeamTree] = None
        if any(g.spend for g in (*cfg.orgs.values(), *cfg.teams.values())):
            spend_tree = self._tree(cfg, self.spend_tree, spend=True)
            self.metrics.watch(spend_tree.limiter, "teams-spend")
        else:
            self.metrics.unwatch("teams-spend")
        self.spend_tree = spend_tree
        team_tiers: Dict[str, Any] = {}
        for name in sorted({cfg.keys[k] for k in cfg.key_teams}):
            tier = cfg.tiers[name]
            team_tiers[name] = LLMLimitMiddleware(
                self.proxy,
                limiter=tree.limiter,
                # Dollar budgets at org > team > key when an org or a team has one; else
                # the key's own budget, its tier's.
                spend=TreeSpend(spend_tree, _prices(cfg)) if spend_tree is not None else tiers[name].spend,
                key=cfg.key,
                output=self._output(cfg, tier),
                metrics=self.metrics,
                metrics_labels=("teams", name),
                meter_all=True,
                max_body=cfg.max_body_bytes,
            )
        self.team_tiers = team_tiers

    def _tree(self, cfg: GatewayConfig, tree: Optional[TeamTree], spend: bool) -> TeamTree:
        """The hierarchy of the teams' limits (or dollar budgets) with ``cfg``'s quotas:
        the one given, its usage kept, unless a level's kinds of quota or the classes
        changed (then a new one, whose counters start again)."""
        if tree is not None and tree.fits(cfg):
            tree.apply(cfg)
            return tree
        if tree is not None:
            log.warning("teams: the kinds of quota of a level or the classes changed; their counters start again")
        return TeamTree(cfg, self.place, spend=spend)

    @staticmethod
    def _requota(cfg: GatewayConfig, tier: Tier, limiter: Any) -> None:
        if isinstance(limiter, TreeLimiter):
            requota_tier(limiter, tier)
            return
        if getattr(limiter, "store_path", None) is not None:
            return  # in a SharedMemoryStore the quotas are the limiter's identity: built anew
        if callable(getattr(limiter, "set_default_quota", None)):
            limiter.set_default_quota(
                requests=tier.requests,
                tokens=tier.tokens,
                daily_tokens=tier.daily_tokens,
                concurrency=tier.concurrency,
            )
            limiter.shadow = tier.shadow

    def _routed(self, key: str) -> bool:
        """Whether a key of a team is routed in every hierarchy that charges it: a key
        new to a reloaded config is not until its quotas are written to Redis."""
        return all(tree is None or tree.routed(key) for tree in (self.team_tree, self.spend_tree))

    # The longest class name a class header may carry.
    MAX_CLASS_BYTES = 64

    @staticmethod
    def _class_of(scope: Scope, path: str, cfg: GatewayConfig, tier: Tier) -> Optional[str]:
        """A request's priority class: the trusted class header's, else the longest
        route's that matches the path, else its tier's; "" for the hierarchy's default;
        None when the header is not one known class (a 400)."""
        if cfg.class_header is not None:
            values = _class_header(scope, cfg.class_header.encode("latin-1"))
            if values:
                if len(values) != 1 or len(values[0]) > Gateway.MAX_CLASS_BYTES:
                    return None
                value = values[0].decode("latin-1").strip()
                return value if value in cfg.classes else None
        best: Optional[Tuple[str, str]] = None
        for prefix, cls in cfg.routes:
            if (path == prefix or path.startswith(prefix + "/")) and (best is None or len(prefix) > len(best[0])):
                best = (prefix, cls)
        if best is not None:
            return best[1]
        return tier.cls or ""

    @staticmethod
    async def _bad_class(scope: Scope, send: Send, cfg: GatewayConfig) -> None:
        name = str(cfg.class_header)
        values = _class_header(scope, name.encode("latin-1"))
        known = ", ".join(cfg.classes)
        if len(values) != 1:
            detail = f"give the {name} header once (it was given {len(values)} times)"
        elif len(values[0]) > Gateway.MAX_CLASS_BYTES:
            detail = f"the {name} header is longer than {Gateway.MAX_CLASS_BYTES} bytes; it must be one of: {known}"
        else:
            shown = values[0].decode("latin-1")
            detail = f"the {name} header must be one of: {known}; got {shown!r}"
        await reply(send, 400, problem(400, "Bad Request", detail))

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
        self.proxy.max_body = cfg.max_body_bytes
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

    async def _warm(self) -> None:
        """Builds the tokenizer encodings in a worker thread, so that the first requests
        do not pay for it (about a second each); until then the LLM middleware judges
        requests in a thread, so nothing waits on the event loop meanwhile."""
        try:
            await asyncio.to_thread(warm_encodings)
        except Exception as error:  # e.g. tiktoken cannot fetch an encoding: requests build it later
            log.warning("warming the tokenizer encodings failed: %s", error)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._start_reloading()
                # Not awaited: startup does not wait for the encodings.
                self._warming = asyncio.ensure_future(self._warm())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for task in (self._watcher, self._warming):
                    if task is not None:
                        task.cancel()
                for middleware in self.tiers.values():
                    if isinstance(middleware.limiter, LeasedLimiter):
                        await middleware.limiter.close()  # unspent units back to Redis
                await self.proxy.client.aclose()
                if self.redis is not None:
                    await self.redis.aclose()
                if self.place is not None:
                    self.place.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(receive, send)
            return  # websockets: refused (uvicorn answers 403)
        # h11 bounds only a head that arrives in pieces; one that arrives whole is
        # measured here.
        cfg = self.cfg
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        for name, value in scope.get("headers") or ():
            size += len(name) + len(value)
        if size > cfg.max_header_bytes:
            detail = f"the request line and headers are larger than {cfg.max_header_bytes} bytes"
            await reply(send, 431, problem(431, "Request Header Fields Too Large", detail), [("connection", "close")])
            return
        # Decide on, and forward, one target: the method and the path normalised once,
        # the query as sent. Anything else (an absolute URL, "*", an authority, an
        # encoded "/"...) is refused here, before a key is looked at.
        try:
            method, path = normalize_target(scope["method"], scope["path"], scope.get("raw_path"))
            raw_path = path.encode("ascii")
            query = scope.get("query_string", b"")
            scope[UPSTREAM_URL] = self.proxy.url(raw_path, query)
        except (BadRequest, BadTarget) as error:
            await reply(send, 400, problem(400, "Bad Request", str(error)))
            return
        scope["method"] = method
        scope["path"] = path
        scope["raw_path"] = raw_path
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
        if path == "/_nexus" or path.startswith("/_nexus/"):
            await admin(self, scope, send)
            return
        request = request_of(scope)
        try:
            key = self.key_func(request)
        except BadRequest as error:
            await reply(send, 400, problem(400, "Bad Request", str(error)))
            return
        tier = (cfg.keys.get(key, cfg.default_tier) if isinstance(key, str) else cfg.default_tier) if key else None
        if tier is None:
            await reply(send, 401, problem(401, "Unauthorized", "unknown or missing API key"))
            return
        middleware = self.tiers[tier]
        if key in cfg.key_teams:
            if not self._routed(key):
                return await _not_ready(send)
            middleware = self.team_tiers[tier]
        if cfg.classes:
            cls = self._class_of(scope, path, cfg, cfg.tiers[tier])
            if cls is None:
                return await self._bad_class(scope, send, cfg)
            REQUEST_CLASS.set(cls or None)
        declared = request.headers.get("content-length")
        if declared is not None and (len(declared) > 18 or (declared.isdigit() and int(declared) > cfg.max_body_bytes)):
            await _too_large(send, cfg.max_body_bytes)
            return
        in_flight = self.in_flight
        held = in_flight.get(key, 0)
        if held >= cfg.max_in_flight_per_key:
            detail = f"this key already has {held} requests in flight (at most {cfg.max_in_flight_per_key})"
            await reply(send, 429, problem(429, "Too Many Requests", detail), [("retry-after", "1")])
            return
        in_flight[key] = held + 1
        scope[GIVEN] = ((method, path), key)
        try:
            await middleware(scope, _Deadline(receive, cfg.body_timeout), send)
        except _BodyTimeout:
            detail = f"the request body did not arrive within {cfg.body_timeout:g} s"
            await reply(send, 408, problem(408, "Request Timeout", detail), [("connection", "close")])
        except KeyRemoved:
            # A reload removed the key while its body arrived: raised where the call is
            # reserved, before any answer; answered as the key's next request would be.
            await reply(send, 401, problem(401, "Unauthorized", "unknown or missing API key"))
        finally:
            left = in_flight[key] - 1
            if left:
                in_flight[key] = left
            else:
                del in_flight[key]


async def _not_ready(send: Send) -> None:
    detail = "this key's team quotas are being applied after a config reload; retry in a moment"
    await reply(send, 503, problem(503, "Service Unavailable", detail), [("retry-after", "1")])


async def _too_large(send: Send, limit: int) -> None:
    await reply(send, 413, problem(413, "Content Too Large", f"the request body is larger than {limit} bytes"))


class _BodyTimeout(Exception):
    pass


if sys.version_info >= (3, 11):

    async def _within(rest: Any, seconds: float) -> Message:
        async with asyncio.timeout(seconds):
            return await rest  # type: ignore[no-any-return]

else:  # pragma: no cover - Python < 3.11

    async def _within(rest: Any, seconds: float) -> Message:
        async def wait() -> Message:
            return await rest  # type: ignore[no-any-return]

        return await asyncio.wait_for(wait(), seconds)


class _Deadline:
    """The server's ``receive`` with a deadline for the whole request body: a body not
    complete within ``timeout`` seconds raises _BodyTimeout (a 408). Once the body is
    complete, messages (a disconnect) pass as they come. The body's size is bounded
    where it is read: by the LLM middleware (``max_body``) and by the proxy."""

    __slots__ = ("deadline", "done", "receive")

    def __init__(self, receive: Receive, timeout: float) -> None:
        self.receive = receive
        # time.monotonic(), not the loop's clock: asyncio.get_running_loop() costs a
        # getpid() system call on Python 3.11, and most bodies never wait.
        self.deadline = time.monotonic() + timeout
        self.done = False

    async def __call__(self) -> Message:
        if self.done:
            return await self.receive()
        # A body already received is handed over without waiting: the server's
        # receive() is started by hand, and only one that has to wait goes on under
        # the deadline (a timeout per message costs more than the rest of this).
        pending = self.receive().__await__()
        message: Message
        try:
            first = pending.send(None)
        except StopIteration as stop:
            message = stop.value
        else:
            try:
                message = await _within(_Resumed(pending, first), self.deadline - time.monotonic())
            except asyncio.TimeoutError:
                raise _BodyTimeout from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.done = True
        return message


def _class_header(scope: Scope, name: bytes) -> List[bytes]:
    return [value for header, value in scope.get("headers") or () if header.lower() == name]


def build_app(config_path: str) -> Gateway:
    return Gateway(load_config(config_path))
