"""How the Redis limiters talk to the server: one attempt per command, behind the
client's circuit breaker.

redis-py retries a failed command, and a failed connect, with backoff (redis-py 8 by
default: several attempts, seconds in all). A limiter must answer its on_error policy
within the client's socket timeouts, so its commands run without those retries:

- synchronous clients: on connections of the limiters' own, made with the client's
  connection class and settings (host, credentials, TLS, timeouts...) but no retry,
  kept in a plain stack (the hot path pays no pool bookkeeping: one poll(2) checks
  that an idle connection was not closed by the server); replies are parsed by the
  client itself, and a limiter's check is sent as bytes it packed once;
- asyncio clients: on a connection taken from the client's own pool, whose retry
  policy is set to a single attempt while the limiter holds it (and put back before
  the connection returns to the pool).

A Sentinel-managed client (``Sentinel(...).master_for(...)``) is handled the same way:
its connections ask the sentinels for the primary when they connect, so after a
failover the next connection reaches the new primary. A cluster client's commands
that name a key go straight to the node that serves it, on that node's connections,
once; a redirection (the slot moved) is left to the cluster client, which knows how
to follow it. Clients whose pool is of another kind (custom pools) run the command
as usual: their retries apply to the first failing call, and the breaker answers the
later ones at once.
"""

from __future__ import annotations

import os
import select
import threading
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ._breaker import Breaker

_POOLS = ("ConnectionPool", "BlockingConnectionPool", "SentinelConnectionPool")
# Replies that say a cluster's slot is served elsewhere (or is moving): the cluster client
# follows them and refreshes its slot map.
_REDIRECTIONS = ("MovedError", "AskError", "TryAgainError")


def _single_attempt() -> Any:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return Retry(NoBackoff(), 0)


def _plain_pool(client: Any, names: Tuple[str, ...] = _POOLS) -> Any:
    """The client's connection pool if it is a plain redis-py (or Valkey) pool, else None."""
    if getattr(client, "connection", None) is not None:  # single_connection_client
        return None
    pool = getattr(client, "connection_pool", None)
    if pool is None or type(pool).__name__ not in names:
        return None
    if type(pool).__module__.split(".")[0] not in ("redis", "valkey"):
        return None
    return pool


class _Breakers:
    """The breaker of a client; of each node for a cluster client, so that a dead node
    trips only the keys it served."""

    __slots__ = ("_nodes", "breaker", "client")

    def __init__(self, client: Any) -> None:
        self.client = client
        self.breaker = Breaker()
        self._nodes: Optional[Dict[str, Breaker]] = {} if hasattr(client, "nodes_manager") else None

    def pick(self, args: Tuple[Any, ...]) -> Tuple[Optional[Breaker], Any]:
        """The breaker guarding a command and, on a cluster, the node serving its key
        (None, None: a cluster command without a key, such as SCRIPT LOAD, which goes to
        every node)."""
        if self._nodes is None:
            return self.breaker, None
        key = _first_key(args)
        if key is None:
            return None, None
        try:
            node = self.client.get_node_from_key(key)
        except Exception:  # no slot map yet
            return None, None
        found = self._nodes.get(node.name)
        if found is None:
            found = self._nodes.setdefault(node.name, Breaker())
        return found, node

    def stats(self) -> Dict[str, int]:
        """breaker_open: 1 while the breaker is open (on a cluster: how many nodes' are);
        breaker_trips: how many times it opened."""
        if self._nodes is None:
            return self.breaker.stats()
        each = [b.stats() for b in list(self._nodes.values())]
        return {name: sum(s[name] for s in each) for name in ("breaker_open", "breaker_trips")}


def _first_key(args: Tuple[Any, ...]) -> Any:
    name = str(args[0]).upper()
    if name in ("EVALSHA", "EVAL"):
        return args[3] if int(args[2]) > 0 else None
    if name in ("DEL", "GET"):
        return args[1]
    return None


def _redirected(error: BaseException) -> bool:
    return type(error).__name__ in _REDIRECTIONS


