"""String commands and expiry arithmetic with Redis's semantics.

Times: Redis keeps an expiry as a signed 64-bit count of milliseconds since
the epoch and refuses any argument whose conversion or addition would
overflow it (``invalid expire time in '<cmd>' command``). The helpers here
do the same arithmetic, in Python integers, *before* anything reaches the
Store, so the engine only ever sees an absolute time in ``(0, 2**63)``:

- :func:`set_expiry_ms` -- SET/SETEX/PSETEX/GETEX ``EX PX EXAT PXAT``:
  the number must be > 0, ``EX`` at most ``LLONG_MAX // 1000``, and the
  absolute result must be > 0 and not overflow.
- :func:`expire_ms` -- EXPIRE/PEXPIRE/EXPIREAT/PEXPIREAT: any int64; the
  conversion and the addition of ``now`` must not overflow. A result at or
  before now deletes the key (Redis's ``checkAlreadyExpired``).

Numbers: :func:`parse_ll` is Redis's ``string2ll`` (no sign but ``-``, no
leading zeros, no ``-0``, int64). INCRBYFLOAT does Redis's ``long double``
arithmetic exactly (:func:`ld_parse`, :func:`ld_format`): values are
rationals rounded to a 64-bit significand, printed with ``%.17Lf`` and
trailing zeros removed, so replies match Redis's digit for digit.
"""

import re
import time
from fractions import Fraction

from ..errors import CommandError
from . import keys

__all__ = ["E_INT", "E_NOT_FLOAT", "LLONG_MAX", "LLONG_MIN", "append", "decr", "decrby", "expire_ms", "incr", "getex",
           "getrange", "getset", "incrby", "incrbyfloat", "ld_format", "ld_parse", "now_ms",
           "parse_ll", "set_expiry_ms", "setrange"]

LLONG_MAX = (1 << 63) - 1
LLONG_MIN = -(1 << 63)
E_INT = "ERR value is not an integer or out of range"
E_NOT_FLOAT = "ERR value is not a valid float"
#: Redis's proto-max-bulk-len default: the longest string SETRANGE/APPEND make.
MAX_STRING = 512 << 20

_LL_RE = re.compile(rb"(0|-?[1-9][0-9]{0,18})\Z")


def now_ms():
    return time.time_ns() // 1_000_000


def parse_ll(b, msg=E_INT):
    """Redis's string2ll: the int64 ``b`` spells, else CommandError(msg)."""
    if not _LL_RE.match(b):
        raise CommandError(msg)
    v = int(b)
    if not LLONG_MIN <= v <= LLONG_MAX:
        raise CommandError(msg)
    return v


def _expire_error(name):
    return CommandError(f"ERR invalid expire time in '{name}' command")


def set_expiry_ms(name, unit, arg):
    """Absolute expiry (ms) of SET-like ``EX``/``PX``/``EXAT``/``PXAT``
    ``arg`` (bytes); ``unit`` is one of those option names (upper case)."""
    v = parse_ll(arg)
    seconds = unit in (b"EX", b"EXAT")
    if v <= 0 or (seconds and v > LLONG_MAX // 1000):
        raise _expire_error(name)
    if seconds:
        v *= 1000
    if unit in (b"EX", b"PX"):
        v += now_ms()
    if v <= 0 or v > LLONG_MAX:
        raise _expire_error(name)
    return v


def expire_ms(name, when, unit_seconds, relative):
    """Absolute expiry (ms) of EXPIRE-like ``when`` (an int64)."""
    if unit_seconds:
        if when > LLONG_MAX // 1000 or when < LLONG_MIN // 1000:
            raise _expire_error(name)
        when *= 1000
    base = now_ms() if relative else 0
    if when > LLONG_MAX - base:
        raise _expire_error(name)
    return when + base


# ------------------------------------------------------------------ incr

def incrby(conn, key, delta):
    """INCR/INCRBY/DECR/DECRBY: the new value (int); the key keeps its TTL."""
    old = conn.store.get(key)
    cur = 0 if old is None else parse_ll(old)
    new = cur + delta
    if not LLONG_MIN <= new <= LLONG_MAX:
        raise CommandError("ERR increment or decrement would overflow")
    val = b"%d" % new
    _store(conn, key, old, val)
    return new


def _store(conn, key, old, val):
    """Write the new value of a read-modify-write: a new key gets no expiry,
    an existing one keeps its TTL (as Redis's INCR family does)."""
    if old is None:
        conn.writes.put(key, val)
    else:
        conn.writes.put_keepttl(key, val)


def incr(conn, key):
    return incrby(conn, key, 1)


def decr(conn, key):
    return incrby(conn, key, -1)


def decrby(conn, key, delta):
    if delta == LLONG_MIN:
        raise CommandError("ERR decrement would overflow")
    return incrby(conn, key, -delta)


# long double: x87 extended precision, as Redis's INCRBYFLOAT uses on x86-64.
_LD_BITS = 64
_LD_EMIN = -16382          # smallest normal exponent (value = m * 2**(e-63))
_LD_EMAX = 16383
_FLOAT_RE = re.compile(
    rb"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
    rb"|0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][+-]?[0-9]+)?"
    rb"|(?:inf|infinity))\Z", re.I)
INF = "inf"


def _round_ld(q):
    """``q`` (a Fraction) rounded to the nearest long double (ties to even);
    INF / -INF past the range; subnormals keep fewer bits."""
    if q == 0:
        return Fraction(0)
    neg = q < 0
    a = -q if neg else q
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    e = max(e, _LD_EMIN)                   # subnormals: fixed quantum
    quantum_exp = e - (_LD_BITS - 1)
    scaled = a / (Fraction(2) ** quantum_exp)
    m = scaled.numerator // scaled.denominator
    rem = scaled - m
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and m & 1):
        m += 1
    r = m * Fraction(2) ** quantum_exp
    if r >= Fraction(2) ** (_LD_EMAX + 1):
        return "-" + INF if neg else INF
    return -r if neg else r


