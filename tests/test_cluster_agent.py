"""Node agents and the controller against a real etcd, with in-process fake nodes.

Each fake node is a :class:`ClusterNode` that records what the agent told it
(topology views, fence/unfence with monotonic times) and reports an offset
the test sets. "kill -9" of a node is simulated by cancelling its agent's
tasks without revoking its lease (so the lease has to expire, as after a real
crash); a network partition by pointing its etcd client at a closed port.
Leases are 1 s here (etcdutil starts etcd with timing that allows it).
"""

import asyncio
import time

import pytest

from etcdutil import EtcdProc, etcd, free_port, needs_etcd  # noqa: F401


from kvstore.server.cluster import (ClusterNode, ClusterNotFoundError,  # noqa: E402
                                    EtcdUnavailableError, NodeAgent, Topology)
from kvstore.server.cluster.etcd import EtcdClient  # noqa: E402
from kvstore.server.cluster.topology import SlotMap  # noqa: E402

pytestmark = needs_etcd

TTL = 1
FENCE_AFTER = 0.5
RECONCILE = 0.2
#: etcd looks for expired leases every 0.5 s; a loaded 2-core machine adds more.
ETCD_EXPIRY_CHECK = 0.5
SLACK = 1.5


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class FakeNode(ClusterNode):
    def __init__(self, name):
        self.name = name
        self.views = []
        self.events = []
        self.fenced = True
        self.offset = 0
        self.replid = ""

    def on_topology(self, view):
        self.views.append(view)
        self.events.append(("topology", time.monotonic(), view.epoch, view.role))

    def fence(self, reason):
        self.fenced = True
        self.events.append(("fence", time.monotonic(), reason))

    def unfence(self):
        self.fenced = False
        self.events.append(("unfence", time.monotonic()))

    def report_offset(self):
        return self.offset, self.replid

    @property
    def view(self):
        return self.views[-1] if self.views else None

    def times(self, kind):
        return [e[1] for e in self.events if e[0] == kind]


class Logs(list):
    def __call__(self, level, what, /, **kw):
        self.append((time.monotonic(), what, kw))

    def has(self, what):
        return [e for e in self if e[1] == what]


def make_agent(url, name, cluster="c", **kw):
    node = FakeNode(name)
    log = Logs()
    opts = dict(etcd=url, cluster=cluster, node_id=name, host="127.0.0.1", port=7000 + ord(name[0]),
                ttl=TTL, fence_after=FENCE_AFTER, keepalive_interval=0.15,
                reconcile_interval=RECONCILE, offset_interval=0.1, refresh_interval=0.5, log=log)
    opts.update(kw)
    agent = NodeAgent(node, **opts)
    agent.logs = log
    return node, agent


async def wait_until(pred, timeout=10.0, what="condition"):
    t0 = time.monotonic()
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def cluster(url, names, shards, name="c"):
    await Topology(EtcdClient(url), name).create(shards, exist_ok=True)
    pairs = [make_agent(url, n, cluster=name) for n in names]
    for _, a in pairs:
        await a.start()
    nodes = [p[0] for p in pairs]
    await wait_until(lambda: all(n.view and n.view.map.complete() and n.view.role != "none"
                                 for n in nodes)
                     and len({n.view.epoch for n in nodes}) == 1, what="bootstrap")
    return pairs


def crash(agent):
    """Like kill -9: everything stops, nothing is cleaned up, the lease stays until it expires."""
    agent.stopped = True
    for t in agent._tasks:
        t.cancel()
    if agent._fence_timer is not None:
        agent._fence_timer.cancel()


def partition(agent):
    agent.etcd.endpoints = [("127.0.0.1", free_port())]


def heal(agent, url):
    agent.etcd.endpoints = [EtcdClient._parse_endpoint(url)]


async def stop_all(pairs):
    for _, a in pairs:
        if not a.stopped:
            await a.stop()


def primary_of(pairs, shard):
    for n, a in pairs:
        if n.view and n.view.role == "primary" and n.view.shard == shard:
            return n, a
    return None


def test_one_controller_is_elected_and_replaced(etcd):
    async def main():
        pairs = await cluster(etcd.url, ["a", "b", "c"], 1)
        try:
            leaders = [a for _, a in pairs if a.controller.is_leader]
            assert len(leaders) == 1
            st = await leaders[0].topo.state()
            assert st.controller["id"] == leaders[0].node_id
            crash(leaders[0])
            rest = [a for _, a in pairs if a is not leaders[0]]
            t0 = time.monotonic()
            new = await wait_until(lambda: [a for a in rest if a.controller.is_leader],
                                   TTL + ETCD_EXPIRY_CHECK + RECONCILE + SLACK, "a new controller")
            # not before the old controller's lease (renewed every 0.15 s) expired
            assert len(new) == 1 and time.monotonic() - t0 >= TTL - 0.25
            # exactly one leader, and it is the one in etcd
            st = await new[0].topo.state()
            assert st.controller["id"] == new[0].node_id
        finally:
            await stop_all(pairs)
    run(main())


