"""Rate-limit response headers.

- IETF (httpapi RateLimit header fields, draft 10): ``RateLimit-Policy: "default";q=100;w=60``
  and ``RateLimit: "default";r=42;t=18``, structured-field lists, several policies
  listed together.
- Legacy: ``X-RateLimit-Limit``, ``X-RateLimit-Remaining``, ``X-RateLimit-Reset``
  (seconds from now, not an epoch), for the most restrictive policy.
- ``Retry-After`` (whole seconds, rounded up) on denied responses; never earlier than
  the ``t`` of the policy that denied.

When the response already carries rate-limit headers (a second middleware inside, or
the app), :func:`merge_rate_limit_headers` makes one header of each name: the IETF
lists are joined (several policies listed together, as the draft allows), the legacy
triple and ``Retry-After`` keep the most restrictive value.
"""

from __future__ import annotations

import math
import re
import time
from email.utils import parsedate_to_datetime
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

__all__ = [
    "RATE_LIMIT_HEADERS",
    "HeaderOptions",
    "Policy",
    "merge_rate_limit_headers",
    "policy_of",
    "rate_limit_headers",
]

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


def check_policy_name(name: Any) -> None:
    """Raises unless ``name`` can name a policy in the headers (printable ASCII)."""
    if not isinstance(name, str):
        raise TypeError(f"a policy or tier name must be a str, got {type(name).__name__}")
    _sf_string(name)


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


#: The header names :func:`merge_rate_limit_headers` merges (lower-case).
RATE_LIMIT_HEADERS = frozenset(
    ("ratelimit", "ratelimit-policy", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "retry-after")
)
_LEGACY = (("X-RateLimit-Limit", "x-ratelimit-limit"), ("X-RateLimit-Remaining", "x-ratelimit-remaining"))
_LEGACY_RESET = ("X-RateLimit-Reset", "x-ratelimit-reset")


def _sf_items(value: str) -> List[str]:
    """The members of a structured-field list, split at commas outside quotes."""
    items: List[str] = []
    start, quoted, escaped = 0, False, False
    for i, ch in enumerate(value):
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            items.append(value[start:i].strip())
            start = i + 1
    items.append(value[start:].strip())
    return [item for item in items if item]


def _item_name(item: str) -> Tuple[str, str]:
    """(name, the rest) of a list member such as ``"default";r=4;t=30``."""
    if item.startswith('"'):
        i, escaped = 1, False
        while i < len(item):
            if escaped:
                escaped = False
            elif item[i] == "\\":
                escaped = True
            elif item[i] == '"':
                return item[1:i].replace('\\"', '"').replace("\\\\", "\\"), item[i + 1 :]
            i += 1
        return item, ""
    name, sep, rest = item.partition(";")
    return name, sep + rest


def _int(value: Optional[str]) -> Optional[int]:
    try:
        return int(value.strip()) if value is not None else None
    except ValueError:
        return None


def _delay(value: str) -> Optional[float]:
    """Retry-After in seconds from now: delay-seconds or an HTTP date."""
    seconds = _int(value)
    if seconds is not None:
        return float(seconds) if seconds >= 0 else None
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


def merge_rate_limit_headers(
    present: Sequence[Tuple[str, str]], ours: Sequence[Tuple[str, str]]
) -> List[Tuple[str, str]]:
    """One header of each rate-limit name from the ones a response already carries
    (``present``, any case, possibly repeated) and ``ours``: the replacement for every
    header of :data:`RATE_LIMIT_HEADERS` in the response.

    ``RateLimit-Policy`` and ``RateLimit``: their policies followed by ours (a policy of
    ours whose name is already listed is renamed ``name#2``, ``#3``...). The
    ``X-RateLimit-*`` triple: the one with the fewest remaining (then the longest
    reset). ``Retry-After``: the longest delay, in seconds.
    """
    theirs: Dict[str, List[str]] = {}
    for name, value in present:
        theirs.setdefault(name.lower(), []).append(value)
    mine = {name.lower(): value for name, value in ours}
    out: List[Tuple[str, str]] = []

    their_policies = [i for v in theirs.get("ratelimit-policy", ()) for i in _sf_items(v)]
    their_states = [i for v in theirs.get("ratelimit", ()) for i in _sf_items(v)]
    taken = {_item_name(i)[0] for i in their_policies + their_states}
    renamed: Dict[str, str] = {}
    for item in _sf_items(mine.get("ratelimit-policy", "")) + _sf_items(mine.get("ratelimit", "")):
        name = _item_name(item)[0]
        if name in taken and name not in renamed:
            k = 2
            while f"{name}#{k}" in taken:
                k += 1
            renamed[name] = f"{name}#{k}"
            taken.add(renamed[name])

    def ours_renamed(header: str) -> List[str]:
        items = []
        for item in _sf_items(mine.get(header, "")):
            name, rest = _item_name(item)
            items.append(_sf_string(renamed[name]) + rest if name in renamed else item)
        return items

    for title, header, their_items in (
        ("RateLimit-Policy", "ratelimit-policy", their_policies),
        ("RateLimit", "ratelimit", their_states),
    ):
        items = their_items + ours_renamed(header)
        if items:
            out.append((title, ", ".join(items)))

    def triple(source: Dict[str, Any]) -> Optional[Tuple[int, int, int]]:
        values = []
        for _, key in (*_LEGACY, _LEGACY_RESET):
            value = source.get(key)
            number = _int(value[0] if isinstance(value, list) else value)
            if number is None:
                return None
            values.append(number)
        return values[0], values[1], values[2]

    candidates = [t for t in (triple(theirs), triple(mine)) if t is not None]
    if candidates:
        limit, remaining, reset = min(candidates, key=lambda t: (t[1], -t[2]))
        out += [("X-RateLimit-Limit", str(limit)), ("X-RateLimit-Remaining", str(remaining))]
        out.append(("X-RateLimit-Reset", str(reset)))
    else:  # only unreadable values: keep theirs as they were, one of each
        for title, key in (*_LEGACY, _LEGACY_RESET):
            if key in theirs:
                out.append((title, theirs[key][0]))

    retry = [*theirs.get("retry-after", ()), *([mine["retry-after"]] if "retry-after" in mine else [])]
    delays = [d for d in (_delay(v) for v in retry) if d is not None]
    if delays:
        out.append(("Retry-After", str(math.ceil(max(delays)))))
    elif retry:
        out.append(("Retry-After", retry[0]))
    return out
