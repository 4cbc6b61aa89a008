"""Framework adapters: ASGI and WSGI middleware, Django, and the ``@limit`` decorator.

Frameworks are imported lazily: ``nexus_limits.adapters.asgi`` needs no framework at
all, ``nexus_limits.adapters.django`` imports Django only when used.
"""

from ._common import PROBLEM_TYPE, Request, client_ip, parse_key_spec, problem
from ._target import normalize_target
from .decorators import limit
from .headers import HeaderOptions, Policy, policy_of, rate_limit_headers

__all__ = [
    "PROBLEM_TYPE",
    "HeaderOptions",
    "Policy",
    "Request",
    "client_ip",
    "limit",
    "normalize_target",
    "parse_key_spec",
    "policy_of",
    "problem",
    "rate_limit_headers",
]
