"""Users and permissions in Redis's ACL format (pure: no I/O but loading a file).

An ACL file holds one user a line, as Redis's ``aclfile``::

    user default on nopass ~* &* +@all
    user app on >s3cret ~app:* %R~shared:* resetchannels -@all +@read +@write -@dangerous
    user ops on #<sha256 hex> ~* &* +@all -flushall +client|kill

Rules, applied left to right (``reset`` gives a fresh user, as created):
``on``/``off``; ``>pass`` / ``<pass`` add/remove a password, ``#hex`` /
``!hex`` the same by SHA-256, ``nopass``, ``resetpass``; ``~pattern``
(read+write keys), ``%R~pattern``, ``%W~pattern``, ``%RW~pattern``,
``allkeys`` (``~*``), ``resetkeys``; ``&pattern``, ``allchannels`` (``&*``),
``resetchannels``; ``+@category`` / ``-@category``, ``+cmd`` / ``-cmd``
(a container such as ``client`` with all its subcommands), ``+cmd|sub`` /
``-cmd|sub``, ``allcommands`` (``+@all``), ``nocommands`` (``-@all``);
``sanitize-payload`` / ``skip-sanitize-payload`` are accepted and kept.
Not supported (a load error names them): selectors ``(...)`` and first-arg
rules like ``+select|0``.

:class:`AclStore` loads a file (``AclStore.load(path)`` or
``AclStore.from_text(text)``); every bad line is reported at once in an
:class:`AclError` with ``path:line`` as Redis reports them, and nothing is
applied. ``authenticate(name, password)`` compares in constant time and
returns the :class:`User` or None. ``User.check(command, subcommand, keys)``
returns None when allowed or the NOPERM reason (Redis's text, without the
``-NOPERM`` code). :meth:`AclStore.list`, :func:`categories`,
:func:`commands_in` give ACL LIST / ACL CAT replies in Redis's format.

Category membership is data (:data:`COMMAND_CATEGORIES`), taken from
redis-server 7's ``COMMAND INFO`` for every command kvstore has or will have,
plus kvstore's own (``kv.*``, the native ``sync``); :data:`NATIVE_COMMANDS`
maps each native-protocol operation to the command whose rules it follows,
so both protocols obey one set of permissions.

ACL LIST prints a user's command rules in the order given, each command or
category once (the latest rule for it wins its place), after ``+@all`` or
``-@all`` -- Redis 7.2's form. Redis 7.0 instead recomputes a shortest
category cover; the two agree for the common shapes (``+@all -@cat``,
``-@all +@cat``, ``-@all +cmd``), see tests/test_acl.py.
"""

import hashlib
import hmac

__all__ = ["AclError", "AclStore", "User", "COMMAND_CATEGORIES", "NATIVE_COMMANDS",
           "CATEGORIES", "categories", "commands_in", "password_hash", "WRONGPASS"]

#: Redis's categories, in ACL CAT order.
CATEGORIES = ("keyspace", "read", "write", "set", "sortedset", "list", "hash", "string",
              "bitmap", "hyperloglog", "geo", "stream", "pubsub", "admin", "fast", "slow",
              "blocking", "dangerous", "connection", "transaction", "scripting")

WRONGPASS = "WRONGPASS invalid username-password pair or user is disabled."

