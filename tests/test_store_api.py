"""The embedded Store's API without faults: DESIGN.md section 9 and issue 3.

Every test runs on 4 KiB memfd backing (always available) under both
simulated kernel policies; the 2 MiB-backed variant at the bottom repeats the
basic round trip on hugepages when they can be reserved.
"""

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import kvstore
from storeutil import open_2m, reserved_2m

POLICIES = ["keep_ue", "mainline"]


@pytest.fixture(params=POLICIES)
def store(request):
    s = kvstore.Store("4MiB", page_size="4K", kernel_policy=request.param, recovery="manual")
    yield s
    s.close()


# ---------------------------------------------------------------- basics

def test_put_get_delete_exists(store):
    assert store.get(b"a") is None
    assert not store.exists(b"a") and b"a" not in store
    v = store.put(b"a", b"1")
    assert isinstance(v, int) and v > 0
    assert store.get(b"a") == b"1"
    assert store.exists(b"a") and b"a" in store
    assert len(store) == 1
    assert store.delete(b"a") is True
    assert store.delete(b"a") is False
    assert store.get(b"a") is None
    assert len(store) == 0


def test_overwrite_changes_value_and_length(store):
    store.put(b"k", b"short")
    store.put(b"k", b"a much longer value than before" * 10)
    assert store.get(b"k") == b"a much longer value than before" * 10
    store.put(b"k", b"")
    assert store.get(b"k") == b""
    assert len(store) == 1


def test_versions_increase(store):
    versions = [store.put(b"k%d" % (i % 5), b"v%d" % i) for i in range(50)]
    assert versions == sorted(versions) and len(set(versions)) == 50
    ver, val = store.get_versioned(b"k4")
    assert (ver, val) == (versions[49], b"v49")
    assert store.get_versioned(b"nope") is None
    assert store.stats()["version"] == versions[-1]


def test_get_returns_bytes_copy(store):
    store.put(b"k", b"value")
    got = store.get(b"k")
    assert type(got) is bytes
    store.put(b"k", b"other")
    assert got == b"value"


def test_bytes_like_keys_and_values(store):
    store.put(bytearray(b"ba"), memoryview(b"mv-value"))
    assert store.get(b"ba") == b"mv-value"
    assert store.get(memoryview(b"ba")) == b"mv-value"
    assert store.get(bytearray(b"ba")) == b"mv-value"
    assert bytearray(b"ba") in store
    store.put(b"k2", bytearray(b"\x00\xff" * 100))
    assert store.get(b"k2") == b"\x00\xff" * 100
    # a non-contiguous view is copied, not misread
    mv = memoryview(b"abcdefgh")[::2]
    try:
        store.put(b"k3", mv)
    except (TypeError, ValueError, BufferError):
        pass
    else:
        assert store.get(b"k3") == b"aceg"


def test_empty_key_and_value(store):
    store.put(b"", b"")
    assert store.get(b"") == b""
    assert b"" in store
    store.put(b"", b"x")
    assert store.get(b"") == b"x"
    store.put(b"e", b"")
    assert store.get(b"e") == b""        # empty, not None
    assert store.exists(b"e")
    assert store.delete(b"")


def test_binary_and_all_byte_values(store):
    key = bytes(range(256))
    val = bytes(range(256)) * 7
    store.put(key, val)
    assert store.get(key) == val


@pytest.mark.parametrize("bad", ["text", 12, None, 3.5, ["x"]])
def test_key_type_errors(store, bad):
    with pytest.raises(TypeError) as ei:
        store.put(bad, b"v")
    if isinstance(bad, str):
        assert "encode" in str(ei.value)
    with pytest.raises(TypeError):
        store.get(bad)
    with pytest.raises(TypeError):
        store.delete(bad)
    with pytest.raises(TypeError):
        store.exists(bad)
    assert len(store) == 0


def test_str_value_type_error_with_hint(store):
    with pytest.raises(TypeError, match="encode"):
        store.put(b"k", "text")
    assert store.get(b"k") is None


def test_key_too_large():
    with kvstore.Store("1MiB", page_size="4K", max_key=100, recovery="manual") as s:
        s.put(b"k" * 100, b"ok")
        with pytest.raises(kvstore.KeyTooLargeError) as ei:
            s.put(b"k" * 101, b"v")
        assert isinstance(ei.value, ValueError) and isinstance(ei.value, kvstore.Error)
        with pytest.raises(kvstore.KeyTooLargeError):
            s.get(b"k" * 101)
        assert s.get(b"k" * 100) == b"ok"


