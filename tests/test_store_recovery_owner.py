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
