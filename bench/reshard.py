"""Online resharding: how fast keys move, and what a client sees meanwhile.

    python -m bench.reshard [--quick] [--keys N] [--slots K] [--replicas R] [--value-size B]

Starts a local cluster of 2 shards (``kvstore-cluster up --shards 2
--replicas R --detach``, its own etcd), loads ``--keys`` keys (values of
``--value-size`` bytes) through redis-py ``RedisCluster``, and runs a
checked load next to it: ``--clients`` threads, each its own
``RedisCluster`` (which follows ASK and MOVED as Redis Cluster clients do),
alternating a GET of a random loaded key (must read its loaded value) and a
SET of one of its own keys (unique values) followed, every 10th time, by a
GET of it (must read the value last acknowledged, or one whose SET failed
after it). After a baseline period it runs ``kvstore-cluster reshard
--slots K --from A --to B`` and times it, then keeps the load on for a
while.

Reported: slots and keys moved (keys of the loaded set in the moved slots,
and the source's ``kvstore_migrate_keys_moved``), seconds, keys/s, slots/s;
client operations per second before, during and after the move, the
lowest 200 ms window during it (the dip), errors the client saw (after
redis-py's own retries) and wrong answers; afterwards every loaded key is
read back through a fresh client (missing or wrong ones are counted) and
``CLUSTER COUNTKEYSINSLOT`` of the moved slots is 0 on the source. A run
with wrong answers, lost keys or a failed reshard exits 1.

The load shares the 2 cores with the servers, etcd and the mover, so the
figures say how the move competes with clients on one small machine, not
what a cluster of machines does.
"""

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from kvstore.server.cluster.slots import key_slot
from kvstore.server.spawn import free_port_run
from bench._common import check, command_line, header, table

CLI = [sys.executable, "-m", "kvstore.server.cluster.cli"]
WINDOW = 0.2


class Load(threading.Thread):
    """One checked client (see the module docstring)."""

    def __init__(self, port, keys, vals, idx, seed):
        super().__init__(daemon=True)
        self.port, self.keys, self.vals, self.idx = port, keys, vals, idx
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.times = []            # monotonic time of every completed operation
        self.errors = []           # (time, text) of every error the client saw
        self.wrong = []
        self.allowed = {}          # own key -> values it may hold

    def run(self):
        import redis.cluster
        rc = redis.cluster.RedisCluster(host="127.0.0.1", port=self.port, socket_timeout=5)
        own = [f"load{self.idx}-{i}" for i in range(200)]
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                k = self.rng.choice(self.keys)
                got = rc.get(k)
                self.times.append(time.monotonic())
                if got != self.vals[k]:
                    self.wrong.append((k, got, self.vals[k]))
                ok = own[n % len(own)]
                v = f"{self.idx}-{n}".encode()
                prev = self.allowed.get(ok, {None})
                self.allowed[ok] = prev | {v}      # in doubt until acknowledged
                rc.set(ok, v)
                self.allowed[ok] = {v}
                self.times.append(time.monotonic())
                if n % 10 == 0:
                    got = rc.get(ok)
                    self.times.append(time.monotonic())
                    if got not in self.allowed[ok]:
                        self.wrong.append((ok, got, self.allowed[ok]))
            except Exception as e:  # noqa: BLE001 - counted: a client-visible error
                self.errors.append((time.monotonic(), f"{type(e).__name__}: {e}"))
                time.sleep(0.01)
                try:
                    rc.close()
                except Exception:  # noqa: BLE001
                    pass
                rc = redis.cluster.RedisCluster(host="127.0.0.1", port=self.port, socket_timeout=5)
        rc.close()


def rate(times, t0, t1):
    n = sum(1 for t in times if t0 <= t < t1)
    return n / (t1 - t0) if t1 > t0 else 0.0


def min_window(times, t0, t1):
    """Lowest operations/s over any WINDOW-second window in [t0, t1)."""
    if t1 - t0 < WINDOW:
        return rate(times, t0, t1)
    ts = sorted(t for t in times if t0 <= t < t1)
    best = None
    start = t0
    j = 0
    i = 0
    while start + WINDOW <= t1:
        while i < len(ts) and ts[i] < start:
            i += 1
        j = max(j, i)
        while j < len(ts) and ts[j] < start + WINDOW:
            j += 1
        r = (j - i) / WINDOW
        best = r if best is None else min(best, r)
        start += WINDOW / 4
    return best


def cluster_info(port):
    import redis
    raw = redis.Redis(port=port, socket_timeout=5).execute_command("CLUSTER", "INFO")
    raw = raw.decode() if isinstance(raw, bytes) else raw
    return dict(line.split(":", 1) for line in raw.split("\r\n") if ":" in line)


