"""How the Redis limiters talk to the server: one attempt per command, behind the
client's circuit breaker.

redis-py retries a failed command, and a failed connect, with backoff (redis-py 8 by
default: several attempts, seconds in all). A limiter must answer its on_error policy
within the client's socket timeouts, so its commands run without those retries:

- synchronous clients: on connections of a pool of the limiter's own, made with the
  client's connection class and settings (host, credentials, TLS, timeouts...) but no
  retry; replies are parsed by the client itself;
- asyncio clients: on a connection taken from the client's own pool, whose retry
  policy is set to a single attempt while the limiter holds it (and put back before
  the connection returns to the pool).

Clients whose pool is of another kind (cluster, Sentinel, custom pools) run the
command as usual: their retries apply to the first failing call, and the breaker
answers the later ones at once.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Dict, Optional, Tuple

from ._breaker import Breaker

_POOLS = ("ConnectionPool", "BlockingConnectionPool")


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

    def pick(self, args: Tuple[Any, ...]) -> Optional[Breaker]:
        """The breaker guarding a command (None: a cluster command without a key, such as
        SCRIPT LOAD, which goes to every node)."""
        if self._nodes is None:
            return self.breaker
        key = _first_key(args)
        if key is None:
            return None
        try:
            name = self.client.get_node_from_key(key).name
        except Exception:  # no slot map yet (an asyncio cluster client before its first command)
            return None
        found = self._nodes.get(name)
        if found is None:
            found = self._nodes.setdefault(name, Breaker())
        return found

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


class SyncChannel(_Breakers):
    """Commands of synchronous clients (see the module docstring)."""

    __slots__ = ("__weakref__", "_lock", "_pool")

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self._lock = threading.Lock()
        self._pool: Any = False  # False: not built yet; None: none (use the client)

    def _own_pool(self) -> Any:
        if self._pool is False:
            with self._lock:
                if self._pool is False:
                    self._pool = self._build()
        return self._pool

    def _build(self) -> Any:
        pool = _plain_pool(self.client)
        if pool is None:
            return None
        kwargs = dict(pool.connection_kwargs)
        kwargs["retry"] = None  # a connection without retry and retry_on_error tries once
        kwargs["retry_on_error"] = []
        if "retry_on_timeout" in kwargs:
            kwargs["retry_on_timeout"] = False
        kwargs.pop("maint_notifications_pool_handler", None)  # bound to the client's pool
        try:
            return type(pool)(connection_class=pool.connection_class, max_connections=pool.max_connections, **kwargs)
        except TypeError:  # pragma: no cover - a pool class that takes other arguments
            return None

    def call(self, *args: Any, **options: Any) -> Any:
        breaker = self.pick(args)
        if breaker is None:
            return self._run(*args, **options)
        probe = breaker.admit()
        try:
            result = self._run(*args, **options)
        except BaseException as error:
            breaker.failed(error, probe)
            raise
        breaker.succeeded(probe)
        return result

    def _run(self, *args: Any, **options: Any) -> Any:
        pool = self._own_pool()
        if pool is None:
            return self.client.execute_command(*args, **options)
        conn = pool.get_connection()
        try:
            conn.send_command(*args)
            return self.client.parse_response(conn, args[0], **options)
        except BaseException as error:
            if not _is_reply(error):
                conn.disconnect()
            raise
        finally:
            pool.release(conn)


class AsyncChannel(_Breakers):
    """Commands of asyncio clients (see the module docstring)."""

    __slots__ = ("__weakref__", "_once")

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self._once: Any = None

    async def call(self, *args: Any, **options: Any) -> Any:
        breaker = self.pick(args)
        if breaker is None:
            return await self._run(*args, **options)
        probe = breaker.admit()
        try:
            result = await self._run(*args, **options)
        except BaseException as error:
            breaker.failed(error, probe)
            raise
        breaker.succeeded(probe)
        return result

    async def _run(self, *args: Any, **options: Any) -> Any:
        pool = _plain_pool(self.client, ("ConnectionPool",))
        if pool is None or not hasattr(pool, "get_available_connection"):
            return await self.client.execute_command(*args, **options)
        if self._once is None:
            self._once = _single_attempt()
        conn = pool.get_available_connection()
        kept = conn.retry
        conn.retry = self._once
        try:
            await pool.ensure_connection(conn)
            await conn.send_command(*args)
            return await self.client.parse_response(conn, args[0], **options)
        except BaseException as error:
            if not _is_reply(error):
                await conn.disconnect(nowait=True)
            raise
        finally:
            conn.retry = kept
            await pool.release(conn)


def _is_reply(error: BaseException) -> bool:
    """An error the server replied (the connection is in a clean state)."""
    from ._breaker import is_failure

    return isinstance(error, Exception) and not is_failure(error) and type(error).__name__ != "InvalidResponse"


_CHANNELS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
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
