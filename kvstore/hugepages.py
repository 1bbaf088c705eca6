"""Reserve, inspect and release HugeTLB pages for the kvstore arena.

The arena lives in 1 GiB (else 2 MiB) hugepage memfds, and only root can grow
the kernel's hugepage pools. This module writes the pool sizes in
/sys/kernel/mm/hugepages/hugepages-<N>kB/nr_hugepages, reads back what the
kernel actually gave (1 GiB pages often come up short once memory is
fragmented) and says so plainly.

Command line (also `python -m kvstore.hugepages`)::

    kvstore-hugepages status [--json]
    kvstore-hugepages reserve 2G                 # pool of 2 x 1 GiB pages
    kvstore-hugepages reserve --size 2M 512M     # pool of 256 x 2 MiB pages
    kvstore-hugepages reserve --size 2M --count 512
    kvstore-hugepages release [--size 1G] [AMOUNT | --count N]

`reserve` makes the pool hold at least that many pages (it never shrinks it).
`release` gives back that many pages, or every page nobody uses when no
amount is given (pages in use stay with their users). Exit status: 0 when
everything asked for was done, 1 when the kernel gave less, 2 on usage
errors, 3 without the privileges to write sysfs.

Library use (tests, CI, the Store's fallback messages)::

    status() -> {"1G": {"page_size": 1073741824, "nr_hugepages": 2,
                        "free_hugepages": 2, "resv_hugepages": 0,
                        "surplus_hugepages": 0, "available": 2}, "2M": {...}}
    reserve("1G", 2) -> pool size the kernel actually set
    ensure_free("2M", 256) -> pages available afterwards
    release("1G", n=None) -> pool size afterwards

Every function takes `sysfs=` (the hugepages directory) so tests can point it
at a fake tree. Only the standard library is used, so the file also runs as a
plain script when the rest of the package cannot be imported.
"""
import argparse
import errno
import json
import os
import re
import sys

SYSFS = "/sys/kernel/mm/hugepages"
MEMINFO = "/proc/meminfo"

#: Counters read for each page size, named as the sysfs files are.
FIELDS = ("nr_hugepages", "free_hugepages", "resv_hugepages", "surplus_hugepages")

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*$")
_DIR_RE = re.compile(r"^hugepages-(\d+)kB$")

EXIT_OK, EXIT_SHORT, EXIT_USAGE, EXIT_PERM = 0, 1, 2, 3


# --- sizes -------------------------------------------------------------------

