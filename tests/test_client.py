"""kvstore.client.Client against the protocol-level fake server: commands,
error mapping, retries, timeouts, a server that dies mid-request, pipelines,
the connection pool across threads, fork."""

import builtins
import os
import struct
import threading
import time

import msgpack
import pytest

import kvstore

from fakeserver import FakeServer, frame

import kvstore.client as kc
from kvstore import errors
from kvstore.client import LOST, Client


@pytest.fixture
def client(fake):  # noqa: F811
    with Client(fake.host, fake.port, socket_timeout=5, retry_backoff=0.01) as c:
        yield c


# -- commands -------------------------------------------------------------------

def test_basic_commands(client, fake):  # noqa: F811
    assert client.ping() == "PONG"
    assert client.ping(b"hi") == b"hi"
    v1 = client.put(b"a", b"1")
    v2 = client.put(b"a", b"2")
    assert isinstance(v1, int) and v2 > v1
    assert client.get(b"a") == b"2"
    assert client.getv(b"a") == (v2, b"2")
    assert client.get(b"missing") is None
    assert client.getv(b"missing") is None
    assert client.exists(b"a") is True and client.exists(b"missing") is False
    assert client.mput({b"b": b"x", b"c": b"y"}) == [v2 + 1, v2 + 2]
    assert client.mput([(b"d", b"z")]) == [v2 + 3]
    assert client.mget([b"a", b"nope", b"c"]) == [b"2", None, b"y"]
    assert client.ttl(b"a") == -1 and client.ttl(b"nope") == -2
    assert client.expire(b"a", 100) is True
    assert 99 < client.ttl(b"a") <= 100
    assert client.persist(b"a") is True and client.ttl(b"a") == -1
    assert client.expire(b"nope", 1) is False
    assert sorted(client.keys()) == [b"a", b"b", b"c", b"d"]
    assert client.dbsize() == 4
    assert client.stats()["keys"] == 4
    assert client.fetch([(b"a", v2), (b"b", 10**9), (b"nope", 0)]) == {b"a": (v2, b"2")}
    assert client.delete(b"a") is True and client.delete(b"a") is False
    assert client.lost() == []
    assert client.flushall() is True and client.dbsize() == 0
    # the ops and args that went over the wire
    assert ("put", [b"a", b"1"]) in [(op, args) for _, op, args in fake.requests]


def test_put_ttl_is_sent(client, fake):  # noqa: F811
    client.put(b"k", b"v", ttl=30)
    client.put(b"k2", b"v", ttl=1.5)
    assert fake.requests[-2][2] == [b"k", b"v", 30]
    assert fake.requests[-1][2] == [b"k2", b"v", 1.5]
    for bad in (0, -1):
        with pytest.raises(ValueError):
            client.put(b"k", b"v", ttl=bad)
    with pytest.raises(TypeError):
        client.put(b"k", b"v", ttl="10")


def test_bytes_like_accepted_and_str_rejected(client):
    client.put(bytearray(b"ba"), memoryview(b"mv"))
    assert client.get(memoryview(b"ba")) == b"mv"
    with pytest.raises(TypeError, match="encode"):
        client.get("text")
    with pytest.raises(TypeError, match="encode"):
        client.put(b"k", "text")
    with pytest.raises(TypeError, match="bytes-like"):
        client.get(42)
    with pytest.raises(TypeError):
        client.mget(b"single")
    with pytest.raises(ValueError):
        client.mget([b"a"], on_lost="ignore")


def test_large_value_round_trip(client):
    value = os.urandom(3 << 20)
    client.put(b"big", value)
    assert client.get(b"big") == value


def test_inject(fake):  # noqa: F811
    with Client(fake.host, fake.port) as c:
        with pytest.raises(kc.InjectionDisabledError) as info:
            c.inject("ao", offset=4096)
        assert isinstance(info.value, errors.FaultInjectionError)
        assert isinstance(info.value, errors.ResponseError)
        with pytest.raises(ValueError):
            c.inject("ao")
        with pytest.raises(ValueError):
            c.inject("ao", offset=1, key=b"k")
    with FakeServer(injection=True) as server, Client(server.host, server.port) as c:
        assert c.inject("ao", offset=8192) == {"offset": 8192, "subpage": 2, "kind": "ao"}
        c.put(b"k", b"v")
        assert c.inject("hwpoison", key=b"k")["kind"] == "hwpoison"
        assert server.requests[-1][2] == ["hwpoison", "key", b"k"]


