"""MULTI/EXEC/WATCH over RESP.

One event loop runs every command, so EXEC runs the queued commands back to
# back with nothing in between: that is the atomicity MULTI promises. WATCH
# remembers each key's version (the store numbers every write) and EXEC
returns a null array when one changed.
"""

from kvstore.errors import KeyLostError

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
    try:
        for hook in conn.commands.hooks:     # ACL: refused at queue time, as Redis
            hook(conn, cmd, args)
    except CommandError as e:
        conn.multi_error = True
        return e.reply
    conn.multi.append(args)
    return QUEUED


def _end_multi(conn):
    conn.multi = None
    conn.multi_error = False
    conn.watched = None
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
    _end_multi(conn)
    if failed:
        raise CommandError("EXECABORT Transaction discarded because of previous errors.")
    if watched and _watch_versions(conn, watched) != watched:
        return b"_\r\n" if conn.resp3 else b"*-1\r\n"
    parts = [b"*%d\r\n" % len(queued)]
    parts.extend(conn.execute_one(a) for a in queued)
    return b"".join(parts)


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
    return out


def cmd_watch(conn, args):
    if conn.multi is not None:
        raise CommandError("ERR WATCH inside MULTI is not allowed")
    w = conn.watched or {}
    w.update(_watch_versions(conn, args[1:]))
    conn.watched = w
    return OK


def cmd_unwatch(conn, args):
    conn.watched = None
    return OK


def cmd_reset(conn, args):
    _end_multi(conn)
    conn.set_resp3(False)
    conn.name = b""
    conn.set_user(conn.server.access.initial_user())
    return b"+RESET\r\n"
