"""Index-page memory errors in a replication group, with real processes.

A UE aimed at a key's index entry (``inject(kind, entry=key)``) loses the
whole hash range of that index page: its keys are LOST until rebuilt from a
peer with the native ``fetch_range`` op. On the primary under client load:
every key back, no wrong answer, replica digest equal afterwards; the same
on a replica (rebuilt from the primary). With a stopped replica the
primary's lost range stays LOST (never an older value, never a deleted key
back) until the replica catches up. A replica whose own range is lost, or
that is behind, answers ``BEHIND``.
"""

import os
import re
import signal

import pytest

import kvstore
from kvstore import errors
from replutil import (NKEYS, Load, all_keys_back, check, client, digest, info, key, load_and_sync,
                      load_keys, log_events, start, start_replica, value, wait_for, wait_link_up,
                      wait_synced)
from serverutil import store_available

pytestmark = [pytest.mark.timeout(150), pytest.mark.slow,
              pytest.mark.skipif(not store_available(), reason="kvstore.Store is not built")]


def wait_ranges_rebuilt(srv, at_least=1, timeout=30):
    """Until ``at_least`` lost ranges were rebuilt (an ``ar`` loss is found
    only at the next touch) and none is pending."""
    c = client(srv)
    try:
        def done():
            st = c.stats()
            return st["ranges_rebuilt"] >= at_least and st["lost_ranges"] == 0 and not c.lost()
        try:
            wait_for(done, timeout, what="lost index ranges rebuilt")
        except AssertionError:
            st = c.stats()
            raise AssertionError(f"lost ranges not rebuilt: lost={c.lost()[:5]} " + str(
                {k: v for k, v in st.items() if "range" in k or "lost" in k})) from None
        return c.stats()
    finally:
        c.close()


def test_fetch_range_op_pages_and_refuses_bad_input():
    p = start()
    try:
        load_keys(p)
        c = client(p)
        whole = c.fetch_hash_range(0, 1 << 64, 0)
        assert len(whole) == NKEYS
        k = key(17)
        assert whole[k][1] == value(k, 0) and whole[k][2] is None
        # small pages: the union is the same, and pages follow the hash order
        out, pos, pages = {}, 0, 0
        while pos is not None:
            nxt, got = c.fetch_range_page(pos, 1 << 64, 0, max_bytes=20000)
            assert all(pos <= kvstore.key_hash(kk) < (nxt or 1 << 64) for kk in got)
            out.update(got)
            pos, pages = nxt, pages + 1
        assert pages > 10 and out == whole
        # a sub-range holds exactly the keys hashing into it
        lo, hi = 1 << 62, 1 << 63
        part = c.fetch_hash_range(lo, hi)
        assert set(part) == {kk for kk in whole if lo <= kvstore.key_hash(kk) < hi}
        # a version this node has not reached
        with pytest.raises(errors.SourceBehindError):
            c.fetch_range_page(0, 1 << 64, 10 ** 12)
        with pytest.raises(ValueError):
            c.fetch_range_page(5, 5, 0)           # an empty range is refused before sending
        c.close()
    finally:
        p.stop()


@pytest.mark.parametrize("policy,kind", [("keep_ue", "ao"), ("keep_ue", "ar"), ("mainline", "ar")])
def test_index_ue_on_primary_under_load(policy, kind):
    p = start(policy=policy)
    r = start_replica(p, policy=policy)
    try:
        load_and_sync(p, r)
        c = client(p)
        with Load(p, [p]) as load:
            load.wait_progress()
            for i in (11, 2222, 5555):
                c.inject(kind, entry=key(i))
                load.wait_progress(100)
            load.wait_progress()
        assert not load.errors, load.errors[:5]
        assert not load.wrong, load.wrong[:5]
        st = wait_ranges_rebuilt(p, 3 if kind == "ao" else 1)
        assert st["ranges_given_up"] == 0
        assert st["repl_peer_range_keys_fetched"] > 0
        all_keys_back(p)
        wait_synced(p, r)                  # same keys, versions and bytes on both
        c.close()
    finally:
        r.stop()
        p.stop()


