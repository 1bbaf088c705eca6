"""Embedded benchmarks of kvstore.Store, side by side in one run (DESIGN.md section 10).

    python -m bench.embedded            # 1,000,000 keys
    python -m bench.embedded --quick    # 100,000 keys
    python -m bench.embedded --keys 500000 --page-size 4K --faults 200

Measures, on N keys of 16 bytes with 64-byte values:
- get / put / mget (batches of 100) ops/s for kvstore.Store, a Python dict and
  py-lmdb (an environment in /dev/shm; one write transaction for all puts, one
  read transaction for all gets), and the ratios against both;
- bytes of overhead per key beyond key + value: from Store.stats()
  (used + index_bytes + allocator_bytes) and from the process's anonymous
  RSS growth plus the arena bytes in use;
- utilisation at fill: a small store filled with random-size values
  (16..1024 B) until StoreFullError, then churned (delete a tenth, refill
  until full) - live bytes / capacity at each full point;
- one UE: inject an `ao` fault into the 4 KiB subpage of a random key and time
  store.recover() (invalidate + rebuild from an in-process source) with
  recovery="manual"; p50 / p99 over many faults, keys per fault.

Prints a markdown report with the command, the date and the machine. Speed
is measured, never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time

import kvstore

KEY_LEN = 16
VAL_LEN = 64
BATCH = 100
SUB = 4096


def make_data(n, seed=1):
    keys = [b"%016d" % i for i in range(n)]
    rng = random.Random(seed)
    vals = [rng.randbytes(VAL_LEN) for _ in range(n)]
    order = list(range(n))
    rng.shuffle(order)
    get_keys = [keys[i] for i in order]
    batches = [get_keys[i:i + BATCH] for i in range(0, n, BATCH)]
    return keys, vals, get_keys, batches


def rss_anon():
    """Anonymous resident memory of this process, bytes (index, Python heap)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def timed(fn, *args):
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn(*args)
        return time.perf_counter() - t0
    finally:
        gc.enable()


def best_of(repeat, fn, *args):
    return min(timed(fn, *args) for _ in range(repeat))


# ------------------------------------------------------------------ engines

def store_put(store, keys, vals):
    put = store.put
    for k, v in zip(keys, vals):
        put(k, v)


def store_get(store, keys):
    get = store.get
    for k in keys:
        get(k)


def store_mget(store, batches):
    mget = store.mget
    for b in batches:
        mget(b)


def dict_put(d, keys, vals):
    for k, v in zip(keys, vals):
        d[k] = v


def dict_get(d, keys):
    get = d.get
    for k in keys:
        get(k)


def dict_mget(d, batches):
    get = d.get
    for b in batches:
        [get(k) for k in b]


def lmdb_put(env, keys, vals):
    with env.begin(write=True) as txn:
        put = txn.put
        for k, v in zip(keys, vals):
            put(k, v)


def lmdb_get(env, keys):
    with env.begin() as txn:
        get = txn.get
        for k in keys:
            get(k)


def lmdb_mget(env, batches):
    with env.begin() as txn:
        cur = txn.cursor()
        for b in batches:
            cur.getmulti(b)


def bench_ops(n, keys, vals, get_keys, batches, page_size, repeat):
    """ops/s of put, get, mget for store, dict, lmdb; plus the filled store's
    memory figures. Returns (times, memory, store_info) where times[impl] =
    (insert, get, mget, overwrite, get in insertion order) seconds for n keys.

    The three are built one after the other (insert timed once each), then
    get, mget and overwrite are timed in rounds that visit store, dict and
    lmdb in turn, keeping the best of `repeat` rounds: on a shared machine
    all three then see the same background load."""
    import lmdb

    mem = {}
    # --- kvstore.Store
    # the capacity holds the records and the index (~40 B per key + key)
    cap = max(64 << 20, int(n * (8 + VAL_LEN + KEY_LEN + 40) * 1.5))
    base = rss_anon()
    store = kvstore.Store(cap, page_size=page_size, recovery="manual")
    info = store.stats()
    ins = {"store": timed(store_put, store, keys, vals)}
    st = store.stats()
    anon = rss_anon() - base
    assert st["keys"] == n
    mem["store_stats"] = (st["used"] + st["index_bytes"] + st["allocator_bytes"] - n * (KEY_LEN + VAL_LEN)) / n
    # the allocator's metadata is in the arena too (unless it found no room there)
    in_arena = st["allocator_bytes"] if st.get("allocator_in_arena") else 0
    mem["store_rss"] = (anon + st["used"] + st["index_bytes"] + in_arena - n * (KEY_LEN + VAL_LEN)) / n
    mem["store_detail"] = {k: st[k] for k in ("used", "index_bytes", "allocator_bytes")}
    mem["store_detail"]["allocator_where"] = "in the arena" if in_arena else "outside"
    mem["store_anon"] = anon
    assert store.get(keys[0]) == vals[0]
    assert store.mget(batches[0]) == [vals[int(k)] for k in batches[0]]

    # --- dict
    base = rss_anon()
    d = {}
    ins["dict"] = timed(dict_put, d, keys, vals)
    mem["dict_rss"] = (rss_anon() - base) / n       # the table only: keys/values objects exist already
    mem["dict_objects"] = sys.getsizeof(keys[0]) + sys.getsizeof(vals[0]) - KEY_LEN - VAL_LEN

    # --- py-lmdb in /dev/shm
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = tempfile.mkdtemp(prefix="kvbench-lmdb-", dir=shm)
    try:
        env = lmdb.open(path, map_size=max(1 << 30, n * 400), sync=False, metasync=False,
                        writemap=True, max_dbs=0, readahead=False)
        ins["lmdb"] = timed(lmdb_put, env, keys, vals)
        info_l = env.info()
        stat_l = env.stat()
        mem["lmdb_pages"] = ((info_l["last_pgno"] + 1) * stat_l["psize"] - n * (KEY_LEN + VAL_LEN)) / n

        impls = {"store": (store, store_get, store_mget, store_put),
                 "dict": (d, dict_get, dict_mget, dict_put),
                 "lmdb": (env, lmdb_get, lmdb_mget, lmdb_put)}
        best = {name: [float("inf")] * 4 for name in impls}
        for _ in range(repeat):
            for name, (obj, get, mget, put) in impls.items():
                b = best[name]
                b[0] = min(b[0], timed(get, obj, get_keys))
                b[1] = min(b[1], timed(mget, obj, batches))
                b[2] = min(b[2], timed(put, obj, keys, vals))
                b[3] = min(b[3], timed(get, obj, keys))
        res = {name: (ins[name], *best[name]) for name in impls}
        env.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)
    store.close()
    return res, mem, info


