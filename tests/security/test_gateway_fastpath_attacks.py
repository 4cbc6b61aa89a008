"""Hostile variants of requests and answers against the gateway's fast paths.

The gateway judges a request's target and key once (the ``nexus_limits.given`` scope
entry), parses bodies with a shared decoder, arms the body deadline only when
``receive()`` waits, reads a response start's headers in one pass and reads usage
through shortcuts for the common shapes. Each shortcut must judge every variant of a
request or answer as the general code does: the same charge (read back from the
limiter), a clear 4xx for bad input, and no hang or held lease. Everything runs
against the real gateway on loopback: its own server (``uvicorn_config``), a real
uvicorn upstream, raw sockets where httpx would normalise the bytes.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import textwrap
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import httpx
import pytest
from support.gateway_harness import GatewayServer, closed_within, connect, read_response
from support.servers import ASGIServer, free_port

CAPACITY = 1_000_000  # tokens a key may spend per day: refills ~12 tokens a second
DRIFT = 40  # what the refill can give back while a test measures (a few seconds)
USAGE = {"prompt_tokens": 3000, "completion_tokens": 2000, "total_tokens": 5000}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello there, how are you?"}], "max_tokens": 50}

Answer = Tuple[int, List[Tuple[bytes, bytes]], List[bytes]]


class Scripted:
    """An upstream whose answer a test chooses: ``answer(body) -> (status, headers,
    body chunks)``; ``/stream`` (any path ending so) sends events until the client goes
    (at most 20 s). Records the bodies it received and whether a stream saw its client go."""

    def __init__(self) -> None:
        self.answer: Callable[[bytes], Answer] = lambda body: _json_answer({"choices": [], "usage": USAGE})
        self.bodies: List[bytes] = []
        self.stream = False
        self.stream_gone = threading.Event()
        self.head_pause = 0.0  # seconds before the answer's head
        self.pauses: List[float] = []  # seconds before each body chunk

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        if self.stream:
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
            )
            deadline = time.monotonic() + 20
            chunk = b'data: {"choices":[{"delta":{"content":"word "}}]}\n\n'
            # Stock uvicorn drops what is sent after the client went: its receive() says so.
            gone = asyncio.ensure_future(receive())
            while time.monotonic() < deadline and not gone.done():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await asyncio.sleep(0.01)
            if gone.done():
                self.stream_gone.set()
            else:
                gone.cancel()
            return
        status, headers, chunks = self.answer(body)
        if self.head_pause:
            await asyncio.sleep(self.head_pause)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for i, part in enumerate(chunks):
            if i < len(self.pauses) and self.pauses[i]:
                await asyncio.sleep(self.pauses[i])
            await send({"type": "http.response.body", "body": part, "more_body": i < len(chunks) - 1})
        if not chunks:
            await send({"type": "http.response.body", "body": b""})


def _json_answer(doc: Any, headers: Optional[List[Tuple[bytes, bytes]]] = None) -> Answer:
    return 200, headers or [(b"content-type", b"application/json")], [json.dumps(doc).encode()]


CONFIG = """
[upstream]
url = "{url}"
timeout = {upstream_timeout}

[server]
body_timeout = {body_timeout}
{server}

[gateway]
key = "bearer"
reload = "off"

[tiers.t]
requests = "100000/minute"
tokens = "{capacity}/day"

[tiers.one]
requests = "100000/minute"
tokens = "{capacity}/day"
concurrency = 1

[keys]
{keys}
"""

KEYS = [f"sk-test-{i:03d}" for i in range(40)]
ONE_KEYS = [f"sk-one-{i:03d}" for i in range(10)]


def _config(tmp_path: Any, url: str, body_timeout: float = 2, upstream_timeout: float = 30, server: str = "") -> str:
    keys = "\n".join([f'"{k}" = "t"' for k in KEYS] + [f'"{k}" = "one"' for k in ONE_KEYS])
    path = tmp_path / "gateway.toml"
    path.write_text(
        textwrap.dedent(
            CONFIG.format(
                url=url,
                body_timeout=body_timeout,
                upstream_timeout=upstream_timeout,
                server=server,
                capacity=CAPACITY,
                keys=keys,
            )
        )
    )
    return str(path)


@pytest.fixture
def upstream() -> Iterator[Tuple[Scripted, ASGIServer]]:
    app = Scripted()
    with ASGIServer(app) as server:
        yield app, server


@pytest.fixture
def gateway(tmp_path: Any, upstream: Tuple[Scripted, ASGIServer]) -> Iterator[GatewayServer]:
    _keys[0] = iter(KEYS)
    with GatewayServer(_config(tmp_path, upstream[1].url)) as gw:
        yield gw


_keys: List[Iterator[str]] = [iter(KEYS)]


def fresh_key() -> str:
    """A key no request has used yet on this test's gateway (each test has its own)."""
    return next(_keys[0])


def spent(gw: GatewayServer, key: str, tier: str = "t") -> int:
    """Tokens the key has been charged (its bucket started full)."""
    probe = gw.app.tiers[tier].limiter.peek(key)
    return CAPACITY - int(probe.tokens.remaining)


