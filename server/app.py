"""The kvstore server: listeners, client registry, recovery, shutdown.

One event loop (uvloop when installed) runs everything, as Redis does: the
listeners, every client, and the store's loss notifications. The Store is
created with ``recovery="manual"``. The engine part of a recovery (the copy
of a lost hugepage on the mainline policy, the invalidation of the lost
records) runs on the recovery thread (:mod:`.recovery`), so the loop keeps
serving what the loss did not touch; the rest of ``store.recover()`` (lost
keys reported, rebuild round) then runs on the loop, with one structured log
line per recovery. After adoption the records' checksums are verified on
the loop in slices of a few milliseconds (``VERIFY_SLICE``).

Shutdown (SIGTERM/SIGINT or :meth:`Server.request_stop`): close the
listeners, stop reading from clients, let queued replies flush (bounded by
``shutdown_timeout``), then close the store.
"""

import asyncio
import contextlib
import os
import signal
import sys
import time

import kvstore

from .access import Access
from .commands import build_table
from .handshake import Handshake
from .info import info_sections
from .errors import CommandError
from .logs import event
from . import restart
from .replication import Replication
from .writes import WritePath

__all__ = ["Server", "run"]

#: Seconds between calls of store.maintain() on the loop.
MAINTENANCE_INTERVAL = 0.05

#: File descriptors kept back from clients (Redis's CONFIG_MIN_RESERVED_FDS).
RESERVED_FDS = 32

#: Background verification after adoption: bytes per verify_step call, the
#: loop time one pass may take, and the pause between passes (clients are
#: served in between, so none waits more than about one slice).
VERIFY_STEP = 1 << 20
VERIFY_SLICE = 0.002
VERIFY_PAUSE = 0.003


