"""Replication, replica side: the link to the primary and applying its stream.

:class:`ReplicaLink` connects to the primary, sends ``sync [replid, offset,
listen_port]`` (partial resync when it has a replication id, full otherwise),
applies the snapshot (``S``/``E`` frames; a key the primary has LOST comes as
an ``["l", key, version]`` marker and is entered LOST with
``Store.mark_lost``, so it reads as lost, never absent, until rebuilt) and the stream (``W`` frames), acks
what it applied, and reconnects with backoff until stopped. A hash range
whose index the primary has LOST comes after the snapshot's keys as
``["L", lo, hi, version]`` and is entered with ``Store.mark_range_lost``: its
keys read as lost, never absent, until the range is rebuilt from the peers.
Entry types this side does not know are counted as applied and skipped.
Stream entries
are applied straight to the Store (``put_versioned`` keeps the primary's
versions and expiries); they do not pass through the server's write path,
which refuses client writes on a replica.
"""

import asyncio
import time

import msgpack

from kvstore.errors import KeyLostError
from kvstore.wire import MAGIC, NEED_MORE, FrameError, pack_frame

from .framing import FrameParser
from .logs import event

__all__ = ["Replica", "ReplicaLink"]


class Replica:
    """The replica side of one server's replication: what was applied."""

    def __init__(self, repl):
        self.repl = repl
        self.store = repl.store
        self.stats = repl.stats
        self.master = None             # (host, port)
        self.link = None               # ReplicaLink
        self.master_replid = None
        self.applied = 0               # primary offset applied
        self.max_version = 0           # highest version applied from the stream
        #: Every write and delete the primary made up to this version (its
        #: numbering) is applied here: the version the snapshot was taken at
        #: (``["E", offset, version]``), raised by each stream entry with a
        #: version (``p``, ``d``). A range request at ``min_version`` is
        #: answered only once this reaches it (PROTOCOL.md, ``fetch_range``).
        self.applied_version = 0
        self.ahead = {}                # key -> version rebuilt ahead of the stream

    def start(self, host, port):
        self.stop()
        self.master = (host, port)
        self.link = ReplicaLink(self, host, port)
        self.link.start()

    def stop(self):
        if self.link is not None:
            self.link.stop()
            self.link = None

    def forget(self):
        """After a promotion: no primary, nothing applied."""
        self.stop()
        self.master = None
        self.applied = 0
        self.applied_version = 0
        self.ahead.clear()

    def caught_up(self, min_version):
        """Has this replica applied every write and delete of its primary up
        to ``min_version``? (Not while a full sync runs: the snapshot is not
        a point in the primary's history until its ``E`` frame.)"""
        link = self.link
        return (link is not None and link.up and not link.syncing
                and self.applied_version >= min_version)

    def on_install(self, key, version):
        if version > self.max_version:
            # fetched from the primary ahead of our stream: older writes of
            # this key still in the stream must not go back in time
            self.ahead[bytes(key)] = version

    def full_sync_started(self, offset):
        self.store.flush()
        self.ahead.clear()
        self.max_version = 0
        self.applied_version = 0
        self.applied = offset

    def apply(self, blob, unpacker, stream=True):
        """Apply entries. ``stream``: they are the primary's stream (``W``),
        in its version order, so their versions advance ``applied_version``;
        snapshot entries (``S``) do not."""
        st = self.store
        pv, dl, ex, fl = st.put_versioned, st.delete, st.expire_at_ms, st.flush
        ml = getattr(st, "mark_lost", None)
        mr = getattr(st, "mark_range_lost", None)
        unpacker.feed(blob)
        n = 0
        ahead = self.ahead
        maxv = self.max_version
        appv = self.applied_version
        watchers = self.repl.writes.watchers     # WATCH sees replicated writes too
        for e in unpacker:
            t = e[0]
            if watchers:
                if t in ("f", "L"):
                    self.repl.writes.touch_all()
                elif len(e) > 1:
                    self.repl.writes.touch(e[1])
            if stream and t in ("p", "d") and len(e) > 2 and e[2] > appv:
                appv = e[2]
            elif stream and t == "e" and len(e) > 3 and e[3] > appv:
                appv = e[3]
            try:
                if ahead and t not in ("f", "L") and e[1] in ahead:
                    # a rebuild installed a newer version: skip the older history
                    ev = e[2] if t == "p" else e[3] if t == "e" and len(e) > 3 else -1
                    if ev < ahead[e[1]]:
                        continue
                    del ahead[e[1]]
                if t == "p":
                    pv(e[1], e[3], e[2], e[4])
                    if e[2] > maxv:
                        maxv = e[2]
                elif t == "d":
                    dl(e[1])
                elif t == "e":
                    try:
                        ex(e[1], e[2], e[3] if len(e) > 3 else 0)
                    except KeyLostError:
                        # its index range is lost here: the range's rebuild
                        # from the primary (caught up past this entry) has it
                        pass
                    if len(e) > 3 and e[3] > maxv:
                        maxv = e[3]
                elif t == "f":
                    fl()
                    ahead.clear()
                elif t == "l" and ml is not None:
                    # LOST on the primary: LOST here too, rebuilt from peers
                    ml(e[1], e[2])
                elif t == "L" and mr is not None:
                    # an index range LOST on the primary (its keys unnamed):
                    # this store's pages covering it read LOST until rebuilt
                    mr(e[1], e[2], e[3])
                n += 1
            except Exception as exc:  # noqa: BLE001 - keep the link; count it
                self.stats["apply_errors"] += 1
                if self.stats["apply_errors"] <= 10:
                    event("error", "replica_apply_failed", entry=t,
                          error=f"{type(exc).__name__}: {exc}")
        self.max_version = maxv
        if appv > self.applied_version:
            self.applied_version = appv
        self.stats["applied_entries"] += n

    def info(self):
        link = self.link
        now = time.monotonic()
        d = dict(master_host=self.master[0], master_port=self.master[1],
                 master_link_status="up" if link and link.up else "down",
                 master_last_io_seconds_ago=int(now - link.last_io) if link and link.up else -1,
                 master_sync_in_progress=int(bool(link and link.syncing)),
                 slave_repl_offset=self.applied, slave_read_only=1,
                 master_link_down_since_seconds=(
                     int(now - link.down_since) if link and not link.up else 0),
                 connected_slaves=0)
        if link is not None:
            d.update(kv_last_sync=link.last_mode or "none", kv_full_syncs=link.full_syncs,
                     kv_partial_syncs=link.partial_syncs, kv_reconnects=link.reconnects,
                     kv_auth_failures=link.auth_failures)
        return d


