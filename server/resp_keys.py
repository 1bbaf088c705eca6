"""RESP adapters of the key commands: GET, SET and friends, MGET, DEL, EXPIRE...

Each handler takes the connection and the command's words and returns the
reply bytes; the semantics are in :mod:`.ops.keys` and every write goes
through ``conn.writes``. GET, SET, MGET, MSET, DEL and EXISTS are on the hot
path: they check their own arity (``checked=True`` rows) and the plain GET
and SET use bound methods cached on the connection (``conn.sget`` is the
Store's ``get``, ``conn.sput`` the write path's ``put``).
"""

import re

from kvstore.errors import KeyTooLargeError

from . import glob
from .adapters import E_SYNTAX, arity_error, show
from .errors import CommandError, resp_error
from .ops import keys as ops
from .ops import keyspace as kso
from .ops import strings as sops
from .resp import OK, ONE, ZERO, bulk, encode, integer

_BIG = 1 << 16


# ------------------------------------------------------------------ strings

def cmd_get(conn, args):
    if len(args) != 2:
        return arity_error("get")
    try:
        v = conn.sget(args[1])
    except KeyTooLargeError:
        return conn.null        # as Redis: a key that long cannot exist
    if v is None:
        return conn.null
    n = len(v)
    if n >= _BIG:
        conn.count_big(n)
    return b"$%d\r\n%b\r\n" % (n, v)


_SET_EXPIRY = (b"EX", b"PX", b"EXAT", b"PXAT")


def parse_string_options(args, first, for_set):
    """Redis's parseExtendedStringArgumentsOrReply: the options of SET
    (``for_set``) or GETEX from ``args[first:]``. Returns (flags, unit,
    expire argument); flags is a set of upper-case option names."""
    flags = set()
    unit = arg = None
    n = len(args)
    i = first
    while i < n:
        opt = args[i].upper()
        nxt = i + 1 < n
        timed = unit is not None
        if opt == b"NX" and for_set and b"XX" not in flags:
            flags.add(opt)
        elif opt == b"XX" and for_set and b"NX" not in flags:
            flags.add(opt)
        elif opt == b"GET" and for_set:
            flags.add(opt)
        elif opt == b"KEEPTTL" and for_set and not timed and b"PERSIST" not in flags:
            flags.add(opt)
        elif (opt == b"PERSIST" and not for_set and not timed
              and b"KEEPTTL" not in flags):
            flags.add(opt)
        elif (opt in _SET_EXPIRY and nxt and b"KEEPTTL" not in flags
              and b"PERSIST" not in flags and unit in (None, opt)):
            unit, arg = opt, args[i + 1]
            i += 1
        else:
            raise CommandError(E_SYNTAX)
        i += 1
    return flags, unit, arg


def cmd_set(conn, args):
    n = len(args)
    if n == 3:
        conn.sput(args[1], args[2])       # conn.writes.put
        return OK
    if n < 3:
        return arity_error("set")
    flags, unit, arg = parse_string_options(args, 3, True)
    at = sops.set_expiry_ms("set", unit, arg) if unit is not None else 0
    key = args[1]
    st = conn.store
    w = conn.writes
    get = b"GET" in flags
    old = st.get(key) if get else None
    if b"NX" in flags or b"XX" in flags:
        exists = st.exists(key)
        if (b"NX" in flags and exists) or (b"XX" in flags and not exists):
            if get:
                return bulk(old) if old is not None else conn.null
            return conn.null
    if b"KEEPTTL" in flags:
        w.put_keepttl(key, args[2])
    elif at:
        w.put_at(key, args[2], at)
    else:
        w.put(key, args[2])
    if get:
        return bulk(old) if old is not None else conn.null
    return OK


def cmd_setex(conn, args):
    at = sops.set_expiry_ms("setex", b"EX", args[2])
    conn.writes.put_at(args[1], args[3], at)
    return OK


def cmd_psetex(conn, args):
    at = sops.set_expiry_ms("psetex", b"PX", args[2])
    conn.writes.put_at(args[1], args[3], at)
    return OK


def cmd_setnx(conn, args):
    if conn.store.exists(args[1]):
        return ZERO
    conn.writes.put(args[1], args[2])
    return ONE


def cmd_getdel(conn, args):
    v = ops.read(conn, args[1])
    if v is None:
        return conn.null
    conn.writes.delete(args[1])
    return bulk(v)


def cmd_strlen(conn, args):
    v = ops.read(conn, args[1])
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
    if any(kso.exists_safe(st, k) for k in args[1::2]):
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
    try:
        return integer(sum(1 for k in args[1:] if ex(k)))
    except KeyTooLargeError:
        return integer(sum(1 for k in args[1:] if kso.exists_safe(conn.store, k)))


_EXPIRE_FLAGS = (b"NX", b"XX", b"GT", b"LT")


def _expire(conn, args, name, seconds, relative):
    flags = set()
    for a in args[3:]:
        u = a.upper()
        if u not in _EXPIRE_FLAGS:
            raise CommandError(f"ERR Unsupported option {show(a)}")
        flags.add(u)
    if b"NX" in flags and len(flags) > 1:
        raise CommandError("ERR NX and XX, GT or LT options at the same time are not compatible")
    if b"GT" in flags and b"LT" in flags:
        raise CommandError("ERR GT and LT options at the same time are not compatible")
    when = sops.parse_ll(args[2])
    at = sops.expire_ms(name, when, seconds, relative)
    return integer(kso.expire_generic(conn, args[1], at, b"NX" in flags, b"XX" in flags,
                                      b"GT" in flags, b"LT" in flags))


def cmd_expire(conn, args):
    return _expire(conn, args, "expire", True, True)


