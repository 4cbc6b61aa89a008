"""One source for the sync and asyncio Redis limiters: the synchronous module is
generated from the asyncio one and must be fresh; both sides offer the same classes
with the same methods; the package's modules import each other one way only."""

from __future__ import annotations

import ast
import asyncio
import inspect
from pathlib import Path

import pytest
import redis
import redis.asyncio

import nexus_limits as nl
import nexus_limits.redis as nlr
import nexus_limits.redis.asyncio as nla
from nexus_limits.redis import _generate

PACKAGE = Path(nlr.__file__).parent
# Methods that are plain functions on both sides (no I/O), and lease(), which returns a
# context manager on both sides (the synchronous one has taken the lease already).
PLAIN = {"stats", "redis_key", "redis_keys", "lease", "lease_async", "estimate", "cost", "set_budget", "middleware"}


def test_generated_files_are_fresh():
    assert _generate.stale() == [], "run: python python/nexus_limits/redis/_generate.py"
    assert _generate.main(["--check"]) == 0


def test_the_generator_rules():
    source = (
        '"""doc\n\nmore"""\n'
        "async def f(x):\n"
        "    async with x as y:\n"
        "        async for z in y:\n"
        "            await x.sleep_async(await z)\n"
        "    return AsyncRateLimiter  # unasync: return 42\n"
    )
    out = _generate.translate(source, "_async.py")
    assert "async" not in out.replace("_async.py", "") and "await" not in out
    assert "def f(x):\n    with x as y:\n        for z in y:\n            x.sleep(z)\n" in out
    assert "    return 42\n" in out and "GENERATED from ``_async.py``" in out


def test_async_only_blocks_are_left_out():
    source = (
        '"""doc\n\nmore"""\n'
        "async def f(job):  # unasync: def f(job):\n"
        "    # unasync: return job\n"
        "    # unasync: begin async-only\n"
        "    task = asyncio.ensure_future(job)  # unasync: kept = True\n"
        "    return await task\n"
        "    # unasync: end async-only\n"
        "\n"
        "\n"
        "# unasync: begin async-only\n"
        "_TASKS = set()\n"
        "# unasync: end async-only\n"
        "X = 1\n"
    )
    out = _generate.translate(source, "_async.py")
    assert "def f(job):\n    return job\n" in out and "X = 1\n" in out
    for gone in ("task", "kept", "_TASKS", "async-only"):
        assert gone not in out, gone
    # a block that does not end, ends twice, or shares its line with code is an error
    for bad in (
        "# unasync: begin async-only\nX = 1\n",
        "X = 1\n# unasync: end async-only\n",
        "X = 1  # unasync: begin async-only\n# unasync: end async-only\n",
        "# unasync: begin async-only\n# unasync: begin async-only\n# unasync: end async-only\n",
    ):
        with pytest.raises(ValueError, match="async-only"):
            _generate.translate(bad, "_async.py")


def test_no_dead_code_in_the_generated_files():
    """No statement after a return or raise in a block, and no private name a generated
    file defines that nothing in nexus_limits uses (what an async-only helper left in the
    twin would be)."""
    used = set()
    for path in PACKAGE.parent.rglob("*.py"):
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.Name):
                used.add(n.id)
            elif isinstance(n, ast.Attribute):
                used.add(n.attr)
    for target in _generate.FILES.values():
        tree = ast.parse((PACKAGE / target).read_text())
        for node in ast.walk(tree):
            for field in ("body", "orelse", "finalbody"):
                block = getattr(node, field, None)
                if isinstance(block, list):
                    for stmt in block[:-1]:
                        assert not isinstance(stmt, (ast.Return, ast.Raise)), (target, stmt.lineno)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
            else:
                continue
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    assert name in used, (target, name, node.lineno)