@pytest.mark.parametrize("policy", ["keep_ue", "mainline"])
def test_index_ue_on_replica_rebuilt_from_primary(policy):
    p = start(policy=policy)
    r = start_replica(p, policy=policy)
    try:
        load_and_sync(p, r)
        with Load(p, [r]) as load:
            load.wait_progress()
            cr = client(r)
            cr.inject("ar", entry=key(77))
            cr.inject("ao", entry=key(4321))
            load.wait_progress()
            cr.close()
        assert not load.errors, load.errors[:5]
        assert not load.wrong, load.wrong[:5]
        st = wait_ranges_rebuilt(r, 2)
        assert st["repl_peer_range_keys_fetched"] > 0
        wait_synced(p, r)
        all_keys_back(r)
    finally:
        r.stop()
        p.stop()


def test_replica_with_lost_range_answers_behind():
    p = start()
    r = start_replica(p)
    try:
        load_and_sync(p, r)
        os.kill(p.pid, signal.SIGSTOP)       # the replica cannot rebuild it meanwhile
        try:
            cr = client(r, retries=0)
            k = key(99)
            cr.inject("ao", entry=k)
            h = kvstore.key_hash(k)
            def behind():
                try:
                    cr.fetch_range_page(h, h + 1, 0)
                except errors.SourceBehindError as e:
                    return e
                return None
            e = wait_for(behind, 10, what="the replica to refuse its lost range")
            assert "lost here too" in str(e) or "behind" in str(e)
        finally:
            os.kill(p.pid, signal.SIGCONT)
        wait_ranges_rebuilt(r)
        assert cr.fetch_range_page(h, h + 1, 0)[1][k][1] == value(k, 0)
        cr.close()
    finally:
        os.kill(p.pid, signal.SIGCONT)
        r.stop()
        p.stop()


def test_lagging_replica_index_ue_no_stale_no_resurrection():
    p = start()
    r = start_replica(p)
    try:
        load_and_sync(p, r)
        c = client(p, retries=0)
        target = key(1234)
        h = kvstore.key_hash(target)
        # keys sharing the target's index page: found by asking for a hash range around it
        near = sorted((abs(kvstore.key_hash(key(i)) - h), key(i)) for i in range(NKEYS))
        victims = [kk for _d, kk in near[:40] if kk != target]
        rewritten, deleted = victims[:5], victims[5:10]
        os.kill(r.pid, signal.SIGSTOP)
        try:
            # the replica does not see these
            new_versions = {kk: c.put(kk, value(kk, 7)) for kk in [target, *rewritten]}
            for kk in deleted:
                assert c.delete(kk)
            c.inject("ao", entry=target)
            wait_for(lambda: c.stats().get("lost_ranges", 0) >= 1, 10,
                     what="the index range to be lost")
            for kk in [target, *rewritten, *deleted]:
                if c.stats().get("lost_ranges", 0) == 0:
                    break                          # the range covered fewer keys
                try:
                    got = c.getv(kk)
                except errors.KeyLostError:
                    continue                       # LOST: right while the replica lags
                # never an older value, never a deleted key back
                if kk in deleted:
                    assert got is None, (kk, got)
                else:
                    assert got == (new_versions[kk], value(kk, 7)), (kk, got)
            assert c.stats()["lost_ranges"] >= 1   # still LOST: the replica is behind
        finally:
            os.kill(r.pid, signal.SIGCONT)
        st = wait_ranges_rebuilt(p)
        assert st["ranges_given_up"] == 0
        for kk in [target, *rewritten]:
            assert c.getv(kk) == (new_versions[kk], value(kk, 7))
        for kk in deleted:
            assert c.get(kk) is None
        wait_synced(p, r)
        assert digest(p) == digest(r)
        # the replica answers at a version it has applied, BEHIND past it
        # (a delete takes a version too: the primary's numbering reaches it)
        v = c.put(target, value(target, 8))
        assert c.delete(victims[-1])
        wait_synced(p, r)
        cr = client(r, retries=0)
        assert cr.fetch_range_page(h, h + 1, v + 1)[1][target][:2] == (v, value(target, 8))
        with pytest.raises(errors.SourceBehindError):
            cr.fetch_range_page(h, h + 1, v + 2)
        cr.close()
        c.close()
    finally:
        os.kill(r.pid, signal.SIGCONT)
        r.stop()
        p.stop()


