"""What the gateway builds from its config's orgs, teams and classes: the hierarchies
(in-process; in the SharedMemoryStore its workers share, with ``[server] workers`` > 1
on the memory backend; or on Redis, shared by every gateway process) and their quotas.

Every node of a level must have a quota of each kind its level has: a node with no
quota of a kind gets :data:`UNLIMITED` of it (never the one refusing), and the routes
(:class:`~.tree.Route`) leave those out of the headers and of a refusal's words.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Set, Tuple

from ..base import Key
from .config import Tier
from .tree import Route, TreeLimiter

if TYPE_CHECKING:
    from .config import GatewayConfig

__all__ = [
    "LEVELS",
    "UNLIMITED",
    "RedisPlace",
    "TeamTree",
    "requota_tier",
    "shared_store",
    "tier_limiter",
    "tree_store_ttl",
]

log = logging.getLogger("nexus_limits.gateway")

# A quota no call reaches: what a node has of a kind its level has and it does not.
_NEVER = "1000000000000000/second"
UNLIMITED: Dict[str, Any] = {
    "requests": _NEVER,
    "tokens": _NEVER,
    "daily_tokens": _NEVER,
    "concurrency": 1_000_000_000,
    "spend": _NEVER,  # micro-dollars
}


# What a node of a level with a concurrency limit has when it has none of its own, in a
# SharedMemoryStore (whose leases name their slot in 16 bits): no more calls than that
# are ever in flight on one host.
SHARED_UNLIMITED_CONCURRENCY = 65_535

LEVELS = ("org", "team", "key")
# The org of a team that names none: no org's name is empty (the config refuses it).
NO_ORG = ""
_KINDS = ("requests", "tokens", "daily_tokens", "concurrency")


def _full(kinds: Tuple[str, ...], quotas: Dict[str, Any], shared: bool = False) -> Dict[str, Any]:
    """Every kind of a level for one node: its own quota, else unlimited (a dollar
    budget unlimited is already micro-dollars: no parsing; ``shared``: in a
    SharedMemoryStore, whose concurrency limits stop at 65,535)."""
    out = {kind: quotas.get(kind, UNLIMITED[kind]) for kind in kinds}
    if shared and "concurrency" in out and "concurrency" not in quotas:
        out["concurrency"] = SHARED_UNLIMITED_CONCURRENCY
    if out.get("spend") == _NEVER:
        import nexus_limits as nl

        out["spend"] = nl.Rate.parse(_NEVER)
    return out


def _kinds(quotas: List[Dict[str, Any]], units: Tuple[str, ...]) -> Tuple[str, ...]:
    """The kinds of quota a level has: those any of its nodes has (the first of
    ``units``, unlimited, when none has any: a level must have one)."""
    found = tuple(kind for kind in units if any(kind in q for q in quotas))
    return found or units[:1]


def shared_store(cfg: GatewayConfig) -> Any:
    """The SharedMemoryStore through which the workers of a memory-backend gateway share
    their limits (``[server] workers`` > 1; the supervisor made it before starting
    them), this process's handle on it; None with one worker or on Redis."""
    if cfg.workers <= 1 or cfg.backend == "redis":
        return None
    from .app import _shared_store  # the app's handle: one per store in a process

    return _shared_store(cfg)


def _period(kind: str, value: Any) -> float:
    """Seconds a quota needs a store to remember an idle node (its period)."""
    import nexus_limits as nl

    if kind == "concurrency":
        return 0.0
    if kind == "daily_tokens" and not isinstance(value, str):
        return 86400.0
    if kind == "spend" and isinstance(value, str):
        from ..spend import parse_budget

        return float(parse_budget(value).period)
    rate = nl.Rate.parse(value) if isinstance(value, str) else value
    return float(rate.period)


def tree_store_ttl(cfg: GatewayConfig) -> int:
    """The longest period of an org's or a team's quota or dollar budget, in whole
    seconds (0 when none has one): a SharedMemoryStore holding the teams' hierarchies
    must remember an idle node that long (the tiers' own periods are counted apart)."""
    import math

    longest = 0.0
    for group in (*cfg.orgs.values(), *cfg.teams.values()):
        for kind, value in group.quotas().items():
            longest = max(longest, _period(kind, value))
    return math.ceil(longest)


def _check_store_ttl(store: Any, where: str, quotas: Dict[str, Any]) -> None:
    """A ValueError naming the quota when ``store`` cannot remember a node as long as
    one of ``quotas`` needs, before anything is written (a reload then keeps the
    running config whole)."""
    for kind, value in quotas.items():
        need = _period(kind, value)
        if need > store.ttl:
            raise ValueError(
                f"{where}.{kind} = {value!s} needs the workers' shared-memory store to remember a node "
                f"{need:g} s, but it was made with a ttl of {store.ttl:g} s: restart the gateway to apply it"
            )


