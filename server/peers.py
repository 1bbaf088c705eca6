"""Versioned fetch from peers: the Store's rebuild source inside the server.

:class:`PeerSource` is handed to ``store.rebuild_source`` by
:mod:`.replication` whenever the node has peers (the primary's connected
replicas, or a replica's primary). ``fetch([(key, min_version), ...])`` asks
the peers over the native ``fetch`` op and returns ``{key: (version, value)}``
for the keys some peer holds at ``version >= min_version``; keys no peer has
yet (a replica lagging behind the write that was lost) are simply left out,
and the Store retries them later. A version below ``min_version`` is never
returned, so an older value is never installed.

Threads: the Store calls the source from two places. Read-repair runs it in a
worker thread and waits for it with a timeout; the rebuild round of
``store.recover()``/``maintain()`` runs it on the event loop thread itself. So
this code never needs the event loop to make progress: it uses the blocking
:class:`kvstore.client.Client` with its own sockets. On the loop thread it
asks each peer once with short socket timeouts and skips peers that look
stalled (no acknowledgement for a while), so a stopped replica cannot freeze
the server; in a worker thread it keeps asking (a lagging replica catches up
from the stream) until ``wait`` seconds have passed.
"""

import importlib
import importlib.util
import os
import sys
import threading
import time

from kvstore import errors

__all__ = ["PeerSource", "load_client"]


def load_client():
    """``kvstore.client``, mapped from ``client/`` when running from a checkout."""
    try:
        return importlib.import_module("kvstore.client")
    except ModuleNotFoundError:
        pass
    pkg_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "client")
    spec = importlib.util.spec_from_file_location(
        "kvstore.client", os.path.join(pkg_dir, "__init__.py"), submodule_search_locations=[pkg_dir])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kvstore.client"] = mod
    spec.loader.exec_module(mod)
    return mod


class PeerSource:
    """Rebuild source asking the peers listed by ``peers()``.

    ``peers()`` returns ``[(host, port, healthy), ...]`` best first; it is
    called from any thread and must only read a prepared list.
    ``loop_thread`` is the ident of the event loop thread.
    """

    def __init__(self, peers, password=None, loop_thread=None, wait=0.8,
                 loop_timeout=0.1, timeout=1.0):
        self._peers = peers
        self._password = password or None
        self.loop_thread = loop_thread
        self.wait = wait
        self.loop_timeout = loop_timeout
        self.timeout = timeout
        self._clients = {}
        self._lock = threading.Lock()
        self._client_mod = load_client()
        self.fetches = 0
        self.keys_fetched = 0
        self.bytes_fetched = 0
        self.errors = 0

    def _client(self, host, port, fast):
        k = (host, port, fast)
        with self._lock:
            c = self._clients.get(k)
            if c is None:
                t = self.loop_timeout if fast else self.timeout
                c = self._client_mod.Client(host, port, password=self._password, socket_timeout=t,
                                            socket_connect_timeout=t, retries=0, max_connections=8)
                self._clients[k] = c
            return c

    def close(self):
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass

    def fetch(self, requests):
        want = {}
        for key, min_version in requests:
            key = bytes(key)
            if want.get(key, -1) < min_version:
                want[key] = min_version
        got = {}
        on_loop = threading.get_ident() == self.loop_thread
        deadline = time.monotonic() + (0 if on_loop else self.wait)
        while want:
            peers = [p for p in self._peers() if p[2] or not on_loop]
            for host, port, _healthy in peers:
                try:
                    res = self._client(host, port, on_loop).fetch(list(want.items()))
                except (errors.Error, OSError) as e:
                    self.errors += 1
                    if isinstance(e, errors.TimeoutError):
                        # a blocked peer: drop its pooled connections
                        with self._lock:
                            c = self._clients.pop((host, port, on_loop), None)
                        if c is not None:
                            c.close()
                    continue
                self.fetches += 1
                for k, item in res.items():
                    ver, val = item
                    need = want.get(k)
                    if need is not None and ver >= need:
                        got[k] = (ver, val)
                        del want[k]
                        self.keys_fetched += 1
                        self.bytes_fetched += len(val)
                if not want:
                    break
            if not want or time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        return got
