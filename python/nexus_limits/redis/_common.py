"""What the sync and asyncio Redis limiters share: key layout, argument checks, the
scripts' arguments and replies, and the on_error policy. No I/O happens here."""

from __future__ import annotations

import inspect
import math
import re
import uuid
from typing import Any, List, Optional, Sequence, Tuple, Type
from urllib.parse import quote_from_bytes

import nexus_limits as nl

from .._core import Decision, ManualClock
from ..errors import BackendUnavailable
from ._scripts import SINGLE

ON_ERROR = ("allow", "deny", "raise")
# Seconds a fail-closed ("deny") answer asks the caller to wait.
FALLBACK_RETRY = 1.0
MAX_KEY_BYTES = 1024
_PREFIX = re.compile(r"[A-Za-z0-9_.\-:/]{1,100}")
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,100}")


def _error_types() -> Tuple[Type[BaseException], ...]:
    types: List[Type[BaseException]] = []
    try:
        from redis.exceptions import RedisError

        types.append(RedisError)
    except ImportError:  # pragma: no cover - redis is how these tests talk to the server
        pass
    try:  # pragma: no cover - valkey's client is optional
        from valkey.exceptions import ValkeyError  # type: ignore[import-not-found]

        types.append(ValkeyError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types) or (OSError,)


BACKEND_ERRORS = _error_types()


def check_client(client: Any, want_async: bool) -> Any:
    if not (hasattr(client, "evalsha") and hasattr(client, "script_load") and hasattr(client, "execute_command")):
        raise TypeError(
            f"client must be a redis.Redis, redis.cluster.RedisCluster or Valkey client, got {type(client).__name__}"
        )
    is_async = inspect.iscoroutinefunction(client.execute_command)
    if is_async and not want_async:
        raise TypeError(
            f"client is an asyncio client ({type(client).__name__}); use nexus_limits.redis.asyncio with it"
        )
    if want_async and not is_async:
        raise TypeError(f"client is a synchronous client ({type(client).__name__}); use nexus_limits.redis with it")
    return client


def check_prefix(prefix: Any) -> str:
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(
            f"prefix {prefix!r} must be 1 to 100 characters among letters, digits and _ . - : / "
            "(no braces, spaces or control characters)"
        )
    return prefix


def check_name(name: Any) -> Optional[str]:
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"name must be None or a str, got {type(name).__name__}")
    if not _NAME.fullmatch(name):
        raise ValueError(f"name {name!r} must be 1 to 100 characters among letters, digits and _ . -")
    return name


def check_on_error(on_error: Any) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of 'allow', 'deny', 'raise', got {on_error!r}")
    return str(on_error)


def check_clock(clock: Any) -> Optional[ManualClock]:
    if clock is not None and not isinstance(clock, ManualClock):
        raise TypeError(f"clock must be None (the server's clock) or a ManualClock, got {type(clock).__name__}")
    return clock


def check_cost(cost: Any) -> int:
    if type(cost) is int and cost >= 0:
        return cost
    if isinstance(cost, bool) or not isinstance(cost, int):
        raise TypeError(f"cost must be a non-negative int, got {type(cost).__name__}")
    raise ValueError(f"cost must be a non-negative integer, got {cost}")


_PLAIN = re.compile(r"[A-Za-z0-9_.~\-]*")


def encode_key(key: Any) -> str:
    """A user key as text safe inside a Redis key and a hash tag.

    A type tag keeps "5", b"5" and 5 apart; percent-encoding (everything but letters,
    digits and ``_.-~``) keeps braces, colons, spaces and control bytes out, and is
    injective, so no two keys share an encoding and none can reach another prefix.
    """
    if isinstance(key, str):
        if len(key) <= MAX_KEY_BYTES and _PLAIN.fullmatch(key):
            return "s" + key  # nothing to escape: the common case, kept cheap
        raw = key.encode("utf-8", "surrogatepass")
        tag = "s"
    elif isinstance(key, bytes):
        raw = key
        tag = "b"
    elif isinstance(key, int) and not isinstance(key, bool):
        return f"i{key}"
    else:
        raise TypeError(f"key must be str, bytes or int, got {type(key).__name__}")
    if len(raw) > MAX_KEY_BYTES:
        raise ValueError(f"key is too long for the Redis backend ({len(raw)} bytes; at most {MAX_KEY_BYTES})")
    return tag + quote_from_bytes(raw, safe="")


def now_arg(clock: Optional[ManualClock]) -> str:
    """The script's `now`: empty for the server's TIME, else the manual clock in us."""
    return "" if clock is None else repr(clock.now * 1e6)


