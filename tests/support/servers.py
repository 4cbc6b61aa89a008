"""Real Redis servers for the tests: each started on a free loopback port, in its own
temporary directory, with no persistence, and stopped afterwards."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from typing import List, Optional

import pytest

INSTALL_HINT = (
    "redis-server is not installed; the Redis tests need a real server. "
    "Install it with: apt-get update && apt-get install -y redis-server"
)


def redis_binary(name: str = "redis-server") -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            INSTALL_HINT if name == "redis-server" else f"{name} is not installed (apt-get install redis-tools)"
        )
    return path


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(cluster: bool = False) -> int:
    """A free loopback port; for a cluster node also its bus port (port + 10000)."""
    if not cluster:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    # Below the kernel's ephemeral range (32768-60999), bus port included: a port there
    # can be taken by any outgoing connection between this check and the server's bind.
    for _ in range(1000):
        port = random.randint(10000, 22000)
        if _is_free(port) and _is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")  # pragma: no cover


class RedisServer:
    """One redis-server process; `stop()` and `start()` again keep the port (an outage)."""

    def __init__(self, port: Optional[int] = None, cluster: bool = False) -> None:
        self.port = port or free_port(cluster)
        self.cluster = cluster
        self.dir = tempfile.mkdtemp(prefix=f"nl-redis-{self.port}-")
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            redis_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.dir,
            "--protected-mode", "yes",
            "--enable-debug-command", "local",  # DEBUG SLEEP: the fault tests make the server slow
        ]  # fmt: skip
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{self.port}.conf"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited with {self.proc.returncode}")
            # The server that answers must be ours: another test session may hold the
            # port (ours then fails to bind), and its data must never be flushed by us.
            pid = self._answering_pid()
            if pid == self.proc.pid:
                return self
            if pid is not None:
                self.proc.kill()
                self.proc.wait(5)
                raise RuntimeError(f"port {self.port} is held by another redis-server (pid {pid})")
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING within 10 s")

    def _answering_pid(self) -> Optional[int]:
        """The process id of the redis-server answering on the port, or None."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"INFO server\r\n")
                data = b""
                while b"process_id:" not in data or not data.endswith(b"\r\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                    if b"process_id:" in data and b"\r\n" in data.split(b"process_id:", 1)[1]:
                        break
        except OSError:
            return None
        if b"process_id:" not in data:
            return None
        return int(data.split(b"process_id:", 1)[1].split(b"\r\n", 1)[0])

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisCluster:
    """A 3-node Redis Cluster on loopback, no replicas."""

    def __init__(self) -> None:
        self.nodes: List[RedisServer] = [RedisServer(cluster=True) for _ in range(3)]

    def start(self) -> RedisCluster:
        try:
            return self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        cli = redis_binary("redis-cli")
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Every node, not only the first: on a loaded machine another may not have taken
        # the slot map yet and answer CLUSTERDOWN to the first test's commands.
        deadline = time.monotonic() + 20
        waiting = list(self.nodes)
        while waiting and time.monotonic() < deadline:
            out = subprocess.run(
                [cli, "-p", str(waiting[0].port), "cluster", "info"], capture_output=True, text=True
            ).stdout
            if "cluster_state:ok" in out:
                waiting.pop(0)
            else:
                time.sleep(0.1)
        if not waiting:
            return self
        raise RuntimeError(f"node {waiting[0].port} did not reach cluster_state:ok within 20 s")

    @property
    def port(self) -> int:
        return self.nodes[0].port

    def close(self) -> None:
        for node in self.nodes:
            node.close()


class ASGIServer:
    """An ASGI app served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, app, lifespan: str = "off") -> None:
        import threading

        import uvicorn

        self.port = free_port()
        # proxy_headers=False: uvicorn would otherwise rewrite the peer from X-Forwarded-For itself.
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan=lifespan, proxy_headers=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ASGIServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class WSGIServer:
    """A WSGI app served by wsgiref's threaded server on a free loopback port."""

    def __init__(self, app) -> None:
        import socketserver
        import threading
        from wsgiref.simple_server import WSGIRequestHandler, make_server
        from wsgiref.simple_server import WSGIServer as Base

        class Quiet(WSGIRequestHandler):
            def log_message(self, *args) -> None:
                pass

        class Threaded(socketserver.ThreadingMixIn, Base):
            daemon_threads = True

        self.httpd = make_server("127.0.0.1", 0, app, server_class=Threaded, handler_class=Quiet)
        self.port = self.httpd.server_port
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> WSGIServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)
