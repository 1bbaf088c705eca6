"""Native adapters: check an op's msgpack arguments, call :mod:`.ops`, return
the result msgpack encodes (PROTOCOL.md lists every op).

A handler is ``fn(conn, args) -> result`` and fails by raising; the
connection maps the exception with :func:`.errors.native_error`. Ops whose
arguments fit the generic kinds (``persist``, ``dbsize``) have no handler
here: :mod:`.adapters` builds theirs from the command row.
"""

from .adapters import native_args, native_key, native_number, native_value
from .errors import native_only
from .ops import keys as kops
from .ops import keyspace as kso
from .ops import server as sops
from .ops import strings as strops

__all__ = []

_BIG = 1 << 16


def ping(conn, args):
    native_args(args, 0, 1, "ping")
    return args[0] if args else "PONG"


def auth(conn, args):
    """``[password]`` (the default user) or ``[user, password]``."""
    native_args(args, 1, 2, "auth")
    access = conn.server.access
    if len(args) == 1 and access.default_user().nopass:
        raise native_only("ERR", "no password is configured for the default user")
    for a in args:
        if not isinstance(a, (str, bytes)):
            raise native_only("TYPE", "auth takes [password] or [user, password] (str or bin)")
    pw = args[-1].encode() if isinstance(args[-1], str) else args[-1]
    access.authenticate(conn, args[0] if len(args) == 2 else None, pw)
    return True


def get(conn, args):
    native_args(args, 1, 1, "get")
    v = kops.get(conn, native_key(args[0]))
    if v is not None and len(v) >= _BIG:
        conn.count_big(len(v))
    return v


def getv(conn, args):
    native_args(args, 1, 1, "getv")
    r = kops.get_versioned(conn, native_key(args[0]))
    if r is None:
        return None
    if len(r[1]) >= _BIG:
        conn.count_big(len(r[1]))
    return [r[0], r[1]]


def put(conn, args):
    native_args(args, 2, 3, "put")
    key = native_key(args[0])
    value = native_value(args[1])
    ttl = args[2] if len(args) == 3 else None
    if ttl is None:
        return kops.put(conn, key, value)
    ttl = native_number(ttl, "ttl")
    if not ttl > 0:
        raise native_only("ERR", "ttl must be > 0 seconds")
    return conn.writes.put_at(key, value, _at_ms(ttl, "put"))


def delete(conn, args):
    native_args(args, 1, 1, "delete")
    return kops.delete(conn, native_key(args[0]))


def exists(conn, args):
    native_args(args, 1, 1, "exists")
    return kops.exists(conn, native_key(args[0]))


def mget(conn, args):
    native_args(args, 1, 1, "mget")
    keys = args[0]
    if type(keys) is not list:
        raise native_only("TYPE", "mget takes [[key, ...]]")
    vals, total = kops.mget(conn, [native_key(k) for k in keys])
    lost = []
    for i, v in enumerate(vals):
        if v is not None and type(v) is not bytes:    # still lost after read-repair
            vals[i] = None
            lost.append(i)
    return [vals, lost]          # ops.mget counted the bytes against the output limit


def mput(conn, args):
    native_args(args, 1, 1, "mput")
    flat = args[0]
    if type(flat) is not list or len(flat) % 2:
        raise native_only("TYPE", "mput takes [[key, value, key, value, ...]]")
    pairs = [(native_key(flat[i]), native_value(flat[i + 1])) for i in range(0, len(flat), 2)]
    return list(kops.mput(conn, pairs))


def expire(conn, args):
    native_args(args, 2, 2, "expire")
    key = native_key(args[0])
    seconds = native_number(args[1], "seconds")
    if seconds != seconds:
        raise native_only("ERR", "invalid expire time in 'expire' command")
    if seconds <= 0:
        return kops.delete(conn, key)
    return kso.expire_generic(conn, key, _at_ms(seconds, "expire")) == 1


def ttl(conn, args):
    native_args(args, 1, 1, "ttl")
    t = kops.ttl(conn, native_key(args[0]))
    return t if t >= 0 else int(t)


def keys(conn, args):
    native_args(args, 0, 0, "keys")
    return kops.keys(conn)


def stats(conn, args):
    native_args(args, 0, 0, "stats")
    return sops.stats(conn)


def lost(conn, args):
    native_args(args, 0, 0, "lost")
    return sops.lost(conn)


def inject(conn, args):
    native_args(args, 3, 3, "inject")
    sops.require_injection(conn)
    kind, where, what = args
    if kind not in ("ao", "ar", "hwpoison"):
        raise native_only("TYPE", "kind must be 'ao', 'ar' or 'hwpoison'")
    if where == "offset":
        if type(what) is not int or what < 0:
            raise native_only("TYPE", "offset must be a non-negative int")
        return sops.inject(conn, kind, offset=what)
    if where == "key":
        return sops.inject(conn, kind, key=native_key(what))
    if where == "entry":
        return sops.inject(conn, kind, entry=native_key(what))
    raise native_only("TYPE", "inject takes [kind, 'offset', n], [kind, 'key', key] or [kind, 'entry', key]")


def flushall(conn, args):
    native_args(args, 0, 0, "flushall")
    return sops.flushall(conn)


