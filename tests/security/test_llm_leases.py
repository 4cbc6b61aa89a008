"""The LLM middleware against upstreams and clients that misbehave: usage an upstream
could poison settles at the estimate and frees the concurrency place at once; a stream
the upstream cuts is charged for what it delivered; a client that goes away has the app
cancelled within 100 ms; refusals carry a Retry-After the official SDKs can use, in the
provider's own error format; the gateway's rate-limit headers replace the app's; every
request is metered with ``meter_all``. Real uvicorn, raw sockets, the official SDKs."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import socket
import threading
import time
from typing import Any, Dict, List, Optional

import anthropic
import httpx
import openai
import pytest
from support.servers import ASGIServer

import nexus_limits as nl
from nexus_limits.adapters.llm import LLMLimitMiddleware
from nexus_limits.tokens import count_request_tokens

AUTH = {"authorization": "Bearer key-1"}


def chat(model: str, **extra: Any) -> Dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 100, **extra}


def estimate_of(body: Dict[str, Any]) -> int:
    return count_request_tokens(body).tokens + body.get("max_tokens", 0)


def budget(**kw: Any) -> nl.TokenLimiter:
    args: Dict[str, Any] = {"requests": "1000/minute", "tokens": "10000/hour", "concurrency": 1}
    args.update(kw)
    return nl.TokenLimiter(**args)


def tokens_left(tl: nl.TokenLimiter, key: str = "key-1") -> int:
    return int(tl.peek(key).tokens.remaining)


def place_free(tl: nl.TokenLimiter, key: str = "key-1") -> bool:
    return bool(tl.peek(key).concurrency.allowed)


def frame(doc: Any) -> bytes:
    return b"data: " + (doc if isinstance(doc, bytes) else json.dumps(doc).encode()) + b"\n\n"


CHUNK = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": "Hello"}}]}
CHUNK2 = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": " there"}}]}
USAGE_CHUNK = {
    "object": "chat.completion.chunk",
    "choices": [],
    "usage": {"prompt_tokens": 30, "completion_tokens": 20, "total_tokens": 50},
}


class Upstream:
    """A scripted upstream: what it does depends on the request's model name. It records
    when each call started and when it was cancelled (monotonic clock)."""

    def __init__(self) -> None:
        self.started: Dict[str, threading.Event] = {}
        self.cancelled: Dict[str, float] = {}
        self.calls = 0
        self.headers: List[Any] = []

    def event(self, model: str) -> threading.Event:
        return self.started.setdefault(model, threading.Event())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.calls += 1
        self.headers.append(scope["headers"])
        if scope["path"] not in ("/v1/chat/completions", "/v1/messages"):
            await self.json(send, {"object": "list", "data": []})
            return
        body = json.loads(raw) if raw else {}
        model = body.get("model", "")
        kind, _, arg = model.partition(":")
        try:
            await self.play(kind, arg, model, body, receive, send)
        except asyncio.CancelledError:
            self.cancelled.setdefault(model, time.monotonic())
            raise

    async def json(self, send: Any, doc: Any, raw: Optional[bytes] = None, headers: Any = ()) -> None:
        start = [(b"content-type", b"application/json"), *headers]
        await send({"type": "http.response.start", "status": 200, "headers": start})
        await send({"type": "http.response.body", "body": raw if raw is not None else json.dumps(doc).encode()})

    async def sse_start(self, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})

    async def play(self, kind: str, arg: str, model: str, body: Dict[str, Any], receive: Any, send: Any) -> None:
        self.event(model).set()
        if kind == "usage":  # a 2xx whose usage is the raw JSON text `arg`
            text = (
                b'{"object": "chat.completion", "choices": []' + (b', "usage": ' + arg.encode() if arg else b"") + b"}"
            )
            await self.json(send, None, raw=text)
        elif kind == "ausage":  # the same, Anthropic-shaped
            await self.json(send, None, raw=b'{"type": "message", "content": [], "usage": ' + arg.encode() + b"}")
        elif kind == "cut-stream":  # the upstream fails after one chunk
            await self.sse_start(send)
            await send({"type": "http.response.body", "body": frame(CHUNK), "more_body": True})
            raise RuntimeError("the upstream connection broke")
        elif kind == "no-usage-stream":  # ends without its usage chunk
            await self.sse_start(send)
            for doc in (CHUNK, CHUNK2):
                await send({"type": "http.response.body", "body": frame(doc), "more_body": True})
            await send({"type": "http.response.body", "body": frame(b"[DONE]")})
        elif kind == "stream":
            await self.sse_start(send)
            for doc in (CHUNK, CHUNK2, USAGE_CHUNK):
                await send({"type": "http.response.body", "body": frame(doc), "more_body": True})
            await send({"type": "http.response.body", "body": frame(b"[DONE]")})
        elif kind == "wait-head":  # silent before any header
            await asyncio.sleep(30)
            await self.json(send, {"usage": USAGE_CHUNK["usage"]})
        elif kind == "wait-mid":  # one chunk, then silence until the client (or proxy) leaves
            await self.sse_start(send)
            await send({"type": "http.response.body", "body": frame(CHUNK), "more_body": True})
            message = await asyncio.wait_for(receive(), 30)
            if message["type"] == "http.disconnect":
                self.cancelled.setdefault(model, time.monotonic())
        elif kind == "hold":
            await asyncio.sleep(float(arg))
            await self.json(send, {"choices": [], "usage": USAGE_CHUNK["usage"]})
        elif kind == "headers":  # the provider's own rate-limit headers
            theirs = [
                (b"x-ratelimit-remaining-tokens", b"999"),
                (b"X-RateLimit-Limit-Requests", b"10000"),
                (b"x-ratelimit-limit-tokens", b"2000000"),
                (b"x-request-id", b"req_1"),
            ]
            await self.json(send, {"choices": [], "usage": USAGE_CHUNK["usage"]}, headers=theirs)
        elif kind == "gzip":
            raw = gzip.compress(json.dumps({"object": "chat.completion", "usage": USAGE_CHUNK["usage"]}).encode())
            await self.json(send, None, raw=raw, headers=[(b"content-encoding", b"gzip")])
        else:
            await self.json(send, {"object": "chat.completion", "choices": [], "usage": USAGE_CHUNK["usage"]})


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


# -- usage an upstream could poison ----------------------------------------------------

POISONED = [
    "",  # no usage at all
    '"lots"',
    "[]",
    "null",
    '{"prompt_tokens": -5, "completion_tokens": 3}',
    '{"prompt_tokens": "10", "completion_tokens": 3}',
    '{"prompt_tokens": NaN, "completion_tokens": 3}',
    '{"prompt_tokens": Infinity, "completion_tokens": 3}',
    '{"prompt_tokens": 1e300, "completion_tokens": 3}',
    '{"prompt_tokens": 10.5, "completion_tokens": 3}',
    '{"prompt_tokens": 9007199254740993, "completion_tokens": 3}',
    '{"prompt_tokens": 4503599627370496, "completion_tokens": 4503599627370496}',
    '{"prompt_tokens": 10, "completion_tokens": true}',
    '{"prompt_tokens": 10, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 50}}',
]


@pytest.mark.parametrize("usage", POISONED)
def test_poisoned_usage_settles_at_the_estimate_and_frees_the_place_at_once(upstream, usage, caplog):
    tl = budget()
    body = chat(f"usage:{usage}")
    with ASGIServer(LLMLimitMiddleware(upstream, limiter=tl)) as server, httpx.Client(base_url=server.url) as http:
        with caplog.at_level(logging.WARNING, logger="nexus_limits.llm"):
            r = http.post("/v1/chat/completions", json=body, headers=AUTH)
            assert r.status_code == 200 and r.content.startswith(b'{"object"'), "the answer passes unchanged"
            assert place_free(tl), "the lease ended with the response, not after lease_ttl"
            assert tokens_left(tl) == 10000 - estimate_of(body), "settled at the estimate"
            assert http.post("/v1/chat/completions", json=chat("fine"), headers=AUTH).status_code == 200
    assert any("estimate" in rec.getMessage() for rec in caplog.records if rec.name == "nexus_limits.llm")


@pytest.mark.parametrize("usage", ['{"input_tokens": -1, "output_tokens": 5}', '{"input_tokens": 5}', "7"])
def test_poisoned_anthropic_usage(upstream, usage):
    tl = budget()
    body = {"model": f"ausage:{usage}", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    estimate = count_request_tokens(body, provider="anthropic", key="key-1").tokens + 50
    with ASGIServer(LLMLimitMiddleware(upstream, limiter=tl)) as server, httpx.Client(base_url=server.url) as http:
        assert http.post("/v1/messages", json=body, headers=AUTH).status_code == 200
        assert place_free(tl) and tokens_left(tl) == 10000 - estimate


def test_compressed_usage_is_read(upstream):
    tl = budget()
    with ASGIServer(LLMLimitMiddleware(upstream, limiter=tl)) as server, httpx.Client(base_url=server.url) as http:
        r = http.post("/v1/chat/completions", json=chat("gzip"), headers=AUTH)
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 50
    assert tokens_left(tl) == 10000 - 50


# -- streams the upstream cuts -------------------------------------------------------------


def test_a_stream_the_upstream_cuts_is_charged_for_what_it_delivered(upstream):
    tl = budget()
    body = chat("cut-stream", stream=True)
    with ASGIServer(LLMLimitMiddleware(upstream, limiter=tl)) as server, httpx.Client(base_url=server.url) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            with http.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r:
                b"".join(r.iter_raw())
        deadline = time.monotonic() + 5
        while not place_free(tl) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert place_free(tl)
    delivered = count_request_tokens(body).tokens + 1  # "Hello"
    assert tokens_left(tl) == 10000 - delivered, "neither refunded nor charged the estimate"


def test_a_stream_without_its_usage_event_is_charged_for_what_it_delivered(upstream):
    tl = budget()
    body = chat("no-usage-stream", stream=True)
    with ASGIServer(LLMLimitMiddleware(upstream, limiter=tl)) as server, httpx.Client(base_url=server.url) as http:
        with http.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r:
            text = b"".join(r.iter_raw())
        assert b"Hello" in text and b"[DONE]" in text
        assert place_free(tl)
    assert tokens_left(tl) == 10000 - (count_request_tokens(body).tokens + 2)  # "Hello there"


# -- clients that go away ------------------------------------------------------------------


def open_call(port: int, body: Dict[str, Any], path: str = "/v1/chat/completions") -> socket.socket:
    raw = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(raw)}\r\n\r\n".encode()
        + raw
    )
    return s


@pytest.mark.parametrize(
    ("model", "stream", "wait_for"),
    [
        ("wait-head", False, "upstream"),  # a non-streamed call, before the upstream answers
        ("wait-head:s", True, "upstream"),  # a stream, before its headers
        ("wait-mid", True, "chunk"),  # mid-stream, during silence
    ],
)
def test_a_client_gone_cancels_the_app_within_100ms(upstream, model, stream, wait_for):
    tl = budget()
    body = chat(model, stream=stream)
    with ASGIServer(LLMLimitMiddleware(upstream, limiter=tl)) as server:
        s = open_call(server.port, body)
        assert upstream.event(model).wait(10), "the call reached the app"
        if wait_for == "chunk":
            got = b""
            while b"Hello" not in got:
                got += s.recv(65536)
        time.sleep(0.05)
        assert not place_free(tl), "the place is held while the call runs"
        left = time.monotonic()
        s.close()
        deadline = left + 5
        while model not in upstream.cancelled and time.monotonic() < deadline:
            time.sleep(0.002)
        assert model in upstream.cancelled, "the app was cancelled"
        assert upstream.cancelled[model] - left < 0.1, f"cancelled {upstream.cancelled[model] - left:.3f} s after"
        while not place_free(tl) and time.monotonic() < deadline:
            time.sleep(0.002)
        assert place_free(tl), "the place was released"
    input_tokens = count_request_tokens(body).tokens
    delivered = input_tokens + (1 if wait_for == "chunk" else 0)
    assert tokens_left(tl) == 10000 - delivered, "settled at what was delivered"


def test_the_gateway_proxy_is_cut_when_the_client_leaves(tmp_path, upstream):
    """The same through the gateway's own proxy: the upstream sees its request cancelled."""
    from nexus_limits.gateway import build_app

    with ASGIServer(upstream) as up:
        path = tmp_path / "gw.toml"
        path.write_text(
            f'[upstream]\nurl = "{up.url}"\n[gateway]\nkey = "bearer"\ndefault_tier = "t"\n'
            '[tiers.t]\nrequests = "100/minute"\ntokens = "100000/hour"\nconcurrency = 1\n'
        )
        app = build_app(str(path))
        limiter = app.tiers["t"].limiter
        with ASGIServer(app, lifespan="on") as gw:
            body = chat("wait-mid", stream=True)
            s = open_call(gw.port, body)
            got = b""
            while b"Hello" not in got:
                got += s.recv(65536)
            left = time.monotonic()
            s.close()
            deadline = left + 5
            while "wait-mid" not in upstream.cancelled and time.monotonic() < deadline:
                time.sleep(0.005)
            assert upstream.cancelled.get("wait-mid", deadline) - left < 1.0, "the upstream call was cut"
            while not place_free(limiter) and time.monotonic() < deadline:
                time.sleep(0.005)
            assert place_free(limiter)