class RedisPlace:
    """Where the gateway's hierarchies live with ``[backend] type = "redis"``: checks
    go through the gateway's asyncio client (``nexus_limits.redis.asyncio.Hierarchy``);
    quota changes through a twin on a synchronous client, at startup (before anything
    is served) and, on a reload, in a worker thread (never blocking the event loop)."""

    def __init__(self, cfg: GatewayConfig, client: Any) -> None:
        self.cfg = cfg
        self.client = client
        self._sync: Any = None

    def sync_client(self) -> Any:
        if self._sync is None:
            import redis

            self._sync = redis.Redis.from_url(str(self.cfg.redis_url))
        return self._sync

    def build(self, levels: List[Tuple[str, Dict[str, Any]]], name: str, **options: Any) -> Tuple[Any, Any]:
        """The hierarchy that checks (asyncio) and its twin that changes quotas (sync)."""
        from ..redis import Hierarchy as SyncHierarchy
        from ..redis.asyncio import Hierarchy as AsyncHierarchy

        common = {"prefix": self.cfg.redis_prefix, "name": name, "on_error": self.cfg.on_error, **options}
        return AsyncHierarchy(self.client, levels, **common), SyncHierarchy(self.sync_client(), levels, **common)

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None


# The one thread that writes quota changes to Redis: changes land in the order the
# reloads made them (in parallel threads, an older reload's quotas could land last and
# stay in force under a newer config).
_WRITER: Optional[ThreadPoolExecutor] = None


def _writer() -> ThreadPoolExecutor:
    global _WRITER
    if _WRITER is None:
        _WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nexus-limits-quotas")
    return _WRITER


def _change(work: Callable[[], Any], then: Callable[[], None]) -> None:
    """Runs a blocking quota change, then ``then``: at once without an event loop
    (startup), else in the quota writer thread (changes in order) with ``then`` back on
    the loop."""
    import asyncio

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        try:
            work()
        except Exception as error:  # the store is away: nothing can be served without the quotas
            raise RuntimeError(f"the gateway's quotas could not be written to Redis: {error}") from error
        then()
        return

    def done(future: Any) -> None:
        error = future.exception()
        if error is not None:
            log.error("config reload: the new quotas could not be written to Redis: %s", error)
            return
        then()

    loop.run_in_executor(_writer(), work).add_done_callback(done)


# TeamTree's default store: the one of its config (see shared_store).
_FIND: Any = object()


def _later(work: Callable[[], None], delay: float) -> None:
    """Runs ``work`` on the running event loop ``delay`` seconds from now; at once
    without a loop (startup, or a reload outside the server)."""
    import asyncio

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        work()
        return
    loop.call_later(delay, work)


