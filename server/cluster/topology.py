"""The cluster's state in etcd: members, the slot map and its config epoch.

Key schema (``P`` = ``/kvstore/<cluster-name>/``; values are compact JSON):

``P meta``
    ``{"cluster": NAME, "shards": N, "replicas": R, "created": unix_time}``.
    Written once, by whoever creates the cluster (``Topology.create``). A
    node joining a name with no ``meta`` gets :class:`ClusterNotFoundError`
    naming the clusters that do exist, instead of silently founding a new one.
``P slotmap``
    The :class:`SlotMap`: ``{"cluster", "epoch", "shards": [{"id",
    "primary", "replicas", "slots": [[lo, hi], ...], "handover"}], "nodes":
    {id: {"host", "port", "shard"}}, "migrations": {slot: {"from", "to"}}}``.
    One document, so one compare-and-swap changes it atomically. Written only
    by :meth:`Topology.cas_map`: a txn that compares the key's
    ``mod_revision`` with the one the writer read (plus the controller's
    guard, see controller.py) and requires ``epoch == previous epoch + 1``.
``P members/<node-id>``
    A :class:`Member`, what the node says about itself (address, pid, role
    it is acting in, shard, replication offset and id, fenced, last epoch
    applied). Put with the node's lease, so it disappears when the node's
    lease expires: that disappearance is how a dead primary is noticed.
``P controller``
    ``{"id", "host", "port"}`` of the elected controller, put with its
    lease through ``txn(create_revision == 0)``.
``P requests/<id>``
    Operations asked of the controller (manual failover, node removal,
    slot moves); the controller writes the outcome back into the same key.

Validation: a document for another cluster (its ``cluster`` field) is a
:class:`ClusterNameError`; a slot map whose epoch is not above the one a
reader already applied is refused with :class:`StaleEpochError`; slots are
each owned at most once, shard members must be known nodes, migrations must
start at the slot's owner.
"""

import json
import re
import time
from dataclasses import dataclass, field

from kvstore import errors

from . import slots as _slots
from .etcd import cmp_create, cmp_mod, op_get, op_put

__all__ = ["SlotMap", "Shard", "Member", "Topology", "ClusterState", "NodeView",
           "TopologyError", "ClusterNameError", "ClusterNotFoundError", "StaleEpochError",
           "CasConflictError", "ROOT", "check_name"]

#: Every cluster lives under ``/kvstore/<name>/``.
ROOT = "/kvstore/"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class TopologyError(errors.Error, ValueError):
    """A cluster document is invalid or a topology change is not allowed."""


class ClusterNameError(TopologyError):
    """A bad cluster name, or a document that belongs to another cluster."""


class ClusterNotFoundError(ClusterNameError, LookupError):
    """No cluster of that name in etcd."""


class StaleEpochError(TopologyError):
    """A slot map (or a write) carries an epoch older than one already seen."""

    def __init__(self, message, epoch=None, current=None):
        super().__init__(message)
        self.epoch = epoch
        self.current = current


class CasConflictError(TopologyError):
    """The slot map changed in etcd between read and compare-and-swap."""


