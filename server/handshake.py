"""The first protocol of every connection: pick RESP or native by the first byte.

A new TCP connection starts as a :class:`Handshake`. Its first byte picks the
protocol (``0x00`` native, anything else RESP); the handshake then builds the
protocol object, hands it the transport with ``transport.set_protocol``
(which uvloop honours: it caches the bound ``data_received``) and replays the
bytes it got.
"""

import asyncio

from .access import DENIED, protected_refusal
from .conn import BaseConnection
from .logs import event
from .native import NativeConnection, rejection_frame
from .resp_conn import RespConnection

__all__ = ["Handshake"]


class Handshake(BaseConnection):
    """The first protocol of every connection: waits for the first byte."""

    def __init__(self, server):
        super().__init__(server)
        self.rejected = False     # False, "max_clients" or "protected_mode"
        self._timer = None

    def connection_made(self, transport):
        super().connection_made(transport)
        srv = self.server
        srv.stats_connections += 1
        # A refused client is answered in its own protocol once we see its
        # first byte (a native client sends its magic at once).
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) else None
        if protected_refusal(srv.config.protected_mode, srv.access.default_user(), host):
            self.rejected = "protected_mode"
            srv.stats_protected += 1
            event("warning", "client_rejected", addr=self.addr, reason="protected_mode")
        elif len(srv.clients) >= srv.config.max_clients:
            self.rejected = "max_clients"
            srv.stats_rejected += 1
            event("warning", "client_rejected", addr=self.addr, reason="max_clients",
                  max_clients=srv.config.max_clients)
        if self.rejected:
            self._timer = asyncio.get_running_loop().call_later(1.0, self._give_up)
            return
        srv.register(self)

    def _give_up(self):
        if not self.closed:
            self.closed = True
            self.transport.abort()

    def connection_lost(self, exc):
        if self._timer is not None:
            self._timer.cancel()
        self.closed = True
        if not self.rejected:
            self.server.forget(self)

    def data_received(self, data):
        if not data:
            return
        native = data[0] == 0
        if self.rejected:
            if self._timer is not None:
                self._timer.cancel()
            if self.rejected == "protected_mode":
                if native:
                    self.transport.write(rejection_frame(DENIED.split(" ", 1)[1], "DENIED"))
                else:
                    self.transport.write(b"-" + DENIED.encode() + b"\r\n")
            elif native:
                self.transport.write(rejection_frame("max number of clients reached"))
            else:
                self.transport.write(b"-ERR max number of clients reached\r\n")
            self.close_after_write()
            return
        if native:
            conn = NativeConnection(self.server, self)
        else:
            conn = RespConnection(self.server, self)
        self.server.replace(self, conn)
        self.transport.set_protocol(conn)
        conn.connection_made(self.transport)
        conn.data_received(data)
