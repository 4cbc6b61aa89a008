"""Serving the gateway with uvicorn, with the limits of ``[server]``: what one client may
make the gateway hold.

The gateway runs uvicorn's httptools protocol (llhttp, in C: about a third less CPU per
request than the pure-Python h11; see the README's figures) on uvloop. uvicorn by
itself waits forever for a request's head (a client may open connections and trickle
bytes), and httptools keeps an unfinished head in memory without bound; the gateway's
protocol adds:

- ``max_header_bytes``: a request line and headers still incomplete past it get a 400
  and the connection is closed (a head that arrives whole and is too large gets a
  431 from the app);
- ``header_timeout``: from the moment a connection may send a request (when it opens,
  or when the previous response ends) to the end of that request's head; then the
  connection is closed, with a 408 if part of a request had arrived;
- the same deadline for a request body the client is still sending after it was
  answered early (a 401, 413 or 429 before the body was read): the rest is read and
  discarded, then the connection is closed;
- ``keep_alive_timeout``: an idle connection between requests is closed after it;
- ``max_connections``: beyond it, new requests get a 503 (uvicorn's
  ``limit_concurrency``), and the upstream connection pool has as many connections;
- ``body_timeout`` and ``max_body_bytes`` are enforced by the app itself (408, 413).

No websockets (the gateway does not serve them), no ``server`` header, and
``X-Forwarded-For`` is not read by uvicorn (``proxy_headers=False``). The request
target reaches the app exactly as sent (httptools' URL parser would keep only the path
of ``GET http://host/x`` and drop a ``#fragment``), and a request llhttp cannot parse
gets a problem+json 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import os
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..adapters.llm import ON_DISCONNECT
from . import poll
from .app import Gateway, build_app

__all__ = ["protocol_class", "run", "uvicorn_config"]

log = logging.getLogger("nexus_limits.gateway")


# A response's writes of one event-loop turn go out as one (see _Coalesced), up to this
# many bytes; past it they are written at once, so the transport's flow control sees them.
_COALESCE_BYTES = 64 * 1024


class _Coalesced:
    """A connection's transport whose writes within one event-loop turn are sent with
    one system call, followed by the access log lines of that turn.

    uvicorn writes a response's head, its body and the end of its chunked body with
    three calls; on loopback each send costs more than the rest of the turn (the
    kernel delivers the bytes to the reader inline). Joined, they are one. uvicorn
    logs a response's line just before writing its head: held here, the line is
    written once the response is on its way, not before. A response that ends is sent
    at once (:meth:`flush`), not at the end of the turn."""

    __slots__ = ("_handle", "_logs", "_loop", "_parts", "_size", "_transport")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._parts: Optional[List[bytes]] = None
        self._size = 0
        self._handle: Optional[asyncio.Handle] = None
        self._logs: Optional[List[Tuple[logging.Logger, str, Tuple[Any, ...]]]] = None

    def _schedule(self) -> None:
        if self._handle is None:
            self._handle = self._loop.call_soon(self._flush)

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._parts is None:
            self._parts = [data]
            self._size = len(data)
        else:
            self._parts.append(data)
            self._size += len(data)
        if self._size >= _COALESCE_BYTES:
            self._write()
        else:
            self._schedule()

    def log(self, logger: logging.Logger, msg: str, args: Tuple[Any, ...]) -> None:
        """An access log line, written after this turn's bytes."""
        if self._logs is None:
            self._logs = [(logger, msg, args)]
        else:
            self._logs.append((logger, msg, args))
        self._schedule()

    def _write(self) -> None:
        parts, self._parts = self._parts, None
        if parts and not self._transport.is_closing():
            self._transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def _flush(self) -> None:
        self._handle = None
        self._drain()

    def _drain(self) -> None:
        self._write()
        logs, self._logs = self._logs, None
        for logger, msg, args in logs or ():
            try:
                _log_access(logger, msg, args)
            except Exception:  # a broken log handler must not break the connection
                log.exception("could not write an access log line")

    def flush(self) -> None:
        """Sends what this turn wrote so far (a response that ended), and its log lines."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()  # nothing left for it (and the loop need not turn for it)
        if self._parts is not None or self._logs is not None:
            self._drain()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return bool(self._transport.is_closing())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


# uvicorn's default access line format (its LOGGING_CONFIG), which _log_access writes
# itself when it is the one in force.
_ACCESS_FORMAT = '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s'
_STATUS_TEXT: Dict[int, str] = {}


def _status_text(status: int) -> str:
    text = _STATUS_TEXT.get(status)
    if text is None:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        text = f"{status} {phrase}"
        if len(_STATUS_TEXT) < 1000:
            _STATUS_TEXT[status] = text
    return text


def _log_access(logger: logging.Logger, msg: str, args: Tuple[Any, ...]) -> None:
    """Logs uvicorn's access line ``msg % args`` on ``logger``, as ``logger.info`` would.

    With uvicorn's own setup in force (one stream handler, its AccessFormatter with the
    default format and no colours, no filters), the line it would format is written to
    that stream directly: the same bytes, for a fifth of the time (no record, no copy of
    it, no formatter). Any other setup gets a record, without the look-up of the
    caller's frame."""
    if not logger.isEnabledFor(logging.INFO):
        return
    handlers = logger.handlers
    if len(handlers) == 1 and not logger.propagate and not logger.filters and len(args) == 5:
        handler = handlers[0]
        formatter = handler.formatter
        if (
            type(handler) is logging.StreamHandler
            and handler.level <= logging.INFO
            and not handler.filters
            and formatter is not None
            and type(formatter).__name__ == "AccessFormatter"
            and type(formatter).__module__ == "uvicorn.logging"
            and getattr(formatter, "_fmt", None) == _ACCESS_FORMAT
            and getattr(formatter, "use_colors", True) is False
        ):
            client, method, path, version, status = args
            line = f'INFO:     {client} - "{method} {path} HTTP/{version}" {_status_text(int(status))}'
            with handler.lock or contextlib.nullcontext():
                stream = handler.stream
                stream.write(line + handler.terminator)
                if stream and hasattr(stream, "flush"):  # StreamHandler.flush, in the lock held
                    stream.flush()
            return
    logger.handle(logger.makeRecord(logger.name, logging.INFO, "", 0, msg, args, None))


