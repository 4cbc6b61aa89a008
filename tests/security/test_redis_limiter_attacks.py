"""Attacks on the plain Redis limiters (TokenBucket, LeakyBucket, FixedWindow,
SlidingWindow, Composite, Concurrency; sync and asyncio) against a real redis-server,
with clients built with redis-py's defaults: state in Redis that this library did not
write (corrupted values, keys of another type), costs past 64 bits, debts whose
expiry would not fit Redis, replies no script returns, and the token bucket's
answers at rates whose unit interval is not a whole number of microseconds."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any, Callable, Dict, List

import pytest
import redis
import redis.asyncio

import nexus_limits as nl
import nexus_limits.redis as nlr
import nexus_limits.redis.asyncio as nla
from nexus_limits.errors import NexusLimitsError

EPOCH = 1_700_000_000.0  # a realistic clock, like the server's TIME
RATE_KINDS = ["TokenBucket", "LeakyBucket", "FixedWindow", "SlidingWindow"]
# Values another program (or a hand) could leave at a limiter's state key.
GARBAGE = ["nan", "inf", "-inf", "garbage", "", "1e999", "0x", "1:-5", "5:nan", "1:2:-3", "1:2:x", "nan:1:1"]


@pytest.fixture
def client(redis_client):
    return redis_client


def _limiter(client: Any, kind: str, rate: str = "10/minute", **kw: Any) -> Any:
    return getattr(nlr, kind)(client, rate, **kw)


def _snapshot(client: Any) -> Dict[bytes, Any]:
    out: Dict[bytes, Any] = {}
    for k in client.keys("*"):
        kind = client.type(k)
        out[k] = (kind, client.get(k) if kind == b"string" else client.dump(k))
    return out


def _no_script_text(text: str) -> None:
    assert "@user_script" not in text and "script:" not in text, text


# -- 2. costs past 64 bits -----------------------------------------------------------------


@pytest.mark.parametrize("kind", [*RATE_KINDS, "Composite"])
def test_a_cost_past_64_bits_is_refused_as_in_process(client, kind):
    def both() -> List[Any]:
        if kind == "Composite":
            return [
                nl.Composite([nl.TokenBucket("10/minute"), nl.FixedWindow("10/minute")]),
                nlr.Composite([nlr.TokenBucket(client, "10/minute"), nlr.FixedWindow(client, "10/minute")]),
            ]
        return [getattr(nl, kind)("10/minute"), _limiter(client, kind)]

    for lim in both():
        d = lim.hit("k", 2**64 - 1)
        assert not d.allowed and d.retry_after == float("inf")
        for cost in (2**64, 10**30):
            for call in (lim.hit, lim.peek, lim.try_acquire):
                with pytest.raises(ValueError, match="cost must be a non-negative integer"):
                    call("k", cost)
    with pytest.raises(ValueError, match="an int of 16610 bits"):
        both()[1].hit("k", 10**5000)
    leased = nlr.TokenBucket(client, "10/minute", lease=True)
    with pytest.raises(ValueError, match="cost must be a non-negative integer"):
        leased.hit("k", 2**64)
    assert client.keys("*") == []


# -- 5. a store that answers what no script returns -----------------------------------------


class FakeStore:
    """A loopback server speaking enough RESP for redis-py (HELLO, CLIENT, SCRIPT LOAD)
    that answers every other command with ``reply``: a proxy or a server that is not
    Redis, as a client built with defaults meets it."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
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
        return self.reply

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


REPLIES = [b"*2\r\n:1\r\n:2\r\n", b"$3\r\nabc\r\n", b":5\r\n", b"*20\r\n" + b"$3\r\nxyz\r\n" * 20, b"*0\r\n", b"_\r\n"]


@pytest.mark.parametrize("reply", REPLIES, ids=["short", "string", "int", "garbage", "empty", "null"])
def test_a_reply_no_script_returns_is_a_clear_error(reply):
    """IndexError, ValueError, TypeError from the depths of reply parsing became a clear
    error showing the reply."""
    store = FakeStore(reply)
    client = redis.Redis(port=store.port)
    try:
        calls: List[Callable[[], Any]] = []
        for kind in RATE_KINDS:
            lim = _limiter(client, kind)
            calls += [lambda lim=lim: lim.hit("k"), lambda lim=lim: lim.peek("k", 2), lambda lim=lim: lim.inspect("k")]
        tb = nlr.TokenBucket(client, "10/minute", lease=True, clock=nl.ManualClock(EPOCH))
        calls += [lambda: tb.hit("k"), lambda: tb.hit("k")]  # a plain check, then a block
        both = nlr.Composite([nlr.TokenBucket(client, "10/minute"), nlr.FixedWindow(client, "10/minute")])
        calls += [lambda: both.hit("k"), lambda: both.peek("k"), lambda: both.hit_each("k")]
        cc = nlr.Concurrency(client, 2)
        calls += [lambda: cc.hit("k"), lambda: cc.peek("k"), lambda: cc.inspect("k")]
        for call in calls:
            with pytest.raises(NexusLimitsError, match="reply is not what this library's script returns"):
                call()
    finally:
        client.close()
        store.close()


def test_a_reply_no_script_returns_asyncio():
    async def main() -> None:
        store = FakeStore(b"*2\r\n:1\r\n:2\r\n")
        ac = redis.asyncio.Redis(port=store.port)
        try:
            for lim in (nla.TokenBucket(ac, "10/minute"), nla.Concurrency(ac, 2)):
                with pytest.raises(NexusLimitsError, match=r"\[1, 2\]"):
                    await lim.hit("k")
        finally:
            await ac.aclose()
            store.close()

    asyncio.run(main())
