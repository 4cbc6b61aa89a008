"""Reading the token usage of an upstream LLM response from its bytes as they pass
through a proxy: JSON bodies and server-sent-event streams, compressed or not.

:class:`UsageReader` is the one place that turns response bytes into a
:class:`~nexus_limits.tokens.Usage`. Memory and CPU per response are bounded whatever
the upstream sends: compressed bodies are decoded in 64 KiB steps under a
decompression-bomb budget, JSON bodies are scanned rather than parsed (only the
``usage`` member is kept), SSE events are parsed only when they can carry usage, and a
line that never ends is scanned, not buffered.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Set, Tuple, Union, cast

from ._usage import Usage, UsageError, _check_provider, _count, _details, _usage_of, detect_provider

__all__ = ["DEFAULT_MAX_DECODED_BYTES", "MAX_COMPRESSION_RATIO", "MAX_CONTENT_CODINGS", "UsageReader"]

DEFAULT_MAX_DECODED_BYTES = 8 << 20
# Decoded bytes allowed per encoded byte beyond max_decoded_bytes. JSON and SSE compress
# 5-20x when servers flush per event and up to ~150x unflushed; a gzip bomb reaches
# ~1000x, brotli and zstd millions.
MAX_COMPRESSION_RATIO = 256
# "gzip, br" is two; nobody stacks more than a few.
MAX_CONTENT_CODINGS = 4
# RFC 8878 and RFC 9659: HTTP zstd decoders need not accept windows above 8 MB (the
# window is memory the decoder allocates up front).
_ZSTD_MAX_WINDOW = 8 << 20

_STEP = 64 << 10  # decoded bytes handed on at a time
_SMALL = 64 << 10  # largest SSE event parsed whole; largest event held back when stripping
_CAPTURE = 64 << 10  # largest member value the scanner keeps (a real usage is < 1 KiB)
_MAX_DEPTH = 512
_MAX_STEPS = 1 << 19  # Python steps per JSON document: bounds the CPU a hostile one costs
_TEXT_KEEP = 256 << 10  # streamed text kept for estimates; beyond, only its length

_Sink = Callable[[bytes], None]


class _GiveUp(Exception):
    """Stops reading one response (its bytes still pass through)."""


# --- content codings ------------------------------------------------------------------


class _Zlib:
    """gzip (``wbits`` 31) or deflate (``wbits`` None: zlib-wrapped or raw, as real
    servers send either; told apart by the first two bytes, as httpx does)."""

    __slots__ = ("_d", "_head", "name")

    def __init__(self, name: str, wbits: Optional[int]) -> None:
        self.name = name
        self._d: Any = None if wbits is None else zlib.decompressobj(wbits)
        self._head = b""

    def feed(self, data: bytes, sink: _Sink) -> None:
        d = self._d
        if d is None:
            data = self._head + data
            if len(data) < 2:
                self._head = data
                return
            self._head = b""
            cmf, flg = data[0], data[1]
            wrapped = cmf & 0x0F == 8 and cmf >> 4 <= 7 and ((cmf << 8) | flg) % 31 == 0
            d = self._d = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        if d.eof:
            return  # like httpx: bytes after the end of the compressed stream are ignored
        try:
            out = d.decompress(data, _STEP)
            while True:
                if out:
                    sink(out)
                if len(out) < _STEP or d.eof:
                    break
                out = d.decompress(d.unconsumed_tail, _STEP)
        except zlib.error as error:
            raise _GiveUp(f"cannot decode the {self.name} body: {error}") from None


class _Brotli:
    __slots__ = ("_d", "_error", "name")

    def __init__(self) -> None:
        import brotli  # type: ignore[import-untyped,import-not-found,unused-ignore]

        self.name = "br"
        self._d = brotli.Decompressor()
        self._error = brotli.error
        # Bounded output needs brotli >= 1.2; an older one could not stop a bomb.
        self._d.process(b"", output_buffer_limit=1)

    def feed(self, data: bytes, sink: _Sink) -> None:
        d = self._d
        if d.is_finished():
            return
        try:
            out = d.process(data, output_buffer_limit=_STEP)
            while out:
                sink(out)
                if d.is_finished():
                    break
                out = d.process(b"", output_buffer_limit=_STEP)
        except self._error as error:
            raise _GiveUp(f"cannot decode the br body: {error}") from None


class _Zstd:
    __slots__ = ("_error", "_sink", "_writer", "name")

    def __init__(self) -> None:
        import zstandard  # type: ignore[import-not-found,unused-ignore]

        self.name = "zstd"
        self._error = zstandard.ZstdError
        self._sink: Optional[_Sink] = None
        dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
        # The writer hands its output on in _STEP pieces as it decodes, so the budget
        # stops a bomb before its output exists.
        self._writer = dctx.stream_writer(cast(Any, self), write_size=_STEP, write_return_read=True)

    def write(self, data: bytes) -> int:  # called by zstandard with decoded bytes
        assert self._sink is not None
        self._sink(data)
        return len(data)

    def feed(self, data: bytes, sink: _Sink) -> None:
        self._sink = sink
        try:
            self._writer.write(data)
        except self._error as error:
            raise _GiveUp(f"cannot decode the zstd body: {error}") from None


_Stage = Union[_Zlib, _Brotli, _Zstd]


def _codings(header: Union[str, bytes, None]) -> List[str]:
    """The content codings of a Content-Encoding value, in the order applied."""
    if header is None:
        return []
    if isinstance(header, (bytes, bytearray)):
        header = bytes(header).decode("latin-1")
    names = (name.strip().lower() for name in header.split(","))
    return [name for name in names if name and name != "identity"]


def _stage(name: str) -> Optional[_Stage]:
    if name in ("gzip", "x-gzip"):
        return _Zlib(name, 16 + zlib.MAX_WBITS)
    if name == "deflate":
        return _Zlib(name, None)
    try:
        if name == "br":
            return _Brotli()
        if name == "zstd":
            return _Zstd()
    except (ImportError, TypeError):  # not installed, or a brotli without bounded output
        return None
    return None


# --- JSON scanning ----------------------------------------------------------------------

_TOKENS_TRACKED = re.compile(rb'[\[\]{}",:]')
_TOKENS = re.compile(rb'[\[\]{}"]')
_CLOSING = re.compile(rb"[\]}]")
_NOT_SPACE = re.compile(rb"[^ \t\r\n]")
# Small containers nested at most two deep (logprobs entries, tool-call objects) are
# skipped in one regex match instead of token by token; the match looks at most
# _FLAT_SPAN bytes (regex repeats run ~10x slower than the search that finds the next
# token, so a big container is cheaper token by token). Written as
# "normal* (special normal*)*": every byte matches one way only, so a failed match
# backtracks in linear time.
_N = rb'[^"\[\]{}]*'
_S = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
_C1 = rb"(?:\[" + _N + rb"(?:" + _S + _N + rb")*\]|\{" + _N + rb"(?:" + _S + _N + rb")*\})"
_IN2 = _N + rb"(?:(?:" + _S + rb"|" + _C1 + rb")" + _N + rb")*"
_FLAT = {123: re.compile(rb"\{" + _IN2 + rb"\}", re.S), 91: re.compile(rb"\[" + _IN2 + rb"\]", re.S)}
_FLAT_SPAN = 512

_KEY, _COLON, _VALUE, _NEXT = range(4)
_Path = Tuple[bytes, ...]
# The key paths on the way to each set of targets (a scanner per response: made once).
_PREFIXES: Dict[FrozenSet[_Path], FrozenSet[_Path]] = {}


class _Frame:
    """An object whose members the scanner follows (it is on the way to a target)."""

    __slots__ = ("key", "path", "pending", "state")

    def __init__(self, path: _Path) -> None:
        self.path = path
        self.state = _KEY
        self.key: Optional[bytes] = None
        self.pending: Optional[_Path] = None


def _decode_key(raw: bytes) -> Optional[bytes]:
    if b"\\" not in raw:
        return raw
    try:
        return str(json.loads(b'"' + raw + b'"')).encode("utf-8", "surrogatepass")
    except ValueError:
        return None


class _JsonScan:
    """Finds members of a JSON object by key path (``(b"usage",)``,
    ``(b"response", b"usage")``) as its bytes stream past, in chunks split anywhere.

    Nothing is built: only the raw bytes of the members asked for are kept (each at most
    _CAPTURE; a bigger one is recorded as None). Depth and structural tokens are
    bounded. It checks the structure on the path to its targets and bracket matching
    elsewhere; it is not a validator of scalars. ``values`` maps each target seen to
    its bytes (the last one wins, as with ``json.loads``); ``seen`` the top-level keys
    of ``watch`` present; ``failed`` says why it stopped; ``closed`` that the top-level
    object ended.
    """

    def __init__(self, targets: FrozenSet[_Path], watch: FrozenSet[bytes] = frozenset()) -> None:
        self.targets = targets
        prefixes = _PREFIXES.get(targets)
        if prefixes is None:
            prefixes = _PREFIXES[targets] = frozenset(t[:i] for t in targets for i in range(1, len(t)))
        self.prefixes = prefixes
        self.watch = watch
        self.seen: Set[bytes] = set()
        self.values: Dict[_Path, Optional[bytes]] = {}
        self.touched: Set[_Path] = set()  # targets whose key came, even if their value did not
        self.failed: Optional[str] = None
        self.closed = False
        self.started = False
        self._stack: List[int] = []
        self._track: List[_Frame] = []
        self._in_string = False
        self._escape = False
        self._key: Optional[bytearray] = None
        self._capture: Optional[bytearray] = None
        self._capture_path: _Path = ()
        self._capture_big = False
        self._steps = 0

    def feed(self, data: bytes) -> None:
        if self.failed is not None or not data:
            return
        try:
            self._scan(data)
        except _GiveUp as error:
            self.failed = str(error)
            self._capture = None

    def _scan(self, data: bytes) -> None:
        n = len(data)
        pos = 0
        stack = self._stack
        track = self._track
        # Steps counted in a local: this loop is the hot path of every JSON body.
        limit = _MAX_STEPS - self._steps
        steps = 0
        try:
            while pos < n:
                if self._in_string:
                    if self._escape:
                        self._escape = False
                        if self._key is not None:
                            self._key += data[pos : pos + 1]
                        pos += 1
                        continue
                    # The string ends at the first quote after an even run of backslashes
                    # (memchr finds quotes; only the backslashes just before one are counted).
                    end = data.find(b'"', pos)
                    while end >= 0:
                        k = end
                        while k > pos and data[k - 1] == 92:
                            k -= 1
                        steps += 1 + end - k
                        if not (end - k) & 1:
                            break
                        end = data.find(b'"', end + 1)
                    if steps > limit:
                        raise _GiveUp(f"the JSON document needs more than {_MAX_STEPS} steps to scan")
                    if end < 0:  # the string goes on in the next chunk
                        k = n
                        while k > pos and data[k - 1] == 92:
                            k -= 1
                        self._escape = bool((n - k) & 1)  # a backslash whose pair comes next
                        if self._key is not None and len(self._key) <= 256:
                            self._key += data[pos : min(n, pos + 257)]
                        break
                    if self._key is not None and len(self._key) <= 256:
                        self._key += data[pos : min(end, pos + 257)]
                    pos = end + 1
                    self._in_string = False
                    if self._key is not None:
                        self._end_key()
                    continue
                depth = len(stack)
                if depth > len(track):
                    # Inside a member nobody asked for: only its brackets matter.
                    m = _TOKENS.search(data, pos)
                    if m is None:
                        break
                    i = m.start()
                    c = data[i]
                    pos = i + 1
                    steps += 1
                    if steps > limit:
                        raise _GiveUp(f"the JSON document needs more than {_MAX_STEPS} steps to scan")
                    if c == 34:
                        self._in_string = True
                    elif c == 123 or c == 91:
                        # Tried only when a bracket closes within reach: a failed match is costly.
                        end = i + _FLAT_SPAN
                        flat = _FLAT[c].match(data, i, end) if _CLOSING.search(data, i, end) else None
                        if flat is not None:
                            pos = flat.end()
                        elif depth >= _MAX_DEPTH:
                            raise _GiveUp(f"the JSON document is nested deeper than {_MAX_DEPTH}")
                        else:
                            stack.append(c)
                    elif stack.pop() != c - 2:  # } or ]: their opener is 2 below
                        raise _GiveUp("malformed JSON: brackets do not match")
                    continue
                if depth == 0:
                    m = _NOT_SPACE.search(data, pos)
                    if m is None:
                        break
                    i = m.start()
                    if not self.started and data.startswith(b"\xef\xbb\xbf", i):
                        pos = i + 3  # a byte-order mark, which json.loads accepts too
                        continue
                    if self.closed:
                        raise _GiveUp("bytes after the end of the JSON object")
                    if data[i] != 123:
                        raise _GiveUp("the body is not a JSON object")
                    self.started = True
                    stack.append(123)
                    track.append(_Frame(()))
                    pos = i + 1
                    continue
                # In an object on the way to a target: follow its keys.
                m = _TOKENS_TRACKED.search(data, pos)
                if m is None:
                    break
                i = m.start()
                c = data[i]
                pos = i + 1
                steps += 1
                if steps > limit:
                    raise _GiveUp(f"the JSON document needs more than {_MAX_STEPS} steps to scan")
                frame = track[-1]
                if c == 34:  # "
                    self._in_string = True
                    if frame.state == _KEY:
                        self._key = bytearray()
                    elif frame.state == _VALUE:
                        frame.state = _NEXT
                    else:
                        raise _GiveUp("malformed JSON: a string where a ':' or ',' belongs")
                elif c == 123 or c == 91:  # { [
                    if frame.state != _VALUE:
                        raise _GiveUp("malformed JSON: a value where a key belongs")
                    frame.state = _NEXT
                    stack.append(c)
                    if c == 123 and frame.pending is not None:
                        track.append(_Frame(frame.pending))
                elif c == 125:  # }
                    if frame.state == _COLON:
                        raise _GiveUp("malformed JSON: an object ends where a value belongs")
                    if self._capture is not None and len(track) == len(self._capture_path):
                        self._end_capture(data, i)
                    track.pop()
                    stack.pop()
                    if not stack:
                        self.closed = True
                elif c == 93:  # ]
                    raise _GiveUp("malformed JSON: brackets do not match")
                elif c == 44:  # ,
                    if frame.state != _VALUE and frame.state != _NEXT:
                        raise _GiveUp("malformed JSON: a ',' where a key or ':' belongs")
                    if self._capture is not None and len(track) == len(self._capture_path):
                        self._end_capture(data, i)
                    frame.state = _KEY
                else:  # :
                    if frame.state != _COLON:
                        raise _GiveUp("malformed JSON: a ':' out of place")
                    frame.state = _VALUE
                    path = None if frame.key is None else (*frame.path, frame.key)
                    frame.pending = path if path in self.prefixes else None
                    if path in self.targets:
                        assert path is not None
                        self.touched.add(path)
                        self._capture = bytearray()
                        self._capture_path = path
                        self._capture_big = False
                        self._capture_from = pos
        finally:
            self._steps += steps
        if self._capture is not None:
            self._keep(data, n)
            self._capture_from = 0

    _capture_from = 0

    def _keep(self, data: bytes, end: int) -> None:
        assert self._capture is not None
        start = self._capture_from
        if self._capture_big or len(self._capture) + end - start > _CAPTURE:
            self._capture_big = True
            self._capture.clear()
        else:
            self._capture += data[start:end]

    def _end_capture(self, data: bytes, end: int) -> None:
        self._keep(data, end)
        assert self._capture is not None
        self.values[self._capture_path] = None if self._capture_big else bytes(self._capture)
        self._capture = None

    def _end_key(self) -> None:
        assert self._key is not None
        raw = bytes(self._key)
        self._key = None
        frame = self._track[-1]
        frame.key = None if len(raw) > 256 else _decode_key(raw)
        frame.state = _COLON
        if frame.key in self.watch and len(self._track) == 1:
            self.seen.add(frame.key)


class _Bad:
    """A member the scanner could not keep: reading it as usage raises UsageError."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


