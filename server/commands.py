"""RESP connections and the command table.

Hot path: ``RespConnection.data_received`` feeds the parser once, gets every
complete command of the batch, looks each name up in a dict of plain
functions (upper- and lower-case names are both keys, so the usual spellings
never call ``.upper()``), collects the replies in a list and writes them with a
single ``transport.write``. GET/SET/PING check their own arity and return
pre-encoded constants where they can; everything else goes through a wrapper
that checks Redis-style arity first.

Errors: handlers raise :class:`CommandError` carrying the complete ``-ERR``
line, or let store exceptions through; ``data_received`` turns those into
Redis-style error replies (``-LOST ...`` for a lost key, never a nil).
"""

import fnmatch
import hmac
import os
import platform
import re
import resource
import sys
import time

import kvstore
from kvstore.errors import (
    ClosedError, FaultInjectionError, KeyLostError, KeyTooLargeError,
    StoreFullError, UnrecoverableKeyError, ValueTooLargeError,
)

from . import resp
from .conn import BaseConnection, OutputLimitExceeded
from .logs import event
from .resp import (
    NULL2, NULL3, OK, ONE, PONG, ZERO, RespParser,
    bulk, encode, integer,
)

__all__ = ["RespConnection", "COMMANDS", "REDIS_VERSION"]

#: The Redis version we answer as (INFO redis_version, HELLO version).
REDIS_VERSION = "7.2.0"

_BIG = 1 << 16

try:
    from kvstore._native import RESP_ALLOW_SET as _SET_FLAG, RESP_RESP3 as _RESP3_FLAG
except ImportError:        # an older extension without the C RESP path
    _SET_FLAG, _RESP3_FLAG = 1, 2


class CommandError(Exception):
    """A command failed; ``reply`` is the full RESP error line."""

    def __init__(self, msg):
        super().__init__(msg)
        self.reply = resp.error(msg)


class Quit(Exception):
    """QUIT: reply +OK, then close after the write."""


def _err(msg):
    return CommandError(msg)


_E_SYNTAX = "ERR syntax error"
_E_INT = "ERR value is not an integer or out of range"
_INT_RE = re.compile(rb"-?(0|[1-9][0-9]{0,18})\Z")


def parse_int(b, msg=_E_INT):
    if not _INT_RE.match(b):
        raise _err(msg)
    v = int(b)
    if not -(1 << 63) <= v < (1 << 63):
        raise _err(msg)
    return v


def arity_error(name):
    return resp.error(f"ERR wrong number of arguments for '{name}' command")


def _show(b, n=128):
    return b[:n].decode("utf-8", "replace")


def unknown_command(args):
    msg = f"ERR unknown command '{_show(args[0])}', with args beginning with: "
    for a in args[1:]:
        if len(msg) > 256:
            break
        msg += f"'{_show(a)}' "
    return resp.error(msg)


def _lost_reply(exc):
    ver = exc.version if exc.version is not None else -1
    if isinstance(exc, UnrecoverableKeyError):
        return b"-LOST key was lost to a memory error (version %d), unrecoverable\r\n" % ver
    return b"-LOST key was lost to a memory error (version %d), retry\r\n" % ver


# ------------------------------------------------------------------ registry

COMMANDS = {}        # NAME and name -> function(conn, args) -> bytes
NOAUTH_COMMANDS = {}  # what an unauthenticated client may call
INFO = {}            # NAME -> (arity, flags, first, last, step, group, summary)


def command(name, arity, flags=(), keys=(0, 0, 0), group="generic", summary="",
            checked=False, noauth=False):
    """Register a command. ``arity`` follows Redis: n exact, -n at least n.

    ``checked=True`` means the function checks its own arity (hot commands).
    """
    lname = name.lower()

    def deco(fn):
        if checked:
            f = fn
        elif arity > 0:
            def f(conn, args, fn=fn):
                if len(args) != arity:
                    return arity_error(lname)
                return fn(conn, args)
        else:
            need = -arity

            def f(conn, args, fn=fn):
                if len(args) < need:
                    return arity_error(lname)
                return fn(conn, args)
        up = name.upper().encode()
        COMMANDS[up] = f
        COMMANDS[lname.encode()] = f
        if noauth:
            NOAUTH_COMMANDS[up] = f
            NOAUTH_COMMANDS[lname.encode()] = f
        INFO[name.upper()] = (arity, tuple(flags), keys, group, summary)
        return fn
    return deco


