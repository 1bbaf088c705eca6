"""Replication: primary/replica groups (DESIGN.md section 7).

Roles
    Every server starts as a primary, or as a replica with ``--replica-of
    HOST:PORT``. ``REPLICAOF NO ONE`` promotes a replica (new replication id,
    data and versions kept; the engine's version counter is already above
    every version it holds, since applying a versioned write raises it).
    ``REPLICAOF host port`` turns any node into a replica of another.

Where writes are seen
    :class:`Replication` wraps the Store's write methods on the instance
    (``put``, ``mput``, ``delete``, ``expire_at_ms`` which also carries
    EXPIRE/PEXPIRE/PERSIST, ``flush`` and ``install``), so every write from
    the RESP and native command layers passes through one place. On a
    primary the wrapper appends the write, with its version and absolute
    expiry, to the stream; on a replica it refuses client writes with
    :class:`ReplicaReadOnlyError` (``-READONLY`` / native ``READONLY``). The
    replica applies the stream through the unwrapped engine methods.

Stream and offsets
    Each write is one msgpack entry: ``["p", key, version, value, exp]``
    (exp: 0 none, > 0 absolute ms, -1 keep), ``["d", key]``,
    ``["e", key, exp_ms]`` (0 removes the expiry), ``["f"]`` (flushall). The
    replication offset counts entry bytes. Entries written during one loop
    iteration are flushed as one chunk: appended to the backlog (bounded by
    ``repl_backlog_size`` bytes; created when the first replica syncs, as in
    Redis) and sent to every online replica as ``["W", start_offset, blob]``.

Sync (native op ``sync [replid, offset, listen_port]``)
    Partial when ``replid`` matches and the backlog still holds ``offset``:
    the reply is ``{"mode": "partial", ...}`` and the backlog from there
    follows. Otherwise full: ``{"mode": "full", "offset": S}``, then the
    snapshot of every key as ``["S", blob]`` frames (``p`` entries with
    versions and absolute expiries), ``["E", S]``, then the writes after S.
    The snapshot is read while writes continue; writes after S are queued for
    that replica and replayed after it, and since every entry is a complete
    overwrite the replica ends equal to the primary. After the reply the
    connection stops being a command connection: the replica sends
    ``["ack", offset]`` frames, the primary sends stream frames and
    ``["PING"]`` heartbeats.

Synchronous writes
    ``--min-replica-acks N`` (default 0: asynchronous, like Redis): a batch of
    client commands that wrote holds its replies until N replicas acked the
    batch's offset; after ``--min-replica-timeout`` seconds each write's reply
    is replaced by ``-NOREPLICAS`` (the write stays applied on the primary
    and may still reach replicas, as with Redis WAIT). With fewer than N
    online replicas a write is refused before it is applied. ``WAIT
    numreplicas timeout_ms`` is the per-call form.

Rebuild from peers
    :class:`.peers.PeerSource` is the Store's rebuild source while the node
    has peers (connected replicas, or the primary), None otherwise (so a
    standalone server answers ``-LOST`` at once).

Not covered here (documented in PROTOCOL.md): chained replicas, partial
resync across a promotion (a promoted node has a new id: its replicas do a
full sync), automatic failover.
"""

import asyncio
import collections
import os
import threading
import time

import msgpack

from kvstore import _native
from kvstore.errors import KeyLostError, ReadOnlyError, ResponseError

from . import resp
from .commands import CommandError, command, integer
from .conn import BaseConnection
from .framing import MAGIC, NEED_MORE, FrameError, FrameParser, pack_frame
from .logs import event
from .native import NativeError, op
from .peers import PeerSource

__all__ = ["Replication", "ReplicaReadOnlyError", "NoReplicasError", "parse_hostport"]

_Engine = _native.Engine

#: A replica's ack / primary's heartbeat period, seconds.
HEARTBEAT = 1.0
#: Snapshot frames hold about this many bytes of entries.
SNAPSHOT_CHUNK = 1 << 20
#: Above this much queued output the snapshot writer waits for the socket.
SNAPSHOT_HIGH_WATER = 8 << 20
_DEBUG = bool(os.environ.get("KVSTORE_REPL_DEBUG"))
#: Rebuild rounds on the loop fetch synchronously (blocking the loop for a
#: round trip) instead of in the background: for comparisons.
_SYNC_FETCH = os.environ.get("KVSTORE_SYNC_PEER_FETCH") == "1"

#: A replica that has not acked for this long is skipped by loop-thread fetches.
STALE_ACK = 2.0


class ReplicaReadOnlyError(ReadOnlyError):
    resp_reply = b"-READONLY You can't write against a read only replica.\r\n"
    code = "READONLY"


class NoReplicasError(ResponseError):
    resp_reply = b"-NOREPLICAS Not enough good replicas to write.\r\n"
    code = "NOREPLICAS"


def parse_hostport(s):
    s = str(s).strip()
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not HOST:PORT: {s!r}")
    return host.strip("[]"), int(port)


def _new_replid():
    return os.urandom(20).hex()


def _packer():
    return msgpack.Packer(use_bin_type=True)


# ---------------------------------------------------------------- backlog

