"""Rebuilding lost memory from a replica, against a full resync, and a UE storm.

    python -m bench.replication_rebuild [--quick] [--page-size 4K] [--skip-resync] [--skip-storm]
                                        [--index-faults N] [--stall 2M|1G]

Starts kvstore-server processes on free 127.0.0.1 ports (a primary and a
replica, fault injection on) and measures:

1. **One lost subpage**: ``--faults`` times (1,000; --quick 200) inject an
   ``ao`` UE into the subpage of a random key on the primary, then poll the
   primary's stats until the keys are invalidated and rebuilt from the
   replica. Reports p50/p99 of inject -> recovered (client side, including
   the polling round trips), keys per fault and bytes fetched per fault.
2. **Full resync**: load ``--resync-mib`` MiB (1024; --quick 64) of 4,000-byte
   values into a primary, start a new replica and time it from
   ``REPLICAOF`` to "in sync" (offsets equal): what a node must do after
   losing its whole memory (Redis after its process dies on a memory
   error). Ratio against the p50 of (1).
3. **UE storm**: ``--storm-rate`` UEs/s (100) for ``--storm-secs`` (60;
   --quick 10) on the primary while ``--clients`` processes (3) run a 80/20
   get/put mix on it, every answer checked (right key, intact bytes,
   never older than already seen). A baseline of the same length/3 without
   UEs comes first. Throughput per second, client errors, wrong answers,
   dip of the storm's mean against the baseline's.

1b. **One lost index page** (``--index-faults``, default faults / 2): the
   same with the UE aimed at the index page holding a random key's entry
   (``inject(entry=key)``); the whole hash range is rebuilt from the replica
   over ``fetch_range``. Polls until the range is rebuilt.
4. **Salvage stall** (``--stall 2M`` or ``1G``): a mainline server on
   hugepages, ``--stall-clients`` processes reading random keys and one
   process sending PING (no key: what a health check or a cluster lease
   needs of the loop); one UE at mid-run drops the whole hugepage and the
   server copies it back. The longest gap between two replies a reader and
   the pinger saw, before and after the UE, and the replies completed
   between the UE and the end of the copy.

Prints markdown with the command and the date. Measures; asserts nothing,
but exits 1 when a wrong answer was seen.
"""

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import random
import shlex
import statistics
import sys
import time

import xxhash

from kvstore.client import Client
from kvstore.server.spawn import start_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOGS = []


class Server:
    """A kvstore-server subprocess (kvstore.server.spawn) whose log is kept."""

    def __init__(self, *flags):
        self.srv = start_server(*flags, cwd=REPO, timeout=120, name="kvstore-bench-repl")
        self.port = self.srv.port
        self.proc = self.srv.proc
        LOGS.append(self.srv.logfile.name)

    def client(self, **kw):
        kw.setdefault("socket_timeout", 30)
        return Client("127.0.0.1", self.port, **kw)

    def stop(self):
        self.srv.stop(timeout=20, keep_log=True)


def repl_fields(c):
    return c._execute_command(_cmd("role"))


def _cmd(op, args=()):
    from kvstore.client._commands import Command
    return Command(op, list(args), None, True)


def wait_synced(primary, replica, timeout=600):
    cp, cr = primary.client(), replica.client()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            p, r = repl_fields(cp), repl_fields(cr)
            if (r.get("repl_master_link_status") == "up" and not r.get("repl_master_sync_in_progress")
                    and r.get("repl_slave_repl_offset") == p.get("repl_master_repl_offset")):
                return
            time.sleep(0.01)
        raise RuntimeError("replica did not catch up")
    finally:
        cp.close()
        cr.close()


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# ---------------------------------------------------------------- 1. one subpage

