"""Hash slots exactly as Redis Cluster computes them (the one definition).

A key maps to one of :data:`SLOTS` (16384) slots: CRC16 (the XMODEM variant:
polynomial 0x1021, initial value 0, no reflection, no final xor) of the key,
modulo 16384. When the key holds a ``{`` followed later by a ``}`` with at
least one byte between them, only the bytes between the *first* ``{`` and the
first ``}`` after it are hashed (the hash tag), so ``{user1}.a`` and
``{user1}.b`` share a slot. An empty tag (``{}``) or a ``{`` with no ``}``
after it means the whole key is hashed. This is Redis's ``keyHashSlot()``.

A pure-Python leaf (like :mod:`kvstore.wire`): the server's cluster mode
(``kvstore.server.cluster.slots`` re-exports these) and the cluster client
(``kvstore.client.ClusterClient``) use the same function.
"""

__all__ = ["SLOTS", "crc16", "hash_tag", "key_slot"]

#: Number of hash slots, as in Redis Cluster.
SLOTS = 16384


def _table():
    t = []
    for i in range(256):
        c = i << 8
        for _ in range(8):
            c = ((c << 1) ^ 0x1021) if c & 0x8000 else (c << 1)
        t.append(c & 0xFFFF)
    return tuple(t)


_TABLE = _table()


def crc16(data):
    """CRC16/XMODEM of ``data`` (bytes-like): ``crc16(b"123456789") == 0x31C3``."""
    crc = 0
    t = _TABLE
    for b in bytes(data):
        crc = ((crc << 8) & 0xFF00) ^ t[((crc >> 8) ^ b) & 0xFF]
    return crc


def _as_bytes(key):
    if isinstance(key, str):
        raise TypeError("keys are bytes; encode the str first (e.g. key.encode())")
    return bytes(key)


def hash_tag(key):
    """The bytes that are hashed for ``key``: its hash tag, or the whole key."""
    key = _as_bytes(key)
    s = key.find(b"{")
    if s >= 0:
        e = key.find(b"}", s + 1)
        if e > s + 1:
            return key[s + 1:e]
    return key


def key_slot(key):
    """The hash slot (0..16383) of ``key`` (bytes-like), as Redis Cluster."""
    return crc16(hash_tag(key)) & (SLOTS - 1)
