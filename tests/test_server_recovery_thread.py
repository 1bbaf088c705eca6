"""Memory-loss processing off the event loop (server/recovery.py).

A mainline salvage (the copy of a whole lost hugepage into a spare one) runs
on the server's recovery thread. While it runs the loop keeps answering: the
requests that do not touch the lost page complete *during* the salvage
window -- seen through the server's own INFO counters
(``server_salvage_in_progress``), not through timing -- and those that do
wait for it; no answer is wrong, and every key comes back (rebuilt from a
replica). 2 MiB pages always run (the copy is widened with the
``KVSTORE_SALVAGE_DELAY_US`` test hook); 1 GiB pages when the pool has two
free (the store's and the spare).

In-process: the recovery thread's results reach the keys-lost callbacks and
the write path's subscribers (replication) on the loop thread.
"""

import asyncio
import os
import random
import threading
import time

import pytest

from kvstore.client import Client
from kvstore.errors import KeyLostError
from replutil import check, client, key, value, wait_link_up, wait_synced
from serverutil import start_server, store_available, wait_for

pytestmark = pytest.mark.skipif(not store_available(), reason="the C engine is not built")

HUGE_1G = "/sys/kernel/mm/hugepages/hugepages-1048576kB/free_hugepages"


def _free_1g():
    try:
        with open(HUGE_1G) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def _load(srv, nkeys, pad):
    c = client(srv)
    for base in range(0, nkeys, 500):
        c.mput({key(i): value(key(i), 0) + pad for i in range(base, min(nkeys, base + 500))})
    c.close()


class _Watch:
    """Polls the primary's stats (native protocol) and runs checking readers
    of random keys, each answer timestamped."""

    def __init__(self, srv, nkeys, pad, readers=2):
        self.srv, self.nkeys, self.pad = srv, nkeys, pad
        self.stop = threading.Event()
        self.samples = []       # (time, salvage_in_progress, recovery_in_progress, pages_salvaged)
        self.reads = []         # completion times of reads answered with the right value
        self.lost_answers = 0
        self.wrong = []
        self.injected = None    # when the UE was injected (set by the test)
        self.errors = []
        self.threads = [threading.Thread(target=self._poll, daemon=True)]
        self.threads += [threading.Thread(target=self._read, args=(i,), daemon=True)
                         for i in range(readers)]

    def start(self):
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _poll(self):
        c = Client("127.0.0.1", self.srv.port, socket_timeout=30, retries=0)
        try:
            while not self.stop.is_set():
                s = c.stats()
                self.samples.append((time.monotonic(), s["server_salvage_in_progress"],
                                     s["server_recovery_in_progress"], s["pages_salvaged"]))
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append(f"poll: {type(e).__name__}: {e}")
        finally:
            c.close()

    def _read(self, seed):
        rnd = random.Random(seed)
        c = Client("127.0.0.1", self.srv.port, socket_timeout=30, retries=0)
        try:
            while not self.stop.is_set():
                k = key(rnd.randrange(self.nkeys))
                try:
                    v = c.get(k)
                except KeyLostError:
                    self.lost_answers += 1      # LOST is an answer, never wrong bytes
                    continue
                try:
                    assert v is not None and v.endswith(self.pad)
                    check(k, v[:len(v) - len(self.pad)])
                except AssertionError as e:
                    self.wrong.append(str(e))
                    continue
                self.reads.append(time.monotonic())
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append(f"read: {type(e).__name__}: {e}")
        finally:
            c.close()

    def salvage_window(self):
        """(first, last) time a stats reply said a salvage copy was running."""
        during = [t for t, salv, _rec, _n in self.samples if salv]
        return (min(during), max(during)) if during else None


