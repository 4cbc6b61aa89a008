"""The gateway against hostile requests: targets that name another host or hide a path,
routes that would go unmetered, ambiguous keys, one key hogging the upstream, admin
paths in disguise. Each against the gateway served by real uvicorn, in front of a
recording upstream; raw sockets where httpx would clean the request up first."""

from __future__ import annotations

import asyncio
import json
import pathlib
import threading
import time

import httpx
import pytest
import uvicorn
from support.gateway_harness import GatewayServer, Upstream, connect, raw_request, wait_until, write_config
from support.servers import ASGIServer, free_port

from nexus_limits.gateway import build_app

PRO = {"authorization": "Bearer sk-pro"}
AUTH = b"Authorization: Bearer sk-pro"
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def upstream():
    app = Upstream()
    with ASGIServer(app) as server:
        server.app = app
        yield server


@pytest.fixture
def attacker():
    """A host the client would like the operator's key sent to."""
    app = Upstream()
    with ASGIServer(app) as server:
        server.app = app
        yield server


class PlainUvicorn:
    """The gateway app under uvicorn with its own defaults (httptools when installed,
    or h11): the app must hold whatever the protocol puts into the scope."""

    def __init__(self, app, http: str) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, http=http, lifespan="on", log_level="warning", proxy_headers=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def serve(kind: str, config_path: str):
    if kind == "gateway":
        return GatewayServer(config_path)
    return PlainUvicorn(build_app(config_path), kind)


# -- 1. The request target: only [upstream] url plus the normalised path ------------------

HOSTILE_TARGETS = [
    b"GET http://{attacker}/v1/models HTTP/1.1",
    b"GET https://{attacker}/v1/models HTTP/1.1",
    b"GET HTTP://{attacker}/v1/models HTTP/1.1",
    b"POST http://{attacker}/v1/chat/completions HTTP/1.1",
    b"GET http://sk-pro@{attacker}/v1/models HTTP/1.1",
    b"GET //{attacker}/v1/models HTTP/1.1",
    b"CONNECT {attacker} HTTP/1.1",
    b"OPTIONS * HTTP/1.1",
    b"GET {attacker}/v1/models HTTP/1.1",
]


@pytest.mark.parametrize("kind", ["gateway", "h11", "httptools"])
@pytest.mark.parametrize("line", HOSTILE_TARGETS)
def test_the_client_cannot_choose_where_the_upstream_key_goes(tmp_path, monkeypatch, upstream, attacker, kind, line):
    monkeypatch.setenv("NL_TEST_UPSTREAM_KEY", "operator-secret")
    path = write_config(tmp_path, upstream.url, upstream='api_key_env = "NL_TEST_UPSTREAM_KEY"')
    host = f"127.0.0.1:{attacker.port}".encode()
    with serve(kind, path) as gw:
        head = line.replace(b"{attacker}", host) + b"\r\nHost: " + host + b"\r\nAuthorization: Bearer sk-pro"
        head += b"\r\nContent-Length: 2\r\nContent-Type: application/json"
        try:
            status, headers, body = raw_request(gw.port, head, b"{}")
        except OSError:
            status = None  # the server refused the request line itself
    assert attacker.app.seen == [], "nothing ever reaches a host the client names"
    for request in upstream.app.seen:
        # httptools keeps only the path of an absolute URL (as RFC 9112 lets a server do):
        # then the request goes where the operator said, with a path.
        assert request["raw_path"].startswith(b"/")
    if kind != "httptools" and line.split(b" ")[1][:1] != b"/":
        assert status == 400 and upstream.app.seen == []
        assert headers["content-type"] == ["application/problem+json"]
        assert json.loads(body)["status"] == 400 and json.loads(body)["detail"]


