"""The gateway's wiring to the library: Redis spend budgets on the asyncio client, the
tokenizer warm-up at startup. Real uvicorn, a fake upstream, a real redis-server."""

from __future__ import annotations

import asyncio
import inspect
import time

import httpx
import pytest
import redis
from support import fake_llm
from support.servers import ASGIServer

from nexus_limits.gateway import build_app
from nexus_limits.redis.asyncio import SpendLimiter as AsyncSpendLimiter

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10}

SPEND_CONFIG = """
[upstream]
url = "{url}"

[gateway]
key = "bearer"

[tiers.pro]
spend = "0.01/day"
requests = "100/minute"

[keys]
"sk-pro" = "pro"

[prices."gpt-4o"]
input = "5"
output = "20"

[backend]
type = "redis"
url = "redis://127.0.0.1:{port}/0"
prefix = "{prefix}"
on_error = "deny"
"""


@pytest.fixture
def upstream():
    with ASGIServer(fake_llm.app) as server:
        yield server


def test_redis_spend_uses_the_gateways_asyncio_client(tmp_path, upstream, redis_server):
    path = tmp_path / "gw.toml"
    path.write_text(SPEND_CONFIG.format(url=upstream.url, port=redis_server.port, prefix="wire-spend"))
    app = build_app(str(path))
    spend = app.tiers["pro"].spend
    # The asyncio limiter on the gateway's own client: nothing sync, no thread per check.
    assert isinstance(spend, AsyncSpendLimiter)
    assert inspect.iscoroutinefunction(spend.reserve)
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url) as http:
        r = http.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-pro"})
        assert r.status_code == 200 and r.headers["x-budget-limit"] == "0.01"

    def left() -> int:
        async def probe() -> int:
            client = redis.asyncio.Redis(port=redis_server.port)
            try:
                mirror = AsyncSpendLimiter(
                    client, "0.01/day", prices=spend.prices, prefix="wire-spend", name="spend-pro"
                )
                reservation = await mirror.reserve("sk-pro", "gpt-4o", 0, 0)
                await reservation.cancel()
                return int(reservation.decision.remaining)
            finally:
                await client.aclose()

        return asyncio.run(probe())

    # Settled in Redis at the actual usage (30 in, 20 out at $5/$20 per 1M = 550 micro-$).
    want = 10_000 - (30 * 5 + 20 * 20)
    deadline = time.monotonic() + 5
    while left() != want and time.monotonic() < deadline:
        time.sleep(0.02)
    assert left() == want
    client = redis.Redis(port=redis_server.port)
    try:
        assert client.keys("wire-spend:*"), "the spend budget lives in Redis"
    finally:
        client.close()


def test_redis_spend_refuses_when_spent(tmp_path, upstream, redis_server):
    path = tmp_path / "gw.toml"
    text = SPEND_CONFIG.format(url=upstream.url, port=redis_server.port, prefix="wire-spent")
    path.write_text(text.replace('spend = "0.01/day"', 'spend = "0.001/day"'))
    app = build_app(str(path))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url) as http:
        headers = {"authorization": "Bearer sk-pro"}
        codes = []
        for _ in range(4):  # 1000 micro-$: the first call (550 settled) leaves too little for a second
            codes.append(http.post("/v1/chat/completions", json=CHAT, headers=headers).status_code)
            time.sleep(0.05)
        assert codes[0] == 200 and 429 in codes, codes


MEMORY_CONFIG = """
[upstream]
url = "{url}"

[gateway]
key = "bearer"

[tiers.pro]
requests = "100/minute"
tokens = "100000/hour"

[keys]
"sk-pro" = "pro"
"""


