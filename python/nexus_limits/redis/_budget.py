"""What a Redis TokenLimiter does without I/O: its keys, the reserve and settle scripts'
arguments, their replies as a Reservation takes them (a :class:`Reserved`), and its
counters."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import nexus_limits as nl

from .._core import ManualClock, Quota
from ..base import Key
from ..budget._protocol import Reserved
from ._common import (
    Fallback,
    check_clock,
    check_name,
    check_on_error,
    check_prefix,
    encode_key,
    new_lease_id,
    now_arg,
    to_decision,
)


class BudgetPlan:
    """A Redis TokenLimiter's fixed part: its quotas (validated by the in-process
    limiter), key suffixes, script arguments and tally."""

    def __init__(
        self,
        requests: Any,
        tokens: Any,
        daily_tokens: Any,
        concurrency: Any,
        lease_ttl: float,
        prefix: str,
        name: Optional[str],
        on_error: str,
        clock: Optional[ManualClock],
    ) -> None:
        # Validates exactly like the in-process limiter, and knows the rates.
        self.model = nl.TokenLimiter(requests, tokens, daily_tokens, concurrency, lease_ttl=lease_ttl)
        self.prefix = check_prefix(prefix)
        self.clock = check_clock(clock)
        self.fallback = Fallback(check_on_error(on_error), "TokenLimiter on Redis")
        named = check_name(name)
        base = named or "tl"
        self.buckets: List[Tuple[str, str, str]] = []  # (kind, micros per unit, burst) per bucket
        self.suffixes: List[str] = []
        for which, rate in (
            ("requests", self.model.requests),
            ("tokens", self.model.tokens),
            ("daily", self.model.daily_tokens),
        ):
            if rate is not None:
                _, micros, burst = Quota("token_bucket", rate).script_args
                self.buckets.append(("requests" if which == "requests" else "tokens", micros, burst))
                # A named limiter keeps its keys when its quotas change (a config reload);
                # an unnamed one is identified by its quotas.
                period_us = rate.period * 1e6
                self.suffixes.append(f":{base}-{which}" if named else f":{base}-{which}-{rate.count}-{period_us!r}")
        self.concurrency = self.model.concurrency or 0
        if self.concurrency:
            self.suffixes.append(f":{base}-cc")
        self.lease_ttl_us = repr(self.model.lease_ttl * 1e6)
        self.tokens = [0, 0, 0]

    def count(self, reservation: Any, tokens: int) -> None:
        d = reservation.decision
        if d.fallback:
            return
        self.fallback.tally.add("allowed" if d.allowed else "denied")
        if d.allowed:
            self.tally_tokens(tokens, 0, 0)

    def tally_tokens(self, reserved: int, settled: int, refunded: int) -> None:
        with self.fallback.tally.lock:
            self.tokens[0] += reserved
            self.tokens[1] += settled
            self.tokens[2] += refunded

    def stats(self) -> Dict[str, int]:
        out = self.fallback.tally.snapshot()
        del out["shadow_denied"], out["near_limit"]
        out.update(zip(("tokens_reserved", "tokens_settled", "tokens_refunded"), self.tokens))
        return out

    def keys(self, key: Key) -> List[str]:
        tag = f"{self.prefix}:{{{encode_key(key)}}}"
        return [tag + s for s in self.suffixes]

    def reserve_args(self, tokens: Any, mode: str = "hit") -> Tuple[List[str], str]:
        """reserve.lua's ARGV for a reservation ("hit") or a peek, and the lease id."""
        if isinstance(tokens, bool) or not isinstance(tokens, int):
            raise TypeError(f"tokens must be a non-negative int, got {type(tokens).__name__}")
        if tokens < 0:
            raise ValueError(f"tokens must be a non-negative integer, got {tokens}")
        lease = new_lease_id() if self.concurrency and mode == "hit" else ""
        args = [
            now_arg(self.clock),
            mode,
            str(tokens),
            str(len(self.buckets)),
            str(self.concurrency),
            self.lease_ttl_us,
            lease,
        ]
        for bucket in self.buckets:
            args.extend(bucket)
        return args, lease

    def reserved(self, reply: Sequence[Any], lease: str) -> Reserved:
        """The script's reply as a Reservation takes it."""
        combined = to_decision(reply[0:6])
        each = [to_decision(reply[6 + 6 * i : 12 + 6 * i]) for i in range(len(self.buckets))]
        at = 6 + 6 * len(self.buckets)
        conc = to_decision(reply[at : at + 6]) if self.concurrency else None
        now_us = int(reply[-1])
        named = {}
        i = 0
        for which, rate in (
            ("requests", self.model.requests),
            ("tokens", self.model.tokens),
            ("daily", self.model.daily_tokens),
        ):
            if rate is not None:
                named[which] = each[i]
                i += 1
        return Reserved(
            held=combined.allowed,
            decision=combined,
            requests=named.get("requests"),
            tokens=named.get("tokens"),
            daily_tokens=named.get("daily"),
            concurrency=conc,
            lease=lease or None,
            charged_at=(now_us, time.monotonic()),
        )

    def fallback_reply(self, error: BaseException) -> Reserved:
        """A store's fallback answer: it decided no limit and charged nothing."""
        d = self.fallback.decision(error, 0)
        return Reserved(held=d.allowed, decision=d)

    def settle_args(self, tokens_delta: int, requests_delta: int, charged_at: Any, lease: Optional[str]) -> List[str]:
        args = [
            now_arg(self.clock),
            "hit",
            str(tokens_delta),
            str(requests_delta),
            str(len(self.buckets)),
            str(charged_at[0]),
            self.lease_ttl_us,
            lease or "",
        ]
        for kind, per_unit, _ in self.buckets:
            args.extend((kind, per_unit))
        return args

    def expired(self, charged_at: Any) -> bool:
        if charged_at is None:
            return True
        if self.clock is not None:
            return bool(self.clock.now * 1e6 > charged_at[0] + float(self.lease_ttl_us))
        return bool(time.monotonic() - charged_at[1] > self.model.lease_ttl)