_MISSING: Any = object()


def _captured(raw: Optional[bytes], what: str) -> Any:
    if raw is None:
        return _Bad(f"{what} is larger than {_CAPTURE} bytes")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return _Bad(f"{what} is not valid JSON")


def _checked(value: Any) -> Any:
    if isinstance(value, _Bad):
        raise UsageError(value.reason)
    return value


def _openai_format(usage: Any) -> str:
    """Chat Completions, completions and embeddings say ``prompt_tokens``; Responses says
    ``input_tokens``."""
    if isinstance(usage, dict) and "prompt_tokens" not in usage and "input_tokens" in usage:
        return "openai-responses"
    return "openai"


# --- server-sent events ------------------------------------------------------------------

_LINE_END = re.compile(rb"\r\n|\r|\n")
# Events that can carry usage are the only ones parsed as JSON: a "usage" member that
# is not null. Inside a JSON string the quote before a colon would be escaped, so text
# deltas never match.
_USAGE_MARK = re.compile(rb'"usage"\s*:\s*[^\sn]')
_STR = rb'"([^"\\]*(?:\\.[^"\\]*)*)"'
_TEXT = {
    "chat": re.compile(
        rb'"(?:content|text|arguments|refusal|reasoning_content|reasoning)"\s*:\s*' + _STR, re.S
    ),  # chat deltas, legacy completions' text, tool-call arguments
    "responses": re.compile(rb'"delta"\s*:\s*' + _STR, re.S),  # only *.delta events have a string delta
    "anthropic": re.compile(rb'"(?:text|partial_json|thinking)"\s*:\s*' + _STR, re.S),
}
_RESPONSES_EVENT = re.compile(rb'"type"\s*:\s*"response\.')
_ANTHROPIC_EVENT = re.compile(rb'"type"\s*:\s*"(?:message_|content_block_)')
_RESPONSES_END = ("response.completed", "response.incomplete", "response.failed")
_ANTHROPIC_COUNTS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
_SSE_TARGETS = frozenset({(b"type",), (b"usage",), (b"response", b"usage"), (b"message", b"usage")})
_BODY_TARGETS = frozenset({(b"usage",), (b"object",), (b"type",)})
_GENERATION = frozenset({b"choices", b"output", b"content"})