class _AccessLog:
    """uvicorn's access logger as one connection's protocol sees it: ``info`` hands the
    line to the connection's transport (see _Coalesced)."""

    __slots__ = ("_logger", "_out")

    def __init__(self, logger: logging.Logger, out: _Coalesced) -> None:
        self._logger = logger
        self._out = out

    def info(self, msg: str, *args: Any) -> None:
        self._out.log(self._logger, msg, args)


def _problem(status: int, reason: str, detail: str) -> bytes:
    """A whole HTTP/1.1 problem+json answer that closes the connection."""
    body = json.dumps({"type": "about:blank", "title": reason, "status": status, "detail": detail}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "content-type: application/problem+json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode("ascii")
    return head + body


# What urllib.parse.quote leaves as it is (its always-safe characters and "/"): a path
# made of these only is logged as it is, without the call.
_QUOTE_SAFE = re.compile(r"[A-Za-z0-9_.\-~/]*")
# A response's header lines as uvicorn accepts them, names lower-cased, checked with one
# match over all of them: a name without the characters uvicorn's HEADER_RE refuses
# (controls, separators, space; not empty), a value without a control character other
# than a tab. A value holding CR LF and what looks like another line would match too:
# the number of LFs must also be the number of headers (so no header can be split or
# injected).
_HEADER_LINES = re.compile(rb'(?:[^\x00-\x1f\x7f()<>@,;:\[\]={} \t\\"]+: [^\x00-\x08\x0a-\x1f\x7f]*\r\n)*')
_HEADER_NAME = re.compile(rb'[\x00-\x1f\x7f()<>@,;:\[\]={} \t\\"]')
_HEADER_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# The response headers the writer acts on (framing, and a close asked for).
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})
# The server's default headers (its date, refreshed every second, and any configured)
# as header lines: one list at a time, shared by every connection.
_defaults: List[Any] = [None, b""]


