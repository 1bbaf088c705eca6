"""The C GET/SET path in cluster mode: real servers, a real etcd, loopback only.

A cluster node pushes the slots it serves untouched into its engine
(``Engine.set_fast_slots``); the C RESP path runs a plain GET/SET only for
keys of those slots and leaves every other command to the Python routing
hook. What is checked (INFO ``kvstore_fast_commands`` counts the commands
the C path ran, so each test also sees which path answered):

* a primary serves its own keys through the C path, with the same replies
  as the Python path, and answers ``-MOVED`` for foreign keys in the same
  batch, in order; ASKING and READONLY connections;
* a primary paused past its lease (SIGSTOP) answers the SET that waited in
  its socket with ``-CLUSTERDOWN``, never ``+OK``, and does not write it:
  the lease check holds for the C path too;
* a replica serves GETs of READONLY connections in C, MOVED to the others
  and for writes;
* a slot being migrated away goes through the Python path (``-ASK`` for a
  key not here, ``-MOVED`` on the target without ASKING), while the other
  slots of the same node stay on the C path.
"""

import os
import signal
import socket
import subprocess
import time

import pytest

from kvstore.server.cluster.slots import key_slot
from etcdutil import needs_etcd
from serverutil import store_available, wait_for
from test_cluster_reshard import _cluster_info, _inject
from test_cluster_server import CLI, Cluster

redis = pytest.importorskip("redis")

pytestmark = [needs_etcd,
              pytest.mark.skipif(not store_available(), reason="C engine not built")]


def _cmds(*cmds):
    return b"".join(b"*%d\r\n" % len(c) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in c)
                    for c in cmds)


def _parse(buf, n):
    """The first ``n`` replies in ``buf`` (bulk replies as the value, nil as
    None, other lines as they are), or None while ``buf`` holds fewer."""
    out, rest = [], buf
    while len(out) < n:
        line, sep, after = rest.partition(b"\r\n")
        if not sep:
            return None
        if line.startswith(b"$") and line != b"$-1":
            size = int(line[1:])
            if len(after) < size + 2:
                return None
            out.append(after[:size])
            rest = after[size + 2:]
        else:
            out.append(None if line == b"$-1" else line)
            rest = after
    return out


def _read(s, n):
    buf = b""
    while (got := _parse(buf, n)) is None:
        chunk = s.recv(65536)
        assert chunk, f"connection closed after {buf!r}"
        buf += chunk
    return got


def _send(port, *cmds, sock=None):
    """Send the commands in one write; return their replies (see _parse)."""
    s = sock or socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(_cmds(*cmds))
        return _read(s, len(cmds))
    finally:
        if sock is None:
            s.close()


def _fast(port):
    return int(redis.Redis(port=port, socket_timeout=5).info("stats")["kvstore_fast_commands"])


def _key_in(slots, prefix):
    """A key whose slot is in ``slots`` (a set or range-list predicate)."""
    for i in range(1 << 20):
        k = b"%s%d" % (prefix, i)
        if slots(key_slot(k)):
            return k
    raise AssertionError("no key found")


def _owns(node):
    return lambda s: any(lo <= s <= hi for lo, hi in node["slots"])


