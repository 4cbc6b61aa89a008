"""The Redis limiters' I/O, written once, for asyncio.

This file is the one source of both sides: ``_sync.py`` is generated from it by
``_generate.py`` (``async``/``await`` dropped, the asyncio names swapped for their
synchronous twins, and each line ending in a ``# unasync:`` comment replaced by the
code that comment gives). A test fails when ``_sync.py`` is stale. Everything that
does no I/O — checks, key layout, script arguments, replies, the on_error policy —
is in ``_common.py``; the scripts are in ``_scripts.py``. The token budgets are in
``_async_budget.py``, the other source, generated into ``_sync_budget.py`` alike.
"""

from __future__ import annotations

import asyncio  # unasync: import time
from types import TracebackType
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import nexus_limits as nl

from .. import _wait
from .._core import Decision, ManualClock, Quota
from ..base import AsyncRateLimiter, Key
from ..errors import RateLimitExceeded
from . import _lease
from ._channel import channel_for
from ._common import (
    BACKEND_ERRORS,
    LEASE_POLL,
    MALFORMED,
    Fallback,
    RatePlan,
    check_client,
    check_clock,
    check_name,
    check_on_error,
    check_prefix,
    check_replicas,
    check_shadow,
    check_unit_cost,
    concurrency_inspection,
    concurrency_model,
    encode_key,
    flatten,
    from_peeks,
    inspect_dict,
    is_cluster,
    is_noscript,
    is_outage,
    judge,
    key_of,
    leaky_quota,
    local_twin,
    malformed,
    new_lease_id,
    now_arg,
    scan_pattern,
    script_arguments,
    store_error,
    to_decision,
    to_decisions,
    top_rows,
)
from ._lease import Give, LeaseTable, check_lease
from ._scripts import COMPOSITE, CONCURRENCY, LEASE, RELEASE, REQUOTA, Script

# unasync: from . import _threads

ASYNC = True  # unasync: ASYNC = False


async def evalsha(
    channel: Any, script: Script, keys: Sequence[str], args: Sequence[str], packed: Optional[bytes] = None
) -> Any:
    """One EVALSHA round trip on the client's channel (one attempt, behind its circuit
    breaker); on NOSCRIPT the script is loaded and run again. ``packed``: the same
    command as bytes, when the caller has them (see _common.Packer)."""
    try:
        return await channel.evalsha(script.sha, keys, args, packed)
    except BACKEND_ERRORS as error:
        if not is_noscript(error):
            raise
        await channel.script_load(script.source, keys[0])
        return await channel.evalsha(script.sha, keys, args, packed)


async def wait_for_lease(hit: Any, clock: Optional[ManualClock], key: Key, cost: int, timeout: Optional[float]) -> Any:
    """Takes a lease with ``hit`` as soon as one is free. A release is not announced, so
    the wait polls: 1 ms, doubling to 50 ms, never past the first lease's expiry (on a
    manual clock, exactly until that expiry). RateLimitExceeded when ``timeout`` ends."""
    deadline = _wait.Deadline(clock, timeout)
    poll = 0.001
    while True:
        d = await hit(key, cost)
        if d.lease is not None:
            return d.lease
        wait = min(d.retry_after, deadline.left())
        if wait <= 0:
            raise RateLimitExceeded(key, d, deadline.timeout)
        await deadline.sleep_async(wait if clock is not None else min(wait, poll))
        poll = min(poll * 2, LEASE_POLL)


async def scan_keys(client: Any, pattern: str, most: int) -> List[Key]:
    """The user keys of up to ``most`` state keys matching ``pattern`` (SCAN)."""
    found = []
    async for redis_key in client.scan_iter(match=pattern, count=1000):
        found.append(key_of(redis_key))
        if len(found) >= most:
            break
    return found


async def peek_each(limiter: Any, script: Script, found: Sequence[Key], keys_of: Any, argv: List[str]) -> List[Any]:
    """The replies of ``script``'s read-only twin for each key of ``found`` (KEYS from
    ``keys_of``), pipelined but on a cluster (its client refuses EVALSHA in a pipeline)."""
    reader = script.for_mode("peek")
    client = limiter._client
    try:
        if is_cluster(client):
            return [await evalsha(limiter._channel, reader, keys_of(k), argv) for k in found]
        await client.script_load(reader.source)
        pipe = client.pipeline(transaction=False)
        for k in found:
            keys = keys_of(k)
            pipe.evalsha(reader.sha, len(keys), *keys, *argv)
        replies: List[Any] = await pipe.execute()
    except BACKEND_ERRORS as error:
        if is_outage(error):
            raise
        raise store_error(error, f"{limiter._fallback.what}: top_keys") from error
    return replies


