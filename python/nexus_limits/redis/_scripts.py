"""The Lua scripts, assembled from the pieces beside this file.

A single limiter's script holds only its own step function, which keeps the work the
server does per check small; a Composite's script holds all of them and decides every
part before writing any. See header.lua for the arguments and the reply."""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Dict


def _piece(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text()


class Script:
    """A Lua script run by EVALSHA (and loaded again when the server answers NOSCRIPT)."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


_HEADER = _piece("header.lua")
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
    algo: Script(_HEADER + "\n" + _STEPS[fn] + "\n" + _SINGLE.replace("STEP", fn).replace("SHAPING", shaping))
    for algo, (fn, shaping) in _ALGORITHMS.items()
}
_ALL_STEPS = _SPLIT + _piece("gcra.lua") + _piece("fixed.lua") + _piece("sliding.lua")
COMPOSITE = Script(_HEADER + "\n" + _ALL_STEPS + "\n" + _piece("composite.lua"))
CONCURRENCY = Script(_piece("concurrency.lua"))
REQUOTA = Script(_HEADER + "\n" + _SPLIT + "\n" + _piece("requota.lua"))
RESERVE = Script(_HEADER + "\n" + _piece("gcra.lua") + "\n" + _piece("reserve.lua"))
SETTLE = Script(_HEADER + "\n" + _piece("gcra.lua") + "\n" + _piece("settle.lua"))
