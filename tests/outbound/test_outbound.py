"""nexus_limits.outbound: the ledgers (in-process, shared memory, Redis), how a request
is read (hostile bodies included), and the transport's behaviour against a fake
provider that enforces its limits (tests/support/outbound_provider.py), driven with
httpx and the official SDKs."""

from __future__ import annotations

import asyncio
import doctest
import json
import math
import time

import httpx
import pytest
from support.outbound_provider import Bucket, OutboundProvider, claude_tokens, go_duration, serve

import nexus_limits as nl
from nexus_limits import outbound
from nexus_limits.outbound import (
    AsyncLimitedTransport,
    CallTooLarge,
    LimitedTransport,
    OutboundLimiter,
    QuotaTimeout,
    parse_limits,
)
from nexus_limits.outbound._ledger import LocalLedger, SharedLedger
from nexus_limits.tokens import parse_go_duration, parse_rate_limit_headers

R = nl.Rate.parse


def chat(content: str = "hello", model: str = "gpt-4o", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def claude(content: str = "hello", model: str = "claude-x", max_tokens: int = 30, **extra) -> dict:
    return {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}], **extra}


# --- the documentation runs -----------------------------------------------------------------
@pytest.mark.parametrize("module", ["_aimd", "_wrap", "__init__"])
def test_docstring_examples_run(module):
    import importlib

    mod = importlib.import_module("nexus_limits.outbound" + ("" if module == "__init__" else f".{module}"))
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# --- the fake provider speaks the real formats ------------------------------------------------
def test_the_fake_provider_headers_parse_as_the_real_ones():
    assert parse_go_duration(go_duration(360)) == 360 and go_duration(360) == "6m0s"
    assert go_duration(1.5) == "1.5s" and go_duration(0.02) == "20ms" and go_duration(0) == "0s"
    bucket = Bucket(10, 2.0)
    bucket.take(4, bucket.at)
    assert bucket.remaining(bucket.at) == 6 and bucket.reset(bucket.at) == pytest.approx(0.8)
    assert claude_tokens(claude("Hi, there!")) == 4 + 4 + 3


# --- configuration --------------------------------------------------------------------------
def test_parse_limits():
    rates = parse_limits({"gpt-4o": {"requests": "500/minute", "tokens": 30000}, "*": {"requests": R("5/s")}}, 60)
    assert rates["gpt-4o"] == {"requests": R("500/minute"), "tokens": nl.Rate(30000, 60)}
    assert rates["*"]["requests"] == R("5/s")


@pytest.mark.parametrize(
    "limits, error",
    [
        ({"gpt-4o": {"rpm": "5/s"}}, "unknown limit 'rpm'"),
        ({"gpt-4o": {"requests": "five per second"}}, "limits['gpt-4o']['requests']"),
        ({"gpt-4o": {"requests": 0}}, "at least 1"),
        ({"gpt-4o": {"requests": True}}, "bool"),
        ({"gpt-4o": {"requests": 1.5}}, "rate such as"),
        ({"gpt-4o": "500/minute"}, "must be a dict"),
        ({"": {"requests": 1}}, "non-empty"),
        ([("gpt-4o", {})], "must be a dict"),
    ],
)
def test_bad_limits_are_refused_with_what_is_wrong(limits, error):
    with pytest.raises((TypeError, ValueError)) as info:
        OutboundLimiter(limits)
    assert error in str(info.value)


@pytest.mark.parametrize(
    "kw",
    [
        {"window": 0},
        {"window": math.inf},
        {"timeout": -1},
        {"timeout": math.nan},
        {"max_requeue": -1},
        {"estimate_margin": -0.1},
        {"output_tokens": -5},
        {"aimd": 5},
        {"namespace": ""},
        {"store": "redis://localhost"},
    ],
)
def test_bad_options_are_refused(kw):
    with pytest.raises((TypeError, ValueError)) as info:
        OutboundLimiter(**kw)
    assert next(iter(kw)) in str(info.value)


def test_transport_options():
    with pytest.raises(ValueError, match="refusal"):
        LimitedTransport(refusal="ignore")
    with pytest.raises(TypeError, match="not both"):
        LimitedTransport(limiter=OutboundLimiter(), timeout=5)
    with pytest.raises(TypeError, match="OutboundLimiter"):
        AsyncLimitedTransport(limiter=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="openai or anthropic client"):
        outbound.wrap(object())


