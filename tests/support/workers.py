"""A gateway with ``[server] workers = N`` run as a user runs it (``python -m
nexus_limits.cli gateway --config <file>``), and what its tests need to find out which
worker answered: its listening children, the worker holding a client connection
(Linux /proc), kept-alive connections held by every worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List

import httpx

from support.gateway_harness import Upstream, connect, read_response
from support.servers import ASGIServer


@contextmanager
def upstream_server() -> Iterator[Any]:
    """The recording :class:`~support.gateway_harness.Upstream` on real uvicorn
    (``server.app`` is the app: its ``in_flight``, ``seen``)."""
    app = Upstream()
    with ASGIServer(app) as server:
        server.app = app
        yield server


class WorkersGateway:
    """The gateway run from ``text`` (a config written to ``tmp_path/gateway.toml``)
    listening on ``port``, its output in ``tmp_path/gateway.log``."""

    def __init__(self, tmp_path: Any, port: int, text: str) -> None:
        self.port = port
        self.path = tmp_path / "gateway.toml"
        self.path.write_text(text)
        self.log = open(tmp_path / "gateway.log", "wb")
        args = [sys.executable, "-m", "nexus_limits.cli", "gateway", "--config", str(self.path)]
        self.proc = subprocess.Popen(
            args, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=self.log, stderr=subprocess.STDOUT
        )

    def workers(self) -> List[int]:
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                children = [int(p) for p in f.read().split()]
        except OSError:
            return []
        # multiprocessing's spawn also starts a resource tracker: the workers are the
        # children that listen on the port.
        return [pid for pid in children if listens(pid, self.port)]

    def wait_ready(self, workers: int, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            if len(self.workers()) == workers:
                try:
                    if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        raise AssertionError(f"the gateway's {workers} workers did not start: {self.output()}")

    def held_connections(self, each: int, seconds: float = 20) -> Dict[int, list]:
        """Kept-alive connections, each accepted by one worker (the kernel hands them
        out), until every worker holds ``each`` of them: {worker pid: [socket, ...]}."""
        pids = self.workers()
        socks: Dict[int, list] = {pid: [] for pid in pids}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not all(len(held) >= each for held in socks.values()):
            sock = connect(self.port)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock)[0] == 200
            socks[owner(pids, self.port, sock)].append(sock)
        assert all(len(held) >= each for held in socks.values()), {pid: len(h) for pid, h in socks.items()}
        return socks

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log.name, "rb") as f:
            return f.read().decode(errors="replace")[-3000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:  # pragma: no cover
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


def close_all(socks: Dict[int, list]) -> None:
    for held in socks.values():
        for s in held:
            s.close()


def tcp(pid: int, port: int, state: str) -> Dict[str, int]:
    """``pid``'s TCP sockets whose local port is ``port``, in ``state`` (0A: listening,
    01: established): inode -> remote port (Linux /proc)."""
    found: Dict[str, int] = {}
    for family in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{family}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                        found[fields[9]] = int(fields[2].rsplit(":", 1)[1], 16)
        except OSError:
            continue
    mine: Dict[str, int] = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return mine
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in found:
            mine[target[8:-1]] = found[target[8:-1]]
    return mine


def listens(pid: int, port: int) -> bool:
    return bool(tcp(pid, port, "0A"))


def owner(pids: List[int], port: int, sock: Any) -> int:
    """The worker that holds the server side of the client connection ``sock``."""
    client_port = sock.getsockname()[1]
    held = [pid for pid in pids if client_port in tcp(pid, port, "01").values()]
    assert len(held) == 1, held
    return held[0]


def get(sock: Any, path: str, key: str, timeout: float = 5.0) -> int:
    """``GET path`` with ``key`` as the bearer token on a kept-alive connection: the status."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
    return read_response(sock, timeout=timeout)[0]


def hammer_every_worker(socks: Dict[int, list], calls: int, call: Callable[[Any, int], int]) -> List[int]:
    """``calls`` requests, ``call(sock, i)`` each, on two connections of every worker at
    once (a thread per connection): every status, once all were answered."""
    codes: List[int] = []
    lock = threading.Lock()

    def run(sock: Any) -> None:
        for i in range(calls):
            code = call(sock, i)
            with lock:
                codes.append(code)

    threads = [threading.Thread(target=run, args=(s,)) for held in socks.values() for s in held[:2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(codes) == calls * len(threads), "every call was answered"
    return codes
