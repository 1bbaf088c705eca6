"""Generic key-space commands: SCAN, RENAME, COPY, TOUCH, RANDOMKEY, OBJECT,
EXPIRETIME, EXPIRE with NX/XX/GT/LT, TIME, ROLE.

SCAN's cursor
-------------
Redis promises that a key present for the whole iteration is returned at
least once, however the table grows or shrinks in between. kvstore orders
the key space by the store's own placement hash (:func:`scan_hash`:
``kvstore.key_hash(key)``, i.e. ``xxh64(key, seed=0x6b7673746f7265)``, the
same on every run and every machine and the hash ``fetch_range`` and the
index pages use; 0 is replaced by 1) and the cursor is a position in that
order: "every key whose hash is >= cursor". The order
depends only on the keys, never on insertion, table size or compaction.

The keys are read from a server-wide sorted snapshot (:class:`ScanIndex`).
A call with cursor 0 takes a new snapshot unless no key was added since the
last one (the store's version counter and key count are unchanged, and the
snapshot is younger than a second); later calls read the
newest snapshot there is, which was taken after their iteration began. So a
key present for the whole iteration is in the snapshot every call of that
iteration reads, and is returned when the cursor passes its hash. Keys in
the snapshot are checked to still exist before being returned. A batch never
ends between two keys with the same hash, so a hash collision cannot hide a
key. COUNT is the number of snapshot entries examined per call.

Cost: a snapshot is O(n log n) and holds the key names; it is taken at most
once per iteration start after a write, not per call.
"""

import bisect
import random
import time

from kvstore.store import key_hash

from .. import glob
from ..errors import CommandError

__all__ = ["ScanIndex", "copy", "expire_generic", "expiretime", "object_encoding",
           "object_refcount", "randomkey", "rename", "role", "scan", "scan_hash", "server_time",
           "touch", "type_of"]



def scan_hash(key):
    """The SCAN order of ``key``: a stable hash in [1, 2**64) (0 is the
    cursor that starts and ends an iteration)."""
    return key_hash(key) or 1


class ScanIndex:
    """The sorted key snapshot SCAN reads (see the module docstring)."""

    def __init__(self):
        self.version = None
        self.count = -1
        self.taken = 0.0
        self.hashes = []
        self.keys = []

    #: A snapshot older than this is retaken at cursor 0 even when the
    #: version counter and key count did not move (writes applied with their
    #: own versions, by replication or rebuild, may not move the counter).
    MAX_AGE = 1.0

    def refresh(self, store):
        ver, n = store.version, len(store)
        now = time.monotonic()
        if ver == self.version and n == self.count and now - self.taken < self.MAX_AGE:
            return
        self.taken = now
        pairs = sorted((scan_hash(k), k) for k in store.keys())
        self.hashes = [h for h, _ in pairs]
        self.keys = [k for _, k in pairs]
        self.version, self.count = ver, n

    def page(self, cursor, count):
        """Keys with hash >= cursor, at least ``count`` of them (never
        splitting equal hashes), and the next cursor (0 at the end)."""
        hs = self.hashes
        i = bisect.bisect_left(hs, cursor)
        j = min(i + count, len(hs))
        while 0 < j < len(hs) and hs[j] == hs[j - 1]:
            j += 1
        return self.keys[i:j], (hs[j] if j < len(hs) else 0)


def _index(conn):
    srv = conn.server
    ix = getattr(srv, "scan_index", None)
    if ix is None:
        ix = srv.scan_index = ScanIndex()
    return ix


def exists_safe(st, k):
    try:
        return st.exists(k)
    except Exception:  # noqa: BLE001 - a key over the limit cannot exist
        return False


def scan(conn, cursor, count=10, match=None, type_=None):
    """One SCAN step: (next cursor, keys)."""
    ix = _index(conn)
    st = conn.store
    if cursor == 0 or ix.version is None:
        ix.refresh(st)
    keys, nxt = ix.page(cursor, count)
    if match is not None:
        keys = glob.filter_keys(match, keys)
    keys = [k for k in keys if exists_safe(st, k)]
    if type_ is not None and type_.lower() != b"string":
        keys = []
    return nxt, keys


