"""Memory faults on the index itself (DESIGN.md "Records and index").

The index lives in the arena as hash-ordered 4 KiB pages: a fault on one
makes exactly the keys of its hash range LOST (never absent, never wrong),
and they are rebuilt with ``fetch_hash_range`` from a source that has
applied every write and delete up to the version the store names. These
tests aim faults at index pages (``locate_entry``) and at the directory,
with ``ao`` and ``ar``, both kernel policies, on 4 KiB and 2 MiB backings;
they check the rebuild contract with lagging and deleting model sources,
and that orphaned records are reclaimed.
"""

import random
import time

import pytest
import xxhash

import kvstore
from storeutil import SUB, NameOnlyReplica, Replica, open_2m, reserved_2m

KINDS = ["ao", "ar"]
POLICIES = ["keep_ue", "mainline"]


def live_bytes(model):
    return sum(8 + len(v) + (len(k) if len(k) > 1024 else 0) for k, v in model.items())


def filled(store, replica, n, rng, lo=1, hi=300):
    model = {}
    for i in range(n):
        k = b"key:%06d" % i
        v = rng.randbytes(rng.randint(lo, hi))
        ver = store.put(k, v)
        if replica is not None:
            replica.record(k, ver, v)
        model[k] = v
    return model


def range_of(store, key):
    off, ln = store.locate_entry(key)
    kind, lo, hi = store.subpage_kind(off // SUB)
    assert kind == "index" and ln >= 16
    assert lo <= kvstore.key_hash(key) <= hi
    return lo, hi


def in_range(key, rng_):
    return rng_[0] <= kvstore.key_hash(key) <= rng_[1]


def touch(store, key, kind):
    """An ``ar`` fault fires on the next touch: read a key of that page."""
    if kind == "ar":
        try:
            store.get(key)
        except kvstore.KeyLostError:
            pass


# ------------------------------------------------------------- the hash

def test_key_hash_is_public_and_stable():
    for key in (b"", b"a", b"key:000001", bytes(range(256)) * 9):
        assert kvstore.key_hash(key) == xxhash.xxh64_intdigest(key, seed=0x6B7673746F7265)
    # fixed values: replicas on other machines and versions must agree
    assert kvstore.key_hash(b"") == 0x8c76ac52ef1e3318
    assert kvstore.key_hash(b"key:000001") == 0xb9b59d304f47e898
    assert kvstore.key_hash(bytearray(b"abc")) == kvstore.key_hash(b"abc")
    with pytest.raises(TypeError):
        kvstore.key_hash("abc")


def test_locate_entry_names_an_index_page_covering_the_key():
    rng = random.Random(1)
    with kvstore.Store("4MiB", page_size="4K", recovery="manual") as s:
        model = filled(s, None, 3000, rng)
        st = s.stats()
        assert st["index_pages"] > 8 and st["index_bytes"] >= st["index_pages"] * SUB
        seen = set()
        for k in list(model)[::50]:
            seen.add(range_of(s, k))
        assert len(seen) > 4
        with pytest.raises(KeyError):
            s.locate_entry(b"absent")


# ------------------------------------------------- faults on index pages

def _index_fault_roundtrip(s, rep, model, kind):
    victim = sorted(model)[len(model) // 3]
    hit = range_of(s, victim)
    hit_keys = {k for k in model if in_range(k, hit)}
    assert victim in hit_keys
    s.faults.inject_entry(victim, kind)
    touch(s, victim, kind)
    s.recover()
    # before any rebuild: hit keys are "range", every other key reads right
    for k, v in model.items():
        if k not in hit_keys:
            assert s.get(k) == v
    assert s.stats()["index_pages_lost"] >= 1
    # reads of hit keys repair them by hash; nothing absent, nothing wrong
    for k in sorted(hit_keys)[:5]:
        assert s.get(k) == model[k]
    assert s.wait_recovered(10)
    for k, v in model.items():
        assert s.get(k) == v
    st = s.stats()
    assert st["keys"] == len(s) == len(model)
    assert sorted(s.keys()) == sorted(model)
    assert st["used"] == live_bytes(model)          # orphans reclaimed, nothing leaked
    assert st["lost_ranges"] == 0 and st["ranges_rebuilt"] >= 1
    return hit_keys


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_index_page_fault_4k(policy, kind):
    rng = random.Random(5)
    rep = Replica()
    with kvstore.Store("4MiB", page_size="4K", kernel_policy=policy, rebuild_source=rep,
                       recovery="manual") as s:
        model = filled(s, rep, 4000, rng)
        hit = _index_fault_roundtrip(s, rep, model, kind)
        assert 0 < len(hit) < len(model) // 4
        # the store keeps working: writes, deletes, more faults
        for k in list(model)[:200]:
            model[k] = rng.randbytes(40)
            rep.record(k, s.put(k, model[k]), model[k])
        _index_fault_roundtrip(s, rep, model, kind)


@pytest.mark.hugepages
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_index_page_fault_2m(policy, kind):
    rng = random.Random(6)
    rep = Replica()
    with reserved_2m(6):
        s = open_2m(4 << 20, policy, 6, rebuild_source=rep, recovery="manual")
        with s:
            model = filled(s, rep, 4000, rng)
            _index_fault_roundtrip(s, rep, model, kind)
            if policy == "mainline":
                st = s.stats()
                assert st["pages_salvaged"] >= 1 and st["lost_subpages"] >= 1


@pytest.mark.parametrize("policy", POLICIES)
def test_no_source_keys_of_the_range_raise_keylost_others_read(policy):
    rng = random.Random(7)
    with kvstore.Store("4MiB", page_size="4K", kernel_policy=policy, recovery="manual") as s:
        model = filled(s, None, 3000, rng)
        victim = sorted(model)[100]
        hit = range_of(s, victim)
        s.faults.inject_entry(victim, "ao")
        s.recover()
        assert s.wait_recovered(5)
        n_hit = 0
        for k, v in model.items():
            if in_range(k, hit):
                n_hit += 1
                with pytest.raises(kvstore.KeyLostError) as ei:
                    s.get(k)
                assert ei.value.retryable and ei.value.key == k
                assert s.state(k) == "range"
                with pytest.raises(kvstore.KeyLostError):
                    s.mget([k])
                assert s.mget([k], on_lost="mark") == [kvstore.LOST]
            else:
                assert s.get(k) == v
        assert n_hit > 0
        st = s.stats()
        assert st["lost_ranges_reason"] == "no rebuild source"
        assert st["ranges_given_up"] == 1
        assert st["used"] == live_bytes({k: v for k, v in model.items() if not in_range(k, hit)})
        # an absent key in that range is not known to be absent: never None
        absent_in_range = next(b"x%d" % i for i in range(10**6) if in_range(b"x%d" % i, hit))
        with pytest.raises(kvstore.KeyLostError):
            s.get(absent_in_range)
        # writes into the lost range work and read back
        s.put(victim, b"new")
        assert s.get(victim) == b"new"


def test_source_without_fetch_hash_range_leaves_range_lost_and_says_why():
    rng = random.Random(8)
    rep = NameOnlyReplica()
    with kvstore.Store("4MiB", page_size="4K", rebuild_source=rep, recovery="manual",
                       read_repair_timeout=0.05) as s:
        model = filled(s, rep, 2000, rng)
        victim = sorted(model)[10]
        s.faults.inject_entry(victim, "ao")
        assert s.wait_recovered(5)
        with pytest.raises(kvstore.KeyLostError):
            s.get(victim)
        assert s.stats()["lost_ranges_reason"] == "the rebuild source has no fetch_hash_range"
        # record losses still rebuild through fetch()
        other = next(k for k in model if s.state(k) == "present")
        s.faults.inject_key(other, "ao")
        assert s.wait_recovered(5)
        assert s.get(other) == model[other]


# ---------------------------------------------------- the rebuild contract

def test_lagging_source_is_never_installed_from():
    """The source has not applied the last writes: it must refuse (here:
    SourceBehindError); nothing older than the last acknowledged write is
    installed; once it catches up, the newest values come back."""
    rng = random.Random(9)
    rep = Replica()
    with kvstore.Store("4MiB", page_size="4K", rebuild_source=rep, recovery="manual",
                       read_repair_timeout=0.05, rebuild_deadline=60) as s:
        model = filled(s, rep, 2000, rng)
        victim = sorted(model)[500]
        hit = range_of(s, victim)
        hit_keys = sorted(k for k in model if in_range(k, hit))
        lag = s.version
        # newer writes the replica has not applied yet (it still holds the old values)
        for k in hit_keys:
            model[k] = b"newest:" + k
            s.put(k, model[k])
        rep.lag_to = lag
        s.faults.inject_entry(victim, "ao")
        s.recover()
        for _ in range(5):
            s.recover()
            for k in hit_keys:
                with pytest.raises(kvstore.KeyLostError):
                    s.get(k)           # never the stale value, never None
        assert s.stats()["lost_ranges"] == 1
        assert rep.range_calls >= 1
        # the replica catches up: it applies the newer writes
        for i, k in enumerate(hit_keys):
            rep.record(k, lag + 1 + i, model[k])
        rep.lag_to = None
        assert s.wait_recovered(10)
        for k, v in model.items():
            assert s.get(k) == v


def test_deletes_never_come_back_and_later_writes_win():
    rng = random.Random(10)
    rep = Replica()
    with kvstore.Store("4MiB", page_size="4K", rebuild_source=rep, recovery="manual") as s:
        model = filled(s, rep, 2000, rng)
        victim = sorted(model)[700]
        hit = range_of(s, victim)
        hit_keys = sorted(k for k in model if in_range(k, hit))
        assert len(hit_keys) >= 4
        before, after, rewritten = hit_keys[0], hit_keys[1], hit_keys[2]
        # deleted before the loss: the replica applied the delete
        assert s.delete(before)
        rep.record_delete(before, s.version)
        del model[before]
        s.faults.inject_entry(victim, "ao")
        s.recover()
        # after the loss, before the rebuild: a delete and a write, which
        # the replica does not have (it answers as of the loss version)
        assert s.delete(after) is True
        del model[after]
        s.put(rewritten, b"written after the loss")
        model[rewritten] = b"written after the loss"
        assert s.get(after) is None
        assert s.wait_recovered(10)
        assert s.get(before) is None and s.get(after) is None
        assert before not in s and after not in s
        assert s.get(rewritten) == b"written after the loss"
        for k, v in model.items():
            assert s.get(k) == v
        assert sorted(s.keys()) == sorted(model)


def test_lagging_delete_is_refused_until_applied():
    """A replica that has not applied a delete acknowledged before the loss
    is behind the loss version: it must refuse, so the key is not resurrected."""
    rng = random.Random(12)
    rep = Replica()
    with kvstore.Store("4MiB", page_size="4K", rebuild_source=rep, recovery="manual",
                       read_repair_timeout=0.05) as s:
        model = filled(s, rep, 1500, rng)
        victim = sorted(model)[300]
        hit = range_of(s, victim)
        gone = next(k for k in sorted(model) if in_range(k, hit) and k != victim)
        assert s.delete(gone)            # the replica does not hear of it yet
        del model[gone]
        s.faults.inject_entry(victim, "ao")
        s.recover()
        with pytest.raises(kvstore.KeyLostError):
            s.get(gone)
        rep.record_delete(gone, s.version)
        assert s.wait_recovered(10)
        assert s.get(gone) is None
        for k, v in model.items():
            assert s.get(k) == v


def test_store_is_a_range_source():
    rng = random.Random(13)
    with kvstore.Store("4MiB", page_size="4K", recovery="manual") as src, \
            kvstore.Store("4MiB", page_size="4K", recovery="manual", rebuild_source=src) as dst:
        model = {}
        for i in range(1500):
            k, v = b"k%05d" % i, rng.randbytes(rng.randint(1, 100))
            model[k] = v
            ver = src.put(k, v)
            dst.put_versioned(k, v, ver)
        lo, hi = 1 << 62, 3 << 62
        got = src.fetch_hash_range(lo, hi)
        assert got == {k: src.get_versioned(k) for k in model if lo <= kvstore.key_hash(k) < hi}
        assert src.fetch_hash_range(0, 1 << 64).keys() == model.keys()
        with pytest.raises(kvstore.SourceBehindError):
            src.fetch_hash_range(0, 1 << 64, min_version=src.version + 1)
        with pytest.raises(ValueError):
            src.fetch_hash_range(5, 5)
        victim = b"k00042"
        dst.faults.inject_entry(victim, "ar")
        touch(dst, victim, "ar")
        assert dst.wait_recovered(10)
        for k, v in model.items():
            assert dst.get(k) == v
        # a store whose own range is lost cannot answer for it
        src.faults.inject_entry(victim, "ao")
        src.recover()
        h = kvstore.key_hash(victim)
        with pytest.raises(kvstore.SourceBehindError):
            src.fetch_hash_range(h, h + 1)


def test_directory_fault_loses_nothing():
    rng = random.Random(14)
    with kvstore.Store("4MiB", page_size="4K", recovery="manual") as s:
        model = filled(s, None, 3000, rng)
        dirs = [i for i in range(s.stats()["capacity"] // SUB) if s.subpage_kind(i)[0] == "directory"]
        assert dirs
        s.faults.inject(dirs[0] * SUB + 100, "ao")
        r = s.recover()
        assert r["keys_lost"] == 0 and r["index_pages_lost"] == 0
        assert s.stats()["index_directory_rebuilds"] == 1
        for k, v in model.items():
            assert s.get(k) == v
        s.put(b"after", b"ok")
        assert s.get(b"after") == b"ok"


def test_long_key_lost_with_its_record_is_repaired_by_name_and_by_hash():
    rep = Replica()
    with kvstore.Store("4MiB", page_size="4K", rebuild_source=rep, recovery="manual") as s:
        long_key = b"L" * 5000
        rep.record(long_key, s.put(long_key, b"value"), b"value")
        rep.record(b"short", s.put(b"short", b"v"), b"v")
        assert s.get(long_key) == b"value"
        s.faults.inject_key(long_key, "ao")
        s.recover()
        assert s.get(long_key) == b"value"        # read-repair by name
        s.faults.inject_key(long_key, "ao")
        assert s.wait_recovered(10)               # rebuilt by its hash
        assert s.state(long_key) == "present" and s.get(long_key) == b"value"


def test_rebuilt_range_keeps_the_sources_expiry():
    rep = Replica()
    with kvstore.Store("4MiB", page_size="4K", rebuild_source=rep, recovery="manual") as s:
        exp = int(time.time() * 1000) + 100_000
        v = s.put(b"t", b"v", ttl=100)
        rep.data[b"t"] = (v, b"v", exp)
        rep.applied = v
        s.faults.inject_entry(b"t", "ao")
        assert s.wait_recovered(10)
        assert s.get(b"t") == b"v"
        assert 90 < s.ttl(b"t") <= 100.01


def test_scrubber_finds_latent_poison_in_the_index():
    rng = random.Random(15)
    rep = Replica()
    with kvstore.Store("4MiB", page_size="4K", rebuild_source=rep, recovery="manual") as s:
        model = filled(s, rep, 2000, rng)
        victim = sorted(model)[1]
        s.faults.inject_entry(victim, "ar")       # latent: nobody touched it
        s.scrub(64 << 20)
        assert s.stats()["index_pages_lost"] == 1
        assert s.wait_recovered(10)
        for k, v in model.items():
            assert s.get(k) == v


def test_many_index_faults_under_churn():
    rng = random.Random(16)
    rep = Replica()
    with kvstore.Store("8MiB", page_size="4K", rebuild_source=rep, recovery="manual") as s:
        model = filled(s, rep, 3000, rng)
        for round_ in range(20):
            keys = sorted(model)
            for _ in range(100):
                k = rng.choice(keys)
                if rng.random() < 0.2:
                    s.delete(k)
                    rep.record_delete(k, s.version)
                    model.pop(k, None)
                else:
                    model[k] = rng.randbytes(rng.randint(1, 200))
                    rep.record(k, s.put(k, model[k]), model[k])
            victim = rng.choice(sorted(model))
            try:
                s.faults.inject_entry(victim, rng.choice(KINDS))
            except kvstore.KeyLostError:
                pass
            touch(s, victim, "ar")
            for k in rng.sample(sorted(model), 20):
                assert s.get(k) == model[k]
        assert s.wait_recovered(20)
        for k, v in model.items():
            assert s.get(k) == v
        st = s.stats()
        assert st["keys"] == len(model)
        assert st["used"] == live_bytes(model)


# ------------------------------------------------ salvage without stopping

@pytest.mark.hugepages
def test_salvage_copy_lets_other_threads_run():
    """Mainline: a whole lost hugepage is copied with the engine unlocked.
    A reader of a key whose record and index entry are on another page
    keeps reading during the copy; a reader of the lost page waits for it
    and then reads the right value."""
    import threading
    with reserved_2m(6):
        s = open_2m(8 << 20, "mainline", 6, recovery="manual")
        with s:
            page = 2 << 20
            model = {}
            pages = set()
            i = 0
            while len(pages) < 2:
                for _ in range(2000):
                    k = b"k%06d" % i
                    model[k] = b"v%06d" % i * 8
                    s.put(k, model[k])
                    pages.add(s.locate(k)[0] // page)
                    i += 1
            # the hit page must not hold the directory; the bystanders' records
            # and index entries must be on other pages (else they wait too)
            nsub = s.stats()["capacity"] // SUB
            dir_pages = {i * SUB // page for i in range(nsub) if s.subpage_kind(i)[0] == "directory"}
            where = {k: (s.locate(k)[0] // page, s.locate_entry(k)[0] // page) for k in model}
            hit_page = next(p for p in sorted({r for r, _e in where.values()}) if p not in dir_pages)
            others = [k for k, (r, e) in where.items() if r != hit_page and e != hit_page]
            same = [k for k, (r, _e) in where.items() if r == hit_page]
            assert len(others) >= 2 and same
            victim = same[0]
            s.arena._set_salvage_delay(400_000)
            reads = {"other": 0, "other_during": 0, "same": 0, "wrong": 0}
            stop = threading.Event()

            def reader(key, slot):
                while not stop.is_set():
                    try:
                        got = s.get(key)
                    except kvstore.KeyLostError:
                        got = model[key]         # its subpage was the poisoned one: fine
                    if got != model[key]:
                        reads["wrong"] += 1
                    reads[slot] += 1
                    if slot == "other" and s.salvaging:
                        reads["other_during"] += 1

            # whichever thread meets the loss first does the copy: two
            # readers of the other page, so one of them is free to read
            threads = [threading.Thread(target=reader, args=(others[0], "other")),
                       threading.Thread(target=reader, args=(others[-1], "other")),
                       threading.Thread(target=reader, args=(same[-1], "same"))]
            for t in threads:
                t.start()
            time.sleep(0.05)
            s.faults.inject(s.locate(victim)[0], "ao")
            t0 = time.monotonic()
            while s.stats()["pages_salvaged"] == 0 and time.monotonic() - t0 < 30:
                s.recover()
                time.sleep(0.01)
            time.sleep(0.05)
            stop.set()
            for t in threads:
                t.join()
            assert s.stats()["pages_salvaged"] == 1
            assert reads["other_during"] > 0, "the reader of another page was stopped by the salvage copy"
            assert reads["wrong"] == 0 and reads["same"] > 0


def test_unknown_key_of_a_lost_range_is_asked_for_and_then_absent():
    """With a caught-up source, a key of a lost range that does not exist
    reads None (after asking), and exists() says False; without being asked
    it is never reported absent."""
    rng = random.Random(17)
    rep = Replica()
    with kvstore.Store("4MiB", page_size="4K", rebuild_source=rep, recovery="manual") as s:
        model = filled(s, rep, 1500, rng)
        victim = sorted(model)[5]
        hit = range_of(s, victim)
        absent = next(b"nope%d" % i for i in range(10**6) if in_range(b"nope%d" % i, hit))
        rep.lag_to = 0                       # held back: the range stays lost for now
        s.faults.inject_entry(victim, "ao")
        s.recover()
        assert s.state(absent) == "range"
        s.read_repair_timeout = 0.05
        with pytest.raises(kvstore.KeyLostError):
            s.get(absent)
        calls = rep.range_calls
        rep.lag_to = None
        s.read_repair_timeout = 5.0
        assert s.get(absent) is None and rep.range_calls > calls
        assert not s.exists(absent) and absent not in s
        assert s.get(victim) == model[victim]
        # a delete of an unknown key in the lost range is recorded and stays
        other = next(k for k in sorted(model) if in_range(k, hit) and s.state(k) == "range")
        assert s.delete(other) is True
        rep.record_delete(other, s.version)
        del model[other]
        assert s.wait_recovered(10)
        assert s.get(other) is None
        for k, v in model.items():
            assert s.get(k) == v


# ------------------------------------------- whole-hugepage loss, no salvage

def _lose_whole_page(s, page):
    """An ``ar`` fault on one subpage of ``page`` under the mainline policy
    with salvage off: the whole 2 MiB page is lost and quarantined."""
    pb = 1 << 21
    sub = page * pb // SUB + 7
    s.faults.inject(sub * SUB, "ar")
    with pytest.raises(kvstore.MemoryFaultError):
        s.arena.read(sub * SUB, 1)
    assert s.arena.stats()["lost_subpages"] >= pb // SUB


def _kinds_on_page(s, page):
    per = (1 << 21) // SUB
    return {s.subpage_kind(i)[0] for i in range(page * per, (page + 1) * per)}


def _whole_page_roundtrip(s, rep, model, page):
    before = s.stats()
    _lose_whole_page(s, page)
    s.recover()
    # Every key of the lost page is LOST or already rebuilt: never absent, never wrong.
    assert s.wait_recovered(timeout=60)
    st = s.stats()
    assert st["lost_subpages"] - before["lost_subpages"] == (1 << 21) // SUB
    assert st["keys_lost_total"] > before["keys_lost_total"]
    assert st["unrecoverable_keys"] == before["unrecoverable_keys"] == 0
    assert s.lost_keys() == []
    for k, v in model.items():
        assert s.get(k) == v, k
    assert sorted(s.keys()) == sorted(model)
    assert len(s) == len(model)
    scanned = s.scan_range(0, (1 << 64) - 1)
    assert {it[1] for it in scanned if it[0] == "key"} == set(model)
    assert all(it[0] == "key" and it[3] == "present" for it in scanned), [it for it in scanned if it[0] != "key"][:3]
    # The store goes on taking writes on the healthy page.
    for i in range(200):
        k = b"after:%04d" % i
        s.put(k, b"v" * 50)
        assert s.get(k) == b"v" * 50


@pytest.mark.hugepages
def test_whole_page_with_the_directory_lost_without_salvage_comes_back_from_the_source():
    rng = random.Random(31)
    rep = Replica()
    with reserved_2m(2):
        s = open_2m(4 << 20, "mainline", 2, rebuild_source=rep, recovery="manual",
                    rebuild_deadline=60.0, read_repair_timeout=5.0)
        with s:
            model = filled(s, rep, 3000, rng, hi=200)
            s.salvage = False
            dirs = [i for i in range(s.stats()["capacity"] // SUB) if s.subpage_kind(i)[0] == "directory"]
            assert dirs
            page = dirs[0] * SUB >> 21
            assert "index" in _kinds_on_page(s, page)
            _whole_page_roundtrip(s, rep, model, page)
            assert s.stats()["index_directory_rebuilds"] >= 1
            assert s.stats()["pages_salvaged"] == 0


@pytest.mark.hugepages
def test_whole_page_of_records_only_lost_without_salvage_comes_back_from_the_source():
    rng = random.Random(32)
    rep = Replica()
    with reserved_2m(4):
        s = open_2m(8 << 20, "mainline", 4, rebuild_source=rep, recovery="manual",
                    rebuild_deadline=60.0, read_repair_timeout=5.0)
        with s:
            # The index is built by the first pass (small values); the second
            # pass only replaces values, so its records fill pages of their own.
            filled(s, rep, 3000, rng, lo=1, hi=10)
            model = filled(s, rep, 3000, rng, lo=800, hi=1500)
            s.salvage = False
            pages = [p for p in range(4) if "records" in _kinds_on_page(s, p)
                     and not _kinds_on_page(s, p) & {"index", "directory"}]
            assert pages, [_kinds_on_page(s, p) for p in range(4)]
            _whole_page_roundtrip(s, rep, model, pages[0])
            assert s.stats()["index_pages_lost"] == 0


def test_lost_range_that_no_longer_fits_stays_lost_never_absent():
    rng = random.Random(33)
    rep = Replica()
    with kvstore.Store("1MiB", page_size="4K", recovery="manual", rebuild_source=rep,
                       rebuild_deadline=0.5, read_repair_timeout=0.2) as s:
        model = filled(s, rep, 1500, rng, lo=100, hi=300)
        victim = sorted(model)[100]
        hit = range_of(s, victim)
        rep.online = False
        s.faults.inject_entry(victim, "ao")
        s.recover()
        # The space of the lost range's records is taken by new writes.
        i = 0
        with pytest.raises(kvstore.StoreFullError):
            while True:
                s.put(b"fill:%06d" % i, b"f" * 200)
                i += 1
        rep.online = True
        t_end = time.monotonic() + 10
        while time.monotonic() < t_end and s.stats()["ranges_given_up"] == 0:
            s.recover()
            time.sleep(0.05)
        st = s.stats()
        assert st["ranges_given_up"] == 1 and "no room" in st["lost_ranges_reason"], st["lost_ranges_reason"]
        ks = set(s.keys())       # no exception; the keys of the range are not known
        n_hit = 0
        for k, v in model.items():
            if in_range(k, hit):
                if s.state(k) == "range":
                    n_hit += 1
                    assert k not in ks
                    with pytest.raises(kvstore.KeyLostError):
                        s.get(k)
                else:                # reinstalled before the store filled up
                    assert s.get(k) == v
            else:
                assert s.get(k) == v and k in ks
        assert n_hit > 0


def test_mark_range_lost_reads_lost_until_rebuilt_from_a_range_source():
    """A peer's LOST index range entered with mark_range_lost (as a replica's
    full sync does): the keys the store does not hold in it raise
    KeyLostError, never None; keys elsewhere read as before; writes to the
    range work; a rebuild with fetch_hash_range brings every key back."""
    rng = random.Random(29)
    with kvstore.Store("4MiB", page_size="4K", recovery="manual") as src, \
            kvstore.Store("4MiB", page_size="4K", recovery="manual") as dst:
        model = {}
        for i in range(1500):
            k, v = b"k%05d" % i, rng.randbytes(rng.randint(1, 100))
            model[k] = (src.put(k, v), v)
        lo, hi = range_of(src, b"k00042")
        inside = {k for k in model if lo <= kvstore.key_hash(k) <= hi}
        assert inside and len(inside) < len(model) // 4
        # the snapshot: every key but those of the lost range, then the marker
        for k, (ver, v) in model.items():
            if k not in inside:
                dst.put_versioned(k, v, ver)
        assert dst.mark_range_lost(lo, hi, src.version) >= 1
        flagged = dst.lost_ranges()
        assert flagged and all(v == src.version for _lo, _hi, v in flagged)
        assert sum(h - l + 1 for l, h, _v in flagged) < (1 << 64)    # not the whole hash space
        assert min(l for l, _h, _v in flagged) <= lo and max(h for _l, h, _v in flagged) >= hi
        assert dst.mark_range_lost(lo, hi, src.version) == 0        # already flagged at that version
        with pytest.raises(ValueError):
            dst.mark_range_lost(lo, hi, 0)
        with pytest.raises(ValueError):
            dst.mark_range_lost(1, 0, 1)

        def flagged_at(h):
            return any(l <= h <= hh for l, hh, _v in flagged)
        for k in inside:
            with pytest.raises(kvstore.KeyLostError):
                dst.get(k)
        for k, (ver, v) in model.items():
            if k not in inside:
                assert dst.get_versioned(k) == (ver, v)           # flagged pages keep their keys
        never = [b"never:%d" % i for i in range(3000)]
        outside = [k for k in never if not flagged_at(kvstore.key_hash(k))]
        within = [k for k in never if flagged_at(kvstore.key_hash(k))]
        assert outside and within
        for k in outside[:200]:
            assert dst.get(k) is None
        for k in within[:50]:
            with pytest.raises(kvstore.KeyLostError):
                dst.get(k)
        assert dst.stats()["lost_ranges"] >= 1
        # a write into the range (the stream) works meanwhile, on both sides
        newk = next(k for k in within if lo <= kvstore.key_hash(k) <= hi)
        ver = src.put(newk, b"new")
        dst.put_versioned(newk, b"new", ver)
        assert dst.get(newk) == b"new"
        model[newk] = (ver, b"new")
        # rebuilt from a source with fetch_hash_range: every key back
        dst.rebuild_source = src
        dst.recover()
        assert dst.wait_recovered(10)
        assert dst.lost_ranges() == []
        for k, (ver, v) in model.items():
            assert dst.get_versioned(k) == (ver, v)
        for k in within[:50]:
            if k != newk:
                assert dst.get(k) is None                         # never existed: absent again


def test_mark_range_lost_without_a_source_stays_lost():
    with kvstore.Store("4MiB", page_size="4K", recovery="manual") as st:
        for i in range(800):
            st.put(b"k%05d" % i, b"v%d" % i)
        lo, hi = range_of(st, b"k00007")
        st.mark_range_lost(lo, hi, st.version)
        st.recover()
        assert st.stats()["lost_ranges_reason"] == "no rebuild source"
        h = kvstore.key_hash(b"k00007")
        for i in range(3000):
            k = b"x%d" % i
            if lo <= kvstore.key_hash(k) <= hi:
                with pytest.raises(kvstore.KeyLostError):
                    st.get(k)
                break
        assert st.get(b"k00007") == b"v7"                         # held here: still read
        assert lo <= h <= hi
