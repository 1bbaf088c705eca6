"""Recovery benchmark: the same dataset and the same uncorrectable memory
errors (UEs) under each memory design, and Redis's cost for the same event.

    python -m bench.recovery            # 200k keys x 64 B, 20 UEs, plots in bench/plots/
    python -m bench.recovery --quick    # 50k keys, 8 UEs, no plots (CI smoke test)

Designs (rows of the table):

(a) 1 GiB pages, keep-UE kernel policy: the hit 4 KiB subpage is lost, the
    hugepage stays mapped (2 MiB pages when no 1 GiB page can be had; the
    table says which).
(b) 2 MiB pages, mainline policy, salvage on: the kernel drops the whole
    hugepage; the store copies the readable bytes into a spare hugepage and
    maps it over the same addresses (``Engine.salvage = True``).
(c) 2 MiB pages, mainline policy, salvage off (``store.salvage = False``):
    every key on the hugepage is lost and rebuilt from the replica.
(d) 4 KiB pages (plain memfd), mainline policy.
(b1)/(c1) the same as (b)/(c) on 1 GiB pages with a single UE, when both of
    this machine's 1 GiB pages are free: with 1 GiB pages every mainline UE
    needs one more spare 1 GiB page (b) or takes 1 GiB of capacity for good
    (c), so 20 UEs cannot be run there; (b)/(c) use 2 MiB pages for that
    reason.

Every design gets the same keys (16 B) and values (64 B) with the same
versions, and the same sequence of UEs: kind "ao" (a real SIGBUS
BUS_MCEERR_AO through the store's handler, from the fault simulator) at the
subpage holding each of the same randomly chosen keys, one at a time: inject,
wait until the store is fully healthy again (``wait_recovered`` and no key
LOST), pause, next. The rebuild source is a replica Store on 4 KiB pages in
the same process (the Store object's ``fetch``; no network). A reader thread
reads random keys the whole time and checks every answer against the data
set: a wrong value or a ``None`` for a key that exists is a wrong answer, an
exception (``KeyLostError``, ...) is a client-visible error.

Redis reference: Redis has no way to survive a SIGBUS on its heap, so a UE
costs a restart and a full resync from its replica. The run starts a master
and a replica redis-server on free loopback ports (``--save '' --appendonly
no``, ``--repl-diskless-sync-delay 0`` so no wait is added), loads the same
dataset, kills the replica with SIGKILL, restarts it and times until
``master_link_status:up``, ``master_sync_in_progress:0`` and the same dbsize.
A reader thread reads from the restarted node the whole time (retrying 1 ms
after a failure); "bytes" is the size of the RDB the master sends (measured
with ``redis-cli --rdb`` afterwards).

Exits 1 when a number cannot be right: wrong answers, negative times, a UE
that lost no key, or more (or fewer) keys lost than records in the region
the UE took.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

import kvstore

from . import _common as C

MiB, GiB = 1 << 20, 1 << 30
KEY_FMT = b"key:%012d"           # 16 bytes
VALUE_SIZE = 64
STAMP_EVERY = 64                 # reader ops per timestamp
SHORT = {"a": "keep-UE\n(1G or 2M)", "b": "2M mainline\n+ salvage", "c": "2M mainline\nno spare",
         "d": "4K pages", "b1": "1G mainline\n+ salvage", "c1": "1G mainline\nno spare",
         "redis": "Redis restart\n+ full resync"}


def dataset(n):
    keys = [KEY_FMT % i for i in range(n)]
    vals = [(hashlib.blake2b(k, digest_size=32).digest() * 2)[:VALUE_SIZE] for k in keys]
    return keys, vals


class Reader(threading.Thread):
    """Reads random keys with `get` and checks each answer; keeps a
    timestamp and the count of correct answers every `every` operations,
    for throughput (of correct answers) over time."""

    def __init__(self, get, keys, vals, errors=(Exception,), every=STAMP_EVERY, retry_sleep=0.0, seed=3):
        super().__init__(daemon=True, name="bench-reader")
        self.get, self.keys, self.vals = get, keys, vals
        self.errors_t = errors
        self.every = every
        self.retry_sleep = retry_sleep
        self.order = np.random.default_rng(seed).integers(0, len(keys), size=1 << 20).tolist()
        self.stop = threading.Event()
        self.stamps = []
        self.ops = 0
        self.good = 0          # correct answers; the stamps count these
        self.errors = 0
        self.error_kinds = {}
        self.wrong = 0
        self.missing = 0
        self.error_times = []

    def run(self):
        get, keys, vals, order = self.get, self.keys, self.vals, self.order
        j, n = 0, len(order)
        now = time.monotonic
        self.stamps.append((now(), 0))
        while not self.stop.is_set():
            for _ in range(self.every):
                i = order[j]
                j = j + 1 if j + 1 < n else 0
                try:
                    v = get(keys[i])
                except self.errors_t as e:
                    self.errors += 1
                    name = type(e).__name__
                    self.error_kinds[name] = self.error_kinds.get(name, 0) + 1
                    self.error_times.append(now())
                    if self.retry_sleep:
                        time.sleep(self.retry_sleep)
                    continue
                finally:
                    self.ops += 1
                if v != vals[i]:
                    if v is None:
                        self.missing += 1
                    else:
                        self.wrong += 1
                else:
                    self.good += 1
            self.stamps.append((now(), self.good))

    def ops_between(self, t0, t1):
        """Correct answers between t0 and t1 (linear between stamps)."""
        ts = [s[0] for s in self.stamps]

        def at(t):
            k = bisect.bisect_right(ts, t)
            if k == 0:
                return 0.0
            if k >= len(ts):
                return float(self.stamps[-1][1])
            (ta, na), (tb, nb) = self.stamps[k - 1], self.stamps[k]
            return na + (nb - na) * (t - ta) / (tb - ta) if tb > ta else float(na)
        return at(t1) - at(t0)

    def series(self, t_start, t_end, bin_s):
        """ops/s in bins of bin_s from t_start to t_end -> (bin starts, rates)."""
        edges = np.arange(t_start, t_end + bin_s, bin_s)
        counts = [self.ops_between(a, b) / bin_s for a, b in zip(edges[:-1], edges[1:])]
        return edges[:-1] - t_start, np.array(counts)


# ----------------------------------------------------------------- kvstore

def _offsets(store, keys, entry=False):
    """Arena offset of every key's record, or (entry=True) of its index
    entry (-1 for a key that is LOST)."""
    where = store.locate_entry if entry else store.locate

    def loc(k):
        try:
            return where(k)[0]
        except kvstore.Error:
            return -1
    return np.fromiter((loc(k) for k in keys), dtype=np.int64, count=len(keys))


def run_design(d, keys, vals, versions, replica, ue_keys, opts, hp, problems):
    """Run one memory design; returns its result dict (or one with 'skip')."""
    res = {"name": d["name"], "title": d["title"]}
    page = d["page"]
    cap = d["capacity"]
    if page in ("1G", "2M"):
        per = GiB if page == "1G" else 2 * MiB
        need = -(-cap // per) + d.get("spares", 0)
        got = hp.need(page, need)
        if got < need:
            st = C.hugepages.size_status(page)
            res["skip"] = (f"needs {need} free {page} hugepages, {got} available (pool {st['nr_hugepages']}, "
                           f"{st['nr_hugepages'] - st['free_hugepages']} in use by other processes)")
            return res
    try:
        store = kvstore.Store(cap, page_size=page, kernel_policy=d["policy"], rebuild_source=replica,
                              recovery="thread")
    except (OSError, MemoryError) as e:
        res["skip"] = f"cannot open a {page} store: {e}"
        return res
    try:
        st = store.stats()
        res["backing"] = st["backing"]
        res["page_bytes"] = st["page_bytes"]
        if d["salvage"] is not None:
            store.salvage = d["salvage"]
        res["salvage"] = getattr(store, "salvage", None) if d["policy"] == "mainline" and st["page_bytes"] > 4096 \
            else None
        for k, v, ver in zip(keys, vals, versions):
            store.put_versioned(k, v, ver)
        lost_batches = []
        store.on_loss(lambda ks: lost_batches.append(list(ks)))
        offs = _offsets(store, keys)
        eoffs = _offsets(store, keys, entry=True)
        page_bytes = st["page_bytes"]
        mainline_huge = d["policy"] == "mainline" and page_bytes > 4096

        reader = Reader(store.get, keys, vals, errors=(Exception,))
        reader.start()
        t_begin = time.monotonic()
        time.sleep(opts.steady)
        t_steady_end = time.monotonic()
        ues = []
        for key in ue_keys[:d["ues"]]:
            off, _ = store.locate(key)
            sub, hpage = off // 4096, off // page_bytes
            # a key is lost with the region if its record or its index entry is there
            in_sub = int(np.count_nonzero((offs // 4096 == sub) | (eoffs // 4096 == sub)))
            in_page = int(np.count_nonzero((offs // page_bytes == hpage) | (eoffs // page_bytes == hpage)))
            s0 = store.stats()
            t0 = time.monotonic()
            store.faults.inject_key(key, "ao")
            # The SIGBUS is handled before inject returns on this thread;
            # wait for it anyway so an empty queue is never mistaken for health.
            while store.stats()["loss_events"] == s0["loss_events"] and time.monotonic() - t0 < opts.timeout:
                time.sleep(0)
            ok = store.wait_recovered(timeout=opts.timeout)
            early = False
            # wait_recovered can return while keys are still REBUILDING (taken
            # off the loss queue, not yet in the rebuild list): also require
            # that the engine holds no LOST/REBUILDING key.
            while time.monotonic() - t0 < opts.timeout:
                s = store.stats()
                if not (s["lost_keys"] or s["rebuild_pending"] or s["lost_ranges"] or store.loss_pending):
                    break
                early = True
                store.wait_recovered(timeout=opts.timeout)
                time.sleep(0.0002)
            t1 = time.monotonic()
            s1 = store.stats()
            lost = s1["keys_lost_total"] - s0["keys_lost_total"]
            salvaged = s1["pages_salvaged"] - s0["pages_salvaged"]
            by_range = s1["keys_lost_in_ranges"] - s0["keys_lost_in_ranges"]
            ue = {"t0": t0, "t1": t1, "key": key, "lost": lost, "in_sub": in_sub, "in_page": in_page,
                  "by_range": by_range,
                  "rebuilt": s1["rebuilt_keys"] - s0["rebuilt_keys"],
                  "read_repairs": s1["read_repairs"] - s0["read_repairs"],
                  "unrecoverable": s1["unrecoverable_keys"] - s0["unrecoverable_keys"],
                  "salvaged_pages": salvaged,
                  "salvage_failed": s1["salvage_failed"] - s0["salvage_failed"],
                  "still_lost": s1["lost_keys"], "healthy": ok and s1["lost_keys"] == 0,
                  "early_return": early}
            ues.append(ue)
            # Where every key lives now (outside the timed window).
            tracked = len([k for b in lost_batches for k in b])
            lost_batches[:] = []
            offs = _offsets(store, keys)
            eoffs = _offsets(store, keys, entry=True)
            ue["on_loss_keys"] = tracked
            # What this UE may take: the 4 KiB subpage, or with mainline on
            # hugepages the whole page unless salvage succeeded.
            region = in_page if (mainline_huge and not salvaged) else in_sub
            ue["region"] = region
            tag = f"{d['name']} UE on {key.decode()}"
            C.check(t1 - t0 >= 0, f"{tag}: negative time to health {t1 - t0}", problems)
            C.check(ue["healthy"], f"{tag}: not healthy after {opts.timeout}s "
                                   f"({s1['lost_keys']} keys still LOST)", problems)
            C.check(lost >= 1, f"{tag}: no key lost although the UE hit that key's subpage", problems)
            C.check(lost <= in_page, f"{tag}: {lost} keys lost, more than the {in_page} records and index "
                                     f"entries on the whole {page_bytes // 1024} KiB page", problems)
            C.check(lost == region, f"{tag}: {lost} keys lost, but {region} records or index entries were in "
                                    f"the region "
                                    f"the UE took ({'page' if region == in_page and mainline_huge else 'subpage'})",
                    problems)
            # on_loss reports the keys the recovery worker takes; a key a reader
            # read-repaired before that is not in it (counted in read_repairs).
            # (keys of a lost index range are not known by name: on_loss does
            # not hear of them; they come back by hash range)
            C.check(tracked <= lost - by_range <= tracked + ue["read_repairs"],
                    f"{tag}: on_loss reported {tracked} keys and {ue['read_repairs']} were read-repaired, "
                    f"but keys_lost_total grew by {lost} ({by_range} of them in lost index ranges)", problems)
            C.check(ue["unrecoverable"] == 0, f"{tag}: {ue['unrecoverable']} keys unrecoverable although "
                                              f"the replica holds them", problems)
            if not ue["healthy"]:
                break                     # the store cannot heal: no point hitting it again
            time.sleep(opts.gap)
        time.sleep(opts.gap)
        reader.stop.set()
        reader.join()
        t_end = time.monotonic()

        # Every key must read back exactly.
        final_bad = 0
        got = store.mget(keys, on_lost="mark")
        for v, want in zip(got, vals):
            final_bad += v != want
        C.check(final_bad == 0, f"{d['name']}: {final_bad} keys read back wrong after recovery", problems)
        C.check(reader.wrong == 0, f"{d['name']}: {reader.wrong} wrong values seen by the reader", problems)
        C.check(reader.missing == 0, f"{d['name']}: {reader.missing} existing keys answered None", problems)
        C.check(len(store) == len(keys), f"{d['name']}: {len(store)} keys after recovery, expected {len(keys)}",
                problems)

        steady = reader.ops_between(t_begin, t_steady_end) / (t_steady_end - t_begin)
        rec_time = sum(u["t1"] - u["t0"] for u in ues)
        rec_ops = sum(reader.ops_between(u["t0"], u["t1"]) for u in ues)
        fs = store.stats()
        res.update(
            ues=ues, steady=steady, during=(rec_ops / rec_time if rec_time > 0 else float("nan")),
            reader_errors=reader.errors, error_kinds=reader.error_kinds, wrong=reader.wrong,
            missing=reader.missing, final_bad=final_bad, reader=reader, t_begin=t_begin, t_end=t_end,
            keep_ue_flag=fs["keep_ue"], pages_salvaged=fs["pages_salvaged"],
            salvage_failed=fs["salvage_failed"], last_salvage_error=fs["last_salvage_error"],
            quarantined=fs["quarantined_subpages"],
            early_returns=sum(u["early_return"] for u in ues),
            read_repairs=sum(u["read_repairs"] for u in ues),
            not_in_on_loss=sum(u["lost"] - u["on_loss_keys"] for u in ues))
        return res
    finally:
        store.close()


# ------------------------------------------------------------------- Redis

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _info(r, section):
    return r.info(section)


def run_redis(keys, vals, opts, problems):
    import redis
    res = {"name": "redis", "title": "Redis 7 (process dies on SIGBUS): restart + full resync"}
    exe = shutil.which("redis-server")
    if exe is None:
        res["skip"] = "redis-server not found on PATH"
        return res
    tmp = tempfile.mkdtemp(prefix="kvbench-redis-")
    mport, rport = _free_port(), _free_port()
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--protected-mode", "yes",
              "--repl-diskless-sync-delay", "0"]
    procs = []

    def start(port, extra, tag):
        d = os.path.join(tmp, tag)
        os.makedirs(d, exist_ok=True)
        log = open(os.path.join(d, "log"), "ab")
        p = subprocess.Popen([exe, "--port", str(port), "--dir", d, *common, *extra],
                             stdout=log, stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    def wait_ping(port, timeout=10):
        r = redis.Redis(port=port, socket_timeout=1)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if r.ping():
                    return r
            except redis.exceptions.ConnectionError:
                time.sleep(0.005)
        raise TimeoutError(f"redis-server on {port} did not answer")

    def synced(r, n):
        try:
            rep = r.info("replication")
            return (rep.get("master_link_status") == "up" and rep.get("master_sync_in_progress") == 0
                    and r.dbsize() == n)
        except redis.exceptions.ConnectionError:      # includes BusyLoadingError
            return False

    try:
        master_p = start(mport, [], "master")
        master = wait_ping(mport)
        replica_args = ["--replicaof", "127.0.0.1", str(mport)]
        replica_p = start(rport, replica_args, "replica")
        wait_ping(rport)
        with master.pipeline(transaction=False) as pipe:
            for i in range(0, len(keys), 1000):
                pipe.mset(dict(zip(keys[i:i + 1000], vals[i:i + 1000])))
            pipe.execute()
        n = master.dbsize()
        C.check(n == len(keys), f"redis master holds {n} keys after loading {len(keys)}", problems)
        rr = redis.Redis(port=rport, socket_timeout=1)
        end = time.monotonic() + 60
        while not synced(rr, n) and time.monotonic() < end:
            time.sleep(0.01)
        if not synced(rr, n):
            res["skip"] = "the redis replica did not finish its first sync within 60 s"
            return res
        used = master.info("memory")["used_memory"]

        client = redis.Redis(port=rport, socket_timeout=2, socket_connect_timeout=1)
        reader = Reader(client.get, keys, vals, errors=(redis.exceptions.RedisError, OSError),
                        every=16, retry_sleep=0.001)
        reader.start()
        t_begin = time.monotonic()
        time.sleep(opts.steady)
        t_steady_end = time.monotonic()
        t0 = time.monotonic()
        replica_p.send_signal(signal.SIGKILL)       # what a SIGBUS does to Redis
        replica_p.wait()
        t_dead = time.monotonic()
        replica_p = start(rport, replica_args, "replica")
        probe = redis.Redis(port=rport, socket_timeout=1, socket_connect_timeout=0.5)
        end = t0 + opts.timeout
        t_up = None
        while time.monotonic() < end:
            if t_up is None:
                try:
                    probe.ping()
                    t_up = time.monotonic()
                except redis.exceptions.ConnectionError:
                    pass
            if synced(probe, n):
                break
            time.sleep(0.002)
        t1 = time.monotonic()
        healthy = synced(probe, n)
        time.sleep(opts.gap * 3)
        reader.stop.set()
        reader.join()
        t_end = time.monotonic()
        C.check(healthy, f"redis replica not resynced within {opts.timeout}s", problems)
        C.check(t1 - t0 >= 0, f"redis: negative resync time {t1 - t0}", problems)
        C.check(reader.wrong == 0, f"redis: {reader.wrong} wrong values read from the replica", problems)

        rdb = os.path.join(tmp, "dump-check.rdb")
        rdb_bytes = None
        cli = shutil.which("redis-cli")
        if cli:
            subprocess.run([cli, "-p", str(mport), "--rdb", rdb], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60)
            if os.path.exists(rdb):
                rdb_bytes = os.path.getsize(rdb)
        steady = reader.ops_between(t_begin, t_steady_end) / (t_steady_end - t_begin)
        res.update(
            ues=[{"t0": t0, "t1": t1, "lost": n, "region": n, "in_sub": n, "in_page": n, "rebuilt": n,
                  "read_repairs": 0, "unrecoverable": 0, "salvaged_pages": 0, "healthy": healthy}],
            restart_s=(t_up - t_dead) if t_up else None,
            steady=steady, during=reader.ops_between(t0, t1) / (t1 - t0),
            reader_errors=reader.errors, error_kinds=reader.error_kinds, wrong=reader.wrong,
            missing=reader.missing, final_bad=0, reader=reader, t_begin=t_begin, t_end=t_end,
            rdb_bytes=rdb_bytes, used_memory=used, backing="redis-server 7 (jemalloc heap)")
        return res
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ report

def _fmt_bytes(n):
    if n is None:
        return "?"
    for unit, s in ((GiB, "GiB"), (MiB, "MiB"), (1024, "KiB")):
        if n >= unit:
            return f"{n / unit:.1f} {s}"
    return f"{n} B"


def _ms(s):
    return f"{s * 1000:.1f}"


def report(results, n_keys, opts, problems):
    rows = []
    for r in results:
        if "skip" in r:
            rows.append([r["name"], r["title"], "skipped: " + r["skip"], "", "", "", "", "", "", ""])
            continue
        ues = r["ues"]
        lost = [u["lost"] for u in ues]
        times = sorted(u["t1"] - u["t0"] for u in ues)
        rebuilt = sum(u["rebuilt"] for u in ues)
        if r["name"] == "redis":
            bytes_rebuilt = (f"{_fmt_bytes(r['rdb_bytes'])} RDB" if r.get("rdb_bytes") else "?") + \
                f" ({n_keys:,} keys)"
            note = (f"process restart {(r['restart_s'] or 0) * 1000:.0f} ms, then full sync; "
                    f"nil answers from the empty restarted replica: {r['missing']:,}")
        else:
            bytes_rebuilt = f"{_fmt_bytes(rebuilt * (16 + VALUE_SIZE))} ({rebuilt:,} keys)"
            note = f"backing {r['backing']}"
            if r.get("salvage") is not None:
                note += f", salvage {'on' if r['salvage'] else 'off'}: {r['pages_salvaged']} pages copied " \
                        f"({_fmt_bytes(r['pages_salvaged'] * r['page_bytes'])} local copy)"
                if r["salvage_failed"]:
                    note += f", {r['salvage_failed']} salvage failures ({r['last_salvage_error']})"
            note += f", {r['quarantined']} subpages quarantined"
            if r["read_repairs"]:
                note += (f"; {r['read_repairs']:,} keys read-repaired by the reader"
                         f" ({r['not_in_on_loss']:,} of the lost keys never reached on_loss)")
            if r["early_returns"]:
                note += (f"; wait_recovered() returned True {r['early_returns']}x while keys were still "
                         f"REBUILDING (health measured on the engine's counters)")
        p50 = times[len(times) // 2]
        tmax = times[-1]
        errs = f"{r['reader_errors']:,}" + (
            " (" + ", ".join(f"{k} {v:,}" for k, v in r["error_kinds"].items()) + ")" if r["error_kinds"] else "")
        rows.append([
            r["name"], r["title"], len(ues),
            f"{int(np.median(lost)):,} (min {min(lost):,}, max {max(lost):,})",
            bytes_rebuilt,
            f"{_ms(p50)} / {_ms(tmax)}",
            errs, f"{r['wrong']:,}",
            f"{r['during']:,.0f} / {r['steady']:,.0f} ({r['during'] / r['steady']:.0%})" if r["steady"] else "?",
            note])
    cols = ["design", "memory", "UEs", "keys lost per UE (median)", "bytes rebuilt (total)",
            "time to full health ms (median / max)", "reader errors", "wrong answers",
            "correct reads/s during recovery / steady", "notes"]
    return C.table(cols, rows)


def plots(results, n_keys):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [r for r in results if "skip" not in r]
    paths = []
    fig, axes = plt.subplots(len(done), 1, figsize=(9, 1.9 * len(done)), squeeze=False)
    for ax, r in zip(axes[:, 0], done):
        rd = r["reader"]
        dur = r["t_end"] - r["t_begin"]
        bin_s = 0.02 if r["name"] != "redis" else 0.05
        x, y = rd.series(r["t_begin"], r["t_end"], bin_s)
        ax.plot(x, y / 1000, lw=0.8, color="#1f77b4")
        for i, u in enumerate(r["ues"]):
            ax.axvspan(u["t0"] - r["t_begin"], max(u["t1"] - r["t_begin"], u["t0"] - r["t_begin"] + bin_s / 4),
                       color="#ff7f0e", alpha=0.35, lw=0)
            ax.axvline(u["t0"] - r["t_begin"], color="#d62728", lw=0.6, label="UE" if i == 0 else None)
        ax.set_xlim(0, dur)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("k reads/s", fontsize=8)
        ax.set_title(f"({r['name']}) {r['title']}", fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7, loc="lower right")
    axes[-1, 0].set_xlabel("seconds (red: UE injected / process killed; orange: until full health)", fontsize=8)
    fig.tight_layout()
    paths.append(C.savefig(fig, "recovery_throughput.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.6))
    for i, r in enumerate(done):
        lost = [u["lost"] for u in r["ues"]]
        ax.bar(i, float(np.median(lost)), color="#d62728" if r["name"] == "redis" else "#1f77b4", alpha=0.8)
        ax.scatter([i] * len(lost), lost, s=8, color="k", zorder=3)
        ax.text(i, float(np.median(lost)) * 1.15, f"{int(np.median(lost)):,}", ha="center", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(done)))
    ax.set_xticklabels([f"({r['name']})\n{SHORT.get(r['name'], '')}" for r in done], fontsize=7)
    ax.set_ylabel(f"keys lost per UE (log; dataset {n_keys:,})", fontsize=8)
    ax.set_title("Keys lost per uncorrectable memory error (bar: median, dots: each UE)", fontsize=9)
    fig.tight_layout()
    paths.append(C.savefig(fig, "recovery_keys_lost.png"))
    plt.close(fig)
    return paths



# --------------------------------------------------------------------------
# Recovery cost against the store size, memory outside the arena, and the
# salvage stall (issue: the whole store in the arena).

def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _p(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def vs_size(sizes, n_ues, hp):
    """Fill N keys (16 B keys, 64 B values), then inject one UE at a time
    on the subpage of a random key's record, and on the index page of a
    random key's entry; time Store.recover() (invalidate / replace the
    index page, quarantine, reclaim orphans; no rebuild source)."""
    import logging
    logging.getLogger("kvstore").setLevel(logging.ERROR)
    rows = []
    for n in sizes:
        # the same room per key at every size (records per MiB decide the
        # cost of a record UE: one group of records per MiB of capacity)
        cap = -(-(n * 160 + 8 * MiB) // (2 * MiB)) * (2 * MiB)
        page = "2M" if hp.need("2M", cap // (2 * MiB) + 2) >= cap // (2 * MiB) else "4K"
        rss0 = _rss_anon()
        s = kvstore.Store(cap, page_size=page, kernel_policy="keep_ue", recovery="manual")
        t0 = time.perf_counter()
        put = s.put
        for i in range(n):
            put(b"key:%012d" % i, b"%064d" % i)
        fill = time.perf_counter() - t0
        rss1 = _rss_anon()
        st = s.stats()
        rng = random.Random(n)
        rec, idx = [], []
        for _ in range(n_ues):
            for kind, out in (("record", rec), ("index", idx)):
                for _try in range(20):
                    k = b"key:%012d" % rng.randrange(n)
                    try:
                        off, _ln = s.locate(k) if kind == "record" else s.locate_entry(k)
                    except kvstore.KeyLostError:
                        continue
                    s.faults.inject(off, "ao")
                    t = time.perf_counter()
                    s.recover()
                    out.append(time.perf_counter() - t)
                    break
        rows.append(dict(n=n, page=page, fill=fill, rss_per_key=(rss1 - rss0) / n,
                         overhead=(st["used"] + st["index_bytes"]) / n - 80, index_bytes=st["index_bytes"],
                         rec50=_p(rec, .5), rec90=_p(rec, .9), idx50=_p(idx, .5), idx90=_p(idx, .9),
                         groups=st["record_groups"], depth=st["index_depth"], pages=st["index_pages"]))
        s.close()
        print(f"[vs-size] {n:,} keys done", file=sys.stderr)
    return rows


def salvage_stall(hp):
    """Mainline policy, a whole hugepage lost and salvaged (copied with
    pread into a spare page, or into 4 KiB pages when no spare hugepage is
    free), while reader threads run: the longest gap each saw."""
    import threading
    out = []
    configs = []
    if hp.need("1G", 1) >= 1:
        configs.append(("1G", 1 * GiB))
    if hp.need("2M", 40) >= 40:
        configs.append(("2M", 64 * MiB))
    for page, cap in configs:
        try:
            s = kvstore.Store(cap, page_size=page, kernel_policy="mainline", recovery="manual")
        except kvstore.ArenaError as e:
            out.append(dict(page=page, skip=str(e)))
            continue
        n = min(cap // 400, 1_000_000)
        for i in range(n):
            s.put(b"key:%012d" % i, b"%064d" % i)
        pb = s.stats()["page_bytes"]
        where = {}
        for i in range(0, n, max(1, n // 20000)):
            k = b"key:%012d" % i
            where[k] = (s.locate(k)[0] // pb, s.locate_entry(k)[0] // pb)
        victim = next(iter(where))
        hit = where[victim][0]
        other = [k for k, (r, e) in where.items() if r != hit and e != hit] or None
        same = [k for k, (r, _e) in where.items() if r == hit]
        gaps = {"ticker (no store access)": 0.0, "reader, same hugepage": 0.0}
        if other:
            gaps["reader, other hugepages"] = 0.0
        stop = threading.Event()

        def loop(name, keys):
            last = time.perf_counter()
            i = 0
            while not stop.is_set():
                if keys:
                    try:
                        s.get(keys[i % len(keys)])
                    except kvstore.KeyLostError:
                        pass
                    i += 1
                else:
                    sum(range(50))
                now = time.perf_counter()
                gaps[name] = max(gaps[name], now - last)
                last = now

        threads = [threading.Thread(target=loop, args=("ticker (no store access)", None)),
                   threading.Thread(target=loop, args=("reader, same hugepage", same))]
        if other:
            threads.append(threading.Thread(target=loop, args=("reader, other hugepages", other)))
        for t in threads:
            t.start()
        time.sleep(0.3)
        for k in gaps:
            gaps[k] = 0.0
        s.faults.inject(s.locate(victim)[0], "ao")
        t0 = time.perf_counter()
        while s.stats()["pages_salvaged"] + s.stats()["salvage_failed"] == 0 and time.perf_counter() - t0 < 60:
            s.recover()
            time.sleep(0.001)
        took = time.perf_counter() - t0
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join()
        st = s.stats()
        out.append(dict(page=page, cap=cap, took=took, gaps=dict(gaps), degraded=st["pages_degraded_to_4k"],
                        salvaged=st["pages_salvaged"], failed=st["salvage_failed"]))
        s.close()
        print(f"[salvage] {page} done", file=sys.stderr)
    return out


def main_store_parts(opts) -> int:
    hp = C.HugePages()
    try:
        sizes = [int(float(x[:-1]) * {"k": 1e3, "M": 1e6}[x[-1]]) if x[-1] in "kM" else int(x)
                 for x in opts.sizes.split(",")]
        rows = vs_size(sizes, opts.ues or 15, hp) if "size" in opts.parts else []
        stalls = salvage_stall(hp) if "salvage" in opts.parts else []
    finally:
        hp.give_back()
    print(C.header("Recovery vs store size, memory outside the arena, salvage stall", "bench.recovery"))
    if rows:
        print(f"- one UE at a time (kind ao, keep-UE policy), {opts.ues or 15} on the subpage of a random key's "
              "record and as many on the index page of a random key's entry; time of Store.recover() "
              "(invalidate, replace the index page, quarantine, reclaim orphan records); no rebuild source")
        print("- anonymous memory: RssAnon of the process grown while inserting, per key (the arena is "
              "shared memory and not counted there)\n")
        print(C.table(["keys", "pages", "record UE p50 / p90", "index UE p50 / p90", "anon B/key",
                       "overhead B/key", "index", "fill"],
                      [[f"{r['n']:,}", r["page"], f"{_ms(r['rec50'])} / {_ms(r['rec90'])}",
                        f"{_ms(r['idx50'])} / {_ms(r['idx90'])}", f"{r['rss_per_key']:.2f}",
                        f"{r['overhead']:.1f}", f"{_fmt_bytes(r['index_bytes'])} ({r['pages']:,} pages, depth "
                        f"{r['depth']}, {r['groups']} record groups)", f"{r['fill']:.1f} s"] for r in rows]))
        if len(rows) > 1:
            a, b = rows[0], rows[-1]
            print(f"\n- p50 at {b['n']:,} keys / p50 at {a['n']:,}: record {b['rec50'] / a['rec50']:.1f}x, "
                  f"index {b['idx50'] / a['idx50']:.1f}x")
    for r in stalls:
        if "skip" in r:
            print(f"\n- salvage {r['page']}: skipped: {r['skip']}")
            continue
        gaps = ", ".join(f"{k}: {_ms(v)}" for k, v in r["gaps"].items())
        print(f"\n- salvage of one {r['page']} hugepage (store {_fmt_bytes(r['cap'])}, mainline): "
              f"{_ms(r['took'])} from the UE to the page copied back "
              f"({'into 4 KiB pages, no spare hugepage free' if r['degraded'] else 'into a spare hugepage'}); "
              f"longest gap seen by: {gaps}")
    return 0

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.recovery", description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default=None,
                    help="size,salvage: recovery time vs store size (and memory outside the arena), and "
                         "the salvage stall, instead of the design comparison")
    ap.add_argument("--sizes", default="100k,1M,4M,16M", help="store sizes for --parts size")
    ap.add_argument("--quick", action="store_true", help="50k keys, 8 UEs, no plots")
    ap.add_argument("--keys", type=int, default=None)
    ap.add_argument("--ues", type=int, default=None)
    ap.add_argument("--no-redis", action="store_true", help="skip the Redis reference")
    ap.add_argument("--designs", default=None, help="comma list of designs to run (a,b,c,d,b1,c1)")
    opts = ap.parse_args(argv)
    if opts.parts:
        return main_store_parts(opts)
    n_keys = opts.keys or (50_000 if opts.quick else 200_000)
    n_ues = opts.ues or (8 if opts.quick else 20)
    opts.steady = 0.5 if opts.quick else 1.0
    opts.gap = 0.05 if opts.quick else 0.1
    opts.timeout = 15.0
    problems: list[str] = []

    keys, vals = dataset(n_keys)
    data_bytes = n_keys * (16 + VALUE_SIZE)
    cap = max(64 * MiB, 4 * data_bytes + n_ues * 2 * MiB)
    cap = -(-cap // (2 * MiB)) * (2 * MiB)
    hp = C.HugePages()
    one_g = hp.need("1G", 1) >= 1
    a_page = "1G" if one_g else "2M"
    designs = [
        dict(name="a", page=a_page, policy="keep_ue", salvage=None, ues=n_ues, capacity=cap,
             title=f"{'1 GiB' if one_g else '2 MiB (no 1 GiB page free)'} pages, keep-UE: lose 4 KiB"),
        dict(name="b", page="2M", policy="mainline", salvage=True, ues=n_ues, capacity=cap, spares=n_ues + 2,
             title="2 MiB pages, mainline + salvage into a spare page"),
        dict(name="c", page="2M", policy="mainline", salvage=False, ues=n_ues, capacity=cap,
             title="2 MiB pages, mainline, no spare: lose the hugepage"),
        dict(name="d", page="4K", policy="mainline", salvage=None, ues=n_ues, capacity=cap,
             title="4 KiB pages: lose 4 KiB"),
        dict(name="b1", page="1G", policy="mainline", salvage=True, ues=1, capacity=cap, spares=1,
             title="1 GiB pages, mainline + salvage (1 UE: one spare page)"),
        dict(name="c1", page="1G", policy="mainline", salvage=False, ues=1, capacity=2 * GiB,
             title="1 GiB pages, mainline, no spare: lose 1 GiB (1 UE)"),
    ]
    if opts.quick:
        designs = [d for d in designs if d["name"] not in ("b1", "c1")]
    if opts.designs:
        want = set(opts.designs.split(","))
        designs = [d for d in designs if d["name"] in want]
    ue_keys = random.Random(6).sample(keys, n_ues)

    order = {d["name"]: i for i, d in enumerate(designs)}
    designs.sort(key=lambda d: d["page"] != "1G")     # the 1 GiB ones first, while pages are free
    results = []
    t_all = time.monotonic()
    replica = kvstore.Store(cap, page_size="4K", recovery="manual")
    try:
        versions = replica.mput(list(zip(keys, vals)))
        for d in designs:
            try:
                results.append(run_design(d, keys, vals, versions, replica, ue_keys, opts, hp, problems))
            except Exception as e:          # report it in the table and go on with the next design
                problems.append(f"design ({d['name']}) failed: {type(e).__name__}: {e}")
                results.append({"name": d["name"], "title": d["title"],
                                "skip": f"FAILED: {type(e).__name__}: {e}"})
            print(f"[{time.monotonic() - t_all:6.1f}s] design ({d['name']}) done"
                  + (f": skipped, {results[-1]['skip']}" if "skip" in results[-1] else ""), file=sys.stderr)
    finally:
        replica.close()
        hp.give_back()
    results.sort(key=lambda r: order[r["name"]])
    if not opts.no_redis and (not opts.designs or "redis" in opts.designs.split(",")):
        results.append(run_redis(keys, vals, opts, problems))
        print(f"[{time.monotonic() - t_all:6.1f}s] redis reference done", file=sys.stderr)

    print(C.header("Recovery: the same UEs under each memory design, and Redis", "bench.recovery"))
    print(f"- dataset: {n_keys:,} keys x 16 B, values {VALUE_SIZE} B ({_fmt_bytes(data_bytes)} of keys+values); "
          f"store capacity {_fmt_bytes(cap)}; {n_ues} UEs (kind ao: real SIGBUS BUS_MCEERR_AO via the fault "
          f"simulator, kernel policy simulated, kernel keep-UE flag accepted: "
          f"{kvstore._native.probe()['keep_ue']}) at the subpages of the same {n_ues} keys, one at a time")
    print("- rebuild source: a replica Store (4 KiB pages) in the same process, called directly (no network); "
          "Redis: master and replica redis-server on loopback")
    print("- time to full health: from the injection (Redis: the SIGKILL) until no key is LOST and no rebuild is "
          "pending (Redis: replica restarted, link up, sync done, same dbsize)")
    print("- reader: one thread reading random keys and checking every value; correct reads/s (answers equal "
          "to the dataset; errors and nil answers do not count) during recovery counts only the recovery windows "
          "(inject -> full health); embedded get() for kvstore, redis-py GET against the restarted replica "
          "for Redis (so the two read rates are not comparable with each other, only each with its steady "
          "state)")
    print("- bytes rebuilt: key+value bytes fetched from the replica; Redis: size of the RDB the master streams")
    for note in dict.fromkeys(hp.notes):
        print(f"- hugepages: {note}")
    print()
    print(report(results, n_keys, opts, problems))
    if not opts.quick and any("skip" not in r for r in results):
        for p in plots(results, n_keys):
            print(f"\nplot: {p}")
    return C.finish(problems)


if __name__ == "__main__":
    sys.exit(main())
