"""CLUSTER, ASKING, READONLY, READWRITE (RESP) and the native ``cluster`` and ``asking`` ops.

Reply formats are Redis Cluster's (checked against redis-server 7 with
``cluster-enabled yes``): ``CLUSTER SLOTS`` is ``[[lo, hi, [host, port, id],
replica...], ...]``, ``CLUSTER SHARDS`` a list of ``{slots, nodes}`` maps,
``CLUSTER NODES`` Redis's text lines (the cluster bus port is written ``@0``:
there is no bus, etcd carries the state). On a server without ``--cluster``
every one of them answers Redis's ``-ERR This instance has cluster support
disabled``.

The native op ``cluster [sub, ...]`` answers the same questions with plain
values (PROTOCOL.md): ``["slots"]``, ``["shards"]``, ``["nodes"]``,
``["myid"]``, ``["info"]``, ``["keyslot", key]``, ``["countkeysinslot",
slot]``, ``["getkeysinslot", slot, count]``. The native op ``asking []`` is
RESP ``ASKING``: it applies to the next op on the same connection only.
"""

from ..errors import CommandError
from ..registry import Command
from . import migrate as _migrate
from . import slots as _slots

__all__ = ["cluster_rows"]

_DISABLED = "ERR This instance has cluster support disabled"


def _cluster(conn):
    c = conn.server.cluster
    if c is None:
        raise CommandError(_DISABLED)
    return c


def _int(b, what):
    try:
        return int(b)
    except (TypeError, ValueError):
        raise CommandError(f"ERR Invalid or out of range {what}") from None


def _slot_arg(b):
    s = _int(b, "slot")
    if not 0 <= s < _slots.SLOTS:
        raise CommandError("ERR Invalid or out of range slot")
    return s


def slots_reply(c):
    rows = c.node_rows()
    out = []
    by_shard = {}
    for nid, host, port, role, sid, _p, _sl, _off in rows:
        ent = [host, port, nid]
        lst = by_shard.setdefault(sid, [None, []])
        if role == "primary":
            lst[0] = ent
        else:
            lst[1].append(ent)
    v = c.view
    if v is None:
        return out
    for sh in v.map.shards:
        prim, reps = by_shard.get(sh.id, [None, []])
        if prim is None:
            continue
        for lo, hi in sh.slots:
            out.append([lo, hi, prim, *reps])
    out.sort(key=lambda r: r[0])
    return out


def shards_reply(c):
    v = c.view
    if v is None:
        return []
    rows = c.node_rows()
    out = []
    for sh in v.map.shards:
        flat = [x for lo, hi in sh.slots for x in (lo, hi)]
        nodes = []
        for nid, host, port, role, sid, _p, _sl, off in rows:
            if sid != sh.id:
                continue
            nodes.append({"id": nid, "port": port, "ip": host, "endpoint": host,
                          "role": "master" if role == "primary" else "replica",
                          "replication-offset": off, "health": "online"})
        out.append({"slots": flat, "nodes": nodes})
    return out


def nodes_text(c):
    v = c.view
    lines = []
    for nid, host, port, role, sid, prim, sl, _off in c.node_rows():
        flags = ("myself," if nid == c.node_id else "") + ("master" if role == "primary" else "slave")
        master = "-" if role == "primary" else (prim or "-")
        parts = [nid, f"{host}:{port}@0", flags, master, "0", "0", str(v.epoch), "connected"]
        parts += [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in sl]
        lines.append(" ".join(parts) + "\n")
    return "".join(lines)


def info_text(c):
    return "".join(f"{k}:{val}\r\n" for k, val in c.info_fields().items())


def keys_in_slot(conn, slot, count=None):
    out = []
    for k in conn.store.keys():
        if _slots.key_slot(k) == slot:
            out.append(k)
            if count is not None and len(out) >= count:
                break
    return out


