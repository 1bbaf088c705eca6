"""RESP connections: parse a batch, dispatch each command, write the replies once.

Hot path: ``RespConnection.data_received`` first lets the engine's C RESP
path (kvstore/_native/resp.c) answer the leading plain GET/SET of the batch
when :meth:`RespConnection.fast_flags` allows it; the rest is fed to the
parser, and every complete command is looked up in the connection's dispatch
dict (``server.table.resp``: upper- and lower-case names are both keys, so
the usual spellings never call ``.upper()``), run, and its reply collected;
the replies go out in a single ``transport.write``.

After each command the write path propagates what the command wrote
(``writes.propagate``), so replication sees whole commands.

Errors: handlers raise; :func:`.errors.resp_error` turns the exception into
the error line (``-LOST ...`` for a lost key, never a nil).
"""

from .adapters import unknown_command
from .conn import BaseConnection, OutputLimitExceeded, resume_after_hold
from .errors import resp_error
from .logs import event
from .resp import NULL2, NULL3, OK, RespParser, encode
from .resp_server import Quit

__all__ = ["RespConnection"]

_BIG = 1 << 16

try:
    from kvstore._native import RESP_ALLOW_SET as _SET_FLAG, RESP_RESP3 as _RESP3_FLAG
except ImportError:        # an engine without the C RESP path: resp_fast is None then
    _SET_FLAG, _RESP3_FLAG = 1, 2


def _noauth(conn, args):
    return b"-NOAUTH Authentication required.\r\n"


def _unknown(conn, args):
    return unknown_command(args)


