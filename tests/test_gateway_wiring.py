"""The gateway's wiring to the library: Redis spend budgets on the asyncio client, the
tokenizer warm-up at startup. Real uvicorn, a fake upstream, a real redis-server."""

from __future__ import annotations

import asyncio
import inspect
import time

import fake_llm
import httpx
import pytest
import redis
from servers import ASGIServer

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
