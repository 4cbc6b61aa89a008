"""Rate-limit response headers.

- IETF (httpapi RateLimit header fields, draft 10): ``RateLimit-Policy: "default";q=100;w=60``
  and ``RateLimit: "default";r=42;t=18``, structured-field lists, several policies
  listed together.
- Legacy: ``X-RateLimit-Limit``, ``X-RateLimit-Remaining``, ``X-RateLimit-Reset``
  (seconds from now, not an epoch), for the most restrictive policy.
- ``Retry-After`` (whole seconds, rounded up) on denied responses; never earlier than
  the ``t`` of the policy that denied.
"""

from __future__ import annotations

import math
import re
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

__all__ = ["HeaderOptions", "Policy", "policy_of", "rate_limit_headers"]

_TOKEN = re.compile(r"[A-Za-z*][A-Za-z0-9_.*:/%!#$&'+^`|~-]*")


class Policy(NamedTuple):
    """One quota policy: its name, quota ``q`` and window ``w`` in seconds."""

    name: str
    quota: int
    window: int


class HeaderOptions(NamedTuple):
    """Which header families to send."""

    ietf: bool = True
    legacy: bool = True
    retry_after: bool = True


ALL_HEADERS = HeaderOptions()


def _sf_string(name: str) -> str:
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    if not all(0x20 <= ord(c) < 0x7F for c in escaped):
        raise ValueError(f"policy name {name!r} must be printable ASCII")
    return f'"{escaped}"'


def policy_of(limiter: Any, name: str = "default") -> Policy:
    """The policy a limiter enforces: its capacity, and the seconds in which a full
    quota is restored (the window for windows, burst x interval for buckets)."""
    limit = int(getattr(limiter, "limit", 0) or 0)
    rate = getattr(limiter, "rate", None)
    if rate is None:
        return Policy(name, limit, 0)
    kind = type(limiter).__name__
    if kind in ("TokenBucket", "LeakyBucket"):
        window = limit * rate.period / rate.count
    else:
        window = rate.period
    return Policy(name, limit, max(1, math.ceil(window)))


def _seconds(value: float) -> int:
    if math.isinf(value):
        return 2**31 - 1
    return max(0, math.ceil(value))


def rate_limit_headers(
    entries: Sequence[Tuple[Policy, Any]],
    options: HeaderOptions = ALL_HEADERS,
    denied_by: Optional[Any] = None,
) -> List[Tuple[str, str]]:
    """Headers for ``(policy, decision)`` pairs. ``denied_by`` is the Decision that
    refused the request, if one did (it sets ``Retry-After``)."""
    out: List[Tuple[str, str]] = []
    if not entries:
        return out
    if options.ietf:
        policies, states = [], []
        for policy, d in entries:
            label = _sf_string(policy.name)
            w = f";w={policy.window}" if policy.window else ""
            policies.append(f"{label};q={policy.quota}{w}")
            t = d.retry_after if not d.allowed else d.reset_after
            states.append(f"{label};r={d.remaining};t={_seconds(t)}")
        out.append(("RateLimit-Policy", ", ".join(policies)))
        out.append(("RateLimit", ", ".join(states)))
    if options.legacy:
        policy, d = min(entries, key=lambda e: (e[1].remaining, -e[1].retry_after))
        out.append(("X-RateLimit-Limit", str(policy.quota)))
        out.append(("X-RateLimit-Remaining", str(d.remaining)))
        reset = d.retry_after if not d.allowed else d.reset_after
        out.append(("X-RateLimit-Reset", str(_seconds(reset))))
    if options.retry_after and denied_by is not None and not math.isinf(denied_by.retry_after):
        out.append(("Retry-After", str(max(1, _seconds(denied_by.retry_after)))))
    return out
