"""Replication: primary/replica groups (DESIGN.md section 7).

Roles
    Every server starts as a primary, or as a replica with ``--replica-of
    HOST:PORT``. ``REPLICAOF NO ONE`` promotes a replica (new replication id,
    data and versions kept; the engine's version counter is already above
    every version it holds, since applying a versioned write raises it).
    ``REPLICAOF host port`` turns any node into a replica of another.

Where writes are seen
    :class:`Replication` subscribes to the server's write path
    (:mod:`.writes`): client writes reach :meth:`Replication.on_writes` after
    each command, keys the Store rebuilt reach :meth:`Replication.on_install`.
    It sets the write path's ``guard`` (a replica refuses client writes with
    ``-READONLY`` / native ``READONLY``; with ``--min-replica-acks`` a write
    is refused with ``-NOREPLICAS`` while too few replicas are online) and
    ``recording`` (on while a primary has a backlog).

    The primary side (stream, backlog, sessions, acks) is
    :mod:`.repl_primary`; the replica side (link, applying the stream) is
    :mod:`.repl_replica`. This module switches roles and owns what both
    share: the rebuild source, the heartbeat and the INFO fields.

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
import contextlib
import threading
import time

from .errors import NoReplicasError, ReplicaReadOnlyError
from .logs import event
from .peers import PeerSource
from .repl_primary import Primary
from .repl_replica import Replica

__all__ = ["Replication", "parse_hostport"]

#: A replica's ack / primary's heartbeat period, seconds.
HEARTBEAT = 1.0

#: A replica that has not acked for this long is skipped by loop-thread fetches.
STALE_ACK = 2.0

#: Seconds after a background range fetch starts when the Store is asked to
#: retry its lost ranges (its first retry is due 20 ms after a "not yet").
RANGE_RETRY_AT = 0.021


def parse_hostport(s):
    s = str(s).strip()
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not HOST:PORT: {s!r}")
    return host.strip("[]"), int(port)


class Replication:
    """Replication state of one server (see the module docstring)."""

    def __init__(self, server):
        self.server = server
        c = server.config
        self.store = server.store
        self.writes = server.writes
        self.password = c.masterauth or c.requirepass or None
        # with --masteruser, connections to other nodes (the replica link,
        # rebuild fetches, slot migration) authenticate as that ACL user
        self.username = (c.masteruser or None) if self.password else None
        self.role = "master"
        self.stats = collections.Counter()
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self.primary = Primary(self)
        self.replica = Replica(self)
        self._hb = None
        self._peers = []
        self._peer_seen = -1e9        # when a replica was last online (monotonic)
        self.source = None
        self.writes.subscribe(self)
        self.configure_writes()

    # -- lifecycle

    def start(self, loop):
        self.source = PeerSource(self.peers, self.password, self.loop_thread,
                                 username=self.username,
                                 before_loop_fetch=self._before_loop_fetch, loop=self.loop,
                                 install=self.store.install, range_version=self._range_version,
                                 on_range_started=self._range_started,
                                 busy=self.server.recovering)
        self._hb_due = time.monotonic() + HEARTBEAT
        self._hb = loop.call_later(HEARTBEAT, self._heartbeat)
        if self.server.config.replica_of:
            host, port = parse_hostport(self.server.config.replica_of)
            self.become_replica(host, port)

    def stop(self):
        if self._hb is not None:
            self._hb.cancel()
        self.replica.stop()
        self.primary.cancel_held()
        if self.source is not None:
            self.source.close()
        self.store.rebuild_source = None

    # -- the write path

    def configure_writes(self):
        """Tell the write path what client writes need now."""
        w = self.writes
        master = self.role == "master"
        cluster = getattr(self.server, "cluster", None)
        w.guard = self._guard if (not master or self.primary.min_acks or cluster) else None
        # a cluster primary without --min-replica-acks: the guard is only the
        # fencing check, which the C RESP path may make per batch instead
        w.fast_guard = cluster.can_ack if (master and cluster and not self.primary.min_acks) else None
        w.recording = master and self.primary.backlog is not None
        ps = self.primary.persist
        w.intent = ps if w.recording and ps is not None and ps.active else None

    def _guard(self):
        if self.role != "master":
            raise ReplicaReadOnlyError("You can't write against a read only replica.")
        cluster = getattr(self.server, "cluster", None)
        if cluster is not None:
            cluster.check_write()       # a fenced primary refuses before writing
        p = self.primary
        if p.min_acks and p.online_count() < p.min_acks:
            raise NoReplicasError("Not enough good replicas to write.")

    def on_writes(self, entries, reply_index):
        if self.role == "master":
            self.primary.on_writes(entries, reply_index)

    def on_install(self, key, value, version, status):
        if status != "installed":
            return
        if self.role == "master":
            self.primary.on_install(key, value, version)
        else:
            self.replica.on_install(key, version)

    def on_install_range(self, key, value, version, expire_at_ms, status):
        """A key a lost index range's rebuild installed: replicas get it
        with its expiry (they may lack the key: a full sync skips lost ranges)."""
        if status != "installed":
            return
        if self.role == "master":
            self.primary.on_install(key, value, version, expire_at_ms or 0)
        else:
            self.replica.on_install(key, version)

    @contextlib.contextmanager
    def read_repair(self, key, version):
        # Read-repair blocks this (loop) thread while a worker asks the
        # peers: send the writes of this iteration first, or a replica could
        # never reach the version it is asked for.
        p = self.primary
        if p.pending and threading.get_ident() == self.loop_thread:
            p.flush_pending()
        t0 = time.perf_counter()
        ok = False
        try:
            yield
            ok = True
        finally:
            dt = time.perf_counter() - t0
            self.stats["read_repair_ms_total"] += int(dt * 1000)
            if dt > 0.05:
                self.stats["slow_read_repairs"] += 1
                event("warning", "slow_read_repair", key=bytes(key[:64]).decode("latin-1"),
                      version=version, duration_ms=round(dt * 1e3, 1), repaired=ok)

    @property
    def offset(self):
        return self.primary.offset if self.role == "master" else self.replica.applied

    def holds(self, conn):
        """Are ``conn``'s replies held for replica acks?"""
        return self.primary.holds(conn)

    def _heartbeat(self):
        late = time.monotonic() - self._hb_due
        if late > 0.25:
            self.stats["loop_stalls"] += 1
            event("warning", "loop_stall", late_ms=round(late * 1e3, 1))
        self.primary.heartbeat()
        if self.replica.link is not None:
            self.replica.link.heartbeat()
        self.refresh_peers()
        self._hb_due = time.monotonic() + HEARTBEAT
        self._hb = self.loop.call_later(HEARTBEAT, self._heartbeat)

    # -- roles

    def handle_sync(self, conn, replid, offset, listen_port):
        if self.role != "master":
            raise ReplicaReadOnlyError("this node is a replica; chained replication is not supported")
        return self.primary.handle_sync(conn, replid, offset, listen_port)

    def become_replica(self, host, port):
        self.replica.stop()
        self.primary.drop_sessions("node became a replica")
        if self.primary.persist is not None:
            self.primary.persist.forget()      # this history no longer goes on here
        self.role = "slave"
        self.replica.start(host, port)
        self.configure_writes()
        self.refresh_peers()
        event("warning", "replicaof", host=host, port=port)

    def promote(self):
        was = self.role
        self.replica.forget()
        self.role = "master"
        self.primary.reset()
        self.configure_writes()
        self.refresh_peers()
        event("warning", "promoted", previous_role=was, replid=self.primary.replid,
              version=self.store.version)

    def drop_links(self):
        """Close every replication connection (testing network cuts)."""
        n = self.primary.drop_sessions("replication link dropped by command")
        link = self.replica.link
        if link is not None and link.transport_close():
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
        link, master = self.replica.link, self.replica.master
        if master is None:
            return []
        healthy = link is not None and link.up and now - link.last_io < STALE_ACK
        return [(master[0], master[1], healthy)]

    def _range_version(self, min_version):
        """The ``min_version`` a range request to our peers carries: ours on
        a primary (its replicas must have applied our writes up to it); on
        a replica, the primary's version whose writes we have applied (the
        primary has applied everything we have; our counter is not its
        numbering)."""
        if self.role == "master":
            return min_version
        return self.replica.applied_version

    def _range_started(self):
        # The Store retries a range the source could not answer yet after
        # 20 ms (then doubling): be there when it is due, rather than at the
        # next maintenance tick, so a loopback answer is installed at once.
        self.loop.call_later(RANGE_RETRY_AT, self._retry_ranges)

    def _retry_ranges(self):
        if self.server.recovering():      # installs wait until the recovery thread is done
            self.loop.call_later(RANGE_RETRY_AT, self._retry_ranges)
            return
        try:
            self.store.recover()
        except Exception as e:  # noqa: BLE001 - the maintenance tick retries
            event("error", "range_retry_failed", error=f"{type(e).__name__}: {e}")

    def _before_loop_fetch(self):
        if self.primary.pending:
            self.primary.flush_pending()

    def refresh_peers(self):
        if self.role == "master":
            self._peers = [s for s in self.primary.sessions if s.state == "online" and s.listen_port
                           and not s.closed]
            has = bool(self._peers)
            now = time.monotonic()
            if has:
                self._peer_seen = now
            elif now - self._peer_seen < self.store.rebuild_deadline:
                # A replica left moments ago (a reconnect, a stopped process):
                # keep the source while lost index ranges wait, so they are
                # retried until the rebuild deadline instead of given up now.
                has = bool(self.store.lost_ranges())
        else:
            self._peers = []
            has = self.replica.master is not None
        want = self.source if has else None
        if self.store.rebuild_source is not want:
            self.store.rebuild_source = want

    # -- introspection

    def info(self):
        p = self.primary
        d = {"role": self.role}
        if self.role == "master":
            d["connected_slaves"] = len(p.sessions)
            d.update(p.info_lines())
        else:
            d.update(self.replica.info())
        bl = p.backlog
        d.update(master_replid=p.replid if self.role == "master" else (self.replica.master_replid or ""),
                 master_repl_offset=self.offset,
                 repl_backlog_active=int(bl is not None),
                 repl_backlog_size=p.backlog_size,
                 repl_backlog_first_byte_offset=bl.first if bl else 0,
                 repl_backlog_histlen=bl.bytes if bl else 0,
                 min_replicas_to_write=p.min_acks,
                 min_replicas_timeout=p.ack_timeout,
                 sync_full=self.stats["sync_full"], sync_partial_ok=self.stats["sync_partial_ok"],
                 sync_partial_err=self.stats["sync_partial_err"],
                 sync_full_lost_ranges=self.stats["sync_full_lost_ranges"],
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
                     peer_auth_failures=src.auth_failures,
                     peer_background_installs=src.background_installs,
                     peer_keys_from_earlier_fetch=src.keys_cached,
                     peer_range_fetches=src.range_fetches,
                     peer_range_keys_fetched=src.range_keys_fetched,
                     peer_range_behind=src.range_behind)
        return d

    def stats_fields(self):
        d = {"repl_" + k: v for k, v in self.info().items()
             if not (k.startswith("slave") and k[5:].isdigit())}
        if self.role == "master":
            d["repl_replicas"] = [
                {"host": s.host, "port": s.listen_port, "state": s.state,
                 "ack_offset": s.ack_offset, "lag_bytes": max(0, self.offset - max(s.ack_offset, 0)),
                 "lag_s": round(time.monotonic() - s.ack_time, 3)} for s in self.primary.sessions]
        return d
