"""Redis string and key-space commands, expiry arithmetic, WATCH, all-or-nothing
multi-key writes, CLIENT REPLY/KILL, and the tools that need them
(redis-benchmark, redis-cli --scan/--bigkeys/--latency, redis-py).

Each reproduction of issue 14 that these fix is a test here; the replies are
compared with a real redis-server by tests/test_redis_differential.py.
"""

import shutil
import socket
import subprocess
import time

import pytest

from kvstore.errors import ResponseError, ValueTooLargeError
from redisdiff import Raw
from serverutil import resp_command, start_server, store_available

pytestmark = pytest.mark.skipif(not store_available(), reason="kvstore.Store is not in this checkout yet")

LLONG_MAX = (1 << 63) - 1


@pytest.fixture(scope="module")
def server():
    s = start_server("--capacity", "64MiB")
    yield s
    assert s.stop() == 0


@pytest.fixture
def small():
    s = start_server("--capacity", "4MiB")
    yield s
    assert s.stop() == 0


@pytest.fixture
def r(server):
    c = Raw(server.connect(timeout=10))
    assert c.call("FLUSHALL") == ("+", b"OK")
    yield c
    c.close()


def err(text):
    return ("-", text.encode() if isinstance(text, str) else text)


# ------------------------------------------------------------------ expiry

@pytest.mark.parametrize("cmd,arg", [("EXPIRE", "9223372036854775807"), ("EXPIRE", "18446744073709552"),
                                     ("PEXPIRE", "9223372036854775807"),
                                     ("EXPIREAT", "9223372036854775807"),
                                     ("PEXPIRE", "9223372036854775000")])
def test_expire_overflow_is_refused_and_the_key_kept(r, cmd, arg):
    """Issue 14: EXPIRE k 2**63-1 answered :1 and the key was gone."""
    assert r.call("SET", "k", "v") == ("+", b"OK")
    assert r.call(cmd, "k", arg) == err(f"ERR invalid expire time in '{cmd.lower()}' command")
    assert r.call("GET", "k") == b"v"
    assert r.call("TTL", "k") == -1


def test_set_ex_accepts_what_redis_accepts(r):
    assert r.call("SET", "k", "v", "EX", "1000000000001") == ("+", b"OK")
    assert r.call("TTL", "k") == 1000000000001
    assert r.call("SET", "k", "v", "EX", "9223372036854776") == err("ERR invalid expire time in 'set' command")
    assert r.call("GET", "k") == b"v"


def test_pttl_never_above_int64(r):
    assert r.call("SET", "k", "v", "PXAT", str(LLONG_MAX)) == ("+", b"OK")
    pttl = r.call("PTTL", "k")
    assert 0 < pttl <= LLONG_MAX
    assert r.call("PEXPIRETIME", "k") == LLONG_MAX


def test_getex_validates_before_touching_the_key(r):
    r.call("SET", "k", "v", "EX", "100")
    assert r.call("GETEX", "k", "EX", "9223372036854776") == err("ERR invalid expire time in 'getex' command")
    assert r.call("TTL", "k") in (99, 100)
    assert r.call("GETEX", "k", "PERSIST") == b"v"
    assert r.call("TTL", "k") == -1


def test_native_expire_and_ttl_overflow(server):
    """Issue 14: native expire with 2**63, 2**64-1 or 1.8e16 lost the key."""
    with server.client() as c:
        c.put(b"k", b"v")
        for bad in (2 ** 63, 2 ** 64 - 1, 1.8e16, float("inf"), float("nan")):
            with pytest.raises(ResponseError) as ei:
                c.expire(b"k", bad)
            assert any(w in str(ei.value) for w in ("invalid expire time", "integer", "finite")), ei.value
            assert "Error" not in str(ei.value)         # no Python exception names
            assert c.get(b"k") == b"v"
        with pytest.raises(ResponseError):
            c.put(b"k2", b"v", 1e300)
        assert c.get(b"k2") is None
        assert c.expire(b"k", 100) is True
        assert 99 < c.ttl(b"k") <= 100


