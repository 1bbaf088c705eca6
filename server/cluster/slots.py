"""Hash slots for the server's cluster mode.

The slot function (Redis Cluster's ``keyHashSlot()``: CRC16/XMODEM of the key
or of its ``{hash tag}``, mod 16384) is defined once in :mod:`kvstore.slots`,
a pure leaf the client imports too; this module re-exports it. The tests
compare it with a real cluster-enabled redis-server's ``CLUSTER KEYSLOT``.

Slot sets are written as sorted, disjoint, inclusive ``(lo, hi)`` ranges, the
form ``CLUSTER SLOTS`` and the slot map in etcd use.
"""

__all__ = ["SLOTS", "crc16", "key_slot", "hash_tag", "to_ranges", "from_ranges",
           "normalize", "even_split", "count", "contains", "SlotRangeError"]

from kvstore.slots import SLOTS, crc16, hash_tag, key_slot  # noqa: F401 - the one definition


class SlotRangeError(ValueError):
    """A slot or slot range outside 0..16383, or an inverted range."""


def _check_slot(s):
    if type(s) is not int or not 0 <= s < SLOTS:
        raise SlotRangeError(f"slot {s!r} is not an integer in 0..{SLOTS - 1}")


def normalize(ranges):
    """Sorted, merged, validated list of ``(lo, hi)`` ranges (inclusive)."""
    rs = []
    for r in ranges:
        try:
            lo, hi = r
        except (TypeError, ValueError):
            raise SlotRangeError(f"slot range {r!r} is not a (lo, hi) pair") from None
        _check_slot(lo)
        _check_slot(hi)
        if lo > hi:
            raise SlotRangeError(f"slot range {lo}-{hi} is inverted")
        rs.append((lo, hi))
    rs.sort()
    out = []
    for lo, hi in rs:
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def to_ranges(slots):
    """Ranges covering exactly the given slots (any iterable of ints)."""
    ss = sorted(set(slots))
    for s in ss:
        _check_slot(s)
    out = []
    for s in ss:
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


def from_ranges(ranges):
    """The set of slots the ranges cover."""
    out = set()
    for lo, hi in normalize(ranges):
        out.update(range(lo, hi + 1))
    return out


def count(ranges):
    """Number of slots the ranges cover."""
    return sum(hi - lo + 1 for lo, hi in normalize(ranges))


def contains(ranges, slot):
    """True when ``slot`` lies in one of the (normalized) ranges."""
    return any(lo <= slot <= hi for lo, hi in ranges)


def even_split(n):
    """All 16384 slots in ``n`` contiguous ranges whose sizes differ by at most one.

    Same arithmetic as ``redis-cli --cluster create``: for ``n == 3`` this is
    ``[(0, 5460), (5461, 10922), (10923, 16383)]``.
    """
    if type(n) is not int or not 1 <= n <= SLOTS:
        raise SlotRangeError(f"cannot split {SLOTS} slots into {n!r} shards")
    per = SLOTS / n
    out = []
    first, cursor = 0, 0.0
    for i in range(n):
        last = int(cursor + per - 1 + 0.5)      # lround: halves away from zero
        if last > SLOTS - 1 or i == n - 1:
            last = SLOTS - 1
        last = max(last, first)
        out.append((first, last))
        first = last + 1
        cursor += per
    return out