def check_name(name):
    """Return ``name`` if it is a valid cluster name, else raise ClusterNameError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ClusterNameError(
            f"bad cluster name {name!r}: 1-64 characters from A-Z a-z 0-9 _ . -, "
            f"starting with a letter or digit")
    return name


def _dumps(obj):
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _loads(raw, what):
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise TopologyError(f"{what} in etcd is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise TopologyError(f"{what} in etcd is not a JSON object")
    return d


def _check_cluster(d, name, what):
    got = d.get("cluster")
    if got != name:
        raise ClusterNameError(f"{what} belongs to cluster {got!r}, not {name!r}")


# -- the slot map

@dataclass
class Shard:
    id: int
    primary: str | None = None
    replicas: list = field(default_factory=list)
    slots: list = field(default_factory=list)        # [(lo, hi)] normalized
    #: manual failover in progress: the replica taking over (primary fenced)
    handover: str | None = None

    def to_json(self):
        d = {"id": self.id, "primary": self.primary, "replicas": list(self.replicas),
             "slots": [list(r) for r in self.slots]}
        if self.handover:
            d["handover"] = self.handover
        return d

    @classmethod
    def from_json(cls, d):
        if not isinstance(d, dict) or type(d.get("id")) is not int:
            raise TopologyError(f"bad shard entry {d!r}")
        reps = d.get("replicas", [])
        if not isinstance(reps, list) or not all(isinstance(r, str) for r in reps):
            raise TopologyError(f"shard {d['id']}: replicas must be a list of node ids")
        try:
            sl = _slots.normalize(d.get("slots", []))
        except _slots.SlotRangeError as e:
            raise TopologyError(f"shard {d['id']}: {e}") from None
        return cls(d["id"], d.get("primary"), list(reps), sl, d.get("handover"))

    def members(self):
        return ([self.primary] if self.primary else []) + list(self.replicas)


@dataclass
class SlotMap:
    """Who serves which slots, at which config epoch (see the module docstring)."""

    cluster: str
    epoch: int = 0
    shards: list = field(default_factory=list)              # [Shard], by id
    nodes: dict = field(default_factory=dict)               # id -> {"host","port","shard"}
    migrations: dict = field(default_factory=dict)          # slot -> {"from","to"}

    # -- encoding

    def encode(self):
        self.validate()
        return _dumps({"cluster": self.cluster, "epoch": self.epoch,
                       "shards": [s.to_json() for s in self.shards],
                       "nodes": {k: dict(v) for k, v in self.nodes.items()},
                       "migrations": {str(k): dict(v) for k, v in sorted(self.migrations.items())}})

    @classmethod
    def decode(cls, raw, cluster):
        """Parse and validate; ``cluster`` is the name this reader belongs to."""
        d = _loads(raw, "slot map")
        _check_cluster(d, cluster, "slot map")
        ep = d.get("epoch")
        if type(ep) is not int or ep < 0:
            raise TopologyError(f"slot map epoch {ep!r} is not a non-negative integer")
        shards = d.get("shards", [])
        nodes = d.get("nodes", {})
        migr = d.get("migrations", {})
        if not isinstance(shards, list) or not isinstance(nodes, dict) or not isinstance(migr, dict):
            raise TopologyError("slot map: shards must be a list, nodes and migrations objects")
        try:
            migrations = {int(k): {"from": int(v["from"]), "to": int(v["to"])} for k, v in migr.items()}
        except (TypeError, ValueError, KeyError):
            raise TopologyError(f"slot map: bad migrations {migr!r}") from None
        m = cls(cluster, ep, [Shard.from_json(s) for s in shards],
                {k: dict(v) for k, v in nodes.items()}, migrations)
        m.validate()
        return m

    def copy(self):
        return SlotMap(self.cluster, self.epoch,
                       [Shard(s.id, s.primary, list(s.replicas), list(s.slots), s.handover)
                        for s in self.shards],
                       {k: dict(v) for k, v in self.nodes.items()},
                       {k: dict(v) for k, v in self.migrations.items()})

    def validate(self):
        check_name(self.cluster)
        ids = set()
        seen_nodes = set()
        ranges = []
        for s in self.shards:
            if s.id in ids:
                raise TopologyError(f"shard {s.id} appears twice")
            ids.add(s.id)
            for n in s.members():
                if n not in self.nodes:
                    raise TopologyError(f"shard {s.id} names unknown node {n}")
                if n in seen_nodes:
                    raise TopologyError(f"node {n} is in two shards")
                seen_nodes.add(n)
                if self.nodes[n].get("shard") != s.id:
                    raise TopologyError(f"node {n} is listed in shard {s.id} but says "
                                        f"shard {self.nodes[n].get('shard')}")
            if s.handover is not None and s.handover not in s.replicas:
                raise TopologyError(f"shard {s.id}: handover to {s.handover}, not a replica")
            ranges.extend((lo, hi, s.id) for lo, hi in s.slots)
        ranges.sort()
        for (lo1, hi1, a), (lo2, hi2, b) in zip(ranges, ranges[1:]):
            if lo2 <= hi1:
                raise TopologyError(f"slots {lo2}-{min(hi1, hi2)} are owned by shards "
                                    f"{min(a, b)} and {max(a, b)}")
        for n, info in self.nodes.items():
            if n not in seen_nodes:
                raise TopologyError(f"node {n} is in no shard")
            if not isinstance(info.get("host"), str) or type(info.get("port")) is not int:
                raise TopologyError(f"node {n}: host and port are required")
        for slot, mv in self.migrations.items():
            if not 0 <= slot < _slots.SLOTS:
                raise TopologyError(f"migration of slot {slot}: not a slot")
            if mv["from"] not in ids or mv["to"] not in ids or mv["from"] == mv["to"]:
                raise TopologyError(f"migration of slot {slot}: bad shards {mv}")
            if self.owner(slot) != mv["from"]:
                raise TopologyError(f"migration of slot {slot} from shard {mv['from']}, "
                                    f"which does not own it")

    # -- queries

    def shard(self, sid):
        for s in self.shards:
            if s.id == sid:
                return s
        return None

    def owner(self, slot):
        """Shard id owning ``slot``, or None."""
        for s in self.shards:
            if _slots.contains(s.slots, slot):
                return s.id
        return None

    def slot_table(self):
        """A list of 16384 shard ids (None where unassigned)."""
        t = [None] * _slots.SLOTS
        for s in self.shards:
            for lo, hi in s.slots:
                t[lo:hi + 1] = [s.id] * (hi - lo + 1)
        return t

    def assigned(self):
        return sum(_slots.count(s.slots) for s in self.shards)

    def complete(self):
        """True when every slot is owned by a shard that has a primary."""
        return all(s.primary for s in self.shards if s.slots) and self.assigned() == _slots.SLOTS

    def address(self, node_id):
        n = self.nodes.get(node_id)
        return (n["host"], n["port"]) if n else None

    def shard_of(self, node_id):
        n = self.nodes.get(node_id)
        return n["shard"] if n else None

    def next_epoch(self):
        """A copy with the epoch bumped: every change goes through this."""
        m = self.copy()
        m.epoch += 1
        return m


# -- members

@dataclass
class Member:
    """What a node says about itself under ``members/<id>`` (with its lease)."""

    cluster: str
    id: str
    host: str
    port: int
    role: str = "none"              # what it acts as now: "primary", "replica", "none"
    shard: int | None = None
    offset: int = 0                 # replication offset (a replica: applied primary offset)
    replid: str = ""                # the stream ``offset`` counts in
    epoch: int = 0                  # last slot map epoch applied
    fenced: bool = True
    pid: int = 0
    lease: int = 0
    joined: float = 0.0
    #: create_revision of the key in etcd (filled in when read; orders joins)
    revision: int = 0

    def encode(self):
        return _dumps({"cluster": self.cluster, "id": self.id, "host": self.host,
                       "port": self.port, "role": self.role, "shard": self.shard,
                       "offset": self.offset, "replid": self.replid, "epoch": self.epoch,
                       "fenced": self.fenced, "pid": self.pid, "lease": self.lease,
                       "joined": self.joined})

    @classmethod
    def decode(cls, raw, cluster, revision=0):
        d = _loads(raw, "member record")
        _check_cluster(d, cluster, f"member record {d.get('id')!r}")
        try:
            m = cls(cluster, str(d["id"]), str(d["host"]), int(d["port"]), str(d.get("role", "none")),
                    d.get("shard"), int(d.get("offset", 0)), str(d.get("replid", "")),
                    int(d.get("epoch", 0)), bool(d.get("fenced", True)), int(d.get("pid", 0)),
                    int(d.get("lease", 0)), float(d.get("joined", 0.0)), revision)
        except (KeyError, TypeError, ValueError) as e:
            raise TopologyError(f"bad member record: {e}") from None
        if m.shard is not None and type(m.shard) is not int:
            raise TopologyError(f"member {m.id}: shard {m.shard!r} is not an integer")
        return m


@dataclass
class ClusterState:
    """One consistent read of a cluster (a single etcd range at ``revision``)."""

    name: str
    revision: int
    meta: dict | None
    map: SlotMap | None
    map_revision: int               # mod_revision of the slotmap key (0: none yet)
    members: dict                   # id -> Member (live: their leases hold)
    controller: dict | None
    controller_revision: int        # create_revision of the controller key
    requests: dict                  # id -> (request dict, mod_revision)


@dataclass
class NodeView:
    """What one node must know of a slot map: handed to ``on_topology``."""

    epoch: int
    map: SlotMap
    node_id: str
    role: str                       # "primary", "replica" or "none" (not in the map yet)
    shard: int | None
    primary: tuple | None           # (host, port) of this shard's primary (None if me/none)
    primary_id: str | None
    slots: list                     # [(lo, hi)] this shard owns (empty for "none")
    migrating: dict                 # slot -> (shard id, (host, port)): moving out of my shard
    importing: dict                 # slot -> (shard id, (host, port)): moving into my shard
    handover: str | None            # replica taking over my shard (manual failover), or None

    @classmethod
    def of(cls, m, node_id):
        sid = m.shard_of(node_id)
        sh = m.shard(sid) if sid is not None else None
        if sh is None:
            return cls(m.epoch, m, node_id, "none", None, None, None, [], {}, {}, None)
        role = "primary" if sh.primary == node_id else "replica"
        paddr = None if role == "primary" or not sh.primary else m.address(sh.primary)
        mig, imp = {}, {}
        for slot, mv in m.migrations.items():
            if mv["from"] == sid:
                other = m.shard(mv["to"])
                mig[slot] = (mv["to"], m.address(other.primary) if other and other.primary else None)
            elif mv["to"] == sid:
                other = m.shard(mv["from"])
                imp[slot] = (mv["from"], m.address(other.primary) if other and other.primary else None)
        return cls(m.epoch, m, node_id, role, sid, paddr, sh.primary, list(sh.slots), mig, imp,
                   sh.handover)


# -- etcd access

class Topology:
    """Reads and writes one cluster's keys through an :class:`~.etcd.EtcdClient`."""

    def __init__(self, etcd, name):
        self.etcd = etcd
        self.name = check_name(name)
        self.prefix = f"{ROOT}{name}/"
        self.key_meta = (self.prefix + "meta").encode()
        self.key_map = (self.prefix + "slotmap").encode()
        self.key_members = (self.prefix + "members/").encode()
        self.key_controller = (self.prefix + "controller").encode()
        self.key_requests = (self.prefix + "requests/").encode()

    def member_key(self, node_id):
        return self.key_members + node_id.encode()

    # -- cluster creation and discovery

    async def create(self, shards, replicas=0, exist_ok=False):
        """Create the cluster (its ``meta``); returns the meta dict.

        With ``exist_ok`` an existing cluster is fine when its shard count
        matches; otherwise an existing cluster is a :class:`TopologyError`.
        """
        if type(shards) is not int or not 1 <= shards <= _slots.SLOTS:
            raise TopologyError(f"shards must be an integer in 1..{_slots.SLOTS}, not {shards!r}")
        if type(replicas) is not int or replicas < 0:
            raise TopologyError(f"replicas must be a non-negative integer, not {replicas!r}")
        meta = {"cluster": self.name, "shards": shards, "replicas": replicas,
                "created": round(time.time(), 3)}
        r = await self.etcd.txn([cmp_create(self.key_meta, "==", 0)],
                                [op_put(self.key_meta, _dumps(meta))], [op_get(self.key_meta)])
        if r.succeeded:
            return meta
        have = self._decode_meta(r.responses[0][0].value)
        if exist_ok and have["shards"] == shards:
            return have
        raise TopologyError(f"cluster {self.name!r} already exists in etcd at {self.etcd.url} "
                            f"({have['shards']} shards)")

    def _decode_meta(self, raw):
        d = _loads(raw, "cluster meta")
        _check_cluster(d, self.name, "cluster meta")
        if type(d.get("shards")) is not int or d["shards"] < 1:
            raise TopologyError(f"cluster meta: bad shard count {d.get('shards')!r}")
        return d

    async def list_clusters(self):
        """Names of the clusters present in this etcd."""
        kvs, _ = await self.etcd.range(ROOT.encode(), prefix=True)
        names = set()
        for kv in kvs:
            rest = kv.key[len(ROOT):].decode("utf-8", "replace")
            name, _, leaf = rest.partition("/")
            if leaf == "meta":
                names.add(name)
        return sorted(names)

    async def meta(self):
        """The cluster's meta; :class:`ClusterNotFoundError` when it does not exist."""
        kv, _ = await self.etcd.get(self.key_meta)
        if kv is None:
            others = await self.list_clusters()
            there = ", ".join(repr(n) for n in others) if others else "none"
            raise ClusterNotFoundError(
                f"no cluster named {self.name!r} in etcd at {self.etcd.url} "
                f"(clusters there: {there}); create it first (kvstore-cluster up)")
        return self._decode_meta(kv.value)

    # -- reads

    async def state(self):
        """Everything under the cluster prefix, read at one revision."""
        kvs, rev = await self.etcd.range(self.prefix.encode(), prefix=True)
        meta = smap = ctl = None
        map_rev = ctl_rev = 0
        members, requests = {}, {}
        for kv in kvs:
            k = kv.key
            if k == self.key_meta:
                meta = self._decode_meta(kv.value)
            elif k == self.key_map:
                smap = SlotMap.decode(kv.value, self.name)
                map_rev = kv.mod_revision
            elif k == self.key_controller:
                try:
                    ctl = _loads(kv.value, "controller record")
                except TopologyError:
                    ctl = {}
                ctl_rev = kv.create_revision
            elif k.startswith(self.key_members):
                try:
                    m = Member.decode(kv.value, self.name, kv.create_revision)
                except TopologyError:
                    continue        # an unreadable record counts as no member
                members[m.id] = m
            elif k.startswith(self.key_requests):
                rid = k[len(self.key_requests):].decode("utf-8", "replace")
                try:
                    requests[rid] = (_loads(kv.value, "request"), kv.mod_revision)
                except TopologyError:
                    continue
        return ClusterState(self.name, rev, meta, smap, map_rev, members, ctl, ctl_rev, requests)

    async def load_map(self):
        """``(SlotMap or None, mod_revision)``."""
        kv, _ = await self.etcd.get(self.key_map)
        if kv is None:
            return None, 0
        return SlotMap.decode(kv.value, self.name), kv.mod_revision

    # -- writes

    async def cas_map(self, new, prev_revision, prev_epoch, guard=(), also=()):
        """Store ``new`` iff the slot map is still at ``prev_revision``.

        ``new.epoch`` must be ``prev_epoch + 1`` (``prev_epoch`` is -1 for the
        first map, so the first epoch is 0... or anything; the first map is
        written with ``prev_revision == 0``). ``guard``: extra compares (the
        controller's leadership). Returns the new mod_revision. Raises
        :class:`StaleEpochError` when etcd already holds this epoch or a
        later one, :class:`CasConflictError` when the map or the guard moved.
        """
        if new.cluster != self.name:
            raise ClusterNameError(f"slot map for cluster {new.cluster!r} written to {self.name!r}")
        if prev_revision and new.epoch != prev_epoch + 1:
            raise StaleEpochError(f"slot map epoch {new.epoch} does not follow epoch {prev_epoch}",
                                  new.epoch, prev_epoch)
        raw = new.encode()
        r = await self.etcd.txn([cmp_mod(self.key_map, "==", prev_revision), *guard],
                                [op_put(self.key_map, raw), *also], [op_get(self.key_map)])
        if r.succeeded:
            return r.revision
        kvs = r.responses[0] if r.responses else []
        if kvs:
            cur = SlotMap.decode(kvs[0].value, self.name)
            if cur.epoch >= new.epoch:
                raise StaleEpochError(
                    f"slot map epoch {new.epoch} refused: etcd already holds epoch {cur.epoch}",
                    new.epoch, cur.epoch)
            if kvs[0].mod_revision != prev_revision:
                raise CasConflictError(f"slot map changed in etcd (revision {kvs[0].mod_revision}, "
                                       f"expected {prev_revision})")
        raise CasConflictError("slot map not written: the controller guard failed")

    async def register(self, member, lease):
        """Put this node's member record with its lease; returns the revision."""
        if member.cluster != self.name:
            raise ClusterNameError(f"member of {member.cluster!r} registering in {self.name!r}")
        member.lease = lease
        return await self.etcd.put(self.member_key(member.id), member.encode(), lease=lease)

    async def deregister(self, node_id):
        return await self.etcd.delete(self.member_key(node_id))

    # -- requests to the controller

    async def request(self, op, **args):
        """Queue an operation for the controller; returns its request id."""
        rid = f"{time.time_ns():x}-{op}"
        body = {"cluster": self.name, "op": op, "args": args, "status": "pending"}
        await self.etcd.put(self.key_requests + rid.encode(), _dumps(body))
        return rid

    async def request_status(self, rid):
        kv, _ = await self.etcd.get(self.key_requests + rid.encode())
        return None if kv is None else _loads(kv.value, "request")

    def request_outcome(self, rid, request, mod_revision, status, detail=""):
        """``(compare, op)`` recording a request's outcome, for a txn."""
        key = self.key_requests + rid.encode()
        body = dict(request, status=status, detail=detail)
        return cmp_mod(key, "==", mod_revision), op_put(key, _dumps(body))

    async def finish_request(self, rid, mod_revision, status, detail=""):
        """Record a request's outcome (only if nobody changed it meanwhile)."""
        key = self.key_requests + rid.encode()
        kv, _ = await self.etcd.get(key)
        if kv is None or kv.mod_revision != mod_revision:
            return False
        body = _loads(kv.value, "request")
        body["status"] = status
        body["detail"] = detail
        r = await self.etcd.txn([cmp_mod(key, "==", mod_revision)], [op_put(key, _dumps(body))])
        return r.succeeded
