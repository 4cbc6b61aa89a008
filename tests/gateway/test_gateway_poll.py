"""Busy polling (``[server] busy_poll_us``): the loop polls for a bounded window after
each event, then sleeps; off at 0; the config refuses what is not a small whole number
of microseconds."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest
from support import fake_llm
from support.gateway_harness import GatewayServer, write_config
from support.servers import ASGIServer

from nexus_limits.gateway import ConfigError, load_config
from nexus_limits.gateway.poll import BusyPoll, install, touch


def test_the_loop_polls_for_the_window_then_stops():
    async def main() -> tuple:
        loop = asyncio.get_running_loop()
        poller = install(loop, 0.05)
        assert poller is not None and install(loop, 0.05) is poller, "one per loop"
        turns = 0
        real_call_soon = loop.call_soon

        def call_soon(callback, *args, **kw):  # type: ignore[no-untyped-def]
            nonlocal turns
            if getattr(callback, "__self__", None) is poller:
                turns += 1
            return real_call_soon(callback, *args, **kw)

        loop.call_soon = call_soon  # type: ignore[method-assign]
        try:
            started = time.monotonic()
            touch(loop)
            assert poller.spinning
            while poller.spinning and time.monotonic() - started < 2:
                await asyncio.sleep(0.01)
            took = time.monotonic() - started
            spins_then = turns
            await asyncio.sleep(0.1)
        finally:
            loop.call_soon = real_call_soon  # type: ignore[method-assign]
        return took, spins_then, turns, poller.spinning

    took, spins, later, spinning = asyncio.run(main())
    assert 0.05 <= took < 1.0, "it stops once the window has passed"
    assert spins > 5, "it kept the loop turning"
    assert later == spins and not spinning, "and nothing after"


def test_a_touch_within_the_window_extends_it_without_a_second_spinner():
    async def main() -> int:
        loop = asyncio.get_running_loop()
        poller = BusyPoll(loop, 0.05)
        scheduled = 0
        real_call_soon = loop.call_soon

        def call_soon(callback, *args, **kw):  # type: ignore[no-untyped-def]
            nonlocal scheduled
            if getattr(callback, "__self__", None) is poller:
                scheduled += 1
            return real_call_soon(callback, *args, **kw)

        loop.call_soon = call_soon  # type: ignore[method-assign]
        try:
            poller.touch()
            poller.touch()
            poller.touch()
            assert scheduled == 1, "one spinner, however many touches"
            deadline = time.monotonic() + 2
            while poller.spinning and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            loop.call_soon = real_call_soon  # type: ignore[method-assign]
        return scheduled

    assert asyncio.run(main()) > 1


def test_off_at_zero_and_touch_without_a_poller_is_nothing():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert install(loop, 0) is None
        touch(loop)  # no poller for this loop: nothing happens

    asyncio.run(main())


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


@pytest.mark.parametrize("server", ["", "busy_poll_us = 2000", "busy_poll_us = 0"])
def test_a_polling_gateway_is_idle_once_traffic_stops(tmp_path, server):
    with ASGIServer(fake_llm.app) as upstream:
        path = write_config(tmp_path, upstream.url, server=server)
        assert load_config(path).busy_poll_us == {"": 300, "busy_poll_us = 2000": 2000, "busy_poll_us = 0": 0}[server]
        with GatewayServer(path) as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
            for _ in range(20):
                r = http.post(
                    "/v1/chat/completions",
                    json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
                    headers={"authorization": "Bearer sk-pro"},
                )
                assert r.status_code == 200, r.text
            time.sleep(0.2)  # past any window
            before = _cpu()
            time.sleep(1.0)
            idle = _cpu() - before
    # The gateway (a thread of this process), the fake upstream and the idle client:
    # a spinning loop would have used about a second.
    assert idle < 0.3, idle


@pytest.mark.parametrize("value", ["-1", "10001", "1.5", "true", '"300us"', "nan"])
def test_busy_poll_must_be_a_small_whole_number_of_microseconds(tmp_path, value):
    path = write_config(tmp_path, "http://127.0.0.1:1", server=f"busy_poll_us = {value}")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "server.busy_poll_us" in str(info.value)
