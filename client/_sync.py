"""Blocking client: Connection, ConnectionPool, Client and Pipeline.

Threads: a :class:`Client` (and its pool) may be shared by any number of
threads; each command checks a connection out of the pool for the length of
one request/reply (or one pipeline) and gives it back. A :class:`Pipeline`
belongs to the thread that created it.

fork(): connections are never shared with a child. The pool notices the pid
change and starts over with fresh connections in the child; the parent's
connections are left alone (not shut down) in the parent.
"""

import os
import select
import socket
import threading
import time

from kvstore import errors

from . import _protocol
from ._commands import CommandsMixin, decode_reply
from ._config import DEFAULT_PORT, client_retry_policy, parse_url
from ._protocol import NEED_MORE, FrameParser, check_reply, encode_request

#: Pipelined frames are written in windows of about this many bytes; the
#: replies of one window are read before the next is written, so a huge
#: pipeline cannot deadlock with a server whose replies fill the socket.
PIPELINE_WINDOW = 1 << 20

_RECV_SIZE = 65536


class Connection:
    """One native-protocol TCP connection (not thread-safe; use the pool).

    ``socket_timeout`` bounds each wait for the server (a send, or a wait for
    more reply bytes); ``socket_connect_timeout`` bounds the TCP connect and
    the handshake (default: ``socket_timeout``). A timeout or a broken stream
    closes the connection: a late reply could otherwise be taken for the
    answer to the next request.
    """

    def __init__(self, host="127.0.0.1", port=DEFAULT_PORT, password=None,
                 socket_timeout=None, socket_connect_timeout=None,
                 max_frame=_protocol.DEFAULT_MAX_FRAME, *, username=None):
        self.host = host
        self.port = port
        self.password = password
        self.username = username
        self.socket_timeout = socket_timeout
        self.socket_connect_timeout = (socket_timeout if socket_connect_timeout is None
                                       else socket_connect_timeout)
        self.max_frame = max_frame
        self.server_info = None
        self._sock = None
        self._poll = None
        self._parser = None
        self._rbuf = bytearray(_RECV_SIZE)
        self._rid = 0

    def __repr__(self):
        state = "connected" if self._sock is not None else "closed"
        return f"<kvstore Connection {self.host}:{self.port} {state}>"

    def _auth_args(self):
        # [password] authenticates as the default user, [user, password] as
        # that ACL user (Redis's AUTH [username] password)
        if self.username is not None:
            return [self.username, self.password]
        return [self.password]

    @property
    def closed(self):
        return self._sock is None

    def connect(self):
        """Open the socket and do the handshake (magic, hello, optional auth)."""
        where = f"{self.host}:{self.port}"
        try:
            sock = socket.create_connection((self.host, self.port),
                                            timeout=self.socket_connect_timeout)
        except socket.timeout:
            raise errors.TimeoutError(
                f"connecting to {where} timed out after {self.socket_connect_timeout}s") from None
        except OSError as exc:
            raise errors.ConnectionError(
                f"cannot connect to kvstore server at {where}: {exc.strerror or exc}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not TCP (should not happen) -- harmless
            pass
        self._sock = sock
        self._parser = FrameParser(self.max_frame)
        self._rid = 0
        try:
            payload = _protocol.MAGIC
            if self.password is not None:
                self._rid = 1
                payload += encode_request(1, "auth", self._auth_args())
            self._sendall(payload)
            hello = self._read_frame()
            if (type(hello) is not list or len(hello) != 3 or hello[0] != 0
                    or hello[1] != 0 or not isinstance(hello[2], dict)):
                if type(hello) is list and len(hello) == 3 and hello[1] == 1:
                    raise _protocol.handshake_error(hello[2], where)
                raise errors.ProtocolError(f"unexpected handshake from {where}: {hello!r:.200}")
            self.server_info = hello[2]
            if self.password is not None:
                status, result = check_reply(self._read_frame(), 1)
                if status != 0:
                    exc = _protocol.error_from_reply(result)
                    if exc.code in ("ERR", "NOAUTH"):
                        exc = _protocol.AuthenticationError(str(exc))
                        exc.code = "NOAUTH"
                    raise exc
            sock.settimeout(self.socket_timeout)
        except BaseException:
            self.close()
            raise
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)

    def close(self):
        """Close the socket (idempotent)."""
        sock, self._sock = self._sock, None
        self._poll = None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def is_usable(self):
        """True if the idle connection still looks healthy.

        An idle connection has nothing to read; if it is readable the server
        closed it (EOF) or sent something unexpected, so it must not be used.
        """
        if self._sock is None:
            return False
        if self._parser.buffered():
            return False
        try:
            return not self._poll.poll(0)
        except (OSError, ValueError):
            return False

    def _fail(self, exc_type, msg):
        self.close()
        return exc_type(f"{msg} ({self.host}:{self.port})")

    def _sendall(self, data):
        try:
            self._sock.sendall(data)
        except socket.timeout:
            raise self._fail(errors.TimeoutError,
                             f"sending to the server timed out after {self.socket_timeout}s") from None
        except OSError as exc:
            raise self._fail(errors.ConnectionError,
                             f"connection lost while sending: {exc.strerror or exc}") from None

    def _read_frame(self):
        parser = self._parser
        rbuf = self._rbuf
        while True:
            try:
                obj = parser.gets()
            except errors.ProtocolError:
                self.close()
                raise
            if obj is not NEED_MORE:
                return obj
            try:
                n = self._sock.recv_into(rbuf)
            except socket.timeout:
                raise self._fail(errors.TimeoutError,
                                 f"no reply from the server within {self.socket_timeout}s") from None
            except OSError as exc:
                raise self._fail(errors.ConnectionError,
                                 f"connection lost while waiting for a reply: "
                                 f"{exc.strerror or exc}") from None
            if not n:
                raise self._fail(errors.ConnectionError,
                                 "server closed the connection before replying")
            with memoryview(rbuf) as view, view[:n] as chunk:
                parser.feed(chunk)

    def _read_reply(self, rid):
        try:
            status, result = check_reply(self._read_frame(), rid)
        except errors.ProtocolError:
            self.close()
            raise
        if status and type(result) is list and result and result[0] == "PROTO":
            self.close()        # the server drops the stream after PROTO
        return status, result

    def call(self, command):
        """Send one command, return its ``(status, result)``."""
        if self._sock is None:
            raise errors.ConnectionError("connection is closed")
        rid = self._rid = _protocol.next_request_id(self._rid)
        self._sendall(encode_request(rid, command.op, command.args))
        return self._read_reply(rid)

    def call_many(self, commands):
        """Send ``commands`` pipelined; return their ``(status, result)`` in order."""
        if self._sock is None:
            raise errors.ConnectionError("connection is closed")
        replies = []
        pending = []
        out = []
        size = 0
        rid = self._rid
        for command in commands:
            rid = _protocol.next_request_id(rid)
            frame = encode_request(rid, command.op, command.args)
            out.append(frame)
            pending.append(rid)
            size += len(frame)
            if size >= PIPELINE_WINDOW:
                self._rid = rid
                self._sendall(b"".join(out))
                out.clear()
                size = 0
                for want in pending:
                    replies.append(self._read_reply(want))
                pending.clear()
        self._rid = rid
        if out:
            self._sendall(b"".join(out))
        for want in pending:
            replies.append(self._read_reply(want))
        return replies


