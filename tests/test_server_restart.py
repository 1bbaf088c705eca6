"""Restart without losing the memory, with real servers (server/restart.py,
server/supervise.py, server/sdnotify.py).

* KV.RESTART under a client load with TTLs, large values and lost keys in
  flight: no wrong answer, every key back, TTLs still counting down, a new
  run_id, and the replica continues with a partial sync.
* SIGUSR2 does the same; KV.RESTART is refused to a user without @admin.
* kill -9 of a supervised worker in the middle of a write load: every
  acknowledged write is there (or LOST and rebuilt from the replica), no
  wrong bytes, the worker serves again.
* The sd_notify exchange against a listener written here from the
  documented protocol (FDSTORE=1, FDNAME=, SCM_RIGHTS; then LISTEN_FDS,
  LISTEN_FDNAMES, LISTEN_PID for the next process).
"""

import array
import os
import signal
import socket
import tempfile
import threading
import time

import pytest
import redis

from replutil import BASE, log_events, rc, start, start_replica, wait_link_up, wait_synced
from serverutil import start_server, store_available, wait_for

pytestmark = pytest.mark.skipif(not store_available(), reason="the C engine is not built")


def _serving(srv, old_run_id=None, timeout=30):
    def ok():
        try:
            info = rc(srv).info("server")
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return None
        return info if info["run_id"] != old_run_id else None
    return wait_for(ok, timeout, 0.01, "the server serving again")


class Connector:
    """Opens new TCP connections in a loop: counts the refused ones (the
    listening socket must stay open across a restart)."""

    def __init__(self, srv):
        self.srv = srv
        self.ok = self.refused = 0
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.srv.port), timeout=5):
                    self.ok += 1
            except ConnectionRefusedError:
                self.refused += 1
            except OSError:
                pass
            time.sleep(0.002)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join(30)


class Load:
    """A client writing and reading its own keys; remembers acknowledged
    values and every answer that was wrong."""

    def __init__(self, srv, prefix):
        self.srv, self.prefix = srv, prefix
        self.acked = {}          # key -> last acknowledged value
        self.maybe = {}          # key -> value whose write got no reply
        self.wrong = []
        self.errors = 0
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        i = 0
        r = redis.Redis(host="127.0.0.1", port=self.srv.port, socket_timeout=5)
        while not self.stop.is_set():
            k = f"{self.prefix}:{i % 300}".encode()
            v = f"{i}-".encode() * (1 + i % 7)
            try:
                got = r.get(k)
                if k in self.acked and got != self.acked[k] and got != self.maybe.get(k):
                    self.wrong.append((k, got, self.acked[k]))
                self.maybe[k] = v
                r.set(k, v)
                self.acked[k] = v
                self.maybe.pop(k, None)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                self.errors += 1
                time.sleep(0.01)
                r = redis.Redis(host="127.0.0.1", port=self.srv.port, socket_timeout=5)
            except redis.ResponseError as e:
                if "LOST" not in str(e).upper():
                    self.wrong.append((k, str(e), None))
            i += 1

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join(30)


def test_kv_restart_under_load_keeps_everything_and_replica_partial_syncs():
    p = start()
    rep = start_replica(p)
    try:
        r = rc(p)
        wait_link_up(rep)
        want = {}
        for i in range(2000):
            k, v = f"k{i}".encode(), f"value-{i}-".encode() * (1 + i % 30)
            want[k] = v
        r.mset(want)
        big = os.urandom(1 << 20)
        r.set("big", big)
        want[b"big"] = big
        for i in range(100):
            r.pexpire(f"k{i}", 600_000)
        wait_synced(p, rep)
        before = r.info("server")
        ttl_before = r.pttl("k1")
        with Load(p, "load") as load, Connector(p) as conns:
            time.sleep(0.3)
            # keys lost just before the hand-over: rebuilt from the replica after it
            for i in (500, 900):
                r.execute_command("KV.INJECT", "ao", "KEY", f"k{i}")
            assert r.execute_command("KV.RESTART") == b"OK"
            info = _serving(p, before["run_id"])
            time.sleep(0.5)
        assert not load.wrong, load.wrong[:5]
        assert len(load.acked) > 10
        assert conns.refused == 0 and conns.ok > 10
        assert info["process_id"] == before["process_id"]          # same process, re-executed
        assert info["uptime_in_seconds"] <= before["uptime_in_seconds"] + 1
        r = rc(p)
        for k, v in want.items():
            assert r.get(k) == v, k
        for k, v in load.acked.items():
            assert r.get(k) in (v, load.maybe.get(k))
        t = r.pttl("k1")
        assert 0 < t <= ttl_before
        time.sleep(0.05)
        assert r.pttl("k1") < t                                     # still counting down
        assert r.ttl("k1000") == -1
        done = log_events(p, "restart_done")
        assert done and "seconds=" in done[-1]
        # the replica continued from its offset: a partial sync after the restart
        wait_synced(p, rep)
        syncs = log_events(p, "replica_sync")
        assert syncs and "mode=partial" in syncs[-1], syncs
        assert rc(rep).get("k5") == want[b"k5"]
        r.set("after-restart", "yes")
        wait_for(lambda: rc(rep).get("after-restart") == b"yes", 20, what="replica gets new writes")
    finally:
        rep.stop()
        p.stop()


