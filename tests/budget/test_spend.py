"""Spend control: exact micro-dollar arithmetic, budgets, learned estimates, upstream feedback."""

from __future__ import annotations

import random
import threading
from decimal import Decimal

import pytest

import nexus_limits as nl
from nexus_limits.spend import (
    LearnedOutputEstimate,
    P2Quantile,
    Price,
    PriceTable,
    SpendLimiter,
    UnknownModel,
    UpstreamGuard,
    default_prices,
    parse_budget,
    price_source,
)
from nexus_limits.tokens import Usage, extract_usage


@pytest.mark.parametrize(
    ("text", "micros", "period"),
    [
        ("25.00/day", 25_000_000, 86400.0),
        ("$5 per hour", 5_000_000, 3600.0),
        ("0.5/minute", 500_000, 60.0),
        ("100/30d", 100_000_000, 2_592_000.0),
        ("0.000001/s", 1, 1.0),
    ],
)
def test_budgets(text, micros, period):
    assert parse_budget(text) == nl.Rate(micros, period)


@pytest.mark.parametrize(
    ("text", "exc", "why"),
    [
        ("25", ValueError, "dollars per period"),
        ("-1/day", ValueError, "dollars per period"),
        ("1.1234567/day", ValueError, "dollars per period"),
        ("0/day", ValueError, "at least"),
        ("25/fortnight", ValueError, "unknown period unit"),
        (25, TypeError, "budget must be a str"),
    ],
)
def test_bad_budgets(text, exc, why):
    with pytest.raises(exc, match=why):
        parse_budget(text)


def test_cost_arithmetic_is_exact():
    prices = default_prices()
    assert prices.get("gpt-4o") == Price.of("2.5", "10", "1.25")
    # 1000 x $2.50/M + 500 x $10/M = $0.0075
    assert prices.cost("gpt-4o", Usage(1000, 500)) == 7500
    # Cached input priced as cached: 200 x 2.5 + 800 x 1.25 + 500 x 10
    assert prices.cost("gpt-4o-2024-08-06", Usage(1000, 500, 800)) == 6500
    # gpt-4o-mini: 1001 x 0.15 + 3 x 0.6 = 151.95 micro-dollars, rounded up
    assert prices.cost("gpt-4o-mini", Usage(1001, 3)) == 152
    # Anthropic, cache reads and writes: 700 x 3 + 200 x 0.3 + 100 x 3.75 + 10 x 15
    assert prices.get("claude-sonnet-4-5").micros(1000, 10, 200, 100) == 2685
    # The same call as Anthropic reports it: cache writes come priced from its usage.
    reported = extract_usage(
        {
            "type": "message",
            "usage": {
                "input_tokens": 700,
                "cache_read_input_tokens": 200,
                "cache_creation_input_tokens": 100,
                "output_tokens": 10,
            },
        }
    )
    assert reported == Usage(1000, 10, 200, 0, True, 100)
    assert prices.cost("claude-sonnet-4-5", reported) == 2685
    assert prices.cost("claude-sonnet-4-5", reported, cache_write_tokens=0) == 2610, "written priced as input"
    assert prices.cost("openai/gpt-4o", Usage(1, 0)) == 3, "2.5 rounds up to 3"
    assert len(prices) > 100 and "gpt-4o" in prices
    assert set(price_source()) == {"source", "taken", "unit"}


def test_unknown_models_are_never_free():
    prices = default_prices()
    with pytest.raises(UnknownModel, match="no price for model 'my-model'"):
        prices.cost("my-model", Usage(10, 10))
    with pytest.raises(UnknownModel):
        prices.get("gpt-4oX"), "a prefix must end at a separator"
    priced = default_prices(default={"input": "1", "output": "2"})
    assert priced.cost("my-model", Usage(10, 10)) == 30
    table = PriceTable({"local": Price.of(Decimal("0.1"), 1)})
    table.set("local-big", {"input": "1", "output": "1"})
    assert table.cost("local-big-v2", Usage(10, 0)) == 10 and table.cost("local-x", Usage(10, 0)) == 1


@pytest.mark.parametrize(
    ("call", "exc", "why"),
    [
        (lambda: Price.of("-1", "1"), ValueError, "must not be negative"),
        (lambda: Price.of("abc", "1"), ValueError, "number of dollars"),
        (lambda: Price.of([1], "1"), TypeError, "number of dollars"),
        (lambda: Price.of("1", "1").micros(-1, 0), ValueError, "input_tokens must be a non-negative int"),
        (lambda: Price.of("1", "1").micros(5, 0, 6), ValueError, "cannot exceed input_tokens"),
        (lambda: PriceTable({"m": {"input": "1"}}), ValueError, "must have 'input' and 'output'"),
        (lambda: PriceTable().set("", {"input": 1, "output": 1}), ValueError, "non-empty str"),
        (lambda: SpendLimiter("1/day", prices={"m": 1}), TypeError, "prices must be a PriceTable"),
    ],
)
def test_bad_prices(call, exc, why):
    with pytest.raises(exc, match=why):
        call()


