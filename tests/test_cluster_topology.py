"""Slot map encoding and validation, the pure map operations, and CAS in a real etcd."""

import asyncio

import pytest

from etcdutil import etcd, needs_etcd  # noqa: F401


from kvstore.server.cluster import controller as C  # noqa: E402
from kvstore.server.cluster import slots  # noqa: E402
from kvstore.server.cluster.etcd import EtcdClient  # noqa: E402
from kvstore.server.cluster.topology import (  # noqa: E402
    CasConflictError, ClusterNameError, ClusterNotFoundError, Member, NodeView, SlotMap,
    StaleEpochError, Topology, TopologyError, check_name)


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def members(*ids, shard=None, offsets=None, replid="r1"):
    out = {}
    for i, n in enumerate(ids):
        out[n] = Member("c", n, "127.0.0.1", 7000 + i, offset=(offsets or {}).get(n, 0),
                        replid=replid, revision=10 + i, shard=shard)
    return out


def three_by_two():
    ms = members("a", "b", "c", "d", "e", "f")
    m = C.bootstrap(None, "c", 3, ms)
    return m, ms


def test_bootstrap_places_primaries_then_replicas_and_splits_evenly():
    m = C.bootstrap(None, "c", 3, members("a", "b"))
    assert m.epoch == 1 and m.assigned() == 0           # waits for the third primary
    m2 = C.bootstrap(m, "c", 3, members("a", "b", "c", "d"))
    assert m2.epoch == 2
    assert [s.primary for s in m2.shards] == ["a", "b", "c"]
    assert [s.slots for s in m2.shards] == [[r] for r in slots.even_split(3)]
    assert m2.shard(0).replicas == ["d"] and m2.complete()
    assert C.bootstrap(m2, "c", 3, members("a", "b", "c", "d")) is None     # nothing to do
    m, _ = three_by_two()
    assert [s.replicas for s in m.shards] == [["d"], ["e"], ["f"]]
    assert NodeView.of(m, "e").primary == ("127.0.0.1", 7001)


def test_encode_decode_roundtrip_and_wrong_cluster():
    m, _ = three_by_two()
    raw = m.encode()
    back = SlotMap.decode(raw, "c")
    assert back == m
    with pytest.raises(ClusterNameError, match="belongs to cluster 'c', not 'other'"):
        SlotMap.decode(raw, "other")
    with pytest.raises(TopologyError, match="not valid JSON"):
        SlotMap.decode(b"{nope", "c")


@pytest.mark.parametrize("mutate,msg", [
    (lambda m: m.shards[1].slots.append((0, 10)), "owned by shards 0 and 1"),
    (lambda m: m.shards[0].replicas.append("zz"), "unknown node zz"),
    (lambda m: m.shard(1).replicas.append("d"), "two shards"),
    (lambda m: setattr(m, "epoch", -1), None),
    (lambda m: m.migrations.update({5: {"from": 1, "to": 2}}), "does not own it"),
    (lambda m: setattr(m.shards[0], "handover", "e"), "not a replica"),
])
def test_validation_refuses_inconsistent_maps(mutate, msg):
    m, _ = three_by_two()
    mutate(m)
    with pytest.raises(TopologyError, match=msg):
        SlotMap.decode(m.encode() if msg else _raw(m), "c")


def _raw(m):
    import json
    d = json.loads(SlotMap("c", 0).encode())
    d["epoch"] = m.epoch
    return json.dumps(d).encode()


def test_cluster_names():
    assert check_name("prod-1.eu_x") == "prod-1.eu_x"
    for bad in ["", "a/b", "-x", "x" * 65, None, "é"]:
        with pytest.raises(ClusterNameError):
            check_name(bad)


def test_failover_promotes_highest_offset_in_the_lost_primarys_stream():
    ms = members("a", "b", "c", "d", "e", "f", "g")
    m = C.bootstrap(None, "c", 2, ms)              # shard 0: a + c, e, g ; shard 1: b + d, f
    assert m.shard(0).replicas == ["c", "e", "g"]
    live = {k: v for k, v in ms.items() if k != "a"}
    live["c"].offset, live["e"].offset, live["g"].offset = 500, 900, 2000
    live["g"].replid = "old-stream"
    assert C.pick_successor(m, 0, live, primary_replid="r1") == "e"
    assert C.pick_successor(m, 0, live) == "g"
    new = C.failover(m, 0, "e")
    assert new.epoch == m.epoch + 1
    assert new.shard(0).primary == "e" and new.shard(0).replicas == ["c", "g", "a"]
    assert new.shard(0).slots == m.shard(0).slots
    assert NodeView.of(new, "a").role == "replica"
    with pytest.raises(TopologyError, match="not a replica"):
        C.failover(m, 0, "b")


def test_handover_add_remove_node():
    m, ms = three_by_two()
    h = C.begin_handover(m, 1, None, ms)
    assert h.shard(1).handover == "e" and NodeView.of(h, "b").handover == "e"
    with pytest.raises(TopologyError, match="already handing over"):
        C.begin_handover(h, 1, "e", ms)
    assert C.abort_handover(h, 1).shard(1).handover is None
    m2 = C.add_node(m, "g", "127.0.0.1", 7100)
    assert m2.shard(0).replicas == ["d", "g"]
    m3 = C.add_shard(m2, "h", "127.0.0.1", 7101)
    assert m3.shard(3).primary == "h" and m3.shard(3).slots == []
    with pytest.raises(TopologyError, match="fail it over"):
        C.remove_node(m3, "a")
    m4 = C.remove_node(m3, "g")
    assert "g" not in m4.nodes and m4.shard(0).replicas == ["d"]
    m5 = C.remove_node(m4, "h")                          # primary of an empty shard
    assert m5.shard(3) is None
    assert m5.epoch == m.epoch + 4
    with pytest.raises(TopologyError, match="already in the cluster"):
        C.add_node(m, "a", "h", 1)