class RespConnection(BaseConnection):
    kind = "resp"

    def __init__(self, server, prev=None):
        super().__init__(server, prev)
        cfg = server.config
        self.parser = RespParser(max_multibulk=cfg.max_multibulk, max_bulk=cfg.max_bulk,
                                 max_inline=cfg.max_inline, max_buffer=cfg.max_query_buffer)
        self.resp3 = False
        self.null = NULL2
        self.authed = not cfg.requirepass
        self.table = COMMANDS if self.authed else NOAUTH_COMMANDS
        self.quitting = False
        self.multi = None         # queued commands between MULTI and EXEC
        self.multi_error = False
        self.watched = None       # {key: version or None} from WATCH
        st = server.store
        self.store = st
        self.sget = st.get
        self.sput = st.put
        self._fast = getattr(st, "resp_fast", None) if cfg.resp_fast else None

    def set_resp3(self, on):
        self.resp3 = on
        self.null = NULL3 if on else NULL2

    def lookup(self, name):
        fn = COMMANDS.get(name.upper())
        if not self.authed:
            if fn is not None and NOAUTH_COMMANDS.get(name.upper()) is fn:
                return fn
            return _noauth
        if fn is None:
            return unknown_command_fn
        return fn

    # -- hot path

    def fast_flags(self):
        """Flags for the engine's C RESP path, or -1 when it must not run.

        It runs leading plain GET/SET of a batch in C (kvstore/_native/resp.c)
        and stops at anything else, so it only needs the conditions under
        which plain GET/SET have no Python-side effect: an authenticated
        client outside MULTI, no replies held for replica acks, and for SET
        no replication stream or replica role observing writes.
        """
        srv = self.server
        if self._fast is None or self.table is not COMMANDS or srv.reply_gate is not None:
            return -1
        flags = _RESP3_FLAG if self.resp3 else 0
        repl = srv.repl
        if repl is None or (repl.role == "master" and repl.backlog is None and not repl.min_acks):
            flags |= _SET_FLAG
        return flags

    def data_received(self, data):
        self.active = True
        p = self.parser
        head = None
        if not p.pending and self._fast is not None:
            flags = self.fast_flags()
            if flags >= 0:
                try:
                    used, replies, n = self._fast(data, flags)
                except Exception as e:  # noqa: BLE001 - e.g. a closed store: Python reports it
                    used = n = 0
                    event("debug", "resp_fast_failed", error=f"{type(e).__name__}: {e}")
                if n:
                    self.server.stats_commands += n
                    if len(replies) >= _BIG:
                        try:
                            self.count_big(len(replies))
                        except OutputLimitExceeded:
                            self.drop("output buffer limit")
                            return
                    if used == len(data):
                        self.transport.write(replies)
                        if self.big:
                            self.check_output()
                        return
                    head = replies
                    data = data[used:]
        p.feed(data)
        cmds = p.gets_all()
        if head is not None and not cmds:
            self.transport.write(head)
            head = None
        if cmds:
            out = [head] if head is not None else []
            append = out.append
            self.server.batch_out = out
            for args in cmds:
                try:
                    f = self.table[args[0]]   # MULTI/AUTH switch tables mid-batch
                except KeyError:
                    f = self.lookup(args[0])
                try:
                    append(f(self, args))
                except KeyLostError as e:
                    append(_lost_reply(e))
                except CommandError as e:
                    append(e.reply)
                except Quit:
                    append(OK)
                    self.quitting = True
                    break
                except OutputLimitExceeded:
                    self.drop("output buffer limit")
                    return
                except Exception as e:  # noqa: BLE001 - mapped to a reply
                    append(self.error_reply(e, args))
            self.server.stats_commands += len(cmds)
            if self.closed:
                return
            gate = self.server.reply_gate      # replication: replies waiting for replica acks
            if gate is not None and gate(self, out):
                return
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            if self.big:
                self.check_output()
            if self.quitting:
                self.close_after_write()
                return
        if p.error is not None and not self.closed:
            event("info", "protocol_error", id=self.id, addr=self.addr,
                  error=p.error[1:-2].decode("utf-8", "replace"))
            self.transport.write(p.error)
            self.close_after_write()

    def execute_one(self, args):
        """Run one command outside the hot loop (EXEC); returns the reply."""
        f = COMMANDS.get(args[0]) or self.lookup(args[0])
        try:
            return f(self, args)
        except KeyLostError as e:
            return _lost_reply(e)
        except CommandError as e:
            return e.reply
        except (Quit, OutputLimitExceeded):
            raise
        except Exception as e:  # noqa: BLE001 - mapped to a reply
            return self.error_reply(e, args)

    def error_reply(self, e, args):
        reply = getattr(e, "resp_reply", None)      # READONLY, NOREPLICAS (replication)
        if reply is not None:
            return reply
        if isinstance(e, StoreFullError):
            return b"-OOM command not allowed: the store is full\r\n"
        if isinstance(e, KeyTooLargeError):
            return b"-ERR key is too large\r\n"
        if isinstance(e, ValueTooLargeError):
            return b"-ERR value is too large\r\n"
        if isinstance(e, ClosedError):
            return b"-ERR the server is shutting down\r\n"
        if isinstance(e, FaultInjectionError):
            return resp.error(f"ERR fault injection failed: {e}")
        if isinstance(e, (TypeError, ValueError)):
            return resp.error(f"ERR {e}")
        event("error", "command_failed", id=self.id, cmd=args[0][:64],
              error=f"{type(e).__name__}: {e}")
        return resp.error(f"ERR internal error: {type(e).__name__}")

    def reply(self, obj):
        return encode(obj, self.resp3)

    def map_reply(self, pairs):
        """A map in RESP3, a flat array in RESP2 (``pairs``: dict)."""
        return encode(pairs, self.resp3)


