"""Reads and writes of keys (see the package docstring)."""

from kvstore.errors import KeyLostError, KeyTooLargeError
from kvstore.store import LOST

__all__ = ["delete", "exists", "expire", "fetch", "get", "get_versioned", "keys", "dbsize",
           "mget", "mput", "persist", "put", "read", "strlen", "ttl"]


def get(conn, key):
    return conn.store.get(key)


def read(conn, key):
    """The value of ``key`` for a read, None when absent: a key over the key
    limit cannot exist, so it reads as absent (Redis answers nil there)."""
    try:
        return conn.store.get(key)
    except KeyTooLargeError:
        return None


def get_versioned(conn, key):
    return conn.store.get_versioned(key)


#: MGET reads keys in slices this large at first (doubling while the values
#: are small), so a client's output limit is checked while the reply grows.
_MGET_FIRST = 8
_MGET_MAX = 4096
_MGET_BIG = 1 << 20


def mget(conn, keys):
    """Values of ``keys`` in order: bytes, None when absent, or the
    KeyLostError of a key still lost after read-repair. Returns
    ``(values, total_bytes)``.

    Large values are counted against the client's output limit as they are
    read (``conn.count_big`` raises OutputLimitExceeded), a slice of keys at
    a time, so MGET of many big values stops near the limit instead of
    building the whole reply first."""
    st = conn.store
    n = len(keys)
    if n <= _MGET_FIRST:
        vals = _store_mget(st, keys)
        return vals, _settle(conn, keys, vals, 0)
    vals = []
    total = 0
    i = 0
    step = _MGET_FIRST
    while i < n:
        part_keys = keys[i:i + step]
        part = _store_mget(st, part_keys)
        size = _settle(conn, part_keys, part, total)
        total += size
        vals.extend(part)
        i += step
        step = min(step * 2, _MGET_MAX) if size < _MGET_BIG else max(1, step // 2)
    return vals, total


def _store_mget(st, keys):
    """The Store's mget with LOST marks; a key over the key limit reads as
    absent (as Redis answers nil for it), the others as usual."""
    try:
        return st.mget(keys, on_lost="mark")
    except KeyTooLargeError:
        limit = st.engine_stats().get("max_key", 65536)
        short = [k for k in keys if len(k) <= limit]
        got = iter(st.mget(short, on_lost="mark"))
        return [next(got) if len(k) <= limit else None for k in keys]


def _settle(conn, keys, vals, before):
    """Read-repair LOST marks in ``vals`` (in place); count the bytes against
    the output limit when large; return the bytes."""
    st = conn.store
    size = 0
    for i, v in enumerate(vals):
        if v is None:
            continue
        if v is LOST:
            try:
                v = st.get(keys[i])     # read-repair from a peer, as GET does
            except KeyLostError as e:
                vals[i] = e
                continue
            vals[i] = v
            if v is None:
                continue
        size += len(v)
    if before + size >= _BIG_REPLY:
        conn.count_big(size)
    return size


_BIG_REPLY = 1 << 16


def put(conn, key, value, ttl=None):
    """Write ``key``; returns the new version."""
    return conn.writes.put(key, value, ttl)


def mput(conn, pairs):
    """Write ``[(key, value), ...]`` at once; returns the versions."""
    return conn.writes.mput(pairs)


def delete(conn, key):
    return bool(conn.writes.delete(key))


def exists(conn, key):
    return bool(conn.store.exists(key))


def expire(conn, key, seconds):
    """Expire ``key`` in ``seconds`` (<= 0 deletes it). False if absent."""
    if seconds <= 0:
        return bool(conn.writes.delete(key))
    return bool(conn.writes.expire(key, seconds))


def ttl(conn, key):
    """Seconds left (float), -1 without expiry, -2 if absent."""
    return conn.store.ttl(key)


def persist(conn, key):
    return bool(conn.writes.persist(key))


def keys(conn):
    return list(conn.store.keys())


def dbsize(conn):
    return len(conn.store)


def strlen(conn, key):
    v = read(conn, key)
    return 0 if v is None else len(v)


def fetch(conn, pairs):
    """For a peer's rebuild: ``{key: (version, value)}`` of each ``(key,
    min_version)`` held here at ``version >= min_version``."""
    return conn.store.fetch(pairs)
