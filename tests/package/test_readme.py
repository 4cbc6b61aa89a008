"""Every Python block in the README runs as pasted, and says the truth.

Each block is written to a file and run by a fresh interpreter, as a reader would
(``python block.py``). What it prints is checked against what its comments claim: a
``print(...)`` line's trailing comment, or the comment lines right below a ``print(...)``
line that has none, is the expected output (one comment line per printed line). The
claim may go on after the value with an explanation (after ``:``, ``,``, ``;``, `` (``,
`` —`` or two spaces), and ``...`` in it stands for any text (a time, an id).

Blocks that use Redis get a real server on the default port (6379), the one a pasted
``redis.Redis()`` reaches: the machine's if one already runs there (Debian's package
starts one), else a throwaway one. They must leave no key behind, so that they pass
again against a server that keeps its data.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import tokenize
from pathlib import Path
from typing import Dict, List, Optional

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# Fences a reader would take for Python that this test would not run.
_OTHER_PYTHON_FENCE = re.compile(r"^```\s*(py|python3|pycon|ipython|Python)\b", re.M)
# The key prefix the README's Redis blocks use; cleared before each, in case a run died half-way.
REDIS_PREFIX = "example"

# Installed as sitecustomize in the block's interpreter: records every print() made by
# the block's own lines (line number, text), including in processes it forks or spawns.
_RECORDER = """
import builtins, json, os, sys

_path, _log = os.environ.get("README_BLOCK_PATH"), os.environ.get("README_PRINT_LOG")
if _path and _log:
    _print = builtins.print

    def print(*args, sep=" ", end="\\n", file=None, flush=False):
        _print(*args, sep=sep, end=end, file=file, flush=flush)
        frame = sys._getframe(1)
        if frame.f_code.co_filename == _path:
            text = (" " if sep is None else sep).join(map(str, args))
            with open(_log, "a", encoding="utf-8") as f:
                f.write(json.dumps([frame.f_lineno, text]) + "\\n")

    builtins.print = print
