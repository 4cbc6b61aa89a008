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
from typing import Dict, Optional, Union


def _piece(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text()


class Script:
    """A Lua script run by EVALSHA (and loaded again when the server answers NOSCRIPT).

    ``flags`` are the script's Redis 7 flags: ``""`` (it writes: refused on a full
    server), ``"no-writes"`` (runs when full; any write in it is an error) or
    ``"allow-oom"``. ``reader`` is the ``no-writes`` twin of a script that also runs in a
    mode that writes nothing (a peek), or None: given as True (the same body) or as the
    twin's own body."""

    __slots__ = ("reader", "sha", "source")

    def __init__(self, body: str, flags: str = "", reader: Union[bool, str] = False) -> None:
        self.source = ("#!lua flags=" + flags if flags else "#!lua") + "\n" + body
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()
        twin = body if reader is True else reader
        self.reader: Optional[Script] = Script(twin, "no-writes") if twin else None

    def for_mode(self, mode: str) -> Script:
        """The script for ``mode``: itself for a "hit", its read-only twin for a "peek"."""
        return self.reader if mode != "hit" and self.reader is not None else self


# The clock, quotas and the helpers every limiter script shares (put, push).
_BASE = _piece("base.lua") + "\n" + _piece("lib.lua")
# (gcra_adjust.lua, what settlements, leases and quota changes need beside gcra.lua, is
# apart from it: every function a script defines is made on each run, and the single
# check's script has no use for them.)
# The arguments of the scripts that decide several parts (see header.lua).
_HEADER = _BASE + "\n" + _piece("header.lua") + "\n" + _piece("combine.lua")
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


def _single(fn: str, shaping: str, charge: str) -> str:
    body = _SINGLE.replace("STEP", fn).replace("SHAPING", shaping).replace("CHARGE", charge)
    return _BASE + "\n" + _STEPS[fn] + "\n" + body


# A single limiter's check, with ARGV [now, micros, capacity, cost] (see single.lua); its read-only
# twin peeks.
SINGLE: Dict[str, Script] = {
    algo: Script(_single(fn, shaping, "true"), reader=_single(fn, shaping, "false"))
    for algo, (fn, shaping) in _ALGORITHMS.items()
}
_ALL_STEPS = _SPLIT + _piece("gcra.lua") + _piece("fixed.lua") + _piece("sliding.lua")
COMPOSITE = Script(_HEADER + "\n" + _ALL_STEPS + "\n" + _piece("composite.lua"), reader=True)
CONCURRENCY = Script(_BASE + "\n" + _piece("concurrency.lua"), reader=True)
RELEASE = Script(_piece("release.lua"), "allow-oom")
REQUOTA = Script(
    _HEADER + "\n" + _SPLIT + _piece("gcra.lua") + _piece("gcra_adjust.lua") + "\n" + _piece("requota.lua")
)
RESERVE = Script(_HEADER + "\n" + _piece("gcra.lua") + "\n" + _piece("reserve.lua"), reader=True)
SETTLE = Script(_HEADER + "\n" + _piece("gcra.lua") + _piece("gcra_adjust.lua") + "\n" + _piece("settle.lua"))


def _lease(algo: str) -> str:
    if algo == "gcra":
        middle = _piece("gcra_adjust.lua") + "\n" + _piece("lease_gcra.lua")
    else:
        middle = _piece("lease_window.lua").replace("STEP", algo).replace("SLIDING", str(algo == "sliding").lower())
    start = _piece("lease.lua").replace("STEP", algo)
    return "\n".join((_BASE, _STEPS[algo], start, middle, _piece("lease_end.lua")))


# Quota leasing (lease.lua), for the algorithms it is sound for.
LEASE: Dict[str, Script] = {algo: Script(_lease(algo)) for algo in ("gcra", "fixed", "sliding")}

# Hierarchy (hierarchy*.lua): a path decided and charged as one script, its settlement,
# one node's own quotas, and the read-only inspection of one node.
_HIERARCHY = "\n".join((_BASE, _piece("gcra.lua"), _piece("gcra_adjust.lua"), _piece("hierarchy_lib.lua")))
HIERARCHY = Script(_HIERARCHY + "\n" + _piece("hierarchy.lua"), reader=True)
HIERARCHY_SETTLE = Script(_HIERARCHY + "\n" + _piece("hierarchy_settle.lua"))
HIERARCHY_REQUOTA = Script(_HIERARCHY + "\n" + _piece("hierarchy_requota.lua"))
HIERARCHY_INSPECT = Script(_HIERARCHY + "\n" + _piece("hierarchy_inspect.lua"), "no-writes")
# Priority (priority.lua): one limiter's step with a class's floor; its twin peeks.
PRIORITY = Script(_HEADER + "\n" + _ALL_STEPS + "\n" + _piece("priority.lua"), reader=True)
