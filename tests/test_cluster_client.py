"""ClusterClient and AsyncClusterClient.

The redirect and retry rules against scriptable fake servers (tests/fakeserver.py
taught the ``cluster`` op): ASK is one-shot, MOVED updates the cache, a write
is never resent once it may have been applied. Then against real clusters
(``kvstore-cluster up --detach``, real etcd): routing to each slot's primary,
mget/mput/pipelines split by slot and put back in order, keyless commands over
every primary, MOVED after a manual failover, and ``kill -9`` of a primary under
a write load with ``--min-replica-acks 1``: writes to its slots resume and
every acknowledged write is present afterwards. Last, a bounded history check
through the client with etcd killed and restarted, connections cut and a
primary killed.
"""

import asyncio
import os
import signal
import subprocess
import threading
import time

import pytest

from fakeserver import FakeServer
from kvstore import errors
from kvstore.client import (
    LOST, AsyncClusterClient, Client, ClusterClient, parse_cluster_url,
)
from kvstore.client._cluster import _Router
from kvstore.slots import SLOTS, key_slot


class ClusterFake(FakeServer):
    """A fake node that answers the ``cluster`` op: all slots are ``owner``'s."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.owner = None
        self.epoch = 1

    def _dispatch(self, rid, op, args):
        if op == "cluster":
            host, port = self.owner or (self.host, self.port)
            if args[0] == "slots":
                return [rid, 0, [[0, SLOTS - 1, [host, port, "a" * 40]]]]
            if args[0] == "info":
                return [rid, 0, {"cluster_state": "ok", "cluster_current_epoch": self.epoch}]
        if op == "asking":
            return [rid, 0, True]
        return super()._dispatch(rid, op, args)


@pytest.fixture
def two_fakes():
    a, b = ClusterFake().start(), ClusterFake().start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def _redirect(code, key, to):
    slot = key_slot(key)
    return ("error", code, f"{slot} 127.0.0.1:{to.port}",
            {"slot": slot, "host": "127.0.0.1", "port": to.port})


# -- arguments and URLs

def test_urls_and_bad_arguments():
    kw = parse_cluster_url("kv://:pw@10.0.0.1:7000,10.0.0.2:7001?socket_timeout=2")
    assert kw == {"password": "pw", "socket_timeout": 2.0,
                  "startup_nodes": [("10.0.0.1", 7000), ("10.0.0.2", 7001)]}
    assert parse_cluster_url("kv://h")["startup_nodes"] == [("h", 7379)]
    for bad in ("redis://h:1", "kv://h:1/x", "kv://h:99999"):
        with pytest.raises(ValueError):
            parse_cluster_url(bad)
    with pytest.raises(ValueError, match="at least one"):
        ClusterClient([])
    with pytest.raises(TypeError, match="from_url"):
        ClusterClient("kv://h:1")
    with pytest.raises(ValueError):
        ClusterClient([("h", 0)])
    with pytest.raises(ValueError, match="cluster_retry_timeout"):
        ClusterClient([("h", 1)], cluster_retry_timeout=0)
    c = ClusterClient([("127.0.0.1", 1)])
    with pytest.raises(TypeError, match="encode"):
        c.get("text")
    with pytest.raises(NotImplementedError, match="scan_iter"):
        c.scan()
    with pytest.raises(ValueError, match="key="):
        c.inject("ao", offset=0)
    with pytest.raises(NotImplementedError):
        c.pipeline().scan()
    c.close()
    c.close()
    with pytest.raises(errors.ClosedError):
        c.get(b"k")


def test_no_node_answers_is_a_connection_error_in_bounded_time():
    from etcdutil import free_port
    dead = free_port()
    c = ClusterClient([("127.0.0.1", dead)], cluster_retry_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(errors.ConnectionError, match=f"127.0.0.1:{dead}"):
        c.get(b"k")
    assert time.monotonic() - t0 < 5
    c.close()


def test_router_splits_by_slot_and_ignores_older_maps():
    r = _Router([("h", 1)])
    assert r.install([[0, 99, ["h", 1, "x"]], [100, SLOTS - 1, ["h", 2, "y", ], ["h", 3, "z"]]],
                     {"cluster_current_epoch": 5})
    assert r.table[0] == ("h", 1) and r.table[SLOTS - 1] == ("h", 2)
    assert r.replicas[("h", 2)] == [("h", 3)]
    assert not r.install([[0, SLOTS - 1, ["h", 9, "q"]]], {"cluster_current_epoch": 4})
    assert r.table[0] == ("h", 1) and r.epoch == 5
    from kvstore.client._commands import Command
    keys = [b"k%d" % i for i in range(50)]
    split = r.split(Command("mget", [keys], None, True))
    assert len(split.parts) == len({key_slot(k) for k in keys})
    assert all(len({key_slot(k) for k in p.command.args[0]}) == 1 for p in split.parts)


# -- redirects and the retry rule, against fakes

def test_ask_is_one_shot_and_moved_updates_the_cache(two_fakes):
    a, b = two_fakes
    b.data[b"k"] = (1, b"on-b")
    a.data[b"k"] = (1, b"on-a")
    with ClusterClient([("127.0.0.1", a.port)]) as c:
        a.actions["get"].append(_redirect("ASK", b"k", b))
        assert c.get(b"k") == b"on-b"
        assert c.node_for_key(b"k") == ("127.0.0.1", a.port)      # ASK: cache untouched
        # on b: ``asking`` then the command, on one connection, in that order
        sent = [(cid, op) for cid, op, _ in b.requests if op in ("asking", "get")]
        assert [op for _, op in sent] == ["asking", "get"] and sent[0][0] == sent[1][0]
        assert c.redirects == {"moved": 0, "ask": 1, "tryagain": 0}
        assert c.get(b"k") == b"on-a"
        # MOVED: the cache names b at once (and the reload that follows
        # agrees once the map says so)
        a.owner = b.host, b.port
        a.epoch = b.epoch = 2
        b.owner = b.host, b.port
        a.actions["get"].append(_redirect("MOVED", b"k", b))
        assert c.get(b"k") == b"on-b"
        assert c.node_for_key(b"k") == ("127.0.0.1", b.port)
        assert c.slot_map_epoch == 2
        n_a = len(a.requests)
        assert c.get(b"k") == b"on-b" and len(a.requests) == n_a


def test_tryagain_is_waited_out(two_fakes):
    a, _ = two_fakes
    a.data[b"k"] = (1, b"v")
    slot = key_slot(b"k")
    with ClusterClient([("127.0.0.1", a.port)], cluster_retry_timeout=5) as c:
        a.actions["mget"].append(("error", "TRYAGAIN", "Multiple keys request during "
                                  "rehashing of slot", {}))
        assert c.mget([b"k"]) == [b"v"]
        assert c.redirects == {"moved": 0, "ask": 0, "tryagain": 1}
        assert a.ops().count("mget") == 2
    with ClusterClient([("127.0.0.1", a.port)], cluster_retry_timeout=0.3) as c:
        for _ in range(100):
            a.actions["get"].append(("error", "TRYAGAIN", f"slot {slot}", {}))
        with pytest.raises(errors.ResponseError) as ei:
            c.get(b"k")
        assert ei.value.code == "TRYAGAIN"


def test_clusterdown_retried_until_served_but_maybe_applied_write_is_not(two_fakes):
    a, _ = two_fakes
    with ClusterClient([("127.0.0.1", a.port)], retry_backoff=0.01) as c:
        for _ in range(3):
            a.actions["put"].append(("error", "CLUSTERDOWN", "Hash slot 1 not served", {}))
        assert isinstance(c.put(b"k", b"v"), int)
        assert a.ops().count("put") == 4
        a.actions["put"].append(("error", "CLUSTERDOWN", "The cluster is down: this primary "
                                 "was fenced before the write was acknowledged; it may or may "
                                 "not be applied", {}))
        with pytest.raises(errors.ResponseError) as ei:
            c.put(b"k", b"w")
        assert ei.value.code == "CLUSTERDOWN"
        assert a.ops().count("put") == 5                          # sent once, not resent
        a.actions["get"].append(("error", "CLUSTERDOWN", "fenced; it may or may not be "
                                 "applied", {}))
        assert c.get(b"k") == b"v"                                 # a read is resent


def test_write_not_resent_after_the_connection_broke(two_fakes):
    a, _ = two_fakes
    with ClusterClient([("127.0.0.1", a.port)], retry_backoff=0.01) as c:
        c.put(b"k", b"v")
        a.actions["put"].append("close")
        with pytest.raises(errors.ConnectionError):
            c.put(b"k", b"w")
        assert a.ops().count("put") == 2
        a.actions["get"].append("close")
        assert c.get(b"k") == b"v"
        # a pipeline: the write has its error in place, the read was resent
        a.actions["delete"].append("close")
        with c.pipeline() as p:
            res = p.get(b"k").delete(b"k").execute(raise_on_error=False)
        assert isinstance(res[1], errors.ConnectionError)


def test_clusterdown_past_the_deadline_is_raised(two_fakes):
    a, _ = two_fakes
    with ClusterClient([("127.0.0.1", a.port)], cluster_retry_timeout=0.5,
                       retry_backoff=0.01) as c:
        for _ in range(1000):
            a.actions["get"].append(("error", "CLUSTERDOWN", "Hash slot 1 not served", {}))
        t0 = time.monotonic()
        with pytest.raises(errors.ResponseError, match="not served"):
            c.get(b"k")
        assert time.monotonic() - t0 < 3


def test_lost_key_read_retried_as_single_node_client(two_fakes):
    a, _ = two_fakes
    a.data[b"k"] = (3, b"v")
    a.lose(b"k", times=2)
    with ClusterClient([("127.0.0.1", a.port)], retry_backoff=0.01) as c:
        assert c.get(b"k") == b"v"
        a.lose(b"k", times=1)
        assert c.mget([b"k", b"x"], on_lost="mark") == [LOST, None]


# -- real clusters

from etcdutil import needs_etcd  # noqa: E402
from serverutil import check_history, store_available, wait_for  # noqa: E402

needs_engine = pytest.mark.skipif(not store_available(), reason="C engine not built")


@pytest.fixture(scope="module")
def c3x1(tmp_path_factory):
    pytest.importorskip("redis")
    from test_cluster_server import Cluster
    c = Cluster(tmp_path_factory.mktemp("cc3x1"), 3, 1)
    try:
        c.wait_placed()
        yield c
    finally:
        c.down()


def _primaries(doc):
    return {(n["host"], n["port"]): n for n in doc["nodes"] if n["role"] == "primary"}


@needs_etcd
@needs_engine
def test_routes_each_key_to_its_slots_primary(c3x1):
    doc = c3x1.status()
    keys = [b"route:%d" % i for i in range(600)]
    with ClusterClient.from_url(f"kv://127.0.0.1:{c3x1.base}", socket_timeout=5) as c:
        c.flushall()
        for i, k in enumerate(keys):
            c.put(k, b"v%d" % i)
        assert [c.get(k) for k in keys] == [b"v%d" % i for i in range(600)]
        assert c.dbsize() == 600 and sorted(c.keys()) == sorted(keys)
        assert sorted(c.scan_iter()) == sorted(keys)
        assert set(c.primaries()) == set(_primaries(doc))
        stats = c.stats()
        assert set(stats) == {f"{h}:{p}" for h, p in _primaries(doc)}
    # each key sits on the primary of its slot and nowhere else
    total = 0
    for (host, port), n in _primaries(doc).items():
        with Client(host, port, socket_timeout=5) as one:
            ks = one.keys()
        total += len(ks)
        assert all(any(lo <= key_slot(k) <= hi for lo, hi in n["slots"]) for k in ks)
    assert total == 600


@needs_etcd
@needs_engine
def test_mget_mput_across_slots_keep_the_order(c3x1):
    keys = [b"m:%d" % i for i in range(200)] + [b"{tag}a", b"{tag}b"]
    assert len({key_slot(k) for k in keys}) > 100
    with ClusterClient([("127.0.0.1", c3x1.base + 1)], socket_timeout=5) as c:
        versions = c.mput([(k, k[::-1]) for k in keys])
        assert len(versions) == len(keys) and all(isinstance(v, int) and v > 0 for v in versions)
        want = [k[::-1] for k in keys]
        assert c.mget(keys) == want
        mixed = [b"absent-1"] + keys[::-1] + [b"absent-2"]
        assert c.mget(mixed) == [None] + want[::-1] + [None]
        assert c.mget([]) == []
        assert c.fetch({k: 0 for k in keys[:20]}).keys() == set(keys[:20])


@needs_etcd
@needs_engine
def test_pipeline_split_by_slot_results_in_order(c3x1):
    with ClusterClient([("127.0.0.1", c3x1.base)], socket_timeout=5) as c:
        with c.pipeline() as p:
            for i in range(60):
                p.put(b"p:%d" % i, b"%d" % i)
            p.put(b"notint", b"x").incr(b"notint")
            for i in range(60):
                p.get(b"p:%d" % i)
            p.mget([b"p:1", b"p:2", b"p:3"]).delete(b"p:0").exists(b"p:0")
            res = p.execute(raise_on_error=False)
        assert all(isinstance(v, int) for v in res[:60])
        assert isinstance(res[61], errors.ResponseError)
        assert res[62:122] == [b"%d" % i for i in range(60)]
        assert res[122:] == [[b"1", b"2", b"3"], True, False]
        with pytest.raises(errors.ResponseError) as ei:
            c.pipeline().get(b"p:5").incr(b"notint").execute()
        assert ei.value.pipeline_results[0] == b"5"


@needs_etcd
@needs_engine
def test_async_twin(c3x1):
    async def go():
        async with AsyncClusterClient([("127.0.0.1", c3x1.base + 2)], socket_timeout=5) as c:
            keys = [b"a:%d" % i for i in range(100)]
            await asyncio.gather(*(c.put(k, k) for k in keys))
            assert await c.mget(keys) == keys
            assert await c.mput({k: b"2" + k for k in keys[:10]}) != []
            async with c.pipeline() as p:
                p.get(b"a:0").get(b"a:50").mget([b"a:1", b"a:99"]).put(b"a:0", b"z")
                assert (await p.execute())[:3] == [b"2a:0", b"a:50", [b"2a:1", b"a:99"]]
            assert await c.get(b"a:0") == b"z"
            got = [k async for k in c.scan_iter(match=b"a:*")]
            assert sorted(set(got)) == sorted(keys)
            with pytest.raises(NotImplementedError):
                c.scan()
    asyncio.run(go())


@needs_etcd
@needs_engine
def test_moved_after_manual_failover(c3x1):
    from test_cluster_server import CLI
    key = b"failover-me"
    slot = key_slot(key)
    doc = c3x1.status()
    old = c3x1.primary_of(slot, doc)
    sync = ClusterClient([("127.0.0.1", c3x1.base)], socket_timeout=5)
    aclient = AsyncClusterClient([("127.0.0.1", c3x1.base)], socket_timeout=5)
    try:
        sync.put(key, b"before")
        assert sync.node_for_key(key) == (old["host"], old["port"])
        epoch = sync.slot_map_epoch
        assert asyncio.run(aclient.get(key)) == b"before"
        r = subprocess.run(CLI + ["failover", "--dir", c3x1.dir, "--shard", str(old["shard"])],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: c3x1.primary_of(slot)["id"] != old["id"], 30, 0.1, "handover")
        new = c3x1.primary_of(slot)
        # the caches still name the old primary, now a replica: it answers MOVED
        assert sync.node_for_key(key) == (old["host"], old["port"])
        assert sync.put(key, b"after") > 0
        assert sync.node_for_key(key) == (new["host"], new["port"])
        assert sync.slot_map_epoch > epoch
        assert asyncio.run(aclient.get(key)) == b"after"
        assert aclient.node_for_key(key) == (new["host"], new["port"])
    finally:
        sync.close()
        asyncio.run(aclient.aclose())


@needs_etcd
@needs_engine
def test_kill9_of_a_primary_mid_load(tmp_path):
    """3 shards x 2 replicas, --min-replica-acks 1: a writer per shard under
    load, one primary killed: writes to its slots resume, the other shards
    never stop, and every acknowledged write is there afterwards."""
    pytest.importorskip("redis")
    from test_cluster_server import Cluster
    c = Cluster(tmp_path / "k9", 3, 2, "--min-replica-acks", "1")
    stop = threading.Event()
    try:
        doc = c.wait_placed()
        prim = list(_primaries(doc).values())
        victim = prim[0]
        keys_of = {n["id"]: [k for k in (b"load:%d" % i for i in range(4000))
                             if any(lo <= key_slot(k) <= hi for lo, hi in n["slots"])][:40]
                   for n in prim}
        acked = {n["id"]: [] for n in prim}     # (key, value, time)
        failed = {n["id"]: [] for n in prim}
        client = ClusterClient([("127.0.0.1", c.base + 5)], socket_timeout=5,
                               cluster_retry_timeout=15)

        def writer(nid):
            i = 0
            ks = keys_of[nid]
            while not stop.is_set():
                i += 1
                k, v = ks[i % len(ks)], b"%s:%d" % (nid[:6].encode(), i)
                try:
                    client.put(k, v)
                    acked[nid].append((k, v, time.monotonic()))
                except errors.Error as e:   # may or may not be applied: not counted
                    failed[nid].append((k, v, time.monotonic(), repr(e)))

        threads = [threading.Thread(target=writer, args=(n["id"],)) for n in prim]
        for t in threads:
            t.start()
        wait_for(lambda: all(len(a) > 50 for a in acked.values()), 30, 0.05, "load")
        os.kill(victim["pid"], signal.SIGKILL)
        t_kill = time.monotonic()
        wait_for(lambda: sum(1 for a in acked[victim["id"]] if a[2] > t_kill) > 50, 30, 0.05,
                 "writes to the killed primary's slots to resume")
        resumed = next(a[2] for a in acked[victim["id"]] if a[2] > t_kill) - t_kill
        stop.set()
        for t in threads:
            t.join(30)
        print(f"\nwrites to the killed primary's slots resumed after {resumed:.2f} s; "
              f"failed calls: { {k[:6]: len(v) for k, v in failed.items()} }")
        for n in prim[1:]:
            assert not failed[n["id"]], failed[n["id"]][:3]       # other shards never stopped
        # errors on the victim's keys are connection losses of writes in flight
        # (never resent) or their CLUSTERDOWN "may or may not": never anything else
        for *_, msg in failed[victim["id"]]:
            assert "ConnectionError" in msg or "CLUSTERDOWN" in msg or "Timeout" in msg, msg
        last = {}
        for nid in acked:
            for k, v, t in acked[nid]:
                last[k] = (v, t)
        maybe = {}
        for nid in failed:
            for k, v, t, _ in failed[nid]:
                maybe.setdefault(k, []).append((v, t))
        got = client.mget(list(last))
        lost = []
        for (k, (v, t)), g in zip(last.items(), got):
            # the last acked value, or a later write whose outcome was unknown
            if g != v and g not in [mv for mv, mt in maybe.get(k, []) if mt > t]:
                lost.append((k, v, g))
        assert not lost, f"acknowledged writes missing: {lost[:5]}"
        assert c.primary_of(victim["slots"][0][0])["id"] != victim["id"]
        client.close()
    except BaseException:
        stop.set()
        print(c.logs())
        raise
    finally:
        stop.set()
        c.down()


@pytest.mark.slow
@needs_etcd
@needs_engine
def test_history_through_cluster_client_with_etcd_restart_and_cuts(tmp_path):
    """Jepsen-style, bounded (~25 s): writers with unique values and readers
    through ClusterClient on a 1 x 2 cluster (--min-replica-acks 1), while
    etcd is killed and restarted, every client connection is cut (CLIENT
    KILL), the replication links are cut (KV.REPL DROP), and a primary is
    killed. Afterwards: every acknowledged write is present or superseded by
    a later attempted write of the same key, no read returned a value nobody
    wrote, and writes succeeded after every fault."""
    redis = pytest.importorskip("redis")
    from etcdutil import EtcdProc
    from test_cluster_server import Cluster
    e = EtcdProc.start_new()
    c = None
    stop = threading.Event()
    keys = [b"hc:%d" % i for i in range(4)]
    attempts = {k: [] for k in keys}    # per key, in order: [value, "ok"|"err", time]
    reads = []
    marks = {}
    try:
        c = Cluster(tmp_path / "hc", 1, 2, "--min-replica-acks", "1", "--etcd", e.url)
        doc = c.wait_placed()
        nodes = [("127.0.0.1", n["port"]) for n in doc["nodes"]]
        client = ClusterClient(nodes, socket_timeout=3, cluster_retry_timeout=15,
                               retry_backoff=0.02)

        def writer(k):
            i = 0
            while not stop.is_set():
                i += 1
                rec = [b"%s=%d" % (k, i), "err", None]
                attempts[k].append(rec)
                try:
                    client.put(k, rec[0])
                    rec[1] = "ok"
                except errors.Error:
                    time.sleep(0.02)         # indeterminate: may or may not be applied
                rec[2] = time.monotonic()

        def reader():
            while not stop.is_set():
                try:
                    reads.extend(zip(keys, client.mget(keys)))
                except errors.Error:
                    time.sleep(0.02)

        threads = [threading.Thread(target=writer, args=(k,)) for k in keys] + \
                  [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()

        def acked_since(t0, n=20):
            return sum(1 for k in keys for a in attempts[k] if a[1] == "ok" and a[2] > t0) >= n

        time.sleep(1.0)
        marks["etcd"] = time.monotonic()
        e.kill()
        time.sleep(2.0)                      # past the fence deadline (TTL/2), below the TTL
        e.start()
        wait_for(lambda: acked_since(marks["etcd"]), 30, 0.05, "writes after etcd restart")
        marks["cut"] = time.monotonic()
        for n in c.status()["nodes"]:
            r = redis.Redis(port=n["port"], socket_timeout=5)
            r.execute_command("CLIENT", "KILL", "TYPE", "normal")
            r.execute_command("KV.REPL", "DROP")
            r.close()
        wait_for(lambda: acked_since(marks["cut"]), 30, 0.05, "writes after the cuts")
        victim = c.primary_of(0)
        marks["kill"] = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        wait_for(lambda: acked_since(marks["kill"]), 30, 0.05, "writes after kill -9")
        stop.set()
        for t in threads:
            t.join(30)
        final = dict(zip(keys, client.mget(keys)))
        client.close()
        n_ok = check_history(attempts, reads, final)
        assert n_ok > 100 and len(reads) > 100, (n_ok, len(reads))
    except BaseException:
        stop.set()
        if c is not None:
            print(c.logs())
        raise
    finally:
        stop.set()
        if c is not None:
            c.down()
        e.stop()
        e.cleanup()