def _noauth(conn, args):
    return b"-NOAUTH Authentication required.\r\n"


def unknown_command_fn(conn, args):
    return unknown_command(args)


# ------------------------------------------------------------------ strings

@command("GET", 2, ("readonly", "fast"), (1, 1, 1), "string",
         "Returns the string value of a key.", checked=True)
def cmd_get(conn, args):
    if len(args) != 2:
        return arity_error("get")
    v = conn.sget(args[1])
    if v is None:
        return conn.null
    n = len(v)
    if n >= _BIG:
        conn.count_big(n)
    return b"$%d\r\n%b\r\n" % (n, v)


_SET_TTL_OPTS = {b"EX": 1.0, b"PX": 0.001, b"EXAT": 1.0, b"PXAT": 0.001}


@command("SET", -3, ("write", "denyoom"), (1, 1, 1), "string",
         "Sets the string value of a key. NX XX GET EX PX EXAT PXAT KEEPTTL.",
         checked=True)
def cmd_set(conn, args):
    n = len(args)
    if n == 3:
        conn.sput(args[1], args[2])
        return OK
    if n < 3:
        return arity_error("set")
    nx = xx = get = keepttl = False
    ttl = None
    i = 3
    while i < n:
        opt = args[i].upper()
        if opt == b"NX" and not xx:
            nx = True
        elif opt == b"XX" and not nx:
            xx = True
        elif opt == b"GET":
            get = True
        elif opt == b"KEEPTTL" and ttl is None:
            keepttl = True
        elif opt in _SET_TTL_OPTS and ttl is None and not keepttl and i + 1 < n:
            i += 1
            v = parse_int(args[i])
            if v <= 0 or v > (1 << 62) // 1000:
                raise _err("ERR invalid expire time in 'set' command")
            ttl = v * _SET_TTL_OPTS[opt]
            if opt.endswith(b"AT"):
                ttl -= time.time()
        else:
            raise _err(_E_SYNTAX)
        i += 1
    key = args[1]
    st = conn.store
    old = None
    if get:
        old = st.get(key)
    if nx or xx:
        exists = st.exists(key)
        if (nx and exists) or (xx and not exists):
            return bulk(old) if old is not None else conn.null
    if keepttl:
        t = st.ttl(key)
        ttl = t if t >= 0 else None
    if ttl is not None and ttl <= 0:
        st.delete(key)      # an EXAT/PXAT in the past: set then expired at once
    elif ttl is None:
        st.put(key, args[2])
    else:
        st.put(key, args[2], ttl=ttl)
    if get:
        return bulk(old) if old is not None else conn.null
    return OK


@command("SETEX", 4, ("write", "denyoom"), (1, 1, 1), "string",
         "Sets the value and expiration (seconds) of a key.")
def cmd_setex(conn, args):
    v = parse_int(args[2])
    if v <= 0:
        raise _err("ERR invalid expire time in 'setex' command")
    conn.store.put(args[1], args[3], ttl=float(v))
    return OK


@command("PSETEX", 4, ("write", "denyoom"), (1, 1, 1), "string",
         "Sets the value and expiration (milliseconds) of a key.")
def cmd_psetex(conn, args):
    v = parse_int(args[2])
    if v <= 0:
        raise _err("ERR invalid expire time in 'psetex' command")
    conn.store.put(args[1], args[3], ttl=v / 1000.0)
    return OK


@command("SETNX", 3, ("write", "denyoom", "fast"), (1, 1, 1), "string",
         "Sets the value of a key only when the key does not exist.")
def cmd_setnx(conn, args):
    st = conn.store
    if st.exists(args[1]):
        return ZERO
    st.put(args[1], args[2])
    return ONE


@command("GETDEL", 2, ("write", "fast"), (1, 1, 1), "string",
         "Returns the string value of a key after deleting the key.")
def cmd_getdel(conn, args):
    v = conn.store.get(args[1])
    if v is None:
        return conn.null
    conn.store.delete(args[1])
    return bulk(v)


