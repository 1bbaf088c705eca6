"""kvstore-server through redis-py, RESP3 (redis-py's default, HELLO 3) and
RESP2: every command, SET options, TTLs, MGET/MSET, INFO, pipelines and
transactions, AUTH, limits and config. Real server in a subprocess."""

import os
import socket
import tempfile
import time

import pytest
import redis

from serverutil import recv_all, recv_until, resp_command, start_server, store_available, wait_for

pytestmark = pytest.mark.skipif(not store_available(),
                                reason="kvstore.Store is not in this checkout yet")


@pytest.fixture(scope="module")
def server():
    srv = start_server("--max-clients", "64")
    yield srv
    rc = srv.stop()
    assert rc == 0, srv.logs()


@pytest.fixture(params=[None, 3, 2], ids=["default", "resp3", "resp2"])
def r(request, server):
    c = redis.Redis(host=server.host, port=server.port, protocol=request.param,
                    socket_timeout=10)
    c.flushall()
    yield c
    c.close()


def test_ready_line_and_port(server):
    assert server.port > 0 and server.host == "127.0.0.1"


def test_ping_echo_select(r):
    assert r.ping() is True
    assert r.echo("hello") == b"hello"
    assert r.execute_command("SELECT", 0) in (b"OK", "OK", True)
    with pytest.raises(redis.ResponseError, match="DB index is out of range"):
        r.execute_command("SELECT", 1)


def test_get_set_binary(r):
    blob = bytes(range(256)) * 4
    assert r.set("k", blob) is True
    assert r.get("k") == blob
    assert r.get("missing") is None
    assert r.set("k", "") is True and r.get("k") == b""
    assert r.strlen("k") == 0


def test_set_options(r):
    assert r.set("a", "1", nx=True) is True
    assert r.set("a", "2", nx=True) is None
    assert r.get("a") == b"1"
    assert r.set("a", "3", xx=True) is True and r.get("a") == b"3"
    assert r.set("nope", "x", xx=True) is None and r.get("nope") is None
    assert r.set("a", "4", get=True) == b"3"
    assert r.set("fresh", "v", get=True) is None and r.get("fresh") == b"v"
    assert r.set("a", "5", ex=100) is True
    assert 99 <= r.ttl("a") <= 100
    assert r.set("a", "6", px=50000) is True
    assert 49000 < r.pttl("a") <= 50001
    assert r.set("a", "7", keepttl=True) is True and r.ttl("a") > 40
    assert r.set("a", "8") is True and r.ttl("a") == -1        # plain SET clears the TTL
    assert r.set("a", "9", exat=int(time.time()) + 100) is True and 98 <= r.ttl("a") <= 100
    assert r.set("a", "10", nx=True, get=True) == b"9"          # NX with GET (Redis 7)
    with pytest.raises(redis.ResponseError, match="syntax error"):
        r.execute_command("SET", "a", "b", "NX", "XX")
    with pytest.raises(redis.ResponseError, match="syntax error"):
        r.execute_command("SET", "a", "b", "BOGUS")
    with pytest.raises(redis.ResponseError, match="invalid expire time"):
        r.execute_command("SET", "a", "b", "EX", "0")
    with pytest.raises(redis.ResponseError, match="not an integer"):
        r.execute_command("SET", "a", "b", "EX", "soon")
    with pytest.raises(redis.ResponseError, match="syntax error"):
        r.execute_command("SET", "a", "b", "EX")


def test_ttl_commands(r):
    r.set("t", "v")
    assert r.ttl("t") == -1 and r.pttl("t") == -1
    assert r.ttl("none") == -2 and r.pttl("none") == -2
    assert r.expire("t", 100) is True and 99 <= r.ttl("t") <= 100
    assert r.pexpire("t", 100000) is True and 99000 < r.pttl("t") <= 100001
    assert r.persist("t") is True and r.ttl("t") == -1
    assert r.persist("t") is False
    assert r.expire("none", 10) is False
    assert r.expire("t", 10, nx=True) is True
    assert r.expire("t", 20, nx=True) is False
    assert r.expire("t", 5, gt=True) is False and r.expire("t", 50, gt=True) is True
    assert r.expire("t", 40, lt=True) is True and 39 <= r.ttl("t") <= 40
    assert r.pexpire("t", 150) is True
    wait_for(lambda: r.get("t") is None, 5, what="the 150 ms expiry")
    assert r.exists("t") == 0 and r.ttl("t") == -2
    r.set("t2", "v")
    assert r.expire("t2", 0) is True and r.get("t2") is None  # non-positive deletes


