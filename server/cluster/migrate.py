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
      controller to finish them (request ``migrate-done`` with those slots,
      asked again after ``request_again`` seconds while still migrating: the
      controller refuses a whole request naming a slot finished meanwhile;
      the controller flips their owner to the target, epoch + 1, and clients
      get MOVED from then on).

Routing during the move (node.py): the source serves keys it still has (or
holds), and answers ``-ASK slot target`` for the others, new keys included;
``-TRYAGAIN`` for a multi-key command whose keys are partly here and partly
moved; the target serves a migrating slot's keys only after ``ASKING``
(native ``asking``), for the next command of that connection.

The mover connects to the target with the credentials replication uses
(``--masteruser`` and ``--masterauth``, else the default user with
``--masterauth``, else ``--requirepass``). A target that
refuses them is logged (``event=migrate_auth_refused``, once per target
until it accepts) and counted (``kvstore_migrate_auth_failures``); the keys
stay at the source and the mover keeps trying.

Target primary (``migrate_put`` / ``migrate_del``, native only)
    Accepts keys of a slot it is importing and only while it is a live,
    unfenced primary. A key already here at the same or a newer version is
    skipped (the op is idempotent; a key written here through ASK is never
    overwritten by the older copy). A key LOST here is answered "retry" and
    stays at the source. Installs and forwarded deletes are replicated to the
    target's replicas like any write.

    Deletes are final (:class:`Imports`): the target remembers the version
    of every key it installed for a slot it imports, until that slot's
    migration ends. A key installed at ``v`` and absent now was deleted (or
    expired) here, through ASK or a forwarded delete; a ``migrate_put`` of
    it at a version ``<= v`` is an older copy the source still had and is
    skipped (``kvstore_migrate_stale_refused``), so the delete is never
    undone. The source lets go of a key only once the target holds it at
    that version, so any copy a source replica still has is at ``<= v``.

Failover in the middle (see docs/DESIGN.md, "Resharding")
    * of the source primary: its replica is promoted with the migration
      still in the map and runs the mover from where its data is: keys
      whose local delete had not reached it are sent again, and the target
      skips them (same version, a newer one written there through ASK, or
      deleted there since: see above). Until the target has seen a key the
      promoted node had in a migrating slot (``unconfirmed``), routing
      answers ``-TRYAGAIN`` for it: its copy may be older than the target's
      state, so it is neither served nor written here;
    * of the target primary: batches in flight fail, the mover reconnects
      to the new target primary named by the map and sends again. The
      source deletes a batch only after the target's acknowledgement *and*,
      when the target has a replica online, after that replica acknowledged
      the installs (the native ``wait [1, timeout]`` on the same
      connection), so the replica that takes over has every key the source
      let go of.
    Known limit: the record of installed keys lives in the target
    primary's memory. If the source primary and then the target primary
    both fail before the slot finishes, a key deleted on the target through
    ASK whose delete on the source had not replicated can come back.
