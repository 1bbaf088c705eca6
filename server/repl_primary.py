"""Replication, primary side: the stream, the backlog, replica sessions, acks.

Stream and offsets
    Each write is one msgpack entry: ``["p", key, version, value, exp]``
    (exp: 0 none, > 0 absolute ms, -1 keep), ``["d", key, version]``,
    ``["e", key, exp_ms, version]`` (0 removes the expiry; the change took
    that version), ``["f"]`` (flushall). The
    entries come from the server's write path (:mod:`.writes`) after each
    command, and from keys the Store rebuilt. The replication offset counts
    entry bytes. Entries written during one loop iteration are flushed as one
    chunk: appended to the backlog (bounded by ``repl_backlog_size`` bytes;
    created when the first replica syncs, as in Redis) and sent to every
    online replica as ``["W", start_offset, blob]``.

Sync (native op ``sync [replid, offset, listen_port]``; PROTOCOL.md)
    Partial when ``replid`` matches and the backlog still holds ``offset``,
    else full: the snapshot of every key as ``["S", blob]`` frames (keys
    LOST here as ``["l", key, version]`` markers), ``["E", S, version]``
    (version: the store's version at S), then the writes after S (queued for
    that replica meanwhile; every entry is a complete overwrite, so the
    replica ends equal). A LOST index hash range, whose keys cannot be
    named here, goes after the keys as ``["L", lo, hi, version]`` (hash
    range ``[lo, hi]``, hi inclusive, lost at ``version``). The connection
    then becomes a :class:`ReplicaSession`: acks in, stream and ``["PING"]``
    out.

Synchronous writes
    ``--min-replica-acks N``: a batch of client commands that wrote holds its
    replies until N replicas acked the batch's offset; after
    ``--min-replica-timeout`` seconds each write's reply is replaced by
    ``-NOREPLICAS``. ``WAIT numreplicas timeout_ms`` is the per-call form.
"""

import asyncio
import collections
import os
import time

import msgpack

from kvstore.errors import KeyLostError
from kvstore.wire import NEED_MORE, FrameError, pack_frame

from .conn import BaseConnection
from .framing import FrameParser
from .logs import event
from .repl_persist import ArenaReplState
from .resp import integer
from .writes import crash_point

__all__ = ["Backlog", "Primary", "ReplicaSession"]

#: Snapshot frames hold about this many bytes of entries.
SNAPSHOT_CHUNK = 1 << 20
#: Above this much queued output the snapshot writer waits for the socket.
SNAPSHOT_HIGH_WATER = 8 << 20

_NOREPLICAS_RESP = b"-NOREPLICAS Not enough good replicas to write.\r\n"


def new_replid():
    return os.urandom(20).hex()


def packer():
    return msgpack.Packer(use_bin_type=True)


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


class ReplicaSession(BaseConnection):
    """The primary's end of a replica's connection after ``sync``."""

    kind = "replica"

    def __init__(self, primary, prev, listen_port):
        super().__init__(primary.server, prev)
        self.primary = primary
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
        self.packer = packer()

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
                    self.primary.on_ack()
        except FrameError as e:
            event("warning", "replica_protocol_error", addr=self.addr, error=str(e))
            self.drop("replica protocol error")

    def connection_lost(self, exc):
        super().connection_lost(exc)
        self.primary.session_lost(self)

    def send(self, frame):
        if self.closed:
            return
        self.transport.write(pack_frame(self.packer, frame))
        limit = self.primary.output_limit
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
            limit = self.primary.output_limit
            if limit and self.queued_bytes > limit:
                self.drop("replica output buffer limit during full sync")

    def line(self, primary_offset):
        lag = round(time.monotonic() - self.ack_time)
        state = "online" if self.state == "online" else "wait_bgsave"
        return (f"ip={self.host},port={self.listen_port},state={state},"
                f"offset={max(self.ack_offset, 0)},lag={lag},"
                f"lag_bytes={max(0, primary_offset - max(self.ack_offset, 0))}")


class _Held:
    __slots__ = ("conn", "out", "marks", "waits", "target", "deadline", "handle")


