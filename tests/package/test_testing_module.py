"""``nexus_limits.testing``: the ManualClock fixture, resetting keys between tests, the
headers as numbers, and the middleware under Starlette's TestClient."""

from __future__ import annotations

import asyncio

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import nexus_limits as nl
from nexus_limits.adapters.asgi import RateLimitMiddleware
from nexus_limits.testing import limiter_clock, rate_limit_state, reset_keys, reset_keys_async

# Imported fixtures are used by name; this keeps the import from looking unused.
assert callable(limiter_clock)


def create_app(limiter) -> Starlette:
    async def hello(request):
        return PlainTextResponse("hi")

    app = Starlette(routes=[Route("/", hello)])
    app.add_middleware(RateLimitMiddleware, limiter=limiter, key="ip")
    return app


def test_the_fixture_is_a_fresh_manual_clock(limiter_clock):
    assert isinstance(limiter_clock, nl.ManualClock) and limiter_clock.now == 0.0
    limiter_clock.advance(30)


def test_each_test_gets_its_own_clock(limiter_clock):
    assert limiter_clock.now == 0.0, "not the clock the previous test advanced"


def test_the_middleware_under_testclient(limiter_clock):
    app = create_app(nl.SlidingWindow("2/minute", clock=limiter_clock))
    # TestClient's peer is "testclient", not an address: key="ip" finds no client.
    assert TestClient(app).get("/").status_code == 401
    client = TestClient(app, client=("203.0.113.7", 50000))
    first = client.get("/")
    assert first.status_code == 200
    # A sliding window is fully restored two windows after its first request.
    assert rate_limit_state(first.headers) == {"default": {"q": 2, "w": 60, "r": 1, "t": 120}}
    assert client.get("/").status_code == 200
    refused = client.get("/")
    # Two requests at t=0: the estimate drops below the limit halfway into the next window.
    assert refused.status_code == 429 and refused.headers["retry-after"] == "90"
    limiter_clock.advance(120)
    assert client.get("/").status_code == 200, "time moved without sleeping"


def test_reset_keys_between_tests(limiter_clock):
    shared = nl.TokenBucket("1/hour", clock=limiter_clock)
    both = nl.Composite([nl.TokenBucket("1/hour", clock=limiter_clock), nl.FixedWindow("5/day", clock=limiter_clock)])
    budget = nl.TokenLimiter(requests="1/hour", clock=limiter_clock)
    for limiter in (shared, both):
        limiter.hit("k")
        assert not limiter.hit("k").allowed
    budget.reserve("k", 0).settle(0)
    assert not budget.reserve("k", 0).allowed
    reset_keys([shared, both, budget], ["k", "other"])
    assert shared.hit("k").allowed and both.hit("k").allowed
    assert budget.reserve("k", 0).allowed
    with pytest.raises(TypeError, match="list of keys"):
        reset_keys([shared], "k")
    with pytest.raises(TypeError, match="nexus_limits limiters"):
        reset_keys([object()], ["k"])


def test_reset_keys_on_redis(redis_client, async_redis_client):
    import nexus_limits.redis as nlr
    import nexus_limits.redis.asyncio as nla

    sync_limiter = nlr.FixedWindow(redis_client, "1/hour", prefix="testing")
    sync_limiter.hit("k")
    reset_keys([sync_limiter], ["k"])
    assert sync_limiter.hit("k").allowed

    async def main():
        client = async_redis_client()
        limiter = nla.FixedWindow(client, "1/hour", prefix="testing-async")
        await limiter.hit("k")
        assert not (await limiter.hit("k")).allowed
        with pytest.raises(TypeError, match="reset_keys_async"):
            reset_keys([limiter], ["k"])
        await reset_keys_async([limiter, sync_limiter], ["k"])
        assert (await limiter.hit("k")).allowed
        await client.aclose()

    asyncio.run(main())


def test_rate_limit_state_reads_every_policy():
    headers = {
        "RateLimit-Policy": '"10/second";q=10;w=1, "a \\"quoted\\", name";q=1000;w=86400, "c";q=1',
        "RateLimit": '"10/second";r=9;t=1, "a \\"quoted\\", name";r=999;t=40000, "c";r=0;t=5',
        "Content-Type": "text/plain",
    }
    assert rate_limit_state(headers) == {
        "10/second": {"q": 10, "w": 1, "r": 9, "t": 1},
        'a "quoted", name': {"q": 1000, "w": 86400, "r": 999, "t": 40000},
        "c": {"q": 1, "r": 0, "t": 5},
    }
    assert rate_limit_state({"content-type": "text/plain"}) == {}
    assert rate_limit_state({"RateLimit": '"p";r=1;t=2;pk=:YWJj:;x="s\\"q"'}) == {
        "p": {"r": 1, "t": 2, "pk": ":YWJj:", "x": 's"q'}
    }
    for bad in ("10;q=1", '"unterminated;q=1', '"a";q=1 junk', '"a";q=1,,"b";q=2', '"a";q=', '"a" "b"'):
        with pytest.raises(ValueError, match="structured-field list"):
            rate_limit_state({"RateLimit": bad})
