"""TokenLimiter: reserve before the call, settle or cancel after it."""

from __future__ import annotations

import math
import threading

import pytest

import nexus_limits as nl
from nexus_limits.budget import go_duration


def make(clock, **kw):
    args = {"requests": "10/minute", "tokens": "1000/minute", "clock": clock}
    args.update(kw)
    return nl.TokenLimiter(**args)


def test_reserve_charges_every_limit(clock):
    tl = make(clock, daily_tokens=5000, concurrency=2)
    res = tl.reserve("k", tokens=600)
    assert res and res.allowed and res.estimate == 600
    assert res.requests.remaining == 9 and res.tokens.remaining == 400 and res.daily_tokens.remaining == 4400
    assert res.concurrency.remaining == 1
    second = tl.reserve("k", tokens=600)
    assert not second and second.tokens is not None and not second.tokens.allowed
    assert second.retry_after == pytest.approx(12.0)  # 200 more tokens at 1000/minute
    assert tl.reserve("other", 600).allowed, "keys are isolated"


def test_settle_refunds_or_charges_the_difference(clock):
    tl = make(clock)
    res = tl.reserve("k", 800)
    assert res.settle(300) is True
    assert res.done and res.settle(300) is False, "settled once"
    assert tl.reserve("k", 700).tokens.remaining == 0, "500 were refunded"
    low = make(clock)
    r = low.reserve("k", 100)
    assert r.settle(1500)
    d = low.reserve("k", 1)
    assert not d.allowed and d.retry_after == pytest.approx(30.06), "1500 charged: 500 of debt, then 1 more"


def test_cancel_refunds_everything(clock):
    tl = make(clock, requests="1/minute", concurrency=1)
    res = tl.reserve("k", 1000)
    assert not tl.reserve("k", 1).allowed
    assert res.cancel() is True and res.cancel() is False
    again = tl.reserve("k", 1000)
    assert again.allowed, "the request, the tokens and the lease all came back"


def test_unsettled_reservations_settle_at_their_estimate(clock):
    tl = make(clock, concurrency=1, lease_ttl=30)
    res = tl.reserve("k", 500)
    assert not tl.reserve("k", 1).allowed, "the lease is held"
    clock.advance(31)
    assert res.done
    assert res.settle(0) is False, "too late: the estimate stands"
    assert tl.reserve("k", 1).allowed, "the lease expired"
    assert tl.lease_ttl == 30.0


def test_concurrency_denial_charges_nothing(clock):
    tl = make(clock, concurrency=1)
    held = tl.reserve("k", 100)
    denied = tl.reserve("k", 100)
    assert not denied.allowed and not denied.concurrency.allowed
    assert denied.retry_after == pytest.approx(600.0)
    held.settle(100)
    assert tl.reserve("k", 800).tokens.remaining == 100, "the denied reservation charged no tokens"


def test_a_denied_reservation_cannot_be_settled(clock):
    tl = make(clock)
    res = tl.reserve("k", 5000)
    assert not res.allowed and res.retry_after == math.inf and res.done
    assert res.settle(10) is False and res.cancel() is False
    assert "allowed=False" in repr(res)


def test_headers(clock):
    tl = make(clock)
    h = tl.reserve("k", 250).headers()
    assert h == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "6s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "750",
        "x-ratelimit-reset-tokens": "15s",
    }
    denied = tl.reserve("k", 900).headers()
    assert denied["retry-after"] == "9"
    assert go_duration(360) == "6m0s" and go_duration(0.02) == "20ms" and go_duration(3723.5) == "1h2m3.5s"
    assert go_duration(math.inf) == "inf"


def test_threads_never_overspend(clock):
    tl = make(clock, requests="100000/minute", tokens="10000/minute", concurrency=50)
    admitted = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(100):
            r = tl.reserve("k", 100)
            if r.allowed:
                r.settle(50)  # the actual use is half the estimate
                with lock:
                    admitted.append(1)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Every admitted call spent 50 net; 10000 tokens admit exactly 199 with the 100-token estimate
    # of the last one needing 100 free: 199 * 50 = 9950 <= 10000 - 100 + 50.
    assert len(admitted) == 199
    assert tl.reserve("k", 50).allowed and not tl.reserve("k", 50).allowed


