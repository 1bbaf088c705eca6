"""kvstore-server with the real Redis tools: redis-cli one-shot and
interactive (through a pty), redis-benchmark with zero errors."""

import fcntl
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import termios
import time

import pytest

from serverutil import start_server, store_available

pytestmark = [
    pytest.mark.skipif(not store_available(), reason="kvstore.Store is not in this checkout yet"),
    pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli not installed"),
]


@pytest.fixture(scope="module")
def server():
    srv = start_server()
    yield srv
    assert srv.stop() == 0, srv.logs()


def cli(server, *args, input=None):
    p = subprocess.run(["redis-cli", "-h", server.host, "-p", str(server.port), *args],
                       capture_output=True, timeout=30, input=input)
    return p.returncode, p.stdout.decode(), p.stderr.decode()


def test_one_shot(server):
    assert cli(server, "set", "a", "b") == (0, "OK\n", "")
    assert cli(server, "get", "a") == (0, "b\n", "")
    assert cli(server, "exists", "a", "nope")[1] == "1\n"
    assert cli(server, "ttl", "a")[1] == "-1\n"
    assert cli(server, "mset", "x", "1", "y", "2")[1] == "OK\n"
    assert cli(server, "mget", "x", "nope", "y")[1] == "1\n\n2\n"
    assert "redis_version:" in cli(server, "info")[1]
    assert cli(server, "dbsize")[1].strip().isdigit()
    rc, out, err = cli(server, "nosuchcmd", "arg")
    assert "ERR unknown command 'nosuchcmd', with args beginning with: 'arg'" in out
    assert cli(server, "-3", "get", "a")[1] == "b\n"       # RESP3 via HELLO 3
    assert cli(server, "ping")[1] == "PONG\n"


def test_pipe_mode(server):
    rc, out, err = cli(server, "--pipe", input=b"SET p1 v1\r\nSET p2 v2\r\nGET p1\r\n")
    assert rc == 0 and "errors: 0, replies: 3" in out
    assert cli(server, "get", "p2")[1] == "v2\n"


def _read_until(fd, pattern, timeout=10.0):
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            if chunk.count(b"\x1b[6n"):       # linenoise asks where the cursor is
                os.write(fd, b"\x1b[1;1R" * chunk.count(b"\x1b[6n"))
            if re.search(pattern, buf):
                return buf
    raise AssertionError(f"did not see {pattern!r}; got {buf!r}")


def test_interactive_through_pty(server):
    pid, fd = pty.fork()
    if pid == 0:                       # child: redis-cli on a terminal
        os.execvp("redis-cli", ["redis-cli", "-h", server.host, "-p", str(server.port)])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    try:
        prompt = rb"%s:%d> " % (server.host.encode(), server.port)
        _read_until(fd, prompt)
        for line, reply in [(b"set greeting hello", rb"OK"),
                            (b"get greeting", rb'"hello"'),
                            (b"get nothing-here", rb"\(nil\)"),
                            (b"nosuch x", rb"\(error\) ERR unknown command 'nosuch'"),
                            (b"ttl greeting", rb"\(integer\) -1"),
                            (b"mget greeting nothing-here", rb'1\) "hello"\r\n2\) \(nil\)')]:
            os.write(fd, line + b"\r")
            # wait for the reply and the next prompt: typing while redis-cli
            # is between raw and cooked terminal mode loses keystrokes
            _read_until(fd, reply + rb"[\s\S]*" + re.escape(prompt))
        os.write(fd, b"quit\r")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid:
                assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
                break
            try:
                os.read(fd, 4096)
            except OSError:
                pass
            time.sleep(0.05)
        else:
            raise AssertionError("redis-cli did not exit after quit")
        pid = 0
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-benchmark") is None, reason="redis-benchmark not installed")
def test_redis_benchmark_has_no_errors(server):
    p = subprocess.run(["redis-benchmark", "-h", server.host, "-p", str(server.port),
                        "-t", "set,get,ping", "-n", "20000", "-q"],
                       capture_output=True, timeout=120)
    out = p.stdout.decode() + p.stderr.decode()
    assert p.returncode == 0, out
    for test in ("PING_INLINE", "PING_MBULK", "SET", "GET"):
        assert re.search(test + r": [\d.]+ requests per second", out), out
    assert "ERR" not in out and "error" not in out.lower(), out
    assert server.alive()
