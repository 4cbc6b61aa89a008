"""What the sync and asyncio Redis limiters share: key layout, argument checks, the
scripts' arguments and replies, and the on_error policy. No I/O happens here."""

from __future__ import annotations

import inspect
import logging
import math
import re
import threading
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type
from urllib.parse import quote_from_bytes

import nexus_limits as nl

from .._core import Decision, ManualClock, Quota
from ..errors import BackendUnavailable, NexusLimitsError
from ._scripts import SINGLE

ON_ERROR = ("allow", "deny", "raise")
# The longest pause between two tries for a Concurrency lease (no release is announced).
LEASE_POLL = 0.05
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
    from ._breaker import CircuitOpen

    types.append(CircuitOpen)
    return tuple(types)


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


def is_cluster(client: Any) -> bool:
    """A Redis Cluster client (redis-py's and Valkey's, sync or asyncio): it refuses
    EVALSHA in a pipeline."""
    return hasattr(client, "nodes_manager")


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


def check_on_error(on_error: Any, local: bool = False) -> str:
    """``local``: the limiter can answer from an in-process twin (on_error="local")."""
    if on_error == "local" and local:
        return "local"
    if on_error not in ON_ERROR:
        also = ", 'local'" if local else ""
        raise ValueError(f"on_error must be one of 'allow', 'deny', 'raise'{also}, got {on_error!r}")
    return str(on_error)


def check_replicas(replicas: Any) -> int:
    if isinstance(replicas, bool) or not isinstance(replicas, int):
        raise TypeError(f"replicas must be a positive int, got {type(replicas).__name__}")
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    return replicas


# The limiter class of each algorithm (Quota.algorithm), in messages.
CLASS_NAMES = {
    "token_bucket": "TokenBucket",
    "leaky_bucket": "LeakyBucket",
    "fixed_window": "FixedWindow",
    "sliding_window": "SlidingWindow",
}


def in_process(quota: Quota, clock: Optional[ManualClock]) -> Any:
    """The in-process limiter of ``quota``."""
    algorithm = quota.algorithm
    if algorithm == "token_bucket":
        return nl.TokenBucket(quota.rate, burst=quota.limit, clock=clock)
    if algorithm == "leaky_bucket":
        return nl.LeakyBucket(quota.rate, capacity=quota.limit, clock=clock)
    kind = nl.FixedWindow if algorithm == "fixed_window" else nl.SlidingWindow
    return kind(quota.rate, clock=clock, align=quota.align)


def local_twin(quota: Quota, replicas: int, clock: Optional[ManualClock]) -> Any:
    """An in-process limiter of ``quota`` divided by ``replicas`` (at least one unit):
    what this process may admit while Redis is away, so that all replicas together
    stay near the shared quota."""
    return in_process(quota.share(replicas), clock)


def leaky_quota(rate: Any, capacity: Any) -> Quota:
    """A leaky bucket's quota, refused with the in-process LeakyBucket's words (its
    burst is called ``capacity``)."""
    try:
        return Quota("leaky_bucket", rate, capacity)
    except (TypeError, ValueError) as error:
        text = str(error)
        if not text.startswith("burst "):
            raise
        raise type(error)("capacity " + text[len("burst ") :]) from None


def check_clock(clock: Any) -> Optional[ManualClock]:
    if clock is not None and not isinstance(clock, ManualClock):
        raise TypeError(f"clock must be None (the server's clock) or a ManualClock, got {type(clock).__name__}")
    return clock


def check_unit_cost(cost: Any) -> None:
    if check_cost(cost) != 1:
        raise ValueError(f"Concurrency counts leases one at a time; cost must be 1, got {cost}")


# The largest cost the in-process limiters take (a u64).
MAX_COST = 2**64 - 1


def check_cost(cost: Any) -> int:
    """``cost`` as the in-process limiters take it: an int from 0 to 2**64 - 1."""
    if type(cost) is int and 0 <= cost <= MAX_COST:
        return cost
    if isinstance(cost, bool) or not isinstance(cost, int):
        raise TypeError(f"cost must be a non-negative int, got {type(cost).__name__}")
    # (an int of thousands of digits cannot even be shown: say its size)
    shown = cost if cost.bit_length() <= 256 else f"an int of {cost.bit_length()} bits"
    raise ValueError(f"cost must be a non-negative integer, got {shown}")


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
    """The script's `now`: empty for the server's TIME, else the manual clock in us.

    At today's epoch a reading in seconds (a double) is only good to a quarter of a
    microsecond: ``now * 1e6`` was off by that for one reading in four, and a script
    deciding on a unit's boundary then disagreed with in-process. Such a reading is
    sent as whole microseconds, as the server's TIME gives them; a clock near its own
    zero keeps its fractions."""
    if clock is None:
        return ""
    now = clock.now
    if math.ulp(now) > 1e-7:
        return str(round(now * 1e6))
    return repr(now * 1e6)


