"""Native protocol connections (PROTOCOL.md): msgpack frames ``[id, op, args]``.

Each reply is ``[id, 0, result]`` or ``[id, 1, [code, message, extra]]``; all
replies of one ``data_received`` batch go out in one write. An oversized or
undecodable frame (or a bad magic) cannot be resynced: reply ``PROTO`` with
id 0 and close. A frame that decodes but is not ``[id, op, args]`` gets a
``PROTO`` error with its id when it has one, and the connection stays open
(the length prefix kept the stream in sync).

Ops are looked up in ``server.table.native`` (built by :mod:`.commands`;
handlers in :mod:`.native_ops`); exceptions become error replies through
:func:`.errors.native_error`. After each op the write path propagates what it
wrote.
"""

import msgpack

from kvstore.wire import NEED_MORE, FrameError, pack_frame

from .conn import BaseConnection, OutputLimitExceeded, resume_after_hold
from .errors import native_error
from .framing import FrameParser
from .logs import event

__all__ = ["NativeConnection", "rejection_frame"]


def _packer():
    return msgpack.Packer(use_bin_type=True, default=_default)


def _default(obj):
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, (bytearray, memoryview)):
        return bytes(obj)
    return str(obj)


def rejection_frame(msg, code="BUSY"):
    """What a refused native client receives (hello is skipped): BUSY over
    max_clients, DENIED in protected mode."""
    return pack_frame(_packer(), [0, 1, [code, msg, {}]])


class NativeConnection(BaseConnection):
    kind = "native"

    def __init__(self, server, prev=None):
        super().__init__(server, prev)
        cfg = server.config
        self.parser = FrameParser(max_frame=cfg.max_frame,
                                  max_array=max(2 * cfg.max_multibulk, 16),
                                  max_map=max(cfg.max_multibulk, 16))
        self.packer = _packer()
        self.set_user(server.access.initial_user())
        self.store = server.store
        self.writes = server.writes
        self.ops = server.table.native
        self.held = None          # a request waiting for a recovery (RecoveryGate)

    def data_received(self, data):
        self.active = True
        p = self.parser
        p.feed(data)
        if self.held is not None:
            # a request waits for a recovery (resume_held): keep the bytes
            if p.buffered() >= (1 << 20):
                self.check_input()
            return
        self._run()

    def resume_held(self):
        """The recovery the held request waited for is done: run it, then
        what arrived meanwhile, and read again."""
        self._run()
        if not self.closed and self.held is None:
            resume_after_hold(self)

    def _run(self):  # noqa: C901 - the hot loop, kept in one piece
        p = self.parser
        out = []
        pack = self.packer.pack
        n = 0
        self.server.batch_out = out
        if p.buffered() >= (1 << 20) and self.check_input():
            return
        gate = self.server.recovery_gate
        if gate is not None and not gate.active():
            gate = None
        try:
            if p.magic_pending:
                if not p.read_magic():
                    return
                out.append(pack_frame(self.packer, [0, 0, self.server.hello_info()]))
            writes = self.writes
            while True:
                req = self.held
                if req is not None:
                    self.held = None
                else:
                    req = p.gets()
                    if req is NEED_MORE:
                        break
                if gate is not None and gate.must_wait_native(self, req):
                    gate.hold(self, req)
                    break
                n += 1
                reply = self.handle(req)
                if writes.entries:
                    writes.propagate(len(out))
                body = pack(reply)
                out.append(len(body).to_bytes(4, "big") + body)
        except FrameError as e:
            event("info", "protocol_error", id=self.id, addr=self.addr, error=str(e))
            out.append(pack_frame(self.packer, [0, 1, ["PROTO", str(e), {}]]))
            self.server.stats_commands += n
            self.transport.write(b"".join(out))
            self.close_after_write()
            return
        except OutputLimitExceeded:
            self.writes.propagate(len(out))
            self.drop("output buffer limit")
            return
        self.server.stats_commands += n
        gate = self.server.reply_gate          # replication: replies waiting for replica acks
        if gate is not None and out and gate(self, out):
            return
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            if self.big:
                self.check_output()

    def handle(self, req):
        if type(req) is not list or len(req) != 3:
            rid = req[0] if isinstance(req, list) and req and _is_id(req[0]) else 0
            return [rid, 1, ["PROTO", "a request is [request_id, op, args]", {}]]
        rid, name, args = req
        if not _is_id(rid):
            return [0, 1, ["PROTO", "request_id must be a non-negative int", {}]]
        if type(name) is not str or type(args) is not list:
            return [rid, 1, ["PROTO", "op must be a str and args a list", {}]]
        if not self.authed and name != "auth":
            return [rid, 1, ["NOAUTH", "authentication required", {}]]
        fn = self.ops.get(name)
        if fn is None:
            return [rid, 1, ["UNKNOWN", f"unknown op {name[:64]!r}", {}]]
        try:
            return [rid, 0, fn(self, args)]
        except OutputLimitExceeded:
            raise
        except Exception as e:  # noqa: BLE001 - mapped to an error reply; never fatal
            return [rid, 1, native_error(e, self, name)]


def _is_id(x):
    return type(x) is int and x >= 0
