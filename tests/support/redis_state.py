"""What the Redis attack tests do to a server's keys directly, behind the limiters' backs:
a snapshot of every key (to show that a refused step wrote nothing), a value of a type
the library never writes put where it keeps its state, and the check that an error
shows the user no Lua internals."""

from __future__ import annotations

from typing import Any, Dict, Tuple

# How to leave a value of each type at a key (its content does not matter).
_WRITERS = {
    "string": lambda client, key: client.set(key, "x"),
    "hash": lambda client, key: client.hset(key, "a", "b"),
    "list": lambda client, key: client.rpush(key, "x"),
    "set": lambda client, key: client.sadd(key, "x"),
    "zset": lambda client, key: client.zadd(key, {"x": 1}),
}


def snapshot(client: Any) -> Dict[bytes, Tuple[bytes, Any]]:
    """Every key of the server with its type and value (a string's text, another type's
    DUMP): equal before and after a step that wrote nothing."""
    out: Dict[bytes, Tuple[bytes, Any]] = {}
    for key in client.keys("*"):
        kind = client.type(key)
        out[key] = (kind, client.get(key) if kind == b"string" else client.dump(key))
    return out


def put_foreign(client: Any, key: str, kind: str) -> None:
    """Replaces what ``key`` holds by a value of type ``kind`` ("string", "hash", "list",
    "set" or "zset"), as another program sharing the prefix could."""
    client.delete(key)
    _WRITERS[kind](client, key)


def assert_no_script_text(text: str) -> None:
    """An error message names the problem, not the script's internals (its SHA, a Lua
    line number)."""
    assert "@user_script" not in text and "script:" not in text, text