def test_startup_warms_encodings_in_a_thread_without_waiting(tmp_path, upstream, monkeypatch):
    import threading

    from nexus_limits.gateway import app as gateway_app

    release = threading.Event()
    started = threading.Event()
    threads = []

    def slow_warm() -> None:
        threads.append(threading.current_thread())
        started.set()
        release.wait(10)

    monkeypatch.setattr(gateway_app, "warm_encodings", slow_warm)
    path = tmp_path / "gw.toml"
    path.write_text(MEMORY_CONFIG.format(url=upstream.url))
    app = build_app(str(path))
    try:
        with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
            assert started.wait(5), "startup began warming the encodings"
            # The warm-up is still running: the gateway started and serves anyway.
            r = http.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-pro"})
            assert r.status_code == 200
            assert not release.is_set()
            assert threads and threads[0] is not threading.main_thread()
            release.set()
    finally:
        release.set()


def test_a_failing_warm_up_is_logged_and_harmless(tmp_path, upstream, monkeypatch, caplog):
    from nexus_limits.gateway import app as gateway_app

    def broken() -> None:
        raise OSError("no network to fetch the encoding")

    monkeypatch.setattr(gateway_app, "warm_encodings", broken)
    path = tmp_path / "gw.toml"
    path.write_text(MEMORY_CONFIG.format(url=upstream.url))
    app = build_app(str(path))
    with caplog.at_level("WARNING", logger="nexus_limits.gateway"):
        with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
            r = http.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-pro"})
            assert r.status_code == 200
            deadline = time.monotonic() + 5
            while "warming the tokenizer" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.02)
    assert "warming the tokenizer encodings failed: no network" in caplog.text


# -- per-tier fair queues ------------------------------------------------------------

QUEUE_CONFIG = """
[upstream]
url = "{url}"

[gateway]
key = "bearer"

[tiers.q]
requests = "{rate}"
queue = "{queue}"

[tiers.plain]
requests = "{rate}"

[keys]
"sk-q" = "q"
"sk-q2" = "q"
"sk-plain" = "plain"
"""


def queue_app(tmp_path, upstream, rate="1/second", queue="5s"):
    path = tmp_path / "gw.toml"
    path.write_text(QUEUE_CONFIG.format(url=upstream.url, rate=rate, queue=queue))
    return build_app(str(path))


def test_queue_config_is_read(tmp_path, upstream):
    from nexus_limits.gateway import load_config

    for text, seconds in (("5s", 5.0), ("500ms", 0.5), ("1m", 60.0), ("2.5s", 2.5)):
        path = tmp_path / "gw.toml"
        path.write_text(QUEUE_CONFIG.format(url=upstream.url, rate="1/second", queue=text))
        cfg = load_config(str(path))
        assert cfg.tiers["q"].queue == seconds and cfg.tiers["plain"].queue is None


@pytest.mark.parametrize(
    "value",
    ['"0s"', '"-1s"', '"5h"', '"abc"', '""', '"nan"', '"inf"', "nan", "inf", "1e9", "true", "[1]", '"301s"', "0"],
)
def test_queue_config_errors(tmp_path, value):
    from nexus_limits.gateway import ConfigError, load_config

    path = tmp_path / "bad.toml"
    path.write_text("[upstream]\nurl = 'http://x'\n[tiers.a]\ntokens = '1/s'\nqueue = " + value + "\n")
    with pytest.raises(ConfigError, match=r"bad\.toml:5: tiers\.a\.queue: must be a wait above 0"):
        load_config(str(path))


def test_queue_needs_a_limit(tmp_path):
    from nexus_limits.gateway import ConfigError, load_config

    path = tmp_path / "bad.toml"
    path.write_text("[upstream]\nurl = 'http://x'\n[tiers.a]\nspend = '1.00/day'\nqueue = '5s'\n")
    with pytest.raises(ConfigError, match=r"bad\.toml:5: tiers\.a\.queue: needs one of requests"):
        load_config(str(path))