class ReplicaLink:
    """The replica's connection to its primary; reconnects until stopped."""

    def __init__(self, replica, host, port):
        self.replica = replica
        self.repl = replica.repl
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
        self.auth_failures = 0
        self._auth_logged = False     # refusal logged; reset once the link is up
        self.last_mode = None
        self.packer = msgpack.Packer(use_bin_type=True)
        self.timeout = self.repl.server.config.repl_timeout

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
            w.write(pack_frame(self.packer, ["ack", self.replica.applied]))

    async def run(self):
        delay = 0.05
        while not self.stopped:
            try:
                await self._session()
                delay = 0.05
            except asyncio.CancelledError:
                raise
            except _AuthRefused as e:
                # wrong credentials or a user without the replication
                # permissions: logged once (until the link comes up), retried
                # at the slowest pace so a fixed ACL is picked up
                self.auth_failures += 1
                if not self._auth_logged:
                    self._auth_logged = True
                    repl = self.repl
                    event("error", "primary_auth_refused", host=self.host, port=self.port,
                          user=repl.username or "default", error=str(e),
                          hint="the primary refused this replica's credentials or the user "
                               "lacks the replication commands (--masteruser/--masterauth; "
                               "the user needs +sync +kv.fetch +ping, see docs/DESIGN.md)")
                delay = 1.0
            except (OSError, EOFError, FrameError, _LinkError, asyncio.IncompleteReadError) as e:
                if self.up or self.reconnects == 0 or delay <= 0.05:
                    event("warning", "primary_link_down", host=self.host, port=self.port,
                          error=f"{type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001 - keep retrying
                event("error", "primary_link_failed", host=self.host, port=self.port,
                      error=f"{type(e).__name__}: {e}")
            finally:
                if self.syncing:
                    # cut off inside a full sync: the snapshot is partial,
                    # so the next sync must be a full one too
                    self.replica.master_replid = None
                if self.up:
                    self.down_since = time.monotonic()
                    delay = 0.05        # it was working: retry soon
                self.up = False
                self.syncing = False
                if self.writer is not None:
                    self.writer.transport.abort()
                    self.writer = None
                self.repl.refresh_peers()
            if self.stopped:
                break
            self.reconnects += 1
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2) if not self.up else 0.05

    async def _session(self):
        repl = self.repl
        rep = self.replica
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), timeout=5.0)
        self.writer = writer
        parser = FrameParser(max_frame=max(repl.server.config.max_frame, 1 << 30), expect_magic=False)
        out = [MAGIC]
        rid = 1
        auth_rid = None
        if repl.password:
            cred = [repl.password.encode()]
            if repl.username:
                cred.insert(0, repl.username)      # AUTH <masteruser> <masterauth>
            out.append(pack_frame(self.packer, [rid, "auth", cred]))
            auth_rid = rid
            rid += 1
        sync_rid = rid
        replid = rep.master_replid
        out.append(pack_frame(self.packer, [sync_rid, "sync",
                                            [replid, rep.applied if replid else -1,
                                             repl.server.port or 0]]))
        writer.write(b"".join(out))
        unpacker = msgpack.Unpacker(raw=False, use_list=True, max_buffer_size=1 << 31)
        mode = None
        while True:
            data = await asyncio.wait_for(reader.read(1 << 18), timeout=self.timeout)
            if not data:
                raise EOFError("primary closed the connection")
            self.last_io = time.monotonic()
            while repl.server.recovering():
                await asyncio.sleep(0.002)    # applying could touch the memory being recovered
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
                    if start != rep.applied:
                        raise _LinkError(f"stream gap: chunk at {start}, applied {rep.applied}")
                    rep.apply(blob, unpacker)
                    rep.applied = start + len(blob)
                    applied = True
                elif tag == "S":
                    rep.apply(fr[1], unpacker, stream=False)
                elif tag == "E":
                    rep.applied = fr[1]
                    if len(fr) > 2 and type(fr[2]) is int:
                        # the primary's version at the snapshot point
                        rep.applied_version = max(rep.applied_version, fr[2])
                    self.syncing = False
                    applied = True
                    event("info", "full_sync_done", host=self.host, port=self.port,
                          offset=fr[1], keys=len(rep.store))
                elif tag == "PING":
                    pass
                elif type(tag) is int:
                    status, result = fr[1], fr[2]
                    if status != 0:
                        code = result[0] if isinstance(result, list) and result else "ERR"
                        if tag == auth_rid or code in _AUTH_CODES:
                            raise _AuthRefused(f"{code} {result!r:.200}")
                        raise _LinkError(f"primary refused: {code} {result!r:.200}")
                    if tag == sync_rid:
                        mode = result["mode"]
                        self.last_mode = mode
                        rep.master_replid = result["replid"]
                        if mode == "full":
                            self.full_syncs += 1
                            self.syncing = True
                            rep.full_sync_started(result["offset"])
                        else:
                            self.partial_syncs += 1
                        self.up = True
                        self._auth_logged = False
                        repl.refresh_peers()
                        event("info", "primary_link_up", host=self.host, port=self.port, mode=mode,
                              offset=result["offset"])
                else:
                    raise _LinkError(f"unexpected frame tag {tag!r:.40}")
            if applied:
                self._ack()


class _LinkError(Exception):
    pass


class _AuthRefused(_LinkError):
    """The primary refused the link's AUTH, or the user may not sync."""


#: Error codes of a refused AUTH or a user without the sync permission.
_AUTH_CODES = ("NOAUTH", "WRONGPASS", "NOPERM")
