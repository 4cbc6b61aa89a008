"""What the gateway's security tests stand on: an upstream that records exactly what
reached it and answers with the headers a real provider sends; the gateway served by
real uvicorn exactly as ``nexus-limits gateway`` serves it; raw HTTP/1.1 over a socket
for the requests httpx would normalise away."""

from __future__ import annotations

import asyncio
import json
import socket
import textwrap
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from support.servers import free_port

# What a real provider puts on its answers, and what a client must never see of it.
PROVIDER_HEADERS: List[Tuple[bytes, bytes]] = [
    (b"date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
    (b"server", b"cloudflare"),
    (b"openai-organization", b"org-operator-secret"),
    (b"openai-project", b"proj_operator"),
    (b"anthropic-organization-id", b"0f0f0f0f-operator"),
    (b"x-ratelimit-limit-requests", b"10000"),
    (b"x-ratelimit-remaining-requests", b"9999"),
    (b"x-ratelimit-limit-tokens", b"2000000"),
    (b"anthropic-ratelimit-requests-remaining", b"3999"),
    (b"retry-after", b"7"),
    (b"set-cookie", b"__cf_bm=upstream-session; path=/; HttpOnly"),
    (b"set-cookie", b"_cfuvid=second; path=/"),
    (b"alt-svc", b'h3=":443"; ma=86400'),
    (b"connection", b"keep-alive, x-upstream-hop"),
    (b"x-upstream-hop", b"for-the-gateway-only"),
    (b"keep-alive", b"timeout=5"),
    (b"x-request-id", b"req_123"),
]


class Upstream:
    """An ASGI upstream that records every request (method, raw path, query, headers,
    body) and answers JSON with :data:`PROVIDER_HEADERS`. ``/slow/<seconds>`` waits
    first; ``/status/<code>`` answers with that status; LLM paths answer with usage."""

    def __init__(self) -> None:
        self.seen: List[Dict[str, Any]] = []
        self.headers = list(PROVIDER_HEADERS)
        self.in_flight = 0
        self.max_in_flight = 0

    def last(self) -> Dict[str, Any]:
        return self.seen[-1]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.seen.append(
            {
                "method": scope["method"],
                "raw_path": scope["raw_path"],
                "query": scope["query_string"],
                "headers": list(scope["headers"]),
                "body": body,
            }
        )
        path = scope["path"]
        status = 200
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if path.startswith("/slow/"):
                await asyncio.sleep(float(path.rsplit("/", 1)[1]))
            if path.startswith("/status/"):
                status = int(path.rsplit("/", 1)[1])
        finally:
            self.in_flight -= 1
        if path in ("/v1/chat/completions", "/v1/embeddings"):
            doc: Dict[str, Any] = {
                "object": "chat.completion",
                "choices": [{"message": {"content": "hi"}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }
        else:
            doc = {"ok": True, "path": path}
        headers = [(b"content-type", b"application/json"), *self.headers]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(doc).encode()})


CONFIG = """
[upstream]
url = "{url}"
timeout = 30
{upstream}

[server]
{server}

[gateway]
key = {key}
reload = "off"
{gateway}

[tiers.free]
requests = "{free_requests}"
tokens = "100000/minute"

[tiers.pro]
requests = "1000/minute"
tokens = "1000000/minute"

[keys]
"sk-free" = "free"
"sk-pro" = "pro"
"sk-other" = "pro"
"""


def write_config(
    tmp_path: Any,
    url: str,
    *,
    upstream: str = "",
    server: str = "",
    gateway: str = "",
    key: str = '"bearer"',
    free_requests: str = "100/minute",
) -> str:
    path = tmp_path / "gateway.toml"
    path.write_text(
        textwrap.dedent(
            CONFIG.format(
                url=url, upstream=upstream, server=server, gateway=gateway, key=key, free_requests=free_requests
            )
        )
    )
    return str(path)


class GatewayServer:
    """The gateway of a config file served by uvicorn with the config ``nexus-limits
    gateway`` uses (its own h11 protocol, limits and timeouts), in a thread."""

    def __init__(self, config_path: str) -> None:
        import uvicorn

        from nexus_limits.gateway import build_app, uvicorn_config

        self.app = build_app(config_path)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn_config(self.app, "127.0.0.1", self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> GatewayServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def wait_until(predicate: Any, seconds: float = 3.0) -> bool:
    """Polls ``predicate`` until it holds or ``seconds`` pass; returns its last value.
    (The gateway frees a request's state just after the client has the last byte.)"""
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(predicate())


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_response(
    sock: socket.socket, timeout: float = 5.0, pending: Optional[bytearray] = None
) -> Tuple[int, Dict[str, List[str]], bytes]:
    """One HTTP/1.1 response from the socket: status, headers (lower-case names, every
    value), body (by content-length, chunked, or to the close). ``pending`` carries the
    bytes read past a response to the next call (pipelined responses may arrive in one
    read); without it they are dropped."""
    sock.settimeout(timeout)
    data = bytes(pending or b"")
    if pending is not None:
        pending.clear()
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: Dict[str, List[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if "content-length" in headers:
        n = int(headers["content-length"][0])
        while len(rest) < n:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        if pending is not None:
            pending += rest[n:]
        return status, headers, rest[:n]
    if headers.get("transfer-encoding") == ["chunked"]:
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += sock.recv(65536)
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            while len(rest) < size + 2:
                rest += sock.recv(65536)
            body += rest[:size]
            rest = rest[size + 2 :]
            if size == 0:  # (no trailers: rest starts with the next response)
                if pending is not None:
                    pending += rest
                return status, headers, body
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return status, headers, rest
        rest += chunk


def raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 5.0) -> Tuple[int, Dict[str, Any], bytes]:
    """Sends ``head`` (the request line and headers, CRLF-separated, without the blank
    line) and ``body`` as they are, and reads the answer."""
    with connect(port, timeout) as sock:
        sock.sendall(head + b"\r\n\r\n" + body)
        return read_response(sock, timeout)


def closed_within(sock: socket.socket, seconds: float) -> Optional[bytes]:
    """What the server sent before closing the connection, or None if it was still
    open after ``seconds``."""
    sock.settimeout(0.1)
    got = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk
    return None
