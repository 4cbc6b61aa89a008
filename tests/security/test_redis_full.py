"""Redis full (``maxmemory`` with ``noeviction``): no script writes past the limit, and
every check answers its ``on_error`` policy, sync and asyncio, for every limiter kind.

Redis checks a script's memory only at its first write that can grow memory, and not
at all once the script has written something else: a script that first ran a
ZREMRANGEBYSCORE or a DEL could write past ``maxmemory``. The scripts declare
themselves with ``#!lua`` so the server refuses them before they run. Each test here
fills a real redis-server, then proves that nothing changed while it was full (the
server's own write counter, the key count and every key's serialised value) and that
each answer is the on_error one (``fallback=True``, or BackendUnavailable for
"raise"); peeks, which only read, still answer from the data."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Dict, Tuple

import pytest
import redis
import redis.asyncio
from support.servers import RedisServer

import nexus_limits as nl
import nexus_limits.redis as nlr
import nexus_limits.redis.asyncio as nla

MODES = ("allow", "deny", "raise")
SIDES = ("sync", "asyncio")
FILL = b"x" * 4096


@pytest.fixture(scope="module")
def server():
    s = RedisServer().start()
    yield s
    s.close()


class Full:
    """Fills the server to its maxmemory and back; snapshots what is stored."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.admin = redis.Redis(port=port)
        self.admin.config_set("maxmemory", 0)
        self.admin.config_set("maxmemory-policy", "noeviction")
        self.admin.flushall()

    def fill(self) -> None:
        """A tiny maxmemory (256 KiB above what is used now), filled up by plain SETs
        until the server refuses one."""
        used = int(self.admin.info("memory")["used_memory"])
        self.admin.config_set("maxmemory", used + 256 * 1024)
        for i in range(4000):  # at most 16 MB: the loop ends long before
            try:
                self.admin.set(f"fill:{i}", FILL)
            except redis.exceptions.OutOfMemoryError:
                break
        else:  # pragma: no cover
            raise AssertionError("the server never refused a write")
        # Keep it over the limit whatever the server gives back meanwhile (client query
        # buffers shrink when idle, by tens of KiB).
        used = int(self.admin.info("memory")["used_memory"])
        self.admin.config_set("maxmemory", used - 512 * 1024)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            self.admin.set("probe", "x")

    def empty(self) -> None:
        self.admin.config_set("maxmemory", 0)

    def snapshot(self) -> Tuple[int, int, Dict[bytes, Any]]:
        """(writes the server counted, key count, every limiter key's DUMP)."""
        dirty = int(self.admin.info("persistence")["rdb_changes_since_last_save"])
        dumps = {k: self.admin.dump(k) for k in self.admin.scan_iter(count=1000) if not k.startswith(b"fill:")}
        return dirty, self.admin.dbsize(), dumps

    def close(self) -> None:
        self.empty()
        self.admin.flushall()
        self.admin.close()


@pytest.fixture
def full(server):
    f = Full(server.port)
    yield f
    f.close()


async def done(value: Any) -> Any:
    """The value of a sync call, or of an asyncio one once awaited."""
    return await value if inspect.isawaitable(value) else value


def client_for(side: str, port: int) -> Any:
    # Clients as users build them: the defaults, retries included (an OOM is not retried).
    return redis.Redis(port=port) if side == "sync" else redis.asyncio.Redis(port=port)


async def close(client: Any) -> None:
    await done(client.aclose() if hasattr(client, "aclose") else client.close())


def module(side: str) -> Any:
    return nlr if side == "sync" else nla


