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
``store.recover()``/``maintain()`` runs it on the event loop thread itself
(the server's recovery thread only processes the loss in the engine, see
:mod:`.recovery`; the round that follows runs on the loop). So
this code never needs the event loop to make progress: it uses the blocking
:class:`kvstore.client.Client` with its own sockets. In a worker thread it
keeps asking (a lagging replica catches up from the stream) until ``wait``
seconds have passed. On the loop thread (given ``install``) it does not block
at all: it hands the keys to a small thread pool and returns what earlier
background fetches brought; the pool's results are installed on the loop
(``loop.call_soon_threadsafe``; put off while ``busy()`` says the server's
recovery thread is processing a loss) through ``install(key, value,
version)``, which refuses anything older than the lost version, and are also returned
to the Store's next rebuild round so its bookkeeping ends. Without
``install`` the loop-thread path asks each peer once with short timeouts.
Peers that look stalled (no acknowledgement for a while) are skipped from
the loop, so a stopped replica cannot freeze the server.

``fetch_hash_range(lo, hi, min_version)`` rebuilds a lost index range over
the native ``fetch_range`` op, page by page (PROTOCOL.md). On a primary it
asks its replicas (best acked first), which answer only once the primary's
stream applied there reaches ``min_version`` (else ``BEHIND``: the next
replica is asked, and the Store retries with backoff; the keys stay LOST
meanwhile, never older, never resurrected). On a replica it asks its
primary, with ``min_version`` replaced by ``range_version(min_version)``
(the primary's version this replica has applied up to: the replica's own
counter is not the primary's numbering, and the primary has applied
whatever the replica has). From the loop thread it never blocks: the first
call starts a background fetch and answers None ("not yet"); a later call
for the same range returns what it brought. From another thread (a
read-repair) it asks and retries until ``wait`` seconds have passed.
"""

import concurrent.futures
import threading
import time

from kvstore import client as kvclient
from kvstore import errors

from .logs import event

__all__ = ["PeerSource"]

#: Error codes of a peer that refuses this node's credentials or permissions.
_AUTH_CODES = ("NOAUTH", "WRONGPASS", "NOPERM")


class PeerSource:
    """Rebuild source asking the peers listed by ``peers()``.

    ``peers()`` returns ``[(host, port, healthy), ...]`` best first; it is
    called from any thread and must only read a prepared list.
    ``loop_thread`` is the ident of the event loop thread.
    """

    def __init__(self, peers, password=None, loop_thread=None, wait=0.8,
                 loop_timeout=0.1, timeout=1.0, before_loop_fetch=None, loop=None,
                 install=None, range_version=None, on_range_started=None, busy=None,
                 username=None):
        self._peers = peers
        self._password = password or None
        self._username = (username or None) if self._password else None
        self.loop_thread = loop_thread
        self.wait = wait
        self.loop_timeout = loop_timeout
        self.timeout = timeout
        self.before_loop_fetch = before_loop_fetch
        self.loop = loop
        self.install = install
        self.range_version = range_version
        #: Called (on the loop) when a background range fetch starts, so the
        #: owner can ask the Store to retry once the answer is likely in.
        self.on_range_started = on_range_started
        #: True while installs must wait (the server's recovery thread is
        #: processing a loss): background answers are installed later.
        self.busy = busy
        self._pool = None
        self._range_inflight = set()    # loop thread only: (lo, hi)
        self._range_ready = {}          # loop thread only: (lo, hi) -> (min_version, answer, when)
        self.range_fetches = 0
        self.range_keys_fetched = 0
        self.range_behind = 0
        self._inflight = set()      # loop thread only
        self._ready = {}            # loop thread only: key -> (version, value, when)
        self.background_installs = 0
        self.keys_cached = 0
        self._clients = {}
        self._lock = threading.Lock()
        self._client_mod = kvclient
        self.fetches = 0
        self.keys_fetched = 0
        self.bytes_fetched = 0
        self.errors = 0
        self.auth_failures = 0
        self._auth_logged = set()     # peers whose refusal was logged (until they accept)

    def _failed(self, host, port, exc):
        """Count a failed fetch; a peer refusing this node's credentials is
        logged once (until a fetch from it works again)."""
        self.errors += 1
        if getattr(exc, "code", None) in _AUTH_CODES:
            self.auth_failures += 1
            if (host, port) not in self._auth_logged:
                self._auth_logged.add((host, port))
                event("error", "peer_auth_refused", peer=f"{host}:{port}",
                      user=self._username or "default", error=str(exc)[:200],
                      hint="the peer refused this node's credentials or the user lacks "
                           "+kv.fetch on every key (--masteruser/--masterauth): lost keys "
                           "cannot be rebuilt from it")

    def _worked(self, host, port):
        if self._auth_logged:
            self._auth_logged.discard((host, port))

    def _client(self, host, port, fast):
        k = (host, port, fast)
        with self._lock:
            c = self._clients.get(k)
            if c is None:
                t = self.loop_timeout if fast else self.timeout
                c = self._client_mod.Client(host, port, password=self._password,
                                            username=self._username, socket_timeout=t,
                                            socket_connect_timeout=t, retries=0, max_connections=8)
                self._clients[k] = c
            return c

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
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
        on_loop = threading.get_ident() == self.loop_thread
        if on_loop and self.before_loop_fetch is not None:
            self.before_loop_fetch()      # e.g. send pending writes to the replicas first
        if on_loop and self.install is not None and self.loop is not None:
            return self._fetch_async(want)
        return self._fetch_blocking(want, on_loop, 0 if on_loop else self.wait)

    # -- non-blocking path for the loop thread

    def _fetch_async(self, want):
        out = {}
        todo = []
        for k, mv in want.items():
            r = self._ready.pop(k, None)
            if r is not None and r[0] >= mv:
                out[k] = (r[0], r[1])       # fetched (and installed) in the background
                self.keys_cached += 1
            elif k not in self._inflight:
                todo.append((k, mv))
        if todo:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=2, thread_name_prefix="kvstore-peer-fetch")
            self._inflight.update(k for k, _ in todo)
            self._pool.submit(self._background, dict(todo))
        return out

    def _background(self, want):
        got = {}
        try:
            got = self._fetch_blocking(dict(want), False, self.wait, healthy_only=True)
        except Exception:  # noqa: BLE001 - the Store retries
            self.errors += 1
        finally:
            try:
                self.loop.call_soon_threadsafe(self._done, list(want), got)
            except RuntimeError:
                pass        # loop closed: shutting down

    def _done(self, keys, got):
        if self.busy is not None and got and self.busy():
            self.loop.call_later(0.005, self._done, keys, got)
            return
        for k in keys:
            self._inflight.discard(k)
        now = time.monotonic()
        for k, (ver, val) in got.items():
            try:
                if self.install(k, val, ver) == "installed":
                    self.background_installs += 1
            except Exception:  # noqa: BLE001 - e.g. full: the Store's round retries
                continue
            self._ready[k] = (ver, val, now)
        if len(self._ready) > 4096 or (self._ready and now - next(iter(self._ready.values()))[2] > 2):
            self._ready = {k: v for k, v in self._ready.items() if now - v[2] < 2}

    # -- blocking path

    def _fetch_blocking(self, want, fast, wait, healthy_only=None):
        got = {}
        on_loop = fast
        if healthy_only is None:
            healthy_only = fast
        deadline = time.monotonic() + wait
        while want:
            peers = [p for p in self._peers() if p[2] or not healthy_only]
            for host, port, _healthy in peers:
                try:
                    res = self._client(host, port, on_loop).fetch(list(want.items()))
                except (errors.Error, OSError) as e:
                    self._failed(host, port, e)
                    if isinstance(e, errors.TimeoutError):
                        # a blocked peer: drop its pooled connections
                        with self._lock:
                            c = self._clients.pop((host, port, on_loop), None)
                        if c is not None:
                            c.close()
                    continue
                self.fetches += 1
                self._worked(host, port)
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

    # -- lost index ranges

    def fetch_hash_range(self, lo, hi, min_version=0):
        """``{key: (version, value, expire_at_ms or None)}`` for the keys with
        ``lo <= key_hash(key) < hi``, from a peer that has applied every
        write and delete up to ``min_version``; None when no peer can say yet
        (the Store retries; see the module docstring)."""
        lo, hi, min_version = int(lo), int(hi), int(min_version)
        if self.range_version is not None:
            min_version = self.range_version(min_version)
        if threading.get_ident() != self.loop_thread or self.loop is None:
            deadline = time.monotonic() + self.wait
            while True:
                got = self._range_blocking(lo, hi, min_version, False, healthy_only=False)
                if got is not None or time.monotonic() >= deadline:
                    return got
                time.sleep(0.005)
        if self.before_loop_fetch is not None:
            self.before_loop_fetch()      # the replicas must see our writes to catch up
        k = (lo, hi)
        r = self._range_ready.pop(k, None)
        if r is not None and r[0] >= min_version:
            return r[1]
        if k not in self._range_inflight:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=2, thread_name_prefix="kvstore-peer-fetch")
            self._range_inflight.add(k)
            self._pool.submit(self._range_background, lo, hi, min_version)
            if self.on_range_started is not None:
                self.on_range_started()
        return None

    def _range_background(self, lo, hi, min_version):
        got = None
        try:
            got = self._range_blocking(lo, hi, min_version, False, healthy_only=True)
        except Exception:  # noqa: BLE001 - the Store retries
            self.errors += 1
        finally:
            try:
                self.loop.call_soon_threadsafe(self._range_done, lo, hi, min_version, got)
            except RuntimeError:
                pass        # loop closed: shutting down

    def _range_done(self, lo, hi, min_version, got):
        self._range_inflight.discard((lo, hi))
        now = time.monotonic()
        if got is not None:
            self._range_ready[(lo, hi)] = (min_version, got, now)
        if len(self._range_ready) > 256:
            self._range_ready = {k: v for k, v in self._range_ready.items() if now - v[2] < 5}

    def _range_blocking(self, lo, hi, min_version, fast, healthy_only):
        """Ask each peer in turn for the whole range (every page); the
        first complete answer wins. None when every peer is behind or
        unreachable."""
        for host, port, healthy in self._peers():
            if healthy_only and not healthy:
                continue
            out = {}
            pos = lo
            try:
                c = self._client(host, port, fast)
                while True:
                    nxt, got = c.fetch_range_page(pos, hi, min_version)
                    self.range_fetches += 1
                    out.update(got)
                    if nxt is None:
                        break
                    if not pos < nxt < hi:
                        raise errors.ProtocolError(f"fetch_range: next {nxt} outside ({pos}, {hi})")
                    pos = nxt
            except errors.SourceBehindError:
                self.range_behind += 1
                continue
            except (errors.Error, OSError) as e:
                self._failed(host, port, e)
                with self._lock:
                    c = self._clients.pop((host, port, fast), None)
                if c is not None:
                    c.close()
                continue
            self.range_keys_fetched += len(out)
            self.bytes_fetched += sum(len(v[1]) for v in out.values())
            return out
        return None
