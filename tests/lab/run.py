"""Boot the kernel memory-failure lab and run tests/lab in it.

    python -m tests.lab.run [--no-install] [--timeout SECONDS] [--out DIR]

1. Makes sure the tools are there, installing what is missing (as root):
   qemu-system-x86 and busybox-static (apt), a Linux >= 6.12 kernel with
   CONFIG_MEMORY_FAILURE (Debian's linux-image-amd64; on bookworm from
   bookworm-backports, added to apt's sources with the mirror the machine
   already uses), and virtme-ng (pip, the ``vng`` command).
2. Runs the same fault scenarios through the simulator (kernel_policy
   "mainline", kinds ar/ao) on this machine, where its hugepage pool allows;
   page sizes it cannot supply are simulated inside the VM instead.
3. Boots one VM (virtme-ng: the machine's own root filesystem, read-only, with
   1 GiB and 2 MiB hugepages reserved at boot) and runs
   ``pytest tests/lab -m lab`` inside it with real MADV_HWPOISON allowed.
4. Prints kernel vs simulator per scenario; any difference is a simulator bug.

Exit status: 0 when the lab passed, or when no VM could be had (printed as a
loud SKIPPED with the reason, so CI on a machine without it does not break);
1 when a lab test failed or the VM died while the tests ran.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import scenarios

ROOT = Path(__file__).resolve().parent.parent.parent
MIN_KERNEL = (6, 12)     # pread of a poisoned hugetlb page fails over the whole page before
VM_MEMORY = "8G"         # 1 GiB pages need 1 GiB-aligned free ranges: room for five of them
# Each kernel scenario leaves one hugepage poisoned for good: 1 GiB needs
# 2 (own) + 1 (no_spare) + 1 (no_salvage) + 2 (ao) - 1 = 5.
BOOT_HUGEPAGES = {"1G": 5, "2M": 64}
# Modules udev would load at boot for qemu's emulated PC hardware; under
# software emulation loading them takes most of a minute and none is needed.
MODULE_BLACKLIST = (
    "kvm_amd,kvm_intel,kvm,irqbypass,sr_mod,cdrom,ccp,sg,iTCO_wdt,intel_pmc_bxt,iTCO_vendor_support,ahci,"
    "libahci,libata,scsi_mod,scsi_common,crct10dif_pclmul,crc32_pclmul,crc32c_intel,ghash_clmulni_intel,"
    "sha512_ssse3,sha256_ssse3,sha1_ssse3,evdev,aesni_intel,psmouse,gf128mul,crypto_simd,cryptd,i6300esb,"
    "i2c_i801,watchdog,serio_raw,lpc_ich,i2c_smbus,pcspkr,qemu_fw_cfg,button,joydev,mousedev")


def log(msg: str):
    print(f"[lab] {msg}", flush=True)


def loud(title: str, lines=()):
    bar = "#" * 78
    print(f"\n{bar}\n# {title}", flush=True)
    for line in lines:
        print(f"#   {line}", flush=True)
    print(bar + "\n", flush=True)


class CannotBoot(Exception):
    """No lab VM on this machine (the message says what is missing)."""


# ------------------------------------------------------------------ installs

def run_quiet(cmd, env=None, timeout=900) -> tuple[int, str]:
    log("$ " + " ".join(shlex.quote(c) for c in cmd))
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=env, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 1, str(e)
    return p.returncode, p.stdout


def os_release() -> dict:
    out = {}
    try:
        with open("/etc/os-release") as f:
            for line in f:
                k, _, v = line.strip().partition("=")
                out[k] = v.strip('"')
    except OSError:
        pass
    return out


class Apt:
    def __init__(self, allowed: bool):
        self.allowed = allowed
        self.updated = False

    def usable(self) -> str | None:
        if not self.allowed:
            return "installing is switched off (--no-install)"
        if shutil.which("apt-get") is None:
            return "no apt-get on this machine"
        if os.geteuid() != 0:
            return "not root: cannot apt-get install"
        return None

    def update(self):
        if not self.updated:
            rc, out = run_quiet(["apt-get", "update", "-q"])
            if rc != 0:
                log("apt-get update failed:\n" + out[-1500:])
            self.updated = True

    def install(self, *pkgs: str, env_extra=None) -> tuple[bool, str]:
        why = self.usable()
        if why:
            return False, why
        self.update()
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        env.update(env_extra or {})
        rc, out = run_quiet(["apt-get", "install", "-y", "-q", "--no-install-recommends", *pkgs], env=env)
        return rc == 0, out[-2000:]


def debian_mirror() -> str | None:
    """The Debian archive URI the machine's apt sources already use."""
    files = glob.glob("/etc/apt/sources.list") + glob.glob("/etc/apt/sources.list.d/*.list") + \
        glob.glob("/etc/apt/sources.list.d/*.sources")
    for path in files:
        try:
            text = open(path).read()
        except OSError:
            continue
        for m in re.finditer(r"(https?://\S+?/debian)/?(\s|$)", text):
            return m.group(1)
    return None


