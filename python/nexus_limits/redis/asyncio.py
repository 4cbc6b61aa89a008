"""The asyncio mirror of :mod:`nexus_limits.redis`: the same classes and names for
``redis.asyncio.Redis`` (or ``redis.asyncio.RedisCluster``, or Valkey's asyncio
client). Every method is a coroutine; nothing blocks the event loop::

    import redis.asyncio
    from nexus_limits.redis.asyncio import TokenBucket

    limiter = TokenBucket(redis.asyncio.Redis(), "100/minute", burst=20)
    decision = await limiter.hit("api-key")
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import nexus_limits as nl

from .. import _wait
from .._core import Decision, ManualClock
from ..base import AsyncRateLimiter, Key
from ..errors import RateLimitExceeded
from . import _LEASE_POLL, _unit_cost
from ._common import (
    BACKEND_ERRORS,
    Fallback,
    RateSpec,
    check_client,
    check_clock,
    check_name,
    check_on_error,
    check_prefix,
    concurrency_model,
    encode_key,
    flatten,
    inspect_dict,
    is_cluster,
    is_noscript,
    judge,
    key_of,
    new_lease_id,
    now_arg,
    scan_pattern,
    script_arguments,
    to_decision,
    to_decisions,
    top_of,
)
from ._scripts import COMPOSITE, CONCURRENCY, RELEASE, REQUOTA, Script

__all__ = [
    "Composite",
    "Concurrency",
    "FixedWindow",
    "LeakyBucket",
    "Lease",
    "SlidingWindow",
    "TokenBucket",
    "TokenLimiter",
]


async def evalsha(client: Any, script: Script, keys: Sequence[str], args: Sequence[str]) -> Any:
    """One EVALSHA round trip; on NOSCRIPT the script is loaded and run again."""
    try:
        return await client.evalsha(script.sha, len(keys), *keys, *args)
    except BACKEND_ERRORS as error:
        if not is_noscript(error):
            raise
        await client.script_load(script.source)
        return await client.evalsha(script.sha, len(keys), *keys, *args)


class _RedisRateLimiter(AsyncRateLimiter):
    __slots__ = ("_client", "_fallback", "_parts", "_script", "_spec")
    _algorithm = ""

    def __init__(
        self,
        client: Any,
        model: Any,
        prefix: str,
        name: Optional[str],
        on_error: str,
        clock: Optional[ManualClock],
        shadow: bool = False,
    ) -> None:
        self._client = check_client(client, want_async=True)
        self._spec = RateSpec(self._algorithm, model, prefix, name, on_error, clock)
        self._spec.set_shadow(shadow)
        self._script = self._spec.script
        self._fallback = self._spec.fallback
        self._parts: Tuple[Any, ...] = (self,)

    async def _check(self, key: Key, cost: Any, mode: str) -> Decision:
        if len(self._parts) == 1 and self._script is not COMPOSITE:
            keys, args = self._spec.keys(key), self._spec.argv(mode, cost)
        else:
            keys, args = script_arguments(self._parts, key, cost, mode, self._spec.clock)
        try:
            reply = await evalsha(self._client, self._script.for_mode(mode), keys, args)
        except BACKEND_ERRORS as error:
            return self._fallback.decision(error, self.limit)
        if mode == "peek":
            return to_decision(reply)
        return judge(self, reply, key)

    async def hit(self, key: Key, cost: int = 1) -> Decision:
        return await self._check(key, cost, "hit")

    async def try_acquire(self, key: Key, cost: int = 1) -> bool:
        return (await self._check(key, cost, "hit")).allowed

    async def peek(self, key: Key, cost: int = 1) -> Decision:
        return await self._check(key, cost, "peek")

    async def get_limit(self, key: Key) -> Tuple[bool, int]:
        d = await self._check(key, 0, "peek")
        return d.remaining >= 1, d.remaining

    async def reset(self, key: Key) -> None:
        keys = [p._spec.key(key) for p in self._parts]
        try:
            await self._client.delete(*keys)
        except BACKEND_ERRORS as error:
            if self._fallback.on_error == "raise":
                self._fallback.decision(error, self.limit)

    def stats(self) -> Dict[str, int]:
        """Counters of this limiter object (this process); see the synchronous class."""
        return self._fallback.tally.snapshot()

    async def top_keys(self, n: int = 10, keys: Any = None, scan: int = 10_000) -> List[Dict[str, Any]]:
        """The ``n`` keys using the largest share of their limit now (see the synchronous class)."""
        if len(self._parts) > 1:
            raise TypeError("call top_keys on a Composite's parts")
        found = []
        async for redis_key in self._client.scan_iter(match=scan_pattern(self), count=1000):
            found.append(key_of(redis_key))
            if len(found) >= scan:
                break
        reader = self._script.for_mode("peek")
        argv = self._spec.argv("peek", 0)
        if is_cluster(self._client):
            replies = [await evalsha(self._client, reader, self._spec.keys(k), argv) for k in found]
        else:
            await self._client.script_load(reader.source)
            pipe = self._client.pipeline(transaction=False)
            for k in found:
                pipe.evalsha(reader.sha, 2, *self._spec.keys(k), *argv)
            replies = await pipe.execute()
        return top_of([(k, to_decision(r)) for k, r in zip(found, replies)], n)

    @property
    def shadow(self) -> bool:
        """Shadow mode: decide, count and log, never deny (see the synchronous class)."""
        if len(self._parts) > 1:
            return any(p.shadow for p in self._parts)
        return self._spec.shadow

    @shadow.setter
    def shadow(self, on: bool) -> None:
        if len(self._parts) > 1 or self._script is COMPOSITE:
            raise TypeError("set shadow mode on a Composite's parts")
        self._spec.set_shadow(on)

    def _single(self, what: str) -> None:
        if self._script is COMPOSITE:
            raise TypeError(f"a Composite has no quota of its own: call {what} on its parts")

    async def set_quota(self, key: Key, rate: Any, burst: Optional[int] = None) -> None:
        """Give ``key`` its own quota for every process (see the synchronous class)."""
        self._single("set_quota")
        model = self._spec.new_model(rate, burst)
        try:
            await evalsha(self._client, REQUOTA, self._spec.keys(key), self._spec.requota_argv("set", model))
        except BACKEND_ERRORS as error:
            self._fallback.decision(error, self.limit)
            raise

    async def clear_quota(self, key: Key) -> bool:
        """Put ``key`` back on the limiter's quota; False if it had none of its own."""
        self._single("clear_quota")
        try:
            argv = self._spec.requota_argv("clear", self._spec.model)
            return bool(await evalsha(self._client, REQUOTA, self._spec.keys(key), argv))
        except BACKEND_ERRORS as error:
            self._fallback.decision(error, self.limit)
            raise

    async def inspect(self, key: Key) -> Dict[str, Any]:
        """``key``'s quota and usage now (a Composite: each part's, under ``"parts"``)."""
        if self._script is COMPOSITE:
            return {"key": key, "parts": [await p.inspect(key) for p in self._parts]}
        zero, one = await self.peek(key, 0), await self.peek(key, 1)
        return inspect_dict(self, key, zero, one, await self._client.get(self._spec.keys(key)[1]))

    async def acquire(self, key: Key, cost: int = 1, timeout: Optional[float] = None) -> Decision:
        """Wait until admitted (``asyncio.sleep`` of ``retry_after`` between tries); RateLimitExceeded
        at once when the wait would pass ``timeout``."""
        return await _wait.acquire_async(self.hit, self._spec.clock, key, cost, timeout)

    acquire_async = acquire

    @property
    def client(self) -> Any:
        return self._client

    @property
    def rate(self) -> nl.Rate:
        return self._spec.model.rate  # type: ignore[no-any-return]

    @property
    def limit(self) -> int:
        return self._spec.model.limit  # type: ignore[no-any-return]

    @property
    def prefix(self) -> str:
        return self._spec.prefix

    @property
    def on_error(self) -> str:
        return self._fallback.on_error

    @property
    def clock(self) -> Optional[ManualClock]:
        return self._spec.clock

    def redis_key(self, key: Key) -> str:
        return self._spec.key(key)

    def __repr__(self) -> str:
        client = type(self._client).__name__
        return f"{type(self).__name__}(<{client}>, '{self.rate}', limit={self.limit}, prefix={self.prefix!r})"


