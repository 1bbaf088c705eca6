"""Helpers for the replication tests: primaries and replicas as real processes.

Every server runs on 127.0.0.1 with ``--port 0`` on 4 KiB backing (no
hugepages needed) with fault injection on; ``--kernel-policy`` is chosen per
test. ``digest(port)`` asks ``KV.DIGEST`` (xxh64 over sorted
(key, version, value)); ``wait_synced`` polls until a replica has applied
the primary's whole stream and both digests agree. ``load_keys`` writes
``NKEYS`` self-checking values (``value``/``check``), ``Load`` runs a
checking writer and readers, ``all_keys_back`` reads every key back.
"""

import random
import threading
import time

import redis
import xxhash

from kvstore.client import Client
from serverutil import start_server, wait_for

BASE = ("--capacity", "96MiB", "--page-size", "4K", "--enable-fault-injection")


def start(*flags, policy="keep_ue"):
    return start_server(*BASE, "--kernel-policy", policy, *flags)


def start_replica(primary, *flags, policy="keep_ue"):
    return start(*flags, "--replica-of", f"127.0.0.1:{primary.port}", policy=policy)


def rc(srv, **kw):
    return redis.Redis(host="127.0.0.1", port=srv.port, socket_timeout=20, **kw)


def client(srv, **kw):
    kw.setdefault("socket_timeout", 20)
    return Client("127.0.0.1", srv.port, **kw)


def info(srv):
    return rc(srv).info("replication")


def digest(srv):
    keys, lost, dig = rc(srv).execute_command("KV.DIGEST")
    return int(keys), int(lost), dig


def wait_link_up(replica, timeout=30.0):
    return wait_for(lambda: info(replica).get("master_link_status") == "up"
                    and not info(replica).get("master_sync_in_progress"),
                    timeout, what="replica link up")


def wait_synced(primary, replica, timeout=60.0):
    def ok():
        pi, ri = info(primary), info(replica)
        if ri.get("master_link_status") != "up" or ri.get("master_sync_in_progress"):
            return False
        if ri["slave_repl_offset"] != pi["master_repl_offset"]:
            return False
        return digest(primary) == digest(replica)
    return wait_for(ok, timeout, 0.1, "replica in sync (offset and digest)")


def log_events(srv, name):
    return [line for line in srv.logs().splitlines() if f"event={name} " in line + " "]


NKEYS = 8000


def key(i):
    return b"r:%05d" % i


def value(k, gen):
    body = b"%b|%d|" % (k, gen)
    return body + xxhash.xxh64(body).hexdigest().encode() + b"|" + b"." * (40 + gen % 90)


def check(k, v):
    """-> generation, or raises AssertionError on wrong bytes."""
    assert v is not None, f"{k!r}: None for a key that exists"
    kk, gen, h, _pad = v.split(b"|", 3)
    assert kk == k, f"{k!r}: value of another key {kk!r}"
    assert xxhash.xxh64(b"%b|%b|" % (kk, gen)).hexdigest().encode() == h, f"{k!r}: corrupt value"
    return int(gen)


class Load:
    """One writer (to the primary) and readers (to ``read_from``), checking
    every answer: right key, intact bytes, never older than seen before."""

    def __init__(self, primary, read_from, readers=2):
        self.wc = client(primary, retries=0)
        self.rcs = [client(s) for s in read_from for _ in range(readers)]
        self.gen = {}
        self.stop_ev = threading.Event()
        self.errors = []
        self.wrong = []
        self.reads = 0
        self.writes = 0
        self.threads = [threading.Thread(target=self.writer, daemon=True)]
        self.threads += [threading.Thread(target=self.reader, args=(c,), daemon=True)
                         for c in self.rcs]

    def writer(self):
        rnd = random.Random(1)
        while not self.stop_ev.is_set():
            i = rnd.randrange(NKEYS)
            k = key(i)
            g = self.gen.get(k, 0) + 1
            try:
                self.wc.put(k, value(k, g))
                self.gen[k] = g
                self.writes += 1
            except Exception as e:  # noqa: BLE001
                self.errors.append(("put", k, repr(e)))
            time.sleep(0.0005)

    def reader(self, c):
        rnd = random.Random(id(c))
        seen = {}
        while not self.stop_ev.is_set():
            ks = [key(rnd.randrange(NKEYS)) for _ in range(8)]
            try:
                vals = [c.get(ks[0])] + c.mget(ks[1:])
            except Exception as e:  # noqa: BLE001
                self.errors.append(("get", ks[0], repr(e)))
                continue
            for k, v in zip(ks, vals):
                try:
                    g = check(k, v)
                    assert g >= seen.get(k, 0), f"{k!r}: generation {g} after {seen[k]}"
                    seen[k] = g
                except AssertionError as e:
                    self.wrong.append(str(e))
            self.reads += len(ks)

    def wait_progress(self, n=200, timeout=30):
        """Return once the load did ``n`` more operations."""
        start = self.reads + self.writes
        wait_for(lambda: self.reads + self.writes >= start + n or self.errors, timeout,
                 what="load progress")

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_ev.set()
        for t in self.threads:
            t.join(10)
        for c in [self.wc, *self.rcs]:
            c.close()


def load_keys(srv):
    c = client(srv)
    for base in range(0, NKEYS, 1000):
        c.mput({key(i): value(key(i), 0) for i in range(base, base + 1000)})
    c.close()


def load_and_sync(primary, replica):
    """Link up, ``load_keys`` on the primary, and wait until the replica has them."""
    wait_link_up(replica)
    load_keys(primary)
    wait_synced(primary, replica)


def all_keys_back(srv, gens=None):
    c = client(srv)
    try:
        vals = []
        for base in range(0, NKEYS, 500):
            vals += c.mget([key(i) for i in range(base, base + 500)])
        for i, v in enumerate(vals):
            g = check(key(i), v)
            if gens is not None:
                assert g == gens.get(key(i), 0), (key(i), g, gens.get(key(i), 0))
    finally:
        c.close()
