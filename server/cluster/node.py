"""Cluster mode inside the server: the :class:`ClusterNode` the agent drives.

``kvstore-server --cluster etcd://HOST:PORT[,HOST2:PORT2]/NAME`` makes the
server build one :class:`ClusterMode` after its listeners are up. It

* runs a :class:`~.agent.NodeAgent` on the server's loop (lease, member
  record, slot-map following, the controller);
* follows the map (:meth:`on_topology`): a node named replica of its shard
  becomes a replica of the shard's primary through the server's replication
  (``REPLICAOF``'s machinery), a node named primary promotes itself. The
  rebuild source is replication's, so it follows the shard's members across
  failovers;
* publishes its replication offset and id (:meth:`report_offset`);
* enforces fencing in the write path: while fenced, or whenever
  ``agent.can_ack()`` is False, a client write is refused before it is made
  (``-CLUSTERDOWN``), and replies held for ``--min-replica-acks`` are checked
  again when they are released (:meth:`ack_refusal`): a write whose ack
  arrives after the deadline is answered with an error, never ``OK``;
* routes keyed commands (:meth:`route`, a pre-dispatch hook of the command
  table): ``-MOVED slot host:port`` for slots this node does not serve,
  ``-ASK`` for keys of a slot being migrated away that are no longer here,
  ``-TRYAGAIN`` for a multi-key command of such a slot whose keys are
  partly here and partly moved (as Redis Cluster) and for keys a primary
  promoted mid-move has not yet reconciled with the target, ``-CROSSSLOT``
  for multi-key commands across slots, ``-CLUSTERDOWN`` when a slot has no
  primary (or the node is not placed yet). ``ASKING`` (native ``asking``)
  lets the next command use an importing slot; ``READONLY`` lets a client
  read from a replica;
* moves the keys of the slots its shard is migrating away, while it is
  their live primary (:class:`~.migrate.SlotMover`; keys it has in flight
  are answered here, never with ASK);
* keeps the engine's C GET/SET path (``Engine.resp_fast``) on for the keys
  :meth:`route` would let through untouched: after every change of the
  map, role or migrations it pushes the "fast slots" bitmap
  (:meth:`push_fast_slots`, ``Engine.set_fast_slots``): as primary the
  slots it owns that are not migrating, as replica its shard's slots (used
  only by READONLY connections). A key of any other slot stops the C path
  and goes through :meth:`route`. Connections in ASKING state never use the
  C path (:meth:`fast_ok`), and a plain SET runs there only while
  :meth:`can_ack` holds, checked per batch (``WritePath.fast_guard``): a
  fenced primary answers ``-CLUSTERDOWN`` from the Python path.

The native protocol gets the same refusals as errors ``[code, message,
extra]`` (PROTOCOL.md): ``MOVED``/``ASK`` with extra ``{"slot", "host",
"port"}``, ``TRYAGAIN``, ``CROSSSLOT``, ``CLUSTERDOWN``; and the ops
``cluster`` and ``asking``.
"""

import time

from ..errors import CommandError
from ..logs import event
from . import slots as _slots
from .agent import ClusterNode, NodeAgent
from .migrate import SlotMover

__all__ = ["ClusterMode", "parse_cluster_url"]


def parse_cluster_url(url):
    """``etcd://HOST:PORT[,HOST2:PORT2]/NAME`` -> ``(["http://HOST:PORT", ...], NAME)``."""
    s = str(url).strip()
    if not s.startswith("etcd://"):
        raise ValueError(f"--cluster wants etcd://HOST:PORT[,HOST:PORT]/NAME, not {url!r}")
    rest = s[len("etcd://"):]
    hosts, sep, name = rest.partition("/")
    if not sep or not name or "/" in name:
        raise ValueError(f"--cluster {url!r}: the cluster name is missing (etcd://HOST:PORT/NAME)")
    endpoints = []
    for hp in hosts.split(","):
        host, sep, port = hp.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--cluster {url!r}: {hp!r} is not HOST:PORT")
        endpoints.append(f"http://{host}:{int(port)}")
    from .topology import check_name
    check_name(name)
    return endpoints, name


def _err(code, msg, extra=None):
    return CommandError(f"{code} {msg}", code, msg, extra)


