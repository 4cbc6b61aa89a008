"""What one client can make the gateway hold: request bodies (size and time), request
heads (size and time), connections; and the checks of every option that sets them."""

from __future__ import annotations

import json
import pathlib
import textwrap
import time

import httpx
import pytest
from support.gateway_harness import (
    GatewayServer,
    Upstream,
    closed_within,
    connect,
    raw_request,
    read_response,
    write_config,
)
from support.servers import ASGIServer

from nexus_limits import cli
from nexus_limits.gateway import ConfigError, load_config

AUTH = b"Authorization: Bearer sk-pro"
CHAT_BODY = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture
def upstream():
    app = Upstream()
    with ASGIServer(app) as server:
        server.app = app
        yield server


def small(tmp_path, upstream, server="max_body_bytes = 1000\nbody_timeout = 1\nheader_timeout = 1"):
    return write_config(tmp_path, upstream.url, server=server)


# -- request bodies --------------------------------------------------------------------------


@pytest.mark.parametrize("path", [b"/v1/chat/completions", b"/v1/files"])
def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(tmp_path, upstream, path):
    with GatewayServer(small(tmp_path, upstream)) as gw, connect(gw.port) as sock:
        sock.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\nContent-Length: 10000000000\r\n\r\n")
        status, headers, body = read_response(sock)
    assert status == 413 and headers["content-type"] == ["application/problem+json"]
    assert "1000 bytes" in json.loads(body)["detail"]
    assert upstream.app.seen == []


@pytest.mark.parametrize("path", [b"/v1/chat/completions", b"/v1/files"])
def test_a_chunked_body_is_cut_at_the_limit(tmp_path, upstream, path):
    with GatewayServer(small(tmp_path, upstream)) as gw, connect(gw.port) as sock:
        sock.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):  # 3 x 400 bytes: over 1000
            sock.sendall(b"190\r\n" + b"x" * 400 + b"\r\n")
        status, _, body = read_response(sock)
    assert status == 413 and "1000 bytes" in body.decode()
    assert upstream.app.seen == []


def test_a_body_at_the_limit_passes_whole(tmp_path, upstream):
    body = b'{"a": "' + b"x" * (1000 - 9) + b'"}'
    assert len(body) == 1000
    with GatewayServer(small(tmp_path, upstream)) as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        assert http.post("/v1/files", content=body, headers={"authorization": "Bearer sk-pro"}).status_code == 200
        r = http.post("/v1/files", content=body + b" ", headers={"authorization": "Bearer sk-pro"})
        assert r.status_code == 413
    assert [s["body"] for s in upstream.app.seen] == [body]


def test_the_connection_stays_usable_after_a_413(tmp_path, upstream):
    """The rest of a refused body is read and dropped (never kept), then the next
    request on the same connection is served."""
    with GatewayServer(small(tmp_path, upstream)) as gw, connect(gw.port) as sock:
        sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\nContent-Length: 5000\r\n\r\n")
        status, _, _ = read_response(sock)
        assert status == 413
        sock.sendall(b"y" * 5000)
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n\r\n")
        status, _, _ = read_response(sock)
        assert status == 200


@pytest.mark.parametrize("path", [b"/v1/chat/completions", b"/v1/files"])
def test_a_body_that_never_ends_gets_a_408(tmp_path, upstream, path):
    with GatewayServer(small(tmp_path, upstream)) as gw, connect(gw.port) as sock:
        started = time.monotonic()
        sock.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\nContent-Length: 900\r\n\r\n{")
        for _ in range(3):  # trickles: each byte in time, the whole too late
            time.sleep(0.4)
            try:
                sock.sendall(b" ")
            except OSError:
                break
        status, _, body = read_response(sock)
        took = time.monotonic() - started
        assert closed_within(sock, 2) is not None, "and the connection is closed"
    assert status == 408 and "within 1 s" in json.loads(body)["detail"]
    assert 0.9 < took < 3
    assert upstream.app.seen == []


# -- request heads ---------------------------------------------------------------------------


def test_a_head_that_trickles_is_cut_at_the_header_timeout(tmp_path, upstream):
    with GatewayServer(small(tmp_path, upstream)) as gw, connect(gw.port) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /v1/models HTTP/1.1\r\n")
        for _ in range(2):
            time.sleep(0.4)
            sock.sendall(b"X-Slow: 1\r\n")
        got = closed_within(sock, 3)
        took = time.monotonic() - started
    assert got is not None and got.startswith(b"HTTP/1.1 408 "), got
    assert b"application/problem+json" in got and b"did not arrive within 1 s" in got
    assert 0.9 < took < 2.5
    assert upstream.app.seen == []


def test_a_silent_connection_is_closed(tmp_path, upstream):
    server = "header_timeout = 1\nkeep_alive_timeout = 60"
    with GatewayServer(write_config(tmp_path, upstream.url, server=server)) as gw, connect(gw.port) as sock:
        assert closed_within(sock, 3) == b"", "closed without a word: nothing was asked"


def test_a_kept_alive_connection_gets_the_same_deadline_for_its_next_head(tmp_path, upstream):
    server = "header_timeout = 1\nkeep_alive_timeout = 60"
    with GatewayServer(write_config(tmp_path, upstream.url, server=server)) as gw, connect(gw.port) as sock:
        for _ in range(2):  # quick requests are not affected
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n\r\n")
            assert read_response(sock)[0] == 200
            time.sleep(0.6)
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        got = closed_within(sock, 3)
    assert got is not None and got.startswith(b"HTTP/1.1 408 ")


def test_a_body_still_arriving_after_an_early_answer_is_cut_too(tmp_path, upstream):
    with GatewayServer(small(tmp_path, upstream)) as gw, connect(gw.port) as sock:
        sock.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nobody\r\nContent-Length: 100000\r\n\r\n"
        )
        assert read_response(sock)[0] == 401
        started = time.monotonic()
        got = closed_within(sock, 3)
        assert got is not None and time.monotonic() - started < 2


