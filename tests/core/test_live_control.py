"""Quotas changed at run time, shadow mode, counters, introspection and metrics."""

from __future__ import annotations

import asyncio
import logging
import math

import pytest
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import nexus_limits as nl
import nexus_limits.redis as nlr
import nexus_limits.redis.asyncio as nla
from nexus_limits.metrics import Metrics

# ---------------------------------------------------------------- in-process quotas


def test_set_quota_shrinks_and_grows_one_key_keeping_usage(clock):
    tb = nl.TokenBucket("10/s", burst=10, clock=clock)
    assert tb.hit("a", 8).allowed and tb.hit("b", 8).allowed
    tb.set_quota("a", "1/s", burst=5)
    d = tb.peek("a")
    assert not d.allowed and d.limit == 5
    assert d.retry_after == pytest.approx(4.0), "8 used of 5: 4 units must drain at 1/s before one fits"
    assert tb.peek("b", 0).remaining == 2, "other keys keep the default"
    info = tb.inspect("a")
    assert info["own_quota"] and info["limit"] == 5 and info["rate"] == nl.Rate(1, 1.0)
    assert info["used"] == 5 and not info["allowed"] and info["tracked"]
    clock.advance(4.0)
    assert tb.hit("a").allowed
    assert tb.clear_quota("a") is True
    assert tb.clear_quota("a") is False
    assert tb.inspect("a")["own_quota"] is False
    # Back on 10/s with 5 in the bucket's backlog (scaled back: 5 units).
    assert tb.peek("a", 0).remaining == 5
    # Growing: a key given more room gets it at once.
    tb.set_quota("b", "100/s", burst=100)
    assert tb.hit("b", 90).allowed and tb.peek("b", 0).remaining == 10  # b refilled during the 4 s
    assert tb.stats()["own_quotas"] == 1


@pytest.mark.parametrize("kind", [nl.FixedWindow, nl.SlidingWindow])
def test_window_quotas(kind, clock):
    lim = kind("10/minute", clock=clock)
    assert lim.hit("k", 6).allowed
    lim.set_quota("k", "5/minute")
    assert not lim.peek("k").allowed and lim.peek("k").limit == 5
    lim.set_quota("k", "100/hour")
    assert lim.peek("k", 0).remaining == 94, "the units used this minute count against the hour"
    with pytest.raises(ValueError, match="has no burst"):
        lim.set_quota("k", "5/minute", burst=3)
    with pytest.raises(ValueError, match="has no burst"):
        lim.set_default_quota("5/minute", burst=3)


def test_leaky_bucket_quota(clock):
    lb = nl.LeakyBucket("10/s", capacity=10, clock=clock)
    assert lb.hit("q", 6).allowed
    lb.set_quota("q", "1/s", burst=4)
    d = lb.peek("q")
    assert not d.allowed and d.limit == 4


def test_set_default_quota_keeps_every_keys_usage(clock):
    tb = nl.TokenBucket("10/minute", clock=clock)
    for i in range(200):
        tb.hit(f"k{i}", 4)
    tb.set_quota("k7", "1/minute", burst=100)
    tb.set_default_quota("20/minute")
    assert tb.rate == nl.Rate(20, 60.0) and tb.limit == 20
    assert all(tb.peek(f"k{i}", 0).remaining == 16 for i in range(200) if i != 7)
    assert tb.peek("k7", 0).remaining == 96, "a key with its own quota keeps it"
    assert tb.hit("fresh", 1).remaining == 19
    tb.set_default_quota("1/day", burst=1)
    assert tb.ttl >= 86_400, "the ttl grows with a quota that takes longer to refill"
    assert "1/day" in repr(tb) or "86400" in repr(tb)


def test_quota_bad_input(clock):
    tb = nl.TokenBucket("10/s", clock=clock)
    with pytest.raises(ValueError, match="invalid rate|rate"):
        tb.set_quota("a", "lots")
    with pytest.raises(TypeError, match="key must be str, bytes or int"):
        tb.set_quota(1.5, "1/s")
    with pytest.raises(ValueError, match="burst must be at least 1"):
        tb.set_quota("a", "1/s", burst=0)
    with pytest.raises(TypeError, match="burst must be an int"):
        tb.set_quota("a", "1/s", burst="5")
    with pytest.raises(TypeError, match="shadow must be True or False"):
        tb.shadow = 1
    with pytest.raises(TypeError, match="shadow must be True or False"):
        nl.TokenBucket("1/s", shadow="yes")
    assert tb.stats()["own_quotas"] == 0, "nothing half-applied"


