"""A protocol-level fake kvstore server for the client's unit tests.

It speaks server/PROTOCOL.md over real sockets (one thread per connection)
with a dict for data, and can be told to misbehave per op: hang, close the
connection before replying, reply with an error, reply slowly one byte at a
time, or send raw bytes. Framing, pipelining, timeouts, retries and error
mapping are tested against it; end-to-end behaviour is tested against the
real server in test_client_e2e.py. The ``fake`` fixture (tests/conftest.py)
gives a running one; test_client_fakeserver.py tests the fake itself (so a
broken fake cannot make the client tests pass).
"""

import collections
import itertools
import os
import socket
import struct
import threading
import time

import msgpack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_LEN = struct.Struct(">I")


def frame(obj):
    body = msgpack.packb(obj, use_bin_type=True)
    return _LEN.pack(len(body)) + body


class FakeServer:
    """Fake native-protocol server on 127.0.0.1 (an ephemeral port).

    ``actions[op]`` is a deque of misbehaviours consumed one per request of
    that op: ``"hang"`` (never reply), ``"close"`` (close the connection
    without replying), ``("error", code, msg, extra)``, ``("delay", s)``
    (reply normally after s seconds), ``("slow", s)`` (reply one byte every
    s seconds), ``("raw", bytes)`` (send bytes instead of the reply).
    ``lose(key, times)`` makes the next ``times`` reads of key answer LOST.
    """

    def __init__(self, password=None, hang_handshake=False, injection=False):
        self.password = password
        self.hang_handshake = hang_handshake
        self.injection = injection
        self.data = {}
        self.expiry = {}
        self.lost = {}
        self.actions = collections.defaultdict(collections.deque)
        self.requests = []
        self.accepted = 0
        self.open_connections = 0
        self._versions = itertools.count(1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.host = "127.0.0.1"
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    # -- lifecycle ------------------------------------------------------------

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        """Stop accepting and drop every connection (a killed server)."""
        self._stop.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self):
        return f"kv://127.0.0.1:{self.port}"

    def ops(self):
        return [op for _, op, _ in self.requests]

    def drop_connections(self):
        """Close every open connection but keep listening (idle timeout)."""
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def lose(self, key, times=1, unrecoverable=False):
        version = self.data[key][0]
        self.lost[key] = [version, times, unrecoverable]

    # -- serving --------------------------------------------------------------

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except (socket.timeout, BlockingIOError):
                continue
            except OSError:
                return
            sock.settimeout(None)
            with self._lock:
                self.accepted += 1
                self.open_connections += 1
                self._socks.add(sock)
                conn_id = self.accepted
            threading.Thread(target=self._serve, args=(sock, conn_id), daemon=True).start()

    def _recv_exact(self, sock, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def _serve(self, sock, conn_id):
        try:
            if self._recv_exact(sock, 4) != b"\x00KV1":
                return
            if self.hang_handshake:
                self._stop.wait()
                return
            sock.sendall(frame([0, 0, {"proto": 1, "server": "kvstore-fake", "version": "0"}]))
            authed = self.password is None
            while not self._stop.is_set():
                (size,) = _LEN.unpack(self._recv_exact(sock, 4))
                rid, op, args = msgpack.unpackb(self._recv_exact(sock, size), raw=False,
                                                strict_map_key=False)
                with self._lock:
                    self.requests.append((conn_id, op, args))
                    action = self.actions[op].popleft() if self.actions[op] else None
                if op == "auth":
                    if args == [self.password]:
                        authed = True
                        reply = [rid, 0, True]
                    else:
                        reply = [rid, 1, ["ERR", "invalid password", {}]]
                elif not authed:
                    reply = [rid, 1, ["NOAUTH", "authentication required", {}]]
                elif action == "hang":
                    self._stop.wait()
                    return
                elif action == "close":
                    return
                elif isinstance(action, tuple) and action[0] == "error":
                    reply = [rid, 1, list(action[1:])]
                else:
                    reply = self._dispatch(rid, op, args)
                if isinstance(action, tuple) and action[0] == "raw":
                    sock.sendall(action[1])
                    continue
                data = frame(reply)
                if isinstance(action, tuple) and action[0] == "delay":
                    time.sleep(action[1])
                if isinstance(action, tuple) and action[0] == "slow":
                    for i in range(len(data)):
                        sock.sendall(data[i:i + 1])
                        time.sleep(action[1])
                else:
                    sock.sendall(data)
        except (EOFError, OSError, ValueError):
            pass
        finally:
            with self._lock:
                self.open_connections -= 1
                self._socks.discard(sock)
            try:
                sock.close()
            except OSError:
                pass

    def _live(self, key):
        exp = self.expiry.get(key)
        if exp is not None and exp <= time.monotonic():
            self.data.pop(key, None)
            self.expiry.pop(key, None)
        return key in self.data

    def _lost_state(self, key):
        """None, or the error for a read of a lost key (consuming one)."""
        entry = self.lost.get(key)
        if entry is None:
            return None
        version, times, unrecoverable = entry
        if unrecoverable:
            return ["UNRECOVERABLE", "lost, no replica has it", {"version": version}]
        if times <= 0:
            del self.lost[key]
            return None
        entry[1] -= 1
        return ["LOST", "key lost, being rebuilt", {"version": version}]

    def _dispatch(self, rid, op, args):
        def ok(result):
            return [rid, 0, result]

        def err(code, msg, extra=None):
            return [rid, 1, [code, msg, extra or {}]]

        with self._lock:
            if op == "ping":
                return ok(args[0] if args else "PONG")
            if op in ("get", "getv"):
                key = args[0]
                lost = self._lost_state(key)
                if lost:
                    return [rid, 1, lost]
                if not self._live(key):
                    return ok(None)
                version, value = self.data[key]
                return ok(value if op == "get" else [version, value])
            if op == "put":
                key, value = args[0], args[1]
                if not isinstance(key, bytes) or not isinstance(value, bytes):
                    return err("TYPE", "keys and values are bin")
                if len(value) > 8 << 20:
                    return err("TOOLARGE", "value too large")
                if key == b"full":
                    return err("FULL", "store is full")
                version = next(self._versions)
                self.data[key] = (version, value)
                self.lost.pop(key, None)
                self.expiry.pop(key, None)
                if len(args) > 2:
                    self.expiry[key] = time.monotonic() + args[2]
                return ok(version)
            if op == "delete":
                existed = self._live(args[0]) or args[0] in self.lost
                self.data.pop(args[0], None)
                self.lost.pop(args[0], None)
                return ok(existed)
            if op == "exists":
                return ok(self._live(args[0]) or args[0] in self.lost)
            if op == "mget":
                values, lost = [], []
                for i, key in enumerate(args[0]):
                    if self._lost_state(key):
                        values.append(None)
                        lost.append(i)
                    elif self._live(key):
                        values.append(self.data[key][1])
                    else:
                        values.append(None)
                return ok([values, lost])
            if op == "mput":
                flat = args[0]
                versions = []
                for key, value in zip(flat[::2], flat[1::2]):
                    version = next(self._versions)
                    self.data[key] = (version, value)
                    versions.append(version)
                return ok(versions)
            if op == "expire":
                if not self._live(args[0]):
                    return ok(False)
                self.expiry[args[0]] = time.monotonic() + args[1]
                return ok(True)
            if op == "ttl":
                if not self._live(args[0]):
                    return ok(-2)
                exp = self.expiry.get(args[0])
                return ok(-1 if exp is None else exp - time.monotonic())
            if op == "persist":
                return ok(self.expiry.pop(args[0], None) is not None)
            if op == "keys":
                return ok([k for k in list(self.data) if self._live(k)])
            if op == "dbsize":
                return ok(sum(1 for k in list(self.data) if self._live(k)))
            if op == "stats":
                return ok({"keys": len(self.data), "lost_keys": len(self.lost),
                           "backing": "fake", "nested": {"a": 1}})
            if op == "lost":
                return ok([[k, v, "unrecoverable" if u else "rebuilding"]
                           for k, (v, _, u) in self.lost.items()])
            if op == "inject":
                if not self.injection:
                    return err("DISABLED", "fault injection is disabled")
                kind, how, where = args
                offset = where if how == "offset" else 4096 * 3
                if how == "key" and where in self.data:
                    self.lost[where] = [self.data[where][0], 1 << 30, False]
                return ok({"offset": offset, "subpage": offset // 4096, "kind": kind})
            if op == "flushall":
                self.data.clear()
                self.lost.clear()
                return ok(True)
            if op == "fetch":
                out = {}
                for key, min_version in args[0]:
                    if key in self.data and self.data[key][0] >= min_version:
                        out[key] = list(self.data[key])
                return ok(out)
            return err("UNKNOWN", f"unknown op {op!r}")