class LeasePolicy(_lease.LeasePolicy):
    __doc__ = _lease.LeasePolicy.__doc__
    __slots__ = ()


class _RedisChecks(AsyncRateLimiter):
    """The checks every Redis rate limiter and Composite share."""

    __slots__ = (
        "__weakref__",
        "_channel",
        "_client",
        "_fallback",
        "_hold_us",
        "_leases",
        "_parts",
        "_plan",
        "_reaper",
        "_script",
    )
    _channel: Any
    _client: Any
    _fallback: Fallback
    _hold_us: str
    _leases: Optional[LeaseTable]
    _parts: Tuple[Any, ...]
    _plan: RatePlan  # a Composite's is its first part's (for its clock)
    _reaper: Any
    _script: Script

    def _arguments(self, key: Key, cost: Any, mode: str) -> Tuple[List[str], List[str], Optional[bytes]]:
        """KEYS, ARGV and, when prepacked, the whole command of a check."""
        raise NotImplementedError

    async def _check(self, key: Key, cost: Any, mode: str) -> Decision:
        if self._leases is not None and mode == "hit" and type(cost) is int and cost > 0:
            return await self._leased(key, cost)
        return await self._remote(key, cost, mode)

    async def _remote(self, key: Key, cost: Any, mode: str) -> Decision:
        """A check decided by Redis (one round trip)."""
        keys, args, packed = self._arguments(key, cost, mode)
        try:
            reply = await evalsha(self._channel, self._script.for_mode(mode), keys, args, packed)
        except BACKEND_ERRORS as error:
            return self._fallback.decision(error, self.limit, key, cost, mode)
        try:
            if mode == "peek":
                return to_decision(reply)
            return judge(self, reply, key)
        except MALFORMED as error:
            raise malformed(f"{self._fallback.what}: {mode}", reply) from error

    async def _leased(self, key: Key, cost: int) -> Decision:
        """A check with quota leasing on: answered from the key's block here when it can
        be, else one round trip (a plain check for a cold key, a new block for a busy
        one, carrying back what is left of the last)."""
        table: Any = self._leases
        got = table.local(key, cost)
        plan = self._plan
        if type(got) is Decision:
            return self._fallback.tally.decision(got, plan.shadow, self, key)
        if got.plain:
            d = await self._remote(key, cost, "hit")
            table.checked(key, got, d)
            return d
        argv = got.argv(now_arg(plan.clock), plan.quota_args, self._hold_us)
        try:
            reply = await evalsha(self._channel, LEASE[plan.algorithm], plan.keys(key), argv)
        except BACKEND_ERRORS as error:
            table.failed(key, got)
            return self._fallback.decision(error, self.limit, key, cost, "hit")
        try:
            d = table.answered(key, got, reply)
        except MALFORMED as error:
            table.failed(key, got)
            raise malformed(f"{self._fallback.what}: hit", reply) from error
        if table.claim_reaper():
            self._start_reaper()
        return self._fallback.tally.decision(d, plan.shadow, self, key)

    def _start_reaper(self) -> None:
        # The task is kept here: an event loop holds its tasks only weakly.
        self._reaper = asyncio.ensure_future(self._reap())  # unasync: self._reaper = _threads.start_reaper(self)

    async def _reap(self) -> None:
        """Gives back the blocks of keys gone idle (and of blocks whose spending time is
        over), until none is held."""
        table: Any = self._leases
        try:
            while True:
                gives, wait = table.due()
                await self._give_back(gives)
                if wait is None:
                    return
                pause = min(wait, table.policy.idle)
                await asyncio.sleep(pause)  # unasync: time.sleep(pause)
        except BaseException:
            table.reaping = False  # cancelled (its event loop closing): the next block starts another
            raise

    async def _give_back(self, gives: List[Give]) -> None:
        table: Any = self._leases
        plan = self._plan
        for give in gives:
            argv = [now_arg(plan.clock), *plan.quota_args, "0", "0", "0", str(give.units), str(give.until)]
            try:
                reply = await evalsha(self._channel, LEASE[plan.algorithm], plan.keys(give.key), argv)
                table.returned(int(reply[7]))
            except BACKEND_ERRORS + MALFORMED:
                continue  # the units count as spent until the block's end: never more admitted

    async def close(self) -> None:
        """Gives back the unspent units of every block this limiter leased (quota leasing,
        ``lease=``); nothing to do otherwise. The limiter can still be used (it leases
        again). The client is not closed: it is yours."""
        if self._leases is not None:
            await self._give_back(self._leases.drain())

    @property
    def lease_policy(self) -> Optional[_lease.LeasePolicy]:
        """The quota leasing policy (``lease=``), or None when each check is a round trip."""
        return self._leases.policy if self._leases is not None else None

    async def hit(self, key: Key, cost: int = 1) -> Decision:
        """Decide a call of ``cost`` units for ``key`` and charge it if admitted (one round trip)."""
        return await self._check(key, cost, "hit")

    async def try_acquire(self, key: Key, cost: int = 1) -> bool:
        """``hit(key, cost).allowed``."""
        return (await self._check(key, cost, "hit")).allowed

    async def peek(self, key: Key, cost: int = 1) -> Decision:
        """The Decision ``hit`` would give now, charging nothing (runs on a full server too)."""
        return await self._check(key, cost, "peek")

    async def get_limit(self, key: Key) -> Tuple[bool, int]:
        d = await self._check(key, 0, "peek")
        return d.remaining >= 1, d.remaining

    async def reset(self, key: Key) -> None:
        """Put ``key`` back to its fresh state (a quota of its own stays). With quota
        leasing, this process's block of ``key`` is dropped; units other processes hold
        may still be spent, as if before the reset, until their blocks end."""
        if self._leases is not None:
            self._leases.drop(key)
        keys = [p._plan.key(key) for p in self._parts]
        try:
            await self._channel.call("DEL", *keys)
        except BACKEND_ERRORS as error:
            if self._fallback.on_error == "raise":
                self._fallback.decision(error, self.limit)

    def stats(self) -> Dict[str, int]:
        """Counters of this limiter object (this process): allowed, denied, near_limit,
        shadow_denied, errors (store unreachable or full), fail_open, fail_closed and
        fail_local answers; its client's circuit breaker: breaker_open (1 while open) and
        breaker_trips (times it opened); with quota leasing, leases_taken (blocks of more
        than the asking check's units), units_leased (units in them beyond those),
        units_returned (given back unspent) and round_trips_saved (checks answered here)."""
        out = {**self._fallback.tally.snapshot(), **self._channel.stats()}
        if self._leases is not None:
            out.update(self._leases.snapshot())
        return out

    async def top_keys(self, n: int = 10, keys: Any = None, scan: int = 10_000) -> List[Dict[str, Any]]:
        """The ``n`` keys using the largest share of their limit now, from up to ``scan``
        of this limiter's keys found with SCAN (one peek each, pipelined but on a cluster)."""
        found = await scan_keys(self._client, scan_pattern(self), scan)
        replies = await peek_each(self, self._script, found, self._plan.keys, self._plan.argv(0))
        try:
            return top_rows([(k, int(r[1]) - int(r[2]), int(r[1])) for k, r in zip(found, replies)], n)
        except MALFORMED as error:
            raise malformed(f"{self._fallback.what}: top_keys", replies) from error

    async def acquire(self, key: Key, cost: int = 1, timeout: Optional[float] = None) -> Decision:
        """Wait until admitted (sleeping ``retry_after`` between tries); RateLimitExceeded at
        once when the wait would pass ``timeout``."""
        return await _wait.acquire_async(self.hit, self._plan.clock, key, cost, timeout)

    acquire_async = acquire  # unasync: acquire_async = _threads.acquire_async

    @property
    def client(self) -> Any:
        return self._client

    @property
    def limit(self) -> int:
        return self._plan.quota.limit

    @property
    def on_error(self) -> str:
        return self._fallback.on_error

    @property
    def clock(self) -> Optional[ManualClock]:
        return self._plan.clock