# -- Retry-After the SDKs can use -----------------------------------------------------------


def test_concurrency_refusals_say_how_long_places_are_really_held(upstream):
    tl = budget(lease_ttl=600)
    app = LLMLimitMiddleware(upstream, limiter=tl, retry_after_range=(0.1, 30))
    with ASGIServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        for _ in range(3):
            assert http.post("/v1/chat/completions", json=chat("hold:0.4"), headers=AUTH).status_code == 200
        holder = threading.Thread(
            target=lambda: httpx.post(f"{server.url}/v1/chat/completions", json=chat("hold:0.40"), headers=AUTH)
        )
        holder.start()
        assert upstream.event("hold:0.40").wait(5)
        r = http.post("/v1/chat/completions", json=chat("x"), headers=AUTH)
        holder.join()
    assert r.status_code == 429
    error = r.json()["error"]
    assert error["budget"] == "concurrency" and "concurrency limit 1" in error["message"]
    assert 350 <= int(r.headers["retry-after-ms"]) <= 1000, "the median hold (0.4 s), not the lease ttl (600 s)"
    assert r.headers["retry-after"] == "1" and "x-should-retry" not in r.headers


def test_the_openai_sdk_waits_and_retries_a_concurrency_refusal(upstream):
    tl = budget()
    inner = LLMLimitMiddleware(upstream, limiter=tl, retry_after_range=(0.2, 30))
    answers: List[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async def record(message: Any) -> None:
            if message["type"] == "http.response.start":
                answers.append(message["status"])
            await send(message)

        await inner(scope, receive, record)

    with ASGIServer(app) as server:
        client = openai.OpenAI(api_key="key-1", base_url=f"{server.url}/v1", max_retries=3)
        for _ in range(3):
            client.chat.completions.create(model="hold:0.5", messages=[{"role": "user", "content": "hi"}])
        holder = threading.Thread(
            target=lambda: client.chat.completions.create(
                model="hold:0.50", messages=[{"role": "user", "content": "x"}]
            )
        )
        holder.start()
        assert upstream.event("hold:0.50").wait(5)
        time.sleep(0.05)
        seen = len(answers)
        started = time.monotonic()
        done = client.chat.completions.create(model="y", messages=[{"role": "user", "content": "hi"}])
        waited = time.monotonic() - started
        holder.join()
    assert done.usage is not None and done.usage.total_tokens == 50, "admitted on a retry"
    mine = answers[seen:]
    assert mine[0] == 429 and mine[-1] == 200 and 200 in answers[seen:], mine
    assert 0.2 <= waited < 5, "it waited about the hold time, as told"


def test_requests_that_can_never_fit_say_do_not_retry(upstream):
    attempts: List[int] = []
    tl = budget(tokens="500/day", concurrency=None)
    inner = LLMLimitMiddleware(upstream, limiter=tl)

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        attempts.append(1)
        await inner(scope, receive, send)

    with ASGIServer(counted) as server:
        client = openai.OpenAI(api_key="key-1", base_url=f"{server.url}/v1", max_retries=3)
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=1000)
        error = caught.value
        assert error.code == "rate_limit_exceeded" and error.type == "rate_limit_exceeded"
        assert "can never be admitted" in error.message
        assert error.response.headers["x-should-retry"] == "false" and "retry-after" not in error.response.headers
        assert len(attempts) == 1, "the SDK did not retry"
        # A wait longer than max_retry_after: told not to retry either, but how long it is.
        with pytest.raises(openai.RateLimitError) as caught:
            for _ in range(3):
                client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=400)
        headers = caught.value.response.headers
        assert headers["x-should-retry"] == "false" and int(headers["retry-after"]) > 60
        anth = anthropic.Anthropic(api_key="key-1", base_url=server.url, max_retries=3)
        before = len(attempts)
        with pytest.raises(anthropic.RateLimitError) as refused:
            anth.messages.create(model="x", max_tokens=1000, messages=[{"role": "user", "content": "hi"}])
        assert refused.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
        assert "token limit 500/day" in refused.value.message and len(attempts) == before + 1