class Primary:
    """The primary side of one server's replication (module docstring).

    ``repl`` is the :class:`.replication.Replication` that owns it: it tells
    whether this node is a primary now and keeps the shared counters.
    """

    def __init__(self, repl):
        self.repl = repl
        self.server = repl.server
        c = repl.server.config
        self.store = repl.store
        self.backlog_size = int(c.repl_backlog_size)
        self.output_limit = max(int(c.repl_backlog_size), 64 << 20)
        self.min_acks = int(c.min_replica_acks)
        self.ack_timeout = float(c.min_replica_timeout)
        self.stats = repl.stats
        self.loop = repl.loop
        self.replid = new_replid()
        self.backlog = None
        #: The replication position kept in the arena for a crash restart
        #: (:mod:`.repl_persist`); None for a store without an arena.
        self.persist = ArenaReplState(self.store) if hasattr(self.store, "arena") else None
        self._fed_version = 0
        self.pending = []
        self.pending_bytes = 0
        self._flush_scheduled = False
        self.sessions = []
        self.pack = packer().pack
        self.packer = packer()
        self.held = {}                 # conn -> [_Held]: client batches waiting for acks
        self.marks = []
        self.waits = []

    def reset(self):
        """A new history (promotion): new id, no backlog."""
        self.replid = new_replid()
        self.backlog = None
        self.pending, self.pending_bytes = [], 0
        if self.persist is not None:
            self.persist.forget()

    def start_backlog(self, offset, tail=None):
        """An empty backlog ending at ``offset`` (a restart goes on with the
        history), holding ``tail``, the chunk that ended there, when given."""
        if tail:
            self.backlog = Backlog(self.backlog_size, offset=offset - len(tail))
            self.backlog.append(tail)
        else:
            self.backlog = Backlog(self.backlog_size, offset=offset)

    def keep_position(self):
        """Keep this history's position in the arena from now on
        (:mod:`.repl_persist`): the snapshot or the stream holds every write
        the Store made so far."""
        if self.persist is not None and self.backlog is not None:
            self._fed_version = self.store.version
            self.persist.start(self.replid, self.backlog.end, self._fed_version)

    def online_count(self):
        return sum(1 for s in self.sessions if s.state == "online" and not s.closed)

    # -- the stream

    def on_writes(self, entries, reply_index):
        """Entries of one client command (from the write path)."""
        pack = self.pack
        self.feed(b"".join([pack(e) for e in entries]), reply_index)

    def on_install(self, key, value, version, expire_at_ms=-1):
        # A rebuild is not a client write, but a replica that synced while
        # the key was lost here must still get it.
        if self.backlog is not None:
            self.feed(self.pack(("p", key, version, value, expire_at_ms)))

    def feed(self, blob, reply_index=None):
        self.pending.append(blob)
        self.pending_bytes += len(blob)
        if self.persist is not None:
            # every write the Store made so far is in the stream after this
            self._fed_version = self.store.version
            self.persist.fed()
        if reply_index is not None and self.min_acks:
            self.marks.append(reply_index)
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
        if self.persist is not None:
            self.persist.commit(self.backlog.end, self._fed_version, blob)
            crash_point("stream:send")
        for s in self.sessions:
            s.chunk(start, blob)

    @property
    def offset(self):
        if self.backlog is None:
            return 0
        return self.backlog.end + self.pending_bytes

    def heartbeat(self):
        for s in list(self.sessions):
            if s.state == "online":
                s.send(["PING"])

    # -- sessions

    def handle_sync(self, conn, replid, offset, listen_port):
        if self.backlog is None:
            self.backlog = Backlog(self.backlog_size)
            self.keep_position()
            self.repl.configure_writes()
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
        at_version = self.store.version
        event("info", "replica_sync", addr=conn.addr, mode=mode, offset=at,
              requested=offset if type(offset) is int else -1, listen_port=sess.listen_port)
        self.loop.call_soon(self._takeover, conn, sess, mode, at, at_version)
        return {"mode": mode, "replid": self.replid, "offset": at}

    def _takeover(self, conn, sess, mode, at, at_version=0):
        if conn.closed or conn.transport is None or conn.transport.is_closing():
            return
        self.server.replace(conn, sess)
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
            self.repl.refresh_peers()
        else:
            sess.queue = list(since)
            sess.queued_bytes = sum(len(b) for _s, b in since)
            self.loop.create_task(self._full_sync(sess, at, at_version))

    async def _full_sync(self, sess, at, at_version=0):
        t0 = time.perf_counter()
        st = self.store
        keys = list(st.keys())
        lost_list = st.lost_keys()
        lost = {k for k, _v, _s in lost_list}
        get_versioned = st.get_versioned
        expire_at = st.expire_at
        pack = self.pack
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
        # keys LOST here (not rebuilt yet) go as markers, so the replica
        # reports them lost, never absent, and rebuilds them like its own
        for k, v, _state in lost_list:
            e = pack(("l", k, v))
            buf.append(e)
            size += len(e)
        # LOST index ranges (their keys cannot be named here, including one
        # lost while the snapshot ran) go as range markers after the keys:
        # the replica flags its index pages covering each one LOST, keeping
        # the keys it was just sent, and rebuilds the range from its peers
        lost_ranges = st.lost_ranges()
        for lo, hi, v in lost_ranges:
            e = pack(("L", lo, hi, v))
            buf.append(e)
            size += len(e)
        if buf:
            sess.send(["S", b"".join(buf)])
            nbytes += size
        sess.send(["E", at, at_version])
        for start, blob in sess.queue:
            sess.send(["W", start, blob])
        sess.queue = []
        sess.queued_bytes = 0
        sess.state = "online"
        self.repl.refresh_peers()
        if lost_ranges:
            self.stats["sync_full_lost_ranges"] += len(lost_ranges)
        event("info", "replica_full_sync_done", addr=sess.addr, keys=sent, lost=len(lost_list),
              lost_ranges=len(lost_ranges),
              bytes=nbytes,
              duration_ms=round((time.perf_counter() - t0) * 1e3, 1))

    def session_lost(self, sess):
        if sess in self.sessions:
            self.sessions.remove(sess)
            event("warning", "replica_disconnected", addr=sess.addr, listen_port=sess.listen_port,
                  ack_offset=sess.ack_offset)
            self.repl.refresh_peers()
            self.on_ack()

    def drop_sessions(self, reason):
        n = 0
        for s in list(self.sessions):
            s.drop(reason)
            n += 1
        return n

    # -- waiting for acks (min-replica-acks, WAIT)

    def acked(self, target):
        return sum(1 for s in self.sessions if s.ack_offset >= target and not s.closed)

    def add_wait(self, reply_index, num, deadline):
        """Hold the running batch's replies until ``num`` replicas acked (WAIT)."""
        self.waits.append((reply_index, num, deadline))
        self.server.reply_gate = self.gate

    def holds(self, conn):
        return conn in self.held

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

    def cancel_held(self):
        for h in [h for lst in self.held.values() for h in lst]:
            if h.handle is not None:
                h.handle.cancel()

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
                    out[idx] = self._int_reply(native, out[idx], n)
            if late and h.marks and n < self.min_acks:
                self.stats["noreplicas_replies"] += 1
                for idx in h.marks:
                    if idx < len(out):
                        out[idx] = self._noreplicas(out[idx], native)
            elif h.marks:
                refusal = self._ack_refusal()
                if refusal is not None:     # cluster: fenced while the acks were awaited
                    for idx in h.marks:
                        if idx < len(out):
                            out[idx] = self._refuse(out[idx], native, refusal)
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

    def _int_reply(self, native, placeholder, n):
        if native:
            body = msgpack.unpackb(placeholder[4:], raw=False)
            return pack_frame(self.packer, [body[0], 0, n])
        return integer(n)

    def _ack_refusal(self):
        cluster = getattr(self.server, "cluster", None)
        return cluster.ack_refusal() if cluster is not None else None

    def _refuse(self, reply, native, refusal):
        resp_line, triple = refusal
        if not native:
            return resp_line
        body = msgpack.unpackb(reply[4:], raw=False)
        if body[1] != 0:
            return reply
        return pack_frame(self.packer, [body[0], 1, triple])

    def _noreplicas(self, reply, native):
        if not native:
            return _NOREPLICAS_RESP
        body = msgpack.unpackb(reply[4:], raw=False)
        if body[1] != 0:
            return reply
        return pack_frame(self.packer,
                          [body[0], 1, ["NOREPLICAS", "Not enough good replicas to write.", {}]])

    def info_lines(self):
        off = self.offset
        return {f"slave{i}": s.line(off) for i, s in enumerate(self.sessions)}