@pytest.mark.parametrize(
    ("target", "raw_path", "query"),
    [
        (b"/v1/models", b"/v1/models", b""),
        (b"/v1/x/../models?limit=2&after=a", b"/v1/models", b"limit=2&after=a"),
        (b"//v1///models?b=2&a=1&a=3", b"/v1/models", b"b=2&a=1&a=3"),
        (b"/v1/./m%6Fdels/.?q=%41%zz+x", b"/v1/models", b"q=%41%zz+x"),
        (b"/v1/%2e%2e/v1/models", b"/v1/models", b""),
        (b"/v1/files/caf%c3%a9?", b"/v1/files/caf%C3%A9", b""),
        (b"/v1/files/a%20b?x=a|b{c}", b"/v1/files/a%20b", b"x=a|b{c}"),
        (b"/../../../etc/passwd", b"/etc/passwd", b""),
    ],
)
def test_the_upstream_receives_exactly_the_normalised_target(tmp_path, upstream, target, raw_path, query):
    path = write_config(tmp_path, upstream.url + "/api/")
    with GatewayServer(path) as gw:
        status, _, _ = raw_request(gw.port, b"get " + target + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-pro")
    assert status == 200
    seen = upstream.app.last()
    assert seen["method"] == "GET", "the method decided on (upper-cased) is the one sent"
    assert seen["raw_path"] == b"/api" + raw_path, "the [upstream] url's path, then the normalised path"
    assert seen["query"] == query, "the query as the client sent it, byte for byte"


@pytest.mark.parametrize(
    "target",
    [
        b"/v1/a%2Fb",
        b"/v1/a%5Cb",
        b"/v1/a%00b",
        b"/v1/a%zz",
        b"/v1/a%",
        b"/v1/a%3F?x=1",
        b"/v1/a%23",
        b"/v1/%FF%FE",
        b'/v1/models?q=a%22b"',
        b"/v1/models?q=<script>",
        b"/v1/models?q=a#fragment",
        b"v1/models",
    ],
)
def test_targets_that_cannot_be_forwarded_as_decided_are_refused(tmp_path, upstream, target):
    path = write_config(tmp_path, upstream.url)
    with GatewayServer(path) as gw:
        status, _, body = raw_request(gw.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + AUTH)
    assert status == 400 and body, body
    assert upstream.app.seen == []


def test_a_non_token_method_is_refused(tmp_path, upstream):
    path = write_config(tmp_path, upstream.url)
    app = build_app(path)
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "GE T", "path": "/v1/models", "raw_path": b"/v1/models", "headers": []}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 400 and b"method" in sent[1]["body"]
    assert upstream.app.seen == []


# -- 2. Every route that reaches the upstream is metered ------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"])
def test_every_path_counts_against_the_keys_request_limit(tmp_path, upstream, method):
    path = write_config(tmp_path, upstream.url, free_requests="3/minute")
    free = {"authorization": "Bearer sk-free"}
    with GatewayServer(path) as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        codes = [http.request(method, f"/v1/files/f{i}", headers=free).status_code for i in range(3)]
        assert codes == [200, 200, 200]
        refused = http.request(method, "/v1/other", headers=free)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        # The LLM paths share the same request limit.
        assert http.post("/v1/chat/completions", json=CHAT, headers=free).status_code == 429
        assert http.get("/v1/models", headers=PRO).status_code == 200, "another key is not affected"
    assert len(upstream.app.seen) == 4


def test_a_tier_with_only_token_limits_meters_other_paths_by_concurrency_and_debt(tmp_path, upstream):
    """A tier without `requests` puts no count on other paths (they cost no tokens); its
    concurrency holds them, and a key whose token budget is in debt is refused there too."""
    text = pathlib.Path(write_config(tmp_path, upstream.url))
    cfg = text.read_text().replace(
        '[tiers.free]\nrequests = "100/minute"\ntokens = "100000/minute"',
        '[tiers.free]\ntokens = "100/hour"\nconcurrency = 1\ndefault_output_tokens = 1',
    )
    assert cfg != text.read_text()
    text.write_text(cfg)
    free = {"authorization": "Bearer sk-free"}

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            slow = asyncio.ensure_future(http.get("/slow/1.5", headers=free))
            await asyncio.sleep(0.5)
            during = await http.get("/v1/models", headers=free)
            return (await slow).status_code, during.status_code

    with GatewayServer(str(text)) as gw:
        assert asyncio.run(scenario(gw.url)) == (200, 429), "the one slot is taken by the slow request"
        with httpx.Client(base_url=gw.url, timeout=10) as http:
            assert [http.get("/v1/models", headers=free).status_code for _ in range(5)] == [200] * 5
            # Each call is estimated below the 15 tokens the upstream reports: the key
            # ends in debt, and then other paths are refused as well.
            codes = [http.post("/v1/chat/completions", json=CHAT, headers=free).status_code for _ in range(12)]
            assert 200 in codes and codes[-1] == 429
            refused = http.get("/v1/models", headers=free)
            assert refused.status_code == 429 and "token" in refused.text


