"""Capacity of the embedded Store: full stores fail cleanly, deletes free
space, and the compactor keeps overwrite churn working, also after faults.
"""

import random

import pytest

import kvstore
from storeutil import SUB, Replica, lost_set, open_2m, record_map, reserved_2m

POLICIES = ["keep_ue", "mainline"]


def fill_until_full(s, size_of, prefix=b"f"):
    """Put keys until StoreFullError; return {key: value} written."""
    model = {}
    i = 0
    while True:
        k, v = prefix + b"%d" % i, bytes([i % 251]) * size_of(i)
        try:
            s.put(k, v)
        except kvstore.StoreFullError as e:
            return model, k, e
        model[k] = v
        i += 1
        assert i < 10**6


@pytest.mark.parametrize("policy", POLICIES)
def test_fill_to_full_is_clean(policy):
    with kvstore.Store("256KiB", page_size="4K", kernel_policy=policy, recovery="manual") as s:
        model, failed_key, err = fill_until_full(s, lambda i: 1000)
        assert isinstance(err, MemoryError) and isinstance(err, kvstore.Error)
        assert "nothing was written" in str(err)
        assert len(model) >= 200                       # 4 x 1008 B records per 4 KiB subpage
        # nothing half-written: the failing key is absent
        assert s.get(failed_key) is None and failed_key not in s
        assert len(s) == len(model)
        # an overwrite that does not fit keeps the previous value
        some = next(iter(model))
        with pytest.raises(kvstore.StoreFullError):
            s.put(some, b"z" * 50000)
        assert s.get(some) == model[some]
        with pytest.raises(kvstore.StoreFullError):
            s.mput({b"new-a": b"1" * 3000, b"new-b": b"2" * 60000})
        assert s.get(b"new-b") is None
        for k, v in model.items():
            assert s.get(k) == v
        # deletes free space: puts succeed again
        for k in list(model)[:20]:
            assert s.delete(k)
            del model[k]
        for j in range(15):
            s.put(b"again%d" % j, b"a" * 1000)
            model[b"again%d" % j] = b"a" * 1000
        # and a big value fits once enough is freed
        with pytest.raises(kvstore.StoreFullError):
            s.put(b"big", b"b" * 40000)
        for k in list(model)[:200]:
            s.delete(k)
            del model[k]
        s.put(b"big", b"b" * 40000)
        assert s.get(b"big") == b"b" * 40000
        for k, v in model.items():
            assert s.get(k) == v


def test_fill_small_values_counts_and_used():
    with kvstore.Store("128KiB", page_size="4K", recovery="manual") as s:
        model, _k, _e = fill_until_full(s, lambda i: 16 + i % 48)
        st = s.stats()
        assert st["keys"] == len(model)
        assert st["used"] >= sum(len(v) for v in model.values())
        assert st["used"] <= st["capacity"]
        # at fill, live records and the index are most of the capacity
        # (the capacity holds both)
        assert (st["used"] + st["index_bytes"]) / st["capacity"] > 0.5


@pytest.mark.parametrize("policy", POLICIES)
def test_overwrite_churn_compacts(policy):
    rng = random.Random(7)
    cap = 1 << 20
    with kvstore.Store(cap, page_size="4K", kernel_policy=policy, recovery="manual") as s:
        model = {}
        nkeys = 900            # ~ 900 x 520 B = 45% of capacity live
        for step in range(40000):
            k = b"c%d" % rng.randrange(nkeys)
            v = rng.randbytes(rng.randint(16, 1024))
            s.put(k, v)
            model[k] = v
            if step % 7 == 0:
                d = b"c%d" % rng.randrange(nkeys)
                assert s.delete(d) == (d in model)
                model.pop(d, None)
        st = s.stats()
        assert st["compactions"] > 0 and st["records_moved"] > 0, st
        assert len(s) == len(model)
        for k, v in model.items():
            assert s.get(k) == v
        # every record is small: used is exactly the header + value bytes of the live keys
        assert st["used"] == sum(8 + len(v) for v in model.values())


