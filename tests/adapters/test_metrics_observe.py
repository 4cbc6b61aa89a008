"""``Metrics.observe`` updates prometheus-client's series directly (one request, one
call): what Prometheus scrapes must be exactly what prometheus-client's own
``Counter.inc`` and ``Histogram.observe`` would have written, for every decision and
every duration (bucket bounds, zero, negative, infinite, NaN)."""

from __future__ import annotations

import math
import threading
from types import SimpleNamespace
from typing import List, Tuple

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

import nexus_limits as nl
import nexus_limits.metrics as metrics_module
from nexus_limits.metrics import _BUCKETS, Metrics

ALLOWED = SimpleNamespace(allowed=True, shadow=False)
DENIED = SimpleNamespace(allowed=False, shadow=False)
SHADOW = SimpleNamespace(allowed=True, shadow=True)

SECONDS = [0.0, -0.0, -1.0, 1e-7, *_BUCKETS, *(b * 1.0000001 for b in _BUCKETS), 3.0, math.inf, -math.inf, math.nan]


def _text(registry: CollectorRegistry) -> List[str]:
    # _created carries the time each series was made: the only line that may differ.
    # Only the per-request families: Metrics' own collector adds the per-limiter ones.
    lines = generate_latest(registry).decode().splitlines()
    return [
        line
        for line in lines
        if "_created" not in line and ("nexus_limits_requests" in line or "nexus_limits_check_seconds" in line)
    ]


def _reference() -> Tuple[CollectorRegistry, Counter, Histogram]:
    registry = CollectorRegistry()
    labels = ("limiter", "tier", "route")
    requests = Counter(
        "requests", "Requests checked by an adapter", (*labels, "decision"), namespace="nexus_limits", registry=None
    )
    latency = Histogram(
        "check_seconds", "Time a limit check took", labels, namespace="nexus_limits", buckets=_BUCKETS, registry=None
    )
    registry.register(requests)
    registry.register(latency)
    return registry, requests, latency


def _observe(requests: Counter, latency: Histogram, labels: Tuple[str, str, str], seconds: float, name: str) -> None:
    # Metrics makes the three decisions' series of a label set at once (all scraped, at 0).
    for decision in ("allowed", "denied", "shadow_denied"):
        requests.labels(*labels, decision)
    requests.labels(*labels, name).inc()
    latency.labels(*labels).observe(seconds)


def test_the_scrape_is_what_prometheus_client_writes() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    ref_registry, requests, latency = _reference()
    for i, seconds in enumerate(SECONDS):
        for decision, name in ((ALLOWED, "allowed"), (DENIED, "denied"), (SHADOW, "shadow_denied")):
            route = f"/v1/route-{i % 3}"
            metrics.observe("api", "tier-a", route, seconds, decision)
            _observe(requests, latency, ("api", "tier-a", route), seconds, name)
    assert _text(registry) == _text(ref_registry)
    assert "nexus_limits_check_seconds_bucket" in "\n".join(_text(registry))


def test_a_watched_limiter_names_the_series() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    limiter = metrics.watch(nl.TokenBucket("5/minute"), "watched")
    decision = ALLOWED
    metrics.observe("policy", "t", "/r", 0.0002, decision, source=limiter)
    metrics.observe("policy", "t", "/r", 0.0002, decision)
    assert (
        registry.get_sample_value(
            "nexus_limits_requests_total", {"limiter": "watched", "tier": "t", "route": "/r", "decision": "allowed"}
        )
        == 1.0
    )
    assert (
        registry.get_sample_value(
            "nexus_limits_requests_total", {"limiter": "policy", "tier": "t", "route": "/r", "decision": "allowed"}
        )
        == 1.0
    )
    assert (
        registry.get_sample_value(
            "nexus_limits_check_seconds_bucket", {"limiter": "policy", "tier": "t", "route": "/r", "le": "0.0005"}
        )
        == 1.0
    )


def test_threads_lose_no_count() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    n, threads = 2000, 4

    def run() -> None:
        for i in range(n):
            metrics.observe("api", "t", f"/r{i % 2}", 0.001, ALLOWED if i % 3 else DENIED)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    total = 0.0
    for route in ("/r0", "/r1"):
        for decision in ("allowed", "denied"):
            total += (
                registry.get_sample_value(
                    "nexus_limits_requests_total", {"limiter": "api", "tier": "t", "route": route, "decision": decision}
                )
                or 0.0
            )
        assert (
            registry.get_sample_value(
                "nexus_limits_check_seconds_count", {"limiter": "api", "tier": "t", "route": route}
            )
            == n * threads / 2
        )
    assert total == n * threads


def test_many_label_sets_each_get_their_series() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    ref_registry, requests, latency = _reference()
    for i in range(200):
        metrics.observe("api", f"tier-{i % 7}", f"/r{i % 11}", i / 1000, DENIED if i % 5 == 0 else ALLOWED)
        labels = ("api", f"tier-{i % 7}", f"/r{i % 11}")
        _observe(requests, latency, labels, i / 1000, "denied" if i % 5 == 0 else "allowed")
    assert _text(registry) == _text(ref_registry)


def test_without_in_process_values_prometheus_clients_own_calls_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    # prometheus-client's multiprocess mode (or a shape this code does not know) keeps
    # its values elsewhere: observe then calls Counter.inc and Histogram.observe.
    monkeypatch.setattr(metrics_module, "_mutex_value", lambda: None)
    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    ref_registry, requests, latency = _reference()
    for i, seconds in enumerate(SECONDS):
        decision, name = ((ALLOWED, "allowed"), (DENIED, "denied"), (SHADOW, "shadow_denied"))[i % 3]
        metrics.observe("api", "t", "/r", seconds, decision)
        _observe(requests, latency, ("api", "t", "/r"), seconds, name)
    assert len(metrics._children[("api", "t", "/r")]) == 4
    assert _text(registry) == _text(ref_registry)


def test_the_series_stay_readable_and_writable_through_prometheus_client() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    metrics.observe("api", "t", "/r", 0.002, ALLOWED)
    assert len(metrics._children[("api", "t", "/r")]) == 5  # the shared-lock road
    # Their own calls still work on the series observe writes (and see its writes).
    metrics.requests.labels("api", "t", "/r", "allowed").inc(2)
    metrics.latency.labels("api", "t", "/r").observe(0.002)
    metrics.observe("api", "t", "/r", 0.002, ALLOWED)
    totals = {
        sample.labels["decision"]: sample.value
        for family in metrics.requests.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert totals == {"allowed": 4.0, "denied": 0.0, "shadow_denied": 0.0}
    assert (
        registry.get_sample_value(
            "nexus_limits_check_seconds_bucket", {"limiter": "api", "tier": "t", "route": "/r", "le": "0.0025"}
        )
        == 3.0
    )
    assert registry.get_sample_value(
        "nexus_limits_check_seconds_sum", {"limiter": "api", "tier": "t", "route": "/r"}
    ) == pytest.approx(0.006)
