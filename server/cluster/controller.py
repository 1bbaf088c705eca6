"""The cluster controller: one node, elected through etcd, changes the slot map.

Every node's agent runs a :class:`Controller`; only the elected one acts.
There is no extra daemon.

Election
    ``txn(create_revision(P controller) == 0) -> put(P controller, me, my
    lease)``. The winner's *election revision* is that key's create_revision.
    Every slot map write of the controller carries the guard
    ``create_revision(P controller) == election revision``, so a controller
    that lost its lease (and so the key) while paused can never overwrite
    the map afterwards: its compare-and-swap fails.

Reconcile (on every relevant etcd change, and every ``interval`` seconds)
    Read the whole cluster at one revision, compute at most one change with
    the pure functions below, write it with :meth:`Topology.cas_map` (epoch
    + 1, compare on the map's mod_revision and the guard), repeat until
    nothing is left to do. In order:

    1. bootstrap and joins: a live member not in the map becomes the primary
       of a shard that never had one, else a replica of the shard with the
       fewest replicas. When all ``meta.shards`` shards have a primary and no
       slot is assigned yet, the slots are split evenly (as ``redis-cli
       --cluster create``).
    2. failover: a shard whose primary has no member key (its lease expired)
       gets the live replica with the highest replication offset (among those
       counting in the lost primary's stream, when it is known) as primary.
       The txn also requires the old primary's member key to still be absent,
       so a primary that renewed in between is never replaced.
    3. manual handover (``failover`` request, the safe one): the map first
       marks the shard's ``handover``: the primary fences itself (stops
       acknowledging writes) and reports its final offset; once the chosen
       replica reports the same offset in the same stream, it is promoted.
       If that takes longer than ``handover_timeout`` the handover is
       cancelled and the old primary resumes.
    4. requests under ``P requests/``: ``failover``, ``add-shard``,
       ``remove-node``, ``migrate`` / ``migrate-done`` / ``migrate-abort``
       (resharding: a migrating slot stays owned by its source shard while
       its keys move, and changes owner at ``migrate-done``).

Fencing contract (implemented by agent.py)
    A primary may acknowledge a write only while ``now < t_renew +
    fence_after`` where ``t_renew`` is when it *sent* its last successful
    lease renewal and ``fence_after < TTL`` (default 0.5 x TTL). etcd
    expires the lease no earlier than ``t_renew + TTL``, and the controller
    promotes nobody before the member key (attached to that lease) is gone.
    So the old primary has stopped acknowledging for at least ``TTL -
    fence_after`` seconds before anyone else is made primary of its slots.
"""

import asyncio
import json
import time

from . import slots as _slots
from .etcd import EtcdError, cmp_create, op_get, op_put
from .topology import (CasConflictError, SlotMap, StaleEpochError, Shard, TopologyError,
                       _dumps)

__all__ = ["Controller", "bootstrap", "failover", "pick_successor", "begin_handover",
           "abort_handover", "add_node", "add_shard", "remove_node", "begin_migration",
           "finish_migration", "abort_migration", "update_addresses", "rebalance_plan",
           "apply_request"]


# -- pure operations on the slot map (each returns a new map, epoch + 1, or None)

def _live_sorted(members):
    return sorted(members.values(), key=lambda m: (m.revision, m.id))


def bootstrap(m, name, shards, members):
    """Place live members not yet in the map; assign all slots once every shard has a primary."""
    new = m.next_epoch() if m is not None else SlotMap(name, 1)
    changed = m is None
    have = {s.id for s in new.shards}
    for sid in range(shards):
        if sid not in have:
            new.shards.append(Shard(sid))
            changed = True
    new.shards.sort(key=lambda s: s.id)
    for mem in _live_sorted(members):
        if mem.id in new.nodes:
            continue
        empty = [s for s in new.shards if s.primary is None and not s.replicas]
        if empty:
            target = empty[0]
            target.primary = mem.id
        else:
            target = min(new.shards, key=lambda s: (len(s.replicas), s.id))
            target.replicas.append(mem.id)
        new.nodes[mem.id] = {"host": mem.host, "port": mem.port, "shard": target.id}
        changed = True
    if new.assigned() == 0 and len(new.shards) >= shards and \
            all(s.primary for s in new.shards[:shards]):
        for s, r in zip(new.shards[:shards], _slots.even_split(shards)):
            s.slots = [r]
        changed = True
    return new if changed else None