def run(a):
    import redis
    import redis.cluster
    d = tempfile.mkdtemp(prefix="bench-reshard-")
    nodes = 2 * (a.replicas + 1)
    base = free_port_run(nodes)
    problems = []
    try:
        subprocess.run(CLI + ["up", "--shards", "2", "--replicas", str(a.replicas), "--port",
                              str(base), "--dir", d, "--capacity", a.capacity, "--detach"],
                       check=True, capture_output=True, timeout=120)
        doc = json.loads(subprocess.run(CLI + ["status", "--dir", d, "--json"],
                                        capture_output=True, text=True, timeout=30).stdout)
        prims = sorted((n for n in doc["nodes"] if n["role"] == "primary"),
                       key=lambda n: n["shard"])
        src, dst = prims
        src_slots = sorted(s for lo, hi in src["slots"] for s in range(lo, hi + 1))
        move = set(src_slots[-a.slots:])

        rc = redis.cluster.RedisCluster(host="127.0.0.1", port=base, socket_timeout=10)
        keys = [f"key:{i}" for i in range(a.keys)]
        pad = b"x" * max(0, a.value_size - 12)
        vals = {k: (f"{i:011d}-".encode() + pad)[:a.value_size] for i, k in enumerate(keys)}
        t_load = time.monotonic()
        for i in range(0, len(keys), 1000):
            p = rc.pipeline()
            for k in keys[i:i + 1000]:
                p.set(k, vals[k])
            p.execute()
        t_load = time.monotonic() - t_load
        in_move = [k for k in keys if key_slot(k.encode()) in move]
        print(f"loaded {len(keys)} keys in {t_load:.1f} s; {len(in_move)} of them in the "
              f"{len(move)} slots to move", file=sys.stderr, flush=True)

        loads = [Load(base, keys, vals, i, 100 + i) for i in range(a.clients)]
        for ld in loads:
            ld.start()
        time.sleep(a.settle)
        t_before = time.monotonic()
        time.sleep(a.baseline)
        t0 = time.monotonic()
        r = subprocess.run(CLI + ["reshard", "--dir", d, "--slots", str(len(move)), "--from",
                                  str(src["shard"]), "--to", str(dst["shard"]),
                                  "--timeout", "60"],
                           capture_output=True, text=True, timeout=600)
        t1 = time.monotonic()
        check(r.returncode == 0 and "reshard done" in r.stdout,
              f"reshard failed: {r.stdout} {r.stderr}", problems)
        time.sleep(a.baseline)
        t_after = time.monotonic()
        for ld in loads:
            ld.stop.set()
        for ld in loads:
            ld.join(30)

        moved_reported = int(cluster_info(src["port"]).get("kvstore_migrate_keys_moved", 0))
        times = [t for ld in loads for t in ld.times]
        errors = [e for ld in loads for e in ld.errors]
        wrong = [w for ld in loads for w in ld.wrong]

        # afterwards: every loaded key reads back, through a fresh client
        rc2 = redis.cluster.RedisCluster(host="127.0.0.1", port=base, socket_timeout=10)
        missing = bad = 0
        for i in range(0, len(keys), 1000):
            chunk = keys[i:i + 1000]
            got = rc2.mget_nonatomic(chunk)
            for k, v in zip(chunk, got):
                if v is None:
                    missing += 1
                elif v != vals[k]:
                    bad += 1
        s_src = redis.Redis(port=src["port"], socket_timeout=10)
        left = sum(s_src.execute_command("CLUSTER", "COUNTKEYSINSLOT", s) for s in sorted(move)[:64])
        check(not wrong, f"{len(wrong)} wrong answers during the move, e.g. {wrong[:3]}", problems)
        check(missing == 0 and bad == 0, f"afterwards {missing} keys missing, {bad} wrong", problems)
        check(left == 0, f"{left} keys still on the source in moved slots", problems)
        check(moved_reported >= len(in_move),
              f"the source reports {moved_reported} keys moved, {len(in_move)} expected", problems)
        dt = t1 - t0
        res = {
            "keys": len(keys), "slots": len(move), "keys_moved": len(in_move),
            "moved_reported": moved_reported, "seconds": dt,
            "keys_per_s": len(in_move) / dt if dt > 0 else 0.0,
            "slots_per_s": len(move) / dt if dt > 0 else 0.0,
            "ops_before": rate(times, t_before, t0), "ops_during": rate(times, t0, t1),
            "ops_after": rate(times, t1, t_after), "dip": min_window(times, t0, t1),
            "errors": len(errors), "wrong": len(wrong), "missing": missing, "bad": bad,
            "error_kinds": sorted({e[1].split(":")[0] for e in errors}),
        }
        return res, problems
    finally:
        subprocess.run(CLI + ["down", "--dir", d], capture_output=True, timeout=60)
        shutil.rmtree(d, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=200000)
    ap.add_argument("--slots", type=int, default=4096, help="slots to move (of the source's 8192)")
    ap.add_argument("--replicas", type=int, default=0)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--baseline", type=float, default=3.0,
                    help="seconds of load measured before and after the move")
    ap.add_argument("--settle", type=float, default=1.0)
    ap.add_argument("--capacity", default="256MiB")
    ap.add_argument("--quick", action="store_true", help="20000 keys, 1024 slots, 1 s baselines")
    a = ap.parse_args(argv)
    if a.quick:
        a.keys, a.slots, a.baseline, a.capacity = 20000, 1024, 1.5, "64MiB"
    print(header("Online resharding under a checked client load", "bench.reshard"))
    res, problems = run(a)
    print(f"\n2 shards, {a.replicas} replica(s) each; {res['keys']} keys of {a.value_size} B; "
          f"{a.clients} redis-py RedisCluster client thread(s), GET/SET checked\n")
    print(table(["slots", "keys moved", "seconds", "keys/s", "slots/s"],
                [[res["slots"], res["keys_moved"], f"{res['seconds']:.2f}",
                  f"{res['keys_per_s']:,.0f}", f"{res['slots_per_s']:,.0f}"]]))
    print()
    print(table(["client ops/s before", "during", "after", f"lowest {WINDOW * 1000:.0f} ms window",
                 "errors", "wrong answers", "missing after", "wrong after"],
                [[f"{res['ops_before']:,.0f}", f"{res['ops_during']:,.0f}",
                  f"{res['ops_after']:,.0f}", f"{res['dip']:,.0f}", res["errors"], res["wrong"],
                  res["missing"], res["bad"]]]))
    if res["error_kinds"]:
        print(f"\nerrors seen by the client: {', '.join(res['error_kinds'])}")
    print(f"\n{command_line('bench.reshard')}")
    if problems:
        for p in problems:
            print(f"IMPOSSIBLE: {p}", file=sys.stderr)
        raise SystemExit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