@command("STRLEN", 2, ("readonly", "fast"), (1, 1, 1), "string",
         "Returns the length of a string value.")
def cmd_strlen(conn, args):
    v = conn.store.get(args[1])
    return integer(0 if v is None else len(v))


@command("MGET", -2, ("readonly", "fast"), (1, -1, 1), "string",
         "Atomically returns the string values of one or more keys. "
         "A LOST key is an -LOST error element, never a nil.", checked=True)
def cmd_mget(conn, args):
    if len(args) < 2:
        return arity_error("mget")
    keys = args[1:]
    st = conn.store
    vals = st.mget(keys, on_lost="mark")
    lost = getattr(kvstore, "LOST", None)
    null = conn.null
    parts = [b"*%d\r\n" % len(vals)]
    total = 0
    for k, v in zip(keys, vals):
        if v is None:
            parts.append(null)
        elif lost is not None and v is lost:
            try:
                v = st.get(k)       # raises KeyLostError with the version
            except KeyLostError as e:
                parts.append(_lost_reply(e))
                continue
            parts.append(null if v is None else bulk(v))
        else:
            total += len(v)
            parts.append(b"$%d\r\n%b\r\n" % (len(v), v))
    if total >= _BIG:
        conn.count_big(total)
    return b"".join(parts)


@command("MSET", -3, ("write", "denyoom"), (1, -1, 2), "string",
         "Atomically creates or modifies the string values of one or more keys.",
         checked=True)
def cmd_mset(conn, args):
    n = len(args)
    if n < 3 or n % 2 == 0:
        return arity_error("mset")
    conn.store.mput(list(zip(args[1::2], args[2::2])))
    return OK


@command("MSETNX", -3, ("write", "denyoom"), (1, -1, 2), "string",
         "Sets the values of keys only when none of them exist.")
def cmd_msetnx(conn, args):
    if len(args) % 2 == 0:
        return arity_error("msetnx")
    st = conn.store
    if any(st.exists(k) for k in args[1::2]):
        return ZERO
    st.mput(list(zip(args[1::2], args[2::2])))
    return ONE


# ------------------------------------------------------------------ keys

@command("DEL", -2, ("write",), (1, -1, 1), "generic",
         "Deletes one or more keys.", checked=True)
def cmd_del(conn, args):
    if len(args) < 2:
        return arity_error("del")
    d = conn.store.delete
    return integer(sum(1 for k in args[1:] if d(k)))


COMMANDS[b"UNLINK"] = COMMANDS[b"unlink"] = cmd_del
INFO["UNLINK"] = (-2, ("write", "fast"), (1, -1, 1), "generic", "Deletes one or more keys.")


@command("EXISTS", -2, ("readonly", "fast"), (1, -1, 1), "generic",
         "Counts how many of the keys exist (a LOST key exists).", checked=True)
def cmd_exists(conn, args):
    if len(args) < 2:
        return arity_error("exists")
    ex = conn.store.exists
    return integer(sum(1 for k in args[1:] if ex(k)))


def _expire(conn, args, scale, name):
    secs = parse_int(args[2]) * scale
    opts = {a.upper() for a in args[3:]}
    if not opts <= {b"NX", b"XX", b"GT", b"LT"}:
        bad = next(a for a in args[3:] if a.upper() not in {b"NX", b"XX", b"GT", b"LT"})
        raise _err(f"ERR Unsupported option {_show(bad)}")
    if b"NX" in opts and len(opts) > 1:
        raise _err("ERR NX and XX, GT or LT options at the same time are not compatible")
    if b"GT" in opts and b"LT" in opts:
        raise _err("ERR GT and LT options at the same time are not compatible")
    st = conn.store
    key = args[1]
    cur = st.ttl(key)
    if cur == -2:
        return ZERO
    if opts:
        if b"NX" in opts and cur != -1:
            return ZERO
        if b"XX" in opts and cur == -1:
            return ZERO
        if b"GT" in opts and (cur == -1 or secs <= cur):
            return ZERO
        if b"LT" in opts and cur != -1 and secs >= cur:
            return ZERO
    if secs <= 0:
        return ONE if st.delete(key) else ZERO
    return ONE if st.expire(key, secs) else ZERO


@command("EXPIRE", -3, ("write", "fast"), (1, 1, 1), "generic",
         "Sets the expiration time of a key in seconds. NX XX GT LT.")
def cmd_expire(conn, args):
    return _expire(conn, args, 1, "expire")


@command("PEXPIRE", -3, ("write", "fast"), (1, 1, 1), "generic",
         "Sets the expiration time of a key in milliseconds. NX XX GT LT.")
def cmd_pexpire(conn, args):
    return _expire(conn, args, 0.001, "pexpire")


