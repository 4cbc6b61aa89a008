"""Quota leasing, without I/O: what a process holds of each key's quota, when it asks
Redis for more, and the answers it gives on its own.

A Redis rate limiter with ``lease=`` takes a block of a key's quota in one round trip
(lease.lua) and spends it here, at in-process speed. The blocks come out of the shared
budget, so all processes together never admit more than the quota; what leasing costs
is units taken and not spent (given back when the key goes idle, on ``close()``, or
lost to the block's end), never over-admission. See LeasePolicy for the sizes and
lease.lua for why each algorithm stays exact.

The I/O (the round trips, the task or thread that gives idle blocks back) is in
``_async.py``; this module only decides.
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .._core import Decision, ManualClock
from ._common import encode_key

# The algorithms a leased block is sound for (see lease.lua), by script name.
LEASABLE = ("gcra", "fixed", "sliding")


def _positive(name: str, value: Any, most: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"LeasePolicy {name} must be a number of seconds, got {type(value).__name__}")
    if not (0 < value <= most):  # also refuses NaN
        raise ValueError(f"LeasePolicy {name} must be above 0 and at most {most:g} seconds, got {value!r}")
    return float(value)


class LeasePolicy:
    """How a Redis rate limiter leases blocks of a key's quota (``lease=LeasePolicy(...)``;
    ``lease=True`` takes these defaults).

    - ``window``: a block holds about this many seconds of the key's traffic, as this
      process has seen it (0.05). A key checked rarely gets blocks of one unit: each
      check is one round trip, as without leasing. A key checked often gets blocks of
      many units and goes to Redis once per block.
    - ``max_share``: the largest block, as a share of the key's limit (burst) (0.1); and
      a block is never more than a quarter of what Redis reported left, so near the
      limit blocks shrink and the last units are shared out among the processes.
    - ``hold``: the longest a block's units may be spent (0.1 s; in practice three
      quarters of it, so that what is left reaches Redis before the block ends and can
      be refunded). Past it, what is left of the block counts as spent. On a token
      bucket it is also the most a block costs of the bucket's refill beyond its units,
      and never more than a quarter of the burst: see the README.
    - ``idle``: a key with units left that sees no check for this long gives them back
      (0.05 s); so do all keys on ``close()``.
    - ``max_keys``: keys remembered per limiter (10,000); the least recently leased
      give their units back first.
    """

    __slots__ = ("hold", "idle", "max_keys", "max_share", "window")

    def __init__(
        self,
        window: float = 0.05,
        max_share: float = 0.1,
        hold: float = 0.1,
        idle: float = 0.05,
        max_keys: int = 10_000,
    ) -> None:
        self.window = _positive("window", window, 60.0)
        self.hold = _positive("hold", hold, 60.0)
        self.idle = _positive("idle", idle, 60.0)
        if isinstance(max_share, bool) or not isinstance(max_share, (int, float)):
            raise TypeError(f"LeasePolicy max_share must be a number, got {type(max_share).__name__}")
        if not (0 < max_share <= 1):
            raise ValueError(f"LeasePolicy max_share must be above 0 and at most 1, got {max_share!r}")
        self.max_share = float(max_share)
        if isinstance(max_keys, bool) or not isinstance(max_keys, int):
            raise TypeError(f"LeasePolicy max_keys must be an int, got {type(max_keys).__name__}")
        if not (1 <= max_keys <= 10_000_000):
            raise ValueError(f"LeasePolicy max_keys must be between 1 and 10,000,000, got {max_keys}")
        self.max_keys = max_keys

    def __repr__(self) -> str:
        return (
            f"LeasePolicy(window={self.window!r}, max_share={self.max_share!r}, hold={self.hold!r}, "
            f"idle={self.idle!r}, max_keys={self.max_keys!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LeasePolicy):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in LeasePolicy.__slots__)

    __hash__ = None  # type: ignore[assignment]


def check_lease(lease: Any, algorithm: str, kind: str) -> Optional[LeasePolicy]:
    """The policy of a limiter's ``lease=`` (None: off)."""
    if lease is None or lease is False:
        return None
    if lease is True:
        policy = LeasePolicy()
    elif isinstance(lease, LeasePolicy):
        policy = lease
    else:
        raise TypeError(f"lease must be True, False or a LeasePolicy, got {type(lease).__name__}")
    if algorithm not in LEASABLE:
        raise ValueError(
            f"lease= is not offered for {kind}: a leaky bucket delays each call to shape traffic, "
            "which units spent from a block cannot do; lease TokenBucket, FixedWindow or SlidingWindow"
        )
    return policy


class Request:
    """A round trip a check needs: a plain check (``plain``), or a lease of ``want``
    units of which ``need`` are spent at once; it may carry the unspent units of the
    key's previous block back (``give`` units of the block ending at ``give_until``,
    on the server's clock, in microseconds)."""

    __slots__ = ("give", "give_until", "need", "plain", "sent", "want")

    def __init__(self, want: int, need: int, give: int, give_until: int, sent: float) -> None:
        self.want = want
        self.need = need
        self.give = give
        self.give_until = give_until
        self.sent = sent
        self.plain = want <= need and give == 0

    def argv(self, now: str, quota_args: Sequence[str], hold_us: str) -> List[str]:
        """lease.lua's ARGV (``quota_args``: the limiter's quota as the scripts take it)."""
        return [now, *quota_args, str(self.want), str(self.need), hold_us, str(self.give), str(self.give_until)]


