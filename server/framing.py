"""Native protocol framing: 4-byte big-endian length + one msgpack object.

``FrameParser`` is the hiredis-style incremental reader for the native
protocol (see PROTOCOL.md): ``feed(bytes)``, then ``gets()`` returns the next
decoded object or ``NEED_MORE``. The length prefix is checked against
``max_frame`` before any buffer of that size exists, and msgpack unpacking runs
with explicit limits (no ext types, bounded str/bin/array/map lengths).

Errors are :class:`FrameError`; after one the stream cannot be resynced
(an oversized length or an undecodable body), so the connection replies
``PROTO`` with request id 0 and closes.
"""

import msgpack

from kvstore.wire import LENGTH as _LEN
from kvstore.wire import MAGIC, NEED_MORE, FrameError, pack_frame

from .inbuf import InputBuffer

# MAGIC, NEED_MORE, FrameError and pack_frame are kvstore.wire's, re-exported.
__all__ = ["FrameParser", "FrameError", "NEED_MORE", "MAGIC", "pack_frame"]

_CHUNK_THRESHOLD = 1 << 16


def _why(exc):
    """What was wrong with a frame msgpack refused, in words (no class names)."""
    if isinstance(exc, msgpack.StackError):
        return "nested too deeply"
    if isinstance(exc, msgpack.FormatError):
        return "not valid msgpack"
    text = str(exc)
    if "exceeds" in text or "max_" in text:
        return "a string, array or map is over the server's limits"
    return "not valid msgpack"


class FrameParser(InputBuffer):
    """Incremental reader of native frames, magic first."""

    __slots__ = ("_magic", "max_frame", "_unpacker")

    def __init__(self, max_frame=(512 + 1) * 1024 * 1024, max_str=1024 * 1024,
                 max_array=1024 * 1024 * 2, max_map=1024 * 1024,
                 expect_magic=True):
        super().__init__()
        self._magic = expect_magic
        self.max_frame = max_frame
        # One Unpacker per connection, fed one whole frame at a time: cheaper
        # than unpackb() with its keyword limits on every frame.
        self._unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, use_list=True,
                                          max_str_len=max_str, max_bin_len=max_frame,
                                          max_array_len=max_array, max_map_len=max_map,
                                          max_ext_len=0, max_buffer_size=max(max_frame, 1024))

    @property
    def magic_pending(self):
        return self._magic

    def read_magic(self):
        """Consume the 4-byte magic: True once read, False if more is needed."""
        if not self._magic:
            return True
        avail = len(self._buf) - self._pos
        head = self._buf[self._pos:self._pos + 4]
        if head != MAGIC[:len(head)]:
            raise FrameError("bad magic: expected b'\\x00KV1'")
        if avail < 4:
            return False
        self._pos += 4
        self._magic = False
        return True

    def gets(self):
        """Return the next decoded frame, or ``NEED_MORE``."""
        if self._need > 0:
            return NEED_MORE
        buf = self._buf
        pos = self._pos
        end = len(buf)
        if end - pos < 4:
            return NEED_MORE
        (n,) = _LEN.unpack_from(buf, pos)
        if n > self.max_frame:
            raise FrameError(f"frame length {n} exceeds max_frame {self.max_frame}")
        if n == 0:
            raise FrameError("empty frame")
        s = pos + 4
        e = s + n
        if e > end:
            if n >= _CHUNK_THRESHOLD:
                self._need = e - end
                self._chunks = []
            return NEED_MORE
        u = self._unpacker
        start = u.tell()
        u.feed(buf[s:e] if n < _CHUNK_THRESHOLD else memoryview(buf)[s:e])
        self._pos = e
        if e >= end:
            self._buf = b""
            self._pos = 0
        try:
            obj = u.unpack()
        except msgpack.OutOfData:
            raise FrameError("undecodable frame: truncated msgpack object") from None
        except Exception as exc:  # FormatError, StackError, ValueError (limits)...
            raise FrameError(f"undecodable frame: {_why(exc)}") from None
        if u.tell() - start != n:
            raise FrameError("undecodable frame: extra data after the msgpack object")
        return obj

    def gets_all(self):
        """Every complete frame in the buffer (may raise FrameError)."""
        out = []
        while True:
            obj = self.gets()
            if obj is NEED_MORE:
                return out
            out.append(obj)

