"""How fast the gateway is, side by side with the upstream alone.

    python benches/bench_gateway.py                   # the full run (about 4 minutes)
    python benches/bench_gateway.py --quick           # one round, shorter runs
    python benches/bench_gateway.py --seconds 3 --rounds 3 --connections 1 16 64 --workers 1 2
    python benches/bench_gateway.py --baseline /tmp/base/python  # and an earlier checkout's

What runs, all on loopback, each in its own process:

- the upstream: a minimal HTTP/1.1 server on asyncio (uvloop when installed) that
  answers every request with the same OpenAI-style chat completion (with ``usage``),
  keeps connections alive, and counts the connections it accepted (``GET /__stats``);
  by itself it serves tens of thousands of requests per second, so it is never what
  the gateway waits for;
- the gateway: ``nexus-limits gateway --config <file>`` exactly as a user starts it,
  one tier whose limits are never reached (every request is still checked, reserved
  and settled), with ``[server] workers = N``; and, beside the default one, the same
  gateway with busy polling off (``busy_poll_us = 0``: "no poll");
- the load: Debian's ``wrk`` (C, epoll; ``apt-get install -y wrk``), one thread,
  ``-c`` connections kept alive, each request a ``POST /v1/chat/completions`` with a
  bearer key and a small JSON body.

Runs are interleaved (direct, gateway with each worker count, then the next
connection count, the whole sequence repeated ``--rounds`` times) so that whatever
else the machine does falls on all of them alike; each figure is the median of its
rounds. Every run is bounded by ``--seconds`` (wrk's ``-d``, plus a hard timeout).

Printed per connection count: requests/s, p50 and p99 (wrk's, from every request),
the p50 the gateway adds to the direct run, and how many upstream connections the
gateway opened per 1,000 requests (counted by the upstream).

``--baseline DIR`` adds a gateway whose ``nexus_limits`` package comes from DIR (put
first on ``PYTHONPATH``), interleaved with the others: before and after a change, in
the same run (``git worktree add /tmp/base <commit>``, build its native module, pass
``/tmp/base/python``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    }
).encode()
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(BODY)).encode()
    + b"\r\nx-request-id: req_bench\r\n\r\n"
    + BODY
)
REQUEST = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]})
KEY = "sk-bench"


# -- the upstream ------------------------------------------------------------------------------


class _Upstream(asyncio.Protocol):
    """HTTP/1.1 keep-alive, request bodies by Content-Length (what wrk and the gateway
    send), the same answer to every request."""

    connections = 0
    requests = 0

    def connection_made(self, transport: Any) -> None:
        _Upstream.connections += 1
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        out = []
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buffer[:end]
            length = 0
            match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if match:
                length = int(match.group(1))
            if len(buffer) < end + 4 + length:
                break
            target = head.split(b" ", 2)[1] if b" " in head else b""
            buffer = buffer[end + 4 + length :]
            if target == b"/__stats":
                stats = json.dumps({"connections": _Upstream.connections, "requests": _Upstream.requests}).encode()
                out.append(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                    + str(len(stats)).encode()
                    + b"\r\n\r\n"
                    + stats
                )
            else:
                _Upstream.requests += 1
                out.append(RESPONSE)
        self.buffer = buffer
        if out:
            self.transport.write(b"".join(out))


def serve_upstream(port: int) -> None:  # pragma: no cover - runs in its own process
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Upstream, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


# -- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process on port {port} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {seconds} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def upstream_stats(port: int) -> Dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/__stats", timeout=5) as r:
        return dict(json.loads(r.read()))


CONFIG = """
[upstream]
url = "http://127.0.0.1:{upstream}"
timeout = 30

[server]
port = {port}
workers = {workers}
max_connections = 1024
{server}

[gateway]
key = "bearer"
reload = "off"
max_in_flight_per_key = 1024
{backend}
[tiers.bench]
requests = "100000000/minute"
tokens = "100000000000/minute"
default_output_tokens = 16