def test_quota_changes_are_safe_under_threads():
    import threading

    tb = nl.TokenBucket("1000/hour", burst=1000)
    stop = threading.Event()
    admitted = []

    def hammer():
        n = 0
        while not stop.is_set():
            n += tb.try_acquire("shared")
        admitted.append(n)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(50):
        tb.set_quota("shared", "2000/hour", burst=2000)
        tb.clear_quota("shared")
    stop.set()
    for t in threads:
        t.join()
    # Usage is carried over every time: never more than the largest burst in all.
    assert sum(admitted) <= 2000


# ---------------------------------------------------------------- shadow mode and counters


def test_shadow_mode_never_denies_but_counts_and_logs(clock, caplog):
    tb = nl.TokenBucket("2/minute", clock=clock, shadow=True)
    assert tb.shadow
    with caplog.at_level(logging.INFO, logger="nexus_limits.shadow"):
        results = [tb.hit("user-1") for _ in range(5)]
    assert all(d.allowed for d in results)
    assert [d.shadow for d in results] == [False, False, True, True, True]
    assert "would deny key 'user-1'" in caplog.text
    stats = tb.stats()
    assert stats["allowed"] == 2 and stats["denied"] == 3 and stats["shadow_denied"] == 3
    assert stats["near_limit"] == 1 and stats["keys"] == 1
    # A shadow-denied call is not charged: turning enforcement on shows the real state.
    tb.shadow = False
    assert not tb.hit("user-1").allowed
    assert "shadow=True" not in repr(tb)


def test_shadow_log_gives_the_retry_after_it_would_have_given(clock, caplog, tmp_path, redis_client):
    """In-process, in a SharedMemoryStore and on Redis, the log line of a shadow-mode
    denial names the wait the denial would have had, not the admission's 0."""
    store = nl.SharedMemoryStore(path=tmp_path / "s", capacity=64)
    for lim in (
        nl.TokenBucket("2/minute", clock=clock, shadow=True),
        nl.TokenBucket("2/minute", clock=clock, shadow=True, store=store),
        nlr.TokenBucket(redis_client, "2/minute", clock=clock, shadow=True),
    ):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="nexus_limits.shadow"):
            lim.hit("k", 2)
            d = lim.hit("k")
        assert d.allowed and d.shadow and d.retry_after == 0.0
        assert [r.getMessage().split(" would deny ")[1] for r in caplog.records] == [
            "key 'k' (remaining 0 of 2, retry after 30.000s)"
        ], lim
    fw = nl.FixedWindow("1/minute", clock=clock, shadow=True)
    clock.advance(15)
    fw.hit("k")
    with caplog.at_level(logging.INFO, logger="nexus_limits.shadow"):
        fw.hit("k")
    assert "fixed window 1/minute would deny key 'k' (remaining 0 of 1, retry after 45.000s)" in caplog.text


def test_shadow_part_of_a_composite(clock):
    strict = nl.TokenBucket("1/minute", clock=clock, shadow=True)
    loose = nl.TokenBucket("10/minute", clock=clock)
    both = nl.Composite([strict, loose])
    assert all(both.hit("k").allowed for _ in range(5))
    assert loose.peek("k", 0).remaining == 5, "the enforcing part is charged"
    assert strict.stats()["shadow_denied"] == 4


def test_stats_count_evictions(clock):
    tb = nl.TokenBucket("10/s", clock=clock, ttl=1)
    for i in range(100):
        tb.hit(i)
    clock.advance(5)
    assert tb.sweep() == 100
    assert tb.stats()["evicted"] == 100 and tb.stats()["keys"] == 0


def test_top_keys_with_names(clock):
    sw = nl.SlidingWindow("100/hour", clock=clock)
    for i in range(1, 31):
        sw.hit(f"user-{i}", i)
    top = sw.top_keys(3, keys=[f"user-{i}" for i in range(1, 31)])
    assert [t["key"] for t in top] == ["user-30", "user-29", "user-28"]
    assert top[0]["used"] == 30 and top[0]["limit"] == 100 and len(top[0]["id"]) == 24
    anonymous = sw.top_keys(2)
    assert anonymous[0]["key"] is None and anonymous[0]["id"] == top[0]["id"]
    assert sw.top_keys(0) == []
    with pytest.raises(TypeError, match="keys must be an iterable"):
        sw.top_keys(3, keys=5)


