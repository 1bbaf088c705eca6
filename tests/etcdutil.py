"""A private etcd per test: free loopback ports, a temp data dir, stop/restart.

``EtcdProc.start()`` runs ``etcd`` (the Debian ``etcd-server`` package; CI
installs it) on two ports the OS picked, waits until ``/v3/maintenance/status``
answers and returns the running instance; ``url`` is its client URL.
``stop()`` (SIGTERM, then SIGKILL), ``kill()`` (SIGKILL), ``pause()`` /
``resume()`` (SIGSTOP/SIGCONT) and ``restart()`` (same ports, same data
dir, so the cluster's state survives) are what the fault tests use. Its log
goes to a file in the data dir; ``log_tail()`` shows it when a test fails.

Timing flags: ``--heartbeat-interval 50 --election-timeout 500`` make a
one-member etcd ready fast and lower etcd's minimum lease TTL (which is
1.5 x the election timeout) so tests can use 1 s leases.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest

ETCD = shutil.which("etcd")

needs_etcd = pytest.mark.skipif(ETCD is None, reason="etcd not installed (apt-get install etcd-server)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdProc:
    def __init__(self, data_dir=None, client_port=None, peer_port=None):
        self.owns_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="kvstore-etcd-")
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.proc = None
        self.logpath = os.path.join(self.data_dir, "etcd.log")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.client_port}"

    @classmethod
    def start_new(cls, **kw):
        return cls(**kw).start()

    def start(self, wait=True, timeout=20.0):
        if ETCD is None:
            pytest.skip("etcd not installed (apt-get install etcd-server)")
        c, p = f"http://127.0.0.1:{self.client_port}", f"http://127.0.0.1:{self.peer_port}"
        log = open(self.logpath, "ab")
        self.proc = subprocess.Popen(
            [ETCD, "--name", "default", "--data-dir", os.path.join(self.data_dir, "data"),
             "--listen-client-urls", c, "--advertise-client-urls", c,
             "--listen-peer-urls", p, "--initial-advertise-peer-urls", p,
             "--initial-cluster", f"default={p}",
             "--heartbeat-interval", "50", "--election-timeout", "500",
             "--log-level", "warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        if wait:
            self.wait_ready(timeout)
        return self

    def status(self, timeout=1.0):
        req = urllib.request.Request(self.url + "/v3/maintenance/status", data=b"{}",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def wait_ready(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.status()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"etcd not ready after {timeout}s:\n{self.log_tail()}")

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def _signal(self, sig):
        if self.running():
            self.proc.send_signal(sig)

    def pause(self):
        self._signal(signal.SIGSTOP)

    def resume(self):
        self._signal(signal.SIGCONT)

    def kill(self):
        if self.proc is not None:
            self._signal(signal.SIGCONT)
            self._signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self):
        if self.proc is None:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, down_for=0.0):
        self.stop()
        if down_for:
            time.sleep(down_for)
        return self.start()

    def cleanup(self):
        self.stop()
        if self.owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_tail(self, n=4000):
        try:
            with open(self.logpath, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return "(no etcd log)"


@pytest.fixture
def etcd():
    e = EtcdProc().start()
    try:
        yield e
    finally:
        e.cleanup()
