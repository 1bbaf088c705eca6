"""Connection plumbing shared by both protocols.

A new TCP connection starts as a :class:`Handshake` protocol. Its first byte
picks the protocol (``0x00`` native, anything else RESP); the handshake then
builds the protocol object, hands it the transport with
``transport.set_protocol`` (which uvloop honours: it caches the bound
``data_received``) and replays the bytes it got.

:class:`BaseConnection` holds what both protocols need: client id, address,
flow control (a client that does not read its replies stops being read, so
pipelining without reading cannot grow the output buffer without bound), a
hard output-buffer limit, the idle flag, and close bookkeeping.
"""

import asyncio
import time

from .logs import event

__all__ = ["BaseConnection", "Handshake", "OutputLimitExceeded"]


class OutputLimitExceeded(Exception):
    """The replies queued for one client went over max_output_buffer."""


class BaseConnection(asyncio.Protocol):
    kind = "?"

    def __init__(self, server, prev=None):
        self.server = server
        self.transport = None
        if prev is not None:
            self.id = prev.id
            self.addr = prev.addr
            self.created = prev.created
        else:
            self.id = server.next_client_id()
            self.addr = "?"
            self.created = time.time()
        self.active = True
        self.idle_ticks = 0
        self.closed = False
        self.name = b""
        self.lib_name = b""
        self.lib_ver = b""
        self.big = 0          # bytes of large replies queued in this batch

    # -- asyncio.Protocol

    def connection_made(self, transport):
        self.transport = transport
        if self.addr == "?":
            peer = transport.get_extra_info("peername")
            if isinstance(peer, tuple):
                self.addr = f"{peer[0]}:{peer[1]}"
            elif peer:
                self.addr = str(peer)

    def connection_lost(self, exc):
        self.closed = True
        self.server.forget(self)

    def pause_writing(self):
        # The client is not reading its replies: stop reading its requests.
        if not self.closed:
            try:
                self.transport.pause_reading()
            except RuntimeError:
                pass

    def resume_writing(self):
        if not self.closed and not self.server.stopping:
            repl = getattr(self.server, "repl", None)
            if repl is not None and self in getattr(repl, "held", ()):
                return      # replies held for replica acks: replication resumes us
            try:
                self.transport.resume_reading()
            except RuntimeError:
                pass

    # -- helpers

    def count_big(self, n):
        """Account a large reply; raise when the client's output limit is hit."""
        self.big += n
        limit = self.server.config.max_output_buffer
        if limit and self.big + self.transport.get_write_buffer_size() > limit:
            raise OutputLimitExceeded()

    def check_output(self):
        self.big = 0
        limit = self.server.config.max_output_buffer
        if limit and self.transport.get_write_buffer_size() > limit:
            self.drop("output buffer limit")

    def drop(self, reason):
        """Close at once, discarding queued output (limits, idle)."""
        if not self.closed:
            event("info", "client_closed", id=self.id, addr=self.addr, reason=reason)
            self.closed = True
            self.transport.abort()

    def close_after_write(self):
        """Close once queued replies are flushed."""
        if not self.closed:
            self.closed = True
            self.transport.close()


class Handshake(BaseConnection):
    """The first protocol of every connection: waits for the first byte."""

    def __init__(self, server):
        super().__init__(server)
        self.rejected = False
        self._timer = None

    def connection_made(self, transport):
        super().connection_made(transport)
        srv = self.server
        srv.stats_connections += 1
        if len(srv.clients) >= srv.config.max_clients:
            # Answer in the client's own protocol once we see its first byte.
            self.rejected = True
            srv.stats_rejected += 1
            self._timer = asyncio.get_running_loop().call_later(1.0, self._give_up)
            event("warning", "client_rejected", addr=self.addr, reason="max_clients",
                  max_clients=srv.config.max_clients)
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
            if native:
                from .native import rejection_frame
                self.transport.write(rejection_frame("max number of clients reached"))
            else:
                self.transport.write(b"-ERR max number of clients reached\r\n")
            self.close_after_write()
            return
        if native:
            from .native import NativeConnection
            conn = NativeConnection(self.server, self)
        else:
            from .commands import RespConnection
            conn = RespConnection(self.server, self)
        self.server.replace(self, conn)
        self.transport.set_protocol(conn)
        conn.connection_made(self.transport)
        conn.data_received(data)