# -- errors ---------------------------------------------------------------------

@pytest.mark.parametrize("code, cls", [
    ("FULL", errors.StoreFullError),
    ("TOOLARGE", errors.ValueTooLargeError),
    ("READONLY", errors.ReadOnlyError),
    ("NOAUTH", kc.AuthenticationError),
    ("BUSY", errors.ResponseError),
    ("UNKNOWN", errors.ResponseError),
    ("ERR", errors.ResponseError),
])
def test_error_codes_map_to_exceptions(client, fake, code, cls):  # noqa: F811
    fake.actions["put"].append(("error", code, "boom", {}))
    with pytest.raises(cls, match="boom") as info:
        client.put(b"k", b"v")
    assert info.value.code == code
    assert isinstance(info.value, errors.Error)
    # an error reply leaves the connection usable
    assert client.put(b"k", b"v") >= 1
    assert fake.accepted == 1


def test_server_side_errors_from_fake(client):
    with pytest.raises(errors.StoreFullError):
        client.put(b"full", b"v")
    with pytest.raises(errors.ValueTooLargeError):
        client.put(b"k", b"x" * ((8 << 20) + 1))
    with pytest.raises(MemoryError):
        client.put(b"full", b"v")      # StoreFullError is a MemoryError too


def test_lost_key_is_retried_until_rebuilt(client, fake):  # noqa: F811
    client.put(b"k", b"v")
    fake.lose(b"k", times=2)
    assert client.get(b"k") == b"v"
    assert fake.ops().count("get") == 3


def test_lost_key_raises_after_bounded_retries(fake):  # noqa: F811
    with Client(fake.host, fake.port, retries=3, retry_backoff=0.02) as c:
        version = c.put(b"k", b"v")
        fake.lose(b"k", times=100)
        start = time.monotonic()
        with pytest.raises(errors.KeyLostError) as info:
            c.get(b"k")
        elapsed = time.monotonic() - start
    assert info.value.version == version
    assert info.value.key == b"k"
    assert info.value.retryable
    assert fake.ops().count("get") == 4          # 1 try + 3 retries
    assert elapsed >= 0.02 + 0.04 + 0.08 - 0.01  # exponential backoff slept


def test_lost_key_is_not_reported_missing(fake):  # noqa: F811
    with Client(fake.host, fake.port, retries=0) as c:
        c.put(b"k", b"v")
        fake.lose(b"k", times=5)
        with pytest.raises(errors.KeyLostError):
            c.get(b"k")
        with pytest.raises(errors.KeyLostError):
            c.getv(b"k")
        assert c.exists(b"k") is True


def test_unrecoverable_is_not_retried(client, fake):  # noqa: F811
    version = client.put(b"k", b"v")
    fake.lose(b"k", unrecoverable=True)
    with pytest.raises(errors.UnrecoverableKeyError) as info:
        client.get(b"k")
    assert isinstance(info.value, errors.KeyLostError)
    assert info.value.version == version
    assert fake.ops().count("get") == 1


def test_mget_lost_raise_and_mark(fake):  # noqa: F811
    with Client(fake.host, fake.port, retries=1, retry_backoff=0.01) as c:
        c.mput({b"a": b"1", b"b": b"2"})
        fake.lose(b"b", times=100)
        with pytest.raises(errors.KeyLostError) as info:
            c.mget([b"a", b"b"])
        assert info.value.key == b"b"
        assert fake.ops().count("mget") == 2
        values = c.mget([b"a", b"b", b"zz"], on_lost="mark")
        assert values == [b"1", LOST, None]
        assert values[1] is LOST and values[2] is None
        assert LOST is not None and "LOST" in repr(LOST)
        assert LOST is getattr(kvstore, "LOST", LOST)   # one marker for store and client
    fake.lost.clear()
    with Client(fake.host, fake.port) as c:
        fake.lose(b"a", times=1)
        assert c.mget([b"a", b"b"]) == [b"1", b"2"]   # retried once, rebuilt


# -- broken connections, timeouts, dead servers ------------------------------

def test_read_retried_after_connection_closed_before_reply(client, fake):  # noqa: F811
    client.put(b"k", b"v")
    fake.actions["get"].append("close")
    assert client.get(b"k") == b"v"
    assert fake.ops().count("get") == 2
    assert fake.accepted == 2