def settled(gw: GatewayServer, key: str, tier: str = "t") -> int:
    """The key's charge once its request has ended (the lease is settled just after
    the client has the last byte)."""
    deadline = time.monotonic() + 3
    last = spent(gw, key, tier)
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = spent(gw, key, tier)
        if now == last:
            return now
        last = now
    return last


def post(gw: GatewayServer, key: str, body: bytes, headers: Optional[Dict[str, str]] = None) -> httpx.Response:
    h = {"authorization": f"Bearer {key}", "content-type": "application/json", **(headers or {})}
    return httpx.post(f"{gw.url}/v1/chat/completions", content=body, headers=h, timeout=15)


def raw(port: int, key: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer "
        + key.encode()
        + b"\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n"
        + extra
        + b"\r\n"
        + body
    )


# --- request bodies: encodings, numbers ------------------------------------------------


def test_body_encodings_are_charged_as_the_utf8_body(gateway: GatewayServer, upstream: Any) -> None:
    """The shared decoder (_loads) detects UTF-16/32 and drops a UTF-8 BOM as json.loads
    does: every encoding of one request reserves what its UTF-8 form reserves (the
    upstream answers without usage, so the charge is the reservation)."""
    app, _ = upstream
    app.answer = lambda body: _json_answer({"choices": [{"message": {"content": "x"}}]})
    text = json.dumps(CHAT, ensure_ascii=False)
    variants = {
        "utf-8": text.encode("utf-8"),
        "utf-8 BOM": text.encode("utf-8-sig"),
        "utf-16": text.encode("utf-16"),
        "utf-16-le": text.encode("utf-16-le"),
        "utf-16-be": text.encode("utf-16-be"),
        "utf-32": text.encode("utf-32"),
        "utf-32-be": text.encode("utf-32-be"),
        "whitespace": b" \r\n\t" + text.encode() + b"\n ",
    }
    charges = {}
    for name, body in variants.items():
        key = fresh_key()
        r = post(gateway, key, body)
        assert r.status_code == 200, (name, r.status_code, r.text)
        charges[name] = settled(gateway, key)
    expected = charges["utf-8"]
    assert expected >= 50  # the reservation holds max_tokens at least
    for name, got in charges.items():
        assert abs(got - expected) <= DRIFT, (name, got, expected)


# Lone surrogates are admitted (json.loads reads them; the tokenizer counts them) and
# charged; everything else here is a 400 naming the problem.
_OK = 200


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"\xff\xfe", 400),  # a UTF-16 BOM and nothing
        (b"\xef\xbb\xbf", 400),  # a UTF-8 BOM and nothing
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "\\ud800"}]}', _OK),  # a lone surrogate
        (
            '{"model": "gpt-4o", "messages": [{"role": "user", "content": "\ud800x"}]}'.encode(
                "utf-16", "surrogatepass"
            ),
            _OK,
        ),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "\xc3"}]}', 400),  # broken UTF-8
        (b'\xef\xbb\xbf\xef\xbb\xbf{"model": "gpt-4o", "messages": []}', 400),  # two BOMs
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": NaN}', 400),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": Infinity}', 400),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}', 400),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}', 400),
        (
            b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 40 + b"}",
            400,
        ),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9007199254740993}', 400),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": true}', 400),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5.5}', 400),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e3}', 400),
        (b'{"model": "gpt-4o", "messages": [{"role": 7, "content": "hi"}]}', 400),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": 7}]}', 400),
        (b'{"model": 7, "messages": [{"role": "user", "content": "hi"}]}', 400),
        (b'{"model": "' + b"m" * 300 + b'", "messages": [{"role": "user", "content": "hi"}]}', 400),
        (b'{"model": "gpt-4o", "messages": {"role": "user", "content": "hi"}}', 400),
        (b'{"model": "gpt-4o", "stream": "true", "messages": [{"role": "user", "content": "hi"}]}', 400),
        (b"[" * 100_000, 400),
        (b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi","x":' + b"[" * 992 + b"]" * 992 + b"}]}", 400),
        (gzip.compress(json.dumps(CHAT).encode()), 400),  # a compressed body (no coding is read)
        (b"\x00" * 64, 400),
    ],
)
def test_bad_bodies_get_a_clear_400(gateway: GatewayServer, upstream: Any, body: bytes, status: int) -> None:
    """Odd encodings, NaN/huge/negative numbers, wrong types, deep nesting: a 400 whose
    body names the problem, nothing charged and nothing forwarded; never a 5xx."""
    app, _ = upstream
    key = fresh_key()
    r = post(gateway, key, body)
    assert r.status_code == status, (r.status_code, r.text)
    if status == 400:
        assert r.json()["error"]["message"].startswith("invalid request body: "), r.text
        assert settled(gateway, key) <= DRIFT
        assert app.bodies == []
    else:
        assert abs(settled(gateway, key) - 5000) <= DRIFT  # the usage the upstream reported


