"""Replication between real kvstore-server processes on 127.0.0.1.

Convergence of two replicas over 100k keys, full and partial resync, kill -9
and restart, network cuts (dropped sockets, SIGSTOP/SIGCONT), read-only
replicas, WAIT / --min-replica-acks, and promotion with REPLICAOF NO ONE.
"""

import os
import signal
import threading
import time

import pytest
import redis

from replutil import (
    client, digest, info, log_events, rc, start, start_replica, wait_for, wait_link_up,
    wait_synced,
)
from serverutil import store_available

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not store_available(), reason="kvstore.Store is not built")]


class Writer(threading.Thread):
    """Writes w:<n> keys until stopped; remembers what was acknowledged."""

    def __init__(self, srv, prefix=b"w", batch=50, **kw):
        super().__init__(daemon=True)
        self.c = client(srv, **kw)
        self.prefix = prefix
        self.batch = batch
        self.stop_ev = threading.Event()
        self.acked = {}
        self.errors = []
        self.n = 0

    def run(self):
        while not self.stop_ev.is_set():
            pairs = {self.prefix + b":%d" % (self.n + i): b"value-%d" % (self.n + i) * 4
                     for i in range(self.batch)}
            try:
                self.c.mput(pairs)
            except Exception as e:  # noqa: BLE001 - recorded for the test
                self.errors.append(e)
                time.sleep(0.01)
                continue
            self.acked.update(pairs)
            self.n += self.batch

    def stop(self):
        self.stop_ev.set()
        self.join(10)
        self.c.close()


@pytest.mark.slow
def test_two_replicas_converge_over_100k_keys():
    p = start()
    r1 = start_replica(p)          # synced before the load: gets it from the stream
    try:
        wait_link_up(r1)
        c = client(p)
        for base in range(0, 100_000, 2000):
            c.mput({b"key:%06d" % i: (b"%06d" % i) * (1 + i % 7) for i in range(base, base + 2000)})
        c.delete(b"key:000007")
        c.put(b"ttl-key", b"x", ttl=300)
        c.expire(b"key:000008", 500)
        c.persist(b"key:000008")
        r2 = start_replica(p)      # joins after the load: full sync from a snapshot
        try:
            wait_synced(p, r1)
            wait_synced(p, r2)
            keys, lost, dig = digest(p)
            assert keys == 100_000 and lost == 0
            assert digest(r1) == digest(r2) == (keys, lost, dig)
            rr = client(r2)
            assert rr.get(b"key:000123") == b"000123" * (1 + 123 % 7)
            assert rr.get(b"key:000007") is None
            assert 250 < rr.ttl(b"ttl-key") <= 300
            assert rr.ttl(b"key:000008") == -1
            assert rr.getv(b"key:099999") == c.getv(b"key:099999")
            pi = info(p)
            assert pi["connected_slaves"] == 2
            assert pi["sync_full"] == 2
            assert all(pi[f"slave{i}"]["state"] == "online" for i in (0, 1))
            assert all(pi[f"slave{i}"]["lag_bytes"] == 0 for i in (0, 1))
            st = client(p).stats()
            assert len(st["repl_replicas"]) == 2
            # replicas refuse writes, both protocols, and serve reads
            with pytest.raises(redis.exceptions.ReadOnlyError):
                rc(r2).set("a", "b")
            with pytest.raises(Exception) as ei:
                rr.put(b"a", b"b")
            assert "READONLY" in str(ei.value) or type(ei.value).__name__ == "ReadOnlyError"
            with pytest.raises(redis.exceptions.ReadOnlyError):
                rc(r1).delete("key:000001")
            assert rc(r1).get("key:000001") == b"000001" * 2
        finally:
            r2.stop()
    finally:
        r1.stop()
        p.stop()


@pytest.mark.slow
def test_link_cut_resumes_with_partial_sync():
    p = start()
    r = start_replica(p)
    try:
        wait_link_up(r)
        w = Writer(p)
        w.start()
        try:
            wait_for(lambda: w.n > 2000, 20, what="writes")
            def resynced(n):
                wait_for(lambda: info(r)["kv_partial_syncs"] >= n, 30, what=f"partial sync {n}")
                wait_link_up(r)

            n = info(r)["kv_partial_syncs"]
            for _ in range(3):
                assert rc(p).execute_command("KV.REPL", "DROP") == 1      # primary closes
                n += 1
                resynced(n)
                assert rc(r).execute_command("KV.REPL", "DROP") == 1      # replica closes
                n += 1
                resynced(n)
            # SIGSTOP / SIGCONT: the link survives a stopped replica (shorter
            # than --repl-timeout) and catches up
            os.kill(r.pid, signal.SIGSTOP)
            time.sleep(1.5)
            os.kill(r.pid, signal.SIGCONT)
        finally:
            w.stop()
        assert not w.errors
        wait_synced(p, r)
        ri = info(r)
        assert ri["kv_partial_syncs"] >= 2, ri
        assert ri["kv_full_syncs"] == 1, ri            # only the first one
        assert info(p)["sync_partial_ok"] >= 2
        assert log_events(p, "replica_sync")[-1].count("mode=partial") == 1
    finally:
        r.stop()
        p.stop()