_NORMAL, _SCANNED, _SKIPPED = range(3)  # what happens to the current line's bytes
_HELD, _OUT, _DROPPED = range(3)  # where the last line's bytes went (stripping)


def _family(provider: Optional[str]) -> Optional[str]:
    if provider is None:
        return None
    return "anthropic" if provider == "anthropic" else "openai"


class _SseCore:
    """Usage from a decoded SSE byte stream; with ``strip``, also the bytes to forward
    without OpenAI's usage-only chunk. ``parse_all`` parses every event (UsageStream's
    behaviour: malformed events are counted in ``errors``); otherwise only events that
    can carry usage are parsed, and the others are kept raw (the first 256 KiB) in case
    a cut stream's output must be estimated."""

    def __init__(
        self,
        provider: Optional[str],
        model: Any,
        input_estimate: int,
        *,
        parse_all: bool = False,
        strip: bool = False,
    ) -> None:
        self.provider = provider
        self.family = _family(provider)
        self.model: Optional[str] = model if isinstance(model, str) else None
        self.input_estimate = input_estimate
        self.parse_all = parse_all
        self.strip = strip
        self.done = False
        self.events = 0  # events with data
        self.errors = 0
        self.poison: Optional[str] = None
        self.usage: Optional[Usage] = None
        self.final = False
        self._anthropic: Optional[Dict[str, Any]] = None
        self._format: Optional[str] = None
        # Streamed text for estimates: strings from parsed events, and raw events (each
        # kept while under _TEXT_KEEP; beyond, only their size, to extrapolate).
        self._texts: List[str] = []
        self._texts_kept = 0
        self._texts_total = 0
        self._raw: List[bytes] = []
        self._raw_kept = 0
        self._raw_total = 0
        self._line = bytearray()
        self._line_mode = _NORMAL
        self._skip_lf = False
        self._data: List[bytes] = []
        self._data_size = 0
        self._scan: Optional[_JsonScan] = None
        self._held = bytearray()
        self._released = False
        self._out: List[bytes] = []
        self._lf_to = _OUT
        self._ended = False

    # bytes -> lines -> events

    def feed(self, data: bytes) -> None:
        n = len(data)
        pos = 0
        if self._skip_lf and n:
            self._skip_lf = False
            if data[0] == 10:  # the LF of a CRLF split across chunks
                pos = 1
                if self.strip:
                    self._route_lf()
        strip = self.strip
        has_cr = data.find(b"\r", pos) >= 0
        while True:
            if has_cr:
                m = _LINE_END.search(data, pos)
                if m is None:
                    break
                end, nxt = m.span()
            else:
                end = data.find(b"\n", pos)
                if end < 0:
                    break
                nxt = end + 1
            if strip:
                self._keep(data[pos:nxt])
            if self._line_mode == _NORMAL:
                if self._line:
                    self._line += data[pos:end]
                    line = bytes(self._line)
                    self._line.clear()
                else:
                    line = data[pos:end]
                self._line_done(line)
            else:
                if self._line_mode == _SCANNED:
                    assert self._scan is not None
                    self._scan.feed(data[pos:end])
                self._line_mode = _NORMAL
            pos = nxt
            if nxt == n and data[end] == 13 and nxt - end == 1:
                self._skip_lf = True
        if pos < n:
            if strip:
                self._keep(data[pos:])
            self._partial(data[pos:])

    def _partial(self, piece: bytes) -> None:
        """Bytes of a line whose end has not come yet."""
        if self._line_mode == _NORMAL:
            self._line += piece
            if len(self._line) <= _SMALL:
                return
            # A line this long is no text delta: scan it if it is data, else drop it.
            line = bytes(self._line)
            self._line.clear()
            if line.startswith(b"data:"):
                self._to_scan(line[6:] if line[5:6] == b" " else line[5:])
                self._line_mode = _SCANNED
            else:
                self._line_mode = _SKIPPED
        elif self._line_mode == _SCANNED:
            assert self._scan is not None
            self._scan.feed(piece)

    def _line_done(self, line: bytes) -> None:
        if not line:
            self._dispatch()
            return
        if line[:5] != b"data:":
            return  # event:, id:, retry: and comments carry no usage
        value = line[6:] if line[5:6] == b" " else line[5:]
        if self._scan is not None or self._data_size + len(value) > _SMALL:
            self._to_scan(value)
            return
        self._data.append(value)
        self._data_size += len(value) + 1

    def _to_scan(self, value: bytes) -> None:
        if self._scan is None:
            self._scan = _JsonScan(_SSE_TARGETS)
            if self._data:
                self._scan.feed(b"\n".join(self._data) + b"\n")
                self._data = []
                self._data_size = 0
            self._scan.feed(value)
        else:
            self._scan.feed(b"\n" + value)

    def _dispatch(self) -> None:
        stripped = False
        if self._scan is not None:
            self.events += 1
            scan, self._scan = self._scan, None
            self._event_scanned(scan)
        elif self._data:
            self.events += 1
            payload = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
            self._data = []
            self._data_size = 0
            stripped = self._event(payload)
        if self.strip:
            if self._released:
                self._released = False
                self._lf_to = _OUT
            elif stripped:
                self._held.clear()
                self._lf_to = _DROPPED
            else:
                if self._held:
                    self._out.append(bytes(self._held))
                    self._held.clear()
                self._lf_to = _OUT

    # stripping: an event's bytes are held until it is known not to be the usage chunk

    def _keep(self, piece: bytes) -> None:
        if self._released:
            self._out.append(piece)
            self._lf_to = _OUT
            return
        self._held += piece
        self._lf_to = _HELD
        if len(self._held) > _SMALL:  # far bigger than any usage chunk: let it go
            self._out.append(bytes(self._held))
            self._held.clear()
            self._released = True
            self._lf_to = _OUT

    def _route_lf(self) -> None:
        if self._lf_to == _HELD:
            self._held += b"\n"
        elif self._lf_to == _OUT:
            self._out.append(b"\n")

    def take_out(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def end(self) -> None:
        """The stream ended: an unfinished last line and event are read as if complete
        (a client would not dispatch them, but their usage was delivered)."""
        if self._ended:
            return
        self._ended = True
        self._skip_lf = False
        if self._line_mode == _NORMAL and self._line:
            line = bytes(self._line)
            self._line.clear()
            self._line_done(line)
        self._line_mode = _NORMAL
        if self._data or self._scan is not None or self._held or self._released:
            self._dispatch()

    # events

    def _event(self, payload: bytes) -> bool:
        """Reads one event; True when it is the usage-only chunk to strip."""
        if len(payload) < 16 and payload.strip() == b"[DONE]":
            self.done = True
            return False
        if not self.parse_all and _USAGE_MARK.search(payload) is None:
            self._raw_total += len(payload)
            if self._raw_kept < _TEXT_KEEP:
                self._raw.append(payload)
                self._raw_kept += len(payload)
            return False
        try:
            event = json.loads(payload)
        except (ValueError, RecursionError):
            self.errors += 1
            if self.poison is None and _USAGE_MARK.search(payload) is not None:
                self.poison = "an event carrying usage is not valid JSON"
            return False
        if not isinstance(event, dict):
            self.errors += 1
            return False
        self._read(event, text=True)
        if not self.strip:
            return False
        choices = event.get("choices")
        return isinstance(choices, list) and not choices and event.get("usage") is not None

    def _event_scanned(self, scan: _JsonScan) -> None:
        if scan.failed is not None or not scan.closed:
            self.errors += 1
            if self.poison is None and any(path[-1] == b"usage" for path in scan.touched):
                self.poison = f"an event carrying usage cannot be read: {scan.failed or 'it ends early'}"
            return
        values = scan.values
        event: Dict[str, Any] = {}
        kind = values.get((b"type",))
        if kind is not None:
            kind = _captured(kind, "type")
            if isinstance(kind, str):
                event["type"] = kind
        if (b"usage",) in values:
            event["usage"] = _captured(values[(b"usage",)], "usage")
        for outer in (b"response", b"message"):
            if (outer, b"usage") in values:
                event[outer.decode()] = {"usage": _captured(values[(outer, b"usage")], f"{outer.decode()}.usage")}
        self._read(event, text=False)

    def _read(self, event: Dict[str, Any], text: bool) -> None:
        if self.family is None:
            try:
                self.provider = detect_provider(event)
            except UsageError:
                return
            self.family = _family(self.provider)
        kind = event.get("type")
        try:
            if self.family == "anthropic":
                self._format = "anthropic"
                if kind == "message_start":
                    message = event.get("message")
                    self._anthropic_start(message.get("usage") if isinstance(message, dict) else None)
                elif kind == "message_delta":
                    self._anthropic_delta(event.get("usage"))
                elif kind == "content_block_delta":
                    delta = event.get("delta")
                    if text and isinstance(delta, dict):
                        for name in ("text", "partial_json", "thinking"):
                            self._text_of(delta.get(name))
                elif kind == "message_stop":
                    self.done = True
            elif isinstance(kind, str) and kind.startswith("response."):
                self._format = "responses"
                if kind in _RESPONSES_END:
                    self.done = True
                    response = event.get("response")
                    usage = response.get("usage") if isinstance(response, dict) else None
                    if usage is not None:
                        self._final(_usage_of(_checked(usage), "openai-responses"))
                elif text and kind.endswith(".delta"):
                    self._text_of(event.get("delta"))
            else:
                if text:
                    self._text_of_choices(event.get("choices"))
                usage = event.get("usage")
                if usage is not None:
                    usage = _checked(usage)
                    self._final(_usage_of(usage, _openai_format(usage)))
        except UsageError as error:
            self.errors += 1
            if self.poison is None:
                self.poison = str(error)

    def _final(self, usage: Usage) -> None:
        self.usage = usage
        self.final = True

    def _anthropic_counts(self, usage: Dict[str, Any], into: Dict[str, Any], what: str) -> None:
        for name in _ANTHROPIC_COUNTS:
            if usage.get(name) is not None:
                into[name] = _count(usage[name], f"{what}.{name}")
        thinking = _details(usage, "output_tokens_details").get("thinking_tokens")
        if thinking is not None:
            into["output_tokens_details"] = {
                "thinking_tokens": _count(thinking, f"{what}.output_tokens_details.thinking_tokens")
            }

    def _anthropic_start(self, usage: Any) -> None:
        usage = _checked(usage)
        if not isinstance(usage, dict):
            raise UsageError("message_start.message.usage must be an object")
        counts: Dict[str, Any] = {}
        self._anthropic_counts(usage, counts, "message_start.message.usage")
        self.usage = _usage_of(counts, "anthropic", require_output=False)
        self._anthropic = counts

    def _anthropic_delta(self, usage: Any) -> None:
        usage = _checked(usage)
        if not isinstance(usage, dict):
            raise UsageError("message_delta.usage must be an object")
        _count(usage.get("output_tokens"), "message_delta.usage.output_tokens", required=True)
        # Cumulative counts: each replaces the one before, nothing is summed; counts a
        # delta leaves out keep their message_start value (as the Anthropic SDK does).
        counts = dict(self._anthropic or {})
        self._anthropic_counts(usage, counts, "message_delta.usage")
        self._final(_usage_of(counts, "anthropic"))
        self._anthropic = counts

    # streamed text, for the estimate of a stream cut before its usage

    def _text_of(self, value: Any) -> None:
        if isinstance(value, str) and value:
            self._texts_total += len(value)
            if self._texts_kept < _TEXT_KEEP:
                self._texts.append(value)
                self._texts_kept += len(value)

    def _text_of_choices(self, choices: Any) -> None:
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            self._text_of(choice.get("text"))
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            for name in ("content", "refusal", "reasoning_content", "reasoning"):
                self._text_of(delta.get(name))
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for call in calls:
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict):
                        self._text_of(function.get("arguments"))

    def _raw_text(self) -> str:
        """The generated text in the raw events kept: JSON string values under the keys
        that hold it, found without parsing the events."""
        pieces: List[bytes] = []
        kind = self._format
        for payload in self._raw:
            if kind is None:
                if self.family == "anthropic" or _ANTHROPIC_EVENT.search(payload):
                    kind = "anthropic"
                elif _RESPONSES_EVENT.search(payload):
                    kind = "responses"
            pieces.extend(m.group(1) for m in _TEXT[kind or "chat"].finditer(payload))
        raw = b"".join(pieces)
        try:
            return str(json.loads(b'"' + raw + b'"', strict=False))
        except ValueError:
            return raw.decode("utf-8", "replace")

    def _tokens_of(self, text: str) -> int:
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        if self.family == "anthropic":
            from ._count import anthropic_estimator

            return math.ceil(len(text) / anthropic_estimator.CHARS_PER_TOKEN * anthropic_estimator.factor(self.model))
        from ._count import count_tokens

        return count_tokens(text, self.model)

    def _text_estimate(self) -> int:
        tokens = 0
        if self._texts_total:
            tokens += math.ceil(self._tokens_of("".join(self._texts)) * self._texts_total / self._texts_kept)
        if self._raw_total:
            tokens += math.ceil(self._tokens_of(self._raw_text()) * self._raw_total / self._raw_kept)
        return tokens

    def finish(self, strict: bool = True) -> Usage:
        self.end()
        if strict and self.poison is not None:
            raise UsageError(self.poison)
        if self.final and self.usage is not None:
            return self.usage
        output = self._text_estimate()
        if self._anthropic is not None and self.usage is not None:
            # Input counted by message_start; output at least what was streamed.
            started = self.usage
            return started._replace(output_tokens=max(started.output_tokens, output), reasoning_tokens=0, exact=False)
        return Usage(self.input_estimate, output, exact=False)


