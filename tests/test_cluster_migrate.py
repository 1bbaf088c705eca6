"""Resharding correctness with real servers, a real etcd and the native cluster client.

* **ASK through the native protocol.** While a slot is migrating (held in
  the middle of its move by the test-only ``KVSTORE_TEST_MIGRATE_HOLD``
  file, see server/cluster/migrate.py) ClusterClient and AsyncClusterClient
  read, write and delete keys already moved by following ASK (``asking``
  then the command on the target), pipelines and mget split by slot follow
  ASK per part. The client counts the ASKs it
  followed, the target counts the commands it served after ``asking``.
* **A delete through ASK is final.** A key moved, then deleted on the target
  through ASK, stays deleted when the source primary is killed with
  ``kill -9`` before its own delete of the moved key reached its replica
  (the hold file keeps those deletes from replicating) and the promoted
  replica finishes the move; a key written through ASK is not overwritten
  by the older copy the promoted replica still has; and the promoted
  replica serves none of those stale copies meanwhile.
* **Resharding with requirepass.** The migration connection authenticates
  with the node's credentials; a refused password is logged and retried,
  nothing is lost. With ``user default off`` in every node's ACL file the
  nodes replicate and move slots as ``--masteruser``; a target whose user
  lacks ``+kv.migrate`` is logged once (NOPERM) and keeps nothing.
"""

import asyncio
import json
import os
import signal
import subprocess
import time

import pytest

from etcdutil import needs_etcd
from kvstore.client import AsyncClusterClient, ClusterClient
from kvstore.slots import key_slot
from serverutil import store_available, wait_for
from test_cluster_server import CLI, Cluster

redis = pytest.importorskip("redis")

pytestmark = [needs_etcd,
              pytest.mark.skipif(not store_available(), reason="C engine not built")]


def _info(port, password=None, username=None):
    raw = redis.Redis(port=port, password=password, username=username,
                      socket_timeout=5).execute_command(
        "CLUSTER", "INFO")
    raw = raw.decode() if isinstance(raw, bytes) else raw
    return dict(line.split(":", 1) for line in raw.split("\r\n") if ":" in line)


def _count(port, slot, password=None):
    return redis.Redis(port=port, password=password, socket_timeout=5).execute_command(
        "CLUSTER", "COUNTKEYSINSLOT", slot)


def _tagged(slot, prefix, n):
    """``n`` keys of ``slot`` (one hash tag)."""
    tag = next(t for t in (f"t{i}" for i in range(1 << 20)) if key_slot(t.encode()) == slot)
    return [f"{{{tag}}}{prefix}{i}".encode() for i in range(n)]


