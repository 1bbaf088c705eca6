"""Memory-failure scenarios run two ways: against the real kernel
(``madvise(MADV_HWPOISON)`` inside the lab VM) and through the simulator
(``kernel_policy="mainline"``, kinds ``ar``/``ao``) anywhere. Each run returns
an observation dict; the lab tests assert on the kernel ones, and
``tests.lab.run`` prints both side by side (any difference is a simulator bug).

Scenarios (DESIGN.md sections 1, 5, 6):

``own``
    The store process poisons the subpage holding one key. Kernel: SIGBUS
    ``BUS_MCEERR_AR`` arrives *inside* madvise with ``si_addr_lsb`` of the
    whole hugepage; simulator: ``ar`` then a guarded touch. Recovery salvages
    the page into a spare hugepage: only the keys of that 4 KiB are lost,
    every other record is byte-for-byte intact (value and checksum).
``no_spare``
    Same loss, but no free hugepage is left for salvage (the rest of the pool
    is held by another mapping): the page is copied into 4 KiB shmem pages
    instead (``pages_degraded_to_4k``), still losing only the poisoned 4 KiB.
    A second error then hits the degraded range and must cost one subpage
    (lsb 12). Holding a whole pool would starve other users of a shared
    machine, so the simulator runs this one inside the lab VM only.
``no_salvage``
    Same loss with salvage switched off (``Store.salvage = False``): every key
    on the page is LOST and rebuilt from a second Store on 4 KiB pages acting
    as the rebuild source.
``index``
    The store poisons the 4 KiB index page holding one key's entry
    (``locate_entry``). Kernel: AR inside madvise, the whole hugepage lost and
    salvaged as in ``own``; the index page is the one subpage that stays
    lost. Its hash range becomes LOST (every key of it, no other), a second
    Store on 4 KiB pages rebuilds it with ``fetch_hash_range``, the orphaned
    records are reclaimed, and every key then reads its value.
``ao``
    Another process maps the same memfd and poisons a subpage. The store
    process (which asked for early kill) gets ``BUS_MCEERR_AO`` and recovers
    before anything touches the page. Simulator: ``ao``.

Run as a module to record simulator observations::

    python -m tests.lab.scenarios --mode sim --sizes 2M 1G --out sim.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import mmap
import os
import random
import select
import struct
import subprocess
import sys
import time

import xxhash

import kvstore
from kvstore import _native

SUB = 4096
PAGE_BYTES = {"1G": 1 << 30, "2M": 1 << 21}
PAGE_SHIFT = {"1G": 30, "2M": 21}
SYSFS_DIR = {"1G": "hugepages-1048576kB", "2M": "hugepages-2048kB"}
MFD_HUGE = {"1G": getattr(os, "MFD_HUGE_1GB", 30 << 26), "2M": getattr(os, "MFD_HUGE_2MB", 21 << 26)}
SCENARIOS = ("own", "no_spare", "no_salvage", "ao", "index")
SIM_KIND = {"own": "ar", "no_spare": "ar", "no_salvage": "ar", "ao": "ao", "index": "ar"}
# Hugepages a scenario needs free at its start: the store's pages, plus a
# spare for salvage where the scenario salvages into a hugepage.
PAGES_NEEDED = {"own": 2, "no_spare": 1, "no_salvage": 2, "ao": 2, "index": 2}
BUS_MCEERR_AR, BUS_MCEERR_AO = 4, 5


class Unavailable(Exception):
    """The scenario cannot run on this machine; the message says why."""


# ----------------------------------------------------------------- machine

def hugepage_pool(ps: str) -> dict:
    """``{total, free, resv, available}`` of one hugepage size (available =
    free pages not promised to an existing mapping)."""
    base = f"/sys/kernel/mm/hugepages/{SYSFS_DIR[ps]}"
    out = {}
    for name in ("nr_hugepages", "free_hugepages", "resv_hugepages"):
        try:
            with open(f"{base}/{name}") as f:
                out[name] = int(f.read())
        except OSError:
            return {"total": 0, "free": 0, "resv": 0, "available": 0}
    return {"total": out["nr_hugepages"], "free": out["free_hugepages"], "resv": out["resv_hugepages"],
            "available": max(0, out["free_hugepages"] - out["resv_hugepages"])}


def hardware_corrupted_kb() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("HardwareCorrupted:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def in_lab_vm() -> bool:
    return os.environ.get("KVSTORE_LAB_VM") == "1"


def hwpoison_unavailable_reason() -> str | None:
    """None when real hwpoison injection may run here, else why not."""
    if not _native.probe()["hwpoison"]:
        return ("this kernel has no MADV_HWPOISON (needs CONFIG_MEMORY_FAILURE and root); "
                "run `python -m tests.lab.run` to boot the lab VM")
    if os.environ.get("KVSTORE_ALLOW_HWPOISON") != "1":
        return ("KVSTORE_ALLOW_HWPOISON=1 is not set (real hwpoison takes memory out of use for good; "
                "`python -m tests.lab.run` sets it inside the lab VM)")
    return None


def require_pages(ps: str, n: int):
    pool = hugepage_pool(ps)
    if pool["available"] < n:
        raise Unavailable(f"needs {n} free {ps} hugepages, this machine has {pool['available']} "
                          f"(pool {pool['total']}, free {pool['free']}, reserved {pool['resv']})")


@contextlib.contextmanager
def hold_free_hugepages(ps: str):
    """Take every available hugepage of size ``ps`` (a shared hugetlb mapping
    reserves them at mmap time, no need to touch them), so that nothing is
    left for a salvage. Yields how many were taken."""
    n = hugepage_pool(ps)["available"]
    if n == 0:
        yield 0
        return
    fd = os.memfd_create("kvstore-lab-blocker", os.MFD_CLOEXEC | os.MFD_HUGETLB | MFD_HUGE[ps])
    try:
        os.ftruncate(fd, n * PAGE_BYTES[ps])
        m = mmap.mmap(fd, n * PAGE_BYTES[ps], flags=mmap.MAP_SHARED)
        try:
            left = hugepage_pool(ps)["available"]
            if left:
                raise Unavailable(f"could not take every free {ps} hugepage ({left} still available)")
            yield n
        finally:
            m.close()
    finally:
        os.close(fd)


# -------------------------------------------------------------------- data

def make_data(n: int = 1200, seed: int = 20240607) -> dict[bytes, bytes]:
    """``n`` keys with values of 24..480 bytes: records spread over a few
    hundred subpages, several per subpage."""
    rng = random.Random(seed)
    return {b"lab:%05d" % i: rng.randbytes(rng.randint(24, 480)) for i in range(n)}


def record_map(store, keys) -> dict[bytes, tuple[int, int]]:
    return {k: tuple(store.locate(k)) for k in keys}


def keys_overlapping(rmap, lo: int, hi: int) -> set[bytes]:
    return {k for k, (off, ln) in rmap.items() if off < hi and off + ln > lo}


def check_record(store, key: bytes, value: bytes) -> str | None:
    """None if ``store`` returns ``value`` for ``key`` and the record in the
    arena carries the checksum of exactly these bytes; else what is wrong."""
    try:
        got = store.get_versioned(key)
    except kvstore.KeyLostError as e:
        return f"LOST ({e})"
    if got is None:
        return "missing"
    version, v = got
    if v != value:
        return f"wrong bytes ({len(v)} bytes, expected {len(value)})"
    off, ln = store.locate(key)
    try:
        raw = store.arena.read(off, ln)
    except kvstore.MemoryFaultError as e:
        return f"record unreadable: {e}"
    crc, vlen = struct.unpack_from("<II", raw)
    want = xxhash.xxh64_intdigest(key + vlen.to_bytes(4, "little") + raw[8:8 + vlen], seed=version) & 0xFFFFFFFF
    if vlen != len(value) or raw[8:8 + vlen] != value or crc != want:
        return f"record does not verify (vlen {vlen}, crc {crc:#x}, want {want:#x})"
    return None


def verify(store, data, keys) -> dict[bytes, str]:
    bad = {}
    for k in keys:
        why = check_record(store, k, data[k])
        if why:
            bad[k] = why
    return bad


# ------------------------------------------------------------ kernel facts

def pread_fact(fd: int, n: int, off: int, expect: bytes | None = None) -> str:
    """What ``pread`` of the memfd returns: "EIO", "short:<n>", "same",
    "differs" or "ok"."""
    try:
        got = os.pread(fd, n, off)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    if len(got) != n:
        return f"short:{len(got)}"
    if expect is None:
        return "ok"
    return "same" if got == expect else "differs"


def run_helper(helper: str, op: str, pid: int, fd: int, off: int, timeout: float = 120) -> dict:
    """Run the mce_helper binary on another process's memfd."""
    p = subprocess.run([helper, op, f"/proc/{pid}/fd/{fd}", str(off)], capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != 0 or not p.stdout.strip():
        return {"op": op, "failed": True, "returncode": p.returncode, "stderr": p.stderr[-500:]}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["returncode"] = p.returncode
    return out


def signal_name(code: int) -> str:
    return {BUS_MCEERR_AR: "AR", BUS_MCEERR_AO: "AO", 2: "ADRERR"}.get(code, str(code))


# --------------------------------------------------------------- scenarios

def _lsb_from(lost_subpages: int) -> int | None:
    """The extent the handler marked lost is 2**si_addr_lsb bytes."""
    if lost_subpages <= 0 or lost_subpages & (lost_subpages - 1):
        return None
    return 12 + lost_subpages.bit_length() - 1


def _signal_deltas(before: dict, after: dict) -> dict:
    return {k: after[f"signals_{k}"] - before[f"signals_{k}"] for k in ("ar", "ao", "adrerr", "in_injection")}


def _signal_label(d: dict) -> str:
    parts = [f"{name}x{d[k]}" if d[k] > 1 else name
             for k, name in (("ar", "AR"), ("ao", "AO"), ("adrerr", "ADRERR")) if d[k]]
    return "+".join(parts) or "none"


def run(scenario: str, ps: str, mode: str, helper: str | None = None, n_keys: int = 1200,
        sim_policy: str = "mainline") -> dict:
    """Run one scenario; ``mode`` "kernel" (real hwpoison, the kernel's own
    policy) or "sim" (simulator with ``sim_policy``). Raises Unavailable when
    it cannot run."""
    if scenario not in SCENARIOS or ps not in PAGE_BYTES or mode not in ("kernel", "sim"):
        raise ValueError(f"unknown scenario {scenario!r} / page size {ps!r} / mode {mode!r}")
    if mode == "kernel":
        why = hwpoison_unavailable_reason()
        if why:
            raise Unavailable(why)
        if scenario == "ao" and not helper:
            raise Unavailable("the ao scenario needs the mce_helper binary (gcc)")
    if scenario == "no_spare" and not in_lab_vm() and os.environ.get("KVSTORE_LAB_HOLD_POOL") != "1":
        raise Unavailable("takes every free hugepage of the machine for a moment: runs inside the lab VM "
                          "(or set KVSTORE_LAB_HOLD_POOL=1)")
    require_pages(ps, PAGES_NEEDED[scenario])
    if scenario == "index":
        return run_index(ps, mode, n_keys=max(n_keys, 4000), sim_policy=sim_policy)
    kind = "hwpoison" if mode == "kernel" else SIM_KIND[scenario]
    policy = "auto" if mode == "kernel" else sim_policy
    pb = PAGE_BYTES[ps]
    npages = 2 if scenario == "no_salvage" else 1
    data = make_data(n_keys)
    obs = {"scenario": scenario, "page_size": ps, "mode": mode, "kind": kind, "where": "vm" if in_lab_vm() else
           "host", "kernel_release": os.uname().release, "keys_total": len(data)}
    replica = None
    if scenario == "no_salvage":
        replica = kvstore.Store("64MiB", page_size="4K", recovery="manual")
    t0 = time.monotonic()
    try:
        store = kvstore.Store(npages * pb, page_size=ps, kernel_policy=policy, recovery="manual",
                              rebuild_source=replica, rebuild_deadline=120.0, read_repair_timeout=5.0)
    except kvstore.ArenaError as e:
        if replica is not None:
            replica.close()
        raise Unavailable(f"no {ps} arena: {e}") from e
    try:
        a = store.arena
        obs.update(keep_ue=a.keep_ue, kernel_policy=a.kernel_policy, backing=a.backing)
        versions = {}
        for k, v in data.items():
            versions[k] = store.put(k, v)
            if replica is not None:
                replica.put_versioned(k, v, versions[k])
        rmap = record_map(store, data)
        keys = sorted(data)
        victim = keys[len(keys) // 2]
        off = rmap[victim][0]
        sub = off // SUB
        page = off // pb
        on_sub = keys_overlapping(rmap, sub * SUB, (sub + 1) * SUB)
        on_page = keys_overlapping(rmap, page * pb, (page + 1) * pb)
        obs.update(victim_subpage=sub, victim_page=page, keys_on_subpage=len(on_sub), keys_on_page=len(on_page))
        page_lo, page_hi = page * pb, (page + 1) * pb
        neighbour = (sub + 1) * SUB if (sub + 1) * SUB < page_hi else (sub - 1) * SUB
        neighbour_before = a.read(neighbour, SUB)
        if scenario == "no_salvage":
            store.salvage = False
        hc0 = hardware_corrupted_kb()
        st0 = a.stats()
        obs["setup_s"] = round(time.monotonic() - t0, 2)
        t1 = time.monotonic()
        with (hold_free_hugepages(ps) if scenario == "no_spare" else contextlib.nullcontext(None)) as held:
            obs["pages_held"] = held
            obs["pool"] = {"held": hugepage_pool(ps)}
            # ---------------------------------------------------- the fault
            tm = {}
            tf = time.monotonic()
            if scenario == "ao" and mode == "kernel":
                obs["helper"] = run_helper(helper, "poison", os.getpid(), a.fd, off)
                r, _, _ = select.select([store.loss_fd], [], [], 15.0)
                obs["ao_delivered"] = bool(r)
            else:
                store.faults.inject(off, kind)
                if kind == "ar":
                    # The simulator's latent poison fires at the next touch.
                    try:
                        a.read(sub * SUB, 1)
                        obs["touch"] = "read succeeded"
                    except kvstore.MemoryFaultError:
                        obs["touch"] = "MemoryFaultError"
            tm["fault"] = time.monotonic() - tf
            obs.setdefault("pool", {})["after_fault"] = hugepage_pool(ps)
            st1 = a.stats()
            sig = _signal_deltas(st0, st1)
            lost_now = st1["lost_subpages"] - st0["lost_subpages"]
            obs.update(signals=sig, signal=_signal_label(sig), lost_subpages_at_signal=lost_now,
                       lsb=_lsb_from(lost_now), survived=True)
            tf = time.monotonic()
            if mode == "kernel":
                hc1 = hardware_corrupted_kb()
                k = {"hardware_corrupted_kb": None if hc0 is None or hc1 is None else hc1 - hc0,
                     "pread_victim": pread_fact(a.fd, SUB, sub * SUB),
                     "pread_neighbour": pread_fact(a.fd, SUB, neighbour, neighbour_before)}
                chunk = sub * SUB & ~((1 << 21) - 1)
                k["pread_2m_chunk"] = pread_fact(a.fd, 1 << 21, chunk)
                k["victim_in_chunk"] = sub * SUB - chunk
                if helper:
                    far = page_lo + pb // 2
                    if far // SUB == sub:
                        far += SUB
                    k["touch_same_page"] = run_helper(helper, "touch", os.getpid(), a.fd, far)
                    if npages > 1:
                        other = ((page + 1) % npages) * pb + SUB
                        k["touch_other_page"] = run_helper(helper, "touch", os.getpid(), a.fd, other)
                obs["kernel"] = k
            if scenario == "ao" and mode == "kernel" and not obs["ao_delivered"]:
                # Record what the kernel did instead: the first touch finds it.
                try:
                    store.get(keys[0])
                    obs["late_touch"] = "get succeeded"
                except kvstore.KeyLostError:
                    obs["late_touch"] = "KeyLostError"
                st1b = a.stats()
                obs["signals_at_touch"] = _signal_deltas(st1, st1b)
            tm["facts"] = time.monotonic() - tf
            obs["pool"]["before_recover"] = hugepage_pool(ps)
            # ------------------------------------------------- recovery
            tf = time.monotonic()
            r = store.recover()
            tm["recover"] = time.monotonic() - tf
            obs["recover"] = {k: r[k] for k in ("subpages", "keys_lost", "pages_salvaged", "subpages_salvaged",
                                                "salvage_failed", "rebuilt")}
            if r.get("salvage_error"):
                obs["salvage_error"] = r["salvage_error"]
        if scenario == "no_salvage":
            obs["wait_recovered"] = store.wait_recovered(timeout=120)
        obs["recovery_s"] = round(time.monotonic() - t1, 2)
        st2 = store.stats()
        lost_keys = {k for k, _v, _s in store.lost_keys()}
        obs.update(keys_lost=st2["keys_lost_total"], pages_salvaged=st2["pages_salvaged"],
                   pages_degraded=st2["pages_degraded_to_4k"],
                   subpages_salvaged=st2["subpages_salvaged"], salvage_failed=st2["salvage_failed"],
                   subpages_lost_after=st2["lost_subpages"], rebuilt=st2["rebuilt_keys"],
                   still_lost=len(lost_keys), signals_total=_signal_deltas(st0, st2))
        obs["lost_keys_are_victims"] = (lost_keys == on_sub) if scenario != "no_salvage" else None
        obs["lost_not_on_subpage"] = len(lost_keys - on_sub)
        expect_intact = [k for k in keys if k not in lost_keys]
        tf = time.monotonic()
        bad = verify(store, data, expect_intact)
        tm["verify"] = time.monotonic() - tf
        obs["timings_s"] = {k: round(v, 2) for k, v in tm.items()}
        obs["keys_verified"] = len(expect_intact) - len(bad)
        obs["wrong"] = len(bad)
        obs["wrong_examples"] = {k.decode(): why for k, why in list(bad.items())[:5]}
        if lost_keys:
            k0 = sorted(lost_keys)[0]
            try:
                store.get(k0)
                obs["lost_key_read"] = "returned a value"
            except kvstore.KeyLostError:
                obs["lost_key_read"] = "KeyLostError"
        # The salvaged page serves reads through the same addresses now.
        try:
            a.read(neighbour, SUB)
            obs["neighbour_readable_after"] = True
        except kvstore.MemoryFaultError:
            obs["neighbour_readable_after"] = False
        obs["signals_total"] = _signal_deltas(st0, a.stats())
        if scenario == "no_spare":
            obs["second"] = _second_error(store, data, rmap, keys, lost_keys, sub, kind)
        obs["seconds"] = round(time.monotonic() - t0, 2)
        return obs
    finally:
        store.close()
        if replica is not None:
            replica.close()


class _Gate:
    """A rebuild source that can be held back (answers "not caught up yet")."""

    def __init__(self, source):
        self.source, self.open = source, False

    def fetch(self, requests):
        return self.source.fetch(requests) if self.open else {}

    def fetch_hash_range(self, lo, hi, min_version=0):
        if not self.open:
            raise kvstore.SourceBehindError("held back by the scenario")
        return self.source.fetch_hash_range(lo, hi, min_version=min_version)


def run_index(ps: str, mode: str, n_keys: int = 4000, sim_policy: str = "mainline") -> dict:
    """The ``index`` scenario: a memory error on an index page."""
    kind = "hwpoison" if mode == "kernel" else SIM_KIND["index"]
    policy = "auto" if mode == "kernel" else sim_policy
    pb = PAGE_BYTES[ps]
    data = make_data(n_keys)
    obs = {"scenario": "index", "page_size": ps, "mode": mode, "kind": kind, "where": "vm" if in_lab_vm() else
           "host", "kernel_release": os.uname().release, "keys_total": len(data)}
    replica = kvstore.Store("64MiB", page_size="4K", recovery="manual")
    gate = _Gate(replica)
    t0 = time.monotonic()
    try:
        store = kvstore.Store(pb, page_size=ps, kernel_policy=policy, recovery="manual", rebuild_source=gate,
                              rebuild_deadline=120.0, read_repair_timeout=0.05)
    except kvstore.ArenaError as e:
        replica.close()
        raise Unavailable(f"no {ps} arena: {e}") from e
    try:
        a = store.arena
        obs.update(keep_ue=a.keep_ue, kernel_policy=a.kernel_policy, backing=a.backing)
        for k, v in data.items():
            replica.put_versioned(k, v, store.put(k, v))
        keys = sorted(data)
        victim = keys[len(keys) // 2]
        eoff, _elen = store.locate_entry(victim)
        sub = eoff // SUB
        kind_before, lo, hi = store.subpage_kind(sub)
        in_range = {k for k in keys if lo <= kvstore.key_hash(k) <= hi}
        obs.update(victim_subpage=sub, subpage_kind=kind_before, keys_in_range=len(in_range))
        st0 = a.stats()
        used0 = store.stats()["used"]
        # ------------------------------------------------------- the fault
        store.faults.inject(eoff, kind)
        if kind == "ar":
            try:
                a.read(sub * SUB, 1)
                obs["touch"] = "read succeeded"
            except kvstore.MemoryFaultError:
                obs["touch"] = "MemoryFaultError"
        st1 = a.stats()
        sig = _signal_deltas(st0, st1)
        lost_now = st1["lost_subpages"] - st0["lost_subpages"]
        obs.update(signals=sig, signal=_signal_label(sig), lost_subpages_at_signal=lost_now,
                   lsb=_lsb_from(lost_now), survived=True)
        if mode == "kernel":
            obs["kernel"] = {"pread_victim": pread_fact(a.fd, SUB, sub * SUB)}
        # ------------------------------------------------------- recovery
        r = store.recover()                    # the source is held back: what is LOST?
        obs["recover"] = {k: r[k] for k in ("subpages", "index_pages_lost", "orphans_reclaimed",
                                            "pages_salvaged", "salvage_failed")}
        states = {k: store.state(k) for k in keys}
        obs["range_keys_lost"] = sum(1 for k in in_range if states[k] == "range")
        obs["other_keys_lost"] = sum(1 for k in keys if k not in in_range and states[k] != "present")
        obs["used_after_orphans"] = store.stats()["used"]
        obs["used_before"] = used0
        obs["live_bytes_outside_range"] = sum(8 + len(data[k]) for k in keys if k not in in_range)
        gate.open = True
        obs["wait_recovered"] = store.wait_recovered(timeout=120)
        st2 = store.stats()
        obs.update(ranges_rebuilt=st2["ranges_rebuilt"], subpages_lost_after=st2["lost_subpages"],
                   pages_salvaged=st2["pages_salvaged"], index_pages_lost=st2["index_pages_lost"])
        bad = verify(store, data, keys)
        obs["wrong"] = len(bad)
        obs["wrong_examples"] = {k.decode(): why for k, why in list(bad.items())[:5]}
        obs["keys_after"] = len(store)
        obs["signals_total"] = _signal_deltas(st0, a.stats())
        obs["seconds"] = round(time.monotonic() - t0, 2)
        return obs
    finally:
        store.close()
        replica.close()


def _second_error(store, data, rmap, keys, lost_before, sub1, kind) -> dict:
    """A second error in the page that was salvaged into 4 KiB pages: it
    must cost that one subpage (lsb 12), not the whole former hugepage."""
    a = store.arena
    victim = next(k for k in keys[len(keys) // 4:] if rmap[k][0] // SUB != sub1 and k not in lost_before)
    sub = rmap[victim][0] // SUB
    on_sub = keys_overlapping(rmap, sub * SUB, (sub + 1) * SUB)
    st0, s0 = a.stats(), store.stats()
    out = {"victim_subpage": sub, "keys_on_subpage": len(on_sub)}
    store.faults.inject(sub * SUB, kind)
    if kind == "ar":
        try:
            a.read(sub * SUB, 1)
            out["touch"] = "read succeeded"
        except kvstore.MemoryFaultError:
            out["touch"] = "MemoryFaultError"
    st1 = a.stats()
    sig = _signal_deltas(st0, st1)
    lost_now = st1["lost_subpages"] - st0["lost_subpages"]
    out.update(signals=sig, signal=_signal_label(sig), lost_subpages_at_signal=lost_now, lsb=_lsb_from(lost_now))
    store.recover()
    s1 = store.stats()
    lost = {k for k, _v, _s in store.lost_keys()}
    out.update(keys_lost=s1["keys_lost_total"] - s0["keys_lost_total"],
               pages_salvaged=s1["pages_salvaged"] - s0["pages_salvaged"],
               pages_degraded=s1["pages_degraded_to_4k"] - s0["pages_degraded_to_4k"],
               salvage_failed=s1["salvage_failed"] - s0["salvage_failed"],
               subpages_lost_after=s1["lost_subpages"], rebuilt=s1["rebuilt_keys"] - s0["rebuilt_keys"],
               lost_keys_are_victims=(lost - lost_before) == on_sub)
    bad = verify(store, data, [k for k in keys if k not in lost])
    out["wrong"] = len(bad)
    out["keys_verified"] = len(keys) - len(lost) - len(bad)
    out["wrong_examples"] = {k.decode(): why for k, why in list(bad.items())[:5]}
    return out


def record(obs: dict, path: str | None = None):
    """Append an observation to ``path`` (default: $KVSTORE_LAB_RESULTS)."""
    path = path or os.environ.get("KVSTORE_LAB_RESULTS")
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps(obs, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------- comparison

COLUMNS = ("signal", "lsb", "keys_lost", "pages_salvaged", "pages_degraded", "salvage_failed",
           "subpages_lost_after", "rebuilt", "wrong")
ROWS = ("own", "no_spare", "no_spare.2nd", "no_salvage", "ao")


def load(path: str) -> list[dict]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    out.append(json.loads(line))
    except FileNotFoundError:
        pass
    return out


def compare(kernel: list[dict], sim: list[dict]) -> tuple[str, list[str]]:
    """A plain-text table (one row per scenario and page size, kernel vs
    simulator per column) and the list of differences."""
    def index(rows):
        out = {}
        for o in rows:
            out[(o["scenario"], o["page_size"])] = o
            if "second" in o:
                out[(o["scenario"] + ".2nd", o["page_size"])] = o["second"]
        return out
    ki, si = index(kernel), index(sim)
    lines = []
    head = f"{'scenario':<12} {'page':<4} " + " ".join(f"{c:>19}" for c in COLUMNS)
    lines.append(head)
    lines.append("-" * len(head))
    diffs = []
    for ps in ("1G", "2M"):
        for sc in ROWS:
            k, s = ki.get((sc, ps)), si.get((sc, ps))
            if k is None and s is None:
                continue
            cells = []
            both = k is not None and s is not None and "skipped" not in k and "skipped" not in s
            for c in COLUMNS:
                kv = "n/a" if k is None else k.get(c, "skipped" if "skipped" in k else "n/a")
                sv = "n/a" if s is None else s.get(c, "skipped" if "skipped" in s else "n/a")
                mark = ""
                if both and kv != sv:
                    diffs.append(f"{sc}/{ps}: {c}: kernel {kv!r}, simulator {sv!r}")
                    mark = " !"
                cells.append(f"{str(kv) + ' | ' + str(sv) + mark:>19}")
            lines.append(f"{sc:<12} {ps:<4} " + " ".join(cells))
    lines.append("(each cell: kernel | simulator; ! marks a difference)")
    return "\n".join(lines), diffs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("sim", "kernel"), default="sim")
    ap.add_argument("--sizes", nargs="+", default=["2M", "1G"], choices=sorted(PAGE_BYTES))
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    ap.add_argument("--out", help="append observations (JSON lines) here")
    ap.add_argument("--helper", help="mce_helper binary (kernel mode, ao scenario)")
    ap.add_argument("--policy", choices=("mainline", "keep_ue"), default="mainline",
                    help="kernel policy the simulator plays (sim mode)")
    ap.add_argument("--compare", nargs=2, metavar=("KERNEL_JSONL", "SIM_JSONL"),
                    help="only print the kernel vs simulator table of two result files")
    args = ap.parse_args(argv)
    if args.compare:
        table, diffs = compare(load(args.compare[0]), load(args.compare[1]))
        print(table)
        print("\n".join(["DIFFERENCES (simulator bugs):", *diffs]) if diffs else "no differences")
        return 1 if diffs else 0
    rc = 0
    for ps in args.sizes:
        for sc in args.scenarios:
            try:
                obs = run(sc, ps, args.mode, helper=args.helper, sim_policy=args.policy)
            except Unavailable as e:
                obs = {"scenario": sc, "page_size": ps, "mode": args.mode, "skipped": str(e)}
                print(f"{args.mode} {sc} {ps}: SKIPPED: {e}", flush=True)
            except Exception as e:  # keep going; the failure is in the record
                obs = {"scenario": sc, "page_size": ps, "mode": args.mode, "skipped": f"error: {e!r}"}
                print(f"{args.mode} {sc} {ps}: ERROR: {e!r}", flush=True)
                rc = 1
            else:
                print(f"{args.mode} {sc} {ps}: " + ", ".join(f"{c}={obs.get(c)}" for c in COLUMNS)
                      + f" ({obs['seconds']} s)", flush=True)
            record(obs, args.out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