class Backlog:
    """Recent stream chunks, bounded by bytes: ``[(start_offset, blob)]``."""

    def __init__(self, size, offset=0):
        self.size = max(1, int(size))
        self.chunks = collections.deque()
        self.bytes = 0
        self.end = offset          # replication offset after the last chunk

    @property
    def first(self):
        return self.chunks[0][0] if self.chunks else self.end

    def append(self, blob):
        start = self.end
        self.chunks.append((start, blob))
        self.bytes += len(blob)
        self.end += len(blob)
        while len(self.chunks) > 1 and self.bytes > self.size:
            self.bytes -= len(self.chunks.popleft()[1])
        return start

    def since(self, offset):
        """Chunks from ``offset`` on, or None when the backlog does not cover it."""
        if offset == self.end:
            return []
        if not self.chunks or offset < self.chunks[0][0] or offset > self.end:
            return None
        out = []
        for start, blob in reversed(self.chunks):
            out.append((start, blob))
            if start == offset:
                out.reverse()
                return out
            if start < offset:
                return None     # not a chunk boundary
        return None


# ---------------------------------------------------------------- primary side

class ReplicaSession(BaseConnection):
    """The primary's end of a replica's connection after ``sync``."""

    kind = "replica"

    def __init__(self, repl, prev, listen_port):
        super().__init__(repl.server, prev)
        self.repl = repl
        self.parser = FrameParser(max_frame=1 << 20, expect_magic=False)
        self.listen_port = int(listen_port or 0)
        self.host = prev.addr.rpartition(":")[0] or "127.0.0.1"
        self.state = "wait_bgsave"
        self.queue = []            # chunks produced while the snapshot streams
        self.queued_bytes = 0
        self.ack_offset = -1
        self.ack_time = time.monotonic()
        self.sync_started = time.monotonic()
        self.name = b"replica"
        self.packer = _packer()

    def data_received(self, data):
        self.active = True
        p = self.parser
        try:
            p.feed(data)
            while True:
                fr = p.gets()
                if fr is NEED_MORE:
                    break
                if type(fr) is list and len(fr) == 2 and fr[0] == "ack" and type(fr[1]) is int:
                    if fr[1] > self.ack_offset:
                        self.ack_offset = fr[1]
                    self.ack_time = time.monotonic()
                    self.repl.on_ack()
        except FrameError as e:
            event("warning", "replica_protocol_error", addr=self.addr, error=str(e))
            self.drop("replica protocol error")

    def connection_lost(self, exc):
        super().connection_lost(exc)
        self.repl.session_lost(self)

    def send(self, frame):
        if self.closed:
            return
        self.transport.write(pack_frame(self.packer, frame))
        limit = self.repl.output_limit
        if limit and self.transport.get_write_buffer_size() > limit:
            event("warning", "replica_dropped", addr=self.addr, reason="output buffer limit",
                  limit=limit)
            self.drop("replica output buffer limit")

    def chunk(self, start, blob):
        if self.state == "online":
            self.send(["W", start, blob])
        elif not self.closed:
            self.queue.append((start, blob))
            self.queued_bytes += len(blob)
            limit = self.repl.output_limit
            if limit and self.queued_bytes > limit:
                self.drop("replica output buffer limit during full sync")

    def line(self, i, primary_offset):
        lag = round(time.monotonic() - self.ack_time)
        state = "online" if self.state == "online" else "wait_bgsave"
        return (f"ip={self.host},port={self.listen_port},state={state},"
                f"offset={max(self.ack_offset, 0)},lag={lag},"
                f"lag_bytes={max(0, primary_offset - max(self.ack_offset, 0))}")


class _Held:
    __slots__ = ("conn", "out", "marks", "waits", "target", "deadline", "handle")


# ---------------------------------------------------------------- manager