def test_default_key_limit_is_64k():
    with kvstore.Store("1MiB", page_size="4K", recovery="manual") as s:
        s.put(b"k" * 65536, b"v")
        assert s.get(b"k" * 65536) == b"v"
        with pytest.raises(kvstore.KeyTooLargeError):
            s.put(b"k" * 65537, b"v")


def test_value_too_large_with_max_value():
    with kvstore.Store("1MiB", page_size="4K", max_value=1000, recovery="manual") as s:
        s.put(b"k", b"v" * 1000)
        with pytest.raises(kvstore.ValueTooLargeError) as ei:
            s.put(b"k", b"v" * 1001)
        assert isinstance(ei.value, ValueError)
        assert s.get(b"k") == b"v" * 1000          # the old value stays
        with pytest.raises(kvstore.ValueTooLargeError):
            s.put(b"new", b"v" * 1001)
        assert b"new" not in s
        assert s.stats()["max_value"] == 1000


def test_bad_constructor_arguments():
    with pytest.raises(ValueError):
        kvstore.Store("1MiB", page_size="4K", recovery="sometimes")
    with pytest.raises(TypeError):
        kvstore.Store("1MiB", page_size="4K", rebuild_source=42)
    with pytest.raises((ValueError, TypeError)):
        kvstore.Store("lots", page_size="4K")
    with pytest.raises((ValueError, kvstore.Error)):
        kvstore.Store("1MiB", page_size="3K")
    with pytest.raises((ValueError, kvstore.Error)):
        kvstore.Store("1MiB", page_size="4K", kernel_policy="lenient")


# ---------------------------------------------------------------- batches

def test_mget_mput(store):
    versions = store.mput({b"a": b"1", b"b": b"2"})
    assert len(versions) == 2 and versions[0] < versions[1]
    more = store.mput([(b"c", b"3"), (bytearray(b"d"), memoryview(b"4"))])
    assert more[0] > versions[1]
    assert store.mget([b"a", b"x", b"d", b"c", b"b"]) == [b"1", None, b"4", b"3", b"2"]
    assert store.mget(iter([b"a"])) == [b"1"]
    assert store.mget([]) == []
    assert store.mput([]) == []
    with pytest.raises(ValueError):
        store.mget([b"a"], on_lost="ignore")


def test_mput_checks_everything_before_writing():
    with kvstore.Store("1MiB", page_size="4K", max_value=10, recovery="manual") as s:
        with pytest.raises(kvstore.ValueTooLargeError):
            s.mput([(b"a", b"1"), (b"b", b"x" * 11)])
        with pytest.raises(TypeError):
            s.mput([(b"a", b"1"), ("b", b"2")])
        with pytest.raises(TypeError):
            s.mput([(b"a", b"1", b"extra")])
        assert len(s) == 0 and s.get(b"a") is None


def test_keys_len_flush(store):
    want = {b"k%d" % i for i in range(300)}
    for k in want:
        store.put(k, k * 3)
    assert set(store.keys()) == want and len(store.keys()) == 300
    assert len(store) == 300
    used = store.stats()["used"]
    assert used >= sum(len(k) * 3 for k in want)
    store.flush()
    assert len(store) == 0 and store.keys() == []
    assert store.get(b"k1") is None
    st = store.stats()
    assert st["keys"] == 0 and st["used"] == 0
    store.put(b"after", b"flush")
    assert store.get(b"after") == b"flush"


def test_locate(store):
    store.put(b"a", b"x" * 100)
    off, length = store.locate(b"a")
    assert length >= 100 and off >= 0
    assert off // 4096 == (off + length - 1) // 4096       # a small record never straddles
    with pytest.raises(KeyError):
        store.locate(b"absent")


def test_stats_has_design_keys(store):
    store.put(b"k", b"v")
    st = store.stats()
    for name in ("backing", "page_size", "keep_ue", "kernel_policy", "capacity", "used", "keys",
                 "lost_subpages", "lost_keys", "rebuilt_keys", "unrecoverable_keys", "faults_injected",
                 "signals_ao", "signals_ar", "expired_keys", "compactions", "records_moved",
                 "scrub_found", "keys_lost_total", "index_bytes", "allocator_bytes"):
        assert name in st, name
    assert st["backing"] == "memfd-4K" and st["page_size"] == "4K"
    assert st["capacity"] == 4 << 20
    assert st["keys"] == 1 and st["lost_keys"] == 0
    assert st["kernel_policy"] in POLICIES


