"""Attacks on the plain Redis limiters (TokenBucket, LeakyBucket, FixedWindow,
SlidingWindow, Composite, Concurrency; sync and asyncio) against a real redis-server,
with clients built with redis-py's defaults: state in Redis that this library did not
write (corrupted values, keys of another type), costs past 64 bits, debts whose
expiry would not fit Redis, replies no script returns, and the token bucket's
answers at rates whose unit interval is not a whole number of microseconds."""

from __future__ import annotations

from typing import Any, Dict, List

import pytest

import nexus_limits as nl
import nexus_limits.redis as nlr

EPOCH = 1_700_000_000.0  # a realistic clock, like the server's TIME
RATE_KINDS = ["TokenBucket", "LeakyBucket", "FixedWindow", "SlidingWindow"]
# Values another program (or a hand) could leave at a limiter's state key.
GARBAGE = ["nan", "inf", "-inf", "garbage", "", "1e999", "0x", "1:-5", "5:nan", "1:2:-3", "1:2:x", "nan:1:1"]


@pytest.fixture
def client(redis_client):
    return redis_client


def _limiter(client: Any, kind: str, rate: str = "10/minute", **kw: Any) -> Any:
    return getattr(nlr, kind)(client, rate, **kw)


def _snapshot(client: Any) -> Dict[bytes, Any]:
    out: Dict[bytes, Any] = {}
    for k in client.keys("*"):
        kind = client.type(k)
        out[k] = (kind, client.get(k) if kind == b"string" else client.dump(k))
    return out


def _no_script_text(text: str) -> None:
    assert "@user_script" not in text and "script:" not in text, text


# -- 2. costs past 64 bits -----------------------------------------------------------------


@pytest.mark.parametrize("kind", [*RATE_KINDS, "Composite"])
def test_a_cost_past_64_bits_is_refused_as_in_process(client, kind):
    def both() -> List[Any]:
        if kind == "Composite":
            return [
                nl.Composite([nl.TokenBucket("10/minute"), nl.FixedWindow("10/minute")]),
                nlr.Composite([nlr.TokenBucket(client, "10/minute"), nlr.FixedWindow(client, "10/minute")]),
            ]
        return [getattr(nl, kind)("10/minute"), _limiter(client, kind)]

    for lim in both():
        d = lim.hit("k", 2**64 - 1)
        assert not d.allowed and d.retry_after == float("inf")
        for cost in (2**64, 10**30):
            for call in (lim.hit, lim.peek, lim.try_acquire):
                with pytest.raises(ValueError, match="cost must be a non-negative integer"):
                    call("k", cost)
    with pytest.raises(ValueError, match="an int of 16610 bits"):
        both()[1].hit("k", 10**5000)
    leased = nlr.TokenBucket(client, "10/minute", lease=True)
    with pytest.raises(ValueError, match="cost must be a non-negative integer"):
        leased.hit("k", 2**64)
    assert client.keys("*") == []
