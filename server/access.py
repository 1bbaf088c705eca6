"""Users, AUTH and protected mode on the server (the rules are :mod:`.acl`'s).

:class:`Access` holds the server's :class:`.acl.AclStore` (``--aclfile``, or
only ``default`` with the ``--requirepass`` password) and applies it to both
protocols:

* every connection starts as ``default`` when that user is ``on nopass``,
  else unauthenticated (``conn.user`` None) until AUTH / HELLO AUTH / the
  native ``auth`` op names a user and its password;
* the pre-dispatch hook (:meth:`Access.hook`, installed in the command table
  only while some user is restricted) checks the command, its subcommand and
  its keys with ``User.check`` and refuses with Redis's ``-NOPERM`` text (the
  native error code is ``NOPERM`` too);
* a connection whose user may run everything on every key
  (``+@all ~*``, the default user) passes the hook at once, and keeps the C
  GET/SET path (:meth:`Access.fast_ok`, the table's per-connection gate).

Protected mode is Redis's: while it is on and the default user has no
password, a client from beyond the loopback interface gets
:data:`DENIED` and is closed (:func:`protected_refusal` decides).
"""

import ipaddress

from .acl import SUBCOMMANDS, AclError, AclStore, COMMAND_CATEGORIES, WRONGPASS
from .errors import CommandError
from .logs import event

__all__ = ["Access", "DENIED", "protected_refusal", "is_loopback", "unrestricted"]

#: Redis 7's reply to a non-loopback client in protected mode (its exact text).
DENIED = (
    "DENIED Redis is running in protected mode because protected mode is enabled and no "
    "password is set for the default user. In this mode connections are only accepted from "
    "the loopback interface. If you want to connect from external computers to Redis you may "
    "adopt one of the following solutions: 1) Just disable protected mode sending the command "
    "'CONFIG SET protected-mode no' from the loopback interface by connecting to Redis from the "
    "same host the server is running, however MAKE SURE Redis is not publicly accessible from "
    "internet if you do so. Use CONFIG REWRITE to make this change permanent. 2) Alternatively "
    "you can just disable the protected mode by editing the Redis configuration file, and "
    "setting the protected mode option to 'no', and then restarting the server. 3) If you "
    "started the server manually just for testing, restart it with the '--protected-mode no' "
    "option. 4) Setup a an authentication password for the default user. NOTE: You only need "
    "to do one of the above things in order for the server to start accepting connections "
    "from the outside.")

_ALL = frozenset(COMMAND_CATEGORIES)


def unrestricted(user):
    """True when ``user`` may run every command on every key (``+@all ~*``
    with nothing taken away): the ACL check has nothing to refuse."""
    return (user is not None and user.allcommands and user.allkeys
            and user.allowed >= _ALL)


