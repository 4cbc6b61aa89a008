"""Adapters under real servers: uvicorn for ASGI, wsgiref for WSGI, driven by httpx."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import httpx
import pytest
from support.servers import ASGIServer, WSGIServer

import nexus_limits as nl
from nexus_limits.adapters import HeaderOptions, Request, client_ip, parse_key_spec, policy_of, rate_limit_headers
from nexus_limits.adapters.asgi import RateLimitMiddleware as ASGILimit
from nexus_limits.adapters.wsgi import RateLimitMiddleware as WSGILimit

# Structured-field lists of the IETF draft: "name";q=1;w=2, "other";r=0;t=3
SF_ITEM = r'"[^"\\]*"(?:;[a-z][a-z0-9_.*-]*=(?:\d+|"[^"]*"))+'
SF_LIST = re.compile(rf"^{SF_ITEM}(?:, {SF_ITEM})*$")


def parse_sf(value: str) -> dict:
    assert SF_LIST.match(value), value
    out = {}
    for item in value.split(", "):
        name, *params = item.split(";")
        out[name.strip('"')] = {k: int(v) for k, v in (p.split("=") for p in params)}
    return out


async def hello(scope, receive, send):
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "hi"})
        await send({"type": "websocket.close", "code": 1000})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def test_asgi_limits_with_headers():
    app = ASGILimit(hello, limiter=nl.TokenBucket("3/minute"), key="header:x-api-key", exempt=["/health"])
    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        statuses = [http.get("/v1/x", headers={"x-api-key": "alice"}) for _ in range(4)]
        assert [r.status_code for r in statuses] == [200, 200, 200, 429]
        first, denied = statuses[0], statuses[3]
        assert first.text == "ok"
        assert parse_sf(first.headers["ratelimit-policy"]) == {"default": {"q": 3, "w": 60}}
        assert parse_sf(first.headers["ratelimit"]) == {"default": {"r": 2, "t": 20}}
        assert first.headers["x-ratelimit-limit"] == "3" and first.headers["x-ratelimit-remaining"] == "2"
        assert denied.headers["content-type"] == "application/problem+json"
        body = denied.json()
        assert body["status"] == 429 and body["title"] == "Too Many Requests" and body["policy"] == "default"
        retry = int(denied.headers["retry-after"])
        assert 19 <= retry <= 20
        assert retry >= parse_sf(denied.headers["ratelimit"])["default"]["t"], "Retry-After never earlier than t"
        assert http.get("/v1/x", headers={"x-api-key": "bob"}).status_code == 200, "keys are isolated"
        assert all(http.get("/health").status_code == 200 for _ in range(5)), "exempt paths"
        assert http.get("/v1/x").status_code == 401, "no key: rejected"


def test_asgi_tiers_routes_costs_and_anonymous():
    tiers = {"free": nl.FixedWindow("2/minute"), "pro": nl.FixedWindow("100/minute")}
    app = ASGILimit(
        hello,
        key="bearer",
        tiers=tiers,
        tier_of={"pro-key": "pro"}.get,
        default_tier="free",
        routes={"/v1/embeddings": (nl.FixedWindow("10/minute"), 4)},
        missing_key="anonymous",
    )
    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        pro = {"authorization": "Bearer pro-key"}
        free = {"authorization": "Bearer someone"}
        assert all(http.get("/", headers=pro).status_code == 200 for _ in range(5))
        assert [http.get("/", headers=free).status_code for _ in range(3)] == [200, 200, 429]
        r = http.get("/", headers=pro)
        assert parse_sf(r.headers["ratelimit-policy"]) == {"pro": {"q": 100, "w": 60}}
        costs = [http.post("/v1/embeddings", headers=free).status_code for _ in range(3)]
        assert costs == [200, 200, 429], "each embeddings call costs 4 of 10"
        assert [http.get("/", headers={"authorization": "Basic abc"}).status_code for _ in range(3)] == [200, 200, 429]


def test_asgi_trusted_proxies():
    app = ASGILimit(hello, limiter=nl.FixedWindow("1/minute"), key="ip")
    trusting = ASGILimit(hello, limiter=nl.FixedWindow("1/minute"), key="ip", trusted_proxies=["127.0.0.0/8"])
    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        assert http.get("/", headers={"x-forwarded-for": "1.1.1.1"}).status_code == 200
        spoofed = http.get("/", headers={"x-forwarded-for": "2.2.2.2"})
        assert spoofed.status_code == 429, "a spoofed X-Forwarded-For from an untrusted peer is ignored"
    with ASGIServer(trusting) as server, httpx.Client(base_url=server.url) as http:
        assert http.get("/", headers={"x-forwarded-for": "1.1.1.1"}).status_code == 200
        assert http.get("/", headers={"x-forwarded-for": "2.2.2.2"}).status_code == 200
        assert http.get("/", headers={"x-forwarded-for": "9.9.9.9, 1.1.1.1"}).status_code == 429
        # Only the header the proxy writes (X-Forwarded-For by default) is read.
        assert http.get("/", headers={"forwarded": 'for="[2001:db8::1]:443"'}).status_code == 200, "the peer"
        assert http.get("/", headers={"forwarded": 'for="[2001:db8::2]:443"'}).status_code == 429, "the peer again"
    forwarded = ASGILimit(
        hello,
        limiter=nl.FixedWindow("1/minute"),
        key="ip",
        trusted_proxies=["127.0.0.0/8"],
        forwarded_header="forwarded",
    )
    with ASGIServer(forwarded) as server, httpx.Client(base_url=server.url) as http:
        assert http.get("/", headers={"forwarded": 'for="[2001:db8::1]:443";proto=https'}).status_code == 200
        assert http.get("/", headers={"forwarded": 'for="[2001:db8::2]"'}).status_code == 429, "one /64, one client"


def test_asgi_concurrency_lease_held_until_the_response_ends():
    gate = threading.Event()

    async def slow(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while not gate.is_set():
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"done"})

    limiter = nl.Concurrency(1)
    app = ASGILimit(slow, limiter=limiter, key="header:x-api-key")
    with ASGIServer(app) as server:
        results = []

        def first() -> None:
            with httpx.Client(base_url=server.url, timeout=10) as http:
                results.append(http.get("/", headers={"x-api-key": "k"}).status_code)

        t = threading.Thread(target=first)
        t.start()
        with httpx.Client(base_url=server.url) as http:
            for _ in range(100):
                if limiter.get_limit("k") == (False, 0):
                    break
                threading.Event().wait(0.01)
            assert http.get("/", headers={"x-api-key": "k"}).status_code == 429
            gate.set()
            t.join(10)
            assert results == [200]
            assert limiter.get_limit("k") == (True, 1), "the lease was released after the response"
            assert http.get("/", headers={"x-api-key": "k"}).status_code == 200


def test_asgi_websockets_limited_at_connect():
    import websockets.sync.client as ws

    app = ASGILimit(hello, limiter=nl.FixedWindow("1/minute"), key="query:key")
    with ASGIServer(app) as server:
        url = f"ws://127.0.0.1:{server.port}/ws?key=abc"
        with ws.connect(url) as conn:
            assert conn.recv() == "hi"
        with pytest.raises(Exception, match="403|rejected"):
            with ws.connect(url):
                pass


def test_asgi_with_starlette_and_async_redis(redis_server):
    import redis.asyncio
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    import nexus_limits.redis as nlr
    import nexus_limits.redis.asyncio as nla

    client = redis.asyncio.Redis(port=redis_server.port)

    async def home(request):
        return PlainTextResponse("home")

    async def close(request):
        await client.aclose()  # on the server's own loop
        return PlainTextResponse("closed")

    app = Starlette(routes=[Route("/", home), Route("/close", close)])
    app.add_middleware(
        ASGILimit,
        limiter=nla.SlidingWindow(client, "2/minute", prefix="asgi"),
        key="header:x-api-key",
        exempt=["/close"],
    )
    sync_app = ASGILimit(
        hello,
        limiter=nlr.TokenBucket(redis.Redis(port=redis_server.port), "1/minute", prefix="asgi2"),
        key="header:x-api-key",
    )
    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        assert [http.get("/", headers={"x-api-key": "k"}).status_code for _ in range(3)] == [200, 200, 429]
        assert http.get("/close").text == "closed"
    with ASGIServer(sync_app) as server, httpx.Client(base_url=server.url) as http:
        assert [http.get("/", headers={"x-api-key": "k"}).status_code for _ in range(2)] == [200, 429]


def flask_app():
    from flask import Flask, jsonify

    app = Flask(__name__)

    @app.get("/hello")
    def hello_view():
        return jsonify(hello="world")

    return app


def test_wsgi_flask_under_a_real_server():
    app = flask_app()
    limiter = nl.SlidingWindow("2/minute")
    app.wsgi_app = WSGILimit(app.wsgi_app, limiter=limiter, key="bearer", headers=HeaderOptions(legacy=False))
    with WSGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        auth = {"authorization": "Bearer t0k"}
        responses = [http.get("/hello", headers=auth) for _ in range(3)]
        assert [r.status_code for r in responses] == [200, 200, 429]
        assert responses[0].json() == {"hello": "world"}
        assert "x-ratelimit-limit" not in responses[0].headers and "ratelimit" in responses[0].headers
        assert (
            responses[2].headers["content-type"] == "application/problem+json" and "retry-after" in responses[2].headers
        )
        assert http.get("/hello").status_code == 401


def test_wsgi_concurrency_released_on_close_and_on_error():
    limiter = nl.Concurrency(1)

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/boom":
            raise RuntimeError("boom")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    wrapped = WSGILimit(app, limiter=limiter, key="header:x-api-key")
    with WSGIServer(wrapped) as server, httpx.Client(base_url=server.url) as http:
        for _ in range(3):
            assert http.get("/", headers={"x-api-key": "k"}).status_code == 200
        assert limiter.get_limit("k") == (True, 1)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/boom", "HTTP_X_API_KEY": "k", "REMOTE_ADDR": "127.0.0.1"}
    with pytest.raises(RuntimeError):
        wrapped(environ, lambda *a: None)
    assert limiter.get_limit("k") == (True, 1), "released when the app raised"


def test_decorator_sync_async_and_outbound_throttling(clock):
    tb = nl.TokenBucket("2/s", burst=1, clock=clock)

    @nl.limit(tb, key=lambda user: user)
    def fetch(user):
        return f"hi {user}"

    assert fetch("ann") == "hi ann"
    with pytest.raises(nl.RateLimitExceeded):
        fetch("ann")
    assert fetch("bob") == "hi bob"

    outbound = nl.TokenBucket("1/s", burst=1, clock=clock)

    @nl.limit(outbound, key="openai", wait=True, timeout=5)
    def call_api(n):
        return n

    start = clock.now
    assert [call_api(i) for i in range(3)] == [0, 1, 2]
    assert clock.now - start == pytest.approx(2.0), "waited one second between calls"

    @nl.limit(nl.FixedWindow("1/minute", clock=clock), key="k", cost=lambda n: n)
    async def work(n):
        return n

    @nl.limit(nl.TokenBucket("1/s", clock=clock), key="k", wait=True)
    async def patient():
        return "ok"

    async def main() -> None:
        assert await work(1) == 1
        with pytest.raises(nl.RateLimitExceeded):
            await work(1)
        assert await patient() == "ok" and await patient() == "ok"

    asyncio.run(main())
    with pytest.raises(TypeError, match="limiter must be a nexus_limits limiter"):
        nl.limit("10/s")


def test_decorator_with_asyncio_limiter(async_redis_client):
    import nexus_limits.redis.asyncio as nla

    limiter = nla.FixedWindow(async_redis_client(), "1/minute", prefix="deco")

    @nl.limit(limiter, key="k")
    async def job():
        return 1

    async def main() -> None:
        assert await job() == 1
        with pytest.raises(nl.RateLimitExceeded):
            await job()
        await limiter.client.aclose()

    asyncio.run(main())
    with pytest.raises(TypeError, match="only limit async functions"):
        nl.limit(limiter)(lambda: None)


def test_key_specs_and_client_ip():
    r = Request("GET", "/", {"authorization": "Bearer  abc ", "x-key": "v"}, "a=1&key=q", "10.0.0.1")
    assert parse_key_spec("bearer")(r) == "abc"
    assert parse_key_spec("header:X-Key")(r) == "v"
    assert parse_key_spec("query:key")(r) == "q"
    assert parse_key_spec("query:missing")(r) is None
    assert parse_key_spec("ip")(r) == "10.0.0.1"
    assert parse_key_spec(lambda req: req.path)(r) == "/"
    for bad, exc in (("cookie:x", ValueError), ("header:", ValueError), (5, TypeError)):
        with pytest.raises(exc, match="key must be a callable or one of"):
            parse_key_spec(bad)
    with pytest.raises(ValueError, match="trusted_proxies"):
        parse_key_spec("ip", ["not-an-ip"])
    import ipaddress

    nets = [ipaddress.ip_network("10.0.0.0/8")]
    proxied = Request("GET", "/", {"x-forwarded-for": "garbage, 10.0.0.9"}, "", "10.0.0.1")
    assert client_ip(proxied, nets) == "10.0.0.1", "a malformed chain is not trusted"
    all_proxies = Request("GET", "/", {"x-forwarded-for": "10.1.1.1, 10.2.2.2"}, "", "10.0.0.1")
    assert client_ip(all_proxies, nets) == "10.1.1.1"
    assert client_ip(Request("GET", "/", {}, "", "[::1]"), nets) == "::1"
    assert client_ip(Request("GET", "/", {}, "", None), nets) is None


def test_headers_and_policies(clock):
    tb = nl.TokenBucket("10/second", burst=20, clock=clock)
    assert policy_of(tb, "burst") == (("burst", 20, 2))
    assert policy_of(nl.FixedWindow("1000/day"), "daily").window == 86400
    d1 = tb.hit("k", 5)
    daily = nl.FixedWindow("1000/day", clock=clock)
    d2 = daily.hit("k")
    headers = dict(rate_limit_headers([(policy_of(tb, "burst"), d1), (policy_of(daily, "daily"), d2)]))
    assert parse_sf(headers["RateLimit-Policy"]) == {"burst": {"q": 20, "w": 2}, "daily": {"q": 1000, "w": 86400}}
    assert parse_sf(headers["RateLimit"])["burst"] == {"r": 15, "t": 1}
    assert headers["X-RateLimit-Remaining"] == "15", "the most restrictive policy"
    assert rate_limit_headers([]) == []
    with pytest.raises(ValueError, match="printable ASCII"):
        rate_limit_headers([(policy_of(tb, "bürst"), d1)])


def test_bad_middleware_options():
    with pytest.raises(ValueError, match="give a limiter, tiers or routes"):
        ASGILimit(hello)
    with pytest.raises(ValueError, match="missing_key"):
        ASGILimit(hello, limiter=nl.TokenBucket("1/s"), missing_key="allow")
    with pytest.raises(ValueError, match="default_tier"):
        ASGILimit(hello, tiers={"a": nl.TokenBucket("1/s")}, default_tier="b")
    with pytest.raises(TypeError, match="nexus_limits limiters"):
        ASGILimit(hello, limiter="10/s")


def test_lifespan_and_other_scopes_pass_through():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    asyncio.run(ASGILimit(app, limiter=nl.TokenBucket("1/s"))({"type": "lifespan"}, None, None))
    assert seen == ["lifespan"]
    assert json.loads(b'{"a": 1}') == {"a": 1}


def test_composite_lists_every_policy(redis_server):
    import redis

    import nexus_limits.redis as nlr

    local = nl.Composite([nl.TokenBucket("10/second"), nl.Composite([nl.FixedWindow("3/minute")])])
    client = redis.Redis(port=redis_server.port)
    shared = nlr.Composite(
        [nlr.TokenBucket(client, "10/second", prefix="pol"), nlr.FixedWindow(client, "3/minute", prefix="pol")]
    )
    for limiter in (local, shared):
        app = ASGILimit(hello, limiter=limiter, key="header:x-api-key")
        with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
            responses = [http.get("/", headers={"x-api-key": "k"}) for _ in range(4)]
            assert [r.status_code for r in responses] == [200, 200, 200, 429]
            assert parse_sf(responses[0].headers["ratelimit-policy"]) == {
                "10/second": {"q": 10, "w": 1},
                "3/minute": {"q": 3, "w": 60},
            }
            state = parse_sf(responses[0].headers["ratelimit"])
            assert state["10/second"]["r"] == 9 and state["3/minute"]["r"] == 2
            assert parse_sf(responses[3].headers["ratelimit"])["3/minute"]["r"] == 0
            assert responses[0].headers["x-ratelimit-limit"] == "3", "legacy headers: the most restrictive policy"
    d, each = local.hit_each("other")
    assert d.allowed and [x.limit for x in each] == [10, 3]
    client.close()
