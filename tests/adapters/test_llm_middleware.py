"""The LLM middleware end to end: uvicorn serving it in front of a fake provider."""

from __future__ import annotations

import time

import httpx
import pytest
from support import fake_llm
from support.servers import ASGIServer

import nexus_limits as nl
from nexus_limits.adapters.llm import LLMLimitMiddleware
from nexus_limits.tokens import OutputEstimate, anthropic_estimator, count_request_tokens

AUTH = {"authorization": "Bearer key-1"}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 100}


def budget(**kw):
    args = {"requests": "100/minute", "tokens": "10000/hour", "concurrency": 2}
    args.update(kw)
    return nl.TokenLimiter(**args)


def spend_left(spend, key="key-1"):
    probe = spend.reserve(key, "gpt-4o", 0, 0)
    probe.cancel()
    return probe.decision.remaining


def eventually(fn, expected, seconds=5.0):
    """Settlement runs right after the last byte is sent: wait for it."""
    deadline = time.monotonic() + seconds
    while fn() != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return fn()


def remaining(tl, key="key-1"):
    probe = tl.reserve(key, 0)
    left = probe.tokens.remaining
    probe.cancel()
    return left


def test_json_response_settles_at_the_real_usage():
    tl = budget()
    with ASGIServer(LLMLimitMiddleware(fake_llm.app, limiter=tl)) as server, httpx.Client(base_url=server.url) as http:
        r = http.post("/v1/chat/completions", json=CHAT, headers=AUTH)
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 50
        estimate = count_request_tokens(CHAT).tokens + 100
        assert r.headers["x-ratelimit-limit-tokens"] == "10000"
        assert r.headers["x-ratelimit-remaining-tokens"] == str(10000 - estimate), "headers as reserved"
        assert fake_llm.SEEN[-1] == CHAT, "the body reached the upstream intact"
    assert remaining(tl) == 10000 - 50, "settled at the 50 tokens used"


def test_stream_settles_from_sse_and_gets_usage_injected():
    tl = budget()
    body = {**CHAT, "stream": True}
    with ASGIServer(LLMLimitMiddleware(fake_llm.app, limiter=tl)) as server, httpx.Client(base_url=server.url) as http:
        with http.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r:
            text = b"".join(r.iter_raw())
        assert b"Hello" in text and b"[DONE]" in text
        assert b"usage" not in text, "the usage chunk the client did not ask for was removed"
        assert fake_llm.SEEN[-1]["stream_options"] == {"include_usage": True}
        assert remaining(tl) == 10000 - 50, "settled before the client saw the end"
        asked = {**body, "stream_options": {"include_usage": True}}
        with http.stream("POST", "/v1/chat/completions", json=asked, headers=AUTH) as r:
            text = b"".join(r.iter_raw())
        assert b'"choices": [], "usage"' in text and b'"total_tokens": 50' in text, "kept when asked for"
    assert remaining(tl) == 10000 - 100


def test_stream_without_injection_counts_the_text():
    tl = budget()
    app = LLMLimitMiddleware(fake_llm.app, limiter=tl, include_usage=False)
    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        http.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
        assert "stream_options" not in fake_llm.SEEN[-1]
    input_tokens = count_request_tokens(CHAT).tokens
    assert remaining(tl) == 10000 - (input_tokens + 2), "estimated from 'Hello there' (2 tokens)"


def test_budget_exhausted_is_a_429_with_openai_headers():
    tl = budget(tokens="300/hour")
    app = LLMLimitMiddleware(fake_llm.app, limiter=tl, output=OutputEstimate(default=200))
    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        assert http.post("/v1/chat/completions", json=body, headers=AUTH).status_code == 200
        assert http.post("/v1/chat/completions", json=body, headers=AUTH).status_code == 200
        r = http.post("/v1/chat/completions", json=body, headers=AUTH)
        assert r.status_code == 429 and r.headers["content-type"] == "application/json"
        error = r.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["budget"] == "tokens"
        assert error["message"].startswith("token limit 300/hour: this request needs an estimated 208 tokens")
        assert "enough frees up in" in error["message"]
        assert r.headers["x-ratelimit-limit-tokens"] == "300" and int(r.headers["retry-after"]) >= 1
        assert int(r.headers["retry-after-ms"]) > 60_000, "208 tokens at 300/hour: more than a minute"
        assert r.headers["x-should-retry"] == "false", "longer than max_retry_after (60 s): do not wait"
        assert r.headers["x-ratelimit-reset-tokens"].endswith("s")
        r = http.post("/v1/chat/completions", json=body, headers={**AUTH, "accept": "application/problem+json"})
        assert r.headers["content-type"] == "application/problem+json" and r.json()["budget"] == "tokens"
        assert r.json()["detail"].startswith("token limit 300/hour")


def test_upstream_error_refunds_everything():
    tl = budget()
    with ASGIServer(LLMLimitMiddleware(fake_llm.app, limiter=tl)) as server, httpx.Client(base_url=server.url) as http:
        r = http.post("/v1/chat/completions", json={**CHAT, "model": "broken"}, headers=AUTH)
        assert r.status_code == 500
    assert remaining(tl) == 10000


