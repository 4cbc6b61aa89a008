"""Helpers for testing code that sits behind a limiter.

- :func:`limiter_clock`, a pytest fixture: a fresh :class:`~nexus_limits.ManualClock`
  at 0.0 for each test. Build the limiters of the test with ``clock=limiter_clock``
  and move time with ``limiter_clock.advance(seconds)``: no sleeping, no flaky timing.
  Make it available with ``pytest_plugins = ["nexus_limits.testing"]`` in your
  top-level ``conftest.py`` (or a test module), or by importing it into a
  ``conftest.py``: ``from nexus_limits.testing import limiter_clock``.

- :func:`reset_keys` (and :func:`reset_keys_async` for ``nexus_limits.redis.asyncio``
  limiters): put keys back to their fresh state between tests, for limiters that live
  longer than one test (built at import time by your app).
- :func:`rate_limit_state`: the IETF ``RateLimit-Policy``/``RateLimit`` headers of a
  response as numbers, to assert on.

The fixture needs pytest; the functions do not. (PYTEST_DONT_REWRITE: nothing here
asserts, and pytest may load this module as a plugin after a test module imported it.)
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Mapping, Tuple

from ._core import ManualClock

__all__ = ["limiter_clock", "rate_limit_state", "reset_keys", "reset_keys_async"]


def _fresh_clock() -> ManualClock:
    """A ManualClock at 0.0, fresh for each test: build the test's limiters with
    ``clock=limiter_clock``, then ``limiter_clock.advance(seconds)``."""
    return ManualClock(0.0)


limiter_clock: Any
try:
    import pytest
except ImportError:  # pragma: no cover - without pytest it is a plain function
    limiter_clock = _fresh_clock
else:
    limiter_clock = pytest.fixture(name="limiter_clock")(_fresh_clock)


def _pairs(limiters: Iterable[Any], keys: Iterable[Any]) -> List[Tuple[Any, Any]]:
    if isinstance(keys, (str, bytes, int)):
        raise TypeError(f"keys must be a list of keys, not one key: [{keys!r}]")
    limiters = list(limiters)
    keys = list(keys)
    for limiter in limiters:
        if not callable(getattr(limiter, "reset", None)):
            raise TypeError(f"limiters must be nexus_limits limiters (with reset), got {type(limiter).__name__}")
    return [(limiter, key) for limiter in limiters for key in keys]


def reset_keys(limiters: Iterable[Any], keys: Iterable[Any]) -> None:
    """Reset every key of ``keys`` on every limiter of ``limiters`` (in-process,
    shared-memory, ``nexus_limits.redis``, composites, token budgets): the next request
    of that client is judged as its first. The in-process store keeps fingerprints, not
    keys, so the keys must be named; for asyncio limiters use :func:`reset_keys_async`."""
    for limiter, key in _pairs(limiters, keys):
        result = limiter.reset(key)
        if hasattr(result, "__await__"):
            result.close()
            raise TypeError(f"{type(limiter).__name__} is an asyncio limiter: await reset_keys_async(...)")


async def reset_keys_async(limiters: Iterable[Any], keys: Iterable[Any]) -> None:
    """:func:`reset_keys` for any mix of limiters, asyncio ones included."""
    for limiter, key in _pairs(limiters, keys):
        result = limiter.reset(key)
        if hasattr(result, "__await__"):
            await result


# A structured-field list member: "name" then ;key=value parameters (an integer, a
# decimal, a string, a token, a byte sequence such as pk=:YWJj: or a boolean).
_VALUE = r'(?:-?\d+(?:\.\d+)?|"(?:[^"\\]|\\.)*"|[A-Za-z*][A-Za-z0-9_.:%*/+-]*|:[A-Za-z0-9+/=]*:|\?[01])'
_PARAM = re.compile(r"\s*;\s*([a-z*][a-z0-9_.*-]*)=(" + _VALUE + ")")
_ITEM = re.compile(r'\s*"((?:[^"\\]|\\.)*)"((?:\s*;\s*[a-z*][a-z0-9_.*-]*=' + _VALUE + r")*)\s*(?:,|$)")


def _parse_list(value: str) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    pos = 0
    value = value.strip()
    while pos < len(value):
        match = _ITEM.match(value, pos)
        if match is None or match.end() == pos:
            raise ValueError(f"not a RateLimit structured-field list: {value!r}")
        name = re.sub(r"\\(.)", r"\1", match.group(1))
        params: Dict[str, Any] = {}
        for key, raw in _PARAM.findall(match.group(2)):
            if re.fullmatch(r"-?\d+", raw):
                params[key] = int(raw)
            elif raw.startswith('"'):
                params[key] = re.sub(r"\\(.)", r"\1", raw[1:-1])
            else:
                params[key] = raw
        out[name] = params
        pos = match.end()
    return out


def rate_limit_state(headers: Mapping[str, str]) -> Dict[str, Dict[str, Any]]:
    """The policies of a response's ``RateLimit-Policy`` and ``RateLimit`` headers, by
    name: ``{"default": {"q": 100, "w": 60, "r": 99, "t": 60}}`` (``q`` quota, ``w``
    window, ``r`` remaining, ``t`` seconds until restored). Takes any mapping with
    case-insensitive names (Starlette/httpx/requests/werkzeug/Django headers) or a
    plain dict; an empty dict when the response has no such headers."""
    lower = {str(k).lower(): str(v) for k, v in headers.items()}
    out: Dict[str, Dict[str, Any]] = {}
    for field in ("ratelimit-policy", "ratelimit"):
        if field in lower:
            for name, params in _parse_list(lower[field]).items():
                out.setdefault(name, {}).update(params)
    return out
