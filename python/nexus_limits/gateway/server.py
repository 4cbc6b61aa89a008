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
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..adapters.llm import ON_DISCONNECT
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
    written once the response is on its way, not before."""

    __slots__ = ("_logs", "_loop", "_parts", "_scheduled", "_size", "_transport")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._parts: Optional[List[bytes]] = None
        self._size = 0
        self._scheduled = False
        self._logs: Optional[List[Tuple[logging.Logger, str, Tuple[Any, ...]]]] = None

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

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
        self._scheduled = False
        self._write()
        logs, self._logs = self._logs, None
        for logger, msg, args in logs or ():
            try:
                _log_access(logger, msg, args)
            except Exception:  # a broken log handler must not break the connection
                log.exception("could not write an access log line")

    def close(self) -> None:
        self._flush()
        self._transport.close()

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
                handler.stream.write(line + handler.terminator)
                handler.flush()
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


def protocol_class(header_timeout: float, max_header_bytes: int) -> Any:
    """uvicorn's httptools protocol (llhttp, in C) with what it lacks for a server that
    faces any client: a bound on the request head, a deadline for each head (and for a
    body still arriving after its request was answered), the request target exactly as
    sent, refusals as problem+json, and the response's writes joined."""
    from urllib.parse import unquote

    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    timed_out = _problem(408, "Request Timeout", f"the request head did not arrive within {header_timeout:g} s")
    invalid = _problem(400, "Bad Request", "the request is not valid HTTP/1.1 (its line, a header or its framing)")
    too_large = _problem(400, "Bad Request", f"the request line and headers are larger than {max_header_bytes} bytes")

    class Protocol(HttpToolsProtocol):
        _deadline: Optional[asyncio.TimerHandle] = None
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

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if self._in_head and self._head_bytes:
                self.transport.write(timed_out)  # part of a request head came: say why
            self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            out = _Coalesced(transport, self.loop)
            self.transport = out  # type: ignore[assignment]
            if self.access_log:
                self.access_logger = _AccessLog(self.access_logger, out)  # type: ignore[assignment]
            self._arm()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._disarm()
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
            if self._fresh and data:
                self._fresh = False
                # llhttp knows methods in upper case only; the app upper-cases a method
                # (and forwards it so), as it did under h11.
                space = data.find(b" ", 0, 24)
                if space > 0 and not data[:space].isupper():
                    data = data[:space].upper() + data[space:]
            if self._in_head:
                # httptools keeps a head it has not finished in memory without bound:
                # a head still incomplete past the limit is refused here. (One that
                # arrives whole is measured by the app: a 431.)
                if (self._tail + data).find(b"\r\n\r\n") < 0:
                    self._head_bytes += len(data)
                    self._tail = data[-3:]
                    if self._head_bytes > max_header_bytes:
                        self._unset_keepalive_if_required()
                        self.transport.write(too_large)
                        self.transport.close()
                        return
            super().data_received(data)

        def send_400_response(self, msg: str) -> None:
            # llhttp refused the request (a malformed line or header, a framing
            # conflict): a problem+json answer naming it.
            self.transport.write(invalid)
            self.transport.close()

        def on_headers_complete(self) -> None:
            if self.parser.get_http_version() not in ("1.0", "1.1"):
                # HTTP/0.9 (a request line without a version): stops the parse, and
                # uvicorn answers it through send_400_response.
                raise ValueError("not an HTTP/1.x request")
            self._disarm()  # the app's own deadlines take over
            self._in_head = False
            self._head_bytes = 0
            self._tail = b""
            # The target exactly as sent (as uvicorn's h11 protocol gives it): the app
            # decides on it, and refuses what is not an origin-form path. httptools'
            # URL parser would keep only the path of an absolute URL and drop a
            # fragment, so it is not used.
            target = self.url
            self.url = b"/"
            super().on_headers_complete()
            raw_path, _, query = target.partition(b"?")
            scope = self.scope
            scope["raw_path"] = raw_path
            scope["query_string"] = query
            path = raw_path.decode("latin-1")
            scope["path"] = unquote(path) if "%" in path else path
            extensions: Any = {ON_DISCONNECT: self._on_disconnect}
            scope["extensions"] = extensions

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head = self._fresh = True

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return  # closed, or a pipelined request has already started
            # Either the next request's head or the rest of an early-answered body is
            # awaited; both within the deadline.
            self._arm()

    return Protocol


def uvicorn_config(app: Gateway, host: Optional[str] = None, port: Optional[int] = None, **overrides: Any) -> Any:
    """The ``uvicorn.Config`` that serves ``app`` with its ``[server]`` limits."""
    import uvicorn

    cfg = app.cfg
    options: Any = {
        "host": host or cfg.host,
        "port": cfg.port if port is None else port,
        "http": protocol_class(cfg.header_timeout, cfg.max_header_bytes),
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
