"""A fake LLM upstream: a real ASGI app speaking OpenAI's and Anthropic's formats
(JSON and server-sent events, with usage), for end-to-end tests."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Dict, List

SEEN: List[Dict[str, Any]] = []
RELEASE = asyncio.Event  # type alias for readers


def _sse(events: List[Any], named: bool = False) -> List[bytes]:
    out = []
    for e in events:
        head = f"event: {e['type']}\n" if named and isinstance(e, dict) else ""
        data = e if isinstance(e, str) else json.dumps(e)
        out.append(f"{head}data: {data}\n\n".encode())
    return out


async def app(scope, receive, send):
    assert scope["type"] == "http"
    raw = b""
    while True:
        message = await receive()
        raw += message.get("body", b"")
        if not message.get("more_body"):
            break
    body = json.loads(raw) if raw else {}
    SEEN.append(body)
    model = body.get("model", "")
    if model == "broken":
        await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"error": {"message": "upstream failed"}}'})
        return
    if scope["path"] == "/v1/messages":
        usage = {
            "input_tokens": 40,
            "output_tokens": 0,
            "cache_read_input_tokens": 10,
            "cache_creation_input_tokens": 0,
        }
        if body.get("stream"):
            events = [
                {"type": "message_start", "message": {"usage": usage}},
                {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Bonjour"}},
                {"type": "message_delta", "usage": {"output_tokens": 12}},
                {"type": "message_stop"},
            ]
            await _stream(send, _sse(events, named=True))
            return
        await _json(
            send,
            {
                "type": "message",
                "content": [{"type": "text", "text": "Bonjour"}],
                "usage": {**usage, "output_tokens": 12},
            },
        )
        return
    usage = {"prompt_tokens": 30, "completion_tokens": 20, "total_tokens": 50}
    if body.get("stream"):
        chunks = [
            {"object": "chat.completion.chunk", "choices": [{"delta": {"content": w}}]} for w in ("Hello", " there")
        ]
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({"object": "chat.completion.chunk", "choices": [], "usage": usage})
        frames = _sse([*chunks, "[DONE]"])
        if model == "slow":
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
            )
            await send({"type": "http.response.body", "body": frames[0], "more_body": True})
            for _ in range(200):  # the client goes away meanwhile
                await asyncio.sleep(0.01)
                await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
            return
        await _stream(send, frames)
        return
    await _json(
        send, {"object": "chat.completion", "choices": [{"message": {"content": "Hello there"}}], "usage": usage}
    )


async def _json(send, doc) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(doc).encode()})


async def _stream(send, frames) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
        }
    )
    for frame in frames:
        # Split every event in two, mid-frame, like a real network would.
        half = len(frame) // 2
        await send({"type": "http.response.body", "body": frame[:half], "more_body": True})
        await send({"type": "http.response.body", "body": frame[half:], "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
