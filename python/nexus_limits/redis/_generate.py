"""Writes the synchronous twins (``_sync.py``, ``_sync_budget.py``,
``_sync_hierarchy.py``) from their asyncio sources (``_async.py``, ``_async_budget.py``,
``_async_hierarchy.py``: see FILES), the one source of the Redis classes' I/O.

    python python/nexus_limits/redis/_generate.py           # rewrite the _sync files
    python python/nexus_limits/redis/_generate.py --check   # exit 1 if one is stale

(Run as a file: it needs only the standard library and ruff, not the package.)

The rules, applied to Python tokens (never to strings or comments):

- ``async def``, ``async for`` and ``async with`` lose ``async``; ``await`` goes;
- the names in RENAMES become their synchronous twins;
- a line ending in ``# unasync: CODE`` becomes ``CODE`` (indentation kept): the few
  places where the two sides differ on purpose say so where they are;
- the lines from ``# unasync: begin async-only`` to ``# unasync: end async-only`` (both
  comments on lines of their own) are left out: code only the asyncio side uses
  (a synchronous call cannot be cancelled half-way), which the twin would otherwise
  carry unused;
- the module docstring is replaced by one saying where the file comes from.

The result is sorted and formatted with ruff (a development tool, used only here), so
the generated file is as clean as the source. Needs no third-party package at run
time: ``_sync.py`` is committed.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tokenize
from pathlib import Path
from typing import Dict, List, Tuple

HERE = Path(__file__).resolve().parent
# source -> generated file
FILES = {"_async.py": "_sync.py", "_async_budget.py": "_sync_budget.py", "_async_hierarchy.py": "_sync_hierarchy.py"}
TITLES = {
    "_async.py": "The synchronous Redis limiters.",
    "_async_budget.py": "Token and spend budgets on Redis, synchronous.",
    "_async_hierarchy.py": "Hierarchical quotas and priority classes on Redis, synchronous.",
}

RENAMES: Dict[str, str] = {
    "_async": "_sync",  # from ._async import ... (the budget source uses the limiters')
    "AsyncRateLimiter": "RateLimiter",
    "AsyncReservation": "Reservation",
    "AsyncSpendReservation": "SpendReservation",
    "AsyncHierarchyReservation": "HierarchyReservation",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    "acquire_async": "acquire",  # _wait.acquire_async -> _wait.acquire
    "sleep_async": "sleep",  # Deadline.sleep_async -> Deadline.sleep
}
DIRECTIVE = "# unasync:"
BEGIN_ASYNC_ONLY, END_ASYNC_ONLY = "begin async-only", "end async-only"
DOCSTRING = '''"""{title}

GENERATED from ``{source}`` by ``_generate.py`` beside it: do not edit; change
``{source}`` and run ``python python/nexus_limits/redis/_generate.py`` (a test
fails when this file is stale).
"""'''


def _directives(lines: List[str], name: str) -> Dict[int, str]:
    """Line number (1-based) -> the code that replaces that line ("" for a line left
    out)."""
    out = {}
    block = None  # the line the async-only block being read began on
    for number, line in enumerate(lines, 1):
        code = line.split(DIRECTIVE, 1)[1].strip() if DIRECTIVE in line else None
        if code in (BEGIN_ASYNC_ONLY, END_ASYNC_ONLY):
            if not line.lstrip().startswith(DIRECTIVE) or (code == BEGIN_ASYNC_ONLY) != (block is None):
                raise ValueError(f"{name}:{number}: {code!r} must be a line of its own, after the block's other end")
            block = number if code == BEGIN_ASYNC_ONLY else None
            out[number] = ""
        elif block is not None:
            out[number] = ""
        elif code is not None:
            indent = line[: len(line) - len(line.lstrip())]
            out[number] = indent + code + "\n"
    if block is not None:
        raise ValueError(f"{name}:{block}: {BEGIN_ASYNC_ONLY!r} without {END_ASYNC_ONLY!r}")
    return out


def translate(source: str, name: str) -> str:
    """``source`` (the text of the file ``name``) with the rules applied, before formatting."""
    lines = source.splitlines(keepends=True)
    replaced = _directives(lines, name)
    edits: List[Tuple[int, int, int, str]] = []  # (line, start col, end col, text)
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    docstring_done = False
    for i, tok in enumerate(tokens):
        row, col = tok.start
        if row in replaced:
            continue
        if not docstring_done and tok.type == tokenize.STRING and col == 0:
            docstring_done = True
            if tok.start[0] != tok.end[0]:
                first, last = tok.start[0], tok.end[0]
                replaced[first] = DOCSTRING.format(source=name, title=TITLES[name]) + "\n"
                for n in range(first + 1, last + 1):
                    replaced[n] = ""
            continue
        if tok.type != tokenize.NAME:
            continue
        if tok.string == "async" and tokens[i + 1].string in ("def", "for", "with"):
            edits.append((row, col, tokens[i + 1].start[1], ""))
        elif tok.string == "await":
            edits.append((row, col, tokens[i + 1].start[1], ""))
        elif tok.string in RENAMES:
            edits.append((row, col, tok.end[1], RENAMES[tok.string]))
    for row, start, end, text in sorted(edits, reverse=True):
        line = lines[row - 1]
        lines[row - 1] = line[:start] + text + line[end:]
    for row, text in replaced.items():
        lines[row - 1] = text
    return "".join(lines)


def _ruff(args: List[str], text: str, target: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--stdin-filename", str(HERE / target), "-"],
        input=text,
        capture_output=True,
        text=True,
        cwd=HERE,
    )
    if done.returncode != 0:
        raise RuntimeError(f"ruff {' '.join(args)} failed on the generated code:\n{done.stderr}{done.stdout}")
    return done.stdout


def render(source: str) -> str:
    """The text the file generated from ``source`` must have."""
    target = FILES[source]
    text = translate((HERE / source).read_text(), source)
    text = _ruff(["check", "--fix", "--exit-zero", "--select", "I,F401", "--quiet"], text, target)
    return _ruff(["format", "--quiet"], text, target)


def stale() -> List[str]:
    """The generated files whose text is not what their source gives."""
    out = []
    for source, target in FILES.items():
        path = HERE / target
        if not path.exists() or path.read_text() != render(source):
            out.append(target)
    return out


def main(argv: List[str]) -> int:
    if "--check" in argv:
        for target in stale():
            print(f"{HERE / target} is stale: run python {Path(__file__)}", file=sys.stderr)
        return 1 if stale() else 0
    for source, target in FILES.items():
        (HERE / target).write_text(render(source))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