def test_slot_migration_states():
    m, _ = three_by_two()
    mig = C.begin_migration(m, [(0, 9)], 2)
    v0, v2 = NodeView.of(mig, "a"), NodeView.of(mig, "c")
    assert set(v0.migrating) == set(range(10)) and v0.migrating[3] == (2, ("127.0.0.1", 7002))
    assert set(v2.importing) == set(range(10)) and v2.importing[3] == (0, ("127.0.0.1", 7000))
    assert mig.owner(5) == 0                              # still the source's until done
    with pytest.raises(TopologyError, match="already migrating"):
        C.begin_migration(mig, [(5, 5)], 1)
    with pytest.raises(TopologyError, match="already owned"):
        C.begin_migration(m, [(16000, 16000)], 2)
    done = C.finish_migration(mig, [(0, 4)])
    assert done.owner(3) == 2 and done.owner(7) == 0 and set(done.migrations) == set(range(5, 10))
    assert done.shard(0).slots == [(5, 5460)] and done.shard(2).slots == [(0, 4), (10923, 16383)]
    back = C.abort_migration(done, [(5, 9)])
    assert back.migrations == {} and back.owner(7) == 0
    SlotMap.decode(back.encode(), "c")
    assert back.assigned() == 16384


def test_rebalance_plan_moves_the_fewest_slots_to_a_new_shard():
    m, _ = three_by_two()
    assert C.rebalance_plan(m) == []                   # already even
    m4 = C.add_shard(m, "g", "127.0.0.1", 7100)
    plan = C.rebalance_plan(m4)
    assert {dst for _, dst, _ in plan} == {3}
    moved = sum(slots.count(r) for _, _, r in plan)
    assert moved == 4096                               # exactly the new shard's share
    cur = m4
    for src, dst, ranges in plan:
        cur = C.finish_migration(C.begin_migration(cur, ranges, dst), ranges)
    counts = sorted(slots.count(s.slots) for s in cur.shards)
    assert counts == [4096] * 4 and cur.assigned() == 16384
    assert C.rebalance_plan(cur) == []
    # draining a shard: its slots go to the others
    plan = C.rebalance_plan(cur, [0, 1, 2])
    assert all(src == 3 for src, _, _ in plan)
    assert sum(slots.count(r) for _, _, r in plan) == 4096


@needs_etcd
def test_cas_map_refuses_stale_epochs_and_conflicts(etcd):
    async def main():
        t = Topology(EtcdClient(etcd.url), "c")
        await t.create(3)
        m, _ = three_by_two()
        rev1 = await t.cas_map(m, 0, 0)
        got, rev = await t.load_map()
        assert got == m and rev == rev1
        nxt = C.failover(m, 0, "d")
        rev2 = await t.cas_map(nxt, rev1, m.epoch)
        # a writer that read the old map: its epoch is stale now
        other = C.failover(m, 1, "e")
        with pytest.raises(StaleEpochError, match=f"etcd already holds epoch {nxt.epoch}"):
            await t.cas_map(other, rev1, m.epoch)
        # an epoch that does not follow the one read
        jump = nxt.next_epoch()
        jump.epoch += 5
        with pytest.raises(StaleEpochError, match="does not follow"):
            await t.cas_map(jump, rev2, nxt.epoch)
        # a guard that fails
        from kvstore.server.cluster.etcd import cmp_create
        with pytest.raises(CasConflictError, match="guard"):
            await t.cas_map(nxt.next_epoch(), rev2, nxt.epoch, guard=[cmp_create(t.key_controller, "==", 12345)])
        assert (await t.load_map())[0] == nxt
        # a map for another cluster is refused before it is written
        wrong = nxt.next_epoch()
        wrong.cluster = "d"
        with pytest.raises(ClusterNameError):
            await t.cas_map(wrong, rev2, nxt.epoch)
    run(main())


@needs_etcd
def test_wrong_cluster_name_is_a_clear_error(etcd):
    async def main():
        c = EtcdClient(etcd.url)
        await Topology(c, "prod").create(3)
        await Topology(c, "staging").create(1)
        with pytest.raises(ClusterNotFoundError,
                           match=r"no cluster named 'prdo' in etcd at http://127.0.0.1:\d+ "
                                 r"\(clusters there: 'prod', 'staging'\)"):
            await Topology(c, "prdo").meta()
        with pytest.raises(TopologyError, match="already exists"):
            await Topology(c, "prod").create(2)
        assert (await Topology(c, "prod").create(3, exist_ok=True))["shards"] == 3
        # a document copied from another cluster is refused
        await c.put(b"/kvstore/staging/slotmap", SlotMap("prod", 1).encode())
        with pytest.raises(ClusterNameError, match="belongs to cluster 'prod', not 'staging'"):
            await Topology(c, "staging").load_map()
    run(main())