def test_bootstrap_assigns_all_slots_evenly_to_primaries(etcd):
    async def main():
        pairs = await cluster(etcd.url, ["a", "b", "c", "d", "e", "f"], 3)
        try:
            views = {n.name: n.view for n, _ in pairs}
            prim = {k: v for k, v in views.items() if v.role == "primary"}
            reps = {k: v for k, v in views.items() if v.role == "replica"}
            assert len(prim) == 3 and len(reps) == 3
            sizes = sorted(sum(hi - lo + 1 for lo, hi in v.slots) for v in prim.values())
            assert sum(sizes) == 16384 and sizes[-1] - sizes[0] <= 1
            for k, v in reps.items():
                p = next(n for n, pv in prim.items() if pv.shard == v.shard)
                assert v.primary_id == p and v.primary == ("127.0.0.1", 7000 + ord(p))
                assert v.slots == prim[p].slots
            await wait_until(lambda: all(not n.fenced for n, _ in pairs if n.name in prim)
                             and all(a.can_ack() for n, a in pairs if n.name in prim), what="unfenced")
            assert all(n.fenced and not a.can_ack() for n, a in pairs if n.name in reps)
            # members publish role, shard and the epoch they applied
            st = await pairs[0][1].topo.state()
            await wait_until(lambda: True)
            assert {m.id for m in st.members.values()} == set(views)
        finally:
            await stop_all(pairs)
    run(main())


def test_failover_promotes_highest_offset_and_bumps_epoch(etcd):
    async def main():
        pairs = await cluster(etcd.url, ["a", "b", "c", "d"], 1)
        try:
            pn, pa = primary_of(pairs, 0)
            reps = [(n, a) for n, a in pairs if n is not pn]
            pn.offset, pn.replid = 1000, "stream-1"
            for (n, _), (off, rid) in zip(reps, [(400, "stream-1"), (900, "stream-1"),
                                                (5000, "an-older-stream")]):
                n.offset, n.replid = off, rid
            best = reps[1][0]
            # every agent remembers the primary's stream id, so whichever node runs
            # the controller after the crash (maybe a newly elected one) ranks by it
            topo = pa.topo

            async def offsets_published():
                st = await topo.state()
                return all(st.members[n.name].offset == n.offset for n, _ in pairs)
            for _ in range(100):
                if await offsets_published():
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.6)        # every agent has read the published record
            epoch0 = pn.view.epoch
            crash(pa)
            t0 = time.monotonic()
            await wait_until(lambda: best.view.role == "primary" and not best.fenced,
                             TTL + ETCD_EXPIRY_CHECK + RECONCILE + SLACK, "failover")
            took = time.monotonic() - t0
            assert best.view.epoch == epoch0 + 1
            assert took <= TTL + ETCD_EXPIRY_CHECK + RECONCILE + SLACK
            for n, _ in reps:
                if n is not best:
                    await wait_until(lambda: n.view.epoch == epoch0 + 1, what="replica follows")
                    assert n.view.role == "replica" and n.view.primary_id == best.name
            assert best.view.slots == [(0, 16383)]
            # the dead primary is kept as a replica of its shard, to rejoin later
            assert pn.name in best.view.map.shard(0).replicas
        finally:
            await stop_all(pairs)
    run(main())