def _start_move(c, src, dst, timeout="3"):
    """Mark the top slot of ``src`` migrating to ``dst``; the hold file keeps
    it migrating once drained, so the CLI gives up waiting (exit 1)."""
    r = subprocess.run(CLI + ["reshard", "--dir", c.dir, "--slots", "1", "--from",
                              str(src["shard"]), "--to", str(dst["shard"]), "--timeout", timeout],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 1 and "still migrating" in r.stderr, r.stdout + r.stderr


def _owner_is(c, slot, shard):
    doc = c.status()
    return any(n["role"] == "primary" and n["shard"] == shard and
               any(lo <= slot <= hi for lo, hi in n["slots"]) for n in doc["nodes"])


def _two_primaries(c):
    doc = c.wait_placed()
    src = c.primary_of(0, doc)
    dst = next(n for n in doc["nodes"] if n["role"] == "primary" and n["id"] != src["id"])
    return src, dst, max(hi for lo, hi in src["slots"])


def test_native_client_follows_ask_during_a_migration(tmp_path, monkeypatch):
    hold = tmp_path / "hold"
    hold.write_text("")
    monkeypatch.setenv("KVSTORE_TEST_MIGRATE_HOLD", str(hold))
    c = Cluster(tmp_path / "ask", 2, 0)
    cc = None
    try:
        src, dst, slot = _two_primaries(c)
        keys = _tagged(slot, "a", 12)
        other = [b"elsewhere:%d" % i for i in range(20)]     # slots that do not move
        vals = {k: b"v-" + k for k in keys + other}
        cc = ClusterClient([("127.0.0.1", c.base)], socket_timeout=5)
        cc.mput(vals)
        _start_move(c, src, dst)
        wait_for(lambda: _count(src["port"], slot) == 0 and _count(dst["port"], slot) == 12,
                 30, 0.1, "the slot's keys on the target")
        assert _info(src["port"])["kvstore_migrating_slots"] == "1"
        asked0 = int(_info(dst["port"])["kvstore_asked"])

        # reads of moved keys: ASK, then asking + get on the target
        for k in keys:
            assert cc.get(k) == vals[k]
        assert cc.redirects["ask"] >= len(keys) and cc.redirects["moved"] == 0
        # a new key and a delete, through ASK, land on the target
        new = _tagged(slot, "new", 1)[0]
        cc.put(new, b"fresh")
        assert cc.delete(keys[0]) is True
        assert cc.get(keys[0]) is None and cc.get(new) == b"fresh"
        assert _count(src["port"], slot) == 0 and _count(dst["port"], slot) == 12
        # mget and pipelines split by slot: each part follows its own ASK
        want = keys[1:6] + other
        assert cc.mget(want) == [vals[k] for k in want]
        with cc.pipeline() as p:
            p.get(keys[1]).put(keys[2], b"p2").get(other[0]).mget([keys[3], keys[4]])
            p.get(keys[2]).delete(keys[5]).exists(keys[5])
            res = p.execute()
        assert res[0] == vals[keys[1]] and res[2] == vals[other[0]]
        assert res[3] == [vals[keys[3]], vals[keys[4]]] and res[4] == b"p2"
        assert res[5] is True and res[6] is False
        assert cc.redirects["moved"] == 0
        served = int(_info(dst["port"])["kvstore_asked"]) - asked0
        assert served >= len(keys) + 8, served
        assert int(_info(src["port"])["kvstore_ask"]) >= served

        async def go():
            async with AsyncClusterClient([("127.0.0.1", c.base)], socket_timeout=5) as ac:
                assert await ac.get(keys[6]) == vals[keys[6]]
                assert await ac.mget([keys[7], keys[8], other[1]]) == \
                    [vals[keys[7]], vals[keys[8]], vals[other[1]]]
                await ac.put(keys[9], b"async")
                async with ac.pipeline() as p:
                    p.get(keys[9]).get(new).get(other[2])
                    assert await p.execute() == [b"async", b"fresh", vals[other[2]]]
                assert ac.redirects["ask"] >= 5 and ac.redirects["moved"] == 0
        asyncio.run(go())

        # the hold ends: the slot finishes, clients get MOVED and the target
        hold.unlink()
        wait_for(lambda: _owner_is(c, slot, dst["shard"]), 30, 0.2, "the move to finish")
        assert cc.get(keys[0]) is None and cc.get(new) == b"fresh"
        assert cc.get(keys[2]) == b"p2" and cc.get(keys[5]) is None
        assert cc.get(keys[9]) == b"async" and cc.get(keys[10]) == vals[keys[10]]
        assert cc.redirects["moved"] >= 1
    except BaseException:
        print(c.logs())
        raise
    finally:
        if cc is not None:
            cc.close()
        c.down()


def test_delete_through_ask_survives_kill9_of_the_source(tmp_path, monkeypatch):
    hold = tmp_path / "hold"
    hold.write_text("")
    monkeypatch.setenv("KVSTORE_TEST_MIGRATE_HOLD", str(hold))
    c = Cluster(tmp_path / "tomb", 2, 1)
    cc = None
    try:
        src, dst, slot = _two_primaries(c)
        doc = c.status()
        src_rep = next(n for n in doc["nodes"] if n["shard"] == src["shard"] and
                       n["role"] == "replica")
        keys = _tagged(slot, "d", 10)
        vals = {k: b"v-" + k for k in keys}
        cc = ClusterClient([("127.0.0.1", dst["port"])], socket_timeout=5,
                           cluster_retry_timeout=30)
        cc.mput(vals)
        wait_for(lambda: _count(src_rep["port"], slot) == 10, 20, 0.1, "the replica in sync")
        _start_move(c, src, dst)
        wait_for(lambda: _count(src["port"], slot) == 0 and _count(dst["port"], slot) == 10,
                 30, 0.1, "the slot's keys on the target")
        gone, rewritten = keys[0], keys[1]
        assert cc.delete(gone) is True                  # through ASK, on the target
        cc.put(rewritten, b"newer")
        assert cc.redirects["ask"] >= 2
        # the source's replica never heard of the moves: it still has them all
        assert _count(src_rep["port"], slot) == 10

        os.kill(src["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        # the promoted replica has the old copies; it serves none of them
        # and sends them to the target, which keeps the delete and the newer write
        deadline = time.monotonic() + 30
        reads = 0
        while time.monotonic() < deadline:
            assert cc.get(gone) is None
            assert cc.get(rewritten) == b"newer"
            reads += 1
            if c.primary_of(slot) and c.primary_of(slot)["id"] == src_rep["id"] and \
                    _count(src_rep["port"], slot) == 0:
                break
            time.sleep(0.05)
        assert _count(src_rep["port"], slot) == 0, c.logs()
        took = time.monotonic() - t0
        info_dst = _info(dst["port"])
        assert int(info_dst["kvstore_migrate_stale_refused"]) >= 1
        assert _count(dst["port"], slot) == 9

        hold.unlink()
        wait_for(lambda: _owner_is(c, slot, dst["shard"]), 30, 0.2, "the move to finish")
        assert cc.get(gone) is None
        assert cc.get(rewritten) == b"newer"
        for k in keys[2:]:
            assert cc.get(k) == vals[k]
        assert _count(dst["port"], slot) == 9
        print(f"\nsource killed mid-move; its replica reconciled the slot in {took:.2f} s "
              f"({reads} reads checked meanwhile)")
    except BaseException:
        print(c.logs())
        raise
    finally:
        if cc is not None:
            cc.close()
        c.down()


def test_reshard_with_requirepass(tmp_path, monkeypatch):
    pw = "s3cret-cluster"
    monkeypatch.setenv("KVSTORE_REQUIREPASS", pw)
    c = Cluster(tmp_path / "auth", 2, 0)
    cc = None
    try:
        src, dst, slot = _two_primaries(c)
        cc = ClusterClient([("127.0.0.1", c.base)], password=pw, socket_timeout=5)
        keys = _tagged(slot, "p", 200)
        vals = {k: b"v-" + k for k in keys}
        cc.mput(vals)
        r = subprocess.run(CLI + ["reshard", "--dir", c.dir, "--slots", "1", "--from",
                                  str(src["shard"]), "--to", str(dst["shard"]),
                                  "--timeout", "60"],
                           capture_output=True, text=True, timeout=90)
        assert r.returncode == 0 and "1/1 slots moved" in r.stdout, r.stdout + r.stderr
        assert _owner_is(c, slot, dst["shard"])
        assert _count(src["port"], slot, pw) == 0 and _count(dst["port"], slot, pw) == 200
        assert cc.mget(keys) == [vals[k] for k in keys]
        assert int(_info(src["port"], pw)["kvstore_migrate_keys_moved"]) == 200

        # a new shard whose node has another password: the move to it is
        # refused at AUTH, logged as such, and loses nothing
        monkeypatch.setenv("KVSTORE_REQUIREPASS", "another-password")
        r = subprocess.run(CLI + ["add-node", "--dir", c.dir, "--new-shard"],
                           capture_output=True, text=True, timeout=90)
        assert r.returncode == 0, r.stdout + r.stderr
        doc = c.status()
        new = next(n for n in doc["nodes"] if n["shard"] not in (src["shard"], dst["shard"]))
        slot2 = max(hi for lo, hi in c.primary_of(0, doc)["slots"])
        keys2 = _tagged(slot2, "q", 50)
        cc.mput({k: k for k in keys2})
        r = subprocess.run(CLI + ["reshard", "--dir", c.dir, "--slots", "1", "--from",
                                  str(src["shard"]), "--to", str(new["shard"]),
                                  "--timeout", "3"],
                           capture_output=True, text=True, timeout=90)
        assert r.returncode == 1 and "still migrating" in r.stderr, r.stdout + r.stderr
        log = c.logs(1 << 22)
        assert "event=migrate_auth_refused" in log, log[-3000:]
        assert int(_info(src["port"], pw)["kvstore_migrate_auth_failures"]) >= 1
        assert _count(src["port"], slot2, pw) == 50
        assert cc.mget(keys2) == keys2
        assert cc.mget(keys) == [vals[k] for k in keys]
    except BaseException:
        print(c.logs())
        raise
    finally:
        if cc is not None:
            cc.close()
        c.down()


def test_reshard_as_the_masteruser_with_the_default_user_off(tmp_path):
    """Every node loads an ACL file with ``user default off`` and talks to the
    others as ``repl`` (``--masteruser``/``--masterauth`` in the servers'
    config file): the replica links up, a slot moves with its keys; a node
    given a user without ``+kv.migrate`` cannot move keys to it, the refusal
    is logged and nothing is lost."""
    acl = tmp_path / "users.acl"
    acl.write_text("user default off\n"
                   "user admin on >adminpw ~* &* +@all\n"
                   "user repl on >replpw ~* +sync +kv.fetch +ping +kv.migrate +wait\n"
                   "user norepl on >replpw ~* +sync +kv.fetch +ping +wait\n")
    conf = tmp_path / "node.toml"
    conf.write_text(f'aclfile = "{acl}"\nmasteruser = "repl"\nmasterauth = "replpw"\n')
    admin = dict(username="admin", password="adminpw")
    c = Cluster(tmp_path / "acl", 2, 1, "--server-config", str(conf))
    cc = None
    try:
        src, dst, slot = _two_primaries(c)
        doc = c.status()
        assert all(n["alive"] and n["role"] != "none" for n in doc["nodes"])
        cc = ClusterClient([("127.0.0.1", c.base)], socket_timeout=5, **admin)
        keys = _tagged(slot, "m", 100)
        vals = {k: b"v-" + k for k in keys}
        cc.mput(vals)
        # the source shard's replica streams as repl
        rep = next(n for n in doc["nodes"] if n["role"] == "replica" and n["shard"] == src["shard"])
        rr = redis.Redis(port=rep["port"], socket_timeout=5, **admin)
        wait_for(lambda: rr.info("replication")["master_link_status"] == "up", 20, 0.2,
                 "replica link up as repl")
        r = subprocess.run(CLI + ["reshard", "--dir", c.dir, "--slots", "1", "--from",
                                  str(src["shard"]), "--to", str(dst["shard"]),
                                  "--timeout", "60"],
                           capture_output=True, text=True, timeout=90)
        assert r.returncode == 0 and "1/1 slots moved" in r.stdout, r.stdout + r.stderr
        count = lambda port: redis.Redis(port=port, socket_timeout=5, **admin).execute_command(  # noqa: E731
            "CLUSTER", "COUNTKEYSINSLOT", slot)
        assert count(src["port"]) == 0 and count(dst["port"]) == 100
        assert cc.mget(keys) == [vals[k] for k in keys]
        log = c.logs(1 << 22)
        assert "event=migrate_auth_refused" not in log and "event=primary_auth_refused" not in log

        # the target's repl user may not run kv.migrate: refused, logged, kept
        acl2 = tmp_path / "users2.acl"
        acl2.write_text(acl.read_text().replace("+kv.migrate +wait\n", "+wait\n", 1))
        conf2 = tmp_path / "node2.toml"
        conf2.write_text(f'aclfile = "{acl2}"\nmasteruser = "repl"\nmasterauth = "replpw"\n')
        st = json.load(open(os.path.join(c.dir, "cluster.json")))
        st["server_config"] = str(conf2)
        json.dump(st, open(os.path.join(c.dir, "cluster.json"), "w"))
        r = subprocess.run(CLI + ["add-node", "--dir", c.dir, "--new-shard"],
                           capture_output=True, text=True, timeout=90)
        assert r.returncode == 0, r.stdout + r.stderr
        doc = c.status()
        new = next(n for n in doc["nodes"] if n["shard"] not in (src["shard"], dst["shard"]))
        slot2 = max(hi for lo, hi in c.primary_of(0, doc)["slots"])
        keys2 = _tagged(slot2, "q", 30)
        cc.mput({k: k for k in keys2})
        r = subprocess.run(CLI + ["reshard", "--dir", c.dir, "--slots", "1", "--from",
                                  str(src["shard"]), "--to", str(new["shard"]),
                                  "--timeout", "3"],
                           capture_output=True, text=True, timeout=90)
        assert r.returncode == 1 and "still migrating" in r.stderr, r.stdout + r.stderr
        log = c.logs(1 << 22)
        refused = [ln for ln in log.splitlines() if "event=migrate_auth_refused" in ln]
        assert len(refused) == 1, log[-3000:]       # once, not at every retry
        assert f"target=127.0.0.1:{new['port']}" in refused[0] and "NOPERM" in refused[0]
        assert int(_info(src["port"], **admin)["kvstore_migrate_auth_failures"]) >= 2
        assert count(src["port"]) == 0
        assert redis.Redis(port=src["port"], socket_timeout=5, **admin).execute_command(
            "CLUSTER", "COUNTKEYSINSLOT", slot2) == 30
        assert cc.mget(keys2) == keys2
    except BaseException:
        print(c.logs())
        raise
    finally:
        if cc is not None:
            cc.close()
        c.down()
