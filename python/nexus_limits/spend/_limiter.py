"""Where the spend limiter was before it moved to :mod:`nexus_limits.budget` (kept so
that imports of it keep working)."""

from ..budget._spend import (
    AsyncSpendReservation,
    SpendLimiter,
    SpendReservation,
    UpstreamGuard,
    dollars,
    parse_budget,
)

__all__ = ["AsyncSpendReservation", "SpendLimiter", "SpendReservation", "UpstreamGuard", "dollars", "parse_budget"]