def test_a_head_over_max_header_bytes_is_refused(tmp_path, upstream):
    path = write_config(tmp_path, upstream.url, server="max_header_bytes = 4096")
    head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + AUTH
    with GatewayServer(path) as gw:
        # Arriving whole: measured by the app.
        status, _, body = raw_request(gw.port, head + b"\r\nX-Big: " + b"a" * 8000)
        assert status == 431 and "4096 bytes" in json.loads(body)["detail"]
        status, _, _ = raw_request(gw.port, head + b"\r\nX-A: " + b"a" * 1000 + b"\r\nX-B: " + b"a" * 2000)
        assert status == 200
        # Arriving in pieces: never buffered past the bound.
        with connect(gw.port) as sock:
            sock.sendall(head + b"\r\n")
            got = b""
            for _ in range(100):
                try:
                    sock.sendall(b"X-Many: " + b"b" * 500 + b"\r\n")
                except OSError:
                    break
                time.sleep(0.005)
            got = closed_within(sock, 3)
        assert got is not None and got.startswith(b"HTTP/1.1 400 ")
    assert len(upstream.app.seen) == 1


def test_connections_beyond_max_connections_get_a_503(tmp_path, upstream):
    path = write_config(tmp_path, upstream.url, server="max_connections = 4\nkeep_alive_timeout = 30")
    with GatewayServer(path) as gw:
        socks = [connect(gw.port) for _ in range(4)]
        try:
            time.sleep(0.2)
            status, _, _ = raw_request(gw.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + AUTH)
            assert status == 503
        finally:
            for s in socks:
                s.close()
        time.sleep(0.2)
        status, _, _ = raw_request(gw.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + AUTH)
        assert status == 200
    assert gw.app.proxy.client.max_connections == 4, "the upstream pool is as large"


def test_websocket_upgrades_are_not_served(tmp_path, upstream):
    with GatewayServer(write_config(tmp_path, upstream.url)) as gw:
        head = (
            b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="
        )
        status, _, _ = raw_request(gw.port, head)
    assert status != 101
    for request in upstream.app.seen:
        names = {k for k, _ in request["headers"]}
        assert b"upgrade" not in names and b"sec-websocket-key" in names


# -- the options that set all this -----------------------------------------------------------