class Replication:
    """Replication state of one server (see the module docstring)."""

    def __init__(self, server):
        self.server = server
        c = server.config
        self.store = server.store
        self.password = c.masterauth or c.requirepass or None
        self.backlog_size = int(c.repl_backlog_size)
        self.output_limit = max(int(c.repl_backlog_size), 64 << 20)
        self.min_acks = int(c.min_replica_acks)
        self.ack_timeout = float(c.min_replica_timeout)
        self.role = "master"
        self.replid = _new_replid()
        self.backlog = None
        self.pending = []
        self.pending_bytes = 0
        self._flush_scheduled = False
        self.sessions = []
        self.packer = _packer()
        self.loop = None
        self.loop_thread = None
        self._hb = None
        # replica side
        self.master = None             # (host, port)
        self.link = None               # ReplicaLink
        self.master_replid = None
        self.applied = 0               # replica: primary offset applied
        self.max_version = 0           # replica: highest version applied from the stream
        self.ahead = {}                # replica: key -> version rebuilt ahead of the stream
        # client batches waiting for acks
        self.held = {}                 # conn -> [_Held]
        self.marks = []
        self.waits = []
        self._peers = []
        self.source = None
        self.stats = collections.Counter()
        self._orig = {}
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self._wrap_store()     # before any client connection caches a store method

    # -- lifecycle

    def start(self, loop):
        self.source = PeerSource(self.peers, self.password, self.loop_thread,
                                 before_loop_fetch=self._before_loop_fetch, loop=self.loop,
                                 install=None if _SYNC_FETCH else self.store.install)
        self._hb_due = time.monotonic() + HEARTBEAT
        self._hb = loop.call_later(HEARTBEAT, self._heartbeat)
        if self.server.config.replica_of:
            host, port = parse_hostport(self.server.config.replica_of)
            self.become_replica(host, port)

    def stop(self):
        if self._hb is not None:
            self._hb.cancel()
        if self.link is not None:
            self.link.stop()
        for h in [h for lst in self.held.values() for h in lst]:
            if h.handle is not None:
                h.handle.cancel()
        if self.source is not None:
            self.source.close()
        self.store.rebuild_source = None

    # -- the write path

    def _wrap_store(self):
        st = self.store
        o = self._orig
        for name in ("put", "mput", "delete", "expire_at_ms", "flush", "install", "put_versioned",
                     "expire_at", "_lost_read"):
            o[name] = getattr(st, name)
        put, mput, delete = o["put"], o["mput"], o["delete"]
        expire_at_ms, flush, install, expire_at = (o["expire_at_ms"], o["flush"], o["install"],
                                                   o["expire_at"])
        repl = self
        pack = self.packer.pack

        def check():
            if repl.role != "master":
                raise ReplicaReadOnlyError("You can't write against a read only replica.")
            if repl.min_acks and repl.online_count() < repl.min_acks:
                raise NoReplicasError("Not enough good replicas to write.")

        def w_put(key, value, ttl=None):
            if repl.role != "master" or repl.min_acks:
                check()
            if ttl is None:
                v = put(key, value)
                if repl.backlog is not None:
                    repl.feed(pack(("p", key, v, value, 0)))
            else:
                v = put(key, value, ttl=ttl)
                if repl.backlog is not None:
                    repl.feed(pack(("p", key, v, value, expire_at(key))))
            return v

        def w_mput(pairs):
            if repl.role != "master" or repl.min_acks:
                check()
            if repl.backlog is None:
                return mput(pairs)
            items = list(pairs.items()) if hasattr(pairs, "items") else list(pairs)
            vers = mput(items)
            buf = [pack(("p", k, v, val, 0)) for (k, val), v in zip(items, vers)]
            repl.feed(b"".join(buf))
            return vers

        def w_delete(key):
            if repl.role != "master" or repl.min_acks:
                check()
            r = delete(key)
            if r and repl.backlog is not None:
                repl.feed(pack(("d", key)))
            return r

        def w_expire_at_ms(key, ms):
            if repl.role != "master" or repl.min_acks:
                check()
            r = expire_at_ms(key, ms)
            if r and repl.backlog is not None:
                repl.feed(pack(("e", key, ms)))
            return r

        def w_flush():
            if repl.role != "master" or repl.min_acks:
                check()
            r = flush()
            if repl.backlog is not None:
                repl.feed(pack(("f",)))
            return r

        def w_install(key, value, version):
            # rebuilds from peers: not a client write, but a new replica that
            # synced while the key was lost here must still get it
            r = install(key, value, version)
            if _DEBUG:
                event("info", "dbg_install", key=bytes(key).decode("latin-1"), version=version,
                      status=r, value=bytes(value[:16]).decode("latin-1"))
            if r == "installed":
                if repl.role == "master":
                    if repl.backlog is not None:
                        repl.feed(pack(("p", key, version, value, -1)), client=False)
                elif version > repl.max_version:
                    # fetched from the primary ahead of our stream: older writes
                    # of this key still in the stream must not go back in time
                    repl.ahead[bytes(key)] = version
            return r

        def w_put_versioned(*a):
            raise ReplicaReadOnlyError("put_versioned is the replication stream's own")

        lost_read = o["_lost_read"]

        def w_lost_read(key, version, state, versioned):
            # Read-repair blocks this (loop) thread while a worker asks the
            # peers: send the writes of this iteration first, or a replica
            # could never reach the version it is asked for.
            if repl.pending and threading.get_ident() == repl.loop_thread:
                repl.flush_pending()
            t0 = time.perf_counter()
            ok = False
            try:
                r = lost_read(key, version, state, versioned)
                ok = True
                return r
            finally:
                dt = time.perf_counter() - t0
                repl.stats["read_repair_ms_total"] += int(dt * 1000)
                if dt > 0.05:
                    repl.stats["slow_read_repairs"] += 1
                    event("warning", "slow_read_repair", key=bytes(key[:64]).decode("latin-1"),
                          version=version, duration_ms=round(dt * 1e3, 1), repaired=ok)

        st.put = w_put
        st.mput = w_mput
        st.delete = w_delete
        st.expire_at_ms = w_expire_at_ms
        st.flush = w_flush
        st.install = w_install
        st.put_versioned = w_put_versioned
        st._lost_read = w_lost_read

    def online_count(self):
        return sum(1 for s in self.sessions if s.state == "online" and not s.closed)

    def feed(self, entry, client=True):
        self.pending.append(entry)
        self.pending_bytes += len(entry)
        if client and self.min_acks:
            out = self.server.batch_out
            self.marks.append(len(out) if out is not None else 0)
            self.server.reply_gate = self.gate
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush_pending)

    def flush_pending(self):
        self._flush_scheduled = False
        if not self.pending:
            return
        blob = b"".join(self.pending) if len(self.pending) > 1 else self.pending[0]
        self.pending = []
        self.pending_bytes = 0
        if self.backlog is None:
            return
        start = self.backlog.append(blob)
        for s in self.sessions:
            s.chunk(start, blob)

    @property
    def offset(self):
        if self.role != "master":
            return self.applied
        if self.backlog is None:
            return 0
        return self.backlog.end + self.pending_bytes

    def _heartbeat(self):
        late = time.monotonic() - self._hb_due
        if late > 0.25:
            self.stats["loop_stalls"] += 1
            event("warning", "loop_stall", late_ms=round(late * 1e3, 1))
        for s in list(self.sessions):
            if s.state == "online":
                s.send(["PING"])
        if self.link is not None:
            self.link.heartbeat()
        self._refresh_peers()
        self._hb_due = time.monotonic() + HEARTBEAT
        self._hb = self.loop.call_later(HEARTBEAT, self._heartbeat)

    # -- sessions (primary)

    def handle_sync(self, conn, replid, offset, listen_port):
        if self.role != "master":
            raise NativeError("READONLY", "this node is a replica; chained replication is not supported")
        if self.backlog is None:
            self.backlog = Backlog(self.backlog_size)
        self.flush_pending()
        chunks = None
        if replid == self.replid and type(offset) is int:
            chunks = self.backlog.since(offset)
        sess = ReplicaSession(self, conn, listen_port)
        if chunks is not None:
            mode = "partial"
            self.stats["sync_partial_ok"] += 1
            at = offset
        else:
            mode = "full"
            self.stats["sync_full"] += 1
            if replid is not None:
                self.stats["sync_partial_err"] += 1
            at = self.backlog.end
        event("info", "replica_sync", addr=conn.addr, mode=mode, offset=at,
              requested=offset if type(offset) is int else -1, listen_port=sess.listen_port)
        self.loop.call_soon(self._takeover, conn, sess, mode, chunks, at)
        return {"mode": mode, "replid": self.replid, "offset": at}

    def _takeover(self, conn, sess, mode, chunks, at):
        if conn.closed or conn.transport is None or conn.transport.is_closing():
            return
        srv = self.server
        srv.replace(conn, sess)
        conn.closed = True            # the old protocol object is done
        conn.transport.set_protocol(sess)
        sess.connection_made(conn.transport)
        # chunks flushed since the reply are in the backlog: send them from `at`
        since = self.backlog.since(at)
        if since is None:
            sess.drop("backlog moved past the sync offset")
            return
        self.sessions.append(sess)
        if mode == "partial":
            for start, blob in since:
                sess.send(["W", start, blob])
            sess.state = "online"
            sess.ack_offset = max(sess.ack_offset, at)
            self._refresh_peers()
        else:
            sess.queue = list(since)
            sess.queued_bytes = sum(len(b) for _s, b in since)
            self.loop.create_task(self._full_sync(sess, at))

    async def _full_sync(self, sess, at):
        t0 = time.perf_counter()
        st = self.store
        keys = list(st.keys())
        lost = {k for k, _v, _s in st.lost_keys()}
        get_versioned = st.get_versioned
        expire_at = self._orig["expire_at"]
        pack = self.packer.pack
        buf = []
        size = 0
        sent = 0
        nbytes = 0
        for k in keys:
            if sess.closed:
                return
            if k in lost:
                continue
            try:
                got = get_versioned(k)
            except KeyLostError:
                continue
            if got is None:
                continue
            e = pack(("p", k, got[0], got[1], expire_at(k)))
            buf.append(e)
            size += len(e)
            sent += 1
            if size >= SNAPSHOT_CHUNK:
                sess.send(["S", b"".join(buf)])
                nbytes += size
                buf, size = [], 0
                while not sess.closed and sess.transport.get_write_buffer_size() > SNAPSHOT_HIGH_WATER:
                    await asyncio.sleep(0.002)
                await asyncio.sleep(0)
        if sess.closed:
            return
        if buf:
            sess.send(["S", b"".join(buf)])
            nbytes += size
        sess.send(["E", at])
        for start, blob in sess.queue:
            sess.send(["W", start, blob])
        sess.queue = []
        sess.queued_bytes = 0
        sess.state = "online"
        self._refresh_peers()
        event("info", "replica_full_sync_done", addr=sess.addr, keys=sent, bytes=nbytes,
              duration_ms=round((time.perf_counter() - t0) * 1e3, 1))

    def session_lost(self, sess):
        if sess in self.sessions:
            self.sessions.remove(sess)
            event("warning", "replica_disconnected", addr=sess.addr, listen_port=sess.listen_port,
                  ack_offset=sess.ack_offset)
            self._refresh_peers()
            self.on_ack()

    def drop_links(self):
        """Close every replication connection (testing network cuts)."""
        n = 0
        for s in list(self.sessions):
            s.drop("replication link dropped by command")
            n += 1
        if self.link is not None and self.link.transport_close():
            n += 1
        return n

    # -- peers for the rebuild source

    def peers(self):
        """``[(host, port, healthy)]`` best first; called from any thread."""
        now = time.monotonic()
        if self.role == "master":
            ss = [s for s in list(self._peers) if not s.closed]
            ss.sort(key=lambda s: -s.ack_offset)
            return [(s.host, s.listen_port, now - s.ack_time < STALE_ACK) for s in ss]
        link, master = self.link, self.master
        if master is None:
            return []
        healthy = link is not None and link.up and now - link.last_io < STALE_ACK
        return [(master[0], master[1], healthy)]

    def _before_loop_fetch(self):
        if self.pending:
            self.flush_pending()

    def _refresh_peers(self):
        if self.role == "master":
            self._peers = [s for s in self.sessions if s.state == "online" and s.listen_port
                           and not s.closed]
            has = bool(self._peers)
        else:
            self._peers = []
            has = self.master is not None
        want = self.source if has else None
        if self.store.rebuild_source is not want:
            self.store.rebuild_source = want

    # -- waiting for acks (min-replica-acks, WAIT)

    def acked(self, target):
        return sum(1 for s in self.sessions if s.ack_offset >= target and not s.closed)

    def gate(self, conn, out):
        """Called after a client batch when ``server.reply_gate`` is set.
        True: the replies are held and written later by us."""
        marks, waits = self.marks, self.waits
        lst = self.held.get(conn)
        if not marks and not waits and not lst:
            self._maybe_ungate()
            return False
        self.marks, self.waits = [], []
        self.flush_pending()
        h = _Held()
        h.conn, h.out, h.marks, h.waits = conn, out, marks, waits
        h.target = self.offset
        h.handle = None
        now = time.monotonic()
        h.deadline = now + self.ack_timeout if marks else None
        for w in waits:
            if w[2] is not None and (h.deadline is None or w[2] < h.deadline):
                h.deadline = w[2]
        if lst is None:
            lst = self.held[conn] = []
        lst.append(h)
        try:
            conn.transport.pause_reading()
        except (RuntimeError, AttributeError):
            pass
        if h.deadline is not None:
            h.handle = self.loop.call_at(self.loop.time() + max(0.0, h.deadline - now),
                                         self._expire, conn)
        self._release(conn)
        return True

    def _maybe_ungate(self):
        if not self.min_acks and not self.held and not self.waits:
            self.server.reply_gate = None

    def on_ack(self):
        if self.held:
            for conn in list(self.held):
                self._release(conn)

    def _expire(self, conn):
        self._release(conn, timed_out=True)
        lst = self.held.get(conn)
        if lst and lst[0].deadline is not None:
            # timers may fire a little early (loop clock granularity): re-arm
            h = lst[0]
            if h.handle is not None:
                h.handle.cancel()
            h.handle = self.loop.call_later(max(0.001, h.deadline - time.monotonic()),
                                            self._expire, conn)

    def _ready(self, h, now):
        done = True
        if h.marks and self.acked(h.target) < self.min_acks:
            done = False
        for w in h.waits:
            if self.acked(h.target) < w[1]:
                done = False
        if done:
            return True, False
        return (h.deadline is not None and now >= h.deadline), True

    def _release(self, conn, timed_out=False):
        lst = self.held.get(conn)
        now = time.monotonic() + (0.002 if timed_out else 0.0)
        while lst:
            h = lst[0]
            ready, late = self._ready(h, now)
            if not ready:
                break
            lst.pop(0)
            if h.handle is not None:
                h.handle.cancel()
            n = self.acked(h.target)
            out = h.out
            native = conn.kind == "native"
            for idx, _num, _dl in h.waits:
                if idx < len(out):
                    out[idx] = self._int_reply(conn, out[idx], n)
            if late and h.marks and n < self.min_acks:
                self.stats["noreplicas_replies"] += 1
                for idx in h.marks:
                    if idx < len(out):
                        out[idx] = _noreplicas(out[idx], native)
            if not conn.closed:
                conn.transport.write(b"".join(out))
                if getattr(conn, "quitting", False):
                    conn.close_after_write()
        if not lst:
            self.held.pop(conn, None)
            if not conn.closed and conn.transport is not None:
                try:
                    conn.transport.resume_reading()
                except RuntimeError:
                    pass
            self._maybe_ungate()

    @staticmethod
    def _int_reply(conn, placeholder, n):
        if conn.kind == "native":
            body = msgpack.unpackb(placeholder[4:], raw=False)
            return pack_frame(_packer(), [body[0], 0, n])
        return integer(n)

    # -- replica side

    def become_replica(self, host, port):
        if self.link is not None:
            self.link.stop()
        for s in list(self.sessions):
            s.drop("node became a replica")
        self.role = "slave"
        self.master = (host, port)
        self.link = ReplicaLink(self, host, port)
        self.link.start()
        self._refresh_peers()
        event("warning", "replicaof", host=host, port=port)

    def promote(self):
        if self.link is not None:
            self.link.stop()
            self.link = None
        was = self.role
        self.role = "master"
        self.master = None
        self.replid = _new_replid()
        self.backlog = None
        self.pending, self.pending_bytes = [], 0
        self.applied = 0
        self.ahead.clear()
        self._refresh_peers()
        event("warning", "promoted", previous_role=was, replid=self.replid,
              version=self.store.version)

    def apply(self, blob, unpacker):
        o = self._orig
        pv, dl, ex, fl = o["put_versioned"], o["delete"], o["expire_at_ms"], o["flush"]
        unpacker.feed(blob)
        n = 0
        ahead = self.ahead
        maxv = self.max_version
        for e in unpacker:
            t = e[0]
            try:
                if ahead and t != "f" and e[1] in ahead:
                    # a rebuild installed a newer version: skip the older history
                    if t != "p" or e[2] < ahead[e[1]]:
                        continue
                    del ahead[e[1]]
                if t == "p":
                    pv(e[1], e[3], e[2], e[4])
                    if e[2] > maxv:
                        maxv = e[2]
                elif t == "d":
                    dl(e[1])
                elif t == "e":
                    ex(e[1], e[2])
                elif t == "f":
                    fl()
                    ahead.clear()
                n += 1
            except Exception as exc:  # noqa: BLE001 - keep the link; count it
                self.stats["apply_errors"] += 1
                if self.stats["apply_errors"] <= 10:
                    event("error", "replica_apply_failed", entry=t,
                          error=f"{type(exc).__name__}: {exc}")
        self.max_version = maxv
        self.stats["applied_entries"] += n

    # -- introspection

    def info(self):
        d = {"role": self.role}
        now = time.monotonic()
        if self.role == "master":
            d["connected_slaves"] = len(self.sessions)
            off = self.offset
            for i, s in enumerate(self.sessions):
                d[f"slave{i}"] = s.line(i, off)
        else:
            link = self.link
            d.update(master_host=self.master[0], master_port=self.master[1],
                     master_link_status="up" if link and link.up else "down",
                     master_last_io_seconds_ago=int(now - link.last_io) if link and link.up else -1,
                     master_sync_in_progress=int(bool(link and link.syncing)),
                     slave_repl_offset=self.applied, slave_read_only=1,
                     master_link_down_since_seconds=(
                         int(now - link.down_since) if link and not link.up else 0),
                     connected_slaves=0)
            if link is not None:
                d.update(kv_last_sync=link.last_mode or "none", kv_full_syncs=link.full_syncs,
                         kv_partial_syncs=link.partial_syncs, kv_reconnects=link.reconnects)
        bl = self.backlog
        d.update(master_replid=self.replid if self.role == "master" else (self.master_replid or ""),
                 master_repl_offset=self.offset,
                 repl_backlog_active=int(bl is not None),
                 repl_backlog_size=self.backlog_size,
                 repl_backlog_first_byte_offset=bl.first if bl else 0,
                 repl_backlog_histlen=bl.bytes if bl else 0,
                 min_replicas_to_write=self.min_acks,
                 min_replicas_timeout=self.ack_timeout,
                 sync_full=self.stats["sync_full"], sync_partial_ok=self.stats["sync_partial_ok"],
                 sync_partial_err=self.stats["sync_partial_err"],
                 noreplicas_replies=self.stats["noreplicas_replies"],
                 slow_read_repairs=self.stats["slow_read_repairs"],
                 loop_stalls=self.stats["loop_stalls"],
                 read_repair_ms_total=self.stats["read_repair_ms_total"],
                 applied_entries=self.stats["applied_entries"],
                 apply_errors=self.stats["apply_errors"])
        src = self.source
        if src is not None:
            d.update(peer_fetches=src.fetches, peer_keys_fetched=src.keys_fetched,
                     peer_bytes_fetched=src.bytes_fetched, peer_fetch_errors=src.errors,
                     peer_background_installs=src.background_installs,
                     peer_keys_from_earlier_fetch=src.keys_cached)
        return d

    def stats_fields(self):
        d = {"repl_" + k: v for k, v in self.info().items()
             if not (k.startswith("slave") and k[5:].isdigit())}
        if self.role == "master":
            d["repl_replicas"] = [
                {"host": s.host, "port": s.listen_port, "state": s.state,
                 "ack_offset": s.ack_offset, "lag_bytes": max(0, self.offset - max(s.ack_offset, 0)),
                 "lag_s": round(time.monotonic() - s.ack_time, 3)} for s in self.sessions]
        return d

    def digest(self):
        """xxh64 over sorted (key, version, value) of every present key."""
        st = self.store
        h = 0
        n = 0
        lost = 0
        acc = []
        for k in sorted(st.keys()):
            try:
                got = st.get_versioned(k)
            except KeyLostError:
                lost += 1
                continue
            if got is None:
                continue
            acc.append(b"%d:%b%d:%d:%b" % (len(k), k, got[0], len(got[1]), got[1]))
            n += 1
            if len(acc) >= 4096:
                h = _native.xxh64(b"".join(acc), h)
                acc = []
        if acc:
            h = _native.xxh64(b"".join(acc), h)
        return {"keys": n, "lost": lost, "digest": f"{h:016x}"}


