"""MULTI/EXEC/WATCH over RESP.

One event loop runs every command, so EXEC runs the queued commands back to
back with nothing in between: that is the atomicity MULTI promises.

WATCH follows Redis's touchWatchedKey rule: every write-like change of a
watched key (SET, DEL, EXPIRE, PERSIST, RENAME, FLUSHALL, INCR...) made
through the write path marks the watching connections dirty
(``conn.watch_dirty``, see :meth:`.writes.WritePath.watch`), and EXEC then
answers a null array. EXEC also aborts when a watched key's version changed
(writes applied by replication or rebuilt keys) or a key that existed at
WATCH time has since expired. WATCH of a key already watched keeps the first
state (a change in between is not forgotten).

All or nothing: when the store may not hold every write of the block
(:meth:`.writes.WritePath.fits`), the keys the queued commands name are
kept aside first; if a command of the block fails for lack of space
(``-OOM``), every write of the block is undone and EXEC answers that error.
"""

from kvstore.errors import KeyLostError, KeyTooLargeError

from .adapters import arity_error, unknown_command
from .errors import CommandError
from .resp import OK, QUEUED

__all__ = ["MultiTable"]

_IN_MULTI = {b"EXEC", b"DISCARD", b"MULTI", b"WATCH", b"QUIT", b"RESET"}


class MultiTable(dict):
    """RESP dispatch dict while a MULTI is open: everything else is queued."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def __missing__(self, name):
        up = name.upper()
        if up in _IN_MULTI:
            return self.table.resp[up]
        return _queue


def _queue(conn, args):
    up = args[0].upper()
    cmd = conn.commands.commands.get(up.decode("latin-1"))
    if cmd is None:
        conn.multi_error = True
        return unknown_command(args)
    if not cmd.arity_ok(len(args)):
        conn.multi_error = True
        return arity_error(up.decode("latin-1").lower())
    sub = _SUBCOMMANDS.get(up)
    if sub is not None and len(args) > 1:
        name = args[1].upper()
        arity = sub.get(name)
        if arity is None:
            conn.multi_error = True
            return (b"-ERR unknown subcommand '%b'. Try %b HELP.\r\n"
                    % (args[1][:128].replace(b"\r", b" ").replace(b"\n", b" "), up))
        if len(args) != arity:
            conn.multi_error = True
            return arity_error(f"{up.decode().lower()}|{name.decode().lower()}")
    try:
        for hook in conn.commands.hooks:     # ACL: refused at queue time, as Redis
            hook(conn, cmd, args)
    except CommandError as e:
        conn.multi_error = True
        return e.reply
    conn.multi.append(args)
    return QUEUED


#: Subcommands checked when queued, as Redis does for container commands:
#: command -> {subcommand: arity}.
_SUBCOMMANDS = {
    b"OBJECT": {b"ENCODING": 3, b"IDLETIME": 3, b"FREQ": 3, b"REFCOUNT": 3, b"HELP": 2},
}


def unwatch_all(conn):
    w = conn.watched
    if w:
        conn.writes.unwatch(conn, w)
    conn.watched = None
    conn.watch_dirty = False


def _end_multi(conn):
    conn.multi = None
    conn.multi_error = False
    unwatch_all(conn)
    conn.table = conn.commands.resp


def cmd_multi(conn, args):
    if conn.multi is not None:
        raise CommandError("ERR MULTI calls can not be nested")
    conn.multi = []
    conn.multi_error = False
    conn.table = conn.commands.resp_multi
    return OK


def cmd_exec(conn, args):
    if conn.multi is None:
        raise CommandError("ERR EXEC without MULTI")
    queued, failed, watched = conn.multi, conn.multi_error, conn.watched
    dirty = getattr(conn, "watch_dirty", False)
    _end_multi(conn)
    if failed:
        raise CommandError("EXECABORT Transaction discarded because of previous errors.")
    if watched and (dirty or _changed(conn, watched)):
        return b"_\r\n" if conn.resp3 else b"*-1\r\n"
    w = conn.writes
    snap = None
    sizes = [len(x) for a in queued for x in a[2:]]
    # APPEND, SETRANGE, COPY, RENAME... write more than their arguments:
    # only blocks of plain writes are sized from their arguments
    if any(_grows(conn, a[0]) for a in queued) or not w.fits(sizes):
        snap = w.snapshot(_block_keys(conn, queued))
    mark = len(w.entries)
    parts = [b"*%d\r\n" % len(queued)]
    for a in queued:
        r = conn.execute_one(a)
        if snap is not None and r.startswith(b"-OOM"):
            w.rollback(snap, mark)
            return b"-OOM command not allowed: the store is full (no write of the " \
                   b"transaction was applied)\r\n"
        parts.append(r)
    return b"".join(parts)


#: Commands whose writes are no larger than their arguments (or write nothing).
_SIZED = frozenset({b"SET", b"SETNX", b"SETEX", b"PSETEX", b"MSET", b"MSETNX", b"GETSET", b"INCR",
                    b"DECR", b"INCRBY", b"DECRBY", b"GET", b"MGET", b"EXISTS", b"TTL", b"PTTL",
                    b"DEL", b"UNLINK", b"EXPIRE", b"PEXPIRE", b"EXPIREAT", b"PEXPIREAT",
                    b"PERSIST", b"GETDEL", b"STRLEN", b"TYPE", b"PING", b"ECHO", b"TOUCH"})


def _grows(conn, name):
    """A write whose size is not bounded by its arguments (APPEND, COPY...)."""
    up = name.upper()
    if up in _SIZED:
        return False
    cmd = conn.commands.get(up)
    return cmd is not None and "write" in cmd.flags


def _block_keys(conn, queued):
    """Every key the queued commands name (from their rows' key positions)."""
    keys = []
    for a in queued:
        cmd = conn.commands.get(a[0])
        if cmd is not None:
            keys.extend(cmd.key_args(a))
    return keys


def _changed(conn, watched):
    now = _watch_versions(conn, watched)
    for k, v in watched.items():
        if now[k] != v:
            return True
    return False


def cmd_discard(conn, args):
    if conn.multi is None:
        raise CommandError("ERR DISCARD without MULTI")
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
        except KeyTooLargeError:
            out[k] = None
    return out


def cmd_watch(conn, args):
    if conn.multi is not None:
        raise CommandError("ERR WATCH inside MULTI is not allowed")
    w = conn.watched
    if w is None:
        w = conn.watched = {}
        conn.watch_dirty = False
    new = [k for k in args[1:] if k not in w]
    if new:
        w.update(_watch_versions(conn, new))
        for k in new:
            conn.writes.watch(conn, k)
    return OK


def cmd_unwatch(conn, args):
    unwatch_all(conn)
    return OK


def cmd_reset(conn, args):
    _end_multi(conn)
    conn.set_resp3(False)
    conn.name = b""
    conn.set_user(conn.server.access.initial_user())
    return b"+RESET\r\n"