def bench_one_subpage(primary, nkeys, faults, value_size, where="key"):
    """``where="key"``: the UE hits a random key's record subpage; ``"entry"``:
    the index page holding its entry (a whole hash range, rebuilt with
    ``fetch_range``)."""
    c = primary.client()
    rnd = random.Random(42)
    times, keys_per, bytes_per = [], [], []
    skipped = 0
    for _ in range(faults):
        k = b"s:%07d" % rnd.randrange(nkeys)
        s0 = c.stats()
        t0 = time.perf_counter()
        try:
            c.inject("ao", **{where: k})
        except Exception:  # noqa: BLE001 - key lost right now: pick another
            skipped += 1
            continue
        while True:
            s = c.stats()
            if where == "entry":
                if s["ranges_rebuilt"] > s0["ranges_rebuilt"] and s["lost_ranges"] == 0:
                    break
            elif s["keys_lost_total"] > s0["keys_lost_total"] and s["lost_keys"] == 0:
                break
            if time.perf_counter() - t0 > 10:
                raise RuntimeError("a fault was not recovered within 10 s")
        times.append(time.perf_counter() - t0)
        keys_per.append(s["keys_lost_total"] - s0["keys_lost_total"])
        bytes_per.append(s["repl_peer_bytes_fetched"] - s0["repl_peer_bytes_fetched"])
    if where == "entry":
        st = c.stats()
        c.close()
        return {"faults": len(times), "skipped": skipped, "p50_ms": pct(times, 50) * 1e3,
                "p99_ms": pct(times, 99) * 1e3, "mean_ms": statistics.mean(times) * 1e3,
                "keys_per_fault": statistics.mean(keys_per), "bytes_per_fault": statistics.mean(bytes_per),
                "value_size": value_size, "unrecoverable": st["ranges_given_up"],
                "rebuilt_total": st["ranges_rebuilt"], "lost_total": st["index_pages_lost"]}
    st = c.stats()
    c.close()
    return {"faults": len(times), "skipped": skipped, "p50_ms": pct(times, 50) * 1e3,
            "p99_ms": pct(times, 99) * 1e3, "mean_ms": statistics.mean(times) * 1e3,
            "keys_per_fault": statistics.mean(keys_per), "bytes_per_fault": statistics.mean(bytes_per),
            "value_size": value_size, "unrecoverable": st["unrecoverable_keys"],
            "rebuilt_total": st["rebuilt_keys"], "lost_total": st["keys_lost_total"]}


# ---------------------------------------------------------------- 2. full resync

def bench_resync(flags, mib):
    vsize = 4000
    n = mib * (1 << 20) // vsize
    cap = f"{int(mib * 1.35) + 64}MiB"
    p = Server(*flags, "--capacity", cap)
    r = None
    try:
        c = p.client()
        t0 = time.perf_counter()
        val = os.urandom(vsize)
        batch = 128
        for base in range(0, n, batch):
            c.mput([(b"big:%09d" % i, val[:vsize - 9] + b"%09d" % i)
                    for i in range(base, min(n, base + batch))])
        load_s = time.perf_counter() - t0
        r = Server(*flags, "--capacity", cap)
        cr = r.client()
        t0 = time.perf_counter()
        cr._execute_command(_cmd("replicaof", ["127.0.0.1", p.port]))
        wait_synced(p, r)
        sync_s = time.perf_counter() - t0
        dp = c._execute_command(_cmd("digest"))
        dr = cr._execute_command(_cmd("digest"))
        c.close()
        cr.close()
        return {"mib": mib, "keys": n, "load_s": load_s, "sync_s": sync_s,
                "bytes": n * vsize, "digest_equal": dp == dr}
    finally:
        if r is not None:
            r.stop()
        p.stop()


# ---------------------------------------------------------------- 3. storm

STORM_KEYS = 20000


def _val(k, gen):
    body = b"%b|%d|" % (k, gen)
    return body + xxhash.xxh64(body).hexdigest().encode() + b"|" + b"." * (100 + gen % 50)


