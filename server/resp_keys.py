"""RESP adapters of the key commands: GET, SET and friends, MGET, DEL, EXPIRE...

Each handler takes the connection and the command's words and returns the
reply bytes; the semantics are in :mod:`.ops.keys` and every write goes
through ``conn.writes``. GET, SET, MGET, MSET, DEL and EXISTS are on the hot
path: they check their own arity (``checked=True`` rows) and the plain GET
and SET use bound methods cached on the connection (``conn.sget`` is the
Store's ``get``, ``conn.sput`` the write path's ``put``).
"""

import fnmatch
import re
import time

from .adapters import E_SYNTAX, arity_error, parse_int, show
from .errors import CommandError, resp_error
from .ops import keys as ops
from .resp import OK, ONE, ZERO, bulk, encode, integer

_BIG = 1 << 16


# ------------------------------------------------------------------ strings

def cmd_get(conn, args):
    if len(args) != 2:
        return arity_error("get")
    v = conn.sget(args[1])
    if v is None:
        return conn.null
    n = len(v)
    if n >= _BIG:
        conn.count_big(n)
    return b"$%d\r\n%b\r\n" % (n, v)


_SET_TTL_OPTS = {b"EX": 1.0, b"PX": 0.001, b"EXAT": 1.0, b"PXAT": 0.001}


def cmd_set(conn, args):
    n = len(args)
    if n == 3:
        conn.sput(args[1], args[2])       # conn.writes.put
        return OK
    if n < 3:
        return arity_error("set")
    nx = xx = get = keepttl = False
    ttl = None
    i = 3
    while i < n:
        opt = args[i].upper()
        if opt == b"NX" and not xx:
            nx = True
        elif opt == b"XX" and not nx:
            xx = True
        elif opt == b"GET":
            get = True
        elif opt == b"KEEPTTL" and ttl is None:
            keepttl = True
        elif opt in _SET_TTL_OPTS and ttl is None and not keepttl and i + 1 < n:
            i += 1
            v = parse_int(args[i])
            if v <= 0 or v > (1 << 62) // 1000:
                raise CommandError("ERR invalid expire time in 'set' command")
            ttl = v * _SET_TTL_OPTS[opt]
            if opt.endswith(b"AT"):
                ttl -= time.time()
        else:
            raise CommandError(E_SYNTAX)
        i += 1
    key = args[1]
    st = conn.store
    w = conn.writes
    old = None
    if get:
        old = st.get(key)
    if nx or xx:
        exists = st.exists(key)
        if (nx and exists) or (xx and not exists):
            return bulk(old) if old is not None else conn.null
    if keepttl:
        t = st.ttl(key)
        ttl = t if t >= 0 else None
    if ttl is not None and ttl <= 0:
        w.delete(key)       # an EXAT/PXAT in the past: set then expired at once
    elif ttl is None:
        w.put(key, args[2])
    else:
        w.put(key, args[2], ttl=ttl)
    if get:
        return bulk(old) if old is not None else conn.null
    return OK


def cmd_setex(conn, args):
    v = parse_int(args[2])
    if v <= 0:
        raise CommandError("ERR invalid expire time in 'setex' command")
    conn.writes.put(args[1], args[3], ttl=float(v))
    return OK


def cmd_psetex(conn, args):
    v = parse_int(args[2])
    if v <= 0:
        raise CommandError("ERR invalid expire time in 'psetex' command")
    conn.writes.put(args[1], args[3], ttl=v / 1000.0)
    return OK


def cmd_setnx(conn, args):
    if conn.store.exists(args[1]):
        return ZERO
    conn.writes.put(args[1], args[2])
    return ONE


def cmd_getdel(conn, args):
    v = conn.store.get(args[1])
    if v is None:
        return conn.null
    conn.writes.delete(args[1])
    return bulk(v)


def cmd_strlen(conn, args):
    v = conn.store.get(args[1])
    return integer(0 if v is None else len(v))


def cmd_mget(conn, args):
    if len(args) < 2:
        return arity_error("mget")
    vals, total = ops.mget(conn, args[1:])
    null = conn.null
    parts = [b"*%d\r\n" % len(vals)]
    for v in vals:
        if v is None:
            parts.append(null)
        elif type(v) is bytes:
            parts.append(b"$%d\r\n%b\r\n" % (len(v), v))
        else:
            parts.append(resp_error(v))      # still lost: an -LOST element
    return b"".join(parts)           # ops.mget counted the bytes against the output limit


def cmd_mset(conn, args):
    n = len(args)
    if n < 3 or n % 2 == 0:
        return arity_error("mset")
    conn.writes.mput(list(zip(args[1::2], args[2::2])))
    return OK


def cmd_msetnx(conn, args):
    if len(args) % 2 == 0:
        return arity_error("msetnx")
    st = conn.store
    if any(st.exists(k) for k in args[1::2]):
        return ZERO
    conn.writes.mput(list(zip(args[1::2], args[2::2])))
    return ONE


# ------------------------------------------------------------------ keys

def cmd_del(conn, args):
    if len(args) < 2:
        return arity_error("del")
    d = conn.writes.delete
    return integer(sum(1 for k in args[1:] if d(k)))


def cmd_exists(conn, args):
    if len(args) < 2:
        return arity_error("exists")
    ex = conn.store.exists
    return integer(sum(1 for k in args[1:] if ex(k)))


def _expire(conn, args, scale, name):
    secs = parse_int(args[2]) * scale
    opts = {a.upper() for a in args[3:]}
    if not opts <= {b"NX", b"XX", b"GT", b"LT"}:
        bad = next(a for a in args[3:] if a.upper() not in {b"NX", b"XX", b"GT", b"LT"})
        raise CommandError(f"ERR Unsupported option {show(bad)}")
    if b"NX" in opts and len(opts) > 1:
        raise CommandError("ERR NX and XX, GT or LT options at the same time are not compatible")
    if b"GT" in opts and b"LT" in opts:
        raise CommandError("ERR GT and LT options at the same time are not compatible")
    st = conn.store
    key = args[1]
    cur = st.ttl(key)
    if cur == -2:
        return ZERO
    if opts:
        if b"NX" in opts and cur != -1:
            return ZERO
        if b"XX" in opts and cur == -1:
            return ZERO
        if b"GT" in opts and (cur == -1 or secs <= cur):
            return ZERO
        if b"LT" in opts and cur != -1 and secs >= cur:
            return ZERO
    return ONE if ops.expire(conn, key, secs) else ZERO


def cmd_expire(conn, args):
    return _expire(conn, args, 1, "expire")


def cmd_pexpire(conn, args):
    return _expire(conn, args, 0.001, "pexpire")


def cmd_ttl(conn, args):
    t = conn.store.ttl(args[1])
    if t < 0:
        return integer(int(t))
    return integer(int(t + 0.5))


def cmd_pttl(conn, args):
    t = conn.store.ttl(args[1])
    if t < 0:
        return integer(int(t))
    return integer(int(t * 1000 + 0.5))


def cmd_persist(conn, args):
    return ONE if ops.persist(conn, args[1]) else ZERO


def cmd_keys(conn, args):
    pat = args[1]
    keys = conn.store.keys()
    if pat != b"*":
        rx = re.compile(fnmatch.translate(pat.decode("latin-1")).encode("latin-1"), re.S)
        keys = [k for k in keys if rx.match(k)]
    return encode(keys, conn.resp3)


def cmd_type(conn, args):
    return b"+string\r\n" if conn.store.exists(args[1]) else b"+none\r\n"
