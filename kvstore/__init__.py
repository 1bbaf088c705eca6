"""kvstore: a fault-tolerant in-memory key-value store.

The arena lives in HugeTLB memfds; an uncorrectable memory error costs only the
records in the 4 KiB subpage that was hit, and those are rebuilt from a replica.

``kvstore.Store``, ``kvstore.LOST``, ``kvstore.parse_size`` and
``kvstore.key_hash`` load the C
engine on first use, so ``kvstore.client`` (and ``kvstore.errors``,
``kvstore.wire``) import on a machine without the engine built.
"""

from .errors import (  # noqa: F401 - the exceptions are kvstore.<Name> too
    ArenaError, ClosedError, ConnectionError, Error, FaultInjectionError,
    KeyLostError, KeyTooLargeError, MemoryFaultError, ProtocolError,
    ReadOnlyError, ResponseError, SourceBehindError, StoreFullError, TimeoutError,
    UnrecoverableKeyError, ValueTooLargeError,
)

__version__ = "0.1.0"

_FROM_STORE = ("Store", "LOST", "parse_size", "key_hash", "ArenaHandover")


def __getattr__(name):
    if name in _FROM_STORE:
        from . import store
        value = getattr(store, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvstore' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_FROM_STORE))
