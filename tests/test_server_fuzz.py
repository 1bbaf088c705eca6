"""Fuzzing a running kvstore-server: random and mutated RESP and native bytes,
split at random boundaries. The server stays up, a bystander client keeps
getting right answers, oversized lengths are refused at once without memory
growth, and connections are closed, not leaked (fd count comes back)."""

import socket
import struct
import time

import msgpack
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serverutil import num_fds, recv_all, resp_command, rss_kib, start_server, store_available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not store_available(), reason="the C engine is not built")]

MAGIC = b"\x00KV1"


@pytest.fixture(scope="module")
def server():
    srv = start_server("--max-clients", "1000")
    yield srv
    assert srv.alive(), srv.logs()
    assert srv.stop() == 0, srv.logs()


@pytest.fixture(scope="module")
def bystander(server):
    c = redis.Redis(host=server.host, port=server.port, socket_timeout=10)
    c.set("bystander", "still-here")
    yield c
    c.close()


def send_chunks(server, chunks, read=True):
    """Send chunks on a fresh connection; return what the server answered."""
    s = server.connect(timeout=5)
    try:
        for c in chunks:
            try:
                s.sendall(c)
            except (BrokenPipeError, ConnectionResetError):
                break
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return recv_all(s, timeout=5) if read else b""
    except (ConnectionResetError, socket.timeout):
        return b""
    finally:
        s.close()


def split(data, cuts):
    cuts = sorted(c % (len(data) + 1) for c in cuts)
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


def check_alive(server, bystander):
    assert server.alive(), server.logs()
    assert bystander.get("bystander") == b"still-here"


resp_cmd = st.lists(st.binary(max_size=20) | st.sampled_from(
    [b"GET", b"SET", b"MGET", b"PING", b"EXPIRE", b"INFO", b"CLIENT", b"HELLO", b"MULTI", b"EXEC",
     b"KV.INJECT", b"KV.LOST", b"CONFIG", b"COMMAND", b"SET", b"EX", b"NX", b"-1", b"99999999999"]),
    min_size=1, max_size=6)


def mutate(data, edits):
    b = bytearray(data)
    for pos, val, kind in edits:
        if not b:
            b.append(val)
            continue
        pos %= len(b)
        if kind == 0:
            b[pos] = val
        elif kind == 1:
            del b[pos]
        else:
            b.insert(pos, val)
    return bytes(b)


FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(cmds=st.lists(resp_cmd, min_size=1, max_size=5),
       edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.integers(0, 2)),
                      max_size=4),
       cuts=st.lists(st.integers(0, 10**6), max_size=6))
def test_mutated_resp(server, bystander, cmds, edits, cuts):
    data = mutate(b"".join(resp_command(*c) for c in cmds), edits)
    reply = send_chunks(server, split(data, cuts))
    # whatever the server produced starts like a reply of the protocol the
    # first byte chose (a mutation may turn the first byte into 0x00)
    if reply and data[:1] == b"\x00":
        assert reply[:4] == struct.pack(">I", len(reply) - 4)[:4] or len(reply) > 4
    else:
        assert not reply or reply[:1] in b"+-:$*%_#,=~>|("
    check_alive(server, bystander)


@FUZZ
@given(data=st.binary(min_size=1, max_size=400), cuts=st.lists(st.integers(0, 10**6), max_size=6))
def test_random_bytes(server, bystander, data, cuts):
    send_chunks(server, split(data, cuts))
    check_alive(server, bystander)


def nframe(obj):
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


native_obj = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=10)
    | st.binary(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=10)
native_req = st.tuples(st.integers(0, 2**32), st.sampled_from(
    ["get", "put", "mget", "mput", "getv", "delete", "exists", "expire", "ttl", "persist", "keys",
     "dbsize", "stats", "lost", "inject", "fetch", "ping", "auth", "bogus"]),
    st.lists(native_obj, max_size=4))