class TokenBucket(_RedisRateLimiter):
    __slots__ = ()
    _algorithm = "gcra"

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
    ) -> None:
        super().__init__(client, nl.TokenBucket(rate, burst=burst), prefix, name, on_error, clock, shadow)


class LeakyBucket(_RedisRateLimiter):
    __slots__ = ()
    _algorithm = "leaky"

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
    ) -> None:
        super().__init__(client, nl.LeakyBucket(rate, capacity=capacity), prefix, name, on_error, clock, shadow)


class FixedWindow(_RedisRateLimiter):
    __slots__ = ()
    _algorithm = "fixed"

    def __init__(
        self,
        client: Any,
        rate: Any,
        *,
        prefix: str = "nl",
        name: Optional[str] = None,
        on_error: str = "raise",
        clock: Optional[ManualClock] = None,
        shadow: bool = False,
    ) -> None:
        super().__init__(client, nl.FixedWindow(rate), prefix, name, on_error, clock, shadow)


class SlidingWindow(_RedisRateLimiter):
    __slots__ = ()
    _algorithm = "sliding"

    def __init__(
        self,
        client: Any,
        rate: Any,
        *,
        prefix: str = "nl",
        name: Optional[str] = None,
        on_error: str = "raise",
        clock: Optional[ManualClock] = None,
        shadow: bool = False,
    ) -> None:
        super().__init__(client, nl.SlidingWindow(rate), prefix, name, on_error, clock, shadow)