class RespConnection(BaseConnection):
    kind = "resp"

    def __init__(self, server, prev=None):
        super().__init__(server, prev)
        cfg = server.config
        self.parser = RespParser(max_multibulk=cfg.max_multibulk, max_bulk=cfg.max_bulk,
                                 max_inline=cfg.max_inline, max_buffer=cfg.max_query_buffer)
        self.resp3 = False
        self.null = NULL2
        self.commands = server.table
        self.quitting = False
        self.multi = None         # queued commands between MULTI and EXEC
        self.multi_error = False
        self.watched = None       # {key: version or None} from WATCH
        self.watch_dirty = False  # a watched key was written (WritePath.touch)
        self.mute = 0             # CLIENT REPLY: 0 on, 1 off, 2 skip this and the next
        self.held = None          # commands waiting for a recovery (RecoveryGate)
        st = server.store
        self.store = st
        self.writes = server.writes
        self.sget = st.get
        self.sput = server.writes.put
        self._fast = getattr(st, "resp_fast", None) if cfg.resp_fast else None
        self.set_user(server.access.initial_user())

    def set_user(self, user):
        super().set_user(user)
        self.parser.unauthenticated = user is None     # Redis's pre-auth request limits
        if self.multi is None or user is None:
            self.table = self.commands.resp if self.authed else self.commands.resp_noauth

    def set_resp3(self, on):
        self.resp3 = on
        self.null = NULL3 if on else NULL2

    def lookup(self, name):
        table = self.commands
        fn = table.resp.get(name.upper())
        if not self.authed:
            if fn is not None and table.resp_noauth.get(name.upper()) is fn:
                return fn
            return _noauth
        if fn is None:
            return _unknown
        return fn

    # -- hot path

    def fast_flags(self):
        """Flags for the engine's C RESP path, or -1 when it must not run.

        This is the one place that decides. The C path runs the leading plain
        GET/SET of a batch and stops at anything else, so it may run only
        when plain GET/SET have no Python-side effect: an authenticated
        client outside MULTI, every pre-dispatch hook content to let this
        connection's GET/SET pass (:meth:`.registry.CommandTable.fast_ok`:
        the ACL hook is, for a ``+@all ~*`` user), no replies held for
        replica acks; and SET only when the write path needs nothing
        (:meth:`.writes.WritePath.fast_set_allowed`).
        """
        srv = self.server
        if (self._fast is None or self.table is not self.commands.resp
                or srv.reply_gate is not None or not self.commands.fast_ok(self)
                or self.mute):
            return -1
        flags = _RESP3_FLAG if self.resp3 else 0
        if self.writes.fast_set_allowed():
            flags |= _SET_FLAG
        return flags

    def data_received(self, data):
        self.active = True
        p = self.parser
        if self.held is not None:
            # commands wait for a recovery (resume_held): keep the bytes
            p.feed(data)
            if p.pending:
                self.check_input()
            return
        gate = self.server.recovery_gate
        waiting = gate is not None and gate.active()
        head = None
        if not p.pending and self._fast is not None and not waiting:
            flags = self.fast_flags()
            if flags >= 0:
                # The output limit holds while replies are built: the C path
                # stops once its replies reach what is left of the budget.
                limit = self.server.config.max_output_buffer
                budget = 0
                if limit:
                    budget = max(1, limit - self.big - self.transport.get_write_buffer_size())
                try:
                    used, replies, n = self._fast(data, flags, budget)
                except Exception as e:  # noqa: BLE001 - e.g. a closed store: Python reports it
                    used = n = 0
                    event("debug", "resp_fast_failed", error=f"{type(e).__name__}: {e}")
                if n:
                    self.server.stats_commands += n
                    self.server.stats_fast_commands += n
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
        if p.pending and self.check_input():
            return
        if head is not None and not cmds:
            self.transport.write(head)
            head = None
        if cmds:
            if self._run(cmds, head, gate if waiting else None):
                return
        if p.error is not None and not self.closed:
            event("info", "protocol_error", id=self.id, addr=self.addr,
                  error=p.error[1:-2].decode("utf-8", "replace"))
            self.transport.write(p.error)
            self.close_after_write()

    def resume_held(self):
        """The recovery the held commands waited for is done: run them, then
        what arrived meanwhile, and read again."""
        cmds, self.held = self.held, None
        p = self.parser
        cmds = list(cmds) + p.gets_all()
        gate = self.server.recovery_gate
        done = self._run(cmds, None, gate if gate is not None and gate.active() else None)
        if self.closed or self.held is not None:
            return
        if not done and p.error is not None:
            event("info", "protocol_error", id=self.id, addr=self.addr,
                  error=p.error[1:-2].decode("utf-8", "replace"))
            self.transport.write(p.error)
            self.close_after_write()
            return
        resume_after_hold(self)

    def _run(self, cmds, head, gate):  # noqa: C901 - the hot loop, kept in one piece
        """Execute ``cmds`` (replies after ``head``); with ``gate`` (a
        recovery is running), a command that would touch the lost memory
        and those after it are held (:class:`.recovery.RecoveryGate`).
        True when the connection is done with (closed, dropped, gated)."""
        out = [head] if head is not None else []
        append = out.append
        writes = self.writes
        self.server.batch_out = out
        ran = 0
        for args in cmds:
            if gate is not None and gate.must_wait(self, args):
                gate.hold(self, cmds[ran:])
                break
            ran += 1
            try:
                f = self.table[args[0]]   # MULTI/AUTH switch tables mid-batch
            except KeyError:
                f = self.lookup(args[0])
            try:
                reply = f(self, args)
            except Quit:
                append(OK)
                self.quitting = True
                break
            except OutputLimitExceeded:
                writes.propagate(len(out))
                self.drop("output buffer limit")
                return True
            except Exception as e:  # noqa: BLE001 - mapped to a reply
                reply = resp_error(e, self, args[0])
            if writes.entries:
                writes.propagate(len(out))
            if self.mute:
                # CLIENT REPLY OFF/SKIP: 2 mutes this command and the next
                if self.mute == 2:
                    self.mute = 3
                elif self.mute == 3:
                    self.mute = 0
                continue
            append(reply)
        self.server.stats_commands += ran
        if self.closed:
            return True
        if out:
            rgate = self.server.reply_gate      # replication: replies waiting for replica acks
            if rgate is not None and rgate(self, out):
                return True
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            if self.big:
                self.check_output()
        if self.quitting:
            self.close_after_write()
            return True
        return self.held is not None

    def connection_lost(self, exc):
        if self.watched:
            self.writes.unwatch(self, self.watched)
            self.watched = None
        super().connection_lost(exc)

    def execute_one(self, args):
        """Run one command outside the hot loop (EXEC); returns the reply."""
        f = self.commands.resp.get(args[0]) or self.lookup(args[0])
        try:
            return f(self, args)
        except (Quit, OutputLimitExceeded):
            raise
        except Exception as e:  # noqa: BLE001 - mapped to a reply
            return resp_error(e, self, args[0])

    def reply(self, obj):
        return encode(obj, self.resp3)

    def map_reply(self, pairs):
        """A map in RESP3, a flat array in RESP2 (``pairs``: dict)."""
        return encode(pairs, self.resp3)
