"""The outbound ledger on Redis (or Valkey): every host shares the buckets.

One Lua script does every operation on one model's buckets atomically, on the
server's clock (``TIME``), so client clock skew never matters. A bucket is GCRA
state, as in the library's other Redis limiters: its theoretical arrival time ``tat``
in microseconds, the usage being ``(tat - now) / t`` units where ``t`` is the time one
unit takes to refill. Keys of one model share a hash tag (Redis Cluster) and expire
when their bucket is full again.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Dict, List, Mapping, Sequence
from urllib.parse import quote

from ._ledger import MAX_PAUSE, Costs, Floors, Rates, _Ledger

__all__ = ["RedisLedger"]

SCRIPT = r"""
-- KEYS: one state key per bucket, then the model's pause key.
-- ARGV[1] op: take | adjust | sync | pause | paused | used
-- ARGV[2] n buckets, then per bucket: t (us per unit), capacity (units), value and
-- value2 (take: cost; adjust: delta; sync: below which usage is raised, and to
-- what, in units); take: ARGV[3] the lead in us (charges start draining that late);
-- pause: ARGV[3] seconds in us.
local t = redis.call("TIME")
local now = t[1] * 1000000 + t[2]
local op = ARGV[1]
local n = tonumber(ARGV[2])
local EPS = 1e-9
local function fmt(x) return string.format("%.17g", x) end
local function tat_of(key)
    local v = redis.call("GET", key)
    if v then return tonumber(v) or 0 end
    return 0
end
local function put(key, tat)
    if tat > now then
        redis.call("SET", key, fmt(tat), "PX", math.max(math.ceil((tat - now) / 1000), 1))
    else
        redis.call("DEL", key)
    end
end
local pause_key = KEYS[n + 1]
if op == "paused" then
    local until_ = tonumber(redis.call("GET", pause_key) or "0") or 0
    return fmt(math.max(0, until_ - now))
end
if op == "pause" then
    local until_ = now + tonumber(ARGV[3])
    local old = tonumber(redis.call("GET", pause_key) or "0") or 0
    if until_ > old then
        redis.call("SET", pause_key, fmt(until_), "PX", math.max(math.ceil((until_ - now) / 1000), 1))
    end
    return "0"
end
local out = {}
local raised = 0
local wait = 0
local writes = {}
for i = 1, n do
    local at = 4 + (i - 1) * 4
    local per = tonumber(ARGV[at])
    local cap = tonumber(ARGV[at + 1])
    local value = tonumber(ARGV[at + 2])
    local tat = tat_of(KEYS[i])
    if op == "used" then
        out[i] = fmt(math.max(0, tat - now) / per)
    elseif op == "take" then
        if value > cap then return "-1" end
        local after = math.max(tat, now + tonumber(ARGV[3])) + value * per
        local over = math.max(tat, now) + value * per - now - cap * per
        if over > cap * per * EPS then
            wait = math.max(wait, over)
        end
        writes[i] = after
    elseif op == "adjust" then
        if value >= 0 then
            put(KEYS[i], math.max(tat, now) + value * per)
        elseif tat > now then
            put(KEYS[i], math.max(tat + value * per, now))
        end
    elseif op == "sync" then
        if tat < now + value * per then
            put(KEYS[i], now + tonumber(ARGV[at + 3]) * per)
            raised = raised + 1
        end
    end
end
if op == "used" then return out end
if op == "take" then
    if wait > 0 then return fmt(wait) end
    for i = 1, n do put(KEYS[i], writes[i]) end
    return "0"
