"""kvstore-demo: a store surviving a stream of memory errors, live.

Runs in one process: a primary Store and a replica Store (its rebuild
source), loads keys, then serves a read/write load while injecting
uncorrectable memory errors into the primary's arena through the fault
simulator (real SIGBUS delivery into the real handler). A table refreshes
with ops/s, errors injected, keys lost, keys rebuilt and wrong answers (which
must stay 0). Exits 1 if any answer was wrong or any read failed.

    python -m kvstore.demo                 # 10 s, 200k keys
    python -m kvstore.demo --seconds 30 --ue-rate 100 --kernel-policy mainline
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time

import kvstore
from kvstore.store import parse_size


def _bar(done, total, width=30):
    filled = int(width * done / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + f"] {done:,}/{total:,}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="kvstore-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--value-size", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--ue-rate", type=float, default=20.0, help="memory errors injected per second")
    ap.add_argument("--kinds", default="ao,ar", help="fault kinds to inject, comma separated")
    ap.add_argument("--write-ratio", type=float, default=0.1)
    ap.add_argument("--capacity", default="256MiB")
    ap.add_argument("--page-size", default="auto", help='"auto", "1G", "2M" or "4K"')
    ap.add_argument("--kernel-policy", default="keep_ue",
                    help='"keep_ue" (default: lose only 4 KiB), "mainline" or "auto"')
    ap.add_argument("--plain", action="store_true", help="no live table (for logs)")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    live = sys.stdout.isatty() and not args.plain
    rng = random.Random(7)

    replica = kvstore.Store(args.capacity, page_size="4K", recovery="manual")
    primary = kvstore.Store(args.capacity, page_size=args.page_size, kernel_policy=args.kernel_policy,
                            rebuild_source=replica)
    st = primary.stats()
    print(f"primary arena: {st['backing']} (page {st['page_size']}), keep_ue flag from kernel: "
          f"{st['keep_ue']}, policy: {st['kernel_policy']}"
          + (" (simulated)" if args.kernel_policy != "auto" else ""))
    if st["fallback_reason"]:
        print(f"  {st['fallback_reason']}")
    print(f"replica arena: {replica.stats()['backing']}; capacity {parse_size(args.capacity):,} bytes each")

    keys = [b"key:%08d" % i for i in range(args.keys)]
    expected = {}
    t0 = time.monotonic()
    for i, k in enumerate(keys):
        v = b"%d:" % i + bytes([65 + i % 26]) * max(0, args.value_size - 8)
        ver = primary.put(k, v)
        replica.put_versioned(k, v, ver)
        expected[k] = v
        if (live and i % 20000 == 0) or i == len(keys) - 1:
            print("\rloading " + _bar(i + 1, len(keys)), end="", flush=True)
    print(f"  ({time.monotonic() - t0:.1f}s)")

    stop = threading.Event()
    injected = [0]

    def injector():
        period = 1.0 / args.ue_rate if args.ue_rate > 0 else None
        r = random.Random(11)
        while period and not stop.wait(period):
            k = r.choice(keys)
            try:
                primary.faults.inject_key(k, r.choice(kinds))
                injected[0] += 1
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
    lines = 0
    try:
        while True:
            now = time.monotonic()
            if now - start >= args.seconds:
                break
            for _ in range(2000):
                k = keys[rng.randrange(len(keys))]
                if rng.random() < args.write_ratio:
                    v = expected[k][:-1] + bytes([rng.randrange(65, 91)])
                    ver = primary.put(k, v)
                    replica.put_versioned(k, v, ver)
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
            if now - last >= 0.5:
                s = primary.stats()
                row = (f"{now - start:6.1f}s  ops/s {int((ops - last_ops) / (now - last)):>9,}  "
                       f"UEs {injected[0]:>6,}  subpages lost {s['lost_subpages']:>6,}  "
                       f"keys lost {s['keys_lost_total']:>7,}  rebuilt {s['rebuilt_keys']:>7,}  "
                       f"wrong {wrong}  errors {errors}")
                if live:
                    print("\r" + row, end="", flush=True)
                else:
                    print(row)
                    lines += 1
                last, last_ops = now, ops
    finally:
        stop.set()
        thread.join()
    primary.wait_recovered(timeout=30)
    bad = sum(1 for k in keys if primary.get(k) != expected[k])
    s = primary.stats()
    elapsed = time.monotonic() - start
    print()
    print("summary")
    print(f"  operations            {ops:,} in {elapsed:.1f}s ({ops / elapsed:,.0f}/s)")
    print(f"  memory errors         {injected[0]:,} injected ({', '.join(kinds)}); "
          f"signals AO {s['signals_ao']:,} AR {s['signals_ar']:,} ADRERR {s['signals_adrerr']:,}")
    print(f"  subpages lost         {s['lost_subpages']:,} of {s['arena_bytes'] // 4096:,} "
          f"({s['lost_subpages'] * 4:,} KiB); pages salvaged {s['pages_salvaged']}")
    print(f"  keys lost / rebuilt   {s['keys_lost_total']:,} / {s['rebuilt_keys']:,} "
          f"(read-repaired on access: {s['read_repairs']:,}); unrecoverable {s['unrecoverable_keys']}")
    print(f"  wrong answers         {wrong} during the run, {bad} in the final check of all {len(keys):,} keys")
    print(f"  client errors         {errors}")
    primary.close()
    replica.close()
    return 1 if (wrong or bad or errors) else 0


if __name__ == "__main__":
    sys.exit(main())
