"""Metrics: one name per limiter in both kinds of numbers, and one Metrics per registry."""

from __future__ import annotations

import gc

import httpx
import pytest
from fastapi import Depends, FastAPI
from flask import Flask
from prometheus_client import REGISTRY, CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families
from support.servers import ASGIServer

import nexus_limits as nl
from nexus_limits.adapters.fastapi import RateLimit as FastAPIRateLimit
from nexus_limits.adapters.flask import RateLimit as FlaskRateLimit
from nexus_limits.metrics import Metrics


def scrape(metrics: Metrics) -> dict:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def requests_by_limiter(metrics: Metrics) -> dict:
    out: dict = {}
    for (name, labels), value in scrape(metrics).items():
        if name == "nexus_limits_requests_total" and "limiter" in dict(labels):
            label = dict(labels)["limiter"]
            out[label] = out.get(label, 0) + value
    return out


def test_observe_labels_a_watched_limiter_with_its_watched_name(clock):
    metrics = Metrics(registry=CollectorRegistry())
    api = metrics.watch(nl.TokenBucket("10/minute", clock=clock), "api")
    other = nl.TokenBucket("10/minute", clock=clock)
    decision = api.hit("k")
    metrics.observe("default", "", "", 1e-6, decision, source=api)
    metrics.observe("default", "", "", 1e-6, decision, source=other)
    metrics.observe("default", "", "", 1e-6, decision)
    assert requests_by_limiter(metrics) == {"api": 1, "default": 2}
    assert metrics.label_of(api, "x") == "api" and metrics.label_of(other, "x") == "x"

    metrics.watch(api, "public-api")
    metrics.observe("default", "", "", 1e-6, decision, source=api)
    assert requests_by_limiter(metrics)["public-api"] == 1
    metrics.watch(other, "public-api")  # the name now means the other limiter
    assert metrics.label_of(other, "x") == "public-api" and metrics.label_of(api, "x") == "x"
    metrics.unwatch("public-api")
    assert metrics.label_of(other, "x") == "x"


def test_fastapi_and_flask_requests_carry_the_watched_name(clock):
    metrics = Metrics(registry=CollectorRegistry())
    api = metrics.watch(nl.FixedWindow("2/minute", clock=clock), "api")
    search = nl.FixedWindow("5/minute", clock=clock)
    app = FastAPI()

    @app.get("/api", dependencies=[Depends(FastAPIRateLimit(limiter=api, key="ip", metrics=metrics))])
    def api_route():
        return "a"

    @app.get("/search", dependencies=[Depends(FastAPIRateLimit(limiter=search, key="ip", metrics=metrics))])
    def search_route():
        return "s"

    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        assert [http.get("/api").status_code for _ in range(3)] == [200, 200, 429]
        http.get("/search")
    got = scrape(metrics)
    labels = (("limiter", "api"), ("route", ""), ("tier", ""))
    assert got[("nexus_limits_requests_total", (("decision", "allowed"), *labels))] == 2
    assert got[("nexus_limits_requests_total", (("decision", "denied"), *labels))] == 1
    assert got[("nexus_limits_checks_total", (("decision", "allowed"), ("limit", ""), ("limiter", "api")))] == 2
    assert requests_by_limiter(metrics)["5/minute"] == 1, "not watched: the policy name"

    flask_app = Flask(__name__)

    @flask_app.route("/f")
    @FlaskRateLimit(limiter=api, key="ip", metrics=metrics)
    def f():
        return "f"

    clock.advance(60)
    assert flask_app.test_client().get("/f").status_code == 200
    assert requests_by_limiter(metrics)["api"] == 4


def test_the_middleware_labels_a_watched_limiter_with_its_watched_name(clock):
    from nexus_limits.adapters.asgi import RateLimitMiddleware

    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    metrics = Metrics(registry=CollectorRegistry())
    api = metrics.watch(nl.TokenBucket("100/minute", clock=clock), "api")
    with ASGIServer(RateLimitMiddleware(ok, limiter=api, key="ip", metrics=metrics)) as server:
        assert httpx.get(server.url).status_code == 200
    assert requests_by_limiter(metrics) == {"api": 1}


