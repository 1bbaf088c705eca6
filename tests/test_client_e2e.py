"""kvstore.client and kvstore-cli end to end against a real kvstore-server
(``python -m kvstore.server --port 0``) started in a subprocess.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from kvstore import errors
from kvstore.client import LOST, AsyncClient, Client
from kvstore.server.spawn import start_server
from serverutil import REPO, store_available, wait_for

pytestmark = pytest.mark.skipif(not store_available(), reason="the C engine is not built")


def ServerProcess(*args):
    return start_server("--capacity", "64MiB", "--page-size", "4K", *args)


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--enable-fault-injection", "--max-value", "1MiB")
    yield srv
    srv.stop()


@pytest.fixture
def kv(server):
    with server.client() as c:
        c.flushall()
        yield c


def test_commands_round_trip(kv):
    assert kv.ping() == "PONG"
    assert kv.ping(b"echo") == b"echo"
    v1 = kv.put(b"a", b"1")
    v2 = kv.put(b"a", b"\x00" * 1000)
    assert v2 > v1
    assert kv.get(b"a") == b"\x00" * 1000
    assert kv.getv(b"a") == (v2, b"\x00" * 1000)
    assert kv.get(b"missing") is None and kv.getv(b"missing") is None
    assert kv.exists(b"a") and not kv.exists(b"missing")
    versions = kv.mput({b"b": b"2", b"c": b"3"})
    assert len(versions) == 2 and all(v > v2 for v in versions)
    assert kv.mget([b"b", b"zz", b"c"]) == [b"2", None, b"3"]
    assert kv.ttl(b"a") == -1 and kv.ttl(b"zz") == -2
    assert kv.expire(b"a", 100) and 98 < kv.ttl(b"a") <= 100.01   # the store rounds to ms
    assert kv.persist(b"a") and kv.ttl(b"a") == -1
    va = kv.getv(b"a")[0]
    assert va == max(versions) + 2      # EXPIRE and PERSIST each took a version
    kv.put(b"short", b"x", ttl=0.2)
    assert kv.get(b"short") == b"x"
    wait_for(lambda: kv.get(b"short") is None, timeout=5, what="the 0.2 s ttl to expire")
    assert sorted(kv.keys()) == [b"a", b"b", b"c"]
    assert kv.dbsize() == 3
    assert isinstance(kv.stats(), dict)
    assert kv.fetch([(b"a", v2), (b"b", 10**12)]) == {b"a": (va, b"\x00" * 1000)}
    assert kv.delete(b"a") is True and kv.delete(b"a") is False
    assert kv.lost() == []
    assert kv.flushall() is True and kv.dbsize() == 0


def test_value_too_large_and_bad_args(kv):
    with pytest.raises(errors.ValueTooLargeError):
        kv.put(b"big", b"x" * (2 << 20))
    assert kv.get(b"big") is None
    with pytest.raises(TypeError, match="encode"):
        kv.put("k", b"v")
    assert kv.put(b"k", b"v") >= 1          # connection still fine


def test_pipeline(kv):
    with kv.pipeline() as pipe:
        for i in range(500):
            pipe.put(b"p%d" % i, b"v%d" % i)
        for i in range(500):
            pipe.get(b"p%d" % i)
        pipe.mget([b"p1", b"nope"]).delete(b"p0").get(b"p0")
        results = pipe.execute()
    assert results[500:1000] == [b"v%d" % i for i in range(500)]
    assert results[1000:] == [[b"v1", None], True, None]


def test_threads_share_one_client(server):
    failures = []
    with server.client(max_connections=4) as c:
        def worker(n):
            try:
                for i in range(200):
                    key = b"th%d:%d" % (n, i)
                    c.put(key, key)
                    if c.get(key) != key:
                        failures.append(key)
            except Exception as exc:  # reported below
                failures.append(exc)
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert failures == []
        assert c.connection_pool._created <= 4


def test_async_client(server):
    import asyncio

    async def main():
        async with AsyncClient(server.host, server.port, socket_timeout=10,
                               max_connections=5) as c:
            await c.flushall()

            async def worker(n):
                for i in range(100):
                    key = b"as%d:%d" % (n, i)
                    await c.put(key, key * 2)
                    assert await c.get(key) == key * 2
            await asyncio.gather(*(worker(n) for n in range(10)))
            assert await c.dbsize() == 1000
            async with c.pipeline() as pipe:
                pipe.get(b"as0:0").exists(b"as0:0").delete(b"as0:0")
                assert await pipe.execute() == [b"as0:0" * 2, True, True]
    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.slow
def test_injected_fault_gives_lost_never_missing(server, kv):
    kv.mput({b"victim": b"v" * 100, b"other": b"o"})
    try:
        info = kv.inject("ao", key=b"victim")
    except errors.ResponseError as exc:
        pytest.skip(f"the server cannot inject faults here: {exc}")
    assert info["kind"] == "ao"
    lost_keys = [k for k, _, _ in kv.lost()]
    if b"victim" not in lost_keys:
        # rebuilt (or salvaged) already: it must read back exactly
        assert kv.get(b"victim") == b"v" * 100
        return
    with pytest.raises(errors.KeyLostError) as exc_info:
        kv.get(b"victim")
    assert exc_info.value.version is not None
    assert kv.exists(b"victim") is True
    values = kv.mget([b"victim", b"absent"], on_lost="mark")
    assert values[0] is LOST and values[1] is None
    with pytest.raises(errors.KeyLostError):
        kv.mget([b"victim"])
    # a key in another subpage is untouched unless it shared the subpage
    if b"other" not in lost_keys:
        assert kv.get(b"other") == b"o"
    rc = subprocess.run([sys.executable, "-c", _CLI_BOOT, "-p", str(server.port),
                         "get", "victim"], cwd=REPO, capture_output=True, timeout=30)
    assert rc.returncode == 4 and rc.stdout == b""


def test_injection_disabled_by_default():
    srv = ServerProcess("--disable-flushall")
    try:
        with srv.client() as c:
            c.put(b"k", b"v")
            with pytest.raises(errors.FaultInjectionError):
                c.inject("ao", key=b"k")
            with pytest.raises(errors.ResponseError) as info:
                c.flushall()
            assert info.value.code == "DISABLED"
            assert c.get(b"k") == b"v"
    finally:
        srv.stop()


def test_password():
    srv = ServerProcess("--requirepass", "s3cret")
    try:
        with Client.from_url(f"kv://:s3cret@{srv.host}:{srv.port}") as c:
            assert c.put(b"k", b"v") >= 1
        with srv.client() as c:
            with pytest.raises(errors.ResponseError) as info:
                c.get(b"k")
            assert info.value.code == "NOAUTH"
        with srv.client(password="wrong") as c:
            with pytest.raises(errors.ResponseError):
                c.ping()
    finally:
        srv.stop()


@pytest.mark.slow
def test_stopped_then_killed_server():
    """A frozen server gives TimeoutError; a server killed while a request
    waits (no timeout set) gives ConnectionError; neither hangs."""
    srv = ServerProcess()
    try:
        with srv.client(socket_timeout=0.5) as c:
            c.put(b"k", b"v")
            srv.proc.send_signal(signal.SIGSTOP)
            start = time.monotonic()
            with pytest.raises(errors.TimeoutError):
                c.get(b"k")
            assert time.monotonic() - start < 5
        c = Client(srv.host, srv.port, retries=1, retry_backoff=0.01)   # no timeouts
        srv.proc.send_signal(signal.SIGCONT)
        assert c.ping() == "PONG"
        srv.proc.send_signal(signal.SIGSTOP)       # the request below is sent, unanswered
        killer = threading.Timer(0.5, srv.proc.kill)
        killer.start()
        start = time.monotonic()
        with pytest.raises(errors.ConnectionError):
            c.get(b"k")
        killer.join()
        assert time.monotonic() - start < 10
        with pytest.raises(errors.ConnectionError):
            c.put(b"k", b"v2")
        c.close()
    finally:
        srv.stop()


_CLI_BOOT = "import sys\nfrom kvstore.client.cli import main\nsys.exit(main())\n"


@pytest.mark.slow
def test_cli_against_server(server, kv):
    def cli(*args, stdin=b""):
        proc = subprocess.run([sys.executable, "-c", _CLI_BOOT, "-p", str(server.port), *args],
                              input=stdin, cwd=REPO, capture_output=True, timeout=30)
        return proc.returncode, proc.stdout

    blob = os.urandom(5000)
    assert cli("put", "blob", "-", stdin=blob)[0] == 0
    assert kv.get(b"blob") == blob
    assert cli("get", "blob") == (0, blob)
    assert cli("get", "nope") == (1, b"")
    assert cli("exists", "blob") == (0, b"1\n")
    assert cli("del", "blob") == (0, b"1\n")
    assert cli("del", "blob") == (1, b"0\n")
    code, out = cli("stats")
    assert code == 0 and out
    assert cli("ping") == (0, b"PONG\n")
