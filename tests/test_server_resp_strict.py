"""RESP lengths read exactly as Redis reads them, and multibulk requests
parsed incrementally (linear in the request size).

The error texts and whether the connection closes were taken from
redis-server 7 and are checked against a real one when it is installed; the
C fast path (GET/SET batches) must refuse the same headers. The CPU of a
slowly arriving 1M-argument request is read from /proc/PID/stat of a server
in a subprocess.
"""

import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redisdiff import REDIS_SERVER, RedisProc
from serverutil import recv_all, resp_command, start_server, store_available


from kvstore.server.resp import RespParser  # noqa: E402

BULK = b"invalid bulk length"
MBULK = b"invalid multibulk length"

# (bytes after a PING, error text); the PING before must still be answered.
BAD = [
    (b"*1\r\n$+2\r\nab\r\n", BULK),
    (b"*1\r\n$ 4\r\nPING\r\n", BULK),
    (b"*1\r\n$0_4\r\nPING\r\n", BULK),
    (b"*1\r\n$04\r\nPING\r\n", BULK),
    (b"*1\r\n$4 \r\nPING\r\n", BULK),
    (b"*1\r\n$-1\r\n", BULK),
    (b"*1\r\n$-0\r\n", BULK),
    (b"*1\r\n$\r\n", BULK),
    (b"*1\r\n$4\nPING\r\n", BULK),
    (b"*1\r\n$99999999999999999999\r\n", BULK),
    (b"*1\r\n$536870913\r\n", BULK),
    (b"*2\r\n$4\r\nECHO\r\n$-1\r\n", BULK),
    (b"*1_0\r\n", MBULK),
    (b"*+1\r\n$4\r\nPING\r\n", MBULK),
    (b"* 1\r\n$4\r\nPING\r\n", MBULK),
    (b"*01\r\n$4\r\nPING\r\n", MBULK),
    (b"*1 \r\n$4\r\nPING\r\n", MBULK),
    (b"*1\n$4\r\nPING\r\n", MBULK),
    (b"*-0\r\n", MBULK),
    (b"*\r\n", MBULK),
    (b"*9223372036854775808\r\n", MBULK),
    (b"*-9223372036854775809\r\n", MBULK),
]
# Counts Redis skips as empty commands (the PING after them is answered).
SKIPPED = [b"*0\r\n", b"*-1\r\n", b"*-5\r\n", b"*-9223372036854775808\r\n"]

