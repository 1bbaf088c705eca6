"""RESP request parsing and reply encoding.

The parser follows hiredis: ``feed(bytes)`` appends what the socket gave us,
``gets()`` returns one command (a list of ``bytes`` arguments) or ``False``
when more bytes are needed. ``gets_all()`` returns every complete command in
the buffer at once, which is what the server's ``data_received`` uses: one
call per batch instead of one per command.

Every length read from the wire (multibulk count, bulk length, inline line,
header line) is checked against its limit *before* anything of that size is
allocated, as Redis' ``processMultibulkBuffer`` does. A protocol error cannot
be resynced: ``gets_all()`` returns the commands parsed before the bad bytes
and leaves the error (a RESP error line, ready to send) in ``self.error``; the
connection replies to those commands, sends the error and closes.

Encoding helpers build complete replies as ``bytes``; constant replies are
pre-encoded at import time.
"""

from .inbuf import InputBuffer

__all__ = ["RespParser", "RespProtocolError", "NEED_MORE"]

#: Returned by ``gets()`` when the buffer holds no complete command.
NEED_MORE = False

_CRLF = b"\r\n"

# Partial bulks at least this long are collected as a list of chunks and
# joined once complete, so a 512 MiB value arriving in 64 KiB reads costs
# O(n) and not O(n^2).
_CHUNK_THRESHOLD = 1 << 16

# The longest header line we wait for ("*<count>\r\n" or "$<len>\r\n").
_MAX_HEADER = 64


class RespProtocolError(Exception):
    """The byte stream is not RESP; the message is ready for a -ERR reply."""


_LLONG_MAX = (1 << 63) - 1
_INT_MAX = (1 << 31) - 1


def _length(s):
    """A length field (the bytes after ``*`` or ``$``) as Redis's ``string2ll``
    reads it: an optional ``-`` and decimal digits, no ``+``, no spaces or
    underscores, no leading zeros (``0`` alone is fine, ``-0`` is not), within
    a signed 64-bit integer. Returns the int, or None when it is not one.
    """
    if s.isdigit():
        if (s[0] == 48 and len(s) > 1) or len(s) > 19:
            return None
        v = int(s)
        return v if v <= _LLONG_MAX else None
    if len(s) > 1 and s[0] == 45 and s[1] != 48 and len(s) <= 20 and s[1:].isdigit():
        v = -int(s[1:])
        return v if v >= -_LLONG_MAX - 1 else None
    return None


