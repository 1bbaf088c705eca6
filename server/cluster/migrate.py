"""Online resharding: moving a slot's keys from its source shard to its target.

The slot map marks a slot ``migrations[slot] = {"from", "to"}`` (controller
request ``migrate``). From that epoch on the source shard's primary is
*migrating* the slot and the target's primary is *importing* it, as in Redis
Cluster; the source still owns it.

Source primary (:class:`SlotMover`, one task while the map names migrating
slots and this node is their shard's live primary)
    * lists the keys of the migrating slots (present and LOST ones) and moves
      them in batches of ``batch`` keys to the target's primary with the
      native op ``migrate_put [[key, version, value, expire_at_ms], ...]``.
      Each value is read with ``get_versioned``: a key lost to a memory error
      is read-repaired from the shard's replica first, exactly as a client
      read would be. A key still lost (no replica has it yet) is not sent:
      it stays here, keeps its slot from finishing, and is tried again on the
      next round -- it is never moved as garbage and never dropped;
    * after the target acknowledged a batch (with ``--min-replica-acks`` the
      target holds its reply until its replicas have the installs), each key
      is checked again, synchronously: still at the version sent -> deleted
      here (replicated to the source's replicas as a normal delete); changed
      meanwhile -> sent again next round; deleted or expired here meanwhile
      -> the delete is forwarded (``migrate_del [[key, version], ...]``,
      which removes the target's copy only if it is not newer);
    * keys in flight (sent, not yet settled) and deletes not yet forwarded
      are *held*: routing serves them here, never with ASK, so the source
      stays the one place that decides them until they are settled;
    * when a round finds no key left in some migrating slots it asks the
      controller to finish them (request ``migrate-done`` with those slots;
      the controller flips their owner to the target, epoch + 1, and clients
      get MOVED from then on).

Routing during the move (node.py): the source serves keys it still has (or
holds), and answers ``-ASK slot target`` for the others, new keys included;
the target serves a migrating slot's keys only after ``ASKING``.

Target primary (``migrate_put`` / ``migrate_del``, native only)
    Accepts keys of a slot it is importing and only while it is a live,
    unfenced primary. A key already here at the same or a newer version is
    skipped (the op is idempotent; a key written here through ASK is never
    overwritten by the older copy). A key LOST here is answered "retry" and
    stays at the source. Installs and forwarded deletes are replicated to the
    target's replicas like any write.

Failover in the middle (see docs/DESIGN.md, "Resharding")
    * of the source primary: its replica is promoted with the migration
      still in the map and runs the mover from where its data is: keys
      whose local delete had not reached it are sent again, and the target
      skips them (same version);
    * of the target primary: batches in flight fail, the mover reconnects
      to the new target primary named by the map and sends again. The
      source deletes a batch only after the target's acknowledgement *and*,
      when the target has a replica online, after that replica acknowledged
      the installs (the native ``wait [1, timeout]`` on the same
      connection), so the replica that takes over has every key the source
      let go of.
    Known limit: a key that was moved, then deleted on the target through
    ASK, can come back if the source primary fails before its local delete
    of that key replicated (the target keeps no tombstone of it).
"""

import asyncio
import time

from kvstore.errors import KeyLostError

from ..errors import CommandError
from ..logs import event
from . import slots as _slots

__all__ = ["SlotMover", "native_migrate_put", "native_migrate_del"]


def _err(code, msg):
    return CommandError(f"{code} {msg}", code, msg)


def _cluster(conn):
    c = conn.server.cluster
    if c is None:
        raise _err("NOCLUSTER", "cluster mode is not enabled")
    return c


def _importing_check(conn, slot):
    v = _cluster(conn).view
    if v is None or v.role != "primary":
        raise _err("MIGRATE", "this node is not a primary")
    if slot not in v.importing:
        raise _err("MIGRATE", f"slot {slot} is not being imported here")


def _key(k):
    if isinstance(k, str):
        return k.encode()
    if isinstance(k, (bytes, bytearray)):
        return bytes(k)
    raise _err("TYPE", "migrate keys are str or bin")