def _noreplicas(reply, native):
    if not native:
        return NoReplicasError.resp_reply
    body = msgpack.unpackb(reply[4:], raw=False)
    if body[1] != 0:
        return reply
    return pack_frame(_packer(), [body[0], 1, ["NOREPLICAS", "Not enough good replicas to write.", {}]])


# ---------------------------------------------------------------- replica link

class ReplicaLink:
    """The replica's connection to its primary; reconnects until stopped."""

    def __init__(self, repl, host, port):
        self.repl = repl
        self.host = host
        self.port = port
        self.up = False
        self.syncing = False
        self.last_io = time.monotonic()
        self.down_since = time.monotonic()
        self.task = None
        self.writer = None
        self.stopped = False
        self.full_syncs = 0
        self.partial_syncs = 0
        self.reconnects = 0
        self.last_mode = None
        self.packer = _packer()
        self.timeout = repl.server.config.repl_timeout

    def start(self):
        self.task = self.repl.loop.create_task(self.run())

    def stop(self):
        self.stopped = True
        if self.task is not None:
            self.task.cancel()
        self.transport_close()

    def transport_close(self):
        w = self.writer
        if w is not None:
            w.transport.abort()
            return True
        return False

    def heartbeat(self):
        if self.up and self.writer is not None:
            self._ack()
        if self.up and time.monotonic() - self.last_io > self.timeout:
            event("warning", "primary_timeout", host=self.host, port=self.port)
            self.transport_close()

    def _ack(self):
        w = self.writer
        if w is not None and not w.transport.is_closing():
            w.write(pack_frame(self.packer, ["ack", self.repl.applied]))

    async def run(self):
        delay = 0.05
        while not self.stopped:
            try:
                await self._session()
                delay = 0.05
            except asyncio.CancelledError:
                raise
            except (OSError, EOFError, FrameError, _LinkError, asyncio.IncompleteReadError) as e:
                if self.up or self.reconnects == 0 or delay <= 0.05:
                    event("warning", "primary_link_down", host=self.host, port=self.port,
                          error=f"{type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001 - keep retrying
                event("error", "primary_link_failed", host=self.host, port=self.port,
                      error=f"{type(e).__name__}: {e}")
            finally:
                if self.up:
                    self.down_since = time.monotonic()
                    delay = 0.05        # it was working: retry soon
                self.up = False
                self.syncing = False
                if self.writer is not None:
                    self.writer.transport.abort()
                    self.writer = None
                self.repl._refresh_peers()
            if self.stopped:
                break
            self.reconnects += 1
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2) if not self.up else 0.05

    async def _session(self):
        repl = self.repl
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), timeout=5.0)
        self.writer = writer
        parser = FrameParser(max_frame=max(repl.server.config.max_frame, 1 << 30), expect_magic=False)
        out = [MAGIC]
        rid = 1
        if repl.password:
            out.append(pack_frame(self.packer, [rid, "auth", [repl.password.encode()]]))
            rid += 1
        sync_rid = rid
        replid = repl.master_replid
        out.append(pack_frame(self.packer, [sync_rid, "sync",
                                            [replid, repl.applied if replid else -1,
                                             repl.server.port or 0]]))
        writer.write(b"".join(out))
        unpacker = msgpack.Unpacker(raw=False, use_list=True, max_buffer_size=1 << 31)
        mode = None
        while True:
            data = await asyncio.wait_for(reader.read(1 << 18), timeout=self.timeout)
            if not data:
                raise EOFError("primary closed the connection")
            self.last_io = time.monotonic()
            parser.feed(data)
            applied = False
            while True:
                fr = parser.gets()
                if fr is NEED_MORE:
                    break
                if not isinstance(fr, list) or not fr:
                    raise _LinkError(f"unexpected frame {fr!r:.80}")
                tag = fr[0]
                if tag == "W":
                    start, blob = fr[1], fr[2]
                    if mode is None or self.syncing:
                        # writes after the snapshot point before "E": cannot happen
                        raise _LinkError("stream chunk before the sync finished")
                    if start != repl.applied:
                        raise _LinkError(f"stream gap: chunk at {start}, applied {repl.applied}")
                    repl.apply(blob, unpacker)
                    repl.applied = start + len(blob)
                    applied = True
                elif tag == "S":
                    repl.apply(fr[1], unpacker)
                elif tag == "E":
                    repl.applied = fr[1]
                    self.syncing = False
                    applied = True
                    event("info", "full_sync_done", host=self.host, port=self.port,
                          offset=fr[1], keys=len(repl.store))
                elif tag == "PING":
                    pass
                elif type(tag) is int:
                    status, result = fr[1], fr[2]
                    if status != 0:
                        code = result[0] if isinstance(result, list) and result else "ERR"
                        raise _LinkError(f"primary refused: {code} {result!r:.200}")
                    if tag == sync_rid:
                        mode = result["mode"]
                        self.last_mode = mode
                        repl.master_replid = result["replid"]
                        if mode == "full":
                            self.full_syncs += 1
                            self.syncing = True
                            repl._orig["flush"]()
                            repl.ahead.clear()
                            repl.max_version = 0
                            repl.applied = result["offset"]
                        else:
                            self.partial_syncs += 1
                        self.up = True
                        repl._refresh_peers()
                        event("info", "primary_link_up", host=self.host, port=self.port, mode=mode,
                              offset=result["offset"])
                else:
                    raise _LinkError(f"unexpected frame tag {tag!r:.40}")
            if applied:
                self._ack()


