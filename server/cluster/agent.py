"""The node's side of the cluster: lease, registration, slot map, fencing.

A server in cluster mode owns one :class:`NodeAgent`. It runs entirely on the
server's event loop (asyncio tasks; every etcd call is a non-blocking
coroutine with a deadline), and talks back to the server only through the
small :class:`ClusterNode` interface, so wiring it in is::

    agent = NodeAgent(node, etcd="http://127.0.0.1:2379", cluster="prod",
                      node_id=my_id, host=host, port=port)
    await agent.start()          # waits for etcd, registers, follows the map
    ...
    if agent.can_ack():          # before sending each write acknowledgement
    ...
    await agent.stop()

What it does
    * waits for etcd at start (exponential backoff, a log line per retry,
      :class:`~.etcd.EtcdUnavailableError` after ``start_timeout``), checks
      the cluster exists (:class:`~.topology.ClusterNotFoundError` names the
      clusters that do), grants a lease of ``ttl`` seconds and puts its
      member record with it;
    * renews the lease every ``keepalive_interval`` (default TTL/6) and
      enforces the fencing contract (controller.py): ``can_ack()`` is False
      from ``t_renew + fence_after`` on, and ``node.fence(reason)`` is
      called at that deadline by a loop timer. A lost lease (expired while
      etcd or the process was stalled) is replaced by a new one and the
      member record re-put;
    * watches the cluster prefix (resuming at the next revision after any
      break; re-reading everything when etcd compacted past it) and, on every
      change of the slot map, calls ``node.on_topology(view)`` with a
      :class:`~.topology.NodeView` of a map whose epoch is newer than the
      last one applied (older or equal epochs are ignored: a stale map never
      goes backwards);
    * publishes ``node.report_offset()`` (at most every ``offset_interval``
      and only when something changed), plus its role, shard, epoch and
      fenced state, in its member record: what the controller ranks
      replicas by;
    * runs a :class:`~.controller.Controller` (unless ``controller=False``).

Fencing, precisely
    The agent starts fenced. It calls ``unfence()`` only when the map names
    it primary of its shard, no handover is in progress, its lease deadline
    is in the future, and -- after any lease trouble -- the map was read from
    etcd after the renewal that cleared it. It calls ``fence(reason)`` when
    the deadline passes, when the lease is lost, when a map demotes it or
    starts a handover away from it, and at ``stop()``. The server must also
    check ``can_ack()`` itself just before acknowledging a write: a loop that
    was paused (SIGSTOP, a long GC) may run queued replies before the
    timer's ``fence()`` gets its turn.
"""

import asyncio
import os
import secrets
import time

from .controller import Controller
from .etcd import EtcdClient, EtcdError, LeaseNotFoundError, WatchCompactedError
from .topology import Member, NodeView, Topology, TopologyError

__all__ = ["NodeAgent", "ClusterNode", "DEFAULT_TTL", "new_node_id"]

#: Default lease TTL, seconds: failover starts at most this long after a
#: primary stopped renewing (etcd checks expiry every 0.5 s on top).
DEFAULT_TTL = 3


def new_node_id():
    """A random 40-hex-digit node id, the form Redis Cluster uses."""
    return secrets.token_hex(20)


class ClusterNode:
    """What the agent calls on the server (all on the event loop thread).

    Subclass it, or pass any object with these methods.
    """

    def on_topology(self, view):
        """A newer slot map (``view``: :class:`~.topology.NodeView`).

        ``view.role`` "primary": serve ``view.slots`` (answer MOVED for the
        rest; ASK for ``view.migrating`` keys already moved; accept ASKING for
        ``view.importing``); "replica": replicate from ``view.primary``
        (host, port); "none": not placed yet, refuse keyed commands
        (CLUSTERDOWN).
        """

    def fence(self, reason):
        """Stop acknowledging writes now (they may still be refused or held)."""

    def unfence(self):
        """Acknowledging writes is allowed again (this node is a live primary)."""

    def report_offset(self):
        """``(offset, replid)``: replication offset and the stream it counts in.

        A primary: its own offset and replication id; a replica: the
        primary's offset applied and the primary's replication id.
        """
        return 0, ""


