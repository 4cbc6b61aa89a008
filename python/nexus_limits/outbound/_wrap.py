"""``wrap(client)``: the same SDK client, sending through a LimitedTransport."""

from __future__ import annotations

import copy
from typing import Any, Optional, TypeVar

from ._engine import OutboundLimiter
from ._transport import AsyncLimitedTransport, LimitedTransport, _flavour

__all__ = ["limiter_of", "wrap"]

T = TypeVar("T")


def _http_kind(obj: Any) -> Optional[bool]:
    """True for an async httpx/httpx2 client, False for a sync one, None otherwise."""
    try:
        module = _flavour(obj)
    except ImportError:  # pragma: no cover - a class defined in __main__ and the like
        return None
    client, async_client = getattr(module, "Client", None), getattr(module, "AsyncClient", None)
    if async_client is not None and isinstance(obj, async_client):
        return True
    if client is not None and isinstance(obj, client):
        return False
    return None


def _wrap_http(http: Any, is_async: bool, limiter: OutboundLimiter, refusal: str) -> Any:
    cls: Any = AsyncLimitedTransport if is_async else LimitedTransport
    transport = cls(http._transport, limiter=limiter, refusal=refusal)
    # A copy keeps everything the client was built with (timeouts, proxies, headers,
    # event hooks, limits of its pool) and shares its connection pool.
    new = copy.copy(http)
    new._transport = transport
    new._mounts = {
        pattern: None if mounted is None else cls(mounted, limiter=limiter, refusal=refusal)
        for pattern, mounted in http._mounts.items()
    }
    # The SDKs' clients close their pool when garbage-collected: the original must live
    # as long as the copy that shares its pool.
    transport._keep = http
    return new


def wrap(client: T, *, limiter: Optional[OutboundLimiter] = None, refusal: str = "response", **options: Any) -> T:
    """Returns ``client`` — an ``openai.OpenAI``, ``openai.AsyncOpenAI``,
    ``anthropic.Anthropic`` or ``anthropic.AsyncAnthropic`` (or an ``httpx`` /
    ``httpx2`` ``Client`` / ``AsyncClient``) — as a client of the same type whose calls
    go through a :class:`LimitedTransport` (or :class:`AsyncLimitedTransport`).

    >>> import openai
    >>> from nexus_limits import outbound
    >>> client = outbound.wrap(openai.OpenAI(api_key="sk-test", base_url="http://127.0.0.1:9/v1"),
    ...                        limits={"gpt-4o": {"requests": "500/minute", "tokens": "30000/minute"}})
    >>> type(client).__name__, str(client.base_url)
    ('OpenAI', 'http://127.0.0.1:9/v1/')

    The SDK client is copied with ``client.copy(http_client=...)``: its base URL, API
    key, timeouts, retries and default headers are kept, and its HTTP client is copied
    with its transport (and those of its proxy mounts) wrapped, sharing the original's
    connection pool. ``options`` are those of :class:`LimitedTransport` (``limits``,
    ``store``, ``timeout``, ``window``, ``learn``, ``max_requeue``,
    ``estimate_margin``, ``output_tokens``, ``aimd``, ``on_error``, ``replicas``); ``limiter=`` shares the state
    of another wrapped client instead (e.g. a sync and an async client of one
    application: ``wrap(other, limiter=first_transport.limiter)``).

    ``refusal`` defaults to ``"response"``: a call refused before it is sent (too large
    for a limit, or past ``timeout``) comes back as a 429 with ``x-should-retry:
    false``, which the SDK raises at once as its own ``RateLimitError`` carrying the
    reason. :func:`limiter_of` gives the wrapped client's :class:`OutboundLimiter`
    (its ``stats()``; ``limiter=`` for another client).
    """
    if limiter is None:
        limiter = OutboundLimiter(**options)
    elif options:
        raise TypeError(f"give either limiter= or limiter options ({', '.join(sorted(options))}), not both")
    kind = _http_kind(client)
    if kind is not None:
        wrapped: Any = _wrap_http(client, kind, limiter, refusal)
        return wrapped  # type: ignore[no-any-return]
    http = getattr(client, "_client", None)
    kind = _http_kind(http) if http is not None else None
    if kind is None or not callable(getattr(client, "copy", None)):
        raise TypeError(
            "wrap() takes an openai or anthropic client (sync or async) or an httpx Client/AsyncClient, "
            f"got {type(client).__name__}"
        )
    new_http = _wrap_http(http, kind, limiter, refusal)
    copied: Any = client.copy(http_client=new_http)  # type: ignore[attr-defined]
    return copied  # type: ignore[no-any-return]


def limiter_of(client: Any) -> OutboundLimiter:
    """The :class:`OutboundLimiter` of a client returned by :func:`wrap` (or of an httpx
    client whose transport is a LimitedTransport): ``limiter_of(client).stats()``, or
    ``wrap(other, limiter=limiter_of(client))`` to share its state.

    >>> import openai
    >>> from nexus_limits import outbound
    >>> client = outbound.wrap(openai.OpenAI(api_key="sk-test"))
    >>> outbound.limiter_of(client).stats()
    {'store': 'in-process', 'models': {}}
    """
    http = client if _http_kind(client) is not None else getattr(client, "_client", None)
    transport = getattr(http, "_transport", None)
    limiter = getattr(transport, "limiter", None)
    if not isinstance(limiter, OutboundLimiter):
        raise TypeError(f"{type(client).__name__} does not send through a LimitedTransport: wrap() it first")
    return limiter
