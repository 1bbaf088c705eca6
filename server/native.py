"""Native protocol connections (PROTOCOL.md): msgpack frames ``[id, op, args]``.

Each reply is ``[id, 0, result]`` or ``[id, 1, [code, message, extra]]``; all
replies of one ``data_received`` batch go out in one write. An oversized or
undecodable frame (or a bad magic) cannot be resynced: reply ``PROTO`` with
id 0 and close. A frame that decodes but is not ``[id, op, args]`` gets a
``PROTO`` error with its id when it has one, and the connection stays open
(the length prefix kept the stream in sync).
"""

import hmac

import msgpack

import kvstore
from kvstore.errors import (
    ClosedError, FaultInjectionError, KeyLostError, KeyTooLargeError,
    ResponseError, StoreFullError, UnrecoverableKeyError, ValueTooLargeError,
)

from .conn import BaseConnection, OutputLimitExceeded
from .framing import NEED_MORE, FrameError, FrameParser, pack_frame
from .logs import event

__all__ = ["NativeConnection", "OPS", "rejection_frame"]


class NativeError(Exception):
    """An op failed with a protocol error code (``ERR``, ``TYPE``, ...)."""

    def __init__(self, code, msg, extra=None):
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.extra = extra or {}


def _packer():
    return msgpack.Packer(use_bin_type=True, default=_default)


def _default(obj):
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, (bytearray, memoryview)):
        return bytes(obj)
    return str(obj)


def rejection_frame(msg):
    """What a native client over max_clients receives (hello is skipped)."""
    return pack_frame(_packer(), [0, 1, ["BUSY", msg, {}]])


OPS = {}


def op(name):
    def deco(fn):
        OPS[name] = fn
        return fn
    return deco


def _nargs(args, lo, hi, name):
    if not lo <= len(args) <= hi:
        raise NativeError("ERR", f"wrong number of arguments for '{name}'")


def _key(k):
    if type(k) is not bytes:
        if isinstance(k, (bytearray, memoryview)):
            return bytes(k)
        raise NativeError("TYPE", "keys must be msgpack bin (bytes)")
    return k


def _value(v):
    if type(v) is not bytes:
        if isinstance(v, (bytearray, memoryview)):
            return bytes(v)
        raise NativeError("TYPE", "values must be msgpack bin (bytes)")
    return v


def _number(x, what):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise NativeError("TYPE", f"{what} must be a number")
    return x


class NativeConnection(BaseConnection):
    kind = "native"

    def __init__(self, server, prev=None):
        super().__init__(server, prev)
        cfg = server.config
        self.parser = FrameParser(max_frame=cfg.max_frame,
                                  max_array=max(2 * cfg.max_multibulk, 16),
                                  max_map=max(cfg.max_multibulk, 16))
        self.packer = _packer()
        self.authed = not cfg.requirepass
        self.store = server.store

    def data_received(self, data):
        self.active = True
        p = self.parser
        p.feed(data)
        out = []
        pack = self.packer.pack
        n = 0
        self.server.batch_out = out
        try:
            if p.magic_pending:
                if not p.read_magic():
                    return
                out.append(pack_frame(self.packer, [0, 0, self.server.hello_info()]))
            while True:
                req = p.gets()
                if req is NEED_MORE:
                    break
                n += 1
                body = pack(self.handle(req))
                out.append(len(body).to_bytes(4, "big") + body)
        except FrameError as e:
            event("info", "protocol_error", id=self.id, addr=self.addr, error=str(e))
            out.append(pack_frame(self.packer, [0, 1, ["PROTO", str(e), {}]]))
            self.server.stats_commands += n
            self.transport.write(b"".join(out))
            self.close_after_write()
            return
        except OutputLimitExceeded:
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
        fn = OPS.get(name)
        if fn is None:
            return [rid, 1, ["UNKNOWN", f"unknown op {name[:64]!r}", {}]]
        try:
            return [rid, 0, fn(self, args)]
        except NativeError as e:
            return [rid, 1, [e.code, e.msg, e.extra]]
        except UnrecoverableKeyError as e:
            return [rid, 1, ["UNRECOVERABLE", str(e), {"version": e.version}]]
        except KeyLostError as e:
            return [rid, 1, ["LOST", str(e), {"version": e.version}]]
        except StoreFullError as e:
            return [rid, 1, ["FULL", str(e) or "the store is full", {}]]
        except (KeyTooLargeError, ValueTooLargeError) as e:
            return [rid, 1, ["TOOLARGE", str(e), {}]]
        except ClosedError as e:
            return [rid, 1, ["BUSY", str(e) or "the server is shutting down", {}]]
        except ResponseError as e:     # READONLY, NOREPLICAS (replication)
            return [rid, 1, [getattr(e, "code", "ERR"), str(e), {}]]
        except FaultInjectionError as e:
            return [rid, 1, ["ERR", f"fault injection failed: {e}", {}]]
        except OutputLimitExceeded:
            raise
        except TypeError as e:
            return [rid, 1, ["TYPE", str(e), {}]]
        except ValueError as e:
            return [rid, 1, ["ERR", str(e), {}]]
        except Exception as e:  # noqa: BLE001 - never take the server down
            event("error", "op_failed", id=self.id, op=name[:64], error=f"{type(e).__name__}: {e}")
            return [rid, 1, ["ERR", f"internal error: {type(e).__name__}", {}]]


