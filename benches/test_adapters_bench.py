"""Middleware overhead per request, in-process ASGI calls (no network): the bare app,
the same app behind nexus-limits' middleware, and behind slowapi with the same limit.

Run: python -m pytest benches/test_adapters_bench.py --benchmark-only -s
(slowapi is installed by `pip install nexus-limits[bench]`, or by hand.)
"""

from __future__ import annotations

import asyncio

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import nexus_limits as nl
from nexus_limits.adapters.asgi import RateLimitMiddleware

LIMIT = "1000000000/minute"


async def home(request):
    return PlainTextResponse("ok")


def bare_app():
    return Starlette(routes=[Route("/", home)])


def nexus_app():
    app = bare_app()
    app.add_middleware(RateLimitMiddleware, limiter=nl.FixedWindow(LIMIT), key="ip")
    return app


def slowapi_app():
    slowapi = pytest.importorskip("slowapi")
    from slowapi.middleware import SlowAPIMiddleware
    from slowapi.util import get_remote_address

    limiter = slowapi.Limiter(key_func=get_remote_address, default_limits=[LIMIT])
    app = bare_app()
    app.state.limiter = limiter
    app.add_middleware(SlowAPIMiddleware)
    return app


SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"test")],
    "client": ("127.0.0.1", 50000),
    "server": ("test", 80),
}


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def runner(loop, app, n=200):
    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    statuses = []

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def many():
        for _ in range(n):
            await app(dict(SCOPE), receive, send)

    def run():
        loop.run_until_complete(many())

    run()  # warm up (Starlette builds its middleware stack on the first call)
    assert set(statuses) == {200}
    return run


N = 200


@pytest.mark.parametrize("variant", ["bare", "nexus-limits", "slowapi"])
def test_asgi_middleware_overhead(benchmark, loop, variant):
    app = {"bare": bare_app, "nexus-limits": nexus_app, "slowapi": slowapi_app}[variant]()
    benchmark.extra_info["requests_per_round"] = N
    benchmark(runner(loop, app, N))
    per_request = benchmark.stats.stats.median / N * 1e6
    benchmark.extra_info["us_per_request"] = per_request
    print(f"\n{variant}: {per_request:.1f} us per request")