def test_a_role_outside_the_table_is_counted_as_the_general_path_counts_it(
    gateway: GatewayServer, upstream: Any
) -> None:
    """plain_message counts known roles from a table; any other role, a third member or
    content that is not a string goes the general way: the reservation of each shape
    equals count_request's estimate for it plus max_tokens, as before the shortcut."""
    from nexus_limits.tokens._count import count_request_tokens

    app, _ = upstream
    app.answer = lambda body: _json_answer({"choices": [{"message": {"content": "x"}}]})
    long_role = "r" * 5000
    shapes = [
        [{"role": "user", "content": "hello " * 50}],
        [{"role": long_role, "content": "hello " * 50}],
        [{"role": "User", "content": "hello " * 50}],
        [{"role": "user", "content": "hello " * 50, "name": "bob"}],
        [{"content": "hello " * 50, "role": "user"}],
        [{"role": "user", "content": ""}],
        [{"role": "user", "content": [{"type": "text", "text": "hello " * 50}]}],
    ]
    for messages in shapes:
        body = {"model": "gpt-4o", "messages": messages, "max_tokens": 50}
        key = fresh_key()
        r = post(gateway, key, json.dumps(body).encode())
        assert r.status_code == 200, r.text
        got = settled(gateway, key)
        want = count_request_tokens(body, "openai").tokens
        assert got >= want, (messages[0].get("role", "")[:10], got, want)


# --- the key and target, judged once ---------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        [b"authorization: Bearer {a}", b"authorization: Bearer {b}"],
        [b"Authorization: Bearer {a}", b"AUTHORIZATION: Bearer {b}"],
        [b"authorization: Bearer {a}", b"x-api-key: {b}"],
        [b"x-api-key: {a}", b"authorization: Bearer {b}"],
        [b"authorization:    Bearer {a}   "],
        [b"authorization: bearer {a}"],
    ],
)
def test_repeated_and_varied_key_headers_charge_exactly_one_key(
    gateway: GatewayServer, upstream: Any, headers: List[bytes]
) -> None:
    """The key the gateway judges (tier, in-flight count) is the key charged: a request
    is refused, or exactly one of the keys it names pays the upstream's usage."""
    a, b = fresh_key(), fresh_key()
    body = json.dumps(CHAT).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
    for line in headers:
        head += line.replace(b"{a}", a.encode()).replace(b"{b}", b.encode()) + b"\r\n"
    head += b"content-length: %d\r\n\r\n" % len(body)
    with connect(gateway.port) as sock:
        sock.sendall(head + body)
        status, _, text = read_response(sock, 15)
    charges = (settled(gateway, a), settled(gateway, b))
    if status >= 400:
        assert status < 500, text
        assert max(charges) <= DRIFT, charges
    else:
        assert status == 200
        assert sorted(c > 5000 - DRIFT for c in charges) == [False, True], charges
        assert max(charges) <= 5000 + DRIFT, charges


@pytest.mark.parametrize(
    "target",
    [
        b"/v1/chat/completions?x=1",
        b"/v1//chat/completions",
        b"/v1/./chat/completions",
        b"/v1/chat/../chat/completions",
        b"/v1/chat/completions/",
        b"/v1/%63hat/completions",
        b"/V1/chat/completions",
        b"//v1/chat/completions",
    ],
)
def test_target_variants_are_limited_or_refused(gateway: GatewayServer, upstream: Any, target: bytes) -> None:
    """A variant of the LLM path is either refused (4xx, nothing forwarded) or charged
    like the path itself: never forwarded to the upstream's chat endpoint uncharged."""
    app, _ = upstream
    key = fresh_key()
    body = json.dumps(CHAT).encode()
    before = len(app.bodies)
    head = (
        b"POST "
        + target
        + b" HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer "
        + key.encode()
        + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
    )
    with connect(gateway.port) as sock:
        sock.sendall(head + body)
        status, _, text = read_response(sock, 15)
    assert status < 500, text
    forwarded = len(app.bodies) > before
    if forwarded and status == 200:
        # Forwarded: the upstream's usage was charged (or the path is not an LLM path
        # the upstream serves, which this upstream cannot tell: it answers every path).
        charge = settled(gateway, key)
        assert charge >= 5000 - DRIFT or not _is_llm_path_variant(target), (target, charge)


def _is_llm_path_variant(target: bytes) -> bool:
    from nexus_limits.adapters import normalize_target

    try:
        _, path = normalize_target("POST", target.split(b"?")[0].decode(), target.split(b"?")[0])
    except Exception:
        return False
    return path == "/v1/chat/completions"


# --- usage in answers: the fast readers vs the general one ----------------------------


