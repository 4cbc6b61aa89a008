"""Flask per-view limits (``nexus_limits.adapters.flask``): under a real WSGI server
with httpx, and through Flask's test client."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from flask import Flask, Response, g, jsonify, request
from support.servers import WSGIServer

import nexus_limits as nl
from nexus_limits.adapters.flask import RateLimit, RateLimitRefused, install, rate_limit_exceeded_handler
from nexus_limits.adapters.wsgi import RateLimitMiddleware


def rate_headers(response) -> dict:
    names = ("ratelimit-policy", "ratelimit", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")
    return {k.lower(): v for k, v in response.headers.items() if k.lower() in (*names, "retry-after", "content-type")}


def test_same_answers_as_the_wsgi_middleware(clock):
    decorated = Flask("decorated")
    limit = RateLimit(limiter=nl.FixedWindow("2/minute", clock=clock), key="header:x-api-key", policy_name="default")

    @decorated.route("/search")
    @limit
    def search():
        return jsonify(ok=True)

    whole = Flask("whole")
    whole.route("/search")(lambda: jsonify(ok=True))
    whole.wsgi_app = RateLimitMiddleware(
        whole.wsgi_app, limiter=nl.FixedWindow("2/minute", clock=clock), key="header:x-api-key"
    )
    with WSGIServer(decorated) as dec, WSGIServer(whole) as mid:
        for _ in range(3):
            a = httpx.get(f"{dec.url}/search", headers={"x-api-key": "k"})
            b = httpx.get(f"{mid.url}/search", headers={"x-api-key": "k"})
            assert a.status_code == b.status_code
            assert rate_headers(a) == rate_headers(b)
            assert a.content == b.content
        assert a.status_code == 429 and a.headers["content-type"] == "application/problem+json"
        assert a.json()["detail"] == f"Too many requests; retry after {a.headers['retry-after']} s"
        a = httpx.get(f"{dec.url}/search")
        b = httpx.get(f"{mid.url}/search")
        assert a.status_code == b.status_code == 401 and a.content == b.content


def test_flask_limiter_habits(clock):
    app = Flask(__name__)
    shared = RateLimit("2/minute", key="ip")

    @app.route("/a")
    @shared
    def a():
        return "a"

    @app.route("/b")
    @shared
    def b():
        return "b"

    @app.route("/users/<name>")
    @RateLimit("1/minute", key=lambda: request.view_args["name"])
    def user(name):
        return name

    @app.route("/me")
    @RateLimit("1/minute", key=lambda req: req.headers.get("x-user"))
    def me():
        return "me"

    @app.route("/both")
    @RateLimit("3/minute;1/hour", key="ip")
    def both():
        return "both"

    with WSGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        assert [http.get(p).status_code for p in ("/a", "/b", "/a")] == [200, 200, 429], "one object, one limit"
        assert [http.get("/users/ann").status_code for _ in range(2)] == [200, 429]
        assert http.get("/users/bob").status_code == 200, "keyed by the view argument"
        assert [http.get("/me", headers={"x-user": "u"}).status_code for _ in range(2)] == [200, 429]
        assert http.get("/me").status_code == 401
        r = http.get("/both")
        assert r.headers["ratelimit-policy"] == '"3/minute";q=3;w=60, "1/hour";q=1;w=3600'
        assert http.get("/both").status_code == 429


def test_stacked_decorators_send_one_value_per_header(clock):
    app = Flask(__name__)

    @app.route("/x")
    @RateLimit(limiter=nl.FixedWindow("5/minute", clock=clock), key="ip")
    @RateLimit(limiter=nl.FixedWindow("2/minute", clock=clock), key="ip")
    def x():
        return "x"

    with WSGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        r = http.get("/x")
        assert r.headers.get_list("ratelimit-policy") == ['"5/minute";q=5;w=60, "2/minute";q=2;w=60']
        assert r.headers.get_list("ratelimit") == ['"5/minute";r=4;t=60, "2/minute";r=1;t=60']
        assert r.headers.get_list("x-ratelimit-remaining") == ["1"]
        http.get("/x")
        r = http.get("/x")
        assert r.status_code == 429
        assert r.headers.get_list("ratelimit") == ['"5/minute";r=2;t=60, "2/minute";r=0;t=60']
        assert r.headers.get_list("retry-after") == ["60"]


def test_hostile_keys():
    app = Flask(__name__)

    @app.route("/x")
    @RateLimit("2/minute", key="header:x-api-key")
    def x():
        return "x"

    with WSGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        huge = "k" * 16_000
        assert [http.get("/x", headers={"x-api-key": huge}).status_code for _ in range(3)] == [200, 200, 429]
        r = http.get("/x", headers=[("x-api-key", "a"), ("x-api-key", "b")])
        assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json"
        assert "x-api-key" in r.json()["detail"]
        assert http.get("/x", headers={"x-api-key": "\xe9\xff".encode("latin-1")}).status_code == 200
        assert http.get("/x", headers={"x-api-key": ""}).status_code == 401


def test_errorhandler_429_still_applies():
    app = Flask(__name__)

    @app.errorhandler(429)
    def too_many(error):
        assert isinstance(error, RateLimitRefused)
        return jsonify(error="slow down", retry_after=dict(error.headers)["Retry-After"]), 429

    @app.route("/x")
    @RateLimit("1/minute", key="ip")
    def x():
        return "x"

    client = app.test_client()
    assert client.get("/x").status_code == 200
    r = client.get("/x")
    assert r.status_code == 429 and r.json["error"] == "slow down" and int(r.json["retry_after"]) >= 1
    assert r.headers["Retry-After"] == r.json["retry_after"], "the headers on the app's own 429 too"
    assert r.headers.getlist("RateLimit") == ['"1/minute";r=0;t=' + r.json["retry_after"]]
    assert r.headers["Content-Type"] == "application/json"


def test_bad_request_from_a_key_function():
    app = Flask(__name__)

    def strict():
        key = request.headers.get("x-api-key", "")
        if not key.isalnum():
            raise nl.BadRequest("x-api-key must be letters and digits")
        return key

    @app.route("/x")
    @RateLimit("5/minute", key=strict)
    def x():
        return "x"

    client = app.test_client()
    r = client.get("/x", headers={"x-api-key": "a b"})
    assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json"
    assert r.json["detail"] == "x-api-key must be letters and digits"
    assert client.get("/x", headers={"x-api-key": "ab1"}).status_code == 200


def test_concurrency_lease_is_held_until_the_response_is_closed():
    app = Flask(__name__)
    slots = nl.Concurrency(1)
    go_on = threading.Event()

    @app.route("/stream")
    @RateLimit(limiter=slots, key="header:x-api-key")
    def stream():
        def body():
            yield "first\n"
            go_on.wait(10)
            yield "last\n"

        return Response(body())

    @app.route("/boom")
    @RateLimit(limiter=slots, key="header:x-api-key")
    def boom():
        raise RuntimeError("view failed")

    with WSGIServer(app) as server, httpx.Client(base_url=server.url, headers={"x-api-key": "k"}) as http:
        with http.stream("GET", "/stream") as first:
            lines = first.iter_lines()
            assert next(lines) == "first"
            assert http.get("/stream").status_code == 429, "held while the body streams"
            go_on.set()
            assert list(lines) == ["last"]
        deadline = time.monotonic() + 5
        while slots.get_limit("k") != (True, 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert slots.get_limit("k") == (True, 1)
        assert http.get("/boom").status_code == 500
        assert slots.get_limit("k") == (True, 1), "released when the view raised"


def test_async_views_and_cost(clock):
    app = Flask(__name__)
    tokens = nl.TokenBucket("10/minute", clock=clock)

    @app.route("/bulk", methods=["POST"])
    @RateLimit(limiter=tokens, key="ip", cost=lambda: int(request.args.get("n", "1")))
    async def bulk():
        return "ok"

    client = app.test_client()
    assert client.post("/bulk?n=7").headers["X-RateLimit-Remaining"] == "3"
    r = client.post("/bulk?n=4")
    assert r.status_code == 429 and r.headers["X-RateLimit-Remaining"] == "3"


def test_nl_limit_on_a_view_is_a_429_not_a_500(clock):
    @nl.limit(nl.TokenBucket("1/minute", clock=clock), key=lambda user: user)
    def profile_of(user, detail=False):
        return {"user": user}

    app = Flask(__name__)
    install(app)

    @app.route("/users/<user>")
    def profile(user):
        return profile_of(user=user)

    client = app.test_client()
    assert client.get("/users/ann").json == {"user": "ann"}
    r = client.get("/users/ann")
    assert r.status_code == 429 and r.headers["Content-Type"] == "application/problem+json"
    assert r.headers["RateLimit-Policy"] == '"profile_of";q=1;w=60' and r.headers["Retry-After"] == "60"
    assert r.json["policy"] == "profile_of"

    bare = Flask("bare")
    bare.route("/users/<user>")(profile)
    assert bare.test_client().get("/users/ann").status_code == 500, "what install() is for"
    by_hand = Flask("by_hand")
    by_hand.register_error_handler(nl.RateLimitExceeded, rate_limit_exceeded_handler)
    by_hand.route("/users/<user>")(profile)
    assert by_hand.test_client().get("/users/ann").status_code == 429


def test_the_flask_g_is_per_request():
    app = Flask(__name__)

    @app.route("/x")
    @RateLimit("100/minute", key="ip")
    def x():
        return str(len(g.get("_nexus_limits_headers", [])))

    client = app.test_client()
    assert [client.get("/x").text for _ in range(3)] == ["1", "1", "1"]


def test_construction_errors(async_redis_client):
    import nexus_limits.redis.asyncio as nla

    with pytest.raises(TypeError, match="either a rate"):
        RateLimit()
    with pytest.raises(ValueError):
        RateLimit("lots")
    with pytest.raises(TypeError, match="limiters must be nexus_limits limiters"):
        RateLimit(limiter="10/minute")
    with pytest.raises(TypeError, match="synchronous"):
        RateLimit(limiter=nla.FixedWindow(async_redis_client(), "1/s"))