def is_loopback(host):
    """Is ``host`` (an address string) on the loopback interface? IPv4-mapped
    IPv6 loopback (``::ffff:127.0.0.1``) counts, as in Redis."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    return ip.is_loopback


def protected_refusal(protected_mode, default_user, peer_host):
    """Redis's protected-mode decision: refuse ``peer_host`` when protected
    mode is on, the default user has no password (``nopass``), and the peer
    is not on the loopback interface. A Unix socket (no host) is never refused."""
    if not protected_mode or default_user is None or not default_user.nopass:
        return False
    if not peer_host:
        return False
    return not is_loopback(peer_host)


def _text(b):
    if isinstance(b, (bytes, bytearray)):
        return bytes(b).decode("utf-8", "surrogateescape")
    return b


def _native_keys(op, args):
    """The keys a native op names (for key permissions); malformed arguments
    yield no keys: the op itself refuses them."""
    def key(k):
        if isinstance(k, str):
            return k.encode("utf-8", "surrogateescape")
        return k if isinstance(k, bytes) else None

    if not args:
        return ()
    if op in ("get", "getv", "put", "delete", "exists", "expire", "ttl", "persist"):
        k = key(args[0])
        return (k,) if k is not None else ()
    first = args[0]
    if type(first) is not list:
        return ()
    if op == "mget":
        keys = first
    elif op == "mput":
        keys = first[::2]
    elif op == "fetch":
        keys = [it[0] for it in first if type(it) is list and it]
    else:
        return ()
    return tuple(k for k in map(key, keys) if k is not None)


class Access:
    """The server's users and how connections use them (module docstring)."""

    def __init__(self, config):
        self.config = config
        self.path = getattr(config, "aclfile", "") or ""
        self.table = None
        self._hooked = False
        if self.path:
            self.acl = AclStore.load(self.path, requirepass=config.requirepass or None)
        else:
            self.acl = AclStore(config.requirepass or None)

    # -- wiring

    def install(self, table):
        """Install the ACL hook in ``table`` when some user is restricted."""
        self.table = table
        self._maybe_hook()

    def _maybe_hook(self):
        if self._hooked or self.table is None:
            return
        if all(unrestricted(u) or not u.enabled for u in self.acl.users.values()):
            return
        self.table.add_hook(self.hook, fast_ok=self.fast_ok)
        self._hooked = True

    # -- connections

    def default_user(self):
        return self.acl.default_user()

    def initial_user(self):
        """The user a new connection starts as (None: must AUTH first)."""
        u = self.acl.default_user()
        return u if u.enabled and u.nopass else None

    def requires_auth(self):
        return self.initial_user() is None

    @staticmethod
    def fast_ok(conn):
        return conn.user_full

    def authenticate(self, conn, name, password):
        """AUTH: set ``conn``'s user or raise WRONGPASS (logged)."""
        if name is None:
            name = "default"
        u = self.acl.authenticate(_text(name), password)
        if u is None:
            event("warning", "auth_failed", id=conn.id, addr=conn.addr,
                  user=str(_text(name))[:64])
            raise CommandError(WRONGPASS, "NOAUTH" if conn.kind == "native" else None,
                               "invalid username-password pair or user is disabled")
        conn.set_user(u)
        return u

    # -- the check

    def hook(self, conn, cmd, args):
        if conn.user_full or cmd.noauth:     # AUTH, HELLO, QUIT, RESET: always allowed
            return
        user = conn.user
        if user is None:          # not authenticated: the no-auth table already refused
            return
        if conn.kind == "native":
            op = cmd.native
            reason = user.check_native(op, _native_keys(op, args))
            if reason is None and op == "fetch_range" and not user.allkeys:
                # values of every key in a hash range: only for users who
                # may read every key (~*), as peers are
                reason = "this user has no permissions to access every key (fetch_range needs ~*)"
        else:
            name = cmd.name.lower()
            sub = args[1] if name in SUBCOMMANDS and len(args) > 1 else None
            keys = cmd.key_args(args)
            access = None
            if name == "set" and any(a.upper() == b"GET" for a in args[3:]):
                access = "RW"
            reason = user.check(name, sub, keys, access=access)
        if reason is not None:
            event("info", "acl_denied", id=conn.id, addr=conn.addr, user=user.name,
                  cmd=cmd.name or cmd.native)
            raise CommandError("NOPERM " + reason)

    # -- ACL LOAD

    def reload(self, server):
        """ACL LOAD: read the file again; on success replace every user and
        move each connection to the new definition of its user (a connection
        whose user is gone is closed, as Redis does)."""
        if not self.path:
            raise CommandError(
                "ERR This Redis instance is not configured to use an ACL file. You may want "
                "to specify users via the ACL SETUSER command and then issue a CONFIG "
                "REWRITE (assuming you have a Redis configuration file set) in order to "
                "store users in the Redis configuration.")
        try:
            acl = AclStore.load(self.path, requirepass=self.config.requirepass or None)
        except AclError as e:
            raise CommandError(f"ERR {e}") from None
        self.acl = acl
        self._maybe_hook()
        for conn in server.all_clients():
            old = getattr(conn, "user", None)
            if old is None:
                continue
            new = acl.get(old.name)
            if new is None or not new.enabled:
                conn.drop("acl user removed")
            else:
                conn.set_user(new)
        event("info", "acl_loaded", path=self.path, users=len(acl.users))
