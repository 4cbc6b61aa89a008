"""An AIMD controller: a limit that follows what the provider says, TCP-style."""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable, Dict, Mapping, Optional

__all__ = ["AIMD"]

# Statuses that mean "slow down": too many requests, overloaded (503, Anthropic's 529).
THROTTLE_STATUSES = frozenset({429, 503, 529})


def _number(name: str, value: Any, *, low: float = 0.0, strict: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (strict and value == low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low:g}, got {value!r}")
    return float(value)


class AIMD:
    """Additive increase, multiplicative decrease: a limit (requests per minute, calls
    in flight, a fraction of a quota — any positive number) that backs off when the
    provider pushes back and creeps up again while it does not.

    - ``throttle()`` (a 429, an overloaded upstream, or its remaining quota running
      low): ``value = max(floor, value * decrease)``, at most once per ``cooldown``
      seconds, so that the burst of refusals one overload causes counts once;
    - ``success()`` (a healthy answer): ``value = min(ceiling, value + increase)``, at
      most once per ``interval`` seconds, so the climb is ``increase`` per interval
      of healthy traffic whatever the request rate;
    - ``observe(status, headers)`` picks one: a 429, 503 or 529 throttles; an answer
      whose rate-limit headers (OpenAI's ``x-ratelimit-*``, Anthropic's
      ``anthropic-ratelimit-*``) say less than ``low_water`` of a limit remains
      throttles; any other 2xx or 3xx is a success; other errors change nothing.

    ``value`` starts at ``start`` (default: the ceiling) and always stays within
    ``[floor, ceiling]``. ``on_change(value)`` is called (outside the lock) after each
    change, e.g. to set a limiter's quota. ``clock`` is a ``nexus_limits.ManualClock``
    or a function returning seconds (default ``time.monotonic``). Thread-safe.

    >>> from nexus_limits import ManualClock
    >>> clock = ManualClock(0)
    >>> aimd = AIMD(ceiling=100, floor=10, increase=5, decrease=0.5, clock=clock)
    >>> aimd.throttle()
    50.0
    >>> aimd.throttle()          # the same overload, within the cooldown: no change
    50.0
    >>> _ = clock.advance(1.0); aimd.success()
    55.0
    """

    __slots__ = (
        "_clock",
        "_last_decrease",
        "_last_increase",
        "_lock",
        "_stats",
        "_value",
        "ceiling",
        "cooldown",
        "decrease",
        "floor",
        "increase",
        "interval",
        "low_water",
        "on_change",
    )

    def __init__(
        self,
        ceiling: float,
        floor: Optional[float] = None,
        increase: Optional[float] = None,
        decrease: float = 0.5,
        *,
        start: Optional[float] = None,
        interval: float = 1.0,
        cooldown: float = 1.0,
        low_water: float = 0.05,
        on_change: Optional[Callable[[float], Any]] = None,
        clock: Any = None,
    ) -> None:
        self.ceiling = _number("ceiling", ceiling)
        self.floor = _number("floor", floor if floor is not None else min(1.0, self.ceiling))
        if self.floor > self.ceiling:
            raise ValueError(f"floor ({floor!r}) must not be above the ceiling ({ceiling!r})")
        self.increase = _number("increase", increase if increase is not None else self.ceiling / 20)
        self.decrease = _number("decrease", decrease)
        if self.decrease >= 1:
            raise ValueError(f"decrease must be below 1 (the factor applied on a throttle), got {decrease!r}")
        self.interval = _number("interval", interval, strict=False)
        self.cooldown = _number("cooldown", cooldown, strict=False)
        self.low_water = _number("low_water", low_water, strict=False)
        if self.low_water >= 1:
            raise ValueError(f"low_water must be below 1 (a fraction of the limit), got {low_water!r}")
        value = self.ceiling if start is None else _number("start", start)
        if not self.floor <= value <= self.ceiling:
            raise ValueError(f"start must be within [floor, ceiling], got {start!r}")
        if on_change is not None and not callable(on_change):
            raise TypeError(f"on_change must be callable, got {type(on_change).__name__}")
        self.on_change = on_change
        if clock is None:
            self._clock: Callable[[], float] = time.monotonic
        elif hasattr(clock, "now"):
            self._clock = lambda: float(clock.now)
        elif callable(clock):
            self._clock = clock
        else:
            raise TypeError(f"clock must be a ManualClock or a function returning seconds, got {type(clock).__name__}")
        self._value = value
        self._last_increase = -math.inf
        self._last_decrease = -math.inf
        self._lock = threading.Lock()
        self._stats = {"increases": 0, "decreases": 0, "throttles": 0, "successes": 0}

    @property
    def value(self) -> float:
        """The current limit."""
        return self._value

    def _changed(self, before: float, after: float) -> float:
        if after != before and self.on_change is not None:
            self.on_change(after)
        return after

    def success(self) -> float:
        """A healthy answer: add ``increase``, at most once per ``interval``. Returns the value."""
        now = self._clock()
        with self._lock:
            self._stats["successes"] += 1
            before = self._value
            if before < self.ceiling and now - self._last_increase >= self.interval:
                # The first success after a decrease waits a whole interval too.
                if now - self._last_decrease >= self.interval:
                    self._value = min(self.ceiling, before + self.increase)
                    self._last_increase = now
                    self._stats["increases"] += 1
            after = self._value
        return self._changed(before, after)

    def throttle(self) -> float:
        """The provider pushed back: multiply by ``decrease``, at most once per
        ``cooldown``. Returns the value."""
        now = self._clock()
        with self._lock:
            self._stats["throttles"] += 1
            before = self._value
            if now - self._last_decrease >= self.cooldown:
                self._value = max(self.floor, before * self.decrease)
                self._last_decrease = now
                if self._value != before:
                    self._stats["decreases"] += 1
            after = self._value
        return self._changed(before, after)

    def running_low(self, headers: Optional[Mapping[str, Any]]) -> bool:
        """Whether rate-limit headers say less than ``low_water`` of a limit remains."""
        if not headers or self.low_water <= 0:
            return False
        from ..tokens import parse_rate_limit_headers

        limits = parse_rate_limit_headers(headers)
        for limit in (limits.requests, limits.tokens, limits.input_tokens, limits.output_tokens):
            if limit is not None and limit.limit and limit.remaining is not None:
                if limit.remaining < self.low_water * limit.limit:
                    return True
        return False

    def observe(self, status: int, headers: Optional[Mapping[str, Any]] = None) -> float:
        """Feed one upstream answer: its status and (optionally) its headers."""
        if isinstance(status, bool) or not isinstance(status, int):
            raise TypeError(f"status must be an int, got {type(status).__name__}")
        if status in THROTTLE_STATUSES or (200 <= status < 400 and self.running_low(headers)):
            return self.throttle()
        if 200 <= status < 400:
            return self.success()
        return self._value

    def copy(self) -> AIMD:
        """A fresh controller with the same settings (one per model or upstream)."""
        return AIMD(
            self.ceiling,
            self.floor,
            self.increase,
            self.decrease,
            interval=self.interval,
            cooldown=self.cooldown,
            low_water=self.low_water,
            on_change=self.on_change,
            clock=self._clock,
        )

    def stats(self) -> Dict[str, Any]:
        """``value``, ``ceiling``, ``floor`` and the counts of ``successes``,
        ``throttles`` (seen), ``increases`` and ``decreases`` (applied)."""
        with self._lock:
            return {"value": self._value, "ceiling": self.ceiling, "floor": self.floor, **self._stats}

    def __repr__(self) -> str:
        return (
            f"AIMD(value={self._value:g}, ceiling={self.ceiling:g}, floor={self.floor:g}, "
            f"increase={self.increase:g}, decrease={self.decrease:g})"
        )
