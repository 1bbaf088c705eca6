"""kvstore-demo end to end, as a user runs it: a subprocess with a timeout.

The server mode starts a primary and a replica kvstore-server, injects a
stream of memory errors into the primary under a checked read/write load, and
must exit 0 with no wrong answers and no client errors, after memory errors
were really injected and keys really lost and rebuilt. The embedded mode does
the same with both stores in one process. Also: bad flags are a clear usage
error, and a failed check (an injected mismatch) is exit 1.
"""

import os
import re
import subprocess
import sys

import pytest

from serverutil import REPO, store_available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not store_available(), reason="the C engine is not built")]


def run_demo(*flags, timeout=60, code=None):
    cmd = [sys.executable, "-m", "kvstore.demo", *flags] if code is None else \
        [sys.executable, "-c", code, *flags]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout, p.stderr


def summary_numbers(out):
    def num(pattern):
        m = re.search(pattern, out, re.M)
        assert m, f"no {pattern!r} in the output:\n{out}"
        return int(m.group(1).replace(",", ""))
    return {
        "ues": num(r"^  memory errors\s+([\d,]+) injected"),
        "lost": num(r"^  keys lost / rebuilt\s+([\d,]+) /"),
        "rebuilt": num(r"^  keys lost / rebuilt\s+[\d,]+ / ([\d,]+)"),
        "wrong": num(r"^  wrong answers\s+([\d,]+)"),
        "still_lost": num(r"^  keys still lost\s+([\d,]+)"),
        "errors": num(r"^  client errors\s+([\d,]+)"),
    }


def check_healthy_run(rc, out, err):
    assert rc == 0, f"exit {rc}\nstdout:\n{out}\nstderr:\n{err}"
    n = summary_numbers(out)
    assert n["wrong"] == 0 and n["errors"] == 0 and n["still_lost"] == 0, out
    assert n["ues"] > 0, out
    assert n["lost"] > 0 and n["rebuilt"] > 0, out
    assert "result: OK" in out
    assert "\x1b[" not in out, "--plain (and a pipe) must not draw the live table"
    return n


@pytest.mark.timeout(90)
def test_servers_demo():
    rc, out, err = run_demo("--seconds", "3", "--keys", "5000", "--plain")
    check_healthy_run(rc, out, err)
    # it says what memory the primary got, and that the policy and faults are simulated
    assert re.search(r"^primary\s+127\.0\.0\.1:\d+", out, re.M), out
    assert re.search(r"arena: (hugetlb-1G|hugetlb-2M|memfd-4K)", out), out
    assert "kernel policy: keep_ue, simulated" in out
    assert re.search(r"^replica\s+127\.0\.0\.1:\d+ .*arena: memfd-4K", out, re.M), out
    # one progress line per second of load, with the live counters
    rows = re.findall(r"^\s*[\d.]+s\s+ops/s\s+[\d,]+\s+UEs", out, re.M)
    assert len(rows) >= 2, out
    # both servers were stopped: no kvstore-server of this run is left behind
    ports = re.findall(r"^(?:primary|replica)\s+127\.0\.0\.1:(\d+) \(pid (\d+)\)", out, re.M)
    assert len(ports) == 2, out
    for _, pid in ports:
        assert not _server_running(pid), f"server pid {pid} still running after the demo exited"


