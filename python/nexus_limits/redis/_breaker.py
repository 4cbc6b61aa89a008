"""The circuit breaker of one Redis client, without I/O.

After a connection failure or a timeout the breaker opens: for a cool-down (1 s at
first, doubling to 30 s while failures go on) every call is refused at once, so each
check answers its on_error policy without touching the network. When the cool-down
is over, one call at a time is let through as a probe; the first answer from the
server (any answer, an error reply included: the server is there) closes the breaker.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Dict, List, Optional, Tuple, Type

COOLDOWN = 1.0
MAX_COOLDOWN = 30.0

try:
    from redis.exceptions import ConnectionError as _Base
except ImportError:  # pragma: no cover - redis is how the backend is used
    _Base = ConnectionError  # type: ignore[assignment,misc]


class CircuitOpen(_Base):
    """A call refused without trying because the breaker of its client is open; a
    client's ConnectionError, so it reads like the outage it stands for. Its
    ``__cause__`` is the failure that opened the breaker."""


def _failure_types() -> Tuple[Type[BaseException], ...]:
    types: List[Type[BaseException]] = [OSError, asyncio.TimeoutError]
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        types += [RedisConnectionError, RedisTimeoutError]
    except ImportError:  # pragma: no cover
        pass
    try:  # pragma: no cover - valkey's client is optional
        from valkey.exceptions import ConnectionError as ValkeyConnectionError  # type: ignore[import-not-found,unused-ignore]
        from valkey.exceptions import TimeoutError as ValkeyTimeoutError  # type: ignore[import-not-found,unused-ignore]

        types += [ValkeyConnectionError, ValkeyTimeoutError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


FAILURES = _failure_types()


def is_failure(error: BaseException) -> bool:
    """The server could not be reached or did not answer in time (not: it answered an
    error, which proves it is there)."""
    if isinstance(error, CircuitOpen) or type(error).__name__ == "MaxConnectionsError":
        return False  # the pool is exhausted here, which says nothing of the server
    return isinstance(error, FAILURES)


class Breaker:
    """Open, closed, and the one probe in flight. Thread-safe; shared by every limiter
    that uses the same client."""

    __slots__ = ("_lock", "cooldown", "last_error", "max_cooldown", "open", "opened_at", "probing", "trips", "wait")
    last_error: Optional[BaseException]

    def __init__(self, cooldown: float = COOLDOWN, max_cooldown: float = MAX_COOLDOWN) -> None:
        self._lock = threading.Lock()
        self.cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.open = False
        self.opened_at = 0.0
        self.wait = cooldown  # the cool-down now in force
        self.probing = False
        self.trips = 0
        self.last_error = None

    def admit(self) -> bool:
        """Before a call: False if it may go (True: it is the probe); raises CircuitOpen
        while the breaker is open and the call is not the probe."""
        if not self.open:  # the common case, read without the lock
            return False
        with self._lock:
            if not self.open:
                return False
            left = self.opened_at + self.wait - time.monotonic()
            if left <= 0 and not self.probing:
                self.probing = True
                return True
        cause = self.last_error
        what = f"{type(cause).__name__}: {cause}"[:200] if cause is not None else "a connection failure"
        raise CircuitOpen(f"the circuit breaker is open after {what} (next try in {max(left, 0.0):.1f} s)") from cause

    def succeeded(self, probe: bool) -> None:
        if self.open or probe:
            with self._lock:
                self.open = False
                self.probing = False
                self.wait = self.cooldown

    def failed(self, error: BaseException, probe: bool) -> None:
        """After a call that raised: a failure opens the breaker (or, for a probe, keeps it
        open twice as long); any other error is an answer from the server."""
        if not isinstance(error, Exception):  # cancelled, interrupted: nothing learnt
            if probe:
                with self._lock:
                    self.probing = False
            return
        if not is_failure(error):
            self.succeeded(probe)
            return
        with self._lock:
            self.last_error = error
            if probe:
                self.probing = False
                self.wait = min(self.wait * 2, self.max_cooldown)
                self.opened_at = time.monotonic()
            elif not self.open:
                self.open = True
                self.wait = self.cooldown
                self.opened_at = time.monotonic()
                self.trips += 1

    def stats(self) -> Dict[str, int]:
        return {"breaker_open": int(self.open), "breaker_trips": self.trips}
