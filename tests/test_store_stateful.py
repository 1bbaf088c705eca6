"""Hypothesis stateful test of the embedded Store under random memory faults.

Random put / get / delete / mget / mput, random ``ao`` and ``ar`` faults at
random arena offsets or at a key's subpage, a replica going down and coming
back, recovery steps; checked against a dict model, with a model replica
(key -> (version, value), as a peer would hold it) as the rebuild source.

Faults land anywhere in the arena: on records, on index pages (the hash
range they cover becomes LOST), on the allocator's metadata (rebuilt from
the index and the records; no key lost for it) and on the index directory (rebuilt from the
allocator's metadata, nothing lost).

Invariants:
- no read ever returns bytes other than the last value written;
- a key reported LOST (KeyLostError, or kvstore.LOST from mget(on_lost="mark"))
  had its record in an injected subpage, or its hash in the range of an
  injected index page (``locate()`` and ``subpage_kind()`` are taken before
  each injection; on 2 MiB pages with the mainline policy the whole hugepage
  when salvage had no spare page);
- LOST keys still exist: len(), keys() and ``in`` match the model, except
  keys whose index range is lost and not rebuilt yet (state "range"), which
  the store cannot list;
- after wait_recovered() with the replica up, every key is back with its last value.

The replica keeps values of deleted keys for fetches by name (it lags behind
deletes), so the rebuilder is offered them; a deleted key must never come
back. By hash range it answers as of the version it has applied, deletes
included.
"""

import random

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition, rule,
                                 run_state_machine_as_test)

import kvstore
from storeutil import SUB, Replica, keys_on_page, keys_on_subpage, lost_set, record_map, reserved_2m

pytestmark = pytest.mark.slow

KEYS = [b""] + [b"key-%02d" % i for i in range(23)]
MAX_FAULTS = 8


def _value(seed, size):
    return random.Random(seed).randbytes(size)


values = st.builds(_value, st.integers(0, 1 << 30),
                   st.one_of(st.integers(0, 64), st.integers(0, 600), st.integers(4000, 12000)))
keys = st.sampled_from(KEYS)
kinds = st.sampled_from(["ao", "ar"])


