"""A full sync from a primary with LOST keys: the replica learns them as LOST.

The snapshot carries each key the primary has LOST (not rebuilt yet) as an
``["l", key, version]`` marker. The replica enters it LOST (``mark_lost``),
so a read answers LOST, never nil -- also after the replica is promoted --
and the key comes back with the right value once a source has it.
"""

import os
import signal

import pytest

from replutil import client, digest, rc, start, start_replica, wait_for, wait_link_up, wait_synced
from serverutil import store_available

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow,
              pytest.mark.skipif(not store_available(), reason="kvstore.Store is not built")]

NKEYS = 400


def key(i):
    return b"ls:%04d" % i


def value(k):
    return k + b"|" + b"v" * 60


def load(srv):
    c = client(srv)
    for i in range(NKEYS):
        c.put(key(i), value(key(i)))
    c.close()


def lose_keys(srv):
    """One UE under a key's record: -> {key: version} of the keys it took."""
    c = client(srv, retries=0)
    c.inject("ao", key=key(NKEYS // 2))
    lost = wait_for(lambda: {k: v for k, v, _s in c.lost()} or None, 10,
                    what="keys reported lost")
    c.close()
    return lost


def assert_reads_lost(srv, keys):
    c = client(srv, retries=0)
    try:
        for k in keys:
            try:
                got = c.getv(k)
            except Exception as e:  # noqa: BLE001 - LOST is the right answer
                assert "LOST" in str(e) or type(e).__name__ == "KeyLostError", repr(e)
            else:
                raise AssertionError(f"{k!r} answered {got!r}, not LOST")
            assert c.exists(k), f"{k!r} reported absent"
        assert set(keys) <= {k for k, _v, _s in c.lost()}
    finally:
        c.close()


def test_full_sync_carries_lost_keys_and_promotion_keeps_them_lost():
    p = start()            # no replicas: nobody can rebuild what it loses
    r = None
    try:
        load(p)
        lost = lose_keys(p)
        r = start_replica(p)
        wait_link_up(r)
        few = sorted(lost)[:4]
        assert_reads_lost(r, few)
        assert digest(r)[1] == len(lost)
        # the rest of the data arrived intact
        c = client(r)
        for i in (0, 1, NKEYS - 1):
            if key(i) not in lost:
                assert c.getv(key(i))[1] == value(key(i))
        c.close()
        # promoted, the replica still reports them lost, never absent
        assert rc(r).execute_command("REPLICAOF", "NO", "ONE") == b"OK"
        p.stop()
        p = None
        assert_reads_lost(r, few)
        with pytest.raises(Exception, match="LOST"):
            rc(r).get(few[0])
        assert rc(r).exists(*few) == len(few)
    finally:
        if r is not None:
            r.stop()
        if p is not None:
            p.stop()


def test_lost_keys_synced_to_a_replica_come_back_once_a_source_has_them():
    p = start()
    r1 = start_replica(p)
    r2 = None
    try:
        wait_link_up(r1)
        load(p)
        wait_synced(p, r1)
        os.kill(r1.pid, signal.SIGSTOP)      # the only source is down
        try:
            lost = lose_keys(p)
            r2 = start_replica(p)
            wait_link_up(r2)
            few = sorted(lost)[:3]
            assert_reads_lost(r2, few)
        finally:
            os.kill(r1.pid, signal.SIGCONT)
        # the primary rebuilds from r1 and streams the installs to r2
        c2 = client(r2)
        wait_for(lambda: not c2.lost(), 30, what="the replica's LOST keys rebuilt")
        for k, ver in lost.items():
            assert c2.getv(k) == (ver, value(k))
        wait_synced(p, r2)
        # promoted, it answers the values
        assert rc(r2).execute_command("REPLICAOF", "NO", "ONE") == b"OK"
        for k, ver in lost.items():
            assert c2.getv(k) == (ver, value(k))
        c2.close()
    finally:
        os.kill(r1.pid, signal.SIGCONT)
        for s in (r2, r1, p):
            if s is not None:
                s.stop()
