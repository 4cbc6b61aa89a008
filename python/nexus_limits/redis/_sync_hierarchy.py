"""Hierarchical quotas and priority classes on Redis, synchronous.

GENERATED from ``_async_hierarchy.py`` by ``_generate.py`` beside it: do not edit; change
``_async_hierarchy.py`` and run ``python python/nexus_limits/redis/_generate.py`` (a test
fails when this file is stale).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import nexus_limits as nl

from .. import _wait
from .._core import Decision, ManualClock, Quota
from ..errors import BackendUnavailable, NexusLimitsError
from ..hierarchy import Hierarchy as _InProcessHierarchy
from ..hierarchy import HierarchyDecision, HierarchyReservation
from ..limiters import Priority as _InProcessPriority
from ._channel import channel_for
from ._common import (
    BACKEND_ERRORS,
    MALFORMED,
    Fallback,
    check_client,
    check_name,
    check_on_error,
    check_prefix,
    check_shadow,
    encode_key,
    is_full,
    is_outage,
    malformed,
    new_lease_id,
    now_arg,
    store_error,
    to_decision,
)
from ._scripts import HIERARCHY, HIERARCHY_INSPECT, HIERARCHY_REQUOTA, HIERARCHY_SETTLE, PRIORITY, RELEASE
from ._sync import ASYNC, _RedisRateLimiter, evalsha

__all__ = ["Hierarchy", "Priority"]

UNITS = ("requests", "tokens", "daily_tokens", "spend")
# The key suffix of each unit's state (then the node's own quotas and its lease set).
_SUFFIX = (":r", ":t", ":d", ":s")
_SCALE = 1_000_000
_MAX_AMOUNT = 2**64 - 1
_LEVEL_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
# The longest run of names below the org kept readable in a key (see Hierarchy._keys).
_MAX_READABLE = 256


def _quoted(name: str) -> str:
    """A name quoted as the native classes quote it in their errors."""
    return json.dumps(name, ensure_ascii=False)


def _amount(name: str, value: Any) -> int:
    """A non-negative whole amount (requests, tokens, spend), as the in-process class
    takes it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a non-negative int, got {type(value).__name__}")
    if value < 0 or value > _MAX_AMOUNT:
        # (an int of thousands of digits cannot even be shown: say its size)
        shown = value if value.bit_length() <= 256 else f"an int of {value.bit_length()} bits"
        raise ValueError(f"{name} must be a non-negative integer of at most 64 bits, got {shown}")
    return value


def _script_quota(rate: Any) -> Tuple[str, str, nl.Rate]:
    """A rate as the scripts take it: micros per unit and capacity (a token bucket whose
    burst is its count), and the rate."""
    quota = Quota("token_bucket", rate)
    return quota.script_args[1], quota.script_args[2], quota.rate


Six = Tuple[int, int, int, int, int, int]


def _six(reply: Sequence[Any]) -> Six:
    """A decision's six values as a script replies them."""
    a, b, c, d, e, f = (int(x) for x in reply[:6])
    return (a, b, c, d, e, f)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Counts:
    """Checks counted as the core counts them (allowed, denied, near_limit, shadow_denied)."""

    __slots__ = ("c",)

    def __init__(self) -> None:
        self.c = dict.fromkeys(("allowed", "denied", "near_limit", "shadow_denied"), 0)

    def check(self, d: Decision, shadow: bool) -> None:
        if d.allowed:
            self.c["allowed"] += 1
            if d.remaining * 5 <= d.limit:
                self.c["near_limit"] += 1
            return
        self.c["denied"] += 1
        if shadow:
            self.c["shadow_denied"] += 1


class _Answer:
    """What a HierarchyDecision asks of its hierarchy, for one answer: the level names,
    the path's quotas as the script found them in force (a node may have its own), and
    the hierarchy's settling."""

    __slots__ = ("_h", "_quotas", "levels")

    def __init__(self, h: Any, quotas: List[Tuple[str, str, int, float]]) -> None:
        self._h = h
        self._quotas = quotas
        self.levels = h.levels

    def _policies(self, path: Any) -> List[Tuple[str, str, int, float]]:
        return self._quotas

    def _settle(self, *args: Any) -> Any:
        return self._h._settle(*args)

    def _expired(self, charged_at: Optional[int]) -> bool:
        return bool(self._h._expired(charged_at))


async def _threads(hit: Any, clock: Any, key: Any, cost: int, timeout: Any) -> Any:
    """``acquire_async`` of the synchronous classes: ``acquire`` for asyncio code holding a
    synchronous client, each round trip (``hit(key, cost)``) in a worker thread so the
    event loop is never blocked. (The asyncio classes' ``acquire_async`` is their
    ``acquire``; this one is theirs only in the generated file.)"""

    async def go(k: Any, c: int) -> Any:
        return await asyncio.to_thread(hit, k, c)

    wait = _wait.acquire_async
    return await wait(go, clock, key, cost, timeout)


def _acquire_in_threads(
    self: Any, path: Any, cost: int = 1, timeout: Optional[float] = None, *, cls: Optional[str] = None
) -> Any:
    return _threads(lambda p, c: self.hit(p, c, cls=cls), self.clock, path, cost, timeout)


