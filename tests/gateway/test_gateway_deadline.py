"""The gateway's deadline for a request body (``_Deadline``): a message already there is
handed over without a timer; one that has to be waited for is waited for under the
deadline, and a cancellation reaches the server's receive()."""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List

import pytest

from nexus_limits.gateway.app import _BodyTimeout, _Deadline


def test_a_message_already_there_passes_at_once():
    async def main() -> Dict[str, Any]:
        async def receive() -> Dict[str, Any]:
            return {"type": "http.request", "body": b"x", "more_body": False}

        deadline = _Deadline(receive, 0.0)  # already past: not needed, not checked
        return await deadline()

    assert asyncio.run(main()) == {"type": "http.request", "body": b"x", "more_body": False}


def test_a_message_that_comes_in_time_is_waited_for():
    async def main() -> List[Dict[str, Any]]:
        queue: asyncio.Queue[Dict[str, Any]] = asyncio.Queue()

        async def receive() -> Dict[str, Any]:
            return await queue.get()

        deadline = _Deadline(receive, 5.0)
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, queue.put_nowait, {"type": "http.request", "body": b"a", "more_body": True})
        first = await deadline()
        loop.call_later(0.05, queue.put_nowait, {"type": "http.request", "body": b"b", "more_body": False})
        second = await deadline()
        assert deadline.done
        return [first, second]

    first, second = asyncio.run(main())
    assert first["body"] == b"a" and second["body"] == b"b"


def test_a_body_that_stops_coming_times_out_and_the_wait_is_cancelled():
    cancelled = []

    async def main() -> None:
        async def receive() -> Dict[str, Any]:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise
            return {"type": "http.request"}  # pragma: no cover

        deadline = _Deadline(receive, 0.1)
        await deadline()

    with pytest.raises(_BodyTimeout):
        asyncio.run(asyncio.wait_for(main(), 5))
    assert cancelled == [True], "the server's receive() was cancelled, not left waiting"


def test_the_deadline_covers_the_whole_body_not_each_message():
    async def main() -> int:
        count = 0

        async def receive() -> Dict[str, Any]:
            nonlocal count
            await asyncio.sleep(0.04)
            count += 1
            return {"type": "http.request", "body": b"x", "more_body": True}

        deadline = _Deadline(receive, 0.2)
        with pytest.raises(_BodyTimeout):
            for _ in range(100):
                await deadline()
        return count

    assert 2 <= asyncio.run(main()) <= 6


def test_an_outer_cancellation_reaches_receive_and_is_not_a_timeout():
    cancelled = []

    async def main() -> None:
        async def receive() -> Dict[str, Any]:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise
            return {}  # pragma: no cover

        task = asyncio.ensure_future(_Deadline(receive, 10.0)())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert cancelled == [True]


def test_an_error_from_receive_passes_through():
    async def main() -> None:
        async def receive() -> Dict[str, Any]:
            await asyncio.sleep(0.01)
            raise OSError("connection reset")

        await _Deadline(receive, 5.0)()

    with pytest.raises(OSError, match="connection reset"):
        asyncio.run(main())


def test_after_the_body_a_disconnect_is_awaited_without_a_deadline():
    async def main() -> Dict[str, Any]:
        messages = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> Dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.sleep(0.3)  # past the deadline: no timeout once the body is in
            return {"type": "http.disconnect"}

        deadline = _Deadline(receive, 0.1)
        await deadline()
        return await deadline()

    assert asyncio.run(main()) == {"type": "http.disconnect"}
