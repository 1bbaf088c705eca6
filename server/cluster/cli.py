"""``kvstore-cluster``: a local cluster's whole life cycle in one command.

    kvstore-cluster up --shards 3 --replicas 1 [--port 7000] [--dir DIR]
                       [--etcd URL] [--name NAME] [--min-replica-acks K]
                       [--capacity SIZE] [--page-size auto|1G|2M|4K]
                       [--kernel-policy auto|keep_ue|mainline] [--ttl S]
                       [--server-config FILE.toml] [--detach]
    kvstore-cluster status (--dir DIR | --etcd URL --name NAME) [--json]
    kvstore-cluster down --dir DIR
    kvstore-cluster failover (--dir DIR | --etcd URL --name NAME) --shard S [--to NODE]
    kvstore-cluster add-node --dir DIR [--port P] [--new-shard]
    kvstore-cluster remove-node --dir DIR NODE_ID_OR_PORT
    kvstore-cluster reshard (--dir DIR | --etcd URL --name NAME)
                            (--slots N --from SHARD --to SHARD | --rebalance) [--timeout S]

``up`` starts its own etcd under ``DIR/etcd`` unless ``--etcd`` names one,
creates the cluster in it, starts ``shards * (replicas + 1)`` servers on
ports BASE, BASE+1, ... (the first ``shards`` become the primaries), logs to
``DIR/node-PORT.log`` and records what it started in ``DIR/cluster.json``
(``down`` stops exactly that). In the foreground it shows a status table
every second until Ctrl-C, then stops everything; with ``--detach`` it
returns once every slot has a live primary and every server it started is
placed in the slot map.

``reshard`` moves slots with their keys while the cluster serves: it asks the
controller to mark them migrating (request ``migrate``), the source shard's
primary moves their keys to the target (migrate.py) and asks for
``migrate-done`` slot by slot as they empty; ``reshard`` prints the progress
and returns when every slot it moved has its new owner (exit 1 on a refusal
or after ``--timeout`` seconds without progress). ``--rebalance`` evens the
slots out over every shard with a primary (``controller.rebalance_plan``),
e.g. after ``add-node --new-shard``.

``status --json`` prints ``{"name", "epoch", "healthy", "nodes": [{"id",
"host", "port", "pid", "role", "shard", "slots": [[lo, hi]], "offset",
"alive", "fenced"}]}``; ``healthy`` is true when all 16384 slots belong to
shards whose primary is alive (its lease holds) and not fenced.
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

from . import slots as _slots
from .agent import new_node_id
from .etcd import EtcdClient, EtcdError
from .controller import rebalance_plan
from .topology import Topology, TopologyError

__all__ = ["main"]

STATE = "cluster.json"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(p):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            return False
        return True


def _alive(pid, token=None):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False
    except (OSError, IndexError):
        pass
    return token is None or token.encode() in cmd


# -- reading a cluster

async def _state(etcd_url, name, timeout=2.0):
    cli = EtcdClient(etcd_url, timeout=timeout)
    topo = Topology(cli, name)
    await topo.meta()
    return await topo.state()


def cluster_status(etcd_url, name, pids=None):
    """The ``status --json`` document of a cluster (``pids``: node id -> local pid)."""
    st = asyncio.run(_state(etcd_url, name))
    m = st.map
    nodes = []
    healthy = m is not None and m.complete()
    if m is not None:
        for sh in m.shards:
            if sh.slots and (sh.primary not in st.members or st.members[sh.primary].fenced):
                healthy = False
            for nid in sh.members():
                mem = st.members.get(nid)
                host, port = m.address(nid)
                role = "primary" if nid == sh.primary else "replica"
                nodes.append({"id": nid, "host": host, "port": port,
                              "pid": mem.pid if mem else (pids or {}).get(nid),
                              "role": role, "shard": sh.id,
                              "slots": [list(r) for r in sh.slots] if role == "primary" else [],
                              "offset": mem.offset if mem else 0,
                              "alive": mem is not None, "fenced": mem.fenced if mem else True})
    for nid, mem in st.members.items():
        if m is None or nid not in m.nodes:
            nodes.append({"id": nid, "host": mem.host, "port": mem.port, "pid": mem.pid,
                          "role": "none", "shard": None, "slots": [], "offset": mem.offset,
                          "alive": True, "fenced": mem.fenced})
    return {"name": name, "epoch": m.epoch if m else 0, "healthy": bool(healthy),
            "controller": (st.controller or {}).get("id"), "nodes": nodes}


def status_table(doc):
    lines = [f"cluster {doc['name']}  epoch {doc['epoch']}  "
             f"{'HEALTHY' if doc['healthy'] else 'NOT HEALTHY'}",
             f"{'node':12} {'address':21} {'pid':>7} {'role':8} {'shard':>5} "
             f"{'slots':>6} {'offset':>12}  state"]
    for n in sorted(doc["nodes"], key=lambda n: (n["shard"] if n["shard"] is not None else 1 << 30,
                                                 n["role"] != "primary", n["port"])):
        state = "down" if not n["alive"] else ("fenced" if n["fenced"] and n["role"] == "primary"
                                               else "up")
        nslots = _slots.count([tuple(r) for r in n["slots"]])
        lines.append(f"{n['id'][:12]:12} {n['host'] + ':' + str(n['port']):21} "
                     f"{n['pid'] or '-':>7} {n['role']:8} "
                     f"{n['shard'] if n['shard'] is not None else '-':>5} {nslots:>6} "
                     f"{n['offset']:>12}  {state}")
    return "\n".join(lines)


# -- the local state file

def _load(d):
    path = os.path.join(d, STATE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"kvstore-cluster: no cluster started here ({path} does not exist)") from None


def _save(d, st):
    tmp = os.path.join(d, STATE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(st, f, indent=1)
    os.replace(tmp, os.path.join(d, STATE))


def _target(args):
    if getattr(args, "etcd", None) and getattr(args, "name", None) and not args.dir:
        return args.etcd, args.name, {}
    if not args.dir:
        raise SystemExit("kvstore-cluster: give --dir DIR, or --etcd URL --name NAME")
    st = _load(args.dir)
    return st["etcd"], st["name"], {n["id"]: n["pid"] for n in st["nodes"]}


# -- up

def _start_etcd(d):
    import shutil
    exe = shutil.which("etcd")
    if exe is None:
        raise SystemExit("kvstore-cluster: etcd is not installed (apt-get install etcd-server), "
                         "or give --etcd URL")
    cport, pport = _free_port(), _free_port()
    c, p = f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{pport}"
    log = open(os.path.join(d, "etcd.log"), "ab")
    proc = subprocess.Popen(
        [exe, "--name", "kvstore", "--data-dir", os.path.join(d, "etcd"),
         "--listen-client-urls", c, "--advertise-client-urls", c,
         "--listen-peer-urls", p, "--initial-advertise-peer-urls", p,
         "--initial-cluster", f"kvstore={p}",
         "--heartbeat-interval", "50", "--election-timeout", "500", "--log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    return proc, c


async def _wait_etcd(url, timeout):
    cli = EtcdClient(url, timeout=1.0)
    await cli.wait_ready(timeout)


async def _create(url, name, shards, replicas):
    cli = EtcdClient(url, timeout=2.0)
    return await Topology(cli, name).create(shards, replicas)


def _spawn_node(d, port, node_id, etcd_url, name, args):
    from kvstore.server.spawn import server_command
    flags = ["--port", str(port), "--cluster", f"etcd://{etcd_url.split('://', 1)[1]}/{name}",
             "--cluster-node-id", node_id, "--cluster-ttl", str(args.ttl),
             "--capacity", args.capacity]
    if getattr(args, "page_size", None):
        flags += ["--page-size", args.page_size]
    if getattr(args, "kernel_policy", None):
        flags += ["--kernel-policy", args.kernel_policy]
    if args.min_replica_acks:
        flags += ["--min-replica-acks", str(args.min_replica_acks)]
    if args.fault_injection:
        flags += ["--enable-fault-injection"]
    if getattr(args, "server_config", None):
        flags += ["--config", os.path.abspath(args.server_config)]
    logpath = os.path.join(d, f"node-{port}.log")
    log = open(logpath, "ab")
    proc = subprocess.Popen(server_command(*flags), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    return {"id": node_id, "port": port, "pid": proc.pid, "log": logpath, "argv": flags}, proc


def _wait_healthy(etcd_url, name, procs, timeout, placed=0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"kvstore-cluster: a server exited (rc={p.returncode}) "
                                 f"during start; see its log ({' '.join(p.args[-8:])})")
        try:
            doc = cluster_status(etcd_url, name)
            n = sum(1 for x in doc["nodes"] if x["alive"] and x["role"] != "none")
            if doc["healthy"] and n >= placed:
                return doc
            last = (f"{n} of {placed} servers placed" if doc["healthy"]
                    else "not every slot has a live primary yet")
        except (EtcdError, TopologyError, OSError) as e:
            last = str(e)
        time.sleep(0.2)
    raise SystemExit(f"kvstore-cluster: not healthy after {timeout:g} s ({last})")


def cmd_up(args):
    d = os.path.abspath(args.dir)
    os.makedirs(d, exist_ok=True)
    if os.path.exists(os.path.join(d, STATE)):
        st = _load(d)
        if any(_alive(n["pid"], n["id"]) for n in st["nodes"]):
            raise SystemExit(f"kvstore-cluster: a cluster started from {d} is still running "
                             f"(kvstore-cluster down --dir {args.dir})")
    total = args.shards * (args.replicas + 1)
    ports = list(range(args.port, args.port + total))
    busy = [p for p in ports if not _port_free(p)]
    if busy:
        raise SystemExit(f"kvstore-cluster: ports in use: {busy} (choose another --port)")
    st = {"name": args.name, "etcd": args.etcd, "etcd_pid": None, "nodes": [],
          "shards": args.shards, "replicas": args.replicas, "started": time.time(),
          "ttl": args.ttl, "capacity": args.capacity, "min_replica_acks": args.min_replica_acks,
          "fault_injection": args.fault_injection, "page_size": args.page_size,
          "kernel_policy": args.kernel_policy,
          "server_config": os.path.abspath(args.server_config) if args.server_config else None}
    etcd_proc = None
    procs = []
    try:
        if not args.etcd:
            etcd_proc, st["etcd"] = _start_etcd(d)
            st["etcd_pid"] = etcd_proc.pid
            _save(d, st)
        asyncio.run(_wait_etcd(st["etcd"], 20.0))
        try:
            asyncio.run(_create(st["etcd"], args.name, args.shards, args.replicas))
        except TopologyError as e:
            raise SystemExit(f"kvstore-cluster: {e}") from None
        for i, port in enumerate(ports):
            node, proc = _spawn_node(d, port, new_node_id(), st["etcd"], args.name, args)
            st["nodes"].append(node)
            procs.append(proc)
            _save(d, st)
            if i == args.shards - 1:
                # primaries register first, so they are placed as primaries
                _wait_members(st["etcd"], args.name, args.shards, procs, 60.0)
        doc = _wait_healthy(st["etcd"], args.name, procs, 60.0, placed=total)
    except BaseException:
        _stop_all(st)
        raise
    if args.detach:
        print(status_table(doc))
        print(f"cluster {args.name} is up: {len(ports)} servers on ports {ports[0]}-{ports[-1]}, "
              f"etcd {st['etcd']}; stop it with: kvstore-cluster down --dir {args.dir}")
        return 0
    try:
        while True:
            try:
                doc = cluster_status(st["etcd"], args.name, {n["id"]: n["pid"] for n in st["nodes"]})
                text = status_table(doc)
            except (EtcdError, TopologyError, OSError) as e:
                text = f"etcd unreachable: {e}"
            sys.stdout.write("\x1b[H\x1b[2J" + text + "\n(Ctrl-C stops the cluster)\n")
            sys.stdout.flush()
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    _stop_all(st)
    return 0


def _wait_members(url, name, n, procs, timeout):
    async def count():
        st = await Topology(EtcdClient(url, timeout=2.0), name).state()
        return sum(1 for m in st.members.values() if m.role == "primary")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"kvstore-cluster: a server exited (rc={p.returncode}) during start")
        try:
            if asyncio.run(count()) >= n:
                return
        except (EtcdError, TopologyError, OSError):
            pass
        time.sleep(0.1)
    raise SystemExit(f"kvstore-cluster: the {n} primaries did not register within {timeout:g} s")


# -- down

def _stop_pid(pid, token, timeout=10.0):
    if not _alive(pid, token):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid, token):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    if _alive(pid, token):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return True


def _stop_all(st):
    for n in st["nodes"]:
        _stop_pid(n["pid"], n["id"])
    if st.get("etcd_pid"):
        _stop_pid(st["etcd_pid"], "etcd")


def cmd_down(args):
    st = _load(args.dir)
    _stop_all(st)
    print(f"stopped {len(st['nodes'])} servers" + (" and etcd" if st.get("etcd_pid") else ""))
    return 0


def cmd_status(args):
    url, name, pids = _target(args)
    try:
        doc = cluster_status(url, name, pids)
    except (EtcdError, TopologyError, OSError) as e:
        print(f"kvstore-cluster: {e}", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=1) if args.json else status_table(doc))
    return 0 if doc["healthy"] else 3


def cmd_failover(args):
    url, name, _ = _target(args)

    async def go():
        if True:
            topo = Topology(EtcdClient(url, timeout=2.0), name)
            await topo.meta()
            body = {"shard": args.shard}
            if args.to:
                body["to"] = args.to
            rid = await topo.request("failover", **body)
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                r = await topo.request_status(rid)
                if r and r.get("status") != "pending":
                    return r
                await asyncio.sleep(0.1)
            return {"status": "pending", "detail": "the controller did not answer in time"}
    r = asyncio.run(go())
    print(f"failover of shard {args.shard}: {r.get('status')} {r.get('detail', '')}".rstrip())
    return 0 if r.get("status") == "done" else 1


def cmd_add_node(args):
    st = _load(args.dir)
    d = os.path.abspath(args.dir)
    port = args.port or max(n["port"] for n in st["nodes"]) + 1
    if not _port_free(port):
        raise SystemExit(f"kvstore-cluster: port {port} is in use (give --port)")
    opts = argparse.Namespace(ttl=st.get("ttl", 3), capacity=st.get("capacity", "64MiB"),
                              min_replica_acks=st.get("min_replica_acks", 0),
                              fault_injection=st.get("fault_injection", False),
                              page_size=st.get("page_size"), kernel_policy=st.get("kernel_policy"),
                              server_config=st.get("server_config"))
    node, proc = _spawn_node(d, port, new_node_id(), st["etcd"], st["name"], opts)
    st["nodes"].append(node)
    _save(d, st)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"kvstore-cluster: the new server exited (rc={proc.returncode}); "
                             f"see {node['log']}")
        try:
            doc = cluster_status(st["etcd"], st["name"])
            me = next((n for n in doc["nodes"] if n["id"] == node["id"]), None)
            if me is not None and me["role"] != "none":
                if args.new_shard and not getattr(args, "_shard_asked", False):
                    args._shard_asked = True

                    async def ask():
                        topo = Topology(EtcdClient(st["etcd"], timeout=2.0), st["name"])
                        rid = await topo.request("add-shard", node=node["id"])
                        return await _await_request(topo, rid, args.timeout)
                    r = asyncio.run(ask())
                    if r.get("status") != "done":
                        print(f"kvstore-cluster: add-shard refused: {r.get('detail', '')}",
                              file=sys.stderr)
                        return 1
                    continue
                if args.new_shard and me["role"] != "primary":
                    time.sleep(0.2)
                    continue
                print(f"added {node['id']} on port {port}: {me['role']} of shard {me['shard']}")
                return 0
        except (EtcdError, TopologyError, OSError):
            pass
        time.sleep(0.2)
    print(f"kvstore-cluster: {node['id']} on port {port} started but was not placed within "
          f"{args.timeout:g} s", file=sys.stderr)
    return 1


def cmd_remove_node(args):
    st = _load(args.dir)
    node = next((n for n in st["nodes"] if n["id"] == args.node or
                 (args.node.isdigit() and n["port"] == int(args.node))), None)
    if node is None:
        raise SystemExit(f"kvstore-cluster: no node {args.node!r} was started from {args.dir}")
    doc = cluster_status(st["etcd"], st["name"])
    me = next((n for n in doc["nodes"] if n["id"] == node["id"]), None)
    if me is not None and me["role"] == "primary":
        raise SystemExit(f"kvstore-cluster: {node['id']} is the primary of shard {me['shard']}: "
                         f"fail it over first (kvstore-cluster failover --shard {me['shard']})")
    # stop it first (its lease goes with it), or the controller would place it again
    _stop_pid(node["pid"], node["id"])

    async def go():
        topo = Topology(EtcdClient(st["etcd"], timeout=2.0), st["name"])
        rid = await topo.request("remove-node", node=node["id"])
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            r = await topo.request_status(rid)
            if r and r.get("status") != "pending":
                return r
            await asyncio.sleep(0.1)
        return {"status": "pending", "detail": "the controller did not answer in time"}
    r = asyncio.run(go()) if me is not None else {"status": "done", "detail": "not in the map"}
    st["nodes"] = [n for n in st["nodes"] if n["id"] != node["id"]]
    _save(os.path.abspath(args.dir), st)
    print(f"remove {node['id']}: {r.get('status')} {r.get('detail', '')}".rstrip())
    return 0 if r.get("status") == "done" else 1


async def _await_request(topo, rid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await topo.request_status(rid)
        if r and r.get("status") != "pending":
            return r
        await asyncio.sleep(0.1)
    return {"status": "pending", "detail": "the controller did not answer in time"}


def reshard_plan(m, args):
    """``[(from, to, [(lo, hi)])]`` for the reshard arguments, from map ``m``."""
    if args.rebalance:
        plan = rebalance_plan(m)
        bad = [p for p in plan if p[0] is None]
        if bad:
            raise TopologyError("some slots are not assigned to any shard yet")
        return plan
    if args.slots is None or args.from_shard is None or args.to is None:
        raise TopologyError("reshard wants --slots N --from SHARD --to SHARD, or --rebalance")
    src, dst = m.shard(args.from_shard), m.shard(args.to)
    if src is None or dst is None or dst.primary is None:
        raise TopologyError(f"no shard {args.from_shard if src is None else args.to} with a primary")
    if args.from_shard == args.to:
        raise TopologyError("--from and --to name the same shard")
    have = sorted(_slots.from_ranges(src.slots) - set(m.migrations))
    if not 0 < args.slots <= len(have):
        raise TopologyError(f"shard {args.from_shard} has {len(have)} slots that can move, "
                            f"not {args.slots}")
    return [(args.from_shard, args.to, _slots.to_ranges(have[-args.slots:]))]


def cmd_reshard(args):
    url, name, _ = _target(args)

    async def go():
        topo = Topology(EtcdClient(url, timeout=2.0), name)
        await topo.meta()
        st = await topo.state()
        if st.map is None:
            raise TopologyError("the cluster has no slot map yet")
        plan = reshard_plan(st.map, args)
        if not plan:
            print("nothing to move: the slots are balanced")
            return 0
        for src, dst, ranges in plan:
            allslots = sorted(_slots.from_ranges(ranges))
            print(f"moving {len(allslots)} slots from shard {src} to shard {dst}", flush=True)
            t0 = time.monotonic()
            done_before = 0
            last_print = 0.0
            # a few hundred slots at a time: every node re-reads the map on each
            # change, and its size grows with the slots marked migrating
            for i in range(0, len(allslots), args.chunk):
                chunk = allslots[i:i + args.chunk]
                want = set(chunk)
                rid = await topo.request("migrate", slots=[list(r) for r in _slots.to_ranges(chunk)],
                                         to=dst)
                r = await _await_request(topo, rid, args.timeout)
                if r.get("status") != "done":
                    print(f"kvstore-cluster: migrate refused: {r.get('detail', '')}", file=sys.stderr)
                    return 1
                last_left, last_change = None, time.monotonic()
                while True:
                    st = await topo.state()
                    left = len(want & set(st.map.migrations))
                    now = time.monotonic()
                    if left != last_left:
                        last_change = now
                    moved = done_before + len(want) - left
                    if left != last_left and (now - last_print >= 1.0 or
                                              moved == len(allslots)):
                        print(f"  {moved}/{len(allslots)} slots moved ({now - t0:.1f} s)",
                              flush=True)
                        last_print = now
                    last_left = left
                    if left == 0:
                        break
                    if now - last_change > args.timeout:
                        print(f"kvstore-cluster: no progress for {args.timeout:g} s; {left} slots "
                              f"still migrating (they keep moving in the background; see the "
                              f"source primary's log)", file=sys.stderr)
                        return 1
                    await asyncio.sleep(0.1)
                done_before += len(want)
        print("reshard done", flush=True)
        return 0
    return asyncio.run(go())


def build_parser():
    p = argparse.ArgumentParser(prog="kvstore-cluster",
                                description="Run and inspect kvstore clusters (state in etcd).")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a local cluster (and its etcd unless --etcd)")
    up.add_argument("--shards", type=int, default=3)
    up.add_argument("--replicas", type=int, default=1)
    up.add_argument("--port", type=int, default=7000, help="first server port (default 7000)")
    up.add_argument("--dir", default="kvstore-cluster", help="logs and state (default ./kvstore-cluster)")
    up.add_argument("--etcd", help="use this etcd (http://HOST:PORT) instead of starting one")
    up.add_argument("--name", default="kvstore", help="cluster name (default kvstore)")
    up.add_argument("--min-replica-acks", type=int, default=0)
    up.add_argument("--capacity", default="64MiB", help="arena size per server (default 64MiB)")
    up.add_argument("--page-size", choices=("auto", "1G", "2M", "4K"),
                    help="arena page size of every server (kvstore-server --page-size; "
                         "default: the server's, auto)")
    up.add_argument("--kernel-policy", choices=("auto", "keep_ue", "mainline"),
                    help="memory-error policy of every server (kvstore-server --kernel-policy; "
                         "default: the server's, auto)")
    up.add_argument("--ttl", type=int, default=3, help="lease TTL in seconds (default 3)")
    up.add_argument("--enable-fault-injection", dest="fault_injection", action="store_true")
    up.add_argument("--server-config", metavar="FILE.toml",
                    help="kvstore-server --config for every server (e.g. aclfile, masteruser, "
                         "masterauth); add-node uses it too")
    up.add_argument("--detach", action="store_true", help="return once every slot has a live primary")
    for name, hlp in (("status", "show a cluster (exit 3 when not healthy)"),
                      ("failover", "safe manual failover of one shard")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("--dir")
        s.add_argument("--etcd")
        s.add_argument("--name")
        if name == "status":
            s.add_argument("--json", action="store_true")
        else:
            s.add_argument("--shard", type=int, required=True)
            s.add_argument("--to", help="replica node id (default: the most up-to-date)")
            s.add_argument("--timeout", type=float, default=10.0)
    dn = sub.add_parser("down", help="stop what 'up' started")
    dn.add_argument("--dir", default="kvstore-cluster")
    an = sub.add_parser("add-node", help="start one more server; the controller places it "
                        "as a replica of the shard with the fewest replicas")
    an.add_argument("--dir", default="kvstore-cluster")
    an.add_argument("--port", type=int, help="default: one above the highest port in use")
    an.add_argument("--timeout", type=float, default=30.0)
    an.add_argument("--new-shard", action="store_true",
                    help="make the new server the primary of a new, empty shard "
                         "(then move slots to it: reshard --rebalance)")
    rn = sub.add_parser("remove-node", help="stop a replica started from --dir and remove it "
                        "from the slot map (a primary must be failed over first)")
    rn.add_argument("--dir", default="kvstore-cluster")
    rn.add_argument("node", help="node id or port")
    rn.add_argument("--timeout", type=float, default=10.0)
    s = sub.add_parser("reshard", help="move slots and their keys between shards while serving")
    s.add_argument("--dir")
    s.add_argument("--etcd")
    s.add_argument("--name")
    s.add_argument("--slots", type=int, help="how many slots to move")
    s.add_argument("--from", dest="from_shard", type=int, help="source shard id")
    s.add_argument("--to", type=int, help="target shard id")
    s.add_argument("--rebalance", action="store_true",
                   help="even the slots out over every shard with a primary")
    s.add_argument("--timeout", type=float, default=60.0,
                   help="give up after this many seconds without progress (default 60)")
    s.add_argument("--chunk", type=int, default=256,
                   help="slots marked migrating at a time (default 256)")
    return p


def main(argv=None):
    p = build_parser()
    args, extra = p.parse_known_args(argv)
    if extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    fn = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "failover": cmd_failover,
          "add-node": cmd_add_node, "remove-node": cmd_remove_node,
          "reshard": cmd_reshard}[args.cmd]
    try:
        return fn(args)
    except (EtcdError, TopologyError) as e:
        print(f"kvstore-cluster: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
