"""Spend control: dollar budgets per key (in integer micro-dollars), model prices,
learned output estimates, and limits that follow the upstream's own.

The code lives in :mod:`nexus_limits.budget`; this module keeps the names where they
have always been imported from.

>>> from nexus_limits.spend import SpendLimiter
>>> spend = SpendLimiter("25.00/day")
>>> res = spend.reserve("api-key", model="gpt-4o", input_tokens=1000, output_tokens=500)
>>> res.estimate_micros          # 1000 x $2.50/M + 500 x $10/M = $0.0075
7500
"""

from ..budget._prices import Price, PriceTable, UnknownModel, default_prices, price_source
from ..budget._quantile import LearnedOutputEstimate, P2Quantile
from ..budget._spend import SpendLimiter, SpendReservation, UpstreamGuard, parse_budget

__all__ = [
    "LearnedOutputEstimate",
    "P2Quantile",
    "Price",
    "PriceTable",
    "SpendLimiter",
    "SpendReservation",
    "UnknownModel",
    "UpstreamGuard",
    "default_prices",
    "parse_budget",
    "price_source",
]
