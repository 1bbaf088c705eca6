"""Memory-loss processing off the event loop: the recovery thread.

A memory error makes the Store's ``loss_fd`` readable. Processing the loss
(the engine's part of ``store.recover()``: on the mainline kernel policy the
copy of a whole lost hugepage into a spare one, then the invalidation of
exactly the records on lost subpages) can take 0.2-5 s for a 1 GiB page. It
runs here, on one thread of its own, which the engine knows as its
``recovery_thread``:

* only this thread processes losses, so two recoveries never run at once;
* the loop thread's store calls that meet the lost memory wait (GIL
  released) until this thread has processed it; every other call -- the
  keys on the other pages, INFO, replication, the cluster agent's lease
  renewals -- goes on while the page is copied (the engine lets the GIL go
  for the copy);
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

import os
import select
import threading
import time

from .logs import event

__all__ = ["RecoveryThread"]

#: Seconds between looks at the store when its loss_fd stays quiet (losses
#: left by a recovery that stopped early are picked up then).
POLL = 0.5


class RecoveryThread:
    """Runs the engine part of the Store's recovery (see the module docstring)."""

    def __init__(self, store, loop, done):
        self.store = store
        self.loop = loop
        self.done = done
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
            event("error", "recovery_failed", error=f"{type(e).__name__}: {e}")
            return
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
