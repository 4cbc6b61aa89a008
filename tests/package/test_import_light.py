"""`import nexus_limits` stays light: adapters, asyncio, Redis, tokens and metrics load
when first used, not at import (the import time itself is measured in the closing notes
with `python -X importtime`, not here)."""

from __future__ import annotations

import subprocess
import sys

# Standard modules that cost `import nexus_limits` most of its time before it avoided
# them (typing alone ~9 ms, and re, enum, contextlib, collections, functools with it),
# and the package's own modules that a program checking rates does not need.
LIGHT = ("typing", "re", "enum", "contextlib", "collections", "functools", "threading", "math", "nexus_limits._wait",
         "nexus_limits.budget", "nexus_limits.hierarchy", "nexus_limits.fair", "nexus_limits.spend")  # fmt: skip
HEAVY = ("asyncio", "nexus_limits.adapters", "nexus_limits.redis", "nexus_limits.tokens", "nexus_limits.metrics",
         "prometheus_client", "redis", "tiktoken", "httpx", "json", "ssl")  # fmt: skip


def loaded_after(code: str) -> set:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys\n{code}\nprint('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


def test_import_loads_none_of_the_heavy_modules():
    loaded = loaded_after("import nexus_limits as nl\nnl.TokenBucket('1/s').try_acquire('k')")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_limit_is_still_there_on_first_use():
    loaded = loaded_after("import nexus_limits as nl\nassert callable(nl.limit)")
    assert "nexus_limits.adapters.decorators" in loaded


def test_an_unknown_attribute_is_an_attribute_error():
    import nexus_limits as nl

    try:
        nl.no_such_thing  # noqa: B018
    except AttributeError as error:
        assert "no_such_thing" in str(error)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")


def test_import_loads_neither_typing_nor_re_nor_enum():
    """A behaviour, not a timing: `import nexus_limits` and a first check load none of
    the standard modules that made the import slow, nor the package's lazy parts."""
    loaded = loaded_after("import nexus_limits as nl\nassert nl.TokenBucket('1/s').try_acquire('k')")
    assert not loaded & set(LIGHT), sorted(loaded & set(LIGHT))
    assert "nexus_limits.limiters" in loaded, "the check ran"


def test_every_public_name_is_there_on_first_use():
    """Names loaded lazily are in dir() and __all__, come from their module, and can be
    imported with `from nexus_limits import ...` (each in a fresh process)."""
    import nexus_limits as nl

    assert set(nl.__all__) <= set(dir(nl))
    for name in nl._LAZY:
        assert name in nl.__all__
        loaded = loaded_after(f"from nexus_limits import {name}\nimport nexus_limits as nl\nassert nl.{name} is {name}")
        assert f"nexus_limits.{nl._LAZY[name]}" in loaded
    assert nl.TokenLimiter.__module__.startswith("nexus_limits.budget")
    assert nl.Hierarchy.__module__ == "nexus_limits.hierarchy"
    from nexus_limits import budget

    assert nl.TokenLimiter is budget.TokenLimiter


def test_waiting_loads_what_it_needs():
    loaded = loaded_after(
        "import nexus_limits as nl\n"
        "c = nl.ManualClock(0.0)\n"
        "t = nl.TokenBucket('1/s', clock=c)\n"
        "assert t.acquire('k').allowed and t.acquire('k').allowed and c.now == 1.0\n"
        "try:\n"
        "    t.acquire('k', cost=5)\n"
        "except nl.RateLimitExceeded as e:\n"
        "    assert e.retry_after == float('inf') and 'never' in str(e)\n"
        "else:\n"
        "    raise AssertionError('expected RateLimitExceeded')"
    )
    assert "nexus_limits._wait" in loaded
