"""Real uncorrectable memory errors, made by the kernel's own
memory-failure code (madvise MADV_HWPOISON), against the store's arena.

Each scenario (see scenarios.py) poisons real memory once per page size and
records what happened; the tests below check the recorded facts. What a
mainline kernel is expected to do is DESIGN.md section 1; on a kernel with
MFD_MF_KEEP_UE_MAPPED (keep_ue) only the 4 KiB is lost and nothing needs
salvaging, and the expectations follow that.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from .scenarios import PAGE_BYTES, PAGE_SHIFT, SUB, BUS_MCEERR_AR

pytestmark = pytest.mark.lab


def lost_extent(obs):
    """(lsb, subpages) the signal should have marked lost."""
    if obs["keep_ue"]:
        return 12, 1
    return PAGE_SHIFT[obs["page_size"]], PAGE_BYTES[obs["page_size"]] // SUB


def show(obs):
    keep = ("signal", "signals", "lsb", "lost_subpages_at_signal", "kernel", "recover", "keys_on_subpage",
            "keys_on_page", "keys_lost", "pages_salvaged", "salvage_failed", "subpages_lost_after", "rebuilt",
            "wrong", "wrong_examples", "helper", "ao_delivered", "late_touch", "signals_at_touch",
            "salvage_error")
    return {k: obs[k] for k in keep if k in obs}


# ------------------------------------------- the store poisons its own page

def test_sigbus_inside_madvise_is_recorded_and_survived(own):
    assert own["survived"]
    assert own["signals"]["ar"] == 1, show(own)
    assert own["signals"]["in_injection"] == 1, show(own)
    assert own["signals"]["ao"] == 0, show(own)


def test_whole_hugepage_loss_detected_from_lsb(own):
    lsb, subpages = lost_extent(own)
    assert own["lsb"] == lsb, show(own)
    assert own["lost_subpages_at_signal"] == subpages, show(own)
    if not own["keep_ue"]:
        # The kernel unmapped the whole hugepage: another process touching
        # it far from the poisoned 4 KiB gets the same machine check.
        touch = own["kernel"]["touch_same_page"]
        assert [(s["code"], s["lsb"]) for s in touch["signals"]] == [(BUS_MCEERR_AR, lsb)], show(own)
        assert "byte" not in touch, show(own)


def test_kernel_pread_fails_only_at_the_poisoned_subpage(own):
    k = own["kernel"]
    assert k["hardware_corrupted_kb"] == 4, show(own)
    assert k["pread_victim"] == "EIO", show(own)
    assert k["pread_neighbour"] == "same", show(own)
    # A read across the poisoned 4 KiB stops right before it.
    want = "EIO" if k["victim_in_chunk"] == 0 else f"short:{k['victim_in_chunk']}"
    assert k["pread_2m_chunk"] == want, show(own)


def test_salvage_loses_only_the_poisoned_subpage(own):
    assert own["keys_on_subpage"] >= 2, show(own)
    assert own["keys_lost"] == own["keys_on_subpage"], show(own)
    assert own["lost_keys_are_victims"], show(own)
    assert own["wrong"] == 0, show(own)
    assert own["keys_verified"] == own["keys_total"] - own["keys_on_subpage"], show(own)
    assert own["lost_key_read"] == "KeyLostError", show(own)
    assert own["subpages_lost_after"] == 1, show(own)
    assert own["neighbour_readable_after"], show(own)
    if not own["keep_ue"]:
        assert own["pages_salvaged"] == 1 and own["salvage_failed"] == 0, show(own)
        assert own["subpages_salvaged"] == PAGE_BYTES[own["page_size"]] // SUB - 1, show(own)


# --------------------------------------------------- no spare hugepage left

def test_without_a_spare_the_page_is_salvaged_into_4k_pages(no_spare):
    if no_spare["keep_ue"]:
        pytest.skip("keep_ue kernel: the hugepage stays mapped, nothing needs a spare")
    o = no_spare
    assert o["pages_held"] > 0, show(o)      # every free hugepage was taken
    assert o["signals"]["ar"] == 1 and o["signals"]["in_injection"] == 1, show(o)
    assert o["lsb"] == PAGE_SHIFT[o["page_size"]], show(o)
    assert o["pages_salvaged"] == 1 and o["pages_degraded"] == 1 and o["salvage_failed"] == 0, show(o)
    assert o["keys_lost"] == o["keys_on_subpage"] and o["lost_keys_are_victims"], show(o)
    assert o["subpages_lost_after"] == 1 and o["neighbour_readable_after"], show(o)
    assert o["wrong"] == 0 and o["keys_verified"] == o["keys_total"] - o["keys_on_subpage"], show(o)


def test_a_second_error_in_the_degraded_page_costs_one_subpage(no_spare):
    if no_spare["keep_ue"]:
        pytest.skip("keep_ue kernel: no page is degraded")
    s = no_spare["second"]
    # Now 4 KiB shmem pages: the kernel reports (and unmaps) just 4 KiB.
    assert s["signals"] == {"ar": 1, "ao": 0, "adrerr": 0, "in_injection": 1}, s
    assert s["lsb"] == 12 and s["lost_subpages_at_signal"] == 1, s
    assert s["pages_salvaged"] == 0 and s["pages_degraded"] == 0, s
    assert s["keys_lost"] == s["keys_on_subpage"] and s["lost_keys_are_victims"], s
    assert s["subpages_lost_after"] == 2 and s["wrong"] == 0, s


def test_without_salvage_every_key_on_the_page_is_lost_and_rebuilt(no_salvage):
    if no_salvage["keep_ue"]:
        pytest.skip("keep_ue kernel: the hugepage stays mapped, no whole-page loss")
    o = no_salvage
    assert o["signals"]["ar"] == 1 and o["signals"]["in_injection"] == 1, show(o)
    assert o["lsb"] == PAGE_SHIFT[o["page_size"]], show(o)
    assert o["pages_salvaged"] == 0 and o["salvage_failed"] == 0, show(o)
    assert o["keys_lost"] == o["keys_on_page"] == o["keys_total"], show(o)
    assert o["wait_recovered"], show(o)
    assert o["rebuilt"] == o["keys_on_page"] and o["still_lost"] == 0, show(o)
    assert o["wrong"] == 0 and o["keys_verified"] == o["keys_total"], show(o)
    # The other hugepage of the arena was never affected.
    other = o["kernel"]["touch_other_page"]
    assert other["signals"] == [] and "byte" in other, show(o)


# ------------------------------------------ AO from another process's poison

def test_index_page_error_loses_its_hash_range_only_and_it_comes_back(index):
    """A real UE on an index page (scenario ``index``)."""
    assert index["survived"] and index["subpage_kind"] == "index", index
    lsb, subpages = lost_extent(index)
    assert index["lsb"] == lsb and index["lost_subpages_at_signal"] == subpages, index
    assert index["kernel"]["pread_victim"] == "EIO", index
    assert index["recover"]["index_pages_lost"] == 1, index
    assert index["range_keys_lost"] == index["keys_in_range"] > 0, index
    assert index["other_keys_lost"] == 0, index
    assert index["used_after_orphans"] == index["live_bytes_outside_range"], index
    assert index["wait_recovered"] and index["ranges_rebuilt"] == 1, index
    assert index["wrong"] == 0 and index["keys_after"] == index["keys_total"], index
    assert index["subpages_lost_after"] == 1, index


def test_ao_reaches_the_store_when_another_process_poisons(ao):
    helper = ao["helper"]
    assert not helper.get("failed") and helper["rc"] == 0, show(ao)
    lsb, subpages = lost_extent(ao)
    # The poisoner itself gets the action-required signal inside madvise...
    assert [(s["code"], s["lsb"]) for s in helper["signals"]] == [(BUS_MCEERR_AR, lsb)], show(ao)
    # ...and the store, which asked for early kill, an asynchronous AO.
    assert ao["ao_delivered"], show(ao)
    assert ao["signals"] == {"ar": 0, "ao": 1, "adrerr": 0, "in_injection": 0}, show(ao)
    assert ao["lsb"] == lsb and ao["lost_subpages_at_signal"] == subpages, show(ao)


def test_ao_recovered_before_any_touch(ao):
    # No synchronous machine check in the store during the whole scenario,
    # reads of every surviving key included.
    assert ao["signals_total"]["ar"] == 0 and ao["signals_total"]["adrerr"] == 0, show(ao)
    assert ao["keys_lost"] == ao["keys_on_subpage"] and ao["lost_keys_are_victims"], show(ao)
    assert ao["wrong"] == 0, show(ao)
    assert ao["keys_verified"] == ao["keys_total"] - ao["keys_on_subpage"], show(ao)
    assert ao["subpages_lost_after"] == 1, show(ao)
    if not ao["keep_ue"]:
        # Salvage found the poisoned 4 KiB by the kernel's EIO alone: this
        # process never injected anything.
        assert ao["pages_salvaged"] == 1 and ao["salvage_failed"] == 0, show(ao)


# ------------------------------------------------- SIGBUS outside the arena

CHILD = """
import ctypes, mmap, os, sys
import kvstore._native as n
arena = n.Arena(1 << 20, "4K")          # our handler is installed now
assert n.handler_installed()
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
if sys.argv[1] == "hwpoison_anon":
    # A private anonymous page, nothing to do with any arena, really poisoned.
    addr = libc.mmap(None, 4096, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    ctypes.memset(addr, 0x5a, 4096)
    print("poisoning", flush=True)
    rc = libc.madvise(addr, 4096, 100)
    print("survived madvise", rc, ctypes.get_errno(), flush=True)
    ctypes.string_at(addr, 1)
else:
    # A shared mapping past the end of an empty file: BUS_ADRERR on load.
    addr = libc.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_SHARED, os.memfd_create("empty"), 0)
    print("touching", flush=True)
    n._raw_load(addr)
print("survived", n.signal_counts(), flush=True)
"""


@pytest.mark.parametrize("how", ["hwpoison_anon", "beyond_eof"])
def test_sigbus_outside_the_arena_still_kills(how, child_env):
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), how], env=child_env, capture_output=True,
                       timeout=120)
    out = p.stdout.decode(errors="replace")
    detail = f"returncode {p.returncode}\nstdout:\n{out}\nstderr:\n{p.stderr.decode(errors='replace')[-2000:]}"
    assert ("poisoning" in out) or ("touching" in out), detail
    assert "survived" not in out, detail
    assert p.returncode == -signal.SIGBUS, detail
