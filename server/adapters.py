"""What both protocol adapters share: argument checks, and handlers made from
a command row's ``op``/``args``/``reply`` (see :mod:`.registry`).

Argument kinds (``Command.args``), in order after the command name:

    "key", "value"   bytes (RESP: the word; native: msgpack bin)
    "int"            RESP: a decimal word in int64; native: an int
    "number"         RESP: as "int"; native: an int or a float
    "keys"           the rest of the words (RESP) / one list (native); last only

RESP reply kinds (``Command.reply``): "int" (``:n``), "bool" (``:1``/``:0``),
"bulk" (bulk string, null for None), "ok" (``+OK``), "any" (RESP encoding of
the Python value). The native reply is the op's result as msgpack encodes it.
"""

import math
import re

from .errors import CommandError, native_only
from .resp import OK, ONE, ZERO, bulk, encode, error, integer

__all__ = ["E_INT", "E_SYNTAX", "arity_error", "build_native", "build_resp", "native_args",
           "native_key", "native_number", "native_value", "parse_int", "show",
           "unknown_command"]

E_SYNTAX = "ERR syntax error"
E_INT = "ERR value is not an integer or out of range"
_INT_RE = re.compile(rb"(0|-?[1-9][0-9]{0,18})\Z")     # Redis's string2ll: no "-0"


# ---------------------------------------------------------------- RESP side

def parse_int(b, msg=E_INT):
    if not _INT_RE.match(b):
        raise CommandError(msg)
    v = int(b)
    if not -(1 << 63) <= v < (1 << 63):
        raise CommandError(msg)
    return v


def arity_error(name):
    return error(f"ERR wrong number of arguments for '{name}' command")


def show(b, n=128):
    return b[:n].decode("utf-8", "replace")


def unknown_command(args):
    msg = f"ERR unknown command '{show(args[0])}', with args beginning with: "
    for a in args[1:]:
        if len(msg) > 256:
            break
        msg += f"'{show(a)}' "
    return error(msg)


_RESP_ARG = {
    "key": lambda b: b,
    "value": lambda b: b,
    "int": parse_int,
    "number": parse_int,
}


def _resp_reply(kind):
    if kind == "int":
        return integer
    if kind == "bool":
        return lambda r: ONE if r else ZERO
    if kind == "ok":
        return lambda r: OK
    if kind == "bulk":
        return None        # needs the connection's null
    if kind == "any":
        return None        # needs the connection's protocol version
    raise ValueError(f"unknown reply kind {kind!r}")


def build_resp(cmd):
    """A RESP handler for a row with ``op``, ``args`` and ``reply``."""
    op, kinds, kind = cmd.op, cmd.args, cmd.reply
    rest = bool(kinds) and kinds[-1] == "keys"
    fixed = [_RESP_ARG[k] for k in (kinds[:-1] if rest else kinds)]
    enc = _resp_reply(kind)
    nfixed = len(fixed)

    def parse(argv):
        vals = [f(a) for f, a in zip(fixed, argv[1:nfixed + 1])]
        if rest:
            vals.append(argv[nfixed + 1:])
        return vals

    if kind == "bulk":
        def handler(conn, argv):
            r = op(conn, *parse(argv))
            return conn.null if r is None else bulk(r)
    elif kind == "any":
        def handler(conn, argv):
            return encode(op(conn, *parse(argv)), conn.resp3)
    else:
        def handler(conn, argv):
            return enc(op(conn, *parse(argv)))
    return handler


# ---------------------------------------------------------------- native side

def native_args(args, lo, hi, name):
    if not lo <= len(args) <= hi:
        raise native_only("ERR", f"wrong number of arguments for '{name}'")


def native_key(k):
    if type(k) is not bytes:
        if isinstance(k, (bytearray, memoryview)):
            return bytes(k)
        raise native_only("TYPE", "keys must be msgpack bin (bytes)")
    return k


def native_value(v):
    if type(v) is not bytes:
        if isinstance(v, (bytearray, memoryview)):
            return bytes(v)
        raise native_only("TYPE", "values must be msgpack bin (bytes)")
    return v


def native_number(x, what):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise native_only("TYPE", f"{what} must be a number")
    if type(x) is float and not math.isfinite(x):
        raise native_only("ERR", f"{what} must be a finite number")
    return x


def _native_int(x):
    if type(x) is not int:
        raise native_only("TYPE", "expected an int")
    return x


def _native_keys(x):
    if type(x) is not list:
        raise native_only("TYPE", "expected a list of keys")
    return [native_key(k) for k in x]


_NATIVE_ARG = {
    "key": native_key,
    "value": native_value,
    "int": _native_int,
    "number": lambda x: native_number(x, "argument"),
    "keys": _native_keys,
}


def build_native(cmd):
    """A native op handler for a row with ``op`` and ``args``."""
    op, name = cmd.op, cmd.native
    conv = [_NATIVE_ARG[k] for k in cmd.args]
    n = len(conv)

    def handler(conn, args):
        native_args(args, n, n, name)
        return op(conn, *[f(a) for f, a in zip(conv, args)])
    return handler