class _LinkError(Exception):
    pass


# ---------------------------------------------------------------- commands

def _repl(conn):
    r = conn.server.repl
    if r is None:
        raise CommandError("ERR replication is not running")
    return r


@command("REPLICAOF", 3, ("admin", "noscript"), group="server",
         summary="REPLICAOF host port | REPLICAOF NO ONE")
def cmd_replicaof(conn, args):
    r = _repl(conn)
    host, port = args[1], args[2]
    if host.upper() == b"NO" and port.upper() == b"ONE":
        if r.role != "master":
            r.promote()
        return b"+OK\r\n"
    try:
        p = int(port)
        if not 0 < p < 65536:
            raise ValueError
    except ValueError:
        raise CommandError("ERR Invalid master port") from None
    h = host.decode("latin-1")
    if r.role != "master" and r.master == (h, p):
        return b"+OK Already connected to specified master\r\n"
    r.become_replica(h, p)
    return b"+OK\r\n"


from .commands import COMMANDS as _C, INFO as _I  # noqa: E402

_C[b"SLAVEOF"] = _C[b"slaveof"] = _C[b"REPLICAOF"]
_I["SLAVEOF"] = _I["REPLICAOF"]


@command("WAIT", 3, (), group="generic",
         summary="WAIT numreplicas timeout_ms: wait for replicas to ack this client's writes")