def _answers() -> Dict[str, Answer]:
    doc = {"id": "x", "object": "chat.completion", "choices": [{"message": {"content": "hi"}}], "usage": USAGE}
    plain = json.dumps(doc).encode()
    dup = (
        b'{"object":"chat.completion","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1},'
        b'"usage":{"prompt_tokens":3000,"completion_tokens":2000}}'
    )
    dup_inner = b'{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2000,"prompt_tokens":3000}}'
    big = json.dumps({**doc, "pad": "a" * 70_000}).encode()
    ct = (b"content-type", b"application/json")
    return {
        "plain": (200, [ct], [plain]),
        "leading whitespace": (200, [ct], [b" \n" + plain]),
        "byte by byte": (200, [ct], [plain[i : i + 1] for i in range(len(plain))]),
        "gzip": (200, [ct, (b"content-encoding", b"gzip")], [gzip.compress(plain)]),
        "larger than the capture": (200, [ct], [big]),
        "duplicate usage, last wins": (200, [ct], [dup]),
        "duplicate usage, gzip": (200, [ct, (b"content-encoding", b"gzip")], [gzip.compress(dup)]),
        "duplicate count in usage": (200, [ct], [dup_inner]),
        "charset and case": (200, [(b"Content-Type", b"Application/JSON; charset=utf-8")], [plain]),
        "no content type": (200, [], [plain]),
        "two content types": (200, [ct, (b"content-type", b"text/plain")], [plain]),
        "upper-case coding": (200, [ct, (b"Content-Encoding", b"GZIP")], [gzip.compress(plain)]),
        "identity coding": (200, [ct, (b"content-encoding", b"identity")], [plain]),
        "sse": (
            200,
            [(b"content-type", b"text/event-stream")],
            [
                b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n',
                b'data: {"choices":[],"usage":' + json.dumps(USAGE).encode() + b"}\n\n",
                b"data: [DONE]\n\n",
            ],
        ),
    }


@pytest.mark.parametrize("name", list(_answers()))
def test_usage_in_every_shape_charges_the_same(gateway: GatewayServer, upstream: Any, name: str) -> None:
    """The same usage (3000 + 2000) in any framing, coding or shape the readers accept
    is charged 5000: the small-body shortcut, the scanner, the stream reader agree
    (duplicate members: the last one, as json.loads reads them)."""
    app, _ = upstream
    answer = _answers()[name]
    app.answer = lambda body: answer
    key = fresh_key()
    r = post(gateway, key, json.dumps(CHAT).encode())
    assert r.status_code == 200, r.text
    assert abs(settled(gateway, key) - 5000) <= DRIFT, name


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": 3000, "completion_tokens": 2000.0},
        {"prompt_tokens": 3000, "completion_tokens": True},
        {"prompt_tokens": 3000, "completion_tokens": -1},
        {"prompt_tokens": 3000, "completion_tokens": 2**60},
        {"prompt_tokens": 3000, "completion_tokens": "2000"},
        {"prompt_tokens": 3000, "completion_tokens": 2000, "prompt_tokens_details": {"cached_tokens": 9000}},
        {"prompt_tokens": 3000, "completion_tokens": 2000, "completion_tokens_details": {"reasoning_tokens": -5}},
        {"prompt_tokens": 3000, "completion_tokens": 2000, "prompt_tokens_details": []},
        {"prompt_tokens": 3000},
        [3000, 2000],
        None,
    ],
)
def test_untrustworthy_usage_is_never_charged_below_the_reservation(
    gateway: GatewayServer, upstream: Any, usage: Any
) -> None:
    """Usage the readers refuse leaves the reservation's charge (never less, never a
    crash): the answer the client gets is the upstream's."""
    app, _ = upstream
    app.answer = lambda body: _json_answer({"object": "chat.completion", "choices": [], "usage": usage})
    reference = fresh_key()
    app_answer = app.answer
    app.answer = lambda body: _json_answer({"choices": [{"message": {"content": "x"}}]})
    assert post(gateway, reference, json.dumps(CHAT).encode()).status_code == 200
    app.answer = app_answer
    key = fresh_key()
    r = post(gateway, key, json.dumps(CHAT).encode())
    assert r.status_code == 200, r.text
    assert settled(gateway, key) >= settled(gateway, reference) - DRIFT


def test_upstream_limit_headers_never_reach_the_client_beside_ours(gateway: GatewayServer, upstream: Any) -> None:
    """_start_headers drops every upstream header a gateway header replaces, whatever
    its case and however often it is repeated: the client sees one value, the gateway's."""
    app, _ = upstream
    theirs = [
        (b"X-RateLimit-Remaining-Tokens", b"999999999"),
        (b"x-ratelimit-remaining-tokens", b"888888888"),
        (b"X-RATELIMIT-LIMIT-TOKENS", b"777777777"),
        (b"x-ratelimit-reset-tokens", b"1s"),
        (b"x-ratelimit-remaining-requests", b"5"),
    ]
    app.answer = lambda body: _json_answer(
        {"choices": [], "usage": USAGE}, [(b"content-type", b"application/json"), *theirs]
    )
    key = fresh_key()
    body = json.dumps(CHAT).encode()
    with connect(gateway.port) as sock:
        sock.sendall(raw(gateway.port, key, body))
        status, headers, _ = read_response(sock, 15)
    assert status == 200
    for name in ("x-ratelimit-remaining-tokens", "x-ratelimit-limit-tokens", "x-ratelimit-remaining-requests"):
        assert len(headers.get(name, [])) == 1, (name, headers.get(name))
    assert headers["x-ratelimit-limit-tokens"] == [str(CAPACITY)]
    assert int(headers["x-ratelimit-remaining-tokens"][0]) <= CAPACITY