class _Slot:
    """What this process knows and holds of one key."""

    __slots__ = (
        "blocked_cost",
        "blocked_until",
        "count",
        "last_lease",
        "last_used",
        "limit",
        "rate",
        "remaining",
        "reset",
        "spend_until",
        "srv_until",
        "units",
    )

    def __init__(self, now: float) -> None:
        self.units = 0  # units of the block left to spend
        self.spend_until = 0.0  # local time the block's units may be spent until
        self.srv_until = 0  # the block's end on the server's clock (us), to give units back
        self.limit = 0
        self.remaining = 0  # what Redis reported left at the last round trip
        self.reset = 0.0
        self.blocked_until = 0.0  # denied locally until then, for costs >= blocked_cost
        self.blocked_cost = 0
        self.count = 0  # units checked since the last round trip
        self.last_lease = -math.inf  # local time of the last round trip (never: cold)
        self.last_used = now
        self.rate = 0.0  # units per second, smoothed


class Give:
    """Unspent units to give back for ``key`` (ARGV give and give_until)."""

    __slots__ = ("key", "units", "until")

    def __init__(self, key: Any, units: int, until: int) -> None:
        self.key = key
        self.units = units
        self.until = until


_TABLES: weakref.WeakSet[LeaseTable] = weakref.WeakSet()


