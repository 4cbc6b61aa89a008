"""``nexus-limits gateway`` with the clients people use besides the SDKs' defaults:
curl-style requests (httpx), Anthropic's ``x-api-key``, Azure's ``api-key``, clients
that accept zstd, and the raw shape of the gateway's answers (refusal bodies and
headers, the admin endpoint), in front of the fake provider (real uvicorn both)."""

from __future__ import annotations

import json
import threading

import anthropic
import httpx
import openai
import pytest
from support import ADMIN_TOKEN, Harness, admin_state, harness, wait_for
from support.fake_provider import charged

CHAT_PATH = "/v1/chat/completions"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}
MESSAGES = {"model": "claude-haiku-4-5", "max_tokens": 256, "messages": [{"role": "user", "content": "Say hello"}]}
TIER = {"requests": "1000/minute", "tokens": "1000000/minute", "concurrency": 1}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    with harness(tmp_path_factory.mktemp("gw"), TIER, n_keys=200) as one:
        yield one


@pytest.fixture
def h(shared):
    """The module's gateway; after each test, its requests are all settled."""
    yield shared
    shared.quiesce()


def bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


# --- both key styles ----------------------------------------------------------------------


def test_one_gateway_serves_bearer_x_api_key_and_api_key_clients(tmp_path):
    spec = ["bearer", "header:x-api-key", "header:api-key"]
    # 1000/day: next to no refill during the test, so "used" counts the requests exactly.
    with harness(tmp_path, {"requests": "1000/day", "concurrency": 1}, n_keys=1, key=spec) as one:
        key = one.key()
        with anthropic.Anthropic(base_url=one.url, api_key=key) as c:
            assert c.messages.create(**MESSAGES).content[0].text == "Hello there"
        sdk_sent = one.provider.for_key(key)[-1]
        # anthropic 2.x sends the key as a bearer token; older releases and curl use x-api-key.
        assert sdk_sent.header("authorization") == f"Bearer {key}" or sdk_sent.header("x-api-key") == key
        with openai.OpenAI(base_url=f"{one.url}/v1", api_key=key) as c:
            assert c.chat.completions.create(**CHAT).choices[0].message.content == "Hello there"
        curl = httpx.post(
            f"{one.url}/v1/messages", json=MESSAGES, headers={"x-api-key": key, "anthropic-version": "2023-06-01"}
        )
        assert curl.status_code == 200, curl.text
        azure = httpx.post(f"{one.url}{CHAT_PATH}", json=CHAT, headers={"api-key": key})
        assert azure.status_code == 200, azure.text
        # All four counted against the one key.
        assert admin_state(one.server, key)["limits"]["requests"]["used"] == 4
        assert len(one.provider.for_key(key)) == 4


def test_two_different_keys_in_one_request_are_a_400(tmp_path):
    with harness(tmp_path, {"requests": "1000/minute"}, n_keys=2, key=["bearer", "header:x-api-key"]) as two:
        a, b = two.key(), two.key()
        url = f"{two.url}{CHAT_PATH}"
        same = httpx.post(url, json=CHAT, headers={**bearer(a), "x-api-key": a})
        assert same.status_code == 200, "the same key twice is one key"
        for headers in (
            {**bearer(a), "x-api-key": b},
            [("x-api-key", a), ("x-api-key", b)],
            [("authorization", f"Bearer {a}"), ("authorization", f"Bearer {b}")],
        ):
            refused = httpx.post(url, json=CHAT, headers=headers)
            assert refused.status_code == 400, (headers, refused.status_code, refused.text)
            detail = refused.json()["detail"].lower()
            assert "key" in detail or "authorization" in detail, "the body names the problem"
        assert len(two.provider.for_key(a)) == 1 and two.provider.for_key(b) == []