def cmd_cluster(conn, args):
    sub = bytes(args[1]).upper()
    if sub == b"HELP":
        return conn.reply(["CLUSTER <subcommand>: SLOTS SHARDS NODES MYID INFO KEYSLOT "
                           "COUNTKEYSINSLOT GETKEYSINSLOT"])
    if sub == b"KEYSLOT":
        if len(args) != 3:
            raise CommandError("ERR wrong number of arguments for 'cluster|keyslot' command")
        return conn.reply(_slots.key_slot(bytes(args[2])))
    c = _cluster(conn)
    n = len(args)
    if sub == b"SLOTS" and n == 2:
        return conn.reply(slots_reply(c))
    if sub == b"SHARDS" and n == 2:
        return conn.reply(shards_reply(c))
    if sub == b"NODES" and n == 2:
        return conn.reply(nodes_text(c))
    if sub == b"MYID" and n == 2:
        return conn.reply(c.node_id)
    if sub == b"MYSHARDID" and n == 2:
        return conn.reply(str(c.view.shard if c.view else -1))
    if sub == b"INFO" and n == 2:
        return conn.reply(info_text(c))
    if sub == b"COUNTKEYSINSLOT" and n == 3:
        return conn.reply(len(keys_in_slot(conn, _slot_arg(args[2]))))
    if sub == b"GETKEYSINSLOT" and n == 4:
        cnt = _int(args[3], "number of keys")
        if cnt < 0:
            raise CommandError("ERR Invalid or out of range number of keys")
        return conn.reply(keys_in_slot(conn, _slot_arg(args[2]), cnt))
    name = bytes(args[1]).decode("latin-1").lower()
    raise CommandError(f"ERR unknown subcommand or wrong number of arguments for '{name}'. "
                       f"Try CLUSTER HELP.")


def cmd_asking(conn, args):
    _cluster(conn)
    conn.cluster_asking = True
    return b"+OK\r\n"


def cmd_readonly(conn, args):
    _cluster(conn)
    conn.cluster_readonly = True
    return b"+OK\r\n"


def cmd_readwrite(conn, args):
    _cluster(conn)
    conn.cluster_readonly = False
    return b"+OK\r\n"


def native_asking(conn, args):
    """``asking []``: as RESP ``ASKING``, the next op on this connection may
    use a slot this node is importing (after an ``ASK`` error)."""
    if args:
        raise CommandError("TYPE asking takes []", "TYPE", "asking takes []")
    if conn.server.cluster is None:
        raise CommandError("NOCLUSTER cluster mode is not enabled", "NOCLUSTER",
                           "cluster mode is not enabled")
    conn.cluster_asking = True
    return True


def native_cluster(conn, args):
    if not args or not isinstance(args[0], str):
        raise CommandError("TYPE cluster takes [subcommand, ...]", "TYPE",
                           "cluster takes [subcommand, ...]")
    sub = args[0].lower()
    if sub == "keyslot" and len(args) == 2 and isinstance(args[1], (bytes, str)):
        k = args[1]
        return _slots.key_slot(k.encode() if isinstance(k, str) else k)
    c = conn.server.cluster
    if c is None:
        raise CommandError("NOCLUSTER cluster mode is not enabled", "NOCLUSTER",
                           "cluster mode is not enabled")
    if sub == "slots":
        return slots_reply(c)
    if sub == "shards":
        return shards_reply(c)
    if sub == "nodes":
        return [{"id": nid, "host": h, "port": p, "role": r, "shard": s, "primary": pr,
                 "slots": [list(x) for x in sl], "offset": off, "myself": nid == c.node_id}
                for nid, h, p, r, s, pr, sl, off in c.node_rows()]
    if sub == "myid":
        return c.node_id
    if sub == "info":
        return c.info_fields()
    if sub == "countkeysinslot" and len(args) == 2 and type(args[1]) is int:
        return len(keys_in_slot(conn, _slot_arg(args[1])))
    if sub == "getkeysinslot" and len(args) == 3 and type(args[1]) is int and type(args[2]) is int:
        return keys_in_slot(conn, _slot_arg(args[1]), max(0, args[2]))
    raise CommandError(f"ERR unknown cluster subcommand {sub!r} or wrong arguments", "ERR",
                       f"unknown cluster subcommand {sub!r} or wrong arguments")


def cluster_rows():
    return [
        Command('CLUSTER', -2, ('admin', 'stale'), (0, 0, 0),
                group='cluster', resp=cmd_cluster,
                summary='CLUSTER SLOTS|SHARDS|NODES|MYID|INFO|KEYSLOT|COUNTKEYSINSLOT|GETKEYSINSLOT'),
        Command('ASKING', 1, ('fast',), (0, 0, 0), group='cluster', resp=cmd_asking,
                summary='The next command may use a slot being imported (after -ASK).'),
        Command('READONLY', 1, ('fast',), (0, 0, 0), group='cluster', resp=cmd_readonly,
                summary='Let this connection read from a replica of the slot.'),
        Command('READWRITE', 1, ('fast',), (0, 0, 0), group='cluster', resp=cmd_readwrite,
                summary='Undo READONLY.'),
        Command(None, 0, native='cluster', native_fn=native_cluster),
        Command(None, 0, native='asking', native_fn=native_asking),
        Command(None, 0, native='migrate_put', native_fn=_migrate.native_migrate_put),
        Command(None, 0, native='migrate_del', native_fn=_migrate.native_migrate_del),
    ]