class TeamTree:
    """The hierarchy of the config's orgs, teams and their keys: a key of a team is
    charged at its org (if any), its team and itself (its tier's quotas), all at once.

    ``apply(cfg)`` sets every node's quotas from a config (at build and on each
    reload), keeping what each node has used; ``fits(cfg)`` says whether a new config
    can be applied to this hierarchy (the same kinds of quota at each level and the
    same classes) or needs a new one. On Redis (``place``) the quotas live in Redis,
    shared by every gateway process; with several workers on the memory backend, in
    the SharedMemoryStore they share (``store``), where a node's quotas are its own
    (``set_quota``), written in one transaction each, for every worker at once."""

    def __init__(
        self, cfg: GatewayConfig, place: Optional[RedisPlace] = None, spend: bool = False, store: Any = _FIND
    ) -> None:
        import nexus_limits as nl

        # The limits (requests, tokens, daily_tokens, concurrency) or the dollar budgets:
        # the LLM middleware charges the two apart (a spend estimate needs the model).
        self.units = ("spend",) if spend else _KINDS
        self.signature = self._signature(cfg)
        shape, classes, default_class, lease_ttl = self.signature
        # Several workers on the memory backend: the hierarchy lives in the store they
        # share (``store``; by default the one of ``cfg``), so they count every call together.
        self.store = (shared_store(cfg) if store is _FIND else store) if place is None else None
        shared = self.store is not None
        levels = [(level, _full(kinds, {}, shared)) for level, kinds in zip(LEVELS, shape)]
        options: Dict[str, Any] = {
            "classes": dict(classes) or None,
            "default_class": default_class,
            "lease_ttl": lease_ttl,
        }
        # The store's keys are named after the shape: a config whose levels have other
        # kinds of quota starts on keys of its own, as an in-process hierarchy starts anew.
        digest = hashlib.sha1(repr(self.signature).encode()).hexdigest()[:12]
        name = f"{'spend' if spend else 'teams'}-{digest}"
        if place is not None:
            self.hierarchy, self.admin = place.build(levels, name, **options)
        elif shared:
            self.hierarchy = nl.Hierarchy(levels=levels, store=self.store, name=name, **options)
            self.admin = self.hierarchy
        else:
            self.hierarchy = nl.Hierarchy(levels=levels, **options)
            self.admin = self.hierarchy
        self.place = place
        self.routes: Dict[Key, Route] = {}
        # The nodes whose quotas are written, and the lock and count that order reloads.
        self.nodes: Set[Tuple[Key, ...]] = set()
        self._writing = threading.Lock()
        self._generation = 0
        self.limiter = TreeLimiter(self.hierarchy, self.routes.get)
        self.apply(cfg)

    def _quotas(self, node: Any) -> Dict[str, Any]:
        """A node's quotas of this tree's units (a key's are its tier's)."""
        if node is None:
            return {}
        if isinstance(node, Tier):
            quotas = {**node.quotas(), "spend": node.spend} if node.spend else node.quotas()
        else:
            quotas = node.quotas()
        return {k: v for k, v in quotas.items() if k in self.units}

    def _signature(self, cfg: GatewayConfig) -> Tuple[Any, ...]:
        tiers = {cfg.keys[k] for k in cfg.key_teams}
        shape = (
            _kinds([self._quotas(g) for g in cfg.orgs.values()], self.units),
            _kinds([self._quotas(g) for g in cfg.teams.values()], self.units),
            _kinds([self._quotas(cfg.tiers[t]) for t in sorted(tiers)], self.units),
        )
        # Priority classes share the limits, not the dollar budgets.
        classes = () if self.units == ("spend",) else tuple(cfg.classes.items())
        return shape, classes, cfg.default_class if classes else None, cfg.lease_ttl

    def routed(self, key: Key) -> bool:
        """Whether ``key`` has its route (False while a reload's quotas for it are still
        being written to Redis)."""
        return key in self.routes

    def fits(self, cfg: GatewayConfig) -> bool:
        return self._signature(cfg) == self.signature

    def apply(self, cfg: GatewayConfig) -> None:
        """Every node's quotas from ``cfg``, keeping usage, then the keys' routes. On
        Redis the quotas are written in a worker thread and the routes change only once
        they are all there: a node whose quota is not written yet has its level's
        default, unlimited, so a key routed to it earlier would be charged nowhere. Until
        then a key new to the config has no route (see :meth:`routed`), and the others
        keep their old ones; if the writes fail, the old routes stay. In the workers'
        SharedMemoryStore the quotas are written at once, for every worker; the nodes
        the config removed keep theirs ``reload_interval`` + 1 s longer, for the workers
        that have not reloaded yet."""
        org_kinds, team_kinds, key_kinds = self.signature[0]
        shared = self.store is not None
        if shared:
            # Checked before anything is written: a reload refused half-way would leave
            # the other workers some of its quotas.
            tiers = {name: cfg.tiers[name] for name in {cfg.keys[k] for k in cfg.key_teams}}
            for table, groups in (("orgs", cfg.orgs), ("teams", cfg.teams), ("tiers", tiers)):
                for name, group in groups.items():
                    _check_store_ttl(self.store, f"{table}.{name}", self._quotas(group))
        nodes: Dict[Tuple[Key, ...], Dict[str, Any]] = {}
        for name, org in cfg.orgs.items():
            nodes[(name,)] = _full(org_kinds, self._quotas(org), shared)
        for name, team in cfg.teams.items():
            nodes[(team.org or NO_ORG, name)] = _full(team_kinds, self._quotas(team), shared)
        routes: Dict[Key, Route] = {}
        for api_key, team_name in cfg.key_teams.items():
            team = cfg.teams[team_name]
            tier = cfg.tiers[cfg.keys[api_key]]
            path = (team.org or NO_ORG, team_name, api_key)
            nodes[path] = _full(key_kinds, self._quotas(tier), shared)
            rates: Dict[str, str] = {}
            for level, node in (("org", cfg.orgs.get(team.org or "")), ("team", team), ("key", tier)):
                rates.update({f"{level}.{kind}": str(value) for kind, value in self._quotas(node).items()})
            routes[api_key] = Route(path, rates)
        admin = self.admin
        # Reloads in quick succession: their writes run one at a time, and only the
        # latest config's routes are put in force (an older one finishing last would
        # bring its routes back over the newer quotas).
        self._generation += 1
        mine = self._generation

        def work() -> None:
            with self._writing:
                if mine != self._generation:
                    return  # a newer config writes every node itself
                for node, quotas in nodes.items():
                    admin.set_quota(node, **quotas)
                self.nodes |= set(nodes)

        def clear() -> None:
            # Only once no route leads to them: a node without its quota is unlimited.
            with self._writing:
                if mine != self._generation:
                    return
                for node in self.nodes - set(nodes):
                    admin.clear_quota(node)
                self.nodes = set(nodes)

        def then() -> None:
            if mine != self._generation:
                return
            self.routes.clear()
            self.routes.update(routes)
            if self.place is not None:
                _change(clear, lambda: None)
            elif self.store is not None:
                # The other workers reload on their own (on the same SIGHUP, or when they
                # next poll the file): until then they still route keys to the nodes this
                # config removed, which must keep their quotas in the store meanwhile.
                _later(clear, float(cfg.reload_interval) + 1.0)
            else:
                clear()

        if self.place is None:
            work()
            then()
        else:
            _change(work, then)