class StoreMachine(RuleBasedStateMachine):
    page_size = "4K"
    policy = "keep_ue"
    capacity = 1 << 20
    hot_bytes = 256 << 10       # where random offsets are aimed (records are packed from the start)

    def __init__(self):
        super().__init__()
        self.replica = Replica()
        self.store = kvstore.Store(self.capacity, page_size=self.page_size, kernel_policy=self.policy,
                                   rebuild_source=self.replica, recovery="manual",
                                   read_repair_timeout=10.0, rebuild_deadline=600)
        st_ = self.store.stats()
        self.page_bytes = st_["page_bytes"]
        self.whole_page = self.policy == "mainline" and self.page_bytes > SUB
        self.model = {}
        self.suspect = set()           # keys whose record was on an injected subpage
        self.page_suspect = set()      # ... on an injected hugepage (mainline, salvage failed)
        self.ranges = []               # hash ranges of injected index pages
        self.page_ranges = []          # ... of index pages on an injected hugepage
        self.faults = 0

    # -------------------------------------------------------------- helpers

    def allowed_lost(self):
        if self.whole_page and self.store.stats()["salvage_failed"]:
            return self.suspect | self.page_suspect
        return self.suspect

    def in_lost_range(self, key):
        h = kvstore.key_hash(key)
        ranges = self.ranges
        if self.whole_page and self.store.stats()["salvage_failed"]:
            ranges = ranges + self.page_ranges
        return any(lo <= h <= hi for lo, hi in ranges)

    def may_be_lost(self, key):
        return key in self.allowed_lost() or self.in_lost_range(key)

    def range_unknown(self):
        return {k for k in self.model if self.store.state(k) == "range"}

    def check_value(self, key, got):
        want = self.model.get(key)
        if got is kvstore.LOST:
            event("read saw a LOST key")
            if key not in self.model:
                # only a key of a lost index range may be unknown rather than absent
                assert self.in_lost_range(key), f"absent key {key!r} reported LOST"
                return
            assert self.may_be_lost(key), f"{key!r} reported LOST but was on no injected subpage"
        else:
            assert got == want, f"{key!r}: got {got[:20] if got else got!r}, want {want[:20] if want else want!r}"

    def read(self, key, versioned=False):
        try:
            got = self.store.get_versioned(key) if versioned else self.store.get(key)
        except kvstore.KeyLostError as e:
            lagging = self.replica.lag_to is not None and self.in_lost_range(key)
            assert not self.replica.online or lagging, f"{key!r}: KeyLostError although the replica is up: {e}"
            assert e.retryable and e.key == key
            return kvstore.LOST
        if versioned and got is not None:
            ver, got = got
            assert self.replica.data[key][0] == ver
        return got

    def note_injection(self, offset):
        rmap = record_map(self.store, list(self.model))
        self.suspect |= keys_on_subpage(self.store, offset // SUB, rmap)
        kind, lo, hi = self.store.subpage_kind(offset // SUB)
        if kind == "index":
            event("fault on an index page")
            self.ranges.append((lo, hi))
        if self.whole_page:
            self.page_suspect |= keys_on_page(self.store, self.page_bytes, offset // self.page_bytes, rmap)
            first = offset // self.page_bytes * (self.page_bytes // SUB)
            for s in range(first, min(first + self.page_bytes // SUB, self.store.stats()["capacity"] // SUB)):
                kind, lo, hi = self.store.subpage_kind(s)
                if kind == "index":
                    self.page_ranges.append((lo, hi))

    def wrote(self, key, version, value):
        self.replica.record(key, version, value)
        self.model[key] = value
        self.suspect.discard(key)
        self.page_suspect.discard(key)

    # -------------------------------------------------------------- rules

    @rule(key=keys, value=values)
    def put(self, key, value):
        self.wrote(key, self.store.put(key, value), value)

    @rule(pairs=st.dictionaries(keys, values, max_size=6))
    def mput(self, pairs):
        versions = self.store.mput(pairs)
        assert len(versions) == len(pairs) and versions == sorted(versions)
        for (k, v), ver in zip(pairs.items(), versions):
            self.wrote(k, ver, v)

    @rule(key=keys)
    def delete(self, key):
        unknown = key not in self.model and self.store.state(key) == "range"
        assert self.store.delete(key) == (key in self.model or unknown)
        self.replica.record_delete(key, self.store.version)
        self.model.pop(key, None)
        self.suspect.discard(key)
        self.page_suspect.discard(key)
        assert self.store.get(key) is None

    @rule(key=keys, versioned=st.booleans())
    def get(self, key, versioned):
        self.check_value(key, self.read(key, versioned))

    @rule(ks=st.lists(keys, max_size=8))
    def mget_mark(self, ks):
        got = self.store.mget(ks, on_lost="mark")
        assert len(got) == len(ks)
        for k, g in zip(ks, got):
            self.check_value(k, g)

    @rule(ks=st.lists(keys, max_size=8))
    def mget_raise(self, ks):
        try:
            got = self.store.mget(ks)
        except kvstore.KeyLostError as e:
            lagging = self.replica.lag_to is not None and self.in_lost_range(e.key)
            assert not self.replica.online or lagging, f"mget raised although the replica is up: {e}"
            self.check_value(e.key, kvstore.LOST)
            return
        for k, g in zip(ks, got):
            self.check_value(k, g)

    @rule(key=keys)
    def exists(self, key):
        try:
            assert self.store.exists(key) == (key in self.model)
            assert (key in self.store) == (key in self.model)
        except kvstore.KeyLostError:
            # a key of a lost index range, with the replica down or behind: not known
            assert not self.replica.online or self.replica.lag_to is not None
            assert self.in_lost_range(key)

    @precondition(lambda self: self.faults < MAX_FAULTS and self.model)
    @rule(data=st.data(), kind=kinds)
    def inject_at_key(self, data, kind):
        key = data.draw(st.sampled_from(sorted(self.model)))
        try:
            off, _ln = self.store.locate(key)
        except kvstore.KeyLostError:
            return                                   # already lost
        self.note_injection(off)
        info = self.store.faults.inject_key(key, kind)
        assert info["subpage"] == off // SUB
        self.faults += 1

    @precondition(lambda self: self.faults < MAX_FAULTS and self.model)
    @rule(data=st.data(), kind=kinds)
    def inject_at_entry(self, data, kind):
        key = data.draw(st.sampled_from(sorted(self.model)))
        try:
            off, _ln = self.store.locate_entry(key)
        except kvstore.KeyLostError:
            return                                   # its range is lost already
        self.note_injection(off)
        self.store.faults.inject_entry(key, kind)
        self.faults += 1

    @precondition(lambda self: self.faults < MAX_FAULTS)
    @rule(fraction=st.floats(0, 1, exclude_max=True), kind=kinds)
    def inject_at_offset(self, fraction, kind):
        offset = int(fraction * self.hot_bytes)
        self.note_injection(offset)
        self.store.faults.inject(offset, kind)
        self.faults += 1

    @precondition(lambda self: self.faults < MAX_FAULTS)
    @rule(fraction=st.floats(0, 1, exclude_max=True), kind=kinds)
    def inject_at_allocator(self, fraction, kind):
        """A fault on the allocator's own metadata (in the arena): rebuilt
        from the index and the records, losing no key of its own."""
        where = self.store.locate_allocator()
        assert where is not None, "the allocator's metadata is not in the arena"
        off, ln = where
        offset = off + int(fraction * ln) // SUB * SUB
        assert self.store.subpage_kind(offset // SUB)[0] == "allocator"
        event("fault on the allocator's metadata")
        self.note_injection(offset)
        self.store.faults.inject(offset, kind)
        self.faults += 1

    @rule(online=st.booleans())
    def replica_up_or_down(self, online):
        self.replica.online = online
        # up: a read of a LOST key waits for the replica (generously: the
        # machine may be busy); down: it gives up quickly with KeyLostError
        self.store.read_repair_timeout = 10.0 if online and self.replica.lag_to is None else 0.02

    @rule(lag=st.booleans())
    def replica_lags_or_catches_up(self, lag):
        # lagging: range requests for a version past what it had applied
        # now are refused (SourceBehindError), so a lost range stays LOST
        # instead of taking older values or deleted keys
        self.replica.lag_to = self.replica.applied if lag else None
        if lag:
            self.store.read_repair_timeout = 0.02
        elif self.replica.online:
            self.store.read_repair_timeout = 10.0

    @rule()
    def recover(self):
        r = self.store.recover()
        # only records on injected memory are ever invalidated
        assert r["keys_lost"] <= len(self.suspect | self.page_suspect)
        assert r["keys_lost"] == 0 or r["subpages"] > 0

    @rule()
    def scrub(self):
        self.store.scrub(1 << 20)

    @precondition(lambda self: self.replica.online)
    @rule()
    def recover_all(self):
        self.everything_back()

    # -------------------------------------------------------------- invariants

    @invariant()
    def counts_match(self):
        unknown = self.range_unknown()
        assert all(self.in_lost_range(k) for k in unknown), unknown
        assert len(self.store) == len(self.model) - len(unknown)
        assert sorted(self.store.keys()) == sorted(set(self.model) - unknown)

    @invariant()
    def lost_keys_are_suspects(self):
        lost = lost_set(self.store)
        if lost:
            event("keys LOST at a step")
        assert lost <= set(self.model), lost - set(self.model)
        assert lost <= self.allowed_lost(), lost - self.allowed_lost()

    def everything_back(self):
        self.replica.lag_to = None
        if self.store.loss_pending or lost_set(self.store):
            event("rebuilt after loss")
        assert self.store.wait_recovered(timeout=20)
        assert self.store.lost_keys() == []
        for k, v in self.model.items():
            assert self.store.get(k) == v
        assert self.store.stats()["lost_keys"] == 0

    def teardown(self):
        try:
            if not self.store.closed:
                self.replica_up_or_down(True)
                self.everything_back()
        finally:
            self.store.close()


SETTINGS = settings(max_examples=60, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.mark.parametrize("policy", ["keep_ue", "mainline"])
def test_store_state_machine_4k(policy):
    machine = type(f"StoreMachine4K_{policy}", (StoreMachine,), {"policy": policy})
    run_state_machine_as_test(machine, settings=SETTINGS)


@pytest.mark.hugepages
def test_store_state_machine_2m_mainline():
    """2 MiB hugepages, mainline policy: a fault takes the whole hugepage;
    salvage copies it into a spare page, so only the poisoned 4 KiB is lost
    (every key on the page when no spare can be had)."""
    machine = type("StoreMachine2M_mainline", (StoreMachine,),
                   {"policy": "mainline", "page_size": "2M", "capacity": 2 << 20, "hot_bytes": 2 << 20})
    with reserved_2m(2 + MAX_FAULTS + 2):
        try:
            kvstore.Store(2 << 20, page_size="2M", recovery="manual").close()
        except kvstore.ArenaError as e:
            pytest.skip(f"no 2 MiB hugepage arena: {e}")
        run_state_machine_as_test(machine, settings=settings(SETTINGS, max_examples=25))