# ------------------------------------------------------------------ strings

def test_incr_family_and_errors(r):
    assert r.call("INCR", "n") == 1
    assert r.call("INCRBY", "n", "41") == 42
    assert r.call("DECRBY", "n", "2") == 40
    assert r.call("DECR", "n") == 39
    assert r.call("INCRBY", "n", str(LLONG_MAX)) == err("ERR increment or decrement would overflow")
    assert r.call("DECRBY", "n", str(-(1 << 63))) == err("ERR decrement would overflow")
    r.call("SET", "s", "abc")
    assert r.call("INCR", "s") == err("ERR value is not an integer or out of range")
    assert r.call("INCRBY", "n", "-0") == err("ERR value is not an integer or out of range")
    r.call("EXPIRE", "n", "100")
    r.call("INCR", "n")
    assert r.call("TTL", "n") in (99, 100)          # INCR keeps the expiry


def test_incrbyfloat_as_redis_prints(r):
    assert r.call("INCRBYFLOAT", "f", "0.1") == b"0.1"
    assert r.call("INCRBYFLOAT", "f", "0.2") == b"0.3"
    # long double arithmetic, printed with %.17Lf: Redis 7.0 answers the same
    assert r.call("INCRBYFLOAT", "f", "1e3") == b"1000.29999999999999999"
    assert r.call("INCRBYFLOAT", "f", "inf") == err("ERR increment would produce NaN or Infinity")
    assert r.call("INCRBYFLOAT", "f", "nan") == err("ERR value is not a valid float")
    assert r.call("GET", "f") == b"1000.29999999999999999"


def test_append_getrange_setrange(r):
    assert r.call("APPEND", "a", "hello") == 5
    assert r.call("APPEND", "a", " world") == 11
    assert r.call("GETRANGE", "a", "0", "4") == b"hello"
    assert r.call("GETRANGE", "a", "-5", "-1") == b"world"
    assert r.call("GETRANGE", "nope", "0", "-1") == b""
    assert r.call("SETRANGE", "a", "6", "WORLD") == 11
    assert r.call("SETRANGE", "b", "3", "x") == 4
    assert r.call("GET", "b") == b"\0\0\0x"
    assert r.call("SETRANGE", "b", "-1", "x") == err("ERR offset is out of range")
    assert r.call("SETRANGE", "b", "536870912", "x") == \
        err("ERR string exceeds maximum allowed size (proto-max-bulk-len)")


def test_value_larger_than_the_store_is_not_full(small):
    """Issue 14: a value larger than the whole store was reported as full."""
    r = Raw(small.connect(timeout=10))
    reply = r.call("SET", "big", b"x" * (5 << 20))
    assert reply[0] == "-" and b"larger than the whole store" in reply[1], reply
    assert r.call("EXISTS", "big") == 0
    reply = r.call("MSET", "a", "1", "big", b"x" * (5 << 20))
    assert reply[0] == "-" and b"larger than the whole store" in reply[1], reply
    assert r.call("EXISTS", "a", "big") == 0
    r.close()
    with small.client() as c:
        with pytest.raises(ValueTooLargeError) as ei:
            c.put(b"big", b"x" * (5 << 20))
        assert "larger than the whole store" in str(ei.value)


def test_over_long_key_reads_answer_nil_and_zero(r):
    """Issue 14: GET/EXISTS of a key over the key limit errored out."""
    long_key = b"k" * 70000
    assert r.call("GET", long_key) is None
    assert r.call("EXISTS", long_key, "nope") == 0
    assert r.call("TTL", long_key) == -2
    assert r.call("TYPE", long_key) == ("+", b"none")
    r.call("SET", "k", "v")
    assert r.call("MGET", "k", long_key) == [b"v", None]
    assert r.call("STRLEN", long_key) == 0
    assert r.call("GETRANGE", long_key, "0", "-1") == b""
    assert r.call("GETDEL", long_key) is None


# ------------------------------------------------------------------ key space