def update_addresses(m, members):
    """Follow members whose host/port changed (a node restarted on another port)."""
    new = None
    for mem in members.values():
        n = m.nodes.get(mem.id)
        if n and (n["host"], n["port"]) != (mem.host, mem.port):
            new = new or m.next_epoch()
            new.nodes[mem.id].update(host=mem.host, port=mem.port)
    return new


def pick_successor(m, sid, members, primary_replid=None):
    """The live replica of shard ``sid`` to promote, or None.

    Highest replication offset wins; replicas counting in the lost primary's
    stream (``primary_replid``) rank above any other; ties go to the earliest
    registration.
    """
    sh = m.shard(sid)
    cands = [members[r] for r in sh.replicas if r in members]
    if not cands:
        return None
    best = max(cands, key=lambda c: (bool(primary_replid) and c.replid == primary_replid,
                                     c.offset, -c.revision))
    return best.id


def failover(m, sid, to):
    """Make replica ``to`` the primary of shard ``sid``; the old primary becomes a replica."""
    sh = m.shard(sid)
    if sh is None:
        raise TopologyError(f"no shard {sid}")
    if to not in sh.replicas:
        raise TopologyError(f"node {to} is not a replica of shard {sid}")
    new = m.next_epoch()
    sh = new.shard(sid)
    sh.replicas.remove(to)
    if sh.primary:
        sh.replicas.append(sh.primary)
    sh.primary = to
    sh.handover = None
    return new


def begin_handover(m, sid, to, members=None):
    """Start a safe manual failover of shard ``sid`` to ``to`` (None: best replica)."""
    sh = m.shard(sid)
    if sh is None:
        raise TopologyError(f"no shard {sid}")
    if sh.handover:
        raise TopologyError(f"shard {sid} is already handing over to {sh.handover}")
    if to is None:
        to = pick_successor(m, sid, members or {})
        if to is None:
            raise TopologyError(f"shard {sid} has no live replica to fail over to")
    if to not in sh.replicas:
        raise TopologyError(f"node {to} is not a replica of shard {sid}")
    if members is not None and to not in members:
        raise TopologyError(f"replica {to} of shard {sid} is not alive")
    new = m.next_epoch()
    new.shard(sid).handover = to
    return new


def abort_handover(m, sid):
    new = m.next_epoch()
    new.shard(sid).handover = None
    return new


def add_node(m, node_id, host, port, shard=None):
    """Add ``node_id`` as a replica (of ``shard``, else the shard with fewest replicas)."""
    if node_id in m.nodes:
        raise TopologyError(f"node {node_id} is already in the cluster")
    if not m.shards:
        raise TopologyError("the cluster has no shards yet")
    new = m.next_epoch()
    sh = new.shard(shard) if shard is not None else min(new.shards, key=lambda s: (len(s.replicas), s.id))
    if sh is None:
        raise TopologyError(f"no shard {shard}")
    if sh.primary is None:
        sh.primary = node_id        # an empty shard: the new node is its primary
    else:
        sh.replicas.append(node_id)
    new.nodes[node_id] = {"host": host, "port": port, "shard": sh.id}
    return new


def add_shard(m, node_id, host, port):
    """A new shard without slots, ``node_id`` its primary (then move slots to it)."""
    if node_id in m.nodes:
        raise TopologyError(f"node {node_id} is already in the cluster")
    new = m.next_epoch()
    sid = max((s.id for s in new.shards), default=-1) + 1
    new.shards.append(Shard(sid, node_id))
    new.nodes[node_id] = {"host": host, "port": port, "shard": sid}
    return new