def _default_lines(headers: List[Tuple[bytes, bytes]]) -> bytes:
    if headers is not _defaults[0]:
        lines = b"".join([b"%s: %s\r\n" % (name.lower(), value) for name, value in headers])
        if lines.count(b"\n") != len(headers) or _HEADER_LINES.fullmatch(lines) is None:
            raise _bad_header(headers)
        _defaults[1] = lines
        _defaults[0] = headers
    return _defaults[1]  # type: ignore[no-any-return]


def _bad_header(headers: Any) -> RuntimeError:
    """uvicorn's error for the first invalid header of ``headers``."""
    for name, value in headers:
        if not name or _HEADER_NAME.search(name):
            return RuntimeError("Invalid HTTP header name.")
        if _HEADER_VALUE.search(value):
            return RuntimeError("Invalid HTTP header value.")
    return RuntimeError("Invalid HTTP header value.")  # pragma: no cover - a default header


def protocol_class(header_timeout: float, max_header_bytes: int, busy_poll: float = 0.0) -> Any:
    """uvicorn's httptools protocol (llhttp, in C) with what it lacks for a server that
    faces any client: a bound on the request head, a deadline for each head (and for a
    body still arriving after its request was answered), the request target exactly as
    sent, refusals as problem+json, and the response's writes joined.

    The request's cycle (:class:`RequestResponseCycle`) keeps uvicorn's behaviour with
    less work per request: a response head is checked with one match over all its
    lines (the same characters refused as uvicorn's per-header checks, with the same
    errors), the access line's fields are made without ``urllib``'s quoting when the
    path needs none, and the connection's deadlines (the head's, the keep-alive's) are
    one timer that is moved forward, not a timer made and cancelled per request.

    ``busy_poll`` (seconds, 0: off): after a request's bytes arrive and after its
    response ends, the loop polls for that long before it sleeps (see
    :mod:`nexus_limits.gateway.poll`)."""
    from urllib.parse import quote, unquote

    import httptools
    from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, service_unavailable
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

    timed_out = _problem(408, "Request Timeout", f"the request head did not arrive within {header_timeout:g} s")
    invalid = _problem(400, "Bad Request", "the request is not valid HTTP/1.1 (its line, a header or its framing)")
    too_large = _problem(400, "Bad Request", f"the request line and headers are larger than {max_header_bytes} bytes")
    access_msg = '%s - "%s %s HTTP/%s" %d'

    class Cycle(RequestResponseCycle):
        """uvicorn's request/response cycle with a leaner ``send`` (the same messages,
        bytes, checks and errors)."""

        def __init__(self, protocol: Any, keep_alive: bool, expect_100_continue: bool) -> None:
            self.protocol = protocol
            self.scope = protocol.scope
            self.transport = protocol.transport
            self.out: _Coalesced = protocol.transport
            self.flow = protocol.flow
            self.logger = protocol.logger
            self.access_logger = protocol.access_logger
            self.access_log = protocol.access_log
            self.default_headers = protocol.server_state.default_headers
            self.message_event = asyncio.Event()
            self.on_response = protocol.on_response_complete
            self.disconnected = False
            self.keep_alive = keep_alive
            self.waiting_for_100_continue = expect_100_continue
            self.body = bytearray()
            self.more_body = True
            self.response_started = False
            self.response_complete = False
            self.chunked_encoding: Optional[bool] = None
            self.expected_content_length = 0

        def _log(self, status: int) -> None:
            scope = self.scope
            client = scope.get("client")
            if client is self.protocol.client and client:
                addr = self.protocol.client_text
            else:
                addr = "%s:%d" % client if client else ""  # noqa: UP031 - as uvicorn writes it
            path = scope["path"]
            if not _QUOTE_SAFE.fullmatch(path):
                path = quote(path)
            query = scope["query_string"]
            if query:
                path = "{}?{}".format(path, query.decode("ascii"))
            self.access_logger.info(access_msg, addr, scope["method"], path, scope["http_version"], status)

        async def send(self, message: Any) -> None:
            if self.flow.write_paused and not self.disconnected:
                await self.flow.drain()
            if self.disconnected:
                return
            if not self.response_started:
                if message["type"] != "http.response.start":
                    raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{message['type']}'.")
                self.response_started = True
                self.waiting_for_100_continue = False
                status = message["status"]
                headers = message.get("headers", ())
                if self.access_log:
                    self._log(status)
                status_line = STATUS_LINE[status]
                defaults = _default_lines(self.default_headers)
                parts: List[bytes] = []
                has_connection_close = False
                for name, value in headers:
                    name = name.lower()
                    if name in _FRAMING:
                        if name == b"content-length":
                            if self.chunked_encoding is None:
                                self.expected_content_length = int(value.decode())
                                self.chunked_encoding = False
                        elif name == b"transfer-encoding":
                            if value.lower() == b"chunked":
                                self.expected_content_length = 0
                                self.chunked_encoding = True
                        elif b"close" in [token.lower().strip() for token in value.split(b",")]:
                            self.keep_alive = False
                            has_connection_close = True
                    parts += (name, b": ", value, b"\r\n")
                lines = b"".join(parts)
                if lines.count(b"\n") != len(parts) >> 2 or _HEADER_LINES.fullmatch(lines) is None:
                    raise _bad_header(headers)
                extra = b""
                if not self.keep_alive and not has_connection_close:
                    extra = b"connection: close\r\n"
                if self.chunked_encoding is None and self.scope["method"] != "HEAD" and status not in (204, 304):
                    self.chunked_encoding = True
                    extra += b"transfer-encoding: chunked\r\n"
                self.transport.write(b"%s%s%s%s\r\n" % (status_line, defaults, lines, extra))
            elif not self.response_complete:
                if message["type"] != "http.response.body":
                    raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{message['type']}'.")
                body = message.get("body", b"")
                more_body = message.get("more_body", False)
                if self.scope["method"] == "HEAD":
                    self.expected_content_length = 0
                elif self.chunked_encoding:
                    if body:
                        self.transport.write(b"%x\r\n%s\r\n" % (len(body), body))
                    if not more_body:
                        self.transport.write(b"0\r\n\r\n")
                else:
                    num_bytes = len(body)
                    if num_bytes > self.expected_content_length:
                        raise RuntimeError("Response content longer than Content-Length")
                    self.expected_content_length -= num_bytes
                    self.transport.write(body)
                if not more_body:
                    if self.expected_content_length != 0:
                        raise RuntimeError("Response content shorter than Content-Length")
                    self.response_complete = True
                    self.message_event.set()
                    if not self.keep_alive:
                        self.transport.close()
                    else:
                        # The whole response goes now, not at the end of the turn.
                        self.out.flush()
                    self.on_response()
            else:
                kind = message["type"]
                raise RuntimeError(f"Unexpected ASGI message '{kind}' sent, after response already completed.")

    class Protocol(HttpToolsProtocol):
        # The connection's one timer and when it fires; the head's deadline (the next
        # request's head, or the rest of an early-answered body), and the keep-alive's
        # (no byte since the last response ended): None when not running.
        _timer: Optional[asyncio.TimerHandle] = None
        _timer_at = 0.0
        _head_due: Optional[float] = None
        _idle_due: Optional[float] = None
        # Between requests and within a head (True), or within a request's body.
        _in_head = True
        # Bytes of the head that is arriving, and the last 3 bytes seen (the end of the
        # head, CRLF CRLF, may straddle two reads).
        _head_bytes = 0
        _tail = b""
        # No byte of the coming head was seen yet.
        _fresh = True
        # Callbacks to run when the connection is lost (the ON_DISCONNECT extension),
        # and whether it was.
        _watchers: Optional[List[Callable[[], None]]] = None
        _lost = False
        client_text = ""
        poller: Optional[poll.BusyPoll] = None

        def _schedule(self, due: float) -> None:
            # A timer already set to fire by then stays: when it fires it looks again.
            timer = self._timer
            if timer is not None:
                if self._timer_at <= due:
                    return
                timer.cancel()
            self._timer_at = due
            self._timer = self.loop.call_at(due, self._tick)

        def _tick(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            # A millisecond early counts: the loop's timers are in milliseconds.
            now = self.loop.time() + 0.001
            head, idle = self._head_due, self._idle_due
            if head is not None and now >= head:
                self._head_due = self._idle_due = None
                if self._in_head and self._head_bytes:
                    self.transport.write(timed_out)  # part of a request head came: say why
                self.transport.close()
            elif idle is not None and now >= idle:
                self._head_due = self._idle_due = None
                self.transport.close()
            elif head is not None or idle is not None:
                self._schedule(min(d for d in (head, idle) if d is not None))

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.poller = poll.install(self.loop, busy_poll)
            out = _Coalesced(transport, self.loop)
            self.transport = out  # type: ignore[assignment]
            if self.client:
                self.client_text = "%s:%d" % self.client  # noqa: UP031 - as uvicorn writes it
            if self.access_log:
                self.access_logger = _AccessLog(self.access_logger, out)  # type: ignore[assignment]
            due = self._head_due = self.loop.time() + header_timeout
            self._schedule(due)

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._head_due = self._idle_due = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._lost = True
            watchers, self._watchers = self._watchers, None
            super().connection_lost(exc)
            for callback in watchers or ():
                try:
                    callback()
                except Exception:  # one request's watcher must not stop the others'
                    log.exception("a disconnect callback failed")

        def _on_disconnect(self, callback: Callable[[], None]) -> Callable[[], None]:
            """The ON_DISCONNECT extension: ``callback`` runs when the connection is
            lost (at once, on the next turn, if it already was); returns what forgets
            it. The LLM middleware watches its clients this way instead of with a task
            waiting on ``receive()``."""
            if self._lost:
                return self.loop.call_soon(callback).cancel
            # As receive() does while it waits: read on, so that a close is seen.
            self.flow.resume_reading()
            watchers = self._watchers
            if watchers is None:
                watchers = self._watchers = []
            watchers.append(callback)

            def forget() -> None:
                if callback in watchers:
                    watchers.remove(callback)

            return forget

        def data_received(self, data: bytes) -> None:
            self._idle_due = None  # a byte came: the keep-alive wait is over
            if self.poller is not None:
                self.poller.touch()  # the upstream's answer is next
            if self._fresh and data:
                self._fresh = False
                # llhttp knows methods in upper case only; the app upper-cases a method
                # (and forwards it so), as it did under h11.
                space = data.find(b" ", 0, 24)
                if space > 0 and not data[:space].isupper():
                    data = data[:space].upper() + data[space:]
            if self._in_head and data.find(b"\r\n\r\n") < 0 and (self._tail + data[:3]).find(b"\r\n\r\n") < 0:
                # httptools keeps a head it has not finished in memory without bound:
                # a head still incomplete past the limit is refused here. (One that
                # arrives whole is measured by the app: a 431.)
                self._head_bytes += len(data)
                self._tail = (self._tail + data)[-3:]
                if self._head_bytes > max_header_bytes:
                    self._unset_keepalive_if_required()
                    self.transport.write(too_large)
                    self.transport.close()
                    return
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():  # pragma: no cover - no websockets here
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()

        def send_400_response(self, msg: str) -> None:
            # llhttp refused the request (a malformed line or header, a framing
            # conflict): a problem+json answer naming it.
            self.transport.write(invalid)
            self.transport.close()

        def on_headers_complete(self) -> None:
            parser = self.parser
            version = parser.get_http_version()
            if version not in ("1.0", "1.1"):
                # HTTP/0.9 (a request line without a version): stops the parse, and
                # uvicorn answers it through send_400_response.
                raise ValueError("not an HTTP/1.x request")
            self._head_due = None  # the app's own deadlines take over
            self._in_head = False
            self._head_bytes = 0
            self._tail = b""
            scope = self.scope
            scope["method"] = parser.get_method().decode("ascii")
            if version != "1.1":
                scope["http_version"] = version
            if self._upgrading():  # pragma: no cover - no websockets here
                return
            # The target exactly as sent (as uvicorn's h11 protocol gives it): the app
            # decides on it, and refuses what is not an origin-form path. httptools'
            # URL parser would keep only the path of an absolute URL and drop a
            # fragment, so it is not used.
            raw_path, _, query = self.url.partition(b"?")
            scope["raw_path"] = raw_path
            scope["query_string"] = query
            path = raw_path.decode("latin-1")
            scope["path"] = unquote(path) if "%" in path else path
            extensions: Any = {ON_DISCONNECT: self._on_disconnect}
            scope["extensions"] = extensions
            limit = self.limit_concurrency
            if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
                app = service_unavailable
                self.logger.warning("Exceeded concurrency limit.")
            else:
                app = self.app
            existing = self.cycle
            self.cycle = Cycle(self, version != "1.0" and parser.should_keep_alive(), self.expect_100_continue)
            if existing is None or existing.response_complete:
                self._start_asgi_task(self.cycle, app)
            else:
                # A pipelined request waits for the one before it to be answered.
                self.flow.pause_reading()
                self.pipeline.appendleft((self.cycle, app))

        def _upgrading(self) -> bool:
            # uvicorn's test, its costly part only with a websocket protocol configured.
            return self.ws_protocol_class is not None and self.parser.should_upgrade() and self._should_upgrade()

        def on_body(self, body: bytes) -> None:
            cycle = self.cycle
            if cycle.response_complete or self._upgrading():
                return
            cycle.body += body
            if len(cycle.body) > HIGH_WATER_LIMIT:
                self.flow.pause_reading()
            cycle.message_event.set()

        def on_message_complete(self) -> None:
            cycle = self.cycle
            if not cycle.response_complete and not self._upgrading():
                cycle.more_body = False
                cycle.message_event.set()
            self._in_head = self._fresh = True

        def on_response_complete(self) -> None:
            self.server_state.total_requests += 1
            if self.transport.is_closing():
                return
            if self.poller is not None:
                self.poller.touch()  # the client's next request is next
            self.flow.resume_reading()
            if self.pipeline:
                cycle, app = self.pipeline.pop()
                self._start_asgi_task(cycle, app)
                return
            # Either the next request's head or the rest of an early-answered body is
            # awaited (both within the head's deadline), and the connection is idle
            # until a byte comes (the keep-alive's).
            now = self.loop.time()
            self._idle_due = now + self.timeout_keep_alive
            if self.cycle is None or self.cycle.response_complete:
                self._head_due = now + header_timeout
                self._schedule(min(self._head_due, self._idle_due))
            else:  # pragma: no cover - a pipelined request has already started
                self._schedule(self._idle_due)

    return Protocol


def uvicorn_config(app: Gateway, host: Optional[str] = None, port: Optional[int] = None, **overrides: Any) -> Any:
    """The ``uvicorn.Config`` that serves ``app`` with its ``[server]`` limits."""
    import uvicorn

    cfg = app.cfg
    options: Any = {
        "host": host or cfg.host,
        "port": cfg.port if port is None else port,
        "http": protocol_class(cfg.header_timeout, cfg.max_header_bytes, cfg.busy_poll_us / 1e6),
        "ws": "none",
        "lifespan": "on",
        "proxy_headers": False,
        "server_header": False,
        "limit_concurrency": cfg.max_connections,
        "timeout_keep_alive": cfg.keep_alive_timeout,
        "access_log": cfg.access_log,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


def run(config_path: str, host: Optional[str] = None, port: Optional[int] = None) -> None:  # pragma: no cover
    """Serves the gateway of ``config_path`` until interrupted: in this process, or with
    ``[server] workers = N`` (N > 1) in N worker processes sharing the port."""
    import uvicorn

    from .config import load_config

    cfg = load_config(config_path)
    _check_file_limit(cfg.max_connections)
    if cfg.workers > 1:
        Supervisor(config_path, cfg.workers, host or cfg.host, cfg.port if port is None else port).run()
        return
    app = build_app(config_path)
    uvicorn.Server(uvicorn_config(app, host, port)).run()


def _serve_worker(config_path: str, host: Optional[str], port: Optional[int], sock: Any) -> None:  # pragma: no cover
    """One worker process: its own app (and so its own upstream pool and backend
    clients) on the listening socket the supervisor opened."""
    import uvicorn

    app = build_app(config_path)
    uvicorn.Server(uvicorn_config(app, host, port)).run(sockets=[sock])


class Supervisor:
    """Runs ``workers`` gateway processes on one listening socket (opened here, before
    any worker starts, so that none is ever refused a connection by a worker still
    starting). The kernel hands each new connection to one of them.

    Signals: SIGINT and SIGTERM stop the workers (each finishes its requests, as
    uvicorn does) and then this process; SIGHUP is passed to every worker, which
    reloads the config (``[gateway] reload``). A worker that dies is started again (at
    most once per ``quick`` seconds); one that exits with an error within ``quick``
    seconds of its start (a startup failure, which would only repeat) stops the
    gateway with an error instead."""

    def __init__(self, config_path: str, workers: int, host: str, port: int, quick: float = 3.0) -> None:
        self.config_path = config_path
        self.workers = workers
        self.host = host
        self.port = port
        self.quick = quick
        self.stopping = False
        self.failed = False

    def run(self) -> None:  # pragma: no cover - exercised through real processes in the tests
        import multiprocessing
        import signal
        import time

        import uvicorn

        from .app import create_shared_store
        from .config import load_config

        # Made before any worker starts (with the ttl the limits need); each worker opens
        # it by name. Removed when the gateway stops, as in-process counters are.
        store = create_shared_store(load_config(self.config_path))
        sock = uvicorn.Config("nexus_limits.gateway:Gateway", host=self.host, port=self.port).bind_socket()
        context = multiprocessing.get_context("spawn")
        procs: List[Any] = []
        started: List[float] = []

        def start(i: int) -> None:
            proc = context.Process(
                target=_serve_worker,
                args=(self.config_path, self.host, self.port, sock),
                name=f"nexus-limits-gateway-{i}",
                daemon=False,
            )
            # A worker ignores SIGHUP until its app installs the reload handler (the
            # disposition passes through exec): one sent while it starts would kill it.
            previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
            try:
                proc.start()
            finally:
                signal.signal(signal.SIGHUP, previous)
            if i < len(procs):
                procs[i], started[i] = proc, time.monotonic()
            else:
                procs.append(proc)
                started.append(time.monotonic())

        def stop(signum: int, _frame: Any) -> None:
            self.stopping = True

        def hup(_signum: int, _frame: Any) -> None:
            for proc in procs:
                if proc.is_alive() and proc.pid is not None:
                    os.kill(proc.pid, signal.SIGHUP)

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGHUP, hup)
        log.info("nexus-limits gateway: %d workers on %s:%d", self.workers, self.host, self.port)
        for i in range(self.workers):
            start(i)
        try:
            while not self.stopping:
                time.sleep(0.2)
                for i, proc in enumerate(procs):
                    if proc.is_alive() or self.stopping:
                        continue
                    quick = time.monotonic() - started[i] < self.quick
                    if quick and (proc.exitcode or 0) > 0:
                        log.error("gateway worker %d exited with %s at its start: stopping", i, proc.exitcode)
                        self.failed = self.stopping = True
                        break
                    if quick:
                        continue  # killed by a signal just after its start: not in a tight loop
                    log.warning("gateway worker %d exited with %s; starting another", i, proc.exitcode)
                    start(i)
        finally:
            for proc in procs:
                if proc.is_alive() and proc.pid is not None:
                    os.kill(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            for proc in procs:
                proc.join(max(0.0, deadline - time.monotonic()))
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
            sock.close()
            if store is not None:
                store.unlink()
        if self.failed:
            raise SystemExit(1)


def _check_file_limit(connections: int) -> None:  # pragma: no cover - platform dependent
    try:
        import resource
    except ImportError:
        return
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    # One descriptor per client connection and one per upstream connection.
    if soft != resource.RLIM_INFINITY and soft < 2 * connections + 64:
        log.warning(
            "max_connections = %d needs about %d open files; the limit is %d (raise it with ulimit -n)",
            connections,
            2 * connections + 64,
            soft,
        )
