"""Online resharding end to end: real servers, a real etcd, ``kvstore-cluster reshard``.

* slots move from one shard to another under a redis-py ``RedisCluster``
  load (it follows ASK and MOVED) while memory errors are injected into
  keys of the moving slots on the source primary; afterwards every
  acknowledged write reads back, every key lives in exactly one shard (the
  one owning its slot), no key nobody wrote exists, and each replica's
  KV.DIGEST equals its primary's; CLUSTER COUNTKEYSINSLOT / GETKEYSINSLOT
  agree before, during and after;
* ``kill -9`` of the source or of the target primary in the middle of a
  move: its replica takes over, the move resumes and finishes, nothing is
  lost or duplicated;
* a key lost on the source with no replica to rebuild it from is not moved
  and not dropped: the slot stays migrating and the key is reported lost;
* ``add-node --new-shard`` then ``reshard --rebalance`` spreads the slots.
"""

import os
import random
import signal
import subprocess
import threading
import time

import pytest

from kvstore.server.cluster.slots import SLOTS, key_slot
from etcdutil import needs_etcd
from serverutil import store_available, wait_for
from test_cluster_server import CLI, Cluster

redis = pytest.importorskip("redis")
import redis.cluster  # noqa: E402

pytestmark = [needs_etcd,
              pytest.mark.skipif(not store_available(), reason="C engine not built")]


def _rc(port):
    return redis.cluster.RedisCluster(host="127.0.0.1", port=port, socket_timeout=5)


def _preload(rc, keys, prefix="v"):
    vals = {}
    for i in range(0, len(keys), 500):
        p = rc.pipeline()
        for k in keys[i:i + 500]:
            vals[k] = f"{prefix}-{k}".encode()
            p.set(k, vals[k])
        p.execute()
    return vals


def _in(slot, ranges):
    return any(lo <= slot <= hi for lo, hi in ranges)


def _inject(r, key):
    """A memory error in ``key``'s record; 0 when it was lost already (a
    neighbour's error took its subpage too) or has just moved away."""
    try:
        r.execute_command("KV.INJECT", "ao", "KEY", key)
        return 1
    except redis.exceptions.ResponseError as e:
        if "LOST" in str(e) or "no such key" in str(e).lower() or "absent" in str(e).lower():
            return 0
        raise


def _cluster_info(port):
    raw = redis.Redis(port=port, socket_timeout=5).execute_command("CLUSTER", "INFO")
    raw = raw.decode() if isinstance(raw, bytes) else raw
    return dict(line.split(":", 1) for line in raw.split("\r\n") if ":" in line)


def _check_placement(c, expect_present):
    """Every key on exactly one primary, the one owning its slot; nothing else."""
    doc = c.status()
    where = {}
    for n in doc["nodes"]:
        if n["role"] != "primary":
            continue
        for k in redis.Redis(port=n["port"], socket_timeout=10).keys("*"):
            k = k.decode()
            assert k not in where, f"{k} is on two primaries ({where[k]} and shard {n['shard']})"
            where[k] = n["shard"]
            assert _in(key_slot(k.encode()), n["slots"]), \
                f"{k} (slot {key_slot(k.encode())}) on shard {n['shard']} which does not own it"
    extra = set(where) - expect_present
    missing = expect_present - set(where)
    assert not extra, f"keys nobody wrote (or deleted ones back): {sorted(extra)[:10]}"
    assert not missing, f"keys missing: {sorted(missing)[:10]}"
    return doc


def _replicas_equal(c):
    doc = c.status()
    by_shard = {}
    for n in doc["nodes"]:
        by_shard.setdefault(n["shard"], []).append(n)

    def same():
        for nodes in by_shard.values():
            ds = {redis.Redis(port=n["port"], socket_timeout=10).execute_command("KV.DIGEST")[0]
                  for n in nodes if n["alive"]}
            if len(ds) != 1:
                return False
        return True
    wait_for(same, 30, 0.3, "every replica's KV.DIGEST equal to its primary's")