class _RedisRateLimiter(_RedisChecks):
    """The methods every Redis rate limiter shares."""

    __slots__ = ()

    def __init__(
        self,
        client: Any,
        quota: Quota,
        prefix: str,
        name: Optional[str],
        on_error: str,
        clock: Optional[ManualClock],
        shadow: bool = False,
        replicas: int = 1,
        lease: Any = False,
    ) -> None:
        self._client = check_client(client, want_async=ASYNC)
        self._channel = channel_for(self._client, want_async=ASYNC)
        self._plan = RatePlan(quota, prefix, name, on_error, clock)
        self._plan.set_shadow(shadow)
        self._plan.set_replicas(replicas)
        self._script = self._plan.script
        self._fallback = self._plan.fallback
        self._parts = (self,)
        policy = check_lease(lease, self._plan.algorithm, type(self).__name__)
        self._leases = LeaseTable(policy, self._plan.clock) if policy is not None else None
        self._hold_us = repr(policy.hold * 1e6) if policy is not None else ""
        self._reaper = None

    def _arguments(self, key: Key, cost: Any, mode: str) -> Tuple[List[str], List[str], Optional[bytes]]:
        """KEYS, ARGV and (for the commonest check, cost 1 on the server's clock) the
        whole command as bytes."""
        plan = self._plan
        if cost == 1 and type(cost) is int and plan.clock is None:
            keys, packed = plan.unit_call(mode, key)
            return keys, plan.unit, packed
        return plan.keys(key), plan.argv(cost), None

    @property
    def quota(self) -> Quota:
        """The limiter's quota (a key's own, set with ``set_quota``, is in Redis)."""
        return self._plan.quota

    @property
    def rate(self) -> nl.Rate:
        return self._plan.quota.rate

    @property
    def prefix(self) -> str:
        return self._plan.prefix

    def redis_key(self, key: Key) -> str:
        """The Redis key holding ``key``'s state."""
        return self._plan.key(key)

    @property
    def shadow(self) -> bool:
        """In shadow mode the limiter decides and counts, logs what it would deny (logger
        ``nexus_limits.shadow``), and never denies."""
        return self._plan.shadow

    @shadow.setter
    def shadow(self, on: bool) -> None:
        self._plan.set_shadow(on)

    async def set_quota(self, key: Key, rate: Any, burst: Optional[int] = None) -> None:
        """Give ``key`` its own quota, for every process, from its next check on; what it
        has used is carried over. Kept in Redis (``redis_key(key) + ":q"``) until
        ``clear_quota``."""
        quota = self._plan.new_quota(rate, burst)
        if self._leases is not None:
            self._leases.drop(key)
        try:
            await evalsha(self._channel, REQUOTA, self._plan.keys(key), self._plan.requota_argv("set", quota))
        except BACKEND_ERRORS as error:
            self._fallback.decision(error, self.limit)
            raise

    async def clear_quota(self, key: Key) -> bool:
        """Put ``key`` back on the limiter's quota, carrying its usage over. False if it
        had no quota of its own."""
        argv = self._plan.requota_argv("clear", self._plan.quota)
        if self._leases is not None:
            self._leases.drop(key)
        try:
            return bool(await evalsha(self._channel, REQUOTA, self._plan.keys(key), argv))
        except BACKEND_ERRORS as error:
            self._fallback.decision(error, self.limit)
            raise

    async def inspect(self, key: Key) -> Dict[str, Any]:
        """``key``'s quota and usage now, for support ("why was I limited?")."""
        zero, one = await self.peek(key, 0), await self.peek(key, 1)
        return inspect_dict(self, key, zero, one, await self._channel.call("GET", self._plan.keys(key)[1]))

    def __repr__(self) -> str:
        client = type(self._client).__name__
        return f"{type(self).__name__}(<{client}>, '{self.rate}', limit={self.limit}, prefix={self.prefix!r})"