def native_migrate_put(conn, args):
    """``[[[key, version, value, expire_at_ms], ...]]`` -> ``{"installed", "skipped", "retry"}``."""
    _cluster(conn)
    if len(args) != 1 or type(args[0]) is not list:
        raise _err("TYPE", "migrate_put takes [[[key, version, value, expire_at_ms], ...]]")
    items = []
    for it in args[0]:
        if (type(it) is not list or len(it) != 4 or type(it[1]) is not int or it[1] <= 0
                or not isinstance(it[2], (bytes, str)) or type(it[3]) is not int):
            raise _err("TYPE", "migrate_put items are [key, version, value, expire_at_ms]")
        k = _key(it[0])
        _importing_check(conn, _slots.key_slot(k))
        items.append((k, it[1], it[2].encode() if isinstance(it[2], str) else it[2], it[3]))
    store = conn.server.store
    writes = conn.server.writes
    now = time.time_ns() // 1_000_000
    installed = skipped = 0
    retry = []
    for k, ver, val, exp in items:
        try:
            cur = store.get_versioned(k)
        except KeyLostError:
            retry.append(k)
            continue
        if (cur is not None and cur[0] >= ver) or (exp and exp <= now):
            skipped += 1
            continue
        writes.install_versioned(k, val, ver, exp)
        installed += 1
    c = conn.server.cluster
    c.stats["migrate_installed"] += installed
    repl = conn.server.repl
    online = repl.primary.online_count() if repl is not None and repl.role == "master" else 0
    return {"installed": installed, "skipped": skipped, "retry": retry, "replicas": online}


def native_migrate_del(conn, args):
    """``[[[key, version], ...]]``: delete each key here unless it is newer than ``version``."""
    _cluster(conn)
    if len(args) != 1 or type(args[0]) is not list:
        raise _err("TYPE", "migrate_del takes [[[key, version], ...]]")
    pairs = []
    for it in args[0]:
        if type(it) is not list or len(it) != 2 or type(it[1]) is not int:
            raise _err("TYPE", "migrate_del items are [key, version]")
        k = _key(it[0])
        _importing_check(conn, _slots.key_slot(k))
        pairs.append((k, it[1]))
    store = conn.server.store
    writes = conn.server.writes
    n = 0
    retry = []
    for k, ver in pairs:
        try:
            cur = store.get_versioned(k)
        except KeyLostError:
            retry.append(k)
            continue
        if cur is not None and cur[0] <= ver:
            writes.delete(k)
            n += 1
    return {"deleted": n, "retry": retry}


class _Call:
    __slots__ = ("op", "args", "decode", "idempotent", "key")

    def __init__(self, op, args):
        self.op, self.args, self.decode, self.idempotent, self.key = op, args, None, False, None