def test_local_keys_fast_foreign_keys_moved(tmp_path):
    c = Cluster(tmp_path / "f2", 2, 0)
    try:
        doc = c.wait_placed()
        a, b = [n for n in doc["nodes"] if n["role"] == "primary"]
        local = [_key_in(_owns(a), b"loc%d-" % i) for i in range(20)]
        foreign = _key_in(_owns(b), b"far")
        fslot = key_slot(foreign)
        moved = b"-MOVED %d 127.0.0.1:%d" % (fslot, b["port"])

        before = _fast(a["port"])
        cmds = [[b"SET", k, b"v-" + k] for k in local] + [[b"GET", k] for k in local]
        assert _send(a["port"], *cmds) == [b"+OK"] * 20 + [b"v-" + k for k in local]
        assert _fast(a["port"]) - before == 40            # all of them in C

        # a foreign key stops the C path; its MOVED comes back in order
        before = _fast(a["port"])
        got = _send(a["port"], [b"GET", local[0]], [b"SET", foreign, b"x"], [b"GET", local[1]],
                    [b"GET", foreign], [b"GET", b"never-written-%d" % 0])
        nw = key_slot(b"never-written-0")
        assert got[:4] == [b"v-" + local[0], moved, b"v-" + local[1], moved]
        if _owns(a)(nw):
            assert got[4] is None
        else:
            assert got[4] == b"-MOVED %d 127.0.0.1:%d" % (nw, b["port"])
        assert _fast(a["port"]) - before == 1             # only the first GET ran in C
        assert redis.Redis(port=b["port"]).get(foreign) is None    # the SET went nowhere

        # the same replies with every command through Python (a MULTI-free
        # batch the C path does not start: a PING first)
        got2 = _send(a["port"], [b"PING"], [b"GET", local[0]], [b"SET", foreign, b"x"],
                     [b"GET", local[1]])
        assert got2 == [b"+PONG", b"v-" + local[0], moved, b"v-" + local[1]]

        # hash tags route as Redis Cluster: a tag of a local slot is served here
        tag = local[0]
        before = _fast(a["port"])
        tk = b"{" + tag + b"}.x"
        assert _send(a["port"], [b"SET", tk, b"t"], [b"GET", tk]) == [b"+OK", b"t"]
        assert _fast(a["port"]) - before == 2

        # ASKING: the next command goes through the routing hook (a local key
        # is served; a foreign one, of no importing slot, is MOVED), and the
        # connection is back on the C path after it
        s = socket.create_connection(("127.0.0.1", a["port"]), timeout=10)
        try:
            assert _send(a["port"], [b"ASKING"], sock=s) == [b"+OK"]
            before = _fast(a["port"])
            assert _send(a["port"], [b"GET", foreign], sock=s) == [moved]
            assert _send(a["port"], [b"GET", local[2]], sock=s) == [b"v-" + local[2]]
            assert _fast(a["port"]) - before == 1
        finally:
            s.close()

        # CROSSSLOT is untouched (MGET never runs in C)
        assert _send(a["port"], [b"MGET", local[0], foreign]) == [
            b"-CROSSSLOT Keys in request don't hash to the same slot"]
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.down()


def test_fenced_primary_does_not_ack_writes_through_the_fast_path(tmp_path):
    """A primary with no replica (so a plain SET may run in C) paused past
    its lease: the SET queued meanwhile is refused, not written."""
    c = Cluster(tmp_path / "fence", 1, 0, "--ttl", "2")
    try:
        doc = c.wait_placed()
        p = doc["nodes"][0]
        key = b"fence-key"
        before = _fast(p["port"])
        assert _send(p["port"], [b"SET", key, b"before"]) == [b"+OK"]
        assert _fast(p["port"]) - before == 1      # the C path is on for this node
        s = socket.create_connection(("127.0.0.1", p["port"]), timeout=30)
        os.kill(p["pid"], signal.SIGSTOP)
        try:
            s.sendall(_cmds([b"SET", key, b"during"], [b"GET", key]))
            time.sleep(3.5)                          # past the lease TTL (2 s)
        finally:
            os.kill(p["pid"], signal.SIGCONT)
        got = _read(s, 2)
        s.close()
        assert got[0].startswith(b"-CLUSTERDOWN"), got
        assert got[1] == b"before"               # the refused SET wrote nothing
        # the node renews its lease (no replica took over) and writes resume
        r = redis.Redis(port=p["port"], socket_timeout=5)

        def writes_back():
            try:
                return r.set(key, b"after")
            except redis.exceptions.ResponseError:
                return False
        wait_for(writes_back, 30, 0.1, "writes after the lease is renewed")
        assert r.get(key) == b"after"
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.down()