def test_fenced_before_lease_expiry_then_rejoins_as_replica(etcd):
    async def main():
        pairs = await cluster(etcd.url, ["a", "b"], 1)
        try:
            (pn, pa), = [(n, a) for n, a in pairs if n.view.role == "primary"]
            (rn, ra), = [(n, a) for n, a in pairs if n is not pn]
            await wait_until(lambda: pa.can_ack(), what="primary acknowledging")
            epoch0 = pn.view.epoch
            lease0 = pa.lease
            partition(pa)
            await wait_until(lambda: rn.view.role == "primary" and not rn.fenced,
                             TTL + ETCD_EXPIRY_CHECK + RECONCILE + SLACK + 1, "failover")
            last_renewal = pa._renewed_sent         # its last successful renewal
            promoted_at = rn.times("unfence")[-1]
            fenced_at = [t for t in pn.times("fence") if t >= last_renewal]
            assert fenced_at, "the partitioned primary never fenced itself"
            # no acknowledgement allowed from fence_after past the last renewal on
            # (can_ack() checks the clock itself, whatever the loop's timers do) ...
            assert pa.write_deadline == pytest.approx(last_renewal + FENCE_AFTER)
            assert fenced_at[0] >= pa.write_deadline - 0.01
            # ... which is before the lease could expire, so before anyone took over
            assert pa.write_deadline < last_renewal + TTL <= promoted_at
            assert promoted_at - pa.write_deadline >= TTL - FENCE_AFTER - 0.05
            assert not pa.can_ack() and pn.fenced
            # back on the network: a new lease, the new map, a replica of the new primary
            heal(pa, etcd.url)
            await wait_until(lambda: pn.view.epoch == epoch0 + 1, what="old primary sees the new map")
            assert pn.view.role == "replica" and pn.view.primary_id == rn.name
            await wait_until(lambda: pa.stats["leases_lost"] >= 1 and pa.lease != lease0,
                             what="a new lease")
            for _ in range(100):        # its record follows within the publish interval
                st = await pa.topo.state()
                rec = st.members.get(pn.name)
                if rec and rec.lease == pa.lease and rec.role == "replica":
                    break
                await asyncio.sleep(0.05)
            assert rec.lease == pa.lease and rec.role == "replica" and rec.epoch == epoch0 + 1
            await asyncio.sleep(0.5)
            assert pn.fenced and not pa.can_ack() and ra.can_ack()
        finally:
            await stop_all(pairs)
    run(main())


def test_stale_epoch_is_ignored(etcd):
    async def main():
        pairs = await cluster(etcd.url, ["a", "b"], 1)
        try:
            n, a = pairs[0]
            cur = n.view.map
            older = SlotMap.decode(cur.encode(), "c")
            older.epoch = cur.epoch - 1
            older.shards[0].primary, older.shards[0].replicas = cur.shards[0].replicas[0], [cur.shards[0].primary]
            seen = len(n.views)
            assert a.apply_map(older) is False
            assert len(n.views) == seen and n.view.epoch == cur.epoch and a.epoch == cur.epoch
            assert a.logs.has("stale_epoch_ignored")
            other = SlotMap.decode(cur.encode(), "c")
            other.cluster = "other"
            assert a.apply_map(other) is False
        finally:
            await stop_all(pairs)
    run(main())


def test_etcd_down_at_start_clear_error_then_joins():
    async def main():
        e = EtcdProc()
        try:
            # no etcd at all: a clear error after the start timeout
            node, agent = make_agent(e.url, "a", start_timeout=0.8)
            with pytest.raises(EtcdUnavailableError,
                               match=rf"etcd at {e.url} is unreachable .*gave up after 0.8 s"):
                await agent.start()
            assert len(agent.logs.has("etcd_unreachable")) >= 2      # it retried, and said so
            # create the cluster, take etcd down, start the agent: it waits, then joins
            await asyncio.to_thread(e.start)
            await Topology(EtcdClient(e.url), "c").create(1)
            await asyncio.to_thread(e.stop)
            node, agent = make_agent(e.url, "a")
            task = asyncio.create_task(agent.start())
            await wait_until(lambda: len(agent.logs.has("etcd_unreachable")) >= 2, what="retries")
            assert not task.done()
            await asyncio.to_thread(e.start)
            await asyncio.wait_for(task, 10)
            await wait_until(lambda: node.view and node.view.role == "primary" and not node.fenced,
                             what="joined as primary")
            assert node.view.slots == [(0, 16383)]
            await agent.stop()
        finally:
            await asyncio.to_thread(e.cleanup)
    run(main())


def test_etcd_restarted_mid_run(etcd):
    async def main():
        pairs = await cluster(etcd.url, ["a", "b"], 1)
        try:
            (pn, pa), = [(n, a) for n, a in pairs if n.view.role == "primary"]
            epoch0 = pn.view.epoch
            await wait_until(lambda: pa.can_ack(), what="primary acknowledging")
            await asyncio.to_thread(etcd.stop)
            await wait_until(lambda: pn.fenced and not pa.can_ack(), FENCE_AFTER + SLACK,
                             "primary fenced while etcd is down")
            await asyncio.sleep(0.5)
            await asyncio.to_thread(etcd.start)
            # etcd keeps leases across its restart: same primary, fenced no more
            await wait_until(lambda: not pn.fenced and pa.can_ack(), 10, "unfenced after restart")
            assert all(n.view.epoch == epoch0 for n, _ in pairs)       # no failover happened
            assert primary_of(pairs, 0)[0] is pn and pa.stats["leases_lost"] == 0
            assert pa.stats["watch_restarts"] >= 1
            # and the cluster still works: a failover after the restart
            crash(pa)
            other = next(n for n, _ in pairs if n is not pn)
            await wait_until(lambda: other.view.role == "primary" and not other.fenced,
                             TTL + ETCD_EXPIRY_CHECK + RECONCILE + SLACK + 1, "failover after restart")
        finally:
            await stop_all(pairs)
    run(main())