"""

import asyncio
import os
import time

from kvstore import errors
from kvstore.errors import KeyLostError

from ..errors import CommandError
from ..logs import event
from . import slots as _slots

__all__ = ["Imports", "SlotMover", "native_migrate_put", "native_migrate_del"]

#: Test only: ``KVSTORE_TEST_MIGRATE_HOLD=PATH`` (read at start). While the
#: file PATH exists, a source primary keeps its drained slots migrating (it
#: does not ask for ``migrate-done``) and does not replicate its local
#: deletes of moved keys, as if it always died before they reached its
#: replicas. It lets tests act in the middle of a move. Never set it in
#: production.
_TEST_HOLD = os.environ.get("KVSTORE_TEST_MIGRATE_HOLD") or None


def _test_hold():
    return _TEST_HOLD is not None and os.path.exists(_TEST_HOLD)


#: What a target answers when it refuses the migration connection's credentials.
_AUTH_CODES = ("NOAUTH", "WRONGPASS", "NOPERM", "ERR")


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


class Imports:
    """The target primary's record of the keys it installed through
    ``migrate_put``: ``key -> version``, per importing slot, kept until the
    slot's migration ends (it is no longer importing here).

    It is what makes a delete on the target final: a key installed here at
    version ``v`` and absent now was deleted (or expired) here, and a
    ``migrate_put`` of it at a version ``<= v`` is an older copy the source
    still had (a source replica promoted before the source's own delete of
    the moved key reached it) -- it is skipped, never installed again. A
    version above ``v`` is a write the source made after the key came
    here, and is installed as any newer write."""

    def __init__(self):
        self.versions = {}          # key -> highest version installed here
        self.slots = frozenset()    # the importing slots the record is for

    def follow(self, importing):
        """Forget the keys of slots no longer being imported."""
        importing = frozenset(importing)
        if importing == self.slots:
            return
        self.slots = importing
        if self.versions:
            self.versions = {k: v for k, v in self.versions.items()
                             if _slots.key_slot(k) in importing}

    def installed(self, key, version):
        if version > self.versions.get(key, 0):
            self.versions[key] = version

    def refuses(self, key, version):
        """True if ``key`` (absent here) was installed here at ``version`` or later."""
        return self.versions.get(key, 0) >= version


def _imports(c):
    imp = getattr(c, "imports", None)
    if imp is None:
        imp = c.imports = Imports()
    v = c.view
    imp.follow(v.importing if v is not None else ())
    return imp


def native_migrate_put(conn, args):
    """``[[[key, version, value, expire_at_ms], ...]]`` -> ``{"installed", "skipped", "retry"}``."""
    c = _cluster(conn)
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
    imports = _imports(c)
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
        if cur is None and imports.refuses(k, ver):
            skipped += 1            # deleted here after it came: stays deleted
            c.mover.stats["stale_refused"] += 1
            continue
        writes.install_versioned(k, val, ver, exp)
        imports.installed(k, ver)
        installed += 1
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
        self.requested = {}         # slot -> when its migrate-done request was sent (monotonic)
        #: seconds after which a drained slot still migrating is asked for
        #: again (the controller refuses a whole request naming a slot that
        #: finished meanwhile, e.g. by a request of a primary that just died)
        self.request_again = 3.0
        self._conns = {}            # (host, port) -> AsyncConnection
        self.unconfirmed = set()    # keys here the target may hold a newer state of
        self._role = None           # the role of the last view
        self._auth_logged = None
        self.stats = {"keys_moved": 0, "batches": 0, "lost_waits": 0, "resent": 0,
                      "deletes_forwarded": 0, "errors": 0, "replica_waits_failed": 0,
                      "stale_refused": 0, "unconfirmed": 0, "auth_failures": 0}

    # -- lifecycle

    def update(self, view):
        imp = getattr(self.mode, "imports", None)
        if imp is not None:
            imp.follow(view.importing if view.role == "primary" else ())
        if view.role == "primary" and self._role != "primary" and view.migrating:
            # a primary now (promoted, or restarted) in the middle of a move:
            # some keys here may have been moved already, and changed or
            # deleted on the target since (their local delete had not
            # reached this node). None is served or written here until the
            # target has seen it (routing answers TRYAGAIN: node.py).
            store = self.mode.server.store
            self.unconfirmed = {k for k in store.keys()
                                if _slots.key_slot(k) in view.migrating}
            if self.unconfirmed:
                event("warning", "migrate_unconfirmed_keys", keys=len(self.unconfirmed),
                      slots=len(view.migrating))
        elif view.role != "primary":
            self.unconfirmed = set()
        elif self.unconfirmed:
            self.unconfirmed = {k for k in self.unconfirmed
                                if _slots.key_slot(k) in view.migrating}
        self.stats["unconfirmed"] = len(self.unconfirmed)
        self._role = view.role
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
        now = time.monotonic()
        done = [s for s in moving if s not in busy
                and now - self.requested.get(s, -1e9) > self.request_again]
        if done and not _test_hold():
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
            self.requested[s] = time.monotonic()
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
            # the target is a node of the same cluster: it authenticates
            # with the credentials replication uses (--masteruser if set,
            # else the default user; --masterauth, else --requirepass)
            repl = self.mode.server.repl
            c = AsyncConnection(addr[0], addr[1], password=repl.password,
                                username=repl.username, socket_timeout=self.timeout)
            try:
                await c.connect()
            except errors.ResponseError as e:
                if getattr(e, "code", None) in _AUTH_CODES:
                    self._auth_refused(addr, e)
                raise
            self._conns[addr] = c
        return c

    def _auth_refused(self, addr, e):
        self.stats["auth_failures"] += 1
        where = f"{addr[0]}:{addr[1]}"
        if self._auth_logged != where:
            self._auth_logged = where
            event("error", "migrate_auth_refused", target=where, error=str(e),
                  hint="the target refused this node's credentials or its user lacks "
                       "+kv.migrate +wait (--masteruser, --masterauth, else --requirepass): "
                       "slots cannot move until every node of the cluster accepts them")

    async def call(self, addr, op, args):
        from kvstore.client._commands import decode_reply
        c = await self._conn(addr)
        status, result = await c.call(_Call(op, args))
        try:
            r = decode_reply(status, result, _Call(op, args))
        except errors.ResponseError as e:
            if getattr(e, "code", None) == "NOPERM":
                self._auth_refused(addr, e)     # authenticated, but not allowed to move keys
            raise
        self._auth_logged = None                # accepted: a later refusal is logged again
        return r

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
                self.unconfirmed.discard(k)         # gone here (expired): nothing to settle
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
                self.unconfirmed.discard(k)         # the target compared it with its own
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
            self.stats["unconfirmed"] = len(self.unconfirmed)
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
        if _test_hold():
            return      # test only: these deletes never reach the replicas
        for sub in writes.subscribers:
            sub.on_writes(entries, None)
