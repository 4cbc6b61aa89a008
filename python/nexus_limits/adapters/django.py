"""Django: a middleware and a view decorator.

In ``settings.py``::

    MIDDLEWARE = [..., "nexus_limits.adapters.django.RateLimitMiddleware"]
    NEXUS_LIMITS = {"limiter": nl.TokenBucket("100/minute"), "key": "header:x-api-key"}

``NEXUS_LIMITS`` takes the options of the ASGI middleware. For one view::

    from nexus_limits.adapters.django import ratelimit

    @ratelimit(nl.FixedWindow("10/minute"), key="ip")
    def search(request): ...

Django is imported only when this module is used.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional

from ._common import Check, Limits, Request, check_sync, release

__all__ = ["RateLimitMiddleware", "ratelimit"]


def request_of(request: Any) -> Request:
    meta = request.META
    headers = {k.lower(): str(v) for k, v in request.headers.items()}
    return Request(
        request.method or "GET", request.path, headers, str(meta.get("QUERY_STRING", "")), meta.get("REMOTE_ADDR")
    )


def _refusal(check: Check) -> Any:
    from django.http import HttpResponse

    response = HttpResponse(check.body, status=check.status, content_type="application/problem+json")
    for name, value in check.headers:
        if name.lower() != "content-type":
            response[name] = value
    return response


def _add_headers(response: Any, check: Check) -> Any:
    for name, value in check.headers:
        response[name] = value
    return response


def _run(limits: Limits, request: Any, view: Callable[[], Any]) -> Any:
    check = check_sync(limits, request_of(request))
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