def test_fetch_range_needs_a_user_who_reads_every_key(tmp_path):
    from serverutil import start_server
    from test_server_native import Native
    path = tmp_path / "users.acl"
    path.write_text("user default on nopass ~* &* +@all\n"
                    "user keyed on >pw ~app:* &* +@all\n"
                    "user peer on >pw ~* &* -@all +kv.fetch\n")
    with start_server("--aclfile", str(path), "--capacity", "16MiB") as srv:
        n = Native(srv)
        assert n.ok("put", b"app:1", b"v")
        n.ok("auth", "keyed", "pw")
        assert n.ok("get", b"app:1") == b"v"
        assert n.err("fetch_range", 0, None, 0) == "NOPERM"      # values of keys outside ~app:*
        n.ok("auth", "peer", "pw")
        nxt, got = n.ok("fetch_range", 0, None, 0)
        assert nxt is None and got[b"app:1"][1] == b"v"
        assert n.err("fetch_range", 5, 5, 0) == "ERR"            # empty range
        assert n.err("fetch_range", 0, None, -1) == "TYPE"
        assert n.err("fetch_range", 0, None, 10 ** 12) == "BEHIND"
        n.close()


def test_full_sync_carries_the_primarys_lost_range():
    """A new replica full-syncs from a primary with a LOST index range (its
    only other source withheld): the snapshot ends with the range's marker,
    so the replica reports the range's keys LOST, never nil, and every other
    key as on the primary. Once the primary rebuilds the range from its
    other replica, the new replica rebuilds it from the primary."""
    p = start()
    r1 = start_replica(p)
    r2 = None
    try:
        load_and_sync(p, r1)
        c = client(p, retries=0)
        k = key(4242)
        os.kill(r1.pid, signal.SIGSTOP)        # the primary's only source: withheld
        try:
            c.inject("ao", entry=k)
            wait_for(lambda: c.stats().get("lost_ranges", 0) >= 1, 10, what="the index range to be lost")
            # the range's keys, from the primary's log line naming the range
            # (a read of each would wait for a read-repair through r1)
            lines = [ln for ln in p.logs().splitlines() if "kvstore index ue: hash range" in ln]
            assert lines, "the primary logs the lost range"
            lo, hi = (int(x, 16) for x in re.search(r"\[(0x[0-9a-f]+), (0x[0-9a-f]+)\]", lines[-1]).groups())
            inside = [key(i) for i in range(NKEYS) if lo <= kvstore.key_hash(key(i)) <= hi]
            assert k in inside and len(inside) < NKEYS // 4
            with pytest.raises(errors.KeyLostError):
                c.get(k)
            r2 = start_replica(p)
            wait_link_up(r2)
            assert log_events(r2, "full_sync_done")
            c2 = client(r2, retries=0)
            for kk in [k, *inside[:2]]:
                with pytest.raises(errors.KeyLostError):
                    c2.get(kk)                 # lost on the primary: lost here, never nil
            assert c2.stats()["lost_ranges"] >= 1
            assert info(p)["sync_full_lost_ranges"] >= 1
            ins = set(inside)
            rest = [key(i) for i in range(NKEYS) if key(i) not in ins]
            for base in range(0, len(rest), 500):
                for kk, v in zip(rest[base:base + 500], c2.mget(rest[base:base + 500])):
                    check(kk, v)
            assert c.stats()["lost_ranges"] >= 1   # still LOST on the primary meanwhile
        finally:
            os.kill(r1.pid, signal.SIGCONT)
        st = wait_ranges_rebuilt(p)
        assert st["ranges_given_up"] == 0
        assert c.get(k) == value(k, 0)
        wait_ranges_rebuilt(r2)                # from the primary, once it had the range again
        all_keys_back(r2)
        assert c2.get(k) == value(k, 0)
        wait_synced(p, r2)
        c2.close()
        c.close()
    finally:
        os.kill(r1.pid, signal.SIGCONT)
        if r2 is not None:
            r2.stop()
        r1.stop()
        p.stop()
