"""The ``nexus-limits`` command: parses its arguments and hands them to the harness
(``nexus_limits.bench``) or the gateway (``nexus_limits.gateway``).

``nexus-limits bench`` measures every algorithm next to a 12-line pure-Python GCRA
(the floor of any limiter written in Python): ns per check on a hot key, on many
distinct keys with resident bytes per key, and the cost of sweeping idle keys.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def gateway(config: Optional[str], init: bool, check: bool, host: Optional[str], port: Optional[int]) -> int:
    if init:
        from importlib.resources import files

        sys.stdout.write(files("nexus_limits.gateway").joinpath("example.toml").read_text(encoding="utf-8"))
        return 0
    from .gateway import ConfigError, load_config, run

    assert config is not None  # argparse requires --config or --init
    try:
        cfg = load_config(config)
    except ConfigError as error:
        print(f"nexus-limits gateway: {error}", file=sys.stderr)
        return 2
    if check:
        print(f"{config}: ok ({len(cfg.tiers)} tiers, {len(cfg.keys)} keys, upstream {cfg.upstream_url})")
        return 0
    run(config, host, port)  # pragma: no cover
    return 0  # pragma: no cover


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="nexus-limits", description="Rate limiting with a Rust core.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="nexus-limits next to the limiters Python users pick today")
    b.add_argument("--quick", action="store_true", help="a run of under a minute (1k and 10k keys, fewer calls)")
    b.add_argument(
        "--keys", type=int, default=None, help="the largest number of distinct keys (1,000,000; --quick 10,000)"
    )
    b.add_argument("--json", dest="json_path", default=None, metavar="FILE", help="also write the results as JSON")
    b.add_argument(
        "--redis", dest="redis_url", default=None, metavar="URL", help="also measure the Redis backend there"
    )
    b.add_argument(
        "--plot", dest="plot_path", default=None, metavar="FILE.png", help="plot latency and memory against keys"
    )
    b.add_argument(
        "--markdown", dest="markdown_path", default=None, metavar="FILE.md", help="also write the tables as Markdown"
    )
    g = sub.add_parser("gateway", help="run the reference LLM gateway")
    which = g.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", metavar="FILE", help="the gateway's config (TOML, or YAML with PyYAML)")
    which.add_argument(
        "--init", action="store_true", help="print a complete, commented example config (> gateway.toml) and exit"
    )
    g.add_argument("--host", default=None, help="override [server] host")
    g.add_argument("--port", type=int, default=None, help="override [server] port")
    g.add_argument("--check", action="store_true", help="only check the config and exit")
    args = parser.parse_args(argv)
    if args.command == "gateway":
        return gateway(args.config, args.init, args.check, args.host, args.port)
    if args.keys is not None and args.keys < 1:
        parser.error("--keys must be at least 1")
    from .bench import bench

    bench(args.quick, args.keys, args.json_path, args.redis_url, args.plot_path, args.markdown_path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
