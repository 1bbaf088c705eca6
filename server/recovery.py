"""Memory-loss processing off the event loop: the recovery thread.

A memory error makes the Store's ``loss_fd`` readable. Processing the loss
(the engine's part of ``store.recover()``: on the mainline kernel policy the
copy of a whole lost hugepage into a spare one, then the invalidation of
exactly the records on lost subpages) can take 0.2-5 s for a 1 GiB page. It
runs here, on one thread of its own, which the engine knows as its
``recovery_thread``:

* only this thread processes losses, so two recoveries never run at once;
* the engine lets the GIL go for the copy, so the loop runs meanwhile. A
  store call that met the lost memory would wait (GIL released) until this
  thread has processed it, and so would the whole loop; the loop avoids
  them: while losses are unprocessed, :class:`RecoveryGate` holds back
  the client commands that would (writes, reads of keys whose directory
  cell, index page or record is lost -- asked with ``store.touches_lost``,
  which never waits -- and keyless commands that read the keyspace) until
  the recovery is done, in each client's order; everything else -- the keys
  on the other pages, INFO, PING, the cluster agent's lease renewals, the
  replication heartbeat -- goes on. Store maintenance, background
  verification, range retries, background installs of rebuilt keys and a
  replica's stream apply pause meanwhile. Not held back (they may still
  wait, as before): a full-sync snapshot already being sent to a replica,
  and a read-repair's install. Nor can the gate help a command that itself
  takes the machine check (``ar``: latent poison consumed by the loop
  thread, on the mainline policy the start of a whole-page loss): the loss
  is not known before the touch, so that command waits in the engine for
  the copy, and the loop with it;
* under systemd or ``--supervise``, still on this thread and before the
  held commands go on, the new spare memfds and the lost subpages go to the
  fd store (``after``: restart.CrashHandover.sync), so a write to a salvaged
  page is never acknowledged before a crash restart could find its spare;
* everything that touches server state runs on the loop: when the engine
  part is done, ``done(counts, seconds)`` is called there
  (``loop.call_soon_threadsafe``), and the server finishes with
  ``store.recover(processed=counts)`` (keys-lost callbacks, the rebuild
  round with its installs, which feed replication through the Store's
  ``write_observer``), metrics and the log line.

:meth:`RecoveryThread.stop` lets a running recovery finish (a half-copied
page cannot be left behind) and then hands recovery back to whichever
thread calls the store.
"""

import asyncio
import os
import select
import threading
import time

from .logs import event

__all__ = ["RecoveryGate", "RecoveryThread"]

#: Seconds between looks at the store when its loss_fd stays quiet (losses
#: left by a recovery that stopped early are picked up then).
POLL = 0.5


class RecoveryThread:
    """Runs the engine part of the Store's recovery (see the module docstring)."""

    def __init__(self, store, loop, done, after=None):
        self.store = store
        self.loop = loop
        self.done = done
        #: Called here with the counts after each recovery that processed a
        #: loss, before ``busy`` drops (the held commands wait for it).
        self.after = after
        self.fd = store.loss_fd
        #: True while this thread processes losses (read by INFO / tests).
        self.busy = False
        #: Engine recoveries run here.
        self.runs = 0
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kvstore-recovery", daemon=True)

    def start(self):
        self.thread.start()
        # the engine must know its recovery thread before the loop serves a
        # command, or the loop could pick a loss up itself
        self._started.wait(5)

    def _run(self):
        st = self.store
        st.recovery_thread = threading.get_ident()
        self._started.set()
        try:
            while not self._stop.is_set():
                try:
                    r, _, _ = select.select([self.fd, self._wake_r], [], [], POLL)
                except (OSError, ValueError):
                    break
                if self._stop.is_set():
                    break
                if self.fd not in r and not _pending(st):
                    continue
                self._once()
        finally:
            try:
                if not st.closed and st.recovery_thread == threading.get_ident():
                    st.recovery_thread = 0    # back to "whoever calls the store"
            except Exception:  # noqa: BLE001 - closed meanwhile
                pass

    def _once(self):
        st = self.store
        self.busy = True
        t0 = time.perf_counter()
        try:
            counts = st.process_losses()
        except Exception as e:  # noqa: BLE001 - keep the thread alive
            self.busy = False
            event("error", "recovery_failed", error=f"{type(e).__name__}: {e}")
            return
        try:
            if self.after is not None and counts.get("ranges"):
                self.after(counts)
        except Exception as e:  # noqa: BLE001 - the loop's part must still run
            event("error", "recovery_after_failed", error=f"{type(e).__name__}: {e}")
        finally:
            self.busy = False
        elapsed = time.perf_counter() - t0
        self.runs += 1
        if not counts.get("ranges"):
            return              # nothing was pending (a quiet fd or a stale wake-up)
        try:
            self.loop.call_soon_threadsafe(self.done, counts, elapsed)
        except RuntimeError:
            pass                # the loop is closed: shutting down

    def stop(self, timeout=120.0):
        """Stop the thread; a recovery in progress is finished first (up to
        ``timeout`` seconds). Blocks: call it from a worker thread, or where
        blocking is fine. True when the thread has ended."""
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout)
        alive = self.thread.is_alive()
        if not alive:
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
        return not alive