def test_del_exists_dbsize_flush(r):
    r.mset({"a": 1, "b": 2, "c": 3})
    assert r.exists("a", "a", "zz") == 2
    assert r.dbsize() == 3
    assert r.delete("a", "b", "zz") == 2
    assert r.dbsize() == 1
    assert r.flushall() is True and r.dbsize() == 0


def test_mget_mset(r):
    assert r.mset({"m1": "x", "m2": b"\x00\xff"}) is True
    assert r.mget("m1", "nope", "m2") == [b"x", None, b"\x00\xff"]
    assert r.msetnx({"m1": "y", "m3": "z"}) is False and r.get("m3") is None
    with pytest.raises(redis.ResponseError, match="wrong number of arguments for 'mset'"):
        r.execute_command("MSET", "a", "b", "c")


def test_info(r):
    r.set("x", "1")
    r.set("y", "2", ex=100)
    assert r.info("keyspace")["db0"] == {"keys": 2, "expires": 1, "avg_ttl": 0}
    r.delete("y")
    info = r.info()
    assert info["redis_version"].count(".") == 2
    assert info["tcp_port"] > 0 and info["connected_clients"] >= 1
    assert info["db0"]["keys"] == 1
    kv = r.info("kvstore")
    assert kv["keys"] == 1 and "capacity" in kv and "lost_keys" in kv
    part = r.execute_command("INFO", "server", "keyspace")
    assert "redis_version" in part and "db0" in part and "used_memory" not in part
    assert "lost_keys" in r.execute_command("INFO", "everything")


def test_info_text_sections(server):
    with socket.create_connection((server.host, server.port)) as s:
        s.sendall(resp_command("INFO"))

        def complete(d):
            if b"\r\n" not in d:
                return False
            n = int(d[1:d.index(b"\r\n")])
            return len(d) >= d.index(b"\r\n") + 2 + n + 2
        data = recv_until(s, complete)
        assert data.startswith(b"$") and complete(data)
        text = data.decode()
    for sec in ("# Server", "# Clients", "# Memory", "# Stats", "# Keyspace", "# kvstore"):
        assert sec in text
    assert "redis_version:" in text and "\r\n" in text


def test_config_get(r):
    assert r.config_get("save") == {"save": ""}
    assert r.config_get("appendonly") == {"appendonly": "no"}
    got = r.config_get("max*")
    assert "maxclients" in got and got["maxclients"] == "64" and "maxmemory" in got
    with pytest.raises(redis.ResponseError):
        r.execute_command("CONFIG", "SET", "save", "")
    with pytest.raises(redis.ResponseError, match="unknown subcommand"):
        r.execute_command("CONFIG", "BOGUS")


def test_client_commands(r):
    cid = r.client_id()
    assert isinstance(cid, int) and cid > 0
    assert r.client_getname() is None
    assert r.client_setname("worker-1") is True
    assert r.client_getname() in (b"worker-1", "worker-1")
    assert r.execute_command("CLIENT", "SETINFO", "LIB-NAME", "mylib") in (b"OK", "OK", True)
    assert b"lib-name=mylib" in r.execute_command("CLIENT", "INFO")
    with pytest.raises(redis.ResponseError):
        r.client_setname("has space")
    with pytest.raises(redis.ResponseError, match="Unrecognized option"):
        r.execute_command("CLIENT", "SETINFO", "COLOR", "red")