def ensure_backports(codename: str) -> str | None:
    """Add <codename>-backports to apt's sources if absent. None or why not."""
    suite = f"{codename}-backports"
    for path in glob.glob("/etc/apt/sources.list") + glob.glob("/etc/apt/sources.list.d/*"):
        try:
            if suite in open(path).read():
                return None
        except OSError:
            continue
    mirror = debian_mirror()
    if mirror is None:
        return "cannot tell which Debian mirror apt uses, so cannot add " + suite
    path = f"/etc/apt/sources.list.d/{suite}.sources"
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    body = f"Types: deb\nURIs: {mirror}\nSuites: {suite}\nComponents: main\n"
    if os.path.exists(keyring):
        body += f"Signed-By: {keyring}\n"
    try:
        with open(path, "w") as f:
            f.write(body)
    except OSError as e:
        return f"cannot write {path}: {e}"
    log(f"added {suite} ({mirror}) to apt sources: {path}")
    return None


def kernel_version_tuple(release: str) -> tuple[int, ...]:
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def find_kernel() -> tuple[str, str] | None:
    """(vmlinuz path, release) of the newest installed kernel >= 6.12 with
    CONFIG_MEMORY_FAILURE=y and its modules."""
    found = []
    for img in glob.glob("/boot/vmlinuz-*"):
        release = img[len("/boot/vmlinuz-"):]
        if kernel_version_tuple(release) < MIN_KERNEL or not os.path.isdir(f"/lib/modules/{release}"):
            continue
        try:
            config = open(f"/boot/config-{release}").read()
        except OSError:
            continue
        if "CONFIG_MEMORY_FAILURE=y" in config:
            found.append((kernel_version_tuple(release), release, img))
    if not found:
        return None
    found.sort()
    return found[-1][2], found[-1][1]


def ensure_kernel(apt: Apt) -> tuple[str, str]:
    k = find_kernel()
    if k:
        return k
    why = apt.usable()
    if why:
        raise CannotBoot(f"no kernel >= {'.'.join(map(str, MIN_KERNEL))} with CONFIG_MEMORY_FAILURE in /boot, "
                         f"and {why}")
    rel = os_release()
    codename = rel.get("VERSION_CODENAME", "")
    pkg = "linux-image-amd64"
    if rel.get("ID") == "debian" and codename == "bookworm":
        why = ensure_backports(codename)
        if why:
            raise CannotBoot(why)
        apt.updated = False
        pkg = f"linux-image-amd64/{codename}-backports"     # only the kernel from backports
    # The VM gets its own initramfs from virtme-ng: skip generating one.
    ok, out = apt.install(pkg, env_extra={"INITRD": "No"})
    if not ok:
        raise CannotBoot(f"apt-get install {pkg} failed:\n{out}")
    k = find_kernel()
    if not k:
        raise CannotBoot(f"installed {pkg}, but still no kernel >= 6.12 with CONFIG_MEMORY_FAILURE in /boot")
    return k


def ensure_tools(apt: Apt) -> dict:
    tools = {}
    if shutil.which("qemu-system-x86_64") is None:
        ok, out = apt.install("qemu-system-x86")
        if not ok or shutil.which("qemu-system-x86_64") is None:
            raise CannotBoot(f"no qemu-system-x86_64 and apt-get install qemu-system-x86 failed: {out[-800:]}")
    tools["qemu"] = shutil.which("qemu-system-x86_64")
    if not any(shutil.which(b) for b in ("busybox", "busybox-static")):
        ok, out = apt.install("busybox-static")
        if not ok:
            raise CannotBoot(f"no busybox (virtme-ng builds its initramfs with it): {out[-800:]}")
    tools["kernel"], tools["release"] = ensure_kernel(apt)
    vng = shutil.which("vng") or str(Path(sys.executable).parent / "vng")
    if not os.access(vng, os.X_OK):
        if not apt.allowed:
            raise CannotBoot("no vng (virtme-ng) and installing is switched off")
        rc, out = run_quiet([sys.executable, "-m", "pip", "install", "-q", "virtme-ng"])
        vng = shutil.which("vng") or str(Path(sys.executable).parent / "vng")
        if rc != 0 or not os.access(vng, os.X_OK):
            raise CannotBoot(f"pip install virtme-ng failed: {out[-800:]}")
    tools["vng"] = vng
    tools["gcc"] = shutil.which("gcc")
    if tools["gcc"] is None:
        apt.install("gcc")
        tools["gcc"] = shutil.which("gcc")
    return tools


def kvm_usable() -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return bool(re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M))


# ---------------------------------------------------------------- simulator