class TokenBucket(_RedisRateLimiter):
    """:class:`nexus_limits.TokenBucket` on Redis: ``burst`` tokens refilled continuously.
    ``lease=True`` (or a :class:`LeasePolicy`) turns quota leasing on."""

    __slots__ = ()

    def __init__(
        self,
        client: Any,
        rate: Any,
        burst: Optional[int] = None,
        *,
        prefix: str = "nl",
        name: Optional[str] = None,
        on_error: str = "raise",
        clock: Optional[ManualClock] = None,
        shadow: bool = False,
        replicas: int = 1,
        lease: Any = False,
    ) -> None:
        quota = Quota("token_bucket", rate, burst)
        super().__init__(client, quota, prefix, name, on_error, clock, shadow, replicas, lease)


class LeakyBucket(_RedisRateLimiter):
    """:class:`nexus_limits.LeakyBucket` on Redis: a queue of ``capacity`` units draining at the rate.
    It shapes traffic (each call waits its ``delay``), which quota leasing cannot do:
    ``lease=`` is refused."""

    __slots__ = ()

    def __init__(
        self,
        client: Any,
        rate: Any,
        capacity: Optional[int] = None,
        *,
        prefix: str = "nl",
        name: Optional[str] = None,
        on_error: str = "raise",
        clock: Optional[ManualClock] = None,
        shadow: bool = False,
        replicas: int = 1,
        lease: Any = False,
    ) -> None:
        quota = leaky_quota(rate, capacity)
        super().__init__(client, quota, prefix, name, on_error, clock, shadow, replicas, lease)


class _Windows(_RedisRateLimiter):
    """What the window limiters add: windows start ``align`` after Unix-time boundaries."""

    __slots__ = ()

    @property
    def align(self) -> float:
        """Where windows start: seconds after the Unix epoch's period boundaries (0.0: UTC)."""
        return self._plan.quota.align or 0.0

    def __repr__(self) -> str:
        shown = super().__repr__()
        return shown[:-1] + f", align={self.align!r})" if self.align else shown


