"""Differential test: the same random command sequences on a kvstore-server
and a redis-server (tests/redisdiff.py), replies compared one by one.

The generators cover the string and generic commands (the INCR family,
INCRBYFLOAT, APPEND, GETRANGE/SETRANGE, GETEX, SCAN, RENAME, COPY, EXPIREAT,
EXPIRETIME, OBJECT, TIME...) with edge-case arguments (zero, negative, float,
malformed TTLs and TTLs at and past int64 milliseconds, integers and floats
at their limits, SET option combinations, binary and empty keys and values,
reads of keys over --max-key, glob patterns with classes, negation, ranges
and escapes, MULTI/EXEC/DISCARD blocks), and WATCH/MULTI interleavings from
two clients with every kind of write to the watched keys. Adding a command
is one line in ``GENERATORS``.

Left out on purpose, because kvstore answers differently (each is listed in
the module's ``NOT_YET`` so it is visible; the documented differences are
``redisdiff.DOCUMENTED``): SELECT of a database other than 0 (kvstore has
one database), OBJECT FREQ/IDLETIME after time passes (access times are not
kept), ROLE (replication offsets differ by design), CLIENT KILL/REPLY (tested
in tests/test_server_strings.py), SCAN iterations longer than one call (the
cursors are each server's own; tests/test_server_strings.py checks the
guarantee).

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
    "SELECT n > 0": "kvstore has one database",
    "OBJECT IDLETIME after a while": "access times are not kept (always 0)",
    "ROLE": "replication offsets are kvstore's own",
}

KEYS = st.sampled_from([b"k", b"a", b"b", b"key:1", b"key:2", b"", b"\xff\x00", b"h*llo", b"hello",
                        b"hallo", b"h\\llo"])
# Reads may name a key over kvstore's --max-key (64 KiB): it cannot exist, so
# GET answers nil, EXISTS 0... as Redis does for a key it does not hold.
# (Writing one is refused: kvstore's documented key limit.)
READ_KEYS = KEYS | st.just(b"x" * 70000)
VALUES = st.sampled_from([b"v", b"", b"123", b"-7", b"x" * 5000, b"\r\n\x00\xff", b"3.5"])
# TTL arguments: valid, zero, negative, float, malformed (none short enough
# to expire while a sequence runs, none past Redis's limits).
SECS = st.sampled_from([b"100", b"1000", b"86400", b"1000000000", b"0", b"-1", b"-100",
                        b"1.5", b"abc", b"", b"+5", b" 5", b"05", b"1e3", b"9999999999", b"-0",
                        b"1000000000001", b"9223372036854775", b"9223372036854776",
                        b"18446744073709552", b"9223372036854775807", b"-9223372036854775808",
                        b"9223372036854775808"])
MSECS = st.sampled_from([b"100000", b"86400000", b"0", b"-1", b"2.5", b"x", b"1000000000000",
                         b"9223372036854775807", b"9223372036854775000", b"9000000000000000000",
                         b"-9223372036854775808"])
AT_SECS = st.sampled_from([b"1", b"4102444800", b"0", b"-1", b"abc", b"9223372036854775",
                           b"9223372036854776", b"9223372036854775807"])           # past, 2100, limits
AT_MSECS = st.sampled_from([b"1", b"4102444800000", b"-5", b"1.0", b"9223372036854775807"])
INTS = st.sampled_from([b"0", b"1", b"-1", b"10", b"-0", b"abc", b"", b"1.5", b"9223372036854775807",
                        b"-9223372036854775808", b"9223372036854775808", b"+1", b" 1", b"007"])
FLOATS = st.sampled_from([b"0.1", b"-0.2", b"1e3", b"3.0e3", b"1.5", b"abc", b"", b"inf", b"-inf",
                          b"nan", b"1e4933", b"1e-5000", b"0x10", b"10", b"-1e300", b" 1", b"1 ",
                          b"5.0e-1", b".5", b"7."])
NUM_VALUES = st.sampled_from([b"0", b"10", b"-5", b"9223372036854775807", b"-9223372036854775808",
                              b"1.5", b"abc", b"", b" 1", b"007", b"1e3", b"-0"])
PATTERNS = st.lists(st.sampled_from([b"*", b"?", b"k", b"key:", b"[ab]", b"[a-c]", b"h",
                                     b"llo", b"e", b"\xff", b"[^e]", b"\\*", b"\\", b"[b-a]",
                                     b"[ab", b"[", b"[^", b"\\e", b"[\\]]"]),
                    max_size=4).map(b"".join)


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
SET_ARGS = (st.tuples(SET_EXPIRY, opt((b"NX",), (b"XX",)), opt((b"GET",),))
            | st.tuples(opt((b"EX", b"100"), (b"PX", b"100000"), (b"KEEPTTL",), (b"EX", b"x"),
                            (b"EX", b"10", b"EX", b"20")),
                        opt((b"NX",), (b"XX",), (b"NX", b"XX")), opt((b"GET",),), opt((b"BOGUS",),)))
GETEX_ARGS = st.one_of(SET_EXPIRY.filter(lambda t: t != (b"KEEPTTL",)), st.just((b"PERSIST",)),
                       opt((b"NX",), (b"KEEPTTL",), (b"PERSIST", b"EX", b"10"), (b"EX",)))
EXPIRE_FLAGS = opt((b"NX",), (b"XX",), (b"GT",), (b"LT",), (b"xx",))
BAD_EXPIRE_FLAGS = opt((b"NX", b"XX"), (b"GT", b"LT"), (b"FOO",))
EXPIRE_ARGS = st.tuples(SECS, EXPIRE_FLAGS) | st.tuples(SECS, BAD_EXPIRE_FLAGS)
PEXPIRE_ARGS = st.tuples(MSECS, EXPIRE_FLAGS) | st.tuples(MSECS, BAD_EXPIRE_FLAGS)
EXPIREAT_ARGS = st.tuples(AT_SECS | SECS, EXPIRE_FLAGS | BAD_EXPIRE_FLAGS)
PEXPIREAT_ARGS = st.tuples(AT_MSECS | MSECS, EXPIRE_FLAGS | BAD_EXPIRE_FLAGS)
SCAN_ARGS = st.tuples(st.sampled_from([b"0", b"0", b"0", b"x", b"+0", b"", b" 0", b"0 ", b"18446744073709551616"]),
                      st.just(()) | st.tuples(st.just(b"MATCH"), PATTERNS), st.sampled_from([(b"COUNT", b"100000"), (b"COUNT", b"0"),
                                                                  (b"COUNT", b"x"), (b"COUNT",)]),
                      opt((b"TYPE", b"string"), (b"TYPE", b"hash"), (b"TYPE", b"STRING"), (b"BOGUS", b"1")))
COPY_ARGS = opt((b"REPLACE",), (b"DB", b"0"), (b"DB", b"0", b"REPLACE"), (b"DB", b"x"), (b"FOO",))
OBJECT_ARGS = st.one_of(st.tuples(st.sampled_from([b"ENCODING", b"REFCOUNT", b"IDLETIME", b"FREQ",
                                                   b"encoding", b"BOGUS"]), KEYS),
                        st.just((b"ENCODING",)))
KEY_LIST = st.lists(KEYS, min_size=0, max_size=4).map(tuple)
PAIRS = st.lists(st.tuples(KEYS, VALUES), min_size=0, max_size=3).map(
    lambda ps: tuple(x for p in ps for x in p))

# One line per command.
GENERATORS = {
    "GET": cmd("GET", READ_KEYS),
    "SET": cmd("SET", KEYS, VALUES, SET_ARGS),
    "SETNX": cmd("SETNX", KEYS, VALUES),
    "SETEX": cmd("SETEX", KEYS, SECS, VALUES),
    "PSETEX": cmd("PSETEX", KEYS, MSECS, VALUES),
    "GETDEL": cmd("GETDEL", READ_KEYS),
    "GETSET": cmd("GETSET", KEYS, VALUES),
    "GETEX": cmd("GETEX", KEYS, GETEX_ARGS),
    "INCR": cmd("INCR", KEYS),
    "DECR": cmd("DECR", KEYS),
    "INCRBY": cmd("INCRBY", KEYS, INTS),
    "DECRBY": cmd("DECRBY", KEYS, INTS),
    "INCRBYFLOAT": cmd("INCRBYFLOAT", KEYS, FLOATS),
    "SET number": cmd("SET", KEYS, NUM_VALUES),
    "APPEND": cmd("APPEND", KEYS, VALUES),
    "GETRANGE": cmd("GETRANGE", READ_KEYS, INTS, INTS),
    "SETRANGE": cmd("SETRANGE", KEYS, st.sampled_from([b"0", b"3", b"-1", b"x", b"536870912",
                                                       b"9223372036854775807"]), VALUES),
    "EXPIREAT": cmd("EXPIREAT", KEYS, EXPIREAT_ARGS),
    "PEXPIREAT": cmd("PEXPIREAT", KEYS, PEXPIREAT_ARGS),
    "EXPIRETIME": cmd("EXPIRETIME", READ_KEYS),
    "PEXPIRETIME": cmd("PEXPIRETIME", KEYS),
    "RENAME": cmd("RENAME", KEYS, KEYS),
    "RENAMENX": cmd("RENAMENX", KEYS, KEYS),
    "COPY": cmd("COPY", KEYS, KEYS, COPY_ARGS),
    "TOUCH": cmd("TOUCH", st.lists(READ_KEYS, max_size=4).map(tuple)),
    "RANDOMKEY": cmd("RANDOMKEY"),
    "SCAN": cmd("SCAN", SCAN_ARGS),
    "OBJECT": cmd("OBJECT", OBJECT_ARGS),
    "TIME": cmd("TIME"),
    "STRLEN": cmd("STRLEN", READ_KEYS),
    "MGET": cmd("MGET", st.lists(READ_KEYS, max_size=4).map(tuple)),
    "MSET": cmd("MSET", PAIRS),
    "MSETNX": cmd("MSETNX", PAIRS),
    "DEL": cmd("DEL", KEY_LIST),
    "UNLINK": cmd("UNLINK", KEY_LIST),
    "EXISTS": cmd("EXISTS", st.lists(READ_KEYS, max_size=4).map(tuple)),
    "TYPE": cmd("TYPE", READ_KEYS),
    "EXPIRE": cmd("EXPIRE", KEYS, EXPIRE_ARGS),
    "PEXPIRE": cmd("PEXPIRE", KEYS, PEXPIRE_ARGS),
    "TTL": cmd("TTL", READ_KEYS),
    "PTTL": cmd("PTTL", READ_KEYS),
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

WATCH_KEYS = st.sampled_from([b"k", b"a", b"b"])
# Every write-like change of a watched key aborts EXEC (Redis's
# touchWatchedKey), and failed or no-op writes do not.
OTHER_WRITES = st.one_of(cmd("SET", WATCH_KEYS, VALUES), cmd("MSET", WATCH_KEYS, VALUES),
                         cmd("SETNX", WATCH_KEYS, VALUES), cmd("GET", WATCH_KEYS),
                         cmd("DEL", WATCH_KEYS), cmd("EXPIRE", WATCH_KEYS, st.sampled_from([b"100", b"0", b"x"]),
                                                     EXPIRE_FLAGS),
                         cmd("PERSIST", WATCH_KEYS), cmd("INCR", WATCH_KEYS), cmd("APPEND", WATCH_KEYS, VALUES),
                         cmd("RENAME", WATCH_KEYS, WATCH_KEYS), cmd("COPY", WATCH_KEYS, WATCH_KEYS),
                         cmd("GETEX", WATCH_KEYS, opt((b"PERSIST",), (b"EX", b"100"))),
                         cmd("SETRANGE", WATCH_KEYS, st.just(b"1"), st.sampled_from([b"", b"z"])),
                         cmd("GETDEL", WATCH_KEYS), cmd("FLUSHALL"),
                         cmd("SET", WATCH_KEYS, VALUES, st.just((b"NX",))))
OWN = st.one_of(cmd("GET", WATCH_KEYS), cmd("SET", WATCH_KEYS, VALUES), cmd("MGET", WATCH_KEYS),
                cmd("SETNX", WATCH_KEYS, VALUES), cmd("UNWATCH"), cmd("WATCH", WATCH_KEYS),
                cmd("EXPIRE", WATCH_KEYS, st.just(b"100")), cmd("DEL", WATCH_KEYS))


@st.composite
def watch_scenarios(draw):
    """Setup, WATCH, other-client writes, MULTI, queued commands (with more
    other-client writes in between), EXEC or DISCARD."""
    seq = [On(0, c) for c in draw(st.lists(cmd("SET", WATCH_KEYS, VALUES)
                                           | cmd("SET", WATCH_KEYS, VALUES, st.just((b"EX", b"100"))),
                                           max_size=2))]
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
