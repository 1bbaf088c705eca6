"""A change of expiry is a write: EXPIRE/PEXPIRE/PERSIST (and GETEX, SET
with an expiry) take a version from the same counter as puts and deletes.

Without it, a rebuild source that never saw the change could answer with
the key's old (version, expiry) and have it installed over the newer state:
the key's version would not say that anything changed. These tests check
the version is taken, the value still reads (the record's checksum is
rebound to the new version), and that a source holding the old (version,
expiry) cannot undo a newer EXPIRE or PERSIST, by name or by hash range.
"""

import time

import pytest

import kvstore
from storeutil import Replica

SUB = 4096


def now_ms():
    return time.time_ns() // 1_000_000


def test_expire_and_persist_take_a_version_and_the_value_still_reads():
    with kvstore.Store("4MiB", page_size="4K", recovery="manual") as s:
        v1 = s.put(b"k", b"value-1")
        s.put(b"long:" + b"x" * 2000, b"long-key value")       # key kept in the record
        at = now_ms() + 600_000
        before = s.version
        assert s.expire_at_ms(b"k", at) is True
        v2 = s.get_versioned(b"k")[0]
        assert v2 > v1 and v2 == s.version == before + 1
        assert s.get(b"k") == b"value-1"
        assert 0 < s.ttl(b"k") <= 600
        # changing an existing expiry takes a version too
        assert s.expire_at_ms(b"k", at + 1000) is True
        v3 = s.get_versioned(b"k")[0]
        assert v3 == v2 + 1 and s.get(b"k") == b"value-1"
        # PERSIST removes it and takes a version; a second PERSIST changes nothing
        assert s.persist(b"k") is True
        v4 = s.get_versioned(b"k")[0]
        assert v4 == v3 + 1 and s.ttl(b"k") == -1
        assert s.persist(b"k") is False
        assert s.get_versioned(b"k")[0] == v4 and s.version == v4
        # long keys (their key bytes live in the record) too
        lk = b"long:" + b"x" * 2000
        assert s.expire(lk, 100) is True
        assert s.get(lk) == b"long-key value" and s.get_versioned(lk)[0] == s.version
        # the scrubber finds every record still consistent with its version
        s.scrub(1 << 30)
        assert s.stats()["checksum_failures"] == 0
        # an absent key: False, no version
        v = s.version
        assert s.expire_at_ms(b"nope", at) is False and s.version == v


def test_replicated_expire_applies_at_the_primarys_version():
    with kvstore.Store("4MiB", page_size="4K", recovery="manual") as s:
        s.put_versioned(b"k", b"v", 10)
        assert s.expire_at_ms(b"k", now_ms() + 60_000, 12) is True
        assert s.get_versioned(b"k")[0] == 12 and s.version >= 12
        # an older change (already overtaken here) is ignored
        assert s.expire_at_ms(b"k", 0, 11) is False
        assert s.ttl(b"k") > 0 and s.get_versioned(b"k")[0] == 12
        assert s.get(b"k") == b"v"


def test_put_with_an_absolute_expiry_is_one_version():
    with kvstore.Store("4MiB", page_size="4K", recovery="manual") as s:
        at = now_ms() + 60_000
        v = s.put(b"k", b"v", expire_at_ms=at)
        assert s.version == v and s.expire_at(b"k") == at
        v2 = s.put(b"k", b"w", expire_at_ms=-1)          # keep the expiry
        assert s.expire_at(b"k") == at and v2 == v + 1
        with pytest.raises(TypeError):
            s.put(b"k", b"v", 5, expire_at_ms=at)
        with pytest.raises(ValueError):
            s.put(b"k", b"v", expire_at_ms=-5)


@pytest.mark.parametrize("change", ["expire", "persist"])
def test_old_version_and_expiry_from_a_source_cannot_undo_a_newer_change_by_name(change):
    """The key's record is lost after the change: the source still holds the
    key at its version from before the change (with the old expiry). It is
    stale for the LOST key, which waits for a copy at least as new."""
    rep = Replica()
    with kvstore.Store("4MiB", page_size="4K", rebuild_source=rep, recovery="manual",
                       read_repair_timeout=0.05, rebuild_deadline=60) as s:
        old_at = now_ms() + 3_600_000
        v1 = s.put(b"k", b"value", ttl=3600 if change == "persist" else None)
        rep.record(b"k", v1, b"value")
        if change == "persist":
            assert s.persist(b"k") is True
        else:
            assert s.expire(b"k", 5) is True
        v2 = s.get_versioned(b"k")[0]
        assert v2 > v1
        s.faults.inject_key(b"k", "ao")
        s.recover()
        with pytest.raises(kvstore.KeyLostError) as ei:
            s.get(b"k")
        assert ei.value.version == v2
        # the stale copy is refused, however it is offered
        assert s.install(b"k", b"value", v1) == "stale"
        assert s.install_from_range(b"k", b"value", v1, old_at, v2) == "stale"
        with pytest.raises(kvstore.KeyLostError):
            s.get(b"k")
        # a copy made after the change comes back, with the change kept
        rep.record(b"k", v2, b"value")
        assert s.get(b"k") == b"value"
        if change == "persist":
            assert s.ttl(b"k") == -1
        else:
            assert 0 < s.ttl(b"k") <= 5