BASE = '[upstream]\nurl = "http://127.0.0.1:1"\n[tiers.t]\nrequests = "1/s"\n'


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ("[server]\nmax_body_bytes = 0\n", ":6: server.max_body_bytes: must be at least 1"),
        ("[server]\nmax_body_bytes = 1.5\n", ":6: server.max_body_bytes: must be a whole number"),
        ("[server]\nmax_body_bytes = true\n", ":6: server.max_body_bytes: must be a whole number"),
        ("[server]\nbody_timeout = 0\n", ":6: server.body_timeout: must be above 0"),
        ("[server]\nbody_timeout = nan\n", ":6: server.body_timeout: must be above 0"),
        ("[server]\nbody_timeout = inf\n", ":6: server.body_timeout: must be above 0 and at most"),
        ('[server]\nheader_timeout = "10"\n', ":6: server.header_timeout: must be a number"),
        ("[server]\nheader_timeout = -1\n", ":6: server.header_timeout: must be above 0"),
        ("[server]\nkeep_alive_timeout = 0\n", ":6: server.keep_alive_timeout: must be at least 1"),
        ("[server]\nmax_connections = 0\n", ":6: server.max_connections: must be at least 1"),
        ("[server]\nmax_header_bytes = 100\n", ":6: server.max_header_bytes: must be at least 1024"),
        ("[server]\nmax_bodies = 1\n", ":6: server.max_bodies: unknown field"),
        ("[gateway]\nmax_in_flight_per_key = 0\n", ":6: gateway.max_in_flight_per_key: must be at least 1"),
        ('[gateway]\nmax_in_flight_per_key = "32"\n', ":6: gateway.max_in_flight_per_key: must be a whole number"),
        ("[gateway]\nkey = []\n", ":6: gateway.key: must be"),
        ('[gateway]\nkey = ["bearer", 5]\n', ":6: gateway.key: must be"),
        ('[gateway]\nkey = ["bearer", "bearer"]\n', ":6: gateway.key: names the same source twice"),
        ('[gateway]\nkey = "header:"\n', ":6: gateway.key: must be"),
        ('[gateway]\nkey = "header:a b"\n', ":6: gateway.key: must be"),
        ('[gateway]\nkey = "cookie:x"\n', ":6: gateway.key: must be"),
        ("[gateway]\nkey = { a = 1 }\n", ":6: gateway.key: must be"),
        ("[upstream2]\nx = 1\n", ":5: upstream2: unknown section"),
    ],
)
def test_every_new_option_is_checked_with_file_line_and_field(tmp_path, extra, where):
    path = tmp_path / "gw.toml"
    path.write_text(BASE + extra)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(str(path)) and where in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://user:pw@127.0.0.1:1", "credentials"),
        ("http://127.0.0.1:1/v1?x=1", "query"),
        ("http://127.0.0.1:1/#x", "query or a fragment"),
        ("http://127.0.0.1:99999", "URL"),
        ("http:///path", "URL"),
        ("http://127.0.0.1:1/a/../b", ". or .."),
        ("http://127.0.0.1:1/a b", "printable ASCII"),
        ("http://127.0.0.1:1/caf\u00e9", "printable ASCII"),
        ("http://127.0.0.1:1/a\\b", "plain path prefix"),
        ('http://127.0.0.1:1/a"b', "plain path prefix"),
    ],
)
def test_the_upstream_url_must_be_a_plain_base(tmp_path, url, why):
    path = tmp_path / "gw.toml"
    path.write_text(f'[upstream]\nurl = {json.dumps(url)}\n[tiers.t]\nrequests = "1/s"\n')
    with pytest.raises(ConfigError, match=":2: upstream.url: ") as info:
        load_config(str(path))
    assert why in str(info.value)


def test_defaults(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text(BASE)
    cfg = load_config(str(path))
    assert (cfg.max_body_bytes, cfg.body_timeout, cfg.header_timeout, cfg.keep_alive_timeout) == (8 << 20, 30, 10, 5)
    assert (cfg.max_connections, cfg.max_header_bytes, cfg.max_in_flight_per_key) == (512, 32768, 32)
    assert cfg.forward_cookies is False and cfg.key == "bearer"


def test_yaml_takes_the_same_options(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "gw.yaml"
    path.write_text(
        textwrap.dedent(
            """
            upstream:
              url: http://127.0.0.1:1
              forward_cookies: true
            server:
              max_body_bytes: 2048
            gateway:
              key: [bearer, "header:x-api-key"]
              max_in_flight_per_key: 0
            tiers:
              t:
                requests: 1/s
            """
        )
    )
    with pytest.raises(ConfigError, match=":9: gateway.max_in_flight_per_key: must be at least 1"):
        load_config(str(path))


def test_init_prints_the_shipped_example_which_is_complete(tmp_path, capsys):
    assert cli.main(["gateway", "--init"]) == 0
    text = capsys.readouterr().out
    example = pathlib.Path(__file__).parents[2] / "examples" / "gateway.toml"
    assert example.read_text(encoding="utf-8") == text, "examples/gateway.toml is the shipped example"
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    cfg = load_config(str(path))
    assert set(cfg.tiers) == {"free", "pro"} and cfg.keys == {"sk-demo-free": "free", "sk-demo-pro": "pro"}
    import nexus_limits.gateway.config as config_module

    source = pathlib.Path(config_module.__file__).read_text(encoding="utf-8")
    # Every field the loader knows is shown (commented out or set) in the example.
    for field in (
        "url", "api_key_env", "timeout", "forward_cookies", "host", "port", "max_body_bytes", "body_timeout",
        "header_timeout", "keep_alive_timeout", "max_connections", "max_header_bytes", "key", "default_tier",
        "max_in_flight_per_key", "lease_ttl", "learn_output", "reload", "reload_interval", "metrics_path",
        "admin_token_env", "type", "prefix", "on_error", "requests", "tokens", "daily_tokens", "concurrency",
        "default_output_tokens", "spend", "shadow", "input", "output", "cached_input", "cache_write",
    ):  # fmt: skip
        assert f'"{field}"' in source, field
        assert f"\n{field} = " in text or f"\n# {field} = " in text, f"{field} is not in the example"
    for wrong in (["gateway"], ["gateway", "--init", "--config", str(path)]):
        with pytest.raises(SystemExit):
            cli.main(wrong)