@pytest.mark.slow
def test_full_resync_when_backlog_does_not_cover():
    p = start("--repl-backlog-size", "64KiB")
    r = start_replica(p)
    try:
        wait_link_up(r)
        c = client(p)
        c.mput({b"a:%d" % i: b"x" * 100 for i in range(1000)})
        wait_synced(p, r)
        os.kill(r.pid, signal.SIGSTOP)
        try:
            assert rc(p).execute_command("KV.REPL", "DROP") == 1
            # far more than the 64 KiB backlog while the replica is away
            for base in range(0, 20_000, 1000):
                c.mput({b"b:%d" % i: b"y" * 100 for i in range(base, base + 1000)})
        finally:
            os.kill(r.pid, signal.SIGCONT)
        wait_synced(p, r)
        ri = info(r)
        assert ri["kv_full_syncs"] == 2 and ri["kv_last_sync"] == "full", ri
        assert info(p)["sync_partial_err"] >= 1
        assert digest(r)[0] == 21_000
    finally:
        r.stop()
        p.stop()


@pytest.mark.slow
def test_kill9_replica_under_load_and_restart():
    """A replica killed with SIGKILL lost its memory: it comes back with a
    full sync (there is nothing to resume from) and converges."""
    p = start()
    r = start_replica(p)
    w = Writer(p)
    try:
        wait_link_up(r)
        w.start()
        wait_for(lambda: w.n > 3000, 20, what="writes")
        r.proc.kill()
        r.proc.wait(5)
        wait_for(lambda: info(p)["connected_slaves"] == 0, 10, what="primary notices")
        n = w.n
        wait_for(lambda: w.n > n + 500, 20, what="writes while no replica is connected")
        r.stop()
        r = start_replica(p)
        wait_link_up(r)
        n = w.n
        wait_for(lambda: w.n > n + 500, 20, what="writes after the new replica synced")
        w.stop()
        assert not w.errors
        wait_synced(p, r)
        ri = info(r)
        assert ri["kv_last_sync"] == "full"
        assert digest(r)[0] == len(w.acked)
    finally:
        w.stop()
        r.stop()
        p.stop()


@pytest.mark.slow
def test_wait_and_min_replica_acks():
    p = start("--min-replica-acks", "1", "--min-replica-timeout", "0.5")
    try:
        # no replica: writes are refused before they are applied
        with pytest.raises(redis.exceptions.ResponseError, match="NOREPLICAS"):
            rc(p).set("k", "v")
        with pytest.raises(Exception, match="NOREPLICAS"):
            client(p, retries=0).put(b"k", b"v")
        assert rc(p).get("k") is None
        r = start_replica(p)
        try:
            wait_link_up(r)
            wait_for(lambda: info(p)["connected_slaves"] == 1 and
                     info(p)["slave0"]["state"] == "online", 10, what="online")
            assert rc(p).set("k", "v") is True
            # acknowledged => already applied on the replica
            assert rc(r).get("k") == b"v"
            c = client(p)
            c.put(b"k2", b"v2")
            assert client(r).get(b"k2") == b"v2"
            assert rc(p).execute_command("WAIT", 1, 1000) == 1
            assert rc(p).execute_command("WAIT", 2, 200) == 1        # times out with 1
            # a stopped replica cannot ack: the write's reply is NOREPLICAS
            os.kill(r.pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                with pytest.raises(redis.exceptions.ResponseError, match="NOREPLICAS"):
                    rc(p).set("k3", "v3")
                assert 0.4 < time.monotonic() - t0 < 5
                # a pipeline: the read in the batch still answers normally
                pipe = rc(p).pipeline(transaction=False)
                pipe.get("k")
                pipe.set("k4", "v4")
                res = pipe.execute(raise_on_error=False)
                assert res[0] == b"v"
                assert isinstance(res[1], redis.exceptions.ResponseError)
            finally:
                os.kill(r.pid, signal.SIGCONT)
            wait_synced(p, r)
            assert rc(p).execute_command("INFO", "replication").get("noreplicas_replies") >= 2
        finally:
            r.stop()
    finally:
        p.stop()


@pytest.mark.slow
def test_no_acknowledged_write_lost_on_promotion():
    p = start("--min-replica-acks", "1", "--min-replica-timeout", "2")
    r = start_replica(p)
    r2 = None
    try:
        wait_link_up(r)
        wait_for(lambda: info(p).get("slave0", {}).get("state") == "online", 10, what="online")
        w = Writer(p, batch=20, retries=0)
        w.start()
        wait_for(lambda: w.n > 3000, 30, what="writes")
        p.proc.kill()                    # the primary dies mid-load
        p.proc.wait(5)
        w.stop()
        assert len(w.acked) > 3000
        assert rc(r).execute_command("REPLICAOF", "NO", "ONE") == b"OK"
        assert info(r)["role"] == "master"
        cr = client(r)
        missing = [k for k in w.acked if cr.get(k) != w.acked[k]]
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:3]}"
        # the promoted node keeps numbering above everything it holds
        top = max(cr.getv(k)[0] for k in list(w.acked)[-50:])
        assert cr.put(b"after", b"promotion") > top
        # the old primary comes back as a replica of the new one (by command)
        r2 = start()
        assert rc(r2).execute_command("REPLICAOF", "127.0.0.1", r.port) == b"OK"
        wait_synced(r, r2)
        assert client(r2).get(b"after") == b"promotion"
        assert rc(r2).execute_command("SLAVEOF", "NO", "ONE") in (True, b"OK")
        assert client(r2).put(b"mine", b"1") > 0
    finally:
        for s in (r2, r, p):
            if s is not None:
                s.stop()