def _salvage_under_load(page_size, capacity, nkeys, pad, victim, env=None, readers=2):
    try:
        primary = start_server("--page-size", page_size, "--kernel-policy", "mainline",
                               "--capacity", capacity, "--enable-fault-injection", env=env)
    except RuntimeError as e:
        if "no free 1 GiB hugepages" in str(e):
            pytest.skip("another process took the free 1 GiB hugepages before the server started")
        raise
    replica = start_server("--page-size", "4K", "--kernel-policy", "keep_ue", "--capacity", "256MiB",
                           "--enable-fault-injection", "--replica-of", f"127.0.0.1:{primary.port}")
    try:
        st = client(primary).stats()
        if st["page_size"] != page_size:
            pytest.skip(f"no {page_size} hugepages for the store: got {st['backing']}")
        wait_link_up(replica)
        _load(primary, nkeys, pad)
        wait_synced(primary, replica)
        w = _Watch(primary, nkeys, pad, readers)
        w.start()
        wait_for(lambda: len(w.reads) > 200 and len(w.samples) > 20, 30, what="load running")
        c = client(primary)
        before = c.stats()["pages_salvaged"]
        c.inject("ao", key=key(victim))
        w.injected = time.monotonic()
        wait_for(lambda: any(n > before and not rec for _t, _s, rec, n in w.samples[-5:]), 120,
                 what="the salvage to finish")
        time.sleep(0.3)
        w.finish()
        assert not w.errors, w.errors
        assert not w.wrong, w.wrong[:5]
        st = c.stats()
        assert st["pages_salvaged"] == before + 1, st.get("last_salvage_error")
        win = w.salvage_window()
        assert win is not None, "no stats reply came while the page was being copied"
        answered = [t for t, s, _r, _n in w.samples if win[0] <= t <= win[1]]
        # the loop answered again and again while the copy ran
        assert len(answered) >= 3, (win, len(w.samples))
        # every key comes back: the lost ones rebuilt from the replica
        def all_back():
            vals = []
            for base in range(0, nkeys, 500):
                try:
                    vals += c.mget([key(i) for i in range(base, min(nkeys, base + 500))])
                except KeyLostError:
                    return False
            for i, v in enumerate(vals):
                assert v is not None and v.endswith(pad), key(i)
                check(key(i), v[:len(v) - len(pad)])
            return True
        wait_for(all_back, 60, 0.2, "every key back")
        c.close()
        return w, win, primary.logs()
    finally:
        replica.stop()
        primary.stop()


def test_2m_salvage_runs_off_the_loop_and_other_pages_are_served(reserve_2m):
    """2 MiB pages, the copy widened to ~2.5 s: reads of keys on the other
    pages complete while the page is lost and being copied (after the UE
    was injected and before the last stats reply that says a copy is
    running)."""
    reserve_2m(136)            # the 256 MiB store and its salvage spares
    pad = b"#" * 600
    w, win, logs = _salvage_under_load("2M", "256MiB", 30000, pad, victim=29000, readers=6,
                                       env={**os.environ, "KVSTORE_SALVAGE_DELAY_US": "2500000"})
    during = [t for t in w.reads if w.injected < t < win[1]]
    assert during, ("no read of another page completed while the page was copied", win,
                    len(w.reads))
    assert "event=recovery " in logs


@pytest.mark.skipif(_free_1g() < 2, reason="needs 2 free 1 GiB hugepages (the store's and the "
                    f"salvage spare); {HUGE_1G} says {_free_1g()}")
def test_1g_salvage_runs_off_the_loop():
    """1 GiB pages (the whole store on one page): the loop keeps answering
    (stats) while the 1 GiB copy runs; the readers of the page wait for it;
    no wrong answer, every key back."""
    pad = b"#" * 200
    w, win, _logs = _salvage_under_load("1G", "1GiB", 30000, pad, victim=12345)
    assert win[1] > win[0]


# ---------------------------------------------------------------- in process

def test_recovery_thread_reports_on_the_loop_thread():
    """Keys-lost callbacks and the write path's install events (what feeds
    replication) run on the loop thread; the engine part ran on the
    recovery thread."""
    from kvstore.server import app
    from kvstore.server.config import ServerConfig

    seen = {"lost": [], "install": [], "engine": []}

    class Source:                  # a replica's answers, in process
        def __init__(self, data):
            self.data = data

        def fetch(self, requests):
            return {k: (mv, self.data[k]) for k, mv in requests if k in self.data}

    class Sub:
        def on_writes(self, entries, reply_index):
            pass

        def on_install(self, k, v, version, status):
            seen["install"].append((threading.get_ident(), bytes(k), status))

        def read_repair(self, k, version):
            import contextlib
            return contextlib.nullcontext()

    async def main():
        cfg = ServerConfig(capacity="16MiB", page_size="4K", kernel_policy="keep_ue",
                           enable_fault_injection=True, port=0).validate()
        srv = app.Server(cfg)
        await srv.start()
        try:
            loop_thread = threading.get_ident()
            st = srv.store
            data = {b"t:%04d" % i: b"v%04d" % i * 20 for i in range(2000)}
            st.mput(list(data.items()))
            srv.repl.refresh_peers = lambda: None      # keep our source in place
            st.rebuild_source = Source(data)
            st.on_loss(lambda keys: seen["lost"].append((threading.get_ident(), len(keys))))
            srv.writes.subscribe(Sub())
            orig = st.process_losses

            def spy():
                seen["engine"].append(threading.get_ident())
                return orig()
            st.process_losses = spy
            st.faults.inject_key(b"t:0100", kind="ao")
            deadline = time.monotonic() + 20
            while not seen["install"] and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return loop_thread, srv.recovery.thread.ident, data
        finally:
            await srv.shutdown()

    loop_thread, rec_thread, data = asyncio.run(main())
    assert rec_thread != loop_thread
    assert seen["engine"] and set(seen["engine"]) == {rec_thread}, seen["engine"]
    assert seen["lost"] and all(t == loop_thread for t, _n in seen["lost"]), seen["lost"]
    assert seen["install"], "no rebuilt key reached the write path's subscribers"
    assert all(t == loop_thread for t, _k, _s in seen["install"]), seen["install"]
    assert any(s == "installed" and k in data for _t, k, s in seen["install"])