def _worker(port, wid, stop_at, start_at, q, epoch):
    c = Client("127.0.0.1", port, socket_timeout=30)
    rnd = random.Random(wid)
    per_sec = {}
    errors = 0
    wrong = 0
    seen = {}
    gen = {}
    err_samples = []
    wrong_samples = []
    while time.time() < start_at:
        time.sleep(0.001)
    while True:
        now = time.time()
        if now >= stop_at:
            break
        i = rnd.randrange(STORM_KEYS)
        k = b"m:%06d" % i
        try:
            if rnd.random() < 0.2 and i % 3 == wid % 3:     # each key has one writer
                g = gen.get(k, 0) + 1
                c.put(k, _val(k, epoch * 10**8 + 1000 * g + wid))   # newer runs write higher
                gen[k] = g
            else:
                v = c.get(k)
                kk, g, h, _ = v.split(b"|", 3)
                if kk != k or xxhash.xxh64(b"%b|%b|" % (kk, g)).hexdigest().encode() != h \
                        or int(g) < seen.get(k, 0):
                    wrong += 1
                    if len(wrong_samples) < 3:
                        wrong_samples.append(f"{k!r}: got {v[:60]!r}, had seen generation "
                                             f"{seen.get(k, 0)}")
                seen[k] = max(int(g), seen.get(k, 0))
        except Exception as e:  # noqa: BLE001
            errors += 1
            if len(err_samples) < 3:
                err_samples.append(repr(e))
        sec = int(now - start_at)
        per_sec[sec] = per_sec.get(sec, 0) + 1
    c.close()
    q.put((per_sec, errors, wrong, err_samples + wrong_samples))


def run_load(port, secs, clients, injector=None, epoch=0):
    q = mp.Queue()
    start_at = time.time() + 0.5
    stop_at = start_at + secs
    procs = [mp.Process(target=_worker, args=(port, w, stop_at, start_at, q, epoch)) for w in range(clients)]
    for pr in procs:
        pr.start()
    injected = injector(start_at, stop_at) if injector else 0
    res = [q.get(timeout=secs + 120) for _ in procs]
    for pr in procs:
        pr.join(30)
    per_sec = {}
    for ps, _e, _w, _s in res:
        for s, n in ps.items():
            if 0 <= s < secs:
                per_sec[s] = per_sec.get(s, 0) + n
    series = [per_sec.get(s, 0) for s in range(secs)]
    return {"series": series, "errors": sum(r[1] for r in res), "wrong": sum(r[2] for r in res),
            "samples": [s for r in res for s in r[3]][:5], "injected": injected}