class ConnectionPool:
    """Thread-safe pool of :class:`Connection` s to one server.

    At most ``max_connections`` exist at once; a checkout waits up to
    ``timeout`` seconds for one to be returned, then raises
    :class:`kvstore.errors.ConnectionError`. Idle connections are checked
    before reuse; a broken one is closed and replaced, never handed out.
    """

    def __init__(self, max_connections=64, timeout=20.0, **connection_kwargs):
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) \
                or max_connections < 1:
            raise ValueError(f"max_connections must be an int >= 1, not {max_connections!r}")
        self.max_connections = max_connections
        self.timeout = timeout
        self.connection_kwargs = connection_kwargs
        self._reset()

    def _reset(self):
        self._pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._idle = []
        self._created = 0
        self._closed = False

    def __repr__(self):
        kw = self.connection_kwargs
        return (f"<kvstore ConnectionPool {kw.get('host')}:{kw.get('port')} "
                f"{self._created}/{self.max_connections}>")

    def _check_pid(self):
        if self._pid != os.getpid():
            closed = self._closed
            self._reset()        # the child's own pool; the parent's sockets stay open there
            self._closed = closed

    def get_connection(self):
        """Check out a connected Connection (connecting a new one if needed)."""
        self._check_pid()
        deadline = None
        with self._cond:
            while True:
                if self._closed:
                    raise errors.ClosedError("the client is closed")
                if self._idle:
                    conn = self._idle.pop()
                    break
                if self._created < self.max_connections:
                    self._created += 1
                    conn = None
                    break
                if self.timeout is not None:
                    if deadline is None:
                        deadline = time.monotonic() + self.timeout
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise errors.ConnectionError(
                            f"no free connection within {self.timeout}s "
                            f"(max_connections={self.max_connections})")
                    self._cond.wait(remaining)
                else:
                    self._cond.wait()
        if conn is not None:
            if conn.is_usable():
                return conn
            conn.close()
        try:
            conn = Connection(**self.connection_kwargs)
            conn.connect()
        except BaseException:
            with self._cond:
                self._created -= 1
                self._cond.notify()
            raise
        return conn

    def release(self, conn, broken=False):
        """Give ``conn`` back; a broken or closed one is discarded."""
        if self._pid != os.getpid():
            return
        with self._cond:
            if broken or conn.closed or self._closed:
                self._created -= 1
                discard = True
            else:
                self._idle.append(conn)
                discard = False
            self._cond.notify()
        if discard:
            conn.close()

    def close(self):
        """Close idle connections; connections in use close when returned."""
        self._check_pid()
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._created -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()


