"""Two limits on one app (an IP limit around a key limit, or the app's own headers)
send one value per rate-limit header: the IETF lists merged, the legacy triple and
Retry-After the most restrictive. Checked with httpx's ``get_list`` against
Starlette under uvicorn, Flask under wsgiref, and Django."""

from __future__ import annotations

import email.utils
import re
import time

import httpx
import pytest
from support.servers import ASGIServer, WSGIServer

import nexus_limits as nl
from nexus_limits.adapters.asgi import RateLimitMiddleware as ASGILimit
from nexus_limits.adapters.headers import merge_rate_limit_headers
from nexus_limits.adapters.wsgi import RateLimitMiddleware as WSGILimit

NAMES = ("ratelimit", "ratelimit-policy", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")


def sf(value: str) -> dict:
    """``"a";q=1;w=2, "b";r=3`` -> {"a": {"q": 1, "w": 2}, "b": {"r": 3}}"""
    out = {}
    for name, params in re.findall(r'"((?:[^"\\]|\\.)*)"((?:;[a-z]+=\d+)*)', value):
        out[name] = {k: int(v) for k, v in re.findall(r";([a-z]+)=(\d+)", params)}
    return out


def one_of_each(response: httpx.Response) -> None:
    for name in (*NAMES, "retry-after"):
        assert len(response.headers.get_list(name)) <= 1, (name, response.headers.get_list(name))
    for name in NAMES:
        assert len(response.headers.get_list(name)) == 1, name


def starlette_app(extra_headers=None):
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def home(request):
        return PlainTextResponse("ok", headers=extra_headers or {})

    return Starlette(routes=[Route("/", home)])


def test_two_stacked_asgi_middlewares_send_one_value_per_header():
    app = starlette_app()
    # Added first: the inner one (per key); added last: the outer one (per address).
    app.add_middleware(ASGILimit, limiter=nl.FixedWindow("3/minute"), key="header:x-api-key", policy_name="key")
    app.add_middleware(ASGILimit, limiter=nl.FixedWindow("5/minute"), key="ip", policy_name="ip")
    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        responses = [http.get("/", headers={"x-api-key": "k"}) for _ in range(6)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429, 429, 429]
    for r in responses:
        one_of_each(r)
    first = responses[0]
    assert sf(first.headers["ratelimit-policy"]) == {"key": {"q": 3, "w": 60}, "ip": {"q": 5, "w": 60}}
    state = sf(first.headers["ratelimit"])
    assert state["key"]["r"] == 2 and state["ip"]["r"] == 4
    assert (first.headers["x-ratelimit-limit"], first.headers["x-ratelimit-remaining"]) == ("3", "2")
    # The inner limit refused: both policies listed, one Retry-After (the inner's).
    inner = responses[3]
    assert inner.headers["content-type"] == "application/problem+json" and inner.json()["policy"] == "key"
    assert sf(inner.headers["ratelimit"])["key"]["r"] == 0 and sf(inner.headers["ratelimit"])["ip"]["r"] == 1
    assert inner.headers["x-ratelimit-remaining"] == "0" and inner.headers["x-ratelimit-limit"] == "3"
    assert len(inner.headers.get_list("retry-after")) == 1
    # The outer limit refused: the inner never ran.
    outer = responses[5]
    assert outer.json()["policy"] == "ip" and list(sf(outer.headers["ratelimit"])) == ["ip"]


def test_same_policy_names_are_told_apart():
    app = starlette_app()
    app.add_middleware(ASGILimit, limiter=nl.FixedWindow("3/minute"), key="header:x-api-key")
    app.add_middleware(ASGILimit, limiter=nl.FixedWindow("5/minute"), key="ip")
    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        r = http.get("/", headers={"x-api-key": "k"})
    one_of_each(r)
    assert sf(r.headers["ratelimit-policy"]) == {"default": {"q": 3, "w": 60}, "default#2": {"q": 5, "w": 60}}
    assert list(sf(r.headers["ratelimit"])) == ["default", "default#2"]


def test_the_apps_own_headers_are_merged():
    later = email.utils.formatdate(time.time() + 3600, usegmt=True)
    own = {"Retry-After": later, "X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "99"}
    app = starlette_app(own)
    app.add_middleware(ASGILimit, limiter=nl.FixedWindow("5/minute"), key="ip")
    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        r = http.get("/")
    one_of_each(r)
    assert (r.headers["x-ratelimit-limit"], r.headers["x-ratelimit-remaining"]) == ("10", "0"), "the app's is tighter"
    assert 3500 <= int(r.headers["retry-after"]) <= 3600, "an HTTP date becomes seconds; the longest wait wins"


def test_mixed_case_and_repeated_headers_from_a_raw_asgi_app():
    async def app(scope, receive, send):
        headers = [
            (b"RateLimit-Policy", b'"upstream";q=9'),
            (b"ratelimit-policy", b'"other";q=8'),
            (b"RateLimit", b'"upstream";r=1, "other";r=8'),
            (b"Retry-After", b"7"),
            (b"retry-after", b"2"),
            (b"content-type", b"text/plain"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    wrapped = ASGILimit(app, limiter=nl.FixedWindow("5/minute"), key="ip")
    with ASGIServer(wrapped) as server, httpx.Client(base_url=server.url) as http:
        r = http.get("/")
    one_of_each(r)
    assert list(sf(r.headers["ratelimit-policy"])) == ["upstream", "other", "default"]
    assert r.headers["retry-after"] == "7" and r.text == "ok" and r.headers["content-type"] == "text/plain"


def test_two_stacked_wsgi_middlewares_under_a_real_server():
    from flask import Flask

    app = Flask(__name__)

    @app.get("/")
    def home():
        return "ok"

    app.wsgi_app = WSGILimit(app.wsgi_app, limiter=nl.FixedWindow("2/minute"), key="bearer", policy_name="key")
    app.wsgi_app = WSGILimit(app.wsgi_app, limiter=nl.FixedWindow("5/minute"), key="ip", policy_name="ip")
    with WSGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        responses = [http.get("/", headers={"authorization": "Bearer t"}) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    for r in responses:
        one_of_each(r)
    assert list(sf(responses[0].headers["ratelimit-policy"])) == ["key", "ip"]
    assert responses[1].headers["x-ratelimit-remaining"] == "0"
    assert len(responses[2].headers.get_list("retry-after")) == 1


def test_django_middleware_and_view_decorator_together():
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(DEBUG=False, SECRET_KEY="tests", ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__)
        django.setup()
    from django.test import Client, override_settings

    options = {"limiter": nl.FixedWindow("5/minute"), "key": "ip", "policy_name": "ip"}
    with override_settings(
        ROOT_URLCONF=__name__, MIDDLEWARE=["nexus_limits.adapters.django.RateLimitMiddleware"], NEXUS_LIMITS=options
    ):
        client = Client()
        responses = [client.get("/view", HTTP_X_API_KEY="k") for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    first = responses[0]
    assert list(sf(first["RateLimit-Policy"])) == ["view", "ip"]
    assert first["X-RateLimit-Remaining"] == "1" and first["X-RateLimit-Limit"] == "2"
    assert int(responses[2]["Retry-After"]) >= 1


def _view(request):
    from django.http import HttpResponse

    return HttpResponse("ok")


def _urlpatterns():
    from django.urls import path

    from nexus_limits.adapters.django import ratelimit

    limited = ratelimit(nl.FixedWindow("2/minute"), key="header:x-api-key", policy_name="view")(_view)
    return [path("view", limited)]


urlpatterns = _urlpatterns()


def test_merge_function():
    inner = [("RateLimit-Policy", '"a,b";q=3;w=60'), ("RateLimit", '"a,b";r=2;t=20')]
    ours = [("RateLimit-Policy", '"a,b";q=9;w=60, "x\\"y";q=1'), ("RateLimit", '"a,b";r=8;t=1, "x\\"y";r=0')]
    out = dict(merge_rate_limit_headers(inner, ours))
    assert out["RateLimit-Policy"] == '"a,b";q=3;w=60, "a,b#2";q=9;w=60, "x\\"y";q=1'
    assert out["RateLimit"] == '"a,b";r=2;t=20, "a,b#2";r=8;t=1, "x\\"y";r=0'
    taken = [("RateLimit", '"default";r=1, "default#2";r=1')]
    assert dict(merge_rate_limit_headers(taken, [("RateLimit", '"default";r=5')]))["RateLimit"].endswith(
        '"default#3";r=5'
    )
    # Legacy triple: fewest remaining, then the longest reset; unreadable values lose.
    ties = [("X-RateLimit-Limit", "9"), ("X-RateLimit-Remaining", "1"), ("X-RateLimit-Reset", "5")]
    ours = [("X-RateLimit-Limit", "3"), ("X-RateLimit-Remaining", "1"), ("X-RateLimit-Reset", "50")]
    assert dict(merge_rate_limit_headers(ties, ours))["X-RateLimit-Limit"] == "3"
    junk = [("x-ratelimit-limit", "lots"), ("x-ratelimit-remaining", "1e9"), ("x-ratelimit-reset", "")]
    assert dict(merge_rate_limit_headers(junk, ours))["X-RateLimit-Limit"] == "3"
    kept = {"X-RateLimit-Limit": "lots", "X-RateLimit-Remaining": "1e9", "X-RateLimit-Reset": ""}
    assert dict(merge_rate_limit_headers(junk, [])) == kept
    # Retry-After: the longest wait; a date in the past is 0; garbage is kept only alone.
    past = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert merge_rate_limit_headers([("Retry-After", past)], [("Retry-After", "3")]) == [("Retry-After", "3")]
    assert merge_rate_limit_headers([("Retry-After", "soon")], [("Retry-After", "3")]) == [("Retry-After", "3")]
    assert merge_rate_limit_headers([("Retry-After", "soon")], []) == [("Retry-After", "soon")]
    assert merge_rate_limit_headers([("Retry-After", "-5")], [("Retry-After", "3")]) == [("Retry-After", "3")]
    assert merge_rate_limit_headers([], []) == []


@pytest.mark.parametrize("value", ['"unterminated;q=1', ",,,", '"a";q=1,,"b";q=2', "token;q=1", '"\\', "", " , "])
def test_merge_survives_hostile_lists(value):
    out = merge_rate_limit_headers([("RateLimit-Policy", value)], [("RateLimit-Policy", '"default";q=1')])
    assert [name for name, _ in out] == ["RateLimit-Policy"]