# ---------------------------------------------------------------- verification after adoption

def test_read_of_an_unverified_record_verifies_it_first():
    """After adoption nothing has been verified in the background yet; a
    read of a record whose bytes went bad still checks it and answers LOST
    (never the wrong bytes), and the background pass finds nothing new."""
    import kvstore

    a = kvstore.Store("16MiB", page_size="4K", recovery="manual")
    for i in range(500):
        a.put(b"v:%d" % i, b"value-%d-" % i * 10)
    a._corrupt(b"v:77", 12)
    fd = os.dup(a.arena.fd)
    try:
        b = kvstore.Store(adopt_fd=fd, recovery="manual")
    finally:
        os.close(fd)
    try:
        b.maintain_verify_bytes = 0        # as the server: no pass from maintain()
        assert not b.verified
        with pytest.raises(KeyLostError):
            b.get(b"v:77")
        assert not b.verified              # the read checked its own record only
        assert b.get(b"v:78") == b"value-78-" * 10
        while not b.verify_step(1 << 20):
            pass
        assert b.verified
        for i in range(500):
            if i != 77:
                assert b.get(b"v:%d" % i) == b"value-%d-" % i * 10
    finally:
        b.close()
        a.close()


def test_server_verifies_an_adopted_arena_in_the_background():
    """KV.RESTART adopts the arena; the server's own short steps verify
    every record (unverified_subpages reaches 0) while it answers."""
    import redis

    srv = start_server("--capacity", "64MiB", "--page-size", "4K")
    try:
        c = client(srv)
        for base in range(0, 20000, 1000):
            c.mput({key(i): value(key(i), 0) for i in range(base, base + 1000)})
        c.close()
        r = redis.Redis(host="127.0.0.1", port=srv.port, socket_timeout=20)
        old = r.info("server")["run_id"]
        assert r.execute_command("KV.RESTART") == b"OK"

        def serving():
            try:
                return redis.Redis(host="127.0.0.1", port=srv.port,
                                   socket_timeout=5).info("server")["run_id"] != old
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                return False
        wait_for(serving, 30, 0.02, "the restarted server")
        c = client(srv)
        seen_unverified = c.stats()["unverified_subpages"]
        for i in range(0, 20000, 97):
            check(key(i), c.get(key(i)))
        wait_for(lambda: c.stats()["unverified_subpages"] == 0, 60, 0.05, "every record verified")
        assert "every record verified" in srv.logs() or seen_unverified == 0
        c.close()
    finally:
        srv.stop()


# ---------------------------------------------------------------- kvstore-cluster up

def test_cluster_up_passes_page_size_and_kernel_policy(tmp_path, monkeypatch):
    """``kvstore-cluster up --page-size 2M --kernel-policy mainline`` starts
    every server with those flags (and without them, the server's defaults)."""
    import subprocess

    from kvstore.server.cluster import cli as ccli

    started = []

    class FakePopen:
        def __init__(self, argv, **kw):
            started.append(list(argv))
            self.pid = 12345

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    args = ccli.build_parser().parse_args(["up", "--page-size", "2M", "--kernel-policy", "mainline"])
    ccli._spawn_node(str(tmp_path), 7001, "n1", "http://127.0.0.1:2379", "kv", args)
    argv = started[-1]
    assert argv[argv.index("--page-size") + 1] == "2M"
    assert argv[argv.index("--kernel-policy") + 1] == "mainline"
    args = ccli.build_parser().parse_args(["up"])
    ccli._spawn_node(str(tmp_path), 7002, "n2", "http://127.0.0.1:2379", "kv", args)
    assert "--page-size" not in started[-1] and "--kernel-policy" not in started[-1]
    with pytest.raises(SystemExit):
        ccli.build_parser().parse_args(["up", "--page-size", "3M"])