def test_rename_copy_touch_randomkey_object_time(r):
    r.call("SET", "a", "1", "EX", "100")
    assert r.call("RENAME", "a", "b") == ("+", b"OK")
    assert r.call("TTL", "b") in (99, 100)              # the expiry moves with the key
    assert r.call("RENAME", "a", "c") == err("ERR no such key")
    assert r.call("COPY", "b", "c") == 1
    assert r.call("COPY", "b", "c") == 0
    assert r.call("TOUCH", "b", "c", "x") == 2
    assert r.call("RANDOMKEY") in (b"b", b"c")
    assert r.call("OBJECT", "ENCODING", "b") == b"int"
    assert r.call("OBJECT", "ENCODING", "nope") is None
    secs, usecs = r.call("TIME")
    assert abs(int(secs) - time.time()) < 5 and 0 <= int(usecs) < 1_000_000
    assert r.call("ROLE")[0] == b"master"


def _scan_all(r, count, match=None, during=None):
    cursor, seen, calls = b"0", [], 0
    while True:
        args = ["SCAN", cursor, "COUNT", str(count)] + (["MATCH", match] if match else [])
        cursor, keys = r.call(*args)
        seen.extend(keys)
        calls += 1
        if during is not None:
            during(calls)
        if cursor == b"0":
            return seen, calls


def test_scan_returns_every_stable_key_across_growth_and_deletes(server, r):
    """Redis's guarantee: a key present for the whole iteration is returned
    at least once, while the key space grows (and compacts) under it."""
    w = Raw(server.connect(timeout=10))
    stable = [b"stable:%d" % i for i in range(2000)]
    doomed = [b"doomed:%d" % i for i in range(2000)]
    pipe = b"".join(resp_command("MSET", *[x for k in stable + doomed for x in (k, b"v" * 30)]) for _ in [0])
    w.sock.sendall(pipe)
    assert w.reader.read() == ("+", b"OK")

    def churn(n):
        # between calls: add many keys (the table grows), delete others
        # (their space is compacted), rewrite stable ones
        w.call("MSET", *[x for i in range(200) for x in (b"new:%d:%d" % (n, i), b"y" * 40)])
        w.call("DEL", *doomed[(n - 1) * 50:n * 50])
        w.call("SET", stable[n % len(stable)], b"z" * 100)

    seen, calls = _scan_all(r, 50, during=churn)
    assert calls > 10
    missing = set(stable) - set(seen)
    assert not missing, f"{len(missing)} stable keys never returned"
    w.close()


def test_scan_order_does_not_depend_on_insertion():
    keys = [b"key:%d" % i for i in range(300)]
    pages = []
    for order in (keys, keys[::-1]):
        s = start_server("--capacity", "16MiB")
        try:
            c = Raw(s.connect(timeout=10))
            for k in order:
                c.call("SET", k, "v")
            pages.append(_scan_all(c, 17))
            c.close()
        finally:
            assert s.stop() == 0
    assert pages[0] == pages[1]
    assert sorted(pages[0][0]) == sorted(keys)


def test_scan_match_and_type(r):
    r.call("MSET", "h\\*llo", "1", "hello", "2", "hallo", "3")
    assert sorted(_scan_all(r, 1000, "h[^e]llo")[0]) == [b"hallo"]
    assert _scan_all(r, 1000, "h\\\\\\*llo")[0] == [b"h\\*llo"]
    assert sorted(r.call("KEYS", "h[^e]llo")) == [b"hallo"]
    assert r.call("SCAN", "0", "TYPE", "hash") == [b"0", []]



def test_scan_edges_and_randomkey_over_expired_keys(r):
    """The last cursor, a COUNT past the key count, an empty store; RANDOMKEY
    never returns a key that expired and is nil when only expired keys are left."""
    assert r.call("SCAN", "0") == [b"0", []]
    assert r.call("RANDOMKEY") is None
    r.call("MSET", *[x for i in range(40) for x in (b"e:%d" % i, b"v")])
    r.call("SET", "live", "1")
    nxt, keys = r.call("SCAN", "0", "COUNT", str(1 << 62))
    assert nxt == b"0" and len(keys) == 41
    assert r.call("SCAN", str((1 << 64) - 1))[0] == b"0"
    assert set(_scan_all(r, 3)[0]) == set(keys)
    for i in range(40):
        r.call("PEXPIRE", b"e:%d" % i, "1")
    time.sleep(0.05)
    assert {r.call("RANDOMKEY") for _ in range(20)} == {b"live"}
    r.call("PEXPIRE", "live", "1")
    time.sleep(0.05)
    assert r.call("RANDOMKEY") is None

