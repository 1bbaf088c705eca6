"""The write path: every client write of the server goes through one object.

:class:`WritePath` owns the writes the command layer makes (``put``,
``mput``, ``delete``, ``expire``, ``persist``, ``flush``). Each method

1. asks ``guard`` (when set) whether client writes are allowed now; the guard
   raises the refusal (``-READONLY`` on a replica, ``-NOREPLICAS`` when too
   few replicas are online), before anything is written;
2. writes to the Store;
3. when ``recording`` is on, notes the effect as a replication entry
   (``("p", key, version, value, exp)``, ``("d", key, version)``, ``("e", key, ms, version)``,
   ``("f",)``; see :mod:`.repl_primary`) in ``entries``.

The dispatcher of each protocol calls :meth:`propagate` after a command ran
(Redis's ``call()`` then ``propagate()``): the recorded entries go to the
subscribers in one call, with the index of the command's reply in the
batch. Nothing else feeds replication.

The writes the Store makes by itself (rebuilt keys) and reads that block on
read-repair reach the subscribers through :meth:`installed` and
:meth:`read_repair`: the WritePath is the Store's ``write_observer``.

The engine's C RESP path runs plain GET/SET without Python; it may do so only
when :meth:`fast_set_allowed` says a SET needs nothing from this path.
"""

import contextlib
import os
import time
import weakref

from kvstore.errors import KeyLostError, KeyTooLargeError, StoreFullError

from .errors import CommandError
from .logs import event

__all__ = ["ValueLargerThanStoreError", "WritePath", "crash_point"]


class ValueLargerThanStoreError(CommandError):
    """A value that cannot fit even in an empty store: no retry helps."""

    def __init__(self, n, capacity):
        super().__init__(f"ERR value is larger than the whole store ({n} bytes; the store "
                         f"holds {capacity} bytes); nothing was written", "TOOLARGE",
                         f"value is larger than the whole store ({n} bytes; capacity "
                         f"{capacity} bytes); nothing was written")

_SUB = 4096          # the allocator's subpage
_REC_HDR = 8         # record header: checksum + value length

#: Test hook, as the engine's (adopt.h): abort() at the point named by
#: KVSTORE_CRASH_AT; with KVSTORE_CRASH_ONCE=path only the process that
#: creates path does (a supervised server's next worker has the same
#: environment). Points: ``write:propagate`` (a command's writes are in the
#: Store, its entries not yet handed to replication), ``stream:send``
#: (server/repl_primary.py: a chunk is in the backlog and its position kept
#: in the arena, not yet sent to the replicas).
_CRASH_AT = os.environ.get("KVSTORE_CRASH_AT", "")