def is_full(error: BaseException) -> bool:
    """The server refused to run a script because it is over its ``maxmemory`` (OOM)."""
    return type(error).__name__ == "OutOfMemoryError" or "> 'maxmemory'" in str(error)


def is_outage(error: BaseException) -> bool:
    """False for errors that say the request was wrong, not that the store is away:
    a key holding another type (WRONGTYPE) or a failing script. Those always raise.
    A server that is full (over ``maxmemory``, OOM) cannot take the check: an outage."""
    if is_full(error):
        return True
    text = str(error)
    return not (text.startswith("WRONGTYPE") or "user_script" in text)


# A script's error naming a key whose value this library did not write (lib.lua's foreign).
_FOREIGN = re.compile(r"NLSTATE (\S+) (.*?)(?: script: [0-9a-f]+, on @user_script:\d+\.)?$", re.S)


def _limiter_fix(name: str) -> str:
    if name.endswith(":q"):
        return "delete it (it holds the key's own quota: set_quota writes it again)"
    return "reset the key (limiter.reset) or delete it"


def store_error(
    error: BaseException, what: str, key: Optional[str] = None, fix: Callable[[str], str] = _limiter_fix
) -> NexusLimitsError:
    """The error for a store that answered but could not do a step (never answered by
    on_error, which is for outages): a key holding a value this library did not write
    (another program under the same prefix, or an edit by hand), named by the script
    (or ``key``, for a command on that one key), with what to do about it: ``fix(the
    key's name)`` (by default, for a limiter's state and quota keys)."""
    text = str(error)
    found = _FOREIGN.search(text)
    if found is None and "WRONGTYPE" in text and key is not None:
        found = _FOREIGN.search(f"NLSTATE {key} holds another type of value than this library writes there")
    if found is None:
        return NexusLimitsError(f"{what}: the store failed the step: {text}")
    name, detail = found.group(1), found.group(2)
    return NexusLimitsError(
        f"{what}: the key {name} {detail}; nexus-limits did not write it (another program writes "
        f"under the same prefix, or it was edited by hand): {fix(name)}"
    )


# What reading a reply that no script of this library gives can raise.
MALFORMED: Tuple[Type[BaseException], ...] = (
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    AttributeError,
    OverflowError,
)


def malformed(what: str, reply: Any) -> NexusLimitsError:
    """The error for a reply that is not what the script returns (a proxy or a server
    that is not Redis answering): shown, never guessed at."""
    shown = repr(reply)
    shown = shown if len(shown) <= 200 else shown[:200] + "..."
    return NexusLimitsError(f"{what}: the store's reply is not what this library's script returns: {shown}")


def is_noscript(error: BaseException) -> bool:
    """The server lost its script cache (restart, SCRIPT FLUSH, failover)."""
    return type(error).__name__ == "NoScriptError" or str(error).startswith("NOSCRIPT")


def to_decision(reply: Sequence[Any], lease: Any = None) -> Decision:
    allowed, limit, remaining, reset_us, retry_us, delay_us = (int(x) for x in reply[:6])
    retry = math.inf if retry_us < 0 else retry_us / 1e6
    return Decision(bool(allowed), limit, remaining, reset_us / 1e6, retry, delay_us / 1e6, lease)


def parse_quota(value: Any) -> Optional[Tuple[float, int]]:
    """A quota key's "micros capacity" as (micros, capacity); None when there is none,
    or it is not two numbers (the scripts then ignore it too)."""
    if value is None:
        return None
    fields = (value.decode() if isinstance(value, bytes) else str(value)).split()
    try:
        micros, capacity = float(fields[0]), int(fields[1])
    except (IndexError, ValueError):
        return None
    return (micros, capacity) if len(fields) == 2 else None


def to_decisions(reply: Sequence[Any]) -> List[Decision]:
    """Consecutive decisions of 6 values each (a composite's combined one, then its parts')."""
    return [to_decision(reply[i : i + 6]) for i in range(0, len(reply), 6)]


_SHADOW_LOG = logging.getLogger("nexus_limits.shadow")


