"""Clear errors: no reply of either protocol names a Python exception.

Every RESP command and every native op is called with odd arguments (wrong
counts, non-numbers where numbers go, NaN, infinities, huge and negative
integers, invalid UTF-8, wrong msgpack types); every error reply must read as
a server's error, never as a Python exception class or message, and the
server must keep serving. The error table itself is checked too.
"""

import itertools
import math
import random
import re

import pytest

from serverutil import start_server, store_available
from test_server_native import Native

pytestmark = pytest.mark.skipif(not store_available(),
                                reason="kvstore.Store is not in this checkout yet")

PYTHONIC = re.compile(
    rb"Traceback|\b[A-Z][A-Za-z]*(Error|Exception)\b|NoneType|object has no attribute|"
    rb"not subscriptable|unsupported operand|invalid literal for int|object of type|"
    rb"cannot convert float|not supported between instances|positional argument|"
    rb"keyword argument|\bint\(\)|\bfloat\(\)|argument must be")

ODD = [b"", b"x", b"0", b"-1", b"1.5", b"nan", b"inf", b"-inf", b"1e400",
       b"9223372036854775807", b"9223372036854775808", b"-9223372036854775809",
       b"18446744073709551616", b"\xff\xfe", b"EX", b"PX", b"GET", b"NX", b"*", b"[a-"]

# Commands that change the server's role, block, close the connection or
# start a transaction: run elsewhere.
SKIP = {"REPLICAOF", "SLAVEOF", "WAIT", "QUIT", "RESET", "MULTI", "KV.REPL", "SHUTDOWN", "KV.RESTART",
        "SYNC", "PSYNC", "MONITOR", "SUBSCRIBE", "PSUBSCRIBE", "DEBUG", "ACL", "HELLO",
        "AUTH", "CLIENT"}


def test_error_table_names_no_exception():
    from kvstore.server import errors
    for e in (OverflowError("int too big to convert"), KeyError("x"), AttributeError("y"),
              TypeError("'NoneType' object is not subscriptable"), RuntimeError("z")):
        line = errors.resp_error(e)
        assert not PYTHONIC.search(line), line
        code, msg, extra = errors.native_error(e)
        assert not PYTHONIC.search(msg.encode()), msg


def _errors_in(reply):
    """Error texts anywhere in a redisdiff reply tree."""
    if isinstance(reply, tuple) and reply and reply[0] == "-":
        yield reply[1]
    elif isinstance(reply, list):
        for r in reply:
            yield from _errors_in(r)


def test_resp_commands_with_odd_arguments():
    redisdiff = pytest.importorskip("redisdiff")
    rnd = random.Random(14)
    with start_server("--capacity", "16MiB") as srv:
        c = redisdiff.Raw(srv.connect())
        names = [n[1].decode() if isinstance(n, tuple) else n.decode()
                 for n in c.call("COMMAND", "LIST")]
        bad = []
        for name in sorted(names):
            if name.upper() in SKIP:
                continue
            calls = [[name]] + [[name, a] for a in ODD]
            for _ in range(40):
                calls.append([name] + [rnd.choice(ODD) for _ in range(rnd.randint(2, 6))])
            for argv in calls:
                rep = c.call(*argv)
                for text in _errors_in(rep):
                    if PYTHONIC.search(text):
                        bad.append((argv, text))
        assert c.call("PING") == ("+", b"PONG")
        c.close()
        assert not bad, bad[:10]
        assert "command_failed" not in srv.logs(), srv.log_tail(30)


NATIVE_ODD = [None, True, 1.5, math.nan, math.inf, -math.inf, -1, 0, 2**63, 2**64 - 1, -2**63,
              "str", b"bin", b"\xff", [], {}, [[1]], {"a": 1}, [b"k", b"v"], [b"k"]]

NATIVE_SKIP = {"sync", "replicaof", "wait", "restart"}


def test_native_ops_with_odd_arguments():
    from kvstore.server.commands import build_table
    ops = sorted(set(build_table().native) - NATIVE_SKIP)
    rnd = random.Random(14)
    with start_server("--capacity", "16MiB") as srv:
        n = Native(srv)
        bad = []
        for op in ops:
            calls = [[]] + [[a] for a in NATIVE_ODD]
            calls += [list(p) for p in itertools.islice(
                itertools.product(NATIVE_ODD[:8], NATIVE_ODD[8:]), 0, None, 7)]
            for _ in range(30):
                calls.append([rnd.choice(NATIVE_ODD) for _ in range(rnd.randint(2, 4))])
            for args in calls:
                rid, status, result = n.call(op, *args)
                if status == 1:
                    code, msg, extra = result
                    if PYTHONIC.search(str(msg).encode()) or code == "ERR" and \
                            "internal error" in msg:
                        bad.append((op, args, result))
        assert n.ok("ping") == "PONG"
        n.close()
        assert not bad, bad[:10]
