"""The budget package: one home for TokenLimiter, SpendLimiter and their reservations,
every name still importable from where it was, and a reservation built from a named
answer."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import nexus_limits as nl
import nexus_limits.budget as budget
import nexus_limits.spend as spend
from nexus_limits.budget import Reserved


@pytest.mark.parametrize("name", spend.__all__)
def test_spend_names_are_the_budget_packages(name):
    assert getattr(spend, name) is getattr(budget, name)
    assert name in budget.__all__


def test_old_import_paths_keep_working():
    assert nl.TokenLimiter is budget.TokenLimiter and nl.Reservation is budget.Reservation
    limiter_module = importlib.import_module("nexus_limits.spend._limiter")
    assert limiter_module.AsyncSpendReservation is budget.AsyncSpendReservation
    assert budget.default_prices().get("gpt-4o").micros(1000, 500, 0) == 7500, "prices.json ships with budget"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        budget.Nope  # noqa: B018


def test_importing_the_package_does_not_load_the_spend_side():
    code = "import sys, nexus_limits, nexus_limits.budget; print('nexus_limits.tokens' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_reservation_reads_its_answer_by_name():
    tl = nl.TokenLimiter(requests="10/minute", tokens="1000/minute", concurrency=1)
    res = tl.reserve("k", 300)
    assert res.allowed and not res.done
    assert res.tokens is not None and res.tokens.remaining == 700
    assert res.concurrency is not None and res.daily_tokens is None
    peeked = tl.peek("k", 10)
    assert peeked.done and not peeked.allowed, "the one lease is held"
    assert res.settle(100) and tl.peek("k").tokens.remaining == 900
    answer = Reserved(held=False, decision=nl.Decision(True, 5, 4, 0.0, 0.0))
    assert answer._fields == (
        "held",
        "decision",
        "requests",
        "tokens",
        "daily_tokens",
        "concurrency",
        "lease",
        "charged_at",
    )
    done = nl.Reservation(tl, "k", 1, answer)
    assert done.allowed and done.done and not done.settle(1), "nothing held: nothing to settle"