def test_client_disconnect_mid_stream_releases_the_reservation_and_lease():
    tl = budget(concurrency=1)
    with ASGIServer(LLMLimitMiddleware(fake_llm.app, limiter=tl)) as server:
        with httpx.Client(base_url=server.url) as http:
            with http.stream(
                "POST", "/v1/chat/completions", json={**CHAT, "model": "slow", "stream": True}, headers=AUTH
            ) as r:
                # Kept alive: a dropped iter_raw() generator closes the connection at once
                # (the client would be gone before the check below).
                chunks = r.iter_raw()
                next(chunks)
                assert not tl.reserve("key-1", 0).allowed, "the lease is held while streaming"
                chunks.close()
            # the client closed the connection mid-stream
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            probe = tl.reserve("key-1", 0)
            if probe.allowed:
                probe.cancel()
                break
            time.sleep(0.05)
        else:
            pytest.fail("the lease was not released after the client went away")
    assert remaining(tl) > 10000 - 200, "settled at what was streamed, not the estimate"


def test_anthropic_stream_and_calibration():
    tl = budget()
    body = {
        "model": "claude-test-1",
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": "x" * 70}],
    }
    before = anthropic_estimator.samples("claude-test-1")
    with ASGIServer(LLMLimitMiddleware(fake_llm.app, limiter=tl)) as server, httpx.Client(base_url=server.url) as http:
        http.post("/v1/messages", json=body, headers=AUTH)
        http.post("/v1/messages", json={**body, "stream": False}, headers=AUTH)
    assert remaining(tl) == 10000 - 2 * (50 + 12)
    assert anthropic_estimator.samples("claude-test-1") == before + 2, "real counts calibrate the estimator"


def test_bad_requests_and_pass_through():
    tl = budget()
    with ASGIServer(LLMLimitMiddleware(fake_llm.app, limiter=tl)) as server, httpx.Client(base_url=server.url) as http:
        r = http.post("/v1/chat/completions", content=b"{not json", headers=AUTH)
        assert r.status_code == 400 and "invalid request body" in r.json()["error"]["message"]
        assert http.post("/v1/chat/completions", json=[1], headers=AUTH).status_code == 400
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 401
        assert http.post("/v1/other", json=CHAT, headers=AUTH).status_code == 200, "other paths pass through"
    assert remaining(tl) == 10000
    with pytest.raises(TypeError, match="limiter must be a TokenLimiter"):
        LLMLimitMiddleware(fake_llm.app, limiter=nl.TokenBucket("1/s"))


def test_redis_budget_behind_the_middleware(redis_server):
    import redis

    import nexus_limits.redis as nlr

    tl = nlr.TokenLimiter(redis.Redis(port=redis_server.port), tokens="10000/hour", concurrency=2, prefix="llm")
    with ASGIServer(LLMLimitMiddleware(fake_llm.app, limiter=tl)) as server, httpx.Client(base_url=server.url) as http:
        assert http.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
    probe = tl.reserve("key-1", 0)
    assert probe.tokens.remaining == 10000 - 50


def test_spend_budget_behind_the_middleware():
    from nexus_limits.spend import LearnedOutputEstimate, SpendLimiter

    spend = SpendLimiter("0.01/day")  # 10,000 micro-dollars
    learned = LearnedOutputEstimate(default=100, min_samples=2)
    app = LLMLimitMiddleware(fake_llm.app, spend=spend, output=learned)
    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 100}
        r = http.post("/v1/chat/completions", json=body, headers=AUTH)
        assert r.status_code == 200 and r.headers["x-budget-limit"] == "0.01"
        # Settled at the real usage: 30 input x $2.50/M + 20 output x $10/M = 275 micro-dollars.
        assert eventually(lambda: spend_left(spend), 10_000 - 275) == 10_000 - 275
        big = {**body, "max_tokens": 980}  # 9,820 micro-dollars: more than the 9,725 left
        r = http.post("/v1/chat/completions", json=big, headers=AUTH)
        error = r.json()["error"]
        assert r.status_code == 429 and "spend budget 0.01/day exhausted" in error["message"]
        assert error["budget"] == "spend"
        assert r.headers["x-budget-remaining"] == "0.009725" and "retry-after" in r.headers
        huge = {**body, "max_tokens": 2000}
        r = http.post("/v1/chat/completions", json=huge, headers=AUTH)
        assert "above the whole budget" in r.json()["error"]["message"]
        assert r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers, "it can never fit"
        r = http.post("/v1/chat/completions", json={**body, "model": "no-such-model"}, headers=AUTH)
        assert r.status_code == 400 and "no price for model" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "model"
        http.post("/v1/chat/completions", json={k: v for k, v in body.items() if k != "max_tokens"}, headers=AUTH)
    assert eventually(lambda: learned.learned("key-1", "gpt-4o"), 20) == 20, "the learned estimate follows real outputs"
    with pytest.raises(ValueError, match="give a TokenLimiter"):
        LLMLimitMiddleware(fake_llm.app)
    with pytest.raises(TypeError, match="spend must be a SpendLimiter"):
        LLMLimitMiddleware(fake_llm.app, spend=nl.TokenBucket("1/s"))


