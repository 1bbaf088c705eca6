"""The embedded store: ``kvstore.Store``.

``Store`` subclasses the C engine (``kvstore._native.Engine``), so ``get``,
``put``, ``delete``, ``mput``, ``exists``, ``len()`` and ``in`` are single C
calls. This module adds what is policy rather than mechanism: sizes and
configuration, the recovery worker, rebuilding lost keys from a rebuild
source, read-repair, the patrol scrubber, expiry sweeps and statistics.

Threads: every method may be called from any thread. The engine runs with
the GIL held, so engine calls are serialised by the GIL (only the salvage
copy of a lost hugepage lets it go, so other threads keep serving the other
pages); the Python-side rebuild bookkeeping has its own lock. A rebuild source
is called without any store lock held, so it may take its time (network).
By default whichever thread meets a pending loss processes it; setting
``recovery_thread`` (a ``threading.get_ident()``) reserves that to one thread
(:meth:`Store.process_losses`), and the others wait only when they touch the
lost memory (a server keeps its event loop off the salvage copy this way).

fork(): refused. The arena is shared memory (MAP_SHARED), so a child writing
to it would corrupt the parent's records; any method called on an inherited
Store in a child raises ``kvstore.Error``. Open a new Store in the child.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import re
import select
import threading
import time
import weakref
from typing import Callable, Iterable

from . import _native
from .errors import ClosedError, KeyLostError, SourceBehindError, StoreFullError, UnrecoverableKeyError

__all__ = ["Store", "LOST", "parse_size", "key_hash", "ArenaHandover"]

#: Hash ranges are half-open ``[lo, hi)`` over ``0 <= h < HASH_SPACE``.
HASH_SPACE = 1 << 64


def key_hash(key) -> int:
    """The 64-bit hash the store places ``key`` by: XXH64 of the key bytes
    with seed ``0x6b7673746f7265`` (``xxhash.xxh64_intdigest(key,
    seed=0x6b7673746f7265)``). Stable across processes, machines and kvstore
    versions: replicas answer :meth:`Store.fetch_hash_range` requests with it."""
    return _native.key_hash(key)

log = logging.getLogger("kvstore")


class _LostMarker:
    """Stands in for the value of a LOST key in ``mget(..., on_lost="mark")``."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self):
        return "kvstore.LOST"

    def __bool__(self):
        return False

    def __reduce__(self):
        return (_LostMarker, ())


LOST = _LostMarker()

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}


