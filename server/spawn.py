"""Run kvstore-server in a subprocess: the one helper tests, bench and the demo use.

``start_server(*flags)`` runs ``python -m kvstore.server --port 0 *flags``,
waits for its ``kvstore-server listening on HOST:PORT`` line and returns a
:class:`ServerProcess`. Its stderr (the JSON log) goes to a temp file
(:meth:`ServerProcess.logs`); after the ready line a thread keeps reading
stdout, so the server can never block on a full pipe. ``stop()`` sends
SIGTERM (and SIGCONT, in case a test stopped it) and SIGKILL after a timeout.
"""

import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

__all__ = ["READY", "ServerProcess", "server_command", "start_server"]

#: The line the server prints once it listens (one per address).
READY = re.compile(rb"kvstore-server listening on \[?([^\]\s]+?)\]?:(\d+)\s*$")


class ServerProcess:
    """A started kvstore-server (see :func:`start_server`)."""

    def __init__(self, proc, host, port, logfile, name="kvstore-server"):
        self.proc = proc
        self.host = host
        self.port = port
        self.name = name
        self.logfile = logfile
        self._final_logs = None
        threading.Thread(target=_drain, args=(proc.stdout,), name=f"{name}-stdout",
                         daemon=True).start()

    @property
    def pid(self):
        return self.proc.pid

    @property
    def address(self):
        return f"{self.host}:{self.port}"

    def alive(self):
        return self.proc.poll() is None

    def logs(self):
        """Everything the server logged so far (its stderr)."""
        if self._final_logs is not None:
            return self._final_logs
        self.logfile.flush()
        with open(self.logfile.name, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def log_tail(self, lines=15):
        return "".join(self.logs().splitlines(keepends=True)[-lines:])

    def connect(self, timeout=5.0):
        """A connected TCP socket (TCP_NODELAY) to the server."""
        s = socket.create_connection((self.host, self.port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def client(self, **kwargs):
        """A :class:`kvstore.client.Client` for this server."""
        from kvstore.client import Client
        kwargs.setdefault("socket_timeout", 10)
        return Client(self.host, self.port, **kwargs)

    def stop(self, sig=signal.SIGTERM, timeout=10.0, keep_log=False):
        """Stop the server (``sig``, then SIGKILL after ``timeout``); returns
        its exit code. The log stays readable through :meth:`logs`; its file
        is removed unless ``keep_log``."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._final_logs is None:
            self._final_logs = self.logs()
            self.logfile.close()
            if not keep_log:
                try:
                    os.unlink(self.logfile.name)
                except OSError:
                    pass
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def free_port_run(n, host="127.0.0.1"):
    """A base port with ``n`` free ports from it on (asked of the OS, then
    each checked), below 65000 so a cluster bus at port + 10000 never
    matters. Raises RuntimeError when no such run turns up."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((host, 0))
            base = s.getsockname()[1]
        if base + n >= 65000:
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind((host, p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError(f"no run of {n} free ports found")


def server_command(*flags):
    """The argv that runs kvstore-server with ``flags`` in this Python."""
    return [sys.executable, "-m", "kvstore.server", *flags]


def _drain(pipe):
    try:
        while os.read(pipe.fileno(), 65536):
            pass
    except (OSError, ValueError):
        pass


def start_server(*flags, timeout=60.0, env=None, cwd=None, name="kvstore-server",
                 preexec_fn=None, pass_fds=()):
    """Start kvstore-server with ``flags`` (on a free port unless ``--port``
    is given) and wait until it listens; RuntimeError with its output if it
    does not within ``timeout`` seconds. ``preexec_fn`` runs in the child
    before exec (e.g. to lower a resource limit); ``pass_fds`` stay open in it."""
    flags = list(flags)
    if "--port" not in flags:
        flags += ["--port", "0"]
    logfile = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)
    proc = subprocess.Popen(server_command(*flags),
                            stdout=subprocess.PIPE, stderr=logfile, stdin=subprocess.DEVNULL,
                            cwd=cwd, env=env, preexec_fn=preexec_fn, pass_fds=pass_fds)
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
                    return ServerProcess(proc, m.group(1).decode(), int(m.group(2)), logfile, name)
        elif proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    with open(logfile.name, "rb") as f:
        err = f.read().decode("utf-8", "replace")
    logfile.close()
    os.unlink(logfile.name)
    raise RuntimeError(f"{name} did not become ready (rc={proc.returncode}):\n"
                       f"stdout: {buf.decode('utf-8', 'replace')}\nstderr: {err[-3000:]}")
