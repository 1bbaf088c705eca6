"""Restart benchmark: time to the first served read and to full verification
after KV.RESTART and after kill -9 under --supervise, next to Redis
restarting from an RDB file and a Redis replica restarting with a full
resync, on the same data.

    python -m bench.restart [--sizes 1GiB,2GiB] [--value 4000] [--quick] [--write]
                            [--kvstore-only SIZES]

For each size the store (4 KiB backing by default: the hugepage pools of
this shared machine are in use by others) is filled to ~70% with keys
``key:N`` of ``--value`` random bytes. Then:

* kvstore KV.RESTART: from sending the command to the first GET of a key
  answered with the right value over a new connection (polled every 1 ms),
  and to ``unverified_subpages == 0`` in KV.STATS (every record checksum
  checked by the background pass);
* kvstore kill -9 under --supervise: from the SIGKILL of the worker, same two
  times;
* Redis (same keys and values): SAVE, restart redis-server with the RDB;
  time from exec to the first GET answered (not -LOADING) and to
  ``loading:0``;
* Redis replica restart: a replica of a Redis primary holding the data is
  killed and started again with no RDB; time to the first GET answered by
  the replica with the right value (after the full resync).

``--quick`` uses 64 MiB and checks only that the numbers are possible.
``--kvstore-only 4GiB`` runs those sizes without the Redis side (which
needs three copies of the data in memory on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

import redis

from bench._common import Impossible, check, header, table
from kvstore.server.spawn import start_server

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def parse_size(s):
    s = s.strip().upper().replace("IB", "")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    return int(float(s[:-1] if s[-1:] in "KMG" else s) * mult)


def fill(r, nkeys, value_len, seed=1):
    rnd = __import__("random").Random(seed)
    base = rnd.randbytes(value_len + 4096)
    batch = {}
    for i in range(nkeys):
        off = i % 4096
        batch[f"key:{i}"] = base[off:off + value_len]
        if len(batch) == 200:
            r.mset(batch)
            batch = {}
    if batch:
        r.mset(batch)
    return lambda i: base[i % 4096:i % 4096 + value_len]


def first_read(port, key, want, t0, timeout=600, loading_ok=False):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = redis.Redis(port=port, socket_timeout=5, socket_connect_timeout=1)
            got = r.get(key)
            if got == want:
                return time.monotonic() - t0
            if got is not None:
                raise Impossible(f"wrong value for {key!r} after restart")
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            pass
        except redis.ResponseError as e:
            if "LOADING" not in str(e).upper() and not loading_ok:
                raise
        time.sleep(0.001)
    raise Impossible("no read served before the timeout")


def wait_verified(port, t0, timeout=900):
    r = redis.Redis(port=port, socket_timeout=10)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            st = r.execute_command("KV.STATS")
            st = dict(zip(st[::2], st[1::2])) if isinstance(st, list) else st
            left = int(st.get(b"unverified_subpages", st.get("unverified_subpages", 1)))
            if left == 0:
                return time.monotonic() - t0
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            r = redis.Redis(port=port, socket_timeout=10)
        time.sleep(0.01)
    raise Impossible("verification did not finish")


def sample_check(port, get_value, nkeys, problems, n=2000):
    r = redis.Redis(port=port, socket_timeout=30)
    step = max(1, nkeys // n)
    bad = sum(1 for i in range(0, nkeys, step) if r.get(f"key:{i}") != get_value(i))
    check(bad == 0, f"{bad} wrong or missing values in a sample after restart", problems)
    return bad


def kvstore_runs(cap, value_len, page_size, problems):
    nkeys = int(cap * 0.7) // (value_len + 64)
    out = {}
    srv = start_server("--capacity", str(cap), "--page-size", page_size, "--supervise")
    try:
        r = redis.Redis(port=srv.port, socket_timeout=60)
        t = time.monotonic()
        get_value = fill(r, nkeys, value_len)
        out["fill_s"] = time.monotonic() - t
        out["keys"] = nkeys
        k = f"key:{nkeys // 2}"
        # planned restart
        t0 = time.monotonic()
        check(r.execute_command("KV.RESTART") == b"OK", "KV.RESTART did not answer OK", problems)
        out["restart_first"] = first_read(srv.port, k, get_value(nkeys // 2), t0)
        out["restart_verified"] = wait_verified(srv.port, t0)
        sample_check(srv.port, get_value, nkeys, problems)
        # crash restart
        worker = redis.Redis(port=srv.port).info("server")["process_id"]
        time.sleep(0.5)                       # the fds are stored once it listens
        t0 = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        out["crash_first"] = first_read(srv.port, k, get_value(nkeys // 2), t0)
        out["crash_verified"] = wait_verified(srv.port, t0)
        sample_check(srv.port, get_value, nkeys, problems)
        handover = [ln for ln in srv.logs().splitlines() if "event=restart_done" in ln]
        out["logged"] = [ln.split("seconds=")[1].split()[0] for ln in handover]
        # the adoption itself (Store(adopt_fd=) before the first reply), without
        # the interpreter's start-up and imports that the hand-over time includes
        adopted = [ln for ln in srv.logs().splitlines() if "event=arena_adopted" in ln]
        out["adopt_logged"] = [ln.split("seconds=")[1].split()[0] for ln in adopted]
    finally:
        srv.stop()
    return out, nkeys


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server(port, d, *extra):
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", d,
                          "--save", "", "--appendonly", "no", "--protected-mode", "no", *extra],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            redis.Redis(port=port).ping()
            return p
        except redis.ConnectionError:
            time.sleep(0.01)
        except redis.ResponseError:
            return p
    p.kill()
    raise RuntimeError("redis-server did not start")


def redis_runs(nkeys, value_len, problems):
    out = {}
    d = tempfile.mkdtemp(prefix="bench-restart-redis-")
    port, rport = free_port(), free_port()
    prim = redis_server(port, d, "--dbfilename", "dump.rdb")
    rep = None
    try:
        r = redis.Redis(port=port, socket_timeout=120)
        get_value = fill(r, nkeys, value_len)
        k, want = f"key:{nkeys // 2}", get_value(nkeys // 2)
        t = time.monotonic()
        r.save()
        out["rdb_save_s"] = time.monotonic() - t
        out["rdb_bytes"] = os.path.getsize(os.path.join(d, "dump.rdb"))
        prim.terminate()          # --save "": no second save at shutdown
        prim.wait(60)
        t0 = time.monotonic()
        prim = redis_server(port, d, "--dbfilename", "dump.rdb")
        out["rdb_first"] = first_read(port, k, want, t0)
        r = redis.Redis(port=port, socket_timeout=60)
        while r.info("persistence").get("loading"):
            time.sleep(0.001)
        out["rdb_loaded"] = time.monotonic() - t0
        check(r.dbsize() == nkeys, "Redis lost keys in the RDB reload", problems)
        # replica: full sync, then kill and restart it without an RDB
        rd = tempfile.mkdtemp(prefix="bench-restart-redis-replica-")
        rep = redis_server(rport, rd, "--replicaof", "127.0.0.1", str(port), "--dbfilename", "none.rdb",
                           "--repl-diskless-load", "disabled")
        first_read(rport, k, want, time.monotonic(), loading_ok=True)
        rep.kill()
        rep.wait(30)
        for f in os.listdir(rd):
            os.unlink(os.path.join(rd, f))
        t0 = time.monotonic()
        rep = redis_server(rport, rd, "--replicaof", "127.0.0.1", str(port), "--dbfilename", "none.rdb")
        out["replica_first"] = first_read(rport, k, want, t0, loading_ok=True)
        rr = redis.Redis(port=rport, socket_timeout=60)
        while rr.info("replication").get("master_link_status") != "up" or rr.info("persistence").get("loading"):
            time.sleep(0.002)
        out["replica_synced"] = time.monotonic() - t0
    finally:
        for p in (prim, rep):
            if p is not None:
                p.kill()
                p.wait()
    return out


def _adopt_col(kv):
    """The logged adoption times (restart, crash) in seconds."""
    return " / ".join(f"{float(x):.3f} s" for x in kv.get("adopt_logged", [])) or "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1GiB,2GiB")
    ap.add_argument("--value", type=int, default=4000)
    ap.add_argument("--page-size", default="4K")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kvstore-only", default="", help="sizes to run without the Redis side")
    ap.add_argument("--write", action="store_true", help="append the report to bench/RESULTS.md")
    a = ap.parse_args(argv)
    sizes = ["64MiB"] if a.quick else [x for x in a.sizes.split(",") if x]
    kv_only = [x for x in a.kvstore_only.split(",") if x] if not a.quick else []
    problems = []
    rows = []
    for size in sizes + kv_only:
        cap = parse_size(size)
        kv, nkeys = kvstore_runs(cap, a.value, a.page_size, problems)
        if size in kv_only:
            data_mb = nkeys * a.value / (1 << 20)
            rows.append([size, f"{nkeys:,}", f"{data_mb:,.0f} MiB",
                         f"**{kv['restart_first']:.3f} s**", f"{kv['restart_verified']:.3f} s",
                         f"**{kv['crash_first']:.3f} s**", f"{kv['crash_verified']:.3f} s",
                         "not run", "not run", "not run", _adopt_col(kv)])
            print(size, kv, flush=True)
            continue
        rd = redis_runs(nkeys, a.value, problems)
        for name, v in (("kv", kv), ("redis", rd)):
            for key, x in v.items():
                if key.endswith(("_first", "_verified", "_loaded", "_synced")):
                    check(x > 0, f"{name} {key} not positive: {x}", problems)
        data_mb = nkeys * a.value / (1 << 20)
        rows.append([size, f"{nkeys:,}", f"{data_mb:,.0f} MiB",
                     f"**{kv['restart_first']:.3f} s**", f"{kv['restart_verified']:.3f} s",
                     f"**{kv['crash_first']:.3f} s**", f"{kv['crash_verified']:.3f} s",
                     f"{rd['rdb_first']:.3f} s", f"{rd['rdb_loaded']:.3f} s",
                     f"{rd['replica_first']:.3f} s", _adopt_col(kv)])
        print(size, kv, rd, flush=True)
    text = header("Restart: KV.RESTART, kill -9 under --supervise, Redis RDB reload and replica resync",
                  "bench.restart")
    text += (f"\nkvstore-server --page-size {a.page_size}, filled to ~70% of --capacity with {a.value} B "
             "random values over RESP (MSET batches of 200); the same keys and values in Redis "
             f"({subprocess.run(['redis-server', '--version'], capture_output=True, text=True).stdout.split()[2]}). "
             "First read: a new connection's GET of one key answered with the right value (polled "
             "every 1 ms). Verified: KV.STATS unverified_subpages reaches 0 (every record checksum "
             "checked by the background pass). Adoption: the new process's logged "
             "`event=arena_adopted seconds=` (Store(adopt_fd=) before it serves; the first read also "
             "waits for the interpreter's start-up and imports). Redis RDB: SAVE, stop, start redis-server on the "
             "RDB; first GET not -LOADING, loaded: loading:0. Redis replica: killed, started "
             "again without an RDB; its first GET of the key after the full resync.\n\n")
    text += table(["size", "keys", "values", "KV.RESTART first read", "KV.RESTART verified",
                   "kill -9 first read", "kill -9 verified", "Redis RDB first read", "Redis RDB loaded",
                   "Redis replica resync first read", "adoption (restart / crash)"], rows) + "\n"
    print(text)
    if problems:
        print("IMPOSSIBLE:", *problems, sep="\n  ")
        return 1
    if a.write:
        with open(RESULTS, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