def cmd_wait(conn, args):
    r = _repl(conn)
    try:
        num = int(args[1])
        ms = int(args[2])
    except ValueError:
        raise CommandError("ERR value is not an integer or out of range") from None
    if ms < 0:
        raise CommandError("ERR timeout is negative")
    if r.role != "master":
        raise CommandError("ERR WAIT cannot be used with replica instances.")
    target = r.offset
    n = r.acked(target)
    if n >= num:
        return integer(n)
    out = conn.server.batch_out
    if out is None or getattr(conn, "multi", None) is not None:
        return integer(n)
    deadline = None if ms == 0 else time.monotonic() + ms / 1000.0
    r.waits.append((len(out), num, deadline))
    conn.server.reply_gate = r.gate
    return b""          # placeholder, replaced by the gate


@command("KV.DIGEST", 1, ("readonly",), group="kvstore",
         summary="xxh64 digest over sorted (key, version, value): [keys, lost, digest]")
def cmd_kv_digest(conn, args):
    d = _repl(conn).digest()
    return resp.encode([d["keys"], d["lost"], d["digest"]], getattr(conn, "resp3", False))


@command("KV.REPL", 2, ("admin",), group="kvstore",
         summary="KV.REPL DROP: close replication connections (testing network cuts)")
def cmd_kv_repl(conn, args):
    r = _repl(conn)
    if args[1].upper() == b"DROP":
        return integer(r.drop_links())
    raise CommandError("ERR syntax error")


