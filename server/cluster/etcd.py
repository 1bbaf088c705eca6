"""A small asyncio client for etcd's v3 API, spoken through its JSON gateway.

etcd (3.4 here) serves every v3 RPC as ``POST /v3/<service>/<method>`` with a
JSON body; keys and values are base64, 64-bit integers are JSON strings,
fields at their default value (0, false, empty) are left out. Unary calls get
one JSON object back; the streaming ones (``lease/keepalive``, ``watch``) get
a chunked stream of ``{"result": ...}`` objects. Errors come back as
``{"error": ..., "message": ..., "code": <gRPC code>}``.

Why this and not a library: see docs/DESIGN.md ("Cluster"). In short, the
calls the cluster needs are few (lease grant/keepalive/revoke/timetolive,
put, range, delete, txn, watch), the gateway is a stable part of etcd 3.4+,
and speaking it with ``asyncio`` streams keeps every call on the server's
own event loop with no thread, no gRPC and no protobuf dependency.

Contract
    Every method is a coroutine meant for the server's event loop; none
    blocks the loop. Every call has a deadline (``timeout``, default
    :data:`DEFAULT_TIMEOUT` s) covering connect, send and the whole reply.
    Failures raise :class:`EtcdUnavailableError` (cannot connect, connection
    dropped: also a ``ConnectionError``), :class:`EtcdTimeoutError` (also a
    ``TimeoutError``) or :class:`EtcdResponseError` (etcd refused the request;
    ``.code`` is the gRPC status code). A call that timed out or lost its
    connection after sending may still have been applied by etcd: callers
    that write re-read before deciding (the controller does).
    Each call uses its own short-lived loopback/LAN connection
    (``Connection: close``), so a stuck call never holds up another.

Watches
    :meth:`EtcdClient.watch` returns a :class:`Watch`, an async iterator of
    event batches. It does not reconnect by itself: when the stream breaks it
    raises, and the caller starts a new watch at ``watch.next_revision`` so no
    event is missed; when that revision has been compacted away the new watch
    raises :class:`WatchCompactedError` and the caller re-reads the state
    (``range``) and watches from the read's revision + 1.
"""

import asyncio
import base64
import json
import random
import urllib.parse
from dataclasses import dataclass, field

from kvstore import errors

__all__ = [
    "EtcdClient", "Watch", "KeyValue", "Event", "TxnResult",
    "EtcdError", "EtcdUnavailableError", "EtcdTimeoutError", "EtcdResponseError",
    "LeaseNotFoundError", "WatchCompactedError",
    "cmp_create", "cmp_mod", "cmp_value", "cmp_version", "cmp_lease",
    "op_put", "op_get", "op_delete", "prefix_end", "DEFAULT_TIMEOUT",
]

#: Deadline of one call (connect + request + whole reply), seconds.
DEFAULT_TIMEOUT = 2.0
#: Largest reply accepted (a range over the whole cluster prefix fits easily).
MAX_REPLY = 64 << 20

# gRPC status codes etcd uses in its error replies.
_DEADLINE_EXCEEDED = 4
_NOT_FOUND = 5
_UNAVAILABLE = 14


class EtcdError(errors.Error):
    """Base class of the etcd client's errors."""


class EtcdUnavailableError(EtcdError, ConnectionError):
    """etcd could not be reached, or the connection broke mid-call."""


class EtcdTimeoutError(EtcdError, TimeoutError):
    """etcd did not answer within the call's deadline."""


class EtcdResponseError(EtcdError):
    """etcd answered with an error (``code``: gRPC status, ``message``)."""

    def __init__(self, message, code=None, http_status=None):
        super().__init__(message)
        self.code = code
        self.http_status = http_status


class LeaseNotFoundError(EtcdResponseError, KeyError):
    """The lease does not exist any more (expired or revoked)."""

    def __str__(self):          # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WatchCompactedError(EtcdError):
    """The watch's start revision was compacted; re-read and watch again."""

    def __init__(self, message, compact_revision):
        super().__init__(message)
        self.compact_revision = compact_revision