# name (lower case, "parent|sub" for subcommands): categories. Redis 7's
# COMMAND INFO for the Redis commands; kvstore's own at the end.
_TABLE = """
auth fast connection
client slow
client|setname slow connection
client|reply slow connection
client|info slow connection
client|getname slow connection
client|setinfo slow connection
client|no-evict admin slow dangerous connection
client|list admin slow dangerous connection
client|unblock admin slow dangerous connection
client|help slow connection
client|kill admin slow dangerous connection
client|id slow connection
client|unpause admin slow dangerous connection
client|pause admin slow dangerous connection
command slow connection
command|docs slow connection
command|help slow connection
command|info slow connection
command|getkeys slow connection
command|list slow connection
command|count slow connection
config slow
config|rewrite admin slow dangerous
config|resetstat admin slow dangerous
config|get admin slow dangerous
config|help slow
config|set admin slow dangerous
dbsize keyspace read fast
del keyspace write slow
discard fast transaction
echo fast connection
exec slow transaction
exists keyspace read fast
expire keyspace write fast
flushall keyspace write slow dangerous
flushdb keyspace write slow dangerous
get read string fast
getdel write string fast
hello fast connection
info slow dangerous
keys keyspace read slow dangerous
mget read string fast
mset write string slow
msetnx write string slow
multi fast transaction
persist keyspace write fast
pexpire keyspace write fast
ping fast connection
psetex write string slow
pttl keyspace read fast
quit fast connection
reset fast connection
select fast connection
set write string slow
setex write string slow
setnx write string fast
strlen read string fast
ttl keyspace read fast
type keyspace read fast
unlink keyspace write fast
unwatch fast transaction
watch fast transaction
replicaof admin slow dangerous
slaveof admin slow dangerous
wait slow connection
role admin fast dangerous
sync admin slow dangerous
psync admin slow dangerous
replconf admin slow dangerous
incr write string fast
decr write string fast
incrby write string fast
decrby write string fast
incrbyfloat write string fast
append write string fast
getset write string fast
getex write string fast
getrange read string slow
setrange write string slow
scan keyspace read slow
expireat keyspace write fast
pexpireat keyspace write fast
expiretime keyspace read fast
pexpiretime keyspace read fast
rename keyspace write slow
renamenx keyspace write fast
copy keyspace write slow
touch keyspace read fast
randomkey keyspace read slow
time fast
object slow
object|encoding keyspace read slow
object|freq keyspace read slow
object|idletime keyspace read slow
object|help keyspace slow
object|refcount keyspace read slow
acl slow
acl|list admin slow dangerous
acl|getuser admin slow dangerous
acl|genpass slow
acl|load admin slow dangerous
acl|users admin slow dangerous
acl|log admin slow dangerous
acl|deluser admin slow dangerous
acl|save admin slow dangerous
acl|dryrun admin slow dangerous
acl|help slow
acl|cat slow
acl|whoami slow
acl|setuser admin slow dangerous
latency slow
latency|reset admin slow dangerous
latency|history admin slow dangerous
latency|latest admin slow dangerous
latency|graph admin slow dangerous
latency|histogram admin slow dangerous
latency|help slow
latency|doctor admin slow dangerous
cluster slow
cluster|info slow
cluster|nodes slow
cluster|slots slow
cluster|shards slow
cluster|myid slow
cluster|keyslot slow
cluster|myshardid slow
cluster|countkeysinslot slow
cluster|getkeysinslot slow
cluster|help slow
cluster|meet admin slow dangerous
cluster|forget admin slow dangerous
cluster|reset admin slow dangerous
cluster|failover admin slow dangerous
cluster|replicate admin slow dangerous
cluster|addslots admin slow dangerous
cluster|delslots admin slow dangerous
cluster|setslot admin slow dangerous
cluster|saveconfig admin slow dangerous
shutdown admin slow dangerous
asking fast connection
readonly fast connection
readwrite fast connection
kv.stats slow dangerous
kv.lost keyspace read slow dangerous
kv.digest keyspace read slow
kv.fetch keyspace read slow
kv.migrate keyspace write slow dangerous
kv.inject admin slow dangerous
kv.restart admin slow dangerous
kv.repl admin slow dangerous
"""

COMMAND_CATEGORIES = {}
for _line in _TABLE.strip().splitlines():
    _name, *_cats = _line.split()
    COMMAND_CATEGORIES[_name] = frozenset(_cats)
del _line, _name, _cats

#: Containers (commands with subcommands) and their subcommand names.
SUBCOMMANDS = {}
for _name in COMMAND_CATEGORIES:
    if "|" in _name:
        _parent, _sub = _name.split("|", 1)
        SUBCOMMANDS.setdefault(_parent, set()).add(_sub)
del _name, _parent, _sub

