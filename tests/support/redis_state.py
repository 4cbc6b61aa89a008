"""What the Redis tests do to servers directly, behind the limiters' backs: a snapshot of
every key (to show that a refused step wrote nothing), a value of a type the library
never writes put where it keeps its state, the check that an error shows the user no
Lua internals, and the wait for every node of a cluster to serve its slots."""

from __future__ import annotations

import time
from typing import Any, Dict, Tuple

import redis

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


def every_node_ready(cluster: Any, timeout: float = 20.0) -> None:
    """Waits (at most ``timeout`` seconds) until every node of ``cluster`` (a
    support.servers.RedisCluster) says cluster_state:ok. RedisCluster.start asks the
    first node only; on a loaded machine another may not have taken the slot map yet
    and answer CLUSTERDOWN, which a limiter answers as an outage (its on_error answer,
    at once, without a breaker trip)."""
    deadline = time.monotonic() + timeout
    for node in cluster.nodes:
        client = redis.Redis(port=node.port)
        try:
            while client.cluster("info").get("cluster_state") != "ok":
                assert time.monotonic() < deadline, f"node {node.port} never reached cluster_state:ok"
                time.sleep(0.05)
        finally:
            client.close()
