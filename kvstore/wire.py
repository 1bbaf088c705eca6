"""The native protocol's wire format, shared by the server and the client.

Pure Python (``struct`` and ``msgpack``), so it imports without the C engine.
server/PROTOCOL.md is the specification: a connection opens with
:data:`MAGIC`; then every frame is a 4-byte big-endian length ``N`` followed
by ``N`` bytes holding one msgpack object. Requests are ``[request_id, op,
args]``; replies are ``[request_id, status, result]``, status 0 (ok) or 1
(``result`` is ``[code, message, extra]``).

The two incremental readers differ by what they defend against and stay with
their side: the server's (``kvstore.server.framing``) enforces the server's
limits on untrusted input; the client's (``kvstore.client._protocol``) reads
replies.
"""

import struct

import msgpack

__all__ = ["MAGIC", "NEED_MORE", "LENGTH", "DEFAULT_MAX_FRAME", "FrameError", "pack_frame",
           "encode_request"]

#: First bytes a native client sends (the leading 0x00 tells it from RESP).
MAGIC = b"\x00KV1"

#: The 4-byte big-endian length prefix of every frame.
LENGTH = struct.Struct(">I")

#: Default largest frame (the server's default max_frame: a 512 MiB value
#: plus room for the rest of the request).
DEFAULT_MAX_FRAME = 512 * 2**20 + 2**20


class _NeedMore:
    __slots__ = ()

    def __repr__(self):
        return "NEED_MORE"


#: What a frame reader's ``gets()`` returns while no whole frame is buffered.
NEED_MORE = _NeedMore()


class FrameError(Exception):
    """Malformed native stream (bad magic, oversized or undecodable frame)."""


def pack_frame(packer, obj):
    """Length-prefixed msgpack encoding of ``obj`` (``packer`` reused)."""
    body = packer.pack(obj)
    return LENGTH.pack(len(body)) + body


def encode_request(request_id, op, args, too_large=ValueError):
    """One request frame (length prefix included) as bytes; raises
    ``too_large`` when the request does not fit in one frame."""
    body = msgpack.packb([request_id, op, args], use_bin_type=True)
    if len(body) > 0xFFFFFFFF:
        raise too_large(f"request of {len(body)} bytes does not fit in one frame (max 4 GiB)")
    return LENGTH.pack(len(body)) + body