def test_migrating_slot_goes_through_python(tmp_path):
    """A slot held in MIGRATING state (a key lost on the source with no
    replica blocks it): ASK / MOVED / ASKING as the routing hook answers,
    the node's other slots still on the C path."""
    c = Cluster(tmp_path / "mig", 2, 0, "--enable-fault-injection")
    try:
        doc = c.wait_placed()
        src = c.primary_of(0, doc)
        dst = next(n for n in doc["nodes"] if n["role"] == "primary" and n["id"] != src["id"])
        top = max(hi for lo, hi in src["slots"])
        tag = next(t for t in (b"t%d" % i for i in range(1 << 20)) if key_slot(t) == top)
        keys = [b"{%s}q%d" % (tag, i) for i in range(4)]
        other = _key_in(lambda s: _owns(src)(s) and s != top, b"stay")
        rs = redis.Redis(port=src["port"], socket_timeout=10)
        for k in keys + [other]:
            assert rs.set(k, b"v-" + k)
        assert _inject(rs, keys[0]) == 1

        def lost():     # the loss is processed (a 1 GiB page's salvage copy takes a while)
            try:
                rs.get(keys[0])
            except redis.exceptions.ResponseError as e:
                return "lost" in str(e).lower()
            return False
        wait_for(lost, 60, 0.1, "the injected key reported lost")
        wait_for(lambda: c.status()["healthy"], 30, 0.2, "the source serving again")
        r = subprocess.run(CLI + ["reshard", "--dir", c.dir, "--slots", "1", "--from",
                                  str(src["shard"]), "--to", str(dst["shard"]), "--timeout", "3"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "still migrating" in r.stderr, r.stdout + r.stderr
        wait_for(lambda: _cluster_info(src["port"])["kvstore_migrating_slots"] == "1" and
                 _cluster_info(dst["port"])["kvstore_importing_slots"] == "1", 30, 0.1,
                 "the slot migrating on the source, importing on the target")

        ask = b"-ASK %d 127.0.0.1:%d" % (top, dst["port"])
        new = b"{%s}new" % tag
        before = _fast(src["port"])
        got = _send(src["port"], [b"GET", keys[1]], [b"SET", new, b"n"], [b"GET", other])
        assert got == [ask, ask, b"v-" + other]
        assert _fast(src["port"]) == before      # none in C: the batch starts in the migrating slot
        before = _fast(src["port"])
        got = _send(src["port"], [b"GET", other], [b"GET", keys[1]])
        assert got == [b"v-" + other, ask]
        assert _fast(src["port"]) - before == 1
        # the SET was made nowhere
        assert _send(dst["port"], [b"ASKING"], [b"EXISTS", new]) == [b"+OK", b":0"]

        # the target: MOVED to the source without ASKING, the moved key with it
        moved = b"-MOVED %d 127.0.0.1:%d" % (top, src["port"])
        assert _send(dst["port"], [b"GET", keys[1]]) == [moved]
        assert _send(dst["port"], [b"ASKING"], [b"GET", keys[1]], [b"GET", keys[1]]) == [
            b"+OK", b"v-" + keys[1], moved]
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.down()


def test_replica_serves_readonly_gets_in_c_and_redirects_the_rest(tmp_path):
    c = Cluster(tmp_path / "ro", 1, 1)
    try:
        doc = c.wait_placed()
        prim = next(n for n in doc["nodes"] if n["role"] == "primary")
        rep = next(n for n in doc["nodes"] if n["role"] == "replica")
        key = b"ro-key"
        slot = key_slot(key)
        moved = b"-MOVED %d 127.0.0.1:%d" % (slot, prim["port"])
        pr = redis.Redis(port=prim["port"], socket_timeout=5)
        assert pr.set(key, b"v")
        assert pr.execute_command("WAIT", 1, 10000) == 1
        # a primary with a replica records its writes: SET goes through
        # Python there, GET still runs in C
        before = _fast(prim["port"])
        assert _send(prim["port"], [b"SET", key, b"v"], [b"GET", key]) == [b"+OK", b"v"]
        assert _fast(prim["port"]) - before == 0      # the batch starts with the SET
        before = _fast(prim["port"])
        assert _send(prim["port"], [b"GET", key], [b"GET", key]) == [b"v", b"v"]
        assert _fast(prim["port"]) - before == 2
        assert pr.execute_command("WAIT", 1, 10000) == 1

        # the replica: MOVED without READONLY, reads in C with it, writes MOVED
        before = _fast(rep["port"])
        assert _send(rep["port"], [b"GET", key]) == [moved]
        s = socket.create_connection(("127.0.0.1", rep["port"]), timeout=10)
        try:
            assert _send(rep["port"], [b"READONLY"], sock=s) == [b"+OK"]
            assert _send(rep["port"], [b"GET", key], [b"GET", key], [b"SET", key, b"w"],
                         [b"GET", key], sock=s) == [b"v", b"v", moved, b"v"]
            assert _fast(rep["port"]) - before == 2
            assert _send(rep["port"], [b"READWRITE"], [b"GET", key], sock=s) == [b"+OK", moved]
        finally:
            s.close()
        assert pr.get(key) == b"v"
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.down()
