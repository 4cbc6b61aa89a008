"""WSGI middleware (Flask, and any WSGI app).

    from nexus_limits.adapters.wsgi import RateLimitMiddleware
    app.wsgi_app = RateLimitMiddleware(app.wsgi_app, limiter=nl.TokenBucket("100/minute"), key="bearer")

The options are those of the ASGI middleware. A ``Concurrency`` lease is held until the
server closes the response.

WSGI servers join a header sent several times into one value with commas: a comma in a
key header (``header:<name>``, ``bearer``) is a repeat, refused with 400 when the values
differ. The path judged is ``PATH_INFO``, what the app routes on, normalised.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from ..errors import BadRequest
from ._common import Check, Limits, Request, bad_request, check_sync, release, status_line
from ._target import normalize_target, quote_decoded
from .headers import RATE_LIMIT_HEADERS, merge_rate_limit_headers

__all__ = ["RateLimitMiddleware"]


def _path_bytes(path_info: str) -> bytes:
    try:
        return path_info.encode("latin-1")  # PEP 3333: the bytes the server decoded
    except UnicodeEncodeError:
        return path_info.encode("utf-8", "surrogateescape")


def request_of(environ: Dict[str, Any]) -> Request:
    """The Request of a WSGI environ, method and path normalised (raises BadRequest)."""
    headers = {k[5:].replace("_", "-").lower(): str(v) for k, v in environ.items() if k.startswith("HTTP_")}
    if "CONTENT_TYPE" in environ:
        headers["content-type"] = str(environ["CONTENT_TYPE"])
    path_info = str(environ.get("PATH_INFO", "/")) or "/"
    method, path = normalize_target(str(environ.get("REQUEST_METHOD", "GET")), quote_decoded(_path_bytes(path_info)))
    return Request(method, path, headers, str(environ.get("QUERY_STRING", "")), environ.get("REMOTE_ADDR"))


def _merged(headers: List[Tuple[str, str]], ours: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
    kept = [(k, v) for k, v in headers if k.lower() not in RATE_LIMIT_HEADERS]
    present = [(k, v) for k, v in headers if k.lower() in RATE_LIMIT_HEADERS]
    return kept + merge_rate_limit_headers(present, ours)


class _Closing:
    """The app's response, with the lease released when the server closes it."""

    def __init__(self, body: Iterable[bytes], on_close: Callable[[], Any]) -> None:
        self._body = body
        self._on_close = on_close

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._on_close()


class RateLimitMiddleware:
    """Limits every request of a WSGI app; see :class:`nexus_limits.adapters.asgi.RateLimitMiddleware`."""

    def __init__(self, app: Any, limiter: Any = None, key: Any = "ip", **options: Any) -> None:
        self.app = app
        self.limits = Limits(limiter, key, **options)

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        check: Optional[Check]
        try:
            request = request_of(environ)
        except BadRequest as error:
            check = bad_request(error)
        else:
            check = check_sync(self.limits, request)
        if check is None:
            return self.app(environ, start_response)  # type: ignore[no-any-return]
        if not check.allowed:
            start_response(status_line(check.status), check.headers)
            return [check.body]
        extra: List[Tuple[str, str]] = check.headers

        def start_with_headers(status: str, headers: List[Tuple[str, str]], exc_info: Optional[Any] = None) -> Any:
            if any(k.lower() in RATE_LIMIT_HEADERS for k, _ in headers):
                headers = _merged(headers, extra)
            else:
                headers = [*headers, *extra]
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        try:
            body = self.app(environ, start_with_headers)
        except BaseException:
            release(check.decision)
            raise
        return _Closing(body, lambda: release(check.decision))
