"""Adoption of an arena left by an earlier process (adopt.c, Store(adopt_fd=)).

The memfd of one Store is adopted by a new Store through a duplicate fd, as a
restarted server does with the fd it inherits. What is checked: every key,
value, version and absolute expiry comes back; LOST keys stay LOST; what does
not verify (an index page, a record's bounds, a checksum) becomes LOST and is
never served; another layout version or a missing header is refused with a
clear message. The crash points (KVSTORE_CRASH_AT) abort a child process in
the middle of a put, a delete, a compaction move and a rebuild install; the
arena it leaves is adopted and never yields a wrong value.
"""

import os
import subprocess
import sys
import textwrap

import pytest

import kvstore
from kvstore import ArenaError, KeyLostError

SUB = 4096


def _store(**kw):
    kw.setdefault("recovery", "manual")
    return kvstore.Store("32MiB", page_size="4K", **kw)


def _adopt(src, **kw):
    fd = os.dup(src.arena.fd)
    try:
        kw.setdefault("recovery", "manual")
        return kvstore.Store(adopt_fd=fd, **kw)
    finally:
        os.close(fd)


def _fill(s, n=3000):
    want = {}
    for i in range(n):
        k, v = b"key:%d" % i, (b"val-%d-" % i) * (1 + i % 40)
        s.put(k, v)
        want[k] = v
    big = os.urandom(300_000)
    s.put(b"big", big)
    want[b"big"] = big
    longkey = b"L" * 5000
    s.put(longkey, b"long-key value")
    want[longkey] = b"long-key value"
    return want


def test_adopt_round_trip_keeps_keys_versions_and_expiry():
    a = _store()
    want = _fill(a)
    a.expire(b"key:1", 500)
    exp = a.expire_at(b"key:1")
    a.delete(b"key:2")
    del want[b"key:2"]
    versions = {k: a.get_versioned(k)[0] for k in list(want)[:50]}
    st = a.stats()
    b = _adopt(a)
    r = b.adopt_report()
    assert r["keys"] == len(want) and r["records_bad"] == 0 and r["index_pages_bad"] == 0
    assert r["layout"] == 2 and r["generation"] == 1
    assert b.version == a.version
    assert len(b) == len(want)
    for k, v in want.items():
        assert b.get(k) == v
    assert b.get(b"key:2") is None
    assert b.expire_at(b"key:1") == exp
    for k, ver in versions.items():
        assert b.get_versioned(k)[0] == ver
    assert b.stats()["used"] == st["used"]
    assert not b.verified
    while not b.verify_step(1 << 20):
        pass
    assert b.verified
    # the adopted store keeps working: writes take versions after the old ones
    v = b.put(b"after", b"x")
    assert v > a.version - 1 and b.get(b"after") == b"x"
    b.delete(b"key:3")
    assert b.get(b"key:3") is None


def test_second_generation_and_lost_keys_stay_lost():
    a = _store()
    want = _fill(a, 500)
    a.faults.inject_key(b"key:7", "ao")
    a.recover()
    assert a.state(b"key:7") == "lost"
    b = _adopt(a)
    assert b.adopt_report()["lost_keys"] >= 1
    with pytest.raises(KeyLostError):
        b.get(b"key:7")
    b.recover()                     # queued for the rebuilder again
    assert any(k == b"key:7" for k, _v, _s in b.lost_keys())
    c = _adopt(b)
    assert c.adopt_report()["generation"] == 2
    for k, v in want.items():
        if k == b"key:7":
            continue
        try:
            got = c.get(k)
        except KeyLostError:        # shared the record's subpage with key:7
            assert a.state(k) == "lost"
            continue
        assert got == v


def test_other_layout_version_is_refused_with_a_clear_message():
    a = _store()
    a.put(b"k", b"v")
    # layout 1: the arena of a build that kept the allocator's metadata in process memory
    a.arena.write(8, (1).to_bytes(4, "little"))
    with pytest.raises(ArenaError, match=r"arena layout version 1, this build reads layout version 2"):
        _adopt(a)