def test_write_not_resent_after_connection_closed(client, fake):  # noqa: F811
    fake.actions["put"].append("close")
    with pytest.raises(errors.ConnectionError) as info:
        client.put(b"k", b"v")
    assert isinstance(info.value, builtins.ConnectionError)
    assert fake.ops().count("put") == 1              # sent once, never again
    # the broken connection was discarded, not returned to the pool
    pool = client.connection_pool
    assert pool._idle == [] and pool._created == 0
    assert client.put(b"k", b"v2") >= 1
    assert fake.accepted == 2


def test_timeout_raises_and_is_not_retried(fake):  # noqa: F811
    fake.actions["get"].append("hang")
    with Client(fake.host, fake.port, socket_timeout=0.3) as c:
        start = time.monotonic()
        with pytest.raises(errors.TimeoutError) as info:
            c.get(b"k")
        assert time.monotonic() - start < 3
        assert isinstance(info.value, builtins.TimeoutError)
        assert fake.ops().count("get") == 1
        assert c.connection_pool._created == 0       # timed-out connection dropped
        assert c.get(b"k") is None                   # and a new one works


def test_timeout_retried_for_reads_when_asked(fake):  # noqa: F811
    fake.actions["get"].append("hang")
    fake.actions["put"].append("hang")
    with Client(fake.host, fake.port, socket_timeout=0.2, retry_on_timeout=True,
                retry_backoff=0.01) as c:
        assert c.get(b"k") is None
        assert fake.ops().count("get") == 2
        with pytest.raises(errors.TimeoutError):
            c.put(b"k", b"v")
        assert fake.ops().count("put") == 1


def test_server_killed_mid_request_raises_instead_of_hanging(fake):  # noqa: F811
    """No socket timeout at all: a server that dies while we wait for the reply
    must give a ConnectionError (its socket closes), not a hang."""
    fake.actions["get"].append("hang")
    c = Client(fake.host, fake.port, retries=2, retry_backoff=0.01)
    c.ping()
    killer = threading.Timer(0.3, fake.stop)
    killer.start()
    start = time.monotonic()
    try:
        with pytest.raises(errors.ConnectionError):
            c.get(b"k")
    finally:
        killer.join()
        c.close()
    assert time.monotonic() - start < 5


def test_server_killed_mid_write_raises(fake):  # noqa: F811
    fake.actions["put"].append("hang")
    c = Client(fake.host, fake.port, retry_backoff=0.01)
    threading.Timer(0.3, fake.stop).start()
    with pytest.raises(errors.ConnectionError):
        c.put(b"k", b"v")
    c.close()
    assert fake.ops().count("put") == 1


def test_connection_refused(fake):  # noqa: F811
    port = fake.port
    fake.stop()
    with Client("127.0.0.1", port, retries=2, retry_backoff=0.01) as c:
        with pytest.raises(errors.ConnectionError, match=f"127.0.0.1:{port}") as info:
            c.ping()
    assert isinstance(info.value, builtins.ConnectionError)


def test_handshake_timeout():
    with FakeServer(hang_handshake=True) as server:
        with Client(server.host, server.port, socket_connect_timeout=0.2) as c:
            start = time.monotonic()
            with pytest.raises(errors.TimeoutError):
                c.ping()
            assert time.monotonic() - start < 3


def test_stale_idle_connection_is_replaced_before_a_write(client, fake):  # noqa: F811
    client.ping()
    fake.drop_connections()              # e.g. the server's idle timeout
    time.sleep(0.1)
    assert client.put(b"k", b"v") >= 1   # not a ConnectionError
    assert fake.ops().count("put") == 1
    assert fake.accepted == 2


# -- framing ----------------------------------------------------------------------

def test_reply_split_into_single_bytes(client, fake):  # noqa: F811
    client.put(b"k", b"value" * 20)
    fake.actions["get"].append(("slow", 0.0005))
    assert client.get(b"k") == b"value" * 20


def test_oversized_reply_frame_rejected(fake):  # noqa: F811
    fake.actions["get"].append(("raw", struct.pack(">I", 10_000_000)))
    with Client(fake.host, fake.port, max_frame=1 << 20, retries=0) as c:
        with pytest.raises(errors.ProtocolError, match="max_frame"):
            c.get(b"k")
        assert c.connection_pool._created == 0


