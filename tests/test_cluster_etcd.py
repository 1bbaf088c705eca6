"""The asyncio etcd v3 client against a real, private etcd (see etcdutil.py)."""

import asyncio
import time

import pytest

from etcdutil import etcd, free_port, needs_etcd  # noqa: F401  (etcd: a fixture)


from kvstore.server.cluster import etcd as E  # noqa: E402

pytestmark = needs_etcd


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_kv_lease_txn_roundtrip(etcd):
    async def main():
        c = E.EtcdClient(etcd.url)
        assert (await c.status())["version"].startswith("3.")
        lease, ttl = await c.grant(5)
        assert lease and ttl == 5
        rev = await c.put(b"/t/a", b"\x00\xffbinary", lease=lease)
        await c.put("/t/b", "2")
        kvs, rrev = await c.range(b"/t/", prefix=True)
        assert [(kv.key, kv.value) for kv in kvs] == [(b"/t/a", b"\x00\xffbinary"), (b"/t/b", b"2")]
        assert kvs[0].lease == lease and kvs[0].create_revision == rev and rrev >= rev
        assert (await c.get(b"/t/none"))[0] is None
        assert await c.keepalive(lease) == 5
        t = await c.time_to_live(lease, keys=True)
        assert t["granted_ttl"] == 5 and 0 < t["ttl"] <= 5 and t["keys"] == [b"/t/a"]
        # compare-and-swap on create and mod revision, and on value
        r = await c.txn([E.cmp_create(b"/t/c", "==", 0)], [E.op_put(b"/t/c", b"1")], [E.op_get(b"/t/c")])
        assert r.succeeded and r.responses == [r.revision]
        r = await c.txn([E.cmp_create(b"/t/c", "==", 0)], [E.op_put(b"/t/c", b"2")], [E.op_get(b"/t/c")])
        assert not r.succeeded and r.responses[0][0].value == b"1"
        mod = r.responses[0][0].mod_revision
        r = await c.txn([E.cmp_mod(b"/t/c", "==", mod), E.cmp_value(b"/t/c", "==", b"1")],
                        [E.op_put(b"/t/c", b"3")])
        assert r.succeeded
        r = await c.txn([E.cmp_mod(b"/t/c", "==", mod)], [E.op_put(b"/t/c", b"4")])
        assert not r.succeeded
        assert (await c.get(b"/t/c"))[0].value == b"3"
        # revoke deletes the lease's keys; a renewal then says the lease is gone
        await c.revoke(lease)
        assert (await c.get(b"/t/a"))[0] is None
        with pytest.raises(E.LeaseNotFoundError, match="expired or was revoked"):
            await c.keepalive(lease)
        assert (await c.time_to_live(lease))["ttl"] == -1
        await c.revoke(lease)       # already gone: fine
        with pytest.raises(E.LeaseNotFoundError):
            await c.put(b"/t/x", b"1", lease=lease)
        assert await c.delete(b"/t/", prefix=True) == 2
    run(main())


def test_lease_expires_without_keepalive(etcd):
    async def main():
        c = E.EtcdClient(etcd.url)
        lease, ttl = await c.grant(1)
        await c.put(b"/e/k", b"v", lease=lease)
        assert (await c.get(b"/e/k"))[0] is not None     # held while the lease lives
        t0 = time.monotonic()
        while (await c.get(b"/e/k"))[0] is not None:
            assert time.monotonic() - t0 < 5, "lease did not expire"
            await asyncio.sleep(0.05)
        assert (await c.time_to_live(lease))["ttl"] == -1   # the lease itself is gone
        with pytest.raises(E.LeaseNotFoundError):
            await c.keepalive(lease)
    run(main())


