"""``kvstore-server --supervise``: restart the worker after a crash, keeping its memory.

A small parent (no store, no event loop) runs the server in a worker process
and keeps what the worker hands it over the systemd notification protocol
(server/sdnotify.py): the worker sends its arena memfd and its listening
sockets with ``FDSTORE=1`` (``FDNAME=arena`` / ``listen``) once it listens,
and after a memory error the spare memfds of salvaged pages and its lost
subpages (``arena-spare-...``, ``arena-lostmap-...``, see server/restart.py).
When the worker dies (``kill -9``, a fatal signal, a non-zero exit) the
parent starts a new one with those fds as ``LISTEN_FDS`` (fd 3 on, named by
``LISTEN_FDNAMES``, ``LISTEN_PID`` its pid), exactly as systemd does for a
unit with ``FileDescriptorStoreMax=``. The new worker adopts the arena:
it validates it (adopt.c) before serving, so whatever a crash left half
written becomes LOST and is rebuilt from a replica, never served wrong.
The listening socket stays open in the parent, so clients connecting while
the worker restarts wait in the accept queue instead of being refused.

SIGTERM / SIGINT go to the worker, and the parent exits with it. SIGUSR2 is
passed on (a planned restart: the worker re-executes itself in place, same
pid). A worker that exits with status 0 ends the parent too. Restarts that
follow each other faster than a second back off (up to 5 s).
"""

import os
import signal
import sys
import tempfile
import threading
import time

from .logs import event
from .sdnotify import FdStore

__all__ = ["supervise"]


def _worker_argv(argv):
    return [a for a in argv if a != "--supervise"]


def supervise(argv):
    args = _worker_argv(argv)
    tmp = tempfile.mkdtemp(prefix="kvstore-supervise-")
    path = os.path.join(tmp, "notify.sock")
    store = FdStore(path)
    stop = threading.Event()
    child = {"pid": None}
    lock = threading.Lock()       # store.fds: the receiving thread, and the fork below

    def recv_loop():
        while not stop.is_set():
            try:
                with lock:
                    var = store.receive(timeout=0.2)
            except OSError:
                if stop.is_set():
                    return
                continue
            if var and var.get("FDSTORE") == "1":
                event("info", "supervise_fds_stored", name=var.get("FDNAME", ""),
                      fds=len(store.fds.get(var.get("FDNAME", "stored"), [])))

    threading.Thread(target=recv_loop, name="kvstore-fdstore", daemon=True).start()

    def forward(sig, _frame):
        if sig in (signal.SIGTERM, signal.SIGINT):
            stop.set()
        pid = child["pid"]
        if pid:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
        signal.signal(sig, forward)

    backoff = 0.05
    rc = 0
    try:
        while True:
            started = time.monotonic()
            t_spawn = time.time()
            with lock:
                # what the dead worker sent just before it died is in the
                # socket's queue: it is part of what the next one gets
                while True:
                    try:
                        if store.receive(timeout=0) is None:
                            break
                    except OSError:
                        break
                pid = os.fork()
            if pid == 0:                               # the worker
                try:
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
                        signal.signal(sig, signal.SIG_DFL)
                    env = dict(os.environ)
                    env["NOTIFY_SOCKET"] = path
                    env.pop("LISTEN_PID", None)
                    if store.fds:
                        env.update(store.child_env(os.getpid()))
                        env["KVSTORE_RESTART_STATE"] = '{"t0": %r}' % t_spawn
                        store.install_in_child()
                    os.execve(sys.executable, [sys.executable, "-m", "kvstore.server"] + args, env)
                finally:
                    os._exit(127)
            child["pid"] = pid
            event("info", "supervise_worker_started", pid=pid, adopting=bool(store.fds))
            while True:
                try:
                    _, status = os.waitpid(pid, 0)
                    break
                except InterruptedError:
                    continue
            child["pid"] = None
            if os.WIFSIGNALED(status):
                why = f"killed by signal {os.WTERMSIG(status)}"
                rc = 128 + os.WTERMSIG(status)
            else:
                rc = os.WEXITSTATUS(status)
                why = f"exit status {rc}"
            if stop.is_set() or (os.WIFEXITED(status) and rc == 0):
                event("info", "supervise_worker_ended", pid=pid, reason=why)
                return rc
            if time.monotonic() - started < 1.0:
                backoff = min(5.0, backoff * 2)
            else:
                backoff = 0.05
            event("error", "supervise_worker_died", pid=pid, reason=why,
                  restart_in=round(backoff, 3), fds=",".join(store.fds))
            if stop.wait(backoff):
                return rc
    finally:
        stop.set()
        store.close()
        try:
            os.rmdir(tmp)
        except OSError:
            pass