# --- bodies that arrive slowly, stall, or come pipelined -------------------------------


def test_a_body_byte_by_byte_is_read_whole_and_charged_as_one_write(gateway: GatewayServer, upstream: Any) -> None:
    app, _ = upstream
    app.answer = lambda body: _json_answer({"choices": [{"message": {"content": "x"}}]})
    body = json.dumps(CHAT).encode()
    whole = fresh_key()
    assert post(gateway, whole, body).status_code == 200
    key = fresh_key()
    data = raw(gateway.port, key, body)
    with connect(gateway.port) as sock:
        head_end = data.index(b"\r\n\r\n") + 4
        sock.sendall(data[:head_end])
        for i in range(head_end, len(data)):  # ~1 s in all, under the 2 s deadline
            sock.sendall(data[i : i + 1])
            time.sleep(0.005)
        status, _, text = read_response(sock, 15)
    assert status == 200, text
    assert app.bodies[-1] == body
    assert abs(settled(gateway, key) - settled(gateway, whole)) <= DRIFT


@pytest.mark.parametrize("how", ["stall", "drip past the deadline"])
def test_a_body_that_stalls_or_drips_past_the_deadline_is_a_408_and_frees_its_lease(
    gateway: GatewayServer, upstream: Any, how: str
) -> None:
    """The deadline is armed only when receive() waits: a body that keeps a byte coming
    every 0.2 s still meets the whole-body deadline (2 s), and the key's one
    concurrency place is free at once after."""
    key = ONE_KEYS[0 if how == "stall" else 1]
    body = json.dumps(CHAT).encode()
    data = raw(gateway.port, key, body)
    head_end = data.index(b"\r\n\r\n") + 4
    started = time.monotonic()
    with connect(gateway.port, 10) as sock:
        sock.sendall(data[: head_end + 5])
        answer = None
        if how == "stall":
            answer = closed_within(sock, 6)
        else:
            sock.settimeout(0.2)
            got = b""
            for i in range(head_end + 5, min(len(data), head_end + 40)):
                try:
                    sock.sendall(data[i : i + 1])
                except OSError:
                    break
                try:
                    chunk = sock.recv(65536)
                    got += chunk
                    if not chunk or b"\r\n\r\n" in got:
                        break
                except socket.timeout:
                    pass
            answer = got + (closed_within(sock, 3) or b"")
        took = time.monotonic() - started
    assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
    assert took < 4.5, took  # the 2 s deadline, not 35 * 0.2 s
    assert b"did not arrive within" in answer
    r = post(gateway, key, body)
    assert r.status_code == 200, r.text  # the concurrency place was given back
    assert gateway.app.in_flight == {}


def test_pipelined_requests_are_each_answered_and_charged(gateway: GatewayServer, upstream: Any) -> None:
    """Requests in one write, one of them refused before its body is read (an unknown
    key): each is answered in order and each admitted one is charged."""
    key = fresh_key()
    body = json.dumps(CHAT).encode()
    one = raw(gateway.port, key, body)
    stranger = raw(gateway.port, "sk-unknown", body)
    with connect(gateway.port) as sock:
        sock.sendall(one + stranger + one + one)
        pending = bytearray()
        statuses = [read_response(sock, 15, pending)[0] for _ in range(4)]
    assert statuses == [200, 401, 200, 200]
    assert abs(settled(gateway, key) - 3 * 5000) <= DRIFT


def test_a_client_leaving_while_the_upstream_thinks_frees_its_lease(gateway: GatewayServer, upstream: Any) -> None:
    app, _ = upstream
    app.head_pause = 3
    key = ONE_KEYS[6]
    with connect(gateway.port) as sock:
        sock.sendall(raw(gateway.port, key, json.dumps(CHAT).encode()))
        time.sleep(0.3)
    started = time.monotonic()
    assert wait_allowed(gateway, key, seconds=2), "the key's one place stayed held after its client left"
    assert time.monotonic() - started < 2
    assert wait_until_empty(gateway.app.in_flight)


def wait_until_empty(table: Dict[Any, Any], seconds: float = 2) -> bool:
    deadline = time.monotonic() + seconds
    while table and time.monotonic() < deadline:
        time.sleep(0.02)
    return not table


# --- never-ending streams and clients that leave --------------------------------------


def test_a_client_leaving_a_never_ending_stream_frees_its_lease(gateway: GatewayServer, upstream: Any) -> None:
    app, _ = upstream
    app.stream = True
    key = ONE_KEYS[2]
    body = json.dumps({**CHAT, "stream": True}).encode()
    with connect(gateway.port) as sock:
        sock.sendall(raw(gateway.port, key, body))
        sock.settimeout(5)
        got = b""
        while got.count(b"data:") < 5:
            got += sock.recv(65536)
        assert got.startswith(b"HTTP/1.1 200")
    assert app.stream_gone.wait(5), "the upstream stream went on after the client left"
    app.stream = False
    # The one concurrency place is free again, and the partial stream was charged.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not gateway.app.tiers["one"].limiter.peek(key).allowed:
        time.sleep(0.05)
    r = post(gateway, key, json.dumps(CHAT).encode())
    assert r.status_code == 200, r.text
    assert gateway.app.in_flight == {}
    assert settled(gateway, key, "one") > 5000  # the partial stream (its input at least) and the next call