class Client(CommandsMixin):
    """Blocking client for a kvstore server (native protocol).

    ``Client(host, port, password=None, socket_timeout=None,
    socket_connect_timeout=None, retries=3, retry_backoff=0.05,
    max_connections=64, username=None)``; or
    ``Client.from_url("kv://[:password@]host:port")``. With ``username`` the
    connection authenticates as that ACL user (``auth [username, password]``),
    else as the default user.

    Keys and values are bytes-like; a ``str`` raises TypeError (encode it).
    Errors are :mod:`kvstore.errors` classes: ``KeyLostError`` (``.version``),
    ``UnrecoverableKeyError``, ``StoreFullError``, ``ValueTooLargeError``,
    ``ReadOnlyError``, ``ResponseError`` (others; ``.code`` is the protocol
    code); ``kvstore.errors.TimeoutError`` and ``ConnectionError`` also are
    the builtin ``TimeoutError`` / ``ConnectionError``.

    Retries (see :mod:`kvstore.client._config` for the full rule): a request
    that cannot have reached the server is retried for every command; a
    broken connection after sending, and a lost key being rebuilt, are
    retried only for idempotent reads; writes are never re-sent after they
    may have been sent; timeouts are not retried unless
    ``retry_on_timeout=True``. At most ``retries`` retries with exponential
    backoff (``retry_backoff * 2**n``, capped at ``retry_backoff_max``).

    Safe to share between threads (see the module docstring); ``close()`` is
    idempotent and the client is a context manager.
    """

    def scan_iter(self, match=None, count=100):
        """Every key (SCAN until the cursor is 0 again); a key may come twice."""
        cursor = 0
        while True:
            cursor, keys = self.scan(cursor, count, match)
            yield from keys
            if cursor == 0:
                return

    def __init__(self, host="127.0.0.1", port=DEFAULT_PORT, password=None,
                 socket_timeout=None, socket_connect_timeout=None, retries=3,
                 retry_backoff=0.05, max_connections=64, *, retry_backoff_max=1.0,
                 retry_on_timeout=False, pool_timeout=20.0,
                 max_frame=_protocol.DEFAULT_MAX_FRAME, username=None):
        self._retry = client_retry_policy(socket_timeout, socket_connect_timeout, retries,
                                          retry_backoff, retry_backoff_max, retry_on_timeout)
        self.connection_pool = ConnectionPool(
            max_connections, pool_timeout, host=host, port=port, password=password,
            username=username,
            socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout,
            max_frame=max_frame)
        self.host = host
        self.port = port

    @classmethod
    def from_url(cls, url, **kwargs):
        """``Client.from_url("kv://[:password@]host:port[?socket_timeout=1.5]")``;
        keyword arguments override what the URL says."""
        return cls(**{**parse_url(url), **kwargs})

    def __repr__(self):
        return f"<kvstore Client {self.host}:{self.port}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        """Close the client's connections (idempotent)."""
        self.connection_pool.close()

    def pipeline(self):
        """A :class:`Pipeline` bound to this client (use ``with``)."""
        return Pipeline(self)

    def _execute_command(self, command):
        policy = self._retry
        pool = self.connection_pool
        attempt = 0
        while True:
            sent = False
            try:
                conn = pool.get_connection()
                sent = True
                try:
                    status, result = conn.call(command)
                except BaseException:
                    pool.release(conn, broken=True)
                    raise
                pool.release(conn)
                return decode_reply(status, result, command)
            except errors.Error as exc:
                if not policy.should_retry(exc, command.idempotent, sent, attempt):
                    raise
            time.sleep(policy.delay(attempt))
            attempt += 1

    def _execute_pipeline(self, commands):
        """Send ``commands`` on one connection; ``(status, result)`` list."""
        policy = self._retry
        pool = self.connection_pool
        idempotent = all(c.idempotent for c in commands)
        attempt = 0
        while True:
            sent = False
            try:
                conn = pool.get_connection()
                sent = True
                try:
                    replies = conn.call_many(commands)
                except BaseException:
                    pool.release(conn, broken=True)
                    raise
                pool.release(conn)
                return replies
            except (errors.ConnectionError, errors.TimeoutError) as exc:
                if not policy.should_retry(exc, idempotent, sent, attempt):
                    raise
            time.sleep(policy.delay(attempt))
            attempt += 1