# --- compressed answers a SDK does not ask for ----------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_zstd_upstream_answer_is_charged_from_its_usage(h, stream):
    """httpx (with zstandard installed) and curl --compressed accept zstd."""
    key, before = h.key(), h.settled()
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}} if stream else CHAT
    headers = {**bearer(key), "accept-encoding": "zstd", "x-fake": "encoding=zstd"}
    with httpx.Client(timeout=10) as http:
        got = http.post(f"{h.url}{CHAT_PATH}", json=body, headers=headers)
        assert got.status_code == 200 and got.headers["content-encoding"] == "zstd"
        assert h.provider.for_key(key)[0].encoding == "zstd"
        assert '"total_tokens": 48' in got.text, "forwarded unchanged, decoded by the client"
        assert h.released(key), "the lease is free once the answer ended"
        follow = http.post(f"{h.url}{CHAT_PATH}", json=CHAT, headers=bearer(key))
        assert follow.status_code == 200
    assert h.settled_since(before, 2 * charged(CHAT_PATH)) == 2 * charged(CHAT_PATH)


# --- the injected usage chunk, on the wire ---------------------------------------------------


def test_a_stream_without_usage_has_no_usage_chunk_on_the_wire(h):
    key, before = h.key(), h.settled()
    got = httpx.post(f"{h.url}{CHAT_PATH}", json={**CHAT, "stream": True}, headers=bearer(key), timeout=10)
    assert got.status_code == 200
    events = [line[len("data: ") :] for line in got.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and all(c["choices"] for c in chunks), "a chunk without choices reached the client"
    assert all(c.get("usage") is None for c in chunks), "the client did not ask for usage"
    assert h.settled_since(before, charged(CHAT_PATH)) == charged(CHAT_PATH), "settled from the usage all the same"


# --- refusals on the wire --------------------------------------------------------------------


def test_refusals_in_each_providers_format_and_problem_json_on_request(tmp_path):
    with harness(tmp_path, {"requests": "2/hour"}, n_keys=1) as one:
        key = one.key()
        assert httpx.post(f"{one.url}{CHAT_PATH}", json=CHAT, headers=bearer(key)).status_code == 200
        assert httpx.post(f"{one.url}/v1/messages", json=MESSAGES, headers=bearer(key)).status_code == 200

        oa = httpx.post(f"{one.url}{CHAT_PATH}", json=CHAT, headers=bearer(key))
        assert oa.status_code == 429 and oa.headers["content-type"].startswith("application/json")
        error = oa.json()["error"]
        assert error["message"] and error["type"] and error["code"]

        an = httpx.post(f"{one.url}/v1/messages", json=MESSAGES, headers=bearer(key))
        assert an.status_code == 429 and an.headers["content-type"].startswith("application/json")
        doc = an.json()
        assert doc["type"] == "error" and doc["error"]["type"] == "rate_limit_error" and doc["error"]["message"]

        asked = httpx.post(
            f"{one.url}{CHAT_PATH}", json=CHAT, headers={**bearer(key), "accept": "application/problem+json"}
        )
        assert asked.status_code == 429 and asked.headers["content-type"].startswith("application/problem+json")
        assert asked.json()["status"] == 429 and asked.json()["detail"]


def test_concurrency_refusal_headers_are_usable(tmp_path):
    with harness(tmp_path, {"requests": "1000/minute", "concurrency": 1}, n_keys=1) as one:
        key = one.key()
        slow = {**bearer(key), "x-fake": "pause_headers=1"}
        url = f"{one.url}{CHAT_PATH}"
        holder = threading.Thread(target=lambda: httpx.post(url, json=CHAT, headers=slow, timeout=10))
        holder.start()
        try:
            assert wait_for(lambda: len(one.provider.for_key(key)) == 1, 5), "the slow call holds the lease"
            refused = httpx.post(url, json=CHAT, headers=bearer(key), timeout=10)
        finally:
            holder.join(10)
        assert refused.status_code == 429
        seconds, ms = float(refused.headers["retry-after"]), float(refused.headers["retry-after-ms"])
        assert 0 < seconds <= 60 and 0 < ms <= 60_000
        assert seconds * 1000 >= ms - 1, "retry-after (whole seconds) does not point earlier than retry-after-ms"
        assert refused.headers.get("x-should-retry") != "false", "waiting helps: the lease will be freed"


@pytest.mark.parametrize(
    "tier, body",
    [
        ({"tokens": "2000/minute"}, {**CHAT, "max_tokens": 5000}),  # above the capacity: never fits
        ({"requests": "1/hour"}, CHAT),  # a wait far longer than any client's patience
    ],
    ids=["above-capacity", "hour-long-wait"],
)
def test_hopeless_refusals_say_x_should_retry_false(tmp_path, tier, body):
    with harness(tmp_path, tier, n_keys=1) as one:
        key = one.key()
        url = f"{one.url}{CHAT_PATH}"
        if "requests" in tier:
            assert httpx.post(url, json=body, headers=bearer(key)).status_code == 200
        refused = httpx.post(url, json=body, headers=bearer(key))
        assert refused.status_code == 429
        assert refused.headers.get("x-should-retry") == "false", refused.headers


# --- admin --------------------------------------------------------------------------------------


def test_admin_in_flight_counts_the_leases_really_held(h):
    key = h.key()
    assert admin_state(h.server, key)["limits"]["concurrency"] == {"limit": 1, "in_flight": 0}
    slow = {**bearer(key), "x-fake": "pause_headers=0.6"}
    holder = threading.Thread(target=lambda: httpx.post(f"{h.url}{CHAT_PATH}", json=CHAT, headers=slow, timeout=10))
    holder.start()
    try:
        assert wait_for(lambda: len(h.provider.for_key(key)) == 1, 5)
        assert admin_state(h.server, key)["limits"]["concurrency"]["in_flight"] == 1
    finally:
        holder.join(10)
    assert h.released(key)
    denied = httpx.get(f"{h.url}/_nexus/keys/{key}", headers=bearer("not-" + ADMIN_TOKEN))
    assert denied.status_code == 403


# --- every route with a troubled upstream, curl-style ----------------------------------------

ROUTES = {
    CHAT_PATH: CHAT,
    "/v1/responses": {"model": "gpt-4o", "input": "Say hello"},
    "/v1/completions": {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hello"},
    "/v1/embeddings": {"model": "text-embedding-3-small", "input": "Say hello"},
    "/v1/messages": MESSAGES,
}
# Every route gets these; the two main formats (chat, messages) every hostile usage.
TROUBLES = ("usage=omit", "usage=huge", "usage=negative", "cut", "status=500")
HOSTILE = ("usage=string", "usage=null", "usage=nan", "usage=float")
CASES = [
    pytest.param(path, fake, stream, id=f"{path[len('/v1/') :]}-{fake}-{'sse' if stream else 'json'}")
    for path in ROUTES
    for fake in (TROUBLES + HOSTILE if path in (CHAT_PATH, "/v1/messages") else TROUBLES)
    for stream in (False, True)
    if not (stream and path == "/v1/embeddings")  # embeddings do not stream
]


@pytest.mark.parametrize("path, fake, stream", CASES)
def test_a_troubled_upstream_is_never_a_gateway_500_nor_a_held_lease(h: Harness, path, fake, stream):
    key, before = h.key(), h.settled()
    body = ROUTES[path]
    if stream:
        body = {**body, "stream": True}
        if path in (CHAT_PATH, "/v1/completions"):
            body["stream_options"] = {"include_usage": True}
    headers = {**bearer(key), "x-fake": fake}
    with httpx.Client(timeout=10) as http:
        try:
            got = http.post(f"{h.url}{path}", json=body, headers=headers)
        except httpx.TransportError:
            assert fake == "cut", "only a cut upstream may end in a connection error"
        else:
            assert fake != "cut", "a cut upstream answer must not look complete"
            expected = 500 if fake == "status=500" else 200
            assert got.status_code == expected, got.text
            if expected == 500:
                assert "the fake provider fails" in got.text, "the upstream's own error, passed through"
        assert [r.status for r in h.provider.for_key(key)] == [500 if fake == "status=500" else 200]
        assert h.released(key), "no lease held once the upstream's answer ended"
        follow = http.post(f"{h.url}{path}", json=ROUTES[path], headers=bearer(key))
        assert follow.status_code == 200, "the key is not locked out"
    assert h.released(key), "the follow-up settled"
    spent = h.settled() - before
    assert spent >= charged(path), "hostile usage refunded nothing"
    assert spent < 100_000, "hostile usage was not charged as is"
