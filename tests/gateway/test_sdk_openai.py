"""The official ``openai`` SDK, sync and async, plain and streaming, against
``nexus-limits gateway`` (real uvicorn) in front of a fake OpenAI (real uvicorn): chat
completions, Responses, completions and embeddings.

The clients are built as users build them: only ``base_url`` and ``api_key`` (and
``timeout`` where the scenario is a timeout); the SDK's retries stay on. What a request
cost is read from the gateway's limiter and its admin endpoint.
"""

from __future__ import annotations

import asyncio
import threading
import time
import typing

import httpx
import openai
import pytest
from support import bounded, harness, sse_documents, wait_for
from support.fake_provider import COOKIE, ORG_HEADERS, FakeProvider, charged, serve
from support.sdk import module_gateway, trouble_cases
from support.sdk import openai_aclient as aclient
from support.sdk import openai_client as client

CHAT_PATH = "/v1/chat/completions"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}
TIER = {"requests": "1000/minute", "tokens": "1000000/minute", "daily_tokens": 10_000_000, "concurrency": 1}


shared, h = module_gateway(TIER)


# --- the fake speaks the real formats ----------------------------------------------------


def test_the_fake_provider_speaks_the_sdks_formats():
    """Every document and event the fake sends validates against the installed SDK's own
    models (pydantic validation, stricter than the SDK's lenient parsing): the tests
    below exercise the formats the SDK really reads."""
    from openai.types import Completion, CreateEmbeddingResponse
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    events = TypeAdapter(typing.get_args(ResponseStreamEvent)[0])
    with serve(FakeProvider()) as up, httpx.Client(base_url=up.url, timeout=10) as http:
        usage = {"stream": True, "stream_options": {"include_usage": True}}
        assert ChatCompletion.model_validate(http.post(CHAT_PATH, json=CHAT).json()).usage.total_tokens == 48
        chunks = sse_documents(http.post(CHAT_PATH, json={**CHAT, **usage}).text)
        assert [ChatCompletionChunk.model_validate(c).usage for c in chunks][-1].total_tokens == 48
        ask = {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hello"}
        assert Completion.model_validate(http.post("/v1/completions", json=ask).json()).usage.total_tokens == 20
        chunks = sse_documents(http.post("/v1/completions", json={**ask, **usage}).text)
        # The API streams finish_reason null until the end, which the SDK's model (read
        # leniently for streams) does not allow: only the usage chunk is validated.
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "Hello there"
        assert Completion.model_validate(chunks[-1]).usage.total_tokens == 20
        for fmt in ("float", "base64"):
            ask = {"model": "text-embedding-3-small", "input": ["a", "b"], "encoding_format": fmt}
            if fmt == "float":
                CreateEmbeddingResponse.model_validate(http.post("/v1/embeddings", json=ask).json())
            else:
                assert isinstance(http.post("/v1/embeddings", json=ask).json()["data"][1]["embedding"], str)
        ask = {"model": "gpt-4o", "input": "Say hello"}
        assert Response.model_validate(http.post("/v1/responses", json=ask).json()).usage.total_tokens == 34
        streamed = http.post("/v1/responses", json={**ask, "stream": True}).text
        parsed = [events.validate_python(e) for e in sse_documents(streamed)]
        assert parsed[-1].type == "response.completed" and parsed[-1].response.usage.total_tokens == 34
        assert [line[len("event: ") :] for line in streamed.splitlines() if line.startswith("event: ")] == [
            e.type for e in parsed
        ], "each event named by its type"
        error = http.post(CHAT_PATH, json=CHAT, headers={"x-fake": "status=429"})
        assert error.status_code == 429 and error.json()["error"]["code"] == "rate_limit_exceeded"


# --- every route, sync and async, plain and streaming ---------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_chat_passes_through_and_settles_at_the_usage(h, mode):
    key, before = h.key(), h.settled()
    if mode == "sync":
        with client(h, key) as c:
            raw = c.chat.completions.with_raw_response.create(**CHAT)
    else:

        async def go():
            async with aclient(h, key) as c:
                return await c.chat.completions.with_raw_response.create(**CHAT)

        raw = asyncio.run(go())
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.choices[0].message.content == "Hello there"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens == charged(CHAT_PATH)
    (seen,) = h.provider.for_key(key)
    assert seen.json == CHAT, "the body reached the upstream unchanged"
    assert "1000" in raw.headers.get_list("x-ratelimit-limit-requests"), "the gateway's own limit"
    assert h.settled_since(before, charged(CHAT_PATH)) == charged(CHAT_PATH)
    assert h.released(key)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_chat_stream_with_usage_settles_at_the_streamed_usage(h, mode):
    key, before = h.key(), h.settled()
    ask = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    if mode == "sync":
        with client(h, key) as c:
            chunks = list(c.chat.completions.create(**ask))
    else:

        async def go():
            async with aclient(h, key) as c:
                return [chunk async for chunk in await c.chat.completions.create(**ask)]

        chunks = asyncio.run(go())
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "Hello there"
    usage = [ch for ch in chunks if ch.usage is not None]
    assert len(usage) == 1 and usage[0].choices == [] and chunks[-1] is usage[0], "one usage chunk, the last"
    assert usage[0].usage.total_tokens == charged(CHAT_PATH)
    assert h.settled_since(before, charged(CHAT_PATH)) == charged(CHAT_PATH)
    assert h.released(key)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_chat_stream_canonical_loop_without_usage(h, mode):
    """``for chunk in stream: chunk.choices[0].delta``, the loop of the SDK's README."""
    key, before = h.key(), h.settled()
    if mode == "sync":
        with client(h, key) as c:
            deltas = [chunk.choices[0].delta for chunk in c.chat.completions.create(**CHAT, stream=True)]
    else:

        async def go():
            async with aclient(h, key) as c:
                return [chunk.choices[0].delta async for chunk in await c.chat.completions.create(**CHAT, stream=True)]

        deltas = asyncio.run(go())
    assert "".join(d.content or "" for d in deltas) == "Hello there"
    (seen,) = h.provider.for_key(key)
    assert seen.json["stream_options"] == {"include_usage": True}, "the gateway asked the upstream for usage"
    assert h.settled_since(before, charged(CHAT_PATH)) == charged(CHAT_PATH)
    assert h.released(key)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_responses_plain_and_streamed(h, mode):
    key, before = h.key(), h.settled()
    path = "/v1/responses"
    if mode == "sync":
        with client(h, key) as c:
            plain = c.responses.create(model="gpt-4o", input="Say hello")
            events = list(c.responses.create(model="gpt-4o", input="Say hello", stream=True))
            with c.responses.stream(model="gpt-4o", input="Say hello") as s:
                streamed_text = "".join(e.delta for e in s if e.type == "response.output_text.delta")
                final = s.get_final_response()
    else:

        async def go():
            async with aclient(h, key) as c:
                plain = await c.responses.create(model="gpt-4o", input="Say hello")
                events = [e async for e in await c.responses.create(model="gpt-4o", input="Say hello", stream=True)]
                async with c.responses.stream(model="gpt-4o", input="Say hello") as s:
                    text = "".join([e.delta async for e in s if e.type == "response.output_text.delta"])
                    final = await s.get_final_response()
                return plain, events, text, final

        plain, events, streamed_text, final = asyncio.run(go())
    assert plain.output_text == "Hello there" and plain.usage.total_tokens == charged(path)
    assert events[-1].type == "response.completed" and events[-1].response.usage.total_tokens == charged(path)
    assert streamed_text == "Hello there" and final.output_text == "Hello there"
    assert final.usage.total_tokens == charged(path)
    assert h.settled_since(before, 3 * charged(path)) == 3 * charged(path)
    assert h.released(key)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_completions_plain_and_streamed_with_usage(h, mode):
    key, before = h.key(), h.settled()
    path = "/v1/completions"
    ask = {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hello"}
    if mode == "sync":
        with client(h, key) as c:
            plain = c.completions.create(**ask)
            chunks = list(c.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    else:

        async def go():
            async with aclient(h, key) as c:
                plain = await c.completions.create(**ask)
                stream = await c.completions.create(**ask, stream=True, stream_options={"include_usage": True})
                return plain, [ch async for ch in stream]

        plain, chunks = asyncio.run(go())
    assert plain.choices[0].text == "Hello there" and plain.usage.total_tokens == charged(path)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == "Hello there"
    assert chunks[-1].usage.total_tokens == charged(path)
    assert h.settled_since(before, 2 * charged(path)) == 2 * charged(path)
    assert h.released(key)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_embeddings_base64_by_default(h, mode):
    """The SDK asks for base64 embeddings unless told otherwise, and decodes them."""
    key, before = h.key(), h.settled()
    path = "/v1/embeddings"
    if mode == "sync":
        with client(h, key) as c:
            out = c.embeddings.create(model="text-embedding-3-small", input=["one", "two"])
    else:

        async def go():
            async with aclient(h, key) as c:
                return await c.embeddings.create(model="text-embedding-3-small", input=["one", "two"])

        out = asyncio.run(go())
    assert [d.embedding for d in out.data] == [[0.25, -0.5, 0.125, 1.0]] * 2
    assert h.provider.for_key(key)[0].json["encoding_format"] == "base64"
    assert out.usage.total_tokens == charged(path)
    assert h.settled_since(before, charged(path)) == charged(path)
    assert h.released(key)


# --- compressed upstream answers --------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_compressed_upstream_is_charged_from_its_usage_and_frees_the_lease(h, encoding, stream):
    """The SDK accepts gzip, deflate and br; a real API compresses when it may."""
    key, before = h.key(), h.settled()
    fake = {"x-fake": f"encoding={encoding}"}
    with client(h, key) as c:
        if stream:
            chunks = list(
                c.chat.completions.create(
                    **CHAT, stream=True, stream_options={"include_usage": True}, extra_headers=fake
                )
            )
            assert chunks[-1].usage.total_tokens == charged(CHAT_PATH)
        else:
            raw = c.chat.completions.with_raw_response.create(**CHAT, extra_headers=fake)
            assert raw.headers["content-encoding"] == encoding
            assert raw.parse().usage.total_tokens == charged(CHAT_PATH)
        assert h.provider.for_key(key)[0].encoding == encoding, "the upstream really compressed"
        denied = h.decisions().get("denied", 0)
        # The next request, right after, is admitted: the lease (concurrency = 1) is free.
        assert c.chat.completions.create(**CHAT).choices[0].message.content == "Hello there"
        assert h.decisions().get("denied", 0) == denied
    assert h.settled_since(before, 2 * charged(CHAT_PATH)) == 2 * charged(CHAT_PATH)
    assert h.released(key)


# --- clients that give up ---------------------------------------------------------------


def test_sdk_timeout_is_its_own_timeout_error_not_a_429(h):
    key = h.key()
    before = h.decisions()
    with client(h, key, timeout=1) as c:
        with pytest.raises(openai.APITimeoutError):
            bounded(lambda: c.chat.completions.create(**CHAT, extra_headers={"x-fake": "pause_headers=3"}), 20)
    after = h.decisions()
    assert after.get("denied", 0) == before.get("denied", 0), "no attempt was refused for its predecessor's lease"
    assert after.get("allowed", 0) - before.get("allowed", 0) == 3, "the SDK's three attempts, all admitted"
    attempts = h.provider.for_key(key)
    assert 1 <= len(attempts) <= 3, "an attempt given up before it was forwarded never reaches the upstream"
    # The last attempt ended as the SDK raised: its cancellation may still be under way.
    wait_for(lambda: all(a.disconnected is not None for a in attempts), 0.5)
    for attempt in attempts:
        assert attempt.disconnected is not None, "the gateway cancelled the upstream request"
        assert attempt.disconnected - attempt.started < 2.0, (
            "soon after the client gave up (its timeout: 1 s), not after 3 s"
        )
    assert h.released(key)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_closing_a_stream_during_upstream_silence_frees_the_lease_at_once(h, mode):
    """The upstream is silent for 3 s after "Hello"; the client closes the stream then.
    The lease must be free long before the upstream speaks again (the target is 100 ms;
    1 s leaves room for a loaded machine), and the next request admitted at once."""
    key = h.key()
    fake = {"x-fake": "pause_mid=3"}
    denied = h.decisions().get("denied", 0)
    if mode == "sync":
        with client(h, key) as c:
            stream = c.chat.completions.create(**CHAT, stream=True, extra_headers=fake)
            chunks = iter(stream)
            next(chunks), next(chunks)  # the role, then "Hello"; then the upstream says nothing for 3 s
            closed = time.monotonic()
            stream.close()
            freed = h.released(key, 1.0)
            follow = c.chat.completions.create(**CHAT)
    else:

        async def go():
            async with aclient(h, key) as c:
                stream = await c.chat.completions.create(**CHAT, stream=True, extra_headers=fake)
                chunks = stream.__aiter__()
                await chunks.__anext__(), await chunks.__anext__()
                closed = time.monotonic()
                await stream.close()
                freed = h.released(key, 1.0)
                return closed, freed, await c.chat.completions.create(**CHAT)

        closed, freed, follow = asyncio.run(go())
    assert freed, "the lease is free once the client went away, not when the upstream speaks again"
    first = h.provider.for_key(key)[0]
    assert first.disconnected is not None and first.disconnected - closed < 1.0, "the upstream request was cancelled"
    assert follow.choices[0].message.content == "Hello there"
    assert h.decisions().get("denied", 0) == denied, "the next request was admitted at its first attempt"
    assert h.released(key)


# --- refusals ---------------------------------------------------------------------------


def test_429_retries_honour_retry_after(tmp_path):
    with harness(tmp_path, {"requests": "1/second"}, n_keys=1) as one:
        key = one.key()
        with client(one, key) as c:
            c.chat.completions.create(**CHAT)
            started = time.monotonic()
            done = bounded(lambda: c.chat.completions.create(**CHAT), 15)
            elapsed = time.monotonic() - started
        assert done.choices[0].message.content == "Hello there"
        assert 0.3 <= elapsed <= 5, f"refused once, retried after retry-after (~1 s), took {elapsed:.2f} s"
        got = one.decisions()
        assert got.get("allowed") == 2 and got.get("denied") == 1
        assert len(one.provider.for_key(key)) == 2


def test_refusal_is_a_rate_limit_error_with_a_code(tmp_path):
    with harness(tmp_path, {"requests": "1/hour"}, n_keys=1) as one:
        key = one.key()
        with client(one, key) as c:
            c.chat.completions.create(**CHAT)
            with pytest.raises(openai.RateLimitError) as info:
                bounded(lambda: c.chat.completions.create(**CHAT), 15)
        error = info.value
        assert error.status_code == 429
        assert error.code, "OpenAI's error body: {'error': {'message', 'type', 'code'}}"
        assert error.type and error.message
        assert one.decisions().get("denied") == 1, "a wait of an hour: the SDK did not retry"


def test_a_request_that_can_never_fit_is_not_retried(tmp_path):
    with harness(tmp_path, {"tokens": "2000/minute", "concurrency": 1}, n_keys=1) as one:
        key = one.key()
        with client(one, key) as c:
            with pytest.raises(openai.RateLimitError) as info:
                bounded(lambda: c.chat.completions.create(**CHAT, max_tokens=5000), 15)
        assert info.value.response.headers.get("x-should-retry") == "false"
        assert one.decisions().get("denied") == 1, "one attempt: the SDK was told not to retry"
        assert one.provider.for_key(key) == []


def test_concurrency_refusal_retry_after_is_usable(tmp_path):
    with harness(tmp_path, {"requests": "1000/minute", "concurrency": 1}, n_keys=1) as one:
        key = one.key()
        slow = {"x-fake": "pause_headers=1"}
        with client(one, key) as c:
            c.chat.completions.create(**CHAT, extra_headers=slow)  # the gateway learns how long a call holds
            holder = threading.Thread(target=lambda: c.chat.completions.create(**CHAT, extra_headers=slow))
            holder.start()
            try:
                assert wait_for(lambda: len(one.provider.for_key(key)) == 2, 5), "the slow call holds the lease"
                refused = httpx.post(
                    f"{one.url}/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"}
                )
                assert refused.status_code == 429
                assert 0 < float(refused.headers["retry-after"]) <= 60, refused.headers
                assert 0 < float(refused.headers["retry-after-ms"]) <= 60_000, refused.headers
                # The SDK waits what it is told and gets in once the holder is done.
                done = bounded(lambda: c.chat.completions.create(**CHAT), 15)
                assert done.choices[0].message.content == "Hello there"
            finally:
                holder.join(10)


# --- headers ----------------------------------------------------------------------------


def test_one_value_per_header_and_no_upstream_account_headers(h):
    key = h.key()
    with client(h, key) as c:
        raws = [
            c.chat.completions.with_raw_response.create(**CHAT),
            c.chat.completions.with_raw_response.create(**CHAT, stream=True),
        ]
        list(raws[1].parse())
    for raw in raws:
        headers = raw.headers
        for name in (
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
            "date",
            "server",
            "content-type",
        ):
            assert len(headers.get_list(name)) == 1, (name, headers.get_list(name))
        assert headers["x-ratelimit-limit-requests"] == "1000" and headers["x-ratelimit-limit-tokens"] == "1000000"
        for name in ORG_HEADERS:
            assert name not in headers, f"the upstream's {name} reached the client"
        assert COOKIE not in headers.get_list("set-cookie"), "the upstream's cookie reached the client"


# --- upstream trouble -------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, error, attempts",
    [
        (500, openai.InternalServerError, 3),
        (503, openai.InternalServerError, 3),
        (429, openai.RateLimitError, 3),
        (400, openai.BadRequestError, 1),
    ],
)
def test_upstream_errors_pass_through_uncharged_and_hold_no_lease(h, status, error, attempts):
    key, before = h.key(), h.settled()
    denied = h.decisions().get("denied", 0)
    with client(h, key) as c:
        with pytest.raises(error) as info:
            bounded(
                lambda: c.chat.completions.create(
                    **CHAT, extra_headers={"x-fake": f"status={status}; retry_after=0.05"}
                ),
                15,
            )
        assert info.value.status_code == status
        assert "the fake provider fails" in info.value.message, "the upstream's own error body"
        assert len(h.provider.for_key(key)) == attempts, "every retry reached the upstream"
        assert h.decisions().get("denied", 0) == denied
        assert c.chat.completions.create(**CHAT).choices[0].message.content == "Hello there"
    assert h.settled_since(before, charged(CHAT_PATH)) == charged(CHAT_PATH), "the failures cost nothing"
    assert h.released(key)


def test_upstream_failing_once_then_answering(h):
    """The SDK's retry of an upstream 500 goes through the gateway and succeeds."""
    key = h.key()
    with client(h, key) as c:
        done = c.chat.completions.create(**CHAT, extra_headers={"x-fake": "status=500; fail_first=1; retry_after=0.05"})
    assert done.choices[0].message.content == "Hello there"
    assert [r.status for r in h.provider.for_key(key)] == [500, 200]
    assert h.released(key)


# The SDK's side of a troubled upstream (every hostile usage, on every route, is in
# test_gateway_clients.py): a cut answer, and answers without or with absurd usage.
CASES = trouble_cases()


@pytest.mark.parametrize("fake, stream", CASES)
def test_upstream_trouble_is_never_a_gateway_500_nor_a_held_lease(h, fake, stream):
    key, before = h.key(), h.settled()
    with client(h, key) as c:
        try:
            if stream:
                ask = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
                text = "".join(
                    ch.choices[0].delta.content or ""
                    for ch in c.chat.completions.create(**ask, extra_headers={"x-fake": fake})
                    if ch.choices
                )
                assert text == "Hello there"
            else:
                got = c.chat.completions.create(**CHAT, extra_headers={"x-fake": fake})
                assert got.choices[0].message.content == "Hello there"
        except openai.APIConnectionError:
            assert fake == "cut", "only a cut upstream may end in a connection error"
        else:
            assert fake != "cut"
        seen = h.provider.for_key(key)
        assert seen and all(r.status == 200 for r in seen), "the gateway answered no request itself"
        assert h.released(key), "no lease held after the upstream's answer ended"
        # The key is not locked out: the follow-up is admitted and charged normally.
        assert c.chat.completions.create(**CHAT).choices[0].message.content == "Hello there"
    assert h.released(key), "the follow-up settled"
    charged_total = h.settled() - before
    assert charged_total >= charged(CHAT_PATH), "hostile usage refunded nothing"
    assert charged_total < 100_000, "hostile usage was not charged as is"
