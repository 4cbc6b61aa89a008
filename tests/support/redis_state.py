"""What the Redis tests do to servers directly, behind the limiters' backs: a snapshot of
every key (to show that a refused step wrote nothing), a value of a type the library
never writes put where it keeps its state, the check that an error shows the user no
Lua internals, and the wait for every node of a cluster to serve its slots."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

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


class FakeStore:
    """A loopback server speaking enough RESP for redis-py (HELLO, CLIENT, SCRIPT LOAD,
    and the commands in ``answers``) that answers every other command with ``reply``: a
    proxy or a server that is not Redis, as a client built with defaults meets it."""

    def __init__(self, reply: bytes, answers: Optional[Dict[bytes, bytes]] = None) -> None:
        self.reply = reply
        self.answers = answers or {}
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _answer(self, args: List[bytes]) -> bytes:
        cmd = args[0].upper()
        if cmd == b"HELLO":
            return b"%1\r\n$5\r\nproto\r\n:" + (args[1] if len(args) > 1 else b"2") + b"\r\n"
        if cmd == b"CLIENT":
            return b"+OK\r\n"
        if cmd == b"SCRIPT":
            return b"$40\r\n" + b"0" * 40 + b"\r\n"
        return self.answers.get(cmd, self.reply)

    def _serve(self, conn: Any) -> None:
        buf = b""
        with conn:
            for _ in range(10_000):
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while buf.startswith(b"*") and b"\r\n" in buf:
                    try:
                        n, at = int(buf[1 : buf.index(b"\r\n")]), buf.index(b"\r\n") + 2
                        args = []
                        for _ in range(n):
                            end = buf.index(b"\r\n", at)
                            size, at = int(buf[at + 1 : end]), end + 2
                            if len(buf) < at + size + 2:
                                raise ValueError("incomplete")
                            args.append(buf[at : at + size])
                            at += size + 2
                    except ValueError:
                        break  # the rest of the command is still on its way
                    buf = buf[at:]
                    conn.sendall(self._answer(args))

    def close(self) -> None:
        self.sock.close()
