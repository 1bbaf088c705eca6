"""asyncio client: AsyncConnection, AsyncConnectionPool, AsyncClient, AsyncPipeline.

The twin of :mod:`kvstore.client._sync`: the same command methods (from
:class:`~kvstore.client._commands.CommandsMixin`), the same retry rule, the
same errors; methods are coroutines. Replies are parsed in the protocol's
``data_received`` by the same feed()/gets() parser the blocking client uses.

An AsyncClient may be shared by any number of tasks of one event loop. If it
is used from another loop later (e.g. a second ``asyncio.run``), connections
of the old loop are dropped and new ones are opened.
"""

import asyncio
import collections

from kvstore import errors

from . import _protocol
from ._commands import CommandsMixin, decode_reply
from ._config import DEFAULT_PORT, client_retry_policy, parse_url
from ._protocol import NEED_MORE, FrameParser, check_reply, encode_request
from ._sync import PIPELINE_WINDOW, _collect


class _ReplyProtocol(asyncio.Protocol):
    """Feeds received bytes to a FrameParser and queues whole frames."""

    def __init__(self, parser, where):
        self.parser = parser
        self.where = where
        self.frames = collections.deque()
        self.transport = None
        self.error = None           # (exception class, message) once broken
        self.waiter = None
        self.paused = False
        self.drain_waiter = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        parser = self.parser
        try:
            parser.feed(data)
            while True:
                obj = parser.gets()
                if obj is NEED_MORE:
                    break
                self.frames.append(obj)
        except errors.ProtocolError as exc:
            self.error = (errors.ProtocolError, str(exc))
            self.transport.close()
        self._wake()

    def eof_received(self):
        return False                # close the transport

    def connection_lost(self, exc):
        if self.error is None:
            detail = f": {exc}" if exc else ""
            self.error = (errors.ConnectionError,
                          f"server closed the connection before replying{detail} ({self.where})")
        self._wake()
        self.paused = False
        waiter, self.drain_waiter = self.drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        waiter, self.drain_waiter = self.drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake(self):
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def raise_error(self):
        cls, msg = self.error
        raise cls(msg)

    async def read_frame(self):
        frames = self.frames
        while not frames:
            if self.error is not None:
                self.raise_error()
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return frames.popleft()

    async def drain(self):
        if self.error is not None:
            self.raise_error()
        while self.paused:
            self.drain_waiter = asyncio.get_running_loop().create_future()
            await self.drain_waiter
            if self.error is not None:
                self.raise_error()


