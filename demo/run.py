"""kvstore-demo: a primary and a replica surviving a stream of memory errors, live.

Starts two ``kvstore-server`` processes on 127.0.0.1 (a primary, and a
replica of it on 4 KiB pages), loads keys into the primary through
``kvstore.client``, then runs a read/write load from a few client threads
while a stream of uncorrectable memory errors is injected into the
primary's arena (``inject(kind, key=...)``: the fault simulator sends real
SIGBUS signals into the real handler). The primary drops only the records in
each poisoned 4 KiB subpage and rebuilds them from the replica. Every read
is checked against what was written: wrong answers must stay 0. A table
refreshes with ops/s, memory errors, keys lost, keys rebuilt, wrong answers
and client errors; at the end every key is checked on both servers.
Exits 1 if any answer was wrong, any client call failed or a key did not
come back; 0 otherwise.

    python -m kvstore.demo                        # 10 s, 100k keys, 20 UEs/s
    python -m kvstore.demo --seconds 30 --ue-rate 100 --kernel-policy mainline
    python -m kvstore.demo --embedded             # both stores in this process
    python -m kvstore.demo --cluster              # 3 shards, a primary killed (demo/cluster.py)

``--kernel-policy keep_ue`` (the default) is simulated unless the kernel
really has ``MFD_MF_KEEP_UE_MAPPED``: the handler acts as such a kernel
would (the hugepage stays mapped, 4 KiB is lost). ``--page-size auto`` uses
1 GiB or 2 MiB hugepages when reserved (``kvstore-hugepages reserve 2G``)
and otherwise falls back to 4 KiB pages and says so.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import threading
import time

import kvstore

KINDS = ("ao", "ar", "hwpoison")


# -- output -----------------------------------------------------------------

def _bar(done, total, width=30):
    filled = int(width * done / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + f"] {done:,}/{total:,}"


class Display:
    """The live view: a table redrawn in place on a terminal, one plain line
    per refresh otherwise (logs, CI, pipes)."""

    ROWS = (("ops/s", "ops_s"), ("operations", "ops"), ("memory errors (UEs)", "ues"),
            ("subpages lost", "subpages"), ("keys lost", "lost"), ("keys rebuilt", "rebuilt"),
            ("keys lost right now", "lost_now"), ("wrong answers", "wrong"),
            ("client errors", "errors"))

    def __init__(self, live, seconds):
        self.live = live
        self.seconds = seconds
        self.drawn = 0

    def progress(self, done, total, final=False):
        if self.live or final:
            print("\rloading " + _bar(done, total), end="\n" if final else "", flush=True)

    def row(self, elapsed, values):
        if not self.live:
            print(f"{elapsed:5.1f}s  ops/s {values['ops_s']:>8,}  UEs {values['ues']:>5,}  "
                  f"keys lost {values['lost']:>6,}  rebuilt {values['rebuilt']:>6,}  "
                  f"lost now {values['lost_now']:>4,}  wrong answers {values['wrong']}  "
                  f"client errors {values['errors']}", flush=True)
            return
        lines = [f"+-- {elapsed:5.1f} s of {self.seconds:g} s " + "-" * 21,
                 *(f"| {label:<22}{values[key]:>14,}" for label, key in self.ROWS),
                 "+" + "-" * 37]
        out = []
        if self.drawn:
            out.append(f"\x1b[{self.drawn}F")           # back to the table's first line
        out.extend(line + "\x1b[K\n" for line in lines)
        sys.stdout.write("".join(out))
        sys.stdout.flush()
        self.drawn = len(lines)


def _describe_backing(st, requested_page, requested_policy):
    """Lines saying what memory the store got and what was simulated."""
    out = [f"arena: {st['backing']} ({st['arena_bytes']:,} bytes, {st['page_size']} pages)"]
    if st.get("fallback_reason"):
        out.append(f"  fell back: {st['fallback_reason']}")
    elif requested_page == "auto" and st["page_size"] == "4K":
        out.append("  no hugepages reserved: running on 4 KiB pages "
                   "(reserve some with `kvstore-hugepages reserve 2G`)")
    policy = st["kernel_policy"]
    if requested_policy != "auto" and not (policy == "keep_ue" and st["keep_ue"]):
        out.append(f"kernel policy: {policy}, simulated (MFD_MF_KEEP_UE_MAPPED in this kernel: "
                   f"{'yes' if st['keep_ue'] else 'no'})")
    else:
        out.append(f"kernel policy: {policy}")
    out.append("memory errors: simulated (real SIGBUS signals into the real handler)")
    return out


# -- servers ----------------------------------------------------------------

def ServerProcess(name, flags, timeout=30.0):
    """One ``kvstore-server`` subprocess (:mod:`kvstore.server.spawn`): its log
    (stderr) goes to a temp file, shown if it fails."""
    from kvstore.server.spawn import start_server
    srv = start_server(*flags, timeout=timeout, name=f"kvstore-demo-{name}")
    srv.name = name
    return srv


def _wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def _replica_caught_up(primary, replica):
    p, r = primary.stats(), replica.stats()
    return (r.get("repl_master_link_status") == "up" and not r.get("repl_master_sync_in_progress")
            and r.get("repl_slave_repl_offset") == p.get("repl_master_repl_offset"))


# -- the load ---------------------------------------------------------------

class Tally:
    """Counters shared by the client threads (under one lock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ops = self.wrong = self.errors = self.lost_retried = 0
        self.messages = []
        self.kinds = {}             # error code (or class name) -> count of calls

    def error(self, n, exc):
        with self.lock:
            self.errors += n
            kind = getattr(exc, "code", None) or type(exc).__name__
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            if len(self.messages) < 5:
                self.messages.append(f"{type(exc).__name__}: {exc}")


def _value(i, gen, size):
    head = b"%d:%d:" % (i, gen)
    return head + bytes([65 + (i + gen) % 26]) * max(0, size - len(head))


def _worker(client, keys, expected, mine, gens, args, stop, tally, seed):
    """Pipelined get/put batches on this thread's own keys (``mine``: key
    indices no other thread writes), each read checked against what was
    written. A key whose write failed may hold the old or the new value: both
    are accepted from then on (``expected[i]`` becomes a tuple)."""
    from kvstore import client as kvc
    rng = random.Random(seed)
    batch = min(args.batch, len(mine))
    while not stop.is_set():
        idx = rng.sample(mine, batch)          # distinct keys: order within a batch is moot
        ops = []
        with client.pipeline() as pipe:
            for i in idx:
                if rng.random() < args.write_ratio:
                    gens[i] += 1
                    v = _value(i, gens[i], args.value_size)
                    pipe.put(keys[i], v)
                    ops.append((i, v))
                else:
                    pipe.get(keys[i])
                    ops.append((i, None))
            try:
                results = pipe.execute(raise_on_error=False)
            except kvc.Error as e:              # the whole batch failed (connection, timeout)
                for i, v in ops:
                    if v is not None:
                        expected[i] = _accept(expected[i]) + (v,)
                tally.error(len(ops), e)
                continue
        wrong = errors = retried = 0
        for (i, v), res in zip(ops, results):
            if v is not None:                   # a put
                if isinstance(res, Exception):
                    expected[i] = _accept(expected[i]) + (v,)
                    errors += 1
                    tally.error(0, res)
                else:
                    expected[i] = v
                continue
            if isinstance(res, kvc.KeyLostError):
                retried += 1                    # being rebuilt: ask again, the client retries
                try:
                    res = client.get(keys[i])
                except kvc.Error as e:
                    res = e
            if isinstance(res, Exception):
                errors += 1
                tally.error(0, res)
            elif res not in _accept(expected[i]):
                wrong += 1
        with tally.lock:
            tally.ops += len(ops)
            tally.wrong += wrong
            tally.errors += errors
            tally.lost_retried += retried


def _accept(e):
    return e if isinstance(e, tuple) else (e,)


def _injector(client, keys, kinds, rate, stop, counts, problems):
    from kvstore import client as kvc
    rng = random.Random(11)
    period = 1.0 / rate
    nxt = time.monotonic()
    while True:
        nxt += period
        if stop.wait(max(0.0, nxt - time.monotonic())):
            return
        kind = rng.choice(kinds)
        try:
            client.inject(kind, key=keys[rng.randrange(len(keys))])
            counts[kind] = counts.get(kind, 0) + 1
        except kvc.KeyLostError:
            counts["skipped"] = counts.get("skipped", 0) + 1   # that record is lost already
        except kvc.Error as e:
            problems.append(f"injection refused: {type(e).__name__}: {e}")
            return


def _check_all(client, keys, expected, chunk=2000, examples=None):
    """(wrong, lost) over every key, read with mget; the first five wrong
    answers go to ``examples`` as (key, value, expected) when it is a list."""
    from kvstore import client as kvc
    wrong = lost = 0
    for s in range(0, len(keys), chunk):
        got = client.mget(keys[s:s + chunk], on_lost="mark")
        for j, v in enumerate(got):
            if v is kvc.LOST:
                lost += 1
            elif v not in _accept(expected[s + j]):
                wrong += 1
                if examples is not None and len(examples) < 5:
                    examples.append((keys[s + j], v, expected[s + j]))
    return wrong, lost


def run_servers(args) -> int:
    from kvstore.client import Client

    live = sys.stdout.isatty() and not args.plain
    display = Display(live, args.seconds)
    kinds = args.kinds
    common = ["--capacity", args.capacity, "--kernel-policy", args.kernel_policy,
              "--enable-fault-injection", "--log-level", "warning"]
    servers = []
    clients = []
    threads = []
    stop = threading.Event()
    failed = False
    try:
        primary_srv = ServerProcess("primary", [*common, "--page-size", args.page_size])
        servers.append(primary_srv)
        replica_srv = ServerProcess("replica", [*common, "--page-size", "4K",
                                                "--replica-of", primary_srv.address])
        servers.append(replica_srv)

        def client(srv):
            c = Client(srv.host, srv.port, socket_timeout=15, retries=10, retry_backoff=0.02,
                       retry_backoff_max=0.5)
            clients.append(c)
            return c

        primary, replica = client(primary_srv), client(replica_srv)
        pst, rst = primary.stats(), replica.stats()
        print(f"primary  {primary_srv.address} (pid {primary_srv.proc.pid})")
        for line in _describe_backing(pst, args.page_size, args.kernel_policy):
            print("  " + line)
        print(f"replica  {replica_srv.address} (pid {replica_srv.proc.pid}), "
              f"arena: {rst['backing']} ({rst['page_size']} pages)")
        _wait(lambda: _replica_caught_up(primary, replica), 30, "the replica to connect")

        keys = [b"key:%08d" % i for i in range(args.keys)]
        expected = [_value(i, 0, args.value_size) for i in range(args.keys)]
        gens = [0] * args.keys
        t0 = time.monotonic()
        step = 2000
        for s in range(0, args.keys, step):
            primary.mput(zip(keys[s:s + step], expected[s:s + step]))
            display.progress(min(s + step, args.keys), args.keys)
        display.progress(args.keys, args.keys, final=True)
        _wait(lambda: _replica_caught_up(primary, replica), 60, "the replica to catch up")
        print(f"loaded {args.keys:,} keys of {args.value_size} bytes in "
              f"{time.monotonic() - t0:.1f} s; replica in sync")
        print(f"running {args.seconds:g} s: {args.threads} client threads "
              f"({args.write_ratio:.0%} writes), {args.ue_rate:g} memory errors/s "
              f"({', '.join(kinds)}) into the primary")

        tally = Tally()
        counts, problems = {}, []
        for t in range(args.threads):
            mine = list(range(t, args.keys, args.threads))
            if not mine:
                continue
            th = threading.Thread(target=_worker, name=f"client-{t}", daemon=True,
                                  args=(client(primary_srv), keys, expected, mine, gens, args,
                                        stop, tally, 100 + t))
            threads.append(th)
        if args.ue_rate > 0:
            threads.append(threading.Thread(
                target=_injector, name="injector", daemon=True,
                args=(client(primary_srv), keys, kinds, args.ue_rate, stop, counts, problems)))
        start = last = time.monotonic()
        for th in threads:
            th.start()
        last_ops = 0
        interval = 0.5 if live else 1.0
        while True:
            remaining = args.seconds - (time.monotonic() - start)
            if stop.wait(max(0.0, min(interval, remaining))):
                break
            for srv in servers:
                if not srv.alive():
                    raise RuntimeError(f"the {srv.name} server exited "
                                       f"(code {srv.proc.returncode}):\n{srv.log_tail()}")
            now = time.monotonic()
            st = primary.stats()
            with tally.lock:
                ops, wrong, errors = tally.ops, tally.wrong, tally.errors
            display.row(now - start, {
                "ops_s": int((ops - last_ops) / max(now - last, 1e-9)), "ops": ops,
                "ues": counts.get("ao", 0) + counts.get("ar", 0) + counts.get("hwpoison", 0),
                "subpages": st["lost_subpages"], "lost": st["keys_lost_total"],
                "rebuilt": st["rebuilt_keys"], "lost_now": st["lost_keys"],
                "wrong": wrong, "errors": errors})
            last, last_ops = now, ops
            if now - start >= args.seconds:
                break
        stop.set()
        for th in threads:
            th.join(30)
        elapsed = time.monotonic() - start
        for p in problems:
            print(p, file=sys.stderr)

        # every key, on both servers, once the primary is healthy again
        try:
            _wait(lambda: primary.stats()["lost_keys"] == 0, 30, "the primary's rebuilds")
        except RuntimeError as e:
            print(e, file=sys.stderr)
        _wait(lambda: _replica_caught_up(primary, replica), 30, "the replica to catch up")
        bad_p, lost_p = _check_all(primary, keys, expected)
        bad_r, lost_r = _check_all(replica, keys, expected)
        st = primary.stats()
        ues = sum(counts.get(k, 0) for k in KINDS)
        print()
        print("summary")
        print(f"  operations            {tally.ops:,} in {elapsed:.1f}s ({tally.ops / elapsed:,.0f}/s), "
              f"{args.threads} client threads")
        by_kind = ", ".join(f"{k} {counts[k]:,}" for k in KINDS if counts.get(k))
        print(f"  memory errors         {ues:,} injected ({by_kind or 'none'}); primary saw "
              f"{st['faults_injected']:,}, signals AO {st['signals_ao']:,} AR {st['signals_ar']:,}")
        print(f"  subpages lost         {st['lost_subpages']:,} of {st['arena_bytes'] // 4096:,} "
              f"({st['lost_subpages'] * 4:,} KiB) on {st['backing']}; pages salvaged "
              f"{st['pages_salvaged']}")
        print(f"  keys lost / rebuilt   {st['keys_lost_total']:,} / {st['rebuilt_keys']:,} "
              f"(read-repaired: {st['read_repairs']:,}); unrecoverable {st['unrecoverable_keys']}")
        print(f"  reads that met LOST   {tally.lost_retried:,} (retried by the client)")
        print(f"  wrong answers         {tally.wrong + bad_p + bad_r} ({tally.wrong} during the run; "
              f"final check of all {args.keys:,} keys: {bad_p} primary, {bad_r} replica)")
        print(f"  keys still lost       {lost_p} on the primary, {lost_r} on the replica")
        print(f"  client errors         {tally.errors}")
        for m in tally.messages:
            print(f"    {m}")
        failed = bool(tally.wrong or bad_p or bad_r or lost_p or lost_r or tally.errors)
        print("result: " + ("FAILED" if failed else "OK (no wrong answers, no client errors, "
                                                     "every key back)"))
        return 1 if failed else 0
    except RuntimeError as e:
        failed = True
        print(f"\nkvstore-demo: {e}", file=sys.stderr)
        return 1
    finally:
        stop.set()
        for th in threads:
            th.join(5)
        for c in clients:
            c.close()
        for srv in reversed(servers):
            srv.stop(keep_log=failed)
            if failed:
                print(f"({srv.name} server log kept: {srv.logfile.name})", file=sys.stderr)


# -- embedded mode (one process, no servers) ----------------------------------

def run_embedded(args) -> int:
    from kvstore.store import parse_size

    live = sys.stdout.isatty() and not args.plain
    display = Display(live, args.seconds)
    kinds = args.kinds
    rng = random.Random(7)

    replica = kvstore.Store(args.capacity, page_size="4K", recovery="manual")
    primary = kvstore.Store(args.capacity, page_size=args.page_size,
                            kernel_policy=args.kernel_policy, rebuild_source=replica)
    try:
        print("primary store (in this process)")
        for line in _describe_backing(primary.stats(), args.page_size, args.kernel_policy):
            print("  " + line)
        print(f"replica store (in this process), arena: {replica.stats()['backing']}; "
              f"capacity {parse_size(args.capacity):,} bytes each")

        keys = [b"key:%08d" % i for i in range(args.keys)]
        expected = {}
        t0 = time.monotonic()
        for i, k in enumerate(keys):
            v = _value(i, 0, args.value_size)
            replica.put_versioned(k, v, primary.put(k, v))
            expected[k] = v
            if i % 20000 == 0:
                display.progress(i + 1, len(keys))
        display.progress(len(keys), len(keys), final=True)
        print(f"loaded {len(keys):,} keys in {time.monotonic() - t0:.1f} s")

        stop = threading.Event()
        counts = {}

        def injector():
            period = 1.0 / args.ue_rate if args.ue_rate > 0 else None
            r = random.Random(11)
            while period and not stop.wait(period):
                kind = r.choice(kinds)
                try:
                    primary.faults.inject_key(r.choice(keys), kind)
                    counts[kind] = counts.get(kind, 0) + 1
                except kvstore.KeyLostError:
                    pass  # that record is already lost; pick another next time
                except kvstore.Error as e:
                    print(f"\ninjection refused: {e}", file=sys.stderr)
                    return

        ops = wrong = errors = 0
        thread = threading.Thread(target=injector, daemon=True)
        thread.start()
        start = last = time.monotonic()
        last_ops = 0
        interval = 0.5 if live else 1.0
        try:
            while True:
                now = time.monotonic()
                if now - start >= args.seconds:
                    break
                for _ in range(2000):
                    k = keys[rng.randrange(len(keys))]
                    if rng.random() < args.write_ratio:
                        v = expected[k][:-1] + bytes([rng.randrange(65, 91)])
                        replica.put_versioned(k, v, primary.put(k, v))
                        expected[k] = v
                    else:
                        try:
                            got = primary.get(k)
                        except kvstore.Error:
                            errors += 1
                            continue
                        if got != expected[k]:
                            wrong += 1
                    ops += 1
                if now - last >= interval:
                    s = primary.stats()
                    display.row(now - start, {
                        "ops_s": int((ops - last_ops) / (now - last)), "ops": ops,
                        "ues": sum(counts.values()), "subpages": s["lost_subpages"],
                        "lost": s["keys_lost_total"], "rebuilt": s["rebuilt_keys"],
                        "lost_now": s["lost_keys"], "wrong": wrong, "errors": errors})
                    last, last_ops = now, ops
        finally:
            stop.set()
            thread.join()
        primary.wait_recovered(timeout=30)
        bad = lost = 0
        for k in keys:
            try:
                if primary.get(k) != expected[k]:
                    bad += 1
            except kvstore.KeyLostError:
                lost += 1
        s = primary.stats()
        elapsed = time.monotonic() - start
        ues = sum(counts.values())
        by_kind = ", ".join(f"{k} {counts[k]:,}" for k in KINDS if counts.get(k))
        print()
        print("summary")
        print(f"  operations            {ops:,} in {elapsed:.1f}s ({ops / elapsed:,.0f}/s), embedded")
        print(f"  memory errors         {ues:,} injected ({by_kind or 'none'}); "
              f"signals AO {s['signals_ao']:,} AR {s['signals_ar']:,} ADRERR {s['signals_adrerr']:,}")
        print(f"  subpages lost         {s['lost_subpages']:,} of {s['arena_bytes'] // 4096:,} "
              f"({s['lost_subpages'] * 4:,} KiB) on {s['backing']}; pages salvaged "
              f"{s['pages_salvaged']}")
        print(f"  keys lost / rebuilt   {s['keys_lost_total']:,} / {s['rebuilt_keys']:,} "
              f"(read-repaired: {s['read_repairs']:,}); unrecoverable {s['unrecoverable_keys']}")
        print(f"  wrong answers         {wrong + bad} ({wrong} during the run, {bad} in the final "
              f"check of all {len(keys):,} keys)")
        print(f"  keys still lost       {lost}")
        print(f"  client errors         {errors}")
        failed = bool(wrong or bad or lost or errors)
        print("result: " + ("FAILED" if failed else "OK (no wrong answers, no client errors, "
                                                     "every key back)"))
        return 1 if failed else 0
    finally:
        primary.close()
        replica.close()


# -- command line ---------------------------------------------------------------

def _positive(kind):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
        return v
    return parse


def _rate(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= v <= 100000:
        raise argparse.ArgumentTypeError(f"must be between 0 and 100000: {text!r}")
    return v


def _ratio(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {text!r}")
    return v


def _kinds(text):
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if not kinds or bad:
        raise argparse.ArgumentTypeError(f"fault kinds are {', '.join(KINDS)}: got {text!r}")
    return kinds


def build_parser():
    ap = argparse.ArgumentParser(prog="kvstore-demo", description=__doc__.split("\n\n")[0],
                                 epilog="Exit status: 0 if every answer was right, 1 otherwise.")
    ap.add_argument("--seconds", type=_positive(float), default=None,
                    help="how long the load runs (default 10; 20 with --cluster)")
    ap.add_argument("--keys", type=_positive(int), default=None,
                    help="keys loaded (default 100k; 30k with --cluster)")
    ap.add_argument("--ue-rate", type=_rate, default=20.0,
                    help="memory errors injected per second (default 20; 0 = none)")
    ap.add_argument("--kinds", type=_kinds, default=["ao", "ar"],
                    help="fault kinds to inject, comma separated (default ao,ar)")
    ap.add_argument("--value-size", type=_positive(int), default=64)
    ap.add_argument("--threads", type=_positive(int), default=4, help="client threads (default 4)")
    ap.add_argument("--batch", type=_positive(int), default=32,
                    help="operations per pipelined batch of a client thread (default 32)")
    ap.add_argument("--write-ratio", type=_ratio, default=0.2, help="share of puts (default 0.2)")
    ap.add_argument("--capacity", default=None,
                    help="arena size of each store (default 256MiB; 64MiB with --cluster)")
    ap.add_argument("--page-size", default="auto",
                    help='primary pages: "auto" (hugepages if reserved), "1G", "2M" or "4K"; '
                         "the replica always uses 4K (with --cluster: every node's pages)")
    ap.add_argument("--kernel-policy", default="keep_ue", choices=("keep_ue", "mainline", "auto"),
                    help='"keep_ue" (default, simulated: lose only 4 KiB), "mainline" or "auto"')
    ap.add_argument("--plain", action="store_true", help="plain lines instead of the live table")
    ap.add_argument("--embedded", action="store_true",
                    help="run both stores in this process instead of two servers")
    ap.add_argument("--cluster", action="store_true",
                    help="a cluster on etcd instead: shards, ClusterClient, a primary killed "
                         "with kill -9 mid-run")
    ap.add_argument("--shards", type=_positive(int), default=3, help="--cluster: shards (default 3)")
    ap.add_argument("--replicas", type=_positive(int), default=1,
                    help="--cluster: replicas per shard (default 1)")
    ap.add_argument("--kill-at", type=_positive(float), default=None,
                    help="--cluster: seconds into the run when shard 0's primary is killed "
                         "(default a third of --seconds)")
    return ap


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.cluster and args.embedded:
        ap.error("--cluster and --embedded exclude each other")
    if args.seconds is None:
        args.seconds = 20.0 if args.cluster else 10.0
    if args.keys is None:
        args.keys = 30_000 if args.cluster else 100_000
    if args.capacity is None:
        args.capacity = "64MiB" if args.cluster else "256MiB"
    try:
        import kvstore.store  # noqa: F401 - the C engine, for Store and the servers
    except ImportError:
        print("kvstore-demo: the native extension kvstore._native is not built", file=sys.stderr)
        return 2
    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):     # stop the servers on these too
        try:
            old[sig] = signal.signal(sig, _interrupt)
        except (ValueError, OSError):               # not the main thread
            pass
    if not args.embedded:
        import importlib.util
        missing = [m for m in ("kvstore.server", "kvstore.client")
                   if importlib.util.find_spec(m) is None]
        if missing:
            print(f"kvstore-demo: {', '.join(missing)} not importable: install the package "
                  "(pip install -e .) or run with --embedded", file=sys.stderr)
            return 2
    try:
        if args.cluster:
            import shutil
            if shutil.which("etcd") is None:
                print("kvstore-demo: --cluster needs etcd (apt-get install etcd-server)",
                      file=sys.stderr)
                return 2
            from .cluster import run_cluster
            return run_cluster(args)
        return run_embedded(args) if args.embedded else run_servers(args)
    except KeyboardInterrupt:
        print("\nkvstore-demo: interrupted", file=sys.stderr)
        return 130
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