# --- the reader -----------------------------------------------------------------------


def _media_type(value: Union[str, bytes, None]) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1")
    return value.split(";", 1)[0].strip().lower()


def _mode_from_media(media: str) -> Optional[str]:
    if media == "text/event-stream":
        return "sse"
    if media in ("application/json", "text/json") or media.endswith("+json"):
        return "json"
    return None


# Content-Type value -> how the body is read, for the few values upstreams send. The
# values come from the upstream, so the table stops growing at _MODES_MAX entries.
_MODES: Dict[Union[str, bytes], Optional[str]] = {}
_MODES_MAX = 64


def _mode_of(content_type: Union[str, bytes, None]) -> Optional[str]:
    """How a body with this Content-Type is read: "sse", "json" or None (sniffed)."""
    kind = type(content_type)
    if kind is not str and kind is not bytes:
        return _mode_from_media(_media_type(content_type))
    try:
        return _MODES[content_type]  # type: ignore[index]
    except KeyError:
        pass
    mode = _mode_from_media(_media_type(content_type))
    if len(content_type) <= 200 and len(_MODES) < _MODES_MAX:  # type: ignore[arg-type]
        _MODES[content_type] = mode  # type: ignore[index]
    return mode


def _header_name(name: Union[str, bytes]) -> str:
    return (name.decode("latin-1") if isinstance(name, (bytes, bytearray)) else str(name)).lower()


