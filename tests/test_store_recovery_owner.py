"""Store.recovery_thread: losses processed by one thread only.

With ``recovery_thread`` set, ``process_losses()`` on any other thread does
nothing; ``touches_lost(key)`` says, without waiting, whether a read would
meet the lost memory; a read elsewhere that does meet it waits until the
owner has processed the loss, and reads that do not meet it go on at once.
``recover(processed=counts)`` then reports the lost keys on the calling
thread.
"""

import threading
import time

import pytest

import kvstore
from kvstore import KeyLostError


def _store():
    s = kvstore.Store("8MiB", page_size="4K", kernel_policy="keep_ue", recovery="manual")
    for i in range(2000):
        s.put(b"o:%04d" % i, b"value %04d " % i * 8)
    return s


def _other_subpage_key(s, victim):
    off, _n = s.locate(victim)
    for i in range(2000):
        k = b"o:%04d" % i
        o, n = s.locate(k)
        if o // 4096 != off // 4096 and (o + n - 1) // 4096 != off // 4096:
            return k
    raise AssertionError("no key on another subpage")


def test_only_the_owner_processes_and_others_wait_only_for_lost_memory():
    s = _store()
    try:
        victim = b"o:0500"
        other = _other_subpage_key(s, victim)
        assert not s.touches_lost(victim) and s.recovery_thread == 0
        ready, go, done = threading.Event(), threading.Event(), threading.Event()
        counts = {}

        def owner():
            s.recovery_thread = threading.get_ident()
            ready.set()
            go.wait(10)
            time.sleep(0.3)              # the reader below must wait for this
            counts.update(s.process_losses())
            done.set()
        t = threading.Thread(target=owner)
        t.start()
        assert ready.wait(10)
        lost = []
        s.on_loss(lambda keys: lost.append((threading.get_ident(), list(keys))))
        s.faults.inject_key(victim, kind="ao")
        assert s.losses_unprocessed
        # not the owner: nothing processed here
        assert s.process_losses()["ranges"] == 0
        assert s.losses_unprocessed
        # a read of another subpage goes on at once; the victim's would wait
        assert s.touches_lost(victim) and not s.touches_lost(other)
        assert s.get(other) == b"value %s " % other[2:] * 8
        assert not done.is_set()
        go.set()
        with pytest.raises(KeyLostError):
            s.get(victim)                # waits for the owner, then LOST (no source)
        assert done.is_set(), "the read did not wait for the owner"
        t.join(10)
        assert counts["ranges"] >= 1 and counts["keys_lost"] >= 1
        assert not s.losses_unprocessed
        r = s.recover(processed=counts)
        assert r["keys_lost"] == counts["keys_lost"]
        assert lost and lost[0][0] == threading.get_ident() and victim in lost[0][1]
        # hand back: any thread processes again
        s.recovery_thread = 0
        s.faults.inject_key(other, kind="ao")
        assert s.process_losses()["ranges"] >= 1
    finally:
        s.close()


def test_touches_lost_never_waits_or_processes():
    s = _store()
    try:
        s.recovery_thread = threading.get_ident() + 1      # some other thread owns recovery
        s.faults.inject_key(b"o:0042", kind="ao")
        t0 = time.monotonic()
        assert s.touches_lost(b"o:0042")
        assert not s.touches_lost(b"absent key")
        assert time.monotonic() - t0 < 1.0
        assert s.losses_unprocessed       # still waiting for its owner
        s.recovery_thread = 0
        s.recover()
        assert not s.losses_unprocessed
        with pytest.raises(KeyLostError):
            s.get(b"o:0042")
        assert not s.touches_lost(b"o:0042")  # LOST now: answered at once, no wait
    finally:
        s.close()


def test_take_lost_while_the_owner_grows_the_queue():
    """Reporting lost keys on the loop thread can wait for the owner (a lookup
    meets memory lost since), and the owner then queues more lost keys
    (reallocating the queue): the report must not read the old queue.
    Under ASan a read of the freed queue aborts; without it, the keys of
    both losses must come out exactly once."""
    s = kvstore.Store("16MiB", page_size="4K", kernel_policy="keep_ue", recovery="manual")
    try:
        keys = [b"q:%05d" % i for i in range(6000)]
        for k in keys:
            s.put(k, b"x" * 60)
        by_sub = {}
        for k in keys:
            by_sub.setdefault(s.locate(k)[0] // 4096, []).append(k)
        subs = sorted(by_sub)
        first, rest = subs[0], subs[1:]
        s.faults.inject(first * 4096, "ao")
        counts = s.process_losses()          # queued: the first subpage's keys
        assert counts["keys_lost"] == len(by_sub[first])
        ready, go, done = threading.Event(), threading.Event(), threading.Event()
        owner_counts = {}

        def owner():
            s.recovery_thread = threading.get_ident()
            ready.set()
            go.wait(10)
            time.sleep(0.2)
            owner_counts.update(s.process_losses())
            done.set()
        t = threading.Thread(target=owner)
        t.start()
        assert ready.wait(10)
        # the directory (every lookup meets it, and finds its key again once
        # it is rebuilt), and enough record subpages to queue hundreds more
        # keys once the owner processes them
        directory = [i for i in range((16 << 20) // 4096) if s.subpage_kind(i)[0] == "directory"]
        assert directory
        s.faults.inject(directory[0] * 4096, "ao")
        for sub in rest[:40]:
            s.faults.inject(sub * 4096, "ao")
        go.set()
        got = s.take_lost(0, "rebuilding")   # its lookups wait for the owner
        t.join(10)
        assert done.is_set()
        names = [k for k, _v, _st in got]
        assert len(names) == len(set(names))
        later = [k for k, _v, _st in s.take_lost(0, "rebuilding")]
        assert not set(names) & set(later)
        assert set(names) | set(later) <= set(keys)
    finally:
        s.recovery_thread = 0
        s.close()