def test_bad_bodies_reach_the_sdks_as_their_own_errors(upstream):
    tl = budget()
    with ASGIServer(LLMLimitMiddleware(upstream, limiter=tl)) as server:
        client = openai.OpenAI(api_key="key-1", base_url=f"{server.url}/v1", max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
        assert caught.value.code == "invalid_value" and caught.value.param == "max_tokens"
        assert "'max_tokens' must be a non-negative integer" in caught.value.message
        anth = anthropic.Anthropic(api_key="key-1", base_url=server.url, max_retries=0)
        with pytest.raises(anthropic.BadRequestError) as bad:
            anth.messages.create(model="x", max_tokens=10, messages=[{"role": "user", "content": 5}])  # type: ignore[typeddict-item]
        assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        assert "'messages[0].content'" in bad.value.message
        nokey = openai.OpenAI(
            api_key="unused",
            base_url=f"{server.url}/v1",
            max_retries=0,
            default_headers={"Authorization": "Basic eDp5"},
        )
        with pytest.raises(openai.AuthenticationError) as unauth:
            nokey.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
        assert unauth.value.code == "invalid_api_key"
    assert upstream.calls == 0


# -- the gateway's headers, not the upstream's ------------------------------------------


def test_the_middleware_headers_replace_the_apps(upstream):
    tl = budget()
    with ASGIServer(LLMLimitMiddleware(upstream, limiter=tl)) as server, httpx.Client(base_url=server.url) as http:
        r = http.post("/v1/chat/completions", json=chat("headers"), headers=AUTH)
    assert r.status_code == 200
    for name in ("x-ratelimit-remaining-tokens", "x-ratelimit-limit-requests", "x-ratelimit-limit-tokens"):
        assert len(r.headers.get_list(name)) == 1, name
    assert r.headers["x-ratelimit-limit-tokens"] == "10000" and r.headers["x-ratelimit-limit-requests"] == "1000"
    assert r.headers["x-ratelimit-remaining-tokens"] == str(10000 - estimate_of(chat("headers")))
    assert r.headers["x-request-id"] == "req_1", "other headers pass"


# -- meter_all ---------------------------------------------------------------------------


def test_meter_all_charges_every_other_request_and_holds_a_place(upstream):
    tl = budget(requests="3/hour")
    app = LLMLimitMiddleware(upstream, limiter=tl, meter_all=True)
    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        assert http.get("/v1/models", headers=AUTH).status_code == 200
        assert http.post("/v1/files", content=b"x" * 100_000, headers=AUTH).status_code == 200
        probe = tl.peek("key-1")
        assert probe.requests.remaining == 0 and probe.tokens.remaining == 10000, "2 requests, 0 tokens charged"
        assert upstream.headers[-1] and len(upstream.headers) == 2
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers=AUTH).status_code == 200
        r = http.delete("/v1/files/f1", headers=AUTH)
        assert r.status_code == 429 and r.headers["content-type"] == "application/problem+json"
        assert r.json()["budget"] == "requests" and int(r.headers["retry-after"]) > 0
    from nexus_limits.spend import SpendLimiter

    with pytest.raises(ValueError, match="meter_all needs a TokenLimiter"):
        LLMLimitMiddleware(upstream, spend=SpendLimiter("1.00/day"), meter_all=True)