def test_a_second_metrics_on_a_registry_is_the_first():
    registry = CollectorRegistry()
    first = Metrics(registry=registry)
    assert Metrics(registry=registry) is first
    assert Metrics(registry) is first
    other_namespace = Metrics(registry=registry, namespace="edge")
    assert other_namespace is not first and other_namespace.namespace == "edge"
    assert Metrics(registry=CollectorRegistry()) is not first
    # The default registry too: no "Duplicated timeseries" on a second Metrics().
    assert Metrics() is Metrics()
    assert Metrics(registry=REGISTRY) is Metrics()
    names = [family.name for family in text_string_to_metric_families(first.render().decode())]
    assert names.count("nexus_limits_requests") == 1


def test_the_instances_do_not_keep_a_registry_alive():
    registry = CollectorRegistry()
    Metrics(registry=registry)
    import weakref

    ref = weakref.ref(registry)
    del registry
    gc.collect()
    assert ref() is None


def test_names_taken_by_another_collector_are_a_clear_error():
    registry = CollectorRegistry()
    Counter("nexus_limits_requests", "someone else's", registry=registry)
    with pytest.raises(ValueError, match=r"already registered on this registry by other collectors.*namespace="):
        Metrics(registry=registry)
    # Nothing half-registered: the other namespace still works on that registry.
    edge = Metrics(registry=registry, namespace="edge")
    edge.observe("x", "", "", 1e-6, nl.TokenBucket("1/s").hit("k"))
    assert requests_by_limiter(edge) == {}  # "edge_requests_total", not ours
    assert ("edge_requests_total", (("decision", "allowed"), ("limiter", "x"), ("route", ""), ("tier", ""))) in scrape(
        edge
    )


def test_bad_arguments():
    with pytest.raises(TypeError, match="CollectorRegistry"):
        Metrics(registry="default")
    with pytest.raises(ValueError, match="namespace"):
        Metrics(registry=CollectorRegistry(), namespace="")
    with pytest.raises(ValueError, match="namespace"):
        Metrics(registry=CollectorRegistry(), namespace=None)


def test_priority_classes_and_hierarchy_levels_are_scraped(clock):
    metrics = Metrics(registry=CollectorRegistry())
    p = metrics.watch(nl.Priority(nl.TokenBucket("10/minute", clock=clock), {"interactive": 1.0, "batch": 0.7}), "p")
    for _ in range(8):
        p.hit("upstream", cls="batch")
    p.hit("upstream", cls="interactive")
    h = metrics.watch(
        nl.Hierarchy(levels=[("team", "3/minute"), ("key", {"requests": "10/minute"})], classes={"a": 1.0, "b": 0.5}),
        "h",
    )
    for _ in range(4):
        h.hit(("search", "sk-1"), cls="a")
    got = scrape(metrics)

    def sample(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    assert sample("nexus_limits_class_checks_total", limiter="p", **{"class": "batch", "decision": "allowed"}) == 7
    assert sample("nexus_limits_class_checks_total", limiter="p", **{"class": "batch", "decision": "denied"}) == 1
    assert (
        sample("nexus_limits_class_checks_total", limiter="p", **{"class": "interactive", "decision": "allowed"}) == 1
    )
    assert sample("nexus_limits_class_checks_total", limiter="h", **{"class": "a", "decision": "denied"}) == 1
    assert sample("nexus_limits_refused_by_level_total", limiter="h", level="team") == 1
    assert sample("nexus_limits_refused_by_level_total", limiter="h", level="key") == 0
    # Each quota of each level under limit="level.quota".
    assert sample("nexus_limits_checks_total", limiter="h", limit="team.requests", decision="allowed") == 3
    # (each quota counts its own answer: the key's admitted the 4th call the team refused)
    assert sample("nexus_limits_checks_total", limiter="h", limit="key.requests", decision="allowed") == 4
    assert sample("nexus_limits_checks_total", limiter="p", limit="", decision="allowed") == 8