def test_sigusr2_restarts_and_acl_guards_kv_restart(tmp_path):
    acl = tmp_path / "users.acl"
    acl.write_text("user default on >s3cret ~* +@all\nuser app on >pw ~* +@all -@admin\n")
    srv = start_server(*BASE, "--aclfile", str(acl))
    try:
        r = rc(srv, password="s3cret")
        r.set("a", "1")
        app = rc(srv, username="app", password="pw")
        with pytest.raises(redis.ResponseError, match="no permissions to run the .kv.restart"):
            app.execute_command("KV.RESTART")
        with pytest.raises(redis.AuthenticationError):
            rc(srv).execute_command("KV.RESTART")
        old = r.info("server")["run_id"]
        os.kill(srv.pid, signal.SIGUSR2)

        def ok():
            try:
                return rc(srv, password="s3cret").info("server")["run_id"] != old
            except (redis.ConnectionError, OSError):
                return False
        wait_for(ok, 30, 0.02, "restart by SIGUSR2")
        assert rc(srv, password="s3cret").get("a") == b"1"
        assert srv.alive()
    finally:
        srv.stop()


def test_supervised_worker_killed_mid_write_load():
    p = start("--supervise")
    rep = start_replica(p)
    try:
        wait_link_up(rep)
        r = rc(p)
        worker = r.info("server")["process_id"]
        assert worker != p.pid                       # the parent is not the worker
        with Load(p, "w") as load, Connector(p) as conns:
            time.sleep(0.5)
            os.kill(worker, signal.SIGKILL)
            info = _serving(p, None)
            wait_for(lambda: rc(p).info("server")["process_id"] != worker, 30, what="a new worker")
            time.sleep(0.5)
        assert not load.wrong, load.wrong[:5]
        assert conns.refused == 0 and conns.ok > 10      # the parent keeps the socket listening
        r = rc(p)
        for k, v in load.acked.items():
            try:
                got = r.get(k)
            except redis.ResponseError as e:         # LOST: read-repaired from the replica, else an error
                assert "LOST" in str(e).upper()
                continue
            assert got in (v, load.maybe.get(k)), (k, got, v)
        assert info
        assert log_events(p, "supervise_worker_died")
        assert log_events(p, "arena_adopted")
        r.set("again", "1")
        assert r.get("again") == b"1"
    finally:
        rep.stop()
        p.stop()
    assert not p.alive()


def test_sd_notify_fd_store_exchange():
    """A listener written from sd_notify(3) / sd_listen_fds(3): the server
    stores its arena and listening socket; a new server handed them back with
    LISTEN_FDS adopts the arena."""
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "notify")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    lsock.bind(path)
    lsock.settimeout(30)
    stored = {}
    srv = start_server(*BASE, env=dict(os.environ, NOTIFY_SOCKET=path))
    try:
        rc(srv).mset({f"s{i}": f"v{i}" for i in range(500)})
        got_ready = False
        while not (got_ready and "arena" in stored and "listen" in stored):
            msg, anc, _f, _a = lsock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
            fds = array.array("i")
            for level, kind, data in anc:
                assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
                fds.frombytes(data[:len(data) - len(data) % 4])
            var = dict(line.split("=", 1) for line in msg.decode().splitlines())
            if var.get("FDSTORE") == "1":
                stored[var["FDNAME"]] = list(fds)
            got_ready = got_ready or var.get("READY") == "1"
        assert len(stored["arena"]) == 1
        assert "memfd:kvstore-arena" in os.readlink(f"/proc/self/fd/{stored['arena'][0]}")
        lst = socket.socket(fileno=os.dup(stored["listen"][0]))
        assert lst.getsockname()[1] == srv.port
        lst.detach()
        port = srv.port
    finally:
        srv.stop()
    # the service manager's side of a restart: fds at 3, 4 with LISTEN_*
    fds = stored["arena"] + stored["listen"]

    def hand_over():
        from kvstore.server.sdnotify import place_fds
        place_fds(fds)
        os.environ["LISTEN_PID"] = str(os.getpid())
        os.environ["LISTEN_FDS"] = str(len(fds))
        os.environ["LISTEN_FDNAMES"] = "arena:listen"
    srv2 = start_server(*BASE, "--port", str(port), preexec_fn=hand_over, pass_fds=(3, 4))
    try:
        assert srv2.port == port
        assert rc(srv2).get("s7") == b"v7"
        assert rc(srv2).dbsize() == 500
        assert log_events(srv2, "arena_adopted")
    finally:
        srv2.stop()
        for fd in fds:
            os.close(fd)
        lsock.close()
        os.unlink(path)
        os.rmdir(tmp)


