"""The write path: every client write of the server goes through one object.

:class:`WritePath` owns the writes the command layer makes (``put``,
``mput``, ``delete``, ``expire``, ``persist``, ``flush``). Each method

1. asks ``guard`` (when set) whether client writes are allowed now; the guard
   raises the refusal (``-READONLY`` on a replica, ``-NOREPLICAS`` when too
   few replicas are online), before anything is written;
2. writes to the Store;
3. when ``recording`` is on, notes the effect as a replication entry
   (``("p", key, version, value, exp)``, ``("d", key)``, ``("e", key, ms)``,
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
import time

__all__ = ["WritePath"]


class WritePath:
    """The server's one way to write (see the module docstring)."""

    def __init__(self, store):
        self.store = store
        self._put = store.put          # bound once: put() is on the hot path
        #: None, or a callable raising the refusal of a client write.
        self.guard = None
        #: True while some subscriber wants the entries of client writes.
        self.recording = False
        #: Entries of the command running now, until propagate().
        self.entries = []
        #: Objects with on_writes(entries, reply_index), on_install(key, value,
        #: version, status) and read_repair(key, version) (a context manager).
        self.subscribers = []
        #: Index the reply of the running command will have in its batch
        #: (set by the server; used when entries must go out mid-command).
        self.reply_index = lambda: 0
        store.write_observer = self

    def subscribe(self, sub):
        self.subscribers.append(sub)

    def close(self):
        if self.store.write_observer is self:
            self.store.write_observer = None

    def fast_set_allowed(self):
        """May a plain SET run without this path (the C RESP fast path)?"""
        return self.guard is None and not self.recording

    # -- client writes

    def put(self, key, value, ttl=None):
        if self.guard is not None:
            self.guard()
        if ttl is None:
            v = self._put(key, value)
            if self.recording:
                self.entries.append(("p", key, v, value, 0))
        else:
            v = self._put(key, value, ttl=ttl)
            if self.recording:
                self.entries.append(("p", key, v, value, self.store.expire_at(key)))
        return v

    def mput(self, pairs):
        if self.guard is not None:
            self.guard()
        if not self.recording:
            return self.store.mput(pairs)
        items = list(pairs.items()) if hasattr(pairs, "items") else list(pairs)
        vers = self.store.mput(items)
        self.entries.extend(("p", k, v, val, 0) for (k, val), v in zip(items, vers))
        return vers

    def delete(self, key):
        if self.guard is not None:
            self.guard()
        r = self.store.delete(key)
        if r and self.recording:
            self.entries.append(("d", key))
        return r

    def expire_at_ms(self, key, ms):
        """Absolute expiry in ms since the epoch; 0 removes the expiry."""
        if self.guard is not None:
            self.guard()
        r = self.store.expire_at_ms(key, ms)
        if r and self.recording:
            self.entries.append(("e", key, ms))
        return r

    def expire(self, key, seconds):
        """Expire ``key`` in ``seconds`` (<= 0 deletes it); as Store.expire."""
        if seconds <= 0:
            return self.delete(key)
        return self.expire_at_ms(key, time.time_ns() // 1_000_000 + max(1, round(seconds * 1000)))

    def persist(self, key):
        return self.expire_at_ms(key, 0)

    def flush(self):
        if self.guard is not None:
            self.guard()
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
        self.entries = []
        for sub in self.subscribers:
            sub.on_writes(entries, reply_index)

    # -- the Store's write observer

    def installed(self, key, value, version, status):
        for sub in self.subscribers:
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