def crash_point(name):
    if _CRASH_AT != name:
        return
    once = os.environ.get("KVSTORE_CRASH_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError:
            return
    os.write(2, f"kvstore: KVSTORE_CRASH_AT={name}: aborting here\n".encode())
    os.abort()


class WritePath:
    """The server's one way to write (see the module docstring)."""

    def __init__(self, store):
        self.store = store
        self._put = store.put          # bound once: put() is on the hot path
        #: None, or a callable raising the refusal of a client write.
        self.guard = None
        #: None, or a callable returning True when ``guard`` would let a
        #: client write through right now (checked once per batch by the C
        #: RESP path, which runs no guard); None means it never may.
        self.fast_guard = None
        #: True while some subscriber wants the entries of client writes.
        self.recording = False
        #: Entries of the command running now, until propagate().
        self.entries = []
        #: None, or the primary's kept replication position
        #: (:class:`.repl_persist.ArenaReplState`): a write whose effect
        #: carries no fresh version (a delete, a TTL change, a write at a
        #: given version, a flush) names its key there before the Store
        #: changes, so a crash before propagate() cannot hide it.
        self.intent = None
        #: Objects with on_writes(entries, reply_index), on_install(key, value,
        #: version, status) and read_repair(key, version) (a context manager).
        self.subscribers = []
        #: Index the reply of the running command will have in its batch
        #: (set by the server; used when entries must go out mid-command).
        self.reply_index = lambda: 0
        #: WATCH: key -> WeakSet of connections watching it. Every write
        #: of a watched key marks those connections dirty (Redis's
        #: touchWatchedKey); see :meth:`watch`.
        self.watchers = {}
        store.write_observer = self

    def subscribe(self, sub):
        self.subscribers.append(sub)

    def close(self):
        if self.store.write_observer is self:
            self.store.write_observer = None

    def fast_set_allowed(self):
        """May a plain SET run without this path (the C RESP fast path)?

        With a ``guard`` set only when ``fast_guard`` (a cheap check that
        says the guard would pass right now, e.g. a cluster primary's lease
        is good) is set and returns True."""
        if self.recording or self.watchers:
            return False
        return self.guard is None or (self.fast_guard is not None and self.fast_guard())

    # -- WATCH

    def watch(self, conn, key):
        """Mark ``conn.watch_dirty`` when ``key`` is next written."""
        ws = self.watchers.get(key)
        if ws is None:
            ws = self.watchers[key] = weakref.WeakSet()
        ws.add(conn)

    def unwatch(self, conn, keys):
        for k in keys:
            ws = self.watchers.get(k)
            if ws is not None:
                ws.discard(conn)
                if not ws:
                    del self.watchers[k]

    def touch(self, key):
        """A write-like change of ``key``: every connection watching it is
        dirty (its EXEC will abort)."""
        ws = self.watchers.pop(key, None)
        if ws:
            for c in ws:
                c.watch_dirty = True

    def touch_all(self):
        for k in list(self.watchers):
            if self.store.exists(k):
                self.touch(k)

    # -- space

    def _too_large(self, n):
        """Raise ValueLargerThanStoreError when a value of ``n`` bytes could
        never fit, even in an empty store (a different answer from "full")."""
        try:
            cap = self.store.engine_stats()["capacity"]
        except Exception:  # noqa: BLE001 - no stats: keep the original error
            return
        if n + _REC_HDR > cap:
            raise ValueLargerThanStoreError(n, cap)

    def fits(self, sizes):
        """True when values of ``sizes`` bytes surely fit now: each record
        counted as if it needed subpages of its own, above the allocator's
        reserve. False means "maybe not" (the caller snapshots and undoes)."""
        try:
            free, nsub = self.store.room()
        except Exception:  # noqa: BLE001 - an engine without room(): be careful
            return False
        reserve = 2 + nsub // 256
        need = 0
        for n in sizes:
            need += (n + _REC_HDR + _SUB - 1) // _SUB
        return free - reserve - 1 >= need

    def snapshot(self, keys):
        """What :meth:`rollback` needs to put ``keys`` back as they are now."""
        st = self.store
        out = {}
        for k in keys:
            if k in out:
                continue
            try:
                v = st.get(k)
            except KeyLostError:
                out[k] = ("lost",)
                continue
            except KeyTooLargeError:
                continue            # a key that long cannot be written either
            out[k] = None if v is None else (v, st.expire_at(k))
        return out

    def rollback(self, snap, mark):
        """Undo the writes since ``mark`` (``len(self.entries)`` then): keys
        absent in ``snap`` are deleted first (freeing space), then the old
        values are put back with their expiry. Replication hears only the
        end state. A key that was LOST cannot be put back as LOST: it keeps
        the new value and is logged."""
        st = self.store
        del self.entries[mark:]
        it = self.intent
        for k, old in snap.items():
            if old is None and it is not None:
                it.intent(k)
            if old is None and st.delete(k) and self.recording:
                self.entries.append(("d", k, st.version))
        for k, old in snap.items():
            if old is None:
                continue
            if old[0] == "lost":
                event("warning", "rollback_lost_key", key=k[:64])
                continue
            val, exp = old
            try:
                v = st.put(k, val, expire_at_ms=exp)   # one write, one version
            except Exception as e:  # noqa: BLE001 - report, keep undoing the rest
                event("error", "rollback_failed", key=k[:64], error=f"{type(e).__name__}: {e}")
                continue
            if self.recording:
                self.entries.append(("p", k, v, val, exp))

    # -- client writes

    def put(self, key, value, ttl=None):
        if self.guard is not None:
            self.guard()
        if self.watchers:
            self.touch(key)
        if ttl is None:
            try:
                v = self._put(key, value)
            except StoreFullError:
                self._too_large(len(value))
                raise
            if self.recording:
                self.entries.append(("p", key, v, value, 0))
        else:
            try:
                v = self._put(key, value, ttl=ttl)
            except StoreFullError:
                self._too_large(len(value))
                raise
            if self.recording:
                self.entries.append(("p", key, v, value, self.store.expire_at(key)))
        return v

    def put_at(self, key, value, at_ms=0):
        """Write ``key`` expiring at ``at_ms`` (ms since the epoch, already
        validated by the caller; 0: no expiry). An expiry in the past
        deletes the key, as Redis does once a key's time has come."""
        if self.guard is not None:
            self.guard()
        if at_ms and at_ms <= time.time_ns() // 1_000_000:
            return self.delete(key)
        if self.watchers:
            self.touch(key)
        try:
            # the value and its expiry in one write: one version, as the
            # replicas apply it
            v = self._put(key, value, expire_at_ms=at_ms)
        except StoreFullError:
            self._too_large(len(value))
            raise
        if self.recording:
            self.entries.append(("p", key, v, value, at_ms))
        return v

    def install_versioned(self, key, value, version, at_ms=0):
        """Write ``key`` at a ``version`` made elsewhere (a key moved here by
        resharding; the caller checked it is newer than what is here).
        ``at_ms``: absolute expiry in ms since the epoch, 0 for none."""
        if self.guard is not None:
            self.guard()
        if self.watchers:
            self.touch(key)
        if self.intent is not None:
            self.intent.intent(key)
        try:
            self.store.put_versioned(key, value, version, at_ms)
        except StoreFullError:
            self._too_large(len(value))
            raise
        if self.recording:
            self.entries.append(("p", key, version, value, at_ms))
        return version

    def put_keepttl(self, key, value):
        """Write ``key`` keeping its expiry (INCR, APPEND, SETRANGE)."""
        return self.put_at(key, value, self.store.expire_at(key))

    def mput(self, pairs):
        """Write every pair or none: when the space is not surely there,
        the old values are kept aside and put back if the store fills up
        midway (the StoreFullError is raised after the undo)."""
        if self.guard is not None:
            self.guard()
        items = list(pairs.items()) if hasattr(pairs, "items") else list(pairs)
        st = self.store
        if self.fits(len(v) for _, v in items):
            vers = st.mput(items)
        else:
            snap = self.snapshot([k for k, _ in items])
            mark = len(self.entries)
            try:
                vers = st.mput(items)
            except StoreFullError:
                self.rollback(snap, mark)
                self._too_large(max((len(v) for _, v in items), default=0))
                raise
        if self.watchers:
            for k, _ in items:
                self.touch(k)
        if self.recording:
            self.entries.extend(("p", k, v, val, 0) for (k, val), v in zip(items, vers))
        return vers

    def delete(self, key):
        if self.guard is not None:
            self.guard()
        if self.intent is not None:
            self.intent.intent(key)
        r = self.store.delete(key)
        if r:
            if self.watchers:
                self.touch(key)
            if self.recording:
                # a delete takes a version (the Store's counter after it),
                # so a replica knows which of the primary's versions it has
                self.entries.append(("d", key, self.store.version))
        return r

    def expire_at_ms(self, key, ms):
        """Absolute expiry in ms since the epoch; 0 removes the expiry."""
        if self.guard is not None:
            self.guard()
        if self.intent is not None:
            self.intent.intent(key)
        r = self.store.expire_at_ms(key, ms)
        if r:
            if self.watchers:
                self.touch(key)
            if self.recording:
                # an expiry change takes a version (the Store's counter after
                # it): the replica applies it at the same version
                self.entries.append(("e", key, ms, self.store.version))
        return r

    def expire(self, key, seconds):
        """Expire ``key`` in ``seconds`` (<= 0 deletes it); as Store.expire.
        A time that is not finite or passes 2**63-1 ms is refused with
        Redis's text, and the key is kept."""
        if seconds != seconds or seconds in (float("inf"), float("-inf")):
            raise CommandError("ERR invalid expire time in 'expire' command")
        if seconds <= 0:
            return self.delete(key)
        at = time.time_ns() // 1_000_000 + max(1, round(seconds * 1000))
        if at >= 1 << 63:
            raise CommandError("ERR invalid expire time in 'expire' command")
        return self.expire_at_ms(key, at)

    def persist(self, key):
        return self.expire_at_ms(key, 0)

    def flush(self):
        if self.guard is not None:
            self.guard()
        if self.watchers:
            self.touch_all()
        if self.intent is not None:
            self.intent.intent_flush()
        r = self.store.flush()
        if self.recording:
            self.entries.append(("f",))
        return r

    # -- after a command

    def propagate(self, reply_index):
        """Hand the entries of the command that just ran to the subscribers."""
        entries = self.entries
        if not entries:
            return
        if _CRASH_AT:
            crash_point("write:propagate")
        self.entries = []
        for sub in self.subscribers:
            sub.on_writes(entries, reply_index)

    # -- the Store's write observer

    def installed(self, key, value, version, status):
        for sub in self.subscribers:
            sub.on_install(key, value, version, status)

    def installed_range(self, key, value, version, expire_at_ms, status):
        """A key a lost index range's rebuild installed (``expire_at_ms``: 0
        none). Subscribers with ``on_install_range`` get the expiry too."""
        for sub in self.subscribers:
            f = getattr(sub, "on_install_range", None)
            if f is not None:
                f(key, value, version, expire_at_ms, status)
            else:
                sub.on_install(key, value, version, status)

    @contextlib.contextmanager
    def read_repair(self, key, version):
        # A read-repair blocks this thread while peers are asked: what the
        # running command wrote so far goes out first.
        if self.entries:
            self.propagate(self.reply_index())
        with contextlib.ExitStack() as stack:
            for sub in self.subscribers:
                stack.enter_context(sub.read_repair(key, version))
            yield
