"""Helpers for the end-to-end tests with real clients: a fake provider (``fake_provider``)
and ``nexus-limits gateway`` in front of it, each served by real uvicorn on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import httpx

ADMIN_TOKEN = "admin-s3cret"
_ADMIN_ENV = "NEXUS_LIMITS_TEST_SDK_ADMIN"


def _toml(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def write_config(
    tmp_path: Any,
    upstream_url: str,
    tiers: Dict[str, Dict[str, Any]],
    keys: Dict[str, str],
    key: Any = "bearer",
    gateway: Optional[Dict[str, Any]] = None,
    name: str = "gateway.toml",
) -> str:
    """A gateway config file, as a user writes one: TOML, reload off, the admin token
    taken from an environment variable."""
    lines = ["[upstream]", f"url = {_toml(upstream_url)}", "", "[gateway]", f"key = {_toml(key)}"]
    lines += ['reload = "off"', f'admin_token_env = "{_ADMIN_ENV}"']
    for k, v in (gateway or {}).items():
        lines.append(f"{k} = {_toml(v)}")
    for tier, spec in tiers.items():
        lines += ["", f"[tiers.{tier}]"]
        lines += [f"{k} = {_toml(v)}" for k, v in spec.items()]
    lines += ["", "[keys]"]
    lines += [f"{_toml(k)} = {_toml(v)}" for k, v in keys.items()]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def build(config_path: str) -> Any:
    """``nexus_limits.gateway.build_app`` with the admin token in the environment."""
    from nexus_limits.gateway import build_app

    os.environ[_ADMIN_ENV] = ADMIN_TOKEN
    try:
        return build_app(config_path)
    finally:
        os.environ.pop(_ADMIN_ENV, None)


@contextlib.contextmanager
def gateway(
    tmp_path: Any,
    upstream_url: str,
    tiers: Dict[str, Dict[str, Any]],
    keys: Dict[str, str],
    key: Any = "bearer",
    **options: Any,
) -> Iterator[Tuple[Any, Any]]:
    """The gateway app and its server (real uvicorn, lifespan on, as ``nexus-limits
    gateway`` runs it), in front of ``upstream_url``."""
    from support.servers import ASGIServer

    path = write_config(tmp_path, upstream_url, tiers, keys, key=key, gateway=options)
    app = build(path)
    with ASGIServer(app, lifespan="on") as server:
        yield app, server


def admin_state(server: Any, key: str) -> Dict[str, Any]:
    """``GET /_nexus/keys/<key>`` with the admin token: the key's tier and limits."""
    response = httpx.get(
        f"{server.url}/_nexus/keys/{key}", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    doc: Dict[str, Any] = response.json()
    return doc


def in_flight(server: Any, key: str) -> int:
    """The key's concurrency leases held, as the admin endpoint reports them."""
    return int(admin_state(server, key)["limits"]["concurrency"]["in_flight"])


def settled(app: Any, tier: str) -> int:
    """Tokens the tier's limiter has settled so far (exact, from its stats)."""
    return int(app.tiers[tier].limiter.stats()["tokens_settled"])


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Polls ``predicate`` until it is truthy (and returns it) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


def decisions(server: Any) -> Dict[str, float]:
    """The gateway's limit decisions so far, by decision (``allowed``, ``denied``, ...),
    scraped from its Prometheus endpoint: how many requests reached the limiter."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    out: Dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "nexus_limits_requests_total":
                decision = sample.labels.get("decision", "")
                out[decision] = out.get(decision, 0.0) + sample.value
    return out


def bounded(fn: Callable[[], Any], timeout: float) -> Any:
    """Runs a blocking client call in a daemon thread and waits at most ``timeout``
    seconds for it: a client told to sleep for minutes fails the test instead of
    hanging it. Returns the call's result or raises its exception."""
    import threading

    box: Dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as error:  # handed to the caller
            box["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"the client call did not return within {timeout} s")
    if "error" in box:
        raise box["error"]
    return box.get("result")


async def within(coro: Any, timeout: float, stop: Optional[Callable[[], Optional[str]]] = None) -> Any:
    """Awaits ``coro`` for at most ``timeout`` seconds; ``stop`` (polled every 0.1 s)
    may end the wait early by returning why. Either way the call is cancelled and the
    test fails with the reason, instead of sleeping for what a server told the client."""
    import asyncio

    task = asyncio.ensure_future(coro)
    deadline = time.monotonic() + timeout
    while not task.done():
        why = stop() if stop is not None else None
        if why is None and time.monotonic() > deadline:
            why = f"the client call did not return within {timeout} s"
        if why is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=5)
            raise AssertionError(why)
        await asyncio.wait({task}, timeout=0.1)
    return task.result()


class Harness:
    """One gateway (real uvicorn) in front of one fake provider, shared by several tests:
    each test takes keys of its own (:meth:`key`), so their limits never meet, and
    measures the shared counters as differences."""

    def __init__(self, app: Any, server: Any, provider: Any, tier: str, keys: List[str]) -> None:
        self.app = app
        self.server = server
        self.provider = provider
        self.tier = tier
        self._keys = list(keys)
        self._taken: List[str] = []

    @property
    def url(self) -> str:
        return str(self.server.url)

    def key(self) -> str:
        """A key no test used before."""
        if not self._keys:
            raise AssertionError("the harness ran out of fresh keys; give it more")
        key = self._keys.pop(0)
        self._taken.append(key)
        return key

    def quiesce(self, timeout: float = 2.0) -> None:
        """Waits until every key taken so far holds no lease, so that a test's last
        settlement never lands in the next test's measurements."""
        deadline = time.monotonic() + timeout
        for key in self._taken:
            wait_for(lambda key=key: self.in_flight(key) == 0, max(0.0, deadline - time.monotonic()))
        self._taken.clear()

    def settled(self) -> int:
        return settled(self.app, self.tier)

    def in_flight(self, key: str) -> int:
        return in_flight(self.server, key)

    def decisions(self) -> Dict[str, float]:
        return decisions(self.server)

    def settled_since(self, before: int, expected: int, timeout: float = 1.0) -> int:
        """The tokens settled since ``before`` (a :meth:`settled` reading), polled until
        they reach ``expected`` or ``timeout`` passes: the gateway settles just after the
        last byte went out."""
        wait_for(lambda: self.settled() - before == expected, timeout)
        return self.settled() - before

    def released(self, key: str, timeout: float = 1.0) -> bool:
        """True once the key holds no concurrency lease (polled up to ``timeout``)."""
        return bool(wait_for(lambda: self.in_flight(key) == 0, timeout))


@contextlib.contextmanager
def harness(
    tmp_path: Any, tier: Dict[str, Any], n_keys: int = 100, key: Any = "bearer", **options: Any
) -> Iterator[Harness]:
    """A fake provider and a gateway in front of it with one tier and ``n_keys`` keys."""
    from .fake_provider import FakeProvider, serve

    provider = FakeProvider()
    keys = [f"sk-test-{n:03d}" for n in range(n_keys)]
    with serve(provider) as upstream:
        with gateway(tmp_path, upstream.url, {"t": tier}, {k: "t" for k in keys}, key=key, **options) as pair:
            yield Harness(pair[0], pair[1], provider, "t", keys)


def sse_documents(text: str) -> List[Any]:
    """The JSON documents of a server-sent event stream's ``data:`` lines (``[DONE]`` left out)."""
    out = []
    for line in text.splitlines():
        if line.startswith("data:"):
            data = line[len("data:") :].strip()
            if data != "[DONE]":
                out.append(json.loads(data))
    return out
