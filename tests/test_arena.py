"""The foundation layer: kvstore._native.Arena, the SIGBUS path into it and
the fault simulator (DESIGN.md sections 1-5, issue 2).

Every backing that can be had here is exercised: 4 KiB memfd always, 2 MiB
and 1 GiB HugeTLB when the kernel gives the pages (a module fixture reserves
them with kvstore.hugepages and gives back what it added; tests that cannot
get their pages skip and say how many the kernel had). Each hugetlb backing
runs under both simulated kernel policies: keep_ue (only the hit 4 KiB is
lost, lsb 12) and mainline (the whole hugepage is lost and faults, pread on
the memfd still reads everything but the poisoned 4 KiB, salvage copies the
rest into a spare page).

Arena contents are a known function of the offset (pattern()), so every
successful read can be checked byte for byte. Tests that must kill the
process (SIGBUS outside the arena, unguarded touches) are in
test_native_sigbus.py and run in subprocesses.

With -s the module prints how many faults of each kind it injected and
survived, per backing and policy.
"""
import collections
import errno
import os
import random
import select
import sys
import threading
import time

import pytest

import kvstore
from kvstore import _native as native
from kvstore import hugepages

SUB = 4096
MIB, GIB = 1 << 20, 1 << 30
PAGE_BYTES = {"4K": SUB, "2M": 2 * MIB, "1G": GIB}
BACKING_NAME = {"4K": "memfd-4K", "2M": "hugetlb-2M", "1G": "hugetlb-1G"}
#: hugepages this module wants free at once (2M: the 40 MiB survival arena
#: plus a spare for salvage; 1G: a mainline arena and its spare).
WANT_FREE = {"2M": 24, "1G": 2}

# ------------------------------------------------------------ the pattern

