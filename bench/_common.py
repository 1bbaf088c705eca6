"""Helpers shared by the tlb and recovery benchmarks.

What every report needs (the exact command, the date, a machine
description), borrowing hugepages from the kernel's pools and giving back
only what was added, reading the page size of a mapping from
/proc/self/smaps, and one exception for numbers that cannot be right: a
benchmark that computes one prints it and exits with status 1, so the
``--quick`` runs in CI fail instead of publishing nonsense.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import sys

from kvstore import hugepages

PLOTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plots")


class Impossible(AssertionError):
    """A computed number that cannot be true (negative time, wrong answers,
    more keys lost than records in the region that was hit, ...)."""


def check(cond: bool, what: str, problems: list) -> None:
    """Record `what` in `problems` when `cond` is false (all are reported
    at the end, then the run exits non-zero)."""
    if not cond:
        problems.append(what)


def command_line(module: str) -> str:
    """The command that reproduces this run, e.g. `python -m bench.tlb --quick`."""
    return " ".join(["python", "-m", module] + [shlex.quote(a) for a in sys.argv[1:]])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    except OSError:
        pass
    return "unknown"


def machine() -> str:
    return (f"{os.cpu_count()} CPUs ({_cpu_model()}), {_mem_total()} RAM, "
            f"Linux {platform.release()}, Python {platform.python_version()}")


def header(title: str, module: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"## {title}\n\n"
            f"- command: `{command_line(module)}` (from the repository root)\n"
            f"- date: {now}\n"
            f"- machine: {machine()}\n")


def table(columns: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


class HugePages:
    """Borrow hugepages: ``need(label, n)`` grows the pool so n pages are
    available (other processes may hold pages at the same time) and
    remembers how many pages this process added; ``give_back()`` releases
    exactly those. Never shrinks a pool below what it was."""

    def __init__(self):
        self.added = {}
        self.notes = []

    def available(self, label: str) -> int:
        try:
            return hugepages.size_status(label)["available"]
        except (OSError, ValueError):
            return 0

    def need(self, label: str, n: int) -> int:
        """Pages of `label` available afterwards (may be < n; the reason is
        kept in self.notes)."""
        try:
            before = hugepages.size_status(label)
        except OSError as e:
            self.notes.append(f"{label}: {e.strerror or e}")
            return 0
        try:
            got = hugepages.ensure_free(label, n)
        except OSError as e:
            self.notes.append(f"{label}: cannot grow the pool: {e.strerror or e}")
            got = before["available"]
        after = hugepages.size_status(label)
        grown = (after["nr_hugepages"] - after["surplus_hugepages"]) - (
            before["nr_hugepages"] - before["surplus_hugepages"])
        if grown > 0:
            self.added[label] = self.added.get(label, 0) + grown
        if got < n:
            self.notes.append(f"{label}: asked for {n} available pages, the kernel has {got} "
                              f"(pool {after['nr_hugepages']}, free {after['free_hugepages']})")
        return got

    def give_back(self) -> None:
        for label, n in self.added.items():
            try:
                hugepages.release(label, n)
            except OSError as e:
                print(f"note: could not give back {n} x {label} pages: {e}", file=sys.stderr)
        self.added = {}


def smaps_entry(address: int) -> dict:
    """Fields of the /proc/self/smaps entry of the mapping that starts at
    (or contains) `address`, e.g. {"KernelPageSize": "1048576 kB", ...}."""
    with open("/proc/self/smaps") as f:
        text = f.read()
    cur = None
    fields = {}
    for line in text.splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            if cur is not None:
                break
            if lo <= address < hi:
                cur = line
                fields["range"] = head
                fields["name"] = line.split()[-1] if len(line.split()) > 5 else ""
        elif cur is not None and ":" in line:
            k, v = line.split(":", 1)
            fields[k.strip()] = v.strip()
    return fields


def kernel_page_kib(address: int) -> int | None:
    v = smaps_entry(address).get("KernelPageSize")
    return int(v.split()[0]) if v else None


def savefig(fig, name: str) -> str:
    os.makedirs(PLOTS, exist_ok=True)
    path = os.path.join(PLOTS, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return os.path.relpath(path, os.path.dirname(PLOTS))


def finish(problems: list) -> int:
    if problems:
        print("\nIMPOSSIBLE RESULTS (exit 1):")
        for p in problems:
            print(f"- {p}")
        return 1
    return 0
