"""kvstore: a fault-tolerant in-memory key-value store.

The arena lives in HugeTLB memfds; an uncorrectable memory error costs only the
records in the 4 KiB subpage that was hit, and those are rebuilt from a replica.
"""

from .errors import (  # noqa: F401
    ArenaError, ClosedError, ConnectionError, Error, FaultInjectionError,
    KeyLostError, KeyTooLargeError, MemoryFaultError, ProtocolError,
    ReadOnlyError, ResponseError, StoreFullError, TimeoutError,
    UnrecoverableKeyError, ValueTooLargeError,
)

from .store import LOST, Store, parse_size  # noqa: E402,F401

__version__ = "0.1.0"
