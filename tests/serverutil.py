"""Helpers for the server tests: start a real kvstore-server in a subprocess.

``start_server(*flags)`` runs the server on a free port (``--port 0``), waits
for its ``kvstore-server listening on HOST:PORT`` line and returns a
:class:`ServerProc`; ``stop()`` sends SIGTERM and waits (SIGKILL after a
timeout). Its stderr goes to a temp file so a failing test can show the logs.

``kvstore.server`` lives in ``server/`` and is mapped to the package name by
``pyproject.toml``; without an install, ``ensure_importable()`` maps it the
same way so tests also run straight from a checkout.
"""

import importlib.util
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY = re.compile(rb"kvstore-server listening on \[?([^\]\s]+?)\]?:(\d+)\s*$")


def ensure_importable():
    """Make ``import kvstore.server`` work from a plain checkout."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    import kvstore  # noqa: F401
    if "kvstore.server" in sys.modules:
        return
    try:
        importlib.import_module("kvstore.server")
        return
    except ModuleNotFoundError:
        pass
    pkg_dir = os.path.join(REPO, "server")
    spec = importlib.util.spec_from_file_location(
        "kvstore.server", os.path.join(pkg_dir, "__init__.py"),
        submodule_search_locations=[pkg_dir])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kvstore.server"] = mod
    spec.loader.exec_module(mod)


def store_available():
    ensure_importable()
    import kvstore
    return hasattr(kvstore, "Store")


class ServerProc:
    def __init__(self, proc, host, port, errfile):
        self.proc = proc
        self.host = host
        self.port = port
        self.errfile = errfile
        self._final_logs = None

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def logs(self):
        if self._final_logs is not None:
            return self._final_logs
        self.errfile.flush()
        with open(self.errfile.name, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def connect(self, timeout=5.0):
        s = socket.create_connection((self.host, self.port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        """Stop the server; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()
        if self._final_logs is None:
            self._final_logs = self.logs()
            self.errfile.close()
            try:
                os.unlink(self.errfile.name)
            except OSError:
                pass
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def server_command(*flags):
    return [sys.executable, os.path.abspath(__file__), "--run-server", *flags]


def start_server(*flags, timeout=30.0, env=None):
    """Start kvstore-server with ``flags`` on a free port and wait until ready."""
    flags = list(flags)
    if "--port" not in flags:
        flags += ["--port", "0"]
    errfile = tempfile.NamedTemporaryFile(prefix="kvstore-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(server_command(*flags), stdout=subprocess.PIPE, stderr=errfile,
                            stdin=subprocess.DEVNULL, cwd=REPO, env=env)
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        r, _, _ = select.select([proc.stdout], [], [], 0.1)
        if r:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            for line in buf.splitlines():
                m = READY.search(line)
                if m:
                    return ServerProc(proc, m.group(1).decode(), int(m.group(2)), errfile)
        elif proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    with open(errfile.name, "rb") as f:
        err = f.read().decode("utf-8", "replace")
    errfile.close()
    os.unlink(errfile.name)
    raise RuntimeError(f"kvstore-server did not become ready (rc={proc.returncode}):\n"
                       f"stdout: {buf.decode('utf-8', 'replace')}\nstderr: {err}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def num_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def resp_command(*args):
    """Encode one RESP multibulk command."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = str(a).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(a), a))
    return b"".join(out)


def recv_until(sock, predicate, timeout=5.0):
    """Read from ``sock`` until ``predicate(data)`` or EOF/timeout; return data."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while not predicate(data) and time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        data += chunk
    return data


def recv_all(sock, timeout=5.0):
    """Read until the peer closes (or timeout)."""
    return recv_until(sock, lambda d: False, timeout)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--run-server":
    ensure_importable()
    from kvstore.server.__main__ import main
    sys.exit(main(sys.argv[2:]))
