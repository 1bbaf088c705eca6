"""Cluster failover time and cluster throughput, kvstore next to Redis Cluster.

    python -m bench.cluster [--runs 3] [--ttl 3] [--quick] [-P 1,16] [--throughput-only]

Failover time: a client writes one key of the victim's slots every 20 ms
(redis-py ``RedisCluster``, a fresh slot map after every error); the time is
from the fault to the first acknowledged write after the last failed one.
Faults: ``kill -9`` of the primary, and ``SIGSTOP`` of it (held until the
shard has moved on, then ``SIGCONT``). kvstore: ``kvstore-cluster up
--shards 1 --replicas 2 --ttl TTL``, a fresh cluster per run. Redis
Cluster: 3 primaries + 3 replicas (Redis needs a majority of primaries to
fail over), ``cluster-node-timeout`` = TTL x 1000 ms, built with
``redis-cli --cluster create``.

Throughput: ``redis-benchmark --cluster -t set,get -n N*P -c 50 -P P``
(for each ``-P`` value: 1 is one command per round trip, 16 a pipeline)
against kvstore clusters of 1 and 2 shards (no replicas; redis-benchmark
refuses ``--cluster`` with one node, so the 1-shard run goes without it),
next to one plain kvstore-server (no cluster mode). Both run plain GET/SET
in the engine's C RESP path; in cluster mode only for keys of slots the
node serves (the rest goes through the Python routing hook). On a 2-core machine
shared with other work the servers compete with redis-benchmark for the
same cores, so 2 shards cannot show 2x: the figure says how much the
routing costs rather than how the cluster scales.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from kvstore.server.spawn import free_port_run
from bench._common import command_line, header, median, table

CLI = [sys.executable, "-m", "kvstore.server.cluster.cli"]




def measure_failover(start_port, key, fault, stop_wait=None):
    """Write ``key`` every 20 ms through a cluster client; apply ``fault()``;
    return the seconds from the fault to the end of the longest gap between
    acknowledged writes after it (redis-py retries some errors internally,
    so errors alone do not mark the outage)."""
    import redis
    import redis.cluster
    acks = []
    stop = threading.Event()

    def loop():
        rc = None
        i = 0
        while not stop.is_set():
            i += 1
            try:
                rc = rc or redis.cluster.RedisCluster(host="127.0.0.1", port=start_port,
                                                      socket_timeout=1)
                rc.set(key, str(i))
                acks.append(time.monotonic())
            except Exception:  # noqa: BLE001 - expected during the failover
                rc = None
            time.sleep(0.02)
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    while len(acks) < 10:
        time.sleep(0.02)
    t0 = time.monotonic()
    fault()

    def outage_end():
        xs = [t0] + [a for a in acks if a > t0]
        best = max(range(1, len(xs)), key=lambda i: xs[i] - xs[i - 1], default=None)
        if best is None or xs[best] - xs[best - 1] < 0.5:
            return None
        return xs[best]
    deadline = t0 + 60
    while time.monotonic() < deadline:
        end = outage_end()
        if end is not None and time.monotonic() - end > 1.5:
            break
        if stop_wait is not None:
            stop_wait(t0)
        time.sleep(0.05)
    stop.set()
    t.join(5)
    end = outage_end()
    if end is None:
        raise RuntimeError("no outage seen after the fault: the measurement is broken")
    return end - t0


# -- kvstore

def kv_failover(kind, ttl):
    d = tempfile.mkdtemp(prefix="bench-cluster-")
    base = free_port_run(3)
    try:
        subprocess.run(CLI + ["up", "--shards", "1", "--replicas", "2", "--port", str(base),
                              "--dir", d, "--ttl", str(ttl), "--capacity", "32MiB", "--detach"],
                       check=True, capture_output=True, timeout=120)
        doc = json.loads(subprocess.run(CLI + ["status", "--dir", d, "--json"],
                                        capture_output=True, text=True).stdout)
        prim = next(n for n in doc["nodes"] if n["role"] == "primary")
        other = next(n for n in doc["nodes"] if n["role"] != "primary")
        resumed = {}

        def fault():
            os.kill(prim["pid"], signal.SIGKILL if kind == "kill" else signal.SIGSTOP)

        def stop_wait(t0):
            if kind == "stop" and "cont" not in resumed and time.monotonic() - t0 > ttl + 3:
                os.kill(prim["pid"], signal.SIGCONT)
                resumed["cont"] = True
        dt = measure_failover(other["port"], "bench-key", fault, stop_wait)
        if kind == "stop" and "cont" not in resumed:
            os.kill(prim["pid"], signal.SIGCONT)
        return dt
    finally:
        subprocess.run(CLI + ["down", "--dir", d], capture_output=True, timeout=60)
        shutil.rmtree(d, ignore_errors=True)


# -- Redis Cluster

def redis_failover(kind, ttl):
    d = tempfile.mkdtemp(prefix="bench-rcluster-")
    base = free_port_run(6)
    bus = free_port_run(6)
    while bus < base + 6 and bus + 6 > base:
        bus = free_port_run(6)
    procs = []
    try:
        for i in range(6):
            port = base + i
            nd = os.path.join(d, str(port))
            os.makedirs(nd)
            procs.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-node-timeout", str(ttl * 1000),
                 "--cluster-config-file", os.path.join(nd, "nodes.conf"), "--dir", nd,
                 "--save", "", "--appendonly", "no", "--cluster-port", str(bus + i),
                 "--repl-diskless-sync-delay", "0"],
                stdout=open(os.path.join(nd, "log"), "ab"), stderr=subprocess.STDOUT))
        time.sleep(0.5)
        addrs = [f"127.0.0.1:{base + i}" for i in range(6)]
        subprocess.run(["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "1",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        import redis
        r = redis.Redis(port=base)
        for _ in range(200):
            if b"cluster_state:ok" in r.execute_command("CLUSTER", "INFO"):
                break
            time.sleep(0.1)
        slot = r.execute_command("CLUSTER", "KEYSLOT", "bench-key")
        owner = next(e for e in r.execute_command("CLUSTER", "SLOTS") if e[0] <= slot <= e[1])
        oport = owner[2][1]
        victim = procs[oport - base]
        start = base if oport != base else base + 1
        for i in range(6):     # every replica synced: else it may not fail over
            ri = redis.Redis(port=base + i)
            for _ in range(300):
                info = ri.info("replication")
                if info["role"] == "master" or info.get("master_link_status") == "up":
                    break
                time.sleep(0.1)
        time.sleep(ttl)       # let the gossip settle everywhere
        resumed = {}

        def fault():
            victim.send_signal(signal.SIGKILL if kind == "kill" else signal.SIGSTOP)

        def stop_wait(t0):
            if kind == "stop" and "cont" not in resumed and time.monotonic() - t0 > 3 * ttl + 3:
                victim.send_signal(signal.SIGCONT)
                resumed["cont"] = True
        dt = measure_failover(start, "bench-key", fault, stop_wait)
        if kind == "stop" and "cont" not in resumed:
            victim.send_signal(signal.SIGCONT)
        return dt
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait()
        shutil.rmtree(d, ignore_errors=True)


def kv_throughput(shards, n, pipeline=1):
    d = tempfile.mkdtemp(prefix="bench-cluster-")
    base = free_port_run(shards)
    try:
        subprocess.run(CLI + ["up", "--shards", str(shards), "--replicas", "0", "--port", str(base),
                              "--dir", d, "--capacity", "64MiB", "--detach"],
                       check=True, capture_output=True, timeout=120)
        # redis-benchmark --cluster refuses a one-node cluster: 1 shard is
        # benchmarked without --cluster (every slot is local to that node)
        cl = ["--cluster"] if shards > 1 else []
        r = subprocess.run(["redis-benchmark", *cl, "-p", str(base), "-t", "set,get",
                            "-n", str(n), "-c", "50", "-P", str(pipeline), "-q"],
                           capture_output=True, text=True, timeout=300)
        out = r.stdout + r.stderr
        res = {}
        for name in ("SET", "GET"):
            m = re.findall(rf"{name}: ([\d.]+) requests per second", out)
            res[name] = float(m[-1]) if m else None
        res["errors"] = out.count("Error") + out.count("MOVED")
        return res
    finally:
        subprocess.run(CLI + ["down", "--dir", d], capture_output=True, timeout=60)
        shutil.rmtree(d, ignore_errors=True)


def plain_throughput(n, pipeline=1):
    from kvstore.server.spawn import start_server
    srv = start_server("--capacity", "64MiB")
    try:
        r = subprocess.run(["redis-benchmark", "-p", str(srv.port), "-t", "set,get", "-n", str(n),
                            "-c", "50", "-P", str(pipeline), "-q"], capture_output=True, text=True,
                           timeout=300)
        out = r.stdout + r.stderr
        res = {}
        for name in ("SET", "GET"):
            m = re.findall(rf"{name}: ([\d.]+) requests per second", out)
            res[name] = float(m[-1]) if m else None
        res["errors"] = out.count("Error")
        return res
    finally:
        srv.stop()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ttl", type=int, default=3)
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--quick", action="store_true", help="1 run, kill -9 only, n=5000")
    ap.add_argument("--no-redis", action="store_true")
    ap.add_argument("-P", dest="pipelines", default="1,16",
                    help="redis-benchmark -P values, comma-separated (default 1,16)")
    ap.add_argument("--throughput-only", action="store_true",
                    help="skip the failover runs: redis-benchmark rows only")
    a = ap.parse_args(argv)
    if a.quick:
        a.runs, a.n = 1, 5000
    print(header("Cluster failover and throughput", "bench.cluster"))
    rows = []
    kinds = [] if a.throughput_only else ["kill"] if a.quick else ["kill", "stop"]
    for kind in kinds:
        for who, fn in (("kvstore", kv_failover), ("redis", redis_failover)):
            if who == "redis" and (a.no_redis or shutil.which("redis-server") is None):
                continue
            xs = [fn(kind, a.ttl) for _ in range(a.runs)]
            label = "kill -9" if kind == "kill" else "SIGSTOP"
            rows.append([who, label, a.runs, f"{median(xs):.2f}", f"{max(xs):.2f}",
                         " ".join(f"{x:.2f}" for x in xs)])
            print(f"{who} {label}: {xs}", file=sys.stderr, flush=True)
    if rows:
        print(f"\nFailover: seconds from the fault to writes resuming (lease TTL / "
              f"cluster-node-timeout = {a.ttl} s)\n")
        print(table(["server", "fault", "runs", "p50 s", "max s", "all"], rows))
    trows = []
    for pl in (int(x) for x in a.pipelines.split(",")):
        p = plain_throughput(a.n * pl, pl)
        trows.append(["plain server", pl, p["SET"], p["GET"], p["errors"]])
        for shards in (1, 2):
            r = kv_throughput(shards, a.n * pl, pl)
            trows.append([shards, pl, r["SET"], r["GET"], r["errors"]])
    print(f"\nredis-benchmark --cluster -t set,get -n {a.n}xP -c 50 -P P (kvstore, no replicas)\n")
    print(table(["shards", "P", "SET/s", "GET/s", "errors"], trows))
    print(f"\n{command_line('bench.cluster')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