"""


def blocks() -> list:
    text = README.read_text(encoding="utf-8")
    out = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        out.append(pytest.param(match.group(1), id=f"README.md:{line}"))
    return out


def claims(code: str) -> Dict[int, List[str]]:
    """{line of a print(...): the output lines its comments claim}."""
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string[1:].strip()
    lines = code.splitlines()
    out = {}
    for number, line in enumerate(lines, start=1):
        if not line.lstrip().startswith("print("):
            continue
        if number in comments:
            out[number] = [comments[number]]
            continue
        below = []
        for following in lines[number:]:
            if not following.lstrip().startswith("#"):
                break
            below.append(following.lstrip()[1:].removeprefix(" ").rstrip())
        if below:
            out[number] = below
    return out


_SEPARATORS = (":", ",", ";", " (", " —", "  ")


def _balanced(text: str) -> bool:
    return all(text.count(a) == text.count(b) for a, b in ("()", "[]", "{}")) and all(
        text.count(q) % 2 == 0 for q in "'\""
    )


def matches(claim: str, printed: str) -> bool:
    """The claim, or the part of it before an explanation, is what was printed (``...``: any text).
    An explanation starts at a separator outside brackets and quotes."""
    cuts = [len(claim)] + [i for i in range(len(claim)) if claim.startswith(_SEPARATORS, i) and _balanced(claim[:i])]
    for cut in cuts:
        pattern = ".*".join(re.escape(part) for part in claim[:cut].split("..."))
        if re.fullmatch(pattern, printed, re.S):
            return True
    return False


def false_claims(code: str, printed: Dict[int, List[str]]) -> List[str]:
    problems = []
    for number, claimed in claims(code).items():
        if number not in printed:
            problems.append(f"line {number}: claims {claimed!r} but printed nothing")
            continue
        got = "\n".join(printed[number]).split("\n")
        if len(got) != len(claimed) or not all(matches(c, g) for c, g in zip(claimed, got)):
            problems.append(f"line {number}: claims {claimed!r} but printed {got!r}")
    return problems


def run_block(code: str, tmp_path: Path) -> tuple:
    """Runs the block as ``python block.py``; returns (result, {line: [printed text]})."""
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    recorder = tmp_path / "_recorder"
    recorder.mkdir()
    (recorder / "sitecustomize.py").write_text(_RECORDER, encoding="utf-8")
    log = tmp_path / "prints.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(recorder), env.get("PYTHONPATH")) if p)
    env["README_BLOCK_PATH"] = str(script)
    env["README_PRINT_LOG"] = str(log)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    printed: Dict[int, List[str]] = {}
    if log.exists():
        for record in log.read_text(encoding="utf-8").splitlines():
            number, text = json.loads(record)
            printed.setdefault(number, []).append(text)
    return result, printed


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def default_redis():
    """A client of the Redis on 6379 for the blocks that use one: the machine's if it already
    runs one, else a throwaway server started here."""
    import redis
    from support.servers import RedisServer

    server: Optional[RedisServer] = None
    if not _port_open(6379):
        server = RedisServer(port=6379)
        try:
            server.start()
        except RuntimeError:
            server.close()
            server = None
            if not _port_open(6379):  # not a system server that came up meanwhile
                raise
    client = redis.Redis(port=6379, socket_timeout=5, socket_connect_timeout=5)
    try:
        version = client.info("server")["redis_version"]
    except redis.RedisError as e:
        pytest.fail(f"something listens on 127.0.0.1:6379 but does not answer as Redis: {e!r}")
    assert int(version.split(".")[0]) >= 7, f"the Redis on 6379 is {version}; nexus-limits needs 7.0 or later"
    yield client
    client.close()
    if server is not None:
        server.close()


def _anchors(text: str) -> List[str]:
    """The anchors GitHub gives the headings: lower case, punctuation dropped, spaces to
    hyphens, a repeated one numbered (-1, -2...)."""
    out: List[str] = []
    seen: Dict[str, int] = {}
    for match in re.finditer(r"^#{1,6} (.+?)\s*$", text, re.M):
        anchor = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        n = seen.get(anchor, 0)
        seen[anchor] = n + 1
        out.append(f"{anchor}-{n}" if n else anchor)
    return out


def test_the_table_of_contents_links_every_section():
    text = re.sub(r"^```.*?^```", "", README.read_text(encoding="utf-8"), flags=re.S | re.M)
    anchors = set(_anchors(text))
    contents = text[text.index("**Contents**") : text.index("\n## ")]
    listed = re.findall(r"\]\(#([^)]+)\)", contents)
    sections = [_anchors(line)[0] for line in re.findall(r"^## .+$", text, re.M)]
    assert [s for s in sections if s not in listed] == [], "sections missing from the contents"
    assert [s for s in sections if s in listed] == [s for s in listed if s in sections], "contents out of order"
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert [link for link in links if link not in anchors] == [], "links to no heading"


def test_the_readme_has_python_blocks():
    assert len(blocks()) >= 10
    fences = _OTHER_PYTHON_FENCE.findall(README.read_text(encoding="utf-8"))
    assert not fences, f"write ```python (these blocks would not be run): {fences}"


@pytest.mark.parametrize("code", blocks())
def test_block_runs_as_pasted(code, tmp_path, request):
    client = request.getfixturevalue("default_redis") if "redis" in code else None
    if client is not None:
        for key in client.scan_iter(match=f"{REDIS_PREFIX}:*"):
            client.delete(key)
        before = set(client.scan_iter(count=1000))
    result, printed = run_block(code, tmp_path)
    assert result.returncode == 0, f"the block failed:\n{code}\n--- stderr ---\n{result.stderr[-3000:]}"
    problems = false_claims(code, printed)
    assert not problems, "the block's comments say otherwise:\n" + "\n".join(problems) + f"\n--- block ---\n{code}"
    if client is not None:
        left = set(client.scan_iter(count=1000)) - before
        assert not left, f"the block left keys in Redis: {sorted(left)[:10]}"


# The checks above must be able to fail.


def test_a_failing_block_fails(tmp_path):
    result, _ = run_block("import nexus_limits as nl\nnl.Rate.parse('10/fortnight')\n", tmp_path)
    assert result.returncode != 0 and "ValueError" in result.stderr


def test_a_false_claim_is_caught(tmp_path):
    code = (
        "import nexus_limits as nl\n"
        "tb = nl.TokenBucket('2/minute')\n"
        "print(tb.hit('k').remaining)  # 1: one left\n"
        "print(tb.hit('k').remaining)  # 1\n"
        "for n in range(2):\n"
        "    print(n)\n"
        "# 0\n"
        "# 2\n"
        "if False:\n"
        "    print('never')  # never\n"
    )
    result, printed = run_block(code, tmp_path)
    assert result.returncode == 0, result.stderr
    problems = false_claims(code, printed)
    assert [p.split(":")[0] for p in problems] == ["line 4", "line 6", "line 10"], problems


def test_claims_read_as_documented():
    assert matches("(429, {'Retry-After': '1'}): the burst is spent", "(429, {'Retry-After': '1'})")
    assert matches("2, exact", "2")
    assert matches("retry after ... s", "retry after 48 s")
    assert not matches("12 3 15 True", "12")
    assert not matches("[200, 429]", "[200")
    assert not matches("0.6", "0.59")