class UsageReader:
    """Reads the usage of one upstream LLM response from its bytes as they are
    forwarded, without changing them.

    ``provider``: ``"openai"`` (Chat Completions, Responses, legacy completions and
    embeddings, told apart by the response itself), ``"openai-chat"``,
    ``"openai-responses"``, ``"anthropic"``, or None to detect it. ``model``: the
    request's model (for estimates; anything but a str is ignored). ``input_estimate``:
    the input tokens counted from the request, used when a cut stream never reported
    its own. ``content_type`` and ``content_encoding``: the response's headers (str or
    bytes; stacked codings such as ``"gzip, br"`` are decoded in reverse order).

    Call ``feed(chunk)`` for every body chunk and forward what it returns, then
    ``finish(complete)``:

    - ``feed(chunk) -> bytes``: the bytes to forward for this chunk: ``chunk`` itself
      unless ``strip_usage_chunk`` applies. It raises nothing for any content (only
      TypeError for a non-bytes chunk, and, in the decoded-forwarding mode below,
      UsageError when the body cannot be decoded).
    - ``flush() -> bytes``: with ``strip_usage_chunk``, the bytes still held back at
      the end of the stream (the last event when it had no blank line); forward them
      before ending the response. b"" otherwise.
    - ``finish(complete=True) -> Usage``: the usage. ``complete=False`` when the client
      went away or the upstream cut the body. Raises :class:`UsageError` when no
      trustworthy usage can be read (the caller then settles at its estimate): a
      missing, malformed, negative, non-integer, NaN, boolean or > 2**53 count, usage
      that is not an object, a truncated or malformed JSON body, an unsupported or
      undecodable content coding, a body past the decoding budget. Calling it again
      returns (or raises) the same.

    Streams (``text/event-stream``): OpenAI's usage chunk (``stream_options.
    include_usage``), Responses' ``response.completed`` / ``.incomplete`` /
    ``.failed``, Anthropic's ``message_start`` (input, cache reads and writes) and
    ``message_delta`` (cumulative: the latest count replaces the one before). A stream
    that ended without its final usage event is treated as cut: its usage is then the
    input from ``message_start`` (Anthropic) or ``input_estimate``, and an output of
    at least the text streamed so far (tiktoken for OpenAI models, the Anthropic
    estimator otherwise), flagged ``exact=False``. Other bodies are read as JSON (the
    top-level ``usage``, wherever it is in the object); a JSON body cut before its
    usage raises UsageError (non-streamed output is generated in full before it is
    sent, so the text delivered says nothing of its cost).

    ``strip_usage_chunk=True`` (streams only): the middleware added
    ``stream_options.include_usage`` to a request whose client did not ask for it, so
    the usage-only chunk (``{"choices": [], "usage": {...}}``) is removed from what
    ``feed`` returns, even split across chunks, with CRLF, LF or CR line ends. Its usage
    is still read. Each event is held back until its blank line (at most 64 KiB;
    bigger events pass at once); the other chunks still carry ``"usage": null``, as
    the SDKs accept. The length changes, so drop ``Content-Length``:
    :meth:`forwarded_headers` does. Ask the upstream for ``Accept-Encoding: identity``
    on such requests; if it compresses anyway, the reader forwards the *decoded*,
    stripped stream (``forward_decoded`` is True), ``forwarded_headers`` then drops
    ``Content-Encoding`` too, and a body that cannot be decoded or breaks the budget
    makes ``feed`` raise UsageError: end the response there. With an unsupported
    coding nothing is stripped (the bytes pass unchanged) and ``finish`` raises.

    Bounds: decoding stops past ``max_decoded_bytes`` plus MAX_COMPRESSION_RATIO (256)
    times the encoded bytes received (a decompression bomb then only costs that much;
    ``finish`` raises UsageError), in steps of 64 KiB. Nothing grows with the body:
    JSON is scanned (at most 2**20 structural tokens, 512 levels, a usage of 64 KiB);
    SSE events are held whole up to 64 KiB and scanned beyond; a line that never ends
    is scanned or dropped as it comes; at most 256 KiB of streamed text are kept for
    estimates. Decoding brotli needs ``brotli`` >= 1.2 and zstd ``zstandard``
    (windows up to 8 MB, as RFC 9659 allows); without them the coding counts as
    unsupported.
    """

    def __init__(
        self,
        provider: Optional[str],
        model: Optional[str],
        input_estimate: int,
        *,
        content_type: Union[str, bytes, None],
        content_encoding: Union[str, bytes, None],
        strip_usage_chunk: bool = False,
        max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    ) -> None:
        checked = _check_provider(provider)
        if type(input_estimate) is not int or input_estimate < 0:
            raise ValueError(f"input_estimate must be a non-negative int, got {input_estimate!r}")
        if type(max_decoded_bytes) is not int or max_decoded_bytes < _STEP:
            raise ValueError(f"max_decoded_bytes must be an int of at least {_STEP}, got {max_decoded_bytes!r}")
        self.provider = checked
        self.model: Optional[str] = model if isinstance(model, str) else None
        self.input_estimate = input_estimate
        self.max_decoded_bytes = max_decoded_bytes
        mode = _mode_of(content_type)
        self._mode = mode
        if content_encoding is None:
            # No content coding, what nearly every response has: nothing to decode.
            self.strip_usage_chunk = bool(strip_usage_chunk) and mode == "sse"
            if mode == "json":
                # A JSON body that arrives uncompressed is held (up to _CAPTURE bytes)
                # and read with one json.loads at the end: ~10x cheaper than scanning
                # it, and a small body is what most calls get. Past _CAPTURE, or when
                # json.loads does not accept it, the scanner reads it, as it reads
                # every other body.
                self._small = []
            else:
                # The event-stream reader, made only for a body that may be a stream.
                self._sse = _SseCore(checked, self.model, input_estimate, strip=self.strip_usage_chunk)
            return  # _plain: feed hands the bytes to _consume, _entry is not needed
        stages: List[_Stage] = []
        codings = _codings(content_encoding)
        if len(codings) > MAX_CONTENT_CODINGS:
            self._failed = f"more than {MAX_CONTENT_CODINGS} content codings: {', '.join(codings[:8])}"
        else:
            for name in reversed(codings):
                stage = _stage(name)
                if stage is None:
                    self._failed = f"unsupported content-encoding {name[:40]!r}"
                    stages = []
                    break
                stages.append(stage)
        self.strip_usage_chunk = bool(strip_usage_chunk) and mode == "sse" and self._failed is None
        self.forward_decoded = self.strip_usage_chunk and bool(stages)
        if mode != "json":
            self._sse = _SseCore(checked, self.model, input_estimate, strip=self.strip_usage_chunk)
        if mode == "json" and not stages and self._failed is None:
            self._small = []
        if stages:
            self._decoded = [0] * len(stages)
        entry: _Sink = self._consume
        for index in reversed(range(len(stages))):
            entry = self._link(index, stages[index], entry)
        self._entry = entry
        self._plain = not stages

    # The state of a reader just made, as class defaults: each reader sets only what
    # differs (one is made per response).
    _failed: Optional[str] = None
    forward_decoded = False
    _sse: Optional[_SseCore] = None
    _json: Optional[_JsonScan] = None  # made with the first JSON bytes scanned
    _small: Optional[List[bytes]] = None
    _small_size = 0
    _encoded = 0
    _decoded: List[int]  # bytes decoded per coding stage (set when there are stages)
    _entry: _Sink  # the first coding stage (set when there are stages)
    _plain = True
    _sniffed = False
    _finished = False
    _result: Union[Usage, UsageError, None] = None
    _mode: Optional[str]

    def _link(self, index: int, stage: _Stage, after: _Sink) -> _Sink:
        def sink(out: bytes) -> None:
            self._decoded[index] += len(out)
            if self._decoded[index] > self.max_decoded_bytes + MAX_COMPRESSION_RATIO * self._encoded:
                raise _GiveUp(
                    f"the {stage.name} body decodes to more than {self.max_decoded_bytes} bytes plus "
                    f"{MAX_COMPRESSION_RATIO} per encoded byte (a decompression bomb?)"
                )
            after(out)

        return lambda data: stage.feed(data, sink)

    @property
    def _core(self) -> _SseCore:
        if self._sse is None:  # a body sniffed as an event stream
            self._sse = _SseCore(self.provider, self.model, self.input_estimate, strip=self.strip_usage_chunk)
        return self._sse

    def _scan_held(self) -> None:
        """Hands the held JSON bytes to the scanner (from then on it reads the body)."""
        held, self._small = self._small, None
        if held:
            self._consume(held[0] if len(held) == 1 else b"".join(held))

    def _consume(self, data: bytes) -> None:
        mode = self._mode
        if mode is None:
            m = _NOT_SPACE.search(data)
            if m is None:
                return
            # No usable content type: a body starting with "{" is JSON, anything else SSE.
            start = m.start() + 3 if data.startswith(b"\xef\xbb\xbf", m.start()) else m.start()
            mode = self._mode = "json" if data[start : start + 1] == b"{" else "sse"
            self._sniffed = True
        if mode == "sse":
            self._core.feed(data)
        else:
            if self._json is None:
                self._json = _JsonScan(_BODY_TARGETS, _GENERATION)
            self._json.feed(data)
            if self._json.failed is not None:  # nothing more to read: stop decoding too
                raise _GiveUp(f"cannot read the JSON body: {self._json.failed}")

    def feed(self, chunk: bytes) -> bytes:
        """Reads the next body chunk; returns the bytes to forward for it."""
        if type(chunk) is bytes:
            data = chunk
        elif isinstance(chunk, (bytes, bytearray, memoryview)):
            data = bytes(chunk)
        else:
            raise TypeError(f"chunk must be bytes, got {type(chunk).__name__}")
        if self._finished:
            return data
        if self._failed is not None:
            if self.forward_decoded:
                raise UsageError(self._failed)
            return data
        try:
            small = self._small
            if small is not None:
                small.append(data)
                size = self._small_size = self._small_size + len(data)
                if size > _CAPTURE:
                    self._scan_held()
            elif self._plain:
                self._consume(data)
            else:
                self._encoded += len(data)
                self._entry(data)
        except _GiveUp as error:
            self._failed = str(error)
            if self.forward_decoded:
                raise UsageError(self._failed) from None
            return data
        if self.strip_usage_chunk:
            return self._core.take_out()
        return data

    def flush(self) -> bytes:
        """With ``strip_usage_chunk``: the bytes held back at the end of the stream."""
        if not self.strip_usage_chunk or self._failed is not None or self._finished:
            return b""
        self._core.end()
        return self._core.take_out()

    def forwarded_headers(self, headers: Iterable[Tuple[Any, Any]]) -> List[Tuple[Any, Any]]:
        """The response headers to forward (names and values as given, str or bytes):
        without Content-Length when stripping, and without Content-Encoding when the
        decoded stream is forwarded."""
        if not self.strip_usage_chunk:
            return list(headers)  # forward_decoded implies strip_usage_chunk
        drop = {"content-length"}
        if self.forward_decoded:
            drop.add("content-encoding")
        return [(k, v) for k, v in headers if _header_name(k) not in drop]

    def finish(self, complete: bool = True) -> Usage:
        """The usage of the response (of what was delivered, when ``complete`` is False)."""
        result = self._result
        if result is None:
            try:
                result = self._finish(complete)
            except UsageError as error:
                result = error
            self._result = result
            self._finished = True
        if type(result) is not Usage:
            raise result  # type: ignore[misc]
        return result

    def _finish(self, complete: bool) -> Usage:
        small = self._small
        if small is not None:
            doc = _small_document(small[0] if len(small) == 1 else b"".join(small))
            if doc is not None:
                self._small = None
                usage = doc.get("usage", _MISSING)
                if type(usage) is dict and (self.provider == "openai" or self.provider == "openai-responses"):
                    # The common answer: an OpenAI provider, and the usage an object.
                    return _usage_of(
                        usage,
                        _openai_format(usage),
                        require_output="choices" in doc or "output" in doc or "content" in doc,
                    )
                return self._usage_in(usage, doc, any(k in doc for k in _GENERATION_NAMES))
            try:
                self._scan_held()
            except _GiveUp as error:
                self._failed = str(error)
        if self._failed is not None:
            raise UsageError(self._failed)
        if self._mode == "sse":
            usage = self._core.finish(strict=True)
            if self._sniffed and not self._core.events:
                raise UsageError("the body is neither a JSON object nor an event stream")
            return usage
        if self._json is None or not (self._json.started or self._json.failed):
            raise UsageError("the response has no body")
        scan = self._json
        if scan.failed is not None:
            raise UsageError(f"cannot read the JSON body: {scan.failed}")
        if complete and not scan.closed:
            raise UsageError("the JSON body ended before the end of its object")
        raw = scan.values.get((b"usage",), _MISSING)
        usage = _MISSING if raw is _MISSING else _checked(_captured(raw, "usage"))
        members: Dict[str, Any] = {}
        if self.provider is None:
            for name in ("object", "type"):
                if (name.encode(),) in scan.values:
                    members[name] = _captured(scan.values[(name.encode(),)], name)
        return self._usage_in(usage, members, bool(scan.seen))

    def _usage_in(self, usage: Any, members: Dict[str, Any], generated: bool) -> Usage:
        """The usage of a JSON body from its ``usage`` member (``_MISSING`` when absent),
        its ``object`` and ``type`` members in ``members`` (to detect the provider), and
        whether it has a generation member (``choices``, ``output``, ``content``)."""
        if usage is _MISSING or usage is None:
            raise UsageError("the response has no 'usage'")
        if self.provider is None:
            shape = {"usage": usage}
            for name in ("object", "type"):
                if name in members:
                    shape[name] = members[name]
            provider = detect_provider(shape)
        elif self.provider == "anthropic":
            provider = "anthropic"
        else:
            provider = _openai_format(usage)
        return _usage_of(usage, provider, require_output=generated)


