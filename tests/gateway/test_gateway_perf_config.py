"""The gateway's fast path: its own upstream client (a bounded pool of kept-alive
HTTP/1.1 connections) against an upstream that misbehaves in every way a socket can,
the request targets it forwards (exactly those httpx would have sent unchanged), the
httptools server protocol, and the ``[server] workers`` option."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from typing import Any, List, Optional

import httpx
import pytest
from support.gateway_harness import GatewayServer, connect, raw_request, read_response, write_config
from support.servers import free_port

from nexus_limits.gateway import ConfigError, load_config
from nexus_limits.gateway.config import GatewayConfig
from nexus_limits.gateway.proxy import BadTarget, Proxy
from nexus_limits.gateway.upstream import Upstream, UpstreamError

BODY = b'{"ok": true, "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}'


def answer(body: bytes = BODY, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body),
        extra,
        body,
    )


class RawUpstream:
    """An HTTP/1.1 server on a raw asyncio socket (in a thread) whose behaviour is chosen
    by the request path; it counts the connections it accepted and how many were open
    at once."""

    def __init__(self) -> None:
        self.port = free_port()
        self.accepted = 0
        self.open = 0
        self.max_open = 0
        self.paths: List[str] = []
        self.writers: set = set()
        self.ssl: Any = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RawUpstream:
        self.thread.start()
        started = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self.serve, "127.0.0.1", self.port, ssl=self.ssl), self.loop
        )
        self.server = started.result(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        async def close() -> None:
            self.server.close()
            for writer in list(self.writers):
                writer.close()
            await asyncio.sleep(0.05)
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.add(writer)
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if length:
                    await reader.readexactly(int(length.group(1)))
                method, target = head.split(b" ", 2)[:2]
                path = target.decode()
                self.paths.append(f"{method.decode()} {path}")
                if not await self.respond(method, path, writer):
                    return
        finally:
            self.open -= 1
            self.writers.discard(writer)
            writer.close()

    async def respond(self, method: bytes, path: str, writer: asyncio.StreamWriter) -> bool:
        """Answers; False to close the connection."""
        if path == "/ok":
            writer.write(answer())
        elif path == "/close-after":  # says nothing, closes after the answer
            writer.write(answer())
            await writer.drain()
            return False
        elif path == "/head":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + (b"" if method == b"HEAD" else b"x" * 100))
        elif path == "/until-close":
            writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it, to the end")
            await writer.drain()
            return False
        elif path == "/cut":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 50)
            await writer.drain()
            return False
        elif path == "/silent":
            await asyncio.sleep(30)
            return False
        elif path == "/silent-body":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello")
            await writer.drain()
            await asyncio.sleep(30)
            return False
        elif path.startswith("/big/"):
            n = int(path.rsplit("/", 1)[1])
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            sent = 0
            while sent < n:
                piece = bytes([65 + (sent // 65536) % 26]) * min(65536, n - sent)
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        elif path == "/twice":
            writer.write(answer() + answer())
        elif path == "/garbage":
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            await writer.drain()
            return False
        elif path == "/continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + answer())
        elif path == "/slow":
            await asyncio.sleep(0.3)
            writer.write(answer())
        elif path == "/chatter":
            writer.write(answer())
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"unasked-for bytes")
        else:
            writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        return True


@pytest.fixture
def raw():
    with RawUpstream() as server:
        yield server


def pool(server: RawUpstream, max_connections: int = 8, timeout: float = 5.0) -> Upstream:
    return Upstream("http", "127.0.0.1", server.port, max_connections=max_connections, timeout=timeout)


def run(raw: RawUpstream, scenario: Any, **options: Any) -> Any:
    """Runs ``scenario(pool)`` on a new event loop; the pool is closed afterwards."""

    async def main() -> Any:
        up = pool(raw, **options)
        try:
            return await scenario(up)
        finally:
            await up.aclose()

    return asyncio.run(main())


async def fetch(up: Upstream, path: str, method: str = "GET", body: bytes = b"") -> tuple:
    response = await up.request(method, path.encode(), [(b"accept", b"*/*")], body)
    try:
        parts = []
        while True:
            chunk = await response.read()
            if not chunk:
                break
            parts.append(chunk)
        return response.status, b"".join(parts)
    finally:
        response.close()


# -- the pool --------------------------------------------------------------------------------


def test_sequential_requests_reuse_one_connection(raw):
    async def scenario(up):
        for _ in range(50):
            assert await fetch(up, "/ok") == (200, BODY)
        return up.opened

    assert run(raw, scenario) == 1
    assert raw.accepted == 1 and len(raw.paths) == 50


def test_concurrent_requests_stay_within_max_connections_and_reuse_them(raw):
    async def scenario(up):
        for _ in range(3):
            results = await asyncio.gather(*(fetch(up, "/slow") for _ in range(20)))
            assert all(r == (200, BODY) for r in results)

    started = time.monotonic()
    run(raw, scenario, max_connections=4)
    assert raw.max_open <= 4 and raw.accepted == 4, (raw.max_open, raw.accepted)
    assert time.monotonic() - started < 10


def test_waiting_for_a_connection_is_bounded_by_the_timeout(raw):
    async def scenario(up):
        held = await up.request("GET", b"/ok", [], b"")  # its answer not read yet: busy
        started = time.monotonic()
        with pytest.raises(UpstreamError, match="within the timeout"):
            await fetch(up, "/ok")
        waited = time.monotonic() - started
        held.close()  # its answer had come whole: the connection is kept for the next
        assert await fetch(up, "/ok") == (200, BODY)
        return waited

    assert 0.4 < run(raw, scenario, max_connections=1, timeout=0.5) < 2
    assert raw.accepted == 1


def test_a_kept_alive_connection_the_upstream_closed_is_replaced_for_an_idempotent_request(raw):
    async def scenario(up):
        assert await fetch(up, "/close-after") == (200, BODY)
        await asyncio.sleep(0.1)  # the upstream's close has arrived: found at once
        assert await fetch(up, "/ok") == (200, BODY)

    run(raw, scenario)
    assert raw.accepted == 2 and raw.paths == ["GET /close-after", "GET /ok"]


def test_a_post_is_never_sent_twice(raw):
    """The upstream closes a kept-alive connection just as a POST goes out on it: the
    POST is a 502, not replayed (an LLM call could be charged twice)."""

    async def scenario(up):
        assert await fetch(up, "/close-after") == (200, BODY)
        conn = up._idle[-1]
        conn.closed = False  # as if its close had not been seen yet: the race
        with pytest.raises(UpstreamError, match="closed"):
            await fetch(up, "/ok", "POST", b"{}")
        # A GET in the same race is sent again on a new connection.
        assert await fetch(up, "/close-after") == (200, BODY)
        up._idle[-1].closed = False
        assert await fetch(up, "/ok") == (200, BODY)

    run(raw, scenario)
    assert raw.paths.count("POST /ok") <= 1


def test_head_answers_have_no_body_whatever_their_length_says(raw):
    async def scenario(up):
        assert await fetch(up, "/head", "HEAD") == (200, b"")
        assert await fetch(up, "/head") == (200, b"x" * 100)

    run(raw, scenario)
    assert raw.accepted == 1, "the connection was reused after the HEAD"


def test_a_body_delimited_by_the_end_of_the_connection_is_read_whole(raw):
    async def scenario(up):
        assert await fetch(up, "/until-close") == (200, b"all of it, to the end")
        assert await fetch(up, "/ok") == (200, BODY)

    run(raw, scenario)
    assert raw.accepted == 2


@pytest.mark.parametrize("path", ["/cut", "/garbage"])
def test_a_cut_or_invalid_answer_is_an_error_and_its_connection_is_dropped(raw, path):
    async def scenario(up):
        with pytest.raises(UpstreamError):
            await fetch(up, path)
        assert up.in_use == 0
        assert await fetch(up, "/ok") == (200, BODY)

    run(raw, scenario)
    assert raw.accepted == 2


@pytest.mark.parametrize("path", ["/silent", "/silent-body"])
def test_a_silent_upstream_is_an_error_within_the_timeout(raw, path):
    async def scenario(up):
        started = time.monotonic()
        with pytest.raises(UpstreamError):
            await fetch(up, path)
        return time.monotonic() - started

    assert 0.4 < run(raw, scenario, timeout=0.5) < 2


def test_an_interim_answer_is_skipped(raw):
    async def scenario(up):
        assert await fetch(up, "/continue") == (200, BODY)
        assert await fetch(up, "/ok") == (200, BODY)

    run(raw, scenario)
    assert raw.accepted == 1


def test_a_connection_that_talks_out_of_turn_is_not_reused(raw):
    async def scenario(up):
        assert await fetch(up, "/chatter") == (200, BODY)
        await asyncio.sleep(0.2)
        assert await fetch(up, "/ok") == (200, BODY)

    run(raw, scenario)
    assert raw.accepted == 2


def test_a_large_body_streams_with_bounded_buffering(raw):
    n = 8 * 1024 * 1024

    async def scenario(up):
        response = await up.request("GET", b"/big/%d" % n, [], b"")
        got = 0
        most = 0
        first = b""
        while True:
            chunk = await response.read()
            if not chunk:
                break
            first = first or chunk[:1]
            got += len(chunk)
            most = max(most, response._conn.buffered if response._conn else 0)
            await asyncio.sleep(0)  # a slow reader: the upstream gets ahead
        response.close()
        return got, most, first

    got, most, first = run(raw, scenario)
    assert got == n and first == b"A"
    assert most < 1024 * 1024, f"{most} bytes buffered: reading from the upstream did not pause"


def test_an_abandoned_answer_closes_its_connection(raw):
    async def scenario(up):
        response = await up.request("GET", b"/big/%d" % (4 * 1024 * 1024), [], b"")
        assert await response.read()
        response.close()  # the client went away
        assert up.in_use == 0
        assert await fetch(up, "/ok") == (200, BODY)

    run(raw, scenario)
    assert raw.accepted == 2


def test_an_upstream_that_is_not_there():
    async def scenario():
        up = Upstream("http", "127.0.0.1", free_port(), max_connections=2, timeout=2)
        with pytest.raises(UpstreamError, match="could not be reached"):
            await fetch(up, "/ok")
        assert up.in_use == 0

    asyncio.run(scenario())


def test_cancelling_a_request_frees_its_place(raw):
    async def scenario(up):
        task = asyncio.ensure_future(fetch(up, "/silent"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert up.in_use == 0
        assert await fetch(up, "/ok") == (200, BODY)

    run(raw, scenario, max_connections=1)


@pytest.fixture
def tls_upstream(tmp_path):
    """An HTTPS upstream on loopback with a self-signed certificate for 127.0.0.1."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(cert), str(key))
    upstream = RawUpstream()
    upstream.ssl = server_ctx
    with upstream:
        yield upstream, str(cert)


