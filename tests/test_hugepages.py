"""kvstore.hugepages: status parsing, reserve/ensure_free/release, the CLI.

Parsing and the CLI's reporting run against a fake sysfs tree (with a small
fake kernel that grants only part of a request, like a fragmented machine).
The real pools are changed only when running as root, by a few pages, and put
back as they were. Non-root behaviour is checked for real (the CLI run as
`nobody` via setpriv) where possible, and in-process with a write that fails
with EACCES.
"""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvstore import hugepages as hp

ROOT = Path(__file__).resolve().parent.parent
MODULE_FILE = ROOT / "kvstore" / "hugepages.py"

GIB, MIB = 1 << 30, 1 << 20


def make_sysfs(root, sizes):
    """Create a fake hugepages sysfs tree: sizes = {kB: {field: value}}."""
    for kb, fields in sizes.items():
        d = root / f"hugepages-{kb}kB"
        d.mkdir(parents=True)
        values = {"nr_hugepages": 0, "free_hugepages": 0, "resv_hugepages": 0,
                  "surplus_hugepages": 0, "nr_overcommit_hugepages": 0, **fields}
        for name, value in values.items():
            (d / name).write_text(f"{value}\n")
    return root


class FakeKernel:
    """Stands in for the kernel behind nr_hugepages writes: grants at most
    `limit` pages per size and never frees pages in use or reserved."""

    def __init__(self, root, limits, in_use=None):
        self.root, self.limits, self.in_use = root, limits, in_use or {}
        self.writes = []

    def read(self, kb, name):
        return int((self.root / f"hugepages-{kb}kB" / name).read_text())

    def __call__(self, path, data):
        path = Path(path)
        assert path.name == "nr_hugepages", path
        kb = int(path.parent.name[len("hugepages-"):-len("kB")])
        want = int(data.decode())
        self.writes.append((kb, want))
        busy = self.in_use.get(kb, 0) + self.read(kb, "resv_hugepages")
        nr = max(busy, min(want, self.limits.get(kb, 1 << 30)))
        path.write_text(f"{nr}\n")
        (path.parent / "free_hugepages").write_text(f"{nr - self.in_use.get(kb, 0)}\n")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake sysfs with both sizes empty and a kernel granting 2 x 1G, 300 x 2M."""
    root = make_sysfs(tmp_path / "hugepages", {1048576: {}, 2048: {}})
    kernel = FakeKernel(root, {1048576: 2, 2048: 300})
    monkeypatch.setattr(hp, "_raw_write", kernel)
    return root, kernel


# --- sizes ---------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("2G", 2 * GIB), ("2GiB", 2 * GIB), ("2gb", 2 * GIB), ("512M", 512 * MIB),
    ("4096", 4096), ("1.5G", 3 * GIB // 2), (" 2048kB ", 2 * MIB), ("1T", 1 << 40),
])
def test_parse_bytes(text, want):
    assert hp.parse_bytes(text) == want


@pytest.mark.parametrize("text", ["", "G", "-1G", "2X", "0.1K", "two", "1e9"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError):
        hp.parse_bytes(text)


@pytest.mark.parametrize("text,want", [("1G", "1G"), ("1g", "1G"), ("1GiB", "1G"),
                                       ("1048576kB", "1G"), ("2M", "2M"), ("2048K", "2M")])
def test_normalize_label(text, want):
    assert hp.normalize_label(text) == want


@pytest.mark.parametrize("text", ["0", "100", "abc"])
def test_normalize_label_rejects(text):
    with pytest.raises(ValueError):
        hp.normalize_label(text)


# --- status ----------------------------------------------------------------------

def test_status_parses_fake_sysfs(tmp_path):
    root = make_sysfs(tmp_path / "hp", {
        1048576: {"nr_hugepages": 4, "free_hugepages": 3, "resv_hugepages": 1, "surplus_hugepages": 0},
        2048: {"nr_hugepages": 512, "free_hugepages": 500, "resv_hugepages": 10, "surplus_hugepages": 2},
        32768: {"nr_hugepages": 1, "free_hugepages": 1},
    })
    (root / "not-a-size").mkdir()
    st = hp.status(root)
    assert list(st) == ["1G", "32M", "2M"]          # largest first
    assert st["1G"] == {"page_size": GIB, "nr_hugepages": 4, "free_hugepages": 3,
                        "resv_hugepages": 1, "surplus_hugepages": 0, "available": 2}
    assert st["2M"]["available"] == 490
    assert st["2M"]["surplus_hugepages"] == 2
    assert st["32M"]["page_size"] == 32 * MIB
    assert hp.size_status("2M", root) == st["2M"]


def test_status_without_hugetlb(tmp_path):
    assert hp.status(tmp_path / "missing") == {}
    with pytest.raises(FileNotFoundError, match="no 1 GiB hugepages"):
        hp.size_status("1G", tmp_path)


def test_status_of_this_machine():
    if not os.path.isdir(hp.SYSFS):
        pytest.skip(f"{hp.SYSFS} does not exist: no hugetlb support in this kernel")
    st = hp.status()
    assert st, "sysfs has a hugepages directory but no sizes were parsed"
    for label, s in st.items():
        assert s["page_size"] == hp.parse_bytes(label)
        assert 0 <= s["free_hugepages"] <= s["nr_hugepages"]
        assert s["available"] == max(0, s["free_hugepages"] - s["resv_hugepages"])


# --- reserve / ensure_free / release against the fake kernel ----------------------

def test_reserve_reports_what_the_kernel_gave(fake):
    root, kernel = fake
    assert hp.reserve("2M", 100, root) == 100
    assert hp.reserve("1G", 4, root) == 2                # kernel gave only 2
    assert kernel.writes == [(2048, 100), (1048576, 4)]
    st = hp.status(root)
    assert st["1G"]["nr_hugepages"] == 2 and st["1G"]["free_hugepages"] == 2
    assert hp.reserve("1G", 0, root) == 0


def test_reserve_rejects_bad_counts(fake):
    root, kernel = fake
    with pytest.raises(ValueError):
        hp.reserve("2M", -1, root)
    with pytest.raises(TypeError):
        hp.reserve("2M", "5", root)
    with pytest.raises(TypeError):
        hp.reserve("2M", True, root)
    with pytest.raises(FileNotFoundError, match="no 16 GiB hugepages"):
        hp.reserve("16G", 1, root)
    assert kernel.writes == []


def test_ensure_free_counts_reserved_pages_as_taken(tmp_path, monkeypatch):
    root = make_sysfs(tmp_path / "hp", {2048: {"nr_hugepages": 10, "free_hugepages": 6,
                                               "resv_hugepages": 2}})
    kernel = FakeKernel(root, {2048: 1000}, in_use={2048: 4})
    monkeypatch.setattr(hp, "_raw_write", kernel)
    assert hp.ensure_free("2M", 3, root) == 4            # 6 free - 2 reserved: enough
    assert kernel.writes == []
    assert hp.ensure_free("2M", 20, root) == 20          # grows by 16
    assert kernel.writes == [(2048, 26)]
    kernel.limits[2048] = 30
    assert hp.ensure_free("2M", 100, root) == 24         # partial: capped at 30
    assert hp.release("2M", 5, root) == 25
    assert hp.release("2M", None, root) == 6             # 4 in use + 2 reserved stay


def test_release_more_than_pool(fake):
    root, _ = fake
    hp.reserve("2M", 3, root)
    assert hp.release("2M", 10, root) == 0


# --- CLI against the fake kernel -----------------------------------------------

def cli(capsys, root, *argv):
    rc = hp.main(["--sysfs", str(root), *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_reserve_everything(fake, capsys):
    root, _ = fake
    rc, out, _ = cli(capsys, root, "reserve", "--size", "2M", "512M")
    assert rc == 0
    assert out.strip() == "asked for 256 x 2 MiB, got 256; 256 free"
    rc, out, _ = cli(capsys, root, "reserve", "--size", "2M", "--count", "100")
    assert rc == 0 and "already have 256" in out


def test_cli_reserve_partial_is_reported_not_raised(fake, capsys, monkeypatch):
    root, _ = fake
    monkeypatch.setattr(hp, "_meminfo_free", lambda: 64 * GIB)
    rc, out, _ = cli(capsys, root, "reserve", "4G")
    assert rc == 1
    assert out.startswith("asked for 4 x 1 GiB, got 2 (memory fragmented")
    assert out.rstrip().endswith("; 2 free")
    monkeypatch.setattr(hp, "_meminfo_free", lambda: GIB // 2)
    rc, out, _ = cli(capsys, root, "reserve", "--count", "3")
    assert rc == 1 and "(had 2; not enough free memory" in out


def test_cli_release(fake, capsys):
    root, kernel = fake
    hp.reserve("1G", 2, root)
    hp.reserve("2M", 50, root)
    rc, out, _ = cli(capsys, root, "release", "--size", "2M", "--count", "20")
    assert rc == 0 and "released 20 x 2 MiB; pool now 30" in out
    rc, out, _ = cli(capsys, root, "release")
    assert rc == 0
    assert "released 2 x 1 GiB; pool now 0" in out and "released 30 x 2 MiB; pool now 0" in out
    assert hp.status(root)["2M"]["nr_hugepages"] == 0


def test_cli_release_reports_pages_in_use(tmp_path, monkeypatch, capsys):
    root = make_sysfs(tmp_path / "hp", {1048576: {"nr_hugepages": 3, "free_hugepages": 1}})
    monkeypatch.setattr(hp, "_raw_write", FakeKernel(root, {}, in_use={1048576: 2}))
    rc, out, _ = cli(capsys, root, "release", "--size", "1G")
    assert rc == 1
    assert "released 1 x 1 GiB; pool now 2 (2 still in use" in out


def test_cli_status(fake, capsys):
    root, _ = fake
    hp.reserve("2M", 7, root)
    rc, out, _ = cli(capsys, root, "status")
    assert rc == 0
    row = [l.split() for l in out.splitlines() if l.split()[:1] == ["2M"]][0]
    assert row[:6] == ["2M", "7", "7", "0", "0", "7"]
    rc, out, _ = cli(capsys, root, "status", "--json")
    assert json.loads(out)["2M"]["nr_hugepages"] == 7


@pytest.mark.parametrize("argv", [
    ["reserve"],                                  # no amount
    ["reserve", "1536M"],                         # not whole 1 GiB pages
    ["reserve", "2G", "--count", "2"],            # both
    ["reserve", "lots"],
    ["reserve", "--size", "7", "2G"],
    ["reserve", "--count", "-1"],
    ["frobnicate"],
    [],
])
def test_cli_usage_errors_exit_2(fake, capsys, argv):
    root, kernel = fake
    with pytest.raises(SystemExit) as exc:
        hp.main(["--sysfs", str(root), *argv])
    assert exc.value.code == 2
    assert kernel.writes == []


def test_cli_missing_size_exits_1(tmp_path, capsys):
    root = make_sysfs(tmp_path / "hp", {2048: {}})
    rc, _, err = cli(capsys, root, "reserve", "2G")
    assert rc == 1 and "no 1 GiB hugepages" in err


# --- without root ------------------------------------------------------------------

def test_non_root_in_process(fake, monkeypatch, capsys):
    root, _ = fake

    def denied(path, data):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(hp, "_raw_write", denied)
    monkeypatch.setattr(hp.os, "geteuid", lambda: 65534)
    with pytest.raises(PermissionError, match="needs root.*uid 65534"):
        hp.reserve("2M", 1, root)
    rc, out, err = cli(capsys, root, "reserve", "--size", "2M", "--count", "4")
    assert rc == 3
    assert "needs root" in err and "sudo kvstore-hugepages" in err
    rc, out, err = cli(capsys, root, "release")
    assert rc == 3
    rc, out, _ = cli(capsys, root, "status")
    assert rc == 0 and "(reserve and release need root)" in out


def test_read_only_sysfs_is_a_permission_error(fake, monkeypatch):
    root, _ = fake

    def rofs(path, data):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(hp, "_raw_write", rofs)
    with pytest.raises(PermissionError, match="read-only"):
        hp.reserve("1G", 1, root)


def _python_for_nobody():
    """An interpreter that uid 65534 can run (pyenv under /root often is not)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    for py in (sys.executable, "/usr/bin/python3"):
        if not os.path.exists(py):
            continue
        probe = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", py, "-c",
             f"open({str(MODULE_FILE)!r}).close()"], capture_output=True)
        if probe.returncode == 0:
            return py
    return None


