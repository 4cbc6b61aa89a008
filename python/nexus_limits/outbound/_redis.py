"""The outbound ledger on Redis (or Valkey): every host shares the buckets.

One Lua script does every operation on one model's buckets atomically, on the
server's clock (``TIME``), so client clock skew never matters. A bucket is GCRA
state, as in the library's other Redis limiters: its theoretical arrival time ``tat``
in microseconds, the usage being ``(tat - now) / t`` units where ``t`` is the time one
unit takes to refill. Keys of one model share a hash tag, so that on a Redis Cluster they live in one slot
(the script touches only them), and expire when their bucket is full again.

While Redis is away the ledger answers its ``on_error`` policy, behind the client's
circuit breaker (shared with the library's other Redis limiters on the same client):
the first operation that meets the outage costs at most the client's socket timeouts
(one attempt, none of the client's retries), and while the breaker is open every
operation answers at once, without I/O, until a probe finds the server again.
"""

from __future__ import annotations

import inspect
import math
import threading
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import quote

import nexus_limits as nl

from ..errors import BackendUnavailable
from ..redis._breaker import is_failure
from ..redis._channel import channel_for
from ..redis._common import BACKEND_ERRORS, FALLBACK_RETRY, check_on_error, check_replicas, is_noscript, is_outage
from ..redis._scripts import Script
from ._errors import StoreUnavailable
from ._ledger import MAX_PAUSE, Costs, Floors, LocalLedger, Rates, _Ledger

__all__ = ["RedisLedger"]

