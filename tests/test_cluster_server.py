"""Cluster mode end to end: real kvstore-server processes, a real etcd, loopback only.

Clusters are started the way a user starts one, with ``kvstore-cluster up
--detach`` (its own etcd under the test's directory) and stopped with
``kvstore-cluster down``. What is checked:

* Redis Cluster clients work unmodified: redis-py's ``RedisCluster``,
  ``redis-cli -c``, ``redis-benchmark --cluster`` (0 errors);
* the CLUSTER commands' reply shapes, MOVED / CROSSSLOT / READONLY /
  ASKING, and the native ``cluster`` op and ``MOVED`` error;
* ``kill -9`` of a primary: writes to its slots resume (the time is
  printed, not asserted: speed lives in bench/), with ``--min-replica-acks
  1`` every acknowledged write is present afterwards, and the old primary,
  restarted with its node id, rejoins as a replica of the new one;
* fencing: a primary SIGSTOPped past its lease answers the write queued
  meanwhile with -CLUSTERDOWN; a write held for --min-replica-acks whose ack
  arrives after the primary fenced is answered -CLUSTERDOWN, never OK;
* a bounded history check (writers with unique values, readers, kill -9 and
  SIGSTOP): acknowledged writes survive, no read returns an unwritten value;
* bad input at start: a cluster name that does not exist, etcd down, a stale
  slot-map epoch.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from kvstore.server.cluster.slots import SLOTS, key_slot
from kvstore.server.spawn import free_port_run
from etcdutil import needs_etcd
from serverutil import check_history, store_available, wait_for

redis = pytest.importorskip("redis")
import redis.cluster  # noqa: E402

pytestmark = [needs_etcd,
              pytest.mark.skipif(not store_available(), reason="C engine not built")]

CLI = [sys.executable, "-m", "kvstore.server.cluster.cli"]




class Cluster:
    def __init__(self, d, shards, replicas, *flags):
        self.dir = str(d)
        self.base = free_port_run(shards * (replicas + 1))
        r = subprocess.run(CLI + ["up", "--shards", str(shards), "--replicas", str(replicas),
                                  "--port", str(self.base), "--dir", self.dir, "--detach",
                                  "--capacity", "32MiB", *flags],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise AssertionError(f"kvstore-cluster up failed: {r.stdout}\n{r.stderr}\n"
                                 f"{self.logs()}")
        self.state = json.load(open(os.path.join(self.dir, "cluster.json")))
        self.extra = []         # processes a test restarted

    def logs(self, n=3000):
        out = []
        if os.path.isdir(self.dir):
            for f in sorted(os.listdir(self.dir)):
                if f.endswith(".log"):
                    with open(os.path.join(self.dir, f), "rb") as fh:
                        out.append(f"--- {f}\n" + fh.read()[-n:].decode("utf-8", "replace"))
        return "\n".join(out)

    def status(self):
        r = subprocess.run(CLI + ["status", "--dir", self.dir, "--json"], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode in (0, 3), r.stderr
        return json.loads(r.stdout)

    def wait_placed(self, timeout=30):
        """Every node in the map and alive, every slot served."""
        def ok():
            doc = self.status()
            return doc["healthy"] and len(doc["nodes"]) == len(self.state["nodes"]) and \
                all(n["alive"] and n["role"] != "none" for n in doc["nodes"]) and doc
        return wait_for(ok, timeout, 0.2, "every node placed")

    def primary_of(self, slot, doc=None):
        doc = doc or self.status()
        for n in doc["nodes"]:
            if n["role"] == "primary" and any(lo <= slot <= hi for lo, hi in n["slots"]):
                return n
        return None

    def down(self):
        subprocess.run(CLI + ["down", "--dir", self.dir], capture_output=True, timeout=60)
        for p in self.extra:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


@pytest.fixture(scope="module")
def c3x2(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("c3x2"), 3, 2)
    try:
        c.wait_placed()
        yield c
    finally:
        c.down()


def _rc(c):
    return redis.cluster.RedisCluster(host="127.0.0.1", port=c.base, socket_timeout=5)


# -- clients of Redis Cluster, unmodified

def test_status_json_shape(c3x2):
    doc = c3x2.status()
    assert doc["healthy"] is True
    assert len(doc["nodes"]) == 9
    prim = [n for n in doc["nodes"] if n["role"] == "primary"]
    assert len(prim) == 3 and sum(hi - lo + 1 for n in prim for lo, hi in n["slots"]) == SLOTS
    for n in doc["nodes"]:
        assert set(n) >= {"id", "host", "port", "pid", "role", "shard", "slots", "offset"}
        assert n["pid"] > 0 and len(n["id"]) == 40
        if n["role"] == "replica":
            assert n["slots"] == []
    assert sorted(n["port"] for n in doc["nodes"]) == list(range(c3x2.base, c3x2.base + 9))


def test_redis_py_cluster_get_set_across_slots(c3x2):
    rc = _rc(c3x2)
    keys = [f"user:{i}".encode() for i in range(400)]
    slots = {key_slot(k) for k in keys}
    assert len(slots) > 300
    for i, k in enumerate(keys):
        assert rc.set(k, b"v%d" % i)
    for i, k in enumerate(keys):
        assert rc.get(k) == b"v%d" % i
    assert rc.mget_nonatomic(keys[:50]) == [b"v%d" % i for i in range(50)]
    # hash tags keep a multi-key command in one slot
    assert rc.mset({"{t}a": "1", "{t}b": "2"})
    assert rc.mget("{t}a", "{t}b") == [b"1", b"2"]
    rc.close()


def test_redis_cli_follows_moved(c3x2):
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.skip("redis-cli not installed")
    for i in range(20):
        port = c3x2.base + (i % 3)
        r = subprocess.run([cli, "-c", "-p", str(port), "set", f"cli{i}", f"val{i}"],
                           capture_output=True, text=True, timeout=10)
        assert r.stdout.strip() == "OK", r.stdout + r.stderr
    for i in range(20):
        r = subprocess.run([cli, "-c", "-p", str(c3x2.base + 1), "get", f"cli{i}"],
                           capture_output=True, text=True, timeout=10)
        assert r.stdout.strip() == f"val{i}"


def test_redis_benchmark_cluster_no_errors(c3x2):
    bench = shutil.which("redis-benchmark")
    if bench is None:
        pytest.skip("redis-benchmark not installed")
    r = subprocess.run([bench, "--cluster", "-p", str(c3x2.base), "-t", "set,get", "-n", "20000",
                        "-c", "20", "-q"], capture_output=True, text=True, timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "SET:" in out and "GET:" in out, out
    for bad in ("Error", "ERR", "MOVED", "CLUSTERDOWN", "CROSSSLOT"):
        assert bad not in out, out


# -- the commands themselves

def test_cluster_commands_reply_formats(c3x2):
    doc = c3x2.status()
    ids = {n["id"]: n for n in doc["nodes"]}
    r = redis.Redis(port=c3x2.base)
    slots = r.execute_command("CLUSTER", "SLOTS")
    assert sum(e[1] - e[0] + 1 for e in slots) == SLOTS
    for e in slots:
        lo, hi, prim, *reps = e
        p = ids[prim[2].decode()]
        assert p["role"] == "primary" and [lo, hi] in p["slots"] and prim[1] == p["port"]
        assert len(reps) == 2 and all(ids[x[2].decode()]["shard"] == p["shard"] for x in reps)
    myid = r.execute_command("CLUSTER", "MYID").decode()
    assert ids[myid]["port"] == c3x2.base
    lines = r.execute_command("CLUSTER", "NODES").decode().splitlines()
    assert len(lines) == 9
    for ln in lines:
        f = ln.split()
        assert f[0] in ids and f[1] == f"127.0.0.1:{ids[f[0]]['port']}@0"
        assert ("myself" in f[2]) == (f[0] == myid)
        if ids[f[0]]["role"] == "primary":
            assert "master" in f[2] and f[3] == "-" and len(f) > 8
        else:
            assert "slave" in f[2] and ids[f[3]]["role"] == "primary" and len(f) == 8
    info = r.execute_command("CLUSTER", "INFO").decode()
    assert "cluster_state:ok" in info and "cluster_slots_assigned:16384" in info
    shards = r.execute_command("CLUSTER", "SHARDS")
    assert len(shards) == 3
    for k in (b"foo", b"{user1}.a", b"a{b", b""):
        assert r.execute_command("CLUSTER", "KEYSLOT", k) == key_slot(k)
    # keys of one slot, on its primary
    rc = _rc(c3x2)
    for i in range(5):
        rc.set(b"{slotted}%d" % i, b"x")
    slot = key_slot(b"slotted")
    owner = c3x2.primary_of(slot, doc)
    o = redis.Redis(port=owner["port"])
    assert o.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 5
    got = o.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 3)
    assert len(got) == 3 and all(g.startswith(b"{slotted}") for g in got)
    with pytest.raises(redis.ResponseError, match="out of range slot"):
        o.execute_command("CLUSTER", "COUNTKEYSINSLOT", 16384)
    rc.close()


def test_moved_crossslot_readonly_asking(c3x2):
    doc = c3x2.status()
    key = b"route-me"
    slot = key_slot(key)
    owner = c3x2.primary_of(slot, doc)
    other = next(n for n in doc["nodes"] if n["role"] == "primary" and n["id"] != owner["id"])
    replica = next(n for n in doc["nodes"] if n["role"] == "replica" and n["shard"] == owner["shard"])
    redis.Redis(port=owner["port"]).set(key, b"here")
    assert _raw(other["port"], b"GET", key) == f"-MOVED {slot} 127.0.0.1:{owner['port']}".encode()
    assert _raw(owner["port"], b"MGET", b"a", b"b") == \
        b"-CROSSSLOT Keys in request don't hash to the same slot"
    assert _raw(replica["port"], b"GET", key).startswith(b"-MOVED %d " % slot)
    rep = redis.Redis(port=replica["port"])
    assert rep.execute_command("READONLY") in (True, b"OK")
    wait_for(lambda: rep.get(key) == b"here", 10, 0.05, "replica read after READONLY")
    with pytest.raises(redis.exceptions.MovedError):
        rep.set(key, b"no")        # READONLY reads only
    assert rep.execute_command("READWRITE") in (True, b"OK")
    with pytest.raises(redis.exceptions.MovedError):
        rep.get(key)
    # ASKING is one-shot and only opens importing slots: here nothing imports
    assert _raw(other["port"], b"ASKING", b"GET", key, pipeline=True).endswith(
        b"-MOVED %d 127.0.0.1:%d" % (slot, owner["port"]))


def _raw(port, *words, pipeline=False):
    """Send RESP commands (``pipeline``: ASKING then one command), return the reply bytes."""
    if pipeline:
        cmds = [[words[0]], list(words[1:])]
    else:
        cmds = [list(words)]
    data = b"".join(b"*%d\r\n" % len(c) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in c)
                    for c in cmds)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        buf = b""
        while buf.count(b"\r\n") < len(cmds):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return buf.rstrip(b"\r\n").replace(b"\r\n", b"|")


def test_native_cluster_op_and_moved_error(c3x2):
    from kvstore.client._commands import Command
    from kvstore.client._sync import Connection
    doc = c3x2.status()
    key = b"native-key"
    slot = key_slot(key)
    owner = c3x2.primary_of(slot, doc)
    other = next(n for n in doc["nodes"] if n["role"] == "primary" and n["id"] != owner["id"])
    conn = Connection("127.0.0.1", other["port"])
    conn.connect()
    try:
        status, res = conn.call(Command("get", [key]))
        assert status == 1
        assert res == ["MOVED", f"{slot} 127.0.0.1:{owner['port']}",
                       {"slot": slot, "host": "127.0.0.1", "port": owner["port"]}]
        status, res = conn.call(Command("mget", [[b"a", b"b"]]))
        assert status == 1 and res[0] == "CROSSSLOT"
        # every keyed native op is routed, not only get/put
        for op, args in (("incr", [key]), ("incrbyfloat", [key, 1.5]), ("persist", [key]),
                         ("inject", ["ao", "key", key])):
            status, res = conn.call(Command(op, args))
            assert status == 1 and res[0] == "MOVED", (op, res)
        assert conn.call(Command("cluster", ["keyslot", key])) == (0, slot)
        assert conn.call(Command("cluster", ["myid"])) == (0, other["id"])
        status, nodes = conn.call(Command("cluster", ["nodes"]))
        assert status == 0 and len(nodes) == 9
        assert sum(1 for n in nodes if n["myself"]) == 1
        status, sl = conn.call(Command("cluster", ["slots"]))
        assert status == 0 and sum(e[1] - e[0] + 1 for e in sl) == SLOTS
        status, info = conn.call(Command("cluster", ["info"]))
        assert info["cluster_state"] == "ok"
    finally:
        conn.close()
    conn = Connection("127.0.0.1", owner["port"])
    conn.connect()
    try:
        status, res = conn.call(Command("put", [key, b"v"]))
        assert status == 0
        assert conn.call(Command("get", [key])) == (0, b"v")
    finally:
        conn.close()


# -- failover

def _writer(rc_port, keys, acked, stop, errors):
    """Write unique values round-robin; record (key, value) only when acknowledged."""
    rc = redis.cluster.RedisCluster(host="127.0.0.1", port=rc_port, socket_timeout=2)
    i = 0
    while not stop.is_set():
        k = keys[i % len(keys)]
        v = b"%d" % i
        try:
            if rc.set(k, v):
                acked.append((k, v, time.monotonic()))
        except Exception as e:  # noqa: BLE001 - failures during the failover are expected
            errors.append((time.monotonic(), f"{type(e).__name__}: {e}"))
            time.sleep(0.02)
            try:
                rc.close()
            except Exception:  # noqa: BLE001
                pass
            try:
                rc = redis.cluster.RedisCluster(host="127.0.0.1", port=rc_port, socket_timeout=2)
            except Exception:  # noqa: BLE001
                time.sleep(0.1)
        i += 1
    rc.close()


def test_kill9_failover_with_acks_keeps_every_acked_write(tmp_path):
    # one shard, two replicas: after the failover the new primary still has a
    # replica to ack its writes (with one replica it would refuse: NOREPLICAS)
    c = Cluster(tmp_path / "fo", 1, 2, "--min-replica-acks", "1")
    try:
        doc = c.wait_placed()
        victim = c.primary_of(0, doc)
        survivor_port = next(n["port"] for n in doc["nodes"] if n["id"] != victim["id"])
        keys = [k for k in (b"fo%d" % i for i in range(3000))
                if any(lo <= key_slot(k) <= hi for lo, hi in victim["slots"])][:50]
        acked, errors, stop = [], [], threading.Event()
        t = threading.Thread(target=_writer, args=(survivor_port, keys, acked, stop, errors))
        t.start()
        wait_for(lambda: len(acked) > 200, 30, 0.05, "writes before the fault")
        os.kill(victim["pid"], signal.SIGKILL)
        t_kill = time.monotonic()
        n_before = len(acked)
        wait_for(lambda: any(a[2] > t_kill for a in acked[n_before:]) and
                 len(acked) > n_before + 50, 30, 0.05, "writes to resume after kill -9")
        errs = [t for t, _ in errors if t > t_kill]
        last_err = max(errs) if errs else t_kill
        resumed = next(a[2] for a in acked[n_before:] if a[2] > last_err) - t_kill
        stop.set()
        t.join(30)
        print(f"\nwrites to the killed primary's slots resumed after {resumed:.2f} s "
              f"({len(errors)} failed attempts)")
        # every acknowledged write is there: the last acked value of each key
        last = {}
        for k, v, _ in acked:
            last[k] = v
        rc = redis.cluster.RedisCluster(host="127.0.0.1", port=survivor_port, socket_timeout=5)
        lost = [(k, v, rc.get(k)) for k, v in last.items() if rc.get(k) != v]
        assert not lost, f"acknowledged writes missing after failover: {lost[:5]}"
        doc2 = c.status()
        new = c.primary_of(0, doc2)
        assert new["id"] != victim["id"] and new["shard"] == victim["shard"]
        assert doc2["epoch"] > doc["epoch"]

        # the old primary, restarted with its identity, rejoins as a replica
        node = next(n for n in c.state["nodes"] if n["id"] == victim["id"])
        log = open(os.path.join(c.dir, "restart.log"), "ab")
        p = subprocess.Popen([sys.executable, "-m", "kvstore.server", *node["argv"]],
                             stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        c.extra.append(p)
        old = redis.Redis(port=node["port"], socket_timeout=5)

        def rejoined():
            try:
                info = old.info("replication")
            except redis.ConnectionError:
                return False
            return info.get("role") == "slave" and info.get("master_port") == new["port"] \
                and info.get("master_link_status") == "up"
        wait_for(rejoined, 30, 0.1, "old primary to rejoin as a replica")
        old.execute_command("READONLY")
        k, v = next(iter(last.items()))
        wait_for(lambda: old.get(k) == v, 10, 0.05, "the rejoined replica to hold the data")
        with pytest.raises(redis.exceptions.MovedError):
            old.set(keys[0], b"not here")
        rc.close()
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.down()


# -- bad input

def test_wrong_cluster_name_and_etcd_down_are_clear_errors(tmp_path):
    from etcdutil import EtcdProc, free_port
    e = EtcdProc.start_new()
    try:
        import asyncio

        from kvstore.server.cluster import EtcdClient, Topology
        asyncio.run(Topology(EtcdClient(e.url), "real").create(1, 0))
        host = e.url.split("://")[1]
        r = subprocess.run([sys.executable, "-m", "kvstore.server", "--port", "0",
                            "--cluster", f"etcd://{host}/nosuch", "--capacity", "16MiB"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        assert "no cluster named 'nosuch'" in r.stderr and "'real'" in r.stderr, r.stderr
    finally:
        e.stop()
        e.cleanup()
    dead = free_port()
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "kvstore.server", "--port", "0",
                        "--cluster", f"etcd://127.0.0.1:{dead}/x", "--cluster-start-timeout", "1.5",
                        "--capacity", "16MiB"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "etcd" in r.stderr.lower() and f"127.0.0.1:{dead}" in r.stderr, r.stderr
    assert "etcd_unreachable" in r.stderr          # one log line per retry
    assert time.monotonic() - t0 < 30
    for bad in (["--cluster", "http://127.0.0.1:1/x"], ["--cluster", "etcd://127.0.0.1:1"],
                ["--cluster", "etcd://127.0.0.1:1/x", "--replica-of", "127.0.0.1:5"]):
        r = subprocess.run([sys.executable, "-m", "kvstore.server", "--port", "0", *bad],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "kvstore-server:" in r.stderr, (bad, r.stderr)


def test_stale_epoch_write_refused_and_cluster_keeps_its_map(c3x2):
    import asyncio

    from kvstore.server.cluster import EtcdClient, StaleEpochError, Topology

    async def go():
        topo = Topology(EtcdClient(c3x2.state["etcd"]), c3x2.state["name"])
        m, rev = await topo.load_map()
        old = m.copy()
        old.epoch = m.epoch         # a writer that read the map one epoch ago
        with pytest.raises(StaleEpochError):
            await topo.cas_map(old, rev - 1, m.epoch - 1)
        m2, rev2 = await topo.load_map()
        assert (m2.epoch, rev2) == (m.epoch, rev)
        return m.epoch
    epoch = asyncio.run(go())
    info = redis.Redis(port=c3x2.base).execute_command("CLUSTER", "INFO").decode()
    assert f"cluster_current_epoch:{epoch}" in info


def test_sigstop_primary_is_fenced_and_manual_failover(tmp_path):
    """A primary paused longer than its lease never acknowledges the write
    that waited in its socket meanwhile; the shard moved on without it.
    Then ``kvstore-cluster failover`` hands the shard back safely."""
    c = Cluster(tmp_path / "stop", 1, 2)
    try:
        doc = c.wait_placed()
        victim = c.primary_of(0, doc)
        other = next(n for n in doc["nodes"] if n["id"] != victim["id"])
        key = b"paused-key"
        vr = redis.Redis(port=victim["port"])
        assert vr.set(key, b"before")
        assert vr.execute_command("WAIT", 2, 10000) == 2     # replication is asynchronous here
        s = socket.create_connection(("127.0.0.1", victim["port"]), timeout=30)
        os.kill(victim["pid"], signal.SIGSTOP)
        try:
            s.sendall(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$6\r\nduring\r\n" % (len(key), key))
            wait_for(lambda: c.primary_of(0)["id"] != victim["id"], 30, 0.2,
                     "failover while the primary is stopped")
        finally:
            os.kill(victim["pid"], signal.SIGCONT)
        reply = s.recv(4096)
        s.close()
        assert reply.startswith((b"-CLUSTERDOWN", b"-MOVED")), reply
        new = c.primary_of(0)
        assert redis.Redis(port=new["port"]).get(key) == b"before"
        rejoin = redis.Redis(port=victim["port"])
        wait_for(lambda: rejoin.info("replication").get("master_port") == new["port"], 30, 0.1,
                 "the paused primary to follow the new one")

        # safe manual failover back to the old primary, now a caught-up replica
        r = subprocess.run(CLI + ["failover", "--dir", c.dir, "--shard", "0", "--to", victim["id"]],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "done" in r.stdout, r.stdout + r.stderr
        wait_for(lambda: c.primary_of(0)["id"] == victim["id"], 30, 0.2, "handover")
        rc = redis.cluster.RedisCluster(host="127.0.0.1", port=other["port"], socket_timeout=5)
        wait_for(lambda: _try_set(rc, key, b"after"), 30, 0.1, "writes after the handover")
        assert rc.get(key) == b"after"
        rc.close()
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.down()


def _try_set(rc, k, v):
    try:
        return rc.set(k, v)
    except Exception:  # noqa: BLE001 - the handover may still be settling
        return False


# -- history checker (Jepsen-style, bounded: two faults, ~20 s)

def test_history_checker_kill9_and_sigstop(tmp_path):
    """Writers (one per key, unique values), readers, a kill -9 and a SIGSTOP
    longer than the lease of whichever node is primary. Afterwards: every
    acknowledged write is present or superseded by a later attempted write of
    the same writer, and no read returned a value nobody tried to write."""
    c = Cluster(tmp_path / "hist", 1, 2, "--min-replica-acks", "1")
    keys = [b"h:%d" % i for i in range(4)]
    attempts = {k: [] for k in keys}       # per key, in order: [value, "ok"|"err"]
    reads = []                             # (key, value)
    stop = threading.Event()
    start_port = c.base

    def client():
        return redis.cluster.RedisCluster(host="127.0.0.1", port=start_port, socket_timeout=2)

    def writer(k):
        rc, i = None, 0
        while not stop.is_set():
            i += 1
            v = b"%s=%d" % (k, i)
            rec = [v, "err"]
            attempts[k].append(rec)
            try:
                rc = rc or client()
                if rc.set(k, v):
                    rec[1] = "ok"
            except Exception:  # noqa: BLE001 - indeterminate: may or may not be applied
                rc = None
                time.sleep(0.05)

    def reader():
        rc = None
        while not stop.is_set():
            for k in keys:
                try:
                    rc = rc or client()
                    reads.append((k, rc.get(k)))
                except Exception:  # noqa: BLE001
                    rc = None
                    time.sleep(0.05)

    try:
        c.wait_placed()
        start_port = next(n["port"] for n in c.status()["nodes"] if n["role"] == "replica")
        threads = [threading.Thread(target=writer, args=(k,)) for k in keys] + \
                  [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        victim = c.primary_of(0)
        os.kill(victim["pid"], signal.SIGKILL)
        wait_for(lambda: (c.primary_of(0) or victim)["id"] != victim["id"], 30, 0.2, "failover 1")
        time.sleep(1.5)
        paused = c.primary_of(0)
        os.kill(paused["pid"], signal.SIGSTOP)
        try:
            wait_for(lambda: (c.primary_of(0) or paused)["id"] != paused["id"], 30, 0.2,
                     "failover 2")
        finally:
            os.kill(paused["pid"], signal.SIGCONT)
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join(30)
        rc = client()
        final = {k: rc.get(k) for k in keys}
        rc.close()
        n_ok = check_history(attempts, reads, final)
        assert n_ok > 100 and len(reads) > 100, (n_ok, len(reads))
    except BaseException:
        stop.set()
        print(c.logs())
        raise
    finally:
        stop.set()
        c.down()


def test_held_ack_released_after_fencing_is_refused(tmp_path):
    """--min-replica-acks: a write whose replica ack only arrives after the
    primary lost its lease deadline is answered -CLUSTERDOWN, never OK."""
    import asyncio

    from etcdutil import EtcdProc

    from kvstore.server.cluster import EtcdClient, Topology
    from serverutil import start_server
    e = EtcdProc.start_new()
    procs = []
    try:
        asyncio.run(Topology(EtcdClient(e.url), "acks").create(1, 1))
        url = f"etcd://{e.url.split('://')[1]}/acks"
        common = ["--cluster", url, "--capacity", "16MiB", "--min-replica-acks", "1",
                  "--min-replica-timeout", "20"]
        p = start_server(*common)
        procs.append(p)
        pr = redis.Redis(port=p.port, socket_timeout=30)
        wait_for(lambda: b"kvstore_role:primary" in pr.execute_command("CLUSTER", "INFO"), 30,
                 0.1, "the first node to be primary")
        r = start_server(*common)
        procs.append(r)
        wait_for(lambda: pr.info("replication").get("connected_slaves") == 1 and
                 b"cluster_state:ok" in pr.execute_command("CLUSTER", "INFO"), 30, 0.1,
                 "the replica to sync")
        assert pr.set(b"k", b"acked")            # the normal path: acked by the replica
        os.kill(r.pid, signal.SIGSTOP)           # no acks from now on
        s = socket.create_connection(("127.0.0.1", p.port), timeout=30)
        try:
            s.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\nheld\r\n")
            time.sleep(0.3)
            e.pause()                            # the primary cannot renew its lease
            try:
                wait_for(lambda: b"kvstore_fenced:1" in
                         redis.Redis(port=p.port, socket_timeout=5).execute_command("CLUSTER", "INFO"),
                         20, 0.1, "the primary to fence itself")
            finally:
                os.kill(r.pid, signal.SIGCONT)   # the replica acks now, after the deadline
            reply = s.recv(4096)
        finally:
            os.kill(r.pid, signal.SIGCONT)
            e.resume()
            s.close()
        assert reply.startswith(b"-CLUSTERDOWN"), reply
        assert b"fenced before the write was acknowledged" in reply
    finally:
        for x in procs:
            x.stop()
        e.stop()
        e.cleanup()


def test_add_node_and_remove_node(tmp_path):
    c = Cluster(tmp_path / "addrm", 1, 1)
    try:
        c.wait_placed()
        r = subprocess.run(CLI + ["add-node", "--dir", c.dir], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and "replica of shard 0" in r.stdout, r.stdout + r.stderr
        doc = c.status()
        assert len(doc["nodes"]) == 3 and doc["healthy"]
        new = max(doc["nodes"], key=lambda n: n["port"])
        assert new["role"] == "replica" and new["port"] == c.base + 2
        prim = c.primary_of(0, doc)
        r = subprocess.run(CLI + ["remove-node", "--dir", c.dir, prim["id"]], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode != 0 and "fail it over first" in r.stderr
        r = subprocess.run(CLI + ["remove-node", "--dir", c.dir, str(new["port"])],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "done" in r.stdout, r.stdout + r.stderr
        doc = c.status()
        assert [n["id"] for n in doc["nodes"] if n["id"] == new["id"]] == []
        assert len(doc["nodes"]) == 2 and doc["healthy"]
        r = subprocess.run(CLI + ["reshard", "--dir", c.dir], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 1 and "reshard wants --slots" in r.stderr, r.stdout + r.stderr
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.down()