def test_refused_arena_starts_empty(tmp_path):
    """adopt_store: an arena the build refuses is not read; the store starts empty."""
    from kvstore.server import restart
    fd = os.memfd_create("x")
    calls = []
    restart._inherited = ({"arena": [fd]}, {"replid": "x" * 40, "offset": 5})
    try:
        def bad(_fd):
            raise kvstore_error("arena layout version 9, this build reads layout version 1")

        store, adopted = restart.adopt_store(lambda: calls.append("fresh") or "FRESH", bad)
        assert (store, adopted) == ("FRESH", False) and calls == ["fresh"]
        assert restart._inherited[1] == {}          # no replication state without the data
        with pytest.raises(OSError):
            os.fstat(fd)                             # the inherited fd was closed
    finally:
        restart._inherited = None


def kvstore_error(msg):
    import kvstore
    return kvstore.ArenaError(msg)


def _kv_stats(r):
    st = r.execute_command("KV.STATS")
    st = dict(zip(st[::2], st[1::2])) if isinstance(st, list) else st
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in st.items()}


def test_kv_restart_hands_over_lost_keys_and_quarantined_subpages():
    """No replica: keys lost before KV.RESTART stay LOST after it (handed
    over, not found again by checksum), the rest is intact, and the lost
    subpage stays quarantined."""
    p = start()
    try:
        r = rc(p)
        want = {f"k{i}".encode(): f"value-{i}-".encode() * (1 + i % 30) for i in range(3000)}
        r.mset(want)
        r.execute_command("KV.INJECT", "ao", "KEY", "k500")

        def lost_now():
            try:
                r.get("k500")
            except redis.ResponseError as e:
                return "LOST" in str(e).upper()
            return False
        wait_for(lost_now, 20, 0.01, "k500 LOST")
        lost = set()
        for k in want:
            try:
                r.get(k)
            except redis.ResponseError as e:
                assert "LOST" in str(e).upper()
                lost.add(k)
        assert b"k500" in lost and len(lost) < 100
        before = _kv_stats(r)
        assert int(before["lost_subpages"]) == 1
        old = r.info("server")["run_id"]
        assert r.execute_command("KV.RESTART") == b"OK"
        _serving(p, old)
        r = rc(p)
        adopted = log_events(p, "arena_adopted")
        assert adopted and "lost_subpages_handed_over=1" in adopted[-1], adopted
        for k, v in want.items():
            if k in lost:
                with pytest.raises(redis.ResponseError, match="LOST"):
                    r.get(k)
            else:
                assert r.get(k) == v, k
        wait_for(lambda: int(_kv_stats(r)["unverified_subpages"]) == 0, 60, 0.05, "verification")
        st = _kv_stats(r)
        assert int(st["lost_subpages"]) == 1               # still quarantined
        assert int(st["checksum_failures"]) == 0           # nothing found again by checksum
        r.mset({f"n{i}": "x" * 300 for i in range(5000)})   # fills space; never the lost subpage
        assert int(_kv_stats(r)["lost_subpages"]) == 1
        for k in lost:
            with pytest.raises(redis.ResponseError, match="LOST"):
                r.get(k)
    finally:
        p.stop()


def _value_or_lost(r, k):
    try:
        return r.get(k)
    except redis.ResponseError as e:
        assert "LOST" in str(e).upper(), e
        return "LOST"