def test_token_limiter_live_control(clock):
    tl = nl.TokenLimiter(requests="10/minute", tokens="1000/minute", concurrency=2, clock=clock)
    r = tl.reserve("k", 600)
    assert r.allowed and r.settle(500)
    tl.set_quota("k", tokens="400/minute")
    assert not tl.reserve("k", 1).allowed, "500 used of 400"
    assert tl.inspect("k")["tokens"]["own_quota"]
    assert tl.clear_quota("k") and not tl.clear_quota("k")
    tl.set_default_quota(tokens="2000/minute", concurrency=3)
    assert tl.tokens == nl.Rate(2000, 60.0) and tl.concurrency == 3
    assert tl.inspect("k")["tokens"]["remaining"] == 1500, "the 500 tokens used are kept"
    c = tl.reserve("k", 100)
    assert c.cancel()
    stats = tl.stats()
    assert stats["tokens_reserved"] == 700 and stats["tokens_settled"] == 500 and stats["tokens_refunded"] == 100
    assert stats["tokens"]["allowed"] == 2 and stats["tokens"]["denied"] == 1
    assert tl.top_keys(1, ["k"])[0]["key"] == "k"
    with pytest.raises(ValueError, match="no daily_tokens limit"):
        tl.set_quota("k", daily_tokens=10)
    with pytest.raises(ValueError, match="give at least one"):
        tl.set_default_quota()
    with pytest.raises(ValueError, match="limit must be"):
        tl.top_keys(1, limit="dollars")
    tl.shadow = True
    assert tl.shadow
    for _ in range(20):
        r = tl.reserve("k", 10)
        assert r.allowed and r.settle(10)
    nl.Concurrency(2).set_limit(5)
    with pytest.raises(ValueError):
        nl.Concurrency(2).set_limit(0)


# ---------------------------------------------------------------- Redis