def test_command_introspection(server):
    with socket.create_connection((server.host, server.port)) as s:
        s.sendall(resp_command("COMMAND", "COUNT"))
        n = int(recv_until(s, lambda d: d.endswith(b"\r\n"))[1:-2])
        assert n >= 30
        s.sendall(resp_command("COMMAND", "DOCS", "get"))
        docs = recv_until(s, lambda d: b"group" in d and d.endswith(b"string\r\n"))
        assert docs.startswith(b"*2\r\n$3\r\nget\r\n*6\r\n$7\r\nsummary\r\n")
        s.sendall(resp_command("COMMAND", "INFO", "get", "nosuch"))
        info = recv_until(s, lambda d: d.endswith(b"$-1\r\n"))
        assert info.startswith(b"*2\r\n*10\r\n$3\r\nget\r\n:2\r\n")
    c = redis.Redis(host=server.host, port=server.port)
    cmds = c.command()                       # redis-py parses COMMAND's reply
    assert len(cmds) == n and cmds["get"]["arity"] == 2
    c.close()


def test_hello(r, server):
    if r.get_connection_kwargs().get("protocol") in (3, "3"):
        h = r.execute_command("HELLO", 3)
        assert h[b"proto"] == 3 and h[b"mode"] == b"standalone"
    with pytest.raises(redis.ResponseError, match="NOPROTO|unsupported protocol"):
        r.execute_command("HELLO", 4)


def test_hello2_reply_is_flat_array(server):
    with socket.create_connection((server.host, server.port)) as s:
        s.sendall(resp_command("HELLO", "2"))
        data = recv_until(s, lambda d: b"modules" in d and d.endswith(b"*0\r\n"))
        assert data.startswith(b"*14\r\n")
        s.sendall(resp_command("HELLO", "3"))
        data = recv_until(s, lambda d: d.endswith(b"*0\r\n"))
        assert data.startswith(b"%7\r\n")
        s.sendall(resp_command("GET", "no-such-key"))
        assert recv_until(s, lambda d: d.endswith(b"\r\n")) == b"_\r\n"


def test_errors_are_redis_style(r):
    with pytest.raises(redis.ResponseError) as ei:
        r.execute_command("FOOBAR", "a", "b")
    assert str(ei.value) == "unknown command 'FOOBAR', with args beginning with: 'a' 'b' "
    with pytest.raises(redis.ResponseError, match="wrong number of arguments for 'get' command"):
        r.execute_command("GET")
    with pytest.raises(redis.ResponseError, match="wrong number of arguments for 'ttl' command"):
        r.execute_command("TTL", "a", "b")
    with pytest.raises(redis.ResponseError, match="not an integer"):
        r.execute_command("EXPIRE", "a", "x")
    assert r.ping() is True                 # the connection survives errors


def test_kv_commands(r):
    r.set("a", "1")
    stats = r.execute_command("KV.STATS")
    if isinstance(stats, list):
        stats = dict(zip(stats[::2], stats[1::2]))
    stats = {(k.decode() if isinstance(k, bytes) else k): v for k, v in stats.items()}
    assert stats["keys"] == 1 and stats["server_connected_clients"] >= 1
    assert r.execute_command("KV.LOST") == []
    with pytest.raises(redis.ResponseError, match="fault injection is disabled"):
        r.execute_command("KV.INJECT", "ao", "KEY", "a")
    assert r.get("a") == b"1"


def test_pipeline_and_transactions(r):
    with r.pipeline(transaction=False) as p:
        for i in range(200):
            p.set(f"p{i}", i)
        for i in range(200):
            p.get(f"p{i}")
        res = p.execute()
    assert res[:200] == [True] * 200
    assert res[200:] == [str(i).encode() for i in range(200)]
    with r.pipeline() as p:          # MULTI/EXEC
        p.set("tx", "1").get("tx")
        assert p.execute() == [True, b"1"]
    with r.pipeline() as p:
        p.watch("tx")
        r.set("tx", "changed")
        p.multi()
        p.get("tx")
        with pytest.raises(redis.WatchError):
            p.execute()
    with pytest.raises(redis.ResponseError, match="EXEC without MULTI"):
        r.execute_command("EXEC")