def bench_storm(primary, rate, secs, clients):
    c = primary.client()
    for base in range(0, STORM_KEYS, 1000):
        c.mput([(b"m:%06d" % i, _val(b"m:%06d" % i, 0)) for i in range(base, base + 1000)])
    base_secs = max(5, secs // 3)
    baseline = run_load(primary.port, base_secs, clients)
    s0 = c.stats()

    def injector(start_at, stop_at):
        ic = primary.client()
        rnd = random.Random(9)
        n = 0
        while time.time() < start_at:
            time.sleep(0.001)
        t = start_at
        while t < stop_at:
            try:
                ic.inject("ao", key=b"m:%06d" % rnd.randrange(STORM_KEYS))
                n += 1
            except Exception:  # noqa: BLE001 - a key lost right now
                pass
            t += 1.0 / rate
            d = t - time.time()
            if d > 0:
                time.sleep(d)
        ic.close()
        return n

    storm = run_load(primary.port, secs, clients, injector, epoch=1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        s1 = c.stats()
        if s1["lost_keys"] == 0 and s1["rebuild_pending"] == 0:
            break
        time.sleep(0.05)
    c.close()
    return baseline, storm, s0, s1


# ---------------------------------------------------------------- 4. salvage stall

def _stall_worker(port, wid, start_at, stop_at, nkeys, q, ping=False):
    # retries=0: a LOST reply counts as a reply (the client's own retry
    # backoff is not a server stall)
    c = Client("127.0.0.1", port, socket_timeout=30, retries=0)
    rnd = random.Random(wid)
    gaps = []          # (gap seconds, time it ended)
    errors = 0
    while time.time() < start_at:
        time.sleep(0.001)
    last = time.time()
    while True:
        try:
            if ping:
                c.ping()
            else:
                c.get(b"s:%07d" % rnd.randrange(nkeys))
        except Exception:  # noqa: BLE001 - a LOST answer still is an answer
            errors += 1
        now = time.time()
        gaps.append((now - last, now))
        last = now
        if now >= stop_at:
            break
    c.close()
    ends = [end for _g, end in gaps]
    gaps.sort(reverse=True)
    q.put((wid, ping, gaps[:50], errors, len(gaps), ends))


def bench_salvage_stall(page_size, clients, nkeys=200_000, value_size=200, secs=4.0):
    """A mainline server on ``page_size`` pages; ``clients`` processes read
    random keys; one ``ao`` UE at mid-run makes the kernel drop the whole
    hugepage, which the server salvages. The longest gap between two
    replies a client saw, before the UE and from the UE on."""
    cap = "1GiB" if page_size.upper().startswith("1G") else "128MiB"
    p = Server("--page-size", page_size, "--kernel-policy", "mainline", "--enable-fault-injection",
               "--capacity", cap, "--log-level", os.environ.get("BENCH_LOG", "warning"))
    try:
        c = p.client()
        for base in range(0, nkeys, 2000):
            c.mput([(b"s:%07d" % i, os.urandom(value_size)) for i in range(base, min(nkeys, base + 2000))])
        q = mp.Queue()
        start_at = time.time() + 0.5
        stop_at = start_at + secs
        procs = [mp.Process(target=_stall_worker, args=(p.port, w, start_at, stop_at, nkeys, q))
                 for w in range(clients)]
        procs.append(mp.Process(target=_stall_worker,
                                args=(p.port, clients, start_at, stop_at, nkeys, q, True)))
        for pr in procs:
            pr.start()
        s0 = c.stats()
        while time.time() < start_at + secs / 2:
            time.sleep(0.005)
        t_ue = time.time()
        c.inject("ao", key=b"s:%07d" % 12345)
        while time.time() < t_ue + 10:
            s1 = c.stats()
            if s1["pages_salvaged"] + s1["salvage_failed"] > s0["pages_salvaged"] + s0["salvage_failed"]:
                break
            time.sleep(0.002)
        t_done = time.time()
        res = [q.get(timeout=secs + 60) for _ in procs]
        for pr in procs:
            pr.join(30)
        s1 = c.stats()
        c.close()
        readers = [r for r in res if not r[1]]
        pinger = [r for r in res if r[1]]

        def longest(rs, after):
            return max((g for r in rs for g, end in r[2] if (end >= t_ue) == after), default=0.0)

        def during(rs):
            return sum(1 for r in rs for end in r[5] if t_ue < end < t_done)
        return {"page_size": page_size, "capacity": cap, "clients": clients,
                "before_ms": longest(readers, False) * 1e3, "after_ms": longest(readers, True) * 1e3,
                "ping_before_ms": longest(pinger, False) * 1e3,
                "ping_after_ms": longest(pinger, True) * 1e3,
                "reads_during": during(readers), "pings_during": during(pinger),
                "detect_ms": (t_done - t_ue) * 1e3,
                "salvaged": s1["pages_salvaged"] - s0["pages_salvaged"],
                "failed": s1["salvage_failed"] - s0["salvage_failed"],
                "degraded": s1.get("pages_degraded_to_4k", 0) - s0.get("pages_degraded_to_4k", 0),
                "errors": sum(r[3] for r in readers), "replies": sum(r[4] for r in readers),
                "backing": s1.get("backing")}
    finally:
        p.stop()


def _stall_section(st):
    return ["## 4. Salvage stall under the server", "",
            f"Mainline policy, {st['page_size']} pages ({st['backing']}), capacity {st['capacity']}, "
            f"{st['clients']} client processes reading random keys; one `ao` UE at mid-run "
            f"drops the whole hugepage, which the server copies into a spare one "
            f"(salvaged: {st['salvaged']}, of which into 4 KiB pages for want of a free "
            f"hugepage: {st['degraded']}, failed: {st['failed']}; seen done "
            f"{st['detect_ms']:.0f} ms after the inject, polling). "
            f"{st['replies']} replies, {st['errors']} errors; one more process sends PING.", "",
            "| longest gap between replies | before the UE | from the UE on | replies between "
            "the UE and the copy done |",
            "| --- | --- | --- | --- |",
            f"| readers of random keys | {st['before_ms']:.1f} ms | **{st['after_ms']:.1f} ms** | "
            f"{st['reads_during']} |",
            f"| PING (no key) | {st['ping_before_ms']:.1f} ms | **{st['ping_after_ms']:.1f} ms** | "
            f"{st['pings_during']} |", ""]


# ---------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.replication_rebuild")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--page-size", default="4K", help="arena page size of the servers (default 4K)")
    ap.add_argument("--kernel-policy", default="keep_ue")
    ap.add_argument("--faults", type=int)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--value-size", type=int, default=200)
    ap.add_argument("--resync-mib", type=int)
    ap.add_argument("--storm-rate", type=int, default=100)
    ap.add_argument("--storm-secs", type=int)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--skip-resync", action="store_true")
    ap.add_argument("--skip-storm", action="store_true")
    ap.add_argument("--index-faults", type=int, help="UEs aimed at index pages (default: --faults / 2)")
    ap.add_argument("--stall", metavar="PAGE", help="also measure the salvage stall under the server "
                    "with clients on PAGE pages (2M or 1G), mainline policy")
    ap.add_argument("--stall-clients", type=int, default=3)
    ap.add_argument("--stall-only", action="store_true",
                    help="run only the salvage stall (--stall, default 2M)")
    a = ap.parse_args(argv)
    faults = a.faults or (200 if a.quick else 1000)
    mib = a.resync_mib or (64 if a.quick else 1024)
    secs = a.storm_secs or (10 if a.quick else 60)
    flags = ["--page-size", a.page_size, "--kernel-policy", a.kernel_policy,
             "--enable-fault-injection", "--log-level", os.environ.get("BENCH_LOG", "warning")]

    out = ["# Replication: rebuild from a replica vs full resync, UE storm", "",
           f"- command: `python -m bench.replication_rebuild {shlex.join(sys.argv[1:] if argv is None else argv)}`",
           f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
           f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
           f"Python {platform.python_version()}; servers on 127.0.0.1, page size {a.page_size}, "
           f"kernel policy {a.kernel_policy} (simulated UEs, `ao`)", ""]
    problems = []
    if a.stall_only:
        out += _stall_section(bench_salvage_stall(a.stall or "2M", a.stall_clients))
        print("\n".join(out))
        return 0

    cap = f"{max(256, a.keys * (a.value_size + 64) * 3 // (1 << 20))}MiB"
    p = Server(*flags, "--capacity", cap)
    r = Server(*flags, "--capacity", cap, "--replica-of", f"127.0.0.1:{p.port}")
    try:
        c = p.client()
        for base in range(0, a.keys, 2000):
            c.mput([(b"s:%07d" % i, os.urandom(a.value_size))
                    for i in range(base, min(a.keys, base + 2000))])
        c.close()
        wait_synced(p, r)
        one = bench_one_subpage(p, a.keys, faults, a.value_size)
        out += ["## 1. One lost 4 KiB subpage, rebuilt from the replica", "",
                f"{a.keys} keys, {a.value_size}-byte values; {one['faults']} faults "
                f"(inject `ao` on a random key's subpage, poll the primary's stats until "
                f"its keys were invalidated and are all present again).", "",
                "| p50 | p99 | mean | keys per fault | bytes fetched per fault | unrecoverable |",
                "| --- | --- | --- | --- | --- | --- |",
                f"| {one['p50_ms']:.2f} ms | {one['p99_ms']:.2f} ms | {one['mean_ms']:.2f} ms | "
                f"{one['keys_per_fault']:.1f} | {one['bytes_per_fault']:.0f} B | {one['unrecoverable']} |",
                ""]
        if one["unrecoverable"]:
            problems.append("keys ended unrecoverable with a healthy replica")
        nidx = a.index_faults if a.index_faults is not None else faults // 2
        if nidx:
            ix = bench_one_subpage(p, a.keys, nidx, a.value_size, where="entry")
            out += ["## 1b. One lost 4 KiB index page, its hash range rebuilt from the replica", "",
                    f"Same store; {ix['faults']} faults (inject `ao` into the index page holding a "
                    f"random key's entry, poll the primary's stats until the range is rebuilt with "
                    f"`fetch_range` and no range is lost).", "",
                    "| p50 | p99 | mean | keys per fault | ranges given up |",
                    "| --- | --- | --- | --- | --- |",
                    f"| {ix['p50_ms']:.2f} ms | {ix['p99_ms']:.2f} ms | {ix['mean_ms']:.2f} ms | "
                    f"{ix['keys_per_fault']:.1f} | {ix['unrecoverable']} |", ""]
            if ix["unrecoverable"]:
                problems.append("index ranges given up with a healthy replica")
        if not a.skip_storm:
            baseline, storm, s0, s1 = bench_storm(p, a.storm_rate, secs, a.clients)
            bm = statistics.mean(baseline["series"])
            sm = statistics.mean(storm["series"])
            dip = 1 - sm / bm if bm else float("nan")
            worst = 1 - min(storm["series"]) / bm if bm else float("nan")
            out += ["## 3. UE storm", "",
                    f"{a.storm_rate} UEs/s requested for {secs} s ({storm['injected']} injected) on the "
                    f"primary; {a.clients} client processes, 80/20 get/put over {STORM_KEYS} keys, "
                    f"every answer verified. Baseline {len(baseline['series'])} s without UEs first.", "",
                    "| | ops/s mean | min second | client errors | wrong answers |",
                    "| --- | --- | --- | --- | --- |",
                    f"| baseline | {bm:.0f} | {min(baseline['series'])} | {baseline['errors']} | "
                    f"{baseline['wrong']} |",
                    f"| storm | {sm:.0f} | {min(storm['series'])} | {storm['errors']} | {storm['wrong']} |",
                    "",
                    f"Dip of the mean: {dip * 100:.1f}% (worst second {worst * 100:.1f}%). "
                    f"Keys lost during the storm: {s1['keys_lost_total'] - s0['keys_lost_total']}, "
                    f"rebuilt: {s1['rebuilt_keys'] - s0['rebuilt_keys']} (the rest were overwritten by "
                    f"clients while lost), unrecoverable: {s1['unrecoverable_keys']}, "
                    f"still lost after 30 s: {s1['lost_keys']}. Peer fetches: "
                    f"{s1['repl_peer_fetches'] - s0['repl_peer_fetches']}, fetch errors/timeouts: "
                    f"{s1['repl_peer_fetch_errors'] - s0['repl_peer_fetch_errors']}, read-repairs: "
                    f"{s1['read_repairs'] - s0['read_repairs']} (over 50 ms: "
                    f"{s1['repl_slow_read_repairs'] - s0['repl_slow_read_repairs']}, total "
                    f"{s1['repl_read_repair_ms_total'] - s0['repl_read_repair_ms_total']} ms of "
                    f"blocked loop).", "",
                    "Per second, storm: " + " ".join(str(x) for x in storm["series"]), "",
                    "Per second, baseline: " + " ".join(str(x) for x in baseline["series"]), ""]
            if storm["errors"] or storm["wrong"]:
                out.append(f"Error / wrong-answer samples: {storm['samples']}")
                out.append("")
            if storm["wrong"] or baseline["wrong"]:
                problems.append("wrong answers")
    finally:
        r.stop()
        p.stop()

    if not a.skip_resync:
        rs = bench_resync(flags, mib)
        ratio = rs["sync_s"] * 1e3 / one["p50_ms"]
        out += ["## 2. Full resync of the dataset to a new replica", "",
                f"{rs['mib']} MiB as {rs['keys']} keys of 4,000 bytes (load took {rs['load_s']:.1f} s). "
                f"`replicaof` -> offsets equal: **{rs['sync_s']:.2f} s** "
                f"({rs['bytes'] / rs['sync_s'] / 2**20:.0f} MiB/s); digests equal: {rs['digest_equal']}.",
                "",
                f"Ratio full resync / one-subpage rebuild (p50): **{ratio:,.0f}x** "
                f"({rs['bytes'] / max(1, one['bytes_per_fault']):,.0f}x the bytes).", ""]
        if not rs["digest_equal"]:
            problems.append("resynced replica differs")
    if a.stall:
        out += _stall_section(bench_salvage_stall(a.stall, a.stall_clients))
    print("\n".join(out))
    if os.environ.get("BENCH_KEEP_LOGS"):
        print("server logs: " + " ".join(LOGS))
        return 0
    if problems:
        print("PROBLEMS: " + "; ".join(problems) + "\nserver logs: " + " ".join(LOGS))
        return 1
    for name in LOGS:
        os.unlink(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
