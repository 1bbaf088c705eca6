"""Exceptions raised by kvstore.

Every exception derives from :class:`Error`. Where a builtin exception has the
same meaning, the kvstore exception inherits it too, so ``except KeyError`` or
``except TimeoutError`` keeps working for code that does not know kvstore.
"""


class Error(Exception):
    """Base class of every kvstore exception."""

    #: True when the same operation may succeed if retried later.
    retryable = False


class KeyLostError(Error):
    """The key existed, but the memory holding its record was lost.

    The key is not absent: its last version is known (``version``) and it will
    come back once it is rebuilt from a replica. Retryable.
    """

    retryable = True

    def __init__(self, key, version=None, msg=None):
        self.key = key
        self.version = version
        super().__init__(msg or f"key {key!r} was lost to a memory error "
                         f"(version {version}); it is being rebuilt or has no replica")


class UnrecoverableKeyError(KeyLostError):
    """A lost key that no rebuild source could return before the deadline."""

    retryable = False


class SourceBehindError(Error):
    """A rebuild source cannot answer ``fetch_hash_range(lo, hi, min_version)``
    yet: it has not applied every write and delete up to ``min_version``, or
    part of the range is lost on it too. The requester retries later (or asks
    another source). Retryable."""

    retryable = True


class StoreFullError(Error, MemoryError):
    """No room left in the arena for this record (nothing was written)."""


class KeyTooLargeError(Error, ValueError):
    """The key is longer than the configured limit."""


class ValueTooLargeError(Error, ValueError):
    """The value is longer than the configured limit."""


class ClosedError(Error, ValueError):
    """The store (or client) is closed."""


class ArenaError(Error, OSError):
    """The arena could not be created (hugepages not reserved, memfd failed...)."""


class MemoryFaultError(Error, OSError):
    """A guarded access touched memory that was lost (SIGBUS / poisoned subpage).

    ``offset`` is the arena offset of the first lost byte that was touched.
    """

    def __init__(self, msg, offset=None):
        self.offset = offset
        super().__init__(msg)


class FaultInjectionError(Error, OSError):
    """Fault injection was refused (unsupported kind or kernel, not allowed)."""


class ProtocolError(Error, ValueError):
    """Malformed data on the wire."""


class ResponseError(Error):
    """The server answered a command with an error."""


class ReadOnlyError(ResponseError):
    """The server is a replica and refuses writes."""


class ConnectionError(Error, ConnectionError):  # noqa: A001 - deliberate
    """Could not reach the server, or the connection broke."""

    retryable = True


class TimeoutError(Error, TimeoutError):  # noqa: A001 - deliberate
    """An operation did not finish in time."""

    retryable = True
