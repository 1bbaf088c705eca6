"""The command table: one row per command, built explicitly at start-up.

A :class:`Command` row is data, as in Redis's commands.def: name, arity
(Redis style: ``n`` exactly n words with the name, ``-n`` at least n), flags,
key positions ``(first, last, step)``, ACL categories, group and summary,
plus what runs it:

* ``op``: the semantic function in :mod:`.ops` (``op(conn, *args)``), with
  ``args`` (argument kinds, see :mod:`.adapters`) and ``reply`` (how RESP
  encodes the result). The RESP handler, and the native op when ``native``
  names one, are then generated from these: a new command is one function in
  ops plus one row.
* ``resp``: a hand-written RESP handler ``resp(conn, argv) -> bytes``, for
  commands whose syntax does not fit ``args`` (SET's options, CLIENT ...).
* ``native``/``native_fn``: the native op name and a hand-written handler
  ``native_fn(conn, args) -> result`` for ops with their own shape. A row
  with no name is a native op only (the native protocol's ops are not all
  Redis commands: ``put`` returns a version, ``mget`` a [values, lost] pair).

``acl`` lists the command's ACL categories (``"@read"``, ...); it defaults to
the group's (``"@string"``), which is what COMMAND INFO shows today.

:class:`CommandTable` holds the rows and the dispatch dicts each protocol
reads. Pre-dispatch hooks (:meth:`CommandTable.add_hook`: ACL checks, cluster
slot checks) run before every command with its row; with no hook installed
they cost nothing, since the dicts then hold the handlers themselves.

This module imports nothing from the server: every other module may import it.
"""

__all__ = ["Command", "CommandTable"]


class Command:
    """One command (see the module docstring)."""

    __slots__ = ("name", "arity", "flags", "keys", "acl", "group", "summary", "resp", "op",
                 "args", "reply", "native", "native_fn", "checked", "noauth", "aliases")

    def __init__(self, name, arity, flags=(), keys=(0, 0, 0), *, acl=(), group="generic",
                 summary="", resp=None, op=None, args=(), reply=None, native=None,
                 native_fn=None, checked=False, noauth=False, aliases=()):
        self.name = name.upper() if name else None
        self.arity = arity
        self.flags = tuple(flags)
        self.keys = tuple(keys)
        self.acl = tuple(acl) or ("@" + group,)
        self.group = group
        self.summary = summary
        self.resp = resp
        self.op = op
        self.args = tuple(args)
        self.reply = reply
        self.native = native
        self.native_fn = native_fn
        self.checked = checked       # the RESP handler checks its own arity (hot commands)
        self.noauth = noauth         # callable before AUTH
        self.aliases = tuple(a.upper() for a in aliases)

    def __repr__(self):
        return f"Command({self.name!r}, {self.arity})"

    def arity_ok(self, n):
        a = self.arity
        return n == a if a > 0 else n >= -a

    def key_args(self, argv):
        """The key arguments of ``argv`` (the command name first) by this
        row's ``(first, last, step)``, as Redis reads them: ``last`` < 0
        counts from the end; no keys when ``first`` is 0."""
        first, last, step = self.keys
        if first <= 0 or len(argv) <= first:
            return []
        stop = len(argv) + last + 1 if last < 0 else last + 1
        return argv[first:stop:step or 1]


class CommandTable:
    """Rows by name plus the per-protocol dispatch dicts."""

    def __init__(self, arity_error, build_resp, build_native):
        # arity_error(name) -> RESP line; build_resp(cmd) / build_native(cmd)
        # make handlers from op/args/reply (see .adapters).
        self._arity_error = arity_error
        self._build_resp = build_resp
        self._build_native = build_native
        self.commands = {}      # "NAME" -> Command (aliases included)
        self.resp = {}          # b"NAME" and b"name" -> handler(conn, argv)
        self.resp_noauth = {}   # what an unauthenticated RESP client may call
        self.native = {}        # "op" -> handler(conn, args)
        self.native_rows = {}   # "op" -> Command
        self.hooks = []
        self._fast_gates = []   # per hook: fast_ok(conn) or None (see add_hook)

    # -- building

    def add(self, cmd):
        if cmd.resp is None and cmd.op is not None:
            cmd.resp = self._build_resp(cmd)
        if cmd.native is not None and cmd.native_fn is None:
            cmd.native_fn = self._build_native(cmd)
        if cmd.name is not None:
            for name in (cmd.name,) + cmd.aliases:
                if name in self.commands:
                    raise ValueError(f"command {name} defined twice")
                self.commands[name] = cmd
        if cmd.native is not None:
            if cmd.native in self.native_rows:
                raise ValueError(f"native op {cmd.native} defined twice")
            self.native_rows[cmd.native] = cmd
        self._install(cmd)
        return cmd

    def add_hook(self, hook, fast_ok=None):
        """Run ``hook(conn, cmd, args)`` before every command of both
        protocols; ``cmd`` is the row, ``args`` the RESP words (name first)
        or the native op's argument list (``conn.kind`` says which). The
        hook refuses a command by raising (a CommandError: its reply goes
        back).

        The C fast path (plain GET/SET) bypasses hooks, so it runs for a
        connection only when every hook says, through its ``fast_ok(conn)``,
        that it would let any GET/SET of that connection pass (the ACL hook
        does for a ``+@all ~*`` user). A hook without ``fast_ok`` turns the
        fast path off for every connection."""
        self.hooks.append(hook)
        self._fast_gates.append(fast_ok)
        rows = list(self.commands.values()) + list(self.native_rows.values())
        for cmd in {id(c): c for c in rows}.values():
            self._install(cmd)

    def _install(self, cmd):
        if cmd.resp is not None and cmd.name is not None:
            f = self._resp_entry(cmd)
            for name in (cmd.name,) + cmd.aliases:
                for spelled in (name.encode(), name.lower().encode()):
                    self.resp[spelled] = f
                    if cmd.noauth:
                        self.resp_noauth[spelled] = f
        if cmd.native is not None:
            self.native[cmd.native] = self._native_entry(cmd)

    def _resp_entry(self, cmd):
        fn = cmd.resp
        if not cmd.checked:
            arity, err = cmd.arity, self._arity_error(cmd.name.lower())
            if arity > 0:
                def fn(conn, args, fn=fn):
                    if len(args) != arity:
                        return err
                    return fn(conn, args)
            else:
                need = -arity

                def fn(conn, args, fn=fn):
                    if len(args) < need:
                        return err
                    return fn(conn, args)
        return self._with_hooks(cmd, fn)

    def _native_entry(self, cmd):
        return self._with_hooks(cmd, cmd.native_fn)

    def _with_hooks(self, cmd, fn):
        """``fn`` preceded by every pre-dispatch hook (``fn`` itself when none)."""
        hooks = self.hooks
        if not hooks:
            return fn

        def hooked(conn, args, fn=fn, cmd=cmd):
            for h in hooks:
                h(conn, cmd, args)
            return fn(conn, args)
        return hooked

    def fast_ok(self, conn):
        """May the C fast path run for ``conn`` (see :meth:`add_hook`)?"""
        for gate in self._fast_gates:
            if gate is None or not gate(conn):
                return False
        return True

    # -- reading

    def get(self, name):
        """The row for ``name`` (str or bytes, any case), or None."""
        if isinstance(name, (bytes, bytearray)):
            name = bytes(name).decode("latin-1")
        return self.commands.get(name.upper())

    def names(self):
        return sorted(self.commands)