class Tally:
    """A Redis limiter's counters, as ``stats()`` reports them (the in-process limiters'
    names, plus the store's errors and the on_error answers given instead)."""

    __slots__ = ("counts", "lock")

    NAMES = ("allowed", "denied", "near_limit", "shadow_denied", "errors", "fail_open", "fail_closed", "fail_local")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(self.NAMES, 0)
        self.lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n

    def decision(self, d: Decision, shadow: bool, what: Any, key: Any) -> Decision:
        """Counts a store's decision; in shadow mode a denial is logged and admitted."""
        with self.lock:
            if d.allowed:
                self.counts["allowed"] += 1
                if d.remaining * 5 <= d.limit:
                    self.counts["near_limit"] += 1
                return d
            self.counts["denied"] += 1
            if not shadow:
                return d
            self.counts["shadow_denied"] += 1
        _SHADOW_LOG.info(
            "shadow mode: %s would deny key %r (remaining %d of %d, retry after %.3fs)",
            what,
            key,
            d.remaining,
            d.limit,
            d.retry_after,
        )
        return Decision(True, d.limit, d.remaining, d.reset_after, 0.0, d.delay, shadow=True)

    def snapshot(self) -> Dict[str, int]:
        with self.lock:
            return dict(self.counts)


class Fallback:
    """The on_error policy of one limiter; ``local`` is its in-process twin, which
    answers the checks while the store is away when on_error is "local"."""

    __slots__ = ("local", "on_error", "tally", "what")

    def __init__(self, on_error: str, what: str, tally: Optional[Tally] = None, local: Any = None) -> None:
        self.on_error = on_error
        self.what = what
        self.tally = tally or Tally()
        self.local = local

    def decision(self, error: BaseException, limit: int, key: Any = None, cost: int = 1, mode: str = "") -> Decision:
        """The answer instead of the store's. ``mode`` ("hit" or "peek", with ``key`` and
        ``cost``) is given by checks, which on_error="local" answers in-process; other
        calls (reset, release, settle) answer as "allow" does in that mode."""
        if not is_outage(error):
            raise store_error(error, self.what) from error
        self.tally.add("errors")
        if self.on_error == "local" and mode:
            self.tally.add("fail_local")
            d = self.local.hit(key, cost) if mode == "hit" else self.local.peek(key, cost)
            return Decision(
                d.allowed, d.limit, d.remaining, d.reset_after, d.retry_after, d.delay, d.lease, fallback=True
            )
        if self.on_error == "raise":
            if is_full(error):
                raise BackendUnavailable(
                    f"{self.what}: the store is full (used memory > maxmemory) and refused the check: {error}"
                ) from error
            raise BackendUnavailable(f"{self.what}: the store could not be reached: {error}") from error
        allowed = self.on_error in ("allow", "local")
        self.tally.add("fail_open" if allowed else "fail_closed")
        return Decision(allowed, limit, 0, 0.0, 0.0 if allowed else FALLBACK_RETRY, fallback=True)


