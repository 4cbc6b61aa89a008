"""Serving the gateway with uvicorn, with the limits of ``[server]``: what one client may
make the gateway hold.

uvicorn by itself waits forever for a request's head (a client may open connections
and trickle bytes), and its httptools parser does not bound the head's size. The
gateway runs uvicorn's h11 protocol with:

- ``max_header_bytes``: the request line and headers (h11's bound; beyond it a 400);
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
``X-Forwarded-For`` is not read by uvicorn (``proxy_headers=False``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Optional

from .app import Gateway, build_app

__all__ = ["protocol_class", "run", "uvicorn_config"]

log = logging.getLogger("nexus_limits.gateway")


def _timeout_answer(seconds: float) -> bytes:
    body = json.dumps(
        {
            "type": "about:blank",
            "title": "Request Timeout",
            "status": 408,
            "detail": f"the request head did not arrive within {seconds:g} s",
        }
    ).encode()
    head = (
        b"HTTP/1.1 408 Request Timeout\r\n"
        b"content-type: application/problem+json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"connection: close\r\n\r\n"
    )
    return head + body


def protocol_class(header_timeout: float) -> Any:
    """uvicorn's h11 protocol with a deadline for each request's head (and for a body
    still arriving after its request was answered)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    answer = _timeout_answer(header_timeout)

    class Protocol(H11Protocol):
        _deadline: Optional[asyncio.TimerHandle] = None
        # The scope of the last request whose head arrived when the deadline was set:
        # a new head makes self.scope another one.
        _waiting_for: Any = None

        def _arm(self) -> None:
            self._disarm()
            self._waiting_for = self.scope
            self._deadline = self.loop.call_later(header_timeout, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
                self.transport.write(answer)  # part of a request head came: say why
            self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._deadline is not None and self.scope is not self._waiting_for:
                # A new request's head is complete: the app's own deadlines take over.
                self._disarm()

        def on_response_complete(self) -> None:
            before = self.scope
            super().on_response_complete()
            if self.transport.is_closing() or self.scope is not before:
                return  # closed, or a pipelined request has already started
            # Either the next request's head or the rest of an early-answered body is
            # awaited; both within the deadline.
            self._arm()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Protocol


def uvicorn_config(app: Gateway, host: Optional[str] = None, port: Optional[int] = None, **overrides: Any) -> Any:
    """The ``uvicorn.Config`` that serves ``app`` with its ``[server]`` limits."""
    import uvicorn

    cfg = app.cfg
    options: Any = {
        "host": host or cfg.host,
        "port": cfg.port if port is None else port,
        "http": protocol_class(cfg.header_timeout),
        "ws": "none",
        "lifespan": "on",
        "proxy_headers": False,
        "server_header": False,
        "limit_concurrency": cfg.max_connections,
        "timeout_keep_alive": cfg.keep_alive_timeout,
        "h11_max_incomplete_event_size": cfg.max_header_bytes,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


def run(config_path: str, host: Optional[str] = None, port: Optional[int] = None) -> None:  # pragma: no cover
    """Serves the gateway of ``config_path`` until interrupted."""
    import uvicorn

    app = build_app(config_path)
    _check_file_limit(app.cfg.max_connections)
    uvicorn.Server(uvicorn_config(app, host, port)).run()


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