def parse_bytes(text):
    """Parse an amount such as "2G", "512M", "2GiB", "1.5G" or "4096" into
    bytes. Suffixes are binary (K = 1024). Raises ValueError."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 2G, 512M, 1GiB or a byte count)")
    number, unit = m.group(1), m.group(2).upper()
    scaled = float(number) * _UNITS[unit] if "." in number else int(number) * _UNITS[unit]
    if scaled != int(scaled):
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(scaled)


def size_label(page_bytes):
    """Canonical label for a page size in bytes: 1073741824 -> "1G"."""
    for unit in ("T", "G", "M", "K"):
        if page_bytes % _UNITS[unit] == 0:
            return f"{page_bytes // _UNITS[unit]}{unit}"
    return str(page_bytes)


def human(page_bytes):
    """Human name of a page size: 1073741824 -> "1 GiB"."""
    label = size_label(page_bytes)
    return f"{label[:-1]} {label[-1]}iB" if label[-1] in "KMGT" else f"{label} B"


def normalize_label(text):
    """Accept "1G", "1g", "1GiB", "2048kB", "2M" ... and return the canonical
    label ("1G", "2M"). Raises ValueError."""
    return size_label(_page_bytes(text))


def _page_bytes(text):
    n = parse_bytes(text)
    if n <= 0 or n % 4096:
        raise ValueError(f"not a page size: {text!r}")
    return n


def _dir_for(label, sysfs):
    page = _page_bytes(label)
    path = os.path.join(sysfs, f"hugepages-{page // 1024}kB")
    if not os.path.isdir(path):
        raise FileNotFoundError(
            errno.ENOENT,
            f"this kernel offers no {human(page)} hugepages (no {path})")
    return path


# --- reading -----------------------------------------------------------------

def _read_int(path):
    with open(path) as f:
        return int(f.read().strip())


def _read_size(path, page_bytes):
    st = {"page_size": page_bytes}
    for name in FIELDS:
        st[name] = _read_int(os.path.join(path, name))
    st["available"] = max(0, st["free_hugepages"] - st["resv_hugepages"])
    return st


def status(sysfs=SYSFS):
    """Pool counters for every hugepage size the kernel offers, largest first.

    Returns {label: {"page_size", "nr_hugepages", "free_hugepages",
    "resv_hugepages", "surplus_hugepages", "available"}}; "available" is
    free minus reserved, what a new mapping can still get. Returns {} when the
    kernel has no hugetlb support (no sysfs directory)."""
    try:
        names = os.listdir(sysfs)
    except FileNotFoundError:
        return {}
    sizes = []
    for name in names:
        m = _DIR_RE.match(name)
        if m:
            sizes.append(int(m.group(1)) * 1024)
    out = {}
    for page in sorted(sizes, reverse=True):
        out[size_label(page)] = _read_size(os.path.join(sysfs, f"hugepages-{page // 1024}kB"), page)
    return out


def size_status(label, sysfs=SYSFS):
    """Counters of one size (see status()); FileNotFoundError if the kernel
    does not offer that size."""
    page = _page_bytes(label)
    return _read_size(_dir_for(label, sysfs), page)


def _persistent(st):
    # nr_hugepages counts surplus pages too; writes set the persistent part.
    return st["nr_hugepages"] - st["surplus_hugepages"]


# --- writing -----------------------------------------------------------------

def _raw_write(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_count(path, count):
    try:
        _raw_write(path, f"{count}\n".encode())
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            raise PermissionError(
                e.errno,
                f"cannot write {path}: {e.strerror}. Changing hugepage pools needs root "
                f"(this process runs as uid {os.geteuid()}); run it as root, e.g. "
                f"`sudo kvstore-hugepages ...`") from None
        if e.errno == errno.EROFS:
            raise PermissionError(
                e.errno,
                f"cannot write {path}: sysfs is mounted read-only here (a container "
                f"without privileges?); reserve hugepages on the host") from None
        if e.errno == errno.EINVAL and "1048576kB" in path:
            raise OSError(
                e.errno,
                f"the kernel refused to change {path} (EINVAL): it cannot allocate "
                f"1 GiB pages at run time; reserve them at boot with "
                f"`hugepagesz=1G hugepages=N` on the kernel command line") from None
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from None


def _check_count(count, what="count"):
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"{what} must be an int, not {type(count).__name__}")
    if count < 0:
        raise ValueError(f"{what} must be >= 0, got {count}")


def reserve(label, count, sysfs=SYSFS):
    """Set the persistent pool of `label` pages to `count` and return the
    pool size the kernel actually set (read back; may be less than asked when
    memory is short or fragmented, and this is not an error).

    Setting a smaller count shrinks the pool, but never below the pages in
    use or reserved by running processes. Raises PermissionError without
    root, FileNotFoundError when the kernel lacks that size."""
    _check_count(count)
    path = _dir_for(label, sysfs)
    _write_count(os.path.join(path, "nr_hugepages"), count)
    return _persistent(_read_size(path, _page_bytes(label)))


def ensure_free(label, n, sysfs=SYSFS):
    """Grow the `label` pool so that at least `n` pages are available (free
    and not reserved by anyone); never shrinks it. Returns the number of
    available pages afterwards, which is less than n when the kernel could
    not supply them."""
    _check_count(n, "n")
    path = _dir_for(label, sysfs)
    page = _page_bytes(label)
    st = _read_size(path, page)
    if st["available"] >= n:
        return st["available"]
    reserve(label, _persistent(st) + n - st["available"], sysfs)
    return _read_size(path, page)["available"]


def release(label, n=None, sysfs=SYSFS):
    """Give back `n` pages of the `label` pool, or every page nobody uses when
    n is None. Pages that running processes use or have reserved stay. Returns
    the pool size afterwards."""
    path = _dir_for(label, sysfs)
    st = _read_size(path, _page_bytes(label))
    if n is None:
        target = 0
    else:
        _check_count(n, "n")
        target = max(0, _persistent(st) - n)
    return reserve(label, target, sysfs)


# --- command line ------------------------------------------------------------

def _meminfo_free(meminfo=MEMINFO):
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemFree:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _shortfall_reason(page, missing):
    free = _meminfo_free()
    if free is not None and free < page * missing:
        reason = f"not enough free memory: {free / (1 << 30):.1f} GiB free"
    else:
        reason = "memory fragmented"
    if page >= 1 << 30:
        reason += "; 1 GiB pages are most reliably reserved at boot with hugepagesz=1G hugepages=N"
    return reason


def _count_from(args, page, parser):
    if args.amount is not None and args.count is not None:
        parser.error("give an amount or --count, not both")
    if args.count is not None:
        if args.count < 0:
            parser.error("--count must be >= 0")
        return args.count
    if args.amount is None:
        return None
    try:
        nbytes = parse_bytes(args.amount)
    except ValueError as e:
        parser.error(str(e))
    if nbytes % page:
        parser.error(f"{args.amount} is not a whole number of {human(page)} pages "
                     f"(use a multiple of {size_label(page)}, another --size, or --count)")
    return nbytes // page


def _fmt_bytes(n):
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.1f} {unit}iB"
    return f"{n} B"


def _print_status(st, out):
    if not st:
        print("this kernel has no hugetlb pages (no hugepages directory in sysfs)", file=out)
        return
    print(f"{'size':>5} {'pool':>6} {'free':>6} {'reserved':>8} {'surplus':>7} {'available':>9}  bytes available",
          file=out)
    for label, s in st.items():
        print(f"{label:>5} {s['nr_hugepages']:>6} {s['free_hugepages']:>6} {s['resv_hugepages']:>8} "
              f"{s['surplus_hugepages']:>7} {s['available']:>9}  {_fmt_bytes(s['available'] * s['page_size'])}",
              file=out)


def _cmd_reserve(args, parser, out):
    page = _page_bytes(args.size)
    want = _count_from(args, page, parser)
    if want is None:
        parser.error("reserve needs an amount (e.g. 2G) or --count N")
    label, name = size_label(page), human(page)
    before = size_status(label, args.sysfs)
    if _persistent(before) >= want:
        print(f"asked for {want} x {name}, already have {_persistent(before)}; "
              f"{before['available']} free", file=out)
        return EXIT_OK
    got = reserve(label, want, args.sysfs)
    after = size_status(label, args.sysfs)
    notes = [f"had {_persistent(before)}"] if _persistent(before) else []
    if got < want:
        notes.append(_shortfall_reason(page, want - got))
    msg = f"asked for {want} x {name}, got {got}" + (f" ({'; '.join(notes)})" if notes else "")
    print(f"{msg}; {after['available']} free", file=out)
    return EXIT_OK if got >= want else EXIT_SHORT


def _cmd_release(args, parser, out):
    labels = [normalize_label(args.size)] if args.size else None
    if labels is None:
        if args.amount is not None or args.count is not None:
            labels = ["1G"]
        else:
            labels = list(status(args.sysfs))
            if not labels:
                print("this kernel has no hugetlb pages; nothing to release", file=out)
                return EXIT_OK
    rc = EXIT_OK
    for label in labels:
        page = _page_bytes(label)
        n = _count_from(args, page, parser)
        before = _persistent(size_status(label, args.sysfs))
        after = release(label, n, args.sysfs)
        target = 0 if n is None else max(0, before - n)
        msg = f"released {before - after} x {human(page)}; pool now {after}"
        if after > target:
            msg += f" ({after - target} still in use or reserved by running processes)"
            rc = EXIT_SHORT
        print(msg, file=out)
    return rc


def _parser():
    p = argparse.ArgumentParser(
        prog="kvstore-hugepages",
        description="Reserve, show and release HugeTLB pages for kvstore (changing pools needs root).")
    p.add_argument("--sysfs", default=SYSFS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{status,reserve,release}")
    s = sub.add_parser("status", help="show the hugepage pools")
    s.add_argument("--json", action="store_true", help="print the counters as JSON")
    for name, text in (("reserve", "grow a pool to at least AMOUNT (never shrinks it)"),
                       ("release", "give back AMOUNT, or every unused page")):
        r = sub.add_parser(name, help=text)
        r.add_argument("amount", nargs="?", help="bytes of pages, e.g. 2G or 512M")
        r.add_argument("--size", default=None if name == "release" else "1G",
                       help="page size: 1G or 2M (default 1G%s)"
                            % (" or every size when no amount is given" if name == "release" else ""))
        r.add_argument("--count", type=int, help="number of pages instead of an amount")
    return p


def main(argv=None):
    """Entry point of `kvstore-hugepages`; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    out = sys.stdout
    try:
        if getattr(args, "size", None) is not None:
            try:
                args.size = normalize_label(args.size)
            except ValueError as e:
                parser.error(str(e))
        if args.cmd == "status":
            st = status(args.sysfs)
            if args.json:
                print(json.dumps(st, indent=2, sort_keys=True), file=out)
            else:
                _print_status(st, out)
                if os.geteuid() != 0:
                    print("(reserve and release need root)", file=out)
            return EXIT_OK
        if args.cmd == "reserve":
            return _cmd_reserve(args, parser, out)
        return _cmd_release(args, parser, out)
    except PermissionError as e:
        print(f"kvstore-hugepages: {e.strerror or e}", file=sys.stderr)
        return EXIT_PERM
    except OSError as e:
        print(f"kvstore-hugepages: {e.strerror or e}", file=sys.stderr)
        return EXIT_SHORT


if __name__ == "__main__":
    sys.exit(main())