class FixedWindow(_Windows):
    """:class:`nexus_limits.FixedWindow` on Redis: windows start on Unix-time boundaries
    of the server's clock (UTC midnight for a day), moved by ``align`` (seconds, a
    ``timedelta`` or a fixed-offset ``timezone``, as in-process).
    ``lease=True`` (or a :class:`LeasePolicy`) turns quota leasing on."""

    __slots__ = ()

    def __init__(
        self,
        client: Any,
        rate: Any,
        *,
        align: Any = None,
        prefix: str = "nl",
        name: Optional[str] = None,
        on_error: str = "raise",
        clock: Optional[ManualClock] = None,
        shadow: bool = False,
        replicas: int = 1,
        lease: Any = False,
    ) -> None:
        quota = Quota("fixed_window", rate, align=align)
        super().__init__(client, quota, prefix, name, on_error, clock, shadow, replicas, lease)


class SlidingWindow(_Windows):
    """:class:`nexus_limits.SlidingWindow` on Redis: windows start on Unix-time boundaries
    of the server's clock (UTC midnight for a day), moved by ``align`` (as in-process).
    ``lease=True`` (or a :class:`LeasePolicy`) turns quota leasing on."""

    __slots__ = ()

    def __init__(
        self,
        client: Any,
        rate: Any,
        *,
        align: Any = None,
        prefix: str = "nl",
        name: Optional[str] = None,
        on_error: str = "raise",
        clock: Optional[ManualClock] = None,
        shadow: bool = False,
        replicas: int = 1,
        lease: Any = False,
    ) -> None:
        quota = Quota("sliding_window", rate, align=align)
        super().__init__(client, quota, prefix, name, on_error, clock, shadow, replicas, lease)


_RATE_KINDS = (TokenBucket, LeakyBucket, FixedWindow, SlidingWindow)


class Composite(_RedisChecks):
    """Several Redis limiters on one key, all or nothing, in one atomic script.

    Like :class:`nexus_limits.Composite`: it counts its own checks (``stats()``, each
    part's under ``"parts"``), has its own ``shadow`` mode (a denial is admitted, with
    ``shadow=True``, and charges no part), and ``inspect`` and ``top_keys`` across the
    parts. A part in shadow mode never denies the whole; the other parts enforce and
    are charged. Quotas belong to the parts."""

    __slots__ = ("_shadow",)

    def __init__(self, limiters: Any, *, on_error: str = "raise", replicas: int = 1, shadow: bool = False) -> None:
        parts = flatten(limiters, _RATE_KINDS, Composite)
        first = parts[0]
        self._client = first._client
        self._channel = first._channel
        self._script = COMPOSITE
        self._parts = tuple(parts)
        self._plan = first._plan
        self._leases = None  # each check decides every part in Redis: no blocks
        self._hold_us = ""
        self._reaper = None
        self._shadow = check_shadow(shadow)
        self._fallback = Fallback(check_on_error(on_error, local=True), "Composite on Redis")
        if self._fallback.on_error == "local":
            n = check_replicas(replicas)
            self._fallback.local = nl.Composite([local_twin(p._plan.quota, n, p._plan.clock) for p in parts])

    def _arguments(self, key: Key, cost: Any, mode: str) -> Tuple[List[str], List[str], Optional[bytes]]:
        keys, args = script_arguments(self._parts, key, cost, mode, self._plan.clock)
        return keys, args, None

    @property
    def limit(self) -> int:
        return min(int(p.limit) for p in self._parts)

    async def set_quota(self, key: Key, rate: Any, burst: Optional[int] = None) -> None:
        raise TypeError("a Composite has no quota of its own: call set_quota on its parts (composite.parts[i])")

    async def clear_quota(self, key: Key) -> bool:
        raise TypeError("a Composite has no quota of its own: call clear_quota on its parts (composite.parts[i])")

    def stats(self) -> Dict[str, Any]:
        """The Composite's own counters (as a part's), its client's circuit breaker, and
        each part's ``stats()`` under ``"parts"`` (a part counts its own decisions in
        the Composite's checks too)."""
        return {**super().stats(), "parts": [p.stats() for p in self._parts]}

    async def inspect(self, key: Key) -> Dict[str, Any]:
        """``key`` across the parts now: the combined answer for a call of one unit (the
        fields of a part's ``inspect``, ``algorithm`` "composite", ``rate`` None), and each
        part's ``inspect(key)`` under ``"parts"``."""
        zero, one = await self.peek(key, 0), await self.peek(key, 1)
        parts = [await p.inspect(key) for p in self._parts]
        whole: Dict[str, Any] = {
            "key": key,
            "algorithm": "composite",
            "rate": None,
            "limit": zero.limit,
            "own_quota": False,
        }
        whole.update(from_peeks(zero, one))
        whole["tracked"] = any(p["tracked"] for p in parts)
        whole["shadow"] = self._shadow
        whole["parts"] = parts
        return whole

    async def top_keys(self, n: int = 10, keys: Any = None, scan: int = 10_000) -> List[Dict[str, Any]]:
        """The ``n`` keys using the largest share of their limit in any part (each with the
        part where that share is largest), from up to ``scan`` keys of each part."""
        best: Dict[Any, Tuple[int, int]] = {}
        for p in self._parts:
            for row in await p.top_keys(n, keys, scan):
                used, limit = row["used"], max(row["limit"], 1)
                old = best.get(row["key"])
                if old is None or used * old[1] > old[0] * limit:
                    best[row["key"]] = (used, limit)
        return top_rows([(k, used, limit) for k, (used, limit) in best.items()], n)

    @property
    def shadow(self) -> bool:
        """In shadow mode the Composite decides and counts, logs what it would deny (logger
        ``nexus_limits.shadow``), and never denies; its parts keep their own flags."""
        return self._shadow

    @shadow.setter
    def shadow(self, on: bool) -> None:
        self._shadow = check_shadow(on)

    async def hit_each(self, key: Key, cost: int = 1) -> Tuple[Decision, List[Decision]]:
        """``hit``, also returning each part's own Decision (in the order of ``parts``)."""
        keys, args, _ = self._arguments(key, cost, "hit")
        try:
            reply = await evalsha(self._channel, self._script, keys, args)
        except BACKEND_ERRORS as error:
            d = self._fallback.decision(error, self.limit, key, cost, "hit")
            return d, [d for _ in self._parts]
        try:
            return judge(self, reply, key), to_decisions(reply)[1:]
        except MALFORMED as error:
            raise malformed("Composite on Redis: hit", reply) from error

    @property
    def parts(self) -> Tuple[Any, ...]:
        return self._parts

    def __repr__(self) -> str:
        shadow = ", shadow=True" if self._shadow else ""
        return f"Composite([{', '.join(repr(p) for p in self._parts)}]{shadow})"