def _server_running(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"kvstore.server" in f.read()
    except OSError:
        return False


@pytest.mark.timeout(60)
def test_embedded_demo():
    rc, out, err = run_demo("--seconds", "3", "--keys", "5000", "--plain", "--embedded")
    check_healthy_run(rc, out, err)
    assert "primary store (in this process)" in out


@pytest.mark.timeout(60)
def test_wrong_answers_fail_the_run():
    # writes of keys ending in 7 reach the server with a changed value: the
    # demo must count wrong answers and exit 1, not pass
    code = ("import sys\n"
            "from kvstore.client import _sync\n"
            "orig = _sync.Pipeline.put\n"
            "def put(self, key, value, ttl=None):\n"
            "    return orig(self, key, value + b'!' if key.endswith(b'7') else value, ttl)\n"
            "_sync.Pipeline.put = put\n"
            "from kvstore import demo\n"
            "sys.exit(demo.main(sys.argv[1:]))\n")
    rc, out, err = run_demo("--seconds", "1", "--keys", "1000", "--plain", "--ue-rate", "0",
                            code=code)
    kept = re.findall(r"server log kept: (\S+)\)", err)
    for path in kept:
        os.unlink(path)
    assert rc == 1, f"exit {rc}\n{out}\n{err}"
    assert len(kept) == 2, err          # a failed run keeps both servers' logs for the user
    n = summary_numbers(out)
    assert n["wrong"] > 0 and n["ues"] == 0, out
    assert "result: FAILED" in out


@pytest.mark.parametrize("flags, message", [
    (["--seconds", "0"], "must be > 0"),
    (["--keys", "lots"], "not a number"),
    (["--ue-rate", "-1"], "between 0 and"),
    (["--kinds", "ao,zz"], "fault kinds are"),
    (["--kernel-policy", "nope"], "invalid choice"),
])
def test_bad_flags(flags, message):
    rc, out, err = run_demo(*flags, timeout=30)
    assert rc == 2 and message in err, (rc, out, err)
    assert "Traceback" not in err


# -- the cluster demo (real etcd, three shards, a primary killed mid-run)

def _needs_etcd():
    import shutil
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")


@pytest.mark.timeout(240)
def test_cluster_demo_survives_kill9_and_memory_errors():
    _needs_etcd()
    rc, out, err = run_demo("--cluster", "--seconds", "14", "--kill-at", "3", "--keys", "6000",
                            "--plain", timeout=220)
    assert rc == 0, f"exit {rc}\nstdout:\n{out}\nstderr:\n{err}"
    n = summary_numbers(out)
    assert n["wrong"] == 0 and n["still_lost"] == 0, out
    assert re.search(r"^  acked writes missing\s+0$", out, re.M), out
    assert n["ues"] > 0 and n["lost"] > 0 and n["rebuilt"] > 0, out
    # the kill and the failover were seen live, then in the summary
    assert re.search(r"kill -9 of the primary of shard 0 \(port \d+", out), out
    assert re.search(r"failover: port \d+ is shard 0's primary", out), out
    assert re.search(r"^  failover\s+shard 0: port \d+ killed, port \d+ promoted after", out,
                     re.M), out
    assert "result: OK" in out and "\x1b[" not in out


@pytest.mark.timeout(180)
def test_cluster_demo_fails_on_wrong_answers():
    _needs_etcd()
    code = ("import sys\n"
            "from kvstore.client import _cluster\n"
            "orig = _cluster.ClusterPipeline.put\n"
            "def put(self, key, value, ttl=None):\n"
            "    return orig(self, key, value + b'!' if key.endswith(b'7') else value, ttl)\n"
            "_cluster.ClusterPipeline.put = put\n"
            "from kvstore import demo\n"
            "sys.exit(demo.main(sys.argv[1:]))\n")
    rc, out, err = run_demo("--cluster", "--seconds", "2", "--kill-at", "60", "--keys", "2000",
                            "--plain", "--ue-rate", "0", code=code, timeout=160)
    assert rc == 1, f"exit {rc}\n{out}\n{err}"
    assert summary_numbers(out)["wrong"] > 0 and "result: FAILED" in out, out
    kept = re.search(r"cluster logs kept in (\S+)\)", err)
    assert kept, err
    import shutil
    shutil.rmtree(kept.group(1), ignore_errors=True)


def test_cluster_and_embedded_exclude_each_other():
    rc, out, err = run_demo("--cluster", "--embedded", timeout=30)
    assert rc == 2 and "exclude each other" in err, (rc, out, err)
