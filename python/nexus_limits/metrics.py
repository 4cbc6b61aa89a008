"""Prometheus metrics (``pip install nexus-limits[metrics]``).

Two kinds of numbers, both with low-cardinality labels only (never a raw API key):

- **Per request**, observed by the adapters and the gateway when given ``metrics=``:
  ``nexus_limits_requests_total{limiter,tier,route,decision}`` (``decision`` is
  ``allowed``, ``denied`` or ``shadow_denied``) and the histogram
  ``nexus_limits_check_seconds{limiter,tier,route}`` of the time the check took.
- **Per limiter**, read from ``limiter.stats()`` when Prometheus scrapes, so checks pay
  nothing for them: ``nexus_limits_checks_total{limiter,limit,decision}``,
  ``nexus_limits_near_limit_total`` (admitted checks that left at most 20% of the
  limit), ``nexus_limits_keys`` (keys tracked now), ``nexus_limits_keys_evicted_total``,
  ``nexus_limits_own_quotas`` (keys with a quota set by ``set_quota``),
  ``nexus_limits_tokens_total{limiter,kind}`` (``reserved``, ``settled``, ``refunded``),
  ``nexus_limits_backend_errors_total{limiter}`` and
  ``nexus_limits_fallback_total{limiter,answer}`` (``allow``/``deny``/``local`` answers
  given by ``on_error`` while the store was away: ``local`` is the in-process share of
  ``on_error="local"``). Redis limiters also report their client's circuit breaker,
  ``nexus_limits_breaker_open{limiter}`` (1 while it is open and checks answer
  ``on_error`` without trying the server; on a cluster, how many nodes' breakers are
  open) and ``nexus_limits_breaker_trips_total{limiter}`` (times it opened), and, with
  quota leasing on, ``nexus_limits_quota_lease_total{limiter,kind}`` (``taken``: blocks of
  quota leased; ``units``: units in them; ``returned``: units given back unspent;
  ``saved``: round trips saved by checks answered from a block). ``limit`` names a
  TokenLimiter's part (``requests``, ``tokens``, ``daily_tokens``), a Hierarchy's quota
  as ``level.quota`` (``team.tokens``), and is empty for other limiters. A limiter with
  priority classes (``Priority``, a Hierarchy with ``classes=``) also reports
  ``nexus_limits_class_checks_total{limiter,class,decision}``, and a Hierarchy
  ``nexus_limits_refused_by_level_total{limiter,level}`` (calls refused, by the level
  that refused).

- **Per fair queue** (:class:`nexus_limits.fair.FairQueue`, watched with
  ``metrics.watch_queue(queue, name)``), read from ``queue.stats()`` at each scrape:
  ``nexus_limits_queue_waiting{queue}`` (requests waiting now),
  ``nexus_limits_queue_admitted_total{queue}``,
  ``nexus_limits_queue_refused_total{queue,reason}`` (``at_once``: refused on arrival;
  ``timed_out``: refused after waiting; ``pushed_out``: made room in a full queue) and
  the histogram ``nexus_limits_queue_wait_seconds{queue}`` of admitted requests' waits.
- **Per adaptive upstream limit** (:class:`nexus_limits.outbound.AIMD`, watched with
  ``metrics.watch_upstream(aimd, name)``): ``nexus_limits_upstream_limit{upstream}``,
  its value now.

The ``limiter`` label of the per-request numbers is the name the limiter is watched
under (``metrics.watch(api, "api")``), so that both kinds of numbers about one limiter
carry one name; a limiter that is not watched is labelled with the adapter's policy
name (the tier, the route prefix or ``policy_name``).

Example::

    import nexus_limits as nl
    from prometheus_client import start_http_server
    from nexus_limits.adapters.asgi import RateLimitMiddleware
    from nexus_limits.metrics import Metrics

    metrics = Metrics()                     # the default prometheus_client registry
    api = metrics.watch(nl.TokenBucket("100/minute"), "api")
    app.add_middleware(RateLimitMiddleware, limiter=api, key="bearer", metrics=metrics)
    start_http_server(9100)
"""

from __future__ import annotations

import math
import re
import threading
import weakref
from bisect import bisect_left as _bisect
from typing import Any, Dict, Iterable, Iterator, List, Tuple