def test_llm_middleware_refuses_a_queue_over_another_limiter():
    import nexus_limits as nl
    from nexus_limits.adapters.llm import LLMLimitMiddleware
    from nexus_limits.fair import FairQueue

    limiter = nl.TokenLimiter(requests="1/second")
    other = FairQueue(nl.TokenLimiter(requests="1/second"))
    with pytest.raises(ValueError, match="queue must be a nexus_limits.fair.FairQueue over"):
        LLMLimitMiddleware(fake_llm.app, limiter=limiter, queue=other)
    from nexus_limits.spend import SpendLimiter

    with pytest.raises(ValueError, match="queue must be a nexus_limits.fair.FairQueue over"):
        LLMLimitMiddleware(fake_llm.app, spend=SpendLimiter("1.00/day"), queue=other)
    assert LLMLimitMiddleware(fake_llm.app, limiter=limiter, queue=FairQueue(limiter)).queue is not None


def _post_many(url, key, n):
    from concurrent.futures import ThreadPoolExecutor

    def one(_):
        with httpx.Client(base_url=url, timeout=15) as http:
            return http.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"})

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_queued_tier_waits_instead_of_refusing(tmp_path, upstream):
    app = queue_app(tmp_path, upstream, rate="1/second", queue="5s")
    with ASGIServer(app, lifespan="on") as gw:
        plain = [r.status_code for r in _post_many(gw.url, "sk-plain", 3)]
        queued = [r.status_code for r in _post_many(gw.url, "sk-q", 3)]
        assert sorted(plain) == [200, 429, 429], "without a queue: refused at once"
        assert queued == [200, 200, 200], "with a queue: each waits for its turn"
        text = app.metrics.render().decode()
    assert 'nexus_limits_queue_admitted_total{queue="tier-q"} 3.0' in text
    assert 'nexus_limits_queue_waiting{queue="tier-q"} 0.0' in text
    assert 'nexus_limits_queue_wait_seconds_count{queue="tier-q"} 3.0' in text
    assert 'nexus_limits_queue_refused_total{queue="tier-q",reason="at_once"} 0.0' in text
    assert 'queue="tier-plain"' not in text
    stats = app.tiers["q"].queue.stats()
    assert stats["admitted"] == 3 and stats["wait_seconds_max"] > 0.5


def test_queue_refuses_what_cannot_make_its_deadline(tmp_path, upstream):
    app = queue_app(tmp_path, upstream, rate="1/minute", queue="500ms")
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        headers = {"authorization": "Bearer sk-q"}
        assert http.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
        r = http.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert r.status_code == 429
        assert 55 <= int(r.headers["retry-after"]) <= 60
        body = r.json()
        assert "fair queue refused" in body["error"]["message"]
        assert "sk-q" not in r.text, "the client's key (a credential) is not echoed in the answer"
        text = app.metrics.render().decode()
    assert 'nexus_limits_queue_refused_total{queue="tier-q",reason="at_once"} 1.0' in text


def test_a_client_that_leaves_while_queued_leaves_the_queue(tmp_path, upstream):
    import json
    import socket

    app = queue_app(tmp_path, upstream, rate="1/minute", queue="60s")
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        headers = {"authorization": "Bearer sk-q"}
        assert http.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
        body = json.dumps(CHAT).encode()
        host, port = gw.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-q\r\n"
            b"content-type: application/json\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        queue = app.tiers["q"].queue
        deadline = time.monotonic() + 5
        while queue.waiting() != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert queue.waiting() == 1, "the request waits in the queue"
        sock.close()
        deadline = time.monotonic() + 5
        while queue.waiting() != 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert queue.waiting() == 0 and queue.stats()["cancelled"] == 1


# -- the adaptive upstream limit (AIMD) ------------------------------------------------