# --- reading requests -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, path, headers, metered",
    [
        ("POST", "/v1/chat/completions", {}, ("openai", "chat")),
        ("POST", "/v1/completions", {}, ("openai", "completions")),
        ("POST", "/v1/embeddings", {}, ("openai", "embeddings")),
        ("POST", "/v1/responses", {}, ("openai", "responses")),
        ("POST", "/v1/messages", {"anthropic-version": "2023-06-01"}, ("anthropic", "messages")),
        ("POST", "/openai/deployments/gpt4/chat/completions", {}, ("openai", "chat")),
        ("POST", "/v1/messages/count_tokens", {}, None),
        ("POST", "/v1/messages/batches", {}, None),
        ("POST", "/v1/threads/th_1/messages", {}, None),
        ("GET", "/v1/models", {}, None),
        ("GET", "/v1/chat/completions", {}, None),
        ("POST", "/v1/files", {}, None),
    ],
)
def test_which_requests_are_metered(method, path, headers, metered):
    assert OutboundLimiter.route(method, path, headers) == metered


def test_openai_input_is_counted_exactly_and_the_cap_reserved():
    limiter = OutboundLimiter()
    body = chat("hello world", max_tokens=50)
    call = limiter.plan("POST", "/v1/chat/completions", {}, json.dumps(body).encode())
    assert call is not None and call.exact and call.model == "gpt-4o"
    from nexus_limits.tokens import count_request_tokens

    assert call.input == count_request_tokens(body).tokens
    assert call.costs({"requests": R("5/s"), "tokens": R("1000/s")}, 0.1) == {"requests": 1, "tokens": call.input + 50}