# ------------------------------------------------------------------ utilisation

def bench_utilisation(capacity="16MiB", rounds=20, seed=3):
    rng = random.Random(seed)
    s = kvstore.Store(capacity, page_size="4K", recovery="manual")
    live = {}
    nxt = 0

    def fill():
        nonlocal nxt
        while True:
            k = b"%016d" % nxt
            v = rng.randbytes(rng.randint(16, 1024))
            try:
                s.put(k, v)
            except kvstore.StoreFullError:
                return
            live[k] = len(v)
            nxt += 1

    t0 = time.perf_counter()
    fill()
    cap = s.stats()["capacity"]
    first = (sum(live.values()) + KEY_LEN * len(live)) / cap
    first_used = s.stats()["used"] / cap
    points = []
    for _ in range(rounds):
        for k in rng.sample(sorted(live), len(live) // 10):
            s.delete(k)
            del live[k]
        fill()
        points.append((sum(live.values()) + KEY_LEN * len(live)) / cap)
    st = s.stats()
    s.close()
    return {"capacity": cap, "first": first, "first_used": first_used, "churn_min": min(points),
            "churn_last": points[-1], "churn_mean": statistics.fmean(points), "rounds": rounds,
            "compactions": st["compactions"], "records_moved": st["records_moved"],
            "dead_bytes": st["dead_bytes"], "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------ one UE

class DictSource:
    """In-process rebuild source: a dict key -> (version, value)."""

    def __init__(self):
        self.data = {}

    def fetch(self, requests):
        data = self.data
        out = {}
        for k, v in requests:
            item = data.get(k)
            if item is not None and item[0] >= v:
                out[k] = item
        return out


def bench_ue(n, keys, vals, page_size, faults, seed=5):
    src = DictSource()
    cap = max(64 << 20, int(n * (8 + VAL_LEN + KEY_LEN + 40) * 1.5) + faults * SUB * 2)
    s = kvstore.Store(cap, page_size=page_size, kernel_policy="keep_ue", rebuild_source=src,
                      recovery="manual")
    put = s.put
    data = src.data
    for k, v in zip(keys, vals):
        data[k] = (put(k, v), v)
    rng = random.Random(seed)
    t_inject, t_recover, per_fault, rebuilt = [], [], [], 0
    for _ in range(faults):
        k = keys[rng.randrange(n)]
        t0 = time.perf_counter()
        s.faults.inject_key(k, "ao")
        t1 = time.perf_counter()
        r = s.recover()
        t2 = time.perf_counter()
        t_inject.append(t1 - t0)
        t_recover.append(t2 - t1)
        per_fault.append(r["keys_lost"])
        rebuilt += r["rebuilt"]
    st = s.stats()
    ok = s.wait_recovered(10) and st["lost_keys"] == 0
    wrong = sum(1 for i in rng.sample(range(n), min(n, 20000)) if s.get(keys[i]) != vals[i])
    s.close()
    q = statistics.quantiles(t_recover, n=100)
    return {"faults": faults, "p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3, "max_ms": max(t_recover) * 1e3,
            "inject_p50_ms": statistics.median(t_inject) * 1e3, "keys_per_fault": statistics.fmean(per_fault),
            "keys_per_fault_max": max(per_fault), "rebuilt": rebuilt, "all_back": ok, "wrong": wrong,
            "backing": st["backing"]}


# ------------------------------------------------------------------ report

def fmt_rate(n, t):
    return f"{n / t / 1e6:.2f} M/s"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.embedded", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100,000 keys instead of 1,000,000")
    ap.add_argument("--keys", type=int, help="number of keys (overrides --quick)")
    ap.add_argument("--page-size", default="auto", help='Store page_size for the ops and UE runs (default "auto")')
    ap.add_argument("--faults", type=int, default=1000, help="faults for the UE timing (default 1000)")
    ap.add_argument("--repeat", type=int, default=3, help="best of R rounds for get, mget, overwrite (default 3)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: ops,util,ue")
    args = ap.parse_args(argv)
    n = args.keys or (100_000 if args.quick else 1_000_000)
    skip = set(filter(None, args.skip.split(",")))
    cmd = "python -m bench.embedded" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    out = []
    p = out.append
    p(f"### Embedded store: {n:,} keys ({KEY_LEN} B keys, {VAL_LEN} B values)")
    p("")
    p(f"`{cmd}` on {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, "
      f"Python {platform.python_version()}, {os.cpu_count()} CPUs, kernel {platform.release()}")
    p("")
    print("\n".join(out), flush=True)
    out.clear()
    keys, vals, get_keys, batches = make_data(n)

    if "ops" not in skip:
        res, mem, info = bench_ops(n, keys, vals, get_keys, batches, args.page_size, args.repeat)
        p(f"Store backing: {info['backing']} (page_size={args.page_size!r}, kernel_policy={info['kernel_policy']})"
          f"; load average before: {os.getloadavg()[0]:.1f}; insert timed once, the others best of {args.repeat} "
          f"rounds taking store, dict, lmdb in turn"
          f"; lmdb: one write txn for puts, one read txn for gets, env in /dev/shm; mget = batches of {BATCH} "
          f"(dict: a list comprehension of get, lmdb: Cursor.getmulti)")
        p("")
        p("| op | kvstore.Store | dict | py-lmdb | Store / dict | Store / lmdb |")
        p("| --- | ---: | ---: | ---: | ---: | ---: |")
        for i, name in enumerate(("put (insert)", "get (random order)", "mget (keys/s, random batches)",
                                  "put (overwrite)", "get (insertion order)")):
            ts, td, tl = res["store"][i], res["dict"][i], res["lmdb"][i]
            p(f"| {name} | {fmt_rate(n, ts)} | {fmt_rate(n, td)} | {fmt_rate(n, tl)} | "
              f"{td / ts:.2f}x | {tl / ts:.2f}x |")
        p("")
        d = mem["store_detail"]
        p("| memory, bytes per key beyond key+value | value |")
        p("| --- | ---: |")
        p(f"| Store, from stats (used {d['used']:,} + index {d['index_bytes']:,} in the arena; allocator "
          f"{d['allocator_bytes']:,} {d['allocator_where']}) | {mem['store_stats']:.1f} |")
        p(f"| Store, anonymous RSS growth ({mem['store_anon']:,} B, {mem['store_anon'] / n:.2f} B/key) "
          f"+ arena bytes used | {mem['store_rss']:.1f} |")
        p(f"| dict, table growth only (keys and values already exist as objects) | {mem['dict_rss']:.1f} |")
        p(f"| dict, plus the bytes objects' own overhead | {mem['dict_rss'] + mem['dict_objects']:.1f} |")
        p(f"| py-lmdb, pages used | {mem['lmdb_pages']:.1f} |")
        p("")
        print("\n".join(out), flush=True)
        out.clear()

    if "util" not in skip:
        u = bench_utilisation()
        p(f"Utilisation at fill ({u['capacity'] >> 20} MiB store, 4K backing, 16 B keys, values 16..1024 B "
          f"uniform): first fill **{u['first']:.1%}** (records incl. headers {u['first_used']:.1%}); "
          f"after each of {u['rounds']} rounds of delete-10%-then-refill-until-full: min {u['churn_min']:.1%}, "
          f"mean {u['churn_mean']:.1%}, last {u['churn_last']:.1%} (compactions {u['compactions']:,}, "
          f"records moved {u['records_moved']:,}, dead bytes at the end {u['dead_bytes']:,}; {u['seconds']:.1f} s)")
        p("")
        print("\n".join(out), flush=True)
        out.clear()

    if "ue" not in skip and args.faults > 0:
        gc.collect()
        ue = bench_ue(n, keys, vals, args.page_size, args.faults)
        p(f"One UE ({ue['faults']} `ao` faults, each at a random key's 4 KiB subpage, {n:,} keys, "
          f"{ue['backing']}, keep_ue, recovery=\"manual\", in-process dict source): store.recover() "
          f"(invalidate + rebuild) p50 **{ue['p50_ms']:.3f} ms**, p99 **{ue['p99_ms']:.3f} ms**, "
          f"max {ue['max_ms']:.3f} ms; inject (scramble + SIGBUS) p50 {ue['inject_p50_ms']:.3f} ms; keys per "
          f"fault {ue['keys_per_fault']:.1f} (max {ue['keys_per_fault_max']}); rebuilt {ue['rebuilt']:,}; "
          f"all back: {ue['all_back']}; wrong values in a 20k sample: {ue['wrong']}")
        p("")
        print("\n".join(out), flush=True)


if __name__ == "__main__":
    main()