@command("TTL", 2, ("readonly", "fast"), (1, 1, 1), "generic",
         "Returns the expiration time in seconds of a key.")
def cmd_ttl(conn, args):
    t = conn.store.ttl(args[1])
    if t < 0:
        return integer(int(t))
    return integer(int(t + 0.5))


@command("PTTL", 2, ("readonly", "fast"), (1, 1, 1), "generic",
         "Returns the expiration time in milliseconds of a key.")
def cmd_pttl(conn, args):
    t = conn.store.ttl(args[1])
    if t < 0:
        return integer(int(t))
    return integer(int(t * 1000 + 0.5))


@command("PERSIST", 2, ("write", "fast"), (1, 1, 1), "generic",
         "Removes the expiration time of a key.")
def cmd_persist(conn, args):
    return ONE if conn.store.persist(args[1]) else ZERO


@command("KEYS", 2, ("readonly",), (0, 0, 0), "generic",
         "Returns all key names that match a glob pattern.")
def cmd_keys(conn, args):
    pat = args[1]
    keys = conn.store.keys()
    if pat != b"*":
        rx = re.compile(fnmatch.translate(pat.decode("latin-1")).encode("latin-1"), re.S)
        keys = [k for k in keys if rx.match(k)]
    return encode(keys, conn.resp3)


@command("TYPE", 2, ("readonly", "fast"), (1, 1, 1), "generic",
         "Determines the type of value stored at a key.")
def cmd_type(conn, args):
    return b"+string\r\n" if conn.store.exists(args[1]) else b"+none\r\n"


# ------------------------------------------------------------------ server

@command("PING", -1, ("fast",), group="connection", summary="Returns the server's liveliness response.",
         checked=True)
def cmd_ping(conn, args):
    n = len(args)
    if n == 1:
        return PONG
    if n == 2:
        return bulk(args[1])
    return arity_error("ping")


@command("ECHO", 2, ("fast",), group="connection", summary="Returns the given string.")
def cmd_echo(conn, args):
    return bulk(args[1])


@command("DBSIZE", 1, ("readonly", "fast"), group="server", summary="Returns the number of keys.")
def cmd_dbsize(conn, args):
    return integer(len(conn.store))


@command("FLUSHALL", -1, ("write",), group="server", summary="Removes all keys.")
def cmd_flushall(conn, args):
    for a in args[1:]:
        if a.upper() not in (b"ASYNC", b"SYNC"):
            raise _err(_E_SYNTAX)
    if not conn.server.config.allow_flushall:
        raise _err("ERR FLUSHALL is disabled by the server configuration")
    conn.store.flush()
    event("warning", "flushall", id=conn.id, addr=conn.addr)
    return OK


COMMANDS[b"FLUSHDB"] = COMMANDS[b"flushdb"] = COMMANDS[b"FLUSHALL"]
INFO["FLUSHDB"] = (-1, ("write",), (0, 0, 0), "server", "Removes all keys (db 0 is the only one).")


@command("SELECT", 2, ("fast",), group="connection", summary="Changes the selected database (0 only).")
def cmd_select(conn, args):
    db = parse_int(args[1])
    if db != 0:
        raise _err("ERR DB index is out of range")
    return OK


@command("INFO", -1, ("fast",), group="server", summary="Returns information and statistics about the server.")
def cmd_info(conn, args):
    return bulk(conn.server.info_text([a.decode("latin-1").lower() for a in args[1:]]).encode())


@command("CONFIG", -2, (), group="server", summary="CONFIG GET pattern [pattern ...]")
def cmd_config(conn, args):
    sub = args[1].upper()
    if sub == b"GET":
        if len(args) < 3:
            return arity_error("config|get")
        params = conn.server.config_params()
        found = {}
        for pat in args[2:]:
            p = pat.decode("latin-1").lower()
            for k, v in params.items():
                if fnmatch.fnmatchcase(k, p):
                    found[k] = v
        return conn.map_reply(found)
    if sub == b"SET":
        raise _err("ERR CONFIG SET is not supported; restart kvstore-server with new flags")
    if sub == b"RESETSTAT":
        conn.server.reset_stats()
        return OK
    if sub == b"HELP":
        return encode(["CONFIG GET <pattern> [<pattern> ...]", "CONFIG RESETSTAT"], conn.resp3)
    raise _err(f"ERR unknown subcommand '{_show(args[1])}'. Try CONFIG HELP.")


_NAME_RE = re.compile(rb"[!-~]*\Z")