def test_non_root_for_real_via_setpriv():
    if not os.path.isdir(hp.SYSFS) or "2M" not in hp.status():
        pytest.skip("no 2 MiB hugepage pool in this kernel's sysfs")
    py = _python_for_nobody()
    if py is None:
        pytest.skip("needs root, setpriv, and a Python and kvstore/hugepages.py readable by uid 65534")
    before = hp.status()["2M"]
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", py,
           str(MODULE_FILE), "reserve", "--size", "2M", "--count", str(before["nr_hugepages"] + 1)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "needs root" in proc.stderr and "uid 65534" in proc.stderr
    assert hp.status()["2M"]["nr_hugepages"] == before["nr_hugepages"]
    status = subprocess.run(cmd[:5] + [str(MODULE_FILE), "status"],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "need root" in status.stdout


# --- for real, as root -------------------------------------------------------------

def _need_root_pool(label):
    if os.geteuid() != 0:
        pytest.skip("changing hugepage pools needs root")
    st = hp.status()
    if label not in st:
        pytest.skip(f"this kernel offers no {label} hugepages")
    return st[label]


def _mem_free():
    return hp._meminfo_free() or 0


@pytest.mark.parametrize("label,extra", [("2M", 4), ("1G", 1)])
def test_reserve_and_release_for_real(label, extra):
    before = _need_root_pool(label)
    base = hp._persistent(before)
    try:
        got = hp.ensure_free(label, before["available"] + extra)
    except PermissionError as e:
        pytest.skip(f"root, but the kernel refused the write: {e}")
    try:
        now = hp.status()[label]
        added = hp._persistent(now) - base
        assert got == now["available"]
        assert 0 <= added <= extra
        if label == "2M" and _mem_free() > 1 * GIB:
            # 2 MiB pages come from plentiful free memory: all of them should arrive.
            assert added == extra, f"asked for {extra} x 2 MiB, got {added}"
        # 1 GiB pages may be refused after fragmentation: only consistency is required.
    finally:
        after = hp.release(label, max(0, hp._persistent(hp.status()[label]) - base))
    assert after == base


def test_cli_for_real_as_root():
    before = _need_root_pool("2M")
    base = hp._persistent(before)
    want = base + 2
    run = [sys.executable, "-m", "kvstore.hugepages"]
    try:
        proc = subprocess.run(run + ["reserve", "--size", "2M", "--count", str(want)],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        got = hp._persistent(hp.status()["2M"])
        assert proc.stdout.startswith(f"asked for {want} x 2 MiB, got {got}"), proc.stdout + proc.stderr
        assert proc.returncode == (0 if got >= want else 1)
    finally:
        proc = subprocess.run(run + ["release", "--size", "2M", "--count",
                                     str(hp._persistent(hp.status()["2M"]) - base)],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert hp._persistent(hp.status()["2M"]) == base
