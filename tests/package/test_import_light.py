"""`import nexus_limits` stays light: adapters, asyncio, Redis, tokens and metrics load
when first used, not at import (the import time itself is measured in the closing notes
with `python -X importtime`, not here)."""

from __future__ import annotations

import subprocess
import sys

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