def test_wrong_request_id_and_garbage_rejected(client, fake):  # noqa: F811
    fake.actions["ping"].append(("raw", frame([999, 0, "PONG"])))
    with pytest.raises(errors.ProtocolError, match="999"):
        client.ping()
    body = b"\xc1"                                  # never-used msgpack byte
    fake.actions["ping"].append(("raw", struct.pack(">I", len(body)) + body))
    with pytest.raises(errors.ProtocolError):
        client.ping()
    fake.actions["ping"].append(("raw", frame({"not": "a list"})))
    with pytest.raises(errors.ProtocolError):
        client.ping()
    assert client.ping() == "PONG"


def test_server_proto_error_drops_connection(client, fake):  # noqa: F811
    fake.actions["ping"].append(("raw", frame([0, 1, ["PROTO", "bad frame", {}]])))
    with pytest.raises(kc.ServerProtocolError):
        client.ping()
    assert client.connection_pool._idle == []
    assert client.ping() == "PONG"


# -- pipelines ----------------------------------------------------------------------

def test_pipeline_results_in_order_in_one_write(client, fake, monkeypatch):  # noqa: F811
    writes = []
    real = kc.Connection._sendall

    def counting(self, data):
        writes.append(len(data))
        return real(self, data)

    client.ping()
    monkeypatch.setattr(kc.Connection, "_sendall", counting)
    with client.pipeline() as pipe:
        assert pipe.put(b"a", b"1") is pipe
        pipe.get(b"a").exists(b"a").mget([b"a", b"zz"]).delete(b"a").get(b"a")
        assert len(pipe) == 6
        results = pipe.execute()
    assert results[1:] == [b"1", True, [b"1", None], True, None]
    assert isinstance(results[0], int)
    assert len(writes) == 1
    assert fake.ops()[-6:] == ["put", "get", "exists", "mget", "delete", "get"]


def test_pipeline_errors_raise_first_or_return_in_place(client, fake):  # noqa: F811
    client.put(b"k", b"v")
    fake.lose(b"k", times=100)
    with client.pipeline() as pipe:
        pipe.put(b"a", b"1").get(b"k").put(b"full", b"x").get(b"a")
        with pytest.raises(errors.KeyLostError) as info:
            pipe.execute()
    results = info.value.pipeline_results
    assert isinstance(results[1], errors.KeyLostError)
    assert isinstance(results[2], errors.StoreFullError)
    assert results[3] == b"1"
    # every reply was read: the connection is back in the pool and in sync
    assert client.connection_pool._idle and client.get(b"a") == b"1"
    with client.pipeline() as pipe:
        pipe.get(b"k").get(b"a")
        out = pipe.execute(raise_on_error=False)
    assert isinstance(out[0], errors.KeyLostError) and out[1] == b"1"
    assert fake.ops().count("get") == 5     # LOST inside a pipeline is not retried


def test_pipeline_reset_on_exit_and_empty(client, fake):  # noqa: F811
    with client.pipeline() as pipe:
        pipe.put(b"a", b"1")
    assert fake.ops() == []
    assert client.pipeline().execute() == []


def test_large_pipeline_windows(client):
    value = b"v" * 1024
    with client.pipeline() as pipe:
        for i in range(3000):
            pipe.put(b"k%d" % i, value)
        for i in range(0, 3000, 7):
            pipe.get(b"k%d" % i)
        results = pipe.execute()
    assert len(results) == 3000 + len(range(0, 3000, 7))
    assert results[3000:] == [value] * len(range(0, 3000, 7))
    assert results[:3000] == sorted(results[:3000])


def test_pipeline_of_reads_retried_but_writes_not(client, fake):  # noqa: F811
    client.put(b"a", b"1")
    fake.actions["get"].append("close")
    with client.pipeline() as pipe:
        assert pipe.get(b"a").exists(b"a").execute() == [b"1", True]
    fake.actions["get"].append("close")
    with client.pipeline() as pipe:
        pipe.put(b"b", b"2").get(b"a")
        with pytest.raises(errors.ConnectionError):
            pipe.execute()
    assert fake.ops().count("put") == 2       # the first put + the pipeline's, once


# -- pool, threads, fork ----------------------------------------------------------