def _exact(text):
    t = text.lower()
    sign = -1 if t.startswith(b"-") else 1
    t = t.lstrip(b"+-")
    if t in (b"inf", b"infinity"):
        return "-" + INF if sign < 0 else INF
    if t.startswith(b"0x"):
        t = t[2:]
        mant, _, exp = t.partition(b"p")
        whole, _, frac = mant.partition(b".")
        digits = (whole + frac) or b"0"
        v = Fraction(int(digits, 16), 16 ** len(frac)) * Fraction(2) ** int(exp or b"0")
        return sign * v
    return sign * Fraction(t.decode())


def ld_parse(b):
    """Redis's string2ld: the long double ``b`` spells (a Fraction, or the
    strings "inf"/"-inf"), else CommandError("value is not a valid float")."""
    if not b or len(b) >= 5120 or not _FLOAT_RE.match(b):
        raise CommandError(E_NOT_FLOAT)
    q = _exact(b)
    if isinstance(q, str):
        return q
    r = _round_ld(q)
    if isinstance(r, str) or (r == 0 and q != 0):
        raise CommandError(E_NOT_FLOAT)     # ERANGE: overflow or underflow to zero
    return r


def ld_format(q):
    """``%.17Lf`` of ``q`` with trailing zeros (and a bare dot) removed."""
    neg = q < 0
    a = -q if neg else q
    scaled = a * 10 ** 17
    n = scaled.numerator // scaled.denominator
    rem = scaled - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n & 1):
        n += 1
    s = str(n).rjust(18, "0")
    s = (s[:-17] + "." + s[-17:]).rstrip("0").rstrip(".")
    if neg and s != "0":
        s = "-" + s
    return s.encode()


def incrbyfloat(conn, key, incr):
    """INCRBYFLOAT: the new value as stored (bytes); keeps the TTL."""
    old = conn.store.get(key)
    cur = Fraction(0) if old is None else ld_parse(old)
    if isinstance(cur, str) or isinstance(incr, str):
        raise CommandError("ERR increment would produce NaN or Infinity")
    new = _round_ld(cur + incr)
    if isinstance(new, str):
        raise CommandError("ERR increment would produce NaN or Infinity")
    val = ld_format(new)
    _store(conn, key, old, val)
    return val


# ------------------------------------------------------------------ strings

def _check_length(offset, n):
    if offset + n > MAX_STRING:
        raise CommandError("ERR string exceeds maximum allowed size (proto-max-bulk-len)")


def append(conn, key, value):
    """APPEND: the new length; the key keeps its TTL."""
    old = conn.store.get(key)
    if old is None:
        conn.writes.put(key, value)
        return len(value)
    _check_length(len(old), len(value))
    new = old + value
    conn.writes.put_keepttl(key, new)
    return len(new)


def getrange(conn, key, start, end):
    v = keys.read(conn, key)
    if v is None:
        return b""
    n = len(v)
    if start < 0 and end < 0 and start > end:
        return b""
    if start < 0:
        start += n
    if end < 0:
        end += n
    start = max(start, 0)
    end = max(end, 0)
    if end >= n:
        end = n - 1
    if start > end or n == 0:
        return b""
    return v[start:end + 1]


def setrange(conn, key, offset, value):
    if offset < 0:
        raise CommandError("ERR offset is out of range")
    old = conn.store.get(key)
    if old is None:
        if not value:
            return 0
        _check_length(offset, len(value))
        conn.writes.put(key, b"\0" * offset + value)
        return offset + len(value)
    if not value:
        return len(old)
    _check_length(offset, len(value))
    if len(old) < offset:
        old += b"\0" * (offset - len(old))
    new = old[:offset] + value + old[offset + len(value):]
    conn.writes.put_keepttl(key, new)
    return len(new)


def getset(conn, key, value):
    old = conn.store.get(key)
    conn.writes.put(key, value)
    return old


def getex(conn, key, at_ms=None, persist=False):
    """GETEX: the value (None if absent); ``at_ms`` a new absolute expiry
    (validated; at or before now deletes the key), ``persist`` removes it."""
    v = keys.read(conn, key)
    if v is None:
        return None
    if at_ms is not None:
        if at_ms <= now_ms():
            conn.writes.delete(key)
        else:
            conn.writes.expire_at_ms(key, at_ms)
    elif persist:
        conn.writes.persist(key)
    return v