@command("CLIENT", -2, (), group="connection", summary="CLIENT ID|GETNAME|SETNAME|SETINFO|INFO|LIST")
def cmd_client(conn, args):
    sub = args[1].upper()
    if sub == b"SETINFO":
        if len(args) != 4:
            return arity_error("client|setinfo")
        attr = args[2].upper()
        if not _NAME_RE.match(args[3]):
            raise _err(f"ERR {attr.decode('latin-1')} cannot contain spaces, newlines or special characters.")
        if attr == b"LIB-NAME":
            conn.lib_name = args[3]
        elif attr == b"LIB-VER":
            conn.lib_ver = args[3]
        else:
            raise _err(f"ERR Unrecognized option '{_show(args[2])}'")
        return OK
    if sub == b"SETNAME":
        if len(args) != 3:
            return arity_error("client|setname")
        if not _NAME_RE.match(args[2]):
            raise _err("ERR Client names cannot contain spaces, newlines or special characters.")
        conn.name = args[2]
        return OK
    if sub == b"GETNAME":
        return bulk(conn.name) if conn.name else conn.null
    if sub == b"ID":
        return integer(conn.id)
    if sub == b"INFO":
        return bulk(conn.server.client_line(conn).encode())
    if sub == b"LIST":
        return bulk("".join(conn.server.client_line(c) for c in conn.server.all_clients()).encode())
    if sub in (b"NO-EVICT", b"NO-TOUCH", b"REPLY"):
        return OK
    if sub == b"HELP":
        return encode(["CLIENT ID", "CLIENT GETNAME", "CLIENT SETNAME <name>",
                       "CLIENT SETINFO <LIB-NAME|LIB-VER> <value>", "CLIENT INFO", "CLIENT LIST"],
                      conn.resp3)
    raise _err(f"ERR unknown subcommand '{_show(args[1])}'. Try CLIENT HELP.")


def _check_password(conn, user, password):
    want = conn.server.config.requirepass
    if not want:
        raise _err("ERR AUTH <password> called without any password configured for the "
                   "default user. Are you sure your configuration is correct?")
    if user not in (None, b"default") or not hmac.compare_digest(password, want.encode()):
        event("warning", "auth_failed", id=conn.id, addr=conn.addr)
        raise _err("WRONGPASS invalid username-password pair or user is disabled.")
    conn.authed = True
    conn.table = COMMANDS


@command("AUTH", -2, ("fast", "no-auth"), group="connection", summary="Authenticates the connection.",
         noauth=True)
def cmd_auth(conn, args):
    if len(args) == 2:
        _check_password(conn, None, args[1])
    elif len(args) == 3:
        _check_password(conn, args[1], args[2])
    else:
        raise _err(_E_SYNTAX)
    return OK


@command("HELLO", -1, ("fast", "no-auth"), group="connection",
         summary="Handshakes with the server (HELLO [2|3] [AUTH user pass] [SETNAME name]).",
         noauth=True)
def cmd_hello(conn, args):
    proto = None
    if len(args) >= 2:
        try:
            proto = parse_int(args[1])
        except CommandError:
            raise _err("ERR Protocol version is not an integer or out of range") from None
        if proto not in (2, 3):
            raise _err("NOPROTO unsupported protocol version")
    i = 2
    name = None
    while i < len(args):
        opt = args[i].upper()
        if opt == b"AUTH" and i + 2 < len(args):
            _check_password(conn, args[i + 1], args[i + 2])
            i += 3
        elif opt == b"SETNAME" and i + 1 < len(args):
            name = args[i + 1]
            if not _NAME_RE.match(name):
                raise _err("ERR Client names cannot contain spaces, newlines or special characters.")
            i += 2
        else:
            raise _err(f"ERR Syntax error in HELLO option '{_show(args[i])}'")
    if not conn.authed:
        return b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the " \
               b"HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client " \
               b"and select the RESP protocol version at the same time\r\n"
    if name is not None:
        conn.name = name
    if proto is not None:
        conn.set_resp3(proto == 3)
    return conn.map_reply({
        "server": "redis", "version": REDIS_VERSION, "proto": 3 if conn.resp3 else 2,
        "id": conn.id, "mode": "standalone", "role": "master", "modules": [],
    })


@command("QUIT", -1, ("fast", "no-auth"), group="connection", summary="Closes the connection.",
         noauth=True)
def cmd_quit(conn, args):
    raise Quit()