def cmd_pexpire(conn, args):
    return _expire(conn, args, "pexpire", False, True)


def cmd_expireat(conn, args):
    return _expire(conn, args, "expireat", True, False)


def cmd_pexpireat(conn, args):
    return _expire(conn, args, "pexpireat", False, False)


def cmd_expiretime(conn, args):
    return integer(kso.expiretime(conn, args[1], False))


def cmd_pexpiretime(conn, args):
    return integer(kso.expiretime(conn, args[1], True))


def _ttl_ms(conn, key):
    try:
        ms = conn.store.ttl_ms(key)
    except KeyTooLargeError:
        return -2
    return min(ms, sops.LLONG_MAX)


def cmd_ttl(conn, args):
    ms = _ttl_ms(conn, args[1])
    return integer(ms if ms < 0 else (ms + 500) // 1000)


def cmd_pttl(conn, args):
    return integer(_ttl_ms(conn, args[1]))


def cmd_persist(conn, args):
    return ONE if ops.persist(conn, args[1]) else ZERO


def cmd_keys(conn, args):
    return encode(glob.filter_keys(args[1], conn.store.keys()), conn.resp3)


def cmd_type(conn, args):
    return b"+string\r\n" if kso.type_of(conn, args[1]) == "string" else b"+none\r\n"


# ------------------------------------------------------------------ more strings

def cmd_getex(conn, args):
    flags, unit, arg = parse_string_options(args, 2, False)
    key = args[1]
    if ops.read(conn, key) is None:
        return conn.null
    at = sops.set_expiry_ms("getex", unit, arg) if unit is not None else None
    v = sops.getex(conn, key, at, b"PERSIST" in flags)
    return conn.null if v is None else bulk(v)


def cmd_incrbyfloat(conn, args):
    incr = sops.ld_parse(args[2])
    return bulk(sops.incrbyfloat(conn, args[1], incr))


# ------------------------------------------------------------------ key space

_CURSOR_RE = re.compile(rb"([+-]?)([0-9]+)\Z")


def _scan_cursor(b):
    """The cursor as Redis reads it (strtoul, but no leading blank: a sign, digits; a
    negative number wraps; past 2**64-1 is an error)."""
    if b == b"":
        return 0
    m = _CURSOR_RE.match(b)
    if m is None:
        raise CommandError("ERR invalid cursor")
    v = int(m.group(2))
    if v >= 1 << 64:
        raise CommandError("ERR invalid cursor")
    return (-v) % (1 << 64) if m.group(1) == b"-" else v


def cmd_scan(conn, args):
    cursor = _scan_cursor(args[1])
    count, match, type_ = 10, None, None
    i, n = 2, len(args)
    while i < n:
        opt = args[i].upper()
        if i + 1 >= n:
            raise CommandError(E_SYNTAX)
        if opt == b"COUNT":
            count = sops.parse_ll(args[i + 1])
            if count < 1:
                raise CommandError(E_SYNTAX)
        elif opt == b"MATCH":
            match = args[i + 1]
        elif opt == b"TYPE":
            type_ = args[i + 1]
        else:
            raise CommandError(E_SYNTAX)
        i += 2
    nxt, keys = kso.scan(conn, cursor, count, match, type_)
    return encode([b"%d" % nxt, keys], conn.resp3)


def cmd_copy(conn, args):
    replace = False
    i, n = 3, len(args)
    while i < n:
        opt = args[i].upper()
        if opt == b"REPLACE":
            replace = True
        elif opt == b"DB" and i + 1 < n:
            db = sops.parse_ll(args[i + 1])
            if db != 0:
                raise CommandError("ERR DB index is out of range")
            i += 1
        else:
            raise CommandError(E_SYNTAX)
        i += 1
    return ONE if kso.copy(conn, args[1], args[2], replace) else ZERO


_OBJECT_HELP = [
    "OBJECT <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "ENCODING <key>",
    "    Return the kind of internal representation used in order to store the value",
    "    associated with a <key>.",
    "FREQ <key>",
    "    Return the access frequency index of the <key>. The returned integer is",
    "    proportional to the logarithm of the recent access frequency of the key.",
    "IDLETIME <key>",
    "    Return the idle time of the <key>, that is the approximated number of",
    "    seconds elapsed since the last access to the key.",
    "REFCOUNT <key>",
    "    Return the number of references of the value associated with the specified",
    "    <key>.",
    "HELP",
    "    Print this help.",
]


def cmd_object(conn, args):
    sub = args[1].upper()
    if sub == b"HELP" and len(args) == 2:
        return encode(_OBJECT_HELP, conn.resp3)
    if sub not in (b"ENCODING", b"IDLETIME", b"FREQ", b"REFCOUNT", b"HELP"):
        raise CommandError(f"ERR unknown subcommand '{show(args[1])}'. Try OBJECT HELP.")
    if len(args) != 3:
        return arity_error("object|" + sub.decode().lower())
    key = args[2]
    if not kso.exists_safe(conn.store, key):
        return conn.null
    if sub == b"ENCODING":
        return bulk(kso.object_encoding(conn, key).encode())
    if sub == b"REFCOUNT":
        return integer(kso.object_refcount(conn, key))
    if sub == b"IDLETIME":
        return ZERO          # access times are not kept: every key counts as just used
    raise CommandError("ERR An LFU maxmemory policy is not selected, access frequency not "
                       "tracked. Please note that when switching between policies at runtime "
                       "LRU and LFU data will take some time to adjust.")


def cmd_time(conn, args):
    s, us = kso.server_time(conn)
    return encode([b"%d" % s, b"%d" % us], conn.resp3)