# -- 3. Keys: one key per request, from the configured sources ------------------------------


def test_key_sources_in_order_and_conflicts_refused(tmp_path, upstream):
    path = write_config(tmp_path, upstream.url, key='["bearer", "header:x-api-key"]')
    with GatewayServer(path) as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        assert http.get("/v1/models", headers={"x-api-key": "sk-pro"}).status_code == 200
        assert http.get("/v1/models", headers={**PRO, "x-api-key": "sk-pro"}).status_code == 200
        both = http.get("/v1/models", headers={**PRO, "x-api-key": "sk-free"})
        assert both.status_code == 400 and both.headers["content-type"] == "application/problem+json"
        assert both.json()["detail"]
        assert http.get("/v1/models", headers={"x-api-key": "nobody"}).status_code == 401
        assert http.get("/v1/models").status_code == 401
    n = len(upstream.app.seen)
    with GatewayServer(path) as gw:
        for twice in (
            b"x-api-key: sk-pro\r\nx-api-key: sk-free",
            b"Authorization: Bearer sk-pro\r\nAuthorization: Bearer sk-free",
        ):
            status, _, body = raw_request(gw.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + twice)
            assert status == 400, body
    assert len(upstream.app.seen) == n, "an ambiguous key never reaches the upstream"


# -- 5. One key's requests cannot take the upstream from the others --------------------------


def test_one_keys_slow_requests_do_not_starve_another_key(tmp_path, upstream):
    path = write_config(tmp_path, upstream.url)  # the defaults: 32 in flight per key

    async def scenario(url):
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
            hog = [
                asyncio.ensure_future(http.get("/slow/3", headers={"authorization": "Bearer sk-pro"}))
                for _ in range(100)
            ]
            deadline = time.monotonic() + 10
            while upstream.app.in_flight < 32 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            started = time.monotonic()
            other = await http.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-other"})
            took = time.monotonic() - started
            codes = [r.status_code for r in await asyncio.gather(*hog)]
            return other, took, codes

    with GatewayServer(path) as gw:
        other, took, codes = asyncio.run(scenario(gw.url))
        assert other.status_code == 200 and took < 1.5, f"another key waited {took:.2f} s"
        assert codes.count(200) == 32 and codes.count(429) == 68
        assert upstream.app.max_in_flight <= 33
        assert wait_until(lambda: gw.app.in_flight == {}), "no per-key state is left once nothing is in flight"


def test_in_flight_cap_answers_429_with_retry_after_on_every_path(tmp_path, upstream):
    path = write_config(tmp_path, upstream.url, gateway="max_in_flight_per_key = 3")

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            slow = [asyncio.ensure_future(http.delete("/slow/1.5", headers=PRO)) for _ in range(3)]
            deadline = time.monotonic() + 10
            while upstream.app.in_flight < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            refused = await http.post("/v1/chat/completions", json=CHAT, headers=PRO)
            other = await http.get("/v1/models", headers={"authorization": "Bearer sk-free"})
            return refused, other, [r.status_code for r in await asyncio.gather(*slow)]

    with GatewayServer(path) as gw:
        refused, other, codes = asyncio.run(scenario(gw.url))
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.headers["content-type"] == "application/problem+json" and "in flight" in refused.json()["detail"]
        assert other.status_code == 200 and codes == [200, 200, 200]
        assert wait_until(lambda: gw.app.in_flight == {})


def test_a_client_that_leaves_frees_its_in_flight_slot(tmp_path, upstream):
    path = write_config(tmp_path, upstream.url, gateway="max_in_flight_per_key = 1")
    with GatewayServer(path) as gw:
        with connect(gw.port) as sock:
            sock.sendall(b"GET /slow/3 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-pro\r\n\r\n")
            deadline = time.monotonic() + 5
            while not gw.app.in_flight and time.monotonic() < deadline:
                time.sleep(0.02)
            assert gw.app.in_flight
        assert wait_until(lambda: gw.app.in_flight == {}, 1.5), "the slot of a client that went away is freed"
        with httpx.Client(base_url=gw.url, timeout=10) as http:
            assert http.get("/v1/models", headers=PRO).status_code == 200