[keys]
"{key}" = "bench"
"""


class Gateway:
    def __init__(
        self,
        upstream: int,
        workers: int,
        tmp: str,
        redis: Optional[int] = None,
        baseline: Optional[str] = None,
        poll: bool = True,
    ) -> None:
        self.port = free_port()
        kind = "baseline" if baseline else "redis" if redis else "memory" if poll else "no poll"
        self.name = f"{kind} w={workers}"
        tag = f"{workers}-{redis}-{'b' if baseline else 'c'}-{poll}"
        self.path = os.path.join(tmp, f"gateway-{tag}.toml")
        backend = f'\n[backend]\ntype = "redis"\nurl = "redis://127.0.0.1:{redis}/0"\n' if redis else ""
        with open(self.path, "w") as f:
            # busy_poll_us left at its default, or off (0) for the "no poll" gateway.
            server = "" if poll or baseline else "busy_poll_us = 0"
            fields = {"upstream": upstream, "port": self.port, "workers": workers, "key": KEY}
            f.write(CONFIG.format(**fields, backend=backend, server=server))
        args = [sys.executable, "-m", "nexus_limits.cli", "gateway", "--config", self.path]
        env = dict(os.environ)
        if baseline:
            env["PYTHONPATH"] = os.pathsep.join([baseline, *filter(None, [env.get("PYTHONPATH")])])
        self.log = open(os.path.join(tmp, f"gateway-{tag}.log"), "wb")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.log, env=env)
        wait_listening(self.port, self.proc)
        # Every worker up and its tokenizer encodings built (in a thread, about a second
        # after the start; requests are judged in a thread until then): requests
        # answered for a few seconds.
        deadline = time.monotonic() + 3
        sent = 0
        while sent < 20 * workers or time.monotonic() < deadline:
            request = urllib.request.Request(
                f"http://127.0.0.1:{self.port}/v1/chat/completions",
                data=REQUEST.encode(),
                headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=10) as r:
                assert r.status == 200
            sent += 1

    def cpu_seconds(self) -> float:
        """User + system CPU time of the gateway and its worker processes so far."""
        return sum(_cpu(pid) for pid in _tree(self.proc.pid))

    def close(self) -> None:
        stop(self.proc)
        self.log.close()


def _tree(pid: int) -> List[int]:
    """``pid`` and its descendants (Linux /proc)."""
    out = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            for child in f.read().split():
                out += _tree(int(child))
    except OSError:
        pass
    return out


def _cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the load ----------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)$", text)
    if not match:
        raise ValueError(f"cannot read a wrk latency: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(port: int, connections: int, seconds: float, lua: str) -> Dict[str, float]:
    """One wrk run: requests/s, p50 and p99 in ms, requests, errors."""
    args = [
        "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "10s",
        "-s", lua, f"http://127.0.0.1:{port}/v1/chat/completions",
    ]  # fmt: skip
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = re.search(r"Requests/sec:\s*([\d.]+)", out)
    p50 = re.search(r"^\s*50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s*99%\s+(\S+)", out, re.M)
    total = re.search(r"(\d+) requests in", out)
    if not (rps and p50 and p99 and total):
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    errors = 0
    for pattern in (
        r"Non-2xx or 3xx responses: (\d+)",
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
    ):
        match = re.search(pattern, out)
        if match:
            errors += sum(int(g) for g in match.groups())
    return {
        "rps": float(rps.group(1)),
        "p50": _ms(p50.group(1)),
        "p99": _ms(p99.group(1)),
        "requests": float(total.group(1)),
        "errors": float(errors),
    }


LUA = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
"""


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each run (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are shown")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="one round of 2 s runs")
    parser.add_argument("--json", metavar="FILE", help="also write every run's figures to FILE")
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also run, side by side, the gateway of the nexus_limits package in DIR (put first on"
        " PYTHONPATH), e.g. the python/ directory of a git worktree of an earlier commit, its native"
        " module built; one process, limits in memory",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = 2.0, 1
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2

    tmp = tempfile.mkdtemp(prefix="nl-bench-gw-")
    lua = os.path.join(tmp, "post.lua")
    with open(lua, "w") as f:
        f.write(LUA.format(body=json.dumps(REQUEST), key=KEY))
    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, __file__, "--upstream", str(up_port)])
    redis: Optional[subprocess.Popen] = None
    redis_port = free_port()
    gateways: List[Gateway] = []
    runs: Dict[Tuple[str, int], List[Dict[str, float]]] = {}
    try:
        wait_listening(up_port, upstream)
        # The default (one process, limits in memory); then, when more workers are
        # asked for, the memory backend (the workers share their limits through a
        # SharedMemoryStore) and the redis backend, at each count.
        if 1 in args.workers:
            gateways.append(Gateway(up_port, 1, tmp))
            gateways.append(Gateway(up_port, 1, tmp, poll=False))
            if args.baseline:
                gateways.append(Gateway(up_port, 1, tmp, baseline=os.path.abspath(args.baseline)))
        gateways += [Gateway(up_port, n, tmp) for n in args.workers if n > 1]
        if any(n > 1 for n in args.workers):
            redis = subprocess.Popen(
                ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL,
            )
            wait_listening(redis_port, redis)
            gateways += [Gateway(up_port, n, tmp, redis_port) for n in args.workers]
        for round_ in range(args.rounds):
            for c in args.connections:
                targets: List[Tuple[str, int, Optional[Gateway]]] = [("direct", up_port, None)]
                targets += [(g.name, g.port, g) for g in gateways]
                for name, port, gateway in targets:
                    before = upstream_stats(up_port)
                    cpu = gateway.cpu_seconds() if gateway else 0.0
                    got = wrk(port, c, args.seconds, lua)
                    after = upstream_stats(up_port)
                    got["opened"] = after["connections"] - before["connections"]
                    got["upstream_requests"] = after["requests"] - before["requests"]
                    if gateway is not None:
                        used = gateway.cpu_seconds() - cpu
                        got["cpu_us"] = 1e6 * used / max(1.0, got["upstream_requests"])
                    runs.setdefault((name, c), []).append(got)
                    print(
                        f"  round {round_ + 1} {name:<14} c={c:<3} {got['rps']:>9,.0f} req/s"
                        f"  p50 {got['p50']:7.2f} ms  p99 {got['p99']:7.2f} ms  errors {got['errors']:.0f}",
                        file=sys.stderr,
                    )
    finally:
        for g in gateways:
            g.close()
        stop(upstream)
        if redis is not None:
            stop(redis)

    def median(name: str, c: int, field: str) -> float:
        return statistics.median(r[field] for r in runs[(name, c)])

    print()
    print(f"wrk -t1 -c<N> -d{args.seconds:g}s, POST /v1/chat/completions, medians of {args.rounds} interleaved rounds")
    print(
        f"{'':<14}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'added p50':>11}"
        f"{'upstream conns/1k req':>23}{'CPU us/req':>12}{'errors':>8}"
    )
    for c in args.connections:
        direct_p50 = median("direct", c, "p50")
        for name in ["direct"] + [g.name for g in gateways]:
            rps, p50, p99 = median(name, c, "rps"), median(name, c, "p50"), median(name, c, "p99")
            added = "" if name == "direct" else f"{p50 - direct_p50:+.3f}"
            reuse = cpu = ""
            if name != "direct":
                opened = sum(r["opened"] for r in runs[(name, c)])
                served = sum(r["upstream_requests"] for r in runs[(name, c)])
                reuse = f"{1000 * opened / max(1, served):.2f}"
                cpu = f"{median(name, c, 'cpu_us'):.0f}"
            errors = sum(r["errors"] for r in runs[(name, c)])
            print(f"{name:<14}{c:>6}{rps:>10,.0f}{p50:>9.2f}{p99:>9.2f}{added:>11}{reuse:>23}{cpu:>12}{errors:>8.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{k[0]} c={k[1]}": v for k, v in runs.items()}, f, indent=1)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--upstream":
        serve_upstream(int(sys.argv[2]))
    else:
        sys.exit(main())
