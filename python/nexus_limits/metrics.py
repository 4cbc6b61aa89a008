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
  ``nexus_limits_fallback_total{limiter,answer}`` (``allow``/``deny`` answers given by
  ``on_error`` while the store was away). ``limit`` names a TokenLimiter's part
  (``requests``, ``tokens``, ``daily_tokens``) and is empty for other limiters.

Example::

    from prometheus_client import start_http_server
    from nexus_limits.metrics import Metrics

    metrics = Metrics()                     # the default prometheus_client registry
    api = nl.TokenBucket("100/minute")
    metrics.watch(api, "api")
    app.add_middleware(RateLimitMiddleware, limiter=api, key="bearer", metrics=metrics)
    start_http_server(9100)
"""

from __future__ import annotations

import re
import threading
from typing import Any, Dict, Iterable, Iterator, List, Tuple

__all__ = ["Metrics"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Seconds: a check takes from well under a microsecond (in-process) to milliseconds (Redis).
_BUCKETS = (1e-6, 5e-6, 2e-5, 1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.5, 1.0)


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:  # pragma: no cover - the extra is installed for the tests
        raise ImportError("nexus_limits.metrics needs prometheus-client: pip install 'nexus-limits[metrics]'") from None
    return prometheus_client


class Metrics:
    """Collects nexus-limits metrics into a prometheus-client registry.

    ``registry``: where to register (default: ``prometheus_client.REGISTRY``);
    ``namespace``: the metric name prefix. One ``Metrics`` per registry and namespace
    (a second one would register the same metric names, which prometheus-client
    refuses); share it between adapters and ``watch`` every limiter on it.
    """

    def __init__(self, registry: Any = None, namespace: str = "nexus_limits") -> None:
        prom = _prometheus()
        if not isinstance(namespace, str) or not _NAME.fullmatch(namespace):
            raise ValueError(f"namespace must be a metric name prefix such as 'nexus_limits', got {namespace!r}")
        self.namespace = namespace
        self.registry = registry if registry is not None else prom.REGISTRY
        self._watched: Dict[str, Any] = {}
        # The labelled series of each (limiter, tier, route), looked up once.
        self._children: Dict[Tuple[str, str, str], Tuple[Any, Any, Any, Any]] = {}
        self._lock = threading.Lock()
        labels = ("limiter", "tier", "route")
        self.requests = prom.Counter(
            "requests", "Requests checked by an adapter", (*labels, "decision"), namespace=namespace, registry=None
        )
        self.latency = prom.Histogram(
            "check_seconds", "Time a limit check took", labels, namespace=namespace, buckets=_BUCKETS, registry=None
        )
        self.registry.register(self.requests)
        self.registry.register(self.latency)
        self.registry.register(self)

    def watch(self, limiter: Any, name: str) -> Any:
        """Report ``limiter.stats()`` under ``limiter=name`` at every scrape; returns the
        limiter. A name is one limiter: watching another under it replaces the first."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        if not callable(getattr(limiter, "stats", None)):
            raise TypeError(f"limiter must have stats() (a nexus_limits limiter), got {type(limiter).__name__}")
        with self._lock:
            self._watched[name] = limiter
        return limiter

    def unwatch(self, name: str) -> None:
        with self._lock:
            self._watched.pop(name, None)

    def observe(self, limiter: str, tier: str, route: str, seconds: float, decision: Any) -> None:
        """Counts one request's check (adapters call this)."""
        labels = (limiter, tier, route)
        children = self._children.get(labels)
        if children is None:
            children = self._children[labels] = (
                self.requests.labels(*labels, "allowed"),
                self.requests.labels(*labels, "denied"),
                self.requests.labels(*labels, "shadow_denied"),
                self.latency.labels(*labels),
            )
        if decision.allowed:
            children[2 if decision.shadow else 0].inc()
        else:
            children[1].inc()
        children[3].observe(seconds)

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
        with self._lock:
            watched = list(self._watched.items())
        for name, limiter in watched:
            stats = limiter.stats()
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
        yield from (checks, near, keys, evicted, own, tokens, errors, fallback)

    def render(self) -> bytes:
        """The registry in Prometheus' text format (what a /metrics endpoint serves)."""
        return _prometheus().generate_latest(self.registry)  # type: ignore[no-any-return]


def _parts(stats: Dict[str, Any]) -> Iterable[Tuple[str, Dict[str, Any]]]:
    """("", stats) for a limiter; (part, its stats) for each part of a TokenLimiter."""
    nested = [(k, v) for k, v in stats.items() if isinstance(v, dict)]
    if not nested:
        return [("", stats)]
    out: List[Tuple[str, Dict[str, Any]]] = [(k, v) for k, v in nested]
    flat = {k: v for k, v in stats.items() if not isinstance(v, dict)}
    if "allowed" in flat:
        out.append(("", flat))
    return out
