"""Django: a middleware and a view decorator.

In ``settings.py``::

    MIDDLEWARE = [..., "nexus_limits.adapters.django.RateLimitMiddleware"]
    NEXUS_LIMITS = {"limiter": nl.TokenBucket("100/minute"), "key": "header:x-api-key"}

``NEXUS_LIMITS`` takes the options of the ASGI middleware. Django joins a header sent
several times into one value with commas: a comma in a key header is a repeat, refused
with 400 when the values differ. The path judged is ``request.path``, normalised. For
one view::

    from nexus_limits.adapters.django import ratelimit

    @ratelimit(nl.FixedWindow("10/minute"), key="ip")
    def search(request): ...

Django is imported only when this module is used.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional

from ..errors import BadRequest
from ._common import Check, Limits, Request, bad_request, check_sync, release
from ._target import normalize_target, quote_decoded
from .headers import merge_rate_limit_headers

__all__ = ["RateLimitMiddleware", "ratelimit"]

_TITLES = (
    "RateLimit-Policy",
    "RateLimit",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "Retry-After",
)


def request_of(request: Any) -> Request:
    """The Request of a Django request, method and path normalised (raises BadRequest)."""
    meta = request.META
    headers = {k.lower(): str(v) for k, v in request.headers.items()}
    method, path = normalize_target(request.method or "GET", quote_decoded(request.path))
    return Request(method, path, headers, str(meta.get("QUERY_STRING", "")), meta.get("REMOTE_ADDR"))


def _refusal(check: Check) -> Any:
    from django.http import HttpResponse

    response = HttpResponse(check.body, status=check.status, content_type="application/problem+json")
    for name, value in check.headers:
        if name.lower() != "content-type":
            response[name] = value
    return response


def _add_headers(response: Any, check: Check) -> Any:
    present = [(name, response[name]) for name in _TITLES if response.has_header(name)]
    if present:  # an inner limit (or the view) set some: one header of each name
        for name, _ in present:
            del response[name]
        headers = merge_rate_limit_headers(present, check.headers)
    else:
        headers = check.headers
    for name, value in headers:
        response[name] = value
    return response


def _run(limits: Limits, request: Any, view: Callable[[], Any]) -> Any:
    check: Optional[Check]
    try:
        target = request_of(request)
    except BadRequest as error:
        return _refusal(bad_request(error))
    check = check_sync(limits, target)
    if check is None:
        return view()
    if not check.allowed:
        return _refusal(check)
    try:
        response = view()
    finally:
        release(check.decision)
    return _add_headers(response, check)


class RateLimitMiddleware:
    """Limits every request; configured by the ``NEXUS_LIMITS`` setting (a dict of the
    ASGI middleware's options, with ``limiter`` and ``key``)."""

    def __init__(self, get_response: Callable[[Any], Any], config: Optional[Dict[str, Any]] = None) -> None:
        if config is None:
            from django.conf import settings
            from django.core.exceptions import ImproperlyConfigured

            config = getattr(settings, "NEXUS_LIMITS", None)
            if not isinstance(config, dict):
                raise ImproperlyConfigured("set NEXUS_LIMITS = {'limiter': ..., 'key': ...} to use RateLimitMiddleware")
        options = dict(config)
        self.limits = Limits(options.pop("limiter", None), options.pop("key", "ip"), **options)
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        return _run(self.limits, request, lambda: self.get_response(request))


def ratelimit(limiter: Any, key: Any = "ip", **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Limit one view (same options as the middleware)."""
    limits = Limits(limiter, key, **options)

    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapped(request: Any, *args: Any, **kwargs: Any) -> Any:
            return _run(limits, request, lambda: view(request, *args, **kwargs))

        return wrapped

    return decorate
