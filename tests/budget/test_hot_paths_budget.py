"""A reservation's per-request steps (``headers()``, ``settle``, ``go_duration``) take
shortcuts for the common case: their answers must be those of the plain formulas,
written out here as the reference."""

from __future__ import annotations

import math
import threading
from typing import Any, Dict, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nexus_limits as nl
from nexus_limits.budget import Reservation, go_duration


def reference_go_duration(seconds: float) -> str:
    if math.isinf(seconds):
        return "inf"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    seconds = math.ceil(seconds * 1000) / 1000
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    out = ""
    if hours:
        out += f"{int(hours)}h"
    if hours or minutes:
        out += f"{int(minutes)}m"
    return out + f"{secs:.3f}".rstrip("0").rstrip(".") + "s"


def _answer(call: Any, *args: Any) -> Any:
    try:
        return ("ok", call(*args))
    except Exception as error:
        return (type(error).__name__, str(error))


@settings(max_examples=2000, deadline=None)
@given(seconds=st.one_of(st.floats(), st.floats(min_value=-2, max_value=2), st.integers(-5, 10**6)))
def test_go_duration_is_the_plain_formula(seconds: float) -> None:
    assert _answer(go_duration, seconds) == _answer(reference_go_duration, seconds)


@pytest.mark.parametrize("seconds", [0.0, -0.0, 1e-9, 0.0005, 0.999, 0.9999, 0.99999, 1.0, 59.9999, 3600.0, -1.0])
def test_go_duration_edges(seconds: float) -> None:
    assert go_duration(seconds) == reference_go_duration(seconds)
    assert go_duration(math.inf) == go_duration(-math.inf) == "inf"
    with pytest.raises(ValueError):
        go_duration(math.nan)


def reference_headers(r: Reservation) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for name, d in (("requests", r.requests), ("tokens", r.tokens)):
        if d is not None:
            out[f"x-ratelimit-limit-{name}"] = str(d.limit)
            out[f"x-ratelimit-remaining-{name}"] = str(d.remaining)
            out[f"x-ratelimit-reset-{name}"] = reference_go_duration(d.reset_after)
    if not r.allowed and not math.isinf(r.retry_after):
        out["retry-after"] = str(max(1, math.ceil(r.retry_after)))
    return out


@pytest.mark.parametrize(
    "limits",
    [
        {"requests": "3/minute", "tokens": "1000/minute"},
        {"requests": "2/second"},
        {"tokens": "500/hour"},
        {"tokens": "100/day", "daily_tokens": 60},
        {"requests": "5/minute", "tokens": "1000/minute", "concurrency": 1},
    ],
)
def test_headers_are_the_plain_formula(limits: Dict[str, Any]) -> None:
    limiter = nl.TokenLimiter(**limits)
    seen: List[Dict[str, str]] = []
    denied = 0
    for tokens in (10, 400, 10, 10_000, 0, 10, 10, 10):
        for r in (limiter.reserve("k", tokens), limiter.peek("k", tokens), limiter.peek("k")):
            headers = r.headers()
            assert list(headers.items()) == list(reference_headers(r).items())  # the order too
            seen.append(headers)
            denied += not r.allowed
    assert denied  # denials were among them


def test_settle_refuses_the_same_values_with_the_same_messages() -> None:
    limiter = nl.TokenLimiter(requests="100/minute", tokens="1000/minute")
    for value, error, message in (
        (True, TypeError, "actual_tokens must be an int, got bool"),
        (3.0, TypeError, "actual_tokens must be an int, got float"),
        ("3", TypeError, "actual_tokens must be an int, got str"),
        (None, TypeError, "actual_tokens must be an int, got NoneType"),
        (-1, ValueError, "actual_tokens must be non-negative, got -1"),
    ):
        r = limiter.reserve("k", 10)
        with pytest.raises(error) as caught:
            r.settle(value)
        assert str(caught.value) == message
        assert not r.done  # still open: a bad value changes nothing
        assert r.settle(5) is True and r.settle(5) is False and r.cancel() is False


def test_one_settle_wins_when_threads_race() -> None:
    limiter = nl.TokenLimiter(requests="10000/minute", tokens="1000000/minute")

    def finish(r: Reservation, barrier: threading.Barrier, wins: List[bool], which: int) -> None:
        barrier.wait()
        wins.append(r.settle(7) if which % 2 else r.cancel())

    for _ in range(50):
        r = limiter.reserve("k", 100)
        wins: List[bool] = []
        barrier = threading.Barrier(4, timeout=10)
        threads = [threading.Thread(target=finish, args=(r, barrier, wins, i)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        assert sorted(wins) == [False, False, False, True]


def test_a_reservation_has_no_lock_of_its_own() -> None:
    # One lock guards every reservation's done flag; none is made per reservation.
    r = nl.TokenLimiter(requests="5/minute").reserve("k", 0)
    assert "_lock" not in Reservation.__slots__
    with pytest.raises(AttributeError):
        r.__dict__  # noqa: B018 - slots only