class RatePlan:
    """What one Redis rate limiter does without I/O: its quota (a core :class:`Quota`,
    which validated it), its keys' names, its scripts' arguments, its shadow flag and
    its on_error policy."""

    __slots__ = (
        "algorithm",
        "args",
        "clock",
        "close",
        "fallback",
        "packs",
        "prefix",
        "quota",
        "quota_args",
        "replicas",
        "script",
        "shadow",
        "suffix",
        "tag",
        "unit",
    )

    def __init__(self, quota: Quota, prefix: Any, name: Any, on_error: Any, clock: Any) -> None:
        self.quota = quota
        # The algorithm as the scripts name it ("gcra", "leaky", "fixed", "sliding").
        self.algorithm = quota.script_args[0]
        self.prefix = check_prefix(prefix)
        self.clock = check_clock(clock)
        # The quota names the keys (a named limiter keeps its keys when its quota changes).
        self.suffix = ":" + (check_name(name) or quota.redis_id)
        self.tag = self.prefix + ":{"
        self.close = "}" + self.suffix
        self.script = SINGLE[self.algorithm]
        self.shadow = False
        self._set_args()
        self.fallback = Fallback(check_on_error(on_error, local=True), f"{CLASS_NAMES[quota.algorithm]} on Redis")
        self.replicas = 1

    def set_replicas(self, replicas: Any) -> None:
        """How many processes share the quota: on_error="local" gives each its share."""
        self.replicas = check_replicas(replicas)
        if self.fallback.on_error == "local":
            self.fallback.local = local_twin(self.quota, self.replicas, self.clock)

    def _set_args(self) -> None:
        # The quota as every script takes it: micros, capacity, align_us (see header.lua).
        self.quota_args = [*self.quota.script_args[1:], align_arg(self.quota)]
        # A Composite's part: the last value tells its script the part is in shadow mode.
        self.args = [self.algorithm, *self.quota_args, "1" if self.shadow else "0"]
        # ARGV of the commonest check (server clock, cost 1), built once, and the whole
        # command in the protocol's bytes but for the key.
        self.unit = ["", *self.quota_args, "1"]
        self.packs = {mode: Packer(self.script.for_mode(mode).sha, self.unit) for mode in ("hit", "peek")}

    def set_shadow(self, on: Any) -> None:
        self.shadow = check_shadow(on)
        self._set_args()

    def new_quota(self, rate: Any, burst: Any) -> Quota:
        """A quota of this limiter's algorithm (and windows), validated by the core."""
        return Quota(self.quota.algorithm, rate, burst, align=self.quota.align)

    def unit_call(self, mode: str, key: Any) -> Tuple[List[str], bytes]:
        """KEYS of a check of cost 1 on the server's clock, and its whole EVALSHA as bytes
        to send (its ARGV is ``unit``)."""
        k = self.tag + encode_key(key) + self.close
        return [k, k + ":q"], self.packs[mode].pack(k)

    def requota_argv(self, mode: str, quota: Quota) -> List[str]:
        return [now_arg(self.clock), mode, self.algorithm, *self.quota_args, *quota.script_args[1:]]

    def key(self, key: Any) -> str:
        return f"{self.prefix}:{{{encode_key(key)}}}{self.suffix}"

    def keys(self, key: Any) -> List[str]:
        """The key's state key and quota key."""
        k = f"{self.prefix}:{{{encode_key(key)}}}{self.suffix}"
        return [k, k + ":q"]

    def argv(self, cost: Any) -> List[str]:
        """ARGV for this limiter alone (single.lua's)."""
        if cost == 1 and self.clock is None and type(cost) is int:
            return self.unit
        return [now_arg(self.clock), *self.quota_args, str(check_cost(cost))]


