"""Budgets for LLM traffic: reserve before the call, settle from the response.

- :class:`TokenLimiter` reserves one request, the estimated tokens and a concurrency
  lease per key, all at once; its :class:`Reservation` settles at the actual tokens.
- :class:`SpendLimiter` does the same with dollars (integer micro-dollars) priced from
  a :class:`PriceTable`; :class:`UpstreamGuard` follows a provider's own limits.

Counting tokens (tokenizers, usage in responses) is :mod:`nexus_limits.tokens`'s job.

>>> import nexus_limits as nl
>>> tl = nl.TokenLimiter(requests="500/minute", tokens="30000/minute", concurrency=4)
>>> res = tl.reserve("api-key", tokens=1200)        # the request's estimate
>>> res.allowed
True
>>> res.settle(950)                                  # the actual usage: 250 refunded
True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._protocol import AsyncReservationBackend, ReservationBackend, Reserved, ReservedAnswer
from ._tokens import AsyncReservation, Reservation, TokenLimiter, go_duration

if TYPE_CHECKING:
    from ._prices import Price, PriceTable, UnknownModel, default_prices, price_source
    from ._quantile import LearnedOutputEstimate, P2Quantile
    from ._spend import AsyncSpendReservation, SpendLimiter, SpendReservation, UpstreamGuard, parse_budget

__all__ = [
    "AsyncReservation",
    "AsyncReservationBackend",
    "AsyncSpendReservation",
    "LearnedOutputEstimate",
    "P2Quantile",
    "Price",
    "PriceTable",
    "Reservation",
    "ReservationBackend",
    "Reserved",
    "ReservedAnswer",
    "SpendLimiter",
    "SpendReservation",
    "TokenLimiter",
    "UnknownModel",
    "UpstreamGuard",
    "default_prices",
    "go_duration",
    "parse_budget",
    "price_source",
]

# The spend side needs the tokens package (usage, headers): loaded when first used, so
# that `import nexus_limits` stays light.
_LAZY = {
    "AsyncSpendReservation": "_spend",
    "SpendLimiter": "_spend",
    "SpendReservation": "_spend",
    "UpstreamGuard": "_spend",
    "parse_budget": "_spend",
    "Price": "_prices",
    "PriceTable": "_prices",
    "UnknownModel": "_prices",
    "default_prices": "_prices",
    "price_source": "_prices",
    "LearnedOutputEstimate": "_quantile",
    "P2Quantile": "_quantile",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