def test_an_https_upstream_is_verified(tls_upstream):
    import ssl

    server, cert = tls_upstream

    async def scenario():
        up = Upstream("https", "127.0.0.1", server.port, max_connections=2, timeout=5)
        assert up.host_header == b"127.0.0.1:%d" % server.port
        try:
            with pytest.raises(UpstreamError, match="could not be reached"):
                await fetch(up, "/ok")  # a certificate no CA signed: refused
            await asyncio.sleep(0.1)  # asyncio closes the failed TLS connection's socket
            up.ssl = ssl.create_default_context(cafile=cert)  # as if a CA had signed it
            for _ in range(3):
                assert await fetch(up, "/ok") == (200, BODY)
            assert up.opened == 1, "kept alive over TLS too"
        finally:
            await up.aclose()

    asyncio.run(scenario())


# -- through the gateway ---------------------------------------------------------------------


def test_the_gateway_reuses_its_upstream_connections_and_bounds_them(tmp_path, raw):
    path = write_config(tmp_path, raw.url, server="max_connections = 8\nkeep_alive_timeout = 30")

    async def load(url):
        limits = httpx.Limits(max_connections=3)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
            for _ in range(10):
                got = await asyncio.gather(
                    *(http.get("/ok", headers={"authorization": "Bearer sk-pro"}) for _ in range(4))
                )
                assert [r.status_code for r in got] == [200] * 4, [r.text for r in got]

    with GatewayServer(path) as gw:
        asyncio.run(load(gw.url))
        assert gw.app.proxy.client.max_connections == 8, "the pool is as large as the server's connections"
    # No more upstream connections open than requests at once, and reused: 40 requests
    # on a handful of connections (an idle one is dropped after 4 s, so a slow machine
    # may open one again).
    assert raw.max_open <= 3 and raw.accepted <= 6, (raw.accepted, raw.max_open)
    assert len(raw.paths) == 40


