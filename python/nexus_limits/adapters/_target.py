"""The request target, normalised once, so that every spelling of a path is judged as
the path it names.

``///v1/chat/completions``, ``/v1/./chat/completions``, ``/v1/x/../chat/completions``,
``/v1/%2e%2e/v1/chat/completions`` and ``/v1/ch%61t/completions`` all reach the same
handler (or, through a proxy built on httpx, the same upstream URL); a limit or an
exemption decided on the raw text could be stepped around by picking another spelling.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Dict, List, Optional, Tuple, Union
from urllib.parse import quote, unquote_to_bytes

from ..errors import BadRequest

__all__ = ["match_form", "normalize_target", "quote_decoded"]

# RFC 9110 token characters: what a method may be made of.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_METHODS: Dict[str, str] = {
    m: m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")
}

# A path that needs no work: segments of unreserved characters, sub-delims, ":" and "@"
# (RFC 3986 pchar without escapes); "//" and "/." are checked apart.
_PLAIN = re.compile(rb"/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# pchar minus unreserved: kept as they are; every other byte is percent-encoded.
_KEEP = frozenset(b"!$&'()*+,;=:@/")
# Escapes that would change how the path splits (or what a server in front of the
# upstream makes of it): refused rather than guessed.
_STRUCTURAL = {0x2F: "'/'", 0x3F: "'?'", 0x23: "'#'", 0x5C: "'\\'"}
_HEX = frozenset(b"0123456789ABCDEFabcdef")
_SLASHES = re.compile(r"//+")
_DECODED_SAFE = "/!$&'()*+,;=:@"


def _show(text: Union[str, bytes]) -> str:
    shown = repr(text.decode("utf-8", "backslashreplace") if isinstance(text, bytes) else text)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def _method(method: str) -> str:
    known = _METHODS.get(method)
    if known is not None:
        return known
    if not isinstance(method, str) or len(method) > 64 or not _TOKEN.fullmatch(method):
        raise BadRequest(f"the request method {_show(method)} is not an HTTP token")
    return method.upper()


def _escape(byte: int) -> str:
    return f"%{byte:02X}"


def _normalize_path(raw: bytes) -> str:
    if not raw.startswith(b"/"):
        if raw == b"*":
            raise BadRequest("the request target '*' names no path")
        if b"://" in raw[:16]:
            raise BadRequest(f"the request target {_show(raw)} is an absolute URL; send the path only")
        raise BadRequest(f"the request path {_show(raw)} does not start with '/'")
    out = []
    i, n = 0, len(raw)
    while i < n:
        b = raw[i]
        if b == 0x25:  # "%"
            pair = raw[i + 1 : i + 3]
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                raise BadRequest(f"the request path {_show(raw)} has an invalid percent-escape")
            value = int(pair, 16)
            if value in _STRUCTURAL:
                raise BadRequest(f"the request path {_show(raw)} has an encoded {_STRUCTURAL[value]}")
            if value < 0x20 or value == 0x7F:
                raise BadRequest(f"the request path {_show(raw)} has an encoded control character")
            out.append(chr(value) if value in _UNRESERVED else _escape(value))
            i += 3
            continue
        if b < 0x20 or b == 0x7F:
            raise BadRequest(f"the request path {_show(raw)} has a control character")
        if b in _STRUCTURAL and b != 0x2F:
            raise BadRequest(f"the request path {_show(raw)} has a {_STRUCTURAL[b]}")
        out.append(chr(b) if b in _UNRESERVED or b in _KEEP else _escape(b))
        i += 1
    path = "".join(out)
    # Dot segments first, exactly as httpx (and RFC 3986, 5.2.4) removes them, so that
    # the path judged is the path an httpx-based proxy would send; then empty segments.
    if "." in path:
        segments = path.split("/")
        if "." in segments or ".." in segments:
            kept: List[str] = []
            for segment in segments:
                if segment == ".":
                    continue
                if segment == "..":
                    if kept and kept != [""]:
                        kept.pop()
                    continue
                kept.append(segment)
            path = "/".join(kept)
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if not path.startswith("/"):
        path = "/" + path
    if "%" in path:
        try:
            unquote_to_bytes(path).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"the request path {_show(raw)} is not UTF-8 once decoded") from None
    return path


def normalize_target(method: str, path: str, raw_path: Optional[Union[bytes, bytearray]] = None) -> Tuple[str, str]:
    """``(METHOD, path)``: the method upper-cased, the path normalised once.

    ``path`` is the target's path as sent on the wire, percent-encoded (the ASGI
    ``scope["raw_path"]``, given as ``raw_path``, is used instead when present: it is
    what the client really sent). The path comes back with:

    - percent-escapes of unreserved characters decoded (``%61`` → ``a``, ``%2e`` → ``.``),
      every other escape kept, in upper-case hex; characters that may not appear raw in
      a path (space, ``"``, ``<``, ``>``, ``^``, ``{``, non-ASCII...) percent-encoded;
    - ``.`` and ``..`` segments removed as httpx removes them (``/a/.`` → ``/a``), then
      runs of ``/`` collapsed to one.

    It raises :class:`~nexus_limits.errors.BadRequest` for a method that is not an HTTP
    token and for anything that is not an origin-form path: an absolute URL
    (``http://host/x``), an authority (``host:443``), ``*``, a path not starting with
    ``/``, an encoded ``/``, ``?``, ``#`` or ``\\``, a raw ``?``, ``#`` or ``\\``, NUL or
    any control character (raw or encoded), an invalid escape, a path that is not UTF-8
    once decoded.

    The result is a fixed point: ``normalize_target(*normalize_target(m, p)) ==
    normalize_target(m, p)``, and httpx sends it unchanged.
    """
    if type(method) is str and type(path) is str and (raw_path is None or type(raw_path) is bytes):
        if len(path) <= _CACHED_LENGTH and (raw_path is None or len(raw_path) <= _CACHED_LENGTH):
            return _cached(method, path, raw_path)
    return _normalize_target(method, path, raw_path)


def _normalize_target(method: str, path: str, raw_path: Optional[Union[bytes, bytearray]]) -> Tuple[str, str]:
    upper = _method(method)
    raw: Union[bytes, bytearray]
    if raw_path is not None:
        raw = raw_path
    elif isinstance(path, str):
        try:
            raw = path.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"the request path {_show(path)} is not UTF-8") from None
    else:
        raise TypeError(f"path must be a str, got {type(path).__name__}")
    if not isinstance(raw, (bytes, bytearray)):
        raise TypeError(f"raw_path must be bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    if _PLAIN.fullmatch(raw) and b"//" not in raw and b"/." not in raw:
        return upper, raw.decode("ascii")
    return upper, _normalize_path(raw)


# Most requests name a few targets: their answers are remembered (refusals are not).
# Only short targets, so that the cache stays small whatever clients send.
_CACHED_LENGTH = 256
_cached = lru_cache(maxsize=2048)(_normalize_target)


def quote_decoded(path: Union[str, bytes]) -> str:
    """The percent-encoded form of an already decoded path (WSGI's ``PATH_INFO`` as its
    latin-1 bytes, Django's ``request.path``), to hand to :func:`normalize_target`: a
    ``%`` stands for itself, and a ``?`` or ``#`` in it was sent encoded (and is
    refused there)."""
    return quote(path, safe=_DECODED_SAFE)


def match_form(path: str) -> str:
    """A normalised path fully decoded: what Starlette, Flask and Django route on, and
    what ``routes=`` and ``exempt=`` are compared with (``/files/caf%C3%A9`` and
    ``/files/café`` name one path). A normalised path has no encoded ``/``, ``?`` or
    ``#``, so decoding it cannot change its segments (and is UTF-8; a path that was not
    normalised cannot make this raise)."""
    if "%" not in path:
        return path
    return unquote_to_bytes(path).decode("utf-8", "replace")