class NodeAgent:
    """One node's membership in a cluster (see the module docstring)."""

    def __init__(self, node, *, etcd, cluster, node_id=None, host="127.0.0.1", port=0,
                 ttl=DEFAULT_TTL, fence_after=None, keepalive_interval=None,
                 reconcile_interval=0.5, offset_interval=0.5, refresh_interval=2.0,
                 start_timeout=None, controller=True, call_timeout=None, pid=None, log=None):
        self.node = node
        self.etcd = etcd if isinstance(etcd, EtcdClient) else EtcdClient(
            etcd, timeout=call_timeout or min(2.0, ttl / 3))
        self.topo = Topology(self.etcd, cluster)
        self.cluster = cluster
        self.node_id = node_id or new_node_id()
        self.host = host
        self.port = port
        self.ttl = int(ttl)
        self.fence_after = float(fence_after) if fence_after is not None else self.ttl * 0.5
        if not 0 < self.fence_after < self.ttl:
            raise ValueError(f"fence_after ({self.fence_after}) must be between 0 and the "
                             f"lease TTL ({self.ttl})")
        self.keepalive_interval = keepalive_interval or self.ttl / 6
        self.reconcile_interval = reconcile_interval
        self.offset_interval = offset_interval
        self.refresh_interval = refresh_interval
        self.start_timeout = start_timeout
        self.pid = os.getpid() if pid is None else pid
        self.log = log if log is not None else (lambda level, name, /, **kw: None)
        self.controller = Controller(self.topo, self.node_id, host, port,
                                     interval=reconcile_interval, log=self.log) if controller else None

        self.lease = 0
        self.view = None             # last NodeView applied
        self.epoch = 0
        self.fenced = True
        self.fence_reason = "not started"
        self._deadline = 0.0         # monotonic: no acknowledgement from here on
        self._renewed_sent = 0.0     # when the last successful renewal was sent
        self._lease_trouble = True   # a fresh map read is needed before unfencing
        self._fence_timer = None
        self._tasks = []
        self._refresh_wanted = asyncio.Event()
        self._published = None
        self._published_at = 0.0
        self._etcd_down_since = None
        self.stopped = False
        self.joined = time.time()
        self.stats = {"renewals": 0, "renewal_failures": 0, "leases_lost": 0, "refreshes": 0,
                      "maps_applied": 0, "maps_ignored": 0, "watch_restarts": 0, "fences": 0}

    # -- the synchronous check the server makes before each acknowledgement

    def can_ack(self):
        """True while this node may acknowledge writes as primary."""
        return (not self.fenced and self.view is not None and self.view.role == "primary"
                and time.monotonic() < self._deadline)

    @property
    def write_deadline(self):
        """Monotonic time after which no write may be acknowledged (until renewed)."""
        return self._deadline

    # -- lifecycle

    async def start(self):
        """Wait for etcd, check the cluster, register, start following. Raises on a bad cluster."""
        def retry(e, delay):
            self.log("warning", "etcd_unreachable", error=str(e), retry_in=round(delay, 2))
        await self.etcd.wait_ready(self.start_timeout, on_retry=retry)
        await self.topo.meta()          # ClusterNotFoundError / ClusterNameError
        await self._new_lease()
        try:
            await self.refresh()
        except BaseException:
            if self._fence_timer is not None:
                self._fence_timer.cancel()
            try:
                await self.etcd.revoke(self.lease, timeout=1.0)     # leave no member behind
            except EtcdError:
                pass
            raise
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._keepalive_loop(), name="cluster-keepalive"),
                       loop.create_task(self._watch_loop(), name="cluster-watch"),
                       loop.create_task(self._refresh_loop(), name="cluster-refresh"),
                       loop.create_task(self._publish_loop(), name="cluster-publish")]
        if self.controller is not None:
            self._tasks.append(loop.create_task(self.controller.run(), name="cluster-controller"))
        self.log("info", "cluster_joined", cluster=self.cluster, node=self.node_id,
                 lease=f"{self.lease:x}", epoch=self.epoch)
        return self

    async def stop(self, revoke=True):
        """Stop every task; fence; revoke the lease (the member record goes at once)."""
        self.stopped = True
        self._fence("node stopping")
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)    # never swallows our own cancel
        self._tasks = []
        if self._fence_timer is not None:
            self._fence_timer.cancel()
        if revoke and self.lease:
            try:
                await self.etcd.revoke(self.lease, timeout=1.0)
            except EtcdError:
                pass

    # -- lease

    async def _new_lease(self):
        sent = time.monotonic()
        lease, ttl = await self.etcd.grant(self.ttl)
        self.lease = lease
        self._lease_trouble = True
        self._renewed(sent)
        if self.controller is not None:
            self.controller.set_lease(lease)
        await self._publish(force=True)

    def _renewed(self, sent):
        self._renewed_sent = sent
        self._deadline = sent + self.fence_after
        loop = asyncio.get_running_loop()
        if self._fence_timer is not None:
            self._fence_timer.cancel()
        self._fence_timer = loop.call_at(loop.time() + (self._deadline - time.monotonic()),
                                         self._deadline_passed)

    def _deadline_passed(self):
        self._fence_timer = None
        if self.stopped:
            return
        left = self._deadline - time.monotonic()
        if left > 0:        # the loop may run a timer a clock tick early
            loop = asyncio.get_running_loop()
            self._fence_timer = loop.call_at(loop.time() + left, self._deadline_passed)
            return
        self._lease_trouble = True
        self._fence(f"lease not renewed for {self.fence_after:g} s")

    async def _keepalive_loop(self):
        while True:
            sent = time.monotonic()
            try:
                await self.etcd.keepalive(self.lease, timeout=self.keepalive_interval * 2)
            except LeaseNotFoundError:
                self.stats["leases_lost"] += 1
                self._lease_trouble = True
                self._fence("lease expired")
                self.log("warning", "lease_lost", lease=f"{self.lease:x}")
                try:
                    await self._new_lease()
                    self._refresh_wanted.set()
                except (EtcdError, TopologyError) as e:
                    self._etcd_trouble(e)
            except EtcdError as e:
                self.stats["renewal_failures"] += 1
                self._etcd_trouble(e)
            else:
                self.stats["renewals"] += 1
                self._renewed(sent)
                if self._etcd_down_since is not None:
                    self.log("warning", "etcd_back", down_for=round(time.monotonic() - self._etcd_down_since, 2))
                    self._etcd_down_since = None
                if self._lease_trouble:
                    self._refresh_wanted.set()
            await asyncio.sleep(max(0.0, self.keepalive_interval - (time.monotonic() - sent)))

    def _etcd_trouble(self, e):
        if self._etcd_down_since is None:
            self._etcd_down_since = time.monotonic()
            self.log("warning", "etcd_unreachable", error=str(e))

    # -- fencing

    def _fence(self, reason):
        self.fence_reason = reason
        if not self.fenced:
            self.fenced = True
            self.stats["fences"] += 1
            self.log("warning", "fenced", reason=reason, epoch=self.epoch)
            self.node.fence(reason)

    def _maybe_unfence(self, fresh_since):
        v = self.view
        if v is None or v.role != "primary" or v.handover:
            return
        if time.monotonic() >= self._deadline:
            return
        if self._lease_trouble:
            if fresh_since < self._renewed_sent:
                return
            self._lease_trouble = False
        if self.fenced:
            self.fenced = False
            self.fence_reason = ""
            self.log("warning", "unfenced", epoch=self.epoch)
            self.node.unfence()

    # -- slot map

    async def refresh(self):
        """Read the cluster from etcd and apply the map if newer."""
        started = time.monotonic()
        st = await self.topo.state()
        self.stats["refreshes"] += 1
        if self.controller is not None:
            self.controller.observe(st)
        if st.meta is None:
            raise TopologyError(f"cluster {self.cluster!r} vanished from etcd")
        if st.map is not None:
            self.apply_map(st.map, fresh_since=started)
        return st

    def apply_map(self, m, fresh_since=None):
        """Apply a slot map unless its epoch is not newer; returns True if applied.

        ``fresh_since``: monotonic time at which the read that produced ``m``
        started (None for a map not read from etcd just now).
        """
        if m.cluster != self.cluster:
            self.stats["maps_ignored"] += 1
            return False
        if m.epoch < self.epoch:
            self.stats["maps_ignored"] += 1
            self.log("warning", "stale_epoch_ignored", epoch=m.epoch, current=self.epoch)
            return False
        if m.epoch > self.epoch or self.view is None:
            view = NodeView.of(m, self.node_id)
            self.epoch = m.epoch
            self.view = view
            self.stats["maps_applied"] += 1
            if view.role != "primary":
                self._fence("not a primary" if view.role == "replica" else "not placed in the map")
            elif view.handover:
                self._fence(f"handing shard {view.shard} over to {view.handover}")
            self.node.on_topology(view)
            self._published_at = 0.0        # publish the new epoch soon
        if fresh_since is not None:
            self._maybe_unfence(fresh_since)
        return True

    async def _refresh_loop(self):
        while True:
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can lose a cancellation
                async with asyncio.timeout(self.refresh_interval):
                    await self._refresh_wanted.wait()
            except TimeoutError:
                pass
            self._refresh_wanted.clear()
            try:
                await self.refresh()
            except (EtcdError, TopologyError) as e:
                self._etcd_trouble(e)
                await asyncio.sleep(min(1.0, self.keepalive_interval))
                self._refresh_wanted.set()

    async def _watch_loop(self):
        rev = 0
        delay = 0.05
        while True:
            try:
                if rev == 0:
                    st = await self.refresh()
                    rev = st.revision + 1
                w = self.etcd.watch(self.topo.prefix.encode(), prefix=True, start_revision=rev)
                try:
                    async for events in w:
                        delay = 0.05
                        self._on_events(events)
                finally:
                    rev = w.next_revision
                    w.close()
            except WatchCompactedError:
                rev = 0
            except (EtcdError, TopologyError) as e:
                self.stats["watch_restarts"] += 1
                self._etcd_trouble(e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _on_events(self, events):
        want_refresh = False
        wake = False
        t = self.topo
        for ev in events:
            k = ev.kv.key
            if k == t.key_map or k == t.key_controller or k == t.key_meta:
                want_refresh = want_refresh or k != t.key_controller
                wake = True
            elif k.startswith(t.key_members):
                if ev.type == "DELETE" or ev.kv.version == 1:
                    wake = True
                elif self.controller is not None and self.view is not None and \
                        any(s.handover for s in self.view.map.shards):
                    wake = True
                if ev.type == "DELETE" and k == t.member_key(self.node_id):
                    want_refresh = True     # our record went: the lease is gone
            elif k.startswith(t.key_requests):
                wake = True
        if want_refresh:
            self._refresh_wanted.set()
        if wake and self.controller is not None:
            self.controller.wake()

    # -- publishing our member record

    def member(self):
        try:
            offset, replid = self.node.report_offset()
        except Exception:  # noqa: BLE001 - a broken callback must not stop the agent
            offset, replid = 0, ""
        v = self.view
        return Member(self.cluster, self.node_id, self.host, self.port,
                      role=v.role if v else "none", shard=v.shard if v else None,
                      offset=int(offset), replid=str(replid or ""), epoch=self.epoch,
                      fenced=self.fenced, pid=self.pid, lease=self.lease, joined=self.joined)

    async def _publish(self, force=False):
        m = self.member()
        key = (m.role, m.shard, m.offset, m.replid, m.epoch, m.fenced, m.lease, m.host, m.port)
        if not force and key == self._published:
            return False
        await self.topo.register(m, self.lease)
        self._published = key
        self._published_at = time.monotonic()
        return True

    async def _publish_loop(self):
        while True:
            await asyncio.sleep(self.offset_interval)
            try:
                await self._publish()
            except LeaseNotFoundError:
                pass        # the keepalive loop replaces the lease
            except EtcdError as e:
                self._etcd_trouble(e)

    async def publish_now(self):
        """Publish the member record at once (e.g. right after fencing for a handover)."""
        return await self._publish()