def _priority_in_threads(
    self: Any, key: Any, cost: int = 1, timeout: Optional[float] = None, cls: Optional[str] = None
) -> Any:
    return _threads(lambda k, c: self.hit(k, c, cls), self.clock, key, cost, timeout)


class Hierarchy:
    """:class:`nexus_limits.Hierarchy` on Redis: quotas at every level of a path (org >
    team > key, any depth), charged all or nothing, shared by every process and host.

    ``levels``, ``lease_ttl``, ``shadow``, ``classes`` and ``default_class`` are the
    in-process class's, and so are the methods and their answers: ``hit``,
    ``try_acquire``, ``peek``, ``reserve`` (a reservation to ``settle`` or ``cancel``),
    ``acquire``, ``set_quota``, ``clear_quota``, ``set_default_quota``, ``reset``,
    ``inspect``, ``quotas`` and ``stats`` (this process's counters). On the asyncio
    side (:mod:`nexus_limits.redis.asyncio`) every method that talks to Redis is a
    coroutine.

    - A check is one script run: every level of the path is decided and, only if all
      admit, charged (the concurrency leases too); the lease time and the token buckets
      run on the server's clock (``clock=`` a :class:`~nexus_limits.ManualClock` for
      tests). The keys of a path share the org's hash tag: a cluster runs the script on
      one node.
    - ``concurrency``: each node's leases are a sorted set of expiry times; a lease not
      settled within ``lease_ttl`` (its process died) expires by itself.
    - ``set_quota(node, ...)`` is kept in Redis (until ``clear_quota``) and seen by every
      process at its next check; the node's usage is carried over to its new quotas at
      once (one script). ``set_default_quota(level, ...)`` is kept in Redis too, each
      process reading the levels' quotas again at most every ``refresh`` seconds (at once
      in the process that set them); every node of the level keeps what it has used,
      carried over to the new quota when the node is next checked (until then it refills
      at the old rate).
    - ``name`` sets the keys of this hierarchy apart from other hierarchies' under the
      same ``prefix`` (by default a name made of the level names).
    - When the server cannot be reached, ``on_error`` answers as for the other Redis
      limiters (``"raise"``, ``"allow"``, ``"deny"``; the Decision has ``fallback``
      set, ``level`` None, and a reservation settles to nothing); while the client's
      circuit breaker is open that answer comes at once.
    """

    __slots__ = (
        "__weakref__",
        "_args",
        "_channel",
        "_client",
        "_clock",
        "_counts",
        "_counts_of",
        "_defaults",
        "_defaults_key",
        "_fallback",
        "_levels",
        "_lock",
        "_name",
        "_offset",
        "_prefix",
        "_read_at",
        "_refresh",
        "_shadow",
        "_shares",
        "_spec",
        "_ttl_us",
    )

    def __init__(
        self,
        client: Any,
        levels: Any,
        *,
        prefix: str = "nl",
        name: Optional[str] = None,
        on_error: str = "raise",
        clock: Optional[ManualClock] = None,
        lease_ttl: Optional[float] = None,
        shadow: Optional[bool] = None,
        classes: Optional[Dict[str, float]] = None,
        default_class: Optional[str] = None,
        refresh: float = 1.0,
    ) -> None:
        client = check_client(client, want_async=ASYNC)
        # The in-process class checks the levels, classes and lease time (same errors) and
        # combines the script's decisions into its answers.
        self._spec = _InProcessHierarchy(
            levels, clock=clock, lease_ttl=lease_ttl, classes=classes, default_class=default_class
        )
        self._levels: List[str] = list(self._spec.levels)
        self._prefix = check_prefix(prefix)
        self._name = check_name(name) or self._default_name()
        self._fallback = Fallback(check_on_error(on_error), "Hierarchy on Redis")
        self._shadow = check_shadow(shadow) if shadow is not None else False
        if isinstance(refresh, bool) or not isinstance(refresh, (int, float)) or not 0 <= refresh < math.inf:
            raise ValueError(f"refresh must be a finite number of seconds, 0 or more, got {refresh!r}")
        self._refresh = float(refresh)
        self._client = client
        self._channel = channel_for(client, want_async=ASYNC)
        self._clock = clock
        self._ttl_us = str(round(self._spec.lease_ttl * 1e6))
        self._shares = {c: round(s * _SCALE) for c, s in self._spec.classes.items()}
        self._defaults_key = f"{self._prefix}:{{{self._name}}}:hierarchy-defaults"
        # Each level's quotas: {unit: (micros, capacity, Rate), "concurrency": n}, and
        # the same as the scripts take them.
        self._defaults: List[Dict[str, Any]] = []
        self._args: List[str] = []
        self._set_args(self._spec_defaults())
        self._read_at = -math.inf
        # The server's clock minus this host's, in microseconds, as last seen: a
        # reservation's lease time is the server's.
        self._offset = 0.0
        self._lock = threading.Lock()
        self._counts = _Counts()
        self._counts_of: Dict[str, _Counts] = {}

    # -- what does no I/O -----------------------------------------------------------

    def _default_name(self) -> str:
        joined = ".".join(self._levels)
        if len(joined) <= 90 and all(_LEVEL_NAME.fullmatch(n) for n in self._levels):
            return "h." + joined
        return "h-" + hashlib.sha1("\0".join(self._levels).encode("utf-8", "surrogatepass")).hexdigest()[:16]

    def _set_args(self, defaults: List[Dict[str, Any]]) -> None:
        """The levels' quotas as the scripts take them (9 values a level)."""
        args: List[str] = []
        for level in defaults:
            args.append(str(level.get("concurrency", 0)))
            for unit in UNITS:
                q = level.get(unit)
                args.extend((q[0], q[1]) if q else ("", ""))
        self._defaults, self._args = defaults, args

    def _level_args(self, level: int) -> List[str]:
        return self._args[level * 9 : level * 9 + 9]

    def _path_error(self, got: int, what: str) -> ValueError:
        n = len(self._levels)
        return ValueError(
            f"{what} ({' > '.join(self._levels)}): expected {n} element{'' if n == 1 else 's'}, got {got}"
        )

    def _nodes(self, path: Any, whole: bool) -> List[str]:
        """The path's elements as key text (checked as the in-process class checks them):
        a whole path (one element per level) or a node's (1 to depth elements)."""
        if not isinstance(path, (tuple, list)):
            raise TypeError(
                f"path must be a tuple of keys such as ('acme', 'search', 'sk-1'), got {type(path).__name__}"
            )
        depth = len(self._levels)
        if len(path) > depth:
            raise ValueError(f"a path has at most one element per level ({depth}), got {len(path)}")
        if whole and len(path) != depth:
            raise self._path_error(len(path), "a path names one node per level")
        if not path:
            raise self._path_error(0, "a node is named by its path from the top, one element or more")
        out = []
        for item in path:
            if isinstance(item, bool) or not isinstance(item, (str, bytes, int)):
                raise TypeError(f"each element of a path must be a key (str, bytes or int), got {type(item).__name__}")
            if isinstance(item, int) and not -(2**127) <= item < 2**128:
                raise ValueError(
                    "int keys must fit in 128 bits: from -2**127 to 2**128 - 1 (any signed or unsigned 128-bit "
                    f"value), got an int of {item.bit_length()} bits; pass str(key) or bytes for larger numbers"
                )
            if isinstance(item, str) and not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as error:
                    # As the in-process class refuses it: a lone surrogate is no text,
                    # and the two must agree on which paths exist.
                    raise ValueError(
                        f"each element of a path must be valid Unicode text (no lone surrogates): {error}"
                    ) from error
            out.append(encode_key(item))
        return out

    def _keys(self, nodes: Sequence[str], only: Optional[int] = None) -> List[str]:
        """Six keys for each level of ``nodes`` (own quotas, leases, four states), all
        under the org's hash tag; with ``only``, that level's alone."""
        org = nodes[0] if len(nodes[0]) <= _MAX_READABLE else "#" + hashlib.sha256(nodes[0].encode()).hexdigest()
        head = f"{self._prefix}:{{{org}}}:{self._name}:"
        keys: List[str] = []
        for level in range(len(nodes)) if only is None else (only,):
            below = "/".join(nodes[1 : level + 1])
            if len(below) > _MAX_READABLE:
                # A deep path of long names is named by its digest ("#" is in no encoded
                # name): a key stays short however long the path.
                below = "#" + hashlib.sha256(below.encode()).hexdigest()
            base = head + str(level) + (":" + below if level else "")
            keys.extend((base + ":q", base + ":c", *(base + s for s in _SUFFIX)))
        return keys

    def redis_keys(self, path: Any) -> List[str]:
        """The Redis keys of ``path``'s nodes (a node's own quotas, its leases and its
        four rate states, for each level): one hash tag, the org's."""
        return self._keys(self._nodes(path, whole=False))

    def _class(self, cls: Any) -> Tuple[Optional[str], int]:
        """The call's class and its share in millionths."""
        if not self._shares:
            if cls is not None:
                raise ValueError(
                    "this Hierarchy has no priority classes (build it with classes=) and was given class "
                    + (_quoted(cls) if isinstance(cls, str) else repr(cls))
                )
            return None, _SCALE
        if cls is None:
            cls = self._spec.default_class
        if not isinstance(cls, str):
            raise TypeError(f"cls must be a class name (str), got {type(cls).__name__}")
        if cls not in self._shares:
            names = ", ".join(_quoted(c) for c in self._shares)
            raise ValueError(f"unknown class {_quoted(cls)}: the classes are {names}")
        return cls, self._shares[cls]

    def _outcome(self, reply: Sequence[Any], mode: str, lease: str) -> Tuple[Tuple[Any, ...], List[Any], List[Any]]:
        """The answer tuple of a script's reply, the quotas it found in force, and each
        part's decision."""
        at = 1
        parts: List[Six] = []
        quotas: List[Tuple[str, str, int, float]] = []
        for level, defaults in zip(self._levels, self._defaults):
            for unit in UNITS:
                if unit in defaults:
                    parts.append(_six(reply[at : at + 6]))
                    micros, capacity = float(_text(reply[at + 6])), int(reply[at + 7])
                    quotas.append((level, unit, capacity, capacity * micros / 1e6))
                    at += 8
        concurrency: List[Optional[Six]] = []
        for defaults in self._defaults:
            if mode != "hit" and "concurrency" in defaults:
                concurrency.append(_six(reply[at : at + 6]))
                at += 6
            else:
                concurrency.append(None)
        out = self._spec._combine(parts, concurrency, self._shadow)
        allowed = bool(out[0])
        taken = mode == "reserve" and allowed
        leases = [lease if taken and c is not None else None for c in concurrency]
        charged_at = int(reply[0]) if taken else None
        return (*out[:6], leases, charged_at), quotas, [d for _, _, d in out[3]]

    def _count(self, t: Tuple[Any, ...], each: List[Decision], cls: Optional[str]) -> None:
        d: Decision = t[1]
        shadow = bool(d.shadow)
        real = Decision(bool(t[0]) and not shadow, d.limit, d.remaining, d.reset_after, d.retry_after, d.delay)
        with self._lock:
            self._counts.check(real, shadow)
            if (not t[0] or shadow) and t[2] is not None:
                key = f"refused:{t[2][0]}"
                self._counts_of.setdefault(key, _Counts()).c["denied"] += 1
            # A reservation that found no lease free decided its rate quotas without
            # charging them: not counted there, as in-process.
            rated = all(c is None or c.allowed for c in t[5])
            for (level, unit, _d), mine in zip(t[3], each if rated else ()):
                self._counts_of.setdefault(f"{level}.{unit}", _Counts()).check(mine, self._shadow)
            for level, c in zip(self._levels, t[5]):
                if c is not None:
                    self._counts_of.setdefault(f"{level}.concurrency", _Counts()).check(c, False)
            if cls is not None:
                self._counts_of.setdefault(f"class:{cls}", _Counts()).check(real, shadow)

    def _fallback_reply(self, error: BaseException) -> Tuple[Any, ...]:
        d = self._fallback.decision(error, 0)
        return (bool(d.allowed), d, None, [], [], [], [], None)

    def _expired(self, charged_at: Optional[int]) -> bool:
        if charged_at is None:
            return True  # never charged: a refusal, a peek or a fallback answer
        if self._clock is not None:
            return bool(self._clock.now * 1e6 > charged_at + int(self._ttl_us))
        return bool(time.time() * 1e6 + self._offset > charged_at + int(self._ttl_us))

    def _changes(self, level: int, values: Dict[str, Any]) -> Dict[str, str]:
        """The fields a change of ``level``'s quotas writes, each checked as the
        in-process class checks it (every quota given must exist at that level)."""
        given = {k: v for k, v in values.items() if v is not None}
        if not given:
            raise ValueError("give at least one of requests, tokens, daily_tokens, spend, concurrency")
        name = self._levels[level]
        for unit in given:
            if unit not in self._defaults[level]:
                what = "concurrency limit" if unit == "concurrency" else f"{unit} quota"
                raise ValueError(f"level {_quoted(name)} has no {what} to change")
        # An in-process level with these quotas checks them (same errors) and parses them.
        parsed = _InProcessHierarchy([("level", given)]).quotas("level")
        out = {}
        for unit, value in parsed.items():
            if unit == "concurrency":
                out[unit] = str(value)
            else:
                micros, capacity, rate = _script_quota(value)
                out[unit] = f"{micros} {capacity} {rate.period!r}"
        return out

    def _read_defaults(self, raw: Any) -> None:
        """The levels' quotas: as built, changed by what the defaults hash holds."""
        fields = {_text(k): _text(v) for k, v in (raw or {}).items()}
        levels: List[Dict[str, Any]] = []
        for i, built in enumerate(self._spec_defaults()):
            level = dict(built)
            for unit in list(level):
                value = fields.get(f"{i}|{unit}")
                if value is None:
                    continue
                try:
                    # Checked as set_default_quota checks what it writes: a value edited
                    # by hand that it would refuse (a concurrency of 10**30 lifts the
                    # limit) is ignored, as the scripts ignore such own quotas.
                    if unit == "concurrency":
                        _InProcessHierarchy([("level", {"concurrency": int(value)})])
                        level[unit] = int(value)
                    else:
                        capacity, period = value.split()[1:3]
                        level[unit] = _script_quota(nl.Rate(int(capacity), float(period)))
                except (ValueError, IndexError, TypeError, OverflowError):
                    continue  # not written by set_default_quota: ignored, as the scripts ignore it
            levels.append(level)
        self._set_args(levels)

    def _spec_defaults(self) -> List[Dict[str, Any]]:
        out = []
        for level in self._levels:
            built: Dict[str, Any] = {}
            for unit, value in self._spec.quotas(level).items():
                built[unit] = value if unit == "concurrency" else _script_quota(value)
            out.append(built)
        return out

    def _inspection(self, nodes: Sequence[Any], level: int, reply: Sequence[Any]) -> Dict[str, Any]:
        out: Dict[str, Any] = {"level": self._levels[level]}
        at = 0
        for unit in UNITS:
            if unit not in self._defaults[level]:
                continue
            micros, capacity, own = float(_text(reply[at])), int(reply[at + 1]), bool(int(reply[at + 2]))
            remaining, reset_us, retry_us = int(reply[at + 3]), int(reply[at + 4]), int(reply[at + 5])
            rate = self._defaults[level][unit][2]
            if own:
                try:
                    rate = nl.Rate(capacity, float(_text(reply[at + 7]).split()[2]))
                except (ValueError, IndexError):
                    rate = nl.Rate(capacity, capacity * micros / 1e6)
            out[unit] = {
                "key": tuple(nodes),
                "algorithm": "token bucket",
                "rate": rate,
                "limit": capacity,
                "own_quota": own,
                "used": max(capacity - remaining, 0),
                "remaining": remaining,
                "allowed": remaining >= 1,
                "retry_after": retry_us / 1e6,
                "reset_after": reset_us / 1e6,
                "tracked": bool(int(reply[at + 6])),
                "shadow": self._shadow,
            }
            at += 8
        if "concurrency" in self._defaults[level]:
            limit, held, own = int(reply[at]), int(reply[at + 1]), bool(int(reply[at + 2]))
            out["concurrency"] = {"limit": limit, "in_flight": min(held, limit), "own_quota": own}
        return out

    def _admin_error(self, error: BaseException, what: str) -> NexusLimitsError:
        if not is_outage(error):
            return self._store_error(error, what)
        self._fallback.tally.add("errors")
        return BackendUnavailable(f"Hierarchy on Redis: {what} could not reach the store: {error}")

    def _store_error(self, error: BaseException, what: str, key: Optional[str] = None) -> NexusLimitsError:
        """The error for a store that answered but could not do the step: a key holding a
        value this library did not write (another program under the same prefix, or an
        edit by hand), named; never answered by on_error, which is for outages."""

        def fix(found: str) -> str:
            if found == self._defaults_key:
                return "delete it (set_default_quota writes it again)"
            if found.endswith(":q"):
                return "delete it (it holds the node's own quotas, which set_quota writes again)"
            return "reset the node (Hierarchy.reset) or delete the key"

        return store_error(error, f"Hierarchy on Redis: {what}", key, fix)

    # -- the checks ---------------------------------------------------------------

    def _fresh(self) -> None:
        """The levels' quotas as set_default_quota last wrote them (read again at most every
        ``refresh`` seconds)."""
        if time.monotonic() < self._read_at + self._refresh:
            return
        self._read_at = time.monotonic()
        try:
            raw = self._channel.call("HGETALL", self._defaults_key)
        except BACKEND_ERRORS as error:
            if not is_outage(error):
                self._read_at = -math.inf
                raise self._store_error(error, "reading the levels' quotas", self._defaults_key) from error
            return  # the check that follows meets the outage and answers it
        self._read_defaults(raw)

    def _decide(
        self, path: Any, mode: str, cost: Any, tokens: Any, spend: Any, cls: Any
    ) -> Tuple[Tuple[Any, ...], List[Any]]:
        nodes = self._nodes(path, whole=True)
        amounts = (_amount("cost", cost), _amount("tokens", tokens), _amount("spend", spend))
        name, share = self._class(cls)
        self._fresh()
        lease = new_lease_id() if mode == "reserve" else ""
        argv = [
            now_arg(self._clock),
            mode,
            *map(str, amounts),
            str(share),
            "1" if self._shadow else "0",
            self._ttl_us,
            lease,
            str(len(nodes)),
            *self._args,
        ]
        script = HIERARCHY.reader if mode == "peek" and HIERARCHY.reader is not None else HIERARCHY
        try:
            reply = evalsha(self._channel, script, self._keys(nodes), argv)
        except BACKEND_ERRORS as error:
            if not is_outage(error):
                raise self._store_error(error, mode) from error
            return self._fallback_reply(error), []
        try:
            t, quotas, each = self._outcome(reply, mode, lease)
        except MALFORMED as error:
            raise malformed(f"Hierarchy on Redis: {mode}", reply) from error
        if self._clock is None:
            self._offset = int(reply[0]) - time.time() * 1e6
        if mode != "peek":
            self._count(t, each, name)
        return t, quotas

    def hit(self, path: Any, cost: int = 1, *, cls: Optional[str] = None) -> HierarchyDecision:
        """Decide ``cost`` requests at every level of ``path``; charge all or none (token
        and spend quotas are only asked whether the node is in debt). ``cls``: the
        call's priority class (with ``classes=``)."""
        t, quotas = self._decide(path, "hit", cost, 0, 0, cls)
        return HierarchyDecision(_Answer(self, quotas), path, t)

    def try_acquire(self, path: Any, cost: int = 1, *, cls: Optional[str] = None) -> bool:
        """``hit(path, cost).allowed``."""
        t, _ = self._decide(path, "hit", cost, 0, 0, cls)
        return bool(t[0])

    def peek(
        self, path: Any, cost: int = 1, *, tokens: int = 0, spend: int = 0, cls: Optional[str] = None
    ) -> HierarchyDecision:
        """What a call of ``cost`` requests, ``tokens`` and ``spend`` would get now (leases
        included), charging nothing: a read-only script, which a full server runs too."""
        t, quotas = self._decide(path, "peek", cost, tokens, spend, cls)
        return HierarchyDecision(_Answer(self, quotas), path, t)

    def reserve(self, path: Any, tokens: int = 0, *, spend: int = 0, cls: Optional[str] = None) -> HierarchyReservation:
        """Reserve one request, ``tokens`` and ``spend`` at every level of ``path``, with a
        lease at every level that has a concurrency limit, all or nothing; ``settle`` or
        ``cancel`` the reservation (see :class:`~nexus_limits.hierarchy.HierarchyReservation`)."""
        job = self._decide(path, "reserve", 1, tokens, spend, cls)
        t, quotas = job
        return HierarchyReservation(_Answer(self, quotas), path, tokens, spend, t)

    def _settle(
        self,
        path: Any,
        requests: int,
        tokens: int,
        spend: int,
        charged_at: Optional[int],
        leases: List[Optional[str]],
    ) -> bool:
        job = self._settle_now(path, requests, tokens, spend, charged_at, leases)
        return job

    def _settle_now(
        self,
        path: Any,
        requests: int,
        tokens: int,
        spend: int,
        charged_at: Optional[int],
        leases: List[Optional[str]],
    ) -> bool:
        if charged_at is None:
            return False  # a fallback answer charged nothing
        nodes = self._nodes(path, whole=True)
        lease = next((x for x in leases if x), "") or ""
        self._fresh()
        # An amount past 2**64 units is a debt no one can wait out either way (the script
        # holds every debt within 2**64 ns); bounded, it is a short argument.
        deltas = [str(max(-_MAX_AMOUNT, min(int(x), _MAX_AMOUNT))) for x in (requests, tokens, spend)]
        argv = [
            now_arg(self._clock),
            str(charged_at),
            self._ttl_us,
            *deltas,
            lease,
            "",
            "",
            str(len(nodes)),
            *self._args,
        ]
        keys = self._keys(nodes)
        try:
            return bool(evalsha(self._channel, HIERARCHY_SETTLE, keys, argv))
        except BACKEND_ERRORS as error:
            if not is_outage(error):
                raise self._store_error(error, "settle") from error
            if lease and is_full(error):
                # The buckets cannot be written, but ending the leases only frees memory.
                for level, held in enumerate(leases):
                    if held:
                        try:
                            evalsha(self._channel, RELEASE, keys[level * 6 + 1 : level * 6 + 2], [argv[0], lease])
                        except BACKEND_ERRORS:
                            pass
            if self._fallback.on_error == "raise":
                self._fallback.decision(error, 0)
            return False

    def acquire(
        self, path: Any, cost: int = 1, timeout: Optional[float] = None, *, cls: Optional[str] = None
    ) -> HierarchyDecision:
        """Wait until ``cost`` requests are admitted at every level (sleeping the
        ``retry_after`` of each refusal); RateLimitExceeded at once when the wait would
        pass ``timeout`` or can never end."""
        return _wait.acquire(lambda p, c: self.hit(p, c, cls=cls), self._clock, path, cost, timeout)  # type: ignore[arg-type, return-value]

    acquire_async = _acquire_in_threads

    # -- quotas and state -----------------------------------------------------------

    def set_quota(
        self,
        node: Any,
        requests: Any = None,
        tokens: Any = None,
        daily_tokens: Any = None,
        spend: Any = None,
        concurrency: Optional[int] = None,
    ) -> None:
        """Give one node (its path from the top: ``("acme",)`` is the org acme) quotas of
        its own, kept in Redis for every process until ``clear_quota``, keeping what it
        has used: ``requests``, ``tokens``, ``daily_tokens`` (rates), ``spend``
        (dollars, ``"10.00/day"``) and ``concurrency``, each of a quota its level has;
        the others stay."""
        nodes = self._nodes(node, whole=False)
        level = len(nodes) - 1
        values = dict(requests=requests, tokens=tokens, daily_tokens=daily_tokens, spend=spend, concurrency=concurrency)
        fields = self._changes(level, values)
        pairs = [x for kv in fields.items() for x in kv]
        self._requota(nodes, "set", pairs)

    def clear_quota(self, node: Any) -> bool:
        """Put a node back on its level's quotas; False if it had none of its own."""
        return self._requota(self._nodes(node, whole=False), "clear", [])

    def _requota(self, nodes: List[str], op: str, pairs: List[str]) -> bool:
        """One node's own quotas set or cleared, its states carried over (one script)."""
        level = len(nodes) - 1
        self._fresh()
        argv = [now_arg(self._clock), op, *self._level_args(level), *pairs]
        try:
            return bool(evalsha(self._channel, HIERARCHY_REQUOTA, self._keys(nodes, only=level), argv))
        except BACKEND_ERRORS as error:
            raise self._admin_error(error, f"{op}_quota") from error

    def set_default_quota(
        self,
        level: str,
        requests: Any = None,
        tokens: Any = None,
        daily_tokens: Any = None,
        spend: Any = None,
        concurrency: Optional[int] = None,
    ) -> None:
        """Change the quotas of every node of ``level`` (nodes with their own keep theirs),
        keeping what each has used: at once in this process, in the others at their
        next check after at most ``refresh`` seconds. Kept in Redis."""
        if not isinstance(level, str) or level not in self._levels:
            names = ", ".join(_quoted(n) for n in self._levels)
            shown = _quoted(level) if isinstance(level, str) else repr(level)
            raise ValueError(f"unknown level {shown}: the levels are {names}")
        i = self._levels.index(level)
        values = dict(requests=requests, tokens=tokens, daily_tokens=daily_tokens, spend=spend, concurrency=concurrency)
        fields = self._changes(i, values)
        try:
            self._channel.call("HSET", self._defaults_key, *[x for k, v in fields.items() for x in (f"{i}|{k}", v)])
            raw = self._channel.call("HGETALL", self._defaults_key)
        except BACKEND_ERRORS as error:
            if not is_outage(error):
                raise self._store_error(error, "set_default_quota", self._defaults_key) from error
            raise self._admin_error(error, "set_default_quota") from error
        self._read_at = time.monotonic()
        self._read_defaults(raw)

    def quotas(self, level: str) -> Dict[str, Any]:
        """The quotas of a level as built or last set by ``set_default_quota``:
        ``{"requests": Rate, ..., "concurrency": int}``."""
        if not isinstance(level, str) or level not in self._levels:
            names = ", ".join(_quoted(n) for n in self._levels)
            raise ValueError(f"unknown level {_quoted(str(level))}: the levels are {names}")
        self._fresh()
        built = self._defaults[self._levels.index(level)]
        return {unit: q if unit == "concurrency" else q[2] for unit, q in built.items()}

    def reset(self, node: Any) -> None:
        """Put one node (not the nodes below it) back to its fresh state, its leases
        ended (its own quotas stay)."""
        nodes = self._nodes(node, whole=False)
        try:
            self._channel.call("DEL", *self._keys(nodes, only=len(nodes) - 1)[1:])
        except BACKEND_ERRORS as error:
            raise self._admin_error(error, "reset") from error

    def inspect(self, node: Any) -> Dict[str, Any]:
        """One node's quotas and usage: ``{"level": name, "requests": {...}, "tokens":
        {...}, "concurrency": {"limit", "in_flight", "own_quota"}}`` (the quotas its
        level has), read by a read-only script."""
        nodes = self._nodes(node, whole=False)
        level = len(nodes) - 1
        self._fresh()
        keys = self._keys(nodes, only=level)
        try:
            reply = evalsha(self._channel, HIERARCHY_INSPECT, keys, [now_arg(self._clock), *self._level_args(level)])
        except BACKEND_ERRORS as error:
            raise self._admin_error(error, "inspect") from error
        try:
            return self._inspection(node, level, reply)
        except MALFORMED as error:
            raise malformed("Hierarchy on Redis: inspect", reply) from error

    def stats(self) -> Dict[str, Any]:
        """This process's counters, as the in-process class reports them: allowed,
        denied, near_limit, shadow_denied (whole calls), ``refused_by`` {level: calls
        refused there}, ``levels`` {level: {quota: counters}}, ``classes`` (with
        classes=); then the store's errors and on_error answers, and the client's
        circuit breaker."""
        with self._lock:
            out: Dict[str, Any] = dict(self._counts.c)
            counts = {k: dict(v.c) for k, v in self._counts_of.items()}
        zero = dict.fromkeys(("allowed", "denied", "near_limit", "shadow_denied"), 0)
        out["refused_by"] = {n: counts.get(f"refused:{n}", zero)["denied"] for n in self._levels}
        levels: Dict[str, Any] = {}
        for name, defaults in zip(self._levels, self._defaults):
            levels[name] = {u: counts.get(f"{name}.{u}", dict(zero)) for u in (*UNITS, "concurrency") if u in defaults}
        out["levels"] = levels
        if self._shares:
            out["classes"] = {
                c: {**counts.get(f"class:{c}", zero), "share": s / _SCALE} for c, s in self._shares.items()
            }
        tally = self._fallback.tally.snapshot()
        out.update({k: tally[k] for k in ("errors", "fail_open", "fail_closed")})
        out.update(self._channel.stats())
        return out

    # -- properties -----------------------------------------------------------------

    @property
    def levels(self) -> List[str]:
        """The level names, from the top."""
        return list(self._levels)

    @property
    def classes(self) -> Dict[str, float]:
        """The priority classes, {name: share} (empty without classes)."""
        return {c: s / _SCALE for c, s in self._shares.items()}

    @property
    def default_class(self) -> Optional[str]:
        """The class of a call that names none (None without classes)."""
        return self._spec.default_class

    @property
    def shadow(self) -> bool:
        """Shadow mode for the rate quotas (leases stay real): calls are decided, counted
        and charged as usual but never refused."""
        return self._shadow

    @shadow.setter
    def shadow(self, on: bool) -> None:
        self._shadow = check_shadow(on)

    @property
    def lease_ttl(self) -> float:
        """Seconds after which an unsettled reservation stands as charged (and its leases end)."""
        return float(self._spec.lease_ttl)

    @property
    def clock(self) -> Optional[ManualClock]:
        return self._clock

    @property
    def on_error(self) -> str:
        return self._fallback.on_error

    @property
    def client(self) -> Any:
        return self._client

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def name(self) -> str:
        """What sets this hierarchy's keys apart under its prefix."""
        return self._name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(levels={self._levels!r}, prefix={self._prefix!r}, name={self._name!r})"