def _moved(kind, slot, addr):
    host, port = addr
    return CommandError(f"{kind} {slot} {host}:{port}", kind, f"{slot} {host}:{port}",
                        {"slot": slot, "host": host, "port": port})


#: Native ops and how to find their keys in the argument list.
_NATIVE_KEYS = {
    "get": lambda a: a[:1], "getv": lambda a: a[:1], "put": lambda a: a[:1],
    "delete": lambda a: a[:1], "exists": lambda a: a[:1], "expire": lambda a: a[:1],
    "ttl": lambda a: a[:1], "persist": lambda a: a[:1], "incr": lambda a: a[:1],
    "incrbyfloat": lambda a: a[:1],
    "inject": lambda a: a[2:3] if len(a) == 3 and a[1] == "key" else (),
    "mget": lambda a: a[0] if a and type(a[0]) is list else (),
    "mput": lambda a: a[0][::2] if a and type(a[0]) is list else (),
}

#: Native ops that read (a replica in READONLY mode may serve them).
_NATIVE_READS = {"get", "getv", "exists", "ttl", "mget"}

# Not routed: ``fetch`` (a peer op between the members of one shard, the
# rebuild source) and keyless ops.


class ClusterMode(ClusterNode):
    """The server's cluster membership (see the module docstring)."""

    def __init__(self, server, url, *, ttl=3, announce_host=None, node_id=None):
        self.server = server
        self.endpoints, self.name = parse_cluster_url(url)
        self.url = url
        self.ttl = ttl
        self.host = announce_host or server.config.hosts[0]
        if self.host in ("0.0.0.0", "::", ""):
            self.host = "127.0.0.1"
        self.agent = NodeAgent(self, etcd=self.endpoints[0] if len(self.endpoints) == 1
                               else self.endpoints, cluster=self.name, node_id=node_id,
                               host=self.host, port=server.port, ttl=ttl, log=event,
                               start_timeout=None)
        self.node_id = self.agent.node_id
        self.view = None
        self.owner = [None] * _slots.SLOTS     # slot -> shard id
        self.fenced = True
        self.fence_reason = "not started"
        self.stats = {"moved": 0, "ask": 0, "asked": 0, "tryagain": 0, "crossslot": 0,
                      "clusterdown": 0, "fenced_refusals": 0, "fenced_acks_refused": 0, "role_changes": 0,
                      "migrate_installed": 0}
        self.mover = SlotMover(self)
        self._fast_all = False          # primary: every connection may use the C path
        self.fast_slots = bytes(_slots.SLOTS // 8)    # what push_fast_slots pushed last

    # -- lifecycle

    async def start(self, start_timeout=None):
        self.agent.start_timeout = start_timeout
        # route before the first map arrives: keyed commands answer
        # CLUSTERDOWN until then (no fast slot yet: the C path serves no key)
        self.push_fast_slots()
        self.server.table.add_hook(self.route, fast_ok=self.fast_ok)
        self.server.repl.configure_writes()
        await self.agent.start()
        return self

    async def stop(self):
        await self.mover.stop()
        await self.agent.stop()

    # -- ClusterNode

    def on_topology(self, view):
        self.view = view
        self.owner = view.map.slot_table()
        repl = self.server.repl
        if view.role == "primary":
            if repl.role != "master":
                self.stats["role_changes"] += 1
                event("warning", "cluster_promoted", epoch=view.epoch, shard=view.shard)
                repl.promote()
                if not view.slots and not view.importing and len(self.server.store):
                    # primary of a shard that owns nothing (add-shard took a
                    # replica): what it copied from its old shard is not its own
                    event("warning", "cluster_new_shard_flush", shard=view.shard,
                          keys=len(self.server.store))
                    self.server.store.flush()
        elif view.role == "replica" and view.primary is not None:
            want = tuple(view.primary)
            have = repl.replica.master
            if repl.role != "slave" or have is None or tuple(have) != want:
                self.stats["role_changes"] += 1
                event("warning", "cluster_following", epoch=view.epoch, shard=view.shard,
                      primary=f"{want[0]}:{want[1]}")
                repl.become_replica(*want)
        repl.configure_writes()
        self.mover.update(view)
        self.push_fast_slots()

    def fence(self, reason):
        self.fenced = True
        self.fence_reason = reason
        self.push_fast_slots()

    def unfence(self):
        self.fenced = False
        self.fence_reason = ""
        self.push_fast_slots()

    def report_offset(self):
        repl = self.server.repl
        if repl.role == "master":
            return repl.primary.offset, repl.primary.replid
        return repl.replica.applied, repl.replica.master_replid or ""

    # -- the C GET/SET path

    def fast_slot_bitmap(self):
        """The slots whose plain GET/SET :meth:`route` lets through untouched
        (for a replica: untouched on a READONLY connection), one bit each."""
        bits = bytearray(_slots.SLOTS // 8)
        v = self.view
        if v is None or v.role not in ("primary", "replica") or v.shard is None:
            return bytes(bits)
        owner, me = self.owner, v.shard
        skip = set(v.migrating) | set(v.importing) if v.role == "primary" else ()
        for lo, hi in _slots.normalize(v.slots):
            for s in range(lo, hi + 1):
                if owner[s] == me and s not in skip:
                    bits[s >> 3] |= 1 << (s & 7)
        return bytes(bits)

    def push_fast_slots(self):
        """Give the engine the slots its C GET/SET path may serve now.

        Called on every change route() depends on: a new map (epoch, role,
        slots, migrations), fencing and unfencing. Fencing itself does not
        change the slots (a fenced primary still serves reads, as route()
        does); its writes are held back per batch by :meth:`can_ack`."""
        v = self.view
        self._fast_all = v is not None and v.role == "primary"
        bits = self.fast_slot_bitmap()
        self.fast_slots = bits
        st = self.server.store
        setter = getattr(st, "set_fast_slots", None)
        if setter is not None:
            setter(bits)

    def fast_ok(self, conn):
        """The routing hook's gate for the C path: no ASKING pending (that
        command must reach route()), and on a replica only READONLY
        connections (the others get MOVED for every key)."""
        if getattr(conn, "cluster_asking", False):
            return False
        return self._fast_all or getattr(conn, "cluster_readonly", False)

    def can_ack(self):
        """True while a client write may be made and acknowledged now
        (:meth:`check_write` would not refuse it)."""
        return not self.fenced and self.agent.can_ack()

    # -- the write path

    def check_write(self):
        """Raise unless a client write may be made and acknowledged now."""
        if self.fenced or not self.agent.can_ack():
            self.stats["fenced_refusals"] += 1
            raise _err("CLUSTERDOWN", "The cluster is down: this primary is fenced "
                       f"({self.fence_reason or 'lease deadline passed'})")

    def ack_refusal(self):
        """None while held write acks may go out; else the error (RESP line, native triple)."""
        if not self.fenced and self.agent.can_ack():
            return None
        self.stats["fenced_acks_refused"] += 1
        msg = ("The cluster is down: this primary was fenced before the write was "
               "acknowledged; it may or may not be applied")
        return b"-CLUSTERDOWN " + msg.encode() + b"\r\n", ["CLUSTERDOWN", msg, {}]

    # -- routing (a pre-dispatch hook)

    def keys_of(self, conn, cmd, args):
        if conn.kind == "native" and cmd.name is None:
            f = _NATIVE_KEYS.get(cmd.native)
            return f(args) if f is not None else ()
        return cmd.key_args(args if conn.kind != "native" else [None] + list(args))

    def route(self, conn, cmd, args):
        asking = getattr(conn, "cluster_asking", False)
        if asking:
            conn.cluster_asking = False
        keys = self.keys_of(conn, cmd, args)
        if not keys:
            return
        slot = None
        for k in keys:
            if not isinstance(k, (bytes, bytearray, str)):
                return          # a bad key: the command's own checks refuse it
            s = _slots.key_slot(k.encode() if isinstance(k, str) else k)
            if slot is None:
                slot = s
            elif s != slot:
                self.stats["crossslot"] += 1
                raise _err("CROSSSLOT", "Keys in request don't hash to the same slot")
        v = self.view
        if v is None or v.role == "none":
            self.stats["clusterdown"] += 1
            raise _err("CLUSTERDOWN", "The cluster is down: this node is not placed yet")
        owner = self.owner[slot]
        if owner is None:
            self.stats["clusterdown"] += 1
            raise _err("CLUSTERDOWN", f"Hash slot {slot} not served")
        if owner == v.shard:
            if v.role == "primary":
                mig = v.migrating.get(slot)
                if mig is not None and mig[1] is not None:
                    store, mover = self.server.store, self.mover
                    kbs = [bytes(k) if not isinstance(k, str) else k.encode() for k in keys]
                    if mover.unconfirmed and any(k in mover.unconfirmed for k in kbs):
                        self.stats["tryagain"] += 1
                        raise _err("TRYAGAIN", "Key of a migrating slot not yet "
                                   "reconciled with the target after a failover")
                    here = [mover.holds(k) or store.exists(k) for k in kbs]
                    if not all(here):
                        if any(here):
                            # neither side has all of them: Redis's answer
                            self.stats["tryagain"] += 1
                            raise _err("TRYAGAIN", "Multiple keys request during "
                                       "rehashing of slot")
                        self.stats["ask"] += 1
                        raise _moved("ASK", slot, mig[1])
                return
            if getattr(conn, "cluster_readonly", False) and self._is_read(conn, cmd):
                return
            addr = v.map.address(v.primary_id) if v.primary_id else None
            if addr is None:
                self.stats["clusterdown"] += 1
                raise _err("CLUSTERDOWN", f"Hash slot {slot} has no primary")
            self.stats["moved"] += 1
            raise _moved("MOVED", slot, addr)
        if asking and slot in v.importing and v.role == "primary":
            self.stats["asked"] += 1
            return
        sh = v.map.shard(owner)
        if sh is None or not sh.primary:
            self.stats["clusterdown"] += 1
            raise _err("CLUSTERDOWN", f"Hash slot {slot} has no primary")
        self.stats["moved"] += 1
        raise _moved("MOVED", slot, v.map.address(sh.primary))

    @staticmethod
    def _is_read(conn, cmd):
        if conn.kind == "native" and cmd.name is None:
            return cmd.native in _NATIVE_READS
        return "readonly" in cmd.flags

    # -- what CLUSTER ... answers

    def slot_of(self, key):
        return _slots.key_slot(key)

    def node_rows(self):
        """``[(id, host, port, role, shard, primary_id, [(lo, hi)], offset)]`` from the map."""
        v = self.view
        if v is None:
            return []
        m = v.map
        rows = []
        for sh in m.shards:
            for nid in sh.members():
                host, port = m.address(nid)
                role = "primary" if nid == sh.primary else "replica"
                off = self.report_offset()[0] if nid == self.node_id else 0
                rows.append((nid, host, port, role, sh.id, sh.primary,
                             list(sh.slots) if role == "primary" else [], off))
        return rows

    def info_fields(self):
        v = self.view
        m = v.map if v else None
        assigned = m.assigned() if m else 0
        ok = bool(m) and m.complete()
        known = len(m.nodes) if m else 0
        size = sum(1 for s in m.shards if s.slots) if m else 0
        return {
            "cluster_enabled": 1,
            "cluster_state": "ok" if ok else "fail",
            "cluster_slots_assigned": assigned,
            "cluster_slots_ok": assigned if ok else 0,
            "cluster_slots_pfail": 0,
            "cluster_slots_fail": 0 if ok else _slots.SLOTS - assigned,
            "cluster_known_nodes": known,
            "cluster_size": size,
            "cluster_current_epoch": v.epoch if v else 0,
            "cluster_my_epoch": v.epoch if v else 0,
            "cluster_stats_messages_sent": 0,
            "cluster_stats_messages_received": 0,
            "kvstore_cluster_name": self.name,
            "kvstore_node_id": self.node_id,
            "kvstore_role": v.role if v else "none",
            "kvstore_shard": v.shard if v and v.shard is not None else -1,
            "kvstore_fenced": int(self.fenced),
            "kvstore_fence_reason": self.agent.fence_reason if self.fenced else "",
            "kvstore_lease_ttl": self.ttl,
            "kvstore_write_deadline_in_ms": max(0, round((self.agent.write_deadline
                                                          - time.monotonic()) * 1000)),
            **{f"kvstore_{k}": v for k, v in self.stats.items()},
            **{f"kvstore_migrate_{k}": v for k, v in self.mover.stats.items()},
            "kvstore_migrating_slots": len(v.migrating) if v else 0,
            "kvstore_importing_slots": len(v.importing) if v else 0,
        }
