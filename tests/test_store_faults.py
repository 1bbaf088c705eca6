"""The embedded Store under injected memory faults (DESIGN.md sections 3, 5, 6).

Exact invalidation, LOST keys without a rebuild source, rebuilding from a
lagging source, read-repair, the patrol scrubber, checksum corruption, large
values, threads and on_loss callbacks. 4 KiB memfd backing under both
simulated kernel policies; 2 MiB hugepage variants skip with the reason when
no pages can be reserved.
"""

import random
import threading
import time

import pytest

import kvstore
from storeutil import (SUB, Replica, keys_on_page, keys_on_subpage, lost_set, open_2m, record_map,
                       reserved_2m, same_group_key)

POLICIES = ["keep_ue", "mainline"]


def fill(store, n, rng, lo=8, hi=600, big_every=0, big=(5000, 20000)):
    model = {}
    for i in range(n):
        key = b"key:%06d" % i
        if big_every and i % big_every == 0:
            val = rng.randbytes(rng.randint(*big))
        else:
            val = rng.randbytes(rng.randint(lo, hi))
        store.put(key, val)
        model[key] = val
    return model


def manual_store(policy, cap="4MiB", **kw):
    return kvstore.Store(cap, page_size="4K", kernel_policy=policy, recovery="manual", **kw)


# ---------------------------------------------------------------- exactness

