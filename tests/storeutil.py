"""Helpers shared by the tests of the embedded store (tests/test_store*.py).

- ``Replica``: an in-process rebuild source holding ``key -> (version, value)``
  the way a peer would; it can be taken offline, made to lag, and counts calls.
- ``keys_on_subpage`` / ``keys_on_page``: the keys whose record (per
  ``Store.locate``) overlaps a 4 KiB subpage or a whole page.
- ``reserved_2m``: reserve 2 MiB hugepages for a test (skipping with the reason
  when the pool cannot supply them) and give back what it added afterwards.
"""

from __future__ import annotations

import contextlib
import threading

import pytest

import kvstore
from kvstore import hugepages

SUB = 4096


class Replica:
    """A rebuild source: ``fetch([(key, min_version)]) -> {key: (version, value)}``
    and ``fetch_hash_range(lo, hi, min_version) -> {key: (version, value)}``.

    Writers call :meth:`record` with the version ``Store.put`` returned, and
    :meth:`record_delete` with the store's version after a delete.
    ``online = False`` makes it answer nothing (a replica that is down).
    By name it keeps the values of deleted keys (it lags behind deletes); by
    hash range it answers only as of what it has applied: ``applied`` is the
    highest version recorded, capped by ``lag_to`` (a lagging replica), and a
    range request for a later version raises SourceBehindError.
    """

    def __init__(self):
        self.data: dict[bytes, tuple[int, bytes]] = {}
        self.deleted: dict[bytes, int] = {}
        self.applied = 0
        self.lag_to = None
        self.online = True
        self.calls = 0
        self.range_calls = 0
        self.requested: list[tuple[bytes, int]] = []
        self.lock = threading.Lock()

    def record(self, key, version, value):
        with self.lock:
            self.data[bytes(key)] = (version, bytes(value))
            self.deleted.pop(bytes(key), None)
            self.applied = max(self.applied, version)

    def record_delete(self, key, version):
        with self.lock:
            self.deleted[bytes(key)] = version
            self.applied = max(self.applied, version)

    def fetch_hash_range(self, lo, hi, min_version=0):
        with self.lock:
            self.range_calls += 1
            if not self.online:
                return None
            applied = self.applied if self.lag_to is None else min(self.applied, self.lag_to)
            if applied < min_version:
                raise kvstore.SourceBehindError(f"replica at {applied}, asked for {min_version}")
            out = {}
            for key, item in self.data.items():      # (version, value[, expire_at_ms])
                if not lo <= kvstore.key_hash(key) < hi or key in self.deleted:
                    continue
                out[key] = item
            return out

    def forget(self, key):
        with self.lock:
            self.data.pop(bytes(key), None)

    def fetch(self, requests):
        with self.lock:
            self.calls += 1
            self.requested.extend((bytes(k), v) for k, v in requests)
            if not self.online:
                return {}
            out = {}
            for key, min_version in requests:
                item = self.data.get(bytes(key))
                if item is not None and item[0] >= min_version:
                    out[bytes(key)] = item
            return out


class NameOnlyReplica(Replica):
    """A rebuild source with ``fetch`` only (no ``fetch_hash_range``)."""

    def __getattribute__(self, name):
        if name == "fetch_hash_range":
            raise AttributeError(name)
        return super().__getattribute__(name)


def same_group_key(store, key, prefix=b"other"):
    """A key ``prefix + N`` whose records are placed with ``key``'s (records
    are grouped by the top bits of the key hash)."""
    groups = store.stats()["record_groups"]
    bits = groups.bit_length() - 1
    if bits == 0:
        return prefix
    want = kvstore.key_hash(key) >> (64 - bits)
    n = 0
    while kvstore.key_hash(prefix + b"%d" % n) >> (64 - bits) != want:
        n += 1
    return prefix + b"%d" % n


def overlaps(loc, first, last_excl):
    off, length = loc
    return off < last_excl and off + length > first


def record_map(store, keys=None):
    """{key: (offset, length)} for every readable (not LOST) key."""
    out = {}
    for k in store.keys() if keys is None else keys:
        try:
            out[k] = store.locate(k)
        except (kvstore.KeyLostError, KeyError):
            pass
    return out


def keys_on_subpage(store, subpage, rmap=None):
    rmap = record_map(store) if rmap is None else rmap
    lo = subpage * SUB
    return {k for k, loc in rmap.items() if overlaps(loc, lo, lo + SUB)}


def keys_on_page(store, page_bytes, page, rmap=None):
    rmap = record_map(store) if rmap is None else rmap
    lo = page * page_bytes
    return {k for k, loc in rmap.items() if overlaps(loc, lo, lo + page_bytes)}


def lost_set(store):
    return {k for k, _v, _s in store.lost_keys()}


def _persistent(st):
    return st["nr_hugepages"] - st["surplus_hugepages"]


@contextlib.contextmanager
def reserved_2m(n):
    """Make ``n`` 2 MiB hugepages available for the duration; skip (with the
    reason) when the kernel or the privileges do not allow it."""
    try:
        before = _persistent(hugepages.size_status("2M"))
    except OSError as e:
        pytest.skip(f"2 MiB hugepages unavailable: {e}")
    try:
        avail = hugepages.ensure_free("2M", n)
    except OSError as e:  # PermissionError, read-only sysfs, ...
        pytest.skip(f"cannot reserve 2 MiB hugepages: {e}")
    try:
        if avail < n:
            pytest.skip(f"the kernel gave only {avail} free 2 MiB hugepages; {n} are needed")
        yield
    finally:
        try:
            now = _persistent(hugepages.size_status("2M"))
            if now > before:
                hugepages.release("2M", now - before)
        except OSError:
            pass


def open_2m(capacity, policy, n_pages, **kw):
    """A Store on 2 MiB hugepages, or skip with the reason. The caller must
    hold ``reserved_2m(n_pages)``."""
    try:
        store = kvstore.Store(capacity, page_size="2M", kernel_policy=policy, **kw)
    except kvstore.ArenaError as e:
        pytest.skip(f"no 2 MiB hugepage arena: {e}")
    st = store.stats()
    assert st["backing"] == "hugetlb-2M", st
    return store