class _Idle:
    """A connection of a SyncChannel, with what tells whether the server closed it while
    it was idle."""

    __slots__ = ("conn", "poller", "sock")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.sock: Any = None
        self.poller: Any = None

    def ready(self) -> Any:
        """The connection, connected, with nothing waiting to be read. A connection the
        server closed (a restart, its idle timeout) reads as ready-to-read: it is
        connected again here rather than failing the next command (which would open the
        breaker although the server is there)."""
        conn = self.conn
        sock = getattr(conn, "_sock", None)
        if sock is not None and sock is self.sock:
            if not self.poller.poll(0):
                return conn
            conn.disconnect()
            sock = None
        if sock is None:
            conn.connect()
            sock = getattr(conn, "_sock", None)
        self.sock = sock
        if sock is not None:
            self.poller = select.poll()
            self.poller.register(sock, select.POLLIN)
        return conn


class SyncChannel(_Breakers):
    """Commands of synchronous clients (see the module docstring)."""

    __slots__ = ("__weakref__", "_direct", "_idle", "_lock", "_make")

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self._lock = threading.Lock()
        self._make: Any = False  # False: not built yet; None: none (use the client)
        self._idle: List[_Idle] = []
        self._direct: Dict[str, SyncChannel] = {}  # a cluster's nodes, by name
        _SYNC_CHANNELS.add(self)

    def _maker(self) -> Any:
        if self._make is False:
            with self._lock:
                if self._make is False:
                    self._make = self._build()
        return self._make

    def _build(self) -> Any:
        """How to make a connection like the client's, without retries (None: the client's
        pool is of another kind; its commands then run through the client)."""
        pool = _plain_pool(self.client)
        if pool is None:
            return None
        kwargs = dict(pool.connection_kwargs)
        kwargs["retry"] = None  # a connection without retry and retry_on_error tries once
        kwargs["retry_on_error"] = []
        if "retry_on_timeout" in kwargs:
            kwargs["retry_on_timeout"] = False
        kwargs.pop("maint_notifications_pool_handler", None)  # bound to the client's pool
        kind = pool.connection_class
        try:
            kind(**kwargs)
        except TypeError:  # pragma: no cover - a connection class that takes other arguments
            return None
        return lambda: kind(**kwargs)

    def forget(self) -> None:
        """Drops the idle connections (in a child process after fork: they are the
        parent's sockets)."""
        self._idle = []

    def call(self, *args: Any, **options: Any) -> Any:
        return self._guarded(args, None, options)

    def evalsha(self, sha: str, keys: Sequence[str], argv: Sequence[str], packed: Optional[bytes] = None) -> Any:
        """EVALSHA; ``packed`` is the same command already in the protocol's bytes, sent
        as is on the channel's own connections."""
        return self._guarded(("EVALSHA", sha, len(keys), *keys, *argv), packed, {})

    def script_load(self, source: str, key: str) -> Any:
        """SCRIPT LOAD where ``key`` is served (on a cluster: that node only, so that a
        dead node elsewhere does not fail it)."""
        return self._guarded(("SCRIPT LOAD", source), None, {}, ("GET", key))

    def _guarded(
        self, args: Tuple[Any, ...], packed: Optional[bytes], options: Dict[str, Any], route: Any = None
    ) -> Any:
        """Runs a command behind the breaker of the node serving ``route``'s key (by
        default, the command's own)."""
        breaker, node = self.pick(route or args)
        if breaker is None:
            return self._run(args, packed, options, node)
        probe = breaker.admit()
        try:
            result = self._run(args, packed, options, node)
        except BaseException as error:
            breaker.failed(error, probe)
            raise
        breaker.succeeded(probe)
        return result

    def _node(self, node: Any) -> Optional[SyncChannel]:
        """The channel of a cluster node's own client (None if it has none)."""
        found = self._direct.get(node.name)
        if found is None:
            client = getattr(node, "redis_connection", None)
            if client is None or _plain_pool(client) is None:
                return None
            found = self._direct.setdefault(node.name, SyncChannel(client))
        return found

    def _run(self, args: Tuple[Any, ...], packed: Optional[bytes], options: Dict[str, Any], node: Any = None) -> Any:
        if node is not None:
            direct = self._node(node)
            if direct is not None:
                try:
                    return direct._run(args, packed, options)
                except Exception as error:
                    if not _redirected(error):
                        raise
            return self.client.execute_command(*args, **options)
        make = self._maker()
        if make is None:
            return self.client.execute_command(*args, **options)
        try:
            idle = self._idle.pop()
        except IndexError:
            idle = _Idle(make())
        try:
            conn = idle.ready()
            if packed is not None:
                conn.send_packed_command((packed,), check_health=False)
                return conn.read_response()
            conn.send_command(*args, check_health=False)
            return self.client.parse_response(conn, args[0], **options)
        except BaseException as error:
            if not _is_reply(error):
                idle.conn.disconnect()
            raise
        finally:
            self._idle.append(idle)


