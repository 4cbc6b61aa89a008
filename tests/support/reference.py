"""Small pure-Python reference models, written from each algorithm's definition.

They are independent of the Rust formulation (the token bucket here counts tokens,
the Rust core runs GCRA over scaled time) and exact: times are integer nanoseconds,
quantities are Fractions. A decision is (allowed, limit, remaining, reset_after_ns,
retry_after_ns or None for never, delay_ns).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Dict, Optional, Tuple

Ref = Tuple[bool, int, int, int, Optional[int], int]


def ceil_ns(x: Fraction) -> int:
    return math.ceil(x)


class TokenBucketRef:
    """Tokens refill continuously at count/period; a new key starts with `burst`."""

    def __init__(self, count: int, period_ns: int, burst: int) -> None:
        self.rate = Fraction(count, period_ns)  # tokens per ns
        self.burst = burst
        self.keys: Dict[object, Tuple[Fraction, int]] = {}

    def _tokens(self, key: object, now: int) -> Fraction:
        tokens, at = self.keys.get(key, (Fraction(self.burst), now))
        return min(Fraction(self.burst), tokens + (now - at) * self.rate)

    def step(self, key: object, now: int, cost: int, charge: bool = True, shaping: bool = False) -> Ref:
        tokens = self._tokens(key, now)
        missing = self.burst - tokens  # the backlog, in units
        delay = ceil_ns(missing / self.rate) if shaping else 0
        if cost > self.burst:
            return (False, self.burst, math.floor(tokens), ceil_ns(missing / self.rate), None, 0)
        if tokens >= cost:
            left = tokens - cost
            if charge:
                self.keys[key] = (left, now)
            return (True, self.burst, math.floor(left), ceil_ns((self.burst - left) / self.rate), 0, delay)
        retry = ceil_ns((cost - tokens) / self.rate)
        return (False, self.burst, math.floor(tokens), ceil_ns(missing / self.rate), retry, 0)

    def fresh(self, key: object, now: int) -> bool:
        return self._tokens(key, now) == self.burst


class FixedWindowRef:
    def __init__(self, count: int, period_ns: int) -> None:
        self.limit = count
        self.period = period_ns
        self.keys: Dict[object, Tuple[int, int]] = {}

    def step(self, key: object, now: int, cost: int, charge: bool = True) -> Ref:
        window, used = self.keys.get(key, (now // self.period, 0))
        if window != now // self.period:
            window, used = now // self.period, 0
        rest = (window + 1) * self.period - now
        if cost > self.limit:
            return (False, self.limit, self.limit - used, rest if used else 0, None, 0)
        if used + cost <= self.limit:
            if charge:
                self.keys[key] = (window, used + cost)
            return (True, self.limit, self.limit - used - cost, rest if used + cost else 0, 0, 0)
        return (False, self.limit, self.limit - used, rest if used else 0, rest, 0)


class SlidingWindowRef:
    def __init__(self, count: int, period_ns: int) -> None:
        self.limit = count
        self.period = period_ns
        self.keys: Dict[object, Tuple[int, int, int]] = {}  # window -> (prev, cur)

    def _counts(self, key: object, window: int) -> Tuple[int, int]:
        w, prev, cur = self.keys.get(key, (window, 0, 0))
        if w == window:
            return prev, cur
        if w == window - 1:
            return cur, 0
        return 0, 0

    def estimate(self, key: object, now: int) -> Fraction:
        window = now // self.period
        prev, cur = self._counts(key, window)
        elapsed = now - window * self.period
        return prev * (1 - Fraction(elapsed, self.period)) + cur

    def _admits(self, key: object, now: int, cost: int) -> bool:
        return self.estimate(key, now) + cost <= self.limit

    def step(self, key: object, now: int, cost: int, charge: bool = True) -> Ref:
        window = now // self.period
        prev, cur = self._counts(key, window)
        rest = (window + 1) * self.period - now
        est = self.estimate(key, now)
        free = max(0, math.floor(self.limit - est))

        def reset(prev: int, cur: int) -> int:
            return rest + self.period if cur else (rest if prev else 0)

        if cost > self.limit:
            return (False, self.limit, free, reset(prev, cur), None, 0)
        if est + cost <= self.limit:
            if charge:
                self.keys[key] = (window, prev, cur + cost)
            return (True, self.limit, math.floor(self.limit - est - cost), reset(prev, cur + cost), 0, 0)
        # The smallest wait that admits: the estimate never grows while nothing is
        # charged, so admission is monotone in time and a binary search finds it.
        lo, hi = 0, 3 * self.period
        while lo < hi:
            mid = (lo + hi) // 2
            if self._admits(key, now + mid, cost):
                hi = mid
            else:
                lo = mid + 1
        return (False, self.limit, free, reset(prev, cur), lo, 0)