def test_exec_abort_on_queued_error(server):
    with socket.create_connection((server.host, server.port)) as s:
        s.sendall(resp_command("MULTI") + resp_command("SET", "q", "1")
                  + resp_command("NOSUCH") + resp_command("EXEC") + resp_command("GET", "q"))
        data = recv_until(s, lambda d: d.count(b"\r\n") >= 5)
        assert data.startswith(b"+OK\r\n+QUEUED\r\n-ERR unknown command 'NOSUCH'")
        assert b"-EXECABORT" in data and data.endswith(b"$-1\r\n")


def test_inline_and_quit(server):
    with socket.create_connection((server.host, server.port)) as s:
        s.sendall(b"PING\r\nPING hi\r\nSET inl \"a b\"\r\nGET inl\r\nQUIT\r\nPING\r\n")
        data = recv_all(s)
    assert data == b"+PONG\r\n$2\r\nhi\r\n+OK\r\n$3\r\na b\r\n+OK\r\n"


def test_many_clients_and_big_values(server):
    clients = [redis.Redis(host=server.host, port=server.port) for _ in range(20)]
    for i, c in enumerate(clients):
        c.set(f"c{i}", str(i) * 100)
    for i, c in enumerate(clients):
        assert c.get(f"c{i}") == str(i).encode() * 100
        c.close()
    big = os.urandom(3 * 1024 * 1024)
    c = redis.Redis(host=server.host, port=server.port)
    c.set("big", big)
    assert c.get("big") == big
    c.close()


# ---------------------------------------------------------------- configured servers

@pytest.mark.slow
def test_requirepass():
    with start_server("--requirepass", "s3cret") as srv:
        with socket.create_connection((srv.host, srv.port)) as s:
            s.sendall(resp_command("GET", "a") + resp_command("PING"))
            data = recv_until(s, lambda d: d.count(b"\r\n") >= 2)
            assert data == b"-NOAUTH Authentication required.\r\n" * 2
            s.sendall(resp_command("AUTH", "wrong"))
            assert recv_until(s, lambda d: d.endswith(b"\r\n")).startswith(b"-WRONGPASS")
            s.sendall(resp_command("AUTH", "s3cret") + resp_command("PING"))
            assert recv_until(s, lambda d: d.count(b"\r\n") >= 2) == b"+OK\r\n+PONG\r\n"
        good = redis.Redis(host=srv.host, port=srv.port, password="s3cret")
        assert good.set("a", "1") and good.get("a") == b"1"
        good.close()
        good2 = redis.Redis(host=srv.host, port=srv.port, password="s3cret", protocol=2)
        assert good2.get("a") == b"1"
        good2.close()
        bad = redis.Redis(host=srv.host, port=srv.port, password="nope")
        with pytest.raises(redis.AuthenticationError):
            bad.ping()
        bad.close()


def test_flushall_can_be_disabled():
    with start_server("--disable-flushall") as srv:
        c = redis.Redis(host=srv.host, port=srv.port)
        c.set("a", "1")
        with pytest.raises(redis.ResponseError, match="FLUSHALL is disabled"):
            c.flushall()
        assert c.get("a") == b"1"
        c.close()


def test_max_clients():
    with start_server("--max-clients", "2") as srv:
        a = socket.create_connection((srv.host, srv.port))
        b = socket.create_connection((srv.host, srv.port))
        for s in (a, b):
            s.sendall(b"PING\r\n")
            assert recv_until(s, lambda d: d.endswith(b"\r\n")) == b"+PONG\r\n"
        c = socket.create_connection((srv.host, srv.port))
        c.sendall(b"PING\r\n")
        assert recv_all(c) == b"-ERR max number of clients reached\r\n"
        c.close()
        a.close()

        def ping():             # admitted once the server has seen a close
            with socket.create_connection((srv.host, srv.port)) as d:
                d.sendall(b"PING\r\n")
                return recv_until(d, lambda x: x.endswith(b"\r\n")) == b"+PONG\r\n"
        wait_for(ping, 5, what="a free client slot")
        b.close()