class Lease:
    """A place held in a Redis :class:`Concurrency` limit; release it, or hold it for a
    block (``with`` on the synchronous side, ``async with`` on the asyncio side).

    Releasing is a round trip, so it is never done on garbage collection: a Lease
    dropped unreleased holds its place until ``lease_ttl`` ends it. A Lease given in
    shadow mode past the limit (``shadow`` True) holds no place."""

    __slots__ = ("_done", "_limiter", "_local", "fallback", "id", "key", "shadow")

    def __init__(
        self,
        limiter: Concurrency,
        key: Key,
        lease_id: str,
        fallback: bool = False,
        local: Any = None,
        shadow: bool = False,
    ) -> None:
        self._limiter = limiter
        self.key = key
        self.id = lease_id
        self.fallback = fallback
        self.shadow = shadow
        self._local = local  # the in-process lease of an on_error="local" answer
        self._done = False

    async def release(self) -> bool:
        """End the lease. True if this call ended it (False: already released, expired,
        reset, a fail-open lease that was never stored, or a shadow lease)."""
        if self._done:
            return False
        self._done = True
        if self._local is not None:
            return bool(self._local.release())
        if self.fallback or self.shadow:
            return False
        return await self._limiter._release(self.key, self.id)

    @property
    def released(self) -> bool:
        return self._done

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        await self.release()

    def __repr__(self) -> str:
        shadow = ", shadow=True" if self.shadow else ""
        return f"Lease(key={self.key!r}, released={self._done}{shadow})"


class _LeaseContext:
    """``async with limiter.lease(key):`` takes a lease on enter and releases it on exit."""

    __slots__ = ("_key", "_lease", "_limiter", "_timeout")

    def __init__(self, limiter: Concurrency, key: Key, timeout: Optional[float]) -> None:
        self._limiter = limiter
        self._key = key
        self._timeout = _wait.check_timeout(timeout)
        self._lease: Optional[Lease] = None

    async def __aenter__(self) -> Lease:
        self._lease = await self._limiter.acquire(self._key, timeout=self._timeout)
        return self._lease

    async def __aexit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        if self._lease is not None:
            await self._lease.release()