__all__ = ["Metrics"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Seconds: a check takes from well under a microsecond (in-process) to milliseconds (Redis).
_BUCKETS = (1e-6, 5e-6, 2e-5, 1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.5, 1.0)


def _mutex_value() -> Any:
    """prometheus-client's in-process value class (None if it has another shape)."""
    try:
        from prometheus_client.values import MutexValue
    except ImportError:  # pragma: no cover - the extra is installed for the tests
        return None
    return MutexValue


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:  # pragma: no cover - the extra is installed for the tests
        raise ImportError("nexus_limits.metrics needs prometheus-client: pip install 'nexus-limits[metrics]'") from None
    return prometheus_client


# One Metrics per (registry, namespace): a second Metrics() there returns the first.
# Weak both ways: the registry keeps its Metrics alive (it is registered there), and
# nothing here keeps a registry alive.
_INSTANCES: weakref.WeakKeyDictionary[Any, Dict[str, weakref.ref[Metrics]]] = weakref.WeakKeyDictionary()
_INSTANCES_LOCK = threading.Lock()


class Metrics:
    """Collects nexus-limits metrics into a prometheus-client registry.

    ``registry``: where to register (default: ``prometheus_client.REGISTRY``, what
    ``start_http_server`` and ``generate_latest()`` serve); ``namespace``: the metric
    name prefix.

    There is one ``Metrics`` per registry and namespace: ``Metrics()`` on a registry
    that already has one returns that same object (so an app factory that runs once per
    test, or two modules that each ask for ``Metrics()``, share it instead of failing
    with prometheus-client's "Duplicated timeseries"). If other collectors already hold
    these metric names on the registry, it raises ``ValueError`` naming them; pass
    another ``namespace=`` or ``registry=`` then.
    """

    namespace: str
    registry: Any

    def __new__(cls, registry: Any = None, namespace: str = "nexus_limits") -> Metrics:
        prom = _prometheus()
        if not isinstance(namespace, str) or not _NAME.fullmatch(namespace):
            raise ValueError(f"namespace must be a metric name prefix such as 'nexus_limits', got {namespace!r}")
        registry = registry if registry is not None else prom.REGISTRY
        if not callable(getattr(registry, "register", None)):
            raise TypeError(f"registry must be a prometheus_client CollectorRegistry, got {type(registry).__name__}")
        with _INSTANCES_LOCK:
            try:
                ref = _INSTANCES.get(registry, {}).get(namespace)
            except TypeError:  # a registry that cannot be weakly referenced: no reuse
                ref = None
            existing = ref() if ref is not None else None
            if existing is not None:
                if not isinstance(existing, cls):
                    raise ValueError(
                        f"this registry already has a {type(existing).__name__} for namespace {namespace!r}; "
                        f"a {cls.__name__} cannot share it: pass another namespace="
                    )
                return existing
            self = super().__new__(cls)
            self._setup(prom, registry, namespace)
            try:
                _INSTANCES.setdefault(registry, {})[namespace] = weakref.ref(self)
            except TypeError:
                pass
            return self

    def __init__(self, registry: Any = None, namespace: str = "nexus_limits") -> None:
        """Everything is done by ``__new__`` (which may return an existing Metrics)."""

    def _setup(self, prom: Any, registry: Any, namespace: str) -> None:
        self.namespace = namespace
        self.registry = registry
        self._watched: Dict[str, Any] = {}
        self._queues: Dict[str, Any] = {}
        self._upstreams: Dict[str, Any] = {}
        # id(limiter) -> the name it is watched under, for the per-request label.
        self._names: Dict[int, str] = {}
        # The labelled series of each (limiter, tier, route), looked up once.
        self._children: Dict[Tuple[str, str, str], Tuple[Any, ...]] = {}
        self._lock = threading.Lock()
        labels = ("limiter", "tier", "route")
        self.requests = prom.Counter(
            "requests", "Requests checked by an adapter", (*labels, "decision"), namespace=namespace, registry=None
        )
        self.latency = prom.Histogram(
            "check_seconds", "Time a limit check took", labels, namespace=namespace, buckets=_BUCKETS, registry=None
        )
        done: List[Any] = []
        try:
            for collector in (self.requests, self.latency, self):
                registry.register(collector)
                done.append(collector)
        except ValueError as error:
            for collector in done:
                registry.unregister(collector)
            raise ValueError(
                f"the metric names of nexus_limits.metrics.Metrics(namespace={namespace!r}) are already "
                f"registered on this registry by other collectors ({error}); "
                f"pass another namespace= or registry="
            ) from None

    def watch(self, limiter: Any, name: str) -> Any:
        """Report ``limiter.stats()`` under ``limiter=name`` at every scrape, and label
        the adapters' per-request numbers about this limiter with ``name`` too; returns
        the limiter. A name is one limiter: watching another under it replaces the first."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        if not callable(getattr(limiter, "stats", None)):
            raise TypeError(f"limiter must have stats() (a nexus_limits limiter), got {type(limiter).__name__}")
        with self._lock:
            previous = self._watched.get(name)
            if previous is not None and self._names.get(id(previous)) == name:
                del self._names[id(previous)]
            self._watched[name] = limiter
            self._names[id(limiter)] = name
        return limiter

    def unwatch(self, name: str) -> None:
        """Stop reporting the limiter watched under ``name``."""
        with self._lock:
            limiter = self._watched.pop(name, None)
            if limiter is not None and self._names.get(id(limiter)) == name:
                del self._names[id(limiter)]

    def watch_queue(self, queue: Any, name: str) -> Any:
        """Report a :class:`~nexus_limits.fair.FairQueue`'s ``stats()`` under ``queue=name``
        at every scrape; returns the queue. Watching another under a name replaces it."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        if not callable(getattr(queue, "stats", None)) or not callable(getattr(queue, "acquire_async", None)):
            raise TypeError(f"queue must be a nexus_limits.fair.FairQueue, got {type(queue).__name__}")
        with self._lock:
            self._queues[name] = queue
        return queue

    def watch_upstream(self, aimd: Any, name: str) -> Any:
        """Report an :class:`~nexus_limits.outbound.AIMD`'s value under ``upstream=name``
        at every scrape; returns it."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        if not isinstance(getattr(aimd, "value", None), (int, float)):
            raise TypeError(f"aimd must be a nexus_limits.outbound.AIMD, got {type(aimd).__name__}")
        with self._lock:
            self._upstreams[name] = aimd
        return aimd

    def unwatch_queue(self, name: str) -> None:
        """Stop reporting the queue watched under ``name``."""
        with self._lock:
            self._queues.pop(name, None)

    def label_of(self, limiter: Any, default: str) -> str:
        """The ``limiter`` label for a limiter: the name it is watched under, else ``default``."""
        return self._names.get(id(limiter), default)

    def observe(self, limiter: str, tier: str, route: str, seconds: float, decision: Any, source: Any = None) -> None:
        """Counts one request's check (adapters call this). ``limiter`` is the adapter's
        policy name; ``source``, the limiter object that decided: when it is watched,
        the name it is watched under is the label instead."""
        if source is not None:
            limiter = self._names.get(id(source), limiter)
        labels = (limiter, tier, route)
        series = self._children.get(labels)
        if series is None:
            series = self._series(labels)
        if len(series) == 4:  # prometheus-client's own calls
            if decision.allowed:
                series[2 if decision.shadow else 0](1)
            else:
                series[1](1)
            series[3](seconds)
            return
        # What Counter.inc and Histogram.observe do, under the one lock the series'
        # values share: the decision's count, the sum, then the first bucket whose
        # bound is at least the value (none for NaN).
        lock, counts, total, buckets, bounds = series
        count = counts[(2 if decision.shadow else 0) if decision.allowed else 1]
        bucket = buckets[_bisect(bounds, seconds)] if seconds == seconds else None
        with lock:
            count._value += 1
            total._value += seconds
            if bucket is not None:
                bucket._value += 1

    def _series(self, labels: Tuple[str, str, str]) -> Tuple[Any, ...]:
        """How ``observe`` updates one (limiter, tier, route): prometheus-client's
        ``inc`` and ``observe`` of its series; or, when the series hold their numbers
        in this process (prometheus-client's ``MutexValue``, the shape it has had since
        0.4; not its multiprocess mode), one lock shared by the series' values (each
        of prometheus-client's own reads and writes still takes it) with the values
        themselves, so that a request takes one lock instead of three."""
        with self._lock:
            found = self._children.get(labels)
            if found is not None:  # another thread made it meanwhile
                return found
            allowed = self.requests.labels(*labels, "allowed")
            denied = self.requests.labels(*labels, "denied")
            shadow = self.requests.labels(*labels, "shadow_denied")
            latency = self.latency.labels(*labels)
            series: Tuple[Any, ...] = (allowed.inc, denied.inc, shadow.inc, latency.observe)
            try:
                counts = (allowed._value, denied._value, shadow._value)
                total = latency._sum
                buckets = tuple(latency._buckets)
                bounds = tuple(float(bound) for bound in latency._upper_bounds)
                values = (*counts, total, *buckets)
                mutex = _mutex_value()
                if (
                    mutex is not None
                    and all(type(v) is mutex and type(v._value) is float for v in values)
                    and len(bounds) == len(buckets)
                    and bounds[-1] == math.inf
                    and list(bounds) == sorted(bounds)
                ):
                    lock = threading.Lock()
                    for v in values:
                        with v._lock:  # a write under the old lock ends first
                            v._lock = lock
                    series = (lock, counts, total, buckets, bounds)
            except (AttributeError, TypeError, ValueError, IndexError):
                pass
            self._children[labels] = series
            return series

    # prometheus_client's custom collector protocol.
    def describe(self) -> List[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        ns = self.namespace
        checks = CounterMetricFamily(
            f"{ns}_checks", "Checks decided by a limiter", labels=("limiter", "limit", "decision")
        )
        near = CounterMetricFamily(
            f"{ns}_near_limit", "Admitted checks that left at most 20% of the limit", labels=("limiter", "limit")
        )
        keys = GaugeMetricFamily(f"{ns}_keys", "Keys a limiter tracks now", labels=("limiter", "limit"))
        evicted = CounterMetricFamily(f"{ns}_keys_evicted", "Idle keys evicted", labels=("limiter", "limit"))
        own = GaugeMetricFamily(f"{ns}_own_quotas", "Keys with a quota of their own", labels=("limiter", "limit"))
        tokens = CounterMetricFamily(f"{ns}_tokens", "LLM tokens by what happened", labels=("limiter", "kind"))
        errors = CounterMetricFamily(f"{ns}_backend_errors", "Store errors (unreachable, timeout)", labels=("limiter",))
        fallback = CounterMetricFamily(
            f"{ns}_fallback", "Answers given by on_error while the store was away", labels=("limiter", "answer")
        )
        breaker_open = GaugeMetricFamily(
            f"{ns}_breaker_open",
            "1 while the store client's circuit breaker is open (on a cluster: nodes open)",
            labels=("limiter",),
        )
        breaker_trips = CounterMetricFamily(
            f"{ns}_breaker_trips", "Times the store client's circuit breaker opened", labels=("limiter",)
        )
        leases = CounterMetricFamily(
            f"{ns}_quota_lease",
            "Quota leasing: blocks taken, units in them, returned, round trips saved",
            labels=("limiter", "kind"),
        )
        classes = CounterMetricFamily(
            f"{ns}_class_checks",
            "Checks of a limiter shared by priority classes, by class",
            labels=("limiter", "class", "decision"),
        )
        refused_by = CounterMetricFamily(
            f"{ns}_refused_by_level", "Calls a hierarchy refused, by the refusing level", labels=("limiter", "level")
        )
        with self._lock:
            watched = list(self._watched.items())
        for name, limiter in watched:
            stats = limiter.stats()
            for cls, numbers in (stats.get("classes") or {}).items():
                for decision in ("allowed", "denied", "shadow_denied"):
                    if decision in numbers:
                        classes.add_metric((name, cls, decision), numbers[decision])
            for level, n in (stats.get("refused_by") or {}).items():
                refused_by.add_metric((name, level), n)
            for part, numbers in _parts(stats):
                if "allowed" in numbers:
                    for decision in ("allowed", "denied", "shadow_denied"):
                        if decision in numbers:
                            checks.add_metric((name, part, decision), numbers[decision])
                if "near_limit" in numbers:
                    near.add_metric((name, part), numbers["near_limit"])
                if "keys" in numbers and "evicted" in numbers:
                    keys.add_metric((name, part), numbers["keys"])
                    evicted.add_metric((name, part), numbers["evicted"])
                if "own_quotas" in numbers:
                    own.add_metric((name, part), numbers["own_quotas"])
            for kind in ("reserved", "settled", "refunded"):
                if f"tokens_{kind}" in stats:
                    tokens.add_metric((name, kind), stats[f"tokens_{kind}"])
            if "errors" in stats:
                errors.add_metric((name,), stats["errors"])
                fallback.add_metric((name, "allow"), stats["fail_open"])
                fallback.add_metric((name, "deny"), stats["fail_closed"])
                if "fail_local" in stats:
                    fallback.add_metric((name, "local"), stats["fail_local"])
            if "breaker_open" in stats:
                breaker_open.add_metric((name,), stats["breaker_open"])
                breaker_trips.add_metric((name,), stats["breaker_trips"])
            for kind, stat in _LEASE_STATS:
                if stat in stats:
                    leases.add_metric((name, kind), stats[stat])
        yield from (checks, near, keys, evicted, own, tokens, errors, fallback, breaker_open, breaker_trips, leases)
        yield from (classes, refused_by)
        yield from self._collect_queues()

    def _collect_queues(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        ns = self.namespace
        waiting = GaugeMetricFamily(f"{ns}_queue_waiting", "Requests waiting in a fair queue now", labels=("queue",))
        admitted = CounterMetricFamily(f"{ns}_queue_admitted", "Requests a fair queue admitted", labels=("queue",))
        refused = CounterMetricFamily(
            f"{ns}_queue_refused", "Requests a fair queue refused, by when", labels=("queue", "reason")
        )
        waits = HistogramMetricFamily(
            f"{ns}_queue_wait_seconds", "How long admitted requests waited in a fair queue", labels=("queue",)
        )
        with self._lock:
            queues = list(self._queues.items())
            upstreams = list(self._upstreams.items())
        limit = GaugeMetricFamily(
            f"{ns}_upstream_limit", "An upstream's adaptive limit now (requests per its window)", labels=("upstream",)
        )
        for name, aimd in upstreams:
            limit.add_metric((name,), aimd.value)
        yield limit
        for name, queue in queues:
            stats = queue.stats()
            waiting.add_metric((name,), stats["waiting"])
            admitted.add_metric((name,), stats["admitted"])
            for reason, stat in (
                ("at_once", "refused_at_once"),
                ("timed_out", "timed_out"),
                ("pushed_out", "pushed_out"),
            ):
                refused.add_metric((name, reason), stats[stat])
            buckets = [(_bound(bound), count) for bound, count in stats["wait_seconds_buckets"]]
            waits.add_metric((name,), buckets, stats["wait_seconds_sum"])
        yield from (waiting, admitted, refused, waits)

    def render(self) -> bytes:
        """The registry in Prometheus' text format (what a /metrics endpoint serves)."""
        return _prometheus().generate_latest(self.registry)  # type: ignore[no-any-return]


# The ``kind`` label of nexus_limits_quota_lease_total -> the stats() entry it reports.
_LEASE_STATS = (
    ("taken", "leases_taken"),
    ("units", "units_leased"),
    ("returned", "units_returned"),
    ("saved", "round_trips_saved"),
)


def _bound(bound: float) -> str:
    """A histogram bucket's ``le`` label, as prometheus-client writes it."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _parts(stats: Dict[str, Any]) -> Iterable[Tuple[str, Dict[str, Any]]]:
    """("", stats) for a limiter; (part, its stats) for each part of a TokenLimiter."""
    # "classes" and "refused_by" are reported on their own; a hierarchy's "levels" holds
    # one more layer (level -> quota -> numbers): each quota becomes "level.quota".
    nested: List[Tuple[str, Dict[str, Any]]] = []
    for k, v in stats.items():
        if not isinstance(v, dict) or k in ("classes", "refused_by"):
            continue
        if k == "levels":
            nested += [
                (f"{level}.{quota}", numbers)
                for level, quotas in v.items()
                for quota, numbers in quotas.items()
                if isinstance(numbers, dict)
            ]
        else:
            nested.append((k, v))
    if not nested:
        return [("", stats)]
    out: List[Tuple[str, Dict[str, Any]]] = list(nested)
    flat = {k: v for k, v in stats.items() if not isinstance(v, dict)}
    if "allowed" in flat:
        out.append(("", flat))
    return out