#: Native-protocol operation -> the command whose permissions it follows.
NATIVE_COMMANDS = {
    "ping": "ping", "auth": "auth", "get": "get", "getv": "get", "put": "set",
    "delete": "del", "exists": "exists", "mget": "mget", "mput": "mset",
    "incr": "incrby", "incrbyfloat": "incrbyfloat", "scan": "scan",
    "expire": "expire", "ttl": "ttl", "persist": "persist", "keys": "keys",
    "dbsize": "dbsize", "stats": "kv.stats", "lost": "kv.lost", "inject": "kv.inject",
    "flushall": "flushall", "fetch": "kv.fetch", "fetch_range": "kv.fetch", "sync": "sync",
    "replicaof": "replicaof",
    "wait": "wait", "digest": "kv.digest", "role": "role", "restart": "kv.restart",
    "cluster": "cluster", "asking": "asking", "migrate_put": "kv.migrate", "migrate_del": "kv.migrate",
}

# Key access a command needs on the keys it names, from Redis 7's key specs:
# "R" (the spec has ACCESS), "W" (INSERT, DELETE or UPDATE), "RW" (both), ""
# (neither, e.g. EXISTS: a pattern of any kind will do). A tuple gives the
# access by key position, the last one repeating (COPY src dst). SET needs
# "RW" with its GET option (Redis's setGetKeys), else "W": the command layer
# passes access="RW" then. Unlisted commands: from their categories (@write
# -> "W", else "R").
KEY_ACCESS = {
    "get": "R", "mget": "R", "getrange": "R", "ttl": "R", "pttl": "R", "expiretime": "R",
    "pexpiretime": "R",
    "set": "W", "setex": "W", "psetex": "W", "setnx": "W", "mset": "W", "msetnx": "W",
    "append": "W", "setrange": "W", "del": "W", "unlink": "W", "expire": "W", "pexpire": "W",
    "expireat": "W", "pexpireat": "W", "persist": "W",
    "getdel": "RW", "getset": "RW", "getex": "RW", "incr": "RW", "decr": "RW", "incrby": "RW",
    "decrby": "RW", "incrbyfloat": "RW",
    "exists": "", "strlen": "", "type": "", "touch": "", "watch": "",
    "copy": ("R", "W"), "rename": ("RW", "W"), "renamenx": ("RW", "W"),
}

_NO_USER_KEYWORD = "should start with user keyword followed by the username"
_CMD_NOPERM = "this user has no permissions to run the '{}' command"
_KEY_NOPERM = "this user has no permissions to access one of the keys used as arguments"
_CHANNEL_NOPERM = "this user has no permissions to access one of the channels used as arguments"


def password_hash(password):
    """SHA-256 hex of a password (bytes or str), as ACL files store it."""
    if isinstance(password, str):
        password = password.encode()
    return hashlib.sha256(password).hexdigest()


def categories():
    """ACL CAT: every category name."""
    return list(CATEGORIES)


def commands_in(category):
    """ACL CAT <category>: the commands in it (None for an unknown category)."""
    category = category.lower().lstrip("@")
    if category not in CATEGORIES:
        return None
    return [n for n, cats in COMMAND_CATEGORIES.items() if category in cats]


def _with_subcommands(name):
    return [name] + [f"{name}|{s}" for s in sorted(SUBCOMMANDS.get(name, ()))]


class AclError(Exception):
    """An ACL file or rule that cannot be applied. ``errors`` lists
    ``(line, message)``; ``str()`` is Redis's one-line report."""

    def __init__(self, errors, source=None):
        self.errors = list(errors)
        self.source = source
        parts = []
        for line, msg in self.errors:
            if line is None:
                parts.append(msg + ".")
            elif msg == _NO_USER_KEYWORD:
                parts.append(f"{source or 'acl'}:{line} {msg}.")
            elif msg.startswith("WARNING"):
                parts.append(msg)
            else:
                parts.append(f"{source or 'acl'}:{line}: {msg}.")
        super().__init__(" ".join(parts))


class _RuleError(Exception):
    pass