_SOURCE = r"""
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


SCRIPT = Script(_SOURCE)


def _is_async(client: Any) -> bool:
    return inspect.iscoroutinefunction(getattr(client, "execute_command", None))


class _Shares(_Ledger):
    """An in-process ledger holding this process's share of every limit (the limit
    divided by ``replicas``): what answers while Redis is away with on_error="local", so
    that all the replicas together stay near the provider's limit.

    A call larger than a share waits until the share is full and goes, leaving the
    share in debt for the rest (refused at once, it could never be sent during the
    outage). The provider's counts (``sync``) cover every replica: a share takes its
    part of them."""

    where = "in-process (Redis away)"

    def __init__(self, replicas: int) -> None:
        self.replicas = replicas
        self.local = LocalLedger()
        self._shares: Dict[nl.Rate, nl.Rate] = {}

    def _share(self, rate: nl.Rate) -> nl.Rate:
        share = self._shares.get(rate)
        if share is None:
            share = nl.Rate(max(1, rate.count // self.replicas), rate.period)
            if len(self._shares) < 4096:
                self._shares[rate] = share
        return share

    def _rates(self, rates: Rates) -> Dict[str, nl.Rate]:
        return {dim: self._share(rate) for dim, rate in rates.items()}

    def take(self, model: str, rates: Rates, costs: Costs, lead: float = 0.0) -> float:
        if any(math.ceil(cost) > rates[dim].count for dim, cost in costs.items() if dim in rates):
            return math.inf  # above the whole limit: Redis would refuse it too
        shares = self._rates(rates)
        fits = {dim: min(cost, shares[dim].count) if dim in shares else cost for dim, cost in costs.items()}
        wait = self.local.take(model, shares, fits, lead)
        if wait == 0:
            debt = {dim: math.ceil(cost) - math.ceil(fits[dim]) for dim, cost in costs.items()}
            debt = {dim: units for dim, units in debt.items() if units > 0}
            if debt:
                self.local.adjust(model, shares, debt)
        return wait

    def adjust(self, model: str, rates: Rates, deltas: Costs) -> None:
        self.local.adjust(model, self._rates(rates), deltas)

    def sync(self, model: str, rates: Rates, floors: Floors) -> int:
        n = self.replicas
        return self.local.sync(model, self._rates(rates), {d: (lo / n, hi / n) for d, (lo, hi) in floors.items()})

    def used(self, model: str, rates: Rates) -> Dict[str, float]:
        return self.local.used(model, self._rates(rates))

    def pause(self, model: str, seconds: float) -> None:
        self.local.pause(model, seconds)

    def paused(self, model: str) -> float:
        return self.local.paused(model)


class RedisLedger(_Ledger):
    """Buckets on Redis, for every host. ``client`` is a ``redis.Redis`` (for the sync
    transport) or ``redis.asyncio.Redis`` (for the async one), or a cluster client
    (``redis.cluster.RedisCluster``, ``redis.asyncio.cluster.RedisCluster``): the keys
    of one model are in one slot. Keys: ``{prefix}:{namespace}:{<model>}:<limit>``.

    ``on_error``: what a call meets while Redis cannot be reached (refused connection,
    socket timeout, server over maxmemory, open circuit breaker):

    - ``"raise"`` (the default): :class:`~nexus_limits.BackendUnavailable`, before the
      call is sent;
    - ``"deny"``: the call is refused with :class:`StoreUnavailable` (an
      :class:`OutboundRefused`: a 429 from ``wrap()``'d clients);
    - ``"allow"``: the call is sent unmetered;
    - ``"local"``: an in-process ledger with every limit divided by ``replicas`` (the
      number of processes sharing the limits) admits it. Nothing written locally is
      pushed to Redis when it is back; calls admitted locally settle locally.

    Updates after an answer (settlement, the provider's counts, a 429's pause) that
    cannot reach Redis are applied to the local ledger with ``"local"`` and dropped
    otherwise: the answer is already there, and the provider's headers set the count
    right on the next answer."""

    where = "redis"
    remote = True

    def __init__(
        self,
        client: Any,
        namespace: str = "outbound",
        prefix: str = "nl",
        *,
        on_error: str = "raise",
        replicas: int = 1,
    ) -> None:
        self.on_error = check_on_error(on_error, local=True)
        self.replicas = check_replicas(replicas)
        self.client = client
        self.is_async = _is_async(client)
        self.namespace = namespace
        self.prefix = prefix
        self._channel = channel_for(client, want_async=self.is_async)
        self._local: Optional[_Shares] = _Shares(self.replicas) if self.on_error == "local" else None
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("errors", "fail_open", "fail_closed", "fail_local", "dropped"), 0)

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
        return self._keys(model, dims), [str(a) for a in args], dims

    # --- one round trip, behind the breaker ---------------------------------------------
    def _run(self, keys: List[str], args: List[str]) -> Any:
        if self.is_async:
            raise TypeError("this ledger has a redis.asyncio client: use it with AsyncLimitedTransport")
        channel = self._channel
        try:
            return channel.evalsha(SCRIPT.sha, keys, args)
        except BACKEND_ERRORS as error:
            if not is_noscript(error):
                raise
            channel.script_load(SCRIPT.source, keys[0])
            return channel.evalsha(SCRIPT.sha, keys, args)

    async def _run_async(self, keys: List[str], args: List[str]) -> Any:
        if not self.is_async:
            raise TypeError("this ledger has a synchronous redis client: use it with LimitedTransport")
        channel = self._channel
        try:
            return await channel.evalsha(SCRIPT.sha, keys, args)
        except BACKEND_ERRORS as error:
            if not is_noscript(error):
                raise
            await channel.script_load(SCRIPT.source, keys[0])
            return await channel.evalsha(SCRIPT.sha, keys, args)

    # --- the on_error policy --------------------------------------------------------------
    def _count(self, name: str) -> None:
        with self._lock:
            self._counts["errors"] += 1
            self._counts[name] += 1

    def _away(self, error: Exception) -> None:
        """Returns if ``error`` says Redis is away (the policy answers), else re-raises it
        (a script error, a wrong key type: a bug to see, not an outage)."""
        if not ((isinstance(error, BACKEND_ERRORS) or is_failure(error)) and is_outage(error)):
            raise error

    def _before(self, error: Exception, model: str) -> Optional[_Shares]:
        """Before a call is sent: the local ledger that answers instead (on_error="local"),
        None to send it unmetered ("allow"); raises for "deny" and "raise"."""
        self._away(error)
        if self._local is not None:
            self._count("fail_local")
            return self._local
        if self.on_error == "allow":
            self._count("fail_open")
            return None
        if self.on_error == "deny":
            self._count("fail_closed")
            raise StoreUnavailable(model, error, FALLBACK_RETRY, None) from error
        with self._lock:
            self._counts["errors"] += 1
        raise BackendUnavailable(
            f"outbound limiter: the Redis that holds {model}'s limits could not be reached: {error}"
        ) from error

    def _after(self, error: Exception) -> Optional[_Shares]:
        """After an answer: the local ledger that takes the update, None to drop it."""
        self._away(error)
        if self._local is not None:
            self._count("fail_local")
            return self._local
        self._count("dropped")
        return None

    def stats(self) -> Dict[str, Any]:
        """``on_error`` and ``replicas``; the client's circuit breaker: ``breaker_open`` (1
        while open; on a cluster, how many nodes' are) and ``breaker_trips``; ``errors``
        (operations that met an outage) and how each was answered: ``fail_open`` (sent
        unmetered), ``fail_closed`` (refused), ``fail_local`` (by the local ledger),
        ``dropped`` (an update after an answer, lost)."""
        with self._lock:
            counts = dict(self._counts)
        out: Dict[str, Any] = {"on_error": self.on_error, "replicas": self.replicas}
        out.update(self._channel.stats())
        out.update(counts)
        out["fallbacks"] = counts["fail_open"] + counts["fail_closed"] + counts["fail_local"]
        return out

    # --- operations -----------------------------------------------------------------------
    @staticmethod
    def _wait(reply: Any) -> float:
        value = float(reply)
        return math.inf if value < 0 else value / 1e6

    def _take_args(self, model: str, rates: Rates, costs: Costs, lead: float) -> Any:
        return self._args(model, "take", rates, {d: math.ceil(c) for d, c in costs.items()}, lead)

    def take(self, model: str, rates: Rates, costs: Costs, lead: float = 0.0) -> float:
        return self.charge(model, rates, costs, lead)[0]

    def charge(self, model: str, rates: Rates, costs: Costs, lead: float = 0.0) -> Tuple[float, Optional[_Ledger]]:
        keys, args, _ = self._take_args(model, rates, costs, lead)
        try:
            return self._wait(self._run(keys, args)), self
        except Exception as error:
            local = self._before(error, model)
            return (0.0, None) if local is None else (local.take(model, rates, costs, lead), local)

    async def take_async(self, model: str, rates: Rates, costs: Costs, lead: float = 0.0) -> float:
        return (await self.charge_async(model, rates, costs, lead))[0]

    async def charge_async(
        self, model: str, rates: Rates, costs: Costs, lead: float = 0.0
    ) -> Tuple[float, Optional[_Ledger]]:
        keys, args, _ = self._take_args(model, rates, costs, lead)
        try:
            return self._wait(await self._run_async(keys, args)), self
        except Exception as error:
            local = self._before(error, model)
            return (0.0, None) if local is None else (local.take(model, rates, costs, lead), local)

    def adjust(self, model: str, rates: Rates, deltas: Costs) -> None:
        keys, args, dims = self._args(model, "adjust", rates, deltas)
        if dims:
            try:
                self._run(keys, args)
            except Exception as error:
                local = self._after(error)
                if local is not None:
                    local.adjust(model, rates, deltas)

    async def adjust_async(self, model: str, rates: Rates, deltas: Costs) -> None:
        keys, args, dims = self._args(model, "adjust", rates, deltas)
        if dims:
            try:
                await self._run_async(keys, args)
            except Exception as error:
                local = self._after(error)
                if local is not None:
                    local.adjust(model, rates, deltas)

    def sync(self, model: str, rates: Rates, floors: Floors) -> int:
        keys, args, dims = self._args(model, "sync", rates, floors)
        if not dims:
            return 0
        try:
            return int(self._run(keys, args))
        except Exception as error:
            local = self._after(error)
            return 0 if local is None else local.sync(model, rates, floors)

    async def sync_async(self, model: str, rates: Rates, floors: Floors) -> int:
        keys, args, dims = self._args(model, "sync", rates, floors)
        if not dims:
            return 0
        try:
            return int(await self._run_async(keys, args))
        except Exception as error:
            local = self._after(error)
            return 0 if local is None else local.sync(model, rates, floors)

    @staticmethod
    def _used(dims: Sequence[str], reply: Any) -> Dict[str, float]:
        return {dim: float(value) for dim, value in zip(dims, reply)}

    def used(self, model: str, rates: Rates) -> Dict[str, float]:
        keys, args, dims = self._args(model, "used", rates, {})
        try:
            return self._used(dims, self._run(keys, args))
        except Exception as error:
            local = self._after(error)
            return dict.fromkeys(dims, 0.0) if local is None else local.used(model, rates)

    async def used_async(self, model: str, rates: Rates) -> Dict[str, float]:
        keys, args, dims = self._args(model, "used", rates, {})
        try:
            return self._used(dims, await self._run_async(keys, args))
        except Exception as error:
            local = self._after(error)
            return dict.fromkeys(dims, 0.0) if local is None else local.used(model, rates)

    def _pause_args(self, model: str, seconds: float) -> Any:
        return self._keys(model, []), ["pause", "0", repr(min(seconds, MAX_PAUSE) * 1e6)]

    def pause(self, model: str, seconds: float) -> None:
        try:
            self._run(*self._pause_args(model, seconds))
        except Exception as error:
            local = self._after(error)
            if local is not None:
                local.pause(model, seconds)

    async def pause_async(self, model: str, seconds: float) -> None:
        try:
            await self._run_async(*self._pause_args(model, seconds))
        except Exception as error:
            local = self._after(error)
            if local is not None:
                local.pause(model, seconds)

    def paused(self, model: str) -> float:
        try:
            return float(self._run(self._keys(model, []), ["paused", "0"])) / 1e6
        except Exception as error:
            local = self._before(error, model)
            return 0.0 if local is None else local.paused(model)

    async def paused_async(self, model: str) -> float:
        try:
            return float(await self._run_async(self._keys(model, []), ["paused", "0"])) / 1e6
        except Exception as error:
            local = self._before(error, model)
            return 0.0 if local is None else local.paused(model)
