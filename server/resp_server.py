"""RESP adapters of the connection and server commands (PING, HELLO, AUTH,
CLIENT, CONFIG, COMMAND, INFO, FLUSHALL, KV.*, REPLICAOF, WAIT).

Semantics shared with the native protocol are in :mod:`.ops.server`.
"""

import fnmatch
import re
import time

from .adapters import E_SYNTAX, arity_error, parse_int, show
from .errors import CommandError
from .info import REDIS_VERSION
from .logs import event
from .ops import server as srv_ops
from .resp import OK, PONG, bulk, encode, integer



class Quit(Exception):
    """QUIT: reply +OK, then close after the write."""


def cmd_ping(conn, args):
    n = len(args)
    if n == 1:
        return PONG
    if n == 2:
        return bulk(args[1])
    return arity_error("ping")


def cmd_echo(conn, args):
    return bulk(args[1])


def cmd_dbsize(conn, args):
    return integer(len(conn.store))


def cmd_flushall(conn, args):
    for a in args[1:]:
        if a.upper() not in (b"ASYNC", b"SYNC"):
            raise CommandError(E_SYNTAX)
    srv_ops.flushall(conn)
    return OK


def cmd_select(conn, args):
    db = parse_int(args[1])
    if db != 0:
        raise CommandError("ERR DB index is out of range")
    return OK


def cmd_info(conn, args):
    return bulk(conn.server.info_text([a.decode("latin-1").lower() for a in args[1:]]).encode())


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
        raise CommandError("ERR CONFIG SET is not supported; restart kvstore-server with new flags")
    if sub == b"RESETSTAT":
        conn.server.reset_stats()
        return OK
    if sub == b"HELP":
        return encode(["CONFIG GET <pattern> [<pattern> ...]", "CONFIG RESETSTAT"], conn.resp3)
    raise CommandError(f"ERR unknown subcommand '{show(args[1])}'. Try CONFIG HELP.")


_NAME_RE = re.compile(rb"[!-~]*\Z")


def cmd_client(conn, args):
    sub = args[1].upper()
    if sub == b"SETINFO":
        if len(args) != 4:
            return arity_error("client|setinfo")
        attr = args[2].upper()
        if not _NAME_RE.match(args[3]):
            raise CommandError(f"ERR {attr.decode('latin-1')} cannot contain spaces, newlines or special characters.")
        if attr == b"LIB-NAME":
            conn.lib_name = args[3]
        elif attr == b"LIB-VER":
            conn.lib_ver = args[3]
        else:
            raise CommandError(f"ERR Unrecognized option '{show(args[2])}'")
        return OK
    if sub == b"SETNAME":
        if len(args) != 3:
            return arity_error("client|setname")
        if not _NAME_RE.match(args[2]):
            raise CommandError("ERR Client names cannot contain spaces, newlines or special characters.")
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
    if sub == b"REPLY":
        if len(args) != 3:
            return arity_error("client|reply")
        mode = args[2].upper()
        if mode == b"ON":
            conn.mute = 0
            return OK
        if mode == b"OFF":
            conn.mute = 1
            return OK
        if mode == b"SKIP":
            if not conn.mute:
                conn.mute = 2
            return OK
        raise CommandError(E_SYNTAX)
    if sub in (b"NO-EVICT", b"NO-TOUCH"):
        if len(args) != 3:
            return arity_error(f"client|{sub.decode().lower()}")
        if args[2].upper() not in (b"ON", b"OFF"):
            raise CommandError(E_SYNTAX)
        if sub == b"NO-EVICT":       # exempt this client from maxmemory-clients
            conn.no_evict = args[2].upper() == b"ON"
        return OK
    if sub == b"KILL":
        return client_kill(conn, args)
    if sub == b"HELP":
        return encode(["CLIENT ID", "CLIENT GETNAME", "CLIENT SETNAME <name>",
                       "CLIENT SETINFO <LIB-NAME|LIB-VER> <value>", "CLIENT INFO", "CLIENT LIST"],
                      conn.resp3)
    raise CommandError(f"ERR unknown subcommand '{show(args[1])}'. Try CLIENT HELP.")


