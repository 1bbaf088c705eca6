"""Cluster clients: ClusterClient and AsyncClusterClient (native protocol).

Both are built from the same :class:`~kvstore.client._commands.CommandsMixin`
as :class:`~kvstore.client.Client`, so every command method is the same. What
they add is routing:

* **Slot cache.** The slot map comes from the ``cluster slots`` op (with
  ``cluster info`` for its epoch) of any node that answers: first the nodes
  already known, then the startup nodes. A map whose epoch is below one
  already seen is ignored. It is loaded on first use and reloaded after
  ``MOVED``, ``CLUSTERDOWN`` and connection failures.
* **One connection pool per node** (the single-node pools, thread-safe for
  ClusterClient, per event loop for AsyncClusterClient).
* **MOVED**: the slot's new owner goes into the cache at once, a full reload
  follows, the command is resent (it was not applied). **ASK** (the slot is
  migrating and the key is no longer on its source): the command is sent to
  the node named, preceded on the same connection by the ``asking`` op
  (which lets that one command use the slot the node is importing); the
  cache is left alone. Each part of a split batch follows its own ASK.
  **TRYAGAIN** (a multi-key op whose keys are split between the two sides of
  a migration; not applied) is asked again after a pause, within the
  retry time bound. :attr:`ClusterClient.redirects` counts what was
  followed.
* **Failover.** ``CLUSTERDOWN`` (the slot has no live primary, or the node is
  fenced: the write was not made), a connection that could not be opened,
  and a connection broken after sending an idempotent read are retried after
  reloading the map, with exponential backoff, for at most
  ``cluster_retry_timeout`` seconds in all (default 10 s; a failover after
  ``kill -9`` takes about the lease TTL, 3 s by default). A write whose
  connection broke after it was sent, or that was answered ``CLUSTERDOWN
  ... may or may not be applied`` (a reply held for ``--min-replica-acks``
  and released after fencing), is *never* resent: the first raises
  :class:`kvstore.errors.ConnectionError`, the second ResponseError with
  ``.code == "CLUSTERDOWN"``. This is the single-node client's retry rule
  (:mod:`kvstore.client._config`) with a time bound instead of a count.
  Timeouts are retried only with ``retry_on_timeout=True`` and under the
  same rule. A read of a key being rebuilt (LOST) is retried ``retries``
  times as by Client.
* **Split by slot.** ``mget``, ``mput`` and ``fetch`` are split into one
  request per hash slot (the server refuses a request across slots with
  CROSSSLOT); the requests to one node go pipelined on one connection, the
  nodes are asked in turn (ClusterClient) or concurrently
  (AsyncClusterClient), and the results are put back in the caller's order.
  ``mput`` is all-or-nothing **per slot** only: when one slot's part fails
  (FULL on that shard, a write lost with a connection) the other slots' parts
  may have been applied; the exception is the first part's failure. Use
  ``{hash tags}`` to keep keys that must be written together in one slot.
* **Pipelines** are split the same way: each command goes to its slot's
  node, results come back in order, a failed command has its exception in
  place. A pipeline is not atomic and, across a retry, a resent command may
  land after a later command of the same pipeline to the same slot.
* **Keyless commands**: ``keys``, ``dbsize``, ``flushall`` and ``lost`` go to
  every primary (keys and lost lists concatenated, dbsize summed, flushall
  True when every primary flushed); ``stats`` returns ``{"host:port":
  stats}`` of every primary; ``ping`` asks one node. ``scan`` (one cursor
  step) is not supported on a cluster: :meth:`ClusterClient.scan_iter` walks
  every primary in turn. ``inject`` needs ``key=`` (the key's primary is
  hit); an arena offset names no node.

Startup nodes: ``ClusterClient([("127.0.0.1", 7000), ("127.0.0.1", 7001)])``
or ``ClusterClient.from_url("kv://[:password@]h1:p1,h2:p2[?opt=v]")``.
"""

import asyncio
import random
import threading
import time
from urllib.parse import urlsplit

from kvstore import errors
from kvstore.slots import SLOTS, key_slot

