"""``[server] workers = N``: N gateway processes on one port, started as a user starts
the gateway (``nexus-limits gateway --config``), sharing every limit exactly through the
backend; reload, restart and stop through the supervisor's signals."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Dict, List

import httpx
import pytest
from support.gateway_harness import connect, read_response
from support.servers import free_port
from support.workers import WorkersGateway, close_all, get, owner, tcp, upstream_server

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
    with upstream_server() as server:
        yield server


class Gateway(WorkersGateway):
    """``python -m nexus_limits.cli gateway --config <file>`` with N workers on Redis."""

    def __init__(
        self, tmp_path, upstream, redis_server, workers: int, requests: str = "40/hour", reload: str = "off"
    ) -> None:
        port = free_port()
        super().__init__(tmp_path, port, self.text(upstream, redis_server, port, workers, requests, reload))

    @staticmethod
    def text(upstream, redis_server, port: int, workers: int, requests: str, reload: str) -> str:
        return CONFIG.format(
            url=upstream.url, port=port, workers=workers, redis=redis_server.port, prefix=f"w{port}",
            requests=requests, reload=reload,
        )  # fmt: skip

    def write(self, upstream, redis_server, workers: int, requests: str, reload: str = "off") -> None:
        self.path.write_text(self.text(upstream, redis_server, self.port, workers, requests, reload))


def request_on(sock, key: str) -> int:
    return get(sock, "/v1/models", key)


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_enforce_one_exact_limit_together(tmp_path, upstream, redis_server, workers):
    gw = Gateway(tmp_path, upstream, redis_server, workers)
    socks: Dict[int, list] = {}
    try:
        gw.wait_ready(workers)
        pids = gw.workers()
        # Kept-alive connections, each accepted by one worker, until every worker holds
        # some (the kernel hands them out).
        socks = gw.held_connections(2)
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
        close_all(socks)
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
                    held = [pid for pid in pids if sock.getsockname()[1] in tcp(pid, gw.port, "01").values()]
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
