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
    quick: bool, keys: Optional[int], json_path: Optional[str], redis_url: Optional[str] = None
) -> Dict[str, Any]:
    n = keys if keys is not None else (50_000 if quick else 1_000_000)
    calls = 50_000 if quick else 300_000
    out: Dict[str, Any] = {"machine": _bench.machine()}
    m = out["machine"]
    print(f"nexus-limits {m['nexus_limits']} on {m['implementation']} {m['python']}, {m['cpu']} ({m['cpus']} cpus)")

    print(f"\nHot key: one key, always admitted (median of 7 runs of {calls:,} calls, loop included)")
    hot = _bench.hot_key(calls=calls)
    ref_ns = hot[0]["try_acquire_ns"]
    rows = [
        [
            r["limiter"],
            _fmt(r["try_acquire_ns"], ".0f"),
            _fmt(r["hit_ns"], ".0f"),
            f"{ref_ns / r['try_acquire_ns']:.2f}x",
        ]
        for r in hot
    ]
    print(_table(["limiter", "try_acquire ns", "hit ns", "speed vs reference"], rows))
    out["hot_key"] = hot

    print(f"\nMany keys: {n:,} distinct keys (first pass inserts, second finds); resident bytes per key")
    many = _bench.many_keys(n)
    rows = [
        [r["limiter"], _fmt(r["insert_ns"], ".0f"), _fmt(r["existing_ns"], ".0f"), _fmt(r["bytes_per_key"], ".1f")]
        for r in many
    ]
    print(_table(["limiter", "insert ns", "existing ns", "bytes/key"], rows))
    out["many_keys"] = many

    print(f"\nSweep: {n:,} idle keys evicted while another thread keeps checking")
    sw = _bench.sweep(n)
    print(
        f"evicted {sw['evicted']:,} in {sw['sweep_ms']:.1f} ms; {sw['checks_during']:,} checks meanwhile, "
        f"slowest {_fmt(sw['check_max_us'], '.1f')} us, p99.9 {_fmt(sw['check_p999_us'], '.1f')} us"
    )
    out["sweep"] = sw
    if redis_url:
        bench_redis(redis_url, quick, out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=2)
        print(f"\nwrote {json_path}")
    return out


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
    out["redis"] = {"round_trips": rt, "throughput": tp}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="nexus-limits", description="Rate limiting with a Rust core.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="measure every algorithm next to a pure-Python reference")
    b.add_argument("--quick", action="store_true", help="a short run (50k keys, fewer calls)")
    b.add_argument("--keys", type=int, default=None, help="distinct keys for the many-keys and sweep runs (1,000,000)")
    b.add_argument("--json", dest="json_path", default=None, metavar="FILE", help="also write the results as JSON")
    b.add_argument(
        "--redis", dest="redis_url", default=None, metavar="URL", help="also measure the Redis backend there"
    )
    g = sub.add_parser("gateway", help="run the reference LLM gateway")
    g.add_argument("--config", required=True, metavar="FILE", help="the gateway's TOML config")
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
    bench(args.quick, args.keys, args.json_path, args.redis_url)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