def remove_node(m, node_id):
    """Remove a node. A primary must hand over first, unless its shard is empty."""
    if node_id not in m.nodes:
        raise TopologyError(f"node {node_id} is not in the cluster")
    new = m.next_epoch()
    sh = new.shard(new.nodes[node_id]["shard"])
    if sh.primary == node_id:
        if sh.slots or sh.replicas or any(node_id in (v["from"], v["to"]) for v in new.migrations.values()):
            raise TopologyError(f"node {node_id} is the primary of shard {sh.id}: fail it over "
                                f"(or move its slots away) before removing it")
        new.shards.remove(sh)
    else:
        sh.replicas.remove(node_id)
        if sh.handover == node_id:
            sh.handover = None
    del new.nodes[node_id]
    return new


def _slot_list(slot_ranges):
    try:
        return sorted(_slots.from_ranges(slot_ranges))
    except _slots.SlotRangeError as e:
        raise TopologyError(str(e)) from None


def begin_migration(m, slot_ranges, to):
    """Mark slots as moving to shard ``to`` (migrating at the source, importing at ``to``)."""
    dst = m.shard(to)
    if dst is None or dst.primary is None:
        raise TopologyError(f"shard {to} does not exist or has no primary")
    new = m.next_epoch()
    table = m.slot_table()
    for s in _slot_list(slot_ranges):
        src = table[s]
        if src is None:
            raise TopologyError(f"slot {s} is not assigned to any shard")
        if src == to:
            raise TopologyError(f"slot {s} is already owned by shard {to}")
        if s in new.migrations:
            raise TopologyError(f"slot {s} is already migrating to shard {new.migrations[s]['to']}")
        new.migrations[s] = {"from": src, "to": to}
    return new


def finish_migration(m, slot_ranges):
    """The slots' keys have moved: the target shard owns them from this epoch on."""
    new = m.next_epoch()
    moved = {}
    for s in _slot_list(slot_ranges):
        mv = new.migrations.pop(s, None)
        if mv is None:
            raise TopologyError(f"slot {s} is not migrating")
        moved.setdefault((mv["from"], mv["to"]), set()).add(s)
    for (src, dst), ss in moved.items():
        a, b = new.shard(src), new.shard(dst)
        a.slots = _slots.to_ranges(_slots.from_ranges(a.slots) - ss)
        b.slots = _slots.normalize(b.slots + _slots.to_ranges(ss))
    return new


def abort_migration(m, slot_ranges):
    new = m.next_epoch()
    for s in _slot_list(slot_ranges):
        if new.migrations.pop(s, None) is None:
            raise TopologyError(f"slot {s} is not migrating")
    return new


def rebalance_plan(m, shard_ids=None):
    """Slot moves that even out the shards: ``[(from, to, [(lo, hi), ...]), ...]``.

    ``shard_ids``: the shards to spread the slots over (default: every shard
    with a primary). Each ends with 16384/n slots, give or take one; a shard
    keeps the slots it has where it can, so the fewest slots move. Each move
    is then run as ``migrate`` (keys move) and ``migrate-done``.
    """
    if shard_ids is None:
        shard_ids = [s.id for s in m.shards if s.primary]
    shard_ids = sorted(shard_ids)
    if not shard_ids:
        raise TopologyError("no shard to place slots on")
    for sid in shard_ids:
        if m.shard(sid) is None:
            raise TopologyError(f"no shard {sid}")
    n = len(shard_ids)
    have = {s.id: sorted(_slots.from_ranges(s.slots)) for s in m.shards}
    # the one extra slot some shards get goes to those that hold more already
    by_size = sorted(shard_ids, key=lambda sid: (-len(have[sid]), sid))
    target = {sid: _slots.SLOTS // n + (1 if i < _slots.SLOTS % n else 0)
              for i, sid in enumerate(by_size)}
    give = []                       # (slot, from) beyond each donor's target
    for s in m.shards:
        keep = target.get(s.id, 0)
        give.extend((slot, s.id) for slot in have[s.id][keep:])
    give.extend((slot, None) for slot, owner in enumerate(m.slot_table()) if owner is None)
    moves = {}
    for sid in shard_ids:
        need = target[sid] - min(len(have[sid]), target[sid])
        while need > 0 and give:
            slot, src = give.pop(0)
            moves.setdefault((src, sid), []).append(slot)
            need -= 1
    return [(src, dst, _slots.to_ranges(ss)) for (src, dst), ss in sorted(
        moves.items(), key=lambda kv: (kv[0][0] is None, kv[0]))]