@pytest.mark.parametrize("policy", POLICIES)
def test_invalidation_is_exact_ao(policy):
    rng = random.Random(11)
    with manual_store(policy) as s:
        model = fill(s, 3000, rng, big_every=97)
        used_subpages = sorted({off // SUB for off, ln in record_map(s).values()})
        expected = set()
        for sp in rng.sample(used_subpages, 25):
            rmap = record_map(s)
            want = keys_on_subpage(s, sp, rmap)
            assert want, "picked subpages hold records"
            info = s.faults.inject(sp * SUB + rng.randrange(SUB), "ao")
            assert info["subpage"] == sp and info["kind"] == "ao"
            r = s.recover()
            assert r["keys_lost"] == len(want - expected)
            expected |= want
            assert lost_set(s) == expected
        st = s.stats()
        assert st["lost_keys"] == len(expected) == st["keys_lost_total"]
        assert st["faults_injected"] == 25 and st["signals_ao"] >= 25
        assert st["lost_subpages"] >= 25
        # everything else still reads right
        for k, v in model.items():
            if k not in expected:
                assert s.get(k) == v
        assert len(s) == len(model)


@pytest.mark.parametrize("policy", POLICIES)
def test_invalidation_is_exact_ar_on_touch(policy):
    rng = random.Random(12)
    with manual_store(policy) as s:
        model = fill(s, 1500, rng)
        rmap = record_map(s)
        sp = rmap[b"key:000700"][0] // SUB
        want = keys_on_subpage(s, sp, rmap)
        s.faults.inject(sp * SUB + 17, "ar")
        # latent: nothing is known lost until something touches it
        s.recover()
        assert lost_set(s) == set()
        with pytest.raises(kvstore.KeyLostError):
            s.get(b"key:000700")
        s.recover()
        assert lost_set(s) == want
        st = s.stats()
        assert st["signals_ar"] + st["signals_adrerr"] >= 1
        for k in model.keys() - want:
            assert s.get(k) == model[k]


@pytest.mark.parametrize("policy", POLICIES)
def test_fault_on_empty_subpage_loses_nothing(policy):
    with manual_store(policy) as s:
        s.put(b"a", b"1")
        s.faults.inject(3 << 20, "ao")
        r = s.recover()
        assert r["keys_lost"] == 0 and r["subpages"] >= 1
        assert s.get(b"a") == b"1" and lost_set(s) == set()
        # the lost subpage is quarantined: no later record lands there
        for i in range(3000):
            s.put(b"f%d" % i, b"x" * 700)
        for off, ln in record_map(s).values():
            assert not (off < (3 << 20) + SUB and off + ln > (3 << 20))


@pytest.mark.parametrize("policy", POLICIES)
def test_large_value_fault_in_middle_loses_exactly_that_key(policy):
    rng = random.Random(3)
    with manual_store(policy) as s:
        model = fill(s, 200, rng)
        big = rng.randbytes(5 * SUB + 123)
        s.put(b"big", big)
        for i in range(200):
            s.put(b"after%d" % i, b"y" * 300)
        assert s.get(b"big") == big
        off, ln = s.locate(b"big")
        assert off % SUB == 0 and ln >= len(big)
        s.faults.inject(off + 2 * SUB + 5, "ao")
        s.recover()
        assert lost_set(s) == {b"big"}
        with pytest.raises(kvstore.KeyLostError):
            s.get(b"big")
        for k, v in model.items():
            assert s.get(k) == v
        # the healthy subpages of the big record are free again
        s.put(b"big2", big)
        assert s.get(b"big2") == big


def test_large_values_round_trip():
    rng = random.Random(4)
    with manual_store("keep_ue", cap="16MiB") as s:
        vals = {b"v%d" % n: rng.randbytes(n) for n in (4089, 4096, 4097, 8192, 10000, 100000, 1 << 20)}
        for k, v in vals.items():
            s.put(k, v)
        for k, v in vals.items():
            assert s.get(k) == v
            off, ln = s.locate(k)
            if ln > SUB:
                assert off % SUB == 0
            else:
                assert off // SUB == (off + ln - 1) // SUB


# ---------------------------------------------------------------- no source

@pytest.mark.parametrize("policy", POLICIES)
def test_lost_without_source(policy):
    with manual_store(policy) as s:
        for i in range(100):
            s.put(b"k%d" % i, b"v%d" % i)
        version = s.get_versioned(b"k5")[0]
        want = keys_on_subpage(s, s.locate(b"k5")[0] // SUB)
        s.faults.inject_key(b"k5", "ao")
        s.wait_recovered(5)
        assert lost_set(s) == want
        states = {k: (v, st) for k, v, st in s.lost_keys()}
        assert states[b"k5"] == (version, "lost")
        for _ in range(3):  # never None, never garbage, every time
            with pytest.raises(kvstore.KeyLostError) as ei:
                s.get(b"k5")
            assert ei.value.retryable and ei.value.version == version and ei.value.key == b"k5"
            assert not isinstance(ei.value, kvstore.UnrecoverableKeyError)
        with pytest.raises(kvstore.KeyLostError):
            s.get_versioned(b"k5")
        with pytest.raises(kvstore.KeyLostError):
            s.mget([b"k1", b"k5"])
        marked = s.mget([b"k5", b"nope"], on_lost="mark")
        assert marked[0] is kvstore.LOST and marked[1] is None
        assert s.exists(b"k5") and b"k5" in s and b"k5" in s.keys()
        assert len(s) == 100
        with pytest.raises(kvstore.KeyLostError):
            s.locate(b"k5")
        assert s.fetch([(b"k5", 0)]) == {}       # a lost key is not served to peers
        # put over a lost key makes it present again
        other = next(iter(want - {b"k5"}), None)
        v2 = s.put(b"k5", b"fresh")
        assert v2 > version and s.get(b"k5") == b"fresh"
        assert b"k5" not in lost_set(s)
        # delete works on a lost key
        if other is not None:
            assert s.delete(other) is True
            assert s.get(other) is None and other not in s
            assert other not in lost_set(s)
        st = s.stats()
        assert st["lost_keys"] == len(want - {b"k5", other})
        assert len(s) == 100 - (other is not None)


def test_on_loss_callback_manual():
    with manual_store("keep_ue") as s:
        got = []
        cb = got.append
        assert s.on_loss(cb) is cb
        s.on_loss(lambda keys: 1 / 0)          # a failing callback does not stop recovery
        for i in range(50):
            s.put(b"k%d" % i, b"v" * 40)
        want = keys_on_subpage(s, s.locate(b"k3")[0] // SUB)
        s.faults.inject_key(b"k3")
        s.recover()
        assert len(got) == 1 and set(got[0]) == want
        assert lost_set(s) == want


def test_on_loss_callback_thread():
    rep = Replica()
    with kvstore.Store("1MiB", page_size="4K", rebuild_source=rep) as s:
        got = []
        ev = threading.Event()
        s.on_loss(lambda keys: (got.append(list(keys)), ev.set()))
        for i in range(50):
            rep.record(b"k%d" % i, s.put(b"k%d" % i, b"v" * 40), b"v" * 40)
        want = keys_on_subpage(s, s.locate(b"k3")[0] // SUB)
        s.faults.inject_key(b"k3", "ao")
        assert ev.wait(5)
        assert s.wait_recovered(5)
        assert {k for batch in got for k in batch} == want
        assert all(s.get(b"k%d" % i) == b"v" * 40 for i in range(50))
        assert s.stats()["rebuilt_keys"] == len(want)


# ---------------------------------------------------------------- rebuild

@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", ["ao", "ar"])
def test_rebuild_from_source_thread(policy, kind):
    rep = Replica()
    rng = random.Random(5)
    with kvstore.Store("4MiB", page_size="4K", kernel_policy=policy, rebuild_source=rep) as s:
        model = {}
        for i in range(2000):
            k, v = b"k%d" % i, rng.randbytes(rng.randint(1, 300))
            rep.record(k, s.put(k, v), v)
            model[k] = v
        target = b"k1234"
        want = keys_on_subpage(s, s.locate(target)[0] // SUB)
        s.faults.inject_key(target, kind)
        if kind == "ar":
            s.scrub(1 << 30)    # touch it (as a read would) so the latent fault fires
        assert s.wait_recovered(10)
        st = s.stats()
        assert st["keys_lost_total"] == len(want)
        assert st["rebuilt_keys"] + st["read_repairs"] >= len(want)
        assert st["lost_keys"] == 0 and st["rebuild_pending"] == 0
        assert lost_set(s) == set()
        for k, v in model.items():
            assert s.get(k) == v
        # rebuilt keys are placed in healthy memory, away from the quarantined subpage
        assert st["quarantined_subpages"] >= 1
        lost_subpages = set(s.arena.lost_subpages())
        assert lost_subpages
        for k in want:
            off, ln = s.locate(k)
            assert not lost_subpages & set(range(off // SUB, (off + ln - 1) // SUB + 1))


def test_read_repair_answers_directly():
    rep = Replica()
    with manual_store("keep_ue", rebuild_source=rep, read_repair_timeout=2.0) as s:
        for i in range(100):
            rep.record(b"k%d" % i, s.put(b"k%d" % i, b"value-%d" % i), b"value-%d" % i)
        s.faults.inject_key(b"k42", "ao")
        # no recover() call: the read itself fetches from the source
        assert s.get(b"k42") == b"value-42"
        assert s.get_versioned(b"k42")[1] == b"value-42"
        assert s.stats()["read_repairs"] >= 1
        # other keys of the subpage are still LOST until rebuilt; mget repairs them too
        vals = s.mget([b"k%d" % i for i in range(100)])
        assert vals == [b"value-%d" % i for i in range(100)]


class LaggingSource:
    """Answers from a script: each fetch pops the next answer for a key."""

    def __init__(self, script):
        self.script = {k: list(v) for k, v in script.items()}
        self.calls = []
        self.lock = threading.Lock()

    def fetch(self, requests):
        with self.lock:
            self.calls.append([(bytes(k), v) for k, v in requests])
            out = {}
            for k, _min in requests:
                steps = self.script.get(bytes(k))
                if not steps:
                    continue
                ans = steps.pop(0) if len(steps) > 1 else steps[0]
                if ans is not None:
                    out[bytes(k)] = ans
            return out


@pytest.mark.parametrize("policy", POLICIES)
def test_lagging_source_waits_for_right_version(policy):
    with manual_store(policy, read_repair_timeout=0.01, rebuild_deadline=30) as s:
        s.put(b"k", b"old")
        v_new = s.put(b"k", b"new")
        other = same_group_key(s, b"k")          # its record goes next to k's
        v_other = s.put(other, b"o")
        src = LaggingSource({
            b"k": [None, (v_new - 1, b"old"), None, (v_new, b"new")],
            other: [(v_other + 5, b"newer-than-asked")],
        })
        s.rebuild_source = src
        assert s.locate(b"k")[0] // SUB == s.locate(other)[0] // SUB
        s.faults.inject_key(b"k", "ao")
        s.recover()
        # 'other' came back at once (a newer version is fine), 'k' waits
        assert s.get_versioned(other) == (v_other + 5, b"newer-than-asked")
        states = {k: st for k, _v, st in s.lost_keys()}
        assert states == {b"k": "rebuilding"}
        t0 = time.monotonic()
        assert s.wait_recovered(10)
        assert time.monotonic() - t0 < 5
        assert s.get_versioned(b"k") == (v_new, b"new")
        # every request asked for at least the version that was lost
        asked = [v for call in src.calls for k, v in call if k == b"k"]
        assert asked and all(v == v_new for v in asked)
        assert len(asked) >= 4              # retried past the stale and missing answers
        st = s.stats()
        assert st["rebuilt_keys"] == 2 and st["unrecoverable_keys"] == 0 and st["lost_keys"] == 0


def test_backoff_spaces_out_retries():
    with manual_store("keep_ue", rebuild_deadline=30) as s:
        s.put(b"k", b"v")
        src = LaggingSource({})
        s.rebuild_source = src
        s.faults.inject_key(b"k")
        t_end = time.monotonic() + 0.6
        while time.monotonic() < t_end:
            s.recover()
            time.sleep(0.001)
        # hundreds of recover() calls, but retries back off
        assert 3 <= len(src.calls) <= 40, len(src.calls)
        assert lost_set(s) == {b"k"}


@pytest.mark.parametrize("policy", POLICIES)
def test_unrecoverable_after_deadline(policy):
    rep = Replica()
    with kvstore.Store("1MiB", page_size="4K", kernel_policy=policy, rebuild_source=rep,
                       rebuild_deadline=0.3, read_repair_timeout=0.05) as s:
        for i in range(40):
            v = s.put(b"k%d" % i, b"val%d" % i)
            if i != 7:
                rep.record(b"k%d" % i, v, b"val%d" % i)
        version = s.get_versioned(b"k7")[0]
        want = keys_on_subpage(s, s.locate(b"k7")[0] // SUB)
        assert b"k7" in want
        s.faults.inject_key(b"k7", "ao")
        t0 = time.monotonic()
        assert s.wait_recovered(10)
        assert time.monotonic() - t0 >= 0.25
        assert s.lost_keys() == [(b"k7", version, "unrecoverable")]
        with pytest.raises(kvstore.UnrecoverableKeyError) as ei:
            s.get(b"k7")
        assert isinstance(ei.value, kvstore.KeyLostError) and not ei.value.retryable
        with pytest.raises(kvstore.UnrecoverableKeyError):
            s.mget([b"k7"])
        assert s.mget([b"k7"], on_lost="mark") == [kvstore.LOST]
        assert b"k7" in s
        st = s.stats()
        assert st["unrecoverable_keys"] == 1 and st["lost_keys"] == 1
        assert st["rebuilt_keys"] + st["read_repairs"] >= len(want) - 1
        for k in want - {b"k7"}:
            assert s.get(k) == b"val" + k[1:]
        # the application may write it again
        s.put(b"k7", b"back")
        assert s.get(b"k7") == b"back" and s.stats()["lost_keys"] == 0


def test_source_that_raises_is_retried():
    calls = []

    def flaky(requests):
        calls.append(list(requests))
        if len(calls) < 3:
            raise OSError("replica unreachable")
        return {bytes(k): (ver, b"val") for k, ver in requests}

    with manual_store("keep_ue", rebuild_source=flaky, read_repair_timeout=0.01) as s:
        s.put(b"k", b"val")
        s.faults.inject_key(b"k")
        assert s.wait_recovered(10)
        assert s.get(b"k") == b"val" and len(calls) >= 3


def test_rebuilt_key_keeps_expiry():
    rep = Replica()
    with manual_store("keep_ue", rebuild_source=rep) as s:
        rep.record(b"t", s.put(b"t", b"v", ttl=100), b"v")
        rep.record(b"p", s.put(b"p", b"w"), b"w")
        s.faults.inject_key(b"t")
        assert s.wait_recovered(5)
        assert s.stats()["rebuilt_keys"] >= 1
        assert 90 < s.ttl(b"t") <= 100.01
        assert s.ttl(b"p") == -1


def test_store_serves_as_rebuild_source_for_a_peer():
    with manual_store("keep_ue") as primary, manual_store("mainline", rebuild_source=None) as replica:
        for i in range(500):
            k, v = b"k%d" % i, b"v%d" % i * 20
            ver = primary.put(k, v)
            replica.put_versioned(k, v, ver)
        replica.rebuild_source = primary
        want = keys_on_subpage(replica, replica.locate(b"k250")[0] // SUB)
        replica.faults.inject_key(b"k250")
        assert replica.wait_recovered(5)
        assert replica.stats()["rebuilt_keys"] == len(want)
        for i in range(500):
            assert replica.get_versioned(b"k%d" % i) == primary.get_versioned(b"k%d" % i)


# ---------------------------------------------------------------- scrubber

@pytest.mark.parametrize("policy", POLICIES)
def test_scrubber_finds_latent_ar_before_any_read(policy):
    with kvstore.Store("1MiB", page_size="4K", kernel_policy=policy, scrub_rate=64 << 20,
                       maintenance_interval=0.01) as s:
        for i in range(500):
            s.put(b"k%d" % i, b"v" * 100)
        want = keys_on_subpage(s, s.locate(b"k100")[0] // SUB)
        s.faults.inject_key(b"k100", "ar")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            st = s.stats()
            if st["scrub_found"] or st["keys_lost_total"]:
                break
            time.sleep(0.01)
        assert s.wait_recovered(5)
        st = s.stats()
        assert st["scrub_found"] >= 1 and st["keys_lost_total"] == len(want)
        assert st["read_repairs"] == 0
        assert lost_set(s) == want                  # no source: they stay LOST
        assert st["scrubbed_bytes"] > 0


def test_scrubber_rebuilds_from_source_before_any_read():
    rep = Replica()
    with kvstore.Store("1MiB", page_size="4K", rebuild_source=rep, scrub_rate=64 << 20,
                       maintenance_interval=0.01) as s:
        for i in range(500):
            rep.record(b"k%d" % i, s.put(b"k%d" % i, b"v%d" % i), b"v%d" % i)
        want = keys_on_subpage(s, s.locate(b"k100")[0] // SUB)
        s.faults.inject_key(b"k100", "ar")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and s.stats()["rebuilt_keys"] < len(want):
            time.sleep(0.01)
        st = s.stats()
        assert st["rebuilt_keys"] == len(want) and st["scrub_found"] >= 1
        assert st["read_repairs"] == 0
        assert all(s.get(b"k%d" % i) == b"v%d" % i for i in range(500))


@pytest.mark.parametrize("byte", [0, 3, 8, -1])
def test_checksum_corruption_detected_on_get(byte):
    with manual_store("keep_ue") as s:
        for i in range(20):
            s.put(b"k%d" % i, b"value-%d" % i * 5)
        off, ln = s.locate(b"k9")
        s._corrupt(b"k9", byte % ln)
        with pytest.raises(kvstore.KeyLostError):
            s.get(b"k9")
        st = s.stats()
        assert st["checksum_failures"] == 1
        assert b"k9" in lost_set(s)
        assert s.get(b"k8") == b"value-8" * 5


def test_checksum_corruption_repaired_from_source():
    rep = Replica()
    with manual_store("keep_ue", rebuild_source=rep) as s:
        for i in range(20):
            rep.record(b"k%d" % i, s.put(b"k%d" % i, b"value-%d" % i), b"value-%d" % i)
        s._corrupt(b"k9", 10)
        assert s.get(b"k9") == b"value-9"
        assert s.stats()["checksum_failures"] == 1


def test_checksum_corruption_found_by_scrubber():
    with manual_store("mainline") as s:
        for i in range(300):
            s.put(b"k%d" % i, b"v" * 50)
        s._corrupt(b"k123", 20)
        examined, found = s.scrub(1 << 30)
        assert found == 1 and examined >= 300 * 50
        assert lost_set(s) == {b"k123"}
        st = s.stats()
        assert st["scrub_found"] == 1 and st["checksum_failures"] == 1
        with pytest.raises(IndexError):
            s._corrupt(b"k1", 10**6)


def test_scrubber_with_rate_in_thread_finds_corruption():
    with kvstore.Store("1MiB", page_size="4K", scrub_rate=32 << 20, maintenance_interval=0.01) as s:
        for i in range(300):
            s.put(b"k%d" % i, b"v" * 50)
        s._corrupt(b"k7", 30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not s.stats()["scrub_found"]:
            time.sleep(0.01)
        assert s.stats()["scrub_found"] == 1
        assert lost_set(s) == {b"k7"}


# ---------------------------------------------------------------- threads

@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
def test_threads_with_faults_and_source(policy):
    rep = Replica()
    errors = []
    stop = threading.Event()
    with kvstore.Store("8MiB", page_size="4K", kernel_policy=policy, rebuild_source=rep,
                       read_repair_timeout=5.0) as s:

        def worker(tid):
            rng = random.Random(tid)
            mine = {}
            try:
                n = 0
                while not stop.is_set() and n < 200000:
                    n += 1
                    k = b"t%d:%d" % (tid, rng.randrange(200))
                    if rng.random() < 0.5 or k not in mine:
                        v = rng.randbytes(rng.randint(0, 400))
                        ver = s.put(k, v)
                        rep.record(k, ver, v)
                        mine[k] = v
                    else:
                        got = s.get(k)
                        if got != mine[k]:
                            errors.append((tid, k, "wrong value"))
                for k, v in mine.items():
                    if s.get(k) != v:
                        errors.append((tid, k, "wrong at end"))
            except Exception as e:  # KeyLostError must not escape with a source
                errors.append((tid, repr(e)))

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        rng = random.Random(99)
        injected = 0
        while any(t.is_alive() for t in threads) and injected < 60:
            keys = s.keys()
            if keys:
                k = rng.choice(keys)
                try:
                    s.faults.inject_key(k, rng.choice(["ao", "ar"]))
                    injected += 1
                except (kvstore.KeyLostError, KeyError):
                    pass
            time.sleep(0.005)
        stop.set()
        for t in threads:
            t.join(60)
        assert not errors, errors[:5]
        assert s.wait_recovered(10)
        st = s.stats()
        assert injected == 60 and st["faults_injected"] == injected
        assert st["keys_lost_total"] > 0 and st["lost_keys"] == 0


# ---------------------------------------------------------------- 2 MiB hugepages

@pytest.mark.hugepages
@pytest.mark.parametrize("policy", POLICIES)
def test_exact_invalidation_on_2m(policy):
    """keep_ue: only the hit 4 KiB goes. mainline: the whole 2 MiB page
    faults; salvage into a spare page keeps all but the poisoned 4 KiB, and
    without a spare every key on the page is lost."""
    rng = random.Random(21)
    with reserved_2m(8):
        s = open_2m("4MiB", policy, 8, recovery="manual")
        try:
            model = fill(s, 4000, rng, hi=800, big_every=101)
            expected = set()
            for target in (b"key:000100", b"key:003000", b"key:000707"):
                if target in expected:
                    continue
                rmap = record_map(s)
                sp = rmap[target][0] // SUB
                sub_keys = keys_on_subpage(s, sp, rmap)
                page_keys = keys_on_page(s, 2 << 20, sp // 512, rmap)
                s.faults.inject(sp * SUB + 99, "ao")
                r = s.recover()
                if policy == "keep_ue" or r["pages_salvaged"]:
                    assert r["salvage_failed"] == 0
                    expected |= sub_keys
                else:
                    assert r["salvage_failed"] == 1, r
                    expected |= page_keys
                assert lost_set(s) == expected, r
            for k, v in model.items():
                if k not in expected:
                    assert s.get(k) == v
            if policy == "mainline":
                assert s.stats()["pages_salvaged"] + s.stats()["salvage_failed"] >= 1
        finally:
            s.close()


@pytest.mark.hugepages
@pytest.mark.parametrize("policy", POLICIES)
def test_ar_rebuild_on_2m(policy):
    rep = Replica()
    with reserved_2m(6):
        s = open_2m("2MiB", policy, 6, rebuild_source=rep)
        try:
            for i in range(3000):
                rep.record(b"k%d" % i, s.put(b"k%d" % i, b"v%d" % i * 9), b"v%d" % i * 9)
            s.faults.inject_key(b"k1500", "ar")
            assert s.get(b"k1500") == b"v1500" * 9        # fault on read, repaired from the source
            assert s.wait_recovered(10)
            assert all(s.get(b"k%d" % i) == b"v%d" % i * 9 for i in range(3000))
            assert s.stats()["lost_keys"] == 0
        finally:
            s.close()


@pytest.mark.parametrize("how", ["delete", "put"])
def test_deleted_or_rewritten_lost_key_is_not_waited_for(how):
    with manual_store("keep_ue", rebuild_source=lambda req: {}, rebuild_deadline=2,
                      read_repair_timeout=0.01) as s:
        s.put(b"j", b"v")
        s.faults.inject_key(b"j")
        s.recover()
        assert lost_set(s) == {b"j"}
        if how == "delete":
            assert s.delete(b"j")
        else:
            s.put(b"j", b"new")
        t0 = time.monotonic()
        assert s.wait_recovered(10)
        assert time.monotonic() - t0 < 1.0
        assert s.stats()["rebuild_pending"] == 0


def test_scrub_on_empty_store_then_fill():
    """Regression (c-bugs.md S3): a scrub of a never-used index left the cursor
    inside the first entry created later, which the next scrub misread."""
    with manual_store("keep_ue") as s:
        # an empty store has one (empty) index page, which the patrol reads too
        assert s.scrub(1 << 20) == (4096, 0)
        # keys whose bytes would pass for an entry header if read from the wrong place
        order = [bytes([0, 0, 0, 0, 0, 0, 0, 0x02 | (1 << 1) | i]) + b"k" * 16 for i in range(64)]
        for k in order:
            s.put(k, b"v" * 40)
        keys = set(order)
        examined, found = s.scrub(1 << 20)
        assert found == 0
        assert s.take_lost(0) == []
        assert s.stats()["lost_keys"] == 0
        assert set(s.keys()) == keys
        assert all(s.get(k) == b"v" * 40 for k in keys)


def test_fault_injection_arguments():
    with manual_store("keep_ue", cap="1MiB") as s:
        sup = s.faults.supported()
        assert sup["ao"] and sup["ar"] and isinstance(sup["hwpoison"], bool)
        if not sup["hwpoison"]:
            assert sup["hwpoison_reason"]
            with pytest.raises(kvstore.FaultInjectionError):
                s.faults.inject(0, "hwpoison")
        with pytest.raises(ValueError):
            s.faults.inject(0, "bogus")
        for off in (-1, 1 << 20, 10**12):
            with pytest.raises(IndexError):
                s.faults.inject(off, "ao")
        with pytest.raises(KeyError):
            s.faults.inject_key(b"absent")
        assert s.stats()["faults_injected"] == 0
        s.put(b"k", b"v")
        assert s.faults.inject_key(b"k")["kind"] == "ao"
        assert s.stats()["faults_injected"] == 1


@pytest.mark.parametrize("policy", POLICIES)
def test_ar_in_large_value_loses_only_it(policy):
    with manual_store(policy) as s:
        for i in range(100):
            s.put(b"s%d" % i, b"x" * 200)
        big = bytes(range(256)) * 64             # 16 KiB: four subpages
        s.put(b"big", big)
        for i in range(100, 200):
            s.put(b"s%d" % i, b"x" * 200)
        off, ln = s.locate(b"big")
        s.faults.inject(off + 3 * SUB - 1, "ar")   # last byte of the third subpage
        with pytest.raises(kvstore.KeyLostError):
            s.get(b"big")
        s.recover()
        assert lost_set(s) == {b"big"}
        assert all(s.get(b"s%d" % i) == b"x" * 200 for i in range(200))


def test_flush_after_loss_forgets_lost_keys_keeps_quarantine():
    rep = Replica()
    rep.online = False
    with manual_store("keep_ue", cap="1MiB", rebuild_source=rep, read_repair_timeout=0.01) as s:
        for i in range(200):
            s.put(b"k%d" % i, b"v" * 100)
        bad_sp = s.locate(b"k50")[0] // SUB
        s.faults.inject_key(b"k50")
        s.recover()
        assert lost_set(s)
        s.flush()
        assert len(s) == 0 and s.lost_keys() == [] and s.stats()["lost_keys"] == 0
        assert s.wait_recovered(2)
        assert s.get(b"k50") is None
        # the lost subpage stays out of use after the flush
        for i in range(2000):
            try:
                s.put(b"n%d" % i, b"w" * 300)
            except kvstore.StoreFullError:
                break
        for off, ln in record_map(s).values():
            assert not (off // SUB <= bad_sp <= (off + ln - 1) // SUB)
        assert s.stats()["quarantined_subpages"] >= 1