@FUZZ
@given(reqs=st.lists(native_req | native_obj, min_size=1, max_size=5),
       edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.integers(0, 2)),
                      max_size=3),
       cuts=st.lists(st.integers(0, 10**6), max_size=6))
def test_mutated_native(server, bystander, reqs, edits, cuts):
    data = MAGIC + b"".join(nframe(list(r) if isinstance(r, tuple) else r) for r in reqs)
    if edits:
        data = MAGIC[:1] + mutate(data[1:], edits)
    reply = send_chunks(server, split(data, cuts))
    if reply and not edits:
        # unmutated: one reply frame per request, after the hello
        pos, frames = 0, []
        while pos + 4 <= len(reply):
            (n,) = struct.unpack(">I", reply[pos:pos + 4])
            frames.append(msgpack.unpackb(reply[pos + 4:pos + 4 + n], raw=False,
                                          strict_map_key=False))
            pos += 4 + n
        assert len(frames) == len(reqs) + 1
        assert all(isinstance(f, list) and len(f) == 3 for f in frames)
    check_alive(server, bystander)


@pytest.mark.parametrize("data, expect", [
    (b"*99999999999\r\n", b"-ERR Protocol error: invalid multibulk length\r\n"),
    (b"*1\r\n$4294967296\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
    (b"*2\r\n$3\r\nGET\r\n$-7\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
    (MAGIC + b"\xff\xff\xff\xff", None),
])
def test_oversized_lengths_rejected_fast(server, bystander, data, expect):
    before = rss_kib(server.pid)
    t0 = time.monotonic()
    s = server.connect()
    s.sendall(data)
    reply = recv_all(s, timeout=5)          # server replies, then closes
    s.close()
    assert time.monotonic() - t0 < 2
    if expect is not None:
        assert reply == expect
    else:
        (n,) = struct.unpack(">I", reply[:4])
        hello = msgpack.unpackb(reply[4:4 + n], raw=False)
        assert hello[:2] == [0, 0]
        rest = reply[4 + n:]
        (m,) = struct.unpack(">I", rest[:4])
        err = msgpack.unpackb(rest[4:4 + m], raw=False)
        assert err[:2] == [0, 1] and err[2][0] == "PROTO" and len(rest) == 4 + m
    assert rss_kib(server.pid) - before < 16 * 1024      # no buffer of that size
    check_alive(server, bystander)


def test_big_declared_bulk_only_costs_what_is_sent(server, bystander):
    """A 500 MiB bulk that never arrives costs what was sent, not 500 MiB."""
    before = rss_kib(server.pid)
    s = server.connect()
    s.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$524288000\r\n" + b"x" * 1024)
    time.sleep(0.3)
    assert rss_kib(server.pid) - before < 16 * 1024
    check_alive(server, bystander)
    s.close()


def test_connections_not_leaked(server, bystander):
    time.sleep(0.3)
    base = num_fds(server.pid)
    socks = []
    for i in range(50):
        s = server.connect()
        s.sendall([b"*1\r\n$4\r\nPING\r\n", b"\x00KV1", b"*x\r\n", b"GET a\r\n", b"\x00XX"][i % 5])
        socks.append(s)
    time.sleep(0.3)
    for s in socks:
        s.close()
    deadline = time.monotonic() + 5
    while num_fds(server.pid) > base and time.monotonic() < deadline:
        time.sleep(0.05)
    assert num_fds(server.pid) <= base
    info = bystander.info("clients")
    assert info["connected_clients"] <= 3
    check_alive(server, bystander)


def test_half_open_clients_do_not_block_others(server, bystander):
    stuck = [server.connect() for _ in range(10)]
    for i, s in enumerate(stuck):
        s.sendall([b"*3\r\n$3\r\nSET\r\n", MAGIC + b"\x00\x00\x01"][i % 2])
    t0 = time.monotonic()
    for _ in range(100):
        assert bystander.get("bystander") == b"still-here"
    assert time.monotonic() - t0 < 5
    for s in stuck:
        s.close()
