"""A fake LLM provider for end-to-end tests: a real ASGI app (served by real uvicorn)
speaking the wire formats the official SDKs parse.

Routes, in each provider's own JSON shapes and event streams:

- ``POST /v1/chat/completions``: JSON, or SSE chunks; with ``stream_options.include_usage``
  a last chunk with ``choices: []`` and the usage comes before ``data: [DONE]``, exactly
  as OpenAI sends it (and only then);
- ``POST /v1/responses``: JSON, or the named-event stream ending with ``response.completed``
  carrying the usage;
- ``POST /v1/completions`` (legacy): JSON or SSE, usage as for chat;
- ``POST /v1/embeddings``: floats, or base64 (the openai SDK asks for base64 by default);
- ``POST /v1/messages`` (Anthropic): JSON, or the named-event stream ``message_start``
  (input usage), ``content_block_start/delta/stop``, ``message_delta`` (cumulative
  ``output_tokens``), ``message_stop``.

Every answer carries the provider's own headers: ``x-ratelimit-*`` (OpenAI) or
``anthropic-ratelimit-*`` (Anthropic), an organisation id, ``set-cookie``, ``date`` and
``server`` (the uvicorn serving it is told not to add its own, see :func:`serve`).

Usage is fixed per route (:data:`USAGE`, :func:`charged`), so a test knows what a
gateway should charge.

Behaviours are chosen per request with the ``x-fake`` header, ``;``-separated:

- ``encoding=gzip|deflate|br|zstd|auto``: compress the body (streams too, flushed per
  event) when the request's ``Accept-Encoding`` allows it; ``auto`` picks the first of
  br, zstd, gzip, deflate the client accepts, as a CDN would;
- ``pause_headers=S``: wait S seconds before the status line; ``pause_mid=S``: wait S
  seconds after the first event of a stream (after half of a JSON body);
- ``usage=omit|negative|huge|string|null|nan|float``: no usage, or a hostile one;
- ``status=N`` (``retry_after=S`` optional): answer N in the provider's error format;
  ``fail_first=K`` makes only the first K requests carrying that same ``x-fake`` value
  fail, the later ones succeed;
- ``cut``: close the connection mid-way (a stream before its final events, a JSON body
  after half of its declared length).

A pause ends early when the client goes away: the provider records when it saw the
disconnect (:attr:`Received.disconnected`), which is how a test proves that a gateway
cancelled its upstream request.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import math
import struct
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

__all__ = [
    "ANTHROPIC_USAGE",
    "USAGE",
    "FakeProvider",
    "Received",
    "charged",
    "serve",
]

CREATED = 1_750_000_000

# (input, output) per route; Anthropic's input is input + cache reads + cache writes.
USAGE: Dict[str, Tuple[int, int]] = {
    "/v1/chat/completions": (31, 17),
    "/v1/responses": (23, 11),
    "/v1/completions": (13, 7),
    "/v1/embeddings": (9, 0),
    "/v1/messages": (55, 12),
}
ANTHROPIC_USAGE = {"input_tokens": 40, "cache_read_input_tokens": 10, "cache_creation_input_tokens": 5}
ANTHROPIC_OUTPUT = 12

WORDS = ("Hello", " there")
TEXT = "".join(WORDS)

# Headers a provider sends that a gateway must not pass on to its own clients.
ORG_HEADERS = ("openai-organization", "openai-project", "anthropic-organization-id")
COOKIE = "__cf_bm=fake-provider-cookie; path=/; domain=.api.example.com; HttpOnly; Secure; SameSite=None"
SERVER = "cloudflare"


def charged(path: str) -> int:
    """The total tokens of one complete answer on ``path``: what a gateway should settle."""
    inp, out = USAGE[path]
    return inp + out


class CutConnection(Exception):
    """Raised by the app to make uvicorn drop the connection mid-response."""


@dataclass
class Received:
    """One request as the provider saw it, and what became of it."""

    method: str
    path: str
    query: str
    headers: List[Tuple[str, str]]
    body: bytes
    started: float
    json: Any = None
    status: Optional[int] = None
    encoding: Optional[str] = None
    completed: bool = False
    ended: Optional[float] = None
    # time.monotonic() when the client was seen going away before the answer was complete
    disconnected: Optional[float] = None

    def header(self, name: str) -> Optional[str]:
        values = self.header_list(name)
        return values[0] if values else None

    def header_list(self, name: str) -> List[str]:
        return [v for k, v in self.headers if k == name.lower()]


@dataclass
class _Behaviour:
    encoding: Optional[str] = None
    pause_headers: float = 0.0
    pause_mid: float = 0.0
    usage: Optional[str] = None
    status: Optional[int] = None
    retry_after: Optional[str] = None
    fail_first: Optional[int] = None
    cut: bool = False
    raw: str = ""

    @classmethod
    def parse(cls, value: str) -> _Behaviour:
        b = cls(raw=value)
        for part in value.split(";"):
            name, _, arg = part.strip().partition("=")
            name, arg = name.strip(), arg.strip()
            if not name:
                continue
            if name == "encoding":
                b.encoding = arg
            elif name in ("pause_headers", "pause_mid"):
                setattr(b, name, float(arg))
            elif name == "usage":
                b.usage = arg
            elif name == "status":
                b.status = int(arg)
            elif name == "retry_after":
                b.retry_after = arg
            elif name == "fail_first":
                b.fail_first = int(arg)
            elif name == "cut":
                b.cut = True
            else:
                raise ValueError(f"x-fake: unknown behaviour {name!r}")
        return b


class _Encoder:
    """A streaming compressor flushed per chunk, so each event reaches the client whole."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._c: Any
        if name == "gzip":
            self._c = zlib.compressobj(wbits=31)
        elif name == "deflate":
            self._c = zlib.compressobj(wbits=15)
        elif name == "br":
            import brotli

            self._c = brotli.Compressor()
        elif name == "zstd":
            import zstandard

            self._c = zstandard.ZstdCompressor().compressobj()
        else:
            raise ValueError(name)

    def chunk(self, data: bytes) -> bytes:
        if self.name in ("gzip", "deflate"):
            return bytes(self._c.compress(data) + self._c.flush(zlib.Z_SYNC_FLUSH))
        if self.name == "br":
            return bytes(self._c.process(data) + self._c.flush())
        import zstandard

        return bytes(self._c.compress(data) + self._c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))

    def end(self) -> bytes:
        if self.name == "br":
            return bytes(self._c.finish())
        return bytes(self._c.flush())