def randomkey(conn):
    st = conn.store
    if len(st) == 0:
        return None
    ix = _index(conn)
    for _ in range(3):
        if ix.keys:
            for _ in range(8):
                k = random.choice(ix.keys)
                if exists_safe(st, k):
                    return k
        ix.refresh(st)
    keys = st.keys()
    return random.choice(keys) if keys else None


def type_of(conn, key):
    return "string" if exists_safe(conn.store, key) else "none"


def touch(conn, keys):
    st = conn.store
    return sum(1 for k in keys if exists_safe(st, k))


def expiretime(conn, key, ms):
    """EXPIRETIME/PEXPIRETIME: -2 absent, -1 no expiry, else the absolute time."""
    st = conn.store
    if not exists_safe(st, key):
        return -2
    at = st.expire_at(key)
    if not at:
        return -1
    return at if ms else (at + 500) // 1000


def expire_generic(conn, key, at_ms, nx=False, xx=False, gt=False, lt=False):
    """EXPIRE and friends once the time is known (absolute ms, validated).
    Returns 1 when the expiry was set (or the key deleted because the time
    has passed), 0 when the key is absent or a condition failed."""
    st = conn.store
    if not exists_safe(st, key):
        return 0
    if nx or xx or gt or lt:
        cur = st.expire_at(key) or -1
        if nx and cur != -1:
            return 0
        if xx and cur == -1:
            return 0
        if gt and (cur == -1 or at_ms <= cur):
            return 0
        if lt and cur != -1 and at_ms >= cur:
            return 0
    if at_ms <= time.time_ns() // 1_000_000:
        conn.writes.delete(key)
        return 1
    conn.writes.expire_at_ms(key, at_ms)
    return 1


def rename(conn, src, dst, nx=False):
    """RENAME/RENAMENX: True when renamed (value and expiry move), False
    for RENAMENX onto an existing key. A missing source raises."""
    st = conn.store
    v = st.get(src)
    if v is None:
        raise CommandError("ERR no such key")
    if src == dst:
        return not nx
    if nx and exists_safe(st, dst):
        return False
    at = st.expire_at(src)
    w = conn.writes
    w.put_at(dst, v, at)
    w.delete(src)
    return True


def copy(conn, src, dst, replace=False):
    st = conn.store
    if src == dst:
        raise CommandError("ERR source and destination objects are the same")
    v = st.get(src)
    if v is None:
        return False
    if not replace and exists_safe(st, dst):
        return False
    conn.writes.put_at(dst, v, st.expire_at(src))
    return True


def _is_int(v):
    from .strings import parse_ll
    if len(v) > 20:
        return False
    try:
        parse_ll(v)
    except CommandError:
        return False
    return True


def object_encoding(conn, key):
    """As Redis names a string's encoding: int, embstr (<= 44 bytes), raw."""
    v = conn.store.get(key)
    if v is None:
        return None
    if _is_int(v):
        return "int"
    return "embstr" if len(v) <= 44 else "raw"


def object_refcount(conn, key):
    """1, or INT_MAX for the small integers Redis shares (0..9999)."""
    v = conn.store.get(key)
    if v is None:
        return None
    if _is_int(v) and 0 <= int(v) < 10000:
        return 2147483647
    return 1


def server_time(conn):
    ns = time.time_ns()
    return ns // 1_000_000_000, (ns // 1000) % 1_000_000


def role(conn):
    """ROLE as Redis answers it."""
    r = conn.server.repl
    if r is None or r.role == "master":
        offset = 0 if r is None else r.offset
        reps = []
        if r is not None and r.primary is not None:
            try:
                for s in r.primary.sessions:
                    reps.append([str(s.host), str(s.listen_port), str(max(s.ack_offset, 0))])
            except Exception:  # noqa: BLE001 - the list is informative only
                reps = []
        return ["master", offset, reps]
    host, port = r.replica.master
    link = r.replica.info().get("master_link_status", "down")
    state = "connected" if link == "up" else "connect"
    return ["slave", host, port, state, r.offset]