def _is_id(x):
    return type(x) is int and x >= 0


_BIG = 1 << 16


@op("ping")
def op_ping(conn, args):
    _nargs(args, 0, 1, "ping")
    return args[0] if args else "PONG"


@op("auth")
def op_auth(conn, args):
    _nargs(args, 1, 1, "auth")
    want = conn.server.config.requirepass
    if not want:
        raise NativeError("ERR", "no password is configured on this server")
    pw = args[0]
    if isinstance(pw, str):
        pw = pw.encode()
    if not isinstance(pw, bytes) or not hmac.compare_digest(pw, want.encode()):
        event("warning", "auth_failed", id=conn.id, addr=conn.addr)
        raise NativeError("NOAUTH", "invalid password")
    conn.authed = True
    return True


@op("get")
def op_get(conn, args):
    _nargs(args, 1, 1, "get")
    v = conn.store.get(_key(args[0]))
    if v is not None and len(v) >= _BIG:
        conn.count_big(len(v))
    return v


@op("getv")
def op_getv(conn, args):
    _nargs(args, 1, 1, "getv")
    r = conn.store.get_versioned(_key(args[0]))
    if r is None:
        return None
    if len(r[1]) >= _BIG:
        conn.count_big(len(r[1]))
    return [r[0], r[1]]


@op("put")
def op_put(conn, args):
    _nargs(args, 2, 3, "put")
    key = _key(args[0])
    value = _value(args[1])
    ttl = args[2] if len(args) == 3 else None
    if ttl is None:
        return conn.store.put(key, value)
    ttl = _number(ttl, "ttl")
    if ttl <= 0:
        raise NativeError("ERR", "ttl must be > 0 seconds")
    return conn.store.put(key, value, ttl=ttl)


@op("delete")
def op_delete(conn, args):
    _nargs(args, 1, 1, "delete")
    return bool(conn.store.delete(_key(args[0])))


@op("exists")
def op_exists(conn, args):
    _nargs(args, 1, 1, "exists")
    return bool(conn.store.exists(_key(args[0])))


