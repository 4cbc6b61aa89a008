"""SpendLimiter on Redis: one dollar budget per key shared by every process."""

from __future__ import annotations

from typing import Any, Optional

from .._core import ManualClock
from ..spend import PriceTable, parse_budget
from ..spend import SpendLimiter as _InProcess
from ._budget import TokenLimiter


class SpendLimiter(_InProcess):
    """:class:`nexus_limits.spend.SpendLimiter` on Redis: ``reserve`` and ``settle`` are
    each one atomic script; amounts are integer micro-dollars."""

    def __init__(
        self,
        client: Any,
        budget: str,
        *,
        prices: Optional[PriceTable] = None,
        prefix: str = "nl",
        name: Optional[str] = None,
        on_error: str = "raise",
        clock: Optional[ManualClock] = None,
        lease_ttl: float = 600.0,
        concurrency: Optional[int] = None,
    ) -> None:
        engine = TokenLimiter(
            client,
            tokens=parse_budget(budget),
            concurrency=concurrency,
            lease_ttl=lease_ttl,
            prefix=prefix,
            name=name or "spend",
            on_error=on_error,
            clock=clock,
        )
        super().__init__(budget, prices=prices, _engine=engine)
