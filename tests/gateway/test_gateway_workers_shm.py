"""``[server] workers = N`` with the memory backend: the workers share every tier's
limits exactly through one SharedMemoryStore of the host (issue 15), concurrency leases
included. The supervisor makes the store (named after the config file and port) before
it starts the workers; each worker opens it by name, and every tier's TokenLimiter and
SpendLimiter is built with ``store=`` it and ``name=`` the tier's.
"""

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
from support.gateway_harness import Upstream, connect, read_response
from support.servers import ASGIServer, free_port
from test_gateway_workers import owner

from nexus_limits.gateway.config import load_config

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
reload = "off"

[backend]
type = "memory"

[tiers.t]
requests = "{requests}"
tokens = "100000/hour"
concurrency = {concurrency}

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
    """``python -m nexus_limits.cli gateway --config <file>`` with N workers, memory backend."""

    def __init__(self, tmp_path, upstream, workers: int, requests: str, concurrency: int) -> None:
        self.port = free_port()
        self.path = tmp_path / "gateway.toml"
        self.path.write_text(
            CONFIG.format(url=upstream.url, port=self.port, workers=workers, requests=requests, concurrency=concurrency)
        )
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
        return [pid for pid in children if _listening(pid, self.port)]

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
        """Kept-alive connections until every worker holds ``each`` of them."""
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


def _listening(pid: int, port: int) -> bool:
    from test_gateway_workers import _listens

    return _listens(pid, port)


def get(sock, path: str, key: str = "sk-one") -> int:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
    return read_response(sock, timeout=30)[0]


@pytest.mark.parametrize("workers", [2, 3])
def test_memory_workers_enforce_one_exact_limit(tmp_path, upstream, workers):
    # 20 calls through each worker for a quota of 15: workers counting alone would
    # admit 15 each.
    gw = Gateway(tmp_path, upstream, workers, requests="15/hour", concurrency=100)
    socks: Dict[int, list] = {}
    try:
        gw.wait_ready(workers)
        socks = gw.held_connections(2)
        codes: List[int] = []
        lock = threading.Lock()

        def hammer(sock) -> None:
            for _ in range(10):
                code = get(sock, "/v1/models")
                with lock:
                    codes.append(code)

        threads = [threading.Thread(target=hammer, args=(s,)) for held in socks.values() for s in held[:2]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(codes) == 10 * len(threads)
        assert codes.count(200) == 15, f"{codes.count(200)} admitted by {workers} workers for a quota of 15"
        assert codes.count(429) == len(codes) - 15
    finally:
        for held in socks.values():
            for s in held:
                s.close()
        assert gw.stop() == 0, gw.output()


def test_memory_workers_share_concurrency_leases(tmp_path, upstream):
    gw = Gateway(tmp_path, upstream, 2, requests="1000/hour", concurrency=1)
    socks: Dict[int, list] = {}
    try:
        gw.wait_ready(2)
        socks = gw.held_connections(1)
        (a, *_), (b, *_) = socks.values()
        # A slow call through one worker holds the key's only lease: the other worker
        # refuses the key meanwhile, and admits it again once the call is done.
        slow = threading.Thread(target=lambda: get(a, "/slow/2"))
        slow.start()
        deadline = time.monotonic() + 10
        while upstream.app.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert upstream.app.in_flight == 1
        assert get(b, "/v1/models") == 429
        assert get(b, "/v1/models", key="sk-two") == 200, "another key has its own lease"
        slow.join(30)
        assert get(b, "/v1/models") == 200
    finally:
        for held in socks.values():
            for s in held:
                s.close()
        assert gw.stop() == 0, gw.output()


ADMIN_ENV = "NL_TEST_SHM_ADMIN"


def _in_process_gateway(tmp_path, upstream, monkeypatch):
    """The gateway app of a 2-worker memory-backend config, run here (one of its
    workers), on the store the supervisor would have made."""
    from nexus_limits.gateway import build_app
    from nexus_limits.gateway.app import create_shared_store

    path = tmp_path / "gateway.toml"
    text = CONFIG.format(url=upstream.url, port=free_port(), workers=2, requests="100/hour", concurrency=5)
    text = text.replace('reload = "off"', f'reload = "off"\nadmin_token_env = "{ADMIN_ENV}"')
    path.write_text(text)
    monkeypatch.setenv(ADMIN_ENV, "s3cret")
    store = create_shared_store(load_config(str(path)))
    return path, store, build_app(str(path))


def test_top_keys_in_shared_memory_is_a_501_that_says_why(tmp_path, upstream, monkeypatch):
    _, store, app = _in_process_gateway(tmp_path, upstream, monkeypatch)
    try:
        with ASGIServer(app, lifespan="on") as server:
            auth = {"authorization": "Bearer sk-one"}
            assert httpx.get(f"{server.url}/v1/models", headers=auth, timeout=10).status_code == 200
            r = httpx.get(f"{server.url}/_nexus/top?tier=t", headers={"authorization": "Bearer s3cret"}, timeout=10)
            assert r.status_code == 501, r.text
            assert "not kept in shared memory" in r.json()["detail"]
    finally:
        store.unlink()


def test_a_reload_needing_a_longer_store_ttl_keeps_the_running_config(tmp_path, upstream, monkeypatch):
    # The store was made for an hour; a reload adding a daily limit cannot be kept in it.
    path, store, app = _in_process_gateway(tmp_path, upstream, monkeypatch)
    try:
        with ASGIServer(app, lifespan="on") as server:
            auth = {"authorization": "Bearer sk-one"}
            assert httpx.get(f"{server.url}/v1/models", headers=auth, timeout=10).status_code == 200
            path.write_text(path.read_text().replace("[tiers.t]\n", "[tiers.t]\ndaily_tokens = 1000000\n"))
            assert app.reload() is False
            assert app.cfg.tiers["t"].daily_tokens is None, "the running config stays"
            assert httpx.get(f"{server.url}/v1/models", headers=auth, timeout=10).status_code == 200
            left = app.tiers["t"].limiter.inspect("sk-one")["requests"]["remaining"]
            assert left == 98, "both calls were charged to the running limiter"
    finally:
        store.unlink()