# --- hostile upstream framing ---------------------------------------------------------


class RawUpstream:
    """A socket server answering every request with the same bytes, then closing."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.port = free_port()
        self.sock = socket.create_server(("127.0.0.1", self.port))
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(2)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(self.answer)
                    time.sleep(0.2)
                except OSError:
                    pass

    def __enter__(self) -> RawUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


USAGE_BODY = b'{"choices":[],"usage":{"prompt_tokens":3000,"completion_tokens":2000}}'


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\ncontent-length: 3\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\ntransfer-encoding: chunked\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nContent-Length: %d\r\nx-evil: a\x01b\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\nx-evil: a\x7fb\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: +%d\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\ncontent-length : 5\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: %d\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nTransfer-Encoding: identity\r\ncontent-length: %d\r\n",
    ],
)
def test_conflicting_upstream_framing_is_a_clear_answer_never_a_hang(tmp_path: Any, head: bytes) -> None:
    """Duplicate or conflicting framing, control bytes: the client gets a 502 or the
    answer with its usage charged; the next request on a fresh upstream works."""
    answer = (head % len(USAGE_BODY)) + b"\r\n" + USAGE_BODY
    _keys[0] = iter(KEYS)
    with RawUpstream(answer) as up, GatewayServer(_config(tmp_path, up.url)) as gw:
        key = fresh_key()
        started = time.monotonic()
        r = post(gw, key, json.dumps(CHAT).encode())
        assert time.monotonic() - started < 10
        assert r.status_code in (200, 502), (r.status_code, r.text)
        charge = settled(gw, key)
        if r.status_code == 200:
            assert abs(charge - 5000) <= DRIFT or charge >= 5000, charge
        else:
            assert "upstream" in r.text.lower(), r.text
        assert gw.app.in_flight == {}


# --- the upstream client's moving deadline ---------------------------------------------


@pytest.fixture
def impatient(tmp_path: Any, upstream: Tuple[Scripted, ASGIServer]) -> Iterator[GatewayServer]:
    """A gateway whose upstream timeout is 1 s."""
    _keys[0] = iter(KEYS)
    with GatewayServer(_config(tmp_path, upstream[1].url, upstream_timeout=1)) as gw:
        yield gw


def test_the_upstream_deadline_is_per_wait_not_per_answer(impatient: GatewayServer, upstream: Any) -> None:
    """Four body pieces 0.6 s apart (2.4 s in all) under a 1 s timeout: each wait is
    under it, so the answer arrives whole and its usage is charged."""
    app, _ = upstream
    doc = json.dumps({"object": "chat.completion", "choices": [], "usage": USAGE}).encode()
    pieces = [doc[:10], doc[10:20], doc[20:30], doc[30:]]
    app.answer = lambda body: (200, [(b"content-type", b"application/json")], pieces)
    app.pauses = [0.0, 0.6, 0.6, 0.6]
    key = fresh_key()
    r = post(impatient, key, json.dumps(CHAT).encode())
    assert r.status_code == 200 and r.content == doc
    assert abs(settled(impatient, key) - 5000) <= DRIFT


def test_an_upstream_silent_before_its_head_is_a_502_within_the_timeout(
    impatient: GatewayServer, upstream: Any
) -> None:
    app, _ = upstream
    app.head_pause = 8
    key = ONE_KEYS[4]
    started = time.monotonic()
    r = post(impatient, key, json.dumps(CHAT).encode())
    assert r.status_code == 502, r.text  # the gateway's answer to an upstream timeout
    assert "within the timeout" in r.json()["detail"]
    assert time.monotonic() - started < 4
    assert impatient.app.in_flight == {}
    assert impatient.app.tiers["one"].limiter.peek(key).allowed  # the concurrency place is back


def test_an_upstream_silent_mid_body_ends_the_answer_and_charges_the_reservation(
    impatient: GatewayServer, upstream: Any
) -> None:
    """The answer stalls after its first piece: within the 1 s timeout (and a margin)
    the client's answer ends, the key's place is free and what was reserved is
    charged (the usage never came; the upstream did the work)."""
    app, _ = upstream
    doc = json.dumps({"object": "chat.completion", "choices": [], "usage": USAGE}).encode()
    app.answer = lambda body: (200, [(b"content-type", b"application/json")], [doc[:10], doc[10:]])
    app.pauses = [0.0, 8.0]
    key = ONE_KEYS[5]
    started = time.monotonic()
    with connect(impatient.port, 10) as sock:
        sock.sendall(raw(impatient.port, key, json.dumps(CHAT).encode()))
        got = closed_within(sock, 6)
    assert got is not None, "the answer never ended"
    assert time.monotonic() - started < 4
    assert got.startswith(b"HTTP/1.1 200")
    assert impatient.app.in_flight == {}
    assert wait_allowed(impatient, key)
    assert settled(impatient, key, "one") >= 50  # at least max_tokens: the reservation


def wait_allowed(gw: GatewayServer, key: str, tier: str = "one", seconds: float = 3) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if gw.app.tiers[tier].limiter.peek(key).allowed:
            return True
        time.sleep(0.02)
    return False


# --- the LLM middleware alone: its header pass and its direct limiter calls -------------


def _middleware_server(limiter: Any, app: Scripted) -> ASGIServer:
    from nexus_limits.adapters.llm import LLMLimitMiddleware

    return ASGIServer(LLMLimitMiddleware(app, limiter=limiter))


def test_an_apps_limit_headers_are_replaced_by_the_middlewares_whatever_their_case() -> None:
    """_start_headers drops every header of the app's answer that one of the
    middleware's replaces (the gateway's proxy drops them before, so the middleware is
    served alone here): one value per name, the middleware's."""
    import nexus_limits as nl

    app = Scripted()
    theirs = [
        (b"X-RateLimit-Remaining-Tokens", b"999999999"),
        (b"x-ratelimit-remaining-tokens", b"888888888"),
        (b"X-RATELIMIT-LIMIT-TOKENS", b"777777777"),
        (b"x-ratelimit-reset-tokens", b"1s"),
        (b"X-Ratelimit-Remaining-Requests", b"5"),
    ]
    app.answer = lambda body: _json_answer(
        {"choices": [], "usage": USAGE}, [(b"content-type", b"application/json"), *theirs]
    )
    limiter = nl.TokenLimiter(requests="100/minute", tokens="100000/day")
    with _middleware_server(limiter, app) as server, connect(server.port) as sock:
        sock.sendall(raw(server.port, "k", json.dumps(CHAT).encode()))
        status, headers, _ = read_response(sock, 15)
    assert status == 200
    for name in ("x-ratelimit-remaining-tokens", "x-ratelimit-limit-tokens", "x-ratelimit-remaining-requests"):
        assert len(headers.get(name, [])) == 1, (name, headers.get(name))
    assert headers["x-ratelimit-limit-tokens"] == ["100000"]
    assert headers["x-ratelimit-remaining-requests"] == ["99"]