class Concurrency(AsyncRateLimiter):
    """:class:`nexus_limits.Concurrency` on Redis: at most ``limit`` leases per key across
    every process; each lease expires after ``lease_ttl`` seconds if never released.

    A lease is a round trip to take and one to release, and is **not** released when
    its object is garbage-collected (that would be I/O in a finalizer): keep it and
    release it (``with``/``async with``), or ``lease_ttl`` ends it. ``set_quota(key,
    limit)`` gives a key its own limit, for every process (kept in Redis until
    ``clear_quota``); ``shadow``, ``inspect`` and ``top_keys`` work as in-process."""

    __slots__ = ("_channel", "_client", "_fallback", "_model", "_shadow", "_suffix", "clock", "prefix")

    def __init__(
        self,
        client: Any,
        limit: int,
        lease_ttl: float = 300.0,
        *,
        prefix: str = "nl",
        name: Optional[str] = None,
        on_error: str = "raise",
        clock: Optional[ManualClock] = None,
        shadow: bool = False,
        replicas: int = 1,
    ) -> None:
        self._client = check_client(client, want_async=ASYNC)
        self._channel = channel_for(self._client, want_async=ASYNC)
        self._model = concurrency_model(limit, lease_ttl)
        self.prefix = check_prefix(prefix)
        self._suffix = ":" + (check_name(name) or f"cc-{self._model.limit}")
        self._fallback = Fallback(check_on_error(on_error, local=True), "Concurrency on Redis")
        self.clock = check_clock(clock)
        self._shadow = check_shadow(shadow)
        n = check_replicas(replicas)
        if self._fallback.on_error == "local":
            share = max(self._model.limit // n, 1)
            self._fallback.local = nl.Concurrency(share, lease_ttl=self._model.lease_ttl, clock=self.clock)

    @property
    def limit(self) -> int:
        return self._model.limit  # type: ignore[no-any-return]

    @property
    def lease_ttl(self) -> float:
        return self._model.lease_ttl  # type: ignore[no-any-return]

    @property
    def on_error(self) -> str:
        return self._fallback.on_error

    @property
    def shadow(self) -> bool:
        """In shadow mode a call past the limit gets a Lease that holds no place
        (``lease.shadow``), is counted (``shadow_denied``) and logged (logger
        ``nexus_limits.shadow``)."""
        return self._shadow

    @shadow.setter
    def shadow(self, on: bool) -> None:
        self._shadow = check_shadow(on)

    def redis_key(self, key: Key) -> str:
        """The Redis key of ``key``'s leases (a sorted set); its own limit, if set, is at
        ``redis_key(key) + ":q"``."""
        return f"{self.prefix}:{{{encode_key(key)}}}{self._suffix}"

    def _keys(self, key: Key) -> List[str]:
        k = self.redis_key(key)
        return [k, k + ":q"]

    def stats(self) -> Dict[str, int]:
        """Counters of this limiter object (this process): leases given (allowed) and
        refused (denied), near_limit, shadow_denied, store errors, on_error answers, and
        its client's circuit breaker (breaker_open, breaker_trips)."""
        return {**self._fallback.tally.snapshot(), **self._channel.stats()}

    def _argv(self, op: str, lease_id: str = "") -> List[str]:
        return [now_arg(self.clock), op, str(self.limit), repr(self.lease_ttl * 1e6), lease_id]

    async def _run(self, key: Key, op: str, lease_id: str = "") -> Any:
        script = CONCURRENCY.for_mode("hit" if op == "acquire" else op)
        return await evalsha(self._channel, script, self._keys(key), self._argv(op, lease_id))

    async def _release(self, key: Key, lease_id: str) -> bool:
        try:
            args = [now_arg(self.clock), lease_id]
            return bool(await evalsha(self._channel, RELEASE, [self.redis_key(key)], args))
        except BACKEND_ERRORS as error:
            # (a key this library did not write raises, whatever on_error says)
            if self._fallback.on_error == "raise" or not is_outage(error):
                self._fallback.decision(error, self.limit)
            return False

    async def hit(self, key: Key, cost: int = 1) -> Decision:
        """Take a lease if one is free; the Decision carries it in ``.lease``."""
        check_unit_cost(cost)
        lease_id = new_lease_id()
        try:
            reply = await self._run(key, "acquire", lease_id)
        except BACKEND_ERRORS as error:
            d = self._fallback.decision(error, self.limit, key, cost, "hit")
            if not d.allowed:
                return d
            held = Lease(self, key, lease_id, fallback=True, local=d.lease)
            return Decision(True, d.limit, d.remaining, d.reset_after, 0.0, lease=held, fallback=True)
        try:
            mine = to_decision(reply)
        except MALFORMED as error:
            raise malformed("Concurrency on Redis: hit", reply) from error
        d = self._fallback.tally.decision(mine, self._shadow, self, key)
        if d.shadow:
            lease = Lease(self, key, "", shadow=True)
        elif d.allowed:
            lease = Lease(self, key, lease_id)
        else:
            return d
        return Decision(True, d.limit, d.remaining, d.reset_after, 0.0, d.delay, lease, shadow=d.shadow)

    async def try_acquire(self, key: Key, cost: int = 1) -> Optional[Lease]:
        lease: Optional[Lease] = (await self.hit(key, cost)).lease
        return lease

    async def peek(self, key: Key, cost: int = 1) -> Decision:
        check_unit_cost(cost)
        try:
            reply = await self._run(key, "peek")
        except BACKEND_ERRORS as error:
            return self._fallback.decision(error, self.limit, key, cost, "peek")
        try:
            return to_decision(reply)
        except MALFORMED as error:
            raise malformed("Concurrency on Redis: peek", reply) from error

    async def get_limit(self, key: Key) -> Tuple[bool, int]:
        d = await self.peek(key)
        return d.allowed, (d.remaining + 1 if d.allowed else 0)

    async def reset(self, key: Key) -> None:
        """End every lease of ``key`` (a limit of its own stays)."""
        try:
            await self._channel.call("DEL", self.redis_key(key))
        except BACKEND_ERRORS as error:
            if self._fallback.on_error == "raise":
                self._fallback.decision(error, self.limit)

    async def set_quota(self, key: Key, limit: int) -> None:
        """Give ``key`` a lease limit of its own, for every process, from its next lease
        on (leases held stay held). Kept in Redis (``redis_key(key) + ":q"``) until
        ``clear_quota``."""
        limit = concurrency_model(limit, self.lease_ttl).limit
        try:
            await self._channel.call("SET", self._keys(key)[1], str(limit))
        except BACKEND_ERRORS as error:
            self._fallback.decision(error, self.limit)
            raise

    async def clear_quota(self, key: Key) -> bool:
        """Put ``key`` back on the limiter's limit. False if it had none of its own."""
        try:
            return bool(await self._channel.call("DEL", self._keys(key)[1]))
        except BACKEND_ERRORS as error:
            self._fallback.decision(error, self.limit)
            raise

    async def inspect(self, key: Key) -> Dict[str, Any]:
        """``key``'s limit and leases now, for support: the rate limiters' fields, with
        ``used`` the leases held and ``rate`` None."""
        try:
            reply = await evalsha(self._channel, CONCURRENCY.for_mode("peek"), self._keys(key), self._argv("peek"))
        except BACKEND_ERRORS as error:
            if is_outage(error):
                raise
            raise store_error(error, "Concurrency on Redis: inspect") from error
        try:
            return concurrency_inspection(key, reply, self._shadow)
        except MALFORMED as error:
            raise malformed("Concurrency on Redis: inspect", reply) from error

    async def top_keys(self, n: int = 10, keys: Any = None, scan: int = 10_000) -> List[Dict[str, Any]]:
        """The ``n`` keys holding the largest share of their limit now, from up to ``scan``
        of this limiter's keys found with SCAN (one peek each, pipelined but on a cluster)."""
        found = await scan_keys(self._client, f"{self.prefix}:{{*}}{self._suffix}", scan)
        replies = await peek_each(self, CONCURRENCY, found, self._keys, self._argv("peek"))
        try:
            return top_rows([(k, int(r[6]), int(r[1])) for k, r in zip(found, replies)], n)
        except MALFORMED as error:
            raise malformed("Concurrency on Redis: top_keys", replies) from error

    async def acquire(self, key: Key, cost: int = 1, timeout: Optional[float] = None) -> Lease:
        """Wait until a lease is free (polling 1 ms, doubling to 50 ms) and return it."""
        lease: Lease = await wait_for_lease(self.hit, self.clock, key, cost, timeout)
        return lease

    acquire_async = acquire  # unasync: acquire_async = _threads.acquire_lease_async

    def lease(self, key: Key, timeout: Optional[float] = None) -> Any:
        """A lease for a block: ``with limiter.lease(key): ...`` (``async with`` on the asyncio side)."""
        return _LeaseContext(self, key, timeout)  # unasync: return self.acquire(key, timeout=timeout)

    lease_async = lease  # unasync: lease_async = _threads.lease_async

    def __repr__(self) -> str:
        client = type(self._client).__name__
        shadow = ", shadow=True" if self._shadow else ""
        return f"Concurrency(<{client}>, {self.limit}, lease_ttl={self.lease_ttl}, prefix={self.prefix!r}{shadow})"