def is_outage(error: BaseException) -> bool:
    """False for errors that say the request was wrong, not that the store is away:
    a key holding another type (WRONGTYPE) or a failing script. Those always raise."""
    text = str(error)
    return not (text.startswith("WRONGTYPE") or "user_script" in text)


def is_noscript(error: BaseException) -> bool:
    """The server lost its script cache (restart, SCRIPT FLUSH, failover)."""
    return type(error).__name__ == "NoScriptError" or str(error).startswith("NOSCRIPT")


def to_decision(reply: Sequence[Any], lease: Any = None) -> Decision:
    allowed, limit, remaining, reset_us, retry_us, delay_us = (int(x) for x in reply[:6])
    retry = math.inf if retry_us < 0 else retry_us / 1e6
    return Decision(bool(allowed), limit, remaining, reset_us / 1e6, retry, delay_us / 1e6, lease)


def to_decisions(reply: Sequence[Any]) -> List[Decision]:
    """Consecutive decisions of 6 values each (a composite's combined one, then its parts')."""
    return [to_decision(reply[i : i + 6]) for i in range(0, len(reply), 6)]


class Fallback:
    """The on_error policy of one limiter."""

    __slots__ = ("on_error", "what")

    def __init__(self, on_error: str, what: str) -> None:
        self.on_error = on_error
        self.what = what

    def decision(self, error: BaseException, limit: int) -> Decision:
        if not is_outage(error):
            raise error
        if self.on_error == "raise":
            raise BackendUnavailable(f"{self.what}: the store could not be reached: {error}") from error
        allowed = self.on_error == "allow"
        return Decision(allowed, limit, 0, 0.0, 0.0 if allowed else FALLBACK_RETRY, fallback=True)


class RateSpec:
    """One Redis-backed rate limiter's fixed part: its model, key suffix and script arguments."""

    __slots__ = ("args", "clock", "fallback", "model", "prefix", "script", "suffix", "unit")

    def __init__(
        self,
        algorithm: str,
        model: Any,
        prefix: Any,
        name: Any,
        on_error: Any,
        clock: Any,
    ) -> None:
        self.model = model
        self.prefix = check_prefix(prefix)
        self.clock = check_clock(clock)
        rate = model.rate
        period_us = rate.period * 1e6
        limit = model.limit
        if algorithm in ("gcra", "leaky"):
            a = period_us / rate.count
            default_id = f"{'tb' if algorithm == 'gcra' else 'lb'}-{rate.count}-{period_us!r}-{limit}"
        else:
            a = period_us
            default_id = f"{'fw' if algorithm == 'fixed' else 'sw'}-{rate.count}-{period_us!r}"
        self.suffix = ":" + (check_name(name) or default_id)
        self.args = [algorithm, repr(a), str(limit), "0"]
        self.script = SINGLE[algorithm]
        # ARGV of the commonest calls (server clock, cost 1), built once.
        self.unit = {mode: ["", mode, *self.args, "1"] for mode in ("hit", "peek")}
        self.fallback = Fallback(check_on_error(on_error), f"{type(model).__name__} on Redis")

    def key(self, key: Any) -> str:
        return f"{self.prefix}:{{{encode_key(key)}}}{self.suffix}"

    def argv(self, mode: str, cost: Any) -> List[str]:
        """ARGV for this limiter alone."""
        if cost == 1 and self.clock is None and type(cost) is int:
            return self.unit[mode]
        return [now_arg(self.clock), mode, *self.args, str(check_cost(cost))]


def flatten(limiters: Any, kinds: Tuple[type, ...], composite: Any) -> List[Any]:
    try:
        items = list(limiters)
    except TypeError:
        raise TypeError(f"limiters must be an iterable of limiters, got {type(limiters).__name__}") from None
    parts: List[Any] = []
    for item in items:
        if isinstance(item, composite):
            parts.extend(item._parts)
        elif isinstance(item, kinds):
            parts.append(item)
        else:
            names = ", ".join(k.__name__ for k in kinds)
            raise TypeError(f"each Composite part must be a Redis {names} or Composite, got {type(item).__name__}")
    if not parts:
        raise ValueError("Composite needs at least one limiter")
    if len({id(p) for p in parts}) != len(parts):
        raise ValueError("the same limiter appears twice in Composite")
    if len({id(p._client) for p in parts}) != 1:
        raise ValueError("all Composite parts must use the same Redis client")
    if len({id(p._spec.clock) for p in parts}) != 1:
        raise ValueError("all Composite parts must use the same clock")
    return parts


def new_lease_id() -> str:
    return uuid.uuid4().hex


def concurrency_model(limit: Any, lease_ttl: Any) -> Any:
    """Validates like the in-process Concurrency (same errors, same messages)."""
    return nl.Concurrency(limit, lease_ttl=lease_ttl)