def test_direct_limiter_calls_charge_as_the_general_path() -> None:
    """The same requests (admitted, refused by the token limit, usage read, usage
    refused) through an in-process TokenLimiter (called directly) and through a
    subclass of it (called through the general path) leave the same state."""
    import nexus_limits as nl

    class Sub(nl.TokenLimiter):
        __slots__ = ()

    bodies = [
        json.dumps(CHAT).encode(),
        json.dumps({**CHAT, "max_tokens": 9000}).encode(),  # over what is left: a 429
        json.dumps({**CHAT, "max_tokens": 10}).encode(),
        b'{"model": "gpt-4o", "messages": []',  # a 400
    ]
    answers = [
        _json_answer({"choices": [], "usage": {"prompt_tokens": 4000, "completion_tokens": 2000}}),
        _json_answer({"choices": [], "usage": USAGE}),
        _json_answer({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": "x"}}),  # unreadable
        _json_answer({"choices": [], "usage": USAGE}),
    ]
    outcomes = []
    for kind in (nl.TokenLimiter, Sub):
        limiter = kind(requests="100/minute", tokens="10000/day")
        app = Scripted()
        got = []
        with _middleware_server(limiter, app) as server:
            for body, answer in zip(bodies, answers):
                app.answer = lambda _b, answer=answer: answer
                r = httpx.post(
                    f"{server.url}/v1/chat/completions",
                    content=body,
                    headers={"authorization": "Bearer k", "content-type": "application/json"},
                    timeout=15,
                )
                time.sleep(0.1)  # settled just after the client has the last byte
                got.append((r.status_code, 10000 - int(limiter.peek("k").tokens.remaining)))
        outcomes.append(got)
    direct, general = outcomes
    assert [s for s, _ in direct] == [200, 429, 200, 400]
    assert [s for s, _ in direct] == [s for s, _ in general]
    for (_, a), (_, b) in zip(direct, general):
        assert abs(a - b) <= 2, (direct, general)


# --- the server's one moving timer per connection --------------------------------------


@pytest.fixture
def hasty(tmp_path: Any, upstream: Tuple[Scripted, ASGIServer]) -> Iterator[GatewayServer]:
    """A gateway whose request heads must arrive within 1 s, idle connections kept 1 s."""
    _keys[0] = iter(KEYS)
    server = "header_timeout = 1\nkeep_alive_timeout = 1"
    with GatewayServer(_config(tmp_path, upstream[1].url, server=server)) as gw:
        yield gw


def _answered(sock: socket.socket, port: int, key: str) -> None:
    sock.sendall(raw(port, key, json.dumps(CHAT).encode()))
    status, _, _ = read_response(sock, 10)
    assert status == 200


def test_an_idle_kept_alive_connection_is_closed_after_the_keep_alive_timeout(hasty: GatewayServer) -> None:
    with connect(hasty.port, 10) as sock:
        _answered(sock, hasty.port, fresh_key())
        started = time.monotonic()
        assert closed_within(sock, 4) == b""
        assert 0.8 < time.monotonic() - started < 2.5


@pytest.mark.parametrize("how", ["one byte then silence", "a byte every 0.15 s"])
def test_a_next_head_that_stalls_or_drips_is_cut_at_the_head_deadline(hasty: GatewayServer, how: str) -> None:
    """After an answer, the next head must be whole within header_timeout (1 s) of it:
    a byte that arrives ends the keep-alive wait but not the head's deadline."""
    key = fresh_key()
    with connect(hasty.port, 10) as sock:
        _answered(sock, hasty.port, key)
        started = time.monotonic()
        head = raw(hasty.port, key, json.dumps(CHAT).encode())
        if how == "one byte then silence":
            sock.sendall(head[:1])
            got = closed_within(sock, 4)
        else:
            got = _drip(sock, head, 0.15)
        took = time.monotonic() - started
    assert got is not None and got.startswith(b"HTTP/1.1 408"), got
    assert took < 2.5, took


def _drip(sock: socket.socket, data: bytes, every: float, most: int = 40) -> Optional[bytes]:
    """Sends ``data`` a byte every ``every`` seconds (at most ``most`` bytes); what the
    server sent before it closed the connection, or None if it never did."""
    got = b""
    sock.settimeout(every)
    for i in range(min(most, len(data))):
        try:
            sock.sendall(data[i : i + 1])
        except OSError:
            return got
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk
    rest = closed_within(sock, 3)
    return None if rest is None else got + rest


def test_a_head_dripping_on_a_new_connection_is_cut_at_the_head_deadline(hasty: GatewayServer) -> None:
    head = raw(hasty.port, fresh_key(), json.dumps(CHAT).encode())
    started = time.monotonic()
    with connect(hasty.port, 10) as sock:
        got = _drip(sock, head, 0.15)
    assert got is not None and got.startswith(b"HTTP/1.1 408"), got
    assert time.monotonic() - started < 2.5


def test_a_slow_answer_is_not_cut_by_the_connections_timers(hasty: GatewayServer, upstream: Any) -> None:
    """The head and keep-alive deadlines stop while a request is served: an answer
    that takes 2.5 s (longer than both) arrives whole, and the connection serves the
    next request."""
    app, _ = upstream
    doc = json.dumps({"choices": [], "usage": USAGE}).encode()
    app.answer = lambda body: (200, [(b"content-type", b"application/json")], [doc[:5], doc[5:]])
    app.pauses = [1.2, 1.3]
    key = fresh_key()
    with connect(hasty.port, 10) as sock:
        _answered(sock, hasty.port, key)
        app.pauses = []
        _answered(sock, hasty.port, key)
    assert abs(settled(hasty, key) - 10000) <= DRIFT


# --- streams: the usage chunk the gateway asked for, in any framing --------------------


def _stream(eol: bytes, data: bytes = b"data: ") -> bytes:
    usage = json.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": USAGE}).encode()
    events = [
        b'{"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "hi"}}]}',
        usage,
        b"[DONE]",
    ]
    return b"".join(b"id: 1" + eol + data + e + eol + eol for e in events)


_STREAMS = {
    "lf": (_stream(b"\n"), 0),
    "crlf": (_stream(b"\r\n"), 0),
    "cr": (_stream(b"\r"), 0),
    "no space after data:": (_stream(b"\n", b"data:"), 0),
    "byte by byte": (_stream(b"\n"), 1),
    "seven bytes at a time": (_stream(b"\r\n"), 7),
    "gzip": (gzip.compress(_stream(b"\n")), 0),
}


@pytest.mark.parametrize("name", list(_STREAMS))
@pytest.mark.parametrize("asked", [False, True])
def test_a_streams_usage_is_charged_and_stripped_only_when_the_client_did_not_ask(
    gateway: GatewayServer, upstream: Any, name: str, asked: bool
) -> None:
    """The gateway asks for the usage chunk of every stream: it is charged (5000) in
    any line ending, split or coding, and the client sees it only if it asked."""
    app, _ = upstream
    data, step = _STREAMS[name]
    headers = [(b"content-type", b"text/event-stream")]
    if name == "gzip":
        headers.append((b"content-encoding", b"gzip"))
    pieces = [data[i : i + step] for i in range(0, len(data), step)] if step else [data]
    app.answer = lambda body: (200, headers, pieces)
    request: Dict[str, Any] = {**CHAT, "stream": True}
    if asked:
        request["stream_options"] = {"include_usage": True}
    key = fresh_key()
    with httpx.Client(timeout=15) as http:
        r = http.post(
            f"{gateway.url}/v1/chat/completions",
            content=json.dumps(request).encode(),
            headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        )
    assert r.status_code == 200
    sent = json.loads(app.bodies[-1])
    assert sent["stream_options"]["include_usage"] is True
    assert (b'"usage"' in r.content) is asked, r.content
    assert b"[DONE]" in r.content
    assert abs(settled(gateway, key) - 5000) <= DRIFT
