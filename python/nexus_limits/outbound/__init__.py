"""Calling OpenAI or Anthropic from an application without meeting their 429s.

``wrap`` installs a transport in an official SDK client; ``LimitedTransport`` /
``AsyncLimitedTransport`` are that transport for any httpx client. Each LLM call waits
until the provider's limits (given, or learned from its headers) allow it, is
reserved, and settles from the answer's real usage; the provider's headers keep the
local count in step, and a 429 pauses the model instead of every caller retrying.

>>> import openai
>>> from nexus_limits import outbound
>>> client = outbound.wrap(openai.OpenAI(api_key="sk-test", base_url="http://127.0.0.1:9/v1"))
>>> isinstance(client, openai.OpenAI)
True

:class:`AIMD` is the adaptive controller the transport (and the gateway) use for
providers that do not say their limits.
"""

from ._aimd import AIMD
from ._engine import DIMENSIONS, OutboundLimiter, parse_limits
from ._errors import CallTooLarge, OutboundRefused, QuotaTimeout, StoreUnavailable
from ._transport import AsyncLimitedTransport, LimitedTransport
from ._wrap import limiter_of, wrap

__all__ = [
    "AIMD",
    "DIMENSIONS",
    "AsyncLimitedTransport",
    "CallTooLarge",
    "LimitedTransport",
    "OutboundLimiter",
    "OutboundRefused",
    "QuotaTimeout",
    "StoreUnavailable",
    "limiter_of",
    "parse_limits",
    "wrap",
]