class User:
    """One user: flags, password hashes, key/channel patterns, command rules."""

    def __init__(self, name):
        self.name = name
        self.reset()

    def reset(self):
        self.enabled = False
        self.nopass = False
        self.sanitize = None         # None, "sanitize-payload" or "skip-sanitize-payload"
        self.passwords = []          # SHA-256 hex, in the order added
        self.allkeys = False
        self.key_patterns = []       # (access "R"|"W"|"RW", pattern bytes)
        self.allchannels = False
        self.channel_patterns = []
        self.allcommands = False     # +@all: commands not in the table are allowed too
        self.allowed = set()         # command names ("parent|sub" for subcommands)
        self.rules = []              # command rules as given, for ACL LIST
        self._matchers = None

    # -- rules

    def apply(self, op):
        """Apply one rule (str). Raises AclError with Redis's message."""
        try:
            self._apply(op)
        except _RuleError as e:
            raise AclError([(None, str(e))]) from None
        self._matchers = None

    def _apply(self, op):
        low = op.lower()
        if low == "on":
            self.enabled = True
        elif low == "off":
            self.enabled = False
        elif low == "nopass":
            self.nopass = True
            self.passwords = []
        elif low == "resetpass":
            self.nopass = False
            self.passwords = []
        elif low in ("sanitize-payload", "skip-sanitize-payload"):
            self.sanitize = low
        elif low == "reset":
            self.reset()
        elif low in ("allkeys", "~*"):
            self.allkeys = True
            self.key_patterns = []
        elif low == "resetkeys":
            self.allkeys = False
            self.key_patterns = []
        elif low in ("allchannels", "&*"):
            self.allchannels = True
            self.channel_patterns = []
        elif low == "resetchannels":
            self.allchannels = False
            self.channel_patterns = []
        elif low in ("allcommands", "+@all"):
            self.allcommands = True
            self.allowed = set(COMMAND_CATEGORIES)
            self.rules = []
        elif low in ("nocommands", "-@all"):
            self.allcommands = False
            self.allowed = set()
            self.rules = []
        elif op[:1] == ">":
            self._add_hash(password_hash(op[1:]))
        elif op[:1] == "#":
            self._add_hash(self._check_hash(op[1:]))
        elif op[:1] == "<":
            self._remove_hash(password_hash(op[1:]))
        elif op[:1] == "!":
            self._remove_hash(self._check_hash(op[1:]))
        elif op[:1] == "~" or op[:1] == "%":
            self._add_key_pattern(op)
        elif op[:1] == "&":
            if self.allchannels:
                raise _RuleError("Adding a pattern after the * pattern (or the 'allchannels' "
                                 "flag) is not valid and does not have any effect. Try "
                                 "'resetchannels' to start with an empty list of channels")
            pat = op[1:].encode()
            if pat not in self.channel_patterns:
                self.channel_patterns.append(pat)
        elif op[:1] in ("+", "-") and len(op) > 1:
            self._command_rule(op[0] == "+", low[1:], op)
        elif op[:1] == "(":
            raise _RuleError("Selectors are not supported by kvstore")
        else:
            raise _RuleError("Syntax error")

    @staticmethod
    def _check_hash(h):
        if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
            raise _RuleError("The password hash must be exactly 64 characters and contain "
                             "only lowercase hexadecimal characters")
        return h

    def _add_hash(self, h):
        if h not in self.passwords:
            self.passwords.append(h)
        self.nopass = False

    def _remove_hash(self, h):
        if h not in self.passwords:
            raise _RuleError("The password you are trying to remove from the user does not exist")
        self.passwords.remove(h)

    def _add_key_pattern(self, op):
        if op[0] == "%":
            flags, sep, pat = op[1:].partition("~")
            if not sep or not flags or any(c not in "RWrw" for c in flags):
                raise _RuleError("Syntax error")
            access = ("R" if "r" in flags.lower() else "") + ("W" if "w" in flags.lower() else "")
        else:
            access, pat = "RW", op[1:]
        if self.allkeys:
            raise _RuleError("Adding a pattern after the * pattern (or the 'allkeys' flag) is "
                             "not valid and does not have any effect. Try 'resetkeys' to start "
                             "with an empty list of patterns")
        pat = pat.encode()
        entry = (access, pat)
        if entry not in self.key_patterns:
            self.key_patterns.append(entry)

    def _command_rule(self, allow, name, op):
        if name.startswith("@"):
            cat = name[1:]
            if cat == "all":
                self._apply("+@all" if allow else "-@all")
                return
            if cat not in CATEGORIES:
                raise _RuleError(f"Error in applying operation '{op}': Unknown command or "
                                 f"category name in ACL")
            names = [n for n, cats in COMMAND_CATEGORIES.items() if cat in cats]
        else:
            if name not in COMMAND_CATEGORIES:
                if "|" in name and name.split("|", 1)[0] in COMMAND_CATEGORIES \
                        and name.split("|", 1)[0] not in SUBCOMMANDS:
                    raise _RuleError(f"Error in applying operation '{op}': first-arg rules "
                                     f"are not supported by kvstore")
                raise _RuleError(f"Error in applying operation '{op}': Unknown command or "
                                 f"category name in ACL")
            names = _with_subcommands(name)
        if allow:
            self.allowed.update(names)
        else:
            self.allowed.difference_update(names)
        self.rules = [r for r in self.rules if r[1:] != name]
        self.rules.append(("+" if allow else "-") + name)

    # -- checks

    def check_password(self, password):
        """Constant-time password check (every stored hash is compared)."""
        if self.nopass:
            return True
        h = password_hash(password).encode()
        ok = False
        for stored in self.passwords:
            ok |= hmac.compare_digest(h, stored.encode())
        return ok

    def can_run(self, command, subcommand=None):
        command = command.lower()
        if command in SUBCOMMANDS and subcommand is not None:
            full = f"{command}|{subcommand.lower()}"
            if full in COMMAND_CATEGORIES:
                return full in self.allowed
            return self.allcommands or command in self.allowed
        if command in COMMAND_CATEGORIES:
            return command in self.allowed
        return self.allcommands

    def _key_matchers(self):
        if self._matchers is None:
            from .glob import compile as gcompile
            self._matchers = [(a, gcompile(p)) for a, p in self.key_patterns]
        return self._matchers

    def can_access_key(self, key, access="RW"):
        """True when every kind of access in ``access`` ("R", "W", "RW") to
        ``key`` (bytes) is allowed by some pattern; ``access=""`` (EXISTS,
        TYPE...) is allowed by a pattern of any kind."""
        if self.allkeys:
            return True
        if isinstance(key, str):
            key = key.encode()
        need = set(access)
        for a, m in self._key_matchers():
            if (not need or need & set(a)) and m(key):
                need -= set(a)
                if not need:
                    return True
        return False

    def can_access_channel(self, channel):
        if self.allchannels:
            return True
        from .glob import stringmatch
        if isinstance(channel, str):
            channel = channel.encode()
        return any(stringmatch(p, channel) for p in self.channel_patterns)

    def check(self, command, subcommand=None, keys=(), access=None, channels=()):
        """None when this user may run ``command`` (``subcommand`` for
        containers such as CONFIG) on ``keys``; else the NOPERM reason.
        ``access`` overrides the key access the command needs ("R", "W",
        "RW", "", or a tuple by key position); by default it comes from
        :data:`KEY_ACCESS` / the command's categories."""
        if isinstance(command, bytes):
            command = command.decode("utf-8", "replace")
        if isinstance(subcommand, bytes):
            subcommand = subcommand.decode("utf-8", "replace")
        command = command.lower()
        if not self.can_run(command, subcommand):
            shown = command
            if command in SUBCOMMANDS and subcommand is not None:
                shown = f"{command}|{subcommand.lower()}"
            return _CMD_NOPERM.format(shown)
        if keys and not self.allkeys:
            if access is None:
                access = KEY_ACCESS.get(command)
                if access is None:
                    cats = COMMAND_CATEGORIES.get(command, ())
                    access = "W" if "write" in cats else "R"
            for i, k in enumerate(keys):
                a = access if isinstance(access, str) else access[min(i, len(access) - 1)]
                if not self.can_access_key(k, a):
                    return _KEY_NOPERM
        for ch in channels:
            if not self.can_access_channel(ch):
                return _CHANNEL_NOPERM
        return None

    def check_native(self, op, keys=()):
        """:meth:`check` for a native-protocol operation name."""
        return self.check(NATIVE_COMMANDS.get(op, op), None, keys)

    # -- description

    def describe(self):
        """The rules part of ACL LIST for this user (after "user NAME ")."""
        out = ["on" if self.enabled else "off"]
        if self.nopass:
            out.append("nopass")
        if self.sanitize:
            out.append(self.sanitize)
        out += ["#" + h for h in self.passwords]
        if self.allkeys:
            out.append("~*")
        else:
            for a, p in self.key_patterns:
                pat = p.decode("utf-8", "surrogateescape")
                out.append(("~" if a == "RW" else f"%{a}~") + pat)
        if self.allchannels:
            out.append("&*")
        else:
            out.append("resetchannels")
            out += ["&" + p.decode("utf-8", "surrogateescape") for p in self.channel_patterns]
        out.append("+@all" if self.allcommands else "-@all")
        out += self.rules
        return " ".join(out)

    def __repr__(self):
        return f"User({self.name!r}: {self.describe()})"


