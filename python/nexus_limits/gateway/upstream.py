"""The gateway's HTTP/1.1 client to its one upstream: a bounded pool of kept-alive
connections on asyncio, responses parsed by httptools (llhttp, in C) and streamed
with back-pressure.

Why not httpx: a general client pays for what one fixed upstream never needs
(URL objects, header classes, anyio task groups, a pool scanned on every request).
Measured behind uvicorn, httpx's pool scan alone took about 30% of the gateway's CPU at
16 connections, and its keep-alive bound made it open a new upstream connection for
most requests. This client keeps what the gateway needs and nothing else:

- at most ``max_connections`` connections, opened or opening; a request that finds
  them all busy waits its turn (first come, first served) up to ``timeout``;
- the most recently used idle connection is taken first, so a steady load keeps
  reusing a small set of warm connections and the others age out after
  ``idle_timeout`` (shorter than common servers' keep-alive, so the upstream rarely
  closes one under a request);
- a connection goes back to the pool only after its response was read whole and both
  sides kept it alive; a response abandoned half-way (the client went away, an
  error) closes it;
- ``timeout`` bounds the connect, the wait for the response head and each wait for
  more of the body, as httpx's timeout did;
- a request that fails on a reused connection before any byte of the answer came
  (the upstream had just closed it) is sent again on a new one, once, when its method
  is idempotent (RFC 9110 9.2.2); a POST is not replayed (an LLM call could be charged
  twice), it is a 502.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import sys
import threading
from typing import Any, Deque, List, Optional, Set, Tuple, Union

from .poll import touch

__all__ = ["Upstream", "UpstreamError", "UpstreamResponse"]

Headers = List[Tuple[bytes, bytes]]

# Body bytes buffered per connection before reading from the upstream pauses: the
# client is slower than the upstream; the kernel's buffers hold the rest.
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# The headers that say where a response's body ends (without them: at the close).
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


class UpstreamError(Exception):
    """The upstream could not be reached, timed out, or broke the exchange."""


class _Stale(UpstreamError):
    """A reused connection was found closed before any byte of the answer arrived."""


class _Connection(asyncio.Protocol):
    """One upstream connection; one exchange at a time."""

    def __init__(self, pool: Upstream) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        # The loop's thread: a loop runs in one thread, so a connection taken in another
        # thread belongs to another loop (a pool shared by two running loops).
        self.thread = threading.get_ident()
        self.transport: Any = None
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        # The deadline of the wait in progress (the answer's head, or more of its
        # body), None between waits; one timer per connection, moved on lazily (see
        # _tick) instead of one made and cancelled per wait.
        self.due: Optional[float] = None
        self.timer: Optional[asyncio.TimerHandle] = None
        self._reset()

    def _reset(self) -> None:
        self.parser: Any = None
        self.head: Optional[asyncio.Future[Tuple[int, Headers]]] = None
        self.headers: Headers = []
        self.status = 0
        self.keep_alive = False
        self.until_close = False
        self.framed = False
        self.got_bytes = False
        self.body: Deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.complete = False
        self.error: Optional[BaseException] = None
        self.waiter: Optional[asyncio.Future[None]] = None
        self.head_only = False

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            # Nothing was asked: an upstream that talks out of turn is not reused.
            self._close()
            return
        self.got_bytes = True
        try:
            parser.feed_data(data)
        except Exception as error:  # httptools.HttpParserError, HttpParserUpgrade
            self._fail(UpstreamError(f"invalid HTTP response from the upstream: {error}"))
            self._close()

    def eof_received(self) -> Optional[bool]:
        self._ended()
        return None

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        self._stop_timer()
        self._ended()

    def pause_writing(self) -> None:  # bodies are bounded by max_body_bytes: buffered
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks ---------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp has checked both: a name is a token, a value has no CR, LF or NUL.
        name = name.lower()
        if name in _FRAMING:
            self.framed = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.parser is None:
            raise ValueError("a second answer to one request")  # stops the parse
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self.headers = []  # an interim answer (100 Continue, 103): the real one follows
            self.framed = False
            return
        self.status = status
        self.keep_alive = bool(self.parser.should_keep_alive())
        self.until_close = not self.framed and status not in (204, 304) and not self.head_only
        if self.head_only:
            self.complete = True
            self.parser = None  # the answer to HEAD has no body, whatever its headers say
        head = self.head
        if head is not None and not head.done():
            head.set_result((status, self.headers))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0:
            return  # the end of an interim answer
        self.complete = True
        self.parser = None
        self._wake()

    # -- the exchange ----------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        head = self.head
        if head is not None and not head.done():
            head.set_exception(error)
        self._wake()

    def _ended(self) -> None:
        """The upstream closed (or half-closed) the connection."""
        self.closed = True
        if self.parser is None or self.complete:
            return
        if self.status and self.until_close:
            self.complete = True  # a body delimited by the end of the connection
            self.parser = None
            self._wake()
        elif not self.got_bytes and self.reused:
            self._fail(_Stale("the upstream closed a kept-alive connection"))
        elif not self.status:
            self._fail(UpstreamError("the upstream closed the connection before answering"))
        else:
            self._fail(UpstreamError("the upstream closed the connection before the end of its answer"))

    def _close(self) -> None:
        self.closed = True
        self._stop_timer()
        if self.transport is not None:
            self.transport.close()

    # -- the deadline ----------------------------------------------------------------------

    def _start_wait(self, timeout: float) -> None:
        loop = self.loop
        due = self.due = loop.time() + timeout
        # A timer still set (for an earlier wait, so earlier than this deadline) is kept:
        # when it fires it finds the new deadline and is set again for it.
        if self.timer is None:
            self.timer = loop.call_at(due, self._tick)

    def _tick(self) -> None:
        self.timer = None
        due = self.due
        if due is None:
            return  # no wait in progress: the timer stops until the next one
        if self.loop.time() + 0.001 < due:  # the loop's timers are in milliseconds
            self.timer = self.loop.call_at(due, self._tick)
            return
        self.due = None
        head = self.head
        if head is not None and not head.done():
            _expire(head)
        else:
            waiter = self.waiter
            if waiter is not None and not waiter.done():
                self._fail(UpstreamError("the upstream sent nothing for the whole timeout"))
                self._close()

    def _stop_timer(self) -> None:
        self.due = None
        timer, self.timer = self.timer, None
        if timer is not None:
            timer.cancel()

    # -- the exchange ----------------------------------------------------------------------

    def send(self, data: bytes, head_only: bool) -> asyncio.Future[Tuple[int, Headers]]:
        # The state is fresh: a new connection, or one reset when it went back idle.
        self.head_only = head_only
        self.parser = self.pool.parser_class(self)
        self.head = self.loop.create_future()
        self.transport.write(data)
        touch(self.loop)  # busy polling, when on: the answer is awaited
        return self.head

    async def read(self, timeout: float) -> bytes:
        body = self.body
        while not body:
            if self.complete:
                return b""  # whole (bytes after it, if any, only cost the connection)
            if self.error is not None:
                raise self.error
            self.waiter = self.loop.create_future()
            self._start_wait(timeout)
            try:
                await self.waiter
            finally:
                self.due = None
                self.waiter = None
        return self.take()

    def take(self) -> bytes:
        """The first piece of the body that arrived (there is one)."""
        chunk = self.body.popleft()
        self.buffered -= len(chunk)
        if self.paused and self.buffered < _LOW_WATER:
            self.paused = False
            self.transport.resume_reading()
        return chunk

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None


class UpstreamResponse:
    """An upstream answer: ``status``, ``headers`` (as received, names in lower case:
    every value, in order), and the body through :meth:`read`. :meth:`close` must follow (the
    connection goes back to the pool only when the answer was read whole)."""

    __slots__ = ("_conn", "_pool", "headers", "status")

    def __init__(self, pool: Upstream, conn: _Connection, status: int, headers: Headers) -> None:
        self._pool = pool
        self._conn: Optional[_Connection] = conn
        self.status = status
        self.headers = headers

    async def read(self) -> bytes:
        """The next piece of the body as it arrives (de-chunked, not decoded); b"" at its
        end. Raises UpstreamError when the upstream cuts it or falls silent for the
        whole timeout."""
        conn = self._conn
        assert conn is not None, "the response was closed"
        if conn.body:  # already here: no wait
            return conn.take()
        return await conn.read(self._pool.timeout)

    @property
    def done(self) -> bool:
        """True once the whole body was read (the next :meth:`read` would return b"")."""
        conn = self._conn
        return conn is not None and conn.complete and not conn.body

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._release(conn, conn.reusable)


class Upstream:
    """A pool of HTTP/1.1 connections to one ``scheme://host:port``."""

    def __init__(
        self,
        scheme: str,
        host: str,
        port: Optional[int],
        *,
        max_connections: int,
        timeout: float,
        idle_timeout: float = 4.0,
    ) -> None:
        import httptools

        self.parser_class = httptools.HttpResponseParser
        self.host = host
        self.port = port or (443 if scheme == "https" else 80)
        default_port = (scheme == "https" and self.port == 443) or (scheme == "http" and self.port == 80)
        name = f"[{host}]" if ":" in host else host
        self.host_header = (name if default_port else f"{name}:{self.port}").encode("ascii")
        self.ssl: Optional[ssl.SSLContext] = _tls_context() if scheme == "https" else None
        self.max_connections = max_connections
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self._idle: Deque[_Connection] = collections.deque()
        self._open = 0  # connections open or opening
        self._waiters: Deque[asyncio.Future[None]] = collections.deque()
        self._all: Set[_Connection] = set()
        self.opened = 0  # connections ever opened (for tests and benchmarks)
        self._closing = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    @property
    def in_use(self) -> int:
        """Connections open or opening (idle ones included)."""
        return self._open

    async def request(
        self, method: str, target: bytes, headers: Union[Headers, bytes], body: bytes
    ) -> UpstreamResponse:
        """Sends one request (``target``: the path and query, as they go on the wire) and
        returns once the answer's head arrived. ``headers``: (name, value) pairs, or
        their lines already written (``b"name: value\\r\\n"`` each); they must not hold
        ``host``, ``content-length`` or ``transfer-encoding``: those are written here."""
        if isinstance(headers, bytes):
            lines = headers
        else:
            lines = b"".join([b"%s: %s\r\n" % (name, value) for name, value in headers])
        if body or method in ("POST", "PUT", "PATCH"):  # a body, or one expected (empty)
            length = b"content-length: %d\r\n\r\n" % len(body)
        else:
            length = b"\r\n"
        data = b"%s %s HTTP/1.1\r\nhost: %s\r\n%s%s%s" % (
            method.encode("ascii"), target, self.host_header, lines, length, body
        )  # fmt: skip
        head_only = method == "HEAD"
        for _ in range(2):
            conn = self._take_idle()
            if conn is None:
                conn = await self._acquire()
            try:
                head = conn.send(data, head_only)
                conn._start_wait(self.timeout)
                status, got = await head
            except _Stale:
                self._release(conn, False)
                if method in _IDEMPOTENT:
                    continue
                raise UpstreamError("the upstream closed a kept-alive connection under the request") from None
            except BaseException:
                self._release(conn, False)
                raise
            finally:
                conn.due = None
            return UpstreamResponse(self, conn, status, got)
        raise UpstreamError("the upstream closed two connections under the request")  # pragma: no cover

    def _take_idle(self) -> Optional[_Connection]:
        """The most recently used idle connection still fit for use, if any."""
        idle = self._idle
        if self._closing:
            return None
        while idle:
            conn = idle.pop()
            # A connection made in a loop that no longer runs (the pool outlived it), or
            # that runs in another thread (another loop), is dropped. (Asked of the
            # connection's loop and the thread: asyncio.get_running_loop costs a system
            # call, getpid, on Python 3.11.)
            loop = conn.loop
            if conn.closed or conn.thread != threading.get_ident() or not loop.is_running():
                self._drop(conn)
                continue
            now = loop.time()
            if now - conn.idle_since > self.idle_timeout:
                self._drop(conn)
                continue
            conn.reused = True
            # The oldest ones have aged out if this one is past the deadline: checked
            # from the other end, one per acquire.
            if idle and now - idle[0].idle_since > self.idle_timeout:
                self._drop(idle.popleft())
            return conn
        return None

    async def _acquire(self) -> _Connection:
        if self._closing:
            raise UpstreamError("the gateway is shutting down")
        conn = self._take_idle()
        if conn is not None:
            return conn
        idle = self._idle
        while self._open >= self.max_connections:
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            timer = self.loop.call_later(self.timeout, _expire, waiter)
            try:
                await waiter
            except BaseException:
                if not waiter.cancelled() and waiter.done() and waiter.exception() is None:
                    self._wake_one()  # the place it was given goes to the next one
                raise
            finally:
                timer.cancel()
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if idle:
                return await self._acquire()
        self._open += 1
        try:
            conn = await self._connect()
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise
        self.opened += 1
        self._all.add(conn)
        return conn

    async def _connect(self) -> _Connection:
        loop = self.loop
        try:
            connect = loop.create_connection(
                lambda: _Connection(self),
                self.host,
                self.port,
                ssl=self.ssl,
                server_hostname=self.host if self.ssl is not None else None,
            )
            if sys.version_info >= (3, 11):
                # Not wait_for: a cancellation that meets the connection's completion
                # makes wait_for raise and drop the connection it made, open (its socket
                # then closes only when collected).
                async with asyncio.timeout(self.timeout):
                    _, conn = await connect
            else:  # pragma: no cover - Python < 3.11
                _, conn = await asyncio.wait_for(connect, self.timeout)
        except asyncio.TimeoutError:
            raise UpstreamError("connecting to the upstream timed out") from None
        except OSError as error:
            raise UpstreamError(f"the upstream could not be reached: {error.strerror or error}") from None
        return conn

    def _release(self, conn: _Connection, reusable: bool) -> None:
        if reusable and not self._closing:
            conn._reset()
            conn.idle_since = conn.loop.time()
            self._idle.append(conn)
            self._wake_one()
        else:
            self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        conn._close()
        self._all.discard(conn)
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        """Closes every connection (the server has finished its requests by then)."""
        self._closing = True
        while self._idle:
            self._drop(self._idle.pop())
        for conn in list(self._all):
            conn._close()
        self._all.clear()
        await asyncio.sleep(0)  # the transports close on the next turn


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(UpstreamError("the upstream did not answer within the timeout"))


def _tls_context() -> ssl.SSLContext:
    try:
        import certifi

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:  # pragma: no cover - certifi comes with httpx
        return ssl.create_default_context()
