"""What only the synchronous Redis limiters have: asyncio code holding a synchronous
client can wait for them without blocking its event loop, each round trip running in a
worker thread. The generated ``_sync.py`` takes these methods into its classes."""

from __future__ import annotations

import asyncio
import atexit
import threading
import weakref
from typing import Any, Optional

from .. import _wait
from .._core import Decision
from ..base import Key


async def acquire_async(self: Any, key: Key, cost: int = 1, timeout: Optional[float] = None) -> Decision:
    """``acquire`` for asyncio code holding a synchronous client: each round trip runs in a
    worker thread so the event loop is never blocked."""

    async def hit(k: Key, c: int) -> Decision:
        return await asyncio.to_thread(self.hit, k, c)

    return await _wait.acquire_async(hit, self.clock, key, cost, timeout)


async def acquire_lease_async(self: Any, key: Key, cost: int = 1, timeout: Optional[float] = None) -> Any:
    """``acquire`` for asyncio code holding a synchronous client (round trips in a thread)."""
    from ._async import wait_for_lease  # the one lease-waiting loop, as a coroutine

    async def hit(k: Key, c: int) -> Decision:
        return await asyncio.to_thread(self.hit, k, c)

    return await wait_for_lease(hit, self.clock, key, cost, timeout)


def lease_async(self: Any, key: Key, timeout: Optional[float] = None) -> Any:
    """``async with limiter.lease_async(key): ...``"""
    from ..limiters import _AsyncLease

    return _AsyncLease(self, key, timeout)


_LEASED: weakref.WeakSet[Any] = weakref.WeakSet()
_AT_EXIT = threading.Lock()
_registered = False


def start_reaper(limiter: Any) -> threading.Thread:
    """Starts the thread that gives a leasing limiter's idle blocks back (it ends when
    none is held); at exit, every such limiter gives back what it holds."""
    global _registered
    with _AT_EXIT:
        _LEASED.add(limiter)
        if not _registered:
            atexit.register(_close_all)
            _registered = True
    thread = threading.Thread(target=limiter._reap, name="nexus-limits lease reaper", daemon=True)
    thread.start()
    return thread


def _close_all() -> None:
    for limiter in list(_LEASED):
        try:
            limiter.close()
        except Exception:  # pragma: no cover - at exit, an error has nowhere to go
            pass