@pytest.mark.parametrize("change", ["expire", "persist"])
def test_range_source_behind_the_change_is_not_installed_from(change):
    """The key's index page is lost after the change. A range source that
    holds every write up to the key's old version, and has the old expiry,
    has not applied the change: it is behind the version the range was lost
    at, so nothing of it is installed; once it has the change, that comes
    back."""
    rep = Replica()
    with kvstore.Store("4MiB", page_size="4K", rebuild_source=rep, recovery="manual",
                       read_repair_timeout=0.05, rebuild_deadline=60) as s:
        old_at = now_ms() + 3_600_000
        for i in range(200):
            k = b"other:%03d" % i
            rep.record(k, s.put(k, b"o" * 20), b"o" * 20)
        if change == "persist":
            v1 = s.put(b"k", b"value", expire_at_ms=old_at)
            rep.record(b"k", v1, b"value")
            rep.data[b"k"] = (v1, b"value", old_at)
            assert s.persist(b"k") is True
        else:
            v1 = s.put(b"k", b"value")
            rep.record(b"k", v1, b"value")
            assert s.expire(b"k", 30) is True
        new_at = s.expire_at(b"k")
        v2 = s.get_versioned(b"k")[0]
        assert v2 == s.version > v1 == rep.applied
        s.faults.inject_entry(b"k", "ao")
        s.recover()
        for _ in range(3):
            s.recover()
            with pytest.raises(kvstore.KeyLostError):
                s.get(b"k")
        assert rep.range_calls >= 1 and s.stats()["lost_ranges"] >= 1
        # the source applies the change, at its version
        if change == "persist":
            rep.record(b"k", v2, b"value")
        else:
            rep.record(b"k", v2, b"value")
            rep.data[b"k"] = (v2, b"value", new_at)
        assert s.wait_recovered(10)
        assert s.get_versioned(b"k") == (v2, b"value")
        if change == "persist":
            assert s.ttl(b"k") == -1
        else:
            assert s.expire_at(b"k") == new_at


def test_expire_on_a_lost_key_repairs_it_first():
    rep = Replica()
    with kvstore.Store("4MiB", page_size="4K", rebuild_source=rep, recovery="manual") as s:
        v1 = s.put(b"k", b"value")
        rep.record(b"k", v1, b"value")
        s.faults.inject_key(b"k", "ao")
        s.recover()
        assert s.expire(b"k", 100) is True
        assert s.get(b"k") == b"value" and s.get_versioned(b"k")[0] == s.version > v1
    with kvstore.Store("4MiB", page_size="4K", recovery="manual") as s:
        s.put(b"k", b"value")
        s.faults.inject_key(b"k", "ao")
        s.recover()
        with pytest.raises(kvstore.KeyLostError):
            s.expire(b"k", 100)


def test_replicated_expire_on_a_lost_key_raises_the_version_its_rebuild_needs():
    """A primary's expiry change reaching a replica where the key is LOST:
    the LOST entry takes the change's version and expiry, so only a copy
    at least that new is installed, and it keeps the new expiry."""
    rep = Replica()
    with kvstore.Store("4MiB", page_size="4K", rebuild_source=rep, recovery="manual",
                       read_repair_timeout=0.05, rebuild_deadline=60) as s:
        s.put_versioned(b"k", b"value", 10)
        rep.record(b"k", 10, b"value")
        rep.online = False
        s.faults.inject_key(b"k", "ao")
        s.recover()
        with pytest.raises(kvstore.KeyLostError):
            s.get(b"k")
        at = now_ms() + 60_000
        assert s.expire_at_ms(b"k", at, 12) is True
        assert s.state(b"k") in ("lost", "rebuilding")
        assert s.install(b"k", b"value", 10) == "stale"        # from before the change
        assert s.install(b"k", b"value", 12) == "installed"
        assert s.get_versioned(b"k") == (12, b"value") and s.expire_at(b"k") == at
        # a local change of a LOST key (no version given) needs the key back first
        s.faults.inject_key(b"k", "ao")
        s.recover()
        with pytest.raises(kvstore.KeyLostError):
            s.expire_at_ms(b"k", at + 1000)
        assert s.expire_at(b"k") == at