def test_pool_shared_between_threads(fake):  # noqa: F811
    errors_seen = []
    with Client(fake.host, fake.port, max_connections=4) as c:
        def worker(n):
            try:
                for i in range(150):
                    key = b"t%d-%d" % (n, i)
                    c.put(key, key * 3)
                    if c.get(key) != key * 3:
                        errors_seen.append((key, "wrong value"))
            except Exception as exc:  # reported below
                errors_seen.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors_seen == []
        assert c.dbsize() == 8 * 150
        assert fake.accepted <= 4
        assert c.connection_pool._created <= 4


@pytest.mark.slow
def test_pool_exhausted_times_out(fake):  # noqa: F811
    with Client(fake.host, fake.port, max_connections=1, pool_timeout=0.2) as c:
        held = c.connection_pool.get_connection()
        start = time.monotonic()
        with pytest.raises(errors.ConnectionError, match="max_connections=1"):
            c.ping()
        assert time.monotonic() - start < 3
        c.connection_pool.release(held)
        assert c.ping() == "PONG"


def test_close_is_idempotent_and_final(fake):  # noqa: F811
    c = Client(fake.host, fake.port)
    c.ping()
    c.close()
    c.close()
    with pytest.raises(errors.ClosedError):
        c.ping()
    with Client(fake.host, fake.port) as c2:
        c2.ping()
    with pytest.raises(errors.ClosedError):
        c2.ping()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_child_uses_its_own_connections(client, fake):  # noqa: F811
    client.put(b"k", b"parent")
    assert fake.accepted == 1
    pid = os.fork()
    if pid == 0:        # child: must not reuse the parent's socket
        code = 1
        try:
            if client.get(b"k") == b"parent" and client.put(b"k2", b"child") >= 1:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert fake.accepted == 2
    assert client.get(b"k2") == b"child"      # the parent's connection still works


# -- auth and URLs --------------------------------------------------------------------

def test_password():
    with FakeServer(password="s3cret") as server:
        with Client(server.host, server.port, password="s3cret") as c:
            assert c.put(b"k", b"v") >= 1
        with Client.from_url(f"kv://:s3cret@127.0.0.1:{server.port}") as c:
            assert c.get(b"k") == b"v"
        with Client(server.host, server.port, password="wrong") as c:
            with pytest.raises(kc.AuthenticationError):
                c.ping()
        with Client(server.host, server.port) as c:
            with pytest.raises(kc.AuthenticationError) as info:
                c.get(b"k")
            assert info.value.code == "NOAUTH"


def test_from_url(fake):  # noqa: F811
    with Client.from_url(fake.url + "?socket_timeout=2&retries=1") as c:
        assert c.ping() == "PONG"
        assert c.connection_pool.connection_kwargs["socket_timeout"] == 2.0
        assert c._retry.retries == 1
    with Client.from_url(fake.url, retries=0) as c:
        assert c._retry.retries == 0
    with pytest.raises(ValueError):
        Client.from_url("redis://127.0.0.1:6379")


def test_raw_msgpack_is_what_protocol_says(fake):  # noqa: F811
    """Keys and values go as msgpack bin, op names as str."""
    seen = []
    real = kc.Connection._sendall

    def spy(self, data):
        seen.append(bytes(data))
        return real(self, data)

    kc.Connection._sendall = spy
    try:
        with Client(fake.host, fake.port) as c:
            c.put(b"k", b"v")
    finally:
        kc.Connection._sendall = real
    handshake, request = seen
    assert handshake == b"\x00KV1"
    (n,) = struct.unpack(">I", request[:4])
    assert n == len(request) - 4
    assert msgpack.unpackb(request[4:], raw=True) == [1, b"put", [b"k", b"v"]]
    assert b"\xc4\x01k" in request    # bin 8 with length 1


def test_busy_instead_of_hello_is_a_retried_connection_error(fake, monkeypatch):  # noqa: F811
    """A server at max_clients answers the magic with BUSY and closes."""
    import socket as socketmod
    listener = socketmod.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen = []

    def serve():
        for _ in range(2):
            sock, _ = listener.accept()
            sock.recv(4)
            seen.append(1)
            sock.sendall(frame([0, 1, ["BUSY", "max clients reached", {}]]))
            sock.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with Client("127.0.0.1", port, retries=1, retry_backoff=0.01) as c:
            with pytest.raises(errors.ConnectionError, match="BUSY") as info:
                c.put(b"k", b"v")
            assert info.value.code == "BUSY"
        t.join(5)
        assert len(seen) == 2          # a refused connection is retried (nothing was sent)
    finally:
        listener.close()