def unreachable() -> redis.Redis:
    """A client of a port nothing listens on, without retries."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis(port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))


def test_redis_quota_is_shared_and_keeps_usage(redis_client):
    a = nlr.TokenBucket(redis_client, "10/minute", burst=10, name="api")
    b = nlr.TokenBucket(redis_client, "10/minute", burst=10, name="api")  # another process
    assert a.hit("k", 8).allowed
    a.set_quota("k", "5/minute", burst=5)
    d = b.peek("k")
    assert not d.allowed and d.limit == 5, "every process sees the key's own quota"
    info = b.inspect("k")
    assert info["own_quota"] and info["limit"] == 5 and info["used"] == 5
    assert b.clear_quota("k") is True and b.clear_quota("k") is False
    assert a.peek("k", 0).remaining == 2, "8 used of 10 again"
    assert a.inspect("k")["own_quota"] is False
    with pytest.raises(ValueError, match="burst must be at least 1"):
        a.set_quota("k", "5/minute", burst=0)


@pytest.mark.parametrize("kind", [nlr.FixedWindow, nlr.SlidingWindow])
def test_redis_window_quota(redis_client, kind):
    lim = kind(redis_client, "10/minute")
    assert lim.hit("k", 6).allowed
    lim.set_quota("k", "5/minute")
    assert not lim.peek("k").allowed and lim.peek("k").limit == 5
    lim.set_quota("k", "100/hour")
    assert lim.peek("k", 0).remaining == 94
    assert lim.clear_quota("k")
    with pytest.raises(ValueError, match="has no burst"):
        lim.set_quota("k", "5/minute", burst=3)


def test_redis_leaky_quota_and_composite(redis_client):
    lb = nlr.LeakyBucket(redis_client, "10/s", capacity=10)
    assert lb.hit("q", 6).allowed
    lb.set_quota("q", "1/s", burst=4)
    assert not lb.peek("q").allowed
    per_minute = nlr.TokenBucket(redis_client, "100/minute")
    per_second = nlr.TokenBucket(redis_client, "5/s")
    both = nlr.Composite([per_minute, per_second])
    per_second.set_quota("c", "2/s", burst=2)
    assert [both.hit("c").allowed for _ in range(3)] == [True, True, False], "composites read parts' quotas"
    with pytest.raises(TypeError, match="call set_quota on its parts"):
        both.set_quota("c", "1/s")
    with pytest.raises(TypeError, match="call clear_quota on its parts"):
        both.clear_quota("c")
    assert [p["limit"] for p in both.inspect("c")["parts"]] == [100, 2]


def test_redis_shadow_and_stats(redis_client, caplog):
    tb = nlr.TokenBucket(redis_client, "2/minute", shadow=True)
    with caplog.at_level(logging.INFO, logger="nexus_limits.shadow"):
        results = [tb.hit("u") for _ in range(4)]
    assert all(d.allowed for d in results) and [d.shadow for d in results] == [False, False, True, True]
    assert "would deny key 'u'" in caplog.text
    stats = tb.stats()
    assert (stats["allowed"], stats["denied"], stats["shadow_denied"]) == (2, 2, 2)
    tb.shadow = False
    assert not tb.hit("u").allowed
    # A shadow part of a composite.
    strict = nlr.TokenBucket(redis_client, "1/minute", shadow=True)
    loose = nlr.TokenBucket(redis_client, "10/minute")
    both = nlr.Composite([strict, loose])
    decisions = [both.hit("c") for _ in range(3)]
    # The shadow part admits what it would deny (and counts it); the composite's answer
    # is not a shadow one, as in-process: only the composite's own flag makes it one.
    assert all(d.allowed for d in decisions) and [d.shadow for d in decisions] == [False, False, False]
    assert loose.peek("c", 0).remaining == 7
    assert not both.shadow
    assert strict.stats()["shadow_denied"] == 2


def test_redis_errors_are_counted():
    client = unreachable()
    opened = nlr.TokenBucket(client, "1/s", on_error="allow")
    closed = nlr.TokenBucket(client, "1/s", on_error="deny")
    assert opened.hit("k").fallback and not closed.hit("k").allowed
    assert opened.stats()["errors"] == 1 and opened.stats()["fail_open"] == 1
    assert closed.stats()["fail_closed"] == 1
    raising = nlr.TokenBucket(client, "1/s")
    with pytest.raises(nl.BackendUnavailable):
        raising.set_quota("k", "2/s")
    assert raising.stats()["errors"] == 1
    client.close()


def test_redis_top_keys(redis_client):
    tb = nlr.TokenBucket(redis_client, "100/hour", name="top")
    other = nlr.TokenBucket(redis_client, "100/hour", name="other")
    for i in range(1, 21):
        tb.hit(f"user:{i}", i)
    other.hit("user:1", 99)
    top = tb.top_keys(3)
    assert [t["key"] for t in top] == ["user:20", "user:19", "user:18"]
    assert top[0]["used"] == 20
    tb.hit(b"\x00raw", 50)
    tb.hit(77, 60)
    assert [t["key"] for t in tb.top_keys(2)] == [77, b"\x00raw"]


def test_redis_asyncio_live_control(async_redis_client, caplog):
    async def main():
        client = async_redis_client()
        try:
            tb = nla.TokenBucket(client, "10/minute", name="x")
            assert (await tb.hit("k", 8)).allowed
            await tb.set_quota("k", "5/minute", burst=5)
            assert not (await tb.peek("k")).allowed
            assert (await tb.inspect("k"))["own_quota"]
            assert await tb.clear_quota("k")
            assert (await tb.top_keys(1))[0]["key"] == "k"
            tb.shadow = True
            assert tb.shadow and (await tb.hit("k", 5)).shadow
            assert tb.stats()["shadow_denied"] == 1
            both = nla.Composite([tb, nla.TokenBucket(client, "1/minute")])
            with pytest.raises(TypeError):
                await both.set_quota("k", "1/s")
            assert [r["key"] for r in await both.top_keys()] == ["k"]
            both.shadow = True
            assert both.shadow
            assert len((await both.inspect("k"))["parts"]) == 2
            tl = nla.TokenLimiter(client, tokens="100/minute")
            r = await tl.reserve("k", 40)
            assert await r.settle(30)
            assert tl.stats()["tokens_reserved"] == 40 and tl.stats()["tokens_settled"] == 30
        finally:
            await client.aclose()

    asyncio.run(main())


# ---------------------------------------------------------------- metrics


def scrape(metrics: Metrics) -> dict:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_collect_limiter_stats(clock, redis_client):
    metrics = Metrics(registry=CollectorRegistry())
    tb = metrics.watch(nl.TokenBucket("2/minute", clock=clock), "api")
    tl = metrics.watch(nl.TokenLimiter(requests="5/minute", tokens="100/minute", clock=clock), "llm")
    down = metrics.watch(nlr.TokenBucket(unreachable(), "1/s", on_error="deny"), "r")
    for _ in range(3):
        tb.hit("secret-api-key")
    tl.reserve("k", 50).settle(20)
    down.hit("k")
    got = scrape(metrics)
    assert got[("nexus_limits_checks_total", (("decision", "allowed"), ("limit", ""), ("limiter", "api")))] == 2
    assert got[("nexus_limits_checks_total", (("decision", "denied"), ("limit", ""), ("limiter", "api")))] == 1
    assert got[("nexus_limits_near_limit_total", (("limit", ""), ("limiter", "api")))] == 1
    assert got[("nexus_limits_keys", (("limit", ""), ("limiter", "api")))] == 1
    assert got[("nexus_limits_checks_total", (("decision", "allowed"), ("limit", "tokens"), ("limiter", "llm")))] == 1
    assert got[("nexus_limits_tokens_total", (("kind", "reserved"), ("limiter", "llm")))] == 50
    assert got[("nexus_limits_tokens_total", (("kind", "settled"), ("limiter", "llm")))] == 20
    assert got[("nexus_limits_backend_errors_total", (("limiter", "r"),))] == 1
    assert got[("nexus_limits_fallback_total", (("answer", "deny"), ("limiter", "r")))] == 1
    assert "secret-api-key" not in metrics.render().decode(), "labels never carry a key"
    metrics.unwatch("api")
    assert not any(labels and ("limiter", "api") in labels for _, labels in scrape(metrics))
    with pytest.raises(TypeError, match="must have stats"):
        metrics.watch(object(), "x")
    with pytest.raises(ValueError, match="non-empty str"):
        metrics.watch(tb, "")
    with pytest.raises(ValueError, match="namespace"):
        Metrics(registry=CollectorRegistry(), namespace="bad name")
    down.client.close()


def test_metrics_from_the_asgi_middleware(clock):
    import httpx
    from support.servers import ASGIServer

    from nexus_limits.adapters.asgi import RateLimitMiddleware

    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    metrics = Metrics(registry=CollectorRegistry())
    free = nl.TokenBucket("2/minute", clock=clock)
    search = nl.TokenBucket("100/minute", clock=clock)
    app = RateLimitMiddleware(
        ok,
        key="header:x-api-key",
        tiers={"free": free},
        tier_of={"k1": "free"},
        default_tier="free",
        routes={"/search/": search},
        metrics=metrics,
    )
    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        codes = [http.get("/", headers={"x-api-key": "k1"}).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        assert http.get("/search/x", headers={"x-api-key": "k1"}).status_code == 200
    got = scrape(metrics)
    free_labels = (("limiter", "free"), ("route", ""), ("tier", "free"))
    assert got[("nexus_limits_requests_total", (("decision", "denied"), *free_labels))] == 1
    assert got[("nexus_limits_requests_total", (("decision", "allowed"), *free_labels))] == 2
    # A route policy is named by its route, slashes kept.
    route = (("decision", "allowed"), ("limiter", "/search/"), ("route", "/search/"), ("tier", ""))
    assert got[("nexus_limits_requests_total", route)] == 1
    assert got[("nexus_limits_check_seconds_count", free_labels)] == 3
    assert 0 < got[("nexus_limits_check_seconds_sum", free_labels)] < 1
    with pytest.raises(TypeError, match="metrics must be"):
        RateLimitMiddleware(ok, limiter=free, metrics=object())


def test_metrics_from_wsgi_with_shadow(clock):
    import httpx
    from support.servers import WSGIServer

    from nexus_limits.adapters.wsgi import RateLimitMiddleware

    def ok(environ, start_response):
        start_response("200 OK", [])
        return [b"ok"]

    metrics = Metrics(registry=CollectorRegistry())
    lim = nl.TokenBucket("1/minute", clock=clock, shadow=True)
    app = RateLimitMiddleware(ok, limiter=lim, key="ip", metrics=metrics, policy_name="api")
    with WSGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        assert [http.get("/").status_code for _ in range(3)] == [200, 200, 200]
    got = scrape(metrics)
    labels = (("limiter", "api"), ("route", ""), ("tier", ""))
    assert got[("nexus_limits_requests_total", (("decision", "shadow_denied"), *labels))] == 2
    assert math.isclose(got[("nexus_limits_check_seconds_count", labels)], 3)