from . import _protocol
from ._async import AsyncConnection, AsyncConnectionPool, AsyncPipeline
from ._commands import Command, CommandsMixin, as_bytes, decode_reply
from ._config import DEFAULT_PORT, client_retry_policy, parse_url
from ._sync import Connection, ConnectionPool, Pipeline

__all__ = ["ClusterClient", "AsyncClusterClient", "ClusterPipeline", "AsyncClusterPipeline",
           "parse_cluster_url"]

#: Ops sent to every primary, and how their results are combined.
_FANOUT = {
    "keys": lambda rs: [k for r in rs for k in r],
    "dbsize": sum,
    "flushall": all,
    "lost": lambda rs: [x for r in rs for x in r],
}

_REROUTE = ("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN")
#: Sent right before a command that follows ASK, on the same connection.
_ASKING = Command("asking", [], None, True)
_MAYBE_APPLIED = "may or may not be applied"


def parse_cluster_url(url):
    """Client keyword arguments from ``kv://[:password@]host:port[,host:port...][?opt=v]``:
    ``startup_nodes`` is the list of ``(host, port)``."""
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, not {type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme != "kv":
        raise ValueError(f"not a kvstore URL (expected kv://host:port,host:port): {url!r}")
    auth, _, hosts = parts.netloc.rpartition("@")
    nodes = []
    for hp in hosts.split(","):
        one = parse_url(f"kv://{auth + '@' if auth else ''}{hp}")
        nodes.append((one["host"], one["port"]))
    first = hosts.split(",")[0]
    rest = url.replace(parts.netloc, (auth + "@" if auth else "") + first, 1)
    kwargs = parse_url(rest)
    kwargs.pop("host")
    kwargs.pop("port")
    kwargs["startup_nodes"] = nodes
    return kwargs


def _check_nodes(startup_nodes):
    if isinstance(startup_nodes, (str, bytes)):
        raise TypeError("startup_nodes is a list of (host, port) pairs; for a URL use from_url()")
    nodes = []
    for n in startup_nodes:
        try:
            host, port = n
        except (TypeError, ValueError):
            raise TypeError(f"startup node {n!r} is not a (host, port) pair") from None
        if not isinstance(host, str) or isinstance(port, bool) or not isinstance(port, int) \
                or not 0 < port < 65536:
            raise ValueError(f"startup node {n!r} is not a (host str, port int) pair")
        nodes.append((host, port))
    if not nodes:
        raise ValueError("a cluster client needs at least one startup node")
    return nodes


class _Part:
    """One request of a batch: a single-slot (or single-node) command and
    where it goes: ``slot`` (an int), or ``node`` (an address), or neither
    (any node)."""

    __slots__ = ("command", "slot", "node")

    def __init__(self, command, slot=None, node=None):
        self.command = command
        self.slot = slot
        self.node = node


class _Split:
    """A user command as parts plus how to merge their replies back into one
    ``(status, result)``."""

    __slots__ = ("command", "parts", "merge", "needs_map")

    def __init__(self, command, parts, merge, needs_map=False):
        self.command = command
        self.parts = parts
        self.merge = merge
        self.needs_map = needs_map      # split over the primaries: redo once the map is loaded


def _first_error(replies):
    for r in replies:
        if isinstance(r, BaseException) or r[0] != 0:
            return r
    return None


def _scatter(groups, parts, n):
    """One list of ``n`` from per-group lists (``groups``: original indexes)."""
    out = [None] * n
    for idxs, vals in zip(groups, parts):
        for j, v in zip(idxs, vals):
            out[j] = v
    return out


def _merge_mget(groups, n):
    def merge(replies):
        err = _first_error(replies)
        if err is not None:
            return err
        values = _scatter(groups, (r[1][0] for r in replies), n)
        lost = sorted(idxs[x] for idxs, (_, (_, lst)) in zip(groups, replies) for x in lst)
        return 0, [values, lost]
    return merge


def _merge_mput(groups, n):
    def merge(replies):
        err = _first_error(replies)
        if err is not None:
            return err
        return 0, _scatter(groups, (r[1] for r in replies), n)
    return merge


def _merge_fetch(replies):
    err = _first_error(replies)
    if err is not None:
        return err
    out = {}
    for _, part in replies:
        out.update(part)
    return 0, out


def _single(replies):
    return replies[0]


def _by_slot(keys):
    groups = {}
    for j, k in enumerate(keys):
        groups.setdefault(key_slot(k), []).append(j)
    return groups


def check_cluster_command(command):
    """Refuse, at call time, the commands a cluster cannot route."""
    if command.op == "scan":
        raise NotImplementedError("a cluster has no single scan cursor: use scan_iter(), which "
                                  "walks every primary")
    if command.op == "inject" and command.key is None:
        raise ValueError("inject on a cluster needs key= (an arena offset names no node)")


class _Router:
    """The slot cache and the splitting of commands (no I/O here)."""

    def __init__(self, startup_nodes):
        self.startup = list(startup_nodes)
        self.table = [None] * SLOTS        # slot -> (host, port) of its primary
        self.primaries = []                 # [(host, port)] in slot order
        self.replicas = {}                  # primary addr -> [replica addrs]
        self.epoch = -1
        self.loaded = False
        self.stale = True                   # reload before the next round
        self.lock = threading.Lock()
        self.redirects = {"moved": 0, "ask": 0, "tryagain": 0}

    def candidates(self):
        """Nodes to ask for the map: the known ones in random order, then the startup nodes."""
        known = list(self.primaries) + [a for rs in self.replicas.values() for a in rs]
        random.shuffle(known)
        out = []
        for a in known + self.startup:
            if a not in out:
                out.append(a)
        return out

    def install(self, slots_result, info):
        """Take a ``cluster slots`` answer (and ``cluster info``); False if older than ours."""
        epoch = info.get("cluster_current_epoch", 0) if isinstance(info, dict) else 0
        if not isinstance(slots_result, list):
            raise errors.ProtocolError(f"unexpected cluster slots answer: {slots_result!r:.200}")
        if epoch < self.epoch:
            return False
        table = [None] * SLOTS
        prims = []
        reps = {}
        for row in slots_result:
            lo, hi, prim = row[0], row[1], row[2]
            addr = (str(prim[0]), int(prim[1]))
            for s in range(lo, hi + 1):
                table[s] = addr
            if addr not in prims:
                prims.append(addr)
            reps.setdefault(addr, [])
            for r in row[3:]:
                ra = (str(r[0]), int(r[1]))
                if ra not in reps[addr]:
                    reps[addr].append(ra)
        with self.lock:
            self.table = table
            self.primaries = prims
            self.replicas = reps
            self.epoch = epoch
            self.loaded = True
            self.stale = False
        return True

    def moved(self, slot, addr):
        self.table[slot] = addr
        self.stale = True

    def node_of(self, part):
        if part.node is not None:
            return part.node
        if part.slot is not None:
            return self.table[part.slot]
        if self.primaries:
            return random.choice(self.primaries)
        return self.startup[0]

    def split(self, command):
        """The parts of ``command`` and how to merge them (see the module docstring)."""
        op = command.op
        if command.key is not None:
            return _Split(command, [_Part(command, key_slot(command.key))], _single)
        if op == "mget":
            keys = command.args[0]
            groups = list(_by_slot(keys).items())
            if len(groups) <= 1:
                slot = groups[0][0] if groups else None
                return _Split(command, [_Part(command, slot)], _single)
            parts = [_Part(Command("mget", [[keys[j] for j in idxs]], None, True), slot)
                     for slot, idxs in groups]
            return _Split(command, parts, _merge_mget([idxs for _, idxs in groups], len(keys)))
        if op == "mput":
            flat = command.args[0]
            keys = flat[::2]
            groups = list(_by_slot(keys).items())
            if len(groups) <= 1:
                slot = groups[0][0] if groups else None
                return _Split(command, [_Part(command, slot)], _single)
            parts = []
            for slot, idxs in groups:
                sub = []
                for j in idxs:
                    sub.append(flat[2 * j])
                    sub.append(flat[2 * j + 1])
                parts.append(_Part(Command("mput", [sub], None, False), slot))
            return _Split(command, parts, _merge_mput([idxs for _, idxs in groups], len(keys)))
        if op == "fetch":
            pairs = command.args[0]
            groups = _by_slot([p[0] for p in pairs])
            parts = [_Part(Command("fetch", [[pairs[j] for j in idxs]], None, True), slot)
                     for slot, idxs in groups.items()]
            if not parts:
                parts = [_Part(command)]
            return _Split(command, parts, _merge_fetch)
        if op in _FANOUT or op == "stats":
            # one part per primary, addressed by one of its slots, so that a
            # retry after a failover reaches the shard's new primary
            first = {}
            for s, a in enumerate(self.table):
                if a is not None and a not in first:
                    first[a] = s
            nodes = list(first) or [self.startup[0]]
            parts = [_Part(Command(op, command.args, None, command.idempotent), first.get(a),
                           None if a in first else a) for a in nodes]
            if op == "stats":
                def merge(replies, nodes=nodes):
                    err = _first_error(replies)
                    if err is not None:
                        return err
                    return 0, {f"{h}:{p}": r[1] for (h, p), r in zip(nodes, replies)}
            else:
                combine = _FANOUT[op]

                def merge(replies, combine=combine):
                    err = _first_error(replies)
                    if err is not None:
                        return err
                    return 0, combine([r[1] for r in replies])
            return _Split(command, parts, merge, not self.loaded)
        check_cluster_command(command)
        return _Split(command, [_Part(command)], _single)


class _Round:
    """The state of one batch across its rounds: pending part indices, ASK
    targets, results, and what the next round needs (reload, backoff)."""

    def __init__(self, router, parts, policy, deadline):
        self.router = router
        self.parts = parts
        self.policy = policy
        self.deadline = deadline
        self.results = [None] * len(parts)
        self.pending = list(range(len(parts)))
        self.asking = {}            # part index -> the node an ASK named
        self.asked = set()          # parts sent with ``asking`` this round
        self.last = {}              # part index -> the error that made it retry
        self.backoff = False
        self.attempt = 0
        self.map_error = None       # why the slot map could not be loaded, if it could not

    def plan(self):
        """``{addr: [part index]}`` for this round; parts with no known node wait."""
        by_node = {}
        waiting = []
        self.asked = set()
        for i in self.pending:
            addr = self.asking.pop(i, None)
            if addr is not None:
                self.asked.add(i)
            else:
                addr = self.router.node_of(self.parts[i])
            if addr is None:
                waiting.append(i)
                exc = self.map_error
                if exc is None:
                    exc = errors.ResponseError("CLUSTERDOWN no node serves this slot in the "
                                               "client's slot map")
                    exc.code, exc.extra = "CLUSTERDOWN", {}
                self.last[i] = exc
                self.router.stale = True
                self.backoff = True
            else:
                by_node.setdefault(addr, []).append(i)
        self.pending = waiting
        return by_node

    def commands(self, idxs):
        """What goes on one node's connection for these parts: each part's
        command, preceded by ``asking`` when it follows an ASK (the server
        lets only the next command of the connection use the slot)."""
        out = []
        for i in idxs:
            if i in self.asked:
                out.append(_ASKING)
            out.append(self.parts[i].command)
        return out

    def replies(self, idxs, replies):
        """The parts' replies from what :meth:`commands` sent (the
        ``asking`` replies dropped; a failed ``asking`` leaves its command
        to be answered by the node as without it)."""
        if not self.asked:
            return replies
        out = []
        pos = 0
        for i in idxs:
            if i in self.asked:
                pos += 1
            out.append(replies[pos])
            pos += 1
        return out

    def failed(self, idxs, exc, sent):
        """The node's connection failed (``sent``: maybe after the requests went out)."""
        self.router.stale = True
        self.backoff = True
        for i in idxs:
            if self.policy.may_resend(exc, self.parts[i].command.idempotent, sent):
                self.pending.append(i)
                self.last[i] = exc
            else:
                self.results[i] = exc

    def answered(self, idxs, replies):
        for i, (status, result) in zip(idxs, replies):
            code = result[0] if status and type(result) is list and result else None
            if code not in _REROUTE:
                self.results[i] = (status, result)
                continue
            extra = result[2] if len(result) > 2 and isinstance(result[2], dict) else {}
            if code in ("MOVED", "ASK"):
                try:
                    addr = (str(extra["host"]), int(extra["port"]))
                    slot = int(extra["slot"])
                except (KeyError, TypeError, ValueError):
                    self.results[i] = (status, result)
                    continue
                if code == "MOVED":
                    self.router.moved(slot, addr)
                    self.router.redirects["moved"] += 1
                else:
                    self.asking[i] = addr
                    self.router.redirects["ask"] += 1
                self.pending.append(i)
                self.last[i] = (status, result)
                continue
            if code == "TRYAGAIN":
                # a multi-key op whose keys are split between the two sides of
                # a migration: not applied; asked again after a pause
                self.router.redirects["tryagain"] += 1
                self.backoff = True
                self.pending.append(i)
                self.last[i] = (status, result)
                continue
            # CLUSTERDOWN: not applied, unless the reply says it may be
            message = result[1] if len(result) > 1 else ""
            if _MAYBE_APPLIED in str(message) and not self.parts[i].command.idempotent:
                self.results[i] = (status, result)
                continue
            self.router.stale = True
            self.backoff = True
            self.pending.append(i)
            self.last[i] = (status, result)

    def next_round(self):
        """None when done; else the seconds to sleep before the next round.
        Past the deadline the pending parts get their last error."""
        if not self.pending:
            return None
        self.pending.sort()
        now = time.monotonic()
        if now >= self.deadline:
            for i in self.pending:
                self.results[i] = self.last.get(i) or errors.TimeoutError(
                    "the cluster did not answer in time")
            self.pending = []
            return None
        delay = 0.0
        if self.backoff or self.attempt >= 3:
            delay = min(self.policy.delay(self.attempt), max(0.0, self.deadline - now))
        self.attempt += 1
        self.backoff = False
        return delay


def _reply_of(r, command):
    """Decode one merged reply (an exception stands for itself)."""
    if isinstance(r, BaseException):
        raise r
    return decode_reply(r[0], r[1], command)


class _ClusterBase(CommandsMixin):
    """What both cluster clients share (arguments, the router)."""

    def __init__(self, startup_nodes=(("127.0.0.1", DEFAULT_PORT),), password=None,
                 socket_timeout=None, socket_connect_timeout=None, retries=3,
                 retry_backoff=0.05, max_connections=64, *, retry_backoff_max=1.0,
                 retry_on_timeout=False, pool_timeout=20.0,
                 max_frame=_protocol.DEFAULT_MAX_FRAME, cluster_retry_timeout=10.0,
                 username=None):
        self._retry = client_retry_policy(socket_timeout, socket_connect_timeout, retries,
                                          retry_backoff, retry_backoff_max, retry_on_timeout)
        if not cluster_retry_timeout > 0:
            raise ValueError(f"cluster_retry_timeout must be > 0 seconds, "
                             f"not {cluster_retry_timeout!r}")
        self.cluster_retry_timeout = float(cluster_retry_timeout)
        self._router = _Router(_check_nodes(startup_nodes))
        self._pool_args = dict(max_connections=max_connections, timeout=pool_timeout,
                               password=password, username=username,
                               socket_timeout=socket_timeout,
                               socket_connect_timeout=socket_connect_timeout, max_frame=max_frame)
        # the map is asked with a short connect timeout, so a dead node costs little
        self._probe_timeout = min(x for x in (socket_connect_timeout, socket_timeout, 1.0)
                                  if x is not None)
        self._pools = {}
        self._pools_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_url(cls, url, **kwargs):
        """``from_url("kv://[:password@]h1:p1,h2:p2[?socket_timeout=2]")``; keyword
        arguments override what the URL says."""
        return cls(**{**parse_cluster_url(url), **kwargs})

    @property
    def redirects(self):
        """How many ``MOVED`` and ``ASK`` answers this client followed and
        ``TRYAGAIN`` answers it waited out: ``{"moved": n, "ask": n,
        "tryagain": n}`` (a copy)."""
        return dict(self._router.redirects)

    @property
    def slot_map_epoch(self):
        """Epoch of the slot map in the cache (-1 before the first load)."""
        return self._router.epoch

    def node_for_key(self, key):
        """``(host, port)`` of the primary the cache names for ``key`` (None if unknown)."""
        return self._router.table[key_slot(as_bytes(key))]

    def primaries(self):
        """Addresses of the primaries in the cache, in slot order."""
        return list(self._router.primaries)

    def _pool(self, addr):
        pool = self._pools.get(addr)
        if pool is None:
            with self._pools_lock:
                if self._closed:
                    raise errors.ClosedError("the client is closed")
                pool = self._pools.get(addr)
                if pool is None:
                    a = self._pool_args
                    pool = self._pool_class(a["max_connections"], a["timeout"], host=addr[0],
                                            port=addr[1], password=a["password"],
                                            username=a["username"],
                                            socket_timeout=a["socket_timeout"],
                                            socket_connect_timeout=a["socket_connect_timeout"],
                                            max_frame=a["max_frame"])
                    self._pools[addr] = pool
        return pool

    def _probe_args(self, addr):
        a = self._pool_args
        return dict(host=addr[0], port=addr[1], password=a["password"], username=a["username"],
                    socket_timeout=self._probe_timeout,
                    socket_connect_timeout=self._probe_timeout, max_frame=a["max_frame"])

    def __repr__(self):
        return (f"<kvstore {type(self).__name__} {len(self._router.primaries)} primaries, "
                f"epoch {self._router.epoch}>")


_MAP_COMMANDS = (Command("cluster", ["slots"], None, True), Command("cluster", ["info"], None, True))


def _take_map(router, addr, s1, slots, s2, info, errs):
    """Install a node's ``cluster slots``/``cluster info`` answers; True if
    installed, else why not is appended to ``errs``."""
    if s1 or s2 or not slots:
        errs.append(f"{addr[0]}:{addr[1]}: {slots if s1 else info if s2 else 'no slots'}")
        return False
    if router.install(slots, info):
        return True
    errs.append(f"{addr[0]}:{addr[1]}: map of an older epoch")
    return False


def _resplit(router, splits):
    """Redo the splits made before the map was loaded; ``(splits, parts)``."""
    splits = [router.split(s.command) if s.needs_map else s for s in splits]
    return splits, [p for s in splits for p in s.parts]


def _merge_splits(splits, replies):
    """One merged reply per split, from the replies of all their parts in order."""
    out = []
    pos = 0
    for s in splits:
        n = len(s.parts)
        out.append(s.merge(replies[pos:pos + n]))
        pos += n
    return out


def _scan_command(cursor, count, match):
    args = [cursor, int(count)] + ([bytes(match)] if match is not None else [])
    return Command("scan", args, tuple, True)


def _map_error(errs):
    detail = "; ".join(errs[-4:]) or "no node to ask"
    return errors.ConnectionError(f"cannot load the cluster's slot map: {detail}")


class ClusterClient(_ClusterBase):
    """Blocking client for a kvstore cluster (see the module docstring).

    ``ClusterClient(startup_nodes=[(host, port), ...], password=None,
    socket_timeout=None, socket_connect_timeout=None, retries=3,
    retry_backoff=0.05, max_connections=64, cluster_retry_timeout=10.0)``
    (``max_connections`` per node), or ``ClusterClient.from_url("kv://h1:p1,h2:p2")``.
    Same methods, errors and threading contract as
    :class:`~kvstore.client.Client`.
    """

    _pool_class = ConnectionPool

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        """Close every node's connections (idempotent)."""
        with self._pools_lock:
            self._closed = True
            pools, self._pools = list(self._pools.values()), {}
        for p in pools:
            p.close()

    def pipeline(self):
        """A :class:`ClusterPipeline` (use ``with``)."""
        return ClusterPipeline(self)

    # -- the slot map

    def refresh_slots(self):
        """Reload the slot map from the first node that answers; raise
        ConnectionError if none does."""
        router = self._router
        errs = []
        for addr in router.candidates():
            if self._closed:
                raise errors.ClosedError("the client is closed")
            conn = Connection(**self._probe_args(addr))
            try:
                conn.connect()
                (s1, slots), (s2, info) = conn.call_many(_MAP_COMMANDS)
            except errors.Error as exc:
                errs.append(f"{addr[0]}:{addr[1]}: {exc}")
                continue
            finally:
                conn.close()
            if _take_map(router, addr, s1, slots, s2, info, errs):
                return
        raise _map_error(errs)

    def _ensure_map(self, rnd):
        router = self._router
        if not router.stale:
            return
        with self._refresh_lock:            # one reload at a time; the others use its map
            if not router.stale:
                return
            try:
                self.refresh_slots()
            except errors.ConnectionError as exc:
                # keep the old map; the round's own failures decide what happens
                rnd.map_error = exc

    # -- running parts

    def _run_parts(self, parts):
        """``(status, result)`` or an exception for each part, in order."""
        if self._closed:
            raise errors.ClosedError("the client is closed")
        deadline = time.monotonic() + self.cluster_retry_timeout
        rnd = _Round(self._router, parts, self._retry, deadline)
        while True:
            self._ensure_map(rnd)
            for addr, idxs in rnd.plan().items():
                sent = False
                try:
                    pool = self._pool(addr)
                    conn = pool.get_connection()
                    sent = True
                    try:
                        replies = rnd.replies(idxs, conn.call_many(rnd.commands(idxs)))
                    except BaseException:
                        pool.release(conn, broken=True)
                        raise
                    pool.release(conn)
                except (errors.ConnectionError, errors.TimeoutError) as exc:
                    rnd.failed(idxs, exc, sent)
                    continue
                rnd.answered(idxs, replies)
            delay = rnd.next_round()
            if delay is None:
                return rnd.results
            if delay:
                time.sleep(delay)

    def _run_splits(self, splits):
        if any(s.needs_map for s in splits) and not self._router.loaded:
            try:
                self.refresh_slots()
            except errors.ConnectionError:
                pass                # the round below reports what fails
        splits, parts = _resplit(self._router, splits)
        return _merge_splits(splits, self._run_parts(parts))

    def _execute_command(self, command):
        split = self._router.split(command)
        attempt = 0
        while True:
            (reply,) = self._run_splits([split])
            try:
                return _reply_of(reply, command)
            except errors.KeyLostError as exc:
                if not self._retry.should_retry(exc, command.idempotent, True, attempt):
                    raise
            time.sleep(self._retry.delay(attempt))
            attempt += 1

    def _execute_pipeline(self, commands):
        return self._run_splits([self._router.split(c) for c in commands])

    def scan_iter(self, match=None, count=100):
        """Every key of every primary (SCAN on each in turn); a key may come twice."""
        if not self._router.loaded:
            self.refresh_slots()
        for addr in list(self._router.primaries):
            cursor = 0
            while True:
                command = _scan_command(cursor, count, match)
                (r,) = self._run_parts([_Part(command, node=addr)])
                cursor, keys = _reply_of(r, command)
                yield from keys
                if cursor == 0:
                    break


class ClusterPipeline(Pipeline):
    """Queue commands; :meth:`execute` sends each to its slot's node (the
    commands for one node on one connection) and returns the results in
    order. Same ``raise_on_error`` contract as
    :class:`~kvstore.client.Pipeline`; not atomic (module docstring). A
    command a cluster cannot route is refused when queued."""

    def _execute_command(self, command):
        check_cluster_command(command)
        return super()._execute_command(command)


class AsyncClusterClient(_ClusterBase):
    """asyncio twin of :class:`ClusterClient`: same arguments and methods
    (coroutines); the nodes of one batch are asked concurrently.
    ``await client.aclose()`` or ``async with``."""

    _pool_class = AsyncConnectionPool

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        await self.aclose()

    async def aclose(self):
        """Close every node's connections (idempotent)."""
        with self._pools_lock:
            self._closed = True
            pools, self._pools = list(self._pools.values()), {}
        for p in pools:
            await p.aclose()

    def pipeline(self):
        """An :class:`AsyncClusterPipeline` (``async with``)."""
        return AsyncClusterPipeline(self)

    async def refresh_slots(self):
        """Reload the slot map from the first node that answers."""
        router = self._router
        errs = []
        for addr in router.candidates():
            if self._closed:
                raise errors.ClosedError("the client is closed")
            conn = AsyncConnection(**self._probe_args(addr))
            try:
                await conn.connect()
                (s1, slots), (s2, info) = await conn.call_many(_MAP_COMMANDS)
            except errors.Error as exc:
                errs.append(f"{addr[0]}:{addr[1]}: {exc}")
                continue
            finally:
                conn.close()
            if _take_map(router, addr, s1, slots, s2, info, errs):
                return
        raise _map_error(errs)

    async def _ensure_map(self, rnd):
        router = self._router
        if not router.stale:
            return
        try:
            await self.refresh_slots()
        except errors.ConnectionError as exc:
            rnd.map_error = exc

    async def _one_node(self, rnd, addr, idxs):
        sent = False
        try:
            pool = self._pool(addr)
            conn = await pool.get_connection()
            sent = True
            try:
                replies = rnd.replies(idxs, await conn.call_many(rnd.commands(idxs)))
            except BaseException:
                pool.release(conn, broken=True)
                raise
            pool.release(conn)
        except (errors.ConnectionError, errors.TimeoutError) as exc:
            rnd.failed(idxs, exc, sent)
            return
        rnd.answered(idxs, replies)

    async def _run_parts(self, parts):
        if self._closed:
            raise errors.ClosedError("the client is closed")
        deadline = time.monotonic() + self.cluster_retry_timeout
        rnd = _Round(self._router, parts, self._retry, deadline)
        while True:
            await self._ensure_map(rnd)
            plan = rnd.plan()
            if len(plan) == 1:
                ((addr, idxs),) = plan.items()
                await self._one_node(rnd, addr, idxs)
            elif plan:
                await asyncio.gather(*(self._one_node(rnd, a, i) for a, i in plan.items()))
            delay = rnd.next_round()
            if delay is None:
                return rnd.results
            if delay:
                await asyncio.sleep(delay)

    async def _run_splits(self, splits):
        if any(s.needs_map for s in splits) and not self._router.loaded:
            try:
                await self.refresh_slots()
            except errors.ConnectionError:
                pass
        splits, parts = _resplit(self._router, splits)
        return _merge_splits(splits, await self._run_parts(parts))

    def _execute_command(self, command):
        # split now, so argument errors (scan, inject by offset) raise at the call
        split = self._router.split(command)
        return self._run_command(split, command)

    async def _run_command(self, split, command):
        attempt = 0
        while True:
            (reply,) = await self._run_splits([split])
            try:
                return _reply_of(reply, command)
            except errors.KeyLostError as exc:
                if not self._retry.should_retry(exc, command.idempotent, True, attempt):
                    raise
            await asyncio.sleep(self._retry.delay(attempt))
            attempt += 1

    async def _execute_pipeline(self, commands):
        return await self._run_splits([self._router.split(c) for c in commands])

    async def scan_iter(self, match=None, count=100):
        """Every key of every primary, as an async iterator; a key may come twice."""
        if not self._router.loaded:
            await self.refresh_slots()
        for addr in list(self._router.primaries):
            cursor = 0
            while True:
                command = _scan_command(cursor, count, match)
                (r,) = await self._run_parts([_Part(command, node=addr)])
                cursor, keys = _reply_of(r, command)
                for k in keys:
                    yield k
                if cursor == 0:
                    break


class AsyncClusterPipeline(AsyncPipeline):
    """asyncio twin of :class:`ClusterPipeline`."""

    def _execute_command(self, command):
        check_cluster_command(command)
        return super()._execute_command(command)
