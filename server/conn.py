"""Connection plumbing shared by both protocols.

:class:`BaseConnection` holds what both protocols need: client id, address,
flow control (a client that does not read its replies stops being read, so
pipelining without reading cannot grow the output buffer without bound), a
hard output-buffer limit, the idle flag, and close bookkeeping.
"""

import asyncio
import time

from .logs import event

__all__ = ["BaseConnection", "OutputLimitExceeded", "resume_after_hold"]


#: A client holding this much input triggers the check of the total client memory.
_MEM_CHECK = 1 << 20


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
        self.user = None      # acl.User once authenticated (see .access)
        self.user_full = False
        self.authed = False

    def set_user(self, user):
        """Authenticate as ``user`` (None: not authenticated)."""
        from .access import unrestricted
        self.user = user
        self.user_full = unrestricted(user)
        self.authed = user is not None

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
            repl = self.server.repl
            if repl is not None and repl.holds(self):
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
        """Close at once, discarding queued output (limits, idle). Drops for
        a limit are counted by reason (INFO stats) and logged as warnings."""
        if not self.closed:
            srv = self.server
            key = reason.replace(" ", "_")
            counted = key in srv.dropped
            if counted:
                srv.dropped[key] += 1
                srv.last_dropped = (self.id, self.addr, key, self.memory())
            event("warning" if counted else "info", "client_closed", id=self.id,
                  addr=self.addr, reason=reason, memory=self.memory())
            self.closed = True
            self.transport.abort()

    def memory(self):
        """Bytes this client holds: unparsed input plus queued output."""
        n = 0
        p = getattr(self, "parser", None)
        if p is not None:
            n += p.buffered()
        t = self.transport
        if t is not None:
            try:
                n += t.get_write_buffer_size()
            except (AttributeError, RuntimeError):
                pass
        return n

    def check_input(self):
        """After input was buffered: the per-client query buffer limit
        (closed without a reply, as Redis does), then the total cap on
        client memory. True when this client was dropped."""
        held = self.parser.buffered()
        cfg = self.server.config
        if cfg.max_query_buffer and held > cfg.max_query_buffer:
            self.drop("query buffer limit")
            return True
        if cfg.maxmemory_clients and held >= _MEM_CHECK:
            self.server.check_client_memory()
            return self.closed
        return False

    def close_after_write(self):
        """Close once queued replies are flushed."""
        if not self.closed:
            self.closed = True
            self.transport.close()


def resume_after_hold(conn):
    """Read from ``conn`` again after its commands waited for a recovery,
    unless replication holds its replies for acks (it resumes reading when
    it releases them)."""
    repl = getattr(conn.server, "repl", None)
    if repl is not None and repl.holds(conn):
        return
    try:
        conn.transport.resume_reading()
    except RuntimeError:
        pass