class Throttling:
    """A fake upstream: answers 429 to the first ``refuse`` requests, then 200."""

    def __init__(self, refuse: int) -> None:
        self.refuse = refuse
        self.seen = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        self.seen += 1
        status = 429 if self.seen <= self.refuse else 200
        body = b'{"object": "list", "data": []}'
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 429:
            headers.append((b"retry-after", b"1"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


ADAPTIVE_CONFIG = """
[upstream]
url = "{url}"
timeout = {timeout}

[upstream.adaptive]
ceiling = "{ceiling}"
floor = "{floor}"
increase = "{increase}"
decrease = 0.5
interval = 0
cooldown = 0

[gateway]
key = "bearer"
admin_token_env = "WIRING_ADMIN"

[tiers.t]
requests = "1000/minute"

[keys]
"sk-t" = "t"
"""


def adaptive_app(tmp_path, url, monkeypatch, ceiling="600/minute", floor="60/minute", increase="60/minute", timeout=30):
    monkeypatch.setenv("WIRING_ADMIN", "admin-secret")
    path = tmp_path / "gw.toml"
    path.write_text(ADAPTIVE_CONFIG.format(url=url, ceiling=ceiling, floor=floor, increase=increase, timeout=timeout))
    return build_app(str(path))


def test_adaptive_limit_backs_off_on_429_and_recovers(tmp_path, monkeypatch):
    fake = Throttling(refuse=2)
    with ASGIServer(fake) as up:
        app = adaptive_app(tmp_path, up.url, monkeypatch)
        host = up.url.removeprefix("http://")
        with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
            key = {"authorization": "Bearer sk-t"}
            admin = {"authorization": "Bearer admin-secret"}
            assert http.get("/_nexus/upstream", headers=admin).json()["adaptive"]["value"] == 600
            assert [http.get("/v1/models", headers=key).status_code for _ in range(2)] == [429, 429]
            assert app.proxy.aimd.value == 150  # 600 halved twice
            assert app.proxy.gate.peek("upstream").limit == 150, "the gate follows the limit"
            doc = http.get("/_nexus/upstream", headers=admin).json()
            assert doc["upstream"] == host and doc["adaptive"]["value"] == 150 and doc["adaptive"]["window"] == 60
            assert f'nexus_limits_upstream_limit{{upstream="{host}"}} 150.0' in app.metrics.render().decode()
            assert http.get("/v1/models", headers=key).status_code == 200
            assert app.proxy.aimd.value == 210  # + increase per healthy answer
            for _ in range(10):
                assert http.get("/v1/models", headers=key).status_code == 200
            assert app.proxy.aimd.value == 600, "climbs back, never above the ceiling"
            assert app.proxy.gate.peek("upstream").limit == 600
            assert f'nexus_limits_upstream_limit{{upstream="{host}"}} 600.0' in app.metrics.render().decode()


def test_adaptive_gate_holds_calls_to_its_rate(tmp_path, monkeypatch):
    fake = Throttling(refuse=0)
    with ASGIServer(fake) as up:
        app = adaptive_app(tmp_path, up.url, monkeypatch, ceiling="2/minute", floor="1/minute", timeout=1)
        with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
            key = {"authorization": "Bearer sk-t"}
            codes = [http.get("/v1/models", headers=key) for _ in range(3)]
            assert [r.status_code for r in codes] == [200, 200, 503]
            assert "adaptive limit" in codes[2].json()["detail"]
            assert int(codes[2].headers["retry-after"]) >= 1
        assert fake.seen == 2, "the third call never reached the upstream"


def test_no_adaptive_limit_by_default(tmp_path, upstream, monkeypatch):
    monkeypatch.setenv("WIRING_ADMIN", "admin-secret")
    path = tmp_path / "gw.toml"
    text = MEMORY_CONFIG.format(url=upstream.url).replace(
        'key = "bearer"', 'key = "bearer"\nadmin_token_env = "WIRING_ADMIN"'
    )
    path.write_text(text)
    app = build_app(str(path))
    assert app.proxy.aimd is None and app.proxy.gate is None
    assert "nexus_limits_upstream_limit{" not in app.metrics.render().decode()
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        doc = http.get("/_nexus/upstream", headers={"authorization": "Bearer admin-secret"}).json()
    assert doc["adaptive"] is None


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ('floor = "1/minute"\n', r":\d+: upstream\.adaptive: needs ceiling"),
        ('ceiling = "lots"\n', r"upstream\.adaptive\.ceiling: invalid rate"),
        ("ceiling = 500\n", r"upstream\.adaptive\.ceiling: must be a rate"),
        ('ceiling = "10/minute"\nfloor = "20/minute"\n', r"upstream\.adaptive\.floor: must not be above the ceiling"),
        ('ceiling = "10/minute"\ndecrease = 1.5\n', r"upstream\.adaptive\.decrease: must be above 0 and at most 0\.99"),
        ('ceiling = "10/minute"\ndecrease = nan\n', r"upstream\.adaptive\.decrease: must be above 0"),
        ('ceiling = "10/minute"\nlow_water = inf\n', r"upstream\.adaptive\.low_water: must be a fraction"),
        ('ceiling = "10/minute"\ninterval = -1\n', r"upstream\.adaptive\.interval: must be from 0 to 3600"),
        ('ceiling = "10/minute"\ncooldown = true\n', r"upstream\.adaptive\.cooldown: must be a number of seconds"),
        ('ceiling = "10/minute"\nspeed = 1\n', r"upstream\.adaptive\.speed: unknown field"),
    ],
)
def test_adaptive_config_errors(tmp_path, body, where):
    from nexus_limits.gateway import ConfigError, load_config

    path = tmp_path / "bad.toml"
    path.write_text("[upstream]\nurl = 'http://x'\n[upstream.adaptive]\n" + body + "[tiers.a]\ntokens = '1/s'\n")
    with pytest.raises(ConfigError, match=r"bad\.toml:\d+: " + where.removeprefix(r":\d+: ")):
        load_config(str(path))


