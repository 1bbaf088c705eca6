"""Memory faults through the server, and its lifecycle: KV.INJECT then reads
(LOST keys answer -LOST, never nil; other keys intact; KV.LOST lists them;
recovery logged as key=value lines), graceful SIGTERM/SIGINT, startup errors."""

import re
import signal
import socket
import subprocess
import time

import pytest
import redis

from serverutil import (
    recv_all, recv_until, resp_command, server_command, start_server, store_available, wait_for,
)

pytestmark = pytest.mark.skipif(not store_available(),
                                reason="kvstore.Store is not in this checkout yet")

LOST_RE = r"^LOST key was lost to a memory error \(version \d+\), (retry|unrecoverable)$"


@pytest.fixture(scope="module")
def server():
    # keep_ue on 4 KiB pages: a UE costs exactly one subpage, whatever
    # hugepages this machine has left (mainline is tested separately below)
    srv = start_server("--enable-fault-injection", "--capacity", "64MiB",
                       "--page-size", "4K", "--kernel-policy", "keep_ue")
    yield srv
    assert srv.stop() == 0, srv.logs()


@pytest.fixture(params=[3, 2], ids=["resp3", "resp2"])
def r(request, server):
    c = redis.Redis(host=server.host, port=server.port, protocol=request.param, socket_timeout=10)
    c.flushall()
    yield c
    c.close()


