"""``kvstore-demo --cluster``: three shards, memory errors, and a primary killed.

Starts a local cluster as ``kvstore-cluster up --detach`` would (its own
etcd, ``--shards`` primaries with ``--replicas`` replicas each,
``--min-replica-acks 1``, fault injection allowed, ``--page-size`` pages) in a temporary
directory, loads keys through
:class:`kvstore.client.ClusterClient`, and runs a checked read/write load
(pipelined batches split by slot) while memory errors are injected into the
primaries over the wire (``inject(kind, key=...)``). A third of the way
through, the primary of shard 0 is killed with ``kill -9``; the controller
promotes its replica, the client follows the new slot map, and the killed
node is restarted with its node id so it rejoins as a replica of the new
primary (with one replica per shard, that is when the shard can acknowledge
writes again: ``--min-replica-acks 1`` needs a replica). The live table shows
the counters and every node's role, so the failover is visible as it happens.

Every read is checked against what was written. A write the client reports
as failed may or may not have been applied, so both values are accepted for
that key from then on; a write it acknowledged must be there at the end. The
run ends with a check of every key through the cluster. Exit status 1 when any
answer was wrong, any acknowledged write is missing or a key stayed lost;
client errors during the failover window are reported but expected (writes
in flight on the killed primary, NOREPLICAS while the shard has no replica).

Memory errors are not injected into the killed primary's shard from the
kill until its replica is back in sync: a primary whose replica is gone has
no rebuild source, and a key lost then would be lost for good (the demo
would report it, correctly, as lost).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from kvstore.server.spawn import free_port_run
from .run import KINDS, Tally, _accept, _bar, _check_all, _value, _worker




def _up(d, args, base):
    """Start etcd and the servers under ``d`` as ``kvstore-cluster up --detach``
    does (same ``cluster.json``, so ``kvstore-cluster down`` stops them), with
    the demo's ``--page-size`` (default auto: hugepages when reserved) and
    ``--kernel-policy`` (default the simulated keep_ue). A mainline salvage of
    a 1 GiB page runs on the node's recovery thread: its loop keeps renewing
    the lease while the clients of that page wait for the copy."""
    import asyncio

    from kvstore.server.cluster import cli as ccli
    from kvstore.server.cluster.agent import new_node_id
    from kvstore.server.spawn import server_command
    total = args.shards * (args.replicas + 1)
    st = {"name": "demo", "etcd": None, "etcd_pid": None, "nodes": [], "shards": args.shards,
          "replicas": args.replicas, "started": time.time(), "ttl": 3,
          "capacity": args.capacity, "min_replica_acks": 1, "fault_injection": True,
          "page_size": args.page_size, "kernel_policy": args.kernel_policy}
    etcd_proc, st["etcd"] = ccli._start_etcd(d)
    st["etcd_pid"] = etcd_proc.pid
    ccli._save(d, st)
    asyncio.run(ccli._wait_etcd(st["etcd"], 20.0))
    asyncio.run(ccli._create(st["etcd"], st["name"], args.shards, args.replicas))
    procs = []
    host = st["etcd"].split("://", 1)[1]
    for i in range(total):
        port, nid = base + i, new_node_id()
        flags = ["--port", str(port), "--cluster", f"etcd://{host}/{st['name']}",
                 "--cluster-node-id", nid, "--capacity", args.capacity,
                 "--min-replica-acks", "1", "--enable-fault-injection", "--page-size", args.page_size,
                 "--kernel-policy", args.kernel_policy, "--log-level", "warning"]
        logpath = os.path.join(d, f"node-{port}.log")
        with open(logpath, "ab") as log:
            proc = subprocess.Popen(server_command(*flags), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        procs.append(proc)
        st["nodes"].append({"id": nid, "port": port, "pid": proc.pid, "log": logpath,
                            "argv": flags})
        ccli._save(d, st)
        if i == args.shards - 1:        # primaries register first, so they are placed as such
            ccli._wait_members(st["etcd"], st["name"], args.shards, procs, 60.0)
    doc = ccli._wait_healthy(st["etcd"], st["name"], procs, 60.0, placed=total)
    return st, ccli.status_table(doc)


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "kvstore.server.cluster.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


class ClusterView:
    """What etcd says about the cluster, read by the main thread once per refresh."""

    def __init__(self, state):
        self.state = state
        self.doc = None
        self.error = None

    def refresh(self):
        from kvstore.server.cluster.cli import cluster_status
        try:
            self.doc = cluster_status(self.state["etcd"], self.state["name"],
                                      {n["id"]: n["pid"] for n in self.state["nodes"]})
            self.error = None
        except Exception as e:  # noqa: BLE001 - etcd hiccup: shown, retried next refresh
            self.error = f"{type(e).__name__}: {e}"
        return self.doc

    def primary_of_shard(self, shard):
        for n in (self.doc or {}).get("nodes", []):
            if n["shard"] == shard and n["role"] == "primary":
                return n
        return None

    def node(self, nid):
        return next((n for n in (self.doc or {}).get("nodes", []) if n["id"] == nid), None)


class ClusterDisplay:
    """Counters and the node table, redrawn in place on a terminal; plain lines otherwise."""

    ROWS = (("ops/s", "ops_s"), ("operations", "ops"), ("memory errors (UEs)", "ues"),
            ("keys lost", "lost"), ("keys rebuilt", "rebuilt"), ("wrong answers", "wrong"),
            ("client errors", "errors"))

    def __init__(self, live, seconds):
        self.live = live
        self.seconds = seconds
        self.drawn = 0

    def show(self, elapsed, values, view, events):
        from kvstore.server.cluster.cli import status_table
        if not self.live:
            roles = ""
            if view.doc:
                roles = " ".join(f"s{n['shard']}:{n['port']}{'' if n['alive'] else '(down)'}"
                                 for n in sorted(view.doc["nodes"], key=lambda n: n["port"])
                                 if n["role"] == "primary")
            print(f"{elapsed:5.1f}s  ops/s {values['ops_s']:>7,}  UEs {values['ues']:>4,}  "
                  f"lost {values['lost']:>5,}  rebuilt {values['rebuilt']:>5,}  "
                  f"wrong {values['wrong']}  errors {values['errors']}  primaries {roles}"
                  f"{'  ' + view.error if view.error else ''}", flush=True)
            return
        lines = [f"+-- {elapsed:5.1f} s of {self.seconds:g} s " + "-" * 21,
                 *(f"| {label:<22}{values[key]:>14,}" for label, key in self.ROWS),
                 "+" + "-" * 37]
        if view.doc:
            lines += status_table(view.doc).splitlines()
        elif view.error:
            lines.append(f"etcd: {view.error}")
        lines += events[-4:]
        out = []
        if self.drawn:
            out.append(f"\x1b[{self.drawn}F\x1b[J")
        out.extend(line + "\x1b[K\n" for line in lines)
        sys.stdout.write("".join(out))
        sys.stdout.flush()
        self.drawn = len(lines)


def _injector(client, keys, kinds, rate, stop, counts, problems, blocked):
    """Inject memory errors into the primaries (by key), skipping the slots in
    ``blocked`` (a shard without a replica to rebuild from)."""
    from kvstore import client as kvc
    from kvstore.slots import key_slot
    rng = random.Random(11)
    period = 1.0 / rate
    nxt = time.monotonic()
    while True:
        nxt += period
        if stop.wait(max(0.0, nxt - time.monotonic())):
            return
        key = keys[rng.randrange(len(keys))]
        if blocked and key_slot(key) in blocked:
            counts["held back"] = counts.get("held back", 0) + 1
            continue
        kind = rng.choice(kinds)
        try:
            client.inject(kind, key=key)
            counts[kind] = counts.get(kind, 0) + 1
        except kvc.KeyLostError:
            counts["skipped"] = counts.get("skipped", 0) + 1    # that record is lost already
        except kvc.InjectionDisabledError as e:
            problems.append(f"injection refused: {e}")
            return
        except kvc.Error:
            counts["failed"] = counts.get("failed", 0) + 1     # the failover window


def _synced(replica_addr):
    """True once the node at ``replica_addr`` is a replica whose sync is done
    (it holds the snapshot and follows the stream: a rebuild source again)."""
    from kvstore.client import Client
    try:
        with Client(*replica_addr, socket_timeout=2, retries=0) as r:
            rs = r.stats()
    except Exception:  # noqa: BLE001 - not up yet
        return False
    return (rs.get("repl_master_link_status") == "up"
            and not rs.get("repl_master_sync_in_progress"))


def _primary_stats(view):
    """Sum of the live primaries' store counters."""
    from kvstore.client import Client
    tot = {"keys_lost_total": 0, "rebuilt_keys": 0, "lost_keys": 0}
    for n in (view.doc or {}).get("nodes", []):
        if n["role"] != "primary" or not n["alive"]:
            continue
        try:
            with Client(n["host"], n["port"], socket_timeout=2, retries=0) as c:
                st = c.stats()
        except Exception:  # noqa: BLE001 - a node going away: counted next time
            continue
        for k in tot:
            tot[k] += st.get(k, 0)
    return tot


