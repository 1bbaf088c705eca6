"""Generic key-space commands: SCAN, RENAME, COPY, TOUCH, RANDOMKEY, OBJECT,
EXPIRETIME, EXPIRE with NX/XX/GT/LT, TIME, ROLE.

SCAN's cursor
-------------
Redis promises that a key present for the whole iteration is returned at
least once, however the table grows or shrinks in between. kvstore orders
the key space by the store's own placement hash (``kvstore.key_hash(key)``,
the same on every run and every machine, the hash ``fetch_range`` and the
index pages use) and the cursor is a position in that order: "every key
whose hash is >= cursor". The order depends only on the keys, never on
insertion, table size or compaction.

Each call reads the index pages covering ``[cursor, next)`` directly
(``Store.scan_range``): the index is laid out by hash, so a call costs
O(COUNT) and SCAN keeps no copy of the key names. ``next`` is chosen so
that the span is expected to hold about COUNT keys (the key count spread
evenly over the hash space), widened until at least one key is found or
the space ends. A call returns every live key whose hash falls in its
span, so a key present for the whole iteration is returned when the cursor
passes its hash, and a batch never ends between two keys of the same hash.
Keys of an index range lost to a memory error cannot be named until the
range is rebuilt, so SCAN cannot return them meanwhile.
"""

import random
import time

from kvstore.store import HASH_SPACE

from .. import glob
from ..errors import CommandError

__all__ = ["copy", "expire_generic", "expiretime", "object_encoding",
           "object_refcount", "randomkey", "rename", "role", "scan", "server_time",
           "touch", "type_of"]


#: Spans wider than the expected one by this factor per retry when a span
#: held no key.
_WIDEN = 4


def exists_safe(st, k):
    try:
        return st.exists(k)
    except Exception:  # noqa: BLE001 - a key over the limit cannot exist
        return False


def _keys_in(st, lo, hi):
    """Names of the keys with ``lo <= key_hash(key) <= hi`` (inclusive),
    sorted by name, so a reply does not depend on the index's layout."""
    return sorted(it[1] for it in st.scan_range(lo, hi) if it[0] == "key")


def scan(conn, cursor, count=10, match=None, type_=None):
    """One SCAN step: (next cursor, keys)."""
    st = conn.store
    count = max(1, int(count))
    span = max(1, HASH_SPACE // max(1, len(st)) * count)
    lo, keys = int(cursor), []
    while True:
        hi = min(HASH_SPACE - 1, lo + span - 1)
        keys += _keys_in(st, lo, hi)
        if hi == HASH_SPACE - 1:
            nxt = 0
            break
        lo = hi + 1
        if keys:
            nxt = lo
            break
        span *= _WIDEN
    if match is not None:
        keys = glob.filter_keys(match, keys)
    keys = [k for k in keys if exists_safe(st, k)]
    if type_ is not None and type_.lower() != b"string":
        keys = []
    return nxt, keys


def randomkey(conn):
    """A live key chosen near a random point of the hash space, or None."""
    st = conn.store
    n = len(st)
    if n == 0:
        return None
    span = max(1, HASH_SPACE // n)
    for _ in range(16):
        lo = random.randrange(HASH_SPACE)
        keys = _keys_in(st, lo, min(HASH_SPACE - 1, lo + span - 1))
        random.shuffle(keys)
        for k in keys:
            if exists_safe(st, k):
                return k
        span *= _WIDEN
    cursor = 0                          # mostly expired keys: walk the space once
    while True:
        cursor, keys = scan(conn, cursor, 1024)
        if keys:
            return random.choice(keys)
        if cursor == 0:
            return None


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