def test_reserve_settle_cancel(clock):
    spend = SpendLimiter("0.01/day", clock=clock)  # 10,000 micro-dollars
    res = spend.reserve("k", "gpt-4o", 1000, 500)
    assert res and res.estimate_micros == 7500 and res.decision.remaining == 2500
    assert res.headers() == {"x-budget-limit": "0.01", "x-budget-remaining": "0.0025", "x-budget-reset": "18h0m0s"}
    denied = spend.reserve("k", "gpt-4o", 1000, 500)
    assert not denied and "spend budget 0.01/day exhausted" in denied.detail() and "retry-after" in denied.headers()
    assert res.settle(Usage(1000, 100, 800)) and not res.settle(1)
    # The actual 2,500 + (200 x 2.5 + 800 x 1.25 + 100 x 10) = 2500 charged instead of 7500.
    again = spend.reserve("k", "gpt-4o", 1000, 500)
    assert again.allowed and again.decision.remaining == 0
    assert again.cancel()
    too_big = spend.reserve("k", "gpt-4o", 10_000, 0)
    assert not too_big and "above the whole budget" in too_big.detail()
    spend.reset("k")


def test_spend_under_threads(clock):
    spend = SpendLimiter("1.00/day", clock=clock)  # 1,000,000 micro-dollars; each call 10,000
    admitted = []

    def worker() -> None:
        for _ in range(40):
            r = spend.reserve("k", "gpt-4o", 4000, 0)
            if r.allowed:
                admitted.append(r.settle(Usage(4000, 0)))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 100 and all(admitted)


def test_spend_on_redis(redis_client):
    import nexus_limits.redis as nlr

    clock = nl.ManualClock(1_700_000_000.0)
    spend = nlr.SpendLimiter(redis_client, "0.01/day", clock=clock)
    res = spend.reserve("k", "gpt-4o", 1000, 500)
    assert res.estimate_micros == 7500 and res.allowed
    assert not spend.reserve("k", "gpt-4o", 1000, 500).allowed
    assert res.settle(Usage(1000, 100, 800))
    assert spend.reserve("k", "gpt-4o", 1000, 500).allowed
    assert any(k.endswith(b":spend-tokens") for k in redis_client.keys("*"))


def test_p95_converges_on_a_known_distribution():
    rng = random.Random(7)
    samples = [rng.expovariate(1 / 300) for _ in range(20_000)]
    sketch = P2Quantile(0.95)
    for x in samples:
        sketch.add(x)
    true_p95 = sorted(samples)[int(0.95 * len(samples))]
    assert abs(sketch.value() - true_p95) / true_p95 < 0.03
    assert P2Quantile(0.5).value() is None
    small = P2Quantile(0.95)
    for x in (5, 1, 3):
        small.add(x)
    assert small.value() == 5
    with pytest.raises(ValueError, match="quantile must be in"):
        P2Quantile(1.0)


def test_learned_output_estimates():
    est = LearnedOutputEstimate(default=1024, min_samples=20, max_series=3)
    body = {"model": "gpt-4o"}
    assert est.for_key(body, "k") == 1024, "the default until enough samples"
    rng = random.Random(1)
    for _ in range(500):
        est.observe("k", "gpt-4o", int(rng.uniform(100, 200)))
    assert 185 <= est.for_key(body, "k") <= 200
    assert est.for_key({**body, "max_tokens": 50}, "k") == 50, "a cap wins"
    assert 185 <= est.for_key(body, "someone-else") <= 200, "the model's estimate across keys"
    assert est.for_key({"model": "other"}, "k") == 1024
    for i in range(10):
        est.observe(f"key-{i}", "gpt-4o", 10)
    assert len(est) == 3, "memory bounded"
    with pytest.raises(ValueError, match="output_tokens"):
        est.observe("k", "gpt-4o", -1)
    with pytest.raises(ValueError, match="min_samples"):
        LearnedOutputEstimate(min_samples=0)


def test_upstream_headers_tighten_then_relax(clock):
    guard = UpstreamGuard(clock=clock)
    assert guard.check("org-1").allowed
    guard.observe(
        "org-1",
        {
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "2s",
            "x-ratelimit-remaining-tokens": "100",
            "x-ratelimit-reset-tokens": "6s",
        },
    )
    d = guard.check("org-1")
    assert not d.allowed and d.retry_after == pytest.approx(2.0)
    clock.advance(2)
    assert guard.check("org-1", tokens=50).allowed
    assert not guard.check("org-1", tokens=150).allowed, "fewer tokens left than asked"
    clock.advance(4)
    assert guard.check("org-1", tokens=150).allowed, "relaxed after the reported reset"
    guard.observe("org-1", {"retry-after": "5"}, status=429)
    assert guard.check("org-1").retry_after == pytest.approx(5.0)
    clock.advance(5)
    assert guard.check("org-1").allowed
    guard.observe("org-2", {"anthropic-ratelimit-requests-remaining": "3"}, status=429)
    assert not guard.check("org-2").allowed, "a 429 without retry-after still backs off"
    assert guard.check("org-3").allowed
    with pytest.raises(ValueError, match="margin"):
        UpstreamGuard(margin=-1)
