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


class RespParser(InputBuffer):
    """Incremental RESP request parser (multibulk and inline commands)."""

    __slots__ = ("error", "max_multibulk", "max_bulk", "max_inline", "max_buffer")

    def __init__(self, max_multibulk=1024 * 1024, max_bulk=512 * 1024 * 1024,
                 max_inline=64 * 1024, max_buffer=1024 * 1024 * 1024):
        super().__init__()
        self.error = None       # bytes: RESP error line after a protocol error
        self.max_multibulk = max_multibulk
        self.max_bulk = max_bulk
        self.max_inline = max_inline
        self.max_buffer = max_buffer

    @property
    def pending(self):
        """True while bytes of an unfinished command (or an error) are held."""
        return bool(self._buf) or self._chunks is not None or self.error is not None

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

    def _parse(self, limit):
        if (not limit and not self._pos and len(self._buf) <= _FAST_MAX
                and self.max_multibulk >= 64 and self.max_bulk >= 4095):
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
        max_bulk = self.max_bulk
        while pos < end:
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
                args = _split_inline(line)
                if args is None:
                    self._fail("unbalanced quotes in request")
                    return out
                if args:
                    out.append(args)
                    if limit and len(out) >= limit:
                        break
                continue
            nl = find(_CRLF, pos, pos + _MAX_HEADER)
            if nl < 0:
                if end - pos >= _MAX_HEADER:
                    self._fail("invalid multibulk length")
                    return out
                break
            try:
                count = int(buf[pos + 1:nl])
            except ValueError:
                self._fail("invalid multibulk length")
                return out
            if count > self.max_multibulk:
                self._fail("invalid multibulk length")
                return out
            p = nl + 2
            if count <= 0:
                pos = p
                continue
            args = []
            append = args.append
            while count:
                if p >= end:
                    break
                if buf[p] != 36:  # '$'
                    c = buf[p:p + 1]
                    shown = c.decode("latin-1") if 32 <= c[0] < 127 else "\\x%02x" % c[0]
                    self._fail(f"expected '$', got '{shown}'")
                    return out
                nl = find(_CRLF, p, p + _MAX_HEADER)
                if nl < 0:
                    if end - p >= _MAX_HEADER:
                        self._fail("invalid bulk length")
                        return out
                    break
                try:
                    n = int(buf[p + 1:nl])
                except ValueError:
                    self._fail("invalid bulk length")
                    return out
                if n < 0 or n > max_bulk:
                    self._fail("invalid bulk length")
                    return out
                s = nl + 2
                e = s + n
                if e + 2 > end:
                    if n >= _CHUNK_THRESHOLD:
                        # Collect the rest of this bulk without re-joining.
                        self._need = e + 2 - end
                        self._chunks = []
                    p = -1
                    break
                if buf[e:e + 2] != _CRLF:
                    self._fail("bulk string not terminated by CRLF")
                    return out
                append(buf[s:e])
                p = e + 2
                count -= 1
            if count:
                break          # incomplete command: wait for more bytes
            pos = p
            out.append(args)
            if limit and len(out) >= limit:
                break
        self._pos = pos
        if pos and pos >= end:
            self._buf = b""
            self._pos = 0
        elif self.max_buffer and end - pos > self.max_buffer:
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
