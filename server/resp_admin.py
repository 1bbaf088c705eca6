"""RESP handlers of ACL and LATENCY (the users are :mod:`.access`'s)."""

from . import acl as aclmod
from .adapters import arity_error, show
from .errors import CommandError
from .resp import OK, bulk, encode

__all__ = ["cmd_acl", "cmd_latency"]

_ACL_HELP = [
    "ACL <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "CAT [<category>]", "    List all commands that belong to <category>, or all command categories",
    "    when no category is specified.",
    "GETUSER <username>", "    Get the user's details.",
    "LIST", "    Show users details in config file format.",
    "LOAD", "    Reload users from the ACL file.",
    "LOG [<count> | RESET]", "    Show the ACL log entries (kvstore keeps none: always empty).",
    "USERS", "    List all the registered usernames.",
    "WHOAMI", "    Return the current connection username.",
    "HELP", "    Print this help.",
]

_ACL_ARITY = {b"CAT": (2, 3), b"GETUSER": (3, 3), b"LIST": (2, 2), b"LOAD": (2, 2),
              b"LOG": (2, 3), b"USERS": (2, 2), b"WHOAMI": (2, 2), b"HELP": (2, 2)}


def cmd_acl(conn, args):
    sub = args[1].upper()
    lim = _ACL_ARITY.get(sub)
    if lim is None:
        if sub in (b"SETUSER", b"DELUSER", b"SAVE", b"DRYRUN", b"GENPASS"):
            raise CommandError(f"ERR ACL {sub.decode()} is not supported by kvstore: edit the "
                               f"ACL file and run ACL LOAD")
        raise CommandError(f"ERR unknown subcommand '{show(args[1])}'. Try ACL HELP.")
    if not lim[0] <= len(args) <= lim[1]:
        return arity_error("acl|" + sub.decode().lower())
    access = conn.server.access
    if sub == b"WHOAMI":
        return bulk(conn.user.name.encode("utf-8", "surrogateescape"))
    if sub == b"USERS":
        return encode(sorted(access.acl.users), conn.resp3)
    if sub == b"LIST":
        return encode(access.acl.list(), conn.resp3)
    if sub == b"CAT":
        if len(args) == 2:
            return encode(aclmod.categories(), conn.resp3)
        names = aclmod.commands_in(args[2].decode("utf-8", "replace"))
        if names is None:
            raise CommandError(f"ERR Unknown category '{show(args[2])}'")
        return encode(names, conn.resp3)
    if sub == b"LOAD":
        access.reload(conn.server)
        return OK
    if sub == b"GETUSER":
        u = access.acl.get(args[2])
        if u is None:
            return conn.null
        return conn.map_reply(_getuser(u))
    if sub == b"LOG":
        if len(args) == 3 and args[2].upper() == b"RESET":
            return OK
        return encode([], conn.resp3)
    return encode(_ACL_HELP, conn.resp3)


def _getuser(u):
    """ACL GETUSER's map, in Redis 7's shape."""
    flags = ["on" if u.enabled else "off"]
    if u.nopass:
        flags.append("nopass")
    if u.sanitize:
        flags.append(u.sanitize)
    desc = u.describe().split(" ")
    commands = " ".join(w for w in desc if w[:1] in "+-" and len(w) > 1)
    if u.allkeys:
        keys = "~*"
    else:
        keys = " ".join(("~" if a == "RW" else f"%{a}~") + p.decode("utf-8", "surrogateescape")
                        for a, p in u.key_patterns)
    if u.allchannels:
        channels = "&*"
    else:
        channels = " ".join("&" + p.decode("utf-8", "surrogateescape") for p in u.channel_patterns)
    return {"flags": flags, "passwords": list(u.passwords), "commands": commands,
            "keys": keys, "channels": channels, "selectors": []}


_LATENCY_HELP = [
    "LATENCY <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "HISTOGRAM [<command> ...]",
    "    Return a cumulative distribution of latencies (kvstore keeps none: empty map).",
    "LATEST", "    Return the latest latency samples for all events.",
    "RESET [<event> ...]", "    Reset latency data of one or more <event> classes.",
    "HELP", "    Print this help.",
]


def cmd_latency(conn, args):
    sub = args[1].upper()
    events = conn.server.latency
    if sub == b"LATEST" and len(args) == 2:
        return encode([[name, t, latest, peak] for name, (t, latest, peak)
                       in sorted(events.items())], conn.resp3)
    if sub == b"HISTOGRAM":
        return conn.map_reply({})
    if sub == b"RESET":
        names = [a.decode("latin-1").lower() for a in args[2:]]
        n = 0
        for name in (names or list(events)):
            if events.pop(name, None) is not None:
                n += 1
        return b":%d\r\n" % n
    if sub == b"HELP" and len(args) == 2:
        return encode(_LATENCY_HELP, conn.resp3)
    if sub in (b"HISTORY", b"GRAPH", b"DOCTOR"):
        raise CommandError(f"ERR LATENCY {sub.decode()} is not supported by kvstore")
    raise CommandError(f"ERR unknown subcommand '{show(args[1])}'. Try LATENCY HELP.")