@pytest.mark.parametrize("planned_first", [False, True], ids=["crash", "restart-then-crash"])
def test_supervised_crash_after_a_salvage_never_serves_the_stale_page(planned_first, reserve_2m):
    """Mainline policy, 2 MiB pages: a memory error on a page makes the
    worker copy it into a spare memfd; writes after that land in the spare.
    The worker is killed; the next one must map the spare (stored with the
    fd store) over the page: every key reads its newest acknowledged value
    or LOST, never the value it had before the salvage. With a KV.RESTART
    between the salvage and the crash, the re-executed worker goes on with
    the names already stored (one spare, one lostmap in the store)."""
    reserve_2m(40)             # the 64 MiB store and its salvage spares
    p = start_server("--supervise", "--page-size", "2M", "--kernel-policy", "mainline",
                     "--capacity", "64MiB", "--enable-fault-injection")
    try:
        r = rc(p)
        st = _kv_stats(r)
        if st["page_size"] not in (b"2M", "2M"):
            pytest.skip(f"no 2 MiB hugepages for the store: got {st['backing']}")
        old = {f"k{i}".encode(): f"old-{i}-".encode() * (1 + i % 9) for i in range(2000)}
        r.mset(old)
        before = int(st["pages_salvaged"])
        r.execute_command("KV.INJECT", "ao", "KEY", "k500")
        wait_for(lambda: int(_kv_stats(r)["pages_salvaged"]) == before + 1, 60, 0.02, "the salvage")
        new = {k: b"new-" + v for k, v in old.items()}
        if planned_first:
            run_id = r.info("server")["run_id"]
            assert r.execute_command("KV.RESTART") == b"OK"
            _serving(p, run_id)
            r = rc(p)
        for k, v in new.items():                     # acknowledged one by one
            r.set(k, v)
        assert _value_or_lost(r, b"k1") == new[b"k1"]
        worker = r.info("server")["process_id"]
        assert worker != p.pid
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: _worker_pid(p) not in (None, worker), 30, 0.02, "a new worker")
        r = rc(p)
        stale = {k for k in new if _value_or_lost(r, k) == old[k]}
        assert not stale, sorted(stale)[:10]
        for k, v in new.items():
            assert _value_or_lost(r, k) in (v, "LOST"), k
        adopted = log_events(p, "arena_adopted")
        assert adopted and "salvaged_pages_handed_over=1" in adopted[-1], adopted
        assert int(_kv_stats(r)["lost_subpages"]) >= 1     # the poisoned subpage stays lost
        died = log_events(p, "supervise_worker_died")[-1]
        stored = died.split("fds=")[1].split()[0].split(",")
        assert len([n for n in stored if n.startswith("arena-spare-")]) == 1, died
        assert len([n for n in stored if n.startswith("arena-lostmap-")]) == 1, died
    finally:
        p.stop()


def _worker_pid(p):
    try:
        return rc(p).info("server")["process_id"]
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return None