def _pending(store):
    """Losses may be waiting in the engine (the fd may have been read
    already); a false alarm costs one empty engine call."""
    try:
        return bool(store.loss_pending)
    except Exception:  # noqa: BLE001 - closed
        return False


#: Commands that never read or write the keyspace: they run during a recovery.
PASS_RESP = frozenset({
    b"PING", b"ECHO", b"TIME", b"ROLE", b"DBSIZE", b"SELECT", b"INFO", b"CONFIG", b"CLIENT",
    b"AUTH", b"HELLO", b"QUIT", b"COMMAND", b"MULTI", b"DISCARD", b"UNWATCH", b"RESET",
    b"KV.STATS", b"ACL", b"LATENCY", b"WAIT", b"CLUSTER", b"READONLY", b"READWRITE", b"ASKING",
    b"REPLICAOF", b"SLAVEOF"})
PASS_NATIVE = frozenset({"ping", "auth", "hello", "dbsize", "stats", "role", "wait", "cluster",
                         "replicaof"})

#: Native ops that only read, with their keys: they run when no key is on lost memory.
_NATIVE_READ_KEYS = {
    "get": lambda a: a[:1], "getv": lambda a: a[:1], "exists": lambda a: a[:1],
    "ttl": lambda a: a[:1], "mget": lambda a: a[0] if a and type(a[0]) is list else None,
}

#: Seconds between looks at the engine while commands are held.
HOLD_POLL = 0.002


class RecoveryGate:
    """Holds back, while the recovery thread processes a loss, the client
    commands that would touch the lost memory (see the module docstring).

    A connection asks :meth:`active` once per batch and, when it is,
    :meth:`must_wait` before each command; on yes it keeps that command and
    the ones after it, stops reading and calls :meth:`hold`. Held
    connections go on (``conn.resume_held()``) as soon as the engine has no
    unprocessed loss left."""

    def __init__(self, server):
        self.server = server
        self.store = server.store
        self.table = server.table
        self.loop = asyncio.get_running_loop()
        self._held = []
        self._timer = None
        #: Commands held back so far (INFO kvstore).
        self.commands_held = 0

    def active(self):
        rt = self.server.recovery
        if rt is None:
            return False
        try:
            return rt.busy or self.store.losses_unprocessed
        except Exception:  # noqa: BLE001 - a closed store: the commands report it
            return False

    def must_wait(self, conn, args):
        """Would RESP command ``args`` touch unprocessed lost memory?"""
        name = args[0] if args else b""
        if type(name) is not bytes:
            return False
        name = name.upper()
        if name in PASS_RESP:
            # the two CLUSTER subcommands that read the keyspace wait
            return (name == b"CLUSTER" and len(args) > 1 and type(args[1]) is bytes
                    and args[1].upper() in (b"COUNTKEYSINSLOT", b"GETKEYSINSLOT"))
        cmd = self.table.commands.get(name.decode("latin-1"))
        if cmd is None:
            return False                     # unknown: answered with an error
        if "write" in cmd.flags:
            return True                      # may allocate on the lost page
        if cmd.keys[0] <= 0:
            return True                      # keyless: SCAN, KEYS, EXEC, KV.LOST ...
        return self._keys_lost(cmd.key_args(args))

    def must_wait_native(self, conn, req):
        """The same for a native request ``[id, op, args]``."""
        if type(req) is not list or len(req) != 3 or type(req[1]) is not str:
            return False                     # malformed: answered with an error
        op, args = req[1], req[2]
        if op in PASS_NATIVE:
            return False
        f = _NATIVE_READ_KEYS.get(op)
        if f is None or type(args) is not list:
            return op in self.table.native   # writes and keyless ops wait; unknown: error now
        keys = f(args)
        return True if keys is None else self._keys_lost(keys)

    def _keys_lost(self, keys):
        touches = self.store.touches_lost
        for k in keys:
            if isinstance(k, str):
                k = k.encode()
            if not isinstance(k, (bytes, bytearray)):
                continue
            try:
                if touches(k):
                    return True
            except Exception:  # noqa: BLE001 - the command reports it
                continue
        return False

    def hold(self, conn, held):
        """Keep ``held`` (the connection's commands from the one that must
        wait on) and stop reading from ``conn`` until :meth:`poll` resumes it."""
        conn.held = held
        try:
            conn.transport.pause_reading()
        except RuntimeError:
            pass
        self.commands_held += 1
        self._held.append(conn)
        if self._timer is None:
            self._timer = self.loop.call_later(HOLD_POLL, self.poll)

    def poll(self):
        """Resume the held connections once nothing is left to process."""
        self._timer = None
        if not self._held:
            return
        if self.active() and not self.server.stopping:
            self._timer = self.loop.call_later(HOLD_POLL, self.poll)
            return
        held, self._held = self._held, []
        for conn in held:
            if not conn.closed:
                try:
                    conn.resume_held()
                except Exception as e:  # noqa: BLE001 - one client must not stop the others
                    event("error", "resume_failed", id=conn.id, error=f"{type(e).__name__}: {e}")
                    conn.drop("internal error")

    def close(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._held = []