def client_kill(conn, args):
    """CLIENT KILL addr (old form: +OK or "No such client"), or CLIENT KILL
    with filters ID, ADDR, LADDR, TYPE, USER, SKIPME, MAXAGE: the count."""
    srv = conn.server
    clients = list(srv.all_clients())
    if len(args) == 3:
        victims = [c for c in clients if c.addr.encode() == args[2]]
        if not victims:
            raise CommandError("ERR No such client")
        _kill(conn, victims)
        return OK
    if len(args) % 2:
        raise CommandError(E_SYNTAX)
    skipme = True
    tests = []
    for i in range(2, len(args), 2):
        opt, val = args[i].upper(), args[i + 1]
        if opt == b"ID":
            try:
                want = parse_int(val)
            except CommandError:
                raise CommandError("ERR client-id should be greater than 0") from None
            if want <= 0:
                raise CommandError("ERR client-id should be greater than 0")
            tests.append(lambda c, w=want: c.id == w)
        elif opt == b"ADDR":
            tests.append(lambda c, w=val: c.addr.encode() == w)
        elif opt == b"LADDR":
            tests.append(lambda c, w=val: _laddr(c) == w)
        elif opt == b"TYPE":
            t = val.lower()
            if t not in (b"normal", b"master", b"replica", b"slave", b"pubsub"):
                raise CommandError(f"ERR Unknown client type '{show(val)}'")
            tests.append(lambda c, t=t: t == b"normal" and c.kind in ("resp", "native"))
        elif opt == b"USER":
            tests.append(lambda c, w=val: _user_name(c) == w)
        elif opt == b"SKIPME":
            v = val.lower()
            if v not in (b"yes", b"no"):
                raise CommandError(E_SYNTAX)
            skipme = v == b"yes"
        elif opt == b"MAXAGE":
            age = parse_int(val)
            tests.append(lambda c, a=age: time.time() - c.created >= a)
        else:
            raise CommandError(E_SYNTAX)
    victims = [c for c in clients if all(t(c) for t in tests) and not (skipme and c is conn)]
    _kill(conn, victims)
    return integer(len(victims))


def _user_name(c):
    user = getattr(c, "user", None)
    return (user.name if user is not None else "default").encode()


def _laddr(c):
    t = c.transport
    sock = t.get_extra_info("sockname") if t is not None else None
    if isinstance(sock, tuple):
        return f"{sock[0]}:{sock[1]}".encode()
    return str(sock).encode()


def _kill(conn, victims):
    for c in victims:
        event("info", "client_killed", id=c.id, addr=c.addr, by=conn.id)
        if c is conn:
            c.close_after_write()
        else:
            c.drop("killed by CLIENT KILL")


def _check_password(conn, user, password):
    access = conn.server.access
    if user is None and access.default_user().nopass:
        raise CommandError("ERR AUTH <password> called without any password configured for the "
                           "default user. Are you sure your configuration is correct?")
    access.authenticate(conn, user, password)


def cmd_auth(conn, args):
    if len(args) == 2:
        _check_password(conn, None, args[1])
    elif len(args) == 3:
        _check_password(conn, args[1], args[2])
    else:
        raise CommandError(E_SYNTAX)
    return OK


def cmd_hello(conn, args):
    proto = None
    if len(args) >= 2:
        try:
            proto = parse_int(args[1])
        except CommandError:
            raise CommandError("ERR Protocol version is not an integer or out of range") from None
        if proto not in (2, 3):
            raise CommandError("NOPROTO unsupported protocol version")
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
                raise CommandError("ERR Client names cannot contain spaces, newlines or special characters.")
            i += 2
        else:
            raise CommandError(f"ERR Syntax error in HELLO option '{show(args[i])}'")
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


def cmd_quit(conn, args):
    raise Quit()