@pytest.mark.parametrize("policy", POLICIES)
def test_churn_with_faults_keeps_data_right(policy):
    rng = random.Random(8)
    rep = Replica()
    with kvstore.Store("1MiB", page_size="4K", kernel_policy=policy, recovery="manual",
                       rebuild_source=rep) as s:
        model = {}
        nkeys = 600
        faults = 0
        for step in range(25000):
            k = b"c%d" % rng.randrange(nkeys)
            v = rng.randbytes(rng.randint(16, 1024))
            rep.record(k, s.put(k, v), v)
            model[k] = v
            if step % 500 == 250:
                victim = rng.choice(list(model))
                try:
                    s.faults.inject_key(victim, rng.choice(["ao", "ar"]))
                    faults += 1
                except kvstore.KeyLostError:
                    pass
            if step % 50 == 0:
                s.recover()
        assert s.wait_recovered(10)
        st = s.stats()
        assert faults >= 40 and st["faults_injected"] == faults
        assert st["compactions"] > 0 and st["records_moved"] > 0
        assert st["keys_lost_total"] > 0
        assert st["lost_keys"] == 0 and lost_set(s) == set()
        assert st["quarantined_subpages"] >= 1
        for k, v in model.items():
            assert s.get(k) == v
        lost = set(s.arena.lost_subpages())
        for off, ln in record_map(s).values():
            assert not lost & set(range(off // SUB, (off + ln - 1) // SUB + 1))


def test_churn_at_two_thirds_live_never_full():
    rng = random.Random(7)
    with kvstore.Store(1 << 20, page_size="4K", recovery="manual") as s:
        nkeys = 1300           # ~ 1300 x 530 B = 65% of capacity live
        full = 0
        for step in range(20000):
            k = b"c%d" % rng.randrange(nkeys)
            try:
                s.put(k, rng.randbytes(rng.randint(16, 1024)))
            except kvstore.StoreFullError:
                full += 1
        st = s.stats()
        assert full == 0, (full, st["used"], st["dead_bytes"], st["capacity"])


def test_compact_call_directly():
    with kvstore.Store("1MiB", page_size="4K", recovery="manual") as s:
        for i in range(1000):
            s.put(b"k%d" % i, b"v" * 200)
        for i in range(1000):
            if i % 5:
                s.delete(b"k%d" % i)
        moved = s.compact()
        assert moved > 0
        assert s.stats()["records_moved"] == moved
        for i in range(0, 1000, 5):
            assert s.get(b"k%d" % i) == b"v" * 200


def test_compaction_over_a_latent_fault():
    """A record the compactor moves sits on an armed (ar) subpage: the move
    faults, the key goes LOST (never moved as garbage), the rest moves."""
    with kvstore.Store("1MiB", page_size="4K", recovery="manual") as s:
        for i in range(1000):
            s.put(b"k%d" % i, b"v%d" % i * 30)
        for i in range(1000):
            if i % 10:
                s.delete(b"k%d" % i)
        victims = {k for k, (off, ln) in record_map(s).items()
                   if off // SUB == s.locate(b"k500")[0] // SUB}
        s.faults.inject_key(b"k500", "ar")
        s.compact()
        s.recover()
        lost = lost_set(s)
        assert lost <= victims
        for i in range(0, 1000, 10):
            k = b"k%d" % i
            if k in lost:
                with pytest.raises(kvstore.KeyLostError):
                    s.get(k)
            else:
                assert s.get(k) == b"v%d" % i * 30


@pytest.mark.hugepages
def test_fill_on_2m():
    with reserved_2m(2):
        s = open_2m("2MiB", "keep_ue", 2, recovery="manual")
        try:
            model, failed, _e = fill_until_full(s, lambda i: 100 + i % 900)
            assert s.get(failed) is None
            assert all(s.get(k) == v for k, v in model.items())
            assert s.stats()["used"] / s.stats()["capacity"] > 0.6
        finally:
            s.close()
