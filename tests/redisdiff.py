"""Differential testing against a real redis-server.

``Pair`` starts a fresh kvstore-server (``serverutil.start_server``) and a
fresh redis-server (on a Unix socket in a temp dir: no port to race for, no
persistence), and runs the same commands on both over raw RESP2, one
connection each. ``Pair.compare(commands)`` flushes both, runs the sequence
and returns the first difference that is not documented below, or None.

Replies are read as a tree of ``Reply`` values (``("+", b"OK")``,
``("-", b"ERR ...")``, ints, bytes, None, lists), so a difference names the
command and both answers.

``DOCUMENTED`` is the short, explicit list of ways kvstore is allowed to
answer differently; each entry says why. Anything else is a bug.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time

from serverutil import resp_command, start_server

REDIS_SERVER = shutil.which("redis-server")


class RedisProc:
    """A throwaway redis-server on a Unix socket (``--port 0``: no TCP)."""

    def __init__(self, *extra):
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed")
        self.dir = tempfile.mkdtemp(prefix="kvstore-redisdiff-")
        self.sock = os.path.join(self.dir, "redis.sock")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", "0", "--unixsocket", self.sock, "--save", "",
             "--appendonly", "no", "--dir", self.dir, *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                self.connect().close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start")

    @property
    def pid(self):
        return self.proc.pid

    def connect(self, timeout=10.0):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(timeout)
        s.connect(self.sock)
        return s

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


class ReplyReader:
    """Reads RESP2 replies from a socket into Python values."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _line(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 2:]
                return line
            self._more()

    def _more(self):
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("connection closed")
        self.buf += chunk

    def read(self):
        line = self._line()
        t, rest = line[:1], line[1:]
        if t in (b"+", b"-"):
            return (t.decode(), rest)
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self._more()
            data, self.buf = self.buf[:n], self.buf[n + 2:]
            return data
        if t == b"*":
            n = int(rest)
            if n < 0:
                return None
            return [self.read() for _ in range(n)]
        raise ValueError(f"not a RESP2 reply: {line[:80]!r}")


class Raw:
    """One raw RESP connection: ``call(*args)`` sends a command and reads one reply."""

    def __init__(self, sock):
        self.sock = sock
        self.reader = ReplyReader(sock)

    def call(self, *args):
        self.sock.sendall(resp_command(*args))
        return self.reader.read()

    def close(self):
        self.sock.close()


def _is_error(r, prefix=b""):
    return isinstance(r, tuple) and r[0] == "-" and r[1].startswith(prefix)


def _upper(a):
    return (a.encode() if isinstance(a, str) else bytes(a)).upper()


# Documented differences: (name, predicate(command, kvstore_reply, redis_reply)).
# Keep this list short; each entry is a known, deliberate difference.
DOCUMENTED = [
    # Error texts for a wrong number of arguments and syntax errors are the
    # same code; kvstore's wording of the message may differ where the
    # command layer builds it (the error class is what clients match on).
    ("same error code, different wording",
     lambda cmd, k, r: _is_error(k) and _is_error(r)
     and k[1].split(b" ", 1)[0] == r[1].split(b" ", 1)[0]),
]


def documented(cmd, k, r):
    """The name of the documented difference that covers this pair, or None."""
    for name, pred in DOCUMENTED:
        if pred(cmd, k, r):
            return name
    return None


class Pair:
    """A fresh kvstore-server and a fresh redis-server side by side."""

    def __init__(self, kv_flags=("--capacity", "64MiB"), redis_flags=()):
        self.kv = start_server(*kv_flags)
        try:
            self.redis = RedisProc(*redis_flags)
        except Exception:
            self.kv.stop()
            raise
        self.kc = Raw(self.kv.connect(timeout=10))
        self.rc = Raw(self.redis.connect())

    def both(self, *args):
        return self.kc.call(*args), self.rc.call(*args)

    def run(self, commands):
        """Run ``commands`` (tuples of args) on both; list of (cmd, kv, redis)."""
        return [(cmd, *self.both(*cmd)) for cmd in commands]

    def compare(self, commands):
        """FLUSHALL both, run the sequence; the first undocumented difference
        as a readable string, or None when every reply matched."""
        self.both("FLUSHALL")
        for cmd, k, r in self.run(commands):
            if k != r and documented(cmd, k, r) is None:
                shown = " ".join(a if isinstance(a, str) else repr(a) for a in cmd)
                return f"{shown}\n  kvstore: {k!r}\n  redis:   {r!r}"
        return None

    def close(self):
        for c in (self.kc, self.rc):
            try:
                c.close()
            except OSError:
                pass
        self.redis.stop()
        return self.kv.stop()