def cmd_command(conn, args):
    table = conn.commands
    rows = table.commands
    if len(args) == 1:
        return encode([_command_info(rows[n]) for n in sorted(rows)], conn.resp3)
    sub = args[1].upper()
    names = [a.decode("latin-1").upper() for a in args[2:]]
    if sub == b"COUNT":
        return integer(len(rows))
    if sub == b"LIST":
        return encode([n.lower() for n in sorted(rows)], conn.resp3)
    if sub == b"INFO":
        return encode([_command_info(rows[n]) if n in rows else None for n in (names or sorted(rows))],
                      conn.resp3)
    if sub == b"DOCS":
        docs = {}
        for n in (names or sorted(rows)):
            if n in rows:
                docs[n.lower()] = {"summary": rows[n].summary, "since": "1.0.0", "group": rows[n].group}
        return conn.map_reply(docs)
    if sub == b"GETKEYS":
        if len(args) < 3:
            return arity_error("command|getkeys")
        n = args[2].decode("latin-1").upper()
        if n not in rows:
            raise CommandError("ERR Invalid command specified")
        if not rows[n].keys[0]:
            raise CommandError("ERR The command has no key arguments")
        return encode(rows[n].key_args(args[2:]), conn.resp3)
    if sub == b"HELP":
        return encode(["COMMAND", "COMMAND COUNT", "COMMAND DOCS [<name> ...]",
                       "COMMAND INFO [<name> ...]", "COMMAND LIST"], conn.resp3)
    raise CommandError(f"ERR unknown subcommand '{show(args[1])}'. Try COMMAND HELP.")


def _command_info(cmd):
    first, last, step = cmd.keys
    return [cmd.name.lower(), cmd.arity, list(cmd.flags), first, last, step, list(cmd.acl),
            [], [], []]


def cmd_kv_stats(conn, args):
    return conn.map_reply(conn.server.stats_map())


def cmd_kv_lost(conn, args):
    return encode([[k, v, s] for (k, v, s) in conn.store.lost_keys()], conn.resp3)


_KINDS = {b"ao": "ao", b"ar": "ar", b"hwpoison": "hwpoison"}


def cmd_kv_inject(conn, args):
    srv_ops.require_injection(conn)
    kind = _KINDS.get(args[1].lower())
    if kind is None:
        raise CommandError("ERR unknown fault kind (use ao, ar or hwpoison)")
    where = args[2].upper()
    if where == b"OFFSET":
        off = parse_int(args[3])
        if off < 0:
            raise CommandError("ERR offset must be >= 0")
        res = srv_ops.inject(conn, kind, offset=off)
    elif where == b"KEY":
        res = srv_ops.inject(conn, kind, key=args[3])
    elif where == b"ENTRY":
        res = srv_ops.inject(conn, kind, entry=args[3])
    else:
        raise CommandError(E_SYNTAX)
    return conn.map_reply(res)


# ------------------------------------------------------------------ replication

def cmd_replicaof(conn, args):
    host, port = args[1], args[2]
    if host.upper() == b"NO" and port.upper() == b"ONE":
        srv_ops.replicaof(conn)
        return OK
    srv_ops.replication(conn)
    try:
        p = int(port)
        if not 0 < p < 65536:
            raise ValueError
    except ValueError:
        raise CommandError("ERR Invalid master port") from None
    if srv_ops.replicaof(conn, host.decode("latin-1"), p, keep_same=True) == "already":
        return b"+OK Already connected to specified master\r\n"
    return OK


def cmd_wait(conn, args):
    srv_ops.replication(conn)
    try:
        num = int(args[1])
        ms = int(args[2])
    except ValueError:
        raise CommandError("ERR value is not an integer or out of range") from None
    if ms < 0:
        raise CommandError("ERR timeout is negative")
    n = srv_ops.wait(conn, num, srv_ops.wait_deadline(ms / 1000.0),
                     hold=getattr(conn, "multi", None) is None)
    return b"" if n is None else integer(n)      # b"": placeholder, replaced when acked


def cmd_kv_digest(conn, args):
    d = srv_ops.digest(conn)
    return encode([d["keys"], d["lost"], d["digest"]], conn.resp3)


def cmd_kv_repl(conn, args):
    if args[1].upper() == b"DROP":
        return integer(srv_ops.drop_links(conn))
    raise CommandError(E_SYNTAX)