def align_arg(quota: Quota) -> str:
    """The scripts' align_us of ``quota``: where its windows start after the Unix epoch's
    period boundaries (its align modulo its period), in microseconds; "0" for a bucket.
    Modulo the limiter's period, as its keys are named: processes whose aligns differ by
    whole periods share keys, so they must count the same windows."""
    if quota.align is None:
        return "0"
    period_ns = round(quota.rate.period * 1e9)
    phase_ns = round(quota.align * 1e9) % period_ns
    return str(phase_ns // 1000) if phase_ns % 1000 == 0 else repr(phase_ns / 1000)


def check_shadow(on: Any) -> bool:
    if not isinstance(on, bool):
        raise TypeError(f"shadow must be True or False, got {type(on).__name__}")
    return on


def _bulk(value: str) -> bytes:
    raw = value.encode()
    return b"$%d\r\n%s\r\n" % (len(raw), raw)


class Packer:
    """One limiter's EVALSHA in the Redis protocol (RESP), packed once but for the key:
    the bytes redis-py would send for ``evalsha(sha, 2, key, key + ":q", *argv)``,
    without its per-call packing."""

    __slots__ = ("head", "rest")

    def __init__(self, sha: str, argv: Sequence[str]) -> None:
        self.head = b"*%d\r\n" % (5 + len(argv)) + _bulk("EVALSHA") + _bulk(sha) + _bulk("2") + b"$"
        self.rest = b"".join(_bulk(a) for a in argv)

    def pack(self, key: str) -> bytes:
        """The command for the state key ``key`` (and its quota key)."""
        raw = key.encode()
        n = len(raw)
        return b"%s%d\r\n%s\r\n$%d\r\n%s:q\r\n%s" % (self.head, n, raw, n + 2, raw, self.rest)


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
    if len({id(p._plan.clock) for p in parts}) != 1:
        raise ValueError("all Composite parts must use the same clock")
    return parts


def new_lease_id() -> str:
    return uuid.uuid4().hex


def concurrency_model(limit: Any, lease_ttl: Any) -> Any:
    """Validates like the in-process Concurrency (same errors, same messages)."""
    return nl.Concurrency(limit, lease_ttl=lease_ttl)


def judge(limiter: Any, reply: Sequence[Any], key: Any) -> Decision:
    """The Decision of a check script's reply, counted in the limiter's tally; in shadow
    mode a denial is logged and admitted. A Composite's reply also holds each part's
    Decision (its script already admitted past the parts in shadow mode): each part
    counts its own, as in-process."""
    d = to_decision(reply)
    if len(reply) > 6:
        for part, mine in zip(limiter._parts, to_decisions(reply[6:])):
            part._fallback.tally.decision(mine, part._plan.shadow, part, key)
    tally: Tally = limiter._fallback.tally
    return tally.decision(d, limiter.shadow, limiter, key)


def script_arguments(
    parts: Sequence[Any], key: Any, cost: Any, mode: str, clock: Optional[ManualClock]
) -> Tuple[List[str], List[str]]:
    """KEYS and ARGV of a Composite's script: every part's state key, then every part's
    quota key; the arguments of each part."""
    c = str(check_cost(cost))
    pairs = [p._plan.keys(key) for p in parts]
    keys = [k for k, _ in pairs] + [q for _, q in pairs]
    args = [now_arg(clock), mode]
    for p in parts:
        args.extend(p._plan.args)
        args.append(c)
    return keys, args


def decode_key(encoded: str) -> Any:
    """The user key of :func:`encode_key`'s text."""
    from urllib.parse import unquote_to_bytes

    tag, body = encoded[:1], encoded[1:]
    if tag == "i":
        return int(body)
    raw = unquote_to_bytes(body)
    return raw if tag == "b" else raw.decode("utf-8", "surrogatepass")


def inspect_dict(limiter: Any, key: Any, zero: Decision, one: Decision, own: Any) -> Dict[str, Any]:
    """``inspect(key)`` of a Redis limiter, from two peeks and its quota key."""
    plan = limiter._plan
    stored = parse_quota(own)
    quota = plan.quota
    if stored is not None:
        try:
            quota = Quota.from_script_args(plan.algorithm, *stored)
        except ValueError:
            stored = None  # not a quota the scripts can use either
    return {
        "key": key,
        "algorithm": plan.quota.name,
        "rate": quota.rate,
        "limit": quota.limit,
        "own_quota": stored is not None,
        **from_peeks(zero, one),
        "shadow": plan.shadow,
    }


def from_peeks(zero: Decision, one: Decision) -> Dict[str, Any]:
    """The fields of ``inspect`` two peeks (of 0 and 1 unit) tell."""
    return {
        "used": max(zero.limit - zero.remaining, 0),
        "remaining": zero.remaining,
        "allowed": one.allowed,
        "retry_after": one.retry_after,
        "reset_after": zero.reset_after,
        "tracked": zero.remaining < zero.limit,
    }


def scan_pattern(limiter: Any) -> str:
    """A SCAN pattern matching every state key of a limiter (prefixes and names hold no
    glob characters, and encoded keys no braces)."""
    return f"{limiter._plan.prefix}:{{*}}{limiter._plan.suffix}"


def top_rows(found: Sequence[Tuple[Any, int, int]], n: int) -> List[Dict[str, Any]]:
    """The ``n`` most used of (key, used, limit) rows, as ``top_keys`` returns them: by
    share of the limit, then by units used."""
    rows = [(used / max(limit, 1), used, limit, key) for key, used, limit in found if used > 0]
    rows.sort(key=lambda r: (-r[0], -r[1]))
    return [{"key": k, "id": None, "used": u, "limit": lim} for _, u, lim, k in rows[:n]]


def concurrency_inspection(key: Any, reply: Sequence[Any], shadow: bool) -> Dict[str, Any]:
    """A Redis Concurrency's ``inspect(key)``, from concurrency.lua's peek."""
    d = to_decision(reply)
    held, own = int(reply[6]), bool(int(reply[7]))
    return {
        "key": key,
        "algorithm": "concurrency",
        "rate": None,
        "limit": d.limit,
        "own_quota": own,
        "used": held,
        "remaining": max(d.limit - held, 0),
        "allowed": d.allowed,
        "retry_after": d.retry_after,
        "reset_after": d.reset_after if held else 0.0,
        "tracked": held > 0,
        "shadow": shadow,
    }


def key_of(redis_key: Any) -> Any:
    """The user key inside a state key's hash tag."""
    text = redis_key.decode() if isinstance(redis_key, bytes) else str(redis_key)
    return decode_key(text[text.index("{") + 1 : text.index("}")])
