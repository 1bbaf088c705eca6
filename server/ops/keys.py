"""Reads and writes of keys (see the package docstring)."""

from kvstore.errors import KeyLostError, KeyTooLargeError, SourceBehindError
from kvstore.store import HASH_SPACE, LOST, key_hash

__all__ = ["delete", "exists", "expire", "fetch", "fetch_range", "get", "get_versioned", "keys", "dbsize",
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


#: One ``fetch_range`` answer holds about this many bytes of keys and values
#: at most (and at most FETCH_RANGE_MAX_KEYS keys); the rest of the range is
#: asked for again from the ``next`` hash it returns (PROTOCOL.md).
FETCH_RANGE_MAX_BYTES = 4 << 20
FETCH_RANGE_MAX_KEYS = 8192
#: Keys expected per scan_range call while paging a wide hash range.
_SCAN_STEP_KEYS = 2048


def _behind(msg, have, need):
    e = SourceBehindError(msg)
    e.extra = {"version": have, "min_version": need}
    return e


def fetch_range(conn, lo, hi, min_version, max_bytes=None):
    """For a peer's rebuild of a lost index range: ``(next, {key: [version,
    value, expire_at_ms or None]})`` for the keys with ``lo <= key_hash(key)
    < hi``, in hash order, up to ``max_bytes`` (and FETCH_RANGE_MAX_BYTES);
    ``next`` is the hash to ask from for the rest, None when the range is
    done. A page never ends between two keys of the same hash.

    The answer reflects every write and delete this node applied up to
    ``min_version``, or it raises :class:`kvstore.SourceBehindError`: on a
    replica while its link is down, a full sync runs, or the primary's
    stream applied here has not reached ``min_version`` (the requester
    retries with backoff); anywhere while part of the range, or a key in
    it, is lost here too. A lost key is not read-repaired here (that would
    block the loop on the peer asking): the requester asks again later."""
    st = conn.store
    repl = conn.server.repl
    if repl is not None and repl.role != "master":
        rep = repl.replica
        if not rep.caught_up(min_version):
            link = rep.link
            why = ("the link to the primary is down" if link is None or not link.up else
                   "a full sync is running" if link.syncing else
                   f"the primary's stream is applied up to version {rep.applied_version}")
            raise _behind(f"this replica is behind: {why}; the requester needs version {min_version}",
                          rep.applied_version, min_version)
    elif st.version < min_version:
        raise _behind(f"this node is at version {st.version}, the requester needs {min_version}",
                      st.version, min_version)
    budget = FETCH_RANGE_MAX_BYTES if not max_bytes else min(int(max_bytes), FETCH_RANGE_MAX_BYTES)
    n = max(1, len(st))
    step = max(1, (HASH_SPACE // n) * _SCAN_STEP_KEYS)
    out = {}
    total = 0
    pos = lo
    while pos < hi:
        end = min(hi, pos + step)
        found = []
        for item in st.scan_range(pos, end - 1):
            if item[0] == "range":
                raise _behind(f"hash range [{item[1]:#x}, {item[2]:#x}] is lost here too "
                              f"(since version {item[3]})", st.version, min_version)
            _kind, key, _version, state = item
            if state != "present":
                raise _behind(f"a key of the range is lost here too ({state})", st.version, min_version)
            found.append((key_hash(key), key))
        found.sort()
        i = 0
        while i < len(found):
            h = found[i][0]
            if out and (total >= budget or len(out) >= FETCH_RANGE_MAX_KEYS):
                return h, out
            while i < len(found) and found[i][0] == h:
                key = found[i][1]
                i += 1
                try:
                    got = st.get_versioned(key)
                except KeyLostError:
                    raise _behind("a key of the range is lost here too", st.version, min_version) from None
                if got is None:
                    continue            # expired meanwhile
                exp = st.expire_at(key)
                out[key] = [got[0], got[1], exp or None]
                total += len(key) + len(got[1])
        pos = end
    return None, out