HOST_SIM_SCENARIOS = [sc for sc in scenarios.SCENARIOS if sc != "no_spare"]   # no_spare holds the whole pool


def simulate(sizes, out: Path) -> int:
    if not sizes:
        return 0
    cmd = [sys.executable, "-m", "tests.lab.scenarios", "--mode", "sim", "--sizes", *sizes,
           "--scenarios", *HOST_SIM_SCENARIOS, "--out", str(out)]
    log("simulator on this machine: " + " ".join(cmd[1:]))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("KVSTORE_ALLOW_HWPOISON", None)
    return subprocess.run(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, timeout=600).returncode


def sim_split() -> tuple[list[str], list[str]]:
    """Page sizes the simulator can run here vs. those left to the VM."""
    need = max(scenarios.PAGES_NEEDED[sc] for sc in HOST_SIM_SCENARIOS)
    here = [ps for ps in ("2M", "1G") if scenarios.hugepage_pool(ps)["available"] >= need]
    return here, [ps for ps in ("2M", "1G") if ps not in here]


# ----------------------------------------------------------------------- VM

GUEST = """#!/bin/sh
# Runs inside the lab VM (written by tests/lab/run.py).
OUT={out}
{{ echo "uptime $(cut -d' ' -f1 /proc/uptime)"; echo "release $(uname -r)";
  for d in /sys/kernel/mm/hugepages/hugepages-*; do echo "$(basename $d) $(cat $d/nr_hugepages)"; done;
  echo "early_kill $(cat /proc/sys/vm/memory_failure_early_kill)"; }} > "$OUT/booted"
cd {root}
export PYTHONPATH={root} KVSTORE_LAB_VM=1 KVSTORE_ALLOW_HWPOISON=1 KVSTORE_LAB_RESULTS="$OUT/kernel.jsonl"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
{sim}
echo "[vm] pytest tests/lab at uptime $(cut -d' ' -f1 /proc/uptime)"
{python} -m pytest tests/lab -m lab -v -p no:cacheprovider -p no:hypothesispytest \\
    --junitxml="$OUT/junit.xml"
echo $? > "$OUT/pytest_rc"
echo "[vm] done at uptime $(cut -d' ' -f1 /proc/uptime)"
"""


def boot(tools: dict, out: Path, vm_sim_sizes, timeout: float, memory: str) -> dict:
    # The simulator side of no_spare (it holds the whole pool) and of the page
    # sizes this machine could not supply runs here, before any real poison.
    py = shlex.quote(sys.executable)
    sim = f'{py} -m tests.lab.scenarios --mode sim --sizes 2M 1G --scenarios no_spare --out "$OUT/sim.jsonl"'
    if vm_sim_sizes:
        sim += (f"\n{py} -m tests.lab.scenarios --mode sim --sizes {' '.join(vm_sim_sizes)} "
                f"--scenarios {' '.join(HOST_SIM_SCENARIOS)} --out \"$OUT/sim.jsonl\"")
    script = out / "guest.sh"
    script.write_text(GUEST.format(out=shlex.quote(str(out)), root=shlex.quote(str(ROOT)),
                                   python=shlex.quote(sys.executable), sim=sim))
    script.chmod(0o755)
    append = " ".join(f"hugepagesz={ps} hugepages={n}" for ps, n in BOOT_HUGEPAGES.items())
    append += f" module_blacklist={MODULE_BLACKLIST}"
    cmd = [tools["vng"], "--run", tools["kernel"], "--memory", memory, "--cpus", "1", "--append", append,
           "--rwdir", str(out), "--cwd", str(ROOT), "--exec", f"sh {script}"]
    if not kvm_usable():
        # Software emulation: qemu's "max" CPU model makes the guest kernel
        # copy and clear memory with `rep movsb/stosb`, which TCG emulates a
        # byte at a time (6-8x slower copies and clears here); qemu64 has no ERMS/FSRM.
        # pdpe1gb: without it the guest kernel has no 1 GiB pages at all.
        cmd[1:1] = ["--disable-kvm", "--qemu-opts=-cpu qemu64,+pdpe1gb"]
    log("booting: " + " ".join(shlex.quote(c) for c in cmd))
    t0 = time.monotonic()
    console = open(out / "console.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    booted_at = None

    def pump():
        for line in proc.stdout:
            console.write(line)
            console.flush()
            print(f"vm| {line.rstrip()}", flush=True)

    reader = threading.Thread(target=pump, name="vm-console", daemon=True)
    reader.start()
    deadline = t0 + timeout
    timed_out = False
    try:
        while proc.poll() is None:
            if booted_at is None and (out / "booted").exists():
                booted_at = time.monotonic() - t0
            if time.monotonic() > deadline:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.5)
        proc.wait()
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:         # interrupted: never leave the VM behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        console.close()
    if booted_at is None and (out / "booted").exists():
        booted_at = time.monotonic() - t0
    return {"returncode": proc.returncode, "timed_out": timed_out, "seconds": round(time.monotonic() - t0, 1),
            "booted_after_s": None if booted_at is None else round(booted_at, 1)}