class _NotifyListener:
    """A service manager's notification socket, from sd_notify(3): keeps the
    fds stored with FDSTORE=1 by FDNAME=, drops them on FDSTOREREMOVE=1."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.stored = {}

    def drain(self, timeout):
        self.sock.settimeout(timeout)
        while True:
            try:
                msg, anc, _f, _a = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
            except (TimeoutError, socket.timeout):
                return
            self.sock.settimeout(0.3)
            fds = array.array("i")
            for _level, _kind, data in anc:
                fds.frombytes(data[:len(data) - len(data) % 4])
            var = dict(line.split("=", 1) for line in msg.decode().splitlines())
            if var.get("FDSTOREREMOVE") == "1":
                for fd in self.stored.pop(var["FDNAME"], []):
                    os.close(fd)
            if var.get("FDSTORE") == "1":
                for fd in self.stored.pop(var["FDNAME"], []):
                    os.close(fd)
                self.stored[var["FDNAME"]] = list(fds)
            else:
                for fd in fds:
                    os.close(fd)

    def close(self):
        for fds in self.stored.values():
            for fd in fds:
                os.close(fd)
        self.sock.close()


@pytest.mark.parametrize("spare_kept", [True, False], ids=["spare", "spare-dropped"])
def test_fd_store_keeps_salvaged_pages_for_a_crash_restart(tmp_path, spare_kept, reserve_2m):
    """systemd's side of a crash restart after a salvage: the server stores
    the spare memfd and its lost subpages by name; a server handed them back
    serves the newest values. If the service manager dropped the spare (its
    FileDescriptorStoreMax=), the lost-subpage map still names the salvaged
    page: the whole page is adopted as lost, and its keys are LOST, never old."""
    reserve_2m(40)             # the 64 MiB store and its salvage spares
    path = str(tmp_path / "notify")
    lst = _NotifyListener(path)
    flags = ("--page-size", "2M", "--kernel-policy", "mainline", "--capacity", "64MiB",
             "--enable-fault-injection")
    srv = start_server(*flags, env=dict(os.environ, NOTIFY_SOCKET=path))
    try:
        r = rc(srv)
        st = _kv_stats(r)
        if st["page_size"] not in (b"2M", "2M"):
            pytest.skip(f"no 2 MiB hugepages for the store: got {st['backing']}")
        # ~16 MiB: the last keys written are on a page other than the
        # arena header's (a header page lost for good refuses the arena)
        old = {f"k{i}".encode(): f"old-{i}-".encode().ljust(2000, b"o") for i in range(8000)}
        for n in range(0, 8000, 500):
            r.mset({f"k{i}": old[f"k{i}".encode()] for i in range(n, n + 500)})
        r.execute_command("KV.INJECT", "ao", "KEY", "k7990")
        wait_for(lambda: int(_kv_stats(r)["pages_salvaged"]) == 1, 60, 0.02, "the salvage")
        new = {k: b"new-" + v for k, v in old.items()}
        for n in range(0, 8000, 500):
            r.mset({f"k{i}": new[f"k{i}".encode()] for i in range(n, n + 500)})
        lst.drain(5)
        port = srv.port
    finally:
        srv.stop()
    try:
        spares = [n for n in lst.stored if n.startswith("arena-spare-")]
        maps = [n for n in lst.stored if n.startswith("arena-lostmap-")]
        assert len(spares) == 1 and len(maps) == 1, sorted(lst.stored)
        assert {"arena", "listen"} <= set(lst.stored)
        names = ["arena", "listen", maps[0]] + (spares if spare_kept else [])
        fds = [lst.stored[n][0] for n in names]

        def hand_over():
            from kvstore.server.sdnotify import place_fds
            place_fds(fds)
            os.environ["LISTEN_PID"] = str(os.getpid())
            os.environ["LISTEN_FDS"] = str(len(fds))
            os.environ["LISTEN_FDNAMES"] = ":".join(names)
        srv2 = start_server(*flags, "--port", str(port), preexec_fn=hand_over,
                            pass_fds=tuple(range(3, 3 + len(fds))))
        try:
            r = rc(srv2)
            got = {k: _value_or_lost(r, k) for k in new}
            assert not [k for k, v in got.items() if v == old[k]]
            assert all(v in (new[k], "LOST") for k, v in got.items())
            assert log_events(srv2, "arena_adopted")
            if spare_kept:
                assert list(got.values()).count("LOST") < 100
                assert log_events(srv2, "arena_adopted")[-1].count("salvaged_pages_handed_over=1")
            else:
                assert log_events(srv2, "salvaged_pages_without_spare")
                assert 100 < list(got.values()).count("LOST") < 4000
                adopted = log_events(srv2, "arena_adopted")[-1]
                n = int(adopted.split("lost_subpages_handed_over=")[1].split()[0])
                assert n >= 512, adopted                           # the whole 2 MiB page
        finally:
            srv2.stop()
    finally:
        lst.close()


def test_fd_store_remove_drops_the_named_fds(tmp_path):
    """FdStore (the --supervise parent): FDSTOREREMOVE=1 closes and forgets
    what is stored under FDNAME=; other names stay."""
    from kvstore.server.sdnotify import FdStore, notify, store_fds
    path = str(tmp_path / "n")
    st = FdStore(path)
    try:
        a, b = os.memfd_create("a"), os.memfd_create("b")
        store_fds("x", [a], sock_path=path)
        store_fds("y", [b], sock_path=path)
        st.receive(5)
        st.receive(5)
        kept = st.fds["x"][0]
        notify("FDSTOREREMOVE=1\nFDNAME=x", sock_path=path)
        assert st.receive(5) == {"FDSTOREREMOVE": "1", "FDNAME": "x"}
        assert "x" not in st.fds and list(st.fds) == ["y"]
        with pytest.raises(OSError):
            os.fstat(kept)
        os.close(a)
        os.close(b)
    finally:
        st.close()
