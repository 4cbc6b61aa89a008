"""Headers across the gateway, both ways: nothing of one connection crosses to the next,
the client's forwarding headers and keys stay at the gateway, the upstream's
organisation, its organisation-wide rate limits and its cookies stay from the client,
and every header the client gets has one value."""

from __future__ import annotations

import httpx
import pytest
from support.gateway_harness import GatewayServer, Upstream, raw_request, write_config
from support.servers import ASGIServer

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
PRO = {"authorization": "Bearer sk-pro"}
NEVER_TO_CLIENTS = (
    "openai-organization",
    "openai-project",
    "anthropic-organization-id",
    "x-upstream-hop",
    "keep-alive",
    "alt-svc",
    "anthropic-ratelimit-requests-remaining",
)


@pytest.fixture
def upstream():
    app = Upstream()
    with ASGIServer(app) as server:
        server.app = app
        yield server


def sent_headers(upstream) -> dict:
    out: dict = {}
    for name, value in upstream.app.last()["headers"]:
        out.setdefault(name.decode("latin-1"), []).append(value.decode("latin-1"))
    return out


@pytest.mark.parametrize("where", ["/v1/chat/completions", "/v1/models"])
def test_responses_carry_no_upstream_secrets_and_one_value_per_header(tmp_path, upstream, where):
    path = write_config(tmp_path, upstream.url)
    with GatewayServer(path) as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        r = http.post(where, json=CHAT, headers=PRO) if where.endswith("completions") else http.get(where, headers=PRO)
    assert r.status_code == 200
    for name in NEVER_TO_CLIENTS:
        assert name not in r.headers, name
    assert "set-cookie" not in r.headers, "cookies of the upstream are not forwarded by default"
    assert "retry-after" not in r.headers, "the upstream's own retry-after on a success is its limit, not ours"
    assert r.headers.get_list("date") != ["Mon, 01 Jan 2024 00:00:00 GMT"] and len(r.headers.get_list("date")) == 1
    assert len(r.headers.get_list("server")) <= 1 and "cloudflare" not in r.headers.get("server", "")
    # The gateway's own rate-limit headers replace the upstream's organisation-wide ones.
    assert r.headers.get_list("x-ratelimit-limit-requests") == ["1000"]
    assert r.headers.get_list("x-ratelimit-remaining-requests") == ["999"]
    assert r.headers.get_list("x-ratelimit-limit-tokens") == ["1000000"]
    assert r.headers.get_list("x-request-id") == ["req_123"], "ordinary headers pass"
    for name in {k.lower() for k in r.headers.keys()}:
        assert len(r.headers.get_list(name)) == 1, name


def test_an_upstream_error_keeps_its_retry_after_once(tmp_path, upstream):
    upstream.app.headers.append((b"retry-after", b"9"))
    upstream.app.headers.append((b"retry-after-ms", b"9000"))
    path = write_config(tmp_path, upstream.url)
    with GatewayServer(path) as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        r = http.get("/status/429", headers=PRO)
    assert r.status_code == 429
    assert r.headers.get_list("retry-after") == ["7"] and r.headers.get_list("retry-after-ms") == ["9000"]
    assert r.headers.get_list("x-ratelimit-limit-requests") == ["1000"]
    assert "openai-organization" not in r.headers


def test_cookies_pass_only_when_configured(tmp_path, upstream):
    path = write_config(tmp_path, upstream.url, upstream="forward_cookies = true")
    with GatewayServer(path) as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        r = http.get("/v1/models", headers={**PRO, "cookie": "session=abc"})
    assert r.headers.get_list("set-cookie") == ["__cf_bm=upstream-session; path=/; HttpOnly", "_cfuvid=second; path=/"]
    assert sent_headers(upstream)["cookie"] == ["session=abc"]
    path = write_config(tmp_path, upstream.url)
    with GatewayServer(path) as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        r = http.get("/v1/models", headers={**PRO, "cookie": "session=abc"})
        # The upstream's cookie is never replayed on another client's request either.
        http.cookies.clear()
        http.get("/v1/models", headers={"authorization": "Bearer sk-free"})
    assert "set-cookie" not in r.headers
    assert "cookie" not in sent_headers(upstream)


def test_hop_by_hop_and_forwarding_headers_are_not_sent_upstream(tmp_path, upstream):
    path = write_config(tmp_path, upstream.url)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway.example\r\nAuthorization: Bearer sk-pro\r\n"
        b"Content-Type: application/json\r\n"
        b"Connection: keep-alive, X-Secret-Hop, x-other-hop\r\nX-Secret-Hop: 1\r\nX-Other-Hop: 2\r\n"
        b"Keep-Alive: timeout=100\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n"
        b"Forwarded: for=6.6.6.6;host=evil.example\r\nX-Real-IP: 6.6.6.6\r\n"
        b"X-Custom: kept"
    )
    body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
    with GatewayServer(path) as gw:
        status, _, _ = raw_request(gw.port, head + b"\r\nContent-Length: " + str(len(body)).encode(), body)
    assert status == 200
    sent = sent_headers(upstream)
    for name in (
        "x-secret-hop",
        "x-other-hop",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "forwarded",
        "x-real-ip",
    ):
        assert name not in sent, name
    assert sent["x-custom"] == ["kept"]
    assert sent["host"] == [upstream.url.split("//")[1]], "the upstream's own host, not the client's"
    assert sent["authorization"] == ["Bearer sk-pro"], "without api_key_env the client's key passes"
    assert len(sent["content-length"]) == 1


def test_the_operator_key_replaces_every_client_key_header(tmp_path, monkeypatch, upstream):
    monkeypatch.setenv("NL_TEST_UPSTREAM_KEY", "operator-secret")
    path = write_config(
        tmp_path,
        upstream.url,
        upstream='api_key_env = "NL_TEST_UPSTREAM_KEY"',
        key='["bearer", "header:x-gateway-key"]',
    )
    with GatewayServer(path) as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        r = http.get("/v1/models", headers={"x-gateway-key": "sk-pro", "api-key": "sk-pro", "x-api-key": "sk-pro"})
    assert r.status_code == 200
    sent = sent_headers(upstream)
    assert sent["authorization"] == ["Bearer operator-secret"] and sent["x-api-key"] == ["operator-secret"]
    assert "x-gateway-key" not in sent and "api-key" not in sent, "the client's gateway key stays at the gateway"
    assert "operator-secret" not in str(dict(r.headers)), "and the operator's never comes back"