class RespParser(InputBuffer):
    """Incremental RESP request parser (multibulk and inline commands).

    A multibulk command that has not fully arrived keeps the arguments parsed
    so far (``_args``, with ``_left`` still to come) and the buffer is cut to
    the first argument not yet complete, so a request sent over many reads is
    parsed once: the work is linear in its size, as in Redis, and not
    quadratic.

    ``unauthenticated`` (set by the connection while a password is required
    and the client has not authenticated) applies Redis's tighter limits to
    such clients: at most 10 arguments and 16 KiB per argument.
    """

    __slots__ = ("error", "max_multibulk", "max_bulk", "max_inline", "max_buffer",
                 "unauthenticated", "_args", "_left", "_held")

    def __init__(self, max_multibulk=1024 * 1024, max_bulk=512 * 1024 * 1024,
                 max_inline=64 * 1024, max_buffer=1024 * 1024 * 1024):
        super().__init__()
        self.error = None       # bytes: RESP error line after a protocol error
        self.max_multibulk = max_multibulk
        self.max_bulk = max_bulk
        self.max_inline = max_inline
        self.max_buffer = max_buffer
        self.unauthenticated = False
        self._args = None       # arguments of the incomplete multibulk command
        self._left = 0          # how many of its arguments are still to come
        self._held = 0          # bytes of argument data in _args

    @property
    def pending(self):
        """True while bytes of an unfinished command (or an error) are held."""
        return (bool(self._buf) or self._chunks is not None or self._args is not None
                or self.error is not None)

    def buffered(self):
        """Bytes held and not yet consumed, including the arguments already
        parsed of an incomplete command."""
        return super().buffered() + self._held

    def gets(self):
        """Return the next command (list of bytes) or ``NEED_MORE``.

        Raises :class:`RespProtocolError` on malformed input; the parser is
        then unusable (the stream cannot be resynced).
        """
        if self.error is not None:
            raise RespProtocolError(self.error.decode()[1:].strip())
        cmds = self._parse(1)
        if cmds:
            return cmds[0]
        if self.error is not None:
            raise RespProtocolError(self.error.decode()[1:].strip())
        return NEED_MORE

    def gets_all(self):
        """Return every complete command in the buffer (possibly ``[]``).

        After a protocol error the commands before it are still returned and
        ``self.error`` holds the error reply.
        """
        if self.error is not None or self._need > 0:
            return []
        return self._parse(0)

    def _fail(self, msg):
        self.error = b"-ERR Protocol error: " + msg.encode() + _CRLF
        self._buf = b""
        self._pos = 0
        self._chunks = None
        self._chunked = 0
        self._args = None
        self._left = 0
        self._held = 0

    def _parse(self, limit):
        if (not limit and not self._pos and self._args is None and len(self._buf) <= _FAST_MAX
                and self.max_multibulk >= 64 and self.max_bulk >= 4095
                and not self.unauthenticated):
            out, used = _parse_fast(self._buf)
            if used == len(self._buf):
                self._buf = b""
                return out
            self._pos = used
            if out:
                out.extend(self._parse_slow(0))
                return out
        return self._parse_slow(limit)

    def _parse_slow(self, limit):
        buf = self._buf
        pos = self._pos
        end = len(buf)
        find = buf.find
        out = []
        if self.unauthenticated:
            max_bulk = min(self.max_bulk, 16384)
            max_count = min(self.max_multibulk, 10)
        else:
            max_bulk = self.max_bulk
            max_count = self.max_multibulk
        known_len = _FAST_LENS.get
        args = self._args               # resume an incomplete multibulk
        count = self._left
        held = self._held
        batch_ok = max_bulk >= 4095
        while True:
            if args is None:
                if pos >= end or (limit and len(out) >= limit):
                    break
                if buf[pos] != 42:  # not '*': inline command
                    nl = find(b"\n", pos)
                    if nl < 0:
                        if end - pos > self.max_inline:
                            self._fail("too big inline request")
                            return out
                        break
                    if nl - pos > self.max_inline:
                        self._fail("too big inline request")
                        return out
                    line = buf[pos:nl]
                    pos = nl + 1
                    cmd = _split_inline(line)
                    if cmd is None:
                        self._fail("unbalanced quotes in request")
                        return out
                    if cmd:
                        out.append(cmd)
                    continue
                nl = find(_CRLF, pos, pos + _MAX_HEADER)
                if nl < 0:
                    if end - pos >= _MAX_HEADER:
                        self._fail("invalid multibulk length")
                        return out
                    break
                count = _FAST_COUNTS.get(buf[pos:nl])
                if count is None:
                    count = _length(buf[pos + 1:nl])
                    if count is None:
                        self._fail("invalid multibulk length")
                        return out
                if count > max_count:
                    self._fail("unauthenticated multibulk length" if self.unauthenticated
                               and count <= _INT_MAX else "invalid multibulk length")
                    return out
                pos = nl + 2
                if count <= 0:
                    continue
                args = []
                held = 0
            while count >= 8 and batch_ok:
                # Many arguments: split on CRLF in one C call and take the
                # leading ones whose "$<n>" header matches their length, as
                # _parse_fast does. The split covers at most 64 bytes per
                # argument still due (so a pipeline of many such commands is
                # not split again and again to its end), and stops for this
                # read at the first mismatch (a value holding CRLF, a long
                # value): the loop below takes over, so this cannot go
                # quadratic.
                lim = pos + (count << 6)
                toks = buf[pos:lim].split(_CRLF)
                m = min(count, (len(toks) - 1) >> 1)
                hdrs = toks[0:2 * m:2]
                vals = toks[1:2 * m:2]
                got = [*map(known_len, hdrs)]
                if got != [*map(len, vals)]:
                    batch_ok = False
                    m = 0
                    for a, b in zip(got, vals):
                        if a != len(b):
                            break
                        m += 1
                    hdrs = hdrs[:m]
                    vals = vals[:m]
                if not m:
                    break
                args += vals
                nb = sum(map(len, vals))
                held += nb
                pos += sum(map(len, hdrs)) + nb + 4 * m
                count -= m
                if lim >= end:
                    break
            append = args.append
            while count:
                if pos >= end:
                    break
                if buf[pos] != 36:  # '$'
                    c = buf[pos:pos + 1]
                    shown = c.decode("latin-1") if 32 <= c[0] < 127 else "\\x%02x" % c[0]
                    self._fail(f"expected '$', got '{shown}'")
                    return out
                nl = find(_CRLF, pos, pos + _MAX_HEADER)
                if nl < 0:
                    if end - pos >= _MAX_HEADER:
                        self._fail("invalid bulk length")
                        return out
                    break
                n = known_len(buf[pos:nl])
                if n is None:
                    n = _length(buf[pos + 1:nl])
                    if n is None or n < 0:
                        self._fail("invalid bulk length")
                        return out
                if n > max_bulk:
                    self._fail("unauthenticated bulk length" if n <= self.max_bulk
                               else "invalid bulk length")
                    return out
                s = nl + 2
                e = s + n
                if e + 2 > end:
                    if n >= _CHUNK_THRESHOLD:
                        # Collect the rest of this bulk without re-joining.
                        self._need = e + 2 - end
                        self._chunks = []
                    break
                if buf[e:e + 2] != _CRLF:
                    self._fail("bulk string not terminated by CRLF")
                    return out
                append(buf[s:e])
                held += n
                pos = e + 2
                count -= 1
            if count:
                break          # incomplete command: keep its arguments
            out.append(args)
            args = None
            held = 0
        self._args = args
        self._left = count if args is not None else 0
        self._held = held if args is not None else 0
        if pos and pos >= end:
            self._buf = b""
            self._pos = 0
        else:
            self._pos = pos
            if self.max_buffer and end - pos + self._held > self.max_buffer:
                self._fail("too big request")
        return out


