"""The official ``anthropic`` SDK, sync and async, plain and streaming, against
``nexus-limits gateway`` (real uvicorn) in front of a fake Anthropic API (real uvicorn):
``/v1/messages`` as JSON and as its named-event stream.

Clients are built with only ``base_url`` and ``api_key`` (``timeout`` where the scenario
is a timeout), retries on. The SDK honours any ``retry-after`` a server sends, however
long; the calls that could be told to sleep for minutes run under a deadline
(``asyncio.wait_for``, :func:`support.bounded`) so that a wrong answer fails the test
instead of hanging it.
"""

from __future__ import annotations

import asyncio
import threading
import time
import typing

import anthropic
import httpx
import pytest
from support import bounded, harness, sse_documents, wait_for, within
from support.fake_provider import ANTHROPIC_OUTPUT, ANTHROPIC_USAGE, COOKIE, ORG_HEADERS, FakeProvider, charged, serve
from support.sdk import anthropic_aclient as aclient
from support.sdk import anthropic_client as client
from support.sdk import module_gateway, trouble_cases

try:  # the HTTP client of the installed SDK: httpx2 in current releases, httpx before
    from httpx2 import TransportError
except ImportError:  # pragma: no cover
    from httpx import TransportError

# A stream cut mid-way: the SDK raises the HTTP client's own error while iterating.
CUT_ERRORS = (anthropic.APIConnectionError, TransportError)

PATH = "/v1/messages"
MODEL = "claude-haiku-4-5"
ASK = {"model": MODEL, "max_tokens": 256, "messages": [{"role": "user", "content": "Say hello"}]}
TIER = {"requests": "1000/minute", "tokens": "1000000/minute", "concurrency": 1}


shared, h = module_gateway(TIER)


def check_usage(usage) -> None:
    assert usage.input_tokens == ANTHROPIC_USAGE["input_tokens"]
    assert usage.cache_read_input_tokens == ANTHROPIC_USAGE["cache_read_input_tokens"]
    assert usage.cache_creation_input_tokens == ANTHROPIC_USAGE["cache_creation_input_tokens"]
    assert usage.output_tokens == ANTHROPIC_OUTPUT


