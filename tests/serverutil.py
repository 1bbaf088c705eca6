"""Helpers for the server tests: real kvstore-server processes and raw RESP.

``start_server(*flags)`` is :func:`kvstore.server.spawn.start_server` (the
helper tests, bench and the demo share): the server runs on a free port
(``--port 0``) in a subprocess, its stderr in a temp file so a failing test
can show the logs (``ServerProc.logs()``); ``stop()`` sends SIGTERM and
waits (SIGKILL after a timeout).
"""

import importlib.util
import os
import socket
import time

from kvstore.server.spawn import ServerProcess as ServerProc  # noqa: F401
from kvstore.server.spawn import server_command, start_server  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def store_available():
    """Is the C engine (and so kvstore.Store) built here?"""
    return importlib.util.find_spec("kvstore._native") is not None


def wait_for(pred, timeout=30.0, interval=0.02, what="condition"):
    """Poll ``pred()`` until it is true; AssertionError naming ``what`` after
    ``timeout`` seconds. Returns pred's last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


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


def check_history(attempts, reads, final):
    """Check a write/read history of single-key registers -> acked writes.

    ``attempts``: per key, the writes in order as ``[value, "ok"|"err", ...]``;
    ``reads``: ``(key, value)`` pairs seen by readers; ``final``: key -> value
    read at the end. No read returns a value nobody wrote, and each key's
    final value is its last acknowledged write or a later attempt (an
    unacknowledged write may or may not have been applied).
    """
    written = {k: {a[0] for a in attempts[k]} for k in attempts}
    bad_reads = [(k, v) for k, v in reads if v is not None and v not in written[k]]
    assert not bad_reads, f"reads of values nobody wrote: {bad_reads[:5]}"
    lost = []
    n_ok = 0
    for k in attempts:
        vals = [a[0] for a in attempts[k]]
        oks = [i for i, a in enumerate(attempts[k]) if a[1] == "ok"]
        n_ok += len(oks)
        if oks and final[k] not in vals[oks[-1]:]:
            lost.append((k, vals[oks[-1]], final[k]))
    assert not lost, f"acknowledged writes lost: {lost}"
    return n_ok
