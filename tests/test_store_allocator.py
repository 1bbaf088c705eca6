"""Memory faults on the allocator's own metadata (DESIGN.md "Allocator
metadata in the arena").

The allocator's per-subpage words, free bitmap, group lists and the index
page counters live in a region of the arena (``Store.locate_allocator()``,
``subpage_kind() == "allocator"``). A fault there is survivable: the region
is rebuilt from the index and the records (the walk adoption does) into a
fresh region, and no key is lost for it. These tests aim ``ao`` and ``ar``
faults at each part of the region, under both kernel policies, on 4 KiB and
2 MiB backings, with no rebuild source at all (so a key that needed one
would raise), and check that nothing reads wrong or absent, that allocation
goes on working (puts, deletes, compaction), that ``used`` returns to the
live bytes and that no subpage leaks.
"""

import random

import pytest

import kvstore
from storeutil import SUB, Replica, open_2m, reserved_2m

KINDS = ["ao", "ar"]
POLICIES = ["keep_ue", "mainline"]


def live_bytes(model):
    """Bytes of the live records: small ones exactly, large ones (over 4 KiB)
    in whole subpages."""
    total = 0
    for k, v in model.items():
        n = 8 + len(v) + (len(k) if len(k) > 1024 else 0)
        total += n if n <= SUB else -(-n // SUB) * SUB
    return total


def filled(store, n, rng, lo=1, hi=300, prefix=b"key"):
    model = {}
    for i in range(n):
        k = b"%s:%06d" % (prefix, i)
        v = rng.randbytes(rng.randint(lo, hi))
        store.put(k, v)
        model[k] = v
    # a few large records (runs of whole subpages) and long keys
    for i in range(5):
        k = b"big:%d" % i
        model[k] = rng.randbytes(9000 + i)
        store.put(k, model[k])
    k = b"long:" + b"L" * 1500
    model[k] = b"long key's value"
    store.put(k, model[k])
    return model


def accounted(store):
    """Every subpage is free, quarantined, index, records, header or
    allocator: nothing leaked, nothing counted twice."""
    st = store.stats()
    total = (st["free_subpages"] + st["quarantined_subpages"]) * SUB + st["index_bytes"] + \
        st["records_bytes"] + st["allocator_bytes"] + SUB
    assert total == st["capacity"], st
    kinds = [store.subpage_kind(i)[0] for i in range(st["capacity"] // SUB)]
    assert kinds.count("allocator") * SUB == st["allocator_bytes"]
    assert kinds.count("free") == st["free_subpages"]
    assert kinds.count("lost") == st["quarantined_subpages"]


def check_all(store, model):
    for k, v in model.items():
        assert store.get(k) == v, k
    st = store.stats()
    assert st["keys"] == len(store) == len(model)
    assert st["lost_keys"] == 0
    assert sorted(store.keys()) == sorted(model)
    assert st["used"] == live_bytes(model)


def touch(store, kind):
    if kind == "ar":
        store.get(b"key:000000")       # the next operation meets the armed subpage


def allocator_fault_roundtrip(store, model, kind, part, rng):
    """Inject at part (0..1) of the allocator region; everything must
    survive without a rebuild source."""
    before = store.stats()
    off, ln = store.locate_allocator()
    assert store.subpage_kind(off // SUB)[0] == "allocator"
    target = off + min(ln // SUB - 1, int(part * (ln // SUB))) * SUB
    store.faults.inject(target + 123, kind)
    touch(store, kind)
    store.recover()
    st = store.stats()
    assert st["allocator_rebuilds"] == before["allocator_rebuilds"] + 1
    assert st["allocator_in_arena"]
    noff, nln = store.locate_allocator()
    assert nln == ln and not (noff <= target < noff + nln)    # a fresh region
    assert store.subpage_kind(target // SUB)[0] == "lost"
    assert st["keys_lost_total"] == before["keys_lost_total"]
    check_all(store, model)
    accounted(store)
    # allocation keeps working: overwrite, delete, insert, compact
    for k in list(model)[: len(model) // 3]:
        model[k] = rng.randbytes(rng.randint(1, 300))
        store.put(k, model[k])
    for k in list(model)[len(model) // 3: len(model) // 2]:
        assert store.delete(k)
        del model[k]
    for i in range(300):
        k = b"after:%d:%06d" % (st["allocator_rebuilds"], i)
        model[k] = rng.randbytes(rng.randint(1, 200))
        store.put(k, model[k])
    store.compact()
    check_all(store, model)
    accounted(store)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_allocator_fault_4k(policy, kind):
    rng = random.Random(11)
    with kvstore.Store("4MiB", page_size="4K", kernel_policy=policy, recovery="manual") as s:
        model = filled(s, 3000, rng)
        accounted(s)
        # the part holding the words, the middle (lists), the end (page counters)
        for part in (0.0, 0.5, 0.99):
            allocator_fault_roundtrip(s, model, kind, part, rng)


@pytest.mark.hugepages
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_allocator_fault_2m(policy, kind):
    rng = random.Random(12)
    with reserved_2m(6):
        s = open_2m(4 << 20, policy, 6, recovery="manual")
        with s:
            model = filled(s, 3000, rng)
            for part in (0.0, 0.99):
                allocator_fault_roundtrip(s, model, kind, part, rng)
            if policy == "mainline":
                st = s.stats()
                assert st["pages_salvaged"] >= 2 and st["lost_subpages"] >= 2


def test_allocator_region_is_reported_and_counted_in_capacity():
    with kvstore.Store("8MiB", page_size="4K", recovery="manual") as s:
        st = s.stats()
        off, ln = s.locate_allocator()
        assert st["allocator_in_arena"] and st["allocator_offset"] == off and st["allocator_bytes"] == ln
        assert off % SUB == 0 and ln % SUB == 0 and off + ln <= st["capacity"]
        # ~20 B per 4 KiB subpage, rounded to whole subpages
        assert 16 * st["capacity"] // SUB <= ln <= 32 * st["capacity"] // SUB + SUB
        assert {s.subpage_kind(i)[0] for i in range(off // SUB, (off + ln) // SUB)} == {"allocator"}
        assert s.subpage_kind(0)[0] == "header"
        accounted(s)


def test_allocator_fault_with_a_record_loss_in_the_same_recovery():
    """A record subpage and the allocator region lost together: the records
    there are LOST (and rebuilt from the source), nothing else."""
    rng = random.Random(13)
    rep = Replica()
    with kvstore.Store("4MiB", page_size="4K", rebuild_source=rep, recovery="manual") as s:
        model = filled(s, 2000, rng)
        for k, v in model.items():
            rep.record(k, s.get_versioned(k)[0], v)
        victim = b"key:000100"
        roff, _ = s.locate(victim)
        on_page = {k for k in model if s.locate(k)[0] // SUB == roff // SUB}
        off, _ln = s.locate_allocator()
        s.faults.inject(roff, "ao")
        s.faults.inject(off, "ao")
        r = s.recover()
        assert r["keys_lost"] == len(on_page)
        assert s.wait_recovered(10)
        check_all(s, model)
        accounted(s)


def test_scrubber_finds_latent_poison_in_the_allocator_region():
    rng = random.Random(14)
    with kvstore.Store("4MiB", page_size="4K", recovery="manual") as s:
        model = filled(s, 1000, rng)
        off, ln = s.locate_allocator()
        # armed but untouched: only a patrol can find it before the allocator does
        s.arena.inject(off + ln - SUB, "ar")
        s.scrub(64 << 20)
        st = s.stats()
        assert st["allocator_rebuilds"] == 1
        check_all(s, model)
        accounted(s)


@pytest.mark.parametrize("policy", POLICIES)
def test_allocator_and_directory_lost_together(policy):
    """The directory and the allocator's metadata lost in one recovery: no
    index page can be found, so the whole hash range is LOST and comes back
    from the source by range; nothing is absent or wrong meanwhile, and the
    records left behind are reclaimed."""
    rng = random.Random(15)
    rep = Replica()
    with kvstore.Store("4MiB", page_size="4K", kernel_policy=policy, rebuild_source=rep, recovery="manual",
                       rebuild_deadline=60.0, read_repair_timeout=5.0) as s:
        model = {}
        for i in range(1500):
            k = b"key:%04d" % i
            model[k] = rng.randbytes(rng.randint(1, 100))
            rep.record(k, s.put(k, model[k]), model[k])
        dirs = [i for i in range(s.stats()["capacity"] // SUB) if s.subpage_kind(i)[0] == "directory"]
        off, _ln = s.locate_allocator()
        s.faults.inject(dirs[0] * SUB, "ao")
        s.faults.inject(off, "ao")
        s.recover()
        st = s.stats()
        assert st["allocator_whole_index_lost"] == 1 and st["allocator_in_arena"]
        for k in list(model)[:10]:
            assert s.get(k) == model[k]            # read-repaired by hash range
        assert s.wait_recovered(60)
        check_all(s, model)
        accounted(s)
        for i in range(100):
            s.put(b"after:%d" % i, b"x" * 30)
            assert s.get(b"after:%d" % i) == b"x" * 30


def test_adoption_keeps_the_allocator_in_its_region_and_after_a_rebuild():
    rng = random.Random(16)
    a = kvstore.Store("4MiB", page_size="4K", recovery="manual")
    try:
        model = filled(a, 1000, rng)
        off, ln = a.locate_allocator()
        a.faults.inject(off, "ao")
        a.recover()
        moved = a.locate_allocator()
        assert moved[0] != off
        b = kvstore.Store(adopt_fd=a.arena.fd, recovery="manual")
    except BaseException:
        a.close()
        raise
    try:
        assert b.locate_allocator() == moved          # the header names the region it moved to
        check_all(b, model)
        while b.engine_stats()["unvalidated_subpages"]:   # records are validated lazily
            b.verify_step()
        accounted(b)
        b.put(b"new", b"value")
        assert b.get(b"new") == b"value"
    finally:
        b.close()
        a.close()


def test_allocator_lost_while_an_adopted_store_is_still_validating():
    """A memory error in the allocator's region before lazy validation ended:
    the rebuild validates everything at once, no key is lost or wrong, and
    nothing stays unvalidated or leaks."""
    rng = random.Random(17)
    a = kvstore.Store("4MiB", page_size="4K", recovery="manual")
    try:
        model = filled(a, 1000, rng)
        b = kvstore.Store(adopt_fd=a.arena.fd, recovery="manual")
    except BaseException:
        a.close()
        raise
    try:
        assert b.engine_stats()["unvalidated_subpages"] > 0
        off, _ln = b.locate_allocator()
        b.faults.inject(off, "ao")
        b.recover()
        st = b.engine_stats()
        assert st["allocator_rebuilds"] == 1 and st["unvalidated_subpages"] == 0
        check_all(b, model)
        accounted(b)
        b.put(b"new", b"value")
        assert b.get(b"new") == b"value"
    finally:
        b.close()
        a.close()


_PATROL_SCRIPT = r"""
import sys, kvstore
op = sys.argv[1]
s = kvstore.Store("8MiB", page_size="2M", kernel_policy="mainline", recovery="manual")
for i in range(45000):
    s.put(b"m:%05d" % i, b"v" * 100, ttl=3600 if i % 2 else None)
nsub = (8 << 20) // 4096
page = s.locate_allocator()[0] // (2 << 20)
recs = [i for i in range(nsub) if i * 4096 // (2 << 20) == page and s.subpage_kind(i)[0] == "records"]
assert recs, "no records share the allocator's hugepage"
s.faults.inject(recs[0] * 4096, "ar")
if op == "scrub":
    s.scrub(64 << 20)
elif op == "expire":
    s.expire_sweep(1 << 20)
else:
    s.scan_range(0, 2 ** 64 - 1)
s.recover()
for i in range(45000):
    try:
        v = s.get(b"m:%05d" % i)
    except kvstore.KeyLostError:
        continue
    assert v in (None, b"v" * 100), i
print("survived")
"""


@pytest.mark.parametrize("op", ["scrub", "expire", "scan"])
def test_patrol_survives_a_fault_that_takes_the_allocators_hugepage(op):
    """Mainline policy: an error on a record takes the whole hugepage, the
    allocator's metadata with it; a patrol that met it stops reading the
    metadata until it is recovered (it used to die of SIGBUS)."""
    import subprocess
    import sys
    with reserved_2m(8):        # the 8 MiB arena, the salvage spare and room to spare
        r = subprocess.run([sys.executable, "-c", _PATROL_SCRIPT, op], capture_output=True, text=True,
                           timeout=300)
    assert r.returncode == 0 and "survived" in r.stdout, (r.returncode, r.stderr[-2000:])
