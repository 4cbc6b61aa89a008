"""Upstream rate-limit headers (OpenAI ``x-ratelimit-*``, Anthropic
``anthropic-ratelimit-*``, ``retry-after``) in one normalized structure."""

from __future__ import annotations

import datetime as _dt
import email.utils
import math
import re
from typing import Any, Mapping, NamedTuple, Optional

__all__ = ["UpstreamLimit", "UpstreamLimits", "parse_go_duration", "parse_rate_limit_headers"]

_GO = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|h|m|s)")
_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_go_duration(text: str) -> float:
    """``"6m0s"`` -> 360.0; ``"1s"``, ``"20ms"``, ``"1h2m3.5s"``. ValueError if malformed."""
    text = text.strip()
    if not text:
        raise ValueError("empty duration")
    pos = 0
    total = 0.0
    for match in _GO.finditer(text):
        if match.start() != pos:
            raise ValueError(f"malformed duration {text!r}")
        total += float(match.group(1)) * _GO_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text):
        raise ValueError(f"malformed duration {text!r}")
    if not math.isfinite(total):  # "1e400"-sized digits overflow a float
        raise ValueError(f"duration out of range: {text[:40]!r}")
    return total


class UpstreamLimit(NamedTuple):
    """One limit as the provider reported it; ``reset`` is seconds from now until it is
    fully restored (None if not given)."""

    limit: Optional[int]
    remaining: Optional[int]
    reset: Optional[float]


class UpstreamLimits(NamedTuple):
    requests: Optional[UpstreamLimit]
    tokens: Optional[UpstreamLimit]
    input_tokens: Optional[UpstreamLimit]
    output_tokens: Optional[UpstreamLimit]
    retry_after: Optional[float]


def _int(value: Optional[str]) -> Optional[int]:
    """A count from a header: None unless a number in [0, 2**53] (negative or huge
    counts are garbage, and would read as "exhausted" or "unlimited")."""
    if value is None:
        return None
    try:
        number = int(float(value.strip()))
    except (ValueError, OverflowError):  # not a number, or inf/nan
        return None
    return number if 0 <= number <= 2**53 else None


def _seconds_until(stamp: str, now: _dt.datetime) -> Optional[float]:
    try:
        when = _dt.datetime.fromisoformat(stamp.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return max(0.0, (when - now).total_seconds())


def _retry_after(value: Optional[str], now: _dt.datetime) -> Optional[float]:
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - now).total_seconds())


def parse_rate_limit_headers(headers: Mapping[str, Any], now: Optional[_dt.datetime] = None) -> UpstreamLimits:
    """Normalizes a provider's rate-limit headers (any case). Values that do not parse
    are left as None, never raised: upstream headers are not ours to trust."""
    lower = {str(k).lower(): str(v) for k, v in headers.items()}
    now = now or _dt.datetime.now(_dt.timezone.utc)

    def openai(kind: str) -> Optional[UpstreamLimit]:
        limit = lower.get(f"x-ratelimit-limit-{kind}")
        remaining = lower.get(f"x-ratelimit-remaining-{kind}")
        reset = lower.get(f"x-ratelimit-reset-{kind}")
        if limit is None and remaining is None and reset is None:
            return None
        seconds = None
        if reset is not None:
            try:
                seconds = parse_go_duration(reset)
            except ValueError:
                seconds = None
        return UpstreamLimit(_int(limit), _int(remaining), seconds)

    def anthropic(kind: str) -> Optional[UpstreamLimit]:
        limit = lower.get(f"anthropic-ratelimit-{kind}-limit")
        remaining = lower.get(f"anthropic-ratelimit-{kind}-remaining")
        reset = lower.get(f"anthropic-ratelimit-{kind}-reset")
        if limit is None and remaining is None and reset is None:
            return None
        return UpstreamLimit(_int(limit), _int(remaining), _seconds_until(reset, now) if reset else None)

    return UpstreamLimits(
        requests=openai("requests") or anthropic("requests"),
        tokens=openai("tokens") or anthropic("tokens"),
        input_tokens=anthropic("input-tokens"),
        output_tokens=anthropic("output-tokens"),
        retry_after=_retry_after(lower.get("retry-after"), now),
    )