def test_capacity_sizes():
    for cap, want in (("1MiB", 1 << 20), (65536, 65536), ("64KiB", 65536)):
        with kvstore.Store(cap, page_size="4K", recovery="manual") as s:
            assert s.stats()["capacity"] == want


# ---------------------------------------------------------------- TTL

def test_put_with_ttl_expires_lazily(store):
    store.put(b"t", b"v", ttl=0.15)
    store.put(b"p", b"v")
    left = store.ttl(b"t")
    assert 0 < left <= 0.15
    assert store.ttl(b"p") == -1
    assert store.ttl(b"absent") == -2
    time.sleep(0.25)
    assert store.get(b"t") is None
    assert b"t" not in store
    assert store.ttl(b"t") == -2
    assert store.get(b"p") == b"v"
    assert store.stats()["expired_keys"] >= 1


def test_ttl_rejects_bad_values(store):
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError):
            store.put(b"k", b"v", ttl=bad)
    with pytest.raises(TypeError):
        store.put(b"k", b"v", ttl="10")
    assert b"k" not in store


def test_expire_ttl_persist(store):
    assert store.expire(b"absent", 10) is False
    store.put(b"k", b"v")
    assert store.persist(b"k") is False          # had no expiry
    assert store.expire(b"k", 10) is True
    assert 9 < store.ttl(b"k") <= 10.002     # whole milliseconds, rounded up
    assert store.persist(b"k") is True
    assert store.ttl(b"k") == -1
    assert store.expire(b"k", 0.1) is True
    time.sleep(0.2)
    assert store.get(b"k") is None and store.ttl(b"k") == -2


def test_expire_non_positive_deletes(store):
    store.put(b"k", b"v")
    assert store.expire(b"k", 0) is True
    assert b"k" not in store


def test_plain_put_clears_ttl(store):
    store.put(b"k", b"v", ttl=100)
    assert store.ttl(b"k") > 0
    store.put(b"k", b"v2")
    assert store.ttl(b"k") == -1


def test_keys_skips_expired(store):
    store.put(b"short", b"v", ttl=0.05)
    store.put(b"long", b"v")
    time.sleep(0.1)
    assert store.keys() == [b"long"]


def test_background_sweep_frees_space():
    with kvstore.Store("4MiB", page_size="4K", recovery="thread", maintenance_interval=0.01) as s:
        s.put(b"keep", b"k" * 50)
        n = 2000
        for i in range(n):
            s.put(b"ttl%d" % i, b"x" * 200, ttl=0.1)
        used_full = s.stats()["used"]
        assert used_full >= n * 200
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and s.stats()["expired_keys"] < n:
            time.sleep(0.02)
        st = s.stats()
        # nobody read the expired keys: the background sweep removed them
        assert st["expired_keys"] == n
        assert st["keys"] == 1 and st["keys_with_ttl"] == 0
        assert st["used"] < used_full - n * 200
        assert s.get(b"keep") == b"k" * 50


def test_manual_maintain_sweeps():
    with kvstore.Store("1MiB", page_size="4K", recovery="manual") as s:
        for i in range(100):
            s.put(b"t%d" % i, b"v", ttl=0.05)
        time.sleep(0.1)
        assert s.stats()["keys"] == 100          # no reads, no sweep yet
        s.maintain()
        assert s.stats()["keys"] == 0 and s.stats()["expired_keys"] == 100


# ---------------------------------------------------------------- lifecycle

def test_close_idempotent_and_closed_error():
    s = kvstore.Store("1MiB", page_size="4K")
    s.put(b"k", b"v")
    s.close()
    s.close()
    assert s.closed
    for call in (lambda: s.get(b"k"), lambda: s.put(b"k", b"v"), lambda: s.delete(b"k"),
                 lambda: s.mget([b"k"]), lambda: s.mput({b"k": b"v"}), lambda: s.keys(),
                 lambda: len(s), lambda: b"k" in s, lambda: s.stats(), lambda: s.locate(b"k"),
                 lambda: s.expire(b"k", 1), lambda: s.ttl(b"k"), lambda: s.flush(),
                 lambda: s.faults.inject(0, "ao"), lambda: s.wait_recovered(0.1)):
        with pytest.raises(kvstore.ClosedError):
            call()
    assert issubclass(kvstore.ClosedError, ValueError)
    assert "closed" in repr(s)


