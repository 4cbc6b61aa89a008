"""The gateway's lean HTTP paths, against real servers on loopback: its server's
response writer (one check over all of a response's header lines instead of uvicorn's
checks per header), its access line (made without urllib's quoting when the path needs
none), its connection deadlines (one timer moved forward instead of one per request),
and its upstream client (header names lower-cased and framing read as they arrive, one
deadline per connection moved forward per wait).

Each fast path is held to what it replaced: the writer refuses exactly what uvicorn's
per-header checks refuse (a header that could split the response never reaches the
client), the access line is byte for byte the one stock uvicorn writes, and the
deadlines close what they closed, when they closed it."""

from __future__ import annotations

import asyncio
import io
import logging
import random
import re
import socket
import threading
import time
from typing import Any, Iterator, List, Tuple

import httpx
import pytest
import uvicorn
from support.gateway_harness import GatewayServer, connect, read_response, write_config
from support.servers import free_port
from uvicorn.config import LOGGING_CONFIG
from uvicorn.logging import AccessFormatter
from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE

from nexus_limits.gateway.server import protocol_class
from nexus_limits.gateway.upstream import Upstream, UpstreamError

BODY = b'{"ok": true}'


class Served:
    """An ASGI app served by uvicorn in a thread: with the gateway's protocol (or
    ``http``, such as stock "httptools"), access log on when ``log`` is given."""

    def __init__(self, app: Any, http: Any = None, **options: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            http=http or protocol_class(options.pop("header_timeout", 5.0), 16384),
            ws="none",
            lifespan="off",
            log_config=None,
            proxy_headers=False,
            server_header=False,
            **options,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def headers_app(headers: List[Tuple[bytes, bytes]], body: bytes = BODY) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def exchange(port: int, raw: bytes = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", seconds: float = 5.0) -> bytes:
    """Everything the server sends for ``raw`` until it closes or is silent a moment."""
    with connect(port, seconds) as sock:
        sock.sendall(raw)
        sock.settimeout(0.5)
        out = b""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            out += chunk
        return out


# -- the response writer ------------------------------------------------------------------


HOSTILE_VALUES = [
    b"a\r\nset-cookie: injected=1",
    b"a\rb",
    b"a\nb",
    b"a\x00b",
    b"\x7f",
    b"a\x1bb",
    b"a\r\n\r\nHTTP/1.1 200 OK",
]
HOSTILE_NAMES = [b"x a", b"x:a", b"x\r\ny", b"x\x00", b"(x)", b"x\ty", b'x"', b""]


@pytest.mark.parametrize("header", [(b"x-a", v) for v in HOSTILE_VALUES] + [(n, b"v") for n in HOSTILE_NAMES])
def test_a_header_uvicorn_refuses_never_reaches_the_client(header):
    with Served(headers_app([(b"content-type", b"application/json"), header])) as served:
        out = exchange(served.port)
    # uvicorn's answer to an invalid header, kept: the connection is closed, nothing of
    # the response (which was not written) reaches the client.
    assert out == b"", out


def test_the_writer_refuses_exactly_what_uvicorn_refuses():
    # Random header bytes, each judged by the fast writer (through a real server) and by
    # uvicorn's own per-header expressions: the same verdict every time.
    rng = random.Random(7)
    good_name = [bytes([c]) for c in b"abcXYZ-_.!#0123456789"]
    bad_name = [bytes([c]) for c in b'\x00\x01\r\n\t :;,()[]{}="\\\x7f'] + [b"\x80"]
    good_value = [b"a", b" ", b"\t", b";", b"\x80", b"\xff", b"=", b":"]
    bad_value = [b"\r\n", b"\r\nx-b: c", b"\r\n\r\n", b"\r", b"\n", b"\x00", b"\x1b", b"\x7f", b"\x0b"]
    cases = []
    for _ in range(60):
        name = b"".join(rng.choice(good_name) for _ in range(rng.randint(1, 5)))
        if rng.random() < 0.3:
            at = rng.randint(0, len(name))
            name = name[:at] + rng.choice(bad_name) + name[at:]
        value = b"".join(rng.choice(good_value) for _ in range(rng.randint(0, 5)))
        if rng.random() < 0.4:
            at = rng.randint(0, len(value))
            value = value[:at] + rng.choice(bad_value) + value[at:]
        cases.append((name, value))
    verdicts = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        i = int(scope["path"].strip("/"))
        await send({"type": "http.response.start", "status": 200, "headers": [cases[i], (b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    with Served(app) as served:
        for i, (name, value) in enumerate(cases):
            out = exchange(served.port, b"GET /%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % i, seconds=2)
            verdicts[i] = out.startswith(b"HTTP/1.1 200 OK\r\n")
            if verdicts[i]:
                assert b"\r\n%s: %s\r\n" % (name.lower(), value) in out
    for i, (name, value) in enumerate(cases):
        uvicorn_accepts = not HEADER_RE.search(name) and not HEADER_VALUE_RE.search(value)
        assert verdicts[i] == uvicorn_accepts, (name, value)
    assert 15 < sum(verdicts.values()) < len(cases) - 15, "both verdicts were exercised"


def test_many_headers_are_all_written_in_order_names_lower_cased():
    headers = [(b"X-Many-%d" % i, b"value %d\twith tab" % i) for i in range(3000)]
    with Served(headers_app([*headers, (b"Content-Length", b"%d" % len(BODY))])) as served:
        with connect(served.port) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            status, got, body = read_response(sock)
    assert status == 200 and body == BODY
    names = [n for n in got if n.startswith("x-many-")]
    assert names == [f"x-many-{i}" for i in range(3000)]
    assert got["x-many-2999"] == ["value 2999\twith tab"]


def test_framing_and_close_are_read_from_the_headers():
    # A length: no chunks; Connection: close (any case, in a list): closed after.
    app = headers_app([(b"Content-Length", b"%d" % len(BODY)), (b"Connection", b"foo, Close")])
    with Served(app) as served:
        out = exchange(served.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.count(b"HTTP/1.1 200") == 1 and out.endswith(b"\r\n\r\n" + BODY)
    assert b"transfer-encoding" not in out and b"\r\nconnection: foo, Close\r\n" in out
    # No length: chunked; HTTP/1.0: closed, saying so.
    with Served(headers_app([(b"x-a", b"1")])) as served:
        chunked = exchange(served.port)
        old = exchange(served.port, b"GET / HTTP/1.0\r\n\r\n")
    assert b"\r\ntransfer-encoding: chunked\r\n" in chunked and chunked.endswith(b"\r\n0\r\n\r\n")
    assert b"\r\nconnection: close\r\n" in old


def test_a_wrong_length_still_fails_as_under_uvicorn():
    with Served(headers_app([(b"content-length", b"5")], body=b"toolong")) as served:
        out = exchange(served.port)
    # The head went out; the body did not match it: the connection is closed.
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and not out.endswith(b"toolong")


# -- the access line ----------------------------------------------------------------------


@pytest.fixture
def access_log() -> Iterator[io.StringIO]:
    logger = logging.getLogger("uvicorn.access")
    saved = logger.handlers, logger.propagate, logger.level
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(AccessFormatter(fmt=LOGGING_CONFIG["formatters"]["access"]["fmt"], use_colors=False))
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield stream
    logger.handlers, logger.propagate, logger.level = saved


TARGETS = [
    b"/v1/chat/completions",
    b"/caf%C3%A9?x=%20y&z",
    b"/a%2Fb/~user/_x-y.z",
    b"/sp%20ace",
    b"/",
    b"/q?",
    b"/plain?k=v",
]


def test_the_access_line_is_stock_uvicorns_byte_for_byte(access_log):
    lines = {}
    for name, http in (("stock", "httptools"), ("gateway", None)):
        with Served(headers_app([(b"content-length", b"%d" % len(BODY))]), http=http) as served:
            with connect(served.port) as sock:
                for target in TARGETS:
                    sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target)
                    assert read_response(sock)[0] == 200
                port = sock.getsockname()[1]
            exchange(served.port, b"GET /one HTTP/1.0\r\n\r\n")
            time.sleep(0.2)
        text = access_log.getvalue().replace(f":{port} ", ":PORT ")
        lines[name] = [re.sub(r":\d+ - \"GET /one", ':P - "GET /one', line) for line in text.splitlines()]
        access_log.seek(0)
        access_log.truncate()
    # uvicorn's own URL parser keeps the path of these targets; the gateway's protocol
    # passes the target as sent, which for an origin-form target is the same.
    assert lines["gateway"] == lines["stock"]
    assert len(lines["gateway"]) == len(TARGETS) + 1
    assert lines["gateway"][1] == 'INFO:     127.0.0.1:PORT - "GET /caf%C3%A9?x=%20y&z HTTP/1.1" 200 OK'


# -- the connection's deadlines -----------------------------------------------------------


def test_the_keep_alive_deadline_moves_with_each_request_and_then_closes():
    with Served(headers_app([(b"content-length", b"%d" % len(BODY))]), timeout_keep_alive=0.6) as served:
        with connect(served.port) as sock:
            # Five requests 0.3 s apart: 1.2 s in all, each idle wait shorter than 0.6 s.
            for _ in range(5):
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_response(sock)[0] == 200
                time.sleep(0.3)
            idle = time.monotonic()
            sock.settimeout(5)
            assert sock.recv(10) == b"", "closed after the keep-alive timeout"
            waited = time.monotonic() - idle
    assert 0.1 < waited < 2.0, waited


def test_the_head_deadline_moves_with_each_request_and_answers_a_late_head():
    app = headers_app([(b"content-length", b"%d" % len(BODY))])
    with Served(app, header_timeout=0.6, timeout_keep_alive=30) as served:
        with connect(served.port) as sock:
            for _ in range(4):
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_response(sock)[0] == 200
                time.sleep(0.35)
            # Part of a head, then nothing: a 408 once the head's deadline passes.
            start = time.monotonic()
            sock.sendall(b"GET / HTTP/1.1\r\nHost:")
            status, headers, body = read_response(sock)
            waited = time.monotonic() - start
            assert status == 408 and headers["connection"] == ["close"]
            assert b"0.6 s" in body
    assert 0.2 < waited < 3.0, waited


def test_an_idle_connection_is_closed_at_the_earlier_deadline():
    # header_timeout shorter than keep-alive: an idle connection goes then, in silence.
    app = headers_app([(b"content-length", b"%d" % len(BODY))])
    with Served(app, header_timeout=0.4, timeout_keep_alive=30) as served:
        with connect(served.port) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock)[0] == 200
            start = time.monotonic()
            sock.settimeout(5)
            assert sock.recv(100) == b""
            assert time.monotonic() - start < 3.0


# -- the upstream client ------------------------------------------------------------------


class ScriptedUpstream:
    """A loopback server that answers every request with ``script(n)``: a list of
    (seconds to wait, bytes to send); it closes after the last when ``close``."""

    def __init__(self, script: Any, close: bool = False) -> None:
        self.script = script
        self.close = close
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def __enter__(self) -> ScriptedUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(5)

    def run(self) -> None:
        self.sock.settimeout(0.2)
        n = 0
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(0.2)
                deadline = time.monotonic() + 20
                data = b""
                while not self.stop.is_set() and time.monotonic() < deadline:
                    try:
                        chunk = conn.recv(65536)
                    except socket.timeout:
                        continue
                    if not chunk:
                        break
                    data += chunk
                    while b"\r\n\r\n" in data:
                        head, _, data = data.partition(b"\r\n\r\n")
                        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                        data = data[int(length.group(1)) if length else 0 :]
                        for wait, piece in self.script(n):
                            if self.stop.wait(wait):
                                return
                            conn.sendall(piece)
                        n += 1
                        if self.close:
                            break
                    if self.close and n:
                        break


def call(port: int, timeout: float = 2.0, method: str = "GET", headers: Any = ()) -> Any:
    async def run() -> Any:
        up = Upstream("http", "127.0.0.1", port, max_connections=2, timeout=timeout)
        try:
            response = await up.request(method, b"/x", list(headers), b"")
            body = b""
            try:
                while True:
                    chunk = await response.read()
                    if not chunk:
                        break
                    body += chunk
            finally:
                response.close()
            return response.status, response.headers, body, up.opened
        finally:
            await up.aclose()

    return asyncio.run(run())


def test_each_wait_for_the_body_has_its_own_deadline():
    # Five pieces 0.3 s apart (1.2 s in all) with a 0.6 s timeout: every wait is
    # shorter than the timeout, so the body arrives whole.
    pieces = [(0.0, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")] + [(0.3, b"x")] * 5
    with ScriptedUpstream(lambda n: pieces) as up:
        status, headers, body, _ = call(up.port, timeout=0.6)
    assert status == 200 and body == b"xxxxx"
    assert headers == [(b"content-length", b"5")], "names in lower case, as they go to the client"


def test_a_silent_body_and_a_silent_head_time_out():
    with ScriptedUpstream(lambda n: [(0.0, b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello"), (5, b"")]) as up:
        start = time.monotonic()
        with pytest.raises(UpstreamError, match="sent nothing"):
            call(up.port, timeout=0.4)
        assert time.monotonic() - start < 3
    with ScriptedUpstream(lambda n: [(5, b"")]) as up:
        start = time.monotonic()
        with pytest.raises(UpstreamError, match="within the timeout"):
            call(up.port, timeout=0.4)
        assert time.monotonic() - start < 3


@pytest.mark.parametrize(
    "bad",
    [b"x-a: a\x00b", b"x-a: a\rb", b"x-a: a\nb", b"x-a: a\x7f", b"x a: b", b"x\x00: b", b"x-a: a\r\n folded"],
)
def test_an_upstream_header_with_control_bytes_is_an_error_not_forwarded(bad):
    answer = b"HTTP/1.1 200 OK\r\n" + bad + b"\r\ncontent-length: 2\r\n\r\nok"
    with ScriptedUpstream(lambda n: [(0.0, answer)], close=True) as up:
        with pytest.raises(UpstreamError, match="invalid HTTP response"):
            call(up.port)


def test_framing_is_read_from_headers_in_any_case_and_interim_answers_reset_it():
    # A 100 with a content-length, then a final answer without one: delimited by the close.
    answer = b"HTTP/1.1 100 Continue\r\nContent-Length: 3\r\n\r\nHTTP/1.1 200 OK\r\nX-Up: 1\r\n\r\nto the end"
    with ScriptedUpstream(lambda n: [(0.0, answer)], close=True) as up:
        status, headers, body, _ = call(up.port)
    assert status == 200 and body == b"to the end" and headers == [(b"x-up", b"1")]
    mixed = b"HTTP/1.1 200 OK\r\nTRANSFER-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    with ScriptedUpstream(lambda n: [(0.0, mixed)]) as up:
        assert call(up.port)[2] == b"abc"


def test_request_headers_go_as_pairs_or_as_lines():
    seen: List[bytes] = []

    def script(n: int) -> Any:
        return [(0.0, b"HTTP/1.1 204 No Content\r\n\r\n")]

    async def run(port: int) -> None:
        up = Upstream("http", "127.0.0.1", port, max_connections=1, timeout=2)
        try:
            for headers in ([(b"x-a", b"1"), (b"x-b", b"2")], b"x-a: 1\r\nx-b: 2\r\n"):
                response = await up.request("GET", b"/p?q=1", headers, b"")
                assert response.status == 204 and await response.read() == b""
                response.close()
            assert up.opened == 1, "the connection was reused"
        finally:
            await up.aclose()

    class Recording(ScriptedUpstream):
        def run(self) -> None:
            self.sock.settimeout(5)
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(5)
                data = b""
                while data.count(b"\r\n\r\n") < 2:
                    data += conn.recv(65536)
                    while b"\r\n\r\n" in data and len(seen) < data.count(b"\r\n\r\n"):
                        seen.append(data)
                        conn.sendall(script(0)[0][1])
                seen[:] = data.split(b"\r\n\r\n")[:2]

    with Recording(script) as up:
        asyncio.run(run(up.port))
    expected = f"GET /p?q=1 HTTP/1.1\r\nhost: 127.0.0.1:{up.port}\r\nx-a: 1\r\nx-b: 2".encode()
    assert seen == [expected, expected]


# -- through the gateway ------------------------------------------------------------------


def test_the_gateway_forwards_upstream_headers_lower_cased_and_drops_named_ones(tmp_path):
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Trace: t1\r\nConnection: X-Trace, keep-alive\r\n"
        b"X-Kept: k\r\nOpenAI-Organization: org\r\nX-RateLimit-Limit-Requests: 5\r\nRetry-After: 3\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
    )
    with ScriptedUpstream(lambda n: [(0.0, answer)]) as up:
        path = write_config(tmp_path, f"http://127.0.0.1:{up.port}")
        with GatewayServer(path) as gw:
            with httpx.Client(base_url=gw.url, timeout=10) as http:
                for _ in range(3):  # the decisions remembered give the same answer
                    r = http.get("/v1/models", headers={"authorization": "Bearer sk-pro"})
                    assert r.status_code == 200 and r.content == BODY
                    assert r.headers["x-kept"] == "k"
                    for gone in ("x-trace", "openai-organization", "retry-after", "connection"):
                        assert gone not in r.headers, gone
                    assert r.headers["x-ratelimit-limit-requests"] != "5"


def test_the_gateway_survives_an_upstream_with_thousands_of_headers(tmp_path):
    many = b"".join(b"X-H%d: %d\r\n" % (i, i) for i in range(2000))
    answer = b"HTTP/1.1 200 OK\r\n" + many + b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
    with ScriptedUpstream(lambda n: [(0.0, answer)]) as up:
        path = write_config(tmp_path, f"http://127.0.0.1:{up.port}")
        with GatewayServer(path) as gw:
            with httpx.Client(base_url=gw.url, timeout=10) as http:
                r = http.get("/v1/models", headers={"authorization": "Bearer sk-pro"})
                assert r.status_code == 200 and r.content == BODY
                assert r.headers["x-h1999"] == "1999" and r.headers["x-h0"] == "0"
                again = http.get("/v1/models", headers={"authorization": "Bearer sk-pro"})
                assert again.status_code == 200


def test_the_gateway_answers_502_to_an_upstream_header_with_a_line_break(tmp_path):
    answer = b"HTTP/1.1 200 OK\r\nX-A: a\rSet-Cookie: s=1\r\nContent-Length: 2\r\n\r\nok"
    with ScriptedUpstream(lambda n: [(0.0, answer)], close=True) as up:
        path = write_config(tmp_path, f"http://127.0.0.1:{up.port}")
        with GatewayServer(path) as gw:
            with httpx.Client(base_url=gw.url, timeout=10) as http:
                r = http.get("/v1/models", headers={"authorization": "Bearer sk-pro"})
    assert r.status_code == 502 and "set-cookie" not in r.headers
    assert "invalid HTTP response" in r.json()["detail"]


def test_a_pool_shared_by_two_running_loops_never_hands_one_loops_connection_to_the_other():
    """Each loop in its own thread; a connection made and released by one must not be
    taken by the other (its transport belongs to the first loop)."""
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    with ScriptedUpstream(lambda n: [(0.0, answer)]) as server:
        pool = Upstream("http", "127.0.0.1", server.port, max_connections=4, timeout=5)
        first_done = threading.Event()
        second_done = threading.Event()
        results: List[Any] = []

        async def one() -> None:
            response = await pool.request("GET", b"/x", [], b"")
            try:
                while await response.read():
                    pass
            finally:
                response.close()

        async def close_ours() -> None:
            # Each loop closes the connections it made, in its own thread.
            for conn in [c for c in pool._idle if c.thread == threading.get_ident()]:
                pool._idle.remove(conn)
                pool._drop(conn)
            await asyncio.sleep(0.05)

        def loop_a() -> None:
            async def main() -> None:
                await one()  # released to the pool, idle, while this loop runs on
                first_done.set()
                while not second_done.is_set():
                    await asyncio.sleep(0.01)
                await close_ours()

            asyncio.run(main())

        def loop_b() -> None:
            first_done.wait(10)

            async def main() -> None:
                await one()
                results.append(pool.opened)
                await close_ours()

            try:
                asyncio.run(main())
            finally:
                second_done.set()

        threads = [threading.Thread(target=loop_a), threading.Thread(target=loop_b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
    assert results == [2], "the second loop opened its own connection"