class _Writer(threading.Thread):
    """Sets (unique values) and deletes keys of its own; remembers what may be there."""

    def __init__(self, port, keys, vals, seed):
        super().__init__(daemon=True)
        self.rc = _rc(port)
        self.keys = keys
        self.allowed = {k: {vals[k]} for k in keys}    # what a read may return now
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.acked = 0
        self.failed = 0
        self.n = 0

    def run(self):
        while not self.stop.is_set():
            k = self.rng.choice(self.keys)
            self.n += 1
            new = None if self.rng.random() < 0.1 else f"w{self.n}-{k}".encode()
            try:
                if new is None:
                    self.rc.delete(k)
                else:
                    self.rc.set(k, new)
            except redis.exceptions.RedisError:
                self.failed += 1
                self.allowed[k].add(new)       # may or may not have been applied
                time.sleep(0.05)
                continue
            self.allowed[k] = {new}
            self.acked += 1


def test_reshard_under_load_with_memory_errors(tmp_path):
    c = Cluster(tmp_path / "rs", 2, 1, "--enable-fault-injection")
    try:
        doc = c.wait_placed()
        src = c.primary_of(0, doc)
        dst = next(n for n in doc["nodes"] if n["role"] == "primary" and n["id"] != src["id"])
        move = sorted(s for lo, hi in src["slots"] for s in range(lo, hi + 1))[-4096:]
        moving = set(move)
        rc = _rc(c.base)
        keys = [f"k{i}" for i in range(16000)]
        vals = _preload(rc, keys)
        in_move = [k for k in keys if key_slot(k.encode()) in moving]
        assert len(in_move) > 2000
        # the writers use their own keys, half of them in the moving slots
        wkeys = [f"w{i}" for i in range(600)]
        wvals = _preload(rc, wkeys, "w0")
        writers = [_Writer(c.base, wkeys[i::2], wvals, i) for i in range(2)]
        _replicas_equal(c)

        # a slot to watch with CLUSTER COUNTKEYSINSLOT / GETKEYSINSLOT
        watch = key_slot(in_move[0].encode())
        watch_keys = {k for k in keys if key_slot(k.encode()) == watch}
        s_src = redis.Redis(port=src["port"], socket_timeout=10)
        s_dst = redis.Redis(port=dst["port"], socket_timeout=10)
        assert s_src.execute_command("CLUSTER", "COUNTKEYSINSLOT", watch) == len(watch_keys)
        assert s_dst.execute_command("CLUSTER", "COUNTKEYSINSLOT", watch) == 0

        # memory errors before the move starts: the source must rebuild these
        pre_lost = in_move[:40]
        for k in pre_lost:
            _inject(s_src, k)

        for w in writers:
            w.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        p = subprocess.Popen(CLI + ["reshard", "--dir", c.dir, "--slots", str(len(move)),
                                    "--from", str(src["shard"]), "--to", str(dst["shard"]),
                                    "--timeout", "60"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        injected, samples = 0, []
        rng = random.Random(7)
        while p.poll() is None and time.monotonic() - t0 < 120:
            # memory errors on keys of the moving slots still on the source
            s = rng.choice(move)
            try:
                ks = s_src.execute_command("CLUSTER", "GETKEYSINSLOT", s, 3)
                for k in ks:
                    injected += _inject(s_src, k)
                n_src = s_src.execute_command("CLUSTER", "COUNTKEYSINSLOT", watch)
                got = s_src.execute_command("CLUSTER", "GETKEYSINSLOT", watch, 1000)
                samples.append(n_src)
                # nothing writes these keys: the count only goes down as they move
                assert {k.decode() for k in got} <= watch_keys and len(got) <= n_src
            except redis.exceptions.ResponseError as e:
                if "LOST" not in str(e) and "lost" not in str(e):
                    raise
            time.sleep(0.01)
        out, err = p.communicate(timeout=120)
        took = time.monotonic() - t0
        assert p.returncode == 0, out + err
        assert "4096/4096 slots moved" in out and "reshard done" in out, out
        time.sleep(0.5)
        for w in writers:
            w.stop.set()
        for w in writers:
            w.join(30)
        print(f"\nmoved {len(move)} slots ({len(in_move)} keys + writers' keys) in {took:.2f} s "
              f"under load ({sum(w.acked for w in writers)} writes acked, "
              f"{sum(w.failed for w in writers)} failed), {injected} memory errors injected "
              f"during the move, COUNTKEYSINSLOT samples at the source: {samples[:3]}...{samples[-3:]}")
        assert sum(w.acked for w in writers) > 100

        # the map: the slots now belong to the target, nothing is migrating
        doc = c.status()
        new_src = next(n for n in doc["nodes"] if n["id"] == src["id"])
        new_dst = next(n for n in doc["nodes"] if n["id"] == dst["id"])
        assert not any(_in(s, new_src["slots"]) for s in move)
        assert all(_in(s, new_dst["slots"]) for s in move)
        assert _cluster_info(src["port"])["kvstore_migrating_slots"] == "0"
        # (summed over the source shard: under load its primary may have failed over)
        moved = sum(int(_cluster_info(n["port"])["kvstore_migrate_keys_moved"])
                    for n in doc["nodes"] if n["shard"] == src["shard"] and n["alive"])
        assert moved >= len(in_move), doc

        # every acknowledged write reads back; the rebuilt keys are right
        rc2 = _rc(c.base)
        wrong = [(k, rc2.get(k)) for k in keys if rc2.get(k) != vals[k]]
        assert not wrong, f"wrong values after the move: {wrong[:5]}"
        present = set(keys)
        for w in writers:
            for k, allowed in w.allowed.items():
                got = rc2.get(k)
                assert got in allowed, f"{k}: read {got!r}, acknowledged {allowed!r}"
                if got is not None:
                    present.add(k)
        # no key in two shards, none nobody wrote, every one where its slot is
        _check_placement(c, present)
        _replicas_equal(c)
        assert s_src.execute_command("CLUSTER", "COUNTKEYSINSLOT", watch) == 0
        assert s_src.execute_command("CLUSTER", "GETKEYSINSLOT", watch, 10) == []
        assert s_dst.execute_command("CLUSTER", "COUNTKEYSINSLOT", watch) == len(watch_keys)
        # the source now answers MOVED for a moved slot
        with pytest.raises(redis.exceptions.MovedError):
            s_src.get(in_move[0])
        # the keys lost before the move were rebuilt from the replica, then moved
        for k in pre_lost:
            assert rc2.get(k) == vals[k]
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.down()


@pytest.mark.parametrize("victim", ["source", "target"])
def test_reshard_survives_kill9_of_a_primary(tmp_path, victim):
    c = Cluster(tmp_path / "rk", 2, 1)
    try:
        doc = c.wait_placed()
        src = c.primary_of(0, doc)
        dst = next(n for n in doc["nodes"] if n["role"] == "primary" and n["id"] != src["id"])
        move = sorted(s for lo, hi in src["slots"] for s in range(lo, hi + 1))
        rc = _rc(c.base)
        keys = [f"k{i}" for i in range(30000)]
        vals = _preload(rc, keys)
        _replicas_equal(c)
        p = subprocess.Popen(CLI + ["reshard", "--dir", c.dir, "--slots", str(len(move)),
                                    "--from", str(src["shard"]), "--to", str(dst["shard"]),
                                    "--timeout", "60"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: int(_cluster_info(src["port"]).get("kvstore_migrate_keys_moved", 0))
                 > 500, 60, 0.01, "keys moving")
        dead = src if victim == "source" else dst
        os.kill(dead["pid"], signal.SIGKILL)
        t_kill = time.monotonic()
        out, err = p.communicate(timeout=180)
        took = time.monotonic() - t_kill
        assert p.returncode == 0, out + err + c.logs()
        print(f"\n{victim} primary killed mid-move; the move finished {took:.2f} s later")
        doc = c.status()
        new_src = next(n for n in doc["nodes"] if n["role"] == "primary" and
                       n["shard"] == src["shard"])
        new_dst = next(n for n in doc["nodes"] if n["role"] == "primary" and
                       n["shard"] == dst["shard"])
        assert dead["id"] not in (new_src["id"], new_dst["id"])
        assert not new_src["slots"] and new_dst["slots"] == [[0, SLOTS - 1]]
        rc2 = _rc(new_dst["port"])
        wrong = [(k, rc2.get(k)) for k in keys if rc2.get(k) != vals[k]]
        assert not wrong, f"wrong or missing after the move: {wrong[:5]}"
        _check_placement(c, set(keys))
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.down()


def test_key_lost_without_replica_stays_and_blocks_its_slot(tmp_path):
    c = Cluster(tmp_path / "rl", 2, 0, "--enable-fault-injection")
    try:
        doc = c.wait_placed()
        src = c.primary_of(0, doc)
        dst = next(n for n in doc["nodes"] if n["role"] == "primary" and n["id"] != src["id"])
        rc = _rc(c.base)
        top = max(hi for lo, hi in src["slots"])
        tag = next(t for t in (f"t{i}" for i in range(1 << 20)) if key_slot(t.encode()) == top)
        keys = [f"{{{tag}}}q{i}" for i in range(5)]
        vals = _preload(rc, keys)
        s_src = redis.Redis(port=src["port"], socket_timeout=10)
        assert _inject(s_src, keys[0]) == 1
        r = subprocess.run(CLI + ["reshard", "--dir", c.dir, "--slots", "1", "--from",
                                  str(src["shard"]), "--to", str(dst["shard"]), "--timeout", "3"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "still migrating" in r.stderr, r.stdout + r.stderr
        # the other keys moved; the lost one stayed, still reported lost, not missing
        assert s_src.execute_command("CLUSTER", "COUNTKEYSINSLOT", top) == 1
        with pytest.raises(redis.exceptions.ResponseError, match="(?i)lost"):
            s_src.get(keys[0])
        s_dst = redis.Redis(port=dst["port"], socket_timeout=10)
        assert s_dst.execute_command("CLUSTER", "COUNTKEYSINSLOT", top) == 4
        for k in keys[1:]:
            assert rc.get(k) == vals[k]
        assert int(_cluster_info(src["port"])["kvstore_migrate_lost_waits"]) > 0
        doc = c.status()
        assert _in(top, next(n for n in doc["nodes"] if n["id"] == src["id"])["slots"])
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.down()


def test_add_node_new_shard_then_rebalance(tmp_path):
    c = Cluster(tmp_path / "rb", 1, 1)
    try:
        c.wait_placed()
        rc = _rc(c.base)
        keys = [f"b{i}" for i in range(3000)]
        vals = _preload(rc, keys)
        r = subprocess.run(CLI + ["add-node", "--dir", c.dir, "--new-shard"],
                           capture_output=True, text=True, timeout=90)
        assert r.returncode == 0 and "primary of shard 1" in r.stdout, r.stdout + r.stderr
        r = subprocess.run(CLI + ["reshard", "--dir", c.dir, "--rebalance"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "8192/8192 slots moved" in r.stdout, r.stdout + r.stderr
        doc = c.status()
        prims = [n for n in doc["nodes"] if n["role"] == "primary"]
        assert sorted(sum(hi - lo + 1 for lo, hi in n["slots"]) for n in prims) == [8192, 8192]
        assert doc["healthy"]
        rc2 = _rc(c.base)
        assert [k for k in keys if rc2.get(k) != vals[k]] == []
        _check_placement(c, set(keys))
        r = subprocess.run(CLI + ["reshard", "--dir", c.dir, "--rebalance"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "balanced" in r.stdout
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.down()