def test_context_manager():
    with kvstore.Store("1MiB", page_size="4K") as s:
        s.put(b"k", b"v")
        assert s.get(b"k") == b"v"
        assert "keys=1" in repr(s)
    assert s.closed
    with pytest.raises(kvstore.ClosedError):
        s.get(b"k")


def test_context_manager_closes_on_error():
    with pytest.raises(RuntimeError):
        with kvstore.Store("1MiB", page_size="4K") as s:
            raise RuntimeError("boom")
    assert s.closed


@pytest.mark.slow
def test_many_stores_open_and_close():
    for _ in range(20):
        s = kvstore.Store("256KiB", page_size="4K")
        s.put(b"k", b"v")
        s.close()
    assert threading.active_count() < 10      # recovery workers are joined


FORK_CHILD = textwrap.dedent(r"""
    import os, sys
    import kvstore
    s = kvstore.Store("1MiB", page_size="4K", kernel_policy=sys.argv[1], recovery=sys.argv[2])
    s.put(b"k", b"parent")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        bad = []
        calls = {
            "get": lambda: s.get(b"k"), "put": lambda: s.put(b"k", b"child"),
            "delete": lambda: s.delete(b"k"), "exists": lambda: s.exists(b"k"),
            "in": lambda: b"k" in s, "len": lambda: len(s), "keys": lambda: s.keys(),
            "mget": lambda: s.mget([b"k"]), "mput": lambda: s.mput({b"k": b"c"}),
            "stats": lambda: s.stats(), "locate": lambda: s.locate(b"k"),
            "flush": lambda: s.flush(), "ttl": lambda: s.ttl(b"k"),
        }
        for name, call in calls.items():
            try:
                call()
                bad.append(name + ":no-error")
            except kvstore.Error as e:
                if "fork" not in str(e) and "child" not in str(e) and "parent" not in str(e):
                    bad.append(name + ":" + str(e))
            except BaseException as e:
                bad.append(name + ":" + type(e).__name__)
        os.write(w, (",".join(bad) or "OK").encode())
        os._exit(0)
    os.close(w)
    out = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    print("CHILD", out.decode())
    assert s.get(b"k") == b"parent", s.get(b"k")
    s.put(b"k2", b"after")
    assert s.get(b"k2") == b"after" and len(s) == 2
    s.close()
    print("PARENT OK")
""")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("recovery", ["manual", "thread"])
def test_fork_child_is_refused_parent_unaffected(policy, recovery):
    p = subprocess.run([sys.executable, "-c", FORK_CHILD, policy, recovery], capture_output=True, text=True,
                       timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0, p.stderr
    assert "CHILD OK" in p.stdout, p.stdout
    assert "PARENT OK" in p.stdout


# ---------------------------------------------------------------- 2 MiB backing

@pytest.mark.hugepages
@pytest.mark.parametrize("policy", POLICIES)
def test_roundtrip_on_2m_pages(policy):
    with reserved_2m(2):
        s = open_2m("2MiB", policy, 2, recovery="manual")
        try:
            for i in range(2000):
                s.put(b"key%d" % i, b"%d" % i * 10)
            assert all(s.get(b"key%d" % i) == b"%d" % i * 10 for i in range(2000))
            st = s.stats()
            assert st["page_size"] == "2M" and st["kernel_policy"] == policy
            s.put(b"big", b"B" * 20000)
            assert s.get(b"big") == b"B" * 20000
        finally:
            s.close()


def test_expire_refuses_times_past_int64_ms_and_keeps_the_key():
    """Issue 14: an expiry past 2**63-1 ms wrapped around and the key vanished."""
    with kvstore.Store("8MiB", page_size="4K", recovery="manual") as s:
        s.put(b"a", b"b")
        for bad in (float("nan"), float("inf"), 2 ** 63, 2 ** 64 - 1, 1.8e16):
            with pytest.raises(ValueError, match="invalid expire time"):
                s.expire(b"a", bad)
        assert s.get(b"a") == b"b" and s.ttl(b"a") == -1