_RATE_KINDS = (TokenBucket, LeakyBucket, FixedWindow, SlidingWindow)


class Composite(_RedisRateLimiter):
    """Several Redis limiters on one key, all or nothing, in one atomic script."""

    __slots__ = ()

    def __init__(self, limiters: Any, *, on_error: str = "raise") -> None:
        parts = flatten(limiters, _RATE_KINDS, Composite)
        first = parts[0]
        self._client = first._client
        self._script = COMPOSITE
        self._parts = tuple(parts)
        self._spec = first._spec
        self._fallback = Fallback(check_on_error(on_error), "Composite on Redis")

    @property
    def limit(self) -> int:
        return min(int(p.limit) for p in self._parts)

    async def hit_each(self, key: Key, cost: int = 1) -> Tuple[Decision, List[Decision]]:
        """``hit``, also returning each part's own Decision (in the order of ``parts``)."""
        keys, args = script_arguments(self._parts, key, cost, "hit", self._spec.clock)
        try:
            reply = await evalsha(self._client, self._script, keys, args)
        except BACKEND_ERRORS as error:
            d = self._fallback.decision(error, self.limit)
            return d, [d for _ in self._parts]
        return judge(self, reply, key), to_decisions(reply)[1:]

    @property
    def parts(self) -> Tuple[Any, ...]:
        return self._parts

    def __repr__(self) -> str:
        return f"Composite([{', '.join(repr(p) for p in self._parts)}])"


class Lease:
    """A place held in an asyncio Redis :class:`Concurrency` limit; ``await lease.release()``."""

    __slots__ = ("_done", "_limiter", "fallback", "id", "key")

    def __init__(self, limiter: Concurrency, key: Key, lease_id: str, fallback: bool = False) -> None:
        self._limiter = limiter
        self.key = key
        self.id = lease_id
        self.fallback = fallback
        self._done = False

    async def release(self) -> bool:
        if self._done:
            return False
        self._done = True
        if self.fallback:
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
        return f"Lease(key={self.key!r}, released={self._done})"


