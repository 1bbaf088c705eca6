"""kvstore: a fault-tolerant in-memory key-value store.

The arena lives in HugeTLB memfds; an uncorrectable memory error costs only the
records in the 4 KiB subpage that was hit, and those are rebuilt from a replica.
"""

import os as _os

# kvstore.server and kvstore.client live in the repository's server/ and
# client/ folders (pyproject maps them there). An installed package finds them
# through the install; a source checkout run without installing finds them here.
_repo = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_repo, "server", "__init__.py")) and _repo not in __path__:
    __path__.append(_repo)

from .errors import (  # noqa: F401
    ArenaError, ClosedError, ConnectionError, Error, FaultInjectionError,
    KeyLostError, KeyTooLargeError, MemoryFaultError, ProtocolError,
    ReadOnlyError, ResponseError, SourceBehindError, StoreFullError, TimeoutError,
    UnrecoverableKeyError, ValueTooLargeError,
)

from .store import LOST, Store, key_hash, parse_size  # noqa: E402,F401

__version__ = "0.1.0"