@op("mget")
def op_mget(conn, args):
    _nargs(args, 1, 1, "mget")
    keys = args[0]
    if type(keys) is not list:
        raise NativeError("TYPE", "mget takes [[key, ...]]")
    keys = [_key(k) for k in keys]
    st = conn.store
    vals = st.mget(keys, on_lost="mark")
    lost_marker = getattr(kvstore, "LOST", None)
    lost = []
    total = 0
    for i, v in enumerate(vals):
        if v is None:
            continue
        if lost_marker is not None and v is lost_marker:
            try:
                v = st.get(keys[i])     # read-repair from a peer, as GET and RESP MGET do
            except KeyLostError:
                v = lost_marker
            if v is lost_marker:
                vals[i] = None
                lost.append(i)
                continue
            vals[i] = v
            if v is not None:
                total += len(v)
        else:
            total += len(v)
    if total >= _BIG:
        conn.count_big(total)
    return [vals, lost]


@op("mput")
def op_mput(conn, args):
    _nargs(args, 1, 1, "mput")
    flat = args[0]
    if type(flat) is not list or len(flat) % 2:
        raise NativeError("TYPE", "mput takes [[key, value, key, value, ...]]")
    pairs = [(_key(flat[i]), _value(flat[i + 1])) for i in range(0, len(flat), 2)]
    return list(conn.store.mput(pairs))


@op("expire")
def op_expire(conn, args):
    _nargs(args, 2, 2, "expire")
    key = _key(args[0])
    secs = _number(args[1], "seconds")
    st = conn.store
    if secs <= 0:
        return bool(st.delete(key))
    return bool(st.expire(key, secs))


@op("ttl")
def op_ttl(conn, args):
    _nargs(args, 1, 1, "ttl")
    t = conn.store.ttl(_key(args[0]))
    return t if t >= 0 else int(t)


@op("persist")
def op_persist(conn, args):
    _nargs(args, 1, 1, "persist")
    return bool(conn.store.persist(_key(args[0])))


@op("keys")
def op_keys(conn, args):
    _nargs(args, 0, 0, "keys")
    return list(conn.store.keys())


@op("dbsize")
def op_dbsize(conn, args):
    _nargs(args, 0, 0, "dbsize")
    return len(conn.store)


@op("stats")
def op_stats(conn, args):
    _nargs(args, 0, 0, "stats")
    return conn.server.stats_map()


@op("lost")
def op_lost(conn, args):
    _nargs(args, 0, 0, "lost")
    return [[k, v, s] for (k, v, s) in conn.store.lost_keys()]


@op("inject")
def op_inject(conn, args):
    _nargs(args, 3, 3, "inject")
    if not conn.server.config.enable_fault_injection:
        raise NativeError("DISABLED", "fault injection is disabled; start kvstore-server "
                          "with --enable-fault-injection")
    kind, where, what = args
    if kind not in ("ao", "ar", "hwpoison"):
        raise NativeError("TYPE", "kind must be 'ao', 'ar' or 'hwpoison'")
    if where == "offset":
        if type(what) is not int or what < 0:
            raise NativeError("TYPE", "offset must be a non-negative int")
        return conn.server.inject(kind, offset=what)
    if where == "key":
        return conn.server.inject(kind, key=_key(what))
    raise NativeError("TYPE", "inject takes [kind, 'offset', n] or [kind, 'key', key]")


@op("flushall")
def op_flushall(conn, args):
    _nargs(args, 0, 0, "flushall")
    if not conn.server.config.allow_flushall:
        raise NativeError("DISABLED", "flushall is disabled by the server configuration")
    conn.store.flush()
    event("warning", "flushall", id=conn.id, addr=conn.addr)
    return True


@op("fetch")
def op_fetch(conn, args):
    _nargs(args, 1, 1, "fetch")
    items = args[0]
    if type(items) is not list:
        raise NativeError("TYPE", "fetch takes [[[key, min_version], ...]]")
    pairs = []
    for it in items:
        if type(it) is not list or len(it) != 2 or type(it[1]) is not int:
            raise NativeError("TYPE", "fetch items are [key, min_version]")
        pairs.append((_key(it[0]), it[1]))
    got = conn.store.fetch(pairs)
    total = 0
    out = {}
    for k, (ver, val) in got.items():
        total += len(val)
        out[k] = [ver, val]
    if total >= _BIG:
        conn.count_big(total)
    return out