class _TierRoute:
    """Every key of a tier is its own node: ``(key,)``."""

    __slots__ = ("rates",)

    def __init__(self, tier: Tier) -> None:
        self.rates = {f"key.{kind}": str(value) for kind, value in tier.quotas().items()}

    def __call__(self, key: Key) -> Route:
        return Route((key,), self.rates)


def _tier_hierarchy(tier: Tier, store: Any, **options: Any) -> Any:
    """A tier's one-level hierarchy in this process, or in the workers' shared store."""
    import nexus_limits as nl

    levels = [("key", tier.quotas())]
    if store is None:
        return nl.Hierarchy(levels=levels, shadow=tier.shadow, **options)
    _check_store_ttl(store, f"tiers.{tier.name}", tier.quotas())
    # The tier's quotas are part of its keys' names in the store (its level's defaults):
    # a tier whose quotas change starts anew there, as a plain tier's TokenLimiter does.
    return nl.Hierarchy(levels=levels, store=store, name=f"tier-{tier.name}-classes", shadow=tier.shadow, **options)


def tier_limiter(cfg: GatewayConfig, tier: Tier, place: Optional[RedisPlace] = None, store: Any = _FIND) -> TreeLimiter:
    """A tier's limits as a one-level hierarchy, so that [classes] share them: each key
    of the tier its own node, with the tier's quotas (on Redis with ``place``; in the
    workers' SharedMemoryStore with ``store``, by default the one of ``cfg``)."""
    options: Dict[str, Any] = {"classes": cfg.classes, "default_class": cfg.default_class, "lease_ttl": cfg.lease_ttl}
    if place is None:
        shared = shared_store(cfg) if store is _FIND else store
        limiter = TreeLimiter(_tier_hierarchy(tier, shared, **options), _TierRoute(tier))
        limiter.store = shared
    else:
        hierarchy, admin = place.build([("key", tier.quotas())], f"tier-{tier.name}-classes", **options)
        limiter = TreeLimiter(hierarchy, _TierRoute(tier))
        limiter.admin = admin
        # Quotas a reload stored in Redis outlive the process: this config's win.
        quotas = tier.quotas()
        _change(lambda: admin.set_default_quota("key", **quotas), lambda: None)
    return limiter


def requota_tier(limiter: TreeLimiter, tier: Tier) -> None:
    """New quotas for a tier's one-level hierarchy (the same kinds), keeping usage (in
    the workers' shared store: built anew when its quotas change, see _tier_hierarchy)."""
    admin = limiter.admin
    if admin is None and limiter.store is not None:
        old = limiter.hierarchy
        route = _TierRoute(tier)
        current = limiter.route_of
        if not isinstance(current, _TierRoute) or current.rates != route.rates:
            options = {"classes": old.classes, "default_class": old.default_class, "lease_ttl": old.lease_ttl}
            limiter.hierarchy = _tier_hierarchy(tier, limiter.store, **options)
        limiter.hierarchy.shadow = tier.shadow
        limiter.route_of = route
        return
    if admin is None:
        limiter.hierarchy.set_default_quota("key", **tier.quotas())
        limiter.hierarchy.shadow = tier.shadow
        limiter.route_of = _TierRoute(tier)
        return
    route = _TierRoute(tier)

    def then() -> None:
        limiter.route_of = route

    _change(lambda: admin.set_default_quota("key", **tier.quotas()), then)