@op("sync")
def op_sync(conn, args):
    if len(args) != 3:
        raise NativeError("ERR", "sync takes [replid or None, offset, listen_port]")
    replid, offset, port = args
    if replid is not None and type(replid) is not str:
        raise NativeError("TYPE", "replid must be a str or None")
    if type(offset) is not int or type(port) is not int or not 0 <= port < 65536:
        raise NativeError("TYPE", "offset and listen_port must be ints")
    r = conn.server.repl
    if r is None:
        raise NativeError("ERR", "replication is not running")
    return r.handle_sync(conn, replid, offset, port)


@op("replicaof")
def op_replicaof(conn, args):
    r = conn.server.repl
    if r is None:
        raise NativeError("ERR", "replication is not running")
    if args == [] or args == [None]:
        if r.role != "master":
            r.promote()
        return True
    if len(args) != 2 or type(args[0]) is not str or type(args[1]) is not int:
        raise NativeError("TYPE", "replicaof takes [] (promote) or [host, port]")
    r.become_replica(args[0], args[1])
    return True


@op("wait")
def op_wait(conn, args):
    r = conn.server.repl
    if r is None or len(args) != 2 or type(args[0]) is not int or not isinstance(args[1], (int, float)):
        raise NativeError("TYPE", "wait takes [numreplicas, timeout_seconds]")
    if r.role != "master":
        raise NativeError("ERR", "wait cannot be used with replica instances")
    n = r.acked(r.offset)
    out = conn.server.batch_out
    if n >= args[0] or out is None:
        return n
    deadline = None if args[1] <= 0 else time.monotonic() + float(args[1])
    r.waits.append((len(out), args[0], deadline))
    conn.server.reply_gate = r.gate
    return None         # placeholder frame, replaced by the gate


@op("digest")
def op_digest(conn, args):
    r = conn.server.repl
    if r is None:
        raise NativeError("ERR", "replication is not running")
    return r.digest()


@op("role")
def op_role(conn, args):
    r = conn.server.repl
    if r is None:
        raise NativeError("ERR", "replication is not running")
    return r.stats_fields()