# The fast path: split the whole batch on CRLF once (one C call), then walk
# the tokens. Headers are looked up in dicts of the common small values, so
# an ordinary command costs no int() and no slicing of headers. It accepts a
# command only when every header is a small known value and every argument
# token has exactly its declared length (a value that contains CRLF, a big
# or odd header, an inline command: the slow path takes over from there,
# and it is the one that reports errors and checks the limits).
_FAST_MAX = 1 << 16
_FAST_COUNTS = {b"*%d" % i: i for i in range(1, 65)}
_FAST_LENS = {b"$%d" % i: i for i in range(0, 4096)}


def _parse_fast(buf):
    """Parse complete, ordinary multibulk commands; return (cmds, bytes used)."""
    toks = buf.split(b"\r\n")
    last = len(toks) - 1          # toks[last] follows the final CRLF
    counts = _FAST_COUNTS
    lens = _FAST_LENS.get
    out = []
    i = 0
    while i < last:
        n = counts.get(toks[i])
        if n is None:
            break
        j = i + 1 + 2 * n
        if j > last:
            break
        if n == 2:                                 # GET key, the common case
            a = toks[i + 2]
            b = toks[i + 4]
            if lens(toks[i + 1]) != len(a) or lens(toks[i + 3]) != len(b):
                break
            out.append([a, b])
        elif n == 3:                               # SET key value
            a = toks[i + 2]
            b = toks[i + 4]
            c = toks[i + 6]
            if (lens(toks[i + 1]) != len(a) or lens(toks[i + 3]) != len(b)
                    or lens(toks[i + 5]) != len(c)):
                break
            out.append([a, b, c])
        else:
            args = toks[i + 2:j:2]
            if [*map(lens, toks[i + 1:j:2])] != [*map(len, args)]:
                break
            out.append(args)
        i = j
    if i == last:
        return out, len(buf) - len(toks[last])
    return out, sum(map(len, toks[:i])) + 2 * i