@command("COMMAND", -1, (), group="server", summary="COMMAND [COUNT|DOCS|INFO|LIST]")
def cmd_command(conn, args):
    if len(args) == 1:
        return encode([_command_info(n) for n in sorted(INFO)], conn.resp3)
    sub = args[1].upper()
    names = [a.decode("latin-1").upper() for a in args[2:]]
    if sub == b"COUNT":
        return integer(len(INFO))
    if sub == b"LIST":
        return encode([n.lower() for n in sorted(INFO)], conn.resp3)
    if sub == b"INFO":
        return encode([_command_info(n) if n in INFO else None for n in (names or sorted(INFO))],
                      conn.resp3)
    if sub == b"DOCS":
        docs = {}
        for n in (names or sorted(INFO)):
            if n in INFO:
                arity, flags, keys, group, summary = INFO[n]
                docs[n.lower()] = {"summary": summary, "since": "1.0.0", "group": group}
        return conn.map_reply(docs)
    if sub == b"GETKEYS":
        if len(args) < 3:
            return arity_error("command|getkeys")
        n = args[2].decode("latin-1").upper()
        if n not in INFO:
            raise _err("ERR Invalid command specified")
        _, _, (first, last, step), _, _ = INFO[n]
        if not first:
            raise _err("ERR The command has no key arguments")
        rest = args[2:]
        last = len(rest) - 1 if last < 0 else last
        return encode(rest[first:last + 1:step], conn.resp3)
    if sub == b"HELP":
        return encode(["COMMAND", "COMMAND COUNT", "COMMAND DOCS [<name> ...]",
                       "COMMAND INFO [<name> ...]", "COMMAND LIST"], conn.resp3)
    raise _err(f"ERR unknown subcommand '{_show(args[1])}'. Try COMMAND HELP.")


def _command_info(name):
    arity, flags, (first, last, step), group, summary = INFO[name]
    return [name.lower(), arity, list(flags), first, last, step, ["@" + group], [], [], []]


# ------------------------------------------------------------------ transactions
#
# One event loop runs every command, so EXEC runs the queued commands back to
# back with nothing in between: that is the atomicity MULTI promises. WATCH
# remembers each key's version (the store numbers every write) and EXEC
# returns a null array when one changed.

_IN_MULTI = {b"EXEC", b"DISCARD", b"MULTI", b"WATCH", b"QUIT", b"RESET"}


class _MultiTable(dict):
    """Command table while a MULTI is open: everything else is queued."""

    def __missing__(self, name):
        up = name.upper()
        if up in _IN_MULTI:
            return COMMANDS[up]
        return _queue


def _queue(conn, args):
    up = args[0].upper()
    info = INFO.get(up.decode("latin-1"))
    if info is None:
        conn.multi_error = True
        return unknown_command(args)
    arity = info[0]
    if (arity > 0 and len(args) != arity) or (arity < 0 and len(args) < -arity):
        conn.multi_error = True
        return arity_error(up.decode("latin-1").lower())
    conn.multi.append(args)
    return b"+QUEUED\r\n"


MULTI_TABLE = _MultiTable()


def _end_multi(conn):
    conn.multi = None
    conn.multi_error = False
    conn.watched = None
    conn.table = COMMANDS


@command("MULTI", 1, ("fast",), group="transactions", summary="Starts a transaction.")
def cmd_multi(conn, args):
    if conn.multi is not None:
        raise _err("ERR MULTI calls can not be nested")
    conn.multi = []
    conn.multi_error = False
    conn.table = MULTI_TABLE
    return OK


@command("EXEC", 1, (), group="transactions", summary="Executes all commands in a transaction.")
def cmd_exec(conn, args):
    if conn.multi is None:
        raise _err("ERR EXEC without MULTI")
    queued, failed, watched = conn.multi, conn.multi_error, conn.watched
    _end_multi(conn)
    if failed:
        raise _err("EXECABORT Transaction discarded because of previous errors.")
    if watched and _watch_versions(conn, watched) != watched:
        return b"_\r\n" if conn.resp3 else b"*-1\r\n"
    parts = [b"*%d\r\n" % len(queued)]
    parts.extend(conn.execute_one(a) for a in queued)
    return b"".join(parts)


@command("DISCARD", 1, ("fast",), group="transactions", summary="Discards a transaction.")
def cmd_discard(conn, args):
    if conn.multi is None:
        raise _err("ERR DISCARD without MULTI")
    _end_multi(conn)
    return OK


def _watch_versions(conn, keys):
    out = {}
    for k in keys:
        try:
            r = conn.store.get_versioned(k)
            out[k] = None if r is None else r[0]
        except KeyLostError:
            out[k] = "lost"
    return out


@command("WATCH", -2, ("fast",), (1, -1, 1), "transactions",
         "Monitors changes to keys to determine the execution of a transaction.")
def cmd_watch(conn, args):
    if conn.multi is not None:
        raise _err("ERR WATCH inside MULTI is not allowed")
    w = conn.watched or {}
    w.update(_watch_versions(conn, args[1:]))
    conn.watched = w
    return OK


@command("UNWATCH", 1, ("fast",), group="transactions", summary="Forgets about watched keys.")
def cmd_unwatch(conn, args):
    conn.watched = None
    return OK


@command("RESET", 1, ("fast", "no-auth"), group="connection", summary="Resets the connection.",
         noauth=True)