@pytest.mark.slow
def test_idle_timeout():
    with start_server("--idle-timeout", "0.5") as srv:
        s = socket.create_connection((srv.host, srv.port))
        s.sendall(b"PING\r\n")
        assert recv_until(s, lambda d: d.endswith(b"\r\n")) == b"+PONG\r\n"
        t0 = time.monotonic()
        assert recv_all(s, timeout=5) == b""            # closed by the server
        assert time.monotonic() - t0 < 4
        s.close()


@pytest.mark.slow
def test_output_buffer_limit_closes_only_that_client():
    with start_server("--max-output-buffer", "4MiB") as srv:
        c = redis.Redis(host=srv.host, port=srv.port)
        c.set("v", b"x" * (1024 * 1024))
        c.close()
        s = socket.create_connection((srv.host, srv.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(resp_command("GET", "v") * 64)        # 64 MiB of replies, never read
        time.sleep(1.0)
        other = redis.Redis(host=srv.host, port=srv.port)
        assert other.get("v") == b"x" * (1024 * 1024)
        other.close()
        got = recv_all(s, timeout=5)
        assert len(got) < 64 * 1024 * 1024              # cut off, not all delivered
        s.close()
        assert srv.alive()


def test_config_file_and_flags_override():
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write('port = 0\nmax_clients = 7\nrequirepass = "fromfile"\n'
                '[server]\nmax-value = "1KiB"\n')
    try:
        with start_server("--config", f.name, "--requirepass", "fromflag") as srv:
            c = redis.Redis(host=srv.host, port=srv.port, password="fromflag")
            assert c.config_get("maxclients") == {"maxclients": "7"}
            with pytest.raises(redis.ResponseError, match="too large"):
                c.set("k", b"x" * 2000)
            c.close()
    finally:
        os.unlink(f.name)


def test_bad_config_exits_with_message():
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write("bogus_setting = 1\n")
    try:
        with pytest.raises(RuntimeError, match="unknown setting 'bogus_setting'"):
            start_server("--config", f.name, timeout=15)
    finally:
        os.unlink(f.name)


def _pipeline_transcript(srv):
    """Raw RESP2 then RESP3 replies to a batch mixing plain GET/SET (the C
    path) with everything the Python layer handles, on one connection."""
    batch = b"".join([
        resp_command("SET", "a", "1"), resp_command("GET", "a"), resp_command("GET", "missing"),
        resp_command("set", "bin", b"\r\n\x00\xff"), resp_command("GET", "bin"),
        resp_command("SET", "t", "v", "EX", "100"), resp_command("TTL", "t"),
        resp_command("SET", "t", "w"), resp_command("TTL", "t"),
        resp_command("GET", "k" * 70000), resp_command("MGET", "a", "missing"),
        resp_command("GET"), resp_command("GET", "a", "b"), resp_command("SET", "x"),
        b"GET a\r\n", resp_command("DEL", "a"), resp_command("GET", "a"),
    ])
    with socket.create_connection((srv.host, srv.port)) as s:
        s.sendall(batch + resp_command("PING", "end2"))
        one = recv_until(s, lambda d: d.endswith(b"end2\r\n"))
        s.sendall(resp_command("HELLO", "3") + batch + resp_command("PING", "end3"))
        two = recv_until(s, lambda d: d.endswith(b"end3\r\n"))
    return one, two


def test_c_fast_path_matches_python_path():
    with start_server() as fast, start_server("--no-resp-fast") as slow:
        got_fast = _pipeline_transcript(fast)
        got_slow = _pipeline_transcript(slow)
    assert got_fast == got_slow
    one, two = got_fast
    assert one.startswith(b"+OK\r\n$1\r\n1\r\n$-1\r\n+OK\r\n$4\r\n\r\n\x00\xff\r\n")
    assert b"_\r\n" in two and b"-ERR wrong number of arguments for 'get' command" in one
