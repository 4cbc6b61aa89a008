"""Waiting for quota, written once for every limiter, sync and async side by side.

A limiter that denies says how long to wait (`Decision.retry_after`); these loops
sleep exactly that long and try again. They give up at once, without sleeping, when
the wait would pass the timeout or can never end. Time is read on the limiter's clock:
a ManualClock is advanced instead of slept on.
"""

from __future__ import annotations

import math
import time

from .errors import RateLimitExceeded

TYPE_CHECKING = False  # typing is for type checkers only: see base.py
if TYPE_CHECKING:
    from typing import Any, Awaitable, Callable, Optional, Union

    from ._core import Decision, ManualClock

    Hit = Callable[[Any, int], Union[Decision, Awaitable[Decision]]]

__all__ = ["Deadline", "acquire", "acquire_async", "check_timeout"]


def check_timeout(timeout: Optional[float]) -> Optional[float]:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be None or a number of seconds, got {type(timeout).__name__}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be None or a non-negative number of seconds, got {timeout!r}")
    return float(timeout)


class Deadline:
    """Time spent waiting, on the limiter's clock."""

    __slots__ = ("clock", "start", "timeout")

    def __init__(self, clock: Optional[ManualClock], timeout: Optional[float]) -> None:
        self.clock = clock
        self.timeout = check_timeout(timeout)
        self.start = self.now()

    def now(self) -> float:
        return self.clock.now if self.clock is not None else time.monotonic()

    def left(self) -> float:
        if self.timeout is None:
            return math.inf
        return self.timeout - (self.now() - self.start)

    def wait_for(self, key: Any, decision: Decision) -> float:
        """How long to wait before retrying; raises when that cannot end in time."""
        wait = decision.retry_after
        if math.isinf(wait) or wait > self.left():
            raise RateLimitExceeded(key, decision, self.timeout)
        return wait

    def sleep(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.advance(seconds)
        else:
            time.sleep(seconds)

    async def sleep_async(self, seconds: float) -> None:
        import asyncio  # here, so that `import nexus_limits` does not load asyncio

        if self.clock is not None:
            self.clock.advance(seconds)
            await asyncio.sleep(0)
        else:
            await asyncio.sleep(seconds)


def acquire(
    hit: Callable[[Any, int], Decision], clock: Optional[ManualClock], key: Any, cost: int, timeout: Optional[float]
) -> Decision:
    deadline = Deadline(clock, timeout)
    while True:
        decision = hit(key, cost)
        if decision.allowed:
            return decision
        deadline.sleep(deadline.wait_for(key, decision))


async def acquire_async(
    hit: Hit, clock: Optional[ManualClock], key: Any, cost: int, timeout: Optional[float]
) -> Decision:
    """Like `acquire`; `hit` may be a plain function or a coroutine function."""
    deadline = Deadline(clock, timeout)
    while True:
        result = hit(key, cost)
        decision: Decision = await result if hasattr(result, "__await__") else result
        if decision.allowed:
            return decision
        await deadline.sleep_async(deadline.wait_for(key, decision))
