"""FastAPI per-route limits (``nexus_limits.adapters.fastapi``) under real uvicorn, with
httpx: the dependency, its 429 (the middleware's, to the byte), headers on every kind
of response, leases, key callables, and the handler for ``@nl.limit``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.applications import Starlette
from starlette.routing import Route
from support.servers import ASGIServer

import nexus_limits as nl
from nexus_limits.adapters.asgi import RateLimitMiddleware
from nexus_limits.adapters.fastapi import RateLimit, RateLimitRefused, install, rate_limit_exceeded_handler

RATE_HEADERS = ("ratelimit-policy", "ratelimit", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")


def rate_headers(response: httpx.Response) -> dict:
    return {k: v for k, v in response.headers.items() if k in (*RATE_HEADERS, "retry-after", "content-type")}


def test_same_answers_as_the_middleware(clock):
    """The dependency's 200s and 429s carry the middleware's headers, and (with install)
    its problem+json body, byte for byte, for the same limit at the same instant."""
    via_dependency = FastAPI()
    install(via_dependency)
    limit = RateLimit(limiter=nl.FixedWindow("2/minute", clock=clock), key="header:x-api-key", policy_name="default")

    @via_dependency.get("/search", dependencies=[Depends(limit)])
    def search():
        return {"ok": True}

    async def plain(request):
        return JSONResponse({"ok": True})

    via_middleware = Starlette(routes=[Route("/search", plain)])
    via_middleware.add_middleware(
        RateLimitMiddleware, limiter=nl.FixedWindow("2/minute", clock=clock), key="header:x-api-key"
    )
    with ASGIServer(via_dependency) as dep, ASGIServer(via_middleware) as mid:
        for _ in range(3):
            a = httpx.get(f"{dep.url}/search", headers={"x-api-key": "k"})
            b = httpx.get(f"{mid.url}/search", headers={"x-api-key": "k"})
            assert a.status_code == b.status_code
            assert rate_headers(a) == rate_headers(b)
            assert a.content == b.content
        assert a.status_code == 429 and a.headers["content-type"] == "application/problem+json"
        assert a.json() == {
            "type": "about:blank",
            "title": "Too Many Requests",
            "status": 429,
            "detail": f"Too many requests; retry after {a.headers['retry-after']} s",
            "policy": "default",
        }
        clock.advance(60)
        assert httpx.get(f"{dep.url}/search", headers={"x-api-key": "k"}).status_code == 200
        for bad in ({}, {"x-api-key": ""}):
            a = httpx.get(f"{dep.url}/search", headers=bad)
            b = httpx.get(f"{mid.url}/search", headers=bad)
            assert a.status_code == b.status_code == 401 and a.content == b.content


def test_without_install_fastapi_still_answers_429_with_the_headers(clock):
    app = FastAPI()

    @app.get("/x", dependencies=[Depends(RateLimit(limiter=nl.FixedWindow("1/minute", clock=clock), key="ip"))])
    def x():
        return "x"

    with ASGIServer(app) as server:
        assert httpx.get(f"{server.url}/x").status_code == 200
        r = httpx.get(f"{server.url}/x")
    assert r.status_code == 429
    assert r.json() == {"detail": f"Too many requests; retry after {r.headers['retry-after']} s"}
    assert r.headers["ratelimit-policy"] == '"1/minute";q=1;w=60' and r.headers["x-ratelimit-remaining"] == "0"
    assert issubclass(RateLimitRefused, __import__("starlette.exceptions").exceptions.HTTPException)


def test_rate_strings_per_route_and_shared_objects():
    app = FastAPI()
    install(app)
    shared = RateLimit("2/minute", key="header:x-api-key")

    @app.get("/a", dependencies=[Depends(shared)])
    def a():
        return "a"

    @app.get("/b", dependencies=[Depends(shared)])
    def b():
        return "b"

    @app.get("/search", dependencies=[Depends(RateLimit("1/minute", key="header:x-api-key"))])
    def search():
        return "s"

    @app.get("/both", dependencies=[Depends(RateLimit("3/minute;2/hour", key="header:x-api-key"))])
    def both():
        return "both"

    with ASGIServer(app) as server, httpx.Client(base_url=server.url, headers={"x-api-key": "k"}) as http:
        assert [http.get(p).status_code for p in ("/a", "/b", "/a")] == [200, 200, 429], "one object, one limit"
        assert [http.get("/search").status_code for _ in range(2)] == [200, 429], "its own limit"
        r = http.get("/both")
        assert r.headers["ratelimit-policy"] == '"3/minute";q=3;w=60, "2/hour";q=2;w=3600'
        assert r.headers["x-ratelimit-limit"] == "2" and r.headers["x-ratelimit-remaining"] == "1"
        statuses = [http.get("/both").status_code for _ in range(2)]
        assert statuses == [200, 429]
        assert http.get("/both").json()["policy"] == "3/minute;2/hour"


def test_the_key_callable_gets_the_request(clock):
    app = FastAPI()
    install(app)
    seen = []

    async def authenticate(request: Request):
        request.state.user = request.headers.get("x-user")

    def by_user(request: Request):
        seen.append(type(request).__name__)
        return request.state.user

    async def by_path(request: Request):
        await asyncio.sleep(0)
        return request.path_params["org"]

    @app.get(
        "/me",
        dependencies=[
            Depends(authenticate),
            Depends(RateLimit(limiter=nl.FixedWindow("1/minute", clock=clock), key=by_user)),
        ],
    )
    def me():
        return "me"

    @app.get(
        "/orgs/{org}", dependencies=[Depends(RateLimit(limiter=nl.FixedWindow("1/minute", clock=clock), key=by_path))]
    )
    def org(org: str):
        return org

    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        assert [http.get("/me", headers={"x-user": "ann"}).status_code for _ in range(2)] == [200, 429]
        assert http.get("/me", headers={"x-user": "bob"}).status_code == 200
        assert http.get("/me").status_code == 401, "no user: the key is None"
        assert [http.get("/orgs/acme").status_code for _ in range(2)] == [200, 429]
        assert http.get("/orgs/globex").status_code == 200
    assert set(seen) == {"Request"}


def test_cost_callable_and_missing_key_anonymous(clock):
    app = FastAPI()
    install(app)
    tokens = nl.TokenBucket("10/minute", clock=clock)

    @app.post(
        "/bulk",
        dependencies=[
            Depends(RateLimit(limiter=tokens, key="ip", cost=lambda r: int(r.query_params.get("n", "1")))),
        ],
    )
    def bulk():
        return "ok"

    @app.get("/anon", dependencies=[Depends(RateLimit("1/minute", key="header:x-api-key", missing_key="anonymous"))])
    def anon():
        return "ok"

    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        assert http.post("/bulk?n=7").headers["x-ratelimit-remaining"] == "3"
        r = http.post("/bulk?n=4")
        assert r.status_code == 429 and r.headers["x-ratelimit-remaining"] == "3"
        assert [http.get("/anon").status_code for _ in range(2)] == [200, 429], "keyless clients share one limit"


def test_a_key_function_refusing_the_request_is_a_400():
    app = FastAPI()
    install(app)

    def strict(request: Request):
        key = request.headers.get("x-api-key", "")
        if not key.isalnum():
            raise nl.BadRequest("x-api-key must be letters and digits")
        return key

    @app.get("/x", dependencies=[Depends(RateLimit("5/minute", key=strict))])
    def x():
        return "x"

    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        r = http.get("/x", headers={"x-api-key": "a b"})
        assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json"
        assert r.json()["detail"] == "x-api-key must be letters and digits"
        assert http.get("/x", headers={"x-api-key": "ab1"}).status_code == 200


def test_hostile_keys_do_not_break_it():
    app = FastAPI()
    install(app)

    @app.get("/x", dependencies=[Depends(RateLimit("2/minute", key="header:x-api-key"))])
    def x():
        return "x"

    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        huge = "k" * 16_000
        assert [http.get("/x", headers={"x-api-key": huge}).status_code for _ in range(3)] == [200, 200, 429]
        latin = "\xe9\xff".encode("latin-1")
        assert http.get("/x", headers={"x-api-key": latin}).status_code == 200
        r = http.get("/x", headers=[("x-api-key", "a"), ("x-api-key", "b")])
        assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json"
        assert "x-api-key" in r.json()["detail"]
        assert http.get("/x", headers=[("x-api-key", "c"), ("x-api-key", "c")]).status_code == 200


def test_a_list_of_key_sources():
    app = FastAPI()
    install(app)

    @app.get("/x", dependencies=[Depends(RateLimit("1/minute", key=["bearer", "header:x-api-key"]))])
    def x():
        return "x"

    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        assert http.get("/x", headers={"authorization": "Bearer k1"}).status_code == 200
        assert http.get("/x", headers={"x-api-key": "k1"}).status_code == 429, "the same client either way"
        r = http.get("/x", headers={"authorization": "Bearer k2", "x-api-key": "k3"})
        assert r.status_code == 400, "two different keys in one request"


def test_headers_on_responses_the_endpoint_builds_itself(clock):
    def app_with(installed: bool) -> FastAPI:
        app = FastAPI()
        if installed:
            install(app)
        limit = Depends(RateLimit(limiter=nl.FixedWindow("5/minute", clock=clock), key="ip"))

        @app.get("/json", dependencies=[limit])
        def as_json():
            return JSONResponse({"built": "here"}, headers={"x-own": "1"})

        @app.get("/text", dependencies=[limit])
        def as_text():
            return PlainTextResponse("t")

        @app.get("/value", dependencies=[limit])
        def as_value():
            return {"v": 1}

        return app

    with ASGIServer(app_with(True)) as server, httpx.Client(base_url=server.url) as http:
        for path in ("/json", "/text", "/value"):
            r = http.get(path)
            assert r.status_code == 200 and "ratelimit" in r.headers, path
            assert len(r.headers.get_list("ratelimit")) == 1, "one value, never twice"
        assert http.get("/json").headers["x-own"] == "1"
    with ASGIServer(app_with(False)) as server, httpx.Client(base_url=server.url) as http:
        assert "ratelimit" in http.get("/value").headers
        # The documented limitation without install(): FastAPI drops the headers of the
        # injected Response when the endpoint returns a Response of its own.
        assert "ratelimit" not in http.get("/json").headers


def test_stacked_dependencies_send_one_value_per_header(clock):
    app = FastAPI()
    install(app)
    router = APIRouter(dependencies=[Depends(RateLimit(limiter=nl.FixedWindow("5/minute", clock=clock), key="ip"))])

    @router.get("/x", dependencies=[Depends(RateLimit(limiter=nl.FixedWindow("2/minute", clock=clock), key="ip"))])
    def x():
        return "x"

    app.include_router(router)
    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        r = http.get("/x")
        assert r.headers.get_list("ratelimit-policy") == ['"5/minute";q=5;w=60, "2/minute";q=2;w=60']
        assert r.headers.get_list("ratelimit") == ['"5/minute";r=4;t=60, "2/minute";r=1;t=60']
        assert r.headers.get_list("x-ratelimit-remaining") == ["1"], "the most restrictive"
        assert r.headers["x-ratelimit-limit"] == "2"
        http.get("/x")
        r = http.get("/x")
        assert r.status_code == 429
        # Stacked dependencies are checked one after another: the router's limit was
        # charged before the route's refused (one RateLimit("5/minute;2/minute") is
        # all or nothing).
        assert r.headers.get_list("ratelimit") == ['"5/minute";r=2;t=60, "2/minute";r=0;t=60']
        assert r.headers.get_list("retry-after") == ["60"]


def test_concurrency_lease_is_held_until_the_stream_is_sent():
    app = FastAPI()
    install(app)
    slots = nl.Concurrency(1)
    go_on = threading.Event()

    @app.get("/stream", dependencies=[Depends(RateLimit(limiter=slots, key="header:x-api-key"))])
    def stream():
        def body():
            yield b"first\n"
            go_on.wait(10)
            yield b"last\n"

        return StreamingResponse(body())

    @app.get("/boom", dependencies=[Depends(RateLimit(limiter=slots, key="header:x-api-key"))])
    def boom():
        raise RuntimeError("endpoint failed")

    with ASGIServer(app) as server, httpx.Client(base_url=server.url, headers={"x-api-key": "k"}) as http:
        with http.stream("GET", "/stream") as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            assert next(lines) == "first"
            second = http.get("/stream")
            assert second.status_code == 429, "the lease is held while the body streams"
            assert second.headers["ratelimit-policy"] == '"default";q=1'
            go_on.set()
            assert list(lines) == ["last"]
        deadline = time.monotonic() + 5
        while slots.get_limit("k") != (True, 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert slots.get_limit("k") == (True, 1), "released once the response was sent"
        assert http.get("/boom").status_code == 500
        assert slots.get_limit("k") == (True, 1), "released when the endpoint raised"


def test_sync_and_asyncio_redis_limiters(redis_client, async_redis_client):
    import nexus_limits.redis as nlr
    import nexus_limits.redis.asyncio as nla

    async_client = async_redis_client()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await async_client.aclose()  # on uvicorn's loop, where its connections live

    app = FastAPI(lifespan=lifespan)
    install(app)
    sync_limit = RateLimit(limiter=nlr.FixedWindow(redis_client, "2/minute", prefix="fa-sync"), key="header:x-api-key")
    async_limit = RateLimit(limiter=nla.SlidingWindow(async_client, "2/minute", prefix="fa-async"), key="bearer")

    @app.get("/sync", dependencies=[Depends(sync_limit)])
    async def sync_route():
        return "s"

    @app.get("/async", dependencies=[Depends(async_limit)])
    async def async_route():
        return "a"

    with ASGIServer(app, lifespan="on") as server, httpx.Client(base_url=server.url) as http:
        assert [http.get("/sync", headers={"x-api-key": "k"}).status_code for _ in range(3)] == [200, 200, 429]
        bearer = {"authorization": "Bearer t0k"}
        assert [http.get("/async", headers=bearer).status_code for _ in range(3)] == [200, 200, 429]
    assert redis_client.exists(sync_limit.limiter.redis_key("k"))


def test_nl_limit_on_a_route_is_a_429_not_a_500(clock):
    @nl.limit(nl.TokenBucket("1/minute", clock=clock), key=lambda user: user)
    def profile_of(user: str, detail: bool = False) -> dict:
        return {"user": user, "detail": detail}

    app = FastAPI()
    install(app)

    @app.get("/users/{user}")
    def profile(user: str):
        return profile_of(user=user)

    async def starlette_profile(request):
        return JSONResponse(profile_of(request.path_params["user"]))

    plain = Starlette(routes=[Route("/users/{user}", starlette_profile)])
    plain.add_exception_handler(nl.RateLimitExceeded, rate_limit_exceeded_handler)
    with ASGIServer(app) as server:
        assert httpx.get(f"{server.url}/users/ann").json() == {"user": "ann", "detail": False}
        r = httpx.get(f"{server.url}/users/ann")
    assert r.status_code == 429 and r.headers["content-type"] == "application/problem+json"
    assert r.headers["ratelimit-policy"] == '"profile_of";q=1;w=60'
    assert r.headers["retry-after"] == "60" and r.json()["policy"] == "profile_of"
    with ASGIServer(plain) as server:
        assert httpx.get(f"{server.url}/users/bob").status_code == 200
        r = httpx.get(f"{server.url}/users/bob")
        assert r.status_code == 429 and json.loads(r.content)["status"] == 429
    without = FastAPI()
    without.get("/users/{user}")(profile)
    with ASGIServer(without) as server:
        assert httpx.get(f"{server.url}/users/ann").status_code == 500, "what install() is for"


def test_the_decision_as_a_parameter(clock):
    app = FastAPI()
    limit = RateLimit(limiter=nl.TokenBucket("10/minute", clock=clock), key="ip")

    @app.get("/left")
    def left(decision: nl.Decision = Depends(limit)):  # noqa: B008 - how FastAPI spells it
        return {"remaining": decision.remaining}

    with ASGIServer(app) as server:
        assert httpx.get(f"{server.url}/left").json() == {"remaining": 9}


def test_construction_errors():
    with pytest.raises(TypeError, match="either a rate"):
        RateLimit()
    with pytest.raises(TypeError, match="either a rate"):
        RateLimit("1/s", limiter=nl.TokenBucket("1/s"))
    with pytest.raises(ValueError):
        RateLimit("ten per minute")
    with pytest.raises(ValueError, match="separated by ';'"):
        RateLimit("10/minute;")
    with pytest.raises(TypeError, match="rate must be a str"):
        RateLimit(10)
    with pytest.raises(TypeError, match="limiters must be nexus_limits limiters"):
        RateLimit(limiter=object())
    with pytest.raises(TypeError, match="metrics must be"):
        RateLimit("1/s", metrics=object())
    with pytest.raises(ValueError, match="missing_key"):
        RateLimit("1/s", missing_key="allow")
