"""kvstore.client: talk to a kvstore server over the native protocol.

::

    from kvstore.client import Client
    with Client("127.0.0.1", 7379, socket_timeout=2) as kv:
        version = kv.put(b"user:1", b"alice", ttl=60)
        kv.get(b"user:1")                      # b"alice"
        with kv.pipeline() as pipe:
            pipe.put(b"a", b"1").get(b"a").mget([b"a", b"b"])
            pipe.execute()                     # [version, b"1", [b"1", None]]

    async with AsyncClient.from_url("kv://:secret@127.0.0.1:7379") as kv:
        await kv.get(b"user:1")

A cluster (``kvstore-server --cluster``): :class:`ClusterClient` /
:class:`AsyncClusterClient` take startup nodes (``ClusterClient([("127.0.0.1",
7000)])`` or ``ClusterClient.from_url("kv://h1:p1,h2:p2")``), route each key
to its hash slot's primary, follow MOVED/ASK, ride out failovers, and split
mget/mput/pipelines by slot (:mod:`kvstore.client._cluster`).

Keys and values are bytes-like (a ``str`` is a TypeError: encode it). A key
lost to a memory error raises :class:`KeyLostError` (retried while it is
being rebuilt); it is never reported as absent. ``mget(keys,
on_lost="mark")`` puts :data:`LOST` in place of lost values instead.

Errors are the :mod:`kvstore.errors` classes, re-exported here; timeouts and
connection failures also inherit the builtin ``TimeoutError`` and
``ConnectionError``. The retry rule is in :mod:`kvstore.client._config`:
writes are never re-sent once they may have reached the server.

Threads, tasks and fork(): a :class:`Client` may be shared between threads
(its connection pool is thread-safe); an :class:`AsyncClient` between tasks of
one event loop; pipelines belong to one thread or task. After ``fork()`` the
child opens its own connections. This package never imports the server.
"""

from kvstore.errors import (  # noqa: F401
    ClosedError, ConnectionError, Error, FaultInjectionError, KeyLostError,
    KeyTooLargeError, ProtocolError, ReadOnlyError, ResponseError, StoreFullError,
    TimeoutError, UnrecoverableKeyError, ValueTooLargeError,
)

from ._async import AsyncClient, AsyncConnection, AsyncConnectionPool, AsyncPipeline
from ._cluster import (
    AsyncClusterClient, AsyncClusterPipeline, ClusterClient, ClusterPipeline, parse_cluster_url,
)
from ._commands import LOST
from ._config import DEFAULT_PORT, parse_url
from ._protocol import (  # noqa: F401
    AuthenticationError, DisabledError, InjectionDisabledError, ServerProtocolError,
)
from ._sync import Client, Connection, ConnectionPool, Pipeline

__all__ = [
    "Client", "AsyncClient", "Pipeline", "AsyncPipeline",
    "ClusterClient", "AsyncClusterClient", "ClusterPipeline", "AsyncClusterPipeline",
    "parse_cluster_url",
    "Connection", "ConnectionPool", "AsyncConnection", "AsyncConnectionPool",
    "LOST", "DEFAULT_PORT", "parse_url",
    "AuthenticationError", "DisabledError", "InjectionDisabledError", "ServerProtocolError",
    "ClosedError", "ConnectionError", "Error", "FaultInjectionError", "KeyLostError",
    "KeyTooLargeError", "ProtocolError", "ReadOnlyError", "ResponseError",
    "StoreFullError", "TimeoutError", "UnrecoverableKeyError", "ValueTooLargeError",
]
