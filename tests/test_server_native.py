"""The native protocol (server/PROTOCOL.md) over raw sockets, no client
library: magic and hello, every op, pipelined frames, error codes, PROTO
errors and when the connection is (and is not) closed."""

import struct
import time

import msgpack
import pytest

from serverutil import recv_all, recv_until, start_server, store_available, wait_for

pytestmark = pytest.mark.skipif(not store_available(),
                                reason="kvstore.Store is not in this checkout yet")

MAGIC = b"\x00KV1"


def frame(obj):
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


class Native:
    """A raw native-protocol connection for tests."""

    def __init__(self, srv, magic=True):
        self.sock = srv.connect()
        self.sock.settimeout(10)
        self.buf = b""
        self.next_id = 1
        self.hello = None
        if magic:
            self.sock.sendall(MAGIC)
            self.hello = self.read()

    def read(self):
        while True:
            if len(self.buf) >= 4:
                (n,) = struct.unpack(">I", self.buf[:4])
                if len(self.buf) >= 4 + n:
                    body, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
                    return msgpack.unpackb(body, raw=False, strict_map_key=False)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed by server")
            self.buf += chunk

    def send(self, op, *args):
        rid = self.next_id
        self.next_id += 1
        self.sock.sendall(frame([rid, op, list(args)]))
        return rid

    def call(self, op, *args):
        rid = self.send(op, *args)
        reply = self.read()
        assert reply[0] == rid
        return reply

    def ok(self, op, *args):
        rid, status, result = self.call(op, *args)
        assert status == 0, result
        return result

    def err(self, op, *args):
        rid, status, result = self.call(op, *args)
        assert status == 1, result
        code, msg, extra = result
        assert isinstance(msg, str) and isinstance(extra, dict)
        return code

    def close(self):
        self.sock.close()


@pytest.fixture(scope="module")
def server():
    srv = start_server()
    yield srv
    assert srv.stop() == 0, srv.logs()


@pytest.fixture
def nc(server):
    c = Native(server)
    c.ok("flushall")
    yield c
    c.close()


def test_hello(nc):
    rid, status, info = nc.hello
    assert (rid, status) == (0, 0)
    assert info["proto"] == 1 and info["server"] == "kvstore" and "version" in info


def test_every_op(nc):
    assert nc.ok("ping") == "PONG"
    assert nc.ok("ping", b"x") == b"x"
    v1 = nc.ok("put", b"a", b"1")
    v2 = nc.ok("put", b"a", b"2")
    assert isinstance(v1, int) and v2 > v1
    assert nc.ok("get", b"a") == b"2"
    assert nc.ok("get", b"nope") is None
    assert nc.ok("getv", b"a") == [v2, b"2"]
    assert nc.ok("getv", b"nope") is None
    assert nc.ok("exists", b"a") is True and nc.ok("exists", b"nope") is False
    vs = nc.ok("mput", [b"b", b"x", b"c", b"\x00\xff"])
    assert len(vs) == 2 and all(v > v2 for v in vs)
    assert nc.ok("mget", [b"a", b"nope", b"c"]) == [[b"2", None, b"\x00\xff"], []]
    assert nc.ok("ttl", b"a") == -1 and nc.ok("ttl", b"nope") == -2
    assert nc.ok("expire", b"a", 100) is True
    assert 99 < nc.ok("ttl", b"a") <= 100.01
    assert nc.ok("persist", b"a") is True and nc.ok("ttl", b"a") == -1
    va = nc.ok("getv", b"a")[0]
    assert va == max(vs) + 2            # EXPIRE and PERSIST each took a version
    assert nc.ok("expire", b"nope", 5) is False
    assert sorted(nc.ok("keys")) == [b"a", b"b", b"c"]
    assert nc.ok("dbsize") == 3
    stats = nc.ok("stats")
    assert stats["keys"] == 3 and stats["server_connected_clients"] >= 1
    assert nc.ok("lost") == []
    fetched = nc.ok("fetch", [[b"a", v2], [b"b", 10**9], [b"nope", 0]])
    assert fetched == {b"a": [va, b"2"]}
    assert nc.ok("delete", b"a") is True and nc.ok("delete", b"a") is False
    assert nc.ok("flushall") is True and nc.ok("dbsize") == 0


def test_put_with_ttl(nc):
    nc.ok("put", b"t", b"v", 0.3)
    assert 0 < nc.ok("ttl", b"t") <= 0.3
    wait_for(lambda: nc.ok("get", b"t") is None, 5, what="the 0.3 s ttl to expire")
    assert nc.ok("ttl", b"t") == -2
    assert nc.err("put", b"t", b"v", -1) == "ERR"
    assert nc.err("put", b"t", b"v", "soon") == "TYPE"


def test_error_codes(nc):
    assert nc.err("nosuchop") == "UNKNOWN"
    assert nc.err("get", "str-key") == "TYPE"
    assert nc.err("put", b"k", "str-value") == "TYPE"
    assert nc.err("get") == "ERR"
    assert nc.err("get", b"a", b"b") == "ERR"
    assert nc.err("mget", b"notalist") == "TYPE"
    assert nc.err("mput", [b"odd"]) == "TYPE"
    assert nc.err("inject", "ao", "key", b"k") == "DISABLED"
    assert nc.err("auth", "pw") == "ERR"             # no password configured
    assert nc.err("put", b"k" * 70000, b"v") == "TOOLARGE"
    assert nc.ok("ping") == "PONG"                   # connection still fine