class LeaseTable:
    """The blocks one limiter holds, per key. Thread-safe."""

    __slots__ = (
        "__weakref__",
        "_clock",
        "_lock",
        "_slots",
        "held",
        "policy",
        "reaping",
        "stats",
    )

    def __init__(self, policy: LeasePolicy, clock: Optional[ManualClock]) -> None:
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._slots: OrderedDict[Any, _Slot] = OrderedDict()
        self.held: Dict[Any, _Slot] = {}  # the slots with units left
        self.reaping = False  # a task or thread is giving idle blocks back
        self.stats = {"leases_taken": 0, "units_leased": 0, "units_returned": 0, "round_trips_saved": 0}
        _TABLES.add(self)

    def now(self) -> float:
        clock = self._clock
        return clock.now if clock is not None else time.monotonic()

    @property
    def manual(self) -> bool:
        return self._clock is not None

    # -- a check ------------------------------------------------------------------------

    def local(self, key: Any, cost: int) -> Union[Decision, Request]:
        """The answer to a check of ``cost`` given here (a Decision), or the round trip it
        needs (a Request)."""
        now = self.now()
        kind = type(key)
        if kind is not str and kind is not bytes and kind is not int:
            encode_key(key)  # refuses what the store would (bool, float, ...)
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                encode_key(key)  # refuses too long a key before it is remembered
                slot = _Slot(now)
                self._slots[key] = slot
                if len(self._slots) > self.policy.max_keys:
                    self._evict()
            slot.last_used = now
            slot.count += cost
            if slot.units >= cost and now < slot.spend_until:
                slot.units -= cost
                self.stats["round_trips_saved"] += 1
                if slot.units == 0:
                    self.held.pop(key, None)
                return Decision(True, slot.limit, slot.remaining + slot.units, slot.reset, 0.0, 0.0)
            if cost >= slot.blocked_cost and now < slot.blocked_until:
                self.stats["round_trips_saved"] += 1
                return Decision(False, slot.limit, 0, slot.reset, slot.blocked_until - now, 0.0)
            give, give_until = 0, 0
            if slot.units and now >= slot.spend_until:
                # the block is over: give back what is left (refused if too late)
                give, give_until = slot.units, slot.srv_until
                slot.units = 0
                self.held.pop(key, None)
            return Request(self._want(slot, cost, now), cost, give, give_until, now)

    def _want(self, slot: _Slot, need: int, now: float) -> int:
        """The block to ask for: about ``window`` seconds of the key's traffic seen here
        since the last round trip, at most ``max_share`` of the limit and a quarter of
        what Redis reported left; ``need`` (a plain check) for a cold key."""
        elapsed = now - slot.last_lease
        if elapsed <= 0 or math.isinf(elapsed):
            return need
        seen = slot.count / elapsed
        slot.rate = seen if slot.rate == 0.0 else (slot.rate + seen) / 2
        want = int(slot.rate * self.policy.window)
        cap = min(int(slot.limit * self.policy.max_share), slot.remaining // 4 + need)
        return max(min(want, cap), need)

    def _evict(self) -> None:
        """Forgets the least recently leased key (its units are lost to its block's end:
        never more admitted, a few units under-used)."""
        key, _ = self._slots.popitem(last=False)
        self.held.pop(key, None)

    def answered(self, key: Any, request: Request, reply: Any) -> Decision:
        """Records lease.lua's reply to ``request`` and returns the check's Decision."""
        granted, limit, remaining, reset_us, retry_us, now_us, until_us, returned = (int(x) for x in reply[:8])
        retry = math.inf if retry_us < 0 else retry_us / 1e6
        reset = reset_us / 1e6
        now = self.now()
        with self._lock:
            self.stats["units_returned"] += returned
            slot = self._slot(key, now)
            self._seen(slot, limit, remaining, reset, request.sent)
            if granted < request.need or request.need == 0:
                if request.need:
                    self._block(slot, request, retry)
                    return Decision(False, limit, remaining, reset, retry, 0.0)
                return Decision(True, limit, remaining, reset, 0.0, 0.0)
            extra = granted - request.need
            if extra > 0:
                # Spent here until a quarter of the block's life before its end, so that
                # what is left reaches Redis before the end, when it can still be refunded.
                life = (until_us - now_us) / 1e6
                spend_until = request.sent + life * 0.75
                if slot.units and now < slot.spend_until:
                    # a block still held (another thread took one at the same time):
                    # keep both, under the earlier end
                    slot.units += extra
                    slot.spend_until = min(slot.spend_until, spend_until)
                    slot.srv_until = min(slot.srv_until, until_us)
                else:
                    slot.units = extra
                    slot.spend_until = spend_until
                    slot.srv_until = until_us
                self.held[key] = slot
                self.stats["leases_taken"] += 1
                self.stats["units_leased"] += extra
            return Decision(True, limit, remaining + slot.units, reset, 0.0, 0.0)

    def checked(self, key: Any, request: Request, d: Decision) -> None:
        """Records the answer of a plain check (not an on_error answer: the store did not
        decide it)."""
        if d.fallback:
            return
        now = self.now()
        with self._lock:
            slot = self._slot(key, now)
            self._seen(slot, d.limit, d.remaining, d.reset_after, request.sent)
            if not d.allowed:
                self._block(slot, request, d.retry_after)

    def _slot(self, key: Any, now: float) -> _Slot:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(now)
        else:
            self._slots.move_to_end(key)
        return slot

    @staticmethod
    def _seen(slot: _Slot, limit: int, remaining: int, reset: float, sent: float) -> None:
        slot.limit, slot.remaining, slot.reset = limit, remaining, reset
        slot.last_lease = sent
        slot.count = 0

    @staticmethod
    def _block(slot: _Slot, request: Request, retry: float) -> None:
        """Redis denied ``request.need`` units for ``retry`` seconds: so does this process
        (from the time it asked, so never longer than Redis said), without asking."""
        if math.isfinite(retry) and retry > 0:
            slot.blocked_until = request.sent + retry
            slot.blocked_cost = request.need

    def failed(self, key: Any, request: Request) -> None:
        """The round trip failed (the store is away): units it carried back are lost to
        their block's end (counted as spent: never more admitted)."""

    # -- giving back ------------------------------------------------------------------

    def due(self) -> Tuple[List[Give], Optional[float]]:
        """Blocks to give back now (their key is idle, or their spending time is over),
        taken out of the table; and the seconds until the next one falls due (None:
        nothing held)."""
        now = self.now()
        out: List[Give] = []
        nxt: Optional[float] = None
        idle = self.policy.idle
        with self._lock:
            for key, slot in list(self.held.items()):
                at = min(slot.spend_until, slot.last_used + idle)
                if at <= now:
                    if slot.units:
                        out.append(Give(key, slot.units, slot.srv_until))
                    slot.units = 0
                    del self.held[key]
                else:
                    nxt = at - now if nxt is None else min(nxt, at - now)
            if nxt is None:
                self.reaping = False
        return out, nxt

    def drain(self) -> List[Give]:
        """Every block held, taken out of the table (``close()``)."""
        with self._lock:
            out = [Give(k, s.units, s.srv_until) for k, s in self.held.items() if s.units]
            for slot in self.held.values():
                slot.units = 0
            self.held.clear()
        return out

    def returned(self, units: int) -> None:
        with self._lock:
            self.stats["units_returned"] += units

    def claim_reaper(self) -> bool:
        """True if the caller is to start the task or thread giving idle blocks back (one
        at a time; none on a manual clock, whose time does not pass by itself)."""
        if self._clock is not None:
            return False
        with self._lock:
            if self.reaping or not self.held:
                return False
            self.reaping = True
            return True

    def drop(self, key: Any) -> None:
        """Forgets ``key`` (after reset or a quota change): its units are not spent here."""
        with self._lock:
            self._slots.pop(key, None)
            self.held.pop(key, None)

    def forget(self) -> None:
        """In a child process after fork: the parent's blocks are the parent's."""
        self._lock = threading.Lock()
        self._slots.clear()
        self.held.clear()
        self.reaping = False

    def snapshot(self) -> Dict[str, int]:
        with self._lock:
            return dict(self.stats)


def _after_fork() -> None:
    for table in list(_TABLES):
        table.forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