_P = 65521                                    # prime: no two subpages alike
_BLOCK = random.Random(0x5EED).randbytes(_P)
_CHUNK = 4 * MIB
_BIG = _BLOCK * (_CHUNK // _P + 2)


def pattern(off, n):
    """The bytes the arena holds at [off, off+n) after fill()."""
    parts = []
    while n > 0:
        k = min(n, _CHUNK)
        s = off % _P
        parts.append(_BIG[s:s + k])
        off += k
        n -= k
    return b"".join(parts)


def fill(arena, start=0, end=None):
    end = arena.size if end is None else end
    for off in range(start, end, _CHUNK):
        arena.write(off, pattern(off, min(_CHUNK, end - off)))


def healthy_runs(lost, first_sub, last_sub):
    """Maximal runs [a, b) of subpages in [first_sub, last_sub) not in lost."""
    run = None
    for s in range(first_sub, last_sub):
        if s in lost:
            if run is not None:
                yield run, s
                run = None
        elif run is None:
            run = s
    if run is not None:
        yield run, last_sub


def assert_intact(arena, lost, start=0, end=None):
    """Every subpage of [start, end) outside `lost` reads back as the pattern."""
    end = arena.size if end is None else end
    for a, b in healthy_runs(set(lost), start // SUB, end // SUB):
        for off in range(a * SUB, b * SUB, _CHUNK):
            n = min(_CHUNK, b * SUB - off)
            got = arena.read(off, n)
            if got != pattern(off, n):
                bad = next(i for i in range(n) if got[i] != pattern(off + i, 1)[0])
                pytest.fail(f"wrong bytes at arena offset {off + bad} (subpage {(off + bad) // SUB}), "
                            f"lost subpages {sorted(lost)[:20]}")


def bitmap_set(arena):
    out = set()
    for i, byte in enumerate(arena.lost_bitmap()):
        if byte:
            out.update(i * 8 + b for b in range(8) if byte >> b & 1)
    return out


def assert_lost_exactly(arena, expected):
    expected = sorted(expected)
    got = arena.lost_subpages()
    assert got == expected, (f"lost subpages differ: extra {sorted(set(got) - set(expected))[:10]}, "
                             f"missing {sorted(set(expected) - set(got))[:10]}")
    assert bitmap_set(arena) == set(expected)
    assert arena.stats()["lost_subpages"] == len(expected)


def assert_read_faults(arena, off, n, lost_sub_ok):
    """A guarded read of [off, off+n) must raise MemoryFaultError naming an
    offset inside the range, in a subpage that lost_sub_ok(subpage) accepts."""
    with pytest.raises(kvstore.MemoryFaultError) as ei:
        arena.read(off, n)
    fo = ei.value.offset
    assert isinstance(fo, int), ei.value
    assert off <= fo < off + n, (off, n, fo)
    assert lost_sub_ok(fo // SUB), (fo, fo // SUB)
    assert f"offset {fo}" in str(ei.value)
    return fo


def sig_delta(before):
    now = native.signal_counts()
    return {k: now[k] - before[k] for k in now}


def smaps_entry(address):
    """The /proc/self/smaps fields of the mapping that starts at address."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        head = line.split(" ", 1)[0]
        if "-" in head and not line.endswith(":") and head.count("-") == 1:
            try:
                lo, hi = (int(x, 16) for x in head.split("-"))
            except ValueError:
                continue
            if lo == address:
                fields = {"range": (lo, hi), "line": line}
                for field in lines[i + 1:]:
                    name, _, rest = field.partition(":")
                    if " " in name or not rest:
                        break
                    fields[name] = rest.strip()
                return fields
    raise AssertionError(f"no mapping starts at {address:#x} in /proc/self/smaps")


# ------------------------------------------------ faults survived, reported

SURVIVED = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def report_survived():
    yield
    if SURVIVED:
        print("\nfaults injected and survived in this process (backing/policy/kind: count):")
        for key, n in sorted(SURVIVED.items()):
            print(f"  {'/'.join(key)}: {n}")
        print(f"  total: {sum(SURVIVED.values())}; signals seen: {native.signal_counts()}")


def inject(arena, off, kind, label):
    arena.inject(off, kind)
    SURVIVED[(label, arena.kernel_policy, kind)] += 1


# ---------------------------------------------------------- hugepage pools

class Pools:
    """Reserves hugepages for the module and gives back what it added."""

    def __init__(self):
        self.added = collections.Counter()
        self.notes = {}

    @staticmethod
    def _persistent(label):
        st = hugepages.size_status(label)
        return st["nr_hugepages"] - st["surplus_hugepages"]

    def ensure(self, label, count):
        """Make `count` pages of `label` free, or skip saying what the kernel had."""
        if label == "4K":
            return
        try:
            before = self._persistent(label)
            avail = hugepages.ensure_free(label, count)
            self.added[label] += max(0, self._persistent(label) - before)
        except FileNotFoundError as e:
            pytest.skip(f"{label} pages: {e}")
        except OSError as e:
            st = hugepages.size_status(label)
            pytest.skip(f"{label} pages: need {count} free, {st['available']} free "
                        f"(pool {st['nr_hugepages']}) and cannot reserve more: {e}")
        if avail < count:
            st = hugepages.size_status(label)
            note = f"; {self.notes[label]}" if label in self.notes else ""
            pytest.skip(f"{label} pages: need {count} free, the kernel gave only {avail} "
                        f"(pool {st['nr_hugepages']}, free {st['free_hugepages']}, "
                        f"reserved {st['resv_hugepages']}; other processes may hold some){note}")

    def release(self):
        for label, n in self.added.items():
            if n:
                try:
                    hugepages.release(label, n)
                except OSError:
                    pass


@pytest.fixture(scope="module")
def pools():
    p = Pools()
    if os.geteuid() == 0:
        for label, n in WANT_FREE.items():
            try:
                before = p._persistent(label)
                hugepages.ensure_free(label, n)
                p.added[label] += max(0, p._persistent(label) - before)
            except OSError as e:
                p.notes[label] = str(e)
    yield p
    p.release()


def make_arena(pools, backing, size, policy="auto"):
    """An Arena of `size` bytes on `backing`, skipping when its pages cannot be had."""
    pages = -(-size // PAGE_BYTES[backing])
    pools.ensure(backing, pages)
    try:
        a = native.Arena(size, backing, policy)
    except kvstore.ArenaError as e:
        if backing != "4K" and "no free" in str(e):
            pytest.skip(f"{backing} pages taken by another process meanwhile: {e}")
        raise
    return a


@pytest.fixture
def arenas():
    """Arenas closed at the end of the test (pages go back to the pool)."""
    made = []
    yield made
    for a in made:
        a.close()


BACKINGS = ["4K", "2M", pytest.param("1G", marks=pytest.mark.hugepages)]
POLICIES = ["keep_ue", "mainline"]
KINDS = ["ao", "ar"]


def whole_page(arena):
    return arena.hugetlb and arena.kernel_policy == "mainline"


# ============================================================ basics, per backing

def test_handler_installed_after_import():
    assert native.handler_installed() is True
    p = native.probe()
    assert p["handler_installed"] is True
    assert set(p) >= {"keep_ue", "hwpoison", "handler_installed"}
    assert isinstance(p["keep_ue"], bool) and isinstance(p["hwpoison"], bool)


@pytest.mark.parametrize("backing", BACKINGS)
def test_create_write_read_and_tlb_page_size(pools, arenas, backing):
    size = {"4K": 3 * MIB + 5, "2M": 4 * MIB + 1, "1G": GIB}[backing]
    a = make_arena(pools, backing, size)
    arenas.append(a)
    page = PAGE_BYTES[backing]
    assert a.size == -(-size // page) * page          # whole pages
    assert a.page_size == page and a.npages == a.size // page
    assert a.nsubpages == a.size // SUB
    assert a.backing == BACKING_NAME[backing]
    assert a.hugetlb is (backing != "4K")
    assert a.closed is False and a.fallback_reason is None
    if a.hugetlb:
        assert a.keep_ue is native.probe()["keep_ue"]
        assert a.kernel_policy == ("keep_ue" if a.keep_ue else "mainline")
    else:
        assert a.keep_ue is False
    st = a.stats()
    assert st["backing"] == a.backing and st["page_size"] == backing
    assert st["page_bytes"] == page and st["arena_bytes"] == a.size
    assert st["hugepages"] == (a.npages if a.hugetlb else 0)
    assert st["lost_subpages"] == 0 and a.lost_subpages() == [] and a.drain() == []

    # Fresh memory is zero; then write and read back.
    assert a.read(0, 8192) == bytes(8192)
    assert a.read(a.size - 100, 100) == bytes(100)
    if backing == "1G":
        for off in (0, 123 * MIB + 7, a.size - _CHUNK):
            a.write(off, pattern(off, _CHUNK))
        for off in (0, 123 * MIB + 7, a.size - _CHUNK):
            assert a.read(off, _CHUNK) == pattern(off, _CHUNK)
    else:
        fill(a)
        assert_intact(a, ())
    a.write(5, bytearray(b"abc"))
    a.write(SUB - 1, memoryview(b"xyz"))                 # straddles a subpage boundary
    assert a.read(5, 3) == b"abc" and a.read(SUB - 1, 3) == b"xyz"
    assert a.read(0, 0) == b""

    m = smaps_entry(a.address)
    assert m["KernelPageSize"] == f"{page // 1024} kB", m
    assert m["MMUPageSize"] == f"{page // 1024} kB", m
    assert m["range"][1] - m["range"][0] == a.size, m
    assert "kvstore-arena" in m["line"], m


def test_auto_page_size_reports_fallback():
    a = native.Arena(SUB, "auto")
    try:
        label = {SUB: "4K", 2 * MIB: "2M", GIB: "1G"}[a.page_size]
        assert a.backing == BACKING_NAME[label]
        if label == "1G":
            assert a.fallback_reason is None
        else:
            assert "1 GiB" in a.fallback_reason, a.fallback_reason
            assert a.stats()["fallback_reason"] == a.fallback_reason
        if label == "4K":
            assert "2 MiB" in a.fallback_reason
    finally:
        a.close()


def test_4k_policies_are_per_subpage(pools, arenas):
    for pol in POLICIES:
        a = make_arena(pools, "4K", 16 * SUB, pol)
        arenas.append(a)
        assert a.kernel_policy == pol


# ============================================ faults at random offsets, per backing x policy x kind

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("backing", BACKINGS)
def test_faults_at_random_offsets(pools, arenas, backing, policy, kind):
    rng = random.Random(f"{backing}-{policy}-{kind}")
    size = {"4K": 2 * MIB, "2M": 4 * MIB, "1G": GIB}[backing]
    a = make_arena(pools, backing, size, policy)
    arenas.append(a)
    assert a.kernel_policy == policy
    whole = whole_page(a)
    per_page = a.page_size // SUB
    if backing == "1G":
        fill(a, 0, 8 * MIB)            # the part checked byte for byte
        checked_end = 8 * MIB
    else:
        fill(a)
        checked_end = a.size

    if whole:
        # Mainline: one UE takes the whole hugepage. Hit one page at a random
        # offset (on 2M the other page must stay intact).
        targets = [rng.randrange(checked_end)]
    else:
        nfaults = 24
        subs = rng.sample(range(checked_end // SUB), nfaults)
        targets = [s * SUB + rng.randrange(SUB) for s in subs]
    hit = sorted({t // SUB for t in targets})
    sig0 = native.signal_counts()
    st0 = a.stats()

    for off in targets:
        inject(a, off, kind, backing)
    st = a.stats()
    assert st[f"injected_{kind}"] - st0[f"injected_{kind}"] == len(targets)

    if whole:
        lost = set()
        for s in hit:
            p = s // per_page
            lost |= set(range(p * per_page, (p + 1) * per_page))
    else:
        lost = set(hit)

    if kind == "ao":
        # Reported at once, with the right extent.
        d = sig_delta(sig0)
        assert d["ao"] == len(targets) and d["ar"] == 0 and d["adrerr"] == 0 and d["chained"] == 0, d
        assert_lost_exactly(a, lost)
    else:
        # Latent: nothing is known until the poison is touched.
        assert sig_delta(sig0)["ao"] == 0
        assert a.lost_subpages() == []
        for s in hit:
            assert_read_faults(a, s * SUB, SUB, lambda sub, s=s: sub == s)
        d = sig_delta(sig0)
        # raised by the guard as the kernel does it: a synchronous machine
        # check (4K backing also maps a faulting page for unguarded touches)
        assert d["ar"] == len(hit) and d["adrerr"] == 0, d
        assert d["chained"] == 0, d
        assert_lost_exactly(a, lost)

    # Every lost subpage is refused, naming an offset inside it; so are writes.
    for s in sorted(lost)[:64] if whole else sorted(lost):
        off = s * SUB + rng.randrange(SUB)
        n = rng.randint(1, SUB)
        assert_read_faults(a, off, n, lambda sub, s=s: sub == s)
        with pytest.raises(kvstore.MemoryFaultError) as ei:
            a.write(off, b"z" * n)
        assert ei.value.offset // SUB == s
    # A read that starts in a healthy subpage and runs into a lost one names
    # the first lost byte.
    first = min(lost)
    if first > 0 and first - 1 not in lost:
        fo = assert_read_faults(a, first * SUB - 10, 20, lambda sub: sub == first)
        assert fo == first * SUB
    # Known losses are refused without touching memory: no new signal.
    sig1 = native.signal_counts()
    assert_read_faults(a, first * SUB, SUB, lambda sub: sub in lost)
    assert sig_delta(sig1) == {k: 0 for k in sig1}

    # The backing memfd (the salvage path) fails only at the poisoned 4 KiB,
    # whatever the policy; the subpages around them read as written.
    for s in hit:
        with pytest.raises(OSError) as ei:
            a.pread(s * SUB, SUB)
        assert ei.value.errno == errno.EIO
        for nb in (s - 1, s + 1):
            if 0 <= nb < checked_end // SUB and nb not in hit:
                assert a.pread(nb * SUB, SUB) == pattern(nb * SUB, SUB), nb

    # Everything else reads back as written.
    assert_intact(a, lost, 0, checked_end)
    if a.hugetlb:
        if whole:
            # The lost page is replaced by a faulting mapping; the other page
            # is still served by its hugepage.
            lost_pages = {s // per_page for s in lost}
            for p in range(a.npages):
                m = smaps_entry(a.address + p * a.page_size)
                if p in lost_pages:
                    assert "kvstore-hole" in m["line"], m
                else:
                    assert "kvstore-arena" in m["line"], m
                    assert m["KernelPageSize"] == f"{a.page_size // 1024} kB", m
        else:           # keep_ue: one mapping, same page size, nothing unmapped
            m = smaps_entry(a.address)
            assert m["range"][1] - m["range"][0] == a.size, m
            assert m["KernelPageSize"] == f"{a.page_size // 1024} kB", m
    assert_lost_exactly(a, lost)
    assert sorted(s for first_s, n in a.drain() for s in range(first_s, first_s + n)) == sorted(lost)


@pytest.mark.parametrize("backing", ["2M", pytest.param("1G", marks=pytest.mark.hugepages)])
def test_mainline_whole_page_pread_sees_only_the_poisoned_subpage(pools, arenas, backing):
    a = make_arena(pools, backing, PAGE_BYTES[backing], "mainline")
    arenas.append(a)
    per_page = a.page_size // SUB
    s = random.Random(backing).randrange(1, per_page - 1)
    window = (s - 2) * SUB if s >= 2 else 0
    fill(a, 0, min(4 * MIB, a.size))
    fill(a, window, window + 5 * SUB)
    inject(a, s * SUB + 9, "ao", backing)
    assert_lost_exactly(a, range(per_page))
    with pytest.raises(OSError) as ei:
        a.pread(s * SUB, SUB)
    assert ei.value.errno == errno.EIO
    # a read that reaches the poison stops short before it, as the kernel's
    # does (seen in the kernel lab)
    assert a.pread(s * SUB - 1, 2) == pattern(s * SUB - 1, 1)
    for n in range(window // SUB, window // SUB + 5):
        if n != s:
            assert a.pread(n * SUB, SUB) == pattern(n * SUB, SUB), n
    # The guarded path refuses the whole page, healthy bytes included.
    assert_read_faults(a, (s + 1) * SUB, 8, lambda sub: sub == s + 1)


# ============================================================ eventfd and drain

def _readable(fd, timeout):
    r, _, _ = select.select([fd], [], [], timeout)
    return bool(r)


@pytest.mark.parametrize("backing,policy", [("4K", "keep_ue"), ("2M", "keep_ue"), ("2M", "mainline")])
def test_eventfd_and_drain(pools, arenas, backing, policy):
    a = make_arena(pools, backing, 4 * MIB, policy)
    arenas.append(a)
    fd = a.eventfd
    assert isinstance(fd, int) and fd >= 0
    assert not _readable(fd, 0)
    assert a.drain() == []

    inject(a, 10 * SUB + 1, "ao", backing)
    assert _readable(fd, 1.0), "eventfd not readable after a loss"
    if whole_page(a):
        expect = [(0, 512)]
    else:
        inject(a, 11 * SUB, "ao", backing)
        inject(a, 12 * SUB + 4095, "ao", backing)
        inject(a, 700 * SUB, "ao", backing)
        expect = [(10, 3), (700, 1)]
    assert a.drain() == expect                     # adjacent subpages coalesce
    assert not _readable(fd, 0), "eventfd still readable after drain"
    assert a.drain() == []                         # once only
    assert_lost_exactly(a, {s for f, n in expect for s in range(f, f + n)})

    # ar: the eventfd fires when the poison is consumed, not before.
    target = 900 * SUB if not whole_page(a) else a.page_size + 3 * SUB
    inject(a, target, "ar", backing)
    assert not _readable(fd, 0)
    assert a.drain() == []
    with pytest.raises(kvstore.MemoryFaultError):
        a.read(target, 1)
    assert _readable(fd, 1.0)
    assert a.drain() == ([(900, 1)] if not whole_page(a) else [(512, 512)])
    assert a.drain() == [] and not _readable(fd, 0)

    # A fault on a subpage already lost changes nothing and wakes nobody.
    inject(a, 10 * SUB + 2, "ao", backing)
    assert not _readable(fd, 0) and a.drain() == []


def test_repeated_and_mixed_injections_on_one_subpage(pools, arenas):
    for backing, policy in (("4K", "keep_ue"), ("2M", "keep_ue")):
        a = make_arena(pools, backing, 2 * MIB, policy)
        arenas.append(a)
        fill(a)
        sig0 = native.signal_counts()
        # ar then ao on the same subpage: one loss.
        inject(a, 5 * SUB, "ar", backing)
        inject(a, 5 * SUB + 2, "ao", backing)
        assert_lost_exactly(a, {5})
        # ao twice: the second changes nothing and sends nothing.
        inject(a, 7 * SUB, "ao", backing)
        inject(a, 7 * SUB + 99, "ao", backing)
        assert_lost_exactly(a, {5, 7})
        assert sig_delta(sig0)["ao"] == 2
        assert a.stats()["injected_ao"] == 3 and a.stats()["injected_ar"] == 1
        assert a.drain() == [(5, 1), (7, 1)]
        assert_intact(a, {5, 7})


@pytest.mark.parametrize("backing", ["4K", "2M"])
def test_second_ar_on_a_subpage_stays_latent(pools, arenas, backing):
    # Regression (4K): the second injection's scramble went through the
    # faulting mapping of the first and recorded the loss itself.
    a = make_arena(pools, backing, 2 * MIB, "keep_ue")
    arenas.append(a)
    fill(a)
    sig0 = native.signal_counts()
    inject(a, 5 * SUB, "ar", backing)
    inject(a, 5 * SUB + 1, "ar", backing)
    assert a.lost_subpages() == [] and not _readable(a.eventfd, 0)
    assert sig_delta(sig0) == {k: 0 for k in sig0}
    assert_read_faults(a, 5 * SUB, SUB, lambda sub: sub == 5)
    assert_lost_exactly(a, {5})
    assert_intact(a, {5})


# ============================================================ salvage (mainline)

@pytest.mark.parametrize("backing", ["2M", pytest.param("1G", marks=pytest.mark.hugepages)])
def test_mainline_salvage_keeps_all_but_the_poisoned_subpages(pools, arenas, backing):
    rng = random.Random(f"salvage-{backing}")
    pages = 2 if backing == "2M" else 1
    pools.ensure(backing, pages + 1)                   # the arena and a spare
    a = make_arena(pools, backing, pages * PAGE_BYTES[backing], "mainline")
    arenas.append(a)
    per_page = a.page_size // SUB
    p = pages - 1                                      # the page to hit
    base = p * per_page
    fill(a)

    # Two latent poisons in page p, then a touch: the whole page goes.
    s1, s2 = sorted(rng.sample(range(base, base + per_page), 2))
    inject(a, s1 * SUB + 17, "ar", backing)
    inject(a, s2 * SUB, "ar", backing)
    assert a.lost_subpages() == []
    assert_read_faults(a, s2 * SUB, 64, lambda sub: sub == s2)
    page_subs = set(range(base, base + per_page))
    assert_lost_exactly(a, page_subs)
    if pages > 1:
        assert_intact(a, page_subs)                    # the other page is untouched
    a.drain()

    assert a.salvage(p) == 2
    assert_lost_exactly(a, {s1, s2})
    assert_intact(a, {s1, s2})                         # every other byte survived
    for s in (s1, s2):
        assert_read_faults(a, s * SUB, SUB, lambda sub, s=s: sub == s)
    st = a.stats()
    assert st["pages_salvaged"] == 1 and st["subpages_salvaged"] == per_page - 2
    m = smaps_entry(a.address)      # still served through pages of the same size
    assert m["KernelPageSize"] == f"{a.page_size // 1024} kB", m
    a.drain()

    # A second UE on the salvaged page: pread now reads the spare page, and a
    # second salvage keeps all three poisoned subpages lost, nothing more.
    if backing == "1G":
        return      # the second round needs a third 1 GiB page and 2M covers it
    pools.ensure(backing, 1)
    s3 = rng.choice(sorted(page_subs - {s1, s2}))
    inject(a, s3 * SUB, "ao", backing)
    assert_lost_exactly(a, page_subs)
    for s in (s1, s2, s3):
        with pytest.raises(OSError) as ei:
            a.pread(s * SUB, SUB)
        assert ei.value.errno == errno.EIO
    healthy = min(page_subs - {s1, s2, s3})
    assert a.pread(healthy * SUB, SUB) == pattern(healthy * SUB, SUB)
    assert a.salvage(p) == 3
    assert_lost_exactly(a, {s1, s2, s3})
    assert_intact(a, {s1, s2, s3})
    assert a.stats()["pages_salvaged"] == 2


def test_salvage_of_a_healthy_page_changes_no_byte(pools, arenas):
    a = make_arena(pools, "2M", 2 * MIB, "mainline")
    arenas.append(a)
    fill(a)
    pools.ensure("2M", 1)
    assert a.salvage(0) == 0
    assert_lost_exactly(a, ())
    assert_intact(a, ())


@pytest.mark.slow
def test_salvage_without_a_free_hugepage_degrades_to_4k_pages(pools, arenas):
    a = make_arena(pools, "2M", 4 * MIB, "mainline")
    arenas.append(a)
    fill(a)
    inject(a, 77 * SUB, "ao", "2M")
    assert_lost_exactly(a, range(512))
    # Take every free 2 MiB page so no spare hugepage can be had (for a
    # moment; the pool itself is left alone).
    free = hugepages.size_status("2M")["available"]
    filler = native.Arena(free * 2 * MIB, "2M") if free else None
    try:
        left = hugepages.size_status("2M")["available"]
        if left:
            pytest.skip(f"another process changed the 2M pool meanwhile ({left} pages free again)")
        # The copy goes into ordinary 4 KiB pages: only the poisoned subpage is lost.
        assert a.salvage(0) == 1
        st = a.stats()
        assert st["pages_salvaged"] == 1 and st["pages_degraded_to_4k"] == 1 and st["salvage_failed"] == 0
        assert_lost_exactly(a, {77})
        assert_intact(a, {77})
    finally:
        if filler is not None:
            filler.close()
    # The price is visible: page 0 is now served by 4 KiB pages, page 1 still
    # by its hugepage.
    m0, m1 = smaps_entry(a.address), smaps_entry(a.address + 2 * MIB)
    assert m0["KernelPageSize"] == "4 kB" and m0["range"][1] - m0["range"][0] == 2 * MIB, m0
    assert m1["KernelPageSize"] == "2048 kB" and "kvstore-arena" in m1["line"], m1
    # The degraded page now behaves as 4 KiB backing: one more error there
    # costs one subpage, not the page, and ar raises BUS_MCEERR_AR (lsb 12) on the touch.
    sig0 = native.signal_counts()
    inject(a, 5 * SUB, "ao", "2M")
    inject(a, 9 * SUB + 3, "ar", "2M")
    assert_lost_exactly(a, {5, 77})
    assert_read_faults(a, 9 * SUB, SUB, lambda sub: sub == 9)
    d = sig_delta(sig0)
    assert d["ao"] == 1 and d["ar"] == 1 and d["adrerr"] == 0, d
    assert_lost_exactly(a, {5, 9, 77})
    assert_intact(a, {5, 9, 77})
    with pytest.raises(kvstore.ArenaError, match="4 KiB"):
        a.salvage(0)                          # nothing more to salvage there
    # The hugepage next to it still follows the mainline policy.
    inject(a, 2 * MIB + 3 * SUB, "ao", "2M")
    assert_lost_exactly(a, {5, 9, 77} | set(range(512, 1024)))


def test_salvage_refused_on_4k_and_outside_the_arena(pools, arenas):
    a = make_arena(pools, "4K", 8 * SUB)
    arenas.append(a)
    inject(a, 0, "ao", "4K")
    with pytest.raises(kvstore.ArenaError, match="4 KiB"):
        a.salvage(0)
    b = make_arena(pools, "2M", 2 * MIB, "mainline")
    arenas.append(b)
    with pytest.raises(kvstore.ArenaError, match="outside"):
        b.salvage(1)


# ============================================================ 10,000 faults

@pytest.mark.parametrize("backing,policy", [
    ("4K", "keep_ue"),
    ("2M", "keep_ue"),
    pytest.param("1G", "keep_ue", marks=pytest.mark.hugepages),
])
def test_survives_ten_thousand_faults(pools, arenas, backing, policy):
    n = 10_000
    size = 40 * MIB if backing != "1G" else GIB     # >= 10,240 subpages
    a = make_arena(pools, backing, size, policy)
    arenas.append(a)
    rng = random.Random(f"storm-{backing}")
    if backing == "1G":
        fill(a, 0, 40 * MIB)
    else:
        fill(a)
    subs = rng.sample(range(10_240), n)
    kinds = ["ao", "ar"] * (n // 2)
    rng.shuffle(kinds)
    offsets = [s * SUB + rng.randrange(SUB) for s in subs]

    def storm():
        ar_subs = []
        for s, off, kind in zip(subs, offsets, kinds):
            inject(a, off, kind, backing)
            if kind == "ar":
                ar_subs.append(s)
        # Consume every latent poison, half by reads, half by writes.
        for i, s in enumerate(ar_subs):
            try:
                if i % 2:
                    a.read(s * SUB + 5, 100)
                else:
                    a.write(s * SUB, b"w" * SUB)
            except kvstore.MemoryFaultError as e:
                assert e.offset // SUB == s, (e.offset, s)
            else:
                raise AssertionError(f"touching latent poison in subpage {s} did not fault")

    # The storm runs on a thread of its own: under ASan, each siglongjmp off
    # the main thread's alternate stack makes glibc parse /proc/self/maps
    # (pthread_getattr_np of the main thread), which 10,000 faulting 4 KiB
    # mappings make quadratic. Other tests fault on the main thread.
    failure = []

    def run():
        try:
            storm()
        except BaseException as e:              # noqa: BLE001 - re-raised below
            failure.append(e)

    sig0 = native.signal_counts()
    t0 = time.monotonic()
    t = threading.Thread(target=run, name="fault-storm")
    t.start()
    t.join()
    elapsed = time.monotonic() - t0
    if failure:
        raise failure[0]
    d = sig_delta(sig0)
    n_ao, n_ar = kinds.count("ao"), kinds.count("ar")
    assert d["ao"] == n_ao, d
    assert d["ar"] == n_ar and d["adrerr"] == 0, d
    assert d["chained"] == 0 and d["other"] == 0, d
    assert_lost_exactly(a, subs)
    drained = a.drain()          # more ranges than one drain buffer holds
    assert sorted(s for f, c in drained for s in range(f, f + c)) == sorted(subs)
    assert a.drain() == []
    assert_intact(a, set(subs), 0, 40 * MIB)
    st = a.stats()
    assert st["injected_ao"] == n_ao and st["injected_ar"] == n_ar
    print(f"\n{backing}/{policy}: {n} faults ({n_ao} ao -> {d['ao']} BUS_MCEERR_AO, {n_ar} ar -> "
          f"{d['ar']} BUS_MCEERR_AR + {d['adrerr']} BUS_ADRERR) survived in {elapsed:.2f} s")


# ============================================================ threads

@pytest.mark.slow
@pytest.mark.parametrize("backing,policy", [("4K", "keep_ue"), ("2M", "keep_ue"), ("2M", "mainline")])
def test_threads_read_while_faults_are_injected(pools, arenas, backing, policy):
    a = make_arena(pools, backing, 8 * MIB, policy)
    arenas.append(a)
    fill(a)
    per_page = a.page_size // SUB
    whole = whole_page(a)
    injected = set()               # subpages, added before each injection
    problems = []
    counts = [[0, 0] for _ in range(4)]
    stop = threading.Event()

    injected_pages = set()

    def may_be_lost(sub):           # membership tests only: the sets grow meanwhile
        if whole:
            return sub // per_page in injected_pages
        return sub in injected

    def reader(i):
        rng = random.Random(i)
        try:
            while not stop.is_set():
                off = rng.randrange(a.size - 1)
                n = rng.randint(1, min(3 * SUB, a.size - off))
                try:
                    data = a.read(off, n)
                except kvstore.MemoryFaultError as e:
                    counts[i][1] += 1
                    fo = e.offset
                    if not (off <= fo < off + n and may_be_lost(fo // SUB)):
                        problems.append(f"reader {i}: fault at {fo} for read [{off}, {off + n}) "
                                        f"in a subpage never injected")
                else:
                    counts[i][0] += 1
                    if data != pattern(off, n):
                        problems.append(f"reader {i}: wrong bytes for read [{off}, {off + n})")
        except BaseException as e:             # noqa: BLE001 - reported below
            problems.append(f"reader {i} died: {e!r}")

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    threads = [threading.Thread(target=reader, args=(i,), name=f"reader-{i}") for i in range(4)]
    try:
        for t in threads:
            t.start()
        rng = random.Random(f"inject-{backing}-{policy}")
        nsub = a.nsubpages
        kinds = collections.Counter()
        # Inject for about a second (the readers compete for the GIL, so
        # the count depends on the machine), a few whole pages on mainline.
        deadline = time.monotonic() + 1.0
        k = 0
        while time.monotonic() < deadline and k < (400 if not whole else 3):
            s = rng.randrange(nsub)
            kind = "ar" if k % 2 else "ao"
            injected.add(s)
            injected_pages.add(s // per_page)
            inject(a, s * SUB + rng.randrange(SUB), kind, backing)
            kinds[kind] += 1
            k += 1
            time.sleep(0.001 if not whole else 0.2)
        time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        sys.setswitchinterval(old)
    assert not any(t.is_alive() for t in threads)
    assert not problems, problems[:10]
    assert kinds["ao"] >= (2 if not whole else 1) and kinds["ar"] >= (2 if not whole else 1), kinds
    assert all(ok > 0 for ok, _ in counts), counts
    assert sum(bad for _, bad in counts) > 0, counts
    lost = set(a.lost_subpages())
    if whole:
        pages = {s // per_page for s in injected}
        assert {s // per_page for s in lost} <= pages
    else:
        assert lost <= injected
        # Consume what the readers did not touch; then loss == injection.
        for s in sorted(injected - lost):
            with pytest.raises(kvstore.MemoryFaultError):
                a.read(s * SUB, SUB)
        assert_lost_exactly(a, injected)
        assert_intact(a, injected)


# ============================================================ errors

def test_argument_errors(pools, arenas):
    a = make_arena(pools, "4K", 64 * SUB)
    arenas.append(a)
    size = a.size
    for off, n in ((-1, 1), (size - 1, 2), (0, size + 1), (size + 1, 0), (0, -1)):
        with pytest.raises(IndexError):
            a.read(off, n)
    for off, data in ((-1, b"x"), (size, b"x"), (size - 1, b"ab")):
        with pytest.raises(IndexError):
            a.write(off, data)
    with pytest.raises(IndexError):
        a.inject(size, "ao")
    with pytest.raises(IndexError):
        a.inject(-1, "ao")
    for kind in ("AO", "mce", "", 1, None):
        with pytest.raises(ValueError):
            a.inject(0, kind)
    with pytest.raises(TypeError, match="encode"):
        a.write(0, "text")
    with pytest.raises(TypeError, match="bytes-like"):
        a.write(0, 12)
    with pytest.raises(OSError) as ei:
        a.pread(0, 2 * SUB)                      # crosses a page of the backing
    assert ei.value.errno == errno.EINVAL
    # Nothing above touched the arena.
    assert a.lost_subpages() == [] and a.stats()["injected_ao"] == 0


def test_constructor_errors():
    for size in (0, -1, -4096):
        with pytest.raises(ValueError, match="positive"):
            native.Arena(size, "4K")
    for ps in ("3M", "1T", "", 12345, 8192):
        with pytest.raises(ValueError, match="page_size"):
            native.Arena(SUB, ps)
    with pytest.raises(TypeError):
        native.Arena(SUB, 1.5)
    for pol in ("mainlin", "KEEP_UE", ""):
        with pytest.raises(ValueError, match="kernel_policy"):
            native.Arena(SUB, "4K", pol)
    with pytest.raises(TypeError):
        native.Arena(SUB, "4K", 3)
    with pytest.raises(TypeError):
        native.Arena("4096")


@pytest.mark.parametrize("label", ["2M", "1G"])
def test_hugepages_that_cannot_be_had_raise_arena_error(label):
    # More pages than this machine has memory for: never reservable, and the
    # pools of other processes are left alone.
    if label not in hugepages.status():
        pytest.skip(f"this kernel offers no {label} hugepages")
    page = PAGE_BYTES[label]
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    want = total // page + 8
    with pytest.raises(kvstore.ArenaError) as ei:
        native.Arena(want * page, label)
    msg = str(ei.value)
    human = {"2M": "2 MiB", "1G": "1 GiB"}[label]
    assert f"no free {human} hugepages" in msg, msg
    assert f"need {want}" in msg, msg
    assert "free " in msg and "reserved " in msg, msg
    import re
    m = re.search(r"free (\d+)", msg)
    assert m and int(m.group(1)) >= 0, msg
    assert "kvstore-hugepages reserve" in msg, msg
    assert isinstance(ei.value, OSError)


def test_closed_arena(pools):
    a = make_arena(pools, "4K", 4 * SUB)
    fd, efd = a.fd, a.eventfd
    a.close()
    assert a.closed is True
    a.close()                                      # idempotent
    for call in (lambda: a.read(0, 1), lambda: a.write(0, b"x"), lambda: a.inject(0, "ao"),
                 lambda: a.drain(), lambda: a.lost_subpages(), lambda: a.lost_bitmap(),
                 lambda: a.pread(0, 1), lambda: a.salvage(0), lambda: a.stats(),
                 lambda: a.address, lambda: a.size):
        with pytest.raises(kvstore.ClosedError):
            call()
    for closed_fd in (fd, efd):
        with pytest.raises(OSError) as ei:
            os.fstat(closed_fd)
        assert ei.value.errno == errno.EBADF
    assert issubclass(kvstore.ClosedError, ValueError)


# ============================================================ hwpoison

def test_hwpoison_refused_without_permission(pools, arenas, monkeypatch):
    monkeypatch.delenv("KVSTORE_ALLOW_HWPOISON", raising=False)
    a = make_arena(pools, "4K", 8 * SUB)
    arenas.append(a)
    fill(a)
    sig0 = native.signal_counts()
    with pytest.raises(kvstore.FaultInjectionError, match="KVSTORE_ALLOW_HWPOISON=1"):
        a.inject(SUB, "hwpoison")
    monkeypatch.setenv("KVSTORE_ALLOW_HWPOISON", "yes")   # only "1" allows it
    with pytest.raises(kvstore.FaultInjectionError, match="KVSTORE_ALLOW_HWPOISON=1"):
        a.inject(SUB, "hwpoison")
    assert a.lost_subpages() == [] and a.stats()["injected_hwpoison"] == 0
    assert sig_delta(sig0) == {k: 0 for k in sig0}
    assert_intact(a, ())


def test_hwpoison_allowed_but_unsupported_here(pools, arenas, monkeypatch):
    if native.probe()["hwpoison"]:
        pytest.skip("this kernel has MADV_HWPOISON: real poisoning runs in the kernel lab, not here")
    monkeypatch.setenv("KVSTORE_ALLOW_HWPOISON", "1")
    for backing in ("4K", "2M"):
        a = make_arena(pools, backing, 2 * MIB if backing == "2M" else 8 * SUB, "keep_ue")
        arenas.append(a)
        fill(a)
        with pytest.raises(kvstore.FaultInjectionError) as ei:
            a.inject(SUB, "hwpoison")
        assert "CONFIG_MEMORY_FAILURE" in str(ei.value), ei.value
        assert "'ao' or 'ar'" in str(ei.value)
        assert a.lost_subpages() == [] and a.stats()["injected_hwpoison"] == 0
        assert_intact(a, ())