_GENERATION_NAMES = tuple(name.decode() for name in _GENERATION)


def _small_document(body: bytes) -> Optional[Dict[str, Any]]:
    """The JSON object ``body`` holds, when ``json.loads`` reads it exactly as the
    scanner would: UTF-8, an object, fewer than _MAX_DEPTH brackets in all (so never
    deeper than the scanner allows; a body of at most _CAPTURE bytes never needs more
    than _MAX_STEPS steps either). None: the scanner decides."""
    # (A body shorter than _MAX_DEPTH bytes cannot hold that many brackets.)
    if len(body) >= _MAX_DEPTH and body.count(b"{") + body.count(b"[") >= _MAX_DEPTH:
        return None
    try:
        text = body.decode("utf-8")
        # What json.loads does, without its Python steps, for a body that starts with
        # "{" (no whitespace nor byte-order mark first) and ends where the object does.
        if text[:1] == "{":
            doc, end = _scan_json(text, 0)
            if end == len(text):
                return doc if type(doc) is dict else None
        doc = json.loads(text)
    except (ValueError, RecursionError, StopIteration):  # UnicodeDecodeError and JSONDecodeError too
        return None
    return doc if type(doc) is dict else None


# json.loads' own scanner (the C one when there is one), called directly.
_scan_json: Callable[[str, int], Tuple[Any, int]] = cast(Any, json.decoder.JSONDecoder()).scan_once
