"""LLM token accounting: exact OpenAI counts with tiktoken (fully offline), Anthropic
estimates calibrated from real usage, usage read from responses and SSE streams, and
upstream rate-limit headers.

>>> from nexus_limits.tokens import count_tokens, count_request_tokens
>>> count_tokens("hello world", model="gpt-4o")
2
>>> count_request_tokens({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}).tokens
8
"""

from ._count import (
    MAX_EXACT_CHARS,
    MAX_TOKENS,
    AnthropicEstimator,
    OutputEstimate,
    RequestBodyError,
    TokenCount,
    anthropic_estimator,
    count_request_tokens,
    count_tokens,
)
from ._encodings import EncodingFileError, encoding_for_model, get_encoding, warm_encodings
from ._headers import UpstreamLimit, UpstreamLimits, parse_go_duration, parse_rate_limit_headers
from ._response import UsageReader
from ._usage import Usage, UsageError, UsageStream, detect_provider, extract_usage

__all__ = [
    "MAX_EXACT_CHARS",
    "MAX_TOKENS",
    "AnthropicEstimator",
    "EncodingFileError",
    "OutputEstimate",
    "RequestBodyError",
    "TokenCount",
    "UpstreamLimit",
    "UpstreamLimits",
    "Usage",
    "UsageError",
    "UsageReader",
    "UsageStream",
    "anthropic_estimator",
    "count_request_tokens",
    "count_tokens",
    "detect_provider",
    "encoding_for_model",
    "extract_usage",
    "get_encoding",
    "parse_go_duration",
    "parse_rate_limit_headers",
    "warm_encodings",
]