def run_cluster(args) -> int:
    from kvstore.client import ClusterClient

    live = sys.stdout.isatty() and not args.plain
    display = ClusterDisplay(live, args.seconds)
    d = tempfile.mkdtemp(prefix="kvstore-demo-cluster-")
    nservers = args.shards * (args.replicas + 1)
    base = free_port_run(nservers + 1)
    stop = threading.Event()
    threads, clients, extra = [], [], []
    failed = True
    up = False
    try:
        print(f"starting {args.shards} shards x {args.replicas + 1} servers "
              f"(--min-replica-acks 1, fault injection on) and etcd under {d}")
        up = True
        try:
            state, table = _up(d, args, base)
        except SystemExit as e:         # the cluster helpers' way of saying what failed
            raise RuntimeError(str(e)) from None
        view = ClusterView(state)
        view.refresh()
        print(table)

        def client():
            c = ClusterClient([("127.0.0.1", base + i) for i in range(nservers)],
                              socket_timeout=5, retries=10, retry_backoff=0.02,
                              retry_backoff_max=0.5, cluster_retry_timeout=15)
            clients.append(c)
            return c

        main = client()
        keys = [b"key:%08d" % i for i in range(args.keys)]
        expected = [_value(i, 0, args.value_size) for i in range(args.keys)]
        gens = [0] * args.keys
        t0 = time.monotonic()
        step = 2000
        for s in range(0, args.keys, step):
            main.mput(zip(keys[s:s + step], expected[s:s + step]))
            if live:
                print("\rloading " + _bar(min(s + step, args.keys), args.keys), end="", flush=True)
        print(f"\rloaded {args.keys:,} keys of {args.value_size} bytes into "
              f"{len(main.primaries())} shards in {time.monotonic() - t0:.1f} s" + " " * 20)

        victim = view.primary_of_shard(0)
        kill_at = args.seconds / 3 if args.kill_at is None else args.kill_at
        print(f"running {args.seconds:g} s: {args.threads} client threads "
              f"({args.write_ratio:.0%} writes), {args.ue_rate:g} memory errors/s "
              f"({', '.join(args.kinds)}) into the primaries; kill -9 of shard 0's primary "
              f"(port {victim['port']}, pid {victim['pid']}) at {kill_at:g} s")

        tally = Tally()
        counts, problems = {}, []
        blocked = set()
        for t in range(args.threads):
            mine = list(range(t, args.keys, args.threads))
            if mine:
                threads.append(threading.Thread(
                    target=_worker, name=f"client-{t}", daemon=True,
                    args=(client(), keys, expected, mine, gens, args, stop, tally, 100 + t)))
        if args.ue_rate > 0:
            threads.append(threading.Thread(
                target=_injector, name="injector", daemon=True,
                args=(client(), keys, args.kinds, args.ue_rate, stop, counts, problems,
                      blocked)))
        events = []

        def event(msg):
            line = f"{time.monotonic() - start:5.1f}s  {msg}"
            events.append(line)
            if not live:
                print(line, flush=True)

        start = last = time.monotonic()
        for th in threads:
            th.start()
        last_ops = 0
        killed_at = promoted_at = None
        new_primary = restarted = None
        interval = 0.5 if live else 1.0
        while True:
            remaining = args.seconds - (time.monotonic() - start)
            if stop.wait(max(0.0, min(interval, remaining))):
                break
            now = time.monotonic()
            if killed_at is None and now - start >= kill_at:
                blocked.update(s for lo, hi in victim["slots"] for s in range(lo, hi + 1))
                os.kill(victim["pid"], signal.SIGKILL)
                killed_at = time.monotonic()
                event(f"kill -9 of the primary of shard 0 (port {victim['port']}, "
                      f"pid {victim['pid']})")
            view.refresh()
            if killed_at is not None and promoted_at is None:
                p = view.primary_of_shard(0)
                if p is not None and p["id"] != victim["id"] and p["alive"]:
                    promoted_at = time.monotonic()
                    new_primary = p
                    event(f"failover: port {p['port']} is shard 0's primary, "
                          f"{promoted_at - killed_at:.1f} s after the kill (epoch {view.doc['epoch']})")
                    node = next(n for n in state["nodes"] if n["id"] == victim["id"])
                    from kvstore.server.spawn import server_command
                    log = open(os.path.join(d, f"node-{node['port']}.log"), "ab")
                    extra.append(subprocess.Popen(
                        server_command(*node["argv"]), stdout=log, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL, start_new_session=True))
                    log.close()
                    restarted = node
                    event(f"restarted the killed node on port {node['port']} with its node id")
            if restarted is not None and blocked and _synced(("127.0.0.1", restarted["port"])):
                blocked.clear()
                event(f"port {restarted['port']} rejoined shard 0 as a replica, in sync")
            st = _primary_stats(view)
            with tally.lock:
                ops, wrong, errors = tally.ops, tally.wrong, tally.errors
            display.show(now - start, {
                "ops_s": int((ops - last_ops) / max(now - last, 1e-9)), "ops": ops,
                "ues": sum(counts.get(k, 0) for k in KINDS),
                "lost": st["keys_lost_total"], "rebuilt": st["rebuilt_keys"],
                "wrong": wrong, "errors": errors}, view, events)
            last, last_ops = now, ops
            if now - start >= args.seconds:
                break
        stop.set()
        for th in threads:
            th.join(30)
        elapsed = time.monotonic() - start
        for p in problems:
            print(p, file=sys.stderr)

        # the final check: every key through the cluster, once rebuilds are done
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            view.refresh()
            if view.doc and view.doc["healthy"] and _primary_stats(view)["lost_keys"] == 0:
                break
            time.sleep(0.2)
        missing = []
        bad, lost = _check_all(main, keys, expected, examples=missing)
        ues = sum(counts.get(k, 0) for k in KINDS)
        st = _primary_stats(view)
        by_kind = ", ".join(f"{k} {counts[k]:,}" for k in (*KINDS, "held back", "failed")
                            if counts.get(k))
        print()
        print("summary")
        print(f"  operations            {tally.ops:,} in {elapsed:.1f}s ({tally.ops / elapsed:,.0f}/s), "
              f"{args.threads} client threads, {args.shards} shards")
        print(f"  memory errors         {ues:,} injected ({by_kind or 'none'})")
        print(f"  keys lost / rebuilt   {st['keys_lost_total']:,} / {st['rebuilt_keys']:,} "
              f"(counters of the primaries now serving)")
        if killed_at is None:
            print("  failover              none (the run ended before the kill)")
        elif promoted_at is None:
            print("  failover              NOT SEEN: shard 0 has no new primary")
        else:
            print(f"  failover              shard 0: port {victim['port']} killed, port "
                  f"{new_primary['port']} promoted after {promoted_at - killed_at:.1f} s"
                  f"{'; the killed node rejoined as a replica' if restarted and not blocked else ''}")
        print(f"  wrong answers         {tally.wrong + bad} ({tally.wrong} during the run; final "
              f"check of all {args.keys:,} keys: {bad})")
        print(f"  acked writes missing  {bad}")
        for k, v, e in missing:
            print(f"    {k!r}: {v!r:.40} not in {_accept(e)!r:.80}")
        print(f"  keys still lost      {lost:>2}")
        kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(tally.kinds.items(), key=lambda x: -x[1]))
        print(f"  client errors         {tally.errors} ({kinds or 'none'}; expected around the "
              f"failover: writes in flight on the killed primary, NOREPLICAS until the shard "
              f"has a replica again)")
        for m in tally.messages:
            print(f"    {m}")
        failed = bool(tally.wrong or bad or lost or (killed_at is not None and promoted_at is None))
        print("result: " + ("FAILED" if failed else "OK (no wrong answers, every acknowledged "
                                                     "write present, every key back)"))
        return 1 if failed else 0
    except RuntimeError as e:
        print(f"\nkvstore-demo: {e}", file=sys.stderr)
        return 1
    finally:
        stop.set()
        for th in threads:
            th.join(5)
        for c in clients:
            c.close()
        for p in extra:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if up:
            _cli("down", "--dir", d, timeout=60)
        if failed:
            print(f"(cluster logs kept in {d})", file=sys.stderr)
        else:
            shutil.rmtree(d, ignore_errors=True)