async def expect_fallback(mode: str, call: Any, *args: Any) -> Any:
    """The answer of ``call(*args)`` while full: the on_error one, marked as a fallback."""
    if mode == "raise":
        with pytest.raises(nl.BackendUnavailable, match="full"):
            await done(call(*args))
        return None
    d = await done(call(*args))
    assert d.fallback, d
    assert d.allowed == (mode == "allow"), d
    if mode == "deny":
        assert d.retry_after == 1.0
    return d


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("mode", MODES)
def test_rate_limiters_write_nothing_and_follow_on_error(full, side, mode):
    async def main() -> None:
        m = module(side)
        client = client_for(side, full.port)
        try:
            clock = nl.ManualClock(1_700_000_000.0)
            kinds = [
                m.TokenBucket(client, "10/hour", prefix="f", on_error=mode, clock=clock),
                m.LeakyBucket(client, "10/hour", prefix="f", on_error=mode, clock=clock),
                m.FixedWindow(client, "10/day", prefix="f", on_error=mode, clock=clock),
                m.SlidingWindow(client, "10/day", prefix="f", on_error=mode, clock=clock),
            ]
            composite = m.Composite(
                [
                    m.TokenBucket(client, "20/hour", prefix="c", clock=clock),
                    m.FixedWindow(client, "30/day", prefix="c", clock=clock),
                ],
                on_error=mode,
            )
            everyone = [*kinds, composite]
            for lim in everyone:
                assert (await done(lim.hit("k", 3))).allowed
            peeks = [await done(lim.peek("k")) for lim in everyone]
            assert all(p.remaining < p.limit and not p.fallback for p in peeks)
            limits = [await done(lim.get_limit("k")) for lim in everyone]

            full.fill()
            before = full.snapshot()
            for lim in everyone:
                for key in ("k", "new-1", "new-2"):
                    await expect_fallback(mode, lim.hit, key)
                    await expect_fallback(mode, lim.hit, key, 2)
                if mode != "raise":
                    assert (await done(lim.try_acquire("k"))) == (mode == "allow")

            async def combined() -> Any:
                d, each = await done(composite.hit_each("k"))
                assert each == [d, d]
                return d

            await expect_fallback(mode, combined)
            # Peeks only read: they still answer from the data, not from on_error.
            for lim, p, limit in zip(everyone, peeks, limits):
                again = await done(lim.peek("k"))
                assert not again.fallback and again.remaining == p.remaining and again.limit == p.limit
                assert await done(lim.get_limit("k")) == limit
            assert (await done(kinds[0].inspect("k")))["used"] == 3
            assert [row["key"] for row in await done(kinds[0].top_keys())] == ["k"]
            assert full.snapshot() == before, "a check wrote to a full server"

            stats = kinds[0].stats()
            assert stats["errors"] >= 6
            assert stats["fail_open" if mode == "allow" else "fail_closed"] == (0 if mode == "raise" else 7)

            full.empty()
            for lim, p in zip(everyone, peeks):
                d = await done(lim.hit("k"))
                assert d.allowed and not d.fallback
                # The same answer as the peek before the server was full: nothing was
                # charged meanwhile, nothing was lost.
                assert (d.remaining, d.limit) == (p.remaining, p.limit)
        finally:
            await close(client)

    run(main())


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("mode", MODES)
def test_quota_changes_are_refused_when_full(full, side, mode):
    async def main() -> None:
        m = module(side)
        client = client_for(side, full.port)
        try:
            tb = m.TokenBucket(client, "10/hour", prefix="q", on_error=mode, clock=nl.ManualClock(1e9))
            await done(tb.set_quota("k", "20/hour"))
            full.fill()
            before = full.snapshot()
            expected = nl.BackendUnavailable if mode == "raise" else redis.exceptions.OutOfMemoryError
            with pytest.raises(expected):
                await done(tb.set_quota("k", "30/hour"))
            with pytest.raises(expected):
                await done(tb.clear_quota("k"))
            assert full.snapshot() == before
            full.empty()
            assert (await done(tb.inspect("k")))["limit"] == 20
        finally:
            await close(client)

    run(main())


