"""``[server] workers = N`` with the memory backend: the workers share every tier's
limits exactly through one SharedMemoryStore of the host (issue 15), concurrency leases
included. The supervisor makes the store (named after the config file and port) before
it starts the workers; each worker opens it by name, and every tier's TokenLimiter and
SpendLimiter is built with ``store=`` it and ``name=`` the tier's.
"""

from __future__ import annotations

import threading
import time
from typing import Dict

import httpx
import pytest
from support.servers import ASGIServer, free_port
from support.workers import WorkersGateway, close_all, hammer_every_worker, upstream_server
from support.workers import get as get_on

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
    with upstream_server() as server:
        yield server


class Gateway(WorkersGateway):
    """``python -m nexus_limits.cli gateway --config <file>`` with N workers, memory backend."""

    def __init__(self, tmp_path, upstream, workers: int, requests: str, concurrency: int) -> None:
        port = free_port()
        text = CONFIG.format(url=upstream.url, port=port, workers=workers, requests=requests, concurrency=concurrency)
        super().__init__(tmp_path, port, text)


def get(sock, path: str, key: str = "sk-one") -> int:
    return get_on(sock, path, key, timeout=30)


@pytest.mark.parametrize("workers", [2, 3])
def test_memory_workers_enforce_one_exact_limit(tmp_path, upstream, workers):
    # 20 calls through each worker for a quota of 15: workers counting alone would
    # admit 15 each.
    gw = Gateway(tmp_path, upstream, workers, requests="15/hour", concurrency=100)
    socks: Dict[int, list] = {}
    try:
        gw.wait_ready(workers)
        socks = gw.held_connections(2)
        codes = hammer_every_worker(socks, 10, lambda s, i: get(s, "/v1/models"))
        assert codes.count(200) == 15, f"{codes.count(200)} admitted by {workers} workers for a quota of 15"
        assert codes.count(429) == len(codes) - 15
    finally:
        close_all(socks)
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
        close_all(socks)
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