class _AsyncLeaseContext:
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
    """:class:`nexus_limits.Concurrency` on Redis, for asyncio."""

    __slots__ = ("_client", "_fallback", "_model", "_suffix", "clock", "prefix")

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
    ) -> None:
        self._client = check_client(client, want_async=True)
        self._model = concurrency_model(limit, lease_ttl)
        self.prefix = check_prefix(prefix)
        self._suffix = ":" + (check_name(name) or f"cc-{self._model.limit}")
        self._fallback = Fallback(check_on_error(on_error), "Concurrency on Redis")
        self.clock = check_clock(clock)

    @property
    def limit(self) -> int:
        return self._model.limit  # type: ignore[no-any-return]

    @property
    def lease_ttl(self) -> float:
        return self._model.lease_ttl  # type: ignore[no-any-return]

    @property
    def on_error(self) -> str:
        return self._fallback.on_error

    def redis_key(self, key: Key) -> str:
        return f"{self.prefix}:{{{encode_key(key)}}}{self._suffix}"

    async def _run(self, key: Key, op: str, lease_id: str = "") -> Any:
        args = [now_arg(self.clock), op, str(self.limit), repr(self.lease_ttl * 1e6), lease_id]
        script = CONCURRENCY.for_mode("hit" if op == "acquire" else op)
        return await evalsha(self._client, script, [self.redis_key(key)], args)

    async def _release(self, key: Key, lease_id: str) -> bool:
        try:
            args = [now_arg(self.clock), lease_id]
            return bool(await evalsha(self._client, RELEASE, [self.redis_key(key)], args))
        except BACKEND_ERRORS as error:
            if self._fallback.on_error == "raise":
                self._fallback.decision(error, self.limit)
            return False

    async def hit(self, key: Key, cost: int = 1) -> Decision:
        _unit_cost(cost)
        lease_id = new_lease_id()
        try:
            reply = await self._run(key, "acquire", lease_id)
        except BACKEND_ERRORS as error:
            d = self._fallback.decision(error, self.limit)
            if not d.allowed:
                return d
            return Decision(True, d.limit, 0, 0.0, 0.0, lease=Lease(self, key, lease_id, fallback=True), fallback=True)
        lease = Lease(self, key, lease_id) if reply[0] else None
        return to_decision(reply, lease)

    async def try_acquire(self, key: Key, cost: int = 1) -> Optional[Lease]:
        lease: Optional[Lease] = (await self.hit(key, cost)).lease
        return lease

    async def peek(self, key: Key, cost: int = 1) -> Decision:
        _unit_cost(cost)
        try:
            return to_decision(await self._run(key, "peek"))
        except BACKEND_ERRORS as error:
            return self._fallback.decision(error, self.limit)

    async def get_limit(self, key: Key) -> Tuple[bool, int]:
        d = await self.peek(key)
        return d.allowed, (d.remaining + 1 if d.allowed else 0)

    async def reset(self, key: Key) -> None:
        try:
            await self._client.delete(self.redis_key(key))
        except BACKEND_ERRORS as error:
            if self._fallback.on_error == "raise":
                self._fallback.decision(error, self.limit)

    async def acquire(self, key: Key, cost: int = 1, timeout: Optional[float] = None) -> Lease:
        """Wait until a lease is free (polling 1 ms, doubling to 50 ms) and return it."""
        deadline = _wait.Deadline(self.clock, timeout)
        poll = 0.001
        while True:
            d = await self.hit(key, cost)
            if d.lease is not None:
                return d.lease  # type: ignore[no-any-return]
            wait = min(d.retry_after, deadline.left())
            if wait <= 0:
                raise RateLimitExceeded(key, d, deadline.timeout)
            await deadline.sleep_async(wait if self.clock is not None else min(wait, poll))
            poll = min(poll * 2, _LEASE_POLL)

    acquire_async = acquire

    def lease(self, key: Key, timeout: Optional[float] = None) -> Any:
        """``async with limiter.lease(key): ...``"""
        return _AsyncLeaseContext(self, key, timeout)

    lease_async = lease

    def __repr__(self) -> str:
        client = type(self._client).__name__
        return f"Concurrency(<{client}>, {self.limit}, lease_ttl={self.lease_ttl}, prefix={self.prefix!r})"


from ._budget import AsyncTokenLimiter as TokenLimiter  # noqa: E402