def test_a_large_stream_passes_the_gateway_intact(tmp_path, raw):
    n = 3 * 1024 * 1024 + 17
    path = write_config(tmp_path, raw.url)
    with GatewayServer(path) as gw, httpx.Client(base_url=gw.url, timeout=30) as http:
        with http.stream("GET", f"/big/{n}", headers={"authorization": "Bearer sk-pro"}) as r:
            data = b"".join(r.iter_raw())
    assert len(data) == n
    assert data[:1] == b"A" and data[65536:65537] == b"B" and data[-1:] == bytes([65 + ((n - 1) // 65536) % 26])


@pytest.mark.parametrize("path", ["/cut", "/garbage", "/silent"])
def test_upstream_trouble_through_the_gateway(tmp_path, raw, path):
    config = write_config(tmp_path, raw.url)
    with open(config) as f:
        text = f.read().replace("timeout = 30", "timeout = 1")
    with open(config, "w") as f:
        f.write(text)
    with GatewayServer(config) as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        if path == "/cut":
            # The answer had begun: the client sees it cut, not a complete answer.
            with pytest.raises(httpx.TransportError):
                http.get(path, headers={"authorization": "Bearer sk-pro"})
        else:
            r = http.get(path, headers={"authorization": "Bearer sk-pro"})
            assert r.status_code == 502 and r.json()["title"] == "Bad Gateway" and r.json()["detail"]
        assert http.get("/ok", headers={"authorization": "Bearer sk-pro"}).status_code == 200


@pytest.mark.parametrize("on", [True, False])
def test_access_log(tmp_path, raw, capsys, on):
    """uvicorn's access line per request on stdout, or none with access_log = false."""
    import logging

    path = write_config(tmp_path, raw.url, server=f"access_log = {str(on).lower()}")
    gw = GatewayServer(path)  # uvicorn sets its loggers up here (the harness: warnings only)
    logger = logging.getLogger("uvicorn.access")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with gw, httpx.Client(base_url=gw.url, timeout=10) as http:
            assert http.get("/ok", headers={"authorization": "Bearer sk-pro"}).status_code == 200
    finally:
        logger.setLevel(level)
    out = capsys.readouterr()
    assert ('"GET /ok HTTP/1.1" 200' in out.out + out.err) == on, out


def test_pipelined_requests_are_answered_in_order(tmp_path, raw):
    path = write_config(tmp_path, raw.url)
    with GatewayServer(path) as gw, connect(gw.port) as sock:
        one = b"GET /ok HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-pro\r\n\r\n"
        two = b"GET /head HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-pro\r\n\r\n"
        sock.sendall(one + two)
        # Both answers may come in one read (the server joins a turn's writes).
        pending = bytearray()
        first = read_response(sock, pending=pending)
        second = read_response(sock, pending=pending)
    assert (first[0], first[2]) == (200, BODY)
    assert (second[0], second[2]) == (200, b"x" * 100)


@pytest.mark.parametrize(
    "line",
    [b"GET /ok HTTP/9.9", b"GET /ok", b"GE\x01T /ok HTTP/1.1", b"GET /o k HTTP/1.1", b"\x00\x01\x02"],
)
def test_a_request_the_parser_refuses_is_a_problem_json_400(tmp_path, raw, line):
    path = write_config(tmp_path, raw.url)
    with GatewayServer(path) as gw:
        status, headers, body = raw_request(gw.port, line + b"\r\nHost: x\r\nAuthorization: Bearer sk-pro")
    assert status == 400 and headers["content-type"] == ["application/problem+json"]
    assert json.loads(body)["detail"] and headers["connection"] == ["close"]
    assert raw.paths == []


def test_framing_conflicts_are_refused(tmp_path, raw):
    """Content-Length with Transfer-Encoding, or two lengths: what request smuggling uses."""
    path = write_config(tmp_path, raw.url)
    with GatewayServer(path) as gw:
        for framing in (
            b"Content-Length: 5\r\nTransfer-Encoding: chunked",
            b"Content-Length: 5\r\nContent-Length: 6",
            b"Transfer-Encoding: chunked, identity",
        ):
            head = b"POST /ok HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-pro\r\n" + framing
            status, _, _ = raw_request(gw.port, head, b"0\r\n\r\n")
            assert status == 400, framing
    assert raw.paths == []


# -- the targets forwarded: exactly those httpx would have sent unchanged --------------------


def test_the_targets_forwarded_are_those_httpx_sends_unchanged():
    cfg = GatewayConfig(path="x", upstream_url="http://127.0.0.1:1/api", max_connections=1)
    proxy = Proxy(cfg)
    base = httpx.URL("http://127.0.0.1:1")
    for byte in range(256):
        cases = [(b"/v1/x", b"q=" + bytes([byte]) + b"z")]
        if byte != ord("?"):  # a path never holds "?": the server splits the target there
            cases.append((b"/v1/a" + bytes([byte]) + b"b", b""))
        for path, query in cases:
            target = b"/api" + path + (b"?" + query if query else b"")
            try:
                same = base.copy_with(raw_path=target).raw_path == target
            except Exception:
                same = False
            try:
                got: Optional[bytes] = proxy.url(path, query)
            except BadTarget:
                got = None
            assert (got == target) if same else (got is None), (byte, path, query)
    with pytest.raises(BadTarget, match="longer than"):
        proxy.url(b"/" + b"a" * 70000, b"")


# -- [server] workers ------------------------------------------------------------------------

BASE = '[upstream]\nurl = "http://127.0.0.1:1"\n[tiers.t]\nrequests = "1/s"\n'
REDIS = '[backend]\ntype = "redis"\nurl = "redis://127.0.0.1:1/0"\n'


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ("[server]\nworkers = 0\n", ":6: server.workers: must be at least 1"),
        ("[server]\nworkers = -2\n", ":6: server.workers: must be at least 1"),
        ("[server]\nworkers = 1.5\n", ":6: server.workers: must be a whole number"),
        ("[server]\nworkers = true\n", ":6: server.workers: must be a whole number"),
        ('[server]\nworkers = "2"\n', ":6: server.workers: must be a whole number"),
        ("[server]\nworkers = nan\n", ":6: server.workers: must be a whole number"),
        ("[server]\nworkers = 100000\n", ":6: server.workers: must be at least 1 and at most 1024"),
        (
            "[classes]\ninteractive = 1.0\n[tiers.c]\nconcurrency = 70000\n[server]\nworkers = 2\n",
            ":8: tiers.c.concurrency: must be at most 65,535 with 2 workers on the memory backend",
        ),
        ('[server]\naccess_log = "no"\n', ":6: server.access_log: must be true or false"),
        ("[server]\naccess_log = 0\n", ":6: server.access_log: must be true or false"),
    ],
)
def test_workers_is_checked_with_file_line_and_field(tmp_path, extra, where):
    path = tmp_path / "gw.toml"
    path.write_text(BASE + extra)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(str(path)) and where in str(info.value), str(info.value)


@pytest.mark.parametrize("key", ["sk-1\r\nx-injected: 1", "sk 1", "", "caf\u00e9", "sk\t1"])
def test_an_upstream_key_that_cannot_be_a_header_value_is_refused(tmp_path, monkeypatch, key):
    monkeypatch.setenv("NL_TEST_UPSTREAM_KEY", key)
    path = tmp_path / "gw.toml"
    path.write_text(BASE.replace("[tiers.t]", 'api_key_env = "NL_TEST_UPSTREAM_KEY"\n[tiers.t]'))
    with pytest.raises(ConfigError, match=":3: upstream.api_key_env: .*printable ASCII"):
        load_config(str(path))


def test_bytes_after_a_whole_answer_cost_only_the_connection(raw):
    async def scenario(up):
        # Two answers in one packet to one request: the first is read whole, the
        # connection is not reused.
        assert await fetch(up, "/twice") == (200, BODY)
        assert await fetch(up, "/ok") == (200, BODY)

    run(raw, scenario)
    assert raw.accepted == 2


def test_workers_default_and_with_redis(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text(BASE)
    assert load_config(str(path)).workers == 1 and load_config(str(path)).access_log is True
    path.write_text(BASE + "[server]\nworkers = 4\n" + REDIS)
    assert load_config(str(path)).workers == 4
    # The memory backend's workers share the tiers' limits through shared memory.
    path.write_text(BASE + "[server]\nworkers = 4\n")
    assert load_config(str(path)).workers == 4


def test_yaml_workers(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "gw.yaml"
    path.write_text("upstream:\n  url: http://127.0.0.1:1\nserver:\n  workers: 3\ntiers:\n  t:\n    requests: 1/s\n")
    assert load_config(str(path)).workers == 3
    # Orgs, teams and classes are shared through the workers' shared memory too, whose
    # concurrency limits stop at 65,535.
    path.write_text(
        "upstream:\n  url: http://127.0.0.1:1\nserver:\n  workers: 3\nclasses:\n  a: 1.0\n"
        "tiers:\n  t:\n    requests: 1/s\n"
    )
    assert load_config(str(path)).classes == {"a": 1.0}
    path.write_text(
        "upstream:\n  url: http://127.0.0.1:1\nserver:\n  workers: 3\nteams:\n  s:\n    concurrency: 65536\n"
        "tiers:\n  t:\n    requests: 1/s\n"
    )
    with pytest.raises(ConfigError, match=r":7: teams\.s\.concurrency: must be at most 65,535 with 3 workers"):
        load_config(str(path))


def test_upstream_stats_are_per_connection_not_per_request(raw):
    """What the benchmark reports as upstream connections per 1,000 requests."""

    async def scenario(up):
        for _ in range(10):
            await asyncio.gather(*(fetch(up, "/ok") for _ in range(16)))
        return up.opened

    opened = run(raw, scenario, max_connections=16)
    assert opened == raw.accepted <= 16
    assert 1000 * opened / 160 <= 100