def test_claude_input_is_estimated_with_a_margin_and_learns():
    limiter = OutboundLimiter(estimate_margin=0.1)
    body = claude("The quick brown fox jumps over the lazy dog. " * 20, max_tokens=40)
    raw = json.dumps(body).encode()
    call = limiter.plan("POST", "/v1/messages", {"anthropic-version": "x"}, raw)
    assert call is not None and call.provider == "anthropic" and not call.exact
    rates = {"requests": R("5/s"), "input_tokens": R("10000/s"), "output_tokens": R("1000/s")}
    costs = call.costs(rates, 0.1)
    assert costs == {"requests": 1, "input_tokens": math.ceil(call.input * 1.1), "output_tokens": 40}
    truth = claude_tokens(body)
    from nexus_limits.tokens import Usage

    limiter.settle(outbound._engine.Ticket(call, None), Usage(truth, 12))
    again = limiter.plan("POST", "/v1/messages", {"anthropic-version": "x"}, raw)
    assert again is not None and abs(again.input - truth) <= 1  # the first sample calibrates


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[1, 2, 3]",
        b'"a string"',
        b"{" * 100_000,
        json.dumps({"model": 42, "messages": "nope"}).encode(),
        json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": {"x": 1}}]}).encode(),
        json.dumps({"model": "gpt-4o", "messages": [], "max_tokens": -5}).encode(),
        json.dumps({"model": "gpt-4o", "messages": [], "max_tokens": 10**30}).encode(),
        json.dumps({"model": "gpt-4o", "messages": [], "max_tokens": "lots"}).encode(),
        json.dumps({"model": "m" * 10_000, "messages": []}).encode(),
        json.dumps({"model": "gpt-4o", "messages": [[[[[]]]]]}).encode(),
        b'{"model": "gpt-4o", "messages": NaN}',
        "\udcff".encode("utf-8", "surrogatepass"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_any_body_is_planned_never_raised(raw, path):
    call = OutboundLimiter().plan("POST", path, {}, raw)
    assert call is not None and call.input >= 1 and call.output >= 0 and len(call.model) <= 200
    assert call.costs({"requests": R("5/s"), "tokens": R("100000/s")}, 0.1)["requests"] == 1


def test_model_names_from_bodies_cannot_grow_memory_without_end(monkeypatch):
    monkeypatch.setattr(outbound._engine, "MAX_MODELS", 3)
    limiter = OutboundLimiter({"*": {"requests": "100/s", "tokens": "10000/s"}})
    for n in range(10):
        call = limiter.plan("POST", "/v1/chat/completions", {}, json.dumps(chat(model=f"m{n}", max_tokens=1)).encode())
        ticket = limiter.admit(call, outbound._engine.Deadline(1.0))
        limiter.answered(ticket, 200, {})
        limiter.settle(ticket, None)
    models = limiter.stats()["models"]
    assert sorted(models) == ["(other models)", "m0", "m1", "m2"]
    assert models["(other models)"]["admitted"] == 7


def test_n_answers_reserve_n_caps():
    call = OutboundLimiter().plan("POST", "/v1/chat/completions", {}, json.dumps(chat(max_tokens=50, n=3)).encode())
    assert call is not None and call.cap == 150 and call.output == 150
    hostile = OutboundLimiter().plan(
        "POST", "/v1/chat/completions", {}, json.dumps(chat(max_tokens=5, n=10**9)).encode()
    )
    assert hostile is not None and hostile.output == 5


def test_an_output_guess_never_makes_a_call_too_large():
    call = OutboundLimiter(output_tokens=5000).plan("POST", "/v1/chat/completions", {}, json.dumps(chat()).encode())
    assert call is not None and call.cap is None
    assert call.costs({"tokens": R("1000/s")}, 0.1) == {"tokens": 1000}


# --- ledgers --------------------------------------------------------------------------------
@pytest.fixture(params=["local", "shared", "redis"])
def ledger(request, tmp_path):
    if request.param == "local":
        return LocalLedger()
    if request.param == "shared":
        store = nl.SharedMemoryStore(path=str(tmp_path / "outbound.shm"), capacity=1024)
        return SharedLedger(store)
    from nexus_limits.outbound._redis import RedisLedger

    return RedisLedger(request.getfixturevalue("redis_client"))


RATES = {"requests": R("10/10s"), "tokens": R("1000/10s")}


def test_take_is_all_or_nothing(ledger):
    assert ledger.take("m", RATES, {"requests": 1, "tokens": 900}) == 0
    wait = ledger.take("m", RATES, {"requests": 1, "tokens": 200})
    assert wait == pytest.approx(1.0, abs=0.05)  # 100 tokens short at 100/s
    used = ledger.used("m", RATES)
    assert used["requests"] == pytest.approx(1, abs=0.01) and used["tokens"] == pytest.approx(900, abs=2)
    assert math.isinf(ledger.take("m", RATES, {"requests": 1, "tokens": 1001}))
    assert ledger.take("other-model", RATES, {"requests": 1, "tokens": 1000}) == 0


def test_take_counts_a_charge_from_when_the_provider_will_see_it(ledger):
    """With room in the bucket, the provider starts draining a charge only when the
    request arrives: ``lead`` seconds of refill are not handed out twice."""
    assert ledger.take("m", RATES, {"requests": 1, "tokens": 100}, lead=1.0) == 0
    used = ledger.used("m", RATES)
    assert used["tokens"] == pytest.approx(200, abs=2) and used["requests"] == pytest.approx(2, abs=0.01)
    ledger.take("m", RATES, {"requests": 1, "tokens": 100}, lead=1.0)  # busy: no lead to add
    assert ledger.used("m", RATES)["tokens"] == pytest.approx(300, abs=2)


def test_adjust_refunds_and_charges(ledger):
    ledger.take("m", RATES, {"requests": 1, "tokens": 900})
    ledger.adjust("m", RATES, {"tokens": -850})
    assert ledger.used("m", RATES)["tokens"] == pytest.approx(50, abs=2)
    ledger.adjust("m", RATES, {"tokens": -5000})  # never below empty
    assert ledger.used("m", RATES)["tokens"] == pytest.approx(0, abs=1)
    ledger.adjust("m", RATES, {"tokens": 600, "requests": -1})
    used = ledger.used("m", RATES)
    assert used["tokens"] == pytest.approx(600, abs=2) and used["requests"] == pytest.approx(0, abs=0.01)


def test_sync_raises_only_a_count_below_the_proven_floor(ledger):
    ledger.take("m", RATES, {"requests": 1, "tokens": 300})
    assert ledger.sync("m", RATES, {"tokens": (100, 150)}) == 0
    assert ledger.used("m", RATES)["tokens"] == pytest.approx(300, abs=2)
    assert ledger.sync("m", RATES, {"tokens": (700, 720), "requests": (5, 6)}) == 2
    used = ledger.used("m", RATES)
    assert used["tokens"] == pytest.approx(720, abs=2) and used["requests"] == pytest.approx(6, abs=0.01)


def test_pause_holds_the_model_only(ledger):
    assert ledger.paused("m") == 0
    ledger.pause("m", 2.0)
    ledger.pause("m", 0.5)  # a shorter pause does not shorten it
    assert 1.8 < ledger.paused("m") <= 2.0
    assert ledger.paused("other-model") == 0
    ledger.pause("m", 10**9)
    assert ledger.paused("m") <= outbound._ledger.MAX_PAUSE


def test_a_shared_ledger_is_shared_between_processes(tmp_path):
    import subprocess
    import sys

    path = str(tmp_path / "outbound.shm")
    store = nl.SharedMemoryStore(path=path, capacity=1024)
    ledger = SharedLedger(store)
    slow = {"requests": R("10/1000s"), "tokens": R("1000/1000s")}
    ledger.take("m", slow, {"requests": 3, "tokens": 600})
    code = (
        "import nexus_limits as nl\n"
        "from nexus_limits.outbound._ledger import SharedLedger\n"
        f"ledger = SharedLedger(nl.SharedMemoryStore(path={path!r}))\n"
        "R = nl.Rate.parse\n"
        "rates = {'requests': R('10/1000s'), 'tokens': R('1000/1000s')}\n"
        "print(round(ledger.used('m', rates)['tokens']), ledger.take('m', rates, {'tokens': 500}) > 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    used, refused = out.stdout.split()
    assert abs(int(used) - 600) <= 2 and refused == "True"


# --- the transport against an enforcing provider ----------------------------------------------
@pytest.fixture(scope="module")
def provider():
    prov = OutboundProvider(
        {
            "gpt-small": {"requests": 10, "tokens": 1000},
            "claude-small": {"requests": 10, "input_tokens": 500, "output_tokens": 300},
        },
        window=2.0,
        default={"requests": 1000, "tokens": 10**6, "input_tokens": 10**6, "output_tokens": 10**6},
    )
    with serve(prov) as server:
        prov.url = server.url
        yield prov


@pytest.fixture
def fresh(provider):
    provider.reset()
    return provider


def test_plain_httpx_call_is_counted_settled_and_learns(fresh):
    transport = LimitedTransport(window=2.0)
    with httpx.Client(transport=transport, base_url=fresh.url) as client:
        r = client.post("/v1/chat/completions", json=chat("hi", model="gpt-small", max_tokens=20))
        assert r.status_code == 200
        assert client.get("/v1/models").status_code == 404  # not metered, passed through
    stats = transport.stats()["models"]["gpt-small"]
    assert stats["limits"] == {"requests": "10/2s", "tokens": "1000/2s"}
    assert sorted(stats["learned"]) == ["requests", "tokens"] and stats["settled"] == 1
    used = transport.limiter.ledger.used("gpt-small", transport.limiter.rates("gpt-small"))
    charged = fresh.log[0][2]
    assert used["tokens"] == pytest.approx(charged["tokens"], abs=30)  # minus the refill since
    assert fresh.total_refused() == 0


def test_a_call_that_can_never_fit_is_refused_at_once_without_reaching_the_provider(fresh):
    transport = LimitedTransport(limits={"gpt-small": {"requests": "10/2s", "tokens": "1000/2s"}})
    with httpx.Client(transport=transport, base_url=fresh.url) as client:
        started = time.monotonic()
        with pytest.raises(CallTooLarge) as info:
            client.post("/v1/chat/completions", json=chat("hi", model="gpt-small", max_tokens=5000))
        assert time.monotonic() - started < 0.5
    error = info.value
    assert error.limit == "tokens" and error.capacity == 1000 and error.needed > 5000
    assert "can never be sent" in str(error) and isinstance(error, nl.RateLimitExceeded)
    assert math.isinf(error.retry_after) and fresh.total_admitted() == 0 and fresh.total_refused() == 0


def test_the_sdk_raises_its_own_rate_limit_error_without_retrying(fresh):
    import openai

    client = outbound.wrap(
        openai.OpenAI(api_key="sk-test", base_url=fresh.url + "/v1"),
        limits={"gpt-small": {"requests": "10/2s", "tokens": "1000/2s"}},
    )
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-small", messages=[{"role": "user", "content": "x"}], max_tokens=5000)
    assert time.monotonic() - started < 0.5  # no SDK retries with backoff
    assert "can never be sent" in str(info.value) and info.value.code == "call_too_large"
    assert info.value.response.headers["x-nexus-limits-refused"] == "call_too_large"
    assert fresh.total_admitted() == 0


def test_a_wait_past_the_timeout_is_refused_at_once(fresh):
    transport = LimitedTransport(limits={"gpt-small": {"requests": "10/20s", "tokens": "1000/2s"}}, timeout=0.3)
    with httpx.Client(transport=transport, base_url=fresh.url) as client:
        for _ in range(10):
            assert client.post("/v1/chat/completions", json=chat(model="gpt-small", max_tokens=1)).status_code == 200
        started = time.monotonic()
        with pytest.raises(QuotaTimeout) as info:
            client.post("/v1/chat/completions", json=chat(model="gpt-small", max_tokens=1))
        assert time.monotonic() - started < 0.2
    assert info.value.limit == "requests" and 0.3 < info.value.retry_after <= 2.0
    assert "timeout=0.3" in str(info.value)
    assert fresh.total_refused() == 0


def test_the_provider_view_wins_when_another_client_spent_the_quota(fresh):
    """Another member of the organisation spent most of the tokens: the first answer's
    headers bring the local count up to the provider's, and no call meets a 429."""
    transport = LimitedTransport(limits={"gpt-small": {"requests": "10/2s", "tokens": "1000/2s"}}, window=2.0)
    fresh.consume("gpt-small", "tokens", 900)
    with httpx.Client(transport=transport, base_url=fresh.url) as client:
        for _ in range(8):
            r = client.post("/v1/chat/completions", json=chat(model="gpt-small", max_tokens=40))
            assert r.status_code == 200
    assert fresh.total_refused() == 0
    assert transport.stats()["models"]["gpt-small"]["resynced"] >= 1


def test_a_provider_429_pauses_the_model_and_requeues_instead_of_every_caller_retrying(fresh):
    """The provider refuses although the local buckets had room (another client took
    the quota): the calls in flight meet one 429 each, the model pauses until the
    retry-after, and the transport sends them again, paced, without a second 429 and
    without the SDK's own retries."""
    import openai

    limiter = OutboundLimiter(limits={"gpt-small": {"requests": "10/2s", "tokens": "1000/2s"}}, window=2.0)
    client = outbound.wrap(
        openai.AsyncOpenAI(api_key="sk-test", base_url=fresh.url + "/v1", max_retries=0), limiter=limiter
    )
    fresh.consume("gpt-small", "requests", 15)  # 5 past empty: the next call waits 1.2 s

    async def main():
        async def one():
            r = await client.chat.completions.create(
                model="gpt-small", messages=[{"role": "user", "content": "x"}], max_tokens=5
            )
            return r.usage.completion_tokens

        try:
            return await asyncio.wait_for(asyncio.gather(*[one() for _ in range(5)]), 30)
        finally:
            await client.close()

    started = time.monotonic()
    assert asyncio.run(main()) == [5] * 5
    stats = limiter.stats()["models"]["gpt-small"]
    refused = fresh.total_refused()
    assert 1 <= refused <= 5  # only the calls already in flight when the first 429 came back
    assert stats["provider_429"] == refused and stats["requeued"] == refused  # none met two
    assert fresh.total_admitted() == 5
    # Sent again only once the provider's retry-after (2 s) had passed.
    assert min(t for t, _, _ in fresh.log) - started >= 1.9


def test_others_stop_waiting_for_a_slow_first_answer(monkeypatch):
    """Unknown limits: the first call goes alone; if its answer is slow (a long
    generation), the others go after PROBE_WAIT instead of waiting for it."""
    import openai

    monkeypatch.setattr(outbound._engine, "PROBE_WAIT", 0.2)
    prov = OutboundProvider({"gpt-4o": {"requests": 100, "tokens": 10**6}}, window=2.0, latency=1.0)
    with serve(prov) as server:

        async def main():
            client = outbound.wrap(openai.AsyncOpenAI(api_key="k", base_url=server.url + "/v1"), window=2.0)
            try:
                calls = [
                    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
                    for _ in range(5)
                ]
                await asyncio.wait_for(asyncio.gather(*calls), 30)
            finally:
                await client.close()

        asyncio.run(main())
    first = prov.log[0][0]
    assert len(prov.log) == 5 and all(t - first < 0.9 for t, _, _ in prov.log[1:])  # before its answer (1 s)
    assert prov.total_refused() == 0


def test_without_rate_limit_headers_the_model_is_not_held_back():
    prov = OutboundProvider(headers=False)
    with serve(prov) as server:
        transport = LimitedTransport()
        with httpx.Client(transport=transport, base_url=server.url) as client:
            for _ in range(3):
                assert client.post("/v1/chat/completions", json=chat()).status_code == 200
    stats = transport.stats()["models"]["gpt-4o"]
    assert stats["headerless"] is True and stats["limits"] == {} and stats["waited_seconds"] == 0


def test_aimd_gate_backs_off_on_429s_from_a_provider_without_headers():
    prov = OutboundProvider({"gpt-4o": {"requests": 4, "tokens": 10**6}}, window=2.0, headers=False)
    with serve(prov) as server:
        aimd = outbound.AIMD(ceiling=60, floor=2, increase=1, decrease=0.5, cooldown=0.5)
        transport = LimitedTransport(window=2.0, aimd=aimd, max_requeue=5)
        with httpx.Client(transport=transport, base_url=server.url, timeout=30) as client:
            statuses = [client.post("/v1/chat/completions", json=chat(max_tokens=5)).status_code for _ in range(12)]
    assert statuses == [200] * 12
    stats = transport.stats()["models"]["gpt-4o"]
    assert stats["aimd"]["decreases"] >= 1 and stats["aimd"]["value"] < 60
    assert stats["provider_429"] == prov.total_refused() >= 1


@pytest.mark.parametrize(
    "headers",
    [
        {"x-ratelimit-limit-requests": "0", "x-ratelimit-remaining-requests": "-4"},
        {"x-ratelimit-limit-requests": "1e400", "x-ratelimit-remaining-requests": "nan"},
        {"x-ratelimit-limit-tokens": str(2**60), "x-ratelimit-reset-tokens": "999999h"},
        {"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "99999999"},
        {"anthropic-ratelimit-requests-limit": "x" * 10_000, "anthropic-ratelimit-requests-reset": "yesterday"},
        {"retry-after": "nan"},
        {"retry-after": "1e300"},
        {"retry-after-ms": "-1"},
        {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"},
    ],
)
def test_hostile_rate_limit_headers_neither_crash_nor_stall(headers):
    limiter = OutboundLimiter(window=2.0)
    call = limiter.plan("POST", "/v1/chat/completions", {}, json.dumps(chat()).encode())
    ticket = asyncio.run(limiter.admit_async(call, outbound._engine.Deadline(1.0)))
    for status in (200, 429):
        pause = limiter.answered(ticket, status, headers)
        assert 0 <= pause <= outbound._engine.MAX_PROVIDER_PAUSE
    for rate in limiter.rates("gpt-4o").values():
        assert 1 <= rate.count <= 10**10
    parse_rate_limit_headers(headers)  # the library's parser agrees it is garbage-safe


def test_an_unreachable_provider_refunds_the_reservation():
    limiter = OutboundLimiter(limits={"gpt-4o": {"requests": "10/2s", "tokens": "1000/2s"}})
    from support.servers import free_port

    with httpx.Client(transport=LimitedTransport(limiter=limiter), base_url=f"http://127.0.0.1:{free_port()}") as c:
        with pytest.raises(httpx.ConnectError):
            c.post("/v1/chat/completions", json=chat(max_tokens=100))
    used = limiter.ledger.used("gpt-4o", limiter.rates("gpt-4o"))
    # Only the lead is left (the provider would have started counting the call up to
    # MAX_LEAD later: at most that much refill, 1.25 requests and 125 tokens here).
    lead = outbound._engine.MAX_LEAD
    assert used["requests"] <= 5 * lead + 0.01 and used["tokens"] <= 500 * lead + 1


def test_streams_settle_from_their_usage_and_a_cut_one_from_what_was_read(fresh):
    import anthropic
    import openai

    # The local limits are the provider's over a long window: nothing refills during the test.
    limiter = OutboundLimiter(
        {
            "gpt-small": {"requests": "10/1000s", "tokens": "1000/1000s"},
            "claude-small": {"requests": "10/1000s", "input_tokens": "500/1000s", "output_tokens": "300/1000s"},
        },
        output_tokens=50,  # the guess for a call without max_tokens
    )
    oa = outbound.wrap(openai.OpenAI(api_key="k", base_url=fresh.url + "/v1"), limiter=limiter)
    an = outbound.wrap(anthropic.Anthropic(api_key="k", base_url=fresh.url), limiter=limiter)
    stream = oa.chat.completions.create(
        model="gpt-small",
        messages=[{"role": "user", "content": "x"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None
    with an.messages.stream(model="claude-small", max_tokens=50, messages=[{"role": "user", "content": "x"}]) as s:
        message = s.get_final_message()
    assert message.usage.output_tokens == 20
    broken = oa.chat.completions.create(model="gpt-small", messages=[{"role": "user", "content": "y"}], stream=True)
    next(iter(broken))
    broken.close()
    oa.close()
    an.close()
    stats = limiter.stats()["models"]
    assert stats["gpt-small"]["settled"] == 2 and stats["claude-small"]["settled"] == 1
    used = limiter.ledger.used("claude-small", limiter.rates("claude-small"))
    # max_tokens 50 reserved, 20 used: the output bucket holds the real output only.
    assert used["output_tokens"] == pytest.approx(20, abs=0.5)
    assert fresh.total_refused() == 0


def test_the_sdks_take_the_transport_through_their_http_client(fresh):
    import anthropic
    import openai

    transport = LimitedTransport(window=2.0)
    client = openai.OpenAI(api_key="k", base_url=fresh.url + "/v1", http_client=httpx.Client(transport=transport))
    for _ in range(12):  # past the 10 requests per 2 s: waits, no 429
        r = client.chat.completions.create(model="gpt-small", messages=[{"role": "user", "content": "x"}], max_tokens=5)
        assert r.usage is not None and r.usage.completion_tokens == 5
    client.close()

    async def main() -> None:
        async_transport = AsyncLimitedTransport(window=2.0)
        # The SDK's own client class (httpx2 for this SDK, whose transport it then wraps).
        aclient = anthropic.AsyncAnthropic(
            api_key="k", base_url=fresh.url, http_client=anthropic.DefaultAsyncHttpxClient(transport=async_transport)
        )
        try:
            for _ in range(12):
                m = await aclient.messages.create(
                    model="claude-small", max_tokens=5, messages=[{"role": "user", "content": "x"}]
                )
                assert m.usage.output_tokens == 5
        finally:
            await aclient.close()
        assert async_transport.stats()["models"]["claude-small"]["waited_seconds"] > 0

    asyncio.run(main())
    assert transport.stats()["models"]["gpt-small"]["waited_seconds"] > 0
    assert fresh.total_refused() == 0 and fresh.total_admitted() == 24


def test_wrap_keeps_the_clients_settings_and_shares_one_limiter():
    import anthropic
    import openai

    original = openai.OpenAI(api_key="sk-a", base_url="http://127.0.0.1:9/v1", timeout=7.0, max_retries=5)
    wrapped = outbound.wrap(original, timeout=2.0)
    assert type(wrapped) is openai.OpenAI
    assert (str(wrapped.base_url), wrapped.timeout, wrapped.max_retries, wrapped.api_key) == (
        "http://127.0.0.1:9/v1/",
        7.0,
        5,
        "sk-a",
    )
    transport = wrapped._client._transport
    assert isinstance(transport, LimitedTransport) and transport.limiter.timeout == 2.0
    twin = outbound.wrap(anthropic.AsyncAnthropic(api_key="k"), limiter=transport.limiter)
    assert type(twin) is anthropic.AsyncAnthropic
    assert (
        isinstance(twin._client._transport, AsyncLimitedTransport)
        and twin._client._transport.limiter is transport.limiter
    )
    plain = outbound.wrap(httpx.Client(base_url="http://127.0.0.1:9"))
    assert isinstance(plain, httpx.Client) and isinstance(plain._transport, LimitedTransport)
    assert outbound.limiter_of(twin) is outbound.limiter_of(wrapped) is transport.limiter
    assert outbound.limiter_of(plain) is plain._transport.limiter
    with pytest.raises(TypeError, match="wrap"):
        outbound.limiter_of(original)
    with pytest.raises(TypeError, match="wrap"):
        outbound.limiter_of(object())
    with pytest.raises(TypeError, match="not both"):
        outbound.wrap(original, limiter=transport.limiter, timeout=3)


def test_import_nexus_limits_does_not_load_outbound():
    import subprocess
    import sys

    code = "import sys, nexus_limits\nprint('nexus_limits.outbound' in sys.modules, 'httpx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"]