def test_meter_all_holds_the_place_and_cancels_when_the_client_leaves():
    started = threading.Event()
    cancelled: List[float] = []

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(time.monotonic())
            raise

    tl = budget()
    with ASGIServer(LLMLimitMiddleware(slow, limiter=tl, meter_all=True)) as server:
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-1\r\n\r\n")
        assert started.wait(5)
        time.sleep(0.05)
        assert not place_free(tl), "a metered request holds a place while it runs"
        left = time.monotonic()
        s.close()
        deadline = left + 5
        while not cancelled and time.monotonic() < deadline:
            time.sleep(0.002)
        assert cancelled and cancelled[0] - left < 0.1
        while not place_free(tl) and time.monotonic() < deadline:
            time.sleep(0.002)
        assert place_free(tl)


def test_output_estimates_use_the_key(upstream):
    """A learned output estimate follows each key's real outputs (exact usage only)."""
    from nexus_limits.spend import LearnedOutputEstimate

    learned = LearnedOutputEstimate(default=100, min_samples=2)
    tl = budget()
    body = {"model": "plain", "messages": [{"role": "user", "content": "hi"}]}
    with ASGIServer(LLMLimitMiddleware(upstream, limiter=tl, output=learned)) as server:
        with httpx.Client(base_url=server.url) as http:
            for _ in range(3):
                assert http.post("/v1/chat/completions", json=body, headers=AUTH).status_code == 200
    assert learned.learned("key-1", "plain") == 20