@pytest.mark.slow
def test_peers_authenticate_with_the_client_password():
    pw = "s3cret-pw"
    p = start("--requirepass", pw)
    r = start_replica(p, "--requirepass", pw)      # --masterauth defaults to --requirepass
    bad = start_replica(p, "--requirepass", "other")
    try:
        rp = rc(p, password=pw)
        rr = rc(r, password=pw)
        rb = rc(bad, password="other")
        wait_for(lambda: rr.info("replication")["master_link_status"] == "up", 20, what="link up")
        cp = client(p, password=pw)
        v = cp.put(b"k", b"v")
        wait_for(lambda: rr.get("k") == b"v", 10, what="replicated")
        assert rr.execute_command("KV.DIGEST") == rp.execute_command("KV.DIGEST")
        # the replica with the wrong password never gets in
        wait_for(lambda: rb.info("replication").get("kv_reconnects", 0) >= 2, 10,
                 what="the replica with the wrong password to retry")
        assert rb.info("replication")["master_link_status"] == "down"
        assert rb.get("k") is None
        assert rp.info("replication")["connected_slaves"] == 1
        # native wait: the write above is acknowledged by one replica
        from kvstore.client._commands import Command
        assert cp._execute_command(Command("wait", [1, 2.0], None, True)) == 1
        # a lost key on the primary is rebuilt from the replica over an authenticated fetch
        cp.inject("ao", key=b"k")
        assert cp.getv(b"k") == (v, b"v")
        assert cp.stats()["repl_peer_keys_fetched"] >= 1
    finally:
        bad.stop()
        r.stop()
        p.stop()


def test_expiry_changes_replicate_at_the_primarys_version():
    """EXPIRE, PEXPIRE, PERSIST, GETEX and SET with an expiry each take a
    version on the primary; the replica applies them at the same version
    (so its copy of the key is exactly the primary's, and a rebuild from
    either can never put an older expiry back)."""
    p = start()
    r = start_replica(p)
    try:
        wait_link_up(r)
        pr = rc(p)
        pc, rcl = client(p), client(r)
        pr.set("a", "1")
        pr.set("b", "2")
        pr.set("c", "3", px=600_000)
        set_versions = {k: pc.getv(k)[0] for k in (b"a", b"b", b"c")}
        assert pr.expire("a", 500) is True
        assert pr.pexpire("b", 700_000) is True
        assert pr.persist("c") is True
        assert pr.persist("c") is False                 # nothing to remove: no version
        pr.getex("b", ex=900)
        pr.set("d", "4", ex=300)
        pr.set("d", "5", keepttl=True)
        try:
            before = {k: pc.getv(k)[0] for k in (b"a", b"b", b"c", b"d")}
            for k, v in set_versions.items():
                assert before[k] > v, k                 # the expiry change took a version
            wait_synced(p, r)                           # digests (key, version, value) agree
            for k, v in before.items():
                assert rcl.getv(k)[0] == v, k
            rr = rc(r)
            for k in ("a", "b", "c", "d"):
                assert abs(rr.pttl(k) - pr.pttl(k)) < 5_000, k
            assert rr.pttl("c") == -1
        finally:
            pc.close()
            rcl.close()
    finally:
        r.stop()
        p.stop()
