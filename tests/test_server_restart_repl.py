"""A crash restart keeps the replication stream (server/repl_persist.py).

A supervised primary (``--supervise``) is killed (``kill -9``, or a crash
point that aborts it) with a replica attached. The next worker adopts the
arena and the replication position kept in it: the same replication id and
offset, so the replica continues with a partial sync (the primary's
``sync_partial_ok``, the replica's ``kv_partial_syncs``; no second full
sync), and both end with the same ``KV.DIGEST``. The crash points fall
between a write reaching the Store and its entry reaching the stream
(``write:propagate``) and inside the engine's delete (``delete:ahead``,
``delete:drop``): what the replica never got is sent again, so nothing
diverges. A command whose keys do not fit the intent list falls back to a
new replication id (a full sync), and still ends equal.
"""

import os
import random
import signal
import threading
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from replutil import BASE, digest, info, log_events, rc, start_replica, wait_link_up, wait_synced
from serverutil import start_server, store_available, wait_for

pytestmark = pytest.mark.skipif(not store_available(), reason="the C engine is not built")


def _supervised(tmp_path=None, crash_at=None):
    """A supervised primary; with ``crash_at`` the point is set but not
    armed (its marker file exists) until :func:`_arm`."""
    env = dict(os.environ)
    env.pop("KVSTORE_CRASH_AT", None)
    if crash_at:
        (tmp_path / "crashed").touch()
        env["KVSTORE_CRASH_AT"] = crash_at
        env["KVSTORE_CRASH_ONCE"] = str(tmp_path / "crashed")
    return start_server(*BASE, "--kernel-policy", "keep_ue", "--supervise", env=env)


def _once(srv):
    """A client that never sends a command twice (no retry after the
    connection dropped: the command under test must not run again)."""
    return rc(srv, retry=Retry(NoBackoff(), 0))


def _arm(tmp_path):
    """The next time the worker passes its crash point, it aborts (once)."""
    (tmp_path / "crashed").unlink()


def _worker(p):
    return rc(p).info("server")["process_id"]


def _new_worker(p, old, timeout=60):
    def ok():
        try:
            pid = rc(p).info("server")["process_id"]
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return None
        return pid if pid != old else None
    return wait_for(ok, timeout, 0.02, "a new worker serving")


def _fill(r, n=400):
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.set(f"k{i}", f"v{i}-" * (1 + i % 20))
        if i % 10 == 0:
            pipe.pexpire(f"k{i}", 600_000)
    pipe.execute()


def _check_partial(p, rep, worker_before):
    """The replica resumed with a partial sync from the new worker."""
    wait_synced(p, rep)
    pi, ri = info(p), info(rep)
    assert pi["sync_partial_ok"] >= 1 and pi["sync_full"] == 0, pi
    assert ri["kv_full_syncs"] == 1, ri                  # only the first sync was full
    assert ri["kv_partial_syncs"] >= 1, ri
    assert log_events(p, "repl_resumed"), p.log_tail()
    assert _worker(p) != worker_before
    assert digest(p) == digest(rep)


class WriteLoad:
    """SET / DEL / PEXPIRE / MSET / INCR on a small key space, reconnecting
    after the worker dies."""

    def __init__(self, srv):
        self.srv = srv
        self.n = 0
        self.errors = 0
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        rnd = random.Random(7)
        r = rc(self.srv)
        while not self.stop.is_set():
            k = f"w{rnd.randrange(200)}"
            op = rnd.randrange(10)
            try:
                if op < 4:
                    r.set(k, f"{self.n}-".encode() * (1 + self.n % 9))
                elif op < 6:
                    r.delete(k, f"w{rnd.randrange(200)}")
                elif op < 7:
                    r.pexpire(k, rnd.choice((50, 600_000)))
                elif op < 8:
                    r.mset({f"w{rnd.randrange(200)}": str(self.n) for _ in range(3)})
                elif op < 9:
                    r.incr(f"c{rnd.randrange(20)}")
                else:
                    r.persist(k)
                self.n += 1
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                self.errors += 1
                time.sleep(0.01)
                r = rc(self.srv)
            except redis.ResponseError:
                pass              # INCR of a non-number, LOST: not what this test checks

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join(30)


def test_kill9_under_write_load_replica_partial_syncs():
    p = _supervised()
    rep = start_replica(p)
    try:
        wait_link_up(rep)
        _fill(rc(p))
        wait_synced(p, rep)
        worker = _worker(p)
        with WriteLoad(p) as load:
            time.sleep(0.6)
            n0 = load.n
            os.kill(worker, signal.SIGKILL)
            _new_worker(p, worker)
            time.sleep(0.6)
        assert n0 > 50 and load.n > n0, (n0, load.n)     # writes before and after the crash
        _check_partial(p, rep, worker)
        r = rc(p)
        r.set("after", "crash")
        wait_for(lambda: rc(rep).get("after") == b"crash", 20, what="replica gets new writes")
    finally:
        rep.stop()
        p.stop()