@pytest.mark.parametrize("side", SIDES)
def test_a_lost_script_cache_on_a_full_server_is_an_outage(full, side):
    """NOSCRIPT while full: the script is loaded again (SCRIPT LOAD is allowed when full)
    and then refused like any write: an on_error answer, no key written."""

    async def main() -> None:
        m = module(side)
        client = client_for(side, full.port)
        try:
            tb = m.SlidingWindow(client, "10/day", prefix="s", on_error="deny", clock=nl.ManualClock(1e9))
            assert (await done(tb.hit("k"))).allowed
            full.admin.script_flush()
            full.fill()
            before = full.snapshot()
            await expect_fallback("deny", tb.hit, "k")
            assert (await done(tb.peek("k"))).remaining == 8
            assert full.snapshot() == before
        finally:
            await close(client)

    run(main())


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("mode", MODES)
def test_concurrency_takes_no_lease_when_full_and_releases_free_memory(full, side, mode):
    async def main() -> None:
        m = module(side)
        client = client_for(side, full.port)
        try:
            cc = m.Concurrency(client, 3, lease_ttl=300, prefix="cc", on_error=mode)
            held = (await done(cc.hit("k"))).lease
            assert held is not None and not held.fallback
            assert (await done(cc.peek("k"))).remaining == 1
            full.fill()
            before = full.snapshot()
            for key in ("k", "new"):
                d = await expect_fallback(mode, cc.hit, key)
                if mode == "allow":
                    assert d.lease is not None and d.lease.fallback
                    assert not await done(d.lease.release()), "a fail-open lease was never stored"
                if mode == "deny":
                    assert d.lease is None
            peek = await done(cc.peek("k"))
            assert not peek.fallback and peek.remaining == 1, "a peek still reads the leases"
            assert await done(cc.get_limit("k")) == (True, 2)
            assert full.snapshot() == before, "a lease was written to a full server"

            # Ending a lease only removes it: it runs when full, so the place is not
            # lost until the lease's ttl; the key count does not grow.
            lease_key = cc.redis_key("k").encode()
            assert full.admin.zcard(lease_key) == 1
            assert await done(held.release())
            assert full.admin.zcard(lease_key) == 0
            assert full.admin.dbsize() <= before[1]

            full.empty()
            leases = [(await done(cc.hit("k"))).lease for _ in range(4)]
            assert [lease is not None for lease in leases] == [True, True, True, False]
        finally:
            await close(client)

    run(main())


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("mode", MODES)
def test_token_budget_reserve_and_settle_when_full(full, side, mode):
    async def main() -> None:
        m = module(side)
        client = client_for(side, full.port)
        try:
            clock = nl.ManualClock(1_700_000_000.0)
            tl = m.TokenLimiter(
                client,
                requests="100/hour",
                tokens="10000/hour",
                concurrency=3,
                prefix="tl",
                on_error=mode,
                clock=clock,
            )
            early = await done(tl.reserve("k", 500))
            assert early.allowed and not early.decision.fallback
            assert early.tokens.remaining == 9500
            full.fill()
            before = full.snapshot()
            for key in ("k", "new"):
                if mode == "raise":
                    with pytest.raises(nl.BackendUnavailable, match="full"):
                        await done(tl.reserve(key, 100))
                    continue
                res = await done(tl.reserve(key, 100))
                assert res.decision.fallback and res.allowed == (mode == "allow")
                assert not await done(res.settle(50)), "a fallback reservation settles to nothing"
            assert full.snapshot() == before, "a reservation was written to a full server"

            # Settling a reservation made before: the buckets cannot be written (its
            # estimate stands, as when the lease time passes), but its lease is ended.
            lease_key = tl.redis_keys("k")[-1].encode()
            assert full.admin.zcard(lease_key) == 1
            if mode == "raise":
                with pytest.raises(nl.BackendUnavailable, match="full"):
                    await done(early.settle(100))
            else:
                assert not await done(early.settle(100))
            assert full.admin.zcard(lease_key) == 0
            assert {k: v for k, v in full.snapshot()[2].items() if k != lease_key} == {
                k: v for k, v in before[2].items() if k != lease_key
            }, "the buckets were written while full"
            stats = tl.stats()
            assert stats["errors"] >= 2 and stats["tokens_settled"] == 0

            full.empty()
            after = await done(tl.reserve("k", 500))
            assert after.allowed and after.tokens.remaining == 9000, "the estimate of the early one stands"
            assert await done(after.settle(400))
        finally:
            await close(client)

    run(main())


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("mode", MODES)
def test_spend_when_full(full, side, mode):
    async def main() -> None:
        m = module(side)
        client = client_for(side, full.port)
        try:
            clock = nl.ManualClock(1_700_000_000.0)
            spend = m.SpendLimiter(client, "5.00/hour", prefix="sp", on_error=mode, clock=clock)
            early = await done(spend.reserve("k", "gpt-4o", 1000, 500))
            assert early.allowed
            remaining = early.decision.remaining
            full.fill()
            before = full.snapshot()
            for key in ("k", "new"):
                if mode == "raise":
                    with pytest.raises(nl.BackendUnavailable, match="full"):
                        await done(spend.reserve(key, "gpt-4o", 1000, 500))
                    continue
                res = await done(spend.reserve(key, "gpt-4o", 1000, 500))
                assert res.allowed == (mode == "allow")
                assert not await done(res.settle(10))
            assert full.snapshot() == before, "a spend reservation was written to a full server"
            if mode == "raise":
                with pytest.raises(nl.BackendUnavailable):
                    await done(early.settle(10))
            else:
                assert not await done(early.settle(10))
            assert full.snapshot() == before
            stats = spend.stats()
            assert stats["fail_open" if mode == "allow" else "fail_closed"] == (0 if mode == "raise" else 2)
            full.empty()
            again = await done(spend.reserve("k", "gpt-4o", 1000, 500))
            assert again.allowed and again.decision.remaining == remaining - early.estimate_micros
        finally:
            await close(client)

    run(main())