def fetch(conn, args):
    native_args(args, 1, 1, "fetch")
    items = args[0]
    if type(items) is not list:
        raise native_only("TYPE", "fetch takes [[[key, min_version], ...]]")
    pairs = []
    for it in items:
        if type(it) is not list or len(it) != 2 or type(it[1]) is not int:
            raise native_only("TYPE", "fetch items are [key, min_version]")
        pairs.append((native_key(it[0]), it[1]))
    got = kops.fetch(conn, pairs)
    total = 0
    out = {}
    for k, (ver, val) in got.items():
        total += len(val)
        out[k] = [ver, val]
    if total >= _BIG:
        conn.count_big(total)
    return out


def fetch_range(conn, args):
    """``[lo, hi, min_version]`` or ``[lo, hi, min_version, max_bytes]``:
    ``hi`` exclusive, None for the end of the hash space (2**64)."""
    native_args(args, 3, 4, "fetch_range")
    lo, hi, mv = args[0], args[1], args[2]
    mb = args[3] if len(args) > 3 else None
    if hi is None:
        hi = 1 << 64
    for name, v in (("lo", lo), ("hi", hi), ("min_version", mv)):
        if type(v) is not int or v < 0:
            raise native_only("TYPE", f"fetch_range {name} must be a non-negative int")
    if mb is not None and (type(mb) is not int or mb <= 0):
        raise native_only("TYPE", "fetch_range max_bytes must be a positive int")
    if not lo < hi <= 1 << 64:
        raise native_only("ERR", "fetch_range needs 0 <= lo < hi <= 2**64 (hi None: 2**64)")
    nxt, out = kops.fetch_range(conn, lo, hi, mv, mb)
    total = sum(len(v[1]) for v in out.values())
    if total >= _BIG:
        conn.count_big(total)
    return [nxt, out]


# ---------------------------------------------------------------- replication

def sync(conn, args):
    if len(args) != 3:
        raise native_only("ERR", "sync takes [replid or None, offset, listen_port]")
    replid, offset, port = args
    if replid is not None and type(replid) is not str:
        raise native_only("TYPE", "replid must be a str or None")
    if type(offset) is not int or type(port) is not int or not 0 <= port < 65536:
        raise native_only("TYPE", "offset and listen_port must be ints")
    return sops.sync(conn, replid, offset, port)


def replicaof(conn, args):
    sops.replication(conn)
    if args == [] or args == [None]:
        return sops.replicaof(conn)
    if len(args) != 2 or type(args[0]) is not str or type(args[1]) is not int:
        raise native_only("TYPE", "replicaof takes [] (promote) or [host, port]")
    return sops.replicaof(conn, args[0], args[1])


def wait(conn, args):
    if (conn.server.repl is None or len(args) != 2 or type(args[0]) is not int
            or not isinstance(args[1], (int, float))):
        raise native_only("TYPE", "wait takes [numreplicas, timeout_seconds]")
    return sops.wait(conn, args[0], sops.wait_deadline(float(args[1])))   # None: placeholder


def digest(conn, args):
    return sops.digest(conn)


def role(conn, args):
    return sops.role(conn)


def _at_ms(seconds, name):
    """Absolute expiry (ms) of a positive ttl in seconds (int or float),
    refused with Redis's text when it is not finite or passes int64 ms."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise native_only("ERR", f"invalid expire time in '{name}' command")
    if isinstance(seconds, float):
        ms = max(1, round(seconds * 1000)) if seconds < 1e16 else strops.LLONG_MAX + 1
    else:
        ms = seconds * 1000
    at = strops.now_ms() + ms
    if at > strops.LLONG_MAX:
        raise native_only("ERR", f"invalid expire time in '{name}' command")
    return at


def incr(conn, args):
    """``incr [key]`` or ``[key, delta]``: the new integer value."""
    native_args(args, 1, 2, "incr")
    key = native_key(args[0])
    delta = args[1] if len(args) == 2 else 1
    if type(delta) is not int:
        raise native_only("TYPE", "delta must be an int")
    if not strops.LLONG_MIN <= delta <= strops.LLONG_MAX:
        raise native_only("ERR", "value is not an integer or out of range")
    return strops.incrby(conn, key, delta)


def incrbyfloat(conn, args):
    """``incrbyfloat [key, delta]``: the new value as stored (bin)."""
    native_args(args, 2, 2, "incrbyfloat")
    key = native_key(args[0])
    d = args[1]
    if isinstance(d, bool) or not isinstance(d, (int, float, bytes)):
        raise native_only("TYPE", "delta must be a number or its decimal text (bin)")
    text = d if isinstance(d, bytes) else repr(d).encode()
    return strops.incrbyfloat(conn, key, strops.ld_parse(text))


def scan(conn, args):
    """``scan [cursor]``, ``[cursor, count]`` or ``[cursor, count, match]``:
    ``[next_cursor, keys]`` (SCAN's cursor and guarantee)."""
    native_args(args, 1, 3, "scan")
    cursor = args[0]
    if type(cursor) is not int or not 0 <= cursor < 1 << 64:
        raise native_only("ERR", "invalid cursor")
    count = args[1] if len(args) > 1 and args[1] is not None else 10
    if type(count) is not int or count < 1:
        raise native_only("ERR", "count must be an int >= 1")
    match = args[2] if len(args) > 2 else None
    if match is not None:
        match = native_key(match)
    nxt, keys = kso.scan(conn, cursor, count, match)
    return [nxt, keys]