# -- data

def _b64(b):
    if isinstance(b, str):
        b = b.encode()
    return base64.b64encode(bytes(b)).decode("ascii")


def _unb64(s):
    return base64.b64decode(s) if s else b""


def _int(v):
    return int(v) if v not in (None, "") else 0


def prefix_end(prefix):
    """The ``range_end`` that makes a range cover every key starting with ``prefix``."""
    p = bytearray(prefix.encode() if isinstance(prefix, str) else prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return b"\0"        # every key


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0
    lease: int = 0

    @classmethod
    def from_json(cls, d):
        return cls(_unb64(d.get("key")), _unb64(d.get("value")), _int(d.get("create_revision")),
                   _int(d.get("mod_revision")), _int(d.get("version")), _int(d.get("lease")))


@dataclass(frozen=True)
class Event:
    type: str                   # "PUT" or "DELETE"
    kv: KeyValue


@dataclass
class TxnResult:
    succeeded: bool
    revision: int
    #: one entry per operation of the branch taken: a list of KeyValue for a
    #: get, the revision (int) for a put, the deleted count for a delete
    responses: list = field(default_factory=list)


# -- transaction building blocks

_RESULTS = {"==": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}


def _cmp(key, op, target, field_name, value):
    if op not in _RESULTS:
        raise ValueError(f"compare operator must be one of {sorted(_RESULTS)}, not {op!r}")
    return {"key": _b64(key), "target": target, "result": _RESULTS[op], field_name: value}


def cmp_create(key, op, revision):
    """Compare ``key``'s create_revision (0: the key does not exist)."""
    return _cmp(key, op, "CREATE", "create_revision", str(int(revision)))


def cmp_mod(key, op, revision):
    """Compare ``key``'s mod_revision (0: the key does not exist)."""
    return _cmp(key, op, "MOD", "mod_revision", str(int(revision)))


def cmp_version(key, op, version):
    return _cmp(key, op, "VERSION", "version", str(int(version)))


def cmp_value(key, op, value):
    return _cmp(key, op, "VALUE", "value", _b64(value))


def cmp_lease(key, op, lease):
    return _cmp(key, op, "LEASE", "lease", str(int(lease)))


def op_put(key, value, lease=0):
    r = {"key": _b64(key), "value": _b64(value)}
    if lease:
        r["lease"] = str(int(lease))
    return {"request_put": r}


def _range_body(key, prefix=False, range_end=None):
    r = {"key": _b64(key)}
    if prefix:
        r["range_end"] = _b64(prefix_end(key))
    elif range_end is not None:
        r["range_end"] = _b64(range_end)
    return r


def op_get(key, prefix=False):
    return {"request_range": _range_body(key, prefix)}


def op_delete(key, prefix=False):
    return {"request_delete_range": _range_body(key, prefix)}


# -- the client

class EtcdClient:
    """Asyncio client for one etcd cluster (see the module docstring).

    ``endpoints``: ``"http://127.0.0.1:2379"``, ``"127.0.0.1:2379"``, or a
    comma-separated string / list of them; a call that cannot connect tries
    the next endpoint before giving up.
    """

    def __init__(self, endpoints, timeout=DEFAULT_TIMEOUT):
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e.strip()]
        self.endpoints = [self._parse_endpoint(e) for e in endpoints]
        if not self.endpoints:
            raise ValueError("no etcd endpoint given")
        self.timeout = float(timeout)
        self._current = 0
        self.calls = 0
        self.failures = 0

    @staticmethod
    def _parse_endpoint(e):
        e = e.strip()
        if "://" not in e:
            e = "http://" + e
        u = urllib.parse.urlsplit(e)
        if u.scheme != "http":
            raise ValueError(f"etcd endpoint {e!r}: only http:// is supported")
        if not u.hostname or not u.port:
            raise ValueError(f"etcd endpoint {e!r} needs a host and a port")
        return (u.hostname, u.port)

    @property
    def url(self):
        return ",".join(f"http://{h}:{p}" for h, p in self.endpoints)

    def __repr__(self):
        return f"EtcdClient({self.url!r})"

    # -- transport

    async def _call(self, path, body, timeout=None):
        """POST ``/v3/<path>``; returns the list of JSON objects in the reply."""
        timeout = self.timeout if timeout is None else float(timeout)
        self.calls += 1
        data = json.dumps(body, separators=(",", ":")).encode()
        n = len(self.endpoints)
        last = None
        for i in range(n):
            host, port = self.endpoints[(self._current + i) % n]
            try:
                async with asyncio.timeout(timeout):
                    objs = await self._exchange(host, port, path, data)
            except TimeoutError:
                self.failures += 1
                raise EtcdTimeoutError(
                    f"etcd at http://{host}:{port} did not answer /v3/{path} within "
                    f"{timeout:g} s") from None
            except (OSError, asyncio.IncompleteReadError, _Broken) as e:
                self.failures += 1
                last = EtcdUnavailableError(
                    f"etcd at http://{host}:{port} is unreachable ({_reason(e)})")
                continue
            self._current = (self._current + i) % n
            return objs
        raise last

    async def _exchange(self, host, port, path, data):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                (f"POST /v3/{path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                 f"Connection: close\r\n\r\n").encode() + data)
            await writer.drain()
            status, headers = await _read_head(reader)
            body = await _read_body(reader, headers)
        finally:
            writer.close()
        try:
            objs = _decode_objects(body)
        except _Broken:
            if status == 200:
                raise
            raise EtcdResponseError(f"etcd refused /v3/{path}: HTTP {status} "
                                    f"{body[:200].decode('latin-1').strip()}",
                                    http_status=status) from None
        if status != 200 or (len(objs) == 1 and "error" in objs[0]) or not objs:
            err = objs[0] if objs and isinstance(objs[0], dict) else {}
            if "error" in err and isinstance(err["error"], dict):    # stream error form
                err = err["error"]
            msg = err.get("message") or err.get("error") or body[:200].decode("latin-1").strip()
            code = err.get("code", err.get("grpc_code"))
            if code == _UNAVAILABLE:
                raise EtcdUnavailableError(f"etcd at http://{host}:{port} is unavailable: {msg}")
            if code == _DEADLINE_EXCEEDED:
                raise EtcdTimeoutError(f"etcd at http://{host}:{port} timed out on /v3/{path}: {msg}")
            cls = LeaseNotFoundError if (code == _NOT_FOUND and "lease not found" in msg) \
                else EtcdResponseError
            raise cls(f"etcd refused /v3/{path}: {msg}", code=code, http_status=status)
        return objs

    async def _one(self, path, body, timeout=None):
        objs = await self._call(path, body, timeout)
        return objs[0]

    # -- maintenance

    async def status(self, timeout=None):
        """``{"version": "3.4.23", "revision": ..., ...}`` of the endpoint answering."""
        r = await self._one("maintenance/status", {}, timeout)
        return {"version": r.get("version", ""), "revision": _int(r.get("header", {}).get("revision")),
                "leader": r.get("leader", ""), "db_size": _int(r.get("dbSize"))}

    async def wait_ready(self, deadline=None, on_retry=None, first_delay=0.1, max_delay=2.0):
        """Call :meth:`status` until it answers, with exponential backoff (+ jitter).

        ``deadline``: seconds to keep trying (None: forever). ``on_retry(error,
        delay)`` is called before each wait, e.g. to log. Raises the last
        error, with the time waited, once the deadline has passed.
        """
        loop = asyncio.get_running_loop()
        end = None if deadline is None else loop.time() + deadline
        delay = first_delay
        while True:
            try:
                return await self.status(timeout=min(self.timeout, 1.0))
            except EtcdError as e:
                now = loop.time()
                if end is not None and now >= end:
                    raise type(e)(f"{e}; gave up after {deadline:g} s of retries") from None
                wait = min(delay, max_delay) * (0.75 + random.random() / 2)
                if end is not None:
                    wait = max(0.0, min(wait, end - now))
                if on_retry is not None:
                    on_retry(e, wait)
                await asyncio.sleep(wait)
                delay *= 2

    # -- leases

    async def grant(self, ttl, timeout=None):
        """Grant a lease of ``ttl`` seconds; returns ``(lease_id, granted_ttl)``.

        etcd raises a TTL below its minimum (2 s with default timing) to it.
        """
        r = await self._one("lease/grant", {"TTL": str(int(ttl))}, timeout)
        if r.get("error"):
            raise EtcdResponseError(f"etcd refused the lease: {r['error']}")
        return _int(r.get("ID")), _int(r.get("TTL"))

    async def keepalive(self, lease_id, timeout=None):
        """Renew the lease once; returns its TTL. Raises :class:`LeaseNotFoundError`."""
        objs = await self._call("lease/keepalive", {"ID": str(int(lease_id))}, timeout)
        r = objs[0].get("result", objs[0])
        ttl = _int(r.get("TTL"))
        if ttl <= 0:
            raise LeaseNotFoundError(f"lease {lease_id:x} has expired or was revoked")
        return ttl

    async def revoke(self, lease_id, timeout=None):
        """Revoke the lease (its keys are deleted). A lease already gone is fine."""
        try:
            await self._one("lease/revoke", {"ID": str(int(lease_id))}, timeout)
        except LeaseNotFoundError:
            pass

    async def time_to_live(self, lease_id, keys=False, timeout=None):
        """``{"ttl": remaining (-1: gone), "granted_ttl": ..., "keys": [bytes]}``."""
        r = await self._one("lease/timetolive", {"ID": str(int(lease_id)), "keys": bool(keys)}, timeout)
        return {"ttl": _int(r.get("TTL")), "granted_ttl": _int(r.get("grantedTTL")),
                "keys": [_unb64(k) for k in r.get("keys", [])]}

    # -- key-value

    async def put(self, key, value, lease=0, timeout=None):
        """Put ``key`` (attached to ``lease`` when non-zero); returns the revision."""
        body = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(int(lease))
        r = await self._one("kv/put", body, timeout)
        return _int(r.get("header", {}).get("revision"))

    async def range(self, key, prefix=False, range_end=None, limit=0, revision=0,
                    timeout=None):
        """Keys ``key`` (or with ``prefix=True`` every key starting with it).

        Returns ``(list[KeyValue], revision)``, the revision of the read.
        """
        body = _range_body(key, prefix, range_end)
        if limit:
            body["limit"] = str(int(limit))
        if revision:
            body["revision"] = str(int(revision))
        r = await self._one("kv/range", body, timeout)
        return ([KeyValue.from_json(kv) for kv in r.get("kvs", [])],
                _int(r.get("header", {}).get("revision")))

    async def get(self, key, timeout=None):
        """One key's :class:`KeyValue`, or None; and the revision of the read."""
        kvs, rev = await self.range(key, timeout=timeout)
        return (kvs[0] if kvs else None), rev

    async def delete(self, key, prefix=False, timeout=None):
        """Delete ``key`` (or the prefix); returns how many keys went."""
        r = await self._one("kv/deleterange", _range_body(key, prefix), timeout)
        return _int(r.get("deleted"))

    async def txn(self, compare, success=(), failure=(), timeout=None):
        """Atomic if/then/else: ``compare`` (list of ``cmp_*``), then ``op_*`` lists."""
        r = await self._one("kv/txn", {"compare": list(compare), "success": list(success),
                                       "failure": list(failure)}, timeout)
        out = []
        for resp in r.get("responses", []):
            if "response_range" in resp:
                out.append([KeyValue.from_json(kv) for kv in resp["response_range"].get("kvs", [])])
            elif "response_put" in resp:
                out.append(_int(resp["response_put"].get("header", {}).get("revision")))
            elif "response_delete_range" in resp:
                out.append(_int(resp["response_delete_range"].get("deleted")))
            else:
                out.append(resp)
        return TxnResult(bool(r.get("succeeded")), _int(r.get("header", {}).get("revision")), out)

    # -- watch

    def watch(self, key, prefix=False, start_revision=0, connect_timeout=None):
        """A :class:`Watch` on ``key`` (or the prefix) from ``start_revision``."""
        return Watch(self, key, prefix, start_revision,
                     self.timeout if connect_timeout is None else connect_timeout)


class Watch:
    """A streaming watch: ``async for events in watch`` yields lists of :class:`Event`.

    ``next_revision`` is the revision to resume from after any failure (the
    one after the last event delivered). Raises :class:`EtcdUnavailableError`
    when the stream breaks, :class:`WatchCompactedError` when the start
    revision is gone. ``close()`` ends it.
    """

    def __init__(self, client, key, prefix, start_revision, connect_timeout):
        self.client = client
        self.key = key
        self.prefix = prefix
        self.next_revision = int(start_revision)
        self.connect_timeout = connect_timeout
        self._reader = None
        self._writer = None
        self._buf = b""
        self._pending = []
        self._chunked = True
        self._eof = False
        self.endpoint = None

    async def _open(self):
        body = {"create_request": dict(_range_body(self.key, self.prefix))}
        if self.next_revision:
            body["create_request"]["start_revision"] = str(self.next_revision)
        data = json.dumps(body).encode()
        c = self.client
        last = None
        for i in range(len(c.endpoints)):
            host, port = c.endpoints[(c._current + i) % len(c.endpoints)]
            try:
                async with asyncio.timeout(self.connect_timeout):
                    reader, writer = await asyncio.open_connection(host, port)
                    writer.write(
                        (f"POST /v3/watch HTTP/1.1\r\nHost: {host}:{port}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                         f"\r\n").encode() + data)
                    await writer.drain()
                    status, headers = await _read_head(reader)
            except TimeoutError:
                raise EtcdTimeoutError(f"etcd at http://{host}:{port} did not open the watch "
                                       f"within {self.connect_timeout:g} s") from None
            except (OSError, asyncio.IncompleteReadError, _Broken) as e:
                last = EtcdUnavailableError(f"etcd at http://{host}:{port} is unreachable "
                                            f"({_reason(e)})")
                continue
            if status != 200:
                body = await _read_body(reader, headers)
                writer.close()
                raise EtcdResponseError(f"etcd refused the watch: "
                                        f"{body[:200].decode('latin-1').strip()}",
                                        http_status=status)
            self._reader, self._writer = reader, writer
            self._chunked = "chunked" in headers.get("transfer-encoding", "")
            self.endpoint = (host, port)
            return
        raise last

    def __aiter__(self):
        return self

    async def __anext__(self):
        while True:
            if self._reader is None:
                if self._eof:
                    raise StopAsyncIteration
                await self._open()
            obj = await self._next_object()
            if "error" in obj:
                e = obj["error"] if isinstance(obj["error"], dict) else obj
                host, port = self.endpoint
                self.close()
                msg = f"etcd at http://{host}:{port} ended the watch: {e.get('message', e)}"
                code = e.get("code", e.get("grpc_code"))     # stream errors say grpc_code
                if code == _UNAVAILABLE:
                    raise EtcdUnavailableError(msg)
                raise EtcdResponseError(msg, code=code)
            r = obj.get("result", obj)
            if r.get("canceled"):
                crev = _int(r.get("compact_revision"))
                self.close()
                if crev:
                    raise WatchCompactedError(
                        f"watch from revision {self.next_revision} refused: etcd compacted "
                        f"up to {crev}", crev)
                raise EtcdResponseError(f"etcd canceled the watch: {r.get('cancel_reason', '')}")
            evs = r.get("events")
            if not evs:
                continue        # created / progress notification
            out = []
            for e in evs:
                kv = KeyValue.from_json(e.get("kv", {}))
                out.append(Event(e.get("type", "PUT"), kv))
                if kv.mod_revision >= self.next_revision:
                    self.next_revision = kv.mod_revision + 1
            return out

    async def _next_object(self):
        while True:
            if self._pending:
                return self._pending.pop(0)
            try:
                if self._chunked:
                    data = await _read_chunk(self._reader)
                else:
                    data = await self._reader.read(65536)
            except (OSError, asyncio.IncompleteReadError, _Broken) as e:
                host, port = self.endpoint
                self.close()
                raise EtcdUnavailableError(f"watch on etcd at http://{host}:{port} broke "
                                           f"({_reason(e)})") from None
            if not data:
                host, port = self.endpoint
                self.close()
                raise EtcdUnavailableError(f"etcd at http://{host}:{port} closed the watch")
            self._buf += data
            if len(self._buf) > MAX_REPLY:
                self.close()
                raise EtcdResponseError("watch message from etcd is too large")
            objs, self._buf = _split_objects(self._buf)
            self._pending.extend(objs)

    def close(self):
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
        self._buf = b""
        self._pending = []

    async def aclose(self):
        self._eof = True
        self.close()


# -- minimal HTTP/1.1 reply parsing

class _Broken(Exception):
    """The reply is not HTTP we understand."""


def _reason(e):
    if isinstance(e, asyncio.IncompleteReadError):
        return "connection closed mid-reply"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    return str(e) or type(e).__name__


async def _read_head(reader):
    line = await reader.readuntil(b"\r\n")
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise _Broken(f"not an HTTP reply: {line[:60]!r}")
    try:
        status = int(parts[1])
    except ValueError:
        raise _Broken(f"bad HTTP status line {line[:60]!r}") from None
    headers = {}
    while True:
        line = await reader.readuntil(b"\r\n")
        if line == b"\r\n":
            return status, headers
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip().lower()
        if len(headers) > 100:
            raise _Broken("too many HTTP headers")


async def _read_chunk(reader):
    """One chunk of a chunked body; b"" at its end (trailers are skipped)."""
    line = await reader.readuntil(b"\r\n")
    try:
        n = int(line.split(b";")[0].strip(), 16)
    except ValueError:
        raise _Broken(f"bad chunk size line {line[:40]!r}") from None
    if n > MAX_REPLY:
        raise _Broken("chunk too large")
    if n == 0:
        while (await reader.readuntil(b"\r\n")) != b"\r\n":
            pass
        return b""
    data = await reader.readexactly(n)
    await reader.readexactly(2)
    return data


async def _read_body(reader, headers):
    if "chunked" in headers.get("transfer-encoding", ""):
        parts = []
        size = 0
        while True:
            c = await _read_chunk(reader)
            if not c:
                return b"".join(parts)
            size += len(c)
            if size > MAX_REPLY:
                raise _Broken("reply too large")
            parts.append(c)
    if "content-length" in headers:
        n = int(headers["content-length"])
        if n > MAX_REPLY:
            raise _Broken("reply too large")
        return await reader.readexactly(n)
    data = await reader.read(MAX_REPLY + 1)
    if len(data) > MAX_REPLY:
        raise _Broken("reply too large")
    return data


_DECODER = json.JSONDecoder()


def _split_objects(buf):
    """Complete JSON objects at the front of ``buf`` and the rest."""
    text = buf.decode("latin-1")       # lossless; etcd's JSON is ASCII
    out = []
    i = 0
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i >= n:
            return out, b""
        try:
            obj, j = _DECODER.raw_decode(text, i)
        except json.JSONDecodeError:
            return out, text[i:].encode("latin-1")
        out.append(obj)
        i = j


def _decode_objects(body):
    objs, rest = _split_objects(body)
    if rest.strip():
        raise _Broken(f"unparseable reply from etcd: {rest[:80]!r}")
    return objs
