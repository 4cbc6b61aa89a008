"""The ``nexus-limits`` command.

``nexus-limits bench`` measures every algorithm next to a 12-line pure-Python GCRA
(the floor of any limiter written in Python): ns per check on a hot key, on many
distinct keys with resident bytes per key, and the cost of sweeping idle keys.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, Optional, Sequence

from . import _bench


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def bench(
    quick: bool,
    keys: Optional[int],
    json_path: Optional[str],
    redis_url: Optional[str] = None,
    plot_path: Optional[str] = None,
    markdown_path: Optional[str] = None,
) -> Dict[str, Any]:
    from . import harness

    counts = None if keys is None else sorted({min(1_000, keys), keys})
    m = _bench.machine()
    print(f"nexus-limits {m['nexus_limits']} on {m['implementation']} {m['python']}, {m['cpu']} ({m['cpus']} cpus)")
    data = harness.run(quick=quick, key_counts=counts, redis_url=redis_url)
    for c in data["skipped"]:
        print(f"skipped {c}: not installed (pip install 'nexus-limits[bench]')")
    for block in harness.tables(data):
        print(block)
    n = counts[-1] if counts else (10_000 if quick else 1_000_000)
    sw = _bench.sweep(n)
    data["sweep"] = sw
    print(
        f"\nSweep: {sw['evicted']:,} of {n:,} idle nexus-limits keys evicted in {sw['sweep_ms']:.1f} ms; "
        f"{sw['checks_during']:,} checks by another thread meanwhile, slowest {_fmt(sw['check_max_us'], '.1f')} us"
    )
    if redis_url:
        bench_redis(redis_url, quick, data)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(data, f, indent=2)
        print(f"\nwrote {json_path}")
    if plot_path:
        harness.plot(data, plot_path)
        print(f"wrote {plot_path}")
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(harness.markdown(data, plot_path))
        print(f"wrote {markdown_path}")
    return data


def bench_redis(url: str, quick: bool, out: Dict[str, Any]) -> None:
    calls, repeats = (500, 5) if quick else (2_000, 15)
    print(f"\nRedis at {url}: one round trip per check, same client (median of {repeats} turns of {calls:,} calls)")
    rt = _bench.redis_round_trips(url, calls=calls, repeats=repeats)
    rows = [[r["call"], f"{r['us']:.1f}", f"{r['vs_incr']:.2f}x"] for r in rt["rows"]]
    print(_table(["call", "us/call", "vs INCR"], rows))
    seconds = 1.0 if quick else 3.0
    tp = [_bench.redis_throughput(url, n, seconds) for n in (1, 4)]
    print(
        "TokenBucket.try_acquire on one shared key: "
        + ", ".join(f"{t['checks_per_second']:,.0f} checks/s from {t['processes']} process(es)" for t in tp)
    )
    out["redis_vs_incr"] = {"round_trips": rt, "throughput": tp}


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
    g.add_argument("--config", required=True, metavar="FILE", help="the gateway's config (TOML, or YAML with PyYAML)")
    g.add_argument("--host", default=None, help="override [server] host")
    g.add_argument("--port", type=int, default=None, help="override [server] port")
    g.add_argument("--check", action="store_true", help="only check the config and exit")
    args = parser.parse_args(argv)
    if args.command == "gateway":
        from .gateway import ConfigError, load_config, run

        try:
            cfg = load_config(args.config)
        except ConfigError as error:
            print(f"nexus-limits gateway: {error}", file=sys.stderr)
            return 2
        if args.check:
            print(f"{args.config}: ok ({len(cfg.tiers)} tiers, {len(cfg.keys)} keys, upstream {cfg.upstream_url})")
            return 0
        run(args.config, args.host, args.port)  # pragma: no cover
        return 0  # pragma: no cover
    if args.keys is not None and args.keys < 1:
        parser.error("--keys must be at least 1")
    bench(args.quick, args.keys, args.json_path, args.redis_url, args.plot_path, args.markdown_path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