# -- 7. Admin paths in disguise -------------------------------------------------------------

ADMIN_VARIANTS = [
    b"/_nexus/keys/sk-free",
    b"//_nexus/keys/sk-free",
    b"/%5Fnexus/keys/sk-free",
    b"/%5fnexus/keys/sk%2Dfree",
    b"/v1/../_nexus/keys/sk-free",
    b"/_nexus/./keys//sk-free",
    b"/x/%2e%2e/_nexus/keys/sk-free",
    b"/_nexus/top?tier=free",
    b"/_nexus",
    b"/_nexus/",
]


@pytest.mark.parametrize("target", ADMIN_VARIANTS)
def test_admin_paths_need_the_token_whatever_their_spelling(tmp_path, monkeypatch, upstream, target):
    monkeypatch.setenv("NLGW_ADMIN", "s3cret")
    path = write_config(tmp_path, upstream.url, gateway='admin_token_env = "NLGW_ADMIN"')
    with GatewayServer(path) as gw:
        head = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n"
        for auth in (b"Authorization: Bearer sk-pro", b"Authorization: Bearer s3cre", b"X-Admin: s3cret"):
            status, _, _ = raw_request(gw.port, head + auth)
            assert status == 403
        status, _, body = raw_request(gw.port, head + b"Authorization: Bearer s3cret")
        assert status in (200, 404)
        if b"keys/sk" in target or b"keys//sk" in target:
            assert status == 200 and json.loads(body)["key"] == "sk-free"
    assert upstream.app.seen == [], "no admin path is ever forwarded upstream"


def test_admin_paths_are_not_forwarded_without_an_admin_token(tmp_path, upstream):
    path = write_config(tmp_path, upstream.url)
    with GatewayServer(path) as gw:
        for target in ADMIN_VARIANTS:
            status, _, _ = raw_request(
                gw.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-pro"
            )
            assert status == 404
    assert upstream.app.seen == []


@pytest.mark.parametrize(
    ("target", "status", "key"),
    [
        (b"/_nexus/keys/sk-pro", 200, "sk-pro"),
        (b"/_nexus/keys/caf%C3%A9", 200, "caf\u00e9"),
        (b"/_nexus/keys?key=a%2Fb", 200, "a/b"),
        (b"/_nexus/keys?key=sk-pro&key=sk-free", 400, None),
        (b"/_nexus/keys?key=%FF", 400, None),
        (b"/_nexus/keys", 400, None),
        (b"/_nexus/keys/", 400, None),
        (b"/_nexus/keys/a%2Fb", 400, None),
        (b"/_nexus/keys/%FF", 400, None),
        (b"/_nexus/keys/%E2%80%AE", 400, None),
        (b"/_nexus/keys/" + b"k" * 5000, 400, None),
    ],
)
def test_admin_key_parameter_is_decoded_safely(tmp_path, monkeypatch, upstream, target, status, key):
    monkeypatch.setenv("NLGW_ADMIN", "s3cret")
    path = write_config(tmp_path, upstream.url, gateway='admin_token_env = "NLGW_ADMIN"')
    with GatewayServer(path) as gw:
        got, headers, body = raw_request(
            gw.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret"
        )
    assert got == status, body
    if key is not None:
        assert json.loads(body)["key"] == key
    else:
        assert headers["content-type"] == ["application/problem+json"] and json.loads(body)["detail"]


def test_admin_endpoints_answer_get_only(tmp_path, monkeypatch, upstream):
    monkeypatch.setenv("NLGW_ADMIN", "s3cret")
    path = write_config(tmp_path, upstream.url, gateway='admin_token_env = "NLGW_ADMIN"')
    with GatewayServer(path) as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        admin = {"authorization": "Bearer s3cret"}
        assert http.delete("/_nexus/keys/sk-pro", headers=admin).status_code == 405
        assert http.post("/_nexus/top", headers=admin).status_code == 405
        assert http.delete("/_nexus/keys/sk-pro").status_code == 403
    assert upstream.app.seen == []