def test_memfd_without_header_is_refused():
    fd = os.memfd_create("not-an-arena")
    try:
        os.ftruncate(fd, 1 << 20)
        os.pwrite(fd, b"\xff" * 64, 0)
        with pytest.raises(ArenaError, match="no kvstore arena header"):
            kvstore.Store(adopt_fd=fd, recovery="manual")
    finally:
        os.close(fd)


def test_header_that_disagrees_is_refused():
    a = _store()
    a.arena.write(16, (12345).to_bytes(8, "little"))          # arena_size
    with pytest.raises(ArenaError, match="does not agree"):
        _adopt(a)


def test_index_page_that_does_not_verify_becomes_a_lost_range():
    a = _store()
    want = _fill(a, 4000)
    off, _ = a.locate_entry(b"key:10")
    page = off // SUB * SUB
    a.arena.write(page + 8, b"\x00" * 16)                      # lo, hi of the page header
    b = _adopt(a)
    r = b.adopt_report()
    assert r["index_pages_bad"] == 1 and r["lost_ranges"] >= 1
    assert b.state(b"key:10") == "range"
    with pytest.raises(KeyLostError):
        b.get(b"key:10")
    served = lost = 0
    for k, v in want.items():
        try:
            got = b.get(k)
        except KeyLostError:
            lost += 1
            continue
        assert got == v
        served += 1
    assert lost >= 1 and served > len(want) // 2


def test_record_out_of_bounds_and_bad_checksum_become_lost():
    a = _store()
    want = _fill(a, 1000)
    off, _ = a.locate(b"key:20")
    a.arena.write(off + 4, (1 << 30).to_bytes(4, "little"))   # vlen far past the arena
    off2, _ = a.locate(b"key:21")
    raw = a.arena.read(off2 + 8, 1)
    a.arena.write(off2 + 8, bytes([raw[0] ^ 0xFF]))            # one value byte: checksum
    b = _adopt(a)
    assert b.engine_stats()["unvalidated_subpages"] > 0       # records are validated on use
    with pytest.raises(KeyLostError):                          # the read validates its subpage first
        b.get(b"key:20")
    assert b.state(b"key:20") == "lost"
    assert b.engine_stats()["adopt_records_bad"] >= 1
    with pytest.raises(KeyLostError):                          # the read verifies first
        b.get(b"key:21")
    for k, v in want.items():
        if k not in (b"key:20", b"key:21"):
            assert b.get(k) == v


def test_overlapping_records_are_never_served():
    a = _store()
    _fill(a, 200)
    o1, _ = a.locate_entry(b"key:30")
    r2, _ = a.locate(b"key:31")
    loc = int.from_bytes(a.arena.read(o1, 8), "little")
    loc = (loc & ~((1 << 40) - 1)) | r2                       # key:30 points at key:31's record
    a.arena.write(o1, loc.to_bytes(8, "little"))
    b = _adopt(a)
    for k in (b"key:30", b"key:31"):
        with pytest.raises(KeyLostError):
            b.get(k)
    assert b.engine_stats()["adopt_records_bad"] >= 2


# ------------------------------------------------- lazy record validation