def cmd_reset(conn, args):
    _end_multi(conn)
    conn.set_resp3(False)
    conn.name = b""
    if conn.server.config.requirepass:
        conn.authed = False
        conn.table = NOAUTH_COMMANDS
    return b"+RESET\r\n"


# ------------------------------------------------------------------ kvstore admin

@command("KV.STATS", 1, ("readonly",), group="kvstore", summary="The store's stats plus server fields.")
def cmd_kv_stats(conn, args):
    return conn.map_reply(conn.server.stats_map())


@command("KV.LOST", 1, ("readonly",), group="kvstore",
         summary="Keys currently lost to memory errors: [key, version, state].")
def cmd_kv_lost(conn, args):
    return encode([[k, v, s] for (k, v, s) in conn.store.lost_keys()], conn.resp3)


_KINDS = {b"ao": "ao", b"ar": "ar", b"hwpoison": "hwpoison"}


@command("KV.INJECT", 4, ("write",), group="kvstore",
         summary="KV.INJECT <ao|ar|hwpoison> OFFSET <n> | KV.INJECT <kind> KEY <key>")
def cmd_kv_inject(conn, args):
    if not conn.server.config.enable_fault_injection:
        raise _err("ERR fault injection is disabled; start kvstore-server with "
                   "--enable-fault-injection")
    kind = _KINDS.get(args[1].lower())
    if kind is None:
        raise _err("ERR unknown fault kind (use ao, ar or hwpoison)")
    where = args[2].upper()
    if where == b"OFFSET":
        off = parse_int(args[3])
        if off < 0:
            raise _err("ERR offset must be >= 0")
        res = conn.server.inject(kind, offset=off)
    elif where == b"KEY":
        res = conn.server.inject(kind, key=args[3])
    else:
        raise _err(_E_SYNTAX)
    return conn.map_reply(res)


# ------------------------------------------------------------------ info text

def info_sections(server, wanted):
    """Build INFO text; ``wanted`` is a list of lowercase section names."""
    st = server.store
    now = time.time()
    up = int(now - server.started)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    try:
        stats = dict(st.stats())
    except Exception as e:  # noqa: BLE001 - INFO must answer even then
        stats = {"error": f"{type(e).__name__}: {e}"}
    nkeys = stats.get("keys")
    if nkeys is None:
        nkeys = len(st)
    used = stats.get("used", 0) or 0
    sections = {
        "server": {
            "redis_version": REDIS_VERSION, "kvstore_version": kvstore.__version__,
            "redis_mode": "standalone", "os": f"{platform.system()} {platform.release()} {platform.machine()}",
            "arch_bits": 64 if sys.maxsize > 2**32 else 32, "multiplexing_api": server.loop_name,
            "process_id": os.getpid(), "tcp_port": server.port, "uptime_in_seconds": up,
            "uptime_in_days": up // 86400, "executable": sys.executable,
            "python_version": platform.python_version(),
        },
        "clients": {
            "connected_clients": len(server.clients), "maxclients": server.config.max_clients,
            "blocked_clients": 0,
        },
        "memory": {
            "used_memory": used, "used_memory_human": _human(used),
            "maxmemory": stats.get("capacity", 0), "maxmemory_policy": "noeviction",
            "used_memory_rss": _rss(),
        },
        "persistence": {"loading": 0, "rdb_bgsave_in_progress": 0, "aof_enabled": 0},
        "stats": {
            "total_connections_received": server.stats_connections,
            "total_commands_processed": server.stats_commands,
            "rejected_connections": server.stats_rejected,
        },
        "replication": (server.repl.info() if getattr(server, "repl", None) is not None
                        else {"role": "master", "connected_slaves": 0}),
        "cpu": {"used_cpu_sys": round(ru.ru_stime, 6), "used_cpu_user": round(ru.ru_utime, 6)},
        "keyspace": ({"db0": f"keys={nkeys},expires={stats.get('keys_with_ttl', 0)},avg_ttl=0"}
                     if nkeys else {}),
        "kvstore": stats,
    }
    if not wanted or any(w in ("all", "everything", "default") for w in wanted):
        names = list(sections)
    else:
        names = [n for n in sections if n in wanted]
    out = []
    for n in names:
        title = n.capitalize() if n != "cpu" else "CPU"
        if n == "kvstore":
            title = "kvstore"
        out.append(f"# {title}\r\n")
        for k, v in sections[n].items():
            if isinstance(v, bool):
                v = int(v)
            elif isinstance(v, bytes):
                v = v.decode("latin-1")
            out.append(f"{k}:{v}\r\n")
        out.append("\r\n")
    return "".join(out).rstrip("\r\n") + "\r\n"


def _human(n):
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.2f}{unit}" if unit != "B" else f"{n}B"
        n /= 1024
    return str(n)


def _rss():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
