"""Server-wide commands (see the package docstring)."""

import time

from kvstore import _native
from kvstore.errors import KeyLostError

from ..errors import CommandError
from ..logs import event

__all__ = ["digest", "flushall", "inject", "lost", "replicaof", "replication", "require_injection",
           "role", "stats", "sync", "wait"]


def flushall(conn):
    if not conn.server.config.allow_flushall:
        raise CommandError("ERR FLUSHALL is disabled by the server configuration", "DISABLED",
                           "flushall is disabled by the server configuration")
    conn.writes.flush()
    event("warning", "flushall", id=conn.id, addr=conn.addr)
    return True


def require_injection(conn):
    if not conn.server.config.enable_fault_injection:
        raise CommandError("ERR fault injection is disabled; start kvstore-server with "
                           "--enable-fault-injection", "DISABLED",
                           "fault injection is disabled; start kvstore-server with "
                           "--enable-fault-injection")


def inject(conn, kind, offset=None, key=None, entry=None):
    """Inject a memory fault (``kind``: ao, ar, hwpoison) at an arena
    offset, into ``key``'s record, or into the index page holding
    ``entry``'s index entry (every key of that page's hash range is LOST
    until rebuilt by hash range)."""
    require_injection(conn)
    return conn.server.inject(kind, offset=offset, key=key, entry=entry)


def stats(conn):
    return conn.server.stats_map()


def lost(conn):
    return [[k, v, s] for (k, v, s) in conn.store.lost_keys()]


# ---------------------------------------------------------------- replication

def replication(conn):
    r = conn.server.repl
    if r is None:
        raise CommandError("ERR replication is not running")
    return r


def replicaof(conn, host=None, port=None, keep_same=False):
    """Follow ``host:port``, or (host None) become a primary. With
    ``keep_same``, following the primary already followed changes nothing
    and returns "already"."""
    r = replication(conn)
    if host is None:
        if r.role != "master":
            r.promote()
        return True
    if keep_same and r.role != "master" and r.replica.master == (host, port):
        return "already"
    r.become_replica(host, port)
    return True


def wait(conn, num, deadline, hold=True):
    """Replicas that acked this node's offset now. When fewer than ``num``
    and ``hold``: the reply of the running batch is held until enough ack or
    ``deadline`` (monotonic; None: no limit) passes, and None is returned
    (the adapter's placeholder reply is replaced then)."""
    r = replication(conn)
    if r.role != "master":
        raise CommandError("ERR WAIT cannot be used with replica instances.", "ERR",
                           "wait cannot be used with replica instances")
    n = r.primary.acked(r.offset)
    out = conn.server.batch_out
    if n >= num or out is None or not hold:
        return n
    r.primary.add_wait(len(out), num, deadline)
    return None


def wait_deadline(seconds):
    return None if seconds <= 0 else time.monotonic() + seconds


def sync(conn, replid, offset, listen_port):
    """A replica asks for the stream (see repl_primary)."""
    return replication(conn).handle_sync(conn, replid, offset, listen_port)


def drop_links(conn):
    return replication(conn).drop_links()


def role(conn):
    return replication(conn).stats_fields()


def digest(conn):
    """xxh64 over sorted (key, version, value) of every present key."""
    st = conn.store
    h = 0
    n = 0
    nlost = 0
    acc = []
    for k in sorted(st.keys()):
        try:
            got = st.get_versioned(k)
        except KeyLostError:
            nlost += 1
            continue
        if got is None:
            continue
        acc.append(b"%d:%b%d:%d:%b" % (len(k), k, got[0], len(got[1]), got[1]))
        n += 1
        if len(acc) >= 4096:
            h = _native.xxh64(b"".join(acc), h)
            acc = []
    if acc:
        h = _native.xxh64(b"".join(acc), h)
    return {"keys": n, "lost": nlost, "digest": f"{h:016x}"}