end
if op == "sync" then return tostring(raised) end
return "0"
"""


def _is_async(client: Any) -> bool:
    return inspect.iscoroutinefunction(getattr(client, "execute_command", None))


class RedisLedger(_Ledger):
    """Buckets on Redis, for every host. ``client`` is a ``redis.Redis`` (for the sync
    transport) or ``redis.asyncio.Redis`` (for the async one), or a cluster client.
    Keys: ``{prefix}:{namespace}:{<model>}:<limit>``."""

    where = "redis"
    remote = True

    def __init__(self, client: Any, namespace: str = "outbound", prefix: str = "nl") -> None:
        self.client = client
        self.is_async = _is_async(client)
        self.namespace = namespace
        self.prefix = prefix
        self._script = client.register_script(SCRIPT)

    def _keys(self, model: str, dims: Sequence[str]) -> List[str]:
        tag = quote(model, safe="")[:300]
        base = f"{self.prefix}:{self.namespace}:{{{tag}}}"
        return [f"{base}:{dim}" for dim in dims] + [f"{base}:pause"]

    def _args(self, model: str, op: str, rates: Rates, values: Mapping[str, Any], lead: float = 0.0) -> Any:
        dims = [dim for dim in values if dim in rates] if op != "used" else list(rates)
        args: List[Any] = [op, len(dims), repr(max(0.0, lead) * 1e6)]
        for dim in dims:
            rate = rates[dim]
            value = values.get(dim, 0)
            first, second = value if isinstance(value, tuple) else (value, 0)
            args += [repr(rate.period * 1e6 / rate.count), rate.count, repr(float(first)), repr(float(second))]
        return self._keys(model, dims), args, dims

    def _run(self, keys: List[str], args: List[Any]) -> Any:
        if self.is_async:
            raise TypeError("this ledger has a redis.asyncio client: use it with AsyncLimitedTransport")
        return self._script(keys=keys, args=args)

    async def _run_async(self, keys: List[str], args: List[Any]) -> Any:
        if not self.is_async:
            raise TypeError("this ledger has a synchronous redis client: use it with LimitedTransport")
        return await self._script(keys=keys, args=args)

    @staticmethod
    def _wait(reply: Any) -> float:
        value = float(reply)
        return math.inf if value < 0 else value / 1e6

    def take(self, model: str, rates: Rates, costs: Costs, lead: float = 0.0) -> float:
        keys, args, _ = self._args(model, "take", rates, {d: math.ceil(c) for d, c in costs.items()}, lead)
        return self._wait(self._run(keys, args))

    async def take_async(self, model: str, rates: Rates, costs: Costs, lead: float = 0.0) -> float:
        keys, args, _ = self._args(model, "take", rates, {d: math.ceil(c) for d, c in costs.items()}, lead)
        return self._wait(await self._run_async(keys, args))

    def adjust(self, model: str, rates: Rates, deltas: Costs) -> None:
        keys, args, dims = self._args(model, "adjust", rates, deltas)
        if dims:
            self._run(keys, args)

    async def adjust_async(self, model: str, rates: Rates, deltas: Costs) -> None:
        keys, args, dims = self._args(model, "adjust", rates, deltas)
        if dims:
            await self._run_async(keys, args)

    def sync(self, model: str, rates: Rates, floors: Floors) -> int:
        keys, args, dims = self._args(model, "sync", rates, floors)
        return int(self._run(keys, args)) if dims else 0

    async def sync_async(self, model: str, rates: Rates, floors: Floors) -> int:
        keys, args, dims = self._args(model, "sync", rates, floors)
        return int(await self._run_async(keys, args)) if dims else 0

    @staticmethod
    def _used(dims: Sequence[str], reply: Any) -> Dict[str, float]:
        return {dim: float(value) for dim, value in zip(dims, reply)}

    def used(self, model: str, rates: Rates) -> Dict[str, float]:
        keys, args, dims = self._args(model, "used", rates, {})
        return self._used(dims, self._run(keys, args))

    async def used_async(self, model: str, rates: Rates) -> Dict[str, float]:
        keys, args, dims = self._args(model, "used", rates, {})
        return self._used(dims, await self._run_async(keys, args))

    def _pause_args(self, model: str, seconds: float) -> Any:
        return self._keys(model, []), ["pause", 0, repr(min(seconds, MAX_PAUSE) * 1e6)]

    def pause(self, model: str, seconds: float) -> None:
        self._run(*self._pause_args(model, seconds))

    async def pause_async(self, model: str, seconds: float) -> None:
        await self._run_async(*self._pause_args(model, seconds))

    def paused(self, model: str) -> float:
        return float(self._run(self._keys(model, []), ["paused", 0])) / 1e6

    async def paused_async(self, model: str) -> float:
        return float(await self._run_async(self._keys(model, []), ["paused", 0])) / 1e6