def wait_lost(r, key, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r.get(key)
        except redis.ResponseError as e:
            return str(e)
        time.sleep(0.02)
    raise AssertionError(f"{key!r} never became LOST")


def test_inject_key_then_get_is_lost(r, server):
    keys = {f"key:{i}": f"value-{i}-" + "x" * 200 for i in range(2000)}
    r.mset(keys)
    res = r.execute_command("KV.INJECT", "ao", "KEY", "key:1000")
    if isinstance(res, list):
        res = dict(zip(res[::2], res[1::2]))
    assert res[b"kind"] == b"ao" and b"offset" in res and b"subpage" in res
    msg = wait_lost(r, "key:1000")
    assert re.match(LOST_RE, msg), msg
    lost = r.execute_command("KV.LOST")
    lost_keys = {row[0] for row in lost}
    assert b"key:1000" in lost_keys
    assert all(isinstance(row[1], int) and row[2] in (b"lost", b"rebuilding", b"unrecoverable")
               for row in lost)
    # exactly the records of that 4 KiB subpage are gone; the rest read back
    intact = 0
    for k, v in keys.items():
        if k.encode() in lost_keys:
            with pytest.raises(redis.ResponseError, match="^LOST"):
                r.get(k)
        else:
            assert r.get(k) == v.encode()
            intact += 1
    assert intact >= len(keys) - 40
    assert r.exists("key:1000") == 1                    # LOST keys exist
    # MGET: a LOST key is an error element, never a nil
    got = r.mget("key:1000", "key:1", "nope")
    assert isinstance(got[0], redis.ResponseError) and re.match(LOST_RE, str(got[0]))
    assert got[1] == keys["key:1"].encode() and got[2] is None
    # SET ... GET on a lost key refuses rather than inventing an old value
    with pytest.raises(redis.ResponseError, match="^LOST"):
        r.set("key:1000", "new", get=True)
    # a plain SET repairs it by overwriting
    assert r.set("key:1000", "fresh") is True and r.get("key:1000") == b"fresh"
    info = r.info("kvstore")
    assert info["faults_injected"] >= 1 and info["keys_lost_total"] >= len(lost_keys)
    # no replica: the other keys of the subpage stay lost; key:1000 was rewritten
    assert info["lost_keys"] == len(lost_keys) - 1 == len(r.execute_command("KV.LOST"))
    wait_for(lambda: "event=recovery" in server.logs(), timeout=5, what="the recovery log line")


def test_inject_offset(r):
    r.set("a", "1")
    res = r.execute_command("KV.INJECT", "ao", "OFFSET", "0")
    assert res
    with pytest.raises(redis.ResponseError, match="unknown fault kind"):
        r.execute_command("KV.INJECT", "meteor", "OFFSET", "0")
    with pytest.raises(redis.ResponseError, match="syntax error"):
        r.execute_command("KV.INJECT", "ao", "SOMEWHERE", "0")
    with pytest.raises(redis.ResponseError, match="not an integer"):
        r.execute_command("KV.INJECT", "ao", "OFFSET", "x")
    assert r.ping()


def test_ar_fault_on_read(r):
    r.mset({f"ar:{i}": "v" * 100 for i in range(100)})
    r.execute_command("KV.INJECT", "ar", "KEY", "ar:50")
    msg = wait_lost(r, "ar:50")
    assert re.match(LOST_RE, msg), msg
    assert r.get("ar:0") == b"v" * 100 or r.get("ar:99") == b"v" * 100


def test_structured_recovery_log(server, r):
    r.set("logged", "v")
    r.execute_command("KV.INJECT", "ao", "KEY", "logged")
    wait_lost(r, "logged")
    deadline = time.monotonic() + 5
    while "event=recovery" not in server.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    logs = server.logs()
    assert re.search(r"level=warning event=fault_injected kind=ao .*offset=\d+", logs), logs
    assert re.search(r"event=recovery duration_ms=[\d.]+ .*keys_lost=\d+", logs), logs
    assert re.search(r"event=keys_lost count=\d+ keys=", logs), logs


def test_mainline_policy_never_answers_nil():
    """Mainline: the whole (huge)page is hit; salvage may or may not save the
    rest. Whatever happened, every key reads back right or answers -LOST."""
    with start_server("--enable-fault-injection", "--capacity", "16MiB",
                      "--kernel-policy", "mainline") as srv:
        c = redis.Redis(host=srv.host, port=srv.port, socket_timeout=10)
        keys = {f"m:{i}": f"v{i}" * 20 for i in range(500)}
        c.mset(keys)
        c.execute_command("KV.INJECT", "ao", "KEY", "m:250")
        assert re.match(LOST_RE, wait_lost(c, "m:250"))
        for k, v in keys.items():
            try:
                assert c.get(k) == v.encode()
            except redis.ResponseError as e:
                assert re.match(LOST_RE, str(e)), e
        c.close()


# ---------------------------------------------------------------- lifecycle

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_shutdown_flushes_replies(sig):
    srv = start_server()
    s = srv.connect()
    value = b"v" * 1000
    s.sendall(resp_command("SET", "k", value))
    assert recv_until(s, lambda d: d == b"+OK\r\n") == b"+OK\r\n"
    n = 5000
    s.sendall(resp_command("GET", "k") * n)
    expect = (b"$1000\r\n" + value + b"\r\n") * n
    time.sleep(0.2)                       # the batch is read and answered ...
    srv.proc.send_signal(sig)             # ... then we ask it to stop
    got = recv_all(s, timeout=10)
    assert got == expect[:len(got)]
    assert len(got) == len(expect)        # every reply produced was delivered
    assert srv.proc.wait(10) == 0
    logs = srv.logs()
    assert "event=shutdown_requested" in logs and "event=stopped" in logs
    s.close()
    with pytest.raises(OSError):
        socket.create_connection((srv.host, srv.port), timeout=1).close()
    srv.stop()


def test_port_in_use_is_a_clean_error():
    with start_server() as srv:
        p = subprocess.run(server_command("--port", str(srv.port)), capture_output=True,
                           timeout=30)
        assert p.returncode == 1
        assert b"address already in use" in p.stderr.lower()
        assert b"Traceback" not in p.stderr


def test_bad_flags():
    p = subprocess.run(server_command("--max-value", "lots"), capture_output=True, timeout=30)
    assert p.returncode == 2 and b"not a size" in p.stderr
    p = subprocess.run(server_command("--log-level", "chatty"), capture_output=True, timeout=30)
    assert p.returncode == 2 and b"unknown log level" in p.stderr
    p = subprocess.run(server_command("--help"), capture_output=True, timeout=30)
    assert p.returncode == 0 and b"--enable-fault-injection" in p.stdout


def test_ipv6_and_multiple_binds():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this environment")
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("::1 not configured here")
    with start_server("--bind", "127.0.0.1 ::1") as srv:
        with socket.create_connection(("::1", srv.port), timeout=5) as s:
            s.sendall(b"PING\r\n")
            assert recv_until(s, lambda d: d.endswith(b"\r\n")) == b"+PONG\r\n"