def test_pipelined_frames_answered_in_order(server):
    c = Native(server)
    n = 500
    out = b"".join(frame([i, "put", [b"p%d" % i, b"%d" % i]]) for i in range(1, n + 1))
    out += b"".join(frame([n + i, "get", [b"p%d" % i]]) for i in range(1, n + 1))
    c.sock.sendall(out)
    replies = [c.read() for _ in range(2 * n)]
    assert [r[0] for r in replies] == list(range(1, 2 * n + 1))
    assert all(r[1] == 0 for r in replies)
    assert [r[2] for r in replies[n:]] == [b"%d" % i for i in range(1, n + 1)]
    c.close()


def test_magic_and_first_frame_in_one_write(server):
    s = server.connect()
    s.sendall(MAGIC + frame([7, "ping", []]))
    c = Native.__new__(Native)
    c.sock, c.buf = s, b""
    assert c.read()[:2] == [0, 0]
    assert c.read() == [7, 0, "PONG"]
    s.close()


def test_bad_shapes_keep_the_connection(nc):
    nc.sock.sendall(frame({"not": "a list"}) + frame([5, "ping"]) + frame([-1, "ping", []])
                    + frame([6, 7, []]) + frame([8, "ping", []]))
    assert nc.read()[:2] == [0, 1]
    r = nc.read()
    assert r[0] == 5 and r[1] == 1 and r[2][0] == "PROTO"
    assert nc.read()[2][0] == "PROTO"
    r = nc.read()
    assert r[0] == 6 and r[2][0] == "PROTO"
    assert nc.read() == [8, 0, "PONG"]


@pytest.mark.parametrize("junk", [
    struct.pack(">I", 0xFFFFFFFF),                  # length over max_frame
    struct.pack(">I", 3) + b"\xc1\xc1\xc1",         # undecodable body
    struct.pack(">I", 0),                           # empty frame
])
def test_unresyncable_stream_gets_proto_then_close(server, junk):
    c = Native(server)
    c.sock.sendall(frame([1, "put", [b"before", b"ok"]]) + junk)
    r = c.read()
    assert r[:2] == [1, 0] and isinstance(r[2], int)
    rest = c.buf + recv_all(c.sock)
    (n,) = struct.unpack(">I", rest[:4])
    err = msgpack.unpackb(rest[4:4 + n], raw=False)
    assert err[0] == 0 and err[1] == 1 and err[2][0] == "PROTO"
    assert len(rest) == 4 + n                       # then closed
    other = Native(server)
    assert other.ok("get", b"before") == b"ok"       # the put before the junk ran
    other.close()


def test_bad_magic_closes(server):
    s = server.connect()
    s.sendall(b"\x00XYZ" + frame([1, "ping", []]))
    data = recv_all(s)
    (n,) = struct.unpack(">I", data[:4])
    assert msgpack.unpackb(data[4:4 + n], raw=False)[2][0] == "PROTO"
    s.close()


def test_lost_frames_do_not_affect_others(server):
    a = Native(server)
    b = Native(server)
    a.sock.sendall(struct.pack(">I", 100) + b"\x93")    # half a frame, then silence
    assert b.ok("put", b"x", b"1") > 0
    assert b.ok("get", b"x") == b"1"
    a.close()
    b.close()


def test_big_values(nc):
    big = bytes(range(256)) * 8192             # 2 MiB
    nc.ok("put", b"big", big)
    assert nc.ok("get", b"big") == big
    vals, lost = nc.ok("mget", [b"big", b"big"])
    assert vals == [big, big] and lost == []


def test_auth_required():
    with start_server("--requirepass", "pw") as srv:
        c = Native(srv)
        assert c.hello[2]["auth"] is True
        assert c.err("get", b"a") == "NOAUTH"
        assert c.err("auth", b"wrong") == "NOAUTH"
        assert c.ok("auth", "pw") is True
        assert c.ok("put", b"a", b"1") > 0
        c.close()


def test_resp_and_native_share_the_store(server, nc):
    nc.ok("put", b"shared", b"from-native")
    s = server.connect()
    s.sendall(b"*2\r\n$3\r\nGET\r\n$6\r\nshared\r\n")
    assert recv_until(s, lambda d: d.count(b"\r\n") >= 2) == b"$11\r\nfrom-native\r\n"
    s.close()


def test_max_clients_native_gets_a_frame():
    with start_server("--max-clients", "1") as srv:
        a = Native(srv)
        s = srv.connect()
        s.sendall(MAGIC)
        data = recv_all(s)
        (n,) = struct.unpack(">I", data[:4])
        rid, status, (code, msg, extra) = msgpack.unpackb(data[4:4 + n], raw=False)
        assert status == 1 and code == "BUSY" and "max number of clients" in msg
        s.close()
        assert a.ok("ping") == "PONG"
        a.close()


@pytest.mark.slow
def test_inject_through_native(tmp_path):
    with start_server("--enable-fault-injection") as srv:
        c = Native(srv)
        c.ok("put", b"victim", b"v" * 100)
        res = c.ok("inject", "ao", "key", b"victim")
        assert res["kind"] == "ao" and "offset" in res and "subpage" in res
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            rid, status, result = c.call("get", b"victim")
            if status == 1:
                break
            time.sleep(0.05)
        assert status == 1 and result[0] in ("LOST", "UNRECOVERABLE"), result
        assert isinstance(result[2].get("version"), int)
        vals, lost = c.ok("mget", [b"victim", b"nope"])
        assert vals == [None, None] and lost == [0]
        assert [k for k, v, s in c.ok("lost")] == [b"victim"]
        assert c.err("inject", "bogus", "key", b"victim") == "TYPE"
        c.close()
