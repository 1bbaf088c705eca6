"""The input buffer both protocol parsers share.

Bytes from ``data_received`` are appended with :meth:`InputBuffer.feed`;
the parser consumes from ``_buf[_pos:]``. While a large bulk string or frame
is arriving, the parser sets ``_chunks = []`` and ``_need`` (bytes still
missing): chunks are then only collected, and joined once, when the whole
item is there, instead of re-copying the growing buffer on every read.
"""

__all__ = ["InputBuffer"]


class InputBuffer:
    __slots__ = ("_buf", "_pos", "_chunks", "_need", "_chunked")

    def __init__(self):
        self._buf = b""
        self._pos = 0
        self._chunks = None     # pending chunks while a big item arrives
        self._need = 0          # bytes still missing before parsing is worth it
        self._chunked = 0       # bytes in _chunks

    def buffered(self):
        """Number of bytes held and not yet consumed."""
        n = len(self._buf) - self._pos
        if self._chunks:
            n += self._chunked
        return n

    def feed(self, data):
        """Append bytes received from the socket."""
        if self._chunks is not None:
            self._chunks.append(bytes(data))
            self._chunked += len(data)
            self._need -= len(data)
            if self._need > 0:
                return
            self._chunks.insert(0, self._buf[self._pos:])
            self._buf = b"".join(self._chunks)
            self._pos = 0
            self._chunks = None
            self._chunked = 0
            self._need = 0
            return
        if self._pos >= len(self._buf):
            self._buf = bytes(data)
        else:
            self._buf = self._buf[self._pos:] + data
        self._pos = 0