def _accepted(accept: str) -> List[str]:
    out = []
    for item in accept.split(","):
        name, _, params = item.strip().partition(";")
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if name and q > 0:
            out.append(name.strip().lower())
    return out


def _choose_encoding(wanted: Optional[str], accept: str) -> Optional[str]:
    if not wanted:
        return None
    ok = _accepted(accept)
    if wanted == "auto":
        for name in ("br", "zstd", "gzip", "deflate"):
            if name in ok:
                return name
        return None
    return wanted if wanted in ok or "*" in ok else None


def _hostile(kind: Optional[str], good: int) -> Any:
    return {
        None: good,
        "negative": -good - 5,
        "huge": 10**30,
        "string": "lots",
        "null": None,
        "nan": math.nan,
        "float": good + 0.5,
    }.get(kind, good)


def _hex() -> str:
    return uuid.uuid4().hex


class FakeProvider:
    """The ASGI app. ``received`` lists every request, in arrival order."""

    def __init__(self) -> None:
        self.received: List[Received] = []
        self._lock = threading.Lock()
        self._failures: Dict[str, int] = {}

    # --- for tests --------------------------------------------------------------------
    def hits(self, path: Optional[str] = None) -> int:
        with self._lock:
            return sum(1 for r in self.received if path is None or r.path == path)

    def last(self, path: Optional[str] = None) -> Received:
        with self._lock:
            for r in reversed(self.received):
                if path is None or r.path == path:
                    return r
        raise AssertionError(f"the provider received no request on {path or 'any path'}")

    def for_key(self, key: str) -> List[Received]:
        """The requests that carried the client key ``key`` (Bearer, x-api-key or api-key):
        a gateway without an upstream key of its own forwards the client's."""
        with self._lock:
            return [
                r
                for r in self.received
                if key in (r.header("x-api-key"), r.header("api-key"))
                or (r.header("authorization") or "") == f"Bearer {key}"
            ]

    def clear(self) -> None:
        with self._lock:
            self.received.clear()
            self._failures.clear()

    # --- the app ----------------------------------------------------------------------
    async def __call__(self, scope: Dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return
        parts = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(parts)
        record = Received(
            method=scope["method"],
            path=scope["path"],
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=[(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]],
            body=raw,
            started=time.monotonic(),
        )
        try:
            record.json = json.loads(raw) if raw else None
        except ValueError:
            record.json = None
        with self._lock:
            self.received.append(record)
        watcher = asyncio.ensure_future(self._watch(receive, record))
        try:
            await self._answer(scope, record, send)
        except CutConnection:
            raise
        finally:
            record.ended = time.monotonic()
            watcher.cancel()

    async def _watch(self, receive: Callable[..., Any], record: Received) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not record.completed:
                    record.disconnected = time.monotonic()
                return

    async def _pause(self, seconds: float, record: Received) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and record.disconnected is None:
            await asyncio.sleep(min(0.02, max(0.0, deadline - time.monotonic())))

    def _should_fail(self, b: _Behaviour) -> bool:
        if b.status is None:
            return False
        if b.fail_first is None:
            return True
        with self._lock:
            seen = self._failures.get(b.raw, 0)
            self._failures[b.raw] = seen + 1
        return seen < b.fail_first

    async def _answer(self, scope: Dict[str, Any], record: Received, send: Callable[..., Any]) -> None:
        anthropic = record.path == "/v1/messages"
        try:
            b = _Behaviour.parse(record.header("x-fake") or "")
        except ValueError as error:
            await self._error(send, record, anthropic, 400, str(error), _Behaviour())
            return
        if b.pause_headers:
            await self._pause(b.pause_headers, record)
            if record.disconnected is not None:
                return
        body = record.json if isinstance(record.json, dict) else None
        if record.method != "POST" or record.path not in USAGE:
            await self._error(send, record, anthropic, 404, f"no route {record.method} {record.path}", b)
            return
        if body is None:
            await self._error(send, record, anthropic, 400, "the body must be a JSON object", b)
            return
        if self._should_fail(b):
            assert b.status is not None
            await self._error(send, record, anthropic, b.status, f"the fake provider fails with {b.status}", b)
            return
        encoding = _choose_encoding(b.encoding, record.header("accept-encoding") or "")
        record.encoding = encoding
        model = str(body.get("model") or "unknown")
        if body.get("stream"):
            frames = list(self._events(record.path, model, body, b))
            await self._stream(send, record, anthropic, frames, encoding, b)
        else:
            doc = self._document(record.path, model, body, b)
            data = json.dumps(doc).encode()
            await self._json(send, record, anthropic, 200, data, encoding, b)

    # --- headers ----------------------------------------------------------------------
    def _headers(self, anthropic: bool, content_type: str, encoding: Optional[str]) -> List[Tuple[bytes, bytes]]:
        h: List[Tuple[str, str]] = [
            ("date", email.utils.formatdate(usegmt=True)),
            ("content-type", content_type),
            ("server", SERVER),
            ("set-cookie", COOKIE),
            ("cf-ray", f"{_hex()[:16]}-CDG"),
            ("x-content-type-options", "nosniff"),
        ]
        if anthropic:
            reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 1))
            h += [
                ("request-id", f"req_{_hex()}"),
                ("anthropic-organization-id", "0f0e0d0c-fake-4b2a-9d3e-0123456789ab"),
                ("anthropic-ratelimit-requests-limit", "4000"),
                ("anthropic-ratelimit-requests-remaining", "3999"),
                ("anthropic-ratelimit-requests-reset", reset),
                ("anthropic-ratelimit-tokens-limit", "400000"),
                ("anthropic-ratelimit-tokens-remaining", "399000"),
                ("anthropic-ratelimit-tokens-reset", reset),
                ("anthropic-ratelimit-input-tokens-limit", "200000"),
                ("anthropic-ratelimit-input-tokens-remaining", "199000"),
                ("anthropic-ratelimit-input-tokens-reset", reset),
                ("anthropic-ratelimit-output-tokens-limit", "200000"),
                ("anthropic-ratelimit-output-tokens-remaining", "199990"),
                ("anthropic-ratelimit-output-tokens-reset", reset),
            ]
        else:
            h += [
                ("x-request-id", f"req_{_hex()}"),
                ("openai-organization", "org-fakeprovider"),
                ("openai-project", "proj_fakeprovider"),
                ("openai-processing-ms", "12"),
                ("openai-version", "2020-10-01"),
                ("x-ratelimit-limit-requests", "10000"),
                ("x-ratelimit-remaining-requests", "9999"),
                ("x-ratelimit-reset-requests", "6ms"),
                ("x-ratelimit-limit-tokens", "30000000"),
                ("x-ratelimit-remaining-tokens", "29999950"),
                ("x-ratelimit-reset-tokens", "0s"),
            ]
        if encoding:
            h.append(("content-encoding", encoding))
            h.append(("vary", "Accept-Encoding"))
        return [(k.encode(), v.encode()) for k, v in h]

    # --- answers ----------------------------------------------------------------------
    async def _error(
        self, send: Callable[..., Any], record: Received, anthropic: bool, status: int, message: str, b: _Behaviour
    ) -> None:
        if anthropic:
            kind = {
                400: "invalid_request_error",
                401: "authentication_error",
                403: "permission_error",
                404: "not_found_error",
                413: "request_too_large",
                429: "rate_limit_error",
                529: "overloaded_error",
            }.get(status, "api_error")
            doc: Dict[str, Any] = {
                "type": "error",
                "error": {"type": kind, "message": message},
                "request_id": f"req_{_hex()}",
            }
        else:
            kind, code = {
                400: ("invalid_request_error", None),
                401: ("invalid_request_error", "invalid_api_key"),
                404: ("invalid_request_error", "unknown_url"),
                429: ("requests", "rate_limit_exceeded"),
            }.get(status, ("server_error", None))
            doc = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        data = json.dumps(doc).encode()
        await self._json(send, record, anthropic, status, data, None, b)

    async def _json(
        self,
        send: Callable[..., Any],
        record: Received,
        anthropic: bool,
        status: int,
        data: bytes,
        encoding: Optional[str],
        b: _Behaviour,
    ) -> None:
        if encoding:
            enc = _Encoder(encoding)
            data = enc.chunk(data) + enc.end()
        headers = self._headers(anthropic, "application/json", encoding)
        headers.append((b"content-length", str(len(data)).encode()))
        if status == 429 or status >= 500:
            headers.append((b"retry-after", (b.retry_after or "0").encode()))
        record.status = status
        await send({"type": "http.response.start", "status": status, "headers": headers})
        half = len(data) // 2
        await send({"type": "http.response.body", "body": data[:half], "more_body": True})
        if b.cut and status < 400:
            raise CutConnection("the fake provider cuts the body")
        if b.pause_mid:
            await self._pause(b.pause_mid, record)
            if record.disconnected is not None:
                return
        record.completed = True
        await send({"type": "http.response.body", "body": data[half:], "more_body": False})

    async def _stream(
        self,
        send: Callable[..., Any],
        record: Received,
        anthropic: bool,
        frames: List[Tuple[bytes, bool]],
        encoding: Optional[str],
        b: _Behaviour,
    ) -> None:
        """``frames``: (SSE bytes, whether the stream may be cut or paused after it)."""
        enc = _Encoder(encoding) if encoding else None
        headers = self._headers(anthropic, "text/event-stream; charset=utf-8", encoding)
        headers.append((b"cache-control", b"no-cache"))
        record.status = 200
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        paused = False
        for frame, breakpoint_after in frames:
            if enc is not None:
                await send({"type": "http.response.body", "body": enc.chunk(frame), "more_body": True})
            else:
                # Split each event in two, mid-frame, as a real network may deliver it.
                half = len(frame) // 2
                await send({"type": "http.response.body", "body": frame[:half], "more_body": True})
                await send({"type": "http.response.body", "body": frame[half:], "more_body": True})
            if breakpoint_after and b.cut:
                raise CutConnection("the fake provider cuts the stream")
            if breakpoint_after and b.pause_mid and not paused:
                paused = True
                await self._pause(b.pause_mid, record)
            if record.disconnected is not None:
                return
        record.completed = True
        await send({"type": "http.response.body", "body": enc.end() if enc else b"", "more_body": False})

    # --- documents --------------------------------------------------------------------
    def _document(self, path: str, model: str, body: Dict[str, Any], b: _Behaviour) -> Dict[str, Any]:
        inp, out = USAGE[path]
        if path == "/v1/chat/completions":
            return {
                "id": f"chatcmpl-{_hex()}",
                "object": "chat.completion",
                "created": CREATED,
                "model": model,
                "system_fingerprint": "fp_fake",
                "service_tier": "default",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": TEXT, "refusal": None, "annotations": []},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                **self._openai_usage(inp, out, b),
            }
        if path == "/v1/completions":
            return {
                "id": f"cmpl-{_hex()}",
                "object": "text_completion",
                "created": CREATED,
                "model": model,
                "choices": [{"text": TEXT, "index": 0, "logprobs": None, "finish_reason": "stop"}],
                **self._openai_usage(inp, out, b),
            }
        if path == "/v1/embeddings":
            inputs = body.get("input")
            n = len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
            vector = [0.25, -0.5, 0.125, 1.0]
            b64 = body.get("encoding_format") == "base64"
            packed = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            doc: Dict[str, Any] = {
                "object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": packed if b64 else vector} for i in range(n)],
                "model": model,
            }
            if b.usage != "omit":
                doc["usage"] = {"prompt_tokens": _hostile(b.usage, inp), "total_tokens": _hostile(b.usage, inp)}
            return doc
        if path == "/v1/responses":
            return self._response(model, "completed", b, with_output=True)
        # /v1/messages
        doc = self._message(model, b, content=[{"type": "text", "text": TEXT}], output=ANTHROPIC_OUTPUT)
        doc["stop_reason"] = "end_turn"
        return doc

    @staticmethod
    def _openai_usage(inp: int, out: int, b: _Behaviour) -> Dict[str, Any]:
        if b.usage == "omit":
            return {}
        p, c = _hostile(b.usage, inp), _hostile(b.usage, out)
        total = p + c if isinstance(p, (int, float)) and isinstance(c, (int, float)) else p
        return {
            "usage": {
                "prompt_tokens": p,
                "completion_tokens": c,
                "total_tokens": total,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            }
        }

    def _response(self, model: str, status: str, b: _Behaviour, with_output: bool, rid: str = "") -> Dict[str, Any]:
        inp, out = USAGE["/v1/responses"]
        usage: Any = None
        if status == "completed" and b.usage != "omit":
            i, o = _hostile(b.usage, inp), _hostile(b.usage, out)
            usage = {
                "input_tokens": i,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": o,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": i + o if isinstance(i, (int, float)) and isinstance(o, (int, float)) else i,
            }
        return {
            "id": rid or f"resp_{_hex()}",
            "object": "response",
            "created_at": CREATED,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "max_output_tokens": None,
            "model": model,
            "output": [self._output_item("completed", "msg_fake")] if with_output else [],
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": True,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": {},
        }

    @staticmethod
    def _output_item(status: str, item_id: str, text: Optional[str] = TEXT) -> Dict[str, Any]:
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}

    @staticmethod
    def _message(model: str, b: _Behaviour, content: List[Any], output: int) -> Dict[str, Any]:
        doc: Dict[str, Any] = {
            "id": f"msg_{_hex()[:24]}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": None,
            "stop_sequence": None,
        }
        if b.usage != "omit":
            doc["usage"] = {
                **{k: _hostile(b.usage, v) for k, v in ANTHROPIC_USAGE.items()},
                "output_tokens": _hostile(b.usage, output),
                "service_tier": "standard",
            }
        return doc

    # --- event streams ----------------------------------------------------------------
    def _events(self, path: str, model: str, body: Dict[str, Any], b: _Behaviour) -> Iterator[Tuple[bytes, bool]]:
        """The SSE frames of a stream, each with whether a cut or a pause may follow it
        (after the first content event)."""
        if path in ("/v1/chat/completions", "/v1/completions"):
            yield from self._openai_chunks(path, model, body, b)
        elif path == "/v1/responses":
            yield from self._responses_events(model, b)
        elif path == "/v1/messages":
            yield from self._anthropic_events(model, b)
        else:  # embeddings do not stream: the JSON document as one event
            yield _data(self._document(path, model, body, b)), False

    def _openai_chunks(
        self, path: str, model: str, body: Dict[str, Any], b: _Behaviour
    ) -> Iterator[Tuple[bytes, bool]]:
        options = body.get("stream_options")
        include = isinstance(options, dict) and options.get("include_usage") is True
        cid = f"chatcmpl-{_hex()}" if path == "/v1/chat/completions" else f"cmpl-{_hex()}"
        chat = path == "/v1/chat/completions"
        base: Dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": CREATED,
            "model": model,
        }
        if chat:
            base["system_fingerprint"] = "fp_fake"
            base["service_tier"] = "default"

        def chunk(choice: Dict[str, Any]) -> Dict[str, Any]:
            doc = {**base, "choices": [choice]}
            if include:
                doc["usage"] = None
            return doc

        if chat:
            first = {"role": "assistant", "content": "", "refusal": None}
            yield _data(chunk({"index": 0, "delta": first, "logprobs": None, "finish_reason": None})), False
        for n, word in enumerate(WORDS):
            if chat:
                choice = {"index": 0, "delta": {"content": word}, "logprobs": None, "finish_reason": None}
            else:
                choice = {"text": word, "index": 0, "logprobs": None, "finish_reason": None}
            yield _data(chunk(choice)), n == 0
        if chat:
            yield _data(chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"})), False
        else:
            yield _data(chunk({"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"})), False
        if include:
            usage = self._openai_usage(*USAGE[path], b)
            if usage:
                yield _data({**base, "choices": [], **usage}), False
        yield b"data: [DONE]\n\n", False

    def _responses_events(self, model: str, b: _Behaviour) -> Iterator[Tuple[bytes, bool]]:
        rid = f"resp_{_hex()}"
        item_id = f"msg_{_hex()}"
        seq = iter(range(1000))

        def event(kind: str, breakpoint_after: bool = False, **fields: Any) -> Tuple[bytes, bool]:
            doc = {"type": kind, "sequence_number": next(seq), **fields}
            return _named(kind, doc), breakpoint_after

        running = self._response(model, "in_progress", b, with_output=False, rid=rid)
        yield event("response.created", response=running)
        yield event("response.in_progress", response=running)
        yield event("response.output_item.added", output_index=0, item=self._output_item("in_progress", item_id, None))
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        yield event("response.content_part.added", part=part, **where)
        for n, word in enumerate(WORDS):
            yield event("response.output_text.delta", n == 0, delta=word, logprobs=[], **where)
        yield event("response.output_text.done", text=TEXT, logprobs=[], **where)
        yield event("response.content_part.done", part={**part, "text": TEXT}, **where)
        yield event("response.output_item.done", output_index=0, item=self._output_item("completed", item_id))
        done = self._response(model, "completed", b, with_output=False, rid=rid)
        done["output"] = [self._output_item("completed", item_id)]
        yield event("response.completed", response=done)

    def _anthropic_events(self, model: str, b: _Behaviour) -> Iterator[Tuple[bytes, bool]]:
        start = self._message(model, b, content=[], output=1)
        yield _named("message_start", {"type": "message_start", "message": start}), False
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        yield _named("content_block_start", block), False
        yield _named("ping", {"type": "ping"}), False
        for n, word in enumerate(WORDS):
            delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}}
            yield _named("content_block_delta", delta), n == 0
        yield _named("content_block_stop", {"type": "content_block_stop", "index": 0}), False
        delta_doc: Dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        }
        if b.usage != "omit":
            delta_doc["usage"] = {"output_tokens": _hostile(b.usage, ANTHROPIC_OUTPUT)}
        yield _named("message_delta", delta_doc), False
        yield _named("message_stop", {"type": "message_stop"}), False


def _data(doc: Any) -> bytes:
    return f"data: {json.dumps(doc)}\n\n".encode()


def _named(kind: str, doc: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(doc)}\n\n".encode()


def serve(app: Any) -> Any:
    """An :class:`servers.ASGIServer` for ``app`` whose uvicorn adds no ``server`` or
    ``date`` header of its own: the provider sends its own, as a real one does."""
    from support.servers import ASGIServer

    server = ASGIServer(app)
    server.server.config.server_header = False
    server.server.config.date_header = False
    return server
