"""The LLM middleware's cheaper paths give the answers of the general ones: a body in
any JSON encoding, a target and key an outer layer already judged (``GIVEN``), the
in-process backends called directly, the refusal format worked out only when needed."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Dict, List, Optional

import httpx
import pytest
from support import fake_llm
from support.servers import ASGIServer

import nexus_limits as nl
from nexus_limits.adapters.llm import GIVEN, LLMLimitMiddleware, _loads, _refuse_constant
from nexus_limits.tokens import count_request_tokens
from nexus_limits.tokens._count import RequestBodyError

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello ünïcode"}], "max_tokens": 100}


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_a_body_reads_as_json_loads_reads_it(encoding):
    raw = json.dumps(CHAT, ensure_ascii=False).encode(encoding)
    assert _loads(raw) == json.loads(raw) == CHAT


@pytest.mark.parametrize("raw", [b"{", b"\xff\xfe\x00", b'{"a": 1} x', b"\xed\xa0\x80", b'"\\ud800"'])
def test_a_bad_body_fails_as_json_loads_fails(raw):
    try:
        expected: Any = json.loads(raw)
    except ValueError as error:
        with pytest.raises(type(error)):
            _loads(raw)
    else:
        assert _loads(raw) == expected


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_numbers_are_refused_by_the_shared_decoder(constant):
    raw = b'{"max_tokens": ' + constant.encode() + b"}"
    with pytest.raises(RequestBodyError, match=f"{constant} is not a JSON number"):
        _loads(raw)
    with pytest.raises(RequestBodyError):
        json.loads(raw, parse_constant=_refuse_constant)


def test_a_utf16_body_is_admitted_and_counted_through_a_real_server():
    tl = nl.TokenLimiter(tokens="10000/hour")
    app = LLMLimitMiddleware(fake_llm.app, limiter=tl)
    raw = json.dumps(CHAT, ensure_ascii=False).encode("utf-16")
    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        r = http.post(
            "/v1/chat/completions",
            content=raw,
            headers={"authorization": "Bearer k", "content-type": "application/json"},
        )
    estimate = count_request_tokens(CHAT).tokens + 100
    assert r.status_code == 200, r.text
    assert r.headers["x-ratelimit-remaining-tokens"] == str(10000 - estimate)


# -- GIVEN ---------------------------------------------------------------------------------


async def _call(app: Any, headers: List[Any], given: Optional[Any]) -> Dict[str, Any]:
    body = json.dumps(CHAT).encode()
    scope: Dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
    }
    if given is not None:
        scope[GIVEN] = given
    sent = False

    async def receive() -> Dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(30)
        return {"type": "http.disconnect"}

    out: Dict[str, Any] = {}

    async def send(message: Dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
        else:
            out["body"] = out.get("body", b"") + message.get("body", b"")

    await app(scope, receive, send)
    return out


async def _upstream(scope: Any, receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    body = json.dumps({"choices": [], "usage": usage}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def test_a_given_key_is_the_one_charged_not_the_headers():
    tl = nl.TokenLimiter(requests="1/hour")
    app = LLMLimitMiddleware(_upstream, limiter=tl)
    headers = [(b"authorization", b"Bearer from-header")]
    first = asyncio.run(_call(app, headers, (("POST", "/v1/chat/completions"), "given-key")))
    assert first["status"] == 200
    assert not tl.peek("given-key").allowed, "the given key was charged"
    assert tl.peek("from-header").allowed, "the header's key was not"
    again = asyncio.run(_call(app, headers, (("POST", "/v1/chat/completions"), "given-key")))
    assert again["status"] == 429


def test_a_given_target_decides_whether_the_call_is_an_llm_call():
    tl = nl.TokenLimiter(requests="5/hour", tokens="1000/hour")
    app = LLMLimitMiddleware(_upstream, limiter=tl)
    headers = [(b"authorization", b"Bearer k")]
    # Judged by an outer layer as another route: passed through unmetered.
    r = asyncio.run(_call(app, headers, (("POST", "/v1/other"), "k")))
    assert r["status"] == 200 and "x-ratelimit-limit-tokens" not in r["headers"]
    r = asyncio.run(_call(app, headers, (("POST", "/v1/chat/completions"), "k")))
    assert r["headers"]["x-ratelimit-limit-tokens"] == "1000"


def test_a_missing_given_key_is_a_401_in_the_providers_format():
    tl = nl.TokenLimiter(requests="5/hour")
    app = LLMLimitMiddleware(_upstream, limiter=tl)
    r = asyncio.run(_call(app, [], (("POST", "/v1/chat/completions"), None)))
    assert r["status"] == 401
    assert json.loads(r["body"])["error"]["code"] == "invalid_api_key"
    problem = asyncio.run(
        _call(app, [(b"accept", b"text/html, Application/Problem+JSON;q=0.9")], (("POST", "/v1/messages"), None))
    )
    assert problem["headers"]["content-type"] == "application/problem+json"
    anthropic = asyncio.run(_call(app, [(b"accept", b"application/json")], (("POST", "/v1/messages"), None)))
    assert json.loads(anthropic["body"])["type"] == "error"


class _Counting(nl.TokenLimiter):
    """A subclass: not the exact in-process type, so called through the general path."""

    calls = 0

    def reserve(self, key: Any, tokens: int) -> Any:
        type(self).calls += 1
        return super().reserve(key, tokens)


def test_subclassed_and_in_process_limiters_decide_alike():
    for cls in (nl.TokenLimiter, _Counting):
        tl = cls(requests="2/hour", tokens="10000/hour")
        app = LLMLimitMiddleware(_upstream, limiter=tl)
        assert app._direct is (cls is nl.TokenLimiter)
        got = [asyncio.run(_call(app, [(b"authorization", b"Bearer k")], None))["status"] for _ in range(3)]
        assert got == [200, 200, 429], cls
        left = tl.reserve("k2", 0)
        assert left.tokens.remaining == 10000
        left.cancel()
        assert tl.peek("k").tokens.remaining == 10000 - 2 * 10, "both settled at the usage (10 tokens)"
    assert _Counting.calls == 3


class _BrokenSpend:
    """A spend backend that fails when asked to reserve (a store gone away)."""

    def estimate(self, *args: Any) -> int:
        return 1

    def reserve(self, *args: Any) -> Any:
        raise RuntimeError("spend store unreachable")


def test_a_failing_spend_backend_does_not_leave_the_token_lease_held():
    tl = nl.TokenLimiter(requests="10/hour", concurrency=1)
    app = LLMLimitMiddleware(_upstream, limiter=tl, spend=_BrokenSpend())
    for _ in range(2):  # the second would be refused for concurrency if the lease stayed
        with pytest.raises(RuntimeError, match="spend store unreachable"):
            asyncio.run(_call(app, [(b"authorization", b"Bearer k")], None))
    probe = tl.peek("k")  # as the next call would find it
    assert probe.concurrency.allowed, "no lease held"
    assert probe.requests.remaining == 9, "both calls refunded: the next one is the first"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"model": "gpt-4o-mini", "model": "gpt-4o", "messages": []}', "model"),
        (b'{"model": "gpt-4o", "mod\\u0065l": "gpt-4o-mini", "messages": []}', "model"),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "a", "content": "b"}]}', "content"),
        (b'{"model": "gpt-4o", "messages": [], "max_tokens": 1, "max_tokens": 100000}', "max_tokens"),
        (b'{"model": "gpt-4o", "messages": [], "stream": false, "stream": true}', "stream"),
    ],
)
def test_a_member_named_twice_is_refused_not_judged_on_one_and_sent_with_both(raw, field):
    """An upstream may act on the first of two members where json.loads keeps the last:
    a cheap model judged and priced, an expensive one run. Refused, nothing charged."""
    tl = nl.TokenLimiter(requests="10/hour", tokens="100000/hour")
    seen: List[bytes] = []

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        seen.append((await receive()).get("body", b""))
        await _upstream(scope, receive, send)

    app = LLMLimitMiddleware(upstream, limiter=tl)

    async def call() -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "headers": [(b"authorization", b"Bearer k")],
        }
        messages = [{"type": "http.request", "body": raw, "more_body": False}]

        async def receive() -> Dict[str, Any]:
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message: Dict[str, Any]) -> None:
            out.setdefault("status", message.get("status"))
            out["body"] = out.get("body", b"") + message.get("body", b"")

        await app(scope, receive, send)
        return out

    got = asyncio.run(call())
    assert got["status"] == 400
    error = json.loads(got["body"])["error"]
    assert error["param"] == field and "appears twice" in error["message"]
    assert seen == [], "nothing forwarded"
    assert tl.peek("k").requests.remaining == 9, "nothing charged"
