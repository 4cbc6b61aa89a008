"""The Lua scripts, assembled from the pieces beside this file.

A single limiter's script holds only its own step function, which keeps the work the
server does per check small; a Composite's script holds all of them and decides every
part before writing any. See header.lua for the arguments and the reply.

Every script starts with a shebang line (Redis 7 and later, Valkey). Redis checks its
memory only at a script's first write that could grow it, and not at all once the
script has written anything else (a ZREMRANGEBYSCORE, a DEL): a script without a
shebang could write past ``maxmemory``. A script declared with ``#!lua`` is refused
before it runs when the server is over its ``maxmemory`` (the client then sees an
OOM error, which the limiters treat as an outage). Peeks run a ``no-writes`` twin of
their script, which Redis runs even when full; the lease release only removes
members and is declared ``allow-oom``."""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Dict, Optional


def _piece(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text()


class Script:
    """A Lua script run by EVALSHA (and loaded again when the server answers NOSCRIPT).

    ``flags`` are the script's Redis 7 flags: ``""`` (it writes: refused on a full
    server), ``"no-writes"`` (runs when full; any write in it is an error) or
    ``"allow-oom"``. ``reader`` is the ``no-writes`` twin of a script that also runs in a
    mode that writes nothing (a peek), or None."""

    __slots__ = ("reader", "sha", "source")

    def __init__(self, body: str, flags: str = "", reader: bool = False) -> None:
        self.source = ("#!lua flags=" + flags if flags else "#!lua") + "\n" + body
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()
        self.reader: Optional[Script] = Script(body, "no-writes") if reader else None

    def for_mode(self, mode: str) -> Script:
        """The script for ``mode``: itself for a "hit", its read-only twin for a "peek"."""
        return self.reader if mode != "hit" and self.reader is not None else self


# The header (arguments, clock, quotas) and the shared helpers (put, combine, push).
_HEADER = _piece("header.lua") + "\n" + _piece("lib.lua")
_SPLIT = _piece("split.lua")
_STEPS = {"gcra": _piece("gcra.lua"), "fixed": _SPLIT + _piece("fixed.lua"), "sliding": _SPLIT + _piece("sliding.lua")}
_SINGLE = _piece("single.lua")

# algorithm name in ARGV -> (step function, shaping flag)
_ALGORITHMS = {
    "gcra": ("gcra", "false"),
    "leaky": ("gcra", "true"),
    "fixed": ("fixed", "false"),
    "sliding": ("sliding", "false"),
}

SINGLE: Dict[str, Script] = {
    algo: Script(
        _HEADER + "\n" + _STEPS[fn] + "\n" + _SINGLE.replace("STEP", fn).replace("SHAPING", shaping), reader=True
    )
    for algo, (fn, shaping) in _ALGORITHMS.items()
}
_ALL_STEPS = _SPLIT + _piece("gcra.lua") + _piece("fixed.lua") + _piece("sliding.lua")
COMPOSITE = Script(_HEADER + "\n" + _ALL_STEPS + "\n" + _piece("composite.lua"), reader=True)
CONCURRENCY = Script(_piece("concurrency.lua"), reader=True)
RELEASE = Script(_piece("release.lua"), "allow-oom")
REQUOTA = Script(_HEADER + "\n" + _SPLIT + "\n" + _piece("requota.lua"))
RESERVE = Script(_HEADER + "\n" + _piece("gcra.lua") + "\n" + _piece("reserve.lua"))
SETTLE = Script(_HEADER + "\n" + _piece("gcra.lua") + "\n" + _piece("settle.lua"))