class Priority:
    """:class:`nexus_limits.Priority` on Redis: one Redis limiter (``TokenBucket``,
    ``SlidingWindow``, ``FixedWindow`` or ``LeakyBucket`` of this module) shared by
    priority classes, each with the share of the limit it may use.

    A call of class ``c`` is decided as if it cost ``cost + floor(c)`` and, if admitted,
    charged ``cost``, inside one script: the reserve holds exactly for every process and
    host. The methods and answers are the in-process class's (``hit``, ``try_acquire``,
    ``peek``, ``get_limit``, ``reset``, ``acquire``; ``stats()["classes"]`` counts each
    class's checks in this process). The limiter keeps its keys, quotas (a key with a
    quota of its own keeps the same shares of it), shadow mode, counters and on_error
    policy; ``priority.limiter`` is it. Quota leasing (``lease=``) is not used here.
    """

    __slots__ = ("__weakref__", "_counts", "_limiter", "_lock", "_shares", "_spec")

    def __init__(self, limiter: Any, classes: Any, default: Optional[str] = None) -> None:
        if not isinstance(limiter, _RedisRateLimiter):
            raise TypeError(
                "limiter must be a TokenBucket, SlidingWindow, FixedWindow or LeakyBucket of "
                f"{'nexus_limits.redis.asyncio' if ASYNC else 'nexus_limits.redis'}, got {type(limiter).__name__}"
            )
        if limiter.lease_policy is not None:
            raise ValueError(
                "a Priority decides every call on the server (the class's floor is part of the step): "
                "give it a limiter without lease="
            )
        # The in-process class checks the classes and the default (same errors).
        self._spec = _InProcessPriority(nl.TokenBucket("1/second"), classes, default)
        self._limiter = limiter
        self._shares = {c: round(s * _SCALE) for c, s in self._spec.classes.items()}
        self._counts = {c: _Counts() for c in self._shares}
        self._lock = threading.Lock()

    def _class(self, cls: Any) -> str:
        if cls is None:
            return str(self._spec.default)
        if not isinstance(cls, str):
            raise TypeError(f"cls must be a class name (str), got {type(cls).__name__}")
        if cls not in self._shares:
            names = ", ".join(_quoted(c) for c in self._shares)
            raise ValueError(f"unknown class {_quoted(cls)}: the classes are {names}")
        return cls

    def _check(self, key: Any, cost: Any, cls: Any, mode: str) -> Decision:
        name = self._class(cls)
        if cost is None:
            cost = 1  # as the in-process class takes it
        limiter = self._limiter
        plan = limiter._plan
        keys = plan.keys(key)
        argv = [
            now_arg(plan.clock),
            mode,
            plan.algorithm,
            *plan.quota_args,
            str(_amount("cost", cost)),  # at most 2**64 - 1, as in-process
            str(self._shares[name]),
        ]
        script = PRIORITY.reader if mode == "peek" and PRIORITY.reader is not None else PRIORITY
        try:
            reply = evalsha(limiter._channel, script, keys, argv)
        except BACKEND_ERRORS as error:
            if not is_outage(error):
                raise store_error(error, f"Priority on Redis: {mode}") from error
            return limiter._fallback.decision(error, limiter.limit, key, cost, mode)
        try:
            d = to_decision(reply)
        except MALFORMED as error:
            raise malformed(f"Priority on Redis: {mode}", reply) from error
        if mode == "peek":
            return d
        with self._lock:
            self._counts[name].check(d, plan.shadow)
        return limiter._fallback.tally.decision(d, plan.shadow, f"{limiter!r} (class {name!r})", key)

    def hit(self, key: Any, cost: int = 1, cls: Optional[str] = None) -> Decision:
        """Decide (and charge, if admitted) a call of ``cost`` of class ``cls`` (the default
        class when None) for ``key``."""
        return self._check(key, cost, cls, "hit")

    def try_acquire(self, key: Any, cost: int = 1, cls: Optional[str] = None) -> bool:
        """``hit(key, cost, cls).allowed``."""
        return bool((self._check(key, cost, cls, "hit")).allowed)

    def peek(self, key: Any, cost: int = 1, cls: Optional[str] = None) -> Decision:
        """The Decision ``hit`` would give, charging nothing (a read-only script)."""
        return self._check(key, cost, cls, "peek")

    def get_limit(self, key: Any, cls: Optional[str] = None) -> Tuple[bool, int]:
        """``(allowed, remaining)`` for one unit of class ``cls`` now, charging nothing."""
        d = self._check(key, 0, cls, "peek")
        return d.remaining >= 1, int(d.remaining)

    def reset(self, key: Any) -> None:
        """Put ``key`` back to its fresh state (for every class: they share it)."""
        self._limiter.reset(key)

    def acquire(self, key: Any, cost: int = 1, timeout: Optional[float] = None, cls: Optional[str] = None) -> Decision:
        """Wait until ``cost`` of class ``cls`` is admitted (see the limiters' ``acquire``)."""
        return _wait.acquire(lambda k, c: self.hit(k, c, cls), self.clock, key, cost, timeout)

    acquire_async = _priority_in_threads

    def stats(self) -> Dict[str, Any]:
        """The limiter's stats, with ``"classes"``: each class's share and counters (this
        process's)."""
        with self._lock:
            classes = {c: {**self._counts[c].c, "share": s / _SCALE} for c, s in self._shares.items()}
        return {**self._limiter.stats(), "classes": classes}

    @property
    def classes(self) -> Dict[str, float]:
        """{class name: share}, in the order given."""
        return {c: s / _SCALE for c, s in self._shares.items()}

    @property
    def default(self) -> str:
        """The class of a call that names none."""
        return str(self._spec.default)

    @property
    def limiter(self) -> Any:
        """The Redis limiter the classes share (its quotas, shadow mode and keys are theirs)."""
        return self._limiter

    @property
    def clock(self) -> Optional[ManualClock]:
        clock: Optional[ManualClock] = self._limiter.clock
        return clock

    def __repr__(self) -> str:
        classes = ", ".join(f"{c!r}: {s / _SCALE!r}" for c, s in self._shares.items())
        return f"{type(self).__name__}({self._limiter!r}, {{{classes}}}, default={self.default!r})"
