"""One table from exceptions to replies, for both protocols.

A command (in :mod:`.ops` or an adapter) fails by raising. The dispatcher of
each protocol turns the exception into its reply with :func:`resp_error` (a
complete RESP error line) or :func:`native_error` (``[code, message,
extra]``), both reading :data:`ERRORS`, so the two protocols cannot drift.

:class:`CommandError` carries both forms itself: the RESP text (starting with
its error code, as Redis writes it) and the native code and message. Store
exceptions (lost keys, a full store, limits) are mapped by class.
"""

from kvstore.errors import (
    ClosedError, FaultInjectionError, KeyLostError, KeyTooLargeError, ReadOnlyError,
    ResponseError, SourceBehindError, StoreFullError, UnrecoverableKeyError, ValueTooLargeError,
)

from .logs import event
from .resp import error as _resp_line

__all__ = ["CommandError", "NoReplicasError", "ReplicaReadOnlyError", "ERRORS",
           "native_error", "resp_error"]


class CommandError(Exception):
    """A command failed.

    ``resp``: the RESP error text, code first (``"ERR syntax error"``).
    ``code``/``msg``/``extra``: the native error; by default the first word
    of ``resp`` and the rest.
    """

    def __init__(self, resp, code=None, msg=None, extra=None):
        super().__init__(resp)
        self.reply = _resp_line(resp)
        if code is None:
            code, _, rest = resp.partition(" ")
            if msg is None:
                msg = rest
        self.code = code
        self.msg = resp if msg is None else msg
        self.extra = extra or {}


def native_only(code, msg, extra=None):
    """An error of a native op (RESP text ``CODE msg``)."""
    return CommandError(f"{code} {msg}", code, msg, extra)


class ReplicaReadOnlyError(ReadOnlyError):
    """A client write on a replica."""

    code = "READONLY"
    resp_reply = b"-READONLY You can't write against a read only replica.\r\n"


class NoReplicasError(ResponseError):
    """Fewer online replicas than --min-replica-acks."""

    code = "NOREPLICAS"
    resp_reply = b"-NOREPLICAS Not enough good replicas to write.\r\n"


def _lost_resp(e):
    ver = e.version if e.version is not None else -1
    if isinstance(e, UnrecoverableKeyError):
        return b"-LOST key was lost to a memory error (version %d), unrecoverable\r\n" % ver
    return b"-LOST key was lost to a memory error (version %d), retry\r\n" % ver


def _internal(e, what, where):
    event("error", what, **where, error=f"{type(e).__name__}: {e}")


#: (exception class, RESP line of e, native [code, message, extra] of e);
#: the first row whose class matches wins, so subclasses come first.
ERRORS = [
    (CommandError, lambda e: e.reply, lambda e: [e.code, e.msg, e.extra]),
    (UnrecoverableKeyError, _lost_resp,
     lambda e: ["UNRECOVERABLE", str(e), {"version": e.version}]),
    (KeyLostError, _lost_resp, lambda e: ["LOST", str(e), {"version": e.version}]),
    (StoreFullError, lambda e: b"-OOM command not allowed: the store is full\r\n",
     lambda e: ["FULL", str(e) or "the store is full", {}]),
    (KeyTooLargeError, lambda e: b"-ERR key is too large\r\n", lambda e: ["TOOLARGE", str(e), {}]),
    (ValueTooLargeError, lambda e: b"-ERR value is too large\r\n",
     lambda e: ["TOOLARGE", str(e), {}]),
    (ClosedError, lambda e: b"-ERR the server is shutting down\r\n",
     lambda e: ["BUSY", str(e) or "the server is shutting down", {}]),
    (ReplicaReadOnlyError, lambda e: e.resp_reply, lambda e: [e.code, str(e), {}]),
    (NoReplicasError, lambda e: e.resp_reply, lambda e: [e.code, str(e), {}]),
    (SourceBehindError, lambda e: _resp_line(f"BEHIND {e}"),
     lambda e: ["BEHIND", str(e), dict(getattr(e, "extra", None) or {})]),
    (FaultInjectionError, lambda e: _resp_line(f"ERR fault injection failed: {e}"),
     lambda e: ["ERR", f"fault injection failed: {e}", {}]),
    (OverflowError, lambda e: b"-ERR value is out of range\r\n",
     lambda e: ["ERR", "value is out of range", {}]),
    (ValueError, lambda e: _resp_line(f"ERR {e}"), lambda e: ["ERR", str(e), {}]),
]

#: Any other exception is a bug: logged with its class and message, and the
#: client gets this, which names no Python exception.
_INTERNAL = "internal error (logged by the server)"


def resp_error(e, conn=None, name=b"?"):
    """The RESP error line for exception ``e``."""
    for cls, resp, _native in ERRORS:
        if isinstance(e, cls):
            return resp(e)
    _internal(e, "command_failed", {"id": getattr(conn, "id", 0), "cmd": bytes(name[:64])})
    return _resp_line(f"ERR {_INTERNAL}")


def native_error(e, conn=None, name="?"):
    """The native ``[code, message, extra]`` for exception ``e``."""
    for cls, _resp, native in ERRORS:
        if isinstance(e, cls):
            return native(e)
    _internal(e, "op_failed", {"id": getattr(conn, "id", 0), "op": str(name)[:64]})
    return ["ERR", _INTERNAL, {}]
