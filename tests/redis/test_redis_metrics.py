"""The Redis limiters' circuit breaker and on_error answers in the Prometheus metrics:
``breaker_open`` follows the breaker (1 while open, 0 once closed again),
``breaker_trips_total`` counts its openings, and ``fallback_total`` counts each
on_error answer, the in-process share of on_error="local" included."""

from __future__ import annotations

import time

import pytest
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from support.servers import RedisServer

import nexus_limits as nl
import nexus_limits.redis as nlr
from nexus_limits.metrics import Metrics


@pytest.fixture
def server():
    s = RedisServer().start()
    yield s
    s.close()


def scrape(metrics: Metrics) -> dict:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(got: dict, name: str, **labels: str) -> float:
    return got[(name, tuple(sorted(labels.items())))]


def test_breaker_and_fallbacks_in_the_metrics(server):
    client = redis.Redis(port=server.port, socket_timeout=0.3, socket_connect_timeout=0.3)
    metrics = Metrics(registry=CollectorRegistry())
    try:
        local = metrics.watch(nlr.TokenBucket(client, "4/minute", on_error="local", replicas=2, prefix="m"), "local")
        deny = metrics.watch(nlr.FixedWindow(client, "10/minute", on_error="deny", prefix="m"), "deny")
        budget = metrics.watch(nlr.TokenLimiter(client, tokens="1000/minute", on_error="allow", prefix="m"), "llm")
        inproc = metrics.watch(nl.TokenBucket("1/s"), "inproc")
        assert local.hit("k").allowed and deny.hit("k").allowed
        got = scrape(metrics)
        for name in ("local", "deny", "llm"):
            assert value(got, "nexus_limits_breaker_open", limiter=name) == 0
            assert value(got, "nexus_limits_breaker_trips_total", limiter=name) == 0
        assert not any(labels == (("limiter", "inproc"),) for n, labels in got if "breaker" in n), (
            "an in-process limiter has no breaker"
        )
        inproc.hit("k")

        server.stop()
        answers = [local.hit("k") for _ in range(3)]
        assert [d.allowed for d in answers] == [True, True, False] and all(d.fallback for d in answers)
        assert not deny.hit("k").allowed
        assert budget.reserve("k", 10).allowed
        got = scrape(metrics)
        for name in ("local", "deny", "llm"):
            assert value(got, "nexus_limits_breaker_open", limiter=name) == 1, name
            assert value(got, "nexus_limits_breaker_trips_total", limiter=name) == 1, name
        assert value(got, "nexus_limits_fallback_total", limiter="local", answer="local") == 3
        assert value(got, "nexus_limits_fallback_total", limiter="local", answer="allow") == 0
        assert value(got, "nexus_limits_fallback_total", limiter="deny", answer="deny") == 1
        assert value(got, "nexus_limits_fallback_total", limiter="deny", answer="local") == 0
        assert value(got, "nexus_limits_fallback_total", limiter="llm", answer="allow") == 1
        assert value(got, "nexus_limits_backend_errors_total", limiter="local") == 3

        server.start()
        deadline = time.monotonic() + 5
        while deny.hit("k").fallback:
            assert time.monotonic() < deadline, "the breaker closes on the first probe that gets an answer"
            time.sleep(0.05)
        got = scrape(metrics)
        assert value(got, "nexus_limits_breaker_open", limiter="local") == 0
        assert value(got, "nexus_limits_breaker_trips_total", limiter="local") == 1
    finally:
        client.close()