class SlotMover:
    """The source primary's side of a migration (see the module docstring)."""

    def __init__(self, mode, batch=128, idle=0.2, timeout=5.0):
        self.mode = mode
        self.batch = batch
        self.idle = idle
        self.timeout = timeout
        self.task = None
        self.held = set()           # keys in flight (sent, not settled yet)
        self.pending_dels = {}      # key -> version: deletes to forward to the target
        self.requested = {}         # slot -> epoch of the migrate-done request sent
        self._conns = {}            # (host, port) -> AsyncConnection
        self.stats = {"keys_moved": 0, "batches": 0, "lost_waits": 0, "resent": 0,
                      "deletes_forwarded": 0, "errors": 0, "replica_waits_failed": 0}

    # -- lifecycle

    def update(self, view):
        want = view.role == "primary" and bool(view.migrating)
        if want and (self.task is None or self.task.done()):
            self.task = asyncio.get_running_loop().create_task(self.run())
        for s in list(self.requested):
            if s not in view.migrating:
                del self.requested[s]

    async def stop(self):
        t, self.task = self.task, None
        if t is not None:
            t.cancel()
            try:
                await t
            except (asyncio.CancelledError, Exception):   # noqa: BLE001 - stopping
                pass
        for c in self._conns.values():
            c.close()
        self._conns.clear()

    # -- the loop

    async def run(self):
        last_err = None
        while True:
            v = self.mode.view
            if v is None or v.role != "primary" or not v.migrating:
                self.held.clear()
                return
            if self.mode.fenced:
                await asyncio.sleep(self.idle)
                continue
            try:
                moved = await self.round(v)
                last_err = None
            except asyncio.CancelledError:
                raise
            except Exception as e:      # noqa: BLE001 - a target down, a fenced source: retry
                self.stats["errors"] += 1
                if str(e) != last_err:
                    event("warning", "migrate_error", error=f"{type(e).__name__}: {e}")
                    last_err = str(e)
                for c in self._conns.values():
                    c.close()
                self._conns.clear()
                moved = 0
            if not moved:
                await asyncio.sleep(self.idle)
            else:
                await asyncio.sleep(0)

    async def round(self, v):
        """One pass over the migrating slots; returns how many keys settled."""
        store = self.mode.server.store
        moving = dict(v.migrating)
        settled = 0
        groups = {}
        for k, ver in list(self.pending_dels.items()):
            mv = moving.get(_slots.key_slot(k))
            if mv is None:
                del self.pending_dels[k]    # the slot is no longer migrating
            elif mv[1] is not None:
                groups.setdefault(mv[1], []).append([k, ver])
        for addr, dels in groups.items():
            r = await self.call(addr, "migrate_del", [dels])
            retry = {bytes(k) for k in r.get("retry", ())}
            for k, ver in dels:
                if k not in retry and self.pending_dels.get(k) == ver:
                    del self.pending_dels[k]
            self.stats["deletes_forwarded"] += len(dels) - len(retry)
            settled += len(dels) - len(retry)
        by_target = {}
        busy = set()
        for k in store.keys():
            s = _slots.key_slot(k)
            if s in moving:
                busy.add(s)
                by_target.setdefault(moving[s][1], []).append(k)
        for k in self.pending_dels:
            busy.add(_slots.key_slot(k))
        done = [s for s in moving if s not in busy and s not in self.requested]
        if done:
            await self.request_done(done, v.epoch)
        for addr, keys in by_target.items():
            if addr is None:
                continue            # the target shard has no primary now: wait for the map
            for i in range(0, len(keys), self.batch):
                if self.mode.view is not v:
                    return settled + 1      # the map changed: start over with the new one
                settled += await self.move(addr, keys[i:i + self.batch])
        return settled

    async def request_done(self, slots, epoch):
        for s in slots:
            self.requested[s] = epoch
        ranges = _slots.to_ranges(set(slots))
        try:
            rid = await self.mode.agent.topo.request("migrate-done", slots=[list(r) for r in ranges])
        except Exception:
            for s in slots:
                self.requested.pop(s, None)
            raise
        event("info", "migrate_slots_drained", slots=len(slots), request=rid)

    async def _conn(self, addr):
        from kvstore.client._async import AsyncConnection
        c = self._conns.get(addr)
        if c is None or c.closed:
            c = AsyncConnection(addr[0], addr[1], socket_timeout=self.timeout)
            await c.connect()
            self._conns[addr] = c
        return c

    async def call(self, addr, op, args):
        from kvstore.client._commands import decode_reply
        c = await self._conn(addr)
        status, result = await c.call(_Call(op, args))
        return decode_reply(status, result, _Call(op, args))

    async def move(self, addr, keys):
        mode = self.mode
        store = mode.server.store
        items, sent = [], {}
        for k in keys:
            try:
                got = store.get_versioned(k)       # a LOST key is read-repaired here
            except KeyLostError:
                self.stats["lost_waits"] += 1
                continue                            # stays here; tried again next round
            if got is None:
                continue
            ver, val = got
            items.append([k, ver, val, store.expire_at(k)])
            sent[k] = ver
        if not items:
            return 0
        self.held.update(sent)
        try:
            r = await self.call(addr, "migrate_put", [items])
            retry = {bytes(k) for k in r.get("retry", ())}
            if r.get("replicas", 0) > 0:
                # the target's replica must have the keys before they go from here
                acked = await self.call(addr, "wait", [1, self.timeout / 2])
                if not acked:
                    self.stats["replica_waits_failed"] += 1
                    return 0                        # sent again next round (skipped there)
            mode.check_write()
            writes = mode.server.writes
            n = 0
            for k, ver in sent.items():
                if k in retry:
                    continue
                try:
                    cur = store.get_versioned(k)
                except KeyLostError:
                    continue                        # lost meanwhile: rebuilt, then sent again
                if cur is None:                     # deleted or expired here meanwhile
                    self.pending_dels[k] = ver
                    n += 1
                elif cur[0] == ver:
                    writes.delete(k)
                    n += 1
                else:
                    self.stats["resent"] += 1       # written meanwhile: the newer value goes next
            self._propagate()
            self.stats["keys_moved"] += n
            self.stats["batches"] += 1
            return n
        finally:
            self.held.difference_update(sent)

    def holds(self, key):
        """True while ``key`` must be answered here, not with ASK."""
        return key in self.held or key in self.pending_dels

    def _propagate(self):
        """Replicate the local deletes made outside any client command."""
        writes = self.mode.server.writes
        entries = writes.entries
        if not entries:
            return
        writes.entries = []
        for sub in writes.subscribers:
            sub.on_writes(entries, None)
