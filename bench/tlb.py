"""TLB benchmark: pointer-chase latency over the arena with 1 GiB, 2 MiB and
4 KiB pages, then on the 1 GiB arena again after 100 and 1,000 injected
keep-UE faults.

    python -m bench.tlb            # 1 GiB arena per page size, plot in bench/plots/
    python -m bench.tlb --quick    # 256 MiB, fewer steps, no plot (CI smoke test)
    python -m bench.tlb --store-keys 10000000   # also: Store get / mget end to end

With ``--store-keys N`` it also fills a Store of N keys (16 B keys, 64 B
values) on each page size and times random ``get`` and ``mget`` (batches of
100) over the same random keys, interleaved like the chase: every access of a
get (directory cell, index page, record) is in the arena, so this is what
the hugepages buy end to end.

The chase runs in C (``Arena.pointer_chase``): a random cycle through one
cache line of every healthy 4 KiB subpage of the arena, followed inside one
SIGBUS guard, so every step is a dependent load to an unpredictable page.
With 4 KiB pages nearly every step misses the TLB; with 1 GiB pages the
whole arena is one TLB entry. Each configuration is measured several times,
interleaved (1G, 2M, 4K, 1G, 2M, 4K, ...) so that noise from other work on
the machine hits all of them alike; the table reports the median, and the
ratio is ns/step of 4 KiB divided by ns/step of the configuration (> 1:
faster than 4 KiB). The faulted phases re-measure 4 KiB alongside, and their
ratios use that phase's 4 KiB median.

After the faults, /proc/self/smaps must still show KernelPageSize 1048576 kB
at the arena's address (keep-UE keeps the hugepage mapped); if it does not,
or the arena does not report exactly the injected subpages as lost, or a
latency is not a positive number, the run exits 1.

Hugepages are borrowed with ``kvstore.hugepages.ensure_free`` and exactly the
pages this run added are given back. A page size that cannot be had is
reported as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import math
import random
import sys

from kvstore import _native

from . import _common as C

GiB, MiB = 1 << 30, 1 << 20
PAGE = {"1G": GiB, "2M": 2 * MiB, "4K": 4096}
EXPECT_KIB = {"1G": 1048576, "2M": 2048, "4K": 4}


def _open_arena(label, size, hp, skipped):
    if label != "4K":
        need = math.ceil(size / PAGE[label])
        got = hp.need(label, need)
        if got < need:
            skipped[label] = (f"needs {need} free {label} hugepage(s), {got} available "
                              f"({'; '.join(n for n in hp.notes if n.startswith(label)) or 'pool short'})")
            return None
    try:
        a = _native.Arena(size, label, "keep_ue")
    except (OSError, MemoryError, ValueError) as e:
        skipped[label] = f"cannot map {size // MiB} MiB of {label} pages: {e}"
        return None
    want = {"1G": "hugetlb-1G", "2M": "hugetlb-2M", "4K": "memfd-4K"}[label]
    if a.backing != want:
        skipped[label] = f"got {a.backing} instead of {want}: {a.fallback_reason}"
        a.close()
        return None
    return a


def _measure(arenas, names, size, steps, rounds, seed0, results):
    """Interleave `rounds` chases over each arena; append ns/step to results[name]."""
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]   # rotate who goes first
        for name in order:
            ns = arenas[name].pointer_chase(size, steps, seed0 + r)
            results.setdefault(name, []).append(ns)


def _inject(arena, n_total, injected, rng, nsub):
    """Inject 'ao' faults at distinct random subpages until n_total are lost."""
    while len(injected) < n_total:
        s = rng.randrange(nsub)
        if s in injected:
            continue
        arena.inject(s * 4096 + rng.randrange(4096), "ao")
        injected.add(s)
    arena.drain()


def store_gets(n, rounds, hp, skipped):
    """Median ns per random get and per key of mget, per page size."""
    import time
    import kvstore
    import logging
    logging.getLogger("kvstore").setLevel(logging.ERROR)
    stores = {}
    cap = n * 150 + 64 * MiB
    for label in ("1G", "2M", "4K"):
        size = -(-cap // PAGE[label]) * PAGE[label]
        if label != "4K":
            need = size // PAGE[label]
            got = hp.need(label, need)
            if got < need:
                skipped[f"store {label}"] = f"{size // MiB} MiB of {label} pages needed, {got} pages free"
                continue
        try:
            s = kvstore.Store(size, page_size=label, kernel_policy="keep_ue", recovery="manual")
        except kvstore.ArenaError as e:
            skipped[f"store {label}"] = str(e)
            continue
        put = s.put
        for i in range(n):
            put(b"key:%012d" % i, b"%064d" % i)
        stores[label] = s
        print(f"[store] {label}: {n:,} keys in", file=sys.stderr)
    rng = random.Random(7)
    keys = [b"key:%012d" % rng.randrange(n) for _ in range(200_000)]
    batches = [keys[i:i + 100] for i in range(0, len(keys), 100)]
    res = {(l, op): [] for l in stores for op in ("get", "mget")}
    try:
        for r in range(rounds):
            for label, s in stores.items():
                g = s.get
                t = time.perf_counter()
                for k in keys:
                    g(k)
                res[(label, "get")].append((time.perf_counter() - t) / len(keys) * 1e9)
                mg = s.mget
                t = time.perf_counter()
                for b in batches:
                    mg(b)
                res[(label, "mget")].append((time.perf_counter() - t) / len(keys) * 1e9)
    finally:
        for s in stores.values():
            s.close()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tlb", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB, fewer steps, no plot")
    ap.add_argument("--size", default=None, help="arena size per page size (default 1G, quick 256M)")
    ap.add_argument("--steps", type=int, default=None, help="chase steps per measurement")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved measurements per config")
    ap.add_argument("--store-keys", type=int, default=0, help="also time Store get/mget with this many keys")
    ap.add_argument("--store-only", action="store_true", help="only the Store get/mget part")
    args = ap.parse_args(argv)
    if args.store_only:
        hp = C.HugePages()
        skipped = {}
        try:
            res = store_gets(args.store_keys or 10_000_000, args.rounds or 5, hp, skipped)
        finally:
            hp.give_back()
        _print_store(res, args.store_keys or 10_000_000, skipped, args.rounds or 5, header=True)
        return 0
    size = C.hugepages.parse_bytes(args.size) if args.size else (256 * MiB if args.quick else GiB)
    steps = args.steps or (1 << 20 if args.quick else 1 << 22)
    rounds = args.rounds or (3 if args.quick else 5)
    if size % (2 * MiB) or size <= 0:
        print("--size must be a positive multiple of 2 MiB", file=sys.stderr)
        return 2

    problems: list[str] = []
    skipped: dict[str, str] = {}
    hp = C.HugePages()
    arenas = {}
    results: dict[str, list[float]] = {}
    pagesize_seen = {}
    fault_phases = []   # (label, n faults, kernel page KiB after, lost subpages reported)
    try:
        for label in ("1G", "2M", "4K"):
            a = _open_arena(label, size, hp, skipped)
            if a is not None:
                arenas[label] = a
                pagesize_seen[label] = C.kernel_page_kib(a.address)
                C.check(pagesize_seen[label] == EXPECT_KIB[label],
                        f"{label} arena: /proc/self/smaps KernelPageSize {pagesize_seen[label]} kB, "
                        f"expected {EXPECT_KIB[label]} kB", problems)
        names = list(arenas)
        if "4K" not in arenas:
            print(f"cannot run: no 4 KiB arena ({skipped.get('4K')})", file=sys.stderr)
            return 1
        for name in names:                                    # warm up: populate caches, page tables
            arenas[name].pointer_chase(size, steps // 4, 99)
        _measure(arenas, names, size, steps, rounds, 1, results)

        # keep-UE faults on the largest-page arena (1 GiB, else 2 MiB).
        big = "1G" if "1G" in arenas else ("2M" if "2M" in arenas else None)
        if big is not None:
            a = arenas[big]
            rng = random.Random(6)
            injected: set[int] = set()
            nsub = size // 4096
            for n in (100, 1000):
                _inject(a, n, injected, rng, nsub)
                kib = C.kernel_page_kib(a.address)
                lost = a.stats()["lost_subpages"]
                fault_phases.append((big, n, kib, lost))
                C.check(kib == EXPECT_KIB[big],
                        f"after {n} keep-UE faults the {big} arena's KernelPageSize is {kib} kB, "
                        f"expected {EXPECT_KIB[big]} kB (the hugepage mapping was lost)", problems)
                C.check(lost == n, f"{big} arena reports {lost} lost subpages after {n} distinct "
                                   f"injected faults", problems)
                tmp = {f"{big}+{n}": a, f"4K@{n}": arenas["4K"]}
                _measure(tmp, list(tmp), size, steps, rounds, 100 + n, results)
    finally:
        for a in arenas.values():
            a.close()
        hp.give_back()

    for name, xs in results.items():
        for x in xs:
            C.check(x > 0 and math.isfinite(x), f"{name}: ns/step {x!r} is not a positive number", problems)

    med = {k: C.median(v) for k, v in results.items()}
    rows = []

    def row(name, label, base, note=""):
        xs = results[name]
        kib = pagesize_seen.get(label)
        rows.append([name, f"{kib} kB" if kib else "?", f"{med[name]:.1f}", f"{min(xs):.1f} - {max(xs):.1f}",
                     len(xs), f"{med[base] / med[name]:.2f}x", note])

    for label in ("1G", "2M", "4K"):
        if label in results:
            row(label, label, "4K", "clean arena")
    for big, n, kib, lost in fault_phases:
        pagesize_seen[f"{big}+{n}"] = kib
        row(f"{big}+{n}", f"{big}+{n}", f"4K@{n}", f"after {n} keep-UE faults (ao); {lost} subpages lost")
        row(f"4K@{n}", "4K", f"4K@{n}", f"4 KiB re-measured in the same phase")

    print(C.header("TLB: pointer chase, 1 GiB vs 2 MiB vs 4 KiB pages", "bench.tlb"))
    print(f"- arena: {size // MiB} MiB per page size, {steps:,} dependent loads per measurement, "
          f"{rounds} interleaved measurements per config, median reported; kernel policy keep_ue "
          f"(simulated; kernel flag accepted: {_native.probe()['keep_ue']})")
    print(f"- page size column: KernelPageSize read from /proc/self/smaps at the arena address"
          f"{' (after the faults, for the faulted rows)' if fault_phases else ''}")
    for label, why in skipped.items():
        print(f"- SKIPPED {label}: {why}")
    print()
    print(C.table(["config", "kernel page", "ns/step (median)", "min - max", "runs", "speed vs 4 KiB", "note"],
                  rows))

    if not args.quick and rows:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        order = [r[0] for r in rows if not r[0].startswith("4K@")]
        fig, ax = plt.subplots(figsize=(7, 3.8))
        colors = {"1G": "#1f77b4", "2M": "#2ca02c", "4K": "#d62728"}
        for i, name in enumerate(order):
            xs = results[name]
            ax.bar(i, med[name], color=colors.get(name[:2], "#7f7f7f"),
                   yerr=[[med[name] - min(xs)], [max(xs) - med[name]]], capsize=4)
            ax.text(i, med[name], f"{med[name]:.0f} ns", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels([n.replace("+", "\n+") + (" faults" if "+" in n else "") for n in order], fontsize=8)
        ax.set_ylabel("ns per dependent load (median, min-max)")
        ax.set_title(f"Pointer chase over {size // MiB} MiB by page size")
        path = C.savefig(fig, "tlb_latency.png")
        plt.close(fig)
        print(f"\nplot: {path}")
    if args.store_keys:
        hp = C.HugePages()
        sk = {}
        try:
            res = store_gets(args.store_keys, rounds, hp, sk)
        finally:
            hp.give_back()
        _print_store(res, args.store_keys, sk, rounds, header=False)
    return C.finish(problems)


def _print_store(res, n, skipped, rounds, header):
    if header:
        print(C.header("TLB end to end: Store get / mget by page size", "bench.tlb"))
    print(f"\n- Store with {n:,} keys (16 B keys, 64 B values) per page size; 200,000 random keys, "
          f"get one by one and mget in batches of 100, {rounds} interleaved rounds, median ns per key")
    for label, why in skipped.items():
        print(f"- SKIPPED {label}: {why}")
    med = {k: C.median(v) for k, v in res.items()}
    rows = []
    for label in ("1G", "2M", "4K"):
        if (label, "get") not in med:
            continue
        base_g, base_m = med.get(("4K", "get")), med.get(("4K", "mget"))
        rows.append([label, f"{med[(label, 'get')]:.0f}",
                     f"{base_g / med[(label, 'get')]:.2f}x" if base_g else "-",
                     f"{med[(label, 'mget')]:.0f}",
                     f"{base_m / med[(label, 'mget')]:.2f}x" if base_m else "-"])
    print()
    print(C.table(["pages", "get ns/key", "get vs 4 KiB", "mget ns/key", "mget vs 4 KiB"], rows))


if __name__ == "__main__":
    sys.exit(main())
