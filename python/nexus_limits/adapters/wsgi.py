"""WSGI middleware (Flask, and any WSGI app).

    from nexus_limits.adapters.wsgi import RateLimitMiddleware
    app.wsgi_app = RateLimitMiddleware(app.wsgi_app, limiter=nl.TokenBucket("100/minute"), key="bearer")

The options are those of the ASGI middleware. A ``Concurrency`` lease is held until the
server closes the response.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from ._common import Limits, Request, check_sync, release

__all__ = ["RateLimitMiddleware"]


def request_of(environ: Dict[str, Any]) -> Request:
    headers = {k[5:].replace("_", "-").lower(): str(v) for k, v in environ.items() if k.startswith("HTTP_")}
    if "CONTENT_TYPE" in environ:
        headers["content-type"] = str(environ["CONTENT_TYPE"])
    return Request(
        str(environ.get("REQUEST_METHOD", "GET")),
        str(environ.get("PATH_INFO", "/")) or "/",
        headers,
        str(environ.get("QUERY_STRING", "")),
        environ.get("REMOTE_ADDR"),
    )


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
        check = check_sync(self.limits, request_of(environ))
        if check is None:
            return self.app(environ, start_response)  # type: ignore[no-any-return]
        if not check.allowed:
            start_response(
                f"{check.status} {'Too Many Requests' if check.status == 429 else 'Unauthorized'}", check.headers
            )
            return [check.body]
        extra: List[Tuple[str, str]] = check.headers

        def start_with_headers(status: str, headers: List[Tuple[str, str]], exc_info: Optional[Any] = None) -> Any:
            return (
                start_response(status, [*headers, *extra], exc_info)
                if exc_info
                else start_response(status, [*headers, *extra])
            )

        try:
            body = self.app(environ, start_with_headers)
        except BaseException:
            release(check.decision)
            raise
        return _Closing(body, lambda: release(check.decision))