# ------------------------------------------------------------------ WATCH

@pytest.mark.parametrize("change", [
    [("EXPIRE", "k", "100")], [("PERSIST", "t")], [("SET", "absent", "1"), ("DEL", "absent")],
    [("RENAME", "k", "k2")], [("FLUSHALL",)], [("INCR", "n")], [("APPEND", "k", "x")],
    [("GETEX", "k", "EX", "50")], [("COPY", "t", "k", "REPLACE")],
])
def test_watch_sees_every_write_like_change(server, r, change):
    """Issue 14: WATCH missed EXPIRE, PERSIST and SET+DEL of an absent key."""
    other = Raw(server.connect(timeout=10))
    r.call("SET", "k", "v")
    r.call("SET", "t", "v", "EX", "100")
    r.call("SET", "n", "1")
    watched = {c[1] for c in change if len(c) > 1} | {"k"}
    assert r.call("WATCH", *sorted(watched)) == ("+", b"OK")
    for c in change:
        other.call(*c)
    assert r.call("MULTI") == ("+", b"OK")
    r.call("SET", "done", "1")
    assert r.call("EXEC") is None
    assert r.call("EXISTS", "done") == 0
    other.close()


def test_rewatch_keeps_the_change_and_expiry_aborts(server, r):
    other = Raw(server.connect(timeout=10))
    r.call("SET", "k", "v")
    r.call("WATCH", "k")
    other.call("SET", "k", "w")
    r.call("WATCH", "k")                   # a second WATCH does not forget the change
    r.call("MULTI")
    r.call("GET", "k")
    assert r.call("EXEC") is None
    r.call("SET", "e", "v", "PX", "50")
    r.call("WATCH", "e")
    time.sleep(0.2)                        # expires while watched
    r.call("MULTI")
    r.call("GET", "e")
    assert r.call("EXEC") is None
    r.call("WATCH", "k")                   # an unchanged key: EXEC runs
    r.call("MULTI")
    r.call("GET", "k")
    assert r.call("EXEC") == [b"w"]
    other.close()


# ------------------------------------------------------------------ all or nothing

def _fill(c, prefix, value, limit=100000):
    """SET keys until the store refuses; returns the keys written."""
    keys = []
    for i in range(limit):
        k = b"%s:%d" % (prefix, i)
        rep = c.call("SET", k, value)
        if rep != ("+", b"OK"):
            assert rep[0] == "-" and rep[1].startswith(b"OOM"), rep
            return keys
        keys.append(k)
    raise AssertionError("the store never filled up")