def test_wrong_cluster_name(etcd):
    async def main():
        await Topology(EtcdClient(etcd.url), "prod").create(1)
        node, agent = make_agent(etcd.url, "a", cluster="prdo", start_timeout=5)
        with pytest.raises(ClusterNotFoundError, match=r"no cluster named 'prdo' .*clusters there: 'prod'"):
            await agent.start()
        assert node.views == [] and node.fenced
        # nothing was registered under either name
        kvs, _ = await EtcdClient(etcd.url).range(b"/kvstore/", prefix=True)
        assert [kv.key for kv in kvs] == [b"/kvstore/prod/meta"]
    run(main())


def test_manual_failover_waits_for_the_replica_to_catch_up(etcd):
    async def main():
        pairs = await cluster(etcd.url, ["a", "b"], 1)
        try:
            (pn, pa), = [(n, a) for n, a in pairs if n.view.role == "primary"]
            (rn, ra), = [(n, a) for n, a in pairs if n is not pn]
            pn.offset, pn.replid = 5000, "s1"
            rn.offset, rn.replid = 4000, "s1"
            epoch0 = pn.view.epoch
            rid = await pa.topo.request("failover", shard=0)
            await wait_until(lambda: pn.view.handover == rn.name and pn.fenced, what="handover starts")
            assert not pa.can_ack()
            await asyncio.sleep(0.5)
            assert pn.view.role == "primary"          # the replica is behind: no promotion yet
            rn.offset = 5000                           # caught up
            await wait_until(lambda: rn.view.role == "primary" and not rn.fenced, what="promotion")
            assert rn.view.epoch == epoch0 + 2
            await wait_until(lambda: pn.view.role == "replica", what="old primary demoted")
            st = await pa.topo.request_status(rid)
            assert st["status"] == "done"
            # a refused request says why
            rid = await pa.topo.request("remove-node", node=rn.name)
            await wait_until(lambda: True)
            for _ in range(100):
                st = await pa.topo.request_status(rid)
                if st["status"] != "pending":
                    break
                await asyncio.sleep(0.05)
            assert st["status"] == "error" and "fail it over" in st["detail"]
        finally:
            await stop_all(pairs)
    run(main())


def test_resharding_requests_move_slots_through_migrating_state(etcd):
    async def main():
        pairs = await cluster(etcd.url, ["a", "b"], 2)
        try:
            p0 = primary_of(pairs, 0)[0]
            p1 = primary_of(pairs, 1)[0]
            topo = pairs[0][1].topo
            await topo.request("migrate", slots=[[0, 99]], to=1)
            await wait_until(lambda: len(p0.view.migrating) == 100 and len(p1.view.importing) == 100,
                             what="migrating/importing")
            assert p0.view.migrating[0] == (1, ("127.0.0.1", 7000 + ord(p1.name)))
            assert (0, 99) not in p1.view.slots
            await topo.request("migrate-done", slots=[[0, 99]])
            await wait_until(lambda: not p0.view.migrating and p1.view.slots[0] == (0, 99),
                             what="slots moved")
            assert p0.view.slots == [(100, 8191)]
            assert p1.view.slots == [(0, 99), (8192, 16383)]
        finally:
            await stop_all(pairs)
    run(main())


def test_can_ack_follows_the_clock_even_when_the_loop_was_stalled(etcd):
    async def main():
        pairs = await cluster(etcd.url, ["a"], 1)
        try:
            (pn, pa), = pairs
            await wait_until(lambda: pa.can_ack(), what="primary acknowledging")
            partition(pa)
            # the loop stalls (a SIGSTOP, a long pause) past the deadline: the
            # fence timer has not had its turn, yet no acknowledgement is allowed
            time.sleep(FENCE_AFTER + 0.2)
            assert not pa.can_ack()
            await wait_until(lambda: pn.fenced, 2, "the timer fences too")
            heal(pa, etcd.url)
            await wait_until(lambda: pa.can_ack() and not pn.fenced, 10, "unfenced once renewed")
        finally:
            await stop_all(pairs)
    run(main())


def test_graceful_stop_hands_the_shard_over_at_once(etcd):
    async def main():
        pairs = await cluster(etcd.url, ["a", "b"], 1)
        try:
            (pn, pa), = [(n, a) for n, a in pairs if n.view.role == "primary"]
            rn = next(n for n, _ in pairs if n is not pn)
            t0 = time.monotonic()
            await pa.stop()             # revokes its lease: no waiting for expiry
            assert pn.fenced and not pa.can_ack()
            await wait_until(lambda: rn.view.role == "primary" and not rn.fenced, TTL, "takeover")
            assert time.monotonic() - t0 < TTL
        finally:
            await stop_all(pairs)
    run(main())