def read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


# --------------------------------------------------------------------- main

def report_table(out: Path):
    kernel = scenarios.load(str(out / "kernel.jsonl"))
    sim = scenarios.load(str(out / "sim.jsonl"))
    table, diffs = scenarios.compare(kernel, sim)
    where = {(o["scenario"], o["page_size"]): o.get("where", "?") for o in sim}
    notes = []
    for o in kernel + sim:
        if "skipped" in o:
            notes.append(f"{o['mode']} {o['scenario']}/{o['page_size']}: skipped: {o['skipped']}")
    text = ["kernel (lab VM, MADV_HWPOISON) vs simulator (kernel_policy=mainline, ar/ao)", table]
    if where:
        text.append("simulator ran on: " + ", ".join(f"{s}/{p}={w}" for (s, p), w in sorted(where.items())))
    text += notes
    if diffs:
        text.append("DIFFERENCES (simulator bugs):")
        text += [f"  - {d}" for d in diffs]
    else:
        text.append("no differences between kernel and simulator" if kernel and sim else
                    "no comparison: one side has no observations")
    body = "\n".join(text)
    (out / "comparison.txt").write_text(body + "\n")
    print("\n" + body + "\n", flush=True)
    return diffs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Boot the kernel memory-failure lab VM and run tests/lab in it.")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get/pip install missing tools")
    ap.add_argument("--timeout", type=float, default=540, help="seconds allowed for the VM (boot and tests)")
    ap.add_argument("--memory", default=VM_MEMORY, help="VM memory (qemu -m)")
    ap.add_argument("--out", help="directory for results (default: a new one under /tmp)")
    ap.add_argument("--sim-only", action="store_true", help="only the simulator side, no VM")
    args = ap.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="kvstore-lab-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("kernel.jsonl", "sim.jsonl", "booted", "pytest_rc", "junit.xml"):
        (out / name).unlink(missing_ok=True)
    log(f"results in {out}")
    t_start = time.monotonic()

    host_sizes, vm_sizes = sim_split()
    if simulate(host_sizes, out / "sim.jsonl") != 0:
        log("the simulator run reported errors (see above)")
    if args.sim_only:
        report_table(out)
        return 0

    try:
        tools = ensure_tools(Apt(not args.no_install))
    except CannotBoot as e:
        loud("KERNEL LAB SKIPPED: no lab VM on this machine", str(e).splitlines()[:12])
        report_table(out)
        return 0
    log(f"kernel {tools['release']} ({tools['kernel']}), qemu {tools['qemu']}, vng {tools['vng']}, "
        f"kvm {'yes' if kvm_usable() else 'no (software emulation)'}")
    if vm_sizes:
        log(f"page sizes the simulator will run inside the VM (not enough free here): {' '.join(vm_sizes)}")

    vm = boot(tools, out, vm_sizes, args.timeout, args.memory)
    booted = read_text(out / "booted")
    rc_text = read_text(out / "pytest_rc")
    tail = (read_text(out / "console.log") or "").strip().splitlines()[-25:]
    if booted is None:
        why = "timed out before the guest ran anything" if vm["timed_out"] else \
            f"vng exited with {vm['returncode']} before the guest ran anything"
        loud("KERNEL LAB SKIPPED: the VM did not boot", [why, "last console lines:", *tail])
        report_table(out)
        return 0
    boot_info = dict(line.split(" ", 1) for line in booted.strip().splitlines() if " " in line)
    diffs = report_table(out)
    log(f"VM: booted (guest script started) after {vm['booted_after_s']} s (guest uptime {boot_info.get('uptime')} s), "
        f"whole VM run {vm['seconds']} s; total {round(time.monotonic() - t_start, 1)} s")
    log("VM hugepages at boot: " + ", ".join(f"{k}={v}" for k, v in boot_info.items() if k.startswith("hugepages")))
    if rc_text is None:
        loud("KERNEL LAB FAILED: the VM stopped before the tests finished",
             ["timed out" if vm["timed_out"] else f"vng exit status {vm['returncode']}", "last console lines:", *tail])
        return 1
    rc = int(rc_text.strip() or 1)
    if rc == 5:
        loud("KERNEL LAB FAILED: pytest collected no lab tests inside the VM")
        return 1
    if rc != 0:
        loud("KERNEL LAB FAILED", [f"pytest exit status {rc} inside the VM; junit: {out / 'junit.xml'}"])
        return 1
    if diffs:
        loud("KERNEL LAB PASSED, but the simulator differs from the kernel", diffs)
    else:
        log("KERNEL LAB PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