def parse_size(value) -> int:
    """``"256MiB"`` / ``"1G"`` / ``"4096"`` / ``4096`` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError("a size must be positive")
        return value
    if not isinstance(value, str):
        raise TypeError(f"a size must be an int or a string like '256MiB', not {type(value).__name__}")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read size {value!r}: use e.g. 4096, '64MiB', '1G'")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError("a size must be positive")
    return n


class ArenaHandover(int):
    """An arena memfd handed over by an earlier process (a planned restart),
    with what came with it. It is the fd (an int), so ``Store(adopt_fd=...)``
    takes it where it takes a plain fd, and applies the rest before it
    validates anything:

    - ``lost``, ``poison``: that process's ``Arena.lost_bitmap()`` and
      ``Arena.poison_bitmap()``: its lost subpages stay lost (quarantined,
      never read or allocated), and what they held is LOST;
    - ``spares``: ``[(page, fd, small), ...]``, the memfds its salvaged
      pages live in (``Arena.spares()``), mapped over the same pages again.

    The fds stay the caller's (the arena duplicates what it keeps).
    """

    def __new__(cls, fd: int, lost=None, poison=None, spares=()):
        self = super().__new__(cls, fd)
        self.lost = lost
        self.poison = poison
        self.spares = [tuple(x) for x in spares]
        return self

    @classmethod
    def of(cls, arena) -> "ArenaHandover":
        """What a live arena would hand over (fds are the arena's own)."""
        lost = arena.lost_bitmap()
        has_lost = any(lost)
        return cls(arena.fd, lost if has_lost else None,
                   arena.poison_bitmap() if has_lost else None, arena.spares())


class Faults:
    """Fault injection on a store's arena (DESIGN.md section 5).

    ``inject(offset, kind)`` with kind ``"ao"`` (scramble the subpage, then a
    real asynchronous SIGBUS BUS_MCEERR_AO), ``"ar"`` (scramble and arm: the
    next touch raises a real synchronous SIGBUS), or ``"hwpoison"``
    (``madvise(MADV_HWPOISON)``; only where the kernel has it and
    ``KVSTORE_ALLOW_HWPOISON=1``).
    """

    KINDS = ("ao", "ar", "hwpoison")

    def __init__(self, store: "Store"):
        self._store = store

    def inject(self, offset: int, kind: str = "ao") -> dict:
        if kind not in self.KINDS:
            raise ValueError(f"fault kind must be one of {self.KINDS}, not {kind!r}")
        arena = self._store.arena
        if arena is None:
            raise ClosedError("the store is closed")
        arena.inject(int(offset), kind)
        self._store._faults_injected += 1
        return {"offset": int(offset), "subpage": int(offset) // _native.SUBPAGE, "kind": kind}

    def inject_key(self, key, kind: str = "ao") -> dict:
        """Inject into the subpage holding ``key``'s record."""
        offset, _length = self._store.locate(key)
        return self.inject(offset, kind)

    def inject_entry(self, key, kind: str = "ao") -> dict:
        """Inject into the index subpage holding ``key``'s entry: every key in
        that page's hash range becomes LOST until rebuilt by hash range."""
        offset, _length = self._store.locate_entry(key)
        return self.inject(offset, kind)

    def supported(self) -> dict:
        """Which kinds can run here, with reasons."""
        probe = _native.probe()
        hw = probe["hwpoison"] and os.environ.get("KVSTORE_ALLOW_HWPOISON") == "1"
        return {"ao": True, "ar": True, "hwpoison": hw,
                "hwpoison_reason": None if hw else (
                    "KVSTORE_ALLOW_HWPOISON=1 is not set" if probe["hwpoison"]
                    else "kernel without CONFIG_MEMORY_FAILURE (madvise MADV_HWPOISON returns EINVAL)")}


class _Pending:
    __slots__ = ("version", "since", "attempts", "next_try")

    def __init__(self, version, now):
        self.version = version
        self.since = now
        self.attempts = 0
        self.next_try = now


class _PendingRange:
    __slots__ = ("version", "since", "attempts", "next_try")

    def __init__(self, version, now):
        self.version = version
        self.since = now
        self.attempts = 0
        self.next_try = now


def _call_source(source, requests):
    fetch = getattr(source, "fetch", None)
    result = fetch(requests) if fetch is not None else source(requests)
    return result or {}


def _call_range(source, lo, hi, min_version):
    """``source.fetch_hash_range(lo, hi, min_version=...)``; None when the
    source is not caught up yet (it raised SourceBehindError or returned None)."""
    try:
        got = source.fetch_hash_range(lo, hi, min_version=min_version)
    except SourceBehindError:
        return None
    return got if got is None else dict(got)


class Store(_native.Engine):
    """A fault-tolerant in-memory key-value store (see the module docstring).

    Parameters
    ----------
    capacity: bytes for records, e.g. ``"256MiB"``.
    page_size: ``"auto"`` (1 GiB, else 2 MiB, else 4 KiB), ``"1G"``, ``"2M"``, ``"4K"``.
    kernel_policy: ``"auto"`` (what the kernel does), ``"keep_ue"`` or
        ``"mainline"`` (simulated; see DESIGN.md section 5).
    rebuild_source: ``fetch([(key, min_version)]) -> {key: (version, value)}``,
        as a callable or an object with a ``fetch`` method; None for none.
        An object that also has ``fetch_hash_range(lo, hi, min_version=0)``
        can rebuild lost index ranges (see :meth:`fetch_hash_range` for the
        contract); without it, keys of a lost index page stay LOST.
    max_key, max_value: size limits (defaults 64 KiB and 512 MiB).
    recovery: ``"thread"`` (a background worker) or ``"manual"`` (call
        :meth:`recover` when :attr:`loss_fd` is readable, and
        :meth:`maintain` now and then; for event loops).
    scrub_rate: bytes per second the patrol scrubber verifies (0: off).
    read_repair_timeout: seconds a read of a LOST key may wait for the source.
    rebuild_deadline: seconds after which a key no source returned is
        declared unrecoverable.
    rebuild_batch: keys per fetch call.
    adopt_fd: the arena memfd of an earlier process (or a
        :class:`ArenaHandover` with its lost and salvaged pages): adopt it
        instead of making a new arena (docs/DESIGN.md "Restart"). The store
        serves once the header, directory and index pages verify; records
        are validated on first use and by :meth:`verify_step`.
    """

    def __init__(self, capacity="256MiB", page_size="auto", kernel_policy="auto",
                 rebuild_source=None, *, max_key: int = 65536, max_value: int = 512 << 20,
                 recovery: str = "thread", scrub_rate: int = 0, read_repair_timeout: float = 1.0,
                 rebuild_deadline: float = 30.0, rebuild_batch: int = 256,
                 maintenance_interval: float = 0.05, adopt_fd: int | None = None):
        if recovery not in ("thread", "manual"):
            raise ValueError('recovery must be "thread" or "manual"')
        if rebuild_source is not None and not (callable(rebuild_source) or hasattr(rebuild_source, "fetch")):
            raise TypeError("rebuild_source must be callable or have a fetch(requests) method")
        cap = parse_size(capacity)
        self._adopt_started = time.monotonic()
        if adopt_fd is not None:
            # the memfd of an earlier process (a restart): its store, validated
            arena = _native.Arena.adopt(int(adopt_fd), kernel_policy, lost=getattr(adopt_fd, "lost", None),
                                        poison=getattr(adopt_fd, "poison", None),
                                        spares=getattr(adopt_fd, "spares", None))
            cap = -1
        else:
            arena = _native.Arena(cap, page_size, kernel_policy)
        try:
            super().__init__(arena, cap, max_key, max_value, adopt=adopt_fd is not None)
        except BaseException:
            arena.close()
            raise
        if adopt_fd is not None:
            cap = self.engine_stats()["capacity"]
            r = self.adopt_report()
            log.info("kvstore adopt: generation=%d keys=%d index_pages=%d (bad %d) records=%d (bad %d) "
                     "lost_keys=%d lost_ranges=%d version=%d in %.3fs; records are validated on first use "
                     "and in the background", r["generation"], r["keys"], r["index_pages"], r["index_pages_bad"],
                     r["records"], r["records_bad"], r["lost_keys"], r["lost_ranges"], r["version"],
                     time.monotonic() - self._adopt_started)
        if arena.fallback_reason:
            log.warning("kvstore arena: %s", arena.fallback_reason)
        log.info("kvstore arena: backing=%s page_size=%d keep_ue=%s kernel_policy=%s capacity=%d",
                 arena.backing, arena.page_size, arena.keep_ue, arena.kernel_policy, cap)
        self.faults = Faults(self)
        self.rebuild_source = rebuild_source
        self.read_repair_timeout = float(read_repair_timeout)
        self.rebuild_deadline = float(rebuild_deadline)
        self.rebuild_batch = int(rebuild_batch)
        self.scrub_rate = int(scrub_rate)
        self._interval = float(maintenance_interval)
        self._lock = threading.RLock()
        self._pending: dict[bytes, _Pending] = {}
        # lost index ranges awaiting fetch_hash_range: (lo, hi inclusive) -> _PendingRange
        self._pending_ranges: dict[tuple[int, int], _PendingRange] = {}
        self._ranges_rebuilt = 0
        self._ranges_given_up = 0
        self._range_reason = None
        self._callbacks: list[Callable[[list], None]] = []
        self._faults_injected = 0
        self._read_repairs = 0
        self._unrecoverable = 0
        self._rebuild_fetches = 0
        self._last_maint = time.monotonic()
        # after adoption: the lost keys and ranges found are queued for the
        # rebuilder, and record checksums are verified in the background
        self._adopt_kick = adopt_fd is not None
        self._verify_done_at = None if adopt_fd is not None else 0.0
        self._pool = None
        self._stop = threading.Event()
        self._worker = None
        if recovery == "thread":
            # The worker holds only a weak reference, so a Store that is
            # dropped without close() is still freed (and its arena unmapped).
            self._worker = threading.Thread(target=Store._run, name="kvstore-recovery", daemon=True,
                                            args=(weakref.ref(self), self._stop, self.loss_fd, self._interval))
            self._worker.start()

    # ------------------------------------------------------------ API sugar

    def mget(self, keys: Iterable, on_lost: str = "raise") -> list:
        """Values for ``keys`` (None when absent). A LOST key is read-repaired
        through the rebuild source, else raises KeyLostError; with
        ``on_lost="mark"`` its place holds :data:`kvstore.LOST` instead."""
        if on_lost not in ("raise", "mark"):
            raise ValueError('on_lost must be "raise" or "mark"')
        return super().mget(keys if isinstance(keys, (list, tuple)) else list(keys),
                            LOST if on_lost == "mark" else None)

    def expire(self, key, seconds: float) -> bool:
        """Expire ``key`` in ``seconds`` (<= 0 deletes it). False if absent."""
        if not math.isfinite(seconds):
            raise ValueError("invalid expire time: not a finite number of seconds")
        if seconds <= 0:
            return self.delete(key)
        at = time.time_ns() // 1_000_000 + max(1, round(seconds * 1000))
        if at >= 1 << 63:
            raise ValueError("invalid expire time: past 2**63-1 ms since the epoch")
        return self.expire_at_ms(key, at)

    def expire_at_ms(self, key, at_ms: int, version: int = 0) -> bool:
        """Set (``at_ms`` > 0, ms since the epoch) or clear (0) ``key``'s
        expiry; False if absent (clearing: if it had none). A change is a
        write: the key takes a new version (``version`` when a primary's
        stream gives it; an older one than the key's is ignored), so a
        rebuild source's copy from before the change is never installed
        over it. A LOST key is read-repaired through the rebuild source
        first (else :class:`KeyLostError`); with ``version`` given it takes
        the change as it is (its rebuild must then reach that version)."""
        try:
            return super().expire_at_ms(key, at_ms, version)
        except UnrecoverableKeyError:
            raise
        except KeyLostError:
            if self.rebuild_source is None or version:
                raise
            if self.get(key) is None:       # read-repair (raises if it cannot)
                return False
            return super().expire_at_ms(key, at_ms, version)

    def ttl(self, key):
        """Seconds left (float), -1 without expiry, -2 if absent."""
        ms = self.ttl_ms(key)
        return ms if ms < 0 else ms / 1000.0

    def persist(self, key) -> bool:
        """Remove ``key``'s expiry; True if it had one."""
        return self.expire_at_ms(key, 0)

    def on_loss(self, callback: Callable[[list], None]):
        """Call ``callback(keys)`` with each batch of keys found lost (from
        the recovery worker or :meth:`recover`). Returns the callback."""
        self._callbacks.append(callback)
        return callback

    def fetch(self, requests) -> dict:
        """Serve as a peer's rebuild source: ``{key: (version, value)}`` for
        each ``(key, min_version)`` held here at ``version >= min_version``."""
        out = {}
        for key, min_version in requests:
            try:
                got = self.get_versioned(key)
            except KeyLostError:
                continue
            if got is not None and got[0] >= min_version:
                out[bytes(key)] = got
        return out

    def fetch_hash_range(self, lo: int, hi: int, min_version: int = 0) -> dict:
        """Serve as a peer's rebuild source for a lost index range:
        ``{key: (version, value)}`` for every key held here with
        ``lo <= key_hash(key) < hi`` (``hi`` up to ``2**64``).

        The contract a requester relies on: the answer reflects every write
        and delete this store had applied up to ``min_version`` (every write
        and every delete takes a version, see :attr:`version`). A store that
        has not reached ``min_version``, or that lost part of the range
        itself and cannot say, raises :class:`kvstore.SourceBehindError`
        (retry later, or ask another source). Keys that are LOST here are
        read-repaired through this store's own source first."""
        lo, hi, min_version = int(lo), int(hi), int(min_version)
        if not 0 <= lo < hi <= HASH_SPACE:
            raise ValueError(f"need 0 <= lo < hi <= 2**64, not [{lo}, {hi})")
        if self.version < min_version:
            raise SourceBehindError(f"this store is at version {self.version}, "
                                    f"the requester needs {min_version}")
        out = {}
        for item in self.scan_range(lo, hi - 1):
            if item[0] == "range":
                raise SourceBehindError(f"hash range [{item[1]:#x}, {item[2]:#x}] is lost here too "
                                        f"(since version {item[3]})")
            _kind, key, _version, _state = item
            try:
                got = self.get_versioned(key)
            except KeyLostError as e:
                raise SourceBehindError(f"key {key!r} in the range is lost here too") from e
            if got is not None:
                out[key] = got
        return out

    def mark_range_lost(self, lo: int, hi: int, version: int) -> int:
        """Enter the hash range ``[lo, hi]`` (``hi`` inclusive,
        :func:`kvstore.key_hash`) as LOST at ``version``: a peer this store
        copies (a primary's full-sync snapshot) has that index range LOST and
        cannot name its keys. Every index page covering it is flagged, so the
        range flagged here is the pages' (a superset when this store's page
        boundaries differ). Keys the pages hold keep their values; a read of
        any other key in them raises :class:`KeyLostError` until the range is
        rebuilt with ``fetch_hash_range`` from the rebuild source (caught up
        to ``version``), as a range lost here. Writes to the range work
        meanwhile. Returns the pages newly flagged."""
        n = _native.Engine.mark_range_lost(self, int(lo), int(hi), int(version))
        if n:
            with self._lock:
                self._queue_ranges(self.take_lost_ranges())
        return n

    def _queue_ranges(self, new_ranges):
        """Queue lost index ranges for the rebuilder (under ``_lock``)."""
        now = time.monotonic()
        for lo, hi, version in new_ranges:
            p = self._pending_ranges.get((lo, hi))
            if p is None or p.version < version:
                self._pending_ranges[(lo, hi)] = _PendingRange(version, now)

    def mark_lost(self, key, version: int) -> bool:
        """Enter ``key`` as LOST at ``version`` without a value: a peer this
        store copies (a primary's full-sync snapshot) has the key LOST. Reads
        raise :class:`KeyLostError` (after read-repair through the rebuild
        source, asked for ``version`` or newer), and the rebuild rounds fetch
        it like any key lost here. False (nothing changed) when a copy at
        ``version`` or newer is here, or the key is longer than the inline
        key limit (1 KiB)."""
        key = bytes(key)
        if not _native.Engine.mark_lost(self, key, int(version)):
            return False
        with self._lock:
            p = self._pending.get(key)
            if p is None or p.version < version:
                self._pending[key] = _Pending(int(version), time.monotonic())
        return True

    def stats(self) -> dict:
        s = self.engine_stats()
        with self._lock:
            s.update(
                unrecoverable_keys=self._unrecoverable,
                rebuild_pending=len(self._pending),
                lost_ranges=len(self._pending_ranges),
                lost_ranges_reason=(self._range_reason if self._pending_ranges or self._ranges_given_up
                                    else None),
                ranges_rebuilt=self._ranges_rebuilt,
                ranges_given_up=self._ranges_given_up,
                read_repairs=self._read_repairs,
                rebuild_fetches=self._rebuild_fetches,
                faults_injected=self._faults_injected,
                rebuild_source=self.rebuild_source is not None,
                scrub_rate=self.scrub_rate,
            )
        return s

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        if self.closed:
            return "<kvstore.Store closed>"
        return f"<kvstore.Store keys={len(self)} backing={self.arena.backing}>"

    def close(self):
        """Stop the worker, free the index and unmap the arena. Idempotent."""
        self._stop.set()
        w = self._worker
        if w is not None and w is not threading.current_thread():
            w.join(timeout=5)
        self._worker = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        super().close()

    # ------------------------------------------------------------- recovery

    def process_losses(self) -> dict:
        """The engine's part of :meth:`recover`: salvage (mainline; the copy
        runs with the GIL released), invalidate exactly the records on lost
        subpages, quarantine. Returns its counts. Callable from any thread;
        with :attr:`recovery_thread` set, only that thread processes losses
        (elsewhere this processes nothing and returns zero counts)."""
        return _native.Engine.recover(self)

    def recover(self, processed: dict | None = None) -> dict:
        """Process lost memory now: salvage (mainline), invalidate exactly the
        records on lost subpages, then try one rebuild round. Returns counts.

        ``processed``: the counts of a :meth:`process_losses` call made on
        another thread (the :attr:`recovery_thread`); this call then does the
        rest -- the lost keys reach the :meth:`on_loss` callbacks and the
        rebuild round runs -- on the calling thread."""
        r = self.process_losses() if processed is None else dict(processed)
        with self._lock:
            # take and record under one lock, so wait_recovered() never sees
            # the keys in neither place
            newly = self.take_lost(0, "rebuilding")
            now = time.monotonic()
            for key, version, state in newly:
                if state not in ("rebuilding", "lost"):
                    continue          # repaired or rewritten before we got here
                p = self._pending.get(key)
                if p is None or p.version < version:
                    self._pending[key] = _Pending(version, now)
            new_ranges = self.take_lost_ranges()
            self._queue_ranges(new_ranges)
        for lo, hi, version in new_ranges:
            log.warning("kvstore index ue: hash range [%#018x, %#018x] lost at version %d; its keys are "
                        "LOST until rebuilt with fetch_hash_range", lo, hi, version)
        if r["subpages"]:
            log.info("kvstore ue: subpages=%d keys_lost=%d index_pages_lost=%d orphans_reclaimed=%d "
                     "pages_salvaged=%d subpages_salvaged=%d salvage_failed=%d%s", r["subpages"],
                     r["keys_lost"], r["index_pages_lost"], r["orphans_reclaimed"], r["pages_salvaged"],
                     r["subpages_salvaged"], r["salvage_failed"],
                     f" salvage_error={r['salvage_error']!r}" if r["salvage_failed"] else "")
        if newly:
            self._notify([k for k, _, _ in newly])
        r["rebuilt"], r["unrecoverable"] = self._rebuild_round()
        r["ranges_rebuilt"] = self._rebuild_ranges()
        return r

    def _notify(self, keys):
        for cb in list(self._callbacks):
            try:
                cb(keys)
            except Exception:  # a user callback must not stop recovery
                log.exception("kvstore on_loss callback failed")

    def _install(self, key, value, version):
        """install() that treats a full store as "try again later"."""
        try:
            return self.install(key, value, version)
        except StoreFullError:
            log.warning("kvstore rebuild: no room to reinstall %r (%d bytes); will retry", key, len(value))
            return "full"

    def _rebuild_round(self):
        """Fetch due pending keys from the source; install what comes back."""
        now = time.monotonic()
        with self._lock:
            if not self._pending:
                return 0, 0
            if self.rebuild_source is None:
                # Nobody can return them: they stay LOST (KeyLostError on read).
                for key in self._pending:
                    self.set_state(key, "lost")
                self._pending.clear()
                return 0, 0
            # A key deleted or written since it was lost needs no rebuild.
            for key in [k for k in self._pending if self.state(k) not in ("lost", "rebuilding")]:
                del self._pending[key]
            due = [(k, p.version) for k, p in self._pending.items() if p.next_try <= now]
        rebuilt = unrecoverable = 0
        for i in range(0, len(due), self.rebuild_batch):
            batch = due[i:i + self.rebuild_batch]
            try:
                got = _call_source(self.rebuild_source, batch)
                self._rebuild_fetches += 1
            except Exception as e:  # a failing source is retried with backoff
                log.warning("kvstore rebuild: source failed for %d keys: %s", len(batch), e)
                got = {}
            now = time.monotonic()
            for key, version in batch:
                item = got.get(key)
                status = None
                if item is not None:
                    v, value = item
                    status = self._install(key, value, v) if v >= version else "stale"
                with self._lock:
                    p = self._pending.get(key)
                    if p is None:
                        continue
                    if status in ("installed", "skipped"):
                        del self._pending[key]
                        rebuilt += status == "installed"
                        continue
                    p.attempts += 1
                    if now - p.since >= self.rebuild_deadline:
                        del self._pending[key]
                        if self.set_state(key, "unrecoverable"):
                            self._unrecoverable += 1
                            unrecoverable += 1
                            log.warning("kvstore rebuild: key %r (version %d) unrecoverable: no source "
                                        "returned it within %.1fs", key, version, self.rebuild_deadline)
                    else:
                        p.next_try = now + min(1.0, 0.01 * (2 ** min(p.attempts, 7)))
        if rebuilt or unrecoverable:
            log.info("kvstore rebuild: rebuilt=%d unrecoverable=%d pending=%d", rebuilt, unrecoverable,
                     len(self._pending))
        return rebuilt, unrecoverable

    def _rebuild_ranges(self) -> int:
        """Fetch due lost index ranges with ``fetch_hash_range`` and install
        what comes back. Returns ranges rebuilt."""
        now = time.monotonic()
        with self._lock:
            if not self._pending_ranges:
                return 0
            src = self.rebuild_source
            if src is None or not hasattr(src, "fetch_hash_range"):
                reason = ("no rebuild source" if src is None else
                          "the rebuild source has no fetch_hash_range")
                if self._range_reason != reason:
                    log.warning("kvstore rebuild: %d lost index range(s) stay LOST: %s",
                                len(self._pending_ranges), reason)
                self._range_reason = reason
                self._ranges_given_up += len(self._pending_ranges)
                self._pending_ranges.clear()
                return 0
            due = [(lo, hi, p.version) for (lo, hi), p in self._pending_ranges.items() if p.next_try <= now]
        done = 0
        for lo, hi, version in due:
            try:
                got = _call_range(src, lo, hi + 1, version)
                self._rebuild_fetches += 1
            except Exception as e:  # a failing source is retried with backoff
                log.warning("kvstore rebuild: fetch_hash_range failed: %s", e)
                got = None
            full = 0
            if got is not None:
                full = self._install_range(lo, hi, version, got)
                if full:
                    # Not done: the keys that did not fit must stay LOST (never
                    # absent). Retried like a source that is behind.
                    got = None
                else:
                    self.range_done(lo, hi, version)
            now = time.monotonic()
            with self._lock:
                p = self._pending_ranges.get((lo, hi))
                if p is None or p.version != version:
                    continue
                if got is not None:
                    del self._pending_ranges[(lo, hi)]
                    self._ranges_rebuilt += 1
                    done += 1
                    continue
                self._range_reason = (f"no room to reinstall {full} key(s) of a lost range" if full else
                                      "the rebuild source is behind or unreachable")
                p.attempts += 1
                if now - p.since >= self.rebuild_deadline:
                    del self._pending_ranges[(lo, hi)]
                    self._ranges_given_up += 1
                    log.warning("kvstore rebuild: hash range [%#018x, %#018x] (lost at version %d) stays "
                                "LOST: %s within %.1fs", lo, hi, version,
                                f"no room for {full} of its key(s)" if full else "no source caught up",
                                self.rebuild_deadline)
                else:
                    p.next_try = now + min(1.0, 0.01 * (2 ** min(p.attempts, 7)))
        if done:
            log.info("kvstore rebuild: %d index range(s) rebuilt", done)
        return done

    def _install_range(self, lo, hi, version, got):
        """Install a range answer; returns how many keys found no room."""
        full = 0
        for key, item in got.items():
            key = bytes(key)
            if not lo <= key_hash(key) <= hi:
                continue                  # not ours to install
            exp = item[2] if len(item) > 2 and item[2] else 0
            try:
                self.install_from_range(key, item[1], item[0], exp, version)
            except StoreFullError:
                full += 1
                log.warning("kvstore rebuild: no room to reinstall %r (%d bytes)", key, len(item[1]))
        return full

    def install_from_range(self, key, value, version, expire_at_ms, range_version):
        """Install one key of a ``fetch_hash_range`` answer given at
        ``range_version``: it goes in only if its index range was lost at or
        before that version and nothing was written or deleted here since.
        Returns "installed", "stale" or "skipped". The ``write_observer``
        hears of every call (a server forwards what it installs to its own
        replicas)."""
        return _native.Engine.install(self, key, value, version, expire_at_ms, range_version)

    def _range_read(self, key, version, versioned):
        """Read-repair a key whose index range was lost: ask the source for
        the keys of its exact hash (the key's own answer, as of a version at
        least the loss version), install them, and read again."""
        src = self.rebuild_source
        if src is None or not hasattr(src, "fetch_hash_range"):
            raise KeyLostError(key, version)
        h = key_hash(key)
        deadline = time.monotonic() + self.read_repair_timeout
        while True:
            got = self._fetch_range_bounded(src, h, version, deadline - time.monotonic())
            if got is not None:
                self._install_range(h, h, version, got)
                if key not in got:
                    self.mark_absent(key, version)
                with self._lock:
                    self._read_repairs += 1
                if self.state(key) != "range":
                    return self.get_versioned(key) if versioned else self.get(key)
            if time.monotonic() >= deadline:
                raise KeyLostError(key, version)
            time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
            st = self.state(key)
            if st != "range":
                return self.get_versioned(key) if versioned else self.get(key)

    def _fetch_range_bounded(self, src, h, version, timeout):
        if timeout <= 0:
            return None
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvstore-repair")
        fut = self._pool.submit(_call_range, src, h, h + 1, version)
        try:
            return fut.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            return None
        except Exception as e:
            log.warning("kvstore read-repair: fetch_hash_range failed: %s", e)
            return None

    def _lost_read(self, key, version, state, versioned):
        """Called by the engine when a read finds ``key`` LOST: read-repair
        through the rebuild source within ``read_repair_timeout``. State
        ``"range"``: the key's index page was lost, so whether it exists is
        not known here; it is repaired by hash (:meth:`_range_read`)."""
        if state == "range":
            return self._range_read(bytes(key), version, versioned)
        if self.rebuild_source is None or state == "unrecoverable":
            cls = UnrecoverableKeyError if state == "unrecoverable" else KeyLostError
            raise cls(bytes(key), version)
        key = bytes(key)
        deadline = time.monotonic() + self.read_repair_timeout
        while True:
            got = self._fetch_bounded([(key, version)], deadline - time.monotonic())
            item = got.get(key) if got else None
            if item is not None and item[0] >= version:
                status = self._install(key, item[1], item[0])
                if status == "full":
                    raise KeyLostError(key, version)
                if status == "installed":
                    with self._lock:
                        self._read_repairs += 1
                        self._pending.pop(key, None)
                    # on_loss hears of the key from recover(), which takes
                    # every lost key from the engine exactly once
                # installed, or written meanwhile: read what is there now
                return self.get_versioned(key) if versioned else self.get(key)
            if time.monotonic() >= deadline:
                raise KeyLostError(key, version)
            time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))

    def _fetch_bounded(self, requests, timeout):
        if timeout <= 0:
            return {}
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvstore-repair")
        fut = self._pool.submit(_call_source, self.rebuild_source, requests)
        try:
            return fut.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            return {}
        except Exception as e:
            log.warning("kvstore read-repair: source failed: %s", e)
            return {}

    def maintain(self) -> None:
        """Periodic work: expiry sweep, scrubbing at ``scrub_rate``, rebuild
        retries. The worker thread calls it; with ``recovery="manual"`` call
        it every few tens of milliseconds."""
        now = time.monotonic()
        dt = max(0.0, now - self._last_maint)
        self._last_maint = now
        self.expire_sweep(2000)
        if self._adopt_kick:
            self._adopt_kick = False
            self.recover()
        if self._verify_done_at is None and self.maintain_verify_bytes:
            self.verify_step(self.maintain_verify_bytes)
        if self.scrub_rate > 0:
            self.scrub(max(1, int(self.scrub_rate * min(dt, 1.0))))
        if self.loss_pending or self._pending or self._pending_ranges:
            self.recover()

    #: Bytes of background verification (after adoption) each
    #: :meth:`maintain` call does; 0: none (the owner drives
    #: :meth:`verify_step` itself, as the server does in small timed steps).
    maintain_verify_bytes = 64 << 20

    @property
    def adopted(self) -> bool:
        """True when this store adopted the arena of an earlier process."""
        return self.adopt_report() is not None

    @property
    def verified(self) -> bool:
        """False while an adopted store still has records whose checksum the
        background pass has not checked (a read checks its own record)."""
        return self.engine_stats()["unverified_subpages"] == 0

    def verify_step(self, max_bytes: int = 64 << 20) -> bool:
        """One step of the background verification after adoption (a scrub
        of up to ``max_bytes``: first the structure of the record subpages not
        validated yet, then the record checksums). True once every record
        was checked."""
        if self._verify_done_at is not None:
            return True
        self.scrub(max_bytes)
        if self.engine_stats()["unverified_subpages"] == 0:
            self._verify_done_at = time.monotonic()
            log.info("kvstore adopt: every record verified %.3fs after adoption started",
                     self._verify_done_at - self._adopt_started)
            return True
        return False

    def wait_recovered(self, timeout: float | None = None) -> bool:
        """Block until no loss awaits processing and no rebuild is pending
        (keys nobody can return end LOST or unrecoverable). True on success,
        False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.closed:
                raise ClosedError("the store is closed")
            if self._worker is None or threading.current_thread() is self._worker:
                self.recover()
            with self._lock:
                if not self.loss_pending and not self._pending and not self._pending_ranges:
                    return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.002)

    @staticmethod
    def _run(ref, stop, fd, interval):
        while not stop.is_set():
            try:
                r, _, _ = select.select([fd], [], [], interval)
            except (OSError, ValueError):
                break                       # the store was freed and its fd closed
            store = ref()
            if store is None or stop.is_set():
                break
            try:
                if r:
                    store.recover()
                store.maintain()
            except ClosedError:
                break
            except Exception:
                if stop.is_set() or store.closed:
                    break
                log.exception("kvstore recovery worker error")
                time.sleep(interval)
            finally:
                del store

    # ------------------------------------------------------------ write observer
    #
    # The writes the Store makes by itself (keys rebuilt from the rebuild
    # source, by a rebuild round or by read-repair) and the reads that block on
    # read-repair are reported to ``write_observer`` when one is set. Client
    # writes are not: whoever issues them observes them (the server's write
    # path, server/writes.py). The observer implements
    #   installed(key, value, version, status)  after every install()
    #   installed_range(key, value, version, expire_at_ms, status)
    #                                            after every install_from_range()
    #                                            (optional: without it,
    #                                            installed() is called)
    #   read_repair(key, version)                a context manager around a
    #                                            read of a LOST key
    # and must not raise. See docs/DESIGN.md, "The write path".

    write_observer = None

    def install(self, key, value, version):
        """Install a rebuilt ``value`` at ``version`` (see the engine's install)."""
        status = super().install(key, value, version)
        obs = self.write_observer
        if obs is not None:
            obs.installed(key, value, version, status)
        return status

    _install_from_range = install_from_range

    def install_from_range(self, key, value, version, expire_at_ms, range_version):
        status = self._install_from_range(key, value, version, expire_at_ms, range_version)
        obs = self.write_observer
        if obs is not None:
            f = getattr(obs, "installed_range", None)
            if f is not None:
                f(key, value, version, expire_at_ms, status)
            else:
                obs.installed(key, value, version, status)
        return status

    _repair_lost_read = _lost_read

    def _lost_read(self, key, version, state, versioned):
        obs = self.write_observer
        if obs is None:
            return self._repair_lost_read(key, version, state, versioned)
        with obs.read_repair(key, version):
            return self._repair_lost_read(key, version, state, versioned)

    # ------------------------------------------------------------ end of write observer

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