class Server:
    def __init__(self, config, store=None):
        self.config = config
        self.store = store
        self._own_store = store is None
        self.clients = {}
        self._next_id = 0
        self.started = time.time()
        self.run_id = os.urandom(20).hex()    # new in every process (INFO server)
        self.stopping = False
        self.port = None
        self.addresses = []
        self._listeners = []
        self._stop = None
        self._loss_fd = None
        self.recovery = None      # recovery.RecoveryThread, set by start()
        self.crash_handover = None  # restart.CrashHandover under systemd / --supervise
        self.recovery_gate = None  # recovery.RecoveryGate: commands held during a recovery
        self._verify_handle = None
        self._idle_handle = None
        self._maint_handle = None
        self.loop_name = "asyncio"
        self.table = build_table()  # commands.py: every command of both protocols
        self.access = Access(config)   # users (access.py); AclError for a bad --aclfile
        self.access.install(self.table)
        self.metrics = None       # the /metrics endpoint (metrics.py) with --metrics-port
        self.latency = {}         # LATENCY LATEST events: name -> [time, latest_ms, max_ms]
        self.lost_at = {}         # key -> monotonic time of its loss (rebuild histogram)
        self.writes = None        # writes.WritePath, set by start()
        self.repl = None          # replication.Replication, set by start()
        self.reply_gate = None    # set by replication while replies may wait for acks
        self.batch_out = None     # reply list of the client batch being executed
        self.cluster = None       # cluster.node.ClusterMode with --cluster, set by start()
        self.reset_stats()
        self.stats_connections = 0
        self.stats_rejected = 0
        self.stats_protected = 0
        # client drops by reason (INFO stats; Redis's names where it has them)
        self.dropped = {"output_buffer_limit": 0, "query_buffer_limit": 0,
                        "maxmemory_clients": 0}
        self.last_dropped = None  # (id, addr, reason, bytes held) of the latest drop

    # ---------------------------------------------------------------- registry

    def next_client_id(self):
        self._next_id += 1
        return self._next_id

    def register(self, conn):
        self.clients[conn.id] = conn

    def replace(self, old, new):
        if self.clients.get(old.id) is old:
            self.clients[old.id] = new

    def forget(self, conn):
        if self.clients.get(conn.id) is conn:
            del self.clients[conn.id]

    def all_clients(self):
        return list(self.clients.values())

    def clients_memory(self):
        """[(bytes held, conn)] of every client (input buffered + output queued)."""
        return [(c.memory(), c) for c in list(self.clients.values()) if not c.closed]

    def check_client_memory(self):
        """maxmemory-clients (Redis 7's model): while all clients together hold
        more than the cap, drop the client holding the most."""
        cap = self.config.maxmemory_clients
        if not cap:
            return
        mem = self.clients_memory()
        total = sum(m for m, _ in mem)
        if total <= cap:
            return
        for m, conn in sorted(mem, key=lambda mc: mc[0], reverse=True):
            if total <= cap or m == 0:
                break
            if conn.kind == "replica" or getattr(conn, "no_evict", False):
                continue          # replicas and CLIENT NO-EVICT ON clients are never evicted
            conn.drop("maxmemory clients")
            total -= m

    def reset_stats(self):
        self.stats_commands = 0
        self.stats_fast_commands = 0     # of which the C RESP path ran (INFO kvstore_fast_commands)
        self.stats_recoveries = 0

    # ---------------------------------------------------------------- lifecycle

    def _make_store(self, adopt_fd=None):
        c = self.config
        return kvstore.Store(capacity=c.capacity, page_size=c.page_size,
                             kernel_policy=c.kernel_policy, rebuild_source=None,
                             max_key=c.max_key, max_value=c.max_value, recovery="manual",
                             adopt_fd=adopt_fd)

    async def start(self):
        """Create the store (unless given), listen, return [(host, port), ...]."""
        loop = asyncio.get_running_loop()
        self.loop_name = type(loop).__module__.split(".")[0]
        self._stop = asyncio.Event()
        if self.store is None:
            # an arena handed over by the previous process (restart.py) is adopted
            self.store, self._adopted = restart.adopt_store(self._make_store, self._make_store)
            event("info", "store_opened", **_store_fields(self.store))
        if getattr(self.config, "maxmemory_clients_percent", 0):
            self.config.maxmemory_clients = int(
                _capacity_bytes(self) * self.config.maxmemory_clients_percent / 100)
        delay = os.environ.get("KVSTORE_SALVAGE_DELAY_US")
        if delay and self.config.enable_fault_injection and hasattr(self.store, "arena"):
            # test hook: every salvage copy takes this much longer (a window
            # long enough to watch what the server does meanwhile)
            self.store.arena._set_salvage_delay(int(delay))
        self._watch_losses(loop)
        self.writes = WritePath(self.store)
        self.writes.reply_index = self._reply_index
        self.repl = Replication(self)     # subscribes to the write path
        restart.restore(self, getattr(self, "_adopted", False))

        self._apply_fd_limit()
        port = self.config.port
        handed = restart.listeners()      # sockets kept open across a restart
        for host in (self.config.hosts if not handed else handed):
            if handed:
                srv = await loop.create_server(lambda: Handshake(self), sock=host, backlog=1024)
            else:
                srv = await loop.create_server(lambda: Handshake(self), host, port,
                                               reuse_address=True, backlog=1024)
            self._listeners.append(srv)
            for sock in srv.sockets:
                addr = sock.getsockname()
                self.addresses.append((addr[0], addr[1]))
                if port == 0:
                    port = addr[1]        # every address listens on the same port
        self.port = port
        self.repl.start(loop)
        if self.config.cluster:
            from .cluster.node import ClusterMode
            c = self.config
            self.cluster = ClusterMode(self, c.cluster, ttl=c.cluster_ttl,
                                       announce_host=c.announce_host or None,
                                       node_id=c.cluster_node_id or None)
            self.repl.configure_writes()        # fenced until the map says primary
            await self.cluster.start(c.cluster_start_timeout)
        if self.config.idle_timeout > 0:
            self._idle_handle = loop.call_later(self._idle_period(), self._idle_sweep)
        if hasattr(self.store, "maintain"):
            self._maint_handle = loop.call_later(MAINTENANCE_INTERVAL, self._maintain)
        if hasattr(self.store, "verify_step") and not self.store.verified:
            self.store.maintain_verify_bytes = 0        # verified here, in short steps
            self._verify_handle = loop.call_soon(self._verify)
        for host, p in self.addresses:
            shown = f"[{host}]" if ":" in host else host
            print(f"kvstore-server listening on {shown}:{p}", flush=True)
            event("info", "listening", host=host, port=p, loop=self.loop_name, pid=_pid())
        self._warn_exposed()
        self._start_metrics()
        restart.announce(self)
        return self.addresses

    def _apply_fd_limit(self):
        """Redis's adjustOpenFilesLimit: maxclients needs maxclients + 32 fds;
        raise the soft RLIMIT_NOFILE as far as the hard limit allows, and
        lower maxclients to (limit - 32) when that is not enough."""
        import resource
        c = self.config
        want = c.max_clients + RESERVED_FDS
        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        except (OSError, ValueError):
            return
        if soft != resource.RLIM_INFINITY and soft < want:
            target = want if hard == resource.RLIM_INFINITY else min(want, hard)
            if target > soft:
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                    soft = target
                except (OSError, ValueError):
                    pass
        if soft != resource.RLIM_INFINITY and soft < want:
            reduced = max(1, soft - RESERVED_FDS)
            event("warning", "maxclients_reduced", requested=c.max_clients, maxclients=reduced,
                  fd_limit=soft,
                  detail=f"You requested maxclients of {c.max_clients} requiring at least "
                         f"{want} max file descriptors; the open files limit is {soft}, so "
                         f"maxclients has been reduced to {reduced}. If you need higher "
                         f"maxclients increase 'ulimit -n'.")
            c.max_clients = reduced
        event("info", "maxclients", maxclients=c.max_clients,
              fd_limit=-1 if soft == resource.RLIM_INFINITY else soft)

    def _warn_exposed(self):
        """Log when clients beyond loopback can reach a server with no password."""
        from .access import is_loopback
        if not self.access.default_user().nopass:
            return
        wide = [h for h, _ in self.addresses if not is_loopback(h)]
        if not wide:
            return
        if self.config.protected_mode:
            event("warning", "protected_mode", bind=",".join(wide),
                  detail="no password is set for the default user: clients from beyond the "
                         "loopback interface will be refused (set a password with "
                         "--requirepass-file / KVSTORE_REQUIREPASS / --aclfile, or "
                         "--protected-mode no)")
        else:
            event("warning", "no_password_exposed", bind=",".join(wide),
                  detail="protected mode is off and the default user has no password: "
                         "anyone who can reach these addresses may run any command")

    def _start_metrics(self):
        c = self.config
        if c.metrics_port < 0:
            return
        from .metrics import loop_stats_provider, start_metrics_server
        self.metrics = start_metrics_server(
            c.metrics_bind, c.metrics_port,
            loop_stats_provider(asyncio.get_running_loop(), self.stats_map))
        self.writes.subscribe(_RebuildTimer(self))
        event("info", "metrics_listening", host=c.metrics_bind, port=self.metrics.port)
        print(f"kvstore-server metrics on {c.metrics_bind}:{self.metrics.port}", flush=True)

    def _reply_index(self):
        out = self.batch_out
        return len(out) if out is not None else 0

    def request_stop(self):
        if self._stop is not None and not self._stop.is_set():
            event("info", "shutdown_requested")
            self._stop.set()

    async def serve(self):
        """Start, then run until request_stop(); always shuts down cleanly."""
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.shutdown()

    async def shutdown(self):
        if self.stopping:
            return
        self.stopping = True
        if self.cluster is not None:
            try:
                await self.cluster.stop()
            except Exception as e:  # noqa: BLE001 - shut down the rest anyway
                event("error", "cluster_stop_failed", error=f"{type(e).__name__}: {e}")
        if self.repl is not None:
            self.repl.stop()
        for srv in self._listeners:
            srv.close()
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        if self._maint_handle is not None:
            self._maint_handle.cancel()
        if self._verify_handle is not None:
            self._verify_handle.cancel()
        # Replies already produced are in the transports' buffers; close()
        # flushes them before closing. Nothing new is read.
        for conn in list(self.clients.values()):
            if conn.transport is not None and not conn.closed:
                try:
                    conn.transport.pause_reading()
                except RuntimeError:
                    pass
                conn.closed = True
                conn.transport.close()
        deadline = time.monotonic() + self.config.shutdown_timeout
        while self.clients and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.clients.values()):
            if conn.transport is not None:
                conn.transport.abort()
        for srv in self._listeners:
            try:
                await asyncio.wait_for(srv.wait_closed(), 1.0)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                pass
        await self._unwatch_losses()
        if self.writes is not None:
            self.writes.close()
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        if self._own_store and self.store is not None:
            try:
                self.store.close()
            except Exception as e:  # noqa: BLE001
                event("error", "store_close_failed", error=f"{type(e).__name__}: {e}")
        event("info", "stopped", commands=self.stats_commands)

    # ---------------------------------------------------------------- idle clients

    def _idle_period(self):
        return max(0.05, min(1.0, self.config.idle_timeout / 4))

    def _idle_sweep(self):
        period = self._idle_period()
        limit = self.config.idle_timeout
        for conn in list(self.clients.values()):
            if conn.active:
                conn.active = False
                conn.idle_ticks = 0
            else:
                conn.idle_ticks += 1
                if conn.idle_ticks * period >= limit:
                    conn.drop("idle timeout")
        self._idle_handle = asyncio.get_running_loop().call_later(period, self._idle_sweep)

    # ---------------------------------------------------------------- memory errors

    def recovering(self):
        """Is lost memory waiting for the recovery thread now? (The loop
        then touches only what the loss did not reach.)"""
        g = self.recovery_gate
        return g is not None and g.active()

    def _maintain(self):
        """Store housekeeping on the loop (recovery="manual"): expiry sweep,
        scrubbing, rebuild retries; put off while a recovery runs (they
        could touch the lost memory, and the loop would wait for it)."""
        try:
            if not self.recovering():
                self.store.maintain()
        except Exception as e:  # noqa: BLE001 - keep serving
            event("error", "maintenance_failed", error=f"{type(e).__name__}: {e}")
        if self.config.maxmemory_clients:
            self.check_client_memory()        # queued output of clients not reading
        if not self.stopping:
            self._maint_handle = asyncio.get_running_loop().call_later(
                MAINTENANCE_INTERVAL, self._maintain)

    def _verify(self):
        """Background checksum verification after adoption, on the loop in
        slices of ~VERIFY_SLICE s (a read verifies its own record anyway)."""
        self._verify_handle = None
        if self.stopping:
            return
        if self.recovering():
            self._verify_handle = asyncio.get_running_loop().call_later(0.01, self._verify)
            return
        deadline = time.perf_counter() + VERIFY_SLICE
        try:
            while time.perf_counter() < deadline:
                if self.store.verify_step(VERIFY_STEP):
                    return
        except Exception as e:  # noqa: BLE001 - keep serving; reads still verify
            event("error", "verification_failed", error=f"{type(e).__name__}: {e}")
            return
        self._verify_handle = asyncio.get_running_loop().call_later(VERIFY_PAUSE, self._verify)

    def _watch_losses(self, loop):
        fd = getattr(self.store, "loss_fd", None)
        if fd is None or fd < 0:
            event("warning", "no_loss_fd", detail="store has no loss_fd; recovery not watched")
            return
        if hasattr(self.store, "on_loss"):
            self.store.on_loss(self._on_keys_lost)
        self._loss_fd = fd
        if os.environ.get("NOTIFY_SOCKET") and hasattr(self.store, "arena"):
            # a crash restart gets the spares and lost subpages from the fd store
            self.crash_handover = restart.CrashHandover(self.store.arena)
        if hasattr(self.store, "process_losses"):
            from .recovery import RecoveryGate, RecoveryThread
            self.recovery = RecoveryThread(self.store, loop, self._recovered,
                                           after=self._store_crash_handover)
            self.recovery.start()
            self.recovery_gate = RecoveryGate(self)
        else:
            loop.add_reader(fd, self._on_loss_ready)

    async def _unwatch_losses(self):
        """Stop watching; a recovery in progress is let finish first."""
        if self._loss_fd is None:
            return
        if self.recovery_gate is not None:
            self.recovery_gate.close()
        if self.recovery is not None:
            rt = self.recovery
            if rt.busy:
                event("info", "shutdown_waits_for_recovery")
            await asyncio.get_running_loop().run_in_executor(None, rt.stop)
            self.recovery = None
        else:
            try:
                asyncio.get_running_loop().remove_reader(self._loss_fd)
            except Exception:  # noqa: BLE001
                pass
        self._loss_fd = None

    async def recovery_idle(self, timeout=120.0):
        """Wait until no recovery is running on the recovery thread (a
        restart hands the arena over only between recoveries)."""
        deadline = time.monotonic() + timeout
        while (self.recovery is not None and self.recovery.busy
               and time.monotonic() < deadline):
            await asyncio.sleep(0.005)

    def _on_keys_lost(self, keys):
        keys = list(keys)
        if self.metrics is not None:        # rebuild latency: from loss to install
            now = time.monotonic()
            for k in keys:
                k = k[0] if isinstance(k, tuple) else k
                if isinstance(k, (bytes, bytearray)) and len(self.lost_at) < 1_000_000:
                    self.lost_at.setdefault(bytes(k), now)
        sample = [k[0] if isinstance(k, tuple) else k for k in keys[:8]]
        event("warning", "keys_lost", count=len(keys),
              keys=",".join(repr(bytes(k))[2:-1] if isinstance(k, (bytes, bytearray)) else str(k)
                            for k in sample))

    def _on_loss_ready(self):
        """A store without process_losses: the whole recovery on the loop."""
        self._recovered(None, 0.0)
        self._store_crash_handover()

    def _store_crash_handover(self, counts=None):
        """After a recovery, before the commands it held back go on: store
        the new spares and lost subpages with the fd store (restart.py), so a
        worker started after a crash never adopts a salvaged page's stale copy."""
        h = self.crash_handover
        if h is None:
            return
        try:
            h.sync()
        except Exception as e:  # noqa: BLE001 - keep serving; the adopter marks what it misses
            event("error", "fd_store_failed", error=f"{type(e).__name__}: {e}")

    def _recovered(self, processed, engine_s):
        """On the loop, after the recovery thread processed a loss
        (``processed``: its counts, ``engine_s``: its seconds): the lost keys
        reach the callbacks, the rebuild round runs, metrics and the log."""
        if self.store is None or getattr(self.store, "closed", False):
            return                          # queued before a shutdown closed the store
        t0 = time.perf_counter()
        try:
            if processed is None:
                counts = self.store.recover()
            else:
                counts = self.store.recover(processed=processed)
        except Exception as e:  # noqa: BLE001 - keep serving
            event("error", "recovery_failed", error=f"{type(e).__name__}: {e}")
            return
        self.stats_recoveries += 1
        loop_s = time.perf_counter() - t0
        elapsed = engine_s + loop_s
        if self.metrics is not None:
            self.metrics.observe_recovery(elapsed)
        self._latency_event("recovery", elapsed)
        fields = {}
        if isinstance(counts, dict):
            for k, v in counts.items():
                if isinstance(v, (int, float, str, bool)):
                    fields[k] = v
        event("warning", "recovery", duration_ms=round(elapsed * 1e3, 3),
              loop_ms=round(loop_s * 1e3, 3), **fields)
        if self.recovery_gate is not None:
            self.recovery_gate.poll()       # held commands go on now

    def _latency_event(self, name, seconds):
        """Record a latency event for LATENCY LATEST (Redis's form: unix time
        of the latest, latest and all-time max in ms)."""
        ms = int(seconds * 1000)
        now = int(time.time())
        ev = self.latency.get(name)
        if ev is None:
            self.latency[name] = [now, ms, ms]
        else:
            ev[0], ev[1], ev[2] = now, ms, max(ev[2], ms)

    def inject(self, kind, offset=None, key=None, entry=None):
        faults = self.store.faults
        try:
            if entry is not None:
                res = faults.inject_entry(entry, kind=kind)
            elif key is not None:
                res = faults.inject_key(key, kind=kind)
            else:
                res = faults.inject(offset, kind=kind)
        except KeyError:
            raise CommandError("ERR no such key", "NOKEY", "no such key") from None
        res = dict(res) if isinstance(res, dict) else {"result": res}
        fields = {k: v for k, v in res.items() if isinstance(v, (int, str)) and k != "kind"}
        event("warning", "fault_injected", kind=kind, **fields)
        return res

    # ---------------------------------------------------------------- introspection

    def hello_info(self):
        return {"proto": 1, "server": "kvstore", "version": kvstore.__version__,
                "auth": self.access.requires_auth()}

    def stats_map(self):
        try:
            d = dict(self.store.stats())
        except Exception as e:  # noqa: BLE001
            event("error", "stats_failed", error=f"{type(e).__name__}: {e}")
            d = {"error": "the store's stats are unavailable (see the server log)"}
        d.update(server_version=kvstore.__version__, server_uptime_s=round(time.time() - self.started, 3),
                 server_connected_clients=len(self.clients),
                 server_total_connections=self.stats_connections,
                 server_rejected_connections=self.stats_rejected,
                 server_total_commands=self.stats_commands,
                 server_recoveries=self.stats_recoveries,
                 **{"server_" + k: v for k, v in self.recovery_state().items()},
                 server_fault_injection=bool(self.config.enable_fault_injection))
        if self.repl is not None:
            d.update(self.repl.stats_fields())
        return d

    def recovery_state(self):
        """Whether the recovery thread is processing a loss now, and whether
        it is copying a lost hugepage (INFO kvstore, native stats)."""
        rt = self.recovery
        try:
            salvaging = bool(self.store.salvaging)
        except Exception:  # noqa: BLE001 - closed, or a store without it
            salvaging = False
        g = self.recovery_gate
        return {"recovery_in_progress": bool(rt is not None and rt.busy),
                "salvage_in_progress": salvaging,
                "recovery_thread_runs": rt.runs if rt is not None else 0,
                "recovery_commands_held": g.commands_held if g is not None else 0}

    def info_text(self, wanted):
        return info_sections(self, wanted)

    def config_params(self):
        c = self.config
        return {
            "save": "", "appendonly": "no", "databases": "1",
            "maxclients": str(c.max_clients), "maxmemory": str(_capacity_bytes(self)),
            "maxmemory-policy": "noeviction", "port": str(self.port), "bind": c.bind,
            "timeout": str(int(c.idle_timeout)), "proto-max-bulk-len": str(c.max_bulk),
            "client-query-buffer-limit": str(c.max_query_buffer),
            "maxmemory-clients": str(c.maxmemory_clients),
            "protected-mode": "yes" if c.protected_mode else "no",
            "aclfile": c.aclfile, "masteruser": c.masteruser,
            "client-output-buffer-limit": f"normal {c.max_output_buffer} {c.max_output_buffer} 0",
            "kvstore-max-key": str(c.max_key), "kvstore-max-value": str(c.max_value),
            "kvstore-max-frame": str(c.max_frame), "kvstore-max-multibulk": str(c.max_multibulk),
            "kvstore-fault-injection": "yes" if c.enable_fault_injection else "no",
            "kvstore-allow-flushall": "yes" if c.allow_flushall else "no",
            "kvstore-page-size": str(c.page_size), "kvstore-kernel-policy": str(c.kernel_policy),
        }

    def client_line(self, conn):
        age = int(time.time() - conn.created)
        name = conn.name.decode("latin-1")
        p = getattr(conn, "parser", None)
        qbuf = p.buffered() if p is not None else 0
        omem = max(0, conn.memory() - qbuf)
        user = conn.user.name if getattr(conn, "user", None) is not None else ""
        return (f"id={conn.id} addr={conn.addr} name={name} age={age} db=0 "
                f"qbuf={qbuf} omem={omem} tot-mem={qbuf + omem} user={user} "
                f"proto={conn.kind} resp={3 if getattr(conn, 'resp3', False) else 2} "
                f"lib-name={conn.lib_name.decode('latin-1')} "
                f"lib-ver={conn.lib_ver.decode('latin-1')}\n")