def test_mset_into_a_nearly_full_store_leaves_no_partial_writes(small):
    """Issue 14: MSET into a nearly full store answered OOM, yet 3 of the 10
    keys existed afterwards."""
    c = Raw(small.connect(timeout=10))
    filled = _fill(c, b"fill", b"x" * 3000)
    c.call("DEL", *filled[:3])             # room for a few values, not for ten
    c.call("SET", b"old", b"kept")
    keys = [b"m:%d" % i for i in range(9)] + [b"old"]
    reply = c.call("MSET", *[x for k in keys for x in (k, b"y" * 3000)])
    assert reply[0] == "-" and reply[1].startswith(b"OOM"), reply
    assert c.call("EXISTS", *keys[:-1]) == 0
    assert c.call("GET", b"old") == b"kept"
    # every acknowledged key keeps its value
    assert all(v == b"x" * 3000 for v in c.call("MGET", *filled[3:]))
    # MSETNX and MULTI/EXEC: the same
    reply = c.call("MSETNX", *[x for k in keys[:-1] for x in (k, b"y" * 3000)])
    assert reply[0] == "-" and reply[1].startswith(b"OOM"), reply
    assert c.call("EXISTS", *keys[:-1]) == 0
    assert c.call("MULTI") == ("+", b"OK")
    for k in keys:
        assert c.call("SET", k, b"z" * 3000) == ("+", b"QUEUED")
    reply = c.call("EXEC")
    assert isinstance(reply, tuple) and reply[1].startswith(b"OOM"), reply
    assert c.call("EXISTS", *keys[:-1]) == 0
    assert c.call("GET", b"old") == b"kept"
    # a block whose writes outgrow their arguments (SETRANGE) is undone too
    assert c.call("MULTI") == ("+", b"OK")
    c.call("SET", b"m:0", b"small")
    c.call("SETRANGE", b"m:1", b"3000000", b"x")
    reply = c.call("EXEC")
    assert isinstance(reply, tuple) and reply[1].startswith(b"OOM"), reply
    assert c.call("EXISTS", b"m:0", b"m:1") == 0
    # a batch that fits is written whole
    assert c.call("MSET", b"m:0", b"a", b"m:1", b"b") == ("+", b"OK")
    assert c.call("MGET", b"m:0", b"m:1") == [b"a", b"b"]
    c.close()


def test_native_mput_into_a_nearly_full_store_is_all_or_nothing(small):
    c = Raw(small.connect(timeout=10))
    filled = _fill(c, b"fill", b"x" * 3000)
    c.call("DEL", *filled[:3])
    c.close()
    with small.client() as k:
        k.put(b"old", b"kept")
        with pytest.raises(Exception) as ei:
            k.mput([(b"m:%d" % i, b"y" * 3000) for i in range(9)] + [(b"old", b"new")])
        assert "full" in str(ei.value).lower()
        assert not any(k.exists(b"m:%d" % i) for i in range(9))
        assert k.get(b"old") == b"kept"


# ------------------------------------------------------------------ CLIENT

def test_client_reply_off_skip_on(server):
    s = server.connect(timeout=3)
    s.sendall(resp_command("CLIENT", "REPLY", "OFF") + resp_command("SET", "a", "1")
              + resp_command("CLIENT", "REPLY", "SKIP") + resp_command("CLIENT", "REPLY", "ON")
              + resp_command("GET", "a") + resp_command("CLIENT", "REPLY", "SKIP")
              + resp_command("GET", "a") + resp_command("PING"))
    got = b""
    deadline = time.monotonic() + 3
    while not got.endswith(b"+PONG\r\n") and time.monotonic() < deadline:
        got += s.recv(4096)
    # OFF mutes itself, SET and the SKIP; ON answers +OK; the next SKIP
    # mutes itself and the GET after it
    assert got == b"+OK\r\n$1\r\n1\r\n+PONG\r\n", got
    s.close()


def test_client_kill(server):
    a, b = Raw(server.connect(timeout=5)), Raw(server.connect(timeout=5))
    bid = a.call("CLIENT", "ID")
    assert b.call("CLIENT", "KILL", "ID", str(bid)) == 1
    with pytest.raises((ConnectionError, OSError)):
        a.call("PING")
    assert b.call("CLIENT", "KILL", "1.2.3.4:5") == err("ERR No such client")
    assert b.call("CLIENT", "KILL", "ID", "0") == err("ERR client-id should be greater than 0")
    assert b.call("CLIENT", "NO-EVICT", "on") == ("+", b"OK")
    b.close()


# ------------------------------------------------------------------ native

def test_native_incr_incrbyfloat_scan(server):
    with server.client() as c:
        c.flushall()
        assert c.incr(b"n") == 1
        assert c.incr(b"n", 41) == 42
        with pytest.raises(ResponseError):
            c.incr(b"n", LLONG_MAX)
        assert c.incrbyfloat(b"f", "0.1") == b"0.1"
        assert c.incrbyfloat(b"f", 0.5) == b"0.6"
        for i in range(50):
            c.put(b"s:%d" % i, b"v")
        assert sorted(c.scan_iter(match=b"s:*", count=7)) == sorted(b"s:%d" % i for i in range(50))