class AsyncConnection:
    """One native-protocol connection on the running event loop.

    ``socket_timeout`` bounds each reply (asyncio: the whole reply, not each
    chunk); ``socket_connect_timeout`` bounds connect + handshake.
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
        self.loop = None
        self._transport = None
        self._proto = None
        self._rid = 0

    def __repr__(self):
        state = "connected" if self._transport is not None else "closed"
        return f"<kvstore AsyncConnection {self.host}:{self.port} {state}>"

    def _auth_args(self):
        # [password] authenticates as the default user, [user, password] as
        # that ACL user (Redis's AUTH [username] password)
        if self.username is not None:
            return [self.username, self.password]
        return [self.password]

    @property
    def closed(self):
        return self._transport is None or self._proto.error is not None

    async def connect(self):
        where = f"{self.host}:{self.port}"
        loop = asyncio.get_running_loop()
        self.loop = loop
        try:
            async with asyncio.timeout(self.socket_connect_timeout):
                try:
                    transport, proto = await loop.create_connection(
                        lambda: _ReplyProtocol(FrameParser(self.max_frame), where),
                        self.host, self.port)
                except OSError as exc:
                    raise errors.ConnectionError(
                        f"cannot connect to kvstore server at {where}: "
                        f"{exc.strerror or exc}") from None
                self._transport, self._proto = transport, proto
                payload = _protocol.MAGIC
                if self.password is not None:
                    self._rid = 1
                    payload += encode_request(1, "auth", self._auth_args())
                transport.write(payload)
                hello = await proto.read_frame()
                if (type(hello) is not list or len(hello) != 3 or hello[0] != 0
                        or hello[1] != 0 or not isinstance(hello[2], dict)):
                    if type(hello) is list and len(hello) == 3 and hello[1] == 1:
                        raise _protocol.handshake_error(hello[2], where)
                    raise errors.ProtocolError(
                        f"unexpected handshake from {where}: {hello!r:.200}")
                self.server_info = hello[2]
                if self.password is not None:
                    status, result = check_reply(await proto.read_frame(), 1)
                    if status != 0:
                        exc = _protocol.error_from_reply(result)
                        if exc.code in ("ERR", "NOAUTH"):
                            exc = _protocol.AuthenticationError(str(exc))
                            exc.code = "NOAUTH"
                        raise exc
        except errors.Error:
            self.close()
            raise
        except TimeoutError:
            self.close()
            raise errors.TimeoutError(
                f"connecting to {where} timed out after {self.socket_connect_timeout}s") from None
        except BaseException:
            self.close()
            raise

    def close(self):
        transport, self._transport = self._transport, None
        if transport is not None:
            try:
                transport.close()
            except RuntimeError:
                # Its event loop is already closed, so the transport cannot
                # finish closing; close the socket itself.
                sock = getattr(transport, "_sock", None)
                if sock is not None:
                    sock.close()

    def is_usable(self):
        proto = self._proto
        return (self._transport is not None and proto.error is None
                and not self._transport.is_closing()
                and not proto.frames and not proto.parser.buffered()
                and self.loop is asyncio.get_running_loop())

    async def _read_reply(self, rid):
        proto = self._proto
        try:
            if self.socket_timeout is None:
                frame = await proto.read_frame()
            else:
                async with asyncio.timeout(self.socket_timeout):
                    frame = await proto.read_frame()
            status, result = check_reply(frame, rid)
        except errors.Error:
            self.close()
            raise
        except TimeoutError:
            self.close()
            raise errors.TimeoutError(
                f"no reply from the server within {self.socket_timeout}s "
                f"({self.host}:{self.port})") from None
        if status and type(result) is list and result and result[0] == "PROTO":
            self.close()
        return status, result

    def _check_open(self):
        if self._transport is None:
            raise errors.ConnectionError("connection is closed")
        if self._proto.error is not None:
            self.close()
            self._proto.raise_error()

    async def call(self, command):
        self._check_open()
        rid = self._rid = _protocol.next_request_id(self._rid)
        self._transport.write(encode_request(rid, command.op, command.args))
        if self._proto.paused:
            await self._proto.drain()
        return await self._read_reply(rid)

    async def call_many(self, commands):
        self._check_open()
        rid = self._rid
        rids = []
        out = []
        size = 0
        for command in commands:
            rid = _protocol.next_request_id(rid)
            frame = encode_request(rid, command.op, command.args)
            out.append(frame)
            rids.append(rid)
            size += len(frame)
            if size >= PIPELINE_WINDOW:
                self._transport.write(b"".join(out))
                out.clear()
                size = 0
                await self._proto.drain()
        self._rid = rid
        if out:
            self._transport.write(b"".join(out))
        await self._proto.drain()
        return [await self._read_reply(want) for want in rids]


class AsyncConnectionPool:
    """Pool of AsyncConnections for one event loop (see the module docstring)."""

    def __init__(self, max_connections=64, timeout=20.0, **connection_kwargs):
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) \
                or max_connections < 1:
            raise ValueError(f"max_connections must be an int >= 1, not {max_connections!r}")
        self.max_connections = max_connections
        self.timeout = timeout
        self.connection_kwargs = connection_kwargs
        self._loop = None
        self._sem = None
        self._idle = []
        self._closed = False

    def _check_loop(self):
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            for conn in self._idle:
                conn.close()
            self._idle = []
            self._loop = loop
            self._sem = asyncio.Semaphore(self.max_connections)

    async def get_connection(self):
        if self._closed:
            raise errors.ClosedError("the client is closed")
        self._check_loop()
        sem = self._sem
        if sem.locked() and self.timeout is not None:
            try:
                async with asyncio.timeout(self.timeout):
                    await sem.acquire()
            except TimeoutError:
                raise errors.ConnectionError(
                    f"no free connection within {self.timeout}s "
                    f"(max_connections={self.max_connections})") from None
        else:
            await sem.acquire()
        try:
            if self._closed:
                raise errors.ClosedError("the client is closed")
            idle = self._idle
            while idle:
                conn = idle.pop()
                if conn.is_usable():
                    return conn
                conn.close()
            conn = AsyncConnection(**self.connection_kwargs)
            await conn.connect()
            return conn
        except BaseException:
            sem.release()
            raise

    def release(self, conn, broken=False):
        if conn.loop is not self._loop:
            conn.close()            # checked out on a loop since replaced
            return
        if broken or conn.closed or self._closed:
            conn.close()
        else:
            self._idle.append(conn)
        self._sem.release()

    async def aclose(self):
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        if idle:
            await asyncio.sleep(0)  # let the transports finish closing


class AsyncClient(CommandsMixin):
    """asyncio twin of :class:`kvstore.client.Client`: same arguments, same
    methods (coroutines), same errors and retry rule.

    ``await client.aclose()`` (idempotent) or ``async with AsyncClient(...)``.
    Argument errors (a ``str`` key) are raised when the method is called,
    before awaiting.
    """

    async def scan_iter(self, match=None, count=100):
        """Every key (SCAN until the cursor is 0 again), as an async
        iterator; a key may come twice."""
        cursor = 0
        while True:
            cursor, keys = await self.scan(cursor, count, match)
            for k in keys:
                yield k
            if cursor == 0:
                return

    def __init__(self, host="127.0.0.1", port=DEFAULT_PORT, password=None,
                 socket_timeout=None, socket_connect_timeout=None, retries=3,
                 retry_backoff=0.05, max_connections=64, *, retry_backoff_max=1.0,
                 retry_on_timeout=False, pool_timeout=20.0,
                 max_frame=_protocol.DEFAULT_MAX_FRAME, username=None):
        self._retry = client_retry_policy(socket_timeout, socket_connect_timeout, retries,
                                          retry_backoff, retry_backoff_max, retry_on_timeout)
        self.connection_pool = AsyncConnectionPool(
            max_connections, pool_timeout, host=host, port=port, password=password,
            username=username,
            socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout,
            max_frame=max_frame)
        self.host = host
        self.port = port

    @classmethod
    def from_url(cls, url, **kwargs):
        """``AsyncClient.from_url("kv://[:password@]host:port")``."""
        return cls(**{**parse_url(url), **kwargs})

    def __repr__(self):
        return f"<kvstore AsyncClient {self.host}:{self.port}>"

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        await self.aclose()

    async def aclose(self):
        """Close the client's connections (idempotent)."""
        await self.connection_pool.aclose()

    def pipeline(self):
        """An :class:`AsyncPipeline` (``async with client.pipeline() as p``)."""
        return AsyncPipeline(self)

    async def _execute_command(self, command):
        policy = self._retry
        pool = self.connection_pool
        attempt = 0
        while True:
            sent = False
            try:
                conn = await pool.get_connection()
                sent = True
                try:
                    status, result = await conn.call(command)
                except BaseException:
                    pool.release(conn, broken=True)
                    raise
                pool.release(conn)
                return decode_reply(status, result, command)
            except errors.Error as exc:
                if not policy.should_retry(exc, command.idempotent, sent, attempt):
                    raise
            await asyncio.sleep(policy.delay(attempt))
            attempt += 1

    async def _execute_pipeline(self, commands):
        policy = self._retry
        pool = self.connection_pool
        idempotent = all(c.idempotent for c in commands)
        attempt = 0
        while True:
            sent = False
            try:
                conn = await pool.get_connection()
                sent = True
                try:
                    replies = await conn.call_many(commands)
                except BaseException:
                    pool.release(conn, broken=True)
                    raise
                pool.release(conn)
                return replies
            except (errors.ConnectionError, errors.TimeoutError) as exc:
                if not policy.should_retry(exc, idempotent, sent, attempt):
                    raise
            await asyncio.sleep(policy.delay(attempt))
            attempt += 1


class AsyncPipeline(CommandsMixin):
    """asyncio twin of :class:`kvstore.client.Pipeline`: command methods queue
    and return the pipeline; ``await pipe.execute(raise_on_error=True)``."""

    def __init__(self, client):
        self._client = client
        self._queue = []

    def _execute_command(self, command):
        self._queue.append(command)
        return self

    def __len__(self):
        return len(self._queue)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        self.reset()

    def reset(self):
        """Drop queued commands."""
        self._queue = []

    async def execute(self, raise_on_error=True):
        """Send the queued commands; return their results in order."""
        commands, self._queue = self._queue, []
        if not commands:
            return []
        replies = await self._client._execute_pipeline(commands)
        return _collect(commands, replies, raise_on_error)
