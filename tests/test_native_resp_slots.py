"""The C RESP path's cluster slot check (kvstore/_native/resp.c).

* ``_native.key_slot`` (the slot function resp_fast uses) equals the one
  Python definition, ``kvstore.slots.key_slot``, for random keys of every
  length and byte and for the hash-tag edge cases;
* with ``Engine.set_fast_slots(bitmap)``, ``resp_fast`` runs a GET or SET
  only when its key's slot bit is set, and stops (consuming nothing more,
  writing nothing) at the first key whose bit is clear; ``None`` turns the
  check off; a bitmap of the wrong size is refused and changes nothing.

These run under ASan/UBSan in .ci/run with the other native tests.
"""

import random

import pytest

import kvstore
from kvstore import _native
from kvstore.slots import SLOTS, key_slot

EDGE = [b"", b"{", b"}", b"{}", b"}{", b"{a}{b}", b"{}{b}", b"a{}b}", b"{{}}", b"{{a}}",
        b"a{b", b"a}b{c", b"x{y}", b"{y}x", b"foo{}{bar}", b"foo{{bar}}zap", b"foo{bar}{zap}",
        b"{user1}.following", b"{user1}.followers", b"123456789", b"\x00{\x00}\xff",
        b"{" * 100, b"}" * 100, b"{\xff\xfe}", b"a" * 70000]


def bits(slots):
    b = bytearray(SLOTS // 8)
    for s in slots:
        b[s >> 3] |= 1 << (s & 7)
    return bytes(b)


def resp(*cmds):
    return b"".join(b"*%d\r\n" % len(c) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in c)
                    for c in cmds)


@pytest.fixture
def store():
    with kvstore.Store("1MiB", page_size="4K", recovery="manual") as s:
        yield s


def test_c_slot_function_equals_python_on_edge_cases():
    for k in EDGE:
        assert _native.key_slot(k) == key_slot(k), k
    assert _native.key_slot(b"123456789") == 0x31C3 % SLOTS
    # hash tags: the first '{' and the first '}' after it, non-empty only
    assert _native.key_slot(b"{user1}.a") == _native.key_slot(b"user1")
    assert _native.key_slot(b"{a}{b}") == _native.key_slot(b"a")
    assert _native.key_slot(b"{}{b}") == _native.key_slot(b"{}{b}") != _native.key_slot(b"b")
    assert _native.key_slot(bytearray(b"{x}1")) == _native.key_slot(memoryview(b"x"))
    with pytest.raises(TypeError):
        _native.key_slot("text")


def test_c_slot_function_equals_python_on_random_keys():
    rng = random.Random(11)
    alphabet = b"{}ab\x00\xff"
    for i in range(20000):
        n = rng.choice((0, 1, 2, 3, 5, 8, 16, 40, 300))
        if i % 2:
            k = bytes(rng.choice(alphabet) for _ in range(n))     # braces everywhere
        else:
            k = rng.randbytes(n)
        assert _native.key_slot(k) == key_slot(k), k


def test_resp_fast_serves_only_keys_of_fast_slots(store):
    here, there = b"{h}1", b"{t}1"
    sh, st = key_slot(here), key_slot(there)
    assert sh != st
    assert store.fast_slots is None
    store.set_fast_slots(bits([sh]))
    assert store.fast_slots == bits([sh])
    buf = resp([b"SET", here, b"v1"], [b"GET", here], [b"SET", there, b"x"], [b"GET", here])
    used, out, n = store.resp_fast(buf, _native.RESP_ALLOW_SET)
    assert (n, out) == (2, b"+OK\r\n$2\r\nv1\r\n")
    assert buf[used:] == resp([b"SET", there, b"x"], [b"GET", here])   # stops, nothing consumed
    assert not store.exists(there)
    # a GET of a foreign slot stops too, even for a key that is not here
    used, out, n = store.resp_fast(resp([b"GET", there]), 0)
    assert (used, n, out) == (0, 0, b"")
    # a key of a fast slot whose bit is later cleared: Python's turn
    store.set_fast_slots(bits([]))
    assert store.resp_fast(resp([b"GET", here]), 0)[2] == 0
    # None: no slot check at all (a server outside cluster mode)
    store.set_fast_slots(None)
    assert store.fast_slots is None
    used, out, n = store.resp_fast(resp([b"SET", there, b"x"], [b"GET", here]),
                                   _native.RESP_ALLOW_SET)
    assert (n, out) == (2, b"+OK\r\n$2\r\nv1\r\n")
    assert store.get(there) == b"x"


def test_resp_fast_slot_check_every_slot(store):
    # one key per slot for a sample of slots, the bitmap holding every other one
    rng = random.Random(5)
    keys = {}
    while len(keys) < 400:
        k = b"k%d" % rng.randrange(1 << 30)
        keys.setdefault(key_slot(k), k)
    on = {s for s in keys if s % 2 == 0}
    store.set_fast_slots(bits(on))
    for s, k in keys.items():
        used, out, n = store.resp_fast(resp([b"SET", k, b"v"]), _native.RESP_ALLOW_SET)
        assert n == (1 if s in on else 0), (s, k)
        assert store.exists(k) == (s in on)


def test_set_fast_slots_refuses_a_bad_bitmap(store):
    store.set_fast_slots(bits([1]))
    for bad in (b"", bytes(SLOTS // 8 - 1), bytes(SLOTS // 8 + 1), bytes(SLOTS)):
        with pytest.raises(ValueError, match="2048 bytes"):
            store.set_fast_slots(bad)
    with pytest.raises(TypeError):
        store.set_fast_slots(12)
    assert store.fast_slots == bits([1])      # unchanged by the refusals
    store.set_fast_slots(bytearray(bits([2])))
    assert store.fast_slots == bits([2])