# ------------------------------------------------------------------ tools

def test_redis_py_incr_scan_iter_time(server):
    redis = pytest.importorskip("redis")
    c = redis.Redis(host=server.host, port=server.port)
    c.flushall()
    assert c.incr("n") == 1 and c.incrby("n", 4) == 5 and c.incrbyfloat("f", 1.5) == 1.5
    c.mset({f"k{i}": i for i in range(100)})
    assert sorted(c.scan_iter(match="k*", count=10)) == sorted(f"k{i}".encode() for i in range(100))
    secs, usecs = c.time()
    assert abs(secs - time.time()) < 5
    c.close()


needs_cli = pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli is not installed")


@needs_cli
def test_redis_cli_scan_and_bigkeys(server):
    c = Raw(server.connect(timeout=5))
    c.call("FLUSHALL")
    c.call("MSET", *[x for i in range(30) for x in (f"cli:{i}", "v" * i)])
    c.close()
    base = ["redis-cli", "-h", server.host, "-p", str(server.port)]
    out = subprocess.run(base + ["--scan", "--pattern", "cli:*"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split()) == sorted(f"cli:{i}" for i in range(30))
    out = subprocess.run(base + ["--bigkeys"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Biggest string found" in out.stdout and "cli:29" in out.stdout, out.stdout
    assert "30 keys" in out.stdout or "Sampled 30 keys" in out.stdout, out.stdout


@needs_cli
def test_redis_cli_latency(server):
    p = subprocess.Popen(["redis-cli", "-h", server.host, "-p", str(server.port), "--latency", "--raw"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, errs = p.communicate(timeout=2)
    except subprocess.TimeoutExpired:
        p.terminate()
        out, errs = p.communicate(timeout=5)
    # --raw prints "min max avg samples" when stopped; without errors
    assert "error" not in (out + errs).lower(), out + errs
    fields = out.split()
    assert len(fields) >= 4 and int(fields[-1]) > 0, out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-benchmark") is None, reason="redis-benchmark is not installed")
def test_redis_benchmark_set_get_incr_mset_without_errors(server):
    out = subprocess.run(["redis-benchmark", "-h", server.host, "-p", str(server.port), "-t",
                          "set,get,incr,mset", "-n", "3000", "-c", "4", "-q"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "ERR" not in text and "error" not in text.lower(), text
    for name in ("SET", "GET", "INCR", "MSET"):
        assert name in text, text


def test_socket_is_quiet_after_kill(server):
    """A killed connection is closed by the server (recv sees EOF)."""
    a = server.connect(timeout=5)
    a.sendall(resp_command("CLIENT", "ID"))
    cid = int(a.recv(100)[1:-2])
    b = Raw(server.connect(timeout=5))
    assert b.call("CLIENT", "KILL", "ID", str(cid), "SKIPME", "yes") == 1
    a.settimeout(5)
    try:
        assert a.recv(10) == b""
    except (ConnectionResetError, socket.timeout):
        pass
    b.close()
    a.close()


def test_watch_on_a_replica_sees_replicated_writes():
    from replutil import start, start_replica, wait_link_up, wait_synced
    primary = start("--capacity", "16MiB")
    replica = None
    try:
        replica = start_replica(primary, "--capacity", "16MiB")
        wait_link_up(replica)
        p = Raw(primary.connect(timeout=10))
        r = Raw(replica.connect(timeout=10))
        p.call("SET", "k", "v")
        wait_synced(primary, replica)
        assert r.call("WATCH", "k") == ("+", b"OK")
        p.call("EXPIRE", "k", "100")        # no new version: only the touch can tell
        wait_synced(primary, replica)
        r.call("MULTI")
        r.call("GET", "k")
        assert r.call("EXEC") is None
        assert r.call("ROLE")[0] == b"slave"
        p.close()
        r.close()
    finally:
        if replica is not None:
            replica.stop()
        primary.stop()
