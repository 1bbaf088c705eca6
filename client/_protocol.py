"""Native protocol v1 framing, shared by the sync and the asyncio client.

This file knows bytes and msgpack, nothing about sockets. It builds request
frames (``encode_request``), splits the reply stream into frames with a
feed()/gets() parser that answers "need more" instead of blocking (so a socket
loop and asyncio's ``data_received`` drive it the same way), and turns error
replies into :mod:`kvstore.errors` exceptions (``error_from_reply``).

Wire format (server/PROTOCOL.md): the client opens with ``b"\\x00KV1"``; then
every frame is a 4-byte big-endian length ``N`` followed by ``N`` bytes of one
msgpack object. Requests are ``[request_id, op, args]``; replies are
``[request_id, status, result]`` with status 0 (ok) or 1 (``result`` is
``[code, message, extra]``).
"""

import msgpack

from kvstore import errors, wire
from kvstore.wire import DEFAULT_MAX_FRAME, MAGIC, NEED_MORE  # noqa: F401 - re-exported

_LEN = wire.LENGTH
_MAX_REQUEST_ID = 2**31 - 1


def encode_request(request_id, op, args):
    """Return one request frame (length prefix included) as bytes."""
    return wire.encode_request(request_id, op, args, errors.ValueTooLargeError)


def next_request_id(request_id):
    """The id after ``request_id`` (ids are 1..2**31-1; 0 is the server's)."""
    return 1 if request_id >= _MAX_REQUEST_ID else request_id + 1


class FrameParser:
    """Incremental reply-frame parser: ``feed(bytes)``, then ``gets()``.

    ``gets()`` returns the next decoded msgpack object, or :data:`NEED_MORE`
    when the buffer does not hold a whole frame yet. A frame length above
    ``max_frame`` raises :class:`kvstore.errors.ProtocolError` as soon as the
    4 length bytes are in, before the body is buffered; so does a body that is
    not exactly one msgpack object. After an error the stream cannot be
    resynced: the owner must drop the connection.
    """

    __slots__ = ("_buf", "_pos", "max_frame")

    def __init__(self, max_frame=DEFAULT_MAX_FRAME):
        self._buf = bytearray()
        self._pos = 0
        self.max_frame = max_frame

    def feed(self, data):
        """Append received bytes."""
        self._buf += data

    def buffered(self):
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._pos

    def gets(self):
        """Return the next complete frame's object, or :data:`NEED_MORE`."""
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < 4:
            self._compact()
            return NEED_MORE
        (size,) = _LEN.unpack_from(buf, pos)
        if size > self.max_frame:
            raise errors.ProtocolError(
                f"reply frame of {size} bytes exceeds max_frame={self.max_frame}")
        if avail < 4 + size:
            self._compact()
            return NEED_MORE
        start = pos + 4
        end = start + size
        with memoryview(buf) as view, view[start:end] as body:
            try:
                obj = msgpack.unpackb(body, raw=False, strict_map_key=False,
                                      use_list=True)
            except Exception as exc:  # msgpack raises several unrelated types
                raise errors.ProtocolError(f"undecodable reply frame: {exc}") from None
        if end == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
        return obj

    def _compact(self):
        # Drop consumed bytes once they dominate the buffer, so a long
        # pipeline does not shift the buffer once per frame.
        if self._pos and (self._pos >= 65536 or self._pos * 2 >= len(self._buf)):
            del self._buf[:self._pos]
            self._pos = 0


def check_reply(reply, request_id):
    """Validate a reply's shape and id; return ``(status, result)``.

    A reply with id 0 and an error status is the server's answer to a frame it
    could not parse (code ``PROTO``); it is returned as such so the caller can
    raise it. Any other mismatch raises :class:`kvstore.errors.ProtocolError`.
    """
    if type(reply) is not list or len(reply) != 3:
        raise errors.ProtocolError(f"malformed reply frame: {reply!r:.200}")
    rid, status, result = reply
    if rid != request_id and not (rid == 0 and status == 1):
        raise errors.ProtocolError(
            f"reply for request {rid!r} while waiting for request {request_id}")
    if status not in (0, 1):
        raise errors.ProtocolError(f"unknown reply status {status!r}")
    return status, result


class AuthenticationError(errors.ResponseError, PermissionError):
    """The server wants a password (``NOAUTH``) or refused the one given."""


class DisabledError(errors.ResponseError):
    """The server's configuration refuses this command (``DISABLED``)."""


class InjectionDisabledError(DisabledError, errors.FaultInjectionError):
    """The server does not allow fault injection (``DISABLED`` for ``inject``)."""


class ServerProtocolError(errors.ResponseError, errors.ProtocolError):
    """The server could not parse what it was sent (``PROTO``); it closes
    the connection after this reply."""


_SIMPLE_ERRORS = {
    "FULL": errors.StoreFullError,
    "TOOLARGE": errors.ValueTooLargeError,
    "READONLY": errors.ReadOnlyError,
    "NOAUTH": AuthenticationError,
    "DISABLED": DisabledError,
    "PROTO": ServerProtocolError,
    "BEHIND": errors.SourceBehindError,
}


def error_from_reply(result, key=None, op=None):
    """Return the exception for an error reply's ``[code, message, extra]``.

    ``key`` is the command's key (if it has exactly one) so that a
    :class:`~kvstore.errors.KeyLostError` names it; ``op`` the command's op.
    Every returned exception carries the protocol code in ``.code`` and the
    reply's extra map in ``.extra``.
    """
    if type(result) is not list or len(result) < 2:
        exc = errors.ProtocolError(f"malformed error reply: {result!r:.200}")
        exc.code = "PROTO"
        return exc
    code, message = result[0], result[1]
    extra = result[2] if len(result) > 2 and isinstance(result[2], dict) else {}
    code = str(code)
    message = str(message)
    if code in ("LOST", "UNRECOVERABLE"):
        cls = errors.KeyLostError if code == "LOST" else errors.UnrecoverableKeyError
        if key is None:
            key = extra.get("key")
        exc = cls(key, extra.get("version"), f"{code} {message}")
    elif code == "DISABLED" and op == "inject":
        exc = InjectionDisabledError(f"{code} {message}")
    elif code == "TOOLARGE" and extra.get("what") == "key":
        exc = errors.KeyTooLargeError(f"{code} {message}")
    else:
        exc = _SIMPLE_ERRORS.get(code, errors.ResponseError)(f"{code} {message}")
    exc.code = code
    exc.extra = extra
    return exc


def handshake_error(result, where):
    """The exception for an error frame sent instead of the hello.

    ``BUSY`` (too many clients, or shutting down) means the server did not
    take the connection: a :class:`kvstore.errors.ConnectionError`, retried
    like any connection that could not be opened (nothing was sent).
    """
    exc = error_from_reply(result)
    if exc.code == "BUSY":
        conn_exc = errors.ConnectionError(f"server at {where} refused the connection: {exc}")
        conn_exc.code = "BUSY"
        return conn_exc
    return exc