# The C fast path only runs GET/SET; these are GETs/SETs with a bad header.
BAD_FAST = [
    (b"*2\r\n$03\r\nGET\r\n$1\r\nk\r\n", BULK),
    (b"*2\r\n$3\r\nGET\r\n$01\r\nk\r\n", BULK),
    (b"*02\r\n$3\r\nGET\r\n$1\r\nk\r\n", MBULK),
    (b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$+1\r\nv\r\n", BULK),
    (b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$00\r\n\r\n", BULK),
]

PING = resp_command("PING")


def parse(data, **kw):
    p = RespParser(**kw)
    p.feed(data)
    return p.gets_all(), p


@pytest.mark.parametrize("data, msg", BAD + BAD_FAST)
def test_bad_lengths_are_protocol_errors(data, msg):
    cmds, p = parse(PING + data)
    assert cmds == [[b"PING"]]
    assert p.error == b"-ERR Protocol error: " + msg + b"\r\n"


@pytest.mark.parametrize("data", SKIPPED)
def test_zero_and_negative_counts_are_skipped(data):
    cmds, p = parse(data + PING)
    assert cmds == [[b"PING"]] and p.error is None


def test_canonical_lengths_still_parse():
    cmds, p = parse(b"*2\r\n$4\r\nECHO\r\n$0\r\n\r\n*1\r\n$10\r\nPINGPINGPI\r\n")
    assert p.error is None and cmds == [[b"ECHO", b""], [b"PINGPINGPI"]]


def test_unauthenticated_limits_as_redis():
    p = RespParser()
    p.unauthenticated = True
    p.feed(resp_command(*["x"] * 10) + b"*11\r\n")
    assert p.gets_all() == [[b"x"] * 10]
    assert p.error == b"-ERR Protocol error: unauthenticated multibulk length\r\n"
    cmds, p = parse(b"*1\r\n$16385\r\n")
    assert p.error is None              # authenticated: waits for the bulk
    p = RespParser()
    p.unauthenticated = True
    p.feed(b"*1\r\n$16385\r\n")
    assert p.gets_all() == [] and b"unauthenticated bulk length" in p.error
    p = RespParser()
    p.unauthenticated = True
    p.feed(b"*1\r\n$600000000\r\n")
    assert p.gets_all() == [] and b"invalid bulk length" in p.error


def test_partial_multibulk_keeps_its_arguments():
    """The buffer is cut to the first incomplete argument; the ones before
    are kept, not parsed again."""
    args = [b"EXISTS"] + [b"key:%d" % i for i in range(1000)]
    data = resp_command(*args)
    p = RespParser()
    half = len(data) // 2
    p.feed(data[:half])
    assert p.gets_all() == []
    assert p.pending
    held = len(p._buf) - p._pos
    assert held < 32                    # only the incomplete argument is buffered
    assert 0 < p.buffered() <= half
    p.feed(data[half:])
    assert p.gets_all() == [args]
    assert not p.pending and p.buffered() == 0


def test_partial_multibulk_counts_against_max_buffer():
    p = RespParser(max_buffer=10000)
    p.feed(resp_command("SET", "k", "v" * 6000, "x" * 6000)[:-10])
    assert p.gets_all() == [] and b"too big request" in p.error


many_arg = (st.binary(max_size=12)
            | st.sampled_from([b"", b"\r\n", b"a\r\nb", b"$1\r\n", b"*3\r\n", b"x" * 5000]))


@settings(max_examples=150, deadline=None)
@given(cmds=st.lists(st.lists(many_arg, min_size=1, max_size=40), min_size=1, max_size=4),
       data=st.data())
def test_long_commands_any_split_parse_the_same(cmds, data):
    """Commands with many arguments (the batch path) and values holding CRLF
    or headers, cut anywhere: the same commands come out."""
    stream = b"".join(resp_command(*c) for c in cmds)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    p = RespParser()
    got = []
    for a, b in zip([0] + cuts, cuts + [len(stream)]):
        p.feed(stream[a:b])
        got.extend(p.gets_all())
        assert p.error is None
    assert got == [list(c) for c in cmds]
    assert not p.pending


# ---------------------------------------------------------------- live servers

def _exchange(connect, data):
    s = connect()
    try:
        s.sendall(data)
        return recv_all(s, timeout=3)      # until the server closes (or 3 s)
    finally:
        s.close()


needs_store = pytest.mark.skipif(not store_available(),
                                 reason="kvstore.Store is not in this checkout yet")


@pytest.fixture(scope="module")
def kv():
    srv = start_server("--capacity", "16MiB")
    yield srv
    assert srv.stop() == 0, srv.logs()


@pytest.fixture(scope="module")
def redis_proc():
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (the CI installs it)")
    r = RedisProc()
    yield r
    r.stop()


@needs_store
@pytest.mark.parametrize("data, msg", BAD + BAD_FAST)
def test_server_replies_and_closes_as_redis(kv, redis_proc, data, msg):
    want = b"+PONG\r\n-ERR Protocol error: " + msg + b"\r\n"
    got = _exchange(kv.connect, PING + data)
    assert got == want                       # replied, then closed (recv_all saw EOF)
    assert _exchange(redis_proc.connect, PING + data) == want


@needs_store
@pytest.mark.parametrize("data, msg", BAD_FAST)
def test_c_fast_path_refuses_what_redis_refuses(kv, redis_proc, data, msg):
    """A GET/SET batch goes to the C path first (no PING before it here)."""
    want = b"-ERR Protocol error: " + msg + b"\r\n"
    assert _exchange(kv.connect, data) == want
    assert _exchange(redis_proc.connect, data) == want


@needs_store
def test_fast_path_set_with_leading_zero_length_writes_nothing(kv):
    got = _exchange(kv.connect, b"*3\r\n$3\r\nSET\r\n$2\r\nlz\r\n$01\r\nv\r\n")
    assert got == b"-ERR Protocol error: invalid bulk length\r\n"
    s = kv.connect()
    try:
        s.sendall(resp_command("EXISTS", "lz"))
        assert s.recv(100) == b":0\r\n"
    finally:
        s.close()


_CLK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK


@needs_store
def test_slow_million_argument_request_costs_linear_cpu(kv):
    """EXISTS with 1,048,575 keys, sent in 64 KiB pieces: the server used
    8.7 s of CPU when it re-parsed the incomplete command on every read
    (Redis: 0.09 s). The bound is generous (the parser now needs well under
    1 s here); a quadratic parser is far above it."""
    n = 1048575
    parts = [b"*%d\r\n$6\r\nEXISTS\r\n" % (n + 1)]
    parts += [b"$%d\r\n%b\r\n" % (len(k), k) for k in (b"key:%d" % i for i in range(n))]
    req = b"".join(parts)
    s = kv.connect(timeout=120)
    try:
        before = _cpu_seconds(kv.pid)
        for i in range(0, len(req), 65536):
            s.sendall(req[i:i + 65536])
            if i % (65536 * 32) == 0:
                time.sleep(0.002)            # let the server read what is there
        s.settimeout(120)
        reply = s.recv(100)
        cpu = _cpu_seconds(kv.pid) - before
    finally:
        s.close()
    assert reply == b":0\r\n"
    assert cpu < 5.0, f"server CPU {cpu:.2f} s for one 1M-argument request"


@needs_store
def test_other_clients_are_served_while_a_huge_request_arrives(kv):
    big = kv.connect(timeout=30)
    other = kv.connect(timeout=30)
    try:
        n = 300000
        big.sendall(b"*%d\r\n$6\r\nEXISTS\r\n" % (n + 1))
        chunk = b"".join(b"$5\r\nk%04d\r\n" % (i % 10000) for i in range(1000))
        for _ in range(n // 1000):
            big.sendall(chunk)
            other.sendall(PING)
            assert other.recv(100) == b"+PONG\r\n"
        assert big.recv(100) == b":0\r\n"
    finally:
        big.close()
        other.close()