def test_token_refusal_does_not_charge_spend():
    from nexus_limits.spend import SpendLimiter

    tl = budget(requests="1/hour")
    spend = SpendLimiter("1.00/30d")  # refills slowly enough to compare exactly
    app = LLMLimitMiddleware(fake_llm.app, limiter=tl, spend=spend)
    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        assert http.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
        assert http.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 429
    assert eventually(lambda: spend_left(spend), 1_000_000 - 275) == 1_000_000 - 275


def test_spend_refusal_refunds_the_token_reservation():
    from nexus_limits.spend import SpendLimiter

    tl = budget()
    app = LLMLimitMiddleware(fake_llm.app, limiter=tl, spend=SpendLimiter("0.001/day"))
    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        assert http.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 429
    assert remaining(tl) == 10000, "the tokens reserved before the spend check were refunded"


def test_the_ip_key_reads_the_forwarding_header_the_operator_names():
    """forwarded_header and ipv6_prefix reach the key as for the other adapters: behind a
    trusted proxy that writes X-Real-IP, two clients are two keys, and the client's own
    X-Forwarded-For is ignored."""
    import asyncio

    from nexus_limits.adapters.llm import LLMLimitMiddleware

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    mw = LLMLimitMiddleware(
        app,
        nl.TokenLimiter(requests="1/minute"),
        key="ip",
        trusted_proxies=["10.0.0.1"],
        forwarded_header="x-real-ip",
        meter_all=True,
    )

    def status(real_ip: str, spoofed: str) -> int:
        scope = {
            "type": "http",
            "method": "GET",
            "path": "/v1/models",
            "query_string": b"",
            "headers": [(b"x-real-ip", real_ip.encode()), (b"x-forwarded-for", spoofed.encode())],
            "client": ("10.0.0.1", 5000),
        }
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        asyncio.run(mw(scope, receive, send))
        return sent[0]["status"]

    assert status("203.0.113.7", "1.1.1.1") == 200
    assert status("203.0.113.7", "2.2.2.2") == 429, "a spoofed X-Forwarded-For is no new key"
    assert status("203.0.113.8", "1.1.1.1") == 200, "another client behind the proxy"


def test_a_legacy_completions_stream_settles_from_its_usage_chunk_which_the_client_never_sees():
    """/v1/completions streams get include_usage injected like chat streams, and the
    usage-only chunk is removed for a client that did not ask for it."""
    import asyncio
    import json as _json

    from nexus_limits.adapters.llm import LLMLimitMiddleware

    seen = []

    async def upstream(scope, receive, send):
        message = await receive()
        body = _json.loads(message["body"])
        seen.append(body)
        events = [{"choices": [{"text": "Hello", "index": 0}]}]
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25}})
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for e in [*events, "[DONE]"]:
            data = e if isinstance(e, str) else _json.dumps(e)
            await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    limiter = nl.TokenLimiter(tokens="1000/minute")
    mw = LLMLimitMiddleware(upstream, limiter, key="bearer")
    request = {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hello", "stream": True, "max_tokens": 100}
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/completions",
        "query_string": b"",
        "headers": [(b"authorization", b"Bearer sk-1"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
    }
    sent = []
    messages = [{"type": "http.request", "body": _json.dumps(request).encode(), "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    asyncio.run(mw(scope, receive, send))
    assert seen[0]["stream_options"] == {"include_usage": True}
    wire = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert b'"usage"' not in wire and b"Hello" in wire and b"[DONE]" in wire
    assert 1000 - limiter.inspect("sk-1")["tokens"]["remaining"] == 25, "settled at the real usage"


def test_the_first_request_builds_the_encodings_off_the_event_loop(monkeypatch):
    """Building tiktoken's encodings takes about a second: the first request must not do
    it on the event loop's thread, or every other client waits that long."""
    import asyncio
    import json as _json
    import threading as _threading

    from nexus_limits.adapters import llm
    from nexus_limits.tokens import _encodings

    built_on = []
    real = _encodings.get_encoding

    def recording(name):
        if name not in _encodings._cache or not built_on:
            built_on.append(_threading.current_thread())
        return real(name)

    monkeypatch.setattr(_encodings, "get_encoding", recording)
    monkeypatch.setattr(llm, "_warm", _threading.Event())
    import nexus_limits.tokens._count as _count

    monkeypatch.setattr(_count, "get_encoding", recording)

    async def upstream(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
        await send({"type": "http.response.body", "body": _json.dumps({"choices": [], "usage": usage}).encode()})

    mw = llm.LLMLimitMiddleware(upstream, nl.TokenLimiter(tokens="100000/minute"), key="bearer")
    body = _json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "query_string": b"",
        "headers": [(b"authorization", b"Bearer sk-1")],
        "client": ("127.0.0.1", 5000),
    }
    sent = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    asyncio.run(mw(scope, receive, send))
    assert sent[0]["status"] == 200
    assert built_on and all(t is not _threading.main_thread() for t in built_on), built_on
    assert llm._warm.is_set(), "later requests are judged on the loop"
