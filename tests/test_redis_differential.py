"""Differential test: the same random command sequences on a kvstore-server
and a redis-server (tests/redisdiff.py), replies compared one by one.

The generators cover the string and generic commands the server has today,
with edge-case arguments (zero, negative, float, malformed and large TTLs,
SET option combinations, binary and empty keys and values, glob patterns,
MULTI/EXEC/DISCARD blocks). Adding a command is one line in ``GENERATORS``.

Left out on purpose, because kvstore answers differently today and issue 14
asks for the fix in the command layer (each is listed in the module's
``NOT_YET`` so it is visible): TTLs past Redis's limits (EXPIRE/PEXPIRE with
values near 2**63, SET EX above 10**12), KEYS patterns with ``[^...]``,
``\\`` escapes, reversed ranges or unterminated brackets (server/glob.py has
Redis's rules; KEYS is not wired to it yet), keys over ``--max-key``, WATCH,
SELECT of a database other than 0 (kvstore has one database: documented).

Both servers run for the whole module; every example starts with FLUSHALL on
both, so each sequence runs on two empty stores.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from redisdiff import REDIS_SERVER, On, Pair
from serverutil import store_available

pytestmark = [
    pytest.mark.skipif(not store_available(), reason="kvstore.Store is not in this checkout yet"),
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (the CI installs it)"),
]

NOT_YET = {
    "EXPIRE/PEXPIRE near 2**63": "kvstore answers 1 and the key is gone; Redis: invalid expire time",
    "SET EX > 10**12 seconds": "kvstore refuses, Redis accepts",
    "KEYS [^a], \\x, [b-a], [ab": "KEYS still uses fnmatch (server/glob.py is Redis's rules)",
    "keys longer than --max-key": "GET/EXISTS error out where Redis answers nil / 0",
    "WATCH": "EXPIRE, PERSIST and SET+DEL of an absent watched key do not abort EXEC; "
             "WATCH of a key already watched and since changed forgets the change",
    "UNLINK with no key": "the arity error names 'del'",
    "bad number + bad option in one SET/EXPIRE": "kvstore names the number, Redis the option",
}

KEYS = st.sampled_from([b"k", b"a", b"b", b"key:1", b"key:2", b"", b"\xff\x00", b"h*llo", b"hello"])
VALUES = st.sampled_from([b"v", b"", b"123", b"-7", b"x" * 5000, b"\r\n\x00\xff", b"3.5"])
# TTL arguments: valid, zero, negative, float, malformed (none short enough
# to expire while a sequence runs, none past Redis's limits).
SECS = st.sampled_from([b"100", b"1000", b"86400", b"1000000000", b"0", b"-1", b"-100",
                        b"1.5", b"abc", b"", b"+5", b" 5", b"05", b"1e3", b"9999999999"])
MSECS = st.sampled_from([b"100000", b"86400000", b"0", b"-1", b"2.5", b"x", b"1000000000000"])
AT_SECS = st.sampled_from([b"1", b"4102444800", b"0", b"-1", b"abc"])           # past, 2100
AT_MSECS = st.sampled_from([b"1", b"4102444800000", b"-5", b"1.0"])
PATTERNS = st.lists(st.sampled_from([b"*", b"?", b"k", b"key:", b"[ab]", b"[a-c]", b"h",
                                     b"llo", b"e", b"\xff"]), max_size=4).map(b"".join)


def _flat(x):
    if isinstance(x, tuple):
        for y in x:
            yield from _flat(y)
    else:
        yield x


def cmd(name, *parts):
    """A command: its name and one strategy per argument (or group of args)."""
    return st.tuples(st.just(name), *parts).map(lambda t: tuple(_flat(t)))


def opt(*choices):
    """One optional group of arguments, chosen among ``choices`` (tuples)."""
    return st.sampled_from([()] + [tuple(c) for c in choices])


SET_EXPIRY = st.one_of(
    st.just(()), st.tuples(st.just(b"EX"), SECS), st.tuples(st.just(b"PX"), MSECS),
    st.tuples(st.just(b"EXAT"), AT_SECS), st.tuples(st.just(b"PXAT"), AT_MSECS),
    st.just((b"KEEPTTL",)), st.just((b"EX", b"10", b"PX", b"100")))
# Syntax errors (NX XX, an unknown word) only with a well-formed number: both
# at once is reported differently (see NOT_YET).
SET_ARGS = (st.tuples(SET_EXPIRY, opt((b"NX",), (b"XX",)), opt((b"GET",),))
            | st.tuples(opt((b"EX", b"100"), (b"PX", b"100000"), (b"KEEPTTL",)),
                        opt((b"NX",), (b"XX",), (b"NX", b"XX")), opt((b"GET",),), opt((b"BOGUS",),)))
EXPIRE_FLAGS = opt((b"NX",), (b"XX",), (b"GT",), (b"LT",), (b"xx",))
BAD_EXPIRE_FLAGS = opt((b"NX", b"XX"), (b"GT", b"LT"), (b"FOO",))
# Bad flags only with a well-formed number (see NOT_YET).
EXPIRE_ARGS = st.tuples(SECS, EXPIRE_FLAGS) | st.tuples(st.just(b"100"), BAD_EXPIRE_FLAGS)
PEXPIRE_ARGS = st.tuples(MSECS, EXPIRE_FLAGS) | st.tuples(st.just(b"100000"), BAD_EXPIRE_FLAGS)
KEY_LIST = st.lists(KEYS, min_size=0, max_size=4).map(tuple)
PAIRS = st.lists(st.tuples(KEYS, VALUES), min_size=0, max_size=3).map(
    lambda ps: tuple(x for p in ps for x in p))

# One line per command.
GENERATORS = {
    "GET": cmd("GET", KEYS),
    "SET": cmd("SET", KEYS, VALUES, SET_ARGS),
    "SETNX": cmd("SETNX", KEYS, VALUES),
    "SETEX": cmd("SETEX", KEYS, SECS, VALUES),
    "PSETEX": cmd("PSETEX", KEYS, MSECS, VALUES),
    "GETDEL": cmd("GETDEL", KEYS),
    "STRLEN": cmd("STRLEN", KEYS),
    "MGET": cmd("MGET", KEY_LIST),
    "MSET": cmd("MSET", PAIRS),
    "MSETNX": cmd("MSETNX", PAIRS),
    "DEL": cmd("DEL", KEY_LIST),
    "UNLINK": cmd("UNLINK", KEY_LIST.filter(len)),
    "EXISTS": cmd("EXISTS", KEY_LIST),
    "TYPE": cmd("TYPE", KEYS),
    "EXPIRE": cmd("EXPIRE", KEYS, EXPIRE_ARGS),
    "PEXPIRE": cmd("PEXPIRE", KEYS, PEXPIRE_ARGS),
    "TTL": cmd("TTL", KEYS),
    "PTTL": cmd("PTTL", KEYS),
    "PERSIST": cmd("PERSIST", KEYS),
    "KEYS": cmd("KEYS", PATTERNS),
    "DBSIZE": cmd("DBSIZE"),
    "ECHO": cmd("ECHO", VALUES),
    "PING": cmd("PING", opt((b"hi",), (b"a", b"b"))),
    "SELECT": cmd("SELECT", st.sampled_from([b"0", b"x", b"-1"])),
    "MULTI": cmd("MULTI"),
    "EXEC": cmd("EXEC"),
    "DISCARD": cmd("DISCARD"),
}

SEQUENCES = st.lists(st.one_of(*GENERATORS.values()), min_size=1, max_size=25)


@pytest.fixture(scope="module")
def pair():
    p = Pair()
    yield p
    assert p.close() == 0


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(seq=SEQUENCES)
def test_same_replies_as_redis(pair, seq):
    seq = list(seq) + [("EXEC",)] if ("MULTI",) in seq else list(seq)
    diff = pair.compare(seq + [("KEYS", b"*"), ("DBSIZE",)])
    assert diff is None, diff



# ---------------------------------------------------------------- two clients

WATCH_KEYS = st.sampled_from([b"k", b"a"])
# Writes that today's WATCH tracks (NOT_YET lists what it misses: EXPIRE,
# PERSIST, a watched absent key set and deleted again, a second WATCH).
OTHER_WRITES = st.one_of(cmd("SET", WATCH_KEYS, VALUES), cmd("MSET", WATCH_KEYS, VALUES),
                         cmd("SETNX", WATCH_KEYS, VALUES), cmd("GET", WATCH_KEYS))
OWN = st.one_of(cmd("GET", WATCH_KEYS), cmd("SET", WATCH_KEYS, VALUES), cmd("MGET", WATCH_KEYS),
                cmd("SETNX", WATCH_KEYS, VALUES), cmd("UNWATCH"))


@st.composite
def watch_scenarios(draw):
    """Setup, WATCH, other-client writes, MULTI, queued commands (with more
    other-client writes in between), EXEC or DISCARD."""
    seq = [On(0, c) for c in draw(st.lists(cmd("SET", WATCH_KEYS, VALUES), max_size=2))]
    seq += [On(0, ("WATCH", *draw(st.lists(WATCH_KEYS, min_size=1, max_size=2))))]
    for _ in range(draw(st.integers(0, 3))):
        seq.append(On(1, draw(OTHER_WRITES)) if draw(st.booleans()) else On(0, draw(OWN)))
    seq.append(On(0, ("MULTI",)))
    for _ in range(draw(st.integers(0, 3))):
        seq.append(On(1, draw(OTHER_WRITES)) if draw(st.booleans()) else On(0, draw(OWN)))
    seq.append(On(0, (draw(st.sampled_from(["EXEC", "EXEC", "DISCARD"])),)))
    seq.append(On(0, ("MGET", b"k", b"a")))
    return seq


@pytest.fixture(scope="module")
def pair2():
    p = Pair(clients=2)
    yield p
    assert p.close() == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(seq=watch_scenarios())
def test_watch_multi_from_two_clients_as_redis(pair2, seq):
    diff = pair2.compare(seq)
    assert diff is None, diff