def apply_request(m, op, args, members):
    """A request from ``P requests/`` as a map change (raises TopologyError if refused)."""
    if op == "failover":
        return begin_handover(m, int(args["shard"]), args.get("to"), members)
    if op == "add-shard":
        mem = members.get(args["node"])
        if mem is None:
            raise TopologyError(f"node {args['node']} is not a live member")
        if mem.id in m.nodes:
            m = remove_node(m, mem.id)
            m.epoch -= 1            # one epoch for the whole request
        return add_shard(m, mem.id, mem.host, mem.port)
    if op == "remove-node":
        return remove_node(m, args["node"])
    if op == "migrate":
        return begin_migration(m, args["slots"], int(args["to"]))
    if op == "migrate-done":
        return finish_migration(m, args["slots"])
    if op == "migrate-abort":
        return abort_migration(m, args["slots"])
    raise TopologyError(f"unknown request {op!r}")


# -- the controller

class Controller:
    """Election and reconcile loop (see the module docstring); runs on the agent's loop."""

    def __init__(self, topo, node_id, host="", port=0, interval=0.5, handover_timeout=5.0,
                 log=None):
        self.topo = topo
        self.node_id = node_id
        self.host = host
        self.port = port
        self.interval = interval
        self.handover_timeout = handover_timeout
        self.log = log if log is not None else (lambda level, name, /, **kw: None)
        self.lease = 0
        self.election_revision = 0
        self.changes = 0
        self.errors = 0
        self._wake = asyncio.Event()
        self._replids = {}          # node id -> last replid seen (primaries' streams)
        self._handover_started = {}  # shard id -> monotonic
        self.last_error = None

    @property
    def is_leader(self):
        return self.election_revision != 0

    def wake(self):
        self._wake.set()

    def set_lease(self, lease):
        if lease != self.lease:
            self.lease = lease
            self.election_revision = 0      # the old key went with the old lease

    def observe(self, st):
        """Remember each primary's replication id (to rank replicas once it is gone).

        Called on every state read, by the agent too, so a controller elected
        after a primary died still knows which stream its replicas count in.
        """
        for mem in st.members.values():
            if mem.role == "primary" and mem.replid:
                self._replids[mem.id] = mem.replid

    def _guard(self):
        return [cmp_create(self.topo.key_controller, "==", self.election_revision)]

    async def campaign(self):
        if not self.lease:
            return False
        me = _dumps({"id": self.node_id, "host": self.host, "port": self.port})
        key = self.topo.key_controller
        r = await self.topo.etcd.txn([cmp_create(key, "==", 0)], [op_put(key, me, self.lease)],
                                     [op_get(key)])
        if r.succeeded:
            self.election_revision = r.revision
            self.log("warning", "controller_elected", node=self.node_id, revision=r.revision)
            return True
        kvs = r.responses[0] if r.responses else []
        if kvs and kvs[0].lease == self.lease:
            try:
                who = json.loads(kvs[0].value).get("id")
            except ValueError:
                who = None
            if who == self.node_id:
                self.election_revision = kvs[0].create_revision
                return True
        self.election_revision = 0
        return False

    async def run(self):
        while True:
            try:
                if not self.is_leader:
                    await self.campaign()
                if self.is_leader:
                    await self.reconcile()
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except (EtcdError, TopologyError) as e:
                self.errors += 1
                if str(e) != str(self.last_error):
                    self.log("warning", "controller_error", error=str(e))
                self.last_error = e
            self._wake.clear()
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can lose a cancellation
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def reconcile(self, max_steps=32):
        """Apply changes until nothing is left; returns how many were written."""
        n = 0
        for _ in range(max_steps):
            st = await self.topo.state()
            if st.controller_revision != self.election_revision:
                self.election_revision = 0
                self.log("warning", "controller_lost", node=self.node_id)
                return n
            if st.meta is None:
                return n
            self.observe(st)
            step = self._plan(st)
            if step is None:
                return n
            if isinstance(step, _Refusal):
                self.log("warning", "request_refused", request=step.rid, reason=step.reason)
                await self.topo.finish_request(step.rid, step.rev, "error", step.reason)
                continue
            new, extra_guard, what, request = step
            also = []
            if request is not None:     # the request's outcome goes in the same txn
                rid, req, rev = request
                cmp, op = self.topo.request_outcome(rid, req, rev, "done", f"epoch {new.epoch}")
                extra_guard = extra_guard + [cmp]
                also = [op]
            try:
                await self.topo.cas_map(new, st.map_revision, st.map.epoch if st.map else 0,
                                        guard=self._guard() + extra_guard, also=also)
            except (CasConflictError, StaleEpochError) as e:
                self.log("info", "controller_cas_retry", change=what, error=str(e))
                continue
            n += 1
            self.changes += 1
            self.log("warning", "topology_change", change=what, epoch=new.epoch)
        return n

    def _plan(self, st):
        """The next change: (new map, extra guard, description, request) or None."""
        m, members = st.map, st.members
        shards = st.meta["shards"]
        new = bootstrap(m, self.topo.name, shards, members)
        if new is not None:
            return new, [], "bootstrap/join", None
        new = update_addresses(m, members)
        if new is not None:
            return new, [], "addresses", None
        now = time.monotonic()
        for sh in m.shards:
            if sh.primary and sh.primary not in members:
                to = pick_successor(m, sh.id, members, self._replids.get(sh.primary))
                if to is None:
                    continue        # nobody to promote: the shard waits for its primary
                guard = [cmp_create(self.topo.member_key(sh.primary), "==", 0)]
                return failover(m, sh.id, to), guard, f"failover shard {sh.id} to {to}", None
            if sh.handover:
                p, t = members.get(sh.primary), members.get(sh.handover)
                started = self._handover_started.setdefault(sh.id, now)
                if p and t and p.fenced and p.epoch >= m.epoch and t.replid == p.replid \
                        and t.offset >= p.offset:
                    self._handover_started.pop(sh.id, None)
                    return failover(m, sh.id, sh.handover), [], \
                        f"handover shard {sh.id} to {sh.handover}", None
                if t is None or now - started > self.handover_timeout:
                    self._handover_started.pop(sh.id, None)
                    return abort_handover(m, sh.id), [], f"handover of shard {sh.id} abandoned", None
        for rid, (req, rev) in sorted(st.requests.items()):
            if req.get("status") != "pending":
                continue
            try:
                new = apply_request(m, req.get("op"), req.get("args") or {}, members)
            except (TopologyError, KeyError, TypeError, ValueError) as e:
                return _Refusal(rid, rev, str(e))
            return new, [], f"request {req.get('op')}", (rid, req, rev)
        return None


class _Refusal:
    """A request the controller refuses: written back as an error, no map change."""

    def __init__(self, rid, rev, reason):
        self.rid, self.rev, self.reason = rid, rev, reason
