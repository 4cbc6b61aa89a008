"""The reference LLM gateway: ``nexus-limits gateway --config gateway.toml``.

An ASGI app (served by uvicorn) that proxies an OpenAI- or Anthropic-compatible API to
one upstream over a pool of kept-alive HTTP/1.1 connections, streaming, and enforces
per-key request, token and concurrency limits per tier, quotas of orgs and teams
charged with their keys' in one step, and priority classes — in-process or on Redis.
See ``examples/gateway.toml``.

The config is TOML, or YAML (``.yaml``/``.yml``, with PyYAML installed); every mistake
is reported with the file, the line and the field. The gateway reloads it on SIGHUP
(and, with ``reload = "watch"``, when the file changes), keeping every counter; it
serves Prometheus metrics (``metrics_path``) and, with an admin token, one key's state
and the top keys of a tier.

The rooms: ``schema`` (a declarative config schema and the one loader that walks it),
``config`` (the gateway's tables and the rules across them), ``app`` (routing, tiers,
reload), ``tree`` (the LLM middleware's view of a hierarchy), ``teams`` (the
hierarchies of orgs, teams and priority classes built from the config), ``lease``
(quota leasing on Redis), ``proxy`` (forwarding to the upstream), ``admin`` (the admin
endpoints).
"""

from .app import Gateway, build_app
from .config import ConfigError, GatewayConfig, Tier, load_config
from .server import run, uvicorn_config

__all__ = ["ConfigError", "Gateway", "GatewayConfig", "Tier", "build_app", "load_config", "run", "uvicorn_config"]