def test_adaptive_config_converts_rates_to_the_ceilings_window(tmp_path):
    from nexus_limits.gateway import load_config

    path = tmp_path / "gw.toml"
    path.write_text(
        "[upstream]\nurl = 'http://x'\n[upstream.adaptive]\nceiling = '600/minute'\nfloor = '1/second'\n"
        "increase = '120/hour'\n[tiers.a]\ntokens = '1/s'\n"
    )
    adaptive = load_config(str(path)).upstream_adaptive
    assert adaptive == {"window": 60.0, "ceiling": 600.0, "floor": 60.0, "increase": 2.0}


async def slow_llm(scope, receive, send):
    """A fake upstream that takes 0.5 s to answer a chat completion."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await asyncio.sleep(0.5)
    body = b'{"object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def test_a_concurrency_refusal_is_not_queued(tmp_path):
    """Documented: a concurrency refusal names no time a place frees up, so a queued
    tier answers it at once (429, x-should-retry false), as an unqueued one does."""
    with ASGIServer(slow_llm) as up:
        path = tmp_path / "gw.toml"
        path.write_text(
            f'[upstream]\nurl = "{up.url}"\n[tiers.c]\nrequests = "100/second"\nconcurrency = 1\nqueue = "5s"\n'
            '[keys]\n"sk-c" = "c"\n'
        )
        app = build_app(str(path))
        with ASGIServer(app, lifespan="on") as gw:
            assert sorted(r.status_code for r in _post_many(gw.url, "sk-c", 2)) == [200, 429]
        stats = app.tiers["c"].queue.stats()
        assert stats["admitted"] == 1 and stats["refused_at_once"] == 1


def test_queue_needs_a_rate_not_only_concurrency(tmp_path):
    from nexus_limits.gateway import ConfigError, load_config

    path = tmp_path / "bad.toml"
    path.write_text("[upstream]\nurl = 'http://x'\n[tiers.a]\nconcurrency = 2\nqueue = '5s'\n")
    with pytest.raises(ConfigError, match=r"bad\.toml:5: tiers\.a\.queue: needs one of requests, tokens, daily_tokens"):
        load_config(str(path))


def test_the_example_config_shows_the_new_fields():
    from pathlib import Path

    from nexus_limits.gateway import config

    text = (Path(config.__file__).parent / "example.toml").read_text()
    assert "# [upstream.adaptive]" in text
    for field in config._ADAPTIVE_FIELDS:
        assert f"# {field} = " in text, field
    assert '# queue = "5s"' in text