_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b",
            ord("a"): b"\a", ord('"'): b'"', ord("\\"): b"\\"}
_HEX = b"0123456789abcdefABCDEF"


def _split_inline(line):
    """Split an inline command line like Redis' ``sdssplitargs``.

    Returns a list of bytes, or None for unbalanced quotes.
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    if b'"' not in line and b"'" not in line:
        return line.split()
    args = []
    i = 0
    n = len(line)
    while True:
        while i < n and line[i] in b" \t\r\n\v\f":
            i += 1
        if i >= n:
            return args
        cur = bytearray()
        inq = insq = False
        while True:
            if inq:
                if i >= n:
                    return None
                c = line[i]
                if (c == 92 and i + 3 < n and line[i + 1] == ord("x")
                        and line[i + 2] in _HEX and line[i + 3] in _HEX):
                    cur.append(int(line[i + 2:i + 4], 16))
                    i += 3
                elif c == 92 and i + 1 < n:
                    i += 1
                    cur += _ESCAPES.get(line[i], bytes([line[i]]))
                elif c == 34:
                    if i + 1 < n and line[i + 1] not in b" \t\r\n\v\f":
                        return None
                    inq = False
                    i += 1
                    break
                else:
                    cur.append(c)
            elif insq:
                if i >= n:
                    return None
                c = line[i]
                if c == 92 and i + 1 < n and line[i + 1] == 39:
                    i += 1
                    cur.append(39)
                elif c == 39:
                    if i + 1 < n and line[i + 1] not in b" \t\r\n\v\f":
                        return None
                    insq = False
                    i += 1
                    break
                else:
                    cur.append(c)
            else:
                if i >= n:
                    break
                c = line[i]
                if c in b" \t\r\n\v\f":
                    break
                if c == 34:
                    inq = True
                elif c == 39:
                    insq = True
                else:
                    cur.append(c)
            i += 1
        args.append(bytes(cur))


# ---------------------------------------------------------------- encoding

OK = b"+OK\r\n"
PONG = b"+PONG\r\n"
QUEUED = b"+QUEUED\r\n"
NULL2 = b"$-1\r\n"
NULL3 = b"_\r\n"
ZERO = b":0\r\n"
ONE = b":1\r\n"

_INTS = [b":%d\r\n" % i for i in range(-2, 1025)]


def integer(n):
    if -2 <= n <= 1024:
        return _INTS[n + 2]
    return b":%d\r\n" % n


def bulk(b):
    return b"$%d\r\n%b\r\n" % (len(b), b)


def error(msg):
    """A RESP error line; ``msg`` is str and must start with the error code."""
    msg = msg.replace("\r", " ").replace("\n", " ")
    return b"-" + msg.encode("utf-8", "replace") + _CRLF


def encode(obj, resp3=False):
    """Encode a Python value as a RESP reply (used off the hot path)."""
    if obj is None:
        return NULL3 if resp3 else NULL2
    if obj is True or obj is False:
        if resp3:
            return b"#t\r\n" if obj else b"#f\r\n"
        return ONE if obj else ZERO
    if isinstance(obj, int):
        return integer(obj)
    if isinstance(obj, float):
        if resp3:
            return b",%r\r\n" % obj
        return bulk(repr(obj).encode())
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bulk(bytes(obj))
    if isinstance(obj, str):
        return bulk(obj.encode())
    if isinstance(obj, dict):
        if resp3:
            parts = [b"%%%d\r\n" % len(obj)]
            for k, v in obj.items():
                parts.append(encode(k, True))
                parts.append(encode(v, True))
            return b"".join(parts)
        parts = [b"*%d\r\n" % (2 * len(obj))]
        for k, v in obj.items():
            parts.append(encode(k, False))
            parts.append(encode(v, False))
        return b"".join(parts)
    if isinstance(obj, (list, tuple)):
        parts = [b"*%d\r\n" % len(obj)]
        parts.extend(encode(x, resp3) for x in obj)
        return b"".join(parts)
    return bulk(str(obj).encode())