def _collect(commands, replies, raise_on_error):
    results = []
    first_error = None
    for command, reply in zip(commands, replies):
        try:
            if isinstance(reply, BaseException):    # a cluster pipeline's failed part
                raise reply
            results.append(decode_reply(reply[0], reply[1], command))
        except errors.Error as exc:
            results.append(exc)
            if first_error is None:
                first_error = exc
    if raise_on_error and first_error is not None:
        first_error.pipeline_results = results
        raise first_error
    return results


class Pipeline(CommandsMixin):
    """Queue commands, send them together with :meth:`execute`.

    Every command method queues and returns the pipeline (so calls chain).
    ``execute(raise_on_error=True)`` writes all frames at once, reads every
    reply, and returns the results in order; with ``raise_on_error=True``
    (default, as redis-py) the first failed command's exception is raised
    after all replies were read (the full list, exceptions in place, is on
    the exception's ``pipeline_results``); with ``False`` failed commands
    have their exception object in place of a result. A KeyLostError inside
    a pipeline is not retried. Not thread-safe: one pipeline per thread.
    """

    def __init__(self, client):
        self._client = client
        self._queue = []

    def _execute_command(self, command):
        self._queue.append(command)
        return self

    def __len__(self):
        return len(self._queue)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.reset()

    def reset(self):
        """Drop queued commands."""
        self._queue = []

    def execute(self, raise_on_error=True):
        """Send the queued commands; return their results in order."""
        commands, self._queue = self._queue, []
        if not commands:
            return []
        replies = self._client._execute_pipeline(commands)
        return _collect(commands, replies, raise_on_error)