def _default_user(requirepass=None):
    u = User("default")
    for op in ("on", "~*", "&*", "+@all"):
        u.apply(op)
    if requirepass:
        u.apply(">" + requirepass)
    else:
        u.apply("nopass")
    return u


class AclStore:
    """The server's users. Without a file: only ``default`` (``nopass``, or
    the ``--requirepass`` password)."""

    def __init__(self, requirepass=None):
        self.requirepass = requirepass
        self.users = {"default": _default_user(requirepass)}

    @classmethod
    def load(cls, path, requirepass=None):
        """Read an ACL file; AclError (every bad line) or the new store."""
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
        except OSError as e:
            raise AclError([(None, f"Error loading ACLs, opening file '{path}': "
                                   f"{e.strerror}")]) from None
        return cls.from_text(text, source=path, requirepass=requirepass)

    @classmethod
    def from_text(cls, text, source="acl", requirepass=None):
        store = cls(requirepass)
        errors = []
        users = {}
        for lineno, raw in enumerate(text.split("\n"), 1):
            line = raw.strip(" \t\r\n")
            if not line:
                continue
            argv = line.split(" ")
            if argv[0] != "user" or len(argv) < 2:
                errors.append((lineno, _NO_USER_KEYWORD))
                continue
            name = argv[1]
            if name in users:
                errors.append((lineno, f"WARNING: Duplicate user '{name}' found on line "
                                       f"{lineno}."))
                continue
            u = User(name)
            bad = False
            for op in argv[2:]:
                op = op.strip("\t\r\n")
                try:
                    u.apply(op)
                except AclError as e:
                    errors.append((lineno, e.errors[0][1]))
                    bad = True
            if not bad:
                users[name] = u
        if errors:
            raise AclError(errors, source)
        if "default" not in users:
            users["default"] = store.users["default"]
        store.users = users
        return store

    def get(self, name):
        if isinstance(name, bytes):
            name = name.decode("utf-8", "surrogateescape")
        return self.users.get(name)

    def authenticate(self, name, password):
        """The user when ``name`` exists, is ``on`` and ``password`` is one of
        its passwords (or it is ``nopass``); else None. Takes the same time
        whether the user exists or not."""
        u = self.get(name)
        if u is None:
            password_hash(password)       # same work as for a real user
            hmac.compare_digest(b"0" * 64, b"1" * 64)
            return None
        ok = u.check_password(password)
        return u if ok and u.enabled else None

    def default_user(self):
        return self.users["default"]

    def list(self):
        """ACL LIST: one ``user NAME rules`` string per user, sorted by name
        (Redis lists its users in name order too)."""
        return [f"user {name} {self.users[name].describe()}" for name in sorted(self.users)]

    def whoami(self, user):
        return user.name