# Each command runs on a primary that aborts at `point` (once); `check`
# then looks at the replica once it resumed.
CASES = {
    "set": ("write:propagate", lambda r: r.set("k1", "NEW"),
            lambda r: r.get("k1") == b"NEW"),
    "mset": ("write:propagate", lambda r: r.mset({"k1": "A", "k2": "B", "fresh": "C"}),
             lambda r: r.mget("k1", "k2", "fresh") == [b"A", b"B", b"C"]),
    "del": ("write:propagate", lambda r: r.delete("k1", "k2"),
            lambda r: r.exists("k1", "k2") == 0),
    "expire": ("write:propagate", lambda r: r.pexpire("k3", 900_000),
               lambda r: 600_000 < r.pttl("k3") <= 900_000),
    "persist": ("write:propagate", lambda r: r.persist("k10"),
                lambda r: r.pttl("k10") == -1),
    "flushall": ("write:propagate", lambda r: r.flushall(),
                 lambda r: r.dbsize() == 0),
    "exec": ("write:propagate",
             lambda r: r.pipeline(transaction=True).set("k1", "T").delete("k2").pexpire("k3", 800_000)
             .execute(),
             lambda r: r.get("k1") == b"T" and not r.exists("k2") and 600_000 < r.pttl("k3") <= 800_000),
    "engine-del-ahead": ("delete:ahead", lambda r: r.delete("k5"), None),
    "engine-del-drop": ("delete:drop", lambda r: r.delete("k5"), lambda r: not r.exists("k5")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_crash_between_store_and_stream_does_not_diverge(tmp_path, case):
    point, cmd, check = CASES[case]
    p = _supervised(tmp_path, point)
    rep = start_replica(p)
    try:
        wait_link_up(rep)
        r = rc(p)
        _fill(r)
        wait_synced(p, rep)
        worker = _worker(p)
        _arm(tmp_path)
        with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
            cmd(_once(p))
        _new_worker(p, worker)
        assert (tmp_path / "crashed").exists()
        assert f"KVSTORE_CRASH_AT={point}" in p.logs()
        _check_partial(p, rep, worker)
        if check is not None:
            assert check(rc(p)), case
            assert check(rc(rep)), case
        # the history goes on: a later write reaches the replica
        rc(p).set("after", case)
        wait_for(lambda: rc(rep).get("after") == case.encode(), 20, what="replica gets new writes")
        assert digest(p) == digest(rep)
    finally:
        rep.stop()
        p.stop()


def test_intent_overflow_falls_back_to_a_full_sync(tmp_path):
    """A DEL of more keys than the intent list holds, cut short before its
    entries are sent: the next worker takes a new replication id, the
    replica does a full sync and ends equal."""
    p = _supervised(tmp_path, "write:propagate")
    rep = start_replica(p)
    try:
        wait_link_up(rep)
        r = rc(p)
        _fill(r)
        wait_synced(p, rep)
        worker = _worker(p)
        old_replid = info(p)["master_replid"]
        _arm(tmp_path)
        with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
            _once(p).delete(*[f"k{i}" for i in range(300)])
        _new_worker(p, worker)
        wait_synced(p, rep)
        pi = info(p)
        assert pi["master_replid"] != old_replid
        assert pi["sync_full"] == 1 and pi["sync_partial_ok"] == 0, pi
        assert any("intent" in line for line in log_events(p, "repl_not_resumed"))
        assert digest(p) == digest(rep)
        assert rc(rep).exists(*[f"k{i}" for i in range(300)]) == rc(p).exists(*[f"k{i}" for i in range(300)])
    finally:
        rep.stop()
        p.stop()


@pytest.mark.parametrize("size,mode", [(40, "partial"), (5000, "full")])
def test_chunk_kept_but_not_sent_resumes_from_the_tail(tmp_path, size, mode):
    """The primary dies after a chunk's position was kept and before its
    bytes were sent (``stream:send``): the replica reconnects at the offset
    before it. A short chunk was kept in the arena (the tail), so that
    offset still gets a partial sync; a chunk longer than the tail gets a
    full sync. Either way the replica ends equal, with the write."""
    p = _supervised(tmp_path, "stream:send")
    rep = start_replica(p)
    try:
        wait_link_up(rep)
        worker = _worker(p)
        _fill(rc(p))
        wait_synced(p, rep)
        before = info(rep)["slave_repl_offset"]
        _arm(tmp_path)
        value = b"x" * size
        try:
            _once(p).set("k1", value)
        except (redis.ConnectionError, redis.TimeoutError):
            pass                   # the reply may or may not have left
        _new_worker(p, worker)
        assert "KVSTORE_CRASH_AT=stream:send" in p.logs()
        wait_synced(p, rep)
        syncs = log_events(p, "replica_sync")
        assert syncs and f"mode={mode}" in syncs[-1] and f"requested={before}" in syncs[-1], syncs[-1:]
        if mode == "partial":
            _check_partial(p, rep, worker)
        assert rc(rep).get("k1") == value == rc(p).get("k1")
        assert digest(p) == digest(rep)
    finally:
        rep.stop()
        p.stop()
