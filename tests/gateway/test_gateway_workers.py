"""``[server] workers = N``: N gateway processes on one port, started as a user starts
the gateway (``nexus-limits gateway --config``), sharing every limit exactly through the
backend; reload, restart and stop through the supervisor's signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List

import httpx
import pytest
from support.servers import ASGIServer, free_port

HERE = os.path.dirname(__file__)
from support.gateway_harness import Upstream, connect, read_response  # noqa: E402

CONFIG = """
[upstream]
url = "{url}"
timeout = 30

[server]
port = {port}
workers = {workers}
keep_alive_timeout = 30

[gateway]
key = "bearer"
reload = "{reload}"

[backend]
type = "redis"
url = "redis://127.0.0.1:{redis}/0"
prefix = "{prefix}"
on_error = "deny"

[tiers.t]
requests = "{requests}"

[keys]
"sk-one" = "t"
"sk-two" = "t"
"""


@pytest.fixture
def upstream():
    app = Upstream()
    with ASGIServer(app) as server:
        server.app = app
        yield server


class Gateway:
    """``python -m nexus_limits.cli gateway --config <file>`` with N workers."""

    def __init__(
        self, tmp_path, upstream, redis_server, workers: int, requests: str = "40/hour", reload: str = "off"
    ) -> None:
        self.port = free_port()
        self.path = tmp_path / "gateway.toml"
        self.write(upstream, redis_server, workers, requests, reload)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        args = [sys.executable, "-m", "nexus_limits.cli", "gateway", "--config", str(self.path)]
        self.log = open(tmp_path / "gateway.log", "wb")
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def write(self, upstream, redis_server, workers: int, requests: str, reload: str = "off") -> None:
        self.path.write_text(
            CONFIG.format(
                url=upstream.url, port=self.port, workers=workers, redis=redis_server.port, prefix=f"w{self.port}",
                requests=requests, reload=reload,
            )
        )  # fmt: skip

    def workers(self) -> List[int]:
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                children = [int(p) for p in f.read().split()]
        except OSError:
            return []
        # multiprocessing's spawn also starts a resource tracker: the workers are the
        # children that listen on the port.
        return [pid for pid in children if _listens(pid, self.port)]

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


def _tcp(pid: int, port: int, state: str) -> Dict[str, int]:
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


def _listens(pid: int, port: int) -> bool:
    return bool(_tcp(pid, port, "0A"))


def owner(pids: List[int], port: int, sock) -> int:
    """The worker that holds the server side of the client connection ``sock``."""
    client_port = sock.getsockname()[1]
    held = [pid for pid in pids if client_port in _tcp(pid, port, "01").values()]
    assert len(held) == 1, held
    return held[0]


def request_on(sock, key: str) -> int:
    sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
    return read_response(sock)[0]


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_enforce_one_exact_limit_together(tmp_path, upstream, redis_server, workers):
    gw = Gateway(tmp_path, upstream, redis_server, workers)
    socks: Dict[int, list] = {}
    try:
        gw.wait_ready(workers)
        pids = gw.workers()
        # Kept-alive connections, each accepted by one worker, until every worker holds
        # some (the kernel hands them out).
        socks.update({pid: [] for pid in pids})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(len(held) >= 2 for held in socks.values()):
            sock = connect(gw.port)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock)[0] == 200
            socks[owner(pids, gw.port, sock)].append(sock)
        assert all(len(held) >= 2 for held in socks.values()), {pid: len(h) for pid, h in socks.items()}
        # One key's limit, hit through every worker at once (a thread per connection):
        # exactly the quota is admitted, whichever worker answered.
        codes: Dict[int, List[int]] = {pid: [] for pid in pids}
        lock = threading.Lock()

        def hammer(pid: int, sock) -> None:
            for _ in range(10):
                code = request_on(sock, "sk-one")
                with lock:
                    codes[pid].append(code)

        threads = [threading.Thread(target=hammer, args=(pid, s)) for pid in pids for s in socks[pid][:2]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        every = [c for pid in pids for c in codes[pid]]
        assert len(every) == 10 * len(threads)
        assert every.count(200) == 40, f"{every.count(200)} admitted by {workers} workers for a quota of 40"
        assert every.count(429) == len(every) - 40
        # Every worker answered part of the traffic (which worker wins the quota's last
        # units is a race, so some worker may have admitted none).
        assert all(len(codes[pid]) == 20 for pid in pids), {pid: len(c) for pid, c in codes.items()}
    finally:
        for held in socks.values():
            for s in held:
                s.close()
        assert gw.stop() == 0, gw.output()


def test_a_worker_that_dies_is_replaced(tmp_path, upstream, redis_server):
    gw = Gateway(tmp_path, upstream, redis_server, 2)
    try:
        gw.wait_ready(2)
        first = gw.workers()
        os.kill(first[0], signal.SIGKILL)
        # Replaced: another worker serves requests (a process seen listening for an
        # instant may be one being started, not yet the new worker: ask it).
        replaced = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and replaced is None:
            pids = gw.workers()
            if len(pids) == 2 and first[0] not in pids:
                with connect(gw.port) as sock:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert read_response(sock)[0] == 200
                    held = [pid for pid in pids if sock.getsockname()[1] in _tcp(pid, gw.port, "01").values()]
                if held and held[0] not in first:
                    replaced = held[0]
            time.sleep(0.05)
        assert replaced is not None, (first, gw.workers(), gw.output())
        assert first[1] in gw.workers()
        with httpx.Client(base_url=f"http://127.0.0.1:{gw.port}", timeout=10) as http:
            assert http.get("/v1/models", headers={"authorization": "Bearer sk-two"}).status_code == 200
    finally:
        assert gw.stop() == 0, gw.output()


def test_sighup_reloads_every_worker(tmp_path, upstream, redis_server):
    gw = Gateway(tmp_path, upstream, redis_server, 2, requests="2/hour", reload="sighup")
    try:
        gw.wait_ready(2)
        pids = gw.workers()
        # Both workers have started (each answered): their reload handlers are set.
        answered: set = set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and answered != set(pids):
            with connect(gw.port) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_response(sock)[0] == 200
                answered.add(owner(pids, gw.port, sock))
        assert answered == set(pids)
        gw.write(upstream, redis_server, 2, "30/hour", reload="sighup")
        gw.proc.send_signal(signal.SIGHUP)
        # Every worker answers with the new limit (fresh connections until each worker
        # has answered some).
        seen: Dict[int, set] = {pid: set() for pid in pids}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all("30" in v for v in seen.values()):
            with connect(gw.port) as sock:
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-two\r\n\r\n")
                _, headers, _ = read_response(sock)
                seen[owner(pids, gw.port, sock)].add(headers["x-ratelimit-limit-requests"][0])
            time.sleep(0.02)
        assert all("30" in v for v in seen.values()), seen
    finally:
        assert gw.stop() == 0, gw.output()


def test_sigterm_stops_every_worker(tmp_path, upstream, redis_server):
    gw = Gateway(tmp_path, upstream, redis_server, 2)
    gw.wait_ready(2)
    pids = gw.workers()
    assert gw.stop() == 0, gw.output()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in pids):
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids), "no worker is left running"