def test_the_fake_provider_speaks_the_sdks_formats():
    """The fake's message, events and errors validate against the installed SDK's own
    models (pydantic validation, stricter than the SDK's lenient parsing)."""
    from anthropic.types import Message, RawMessageStreamEvent
    from pydantic import TypeAdapter

    events = TypeAdapter(typing.get_args(RawMessageStreamEvent)[0])
    with serve(FakeProvider()) as up, httpx.Client(base_url=up.url, timeout=10) as http:
        check_usage(Message.model_validate(http.post(PATH, json=ASK).json()).usage)
        streamed = http.post(PATH, json={**ASK, "stream": True}).text
        docs = [d for d in sse_documents(streamed) if d["type"] != "ping"]  # the SDK skips pings
        parsed = [events.validate_python(d) for d in docs]
        assert [e.type for e in parsed] == [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
        assert parsed[0].message.usage.input_tokens == ANTHROPIC_USAGE["input_tokens"]
        assert parsed[-2].usage.output_tokens == ANTHROPIC_OUTPUT
        names = [line[len("event: ") :] for line in streamed.splitlines() if line.startswith("event: ")]
        assert [n for n in names if n != "ping"] == [e.type for e in parsed], "each event named by its type"
        error = http.post(PATH, json=ASK, headers={"x-fake": "status=529"})
        assert error.status_code == 529 and error.json()["error"]["type"] == "overloaded_error"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_messages_pass_through_and_settle_at_the_usage(h, mode):
    key, before = h.key(), h.settled()
    if mode == "sync":
        with client(h, key) as c:
            message = c.messages.create(**ASK)
    else:

        async def go():
            async with aclient(h, key) as c:
                return await c.messages.create(**ASK)

        message = asyncio.run(go())
    assert message.type == "message" and message.content[0].text == "Hello there"
    assert message.stop_reason == "end_turn"
    check_usage(message.usage)
    (seen,) = h.provider.for_key(key)
    assert seen.json == ASK, "the body reached the upstream unchanged"
    assert seen.header("anthropic-version"), "the SDK's headers reached the upstream"
    assert h.settled_since(before, charged(PATH)) == charged(PATH), "input + cache reads + cache writes + output"
    assert h.released(key)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_message_streams_settle_at_the_streamed_usage(h, mode):
    """``create(stream=True)`` (raw events) and ``messages.stream`` (the helper)."""
    key, before = h.key(), h.settled()
    if mode == "sync":
        with client(h, key) as c:
            events = list(c.messages.create(**ASK, stream=True))
            with c.messages.stream(**ASK) as s:
                text = "".join(s.text_stream)
                final = s.get_final_message()
    else:

        async def go():
            async with aclient(h, key) as c:
                events = [e async for e in await c.messages.create(**ASK, stream=True)]
                async with c.messages.stream(**ASK) as s:
                    text = "".join([t async for t in s.text_stream])
                    final = await s.get_final_message()
                return events, text, final

        events, text, final = asyncio.run(go())
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == "Hello there"
    assert events[-2].usage.output_tokens == ANTHROPIC_OUTPUT
    assert text == "Hello there"
    check_usage(final.usage)
    assert h.settled_since(before, 2 * charged(PATH)) == 2 * charged(PATH)
    assert h.released(key)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_compressed_upstream_is_charged_from_its_usage_and_frees_the_lease(h, encoding, stream):
    key, before = h.key(), h.settled()
    fake = {"x-fake": f"encoding={encoding}"}
    with client(h, key) as c:
        if stream:
            with c.messages.stream(**ASK, extra_headers=fake) as s:
                assert "".join(s.text_stream) == "Hello there"
                check_usage(s.get_final_message().usage)
        else:
            raw = c.messages.with_raw_response.create(**ASK, extra_headers=fake)
            assert raw.headers["content-encoding"] == encoding
            check_usage(raw.parse().usage)
        assert h.provider.for_key(key)[0].encoding == encoding, "the upstream really compressed"
        assert h.released(key), "the lease is free as soon as the answer ended"
        denied = h.decisions().get("denied", 0)
        # Right after, the next request is admitted (concurrency = 1).
        follow = bounded(lambda: c.messages.create(**ASK), 10)
        assert follow.content[0].text == "Hello there"
        assert h.decisions().get("denied", 0) == denied
    assert h.settled_since(before, 2 * charged(PATH)) == 2 * charged(PATH)
    assert h.released(key)


def test_sdk_timeout_is_its_own_timeout_error_not_a_429(h):
    key = h.key()
    denied = h.decisions().get("denied", 0)

    def refused():
        if h.decisions().get("denied", 0) > denied:
            return "a retry was refused: the attempt the SDK gave up on still held its lease"
        return None

    async def go():
        async with aclient(h, key, timeout=1) as c:
            return await within(c.messages.create(**ASK, extra_headers={"x-fake": "pause_headers=3"}), 10, refused)

    with pytest.raises(anthropic.APITimeoutError):
        asyncio.run(go())
    assert h.decisions().get("denied", 0) == denied
    attempts = h.provider.for_key(key)
    assert 1 <= len(attempts) <= 3, "an attempt given up before it was forwarded never reaches the upstream"
    wait_for(lambda: all(a.disconnected is not None for a in attempts), 0.5)
    for attempt in attempts:
        assert attempt.disconnected is not None and attempt.disconnected - attempt.started < 2.0, "not after 3 s"
    assert h.released(key)


def test_closing_a_stream_during_upstream_silence_frees_the_lease_at_once(h):
    """The upstream is silent for 3 s after the first delta; the client closes the stream
    then. The lease must be free long before the upstream speaks again (the target is
    100 ms; 1 s leaves room for a loaded machine), and the next request admitted at once."""
    key = h.key()
    denied = h.decisions().get("denied", 0)

    async def go():
        async with aclient(h, key) as c:
            stream = await c.messages.create(**ASK, stream=True, extra_headers={"x-fake": "pause_mid=3"})
            events = stream.__aiter__()
            for _ in range(3):  # message_start, content_block_start, the first delta; then silence
                await events.__anext__()
            closed = time.monotonic()
            await stream.close()
            freed = h.released(key, 1.0)
            return closed, freed, await within(c.messages.create(**ASK), 10)

    closed, freed, follow = asyncio.run(go())
    assert freed, "the lease is free once the client went away, not when the upstream speaks again"
    first = h.provider.for_key(key)[0]
    assert first.disconnected is not None and first.disconnected - closed < 1.0, "the upstream request was cancelled"
    assert follow.content[0].text == "Hello there"
    assert h.decisions().get("denied", 0) == denied, "the next request was admitted at its first attempt"
    assert h.released(key)


def test_429_retries_honour_retry_after(tmp_path):
    with harness(tmp_path, {"requests": "1/second"}, n_keys=1) as one:
        key = one.key()
        with client(one, key) as c:
            c.messages.create(**ASK)
            started = time.monotonic()
            done = bounded(lambda: c.messages.create(**ASK), 15)
            elapsed = time.monotonic() - started
        assert done.content[0].text == "Hello there"
        assert 0.3 <= elapsed <= 5, f"refused once, retried after retry-after (~1 s), took {elapsed:.2f} s"
        got = one.decisions()
        assert got.get("allowed") == 2 and got.get("denied") == 1


def test_refusal_is_a_rate_limit_error_in_anthropics_format(tmp_path):
    with harness(tmp_path, {"requests": "1/hour"}, n_keys=1) as one:
        key = one.key()

        async def go():
            async with aclient(one, key) as c:
                await c.messages.create(**ASK)
                return await within(c.messages.create(**ASK), 2)

        with pytest.raises(anthropic.RateLimitError) as info:
            asyncio.run(go())
        body = info.value.body
        assert isinstance(body, dict) and body.get("type") == "error", body
        assert body["error"]["type"] == "rate_limit_error" and body["error"]["message"]
        assert one.decisions().get("denied") == 1, "an hour's wait: not retried"


def test_concurrency_refusal_retry_after_is_usable(tmp_path):
    """This SDK sleeps for whatever retry-after says: the gateway's must be about how
    long the lease will really be held."""
    with harness(tmp_path, {"requests": "1000/minute", "concurrency": 1}, n_keys=1) as one:
        key = one.key()
        slow = {"x-fake": "pause_headers=0.6"}
        freed: list = []

        def hold() -> None:
            with client(one, key) as c:
                c.messages.create(**ASK, extra_headers=slow)
            freed.append(time.monotonic())

        def still_waiting():
            if freed and time.monotonic() - freed[0] > 2:
                return "the SDK still sleeps 2 s after the lease was freed: retry-after was not usable"
            return None

        with client(one, key) as c:
            c.messages.create(**ASK, extra_headers=slow)  # the gateway learns how long a call holds
        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert wait_for(lambda: len(one.provider.for_key(key)) == 2, 5), "the slow call holds the lease"

            async def go():
                async with aclient(one, key) as c:
                    return await within(c.messages.create(**ASK), 10, still_waiting)

            assert asyncio.run(go()).content[0].text == "Hello there"
            assert one.decisions().get("denied", 0) >= 1, "it was refused first"
        finally:
            holder.join(10)


def test_a_request_that_can_never_fit_is_not_retried(tmp_path):
    with harness(tmp_path, {"tokens": "2000/minute", "concurrency": 1}, n_keys=1) as one:
        key = one.key()
        with client(one, key) as c:
            with pytest.raises(anthropic.RateLimitError) as info:
                bounded(lambda: c.messages.create(**{**ASK, "max_tokens": 5000}), 15)
        assert info.value.response.headers.get("x-should-retry") == "false"
        assert one.decisions().get("denied") == 1, "one attempt: the SDK was told not to retry"
        assert one.provider.for_key(key) == []


def test_one_value_per_header_and_no_upstream_account_headers(h):
    key = h.key()
    with client(h, key) as c:
        raws = [c.messages.with_raw_response.create(**ASK), c.messages.with_raw_response.create(**ASK, stream=True)]
        list(raws[1].parse())
    for raw in raws:
        headers = raw.headers
        for name in {k for k, _ in headers.multi_items()}:
            if name != "set-cookie":
                assert len(headers.get_list(name)) == 1, (name, headers.get_list(name))
        for name in ORG_HEADERS:
            assert name not in headers, f"the upstream's {name} reached the client"
        assert COOKIE not in headers.get_list("set-cookie"), "the upstream's cookie reached the client"


@pytest.mark.parametrize(
    "status, error, attempts",
    [
        (529, anthropic.OverloadedError, 3),
        (500, anthropic.InternalServerError, 3),
        (400, anthropic.BadRequestError, 1),
    ],
)
def test_upstream_errors_pass_through_uncharged_and_hold_no_lease(h, status, error, attempts):
    key, before = h.key(), h.settled()
    with client(h, key) as c:
        with pytest.raises(error) as info:
            bounded(
                lambda: c.messages.create(**ASK, extra_headers={"x-fake": f"status={status}; retry_after=0.05"}), 15
            )
        assert info.value.status_code == status
        assert info.value.body["error"]["message"].startswith("the fake provider fails"), "the upstream's own body"
        assert len(h.provider.for_key(key)) == attempts, "every retry reached the upstream"
        assert c.messages.create(**ASK).content[0].text == "Hello there"
    assert h.settled_since(before, charged(PATH)) == charged(PATH), "the failures cost nothing"
    assert h.released(key)


# The SDK's side of a troubled upstream (every hostile usage, on every route, is in
# test_gateway_clients.py): a stream cut mid-way, and answers without or with absurd usage.
# (A cut JSON answer is retried by the SDK with back-off; the openai tests have it.)
CASES = trouble_cases(cut_json=False)


@pytest.mark.parametrize("fake, stream", CASES)
def test_upstream_trouble_is_never_a_gateway_500_nor_a_held_lease(h, fake, stream):
    key, before = h.key(), h.settled()
    headers = {"x-fake": fake}
    with client(h, key) as c:
        try:
            if stream:
                events = list(c.messages.create(**ASK, stream=True, extra_headers=headers))
                text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
                assert text == "Hello there"
            else:
                assert c.messages.create(**ASK, extra_headers=headers).content[0].text == "Hello there"
        except CUT_ERRORS:
            assert fake == "cut", "only a cut upstream may end in a connection error"
        else:
            assert fake != "cut"
        seen = h.provider.for_key(key)
        assert seen and all(r.status == 200 for r in seen), "the gateway answered no request itself"
        assert h.released(key), "no lease held after the upstream's answer ended"
        follow = bounded(lambda: c.messages.create(**ASK), 10)
        assert follow.content[0].text == "Hello there", "the key is not locked out"
    assert h.released(key), "the follow-up settled"
    charged_total = h.settled() - before
    assert charged_total >= charged(PATH), "hostile usage refunded nothing"
    assert charged_total < 100_000, "hostile usage was not charged as is"