def _subpage_keys(s, want, sub):
    return [k for k in want if s.locate(k)[0] // SUB == sub]


def test_lazy_validation_serves_elsewhere_before_the_bad_subpage_is_validated():
    a = _store()
    want = _fill(a, 3000)
    off, _ = a.locate(b"key:20")
    bad_sub = off // SUB
    neighbours = [k for k in _subpage_keys(a, want, bad_sub) if k != b"key:20"]
    a.arena.write(off + 4, (1 << 30).to_bytes(4, "little"))   # vlen far past the arena
    other = next(k for k in want if k.startswith(b"key:") and a.locate(k)[0] // SUB != bad_sub)
    b = _adopt(a)
    st = b.engine_stats()
    assert st["unvalidated_subpages"] > 0 and st["adopt_validated_on_demand"] == 0
    assert b.get(other) == want[other]
    # only the subpage of `other` was validated: key:20's record was not read
    assert b.engine_stats()["adopt_validated_on_demand"] == 1
    assert b.state(b"key:20") == "present"
    with pytest.raises(KeyLostError):
        b.get(b"key:20")                                       # never the bytes it points at
    assert b.state(b"key:20") == "lost"
    assert b.engine_stats()["adopt_records_bad"] == 1
    for k in neighbours:                                       # its subpage's other records are fine
        assert b.get(k) == want[k]
    while not b.verify_step(1 << 22):
        pass
    assert b.engine_stats()["unvalidated_subpages"] == 0
    for k, v in want.items():
        if k != b"key:20":
            assert b.get(k) == v


def _overlaps(spans, off, length):
    import bisect
    i = bisect.bisect_right(spans, (off, float("inf")))
    if i and spans[i - 1][1] > off:
        return spans[i - 1]
    if i < len(spans) and spans[i][0] < off + length:
        return spans[i]
    return None


def test_allocation_before_validation_never_overlaps_the_adopted_records():
    a = _store()
    want = _fill(a, 3000)
    spans = sorted((o, o + n) for o, n in (a.locate(k) for k in want))
    # a record at the start of a subpage whose header now claims the next
    # three subpages (where other records live) as a large record
    victim = next(k for k in want if k.startswith(b"key:") and a.locate(k)[0] % SUB == 0
                  and _overlaps(spans, a.locate(k)[0] + SUB, 3 * SUB))
    voff, _ = a.locate(victim)
    a.arena.write(voff + 4, (3 * SUB).to_bytes(4, "little"))
    b = _adopt(a)
    pending = b.engine_stats()["unvalidated_subpages"]
    new = {}
    for i in range(1500):
        k, v = b"new:%d" % i, os.urandom(50 + i % 300)
        b.put(k, v)
        new[k] = v
    b.put(b"new:big", os.urandom(3 * SUB + 100))              # a run of whole subpages too
    new[b"new:big"] = b.get(b"new:big")
    # the writes found room without validating the whole store first
    assert 0 < b.engine_stats()["unvalidated_subpages"] < pending
    for k in new:
        o, n = b.locate(k)
        assert _overlaps(spans, o, n) is None, (k, o, n)
    with pytest.raises(KeyLostError):
        b.get(victim)
    for k, v in want.items():
        if k != victim:
            assert b.get(k) == v
    while not b.verify_step(1 << 22):
        pass
    for k, v in new.items():
        assert b.get(k) == v


def test_memory_error_on_an_unvalidated_subpage_loses_exactly_its_records():
    a = _store()
    want = _fill(a, 3000)
    off, _ = a.locate(b"key:100")
    sub = off // SUB
    hit = set(_subpage_keys(a, want, sub))
    b = _adopt(a)
    b.faults.inject(sub * SUB, "ao")
    b.recover()
    assert b.engine_stats()["unvalidated_subpages"] > 0
    for k in hit:
        with pytest.raises(KeyLostError):
            b.get(k)
    assert {k for k, _v, _s in b.lost_keys()} >= hit
    while not b.verify_step(1 << 22):
        pass
    for k, v in want.items():
        if k not in hit:
            assert b.get(k) == v
    # the lost subpage is quarantined: new records never land there
    for i in range(3000):
        b.put(b"more:%d" % i, b"m" * 100)
        assert b.locate(b"more:%d" % i)[0] // SUB != sub


def test_index_page_lost_before_validation():
    a = _store()
    want = _fill(a, 3000)
    b = _adopt(a)
    b.faults.inject_entry(b"key:50", "ao")
    b.recover()
    while not b.verify_step(1 << 22):
        pass
    lost = served = 0
    for k, v in want.items():
        try:
            got = b.get(k)
        except KeyLostError:
            lost += 1
            continue
        assert got == v
        served += 1
    assert lost >= 1 and served > len(want) // 2
    for i in range(2000):                                      # space of the orphans is reused safely
        b.put(b"n%d" % i, b"n" * 300)
    for i in range(2000):
        assert b.get(b"n%d" % i) == b"n" * 300


# ------------------------------------- lost state handed over with the arena

def _adopt_handover(src, **kw):
    h = kvstore.ArenaHandover.of(src.arena)
    fd = os.dup(src.arena.fd)
    spares = [(p, os.dup(f), small) for p, f, small in h.spares]
    try:
        kw.setdefault("recovery", "manual")
        return kvstore.Store(adopt_fd=kvstore.ArenaHandover(fd, h.lost, h.poison, spares), **kw)
    finally:
        os.close(fd)
        for _p, f, _s in spares:
            os.close(f)


def test_lost_subpages_and_keys_are_handed_over():
    a = _store()
    want = _fill(a, 3000)
    off, _ = a.locate(b"key:100")
    sub = off // SUB
    hit = set(_subpage_keys(a, want, sub))
    a.faults.inject(off, "ao")
    a.recover()
    lost = {k for k, _v, _s in a.lost_keys()}
    assert hit <= lost
    b = _adopt_handover(a)
    b.recover()
    assert sub in b.arena.lost_subpages()
    for k in hit:                                   # still LOST, not found again by checksum
        assert b.state(k) == "lost"
        with pytest.raises(KeyLostError):
            b.get(k)
    while not b.verify_step(1 << 22):
        pass
    assert b.engine_stats()["checksum_failures"] == 0
    for k, v in want.items():
        if k not in hit:
            assert b.get(k) == v
    # the quarantined subpage is never handed out again
    for i in range(4000):
        b.put(b"more:%d" % i, b"m" * 200)
    assert all(b.locate(b"more:%d" % i)[0] // SUB != sub for i in range(4000))
    assert sub in b.arena.lost_subpages()


def test_salvaged_page_is_handed_over(reserve_2m):
    reserve_2m(12)
    try:
        a = kvstore.Store("8MiB", page_size="2M", kernel_policy="mainline", recovery="manual")
    except ArenaError as e:
        pytest.skip(f"no 2 MiB hugepages now: {e}")
    want = {}
    for i in range(6000):
        k, v = b"s:%d" % i, b"v%d-" % i * (1 + i % 20)
        a.put(k, v)
        want[k] = v
    off, _ = a.locate(b"s:100")
    sub = off // SUB
    hit = set(_subpage_keys(a, want, sub))
    a.faults.inject(off, "ao")                     # mainline: the whole 2 MiB page is lost
    a.recover()
    st = a.stats()
    assert st["pages_salvaged"] == 1, st
    spares = a.arena.spares()
    assert [p for p, _fd, _small in spares] == [off // (2 << 20)]
    # writes after the salvage land in the spare memfd too
    for i in range(0, 6000, 7):
        k = b"s:%d" % i
        if k in hit:
            continue
        want[k] = b"after-salvage-%d" % i
        a.put(k, want[k])
    b = _adopt_handover(a)
    b.recover()
    assert [p for p, _fd, _small in b.arena.spares()] == [off // (2 << 20)]
    assert sub in b.arena.lost_subpages()
    for k, v in want.items():
        if k in hit:
            with pytest.raises(KeyLostError):
                b.get(k)
        else:
            assert b.get(k) == v
    while not b.verify_step(1 << 22):
        pass
    assert b.engine_stats()["checksum_failures"] == 0


# ------------------------------------------------------------ crash points

CHILD = textwrap.dedent("""
    import os, sys
    import kvstore
    fd, action = int(sys.argv[1]), sys.argv[2]
    s = kvstore.Store(adopt_fd=fd, recovery="manual")
    if action == "put":
        s.put(b"key:5", b"NEW-VALUE-5" * 3)
        s.put(b"fresh", b"fresh value")
    elif action == "put-same-size":
        s.put(b"key:6", b"X" * len(s.get(b"key:6")))
    elif action == "delete":
        s.delete(b"key:5")
    elif action == "compact":
        for i in range(0, 3000, 2):
            s.delete(b"key:%d" % i)
        s.compact(100000)
    elif action == "install":
        s.install(b"key:7", b"rebuilt seven", 10**6)
    print("no crash", flush=True)
""")

POINTS = [
    ("put:record", "put"),
    ("put:entry", "put"),
    ("put:entry", "put-same-size"),
    ("delete:drop", "delete"),
    ("compact:copy", "compact"),
    ("compact:entry", "compact"),
    ("install:record", "install"),
    ("install:entry", "install"),
]


@pytest.mark.parametrize("point,action", POINTS, ids=[f"{p}-{a}" for p, a in POINTS])
def test_crash_point_leaves_nothing_served_wrong(point, action):
    a = _store()
    want = _fill(a, 3000)
    a.faults.inject_key(b"key:7", "ao")
    a.recover()
    lost_before = {k for k, _v, _s in a.lost_keys()}
    fd = os.dup(a.arena.fd)
    try:
        env = dict(os.environ, KVSTORE_CRASH_AT=point)
        p = subprocess.run([sys.executable, "-c", CHILD, str(fd), action], env=env, pass_fds=(fd,),
                           capture_output=True, timeout=120)
        assert p.returncode < 0 and -p.returncode == 6, (p.returncode, p.stdout, p.stderr[-2000:])
        assert f"KVSTORE_CRASH_AT={point}".encode() in p.stderr
        b = kvstore.Store(adopt_fd=fd, recovery="manual")
    finally:
        os.close(fd)
    new = {b"key:5": {b"NEW-VALUE-5" * 3, None}, b"key:6": {b"X" * len(want[b"key:6"])},
           b"key:7": {b"rebuilt seven"}, b"fresh": {b"fresh value"}}
    for k in set(want) | {b"fresh"}:
        ok = {want.get(k)} | new.get(k, set())
        if action in ("delete", "compact"):
            ok.add(None)
        try:
            got = b.get(k)
        except KeyLostError:
            continue                 # LOST: rebuilt from a replica, never served wrong
        assert got in ok, (k, got[:40] if got else got)
    while not b.verify_step(1 << 22):
        pass
    for k in want:
        try:
            got = b.get(k)
        except KeyLostError:
            continue
        assert got in ({want[k]} | new.get(k, set()) | {None})
    if action != "compact":          # (compaction's deletes take lost keys too)
        assert lost_before <= {k for k, _v, _s in b.lost_keys()} | {b"key:7"}


def _free_2m():
    try:
        with open("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages") as f:
            return int(f.read())
    except OSError:
        return 0


def test_adopted_hugepages_are_the_same_pages(reserve_2m):
    reserve_2m(16)
    try:
        a = kvstore.Store("16MiB", page_size="2M", recovery="manual")
    except ArenaError as e:
        pytest.skip(f"no 2 MiB hugepages now: {e}")
    for i in range(3000):
        a.put(b"h%d" % i, b"x" * 200)
    blocks = os.fstat(a.arena.fd).st_blocks
    # no new pages: the same memfd pages are mapped again. The pool is shared
    # with other processes, whose allocations move the free count: one of a
    # few tries must see it unchanged across an adoption.
    same = []
    for _ in range(5):
        before = _free_2m()
        b = _adopt(a)
        same.append(_free_2m() == before)
        assert b.arena.backing == "hugetlb-2M" and b.arena.page_size == 2 << 20
        assert b.get(b"h123") == b"x" * 200
        assert os.fstat(b.arena.fd).st_blocks == blocks
        b.close()
        if same[-1]:
            break
    assert any(same), same