@pytest.mark.parametrize("name", nlr.__all__)
def test_same_classes_and_methods_on_both_sides(name):
    sync, aio = getattr(nlr, name), getattr(nla, name)
    assert name in nla.__all__
    assert sync.__module__ == "nexus_limits.redis" and aio.__module__ == "nexus_limits.redis.asyncio"
    public = lambda cls: {m for m in dir(cls) if not m.startswith("_")}  # noqa: E731
    assert public(sync) == public(aio), public(sync) ^ public(aio)
    for method in public(sync):
        s, a = inspect.getattr_static(sync, method), inspect.getattr_static(aio, method)
        if isinstance(s, property) or not callable(s):
            assert isinstance(a, property) == isinstance(s, property), method
            continue
        assert inspect.signature(s).parameters.keys() == inspect.signature(a).parameters.keys(), method
        if method in PLAIN:
            continue
        assert inspect.iscoroutinefunction(a), f"{name}.{method} is a coroutine on the asyncio side"
        if method != "acquire_async":  # the sync side's runs its round trips in threads
            assert not inspect.iscoroutinefunction(s), f"{name}.{method} is synchronous on the sync side"


def _imports(path: Path) -> set:
    """The package's own modules that ``path`` imports at module level."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module)
            else:
                out.update(alias.name for alias in node.names)
    return out


def test_no_import_cycle_in_the_package():
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py")}
    done = set()

    def visit(node, path):
        assert node not in path, f"import cycle: {' -> '.join([*path, node])}"
        if node in done:
            return
        for nxt in graph.get(node, ()):
            visit(nxt, [*path, node])
        done.add(node)

    for module in graph:
        visit(module, [])
    assert "_sync" not in graph["_async"] and "_threads" not in graph["_async"]
    assert graph["_budget"].isdisjoint({"_sync", "_async", "__init__", "asyncio"}), "no I/O module"
    assert graph["_common"].isdisjoint({"_sync", "_async", "__init__", "asyncio"})


def test_asyncio_spend_limiter_shares_the_budget_with_the_sync_one(redis_server):
    async def main() -> None:
        sync_client = redis.Redis(port=redis_server.port)
        client = redis.asyncio.Redis(port=redis_server.port)
        clock = nl.ManualClock(1_700_000_000.0)
        try:
            sync_client.flushall()
            sync = nlr.SpendLimiter(sync_client, "1.00/hour", prefix="os", clock=clock, concurrency=2)
            aio = nla.SpendLimiter(client, "1.00/hour", prefix="os", clock=clock, concurrency=2)
            res = await aio.reserve("k", "gpt-4o", 100_000, 10_000)
            assert res.allowed and res.estimate_micros == 350_000
            assert sync.reserve("k", "gpt-4o", 1, 1).decision.remaining < 650_000, "one budget"
            assert await res.settle(100_000) is True
            assert await res.settle(1) is False
            again = await aio.reserve("k", "gpt-4o", 1000, 0)
            assert await again.cancel() is True
            too_big = await aio.reserve("k", "gpt-4o", 10_000_000, 0)
            assert not too_big.allowed and "above the whole budget" in too_big.detail()
            assert aio.stats()["allowed"] == 2 and aio.stats()["denied"] == 1
            await aio.reset("k")
            assert (await aio.reserve("k", "gpt-4o", 1000, 0)).decision.remaining == 1_000_000 - 2500
        finally:
            await client.aclose()
            sync_client.close()

    asyncio.run(main())


def test_asyncio_token_limiter_has_the_sync_properties(async_redis_client):
    async def main() -> None:
        client = async_redis_client()
        try:
            tl = nla.TokenLimiter(
                client, "10/minute", "1000/minute", 5000, concurrency=3, lease_ttl=30, on_error="deny"
            )
            assert (tl.requests, tl.tokens, tl.daily_tokens) == (
                nl.Rate(10, 60.0),
                nl.Rate(1000, 60.0),
                nl.Rate(5000, 86400.0),
            )
            assert (tl.concurrency, tl.lease_ttl, tl.on_error) == (3, 30.0, "deny")
            assert len(tl.redis_keys("k")) == 4
        finally:
            await client.aclose()

    asyncio.run(main())
