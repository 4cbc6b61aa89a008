"""The LLM middleware against hostile request bodies: every bad body is a 400 naming the
field (never a 500, never a call upstream, never a charge), the token counter raises only
its documented errors for any JSON value, a huge body is counted without stalling other
clients, caches keyed by what clients send stay bounded, a key over its request limit is
refused before its body is read, and one key's reported usage cannot move everyone's
Anthropic estimates. Served by real uvicorn where the network matters."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import tracemalloc
from typing import Any, Dict, List, Tuple

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import fake_llm
from support.servers import ASGIServer

import nexus_limits as nl
from nexus_limits.adapters.llm import LLMLimitMiddleware
from nexus_limits.tokens import (
    AnthropicEstimator,
    OutputEstimate,
    RequestBodyError,
    _encodings,
    anthropic_estimator,
    count_request_tokens,
)

AUTH = {"authorization": "Bearer key-1"}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 100}
MESSAGES = {"model": "claude-x", "max_tokens": 100, "messages": [{"role": "user", "content": "hello"}]}


def budget(**kw: Any) -> nl.TokenLimiter:
    args: Dict[str, Any] = {"requests": "1000/minute", "tokens": "1000000/hour", "concurrency": 4}
    args.update(kw)
    return nl.TokenLimiter(**args)


def untouched(tl: nl.TokenLimiter, key: str = "key-1") -> bool:
    probe = tl.peek(key)  # as if it took one request: one fewer remaining
    return probe.requests.remaining == probe.requests.limit - 1 and probe.tokens.remaining == probe.tokens.limit


def with_field(doc: Dict[str, Any], **fields: Any) -> bytes:
    return json.dumps({**doc, **fields}).encode()


NESTED = b'{"model": "gpt-4o", "messages": [], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
# (path, raw body, the field the answer must name)
HOSTILE: List[Tuple[str, bytes, str]] = [
    ("/v1/chat/completions", NESTED, "body"),
    ("/v1/chat/completions", b"[1, 2]", "body"),
    ("/v1/chat/completions", b'"a string"', "body"),
    ("/v1/chat/completions", b"42", "body"),
    ("/v1/chat/completions", b"null", "body"),
    ("/v1/chat/completions", b"true", "body"),
    ("/v1/chat/completions", b"", "body"),
    ("/v1/chat/completions", b"   ", "body"),
    ("/v1/chat/completions", b"{not json", "body"),
    ("/v1/chat/completions", b'{"model": "\xff\xfe"}', "body"),
    ("/v1/chat/completions", b'{"model": "gpt-4o", "messages": [], "max_tokens": ' + b"9" * 5000 + b"}", "body"),
    ("/v1/chat/completions", with_field(CHAT)[:-1] + b', "max_tokens": NaN}', "body"),
    ("/v1/chat/completions", with_field(CHAT)[:-1] + b', "temperature": Infinity}', "body"),
    ("/v1/chat/completions", with_field(CHAT)[:-1] + b', "max_tokens": -Infinity}', "body"),
    ("/v1/chat/completions", with_field(CHAT, max_tokens=-1), "max_tokens"),
    ("/v1/chat/completions", with_field(CHAT, max_tokens=1.5), "max_tokens"),
    ("/v1/chat/completions", with_field(CHAT, max_tokens=100.0), "max_tokens"),
    ("/v1/chat/completions", with_field(CHAT, max_tokens=2**53), "max_tokens"),
    ("/v1/chat/completions", with_field(CHAT, max_tokens=10**30), "max_tokens"),
    ("/v1/chat/completions", with_field(CHAT, max_tokens=2**64 + 1), "max_tokens"),
    ("/v1/chat/completions", with_field(CHAT)[:-1] + b', "max_tokens": 1e400}', "max_tokens"),
    ("/v1/chat/completions", with_field(CHAT, max_tokens="100"), "max_tokens"),
    ("/v1/chat/completions", with_field(CHAT, max_tokens=True), "max_tokens"),
    ("/v1/chat/completions", with_field(CHAT, max_tokens=[100]), "max_tokens"),
    ("/v1/chat/completions", with_field(CHAT, max_completion_tokens=-5), "max_completion_tokens"),
    ("/v1/chat/completions", with_field(CHAT, max_completion_tokens=10, max_tokens="x"), "max_tokens"),
    (
        "/v1/responses",
        json.dumps({"model": "gpt-4.1", "input": "hi", "max_output_tokens": 0.5}).encode(),
        "max_output_tokens",
    ),
    ("/v1/chat/completions", with_field(CHAT, model=5), "model"),
    ("/v1/chat/completions", with_field(CHAT, model=["gpt-4o"]), "model"),
    ("/v1/chat/completions", with_field(CHAT, model="m" * 10_000), "model"),
    ("/v1/chat/completions", with_field(CHAT, stream="yes"), "stream"),
    ("/v1/chat/completions", with_field(CHAT, stream=True, stream_options=[1]), "stream_options"),
    ("/v1/chat/completions", with_field(CHAT, messages="hi"), "messages"),
    ("/v1/chat/completions", with_field(CHAT, messages={"role": "user"}), "messages"),
    ("/v1/chat/completions", with_field(CHAT, messages=[1]), "messages[0]"),
    ("/v1/chat/completions", with_field(CHAT, messages=[{"content": 5}]), "messages[0].content"),
    ("/v1/chat/completions", with_field(CHAT, messages=[{"content": {"a": 1}}]), "messages[0].content"),
    ("/v1/chat/completions", with_field(CHAT, messages=[{"content": ["hi"]}]), "messages[0].content[0]"),
    (
        "/v1/chat/completions",
        with_field(CHAT, messages=[{"content": [{"type": "text", "text": 5}]}]),
        "messages[0].content[0].text",
    ),
    (
        "/v1/chat/completions",
        with_field(CHAT, messages=[{"content": [{"type": "image_url", "image_url": 5}]}]),
        "messages[0].content[0].image_url",
    ),
    ("/v1/chat/completions", with_field(CHAT, messages=[{"role": 5, "content": "x"}]), "messages[0].role"),
    ("/v1/chat/completions", with_field(CHAT, messages=[{"name": [], "content": "x"}]), "messages[0].name"),
    ("/v1/chat/completions", with_field(CHAT, messages=[{"tool_calls": 5}]), "messages[0].tool_calls"),
    (
        "/v1/chat/completions",
        with_field(CHAT, messages=[{"tool_calls": [{"function": 5}]}]),
        "messages[0].tool_calls[0].function",
    ),
    ("/v1/chat/completions", with_field(CHAT, tools="x"), "tools"),
    ("/v1/chat/completions", with_field(CHAT, tools={"function": {}}), "tools"),
    ("/v1/chat/completions", with_field(CHAT, tools=[1]), "tools[0]"),
    ("/v1/chat/completions", with_field(CHAT, tools=[{"function": "f"}]), "tools[0].function"),
    ("/v1/chat/completions", with_field(CHAT, tools=[{"function": {"name": 5}}]), "tools[0].name"),
    ("/v1/chat/completions", with_field(CHAT, functions="f"), "functions"),
    ("/v1/chat/completions", json.dumps({"model": "gpt-4o"}).encode(), "body"),
    ("/v1/responses", json.dumps({"model": "gpt-4.1", "input": 5}).encode(), "input"),
    ("/v1/responses", json.dumps({"model": "gpt-4.1", "input": [5]}).encode(), "input[0]"),
    ("/v1/responses", json.dumps({"model": "gpt-4.1", "input": "x", "instructions": 5}).encode(), "instructions"),
    ("/v1/embeddings", json.dumps({"model": "text-embedding-3-small", "input": [[1, "a"]]}).encode(), "input[0][1]"),
    ("/v1/embeddings", json.dumps({"model": "text-embedding-3-small", "input": {"a": 1}}).encode(), "input"),
    ("/v1/messages", with_field(MESSAGES, messages="hi"), "messages"),
    ("/v1/messages", with_field(MESSAGES, messages=[["hi"]]), "messages[0]"),
    ("/v1/messages", with_field(MESSAGES, messages=[{"content": 5}]), "messages[0].content"),
    ("/v1/messages", with_field(MESSAGES, messages=[{"content": [5]}]), "messages[0].content[0]"),
    (
        "/v1/messages",
        with_field(MESSAGES, messages=[{"content": [{"type": "image", "source": "x"}]}]),
        "messages[0].content[0].source",
    ),
    ("/v1/messages", with_field(MESSAGES, system=5), "system"),
    ("/v1/messages", with_field(MESSAGES, tools="x"), "tools"),
    ("/v1/messages", with_field(MESSAGES, tools=[1]), "tools[0]"),
    ("/v1/messages", with_field(MESSAGES, max_tokens=-1), "max_tokens"),
    ("/v1/messages", NESTED.replace(b"gpt-4o", b"claude-x"), "body"),
]


@pytest.fixture(scope="module")
def served():
    tl = budget()
    with (
        ASGIServer(LLMLimitMiddleware(fake_llm.app, limiter=tl)) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        yield tl, http


@pytest.mark.parametrize(("path", "raw", "field"), HOSTILE, ids=[f"{i}-{h[2]}" for i, h in enumerate(HOSTILE)])
def test_hostile_bodies_are_400s_naming_the_field(served, path, raw, field):
    tl, http = served
    seen = len(fake_llm.SEEN)
    r = http.post(path, content=raw, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    if path == "/v1/messages":
        doc = r.json()
        assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
        assert field in doc["error"]["message"] or field == "body"
    else:
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == field, error
        assert error["message"].startswith("invalid request body: ")
        if field != "body":
            assert f"'{field}'" in error["message"], "the message names the field"
    assert len(fake_llm.SEEN) == seen, "nothing reached the upstream"
    assert untouched(tl), "a refused body charges nothing"
    # The same refusal as problem+json when the client asks for it.
    r = http.post(path, content=raw, headers={**AUTH, "accept": "application/problem+json"})
    assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json"
    doc = r.json()
    assert doc["status"] == 400 and doc["detail"].startswith("invalid request body")
    assert doc.get("param", "body") == field


def test_body_too_large_is_a_413_without_reading_it_all(served):
    tl, _ = served
    app = LLMLimitMiddleware(fake_llm.app, limiter=tl, max_body=1000)
    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        r = http.post("/v1/chat/completions", json={**CHAT, "pad": "x" * 2000}, headers=AUTH)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = http.post("/v1/messages", json={**MESSAGES, "pad": "x" * 2000}, headers=AUTH)
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    assert untouched(tl)


def test_targets_the_middleware_cannot_judge_are_400s(served):
    tl, _ = served
    with ASGIServer(LLMLimitMiddleware(fake_llm.app, limiter=tl)) as server:
        for target in (b"/v1/chat%2Fcompletions", b"http://evil.example/v1/chat/completions", b"/v1/chat/%zz"):
            status, body = raw_exchange(
                server.port,
                b"POST " + target + b" HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer key-1\r\nContent-Length: 2\r\n\r\n{}",
            )
            assert status == 400, (target, body)
        # Spelled differently, the same LLM path is still metered.
        status, body = raw_exchange(
            server.port,
            b"POST /v1//chat/./completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-1\r\n"
            b"Content-Length: 2\r\n\r\n[]",
        )
        assert status == 400 and b"must be a JSON object" in body, "judged as the chat path it is"
    assert untouched(tl)


def raw_exchange(port: int, request: bytes, read_only_head: bool = False) -> Tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length and not read_only_head:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        return int(head.split(b" ")[1]), rest


# -- the counter over arbitrary JSON ------------------------------------------------------

NAMES = st.sampled_from(
    [
        "model", "messages", "content", "role", "name", "tool_calls", "function", "arguments", "tools",
        "functions", "type", "text", "image_url", "url", "detail", "refusal", "input", "prompt",
        "instructions", "output", "parameters", "properties", "enum", "description", "system", "source",
        "data", "media_type", "max_tokens", "stream",
    ]
)  # fmt: skip
LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(NAMES | st.text(max_size=5), inner, max_size=5),
    max_leaves=40,
)
TYPES = st.sampled_from(["text", "image_url", "input_text", "input_image", "refusal", "image", "tool_result", "x"])
PART = st.fixed_dictionaries(
    {"type": TYPES}, optional={"text": JSON, "image_url": JSON, "source": JSON, "content": JSON}
)
MESSAGE = st.fixed_dictionaries(
    {}, optional={"role": JSON, "content": JSON | st.lists(PART | JSON, max_size=3), "name": JSON, "tool_calls": JSON}
)
BODY = st.fixed_dictionaries(
    {},
    optional={
        "model": st.none()
        | st.sampled_from(["gpt-4o", "gpt-4", "text-embedding-3-small", "claude-x", "davinci"])
        | JSON,
        "messages": st.lists(MESSAGE | JSON, max_size=3) | JSON,
        "tools": st.lists(JSON, max_size=3) | JSON,
        "functions": JSON,
        "input": JSON,
        "prompt": JSON,
        "instructions": JSON,
        "system": JSON,
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODY | JSON, provider=st.sampled_from(["openai", "anthropic"]))
def test_the_counter_raises_only_its_documented_errors(body, provider):
    try:
        count = count_request_tokens(body, provider=provider, key="fuzz")
    except RequestBodyError as error:
        assert isinstance(error, ValueError) and isinstance(error.field, str) and str(error)
        return
    except TypeError as error:
        assert not isinstance(body, dict), f"TypeError only for a body that is not a dict: {error}"
        return
    assert isinstance(count.tokens, int) and count.tokens >= 0


def asgi_call(app: Any, path: str, raw: bytes, headers: Any = AUTH) -> Tuple[int, bytes]:
    """One request through an ASGI app in this thread (no server): (status, body)."""

    async def run() -> Tuple[int, bytes]:
        sent: List[Dict[str, Any]] = []
        pending = [{"type": "http.request", "body": raw, "more_body": False}]
        never = asyncio.Event()

        async def receive() -> Dict[str, Any]:
            if pending:
                return pending.pop()
            await never.wait()
            return {"type": "http.disconnect"}  # pragma: no cover

        async def send(message: Dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
            "client": ("127.0.0.1", 1),
        }
        await app(scope, receive, send)
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")

    return asyncio.run(run())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=BODY | JSON, path=st.sampled_from(["/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/messages"])
)
def test_the_middleware_answers_any_json_with_a_200_or_a_400(body, path):
    app = LLMLimitMiddleware(fake_llm.app, limiter=budget())
    status, answer = asgi_call(app, path, json.dumps(body).encode())
    assert status in (200, 400, 429), answer
    if status == 400:
        assert json.loads(answer)


# -- a big body does not stall other clients --------------------------------------------


def test_a_huge_body_is_counted_without_stalling_other_clients(monkeypatch):
    from nexus_limits.tokens import _count

    # Every character counted exactly: the longest a body of this size can take.
    monkeypatch.setattr(_count, "MAX_EXACT_CHARS", 10_000_000)
    words = " ".join(f"w{i % 977}x{i % 13}" for i in range(700_000))[:5_000_000]
    big = {"model": "gpt-4o", "messages": [{"role": "user", "content": words}], "max_tokens": 10}
    raw = json.dumps(big).encode()
    assert len(raw) > 4_900_000
    count_request_tokens(CHAT)  # the encoding is built once, before timing
    started = time.perf_counter()
    json.loads(raw)
    count_request_tokens(big)
    counting = time.perf_counter() - started  # parsed and counted here, on the loaded machine as it is
    tl = budget(tokens="1000000000/hour", requests="1000000/minute")
    with ASGIServer(LLMLimitMiddleware(fake_llm.app, limiter=tl)) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert http.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200  # warm
        done = threading.Event()
        big_status: List[int] = []

        def send_big() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as http:
                big_status.append(http.post("/v1/chat/completions", content=raw, headers=AUTH).status_code)
            done.set()

        thread = threading.Thread(target=send_big)
        thread.start()
        slowest = 0.0
        small = 0
        with httpx.Client(base_url=server.url, timeout=60, headers={"authorization": "Bearer key-2"}) as http:
            deadline = time.monotonic() + 30
            while not done.is_set() and time.monotonic() < deadline and small < 20_000:
                t = time.perf_counter()
                assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
                slowest = max(slowest, time.perf_counter() - t)
                small += 1
        thread.join(60)
    assert big_status == [200]
    assert small >= 3, "small requests went through while the big one was being counted"
    # Counted on the event loop, a small request would wait the whole counting time.
    bound = counting / 2
    assert slowest < bound, f"a small request took {slowest:.3f} s; counting the big body takes {counting:.3f} s"


def test_counting_is_bounded_whatever_the_text(monkeypatch):
    from nexus_limits.tokens import _count

    encoded: List[int] = []
    real = _count.get_encoding

    class Spy:
        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.name = inner.name

        def encode_ordinary(self, text: str) -> List[int]:
            encoded.append(len(text))
            return self.inner.encode_ordinary(text)

    monkeypatch.setattr(_count, "get_encoding", lambda name: Spy(real(name)))
    monkeypatch.setattr(_count, "MAX_EXACT_CHARS", 50_000)
    text = "".join(f"{i % 1000} " for i in range(60_000))  # about 230,000 characters
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": text}] * 3}
    count = count_request_tokens(body)
    assert sum(encoded) <= 50_000 + 100, "at most MAX_EXACT_CHARS characters were encoded"
    exact = 3 * len(real("o200k_base").encode_ordinary(text))
    assert not count.exact and 0.95 * exact <= count.tokens - 3 * 4 - 3 <= 1.05 * exact, "the rest extrapolated"


# -- bounded caches -----------------------------------------------------------------------


def test_ten_thousand_model_names_leave_no_trace():
    tl = budget(requests="1000000/minute", tokens="1000000000/hour", concurrency=None)
    estimator = anthropic_estimator
    app = LLMLimitMiddleware(fake_llm.app, limiter=tl, output=OutputEstimate(default=1))
    asgi_call(app, "/v1/chat/completions", json.dumps(CHAT).encode())
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(10_000):
            name = f"model-{i}-" + "x" * 200
            count_request_tokens({"model": name, "messages": []})
            count_request_tokens({"model": name, "messages": []}, provider="anthropic", key=f"k{i}")
            estimator.observe(name, 10, 12, key=f"k{i % 7}")
        for i in range(300):
            name = f"gpt-4o-{i}-" + "y" * 200
            status, _ = asgi_call(app, "/v1/chat/completions", with_field(CHAT, model=name))
            assert status == 200
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(_encodings._cache) <= len(_encodings.ENCODINGS), "encodings are cached by encoding, not by model"
    assert len(estimator._families) <= estimator.max_families
    assert grown < 8 * 2**20, f"{grown} bytes kept after 10,000 model names"


def test_the_learned_output_estimate_is_bounded_in_models_too():
    from nexus_limits.spend import LearnedOutputEstimate

    learned = LearnedOutputEstimate(default=10, max_series=50)
    for i in range(2000):
        learned.observe(f"key-{i % 3}", f"model-{i}-" + "z" * 1000, 5)
    assert len(learned) <= 50 and len(learned._models) <= 50
    assert all(len(m) <= 100 for m in learned._models), "long names are pooled, not kept"


# -- refused before the body is read -----------------------------------------------------


def test_a_key_over_its_request_limit_is_refused_before_its_body_is_read():
    tl = budget(requests="1/hour")
    with ASGIServer(LLMLimitMiddleware(fake_llm.app, limiter=tl)) as server:
        with httpx.Client(base_url=server.url) as http:
            assert http.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
        seen = len(fake_llm.SEEN)
        # Announces 10 MB, sends 10 bytes, and waits: only a refusal that does not read
        # the body can answer.
        status, body = raw_exchange(
            server.port,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-1\r\n"
            b'Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n{"model":',
        )
        assert status == 429
        error = json.loads(body)["error"]
        assert error["budget"] == "requests" and "request limit 1/hour reached" in error["message"]
        assert len(fake_llm.SEEN) == seen
        # Another key is judged on its body as usual.
        with httpx.Client(base_url=server.url) as http:
            r = http.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer key-2"})
            assert r.status_code == 200


# -- calibration one key cannot move for everyone -------------------------------------


def test_a_hostile_key_cannot_move_the_estimates_of_others():
    est = AnthropicEstimator()
    body = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "x" * 3500}]}
    base = est.base(body)
    honest = est.estimate(body, key="honest")
    for actual in (base * 1000, 0, 10**18, base * 4) * 250:  # 1,000 absurd reports
        est.observe("claude-sonnet-4-5", base, actual, key="evil")
    for _ in range(20):
        est.observe("claude-sonnet-4-5", base, 10**9, key="evil")
    assert abs(est.estimate(body, key="honest") - honest) <= est.max_shift * base + 1
    assert abs(est.estimate(body, key="newcomer") - honest) <= est.max_shift * base + 1
    evil = est.factor("claude-sonnet-4-5", key="evil")
    assert evil <= est.factor("claude-sonnet-4-5") * est.key_spread, "even its own factor is bounded"
    # An honest key's own samples still teach its own estimates.
    for _ in range(50):
        est.observe("claude-sonnet-4-5", base, int(base * 1.4), key="honest")
    assert est.factor("claude-sonnet-4-5", key="honest") == pytest.approx(1.4, rel=0.02)
    # Bad numbers teach nothing at all.
    shared = est.factor("claude-sonnet-4-5")
    for bad in (float("nan"), float("inf"), -5, "12", None, True):
        est.observe("claude-sonnet-4-5", base, bad, key="evil2")  # type: ignore[arg-type]
    assert est.factor("claude-sonnet-4-5") == shared and est.samples("claude-sonnet-4-5", key="evil2") == 0


def test_a_hostile_key_through_the_middleware():
    """The upstream reports absurd input usage for one key's calls: others' reservations
    stay where they were."""

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        auth = dict(scope["headers"]).get(b"authorization", b"")
        used = 10**5 if auth.endswith(b"evil") else 20
        doc = {"type": "message", "usage": {"input_tokens": used, "output_tokens": 1}}
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(doc).encode()})

    tl = budget(tokens="1000000000/hour", requests="100000/minute")
    body = {"model": "claude-hostile-test", "max_tokens": 0, "messages": [{"role": "user", "content": "y" * 700}]}
    before = count_request_tokens(body, provider="anthropic", key="honest").tokens
    with ASGIServer(LLMLimitMiddleware(upstream, limiter=tl)) as server, httpx.Client(base_url=server.url) as http:
        for _ in range(150):
            assert http.post("/v1/messages", json=body, headers={"authorization": "Bearer evil"}).status_code == 200
    after = count_request_tokens(body, provider="anthropic", key="honest").tokens
    assert anthropic_estimator.samples("claude-hostile-test", key="evil") == 150
    assert after <= before * (1 + anthropic_estimator.max_shift) + 1