class AsyncChannel(_Breakers):
    """Commands of asyncio clients (see the module docstring)."""

    __slots__ = ("__weakref__", "_once", "_ready")

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self._once: Any = None
        self._ready = self._nodes is None  # a cluster client learns its slot map first

    async def call(self, *args: Any, **options: Any) -> Any:
        return await self._guarded(args, None, options)

    async def evalsha(self, sha: str, keys: Sequence[str], argv: Sequence[str], packed: Optional[bytes] = None) -> Any:
        """EVALSHA; ``packed`` is the same command already in the protocol's bytes, sent
        as is on a connection of the client's pool."""
        return await self._guarded(("EVALSHA", sha, len(keys), *keys, *argv), packed, {})

    async def script_load(self, source: str, key: str) -> Any:
        """SCRIPT LOAD where ``key`` is served (on a cluster: that node only)."""
        return await self._guarded(("SCRIPT LOAD", source), None, {}, ("GET", key))

    async def _guarded(
        self, args: Tuple[Any, ...], packed: Optional[bytes], options: Dict[str, Any], route: Any = None
    ) -> Any:
        if not self._ready:
            await self.client.initialize()  # the slot map, to know each key's node
            self._ready = True
        breaker, node = self.pick(route or args)
        if breaker is None:
            return await self._run(args, packed, options, node)
        probe = breaker.admit()
        try:
            result = await self._run(args, packed, options, node)
        except BaseException as error:
            breaker.failed(error, probe)
            raise
        breaker.succeeded(probe)
        return result

    async def _run(
        self, args: Tuple[Any, ...], packed: Optional[bytes], options: Dict[str, Any], node: Any = None
    ) -> Any:
        if node is not None and hasattr(node, "acquire_connection"):
            try:
                return await self._on_node(node, args, packed)
            except Exception as error:
                if not _redirected(error):
                    raise
            return await self.client.execute_command(*args, **options)
        pool = _plain_pool(self.client, ("ConnectionPool", "SentinelConnectionPool"))
        if pool is None or not hasattr(pool, "get_available_connection"):
            return await self.client.execute_command(*args, **options)
        if self._once is None:
            self._once = _single_attempt()
        conn = pool.get_available_connection()
        kept = conn.retry
        conn.retry = self._once
        try:
            await pool.ensure_connection(conn)
            if packed is not None:
                await conn.send_packed_command(packed, check_health=False)
                return await conn.read_response()
            await conn.send_command(*args)
            return await self.client.parse_response(conn, args[0], **options)
        except BaseException as error:
            if not _is_reply(error):
                await conn.disconnect(nowait=True)
            raise
        finally:
            conn.retry = kept
            await pool.release(conn)

    @staticmethod
    async def _on_node(node: Any, args: Tuple[Any, ...], packed: Optional[bytes]) -> Any:
        """One attempt on a connection of the cluster node serving the key (its
        connections make no retries of their own: the cluster client's do)."""
        conn = node.acquire_connection()
        try:
            await conn.send_packed_command(packed if packed is not None else conn.pack_command(*args), False)
            return await conn.read_response()
        except BaseException as error:
            if not _is_reply(error):
                await conn.disconnect()
            raise
        finally:
            node.release(conn)


def _is_reply(error: BaseException) -> bool:
    """An error the server replied (the connection is in a clean state)."""
    from ._breaker import is_failure

    return isinstance(error, Exception) and not is_failure(error) and type(error).__name__ != "InvalidResponse"


_CHANNELS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_SYNC_CHANNELS: weakref.WeakSet[SyncChannel] = weakref.WeakSet()


def _after_fork() -> None:
    for channel in list(_SYNC_CHANNELS):
        channel.forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)

_BY_ID: Dict[int, Any] = {}  # clients that cannot be weakly referenced
_LOCK = threading.Lock()


def channel_for(client: Any, want_async: bool) -> Any:
    """The channel (and so the breaker) of ``client``, shared by all its limiters."""
    kind = AsyncChannel if want_async else SyncChannel
    try:
        found: Optional[Any] = _CHANNELS.get(client)
    except TypeError:
        found = _BY_ID.get(id(client))
    if found is not None:
        return found
    with _LOCK:
        made = kind(client)
        try:
            return _CHANNELS.setdefault(client, made)
        except TypeError:
            return _BY_ID.setdefault(id(client), made)