class _RebuildTimer:
    """Write-path subscriber feeding the rebuild histogram of /metrics: a
    key's time from its loss (on_loss) to its reinstall (rebuild or
    read-repair)."""

    def __init__(self, server):
        self.server = server

    def on_writes(self, entries, reply_index):
        pass

    def on_install(self, key, value, version, status):
        t = self.server.lost_at.pop(bytes(key), None)
        m = self.server.metrics
        if t is not None and m is not None:
            m.observe_rebuild(time.monotonic() - t)

    def read_repair(self, key, version):
        return contextlib.nullcontext()


def _capacity_bytes(server):
    try:
        return int(server.store.stats().get("capacity", 0))
    except Exception:  # noqa: BLE001
        return 0


def _store_fields(store):
    try:
        s = store.stats()
    except Exception:  # noqa: BLE001
        return {}
    return {k: s[k] for k in ("backing", "page_size", "capacity", "kernel_policy", "keep_ue")
            if k in s}


def _pid():
    import os
    return os.getpid()


def _loop_factory(config):
    if config.use_uvloop:
        try:
            import uvloop
            return uvloop.new_event_loop
        except ImportError:
            pass
    return None


def run(config, store=None):
    """Run a server until SIGTERM/SIGINT. Returns the process exit code."""
    server = Server(config, store)

    async def main():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.request_stop)
        loop.add_signal_handler(signal.SIGUSR2, lambda: restart.request_restart(server, "SIGUSR2"))
        await server.serve()

    try:
        with asyncio.Runner(loop_factory=_loop_factory(config)) as runner:
            runner.run(main())
    except OSError as e:
        event("error", "startup_failed", error=f"{type(e).__name__}: {e}")
        print(f"kvstore-server: {e}", file=sys.stderr)
        return 1
    return 0