def test_watch_streams_and_resumes_after_etcd_restart(etcd):
    async def main():
        c = E.EtcdClient(etcd.url)
        rev = await c.put(b"/w/a", b"1")
        w = c.watch(b"/w/", prefix=True, start_revision=rev)
        got = []

        async def reader():
            async for evs in w:
                got.extend((e.type, e.kv.key, e.kv.value) for e in evs)
        t = asyncio.create_task(reader())
        await c.put(b"/w/b", b"2")
        await c.delete(b"/w/a")
        await c.put(b"/other", b"x")            # outside the prefix
        for _ in range(100):
            if len(got) >= 3:
                break
            await asyncio.sleep(0.02)
        assert got == [("PUT", b"/w/a", b"1"), ("PUT", b"/w/b", b"2"), ("DELETE", b"/w/a", b"")]
        await asyncio.get_running_loop().run_in_executor(None, etcd.stop)
        with pytest.raises(E.EtcdUnavailableError):
            await asyncio.wait_for(t, 5)
        await asyncio.get_running_loop().run_in_executor(None, etcd.start)
        await c.put(b"/w/c", b"3")               # written while nobody watched
        w2 = c.watch(b"/w/", prefix=True, start_revision=w.next_revision)
        evs = await asyncio.wait_for(anext(w2), 5)
        assert [(e.type, e.kv.key) for e in evs] == [("PUT", b"/w/c")]
        w2.close()
    run(main(), 60)


def test_watch_on_compacted_revision_says_so(etcd):
    async def main():
        c = E.EtcdClient(etcd.url)
        for i in range(5):
            rev = await c.put(b"/c/k", str(i).encode())
        await c._call("kv/compaction", {"revision": str(rev)})
        w = c.watch(b"/c/", prefix=True, start_revision=2)
        with pytest.raises(E.WatchCompactedError) as ei:
            await asyncio.wait_for(anext(w), 5)
        assert ei.value.compact_revision == rev
    run(main())


def test_etcd_down_is_a_clear_error_within_the_timeout():
    async def main():
        port = free_port()
        c = E.EtcdClient(f"127.0.0.1:{port}", timeout=0.5)
        with pytest.raises(E.EtcdUnavailableError, match=f"etcd at http://127.0.0.1:{port} is unreachable"):
            await c.put(b"k", b"v")
        with pytest.raises(ConnectionError):        # also the builtin
            await c.range(b"k")
        retries = []
        t0 = time.monotonic()
        with pytest.raises(E.EtcdUnavailableError, match="gave up after 0.6 s"):
            await c.wait_ready(deadline=0.6, on_retry=lambda e, d: retries.append(d))
        assert len(retries) >= 2 and retries[1] > retries[0] * 1.2     # backs off
        assert time.monotonic() - t0 < 2
    run(main())


def test_stalled_etcd_times_out(etcd):
    async def main():
        c = E.EtcdClient(etcd.url, timeout=0.3)
        etcd.pause()
        try:
            t0 = time.monotonic()
            with pytest.raises(E.EtcdTimeoutError, match="did not answer /v3/kv/put within 0.3 s"):
                await c.put(b"k", b"v")
            assert time.monotonic() - t0 < 1.0
            with pytest.raises(TimeoutError):
                await c.keepalive(1, timeout=0.2)
        finally:
            etcd.resume()
        await c.put(b"k", b"v")
    run(main())


def test_second_endpoint_is_tried(etcd):
    async def main():
        c = E.EtcdClient(f"http://127.0.0.1:{free_port()},{etcd.url}")
        await c.put(b"k", b"v")
        assert (await c.get(b"k"))[0].value == b"v"
    run(main())


def test_refused_request_and_bad_endpoints(etcd):
    async def main():
        c = E.EtcdClient(etcd.url)
        with pytest.raises(E.EtcdResponseError, match="HTTP 404"):
            await c._call("kv/nonsense", {})
        with pytest.raises(ValueError, match="compare operator"):
            E.cmp_mod(b"k", "=", 1)
    run(main())
    with pytest.raises(ValueError, match="only http"):
        E.EtcdClient("https://127.0.0.1:2379")
    with pytest.raises(ValueError, match="host and a port"):
        E.EtcdClient("http://127.0.0.1")
    assert E.prefix_end(b"/a/") == b"/a0" and E.prefix_end(b"a\xff") == b"b"