def test_only_some_limits(clock):
    only_conc = nl.TokenLimiter(concurrency=1, clock=clock)
    r = only_conc.reserve("k", 10**9)
    assert r.allowed and r.tokens is None and r.requests is None
    assert not only_conc.reserve("k", 1).allowed
    assert r.settle(5) and only_conc.reserve("k", 1).allowed
    tokens_only = nl.TokenLimiter(tokens="100/s", clock=clock)
    assert tokens_only.reserve("k", 100).allowed and not tokens_only.reserve("k", 1).allowed
    assert tokens_only.requests is None and tokens_only.concurrency is None
    daily = nl.TokenLimiter(daily_tokens="300/day", clock=clock)
    assert daily.daily_tokens == nl.Rate(300, 86400)


def test_reset_sweep_repr(clock):
    tl = make(clock, daily_tokens=1000, concurrency=3)
    tl.reserve("k", 1000)
    tl.reset("k")
    assert tl.reserve("k", 1000).allowed
    clock.advance(100_000)
    assert tl.sweep() >= 3
    assert (
        repr(tl)
        == "TokenLimiter(requests='10/minute', tokens='1000/minute', daily_tokens='1000/day', concurrency=3, lease_ttl=600.0)"
    )
    assert tl.clock is clock and tl.requests == nl.Rate(10, 60)


@pytest.mark.parametrize(
    ("kwargs", "exc", "why"),
    [
        ({}, ValueError, "at least one of requests, tokens, daily_tokens or concurrency"),
        ({"requests": "ten/minute"}, ValueError, "invalid rate"),
        ({"tokens": 5}, TypeError, "rate must be a str"),
        ({"daily_tokens": 0}, ValueError, "daily_tokens must be at least 1"),
        ({"concurrency": 0}, ValueError, "concurrency must be at least 1"),
        ({"tokens": "1/s", "lease_ttl": 0}, ValueError, "lease_ttl must be"),
        ({"tokens": "1/s", "clock": "now"}, TypeError, "clock must be None or a ManualClock"),
    ],
)
def test_bad_construction(kwargs, exc, why):
    with pytest.raises(exc, match=why):
        nl.TokenLimiter(**kwargs)


def test_bad_reserve_and_settle(clock):
    tl = make(clock)
    with pytest.raises(TypeError, match="tokens must be a non-negative int"):
        tl.reserve("k", 1.5)
    with pytest.raises(ValueError, match="tokens must be a non-negative integer"):
        tl.reserve("k", -1)
    with pytest.raises(TypeError, match="key must be"):
        tl.reserve(None, 1)
    res = tl.reserve("k", 10)
    with pytest.raises(ValueError, match="actual_tokens must be non-negative"):
        res.settle(-1)
    with pytest.raises(TypeError, match="actual_tokens must be an int"):
        res.settle("10")
    assert res.settle(10)


def test_peek_charges_nothing_and_takes_no_lease(clock):
    tl = make(clock, requests="2/minute", concurrency=1)
    assert tl.peek("k").allowed and tl.peek("k").done, "a peek holds nothing to settle"
    for _ in range(5):
        tl.peek("k", 100)
    first = tl.reserve("k", 100)
    assert first.allowed and first.requests.remaining == 1, "five peeks charged no request"
    busy = tl.peek("k")
    assert not busy.allowed and busy.concurrency is not None and not busy.concurrency.allowed
    assert busy.requests.allowed, "the request limit alone would admit it"
    assert busy.cancel() is False and busy.settle(0) is False
    first.settle(100)
    tl.reserve("k", 100).settle(100)
    spent = tl.peek("k")
    assert not spent.allowed and not spent.requests.allowed, "both requests used: refused before any body"
    assert spent.requests.retry_after == pytest.approx(30.0)
    assert not tl.peek("k", 5000).allowed, "a peek judges the tokens it is given"
    with pytest.raises(TypeError, match="tokens"):
        tl.peek("k", 1.5)


def test_inspect_counts_only_the_leases_held(clock):
    tl = make(clock, concurrency=3)
    assert tl.inspect("k")["concurrency"] == {"limit": 3, "in_flight": 0}, "no lease held: none in flight"
    held = [tl.reserve("k", 1) for _ in range(3)]
    assert tl.inspect("k")["concurrency"]["in_flight"] == 3
    held[0].settle(1)
    assert tl.inspect("k")["concurrency"]["in_flight"] == 2
    for r in held[1:]:
        r.cancel()
    assert tl.inspect("k")["concurrency"]["in_flight"] == 0
