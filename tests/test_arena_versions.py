"""A version is never handed out twice across a crash (adopt.c, engine.c).

A delete leaves no entry carrying its version, and the header's version
counter used to be written only after the operation: a crash after the
entry was dropped left the header one behind, so the next process handed
the delete's version out again, to another write. The delete now raises the
header's version before the entry goes (``kv_hdr_version_ahead``). A child
process is aborted inside a delete (KVSTORE_CRASH_AT) and the arena it
leaves is adopted: the counter is above the delete's version, whichever
side of the drop the crash fell on.
"""

import os
import subprocess
import sys
import textwrap
import time

import pytest

import kvstore

CHILD = textwrap.dedent("""
    import sys
    import kvstore
    fd, key = int(sys.argv[1]), sys.argv[2].encode()
    s = kvstore.Store(adopt_fd=fd, recovery="manual")
    print(s.version, flush=True)
    s.delete(key)
    print("no crash", flush=True)
""")


@pytest.mark.parametrize("point", ["delete:ahead", "delete:drop"])
def test_delete_cut_short_never_reuses_its_version(point):
    a = kvstore.Store("16MiB", page_size="4K", recovery="manual")
    for i in range(200):
        a.put(b"key:%d" % i, b"value %d" % i)
    a.put(b"victim", b"old")                    # an older version than the newest key
    for i in range(200, 220):
        a.put(b"key:%d" % i, b"value %d" % i)
    v_before = a.version
    fd = os.dup(a.arena.fd)
    try:
        env = dict(os.environ, KVSTORE_CRASH_AT=point)
        env.pop("KVSTORE_CRASH_ONCE", None)
        p = subprocess.run([sys.executable, "-c", CHILD, str(fd), "victim"], env=env, pass_fds=(fd,),
                           capture_output=True, timeout=120)
        assert -p.returncode == 6, (p.returncode, p.stdout, p.stderr[-2000:])
        assert f"KVSTORE_CRASH_AT={point}".encode() in p.stderr
        assert int(p.stdout.split()[0]) == v_before
        b = kvstore.Store(adopt_fd=fd, recovery="manual")
    finally:
        os.close(fd)
    a.close()
    # the delete took (or was about to take) v_before + 1
    assert b.version >= v_before + 1
    v = b.put(b"another", b"x")
    assert v > v_before + 1
    got = b.get(b"victim")
    if point == "delete:ahead":
        assert got == b"old"                   # the entry was still there
    else:
        assert got is None                     # gone: and its version is not given again
    b.close()


def test_plain_delete_keeps_the_header_in_step():
    """Without a crash the header version is exactly the counter (a planned
    restart adopts the same version: nothing is skipped)."""
    a = kvstore.Store("16MiB", page_size="4K", recovery="manual")
    for i in range(50):
        a.put(b"k%d" % i, b"v")
    for i in range(0, 50, 3):
        a.delete(b"k%d" % i)
    v = a.version
    fd = os.dup(a.arena.fd)
    try:
        b = kvstore.Store(adopt_fd=fd, recovery="manual")
    finally:
        os.close(fd)
    assert b.version == v
    assert b.adopt_report()["version"] == v            # the header's counter
    b.close()
    a.close()


def test_keys_since_lists_the_keys_newer_than_a_version():
    """Engine.keys_since(v): what a crash restart sends to replicas again
    (every key written after v: present, LOST, expired, long keys)."""
    s = kvstore.Store("16MiB", page_size="4K", recovery="manual")
    for i in range(300):
        s.put(b"old:%d" % i, b"v")
    v = s.version
    longkey = b"L" * 3000
    s.put(longkey, b"long")
    s.put(b"old:7", b"rewritten")
    s.put(b"ttl", b"x", ttl=0.001)
    s.put(b"gone", b"x")
    s.delete(b"gone")
    s.faults.inject_key(b"old:7", "ao")
    s.recover()
    time.sleep(0.01)                        # "ttl" has expired
    got = s.keys_since(v)
    assert sorted(got) == sorted([longkey, b"old:7", b"ttl"])
    assert s.keys_since(s.version) == []
    assert len(s.keys_since(0)) == len(s.keys()) + 1        # + the expired key
    with pytest.raises(OverflowError):
        s.keys_since(-1)
    s.close()
