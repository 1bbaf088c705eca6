"""Restart without losing the memory: hand the arena to the next process.

``KV.RESTART`` (RESP and native ``restart``; @admin @dangerous) and SIGUSR2
re-execute the server with the same command line (new code is picked up from
disk). The arena memfd and the listening sockets cross the exec as the fds 3,
4, ... with ``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES`` (names ``arena``
and ``listen``; after memory errors also ``lostmap``, the lost and poisoned
subpages, and ``spare``, the memfds salvaged pages live in), the same
hand-over systemd's fd store and ``kvstore-server --supervise`` use after a
crash (server/sdnotify.py, server/supervise.py; a crash hands over the arena
and sockets only: lost subpages are found again by checksum). The listening socket is never closed, so a client
connecting during the hand-over waits in the kernel's accept queue; clients
already connected see their connection closed once.

``KVSTORE_RESTART_STATE`` (JSON) carries what is not in the arena: the
replication id and offset (a primary's replicas continue with a partial
sync: the new backlog is empty but starts at the old offset), a replica's
primary, id and applied offset, and the time the hand-over started (the new
process logs how long it took).

The new process adopts the arena (kvstore.Store(adopt_fd=...)): when that is
refused (another layout version, a header that does not verify) it logs why
and starts empty with a new replication id, so replicas and the cluster
treat it as a new node (a full sync).
"""

import asyncio
import json
import os
import socket
import stat
import sys
import time

from .logs import event
from . import sdnotify

__all__ = ["inherited", "adopt_store", "listeners", "restore", "request_restart", "STATE_ENV"]

STATE_ENV = "KVSTORE_RESTART_STATE"

_inherited = None


def inherited():
    """``{"arena": [fd], "listen": [fd, ...]}`` handed to this process (read
    once), and the restart state (dict, {} if none)."""
    global _inherited
    if _inherited is None:
        fds = sdnotify.listen_fds()
        raw = os.environ.pop(STATE_ENV, "")
        try:
            state = json.loads(raw) if raw else {}
        except ValueError:
            state = {}
        _inherited = (fds, state)
    return _inherited


def adopt_store(make_fresh, make_adopted):
    """The store at start-up: the inherited arena adopted, else a fresh one.
    Returns (store, adopted)."""
    fds, state = inherited()
    arena = fds.get("arena")
    if not arena:
        return make_fresh(), False
    t = time.monotonic()
    handed = arena_inherited(fds, state)
    extra = fds.get("lostmap", []) + fds.get("spare", [])
    try:
        store = make_adopted(handed)
    except Exception as e:               # noqa: BLE001 - any refusal: start empty, never misread
        event("error", "arena_not_adopted", error=f"{type(e).__name__}: {e}",
              detail="starting empty; replicas and peers see a new node (full sync)")
        for fd in arena + extra:
            os.close(fd)
        state.clear()
        return make_fresh(), False
    for fd in arena + extra:
        os.close(fd)                     # the arena keeps its own duplicates
    r = store.adopt_report()
    event("warning", "arena_adopted", seconds=round(time.monotonic() - t, 4),
          lost_subpages_handed_over=sum(bin(b).count("1") for b in handed.lost or b""),
          salvaged_pages_handed_over=len(handed.spares), **r)
    return store, True


# -- what crosses the exec with the arena memfd besides its bytes: the lost
# and poisoned subpages (fd "lostmap": a memfd holding Arena.lost_bitmap()
# then Arena.poison_bitmap()) and the memfds salvaged pages live in (fds
# "spare", in the order of state["arena"]["spares"] = [[page, small], ...]).

def arena_handover(arena):
    """(fds, names, state) to hand over with the arena fd of ``arena``."""
    import kvstore
    h = kvstore.ArenaHandover.of(arena)
    fds, names = [], []
    st = {"spares": [[page, bool(small)] for page, _fd, small in h.spares]}
    if h.lost is not None:
        fd = os.memfd_create("kvstore-lostmap")
        os.write(fd, h.lost + h.poison)
        fds.append(fd)
        names.append("lostmap")
        st["lostmap_bytes"] = len(h.lost)
    for _page, fd, _small in h.spares:
        fds.append(fd)
        names.append("spare")
    return fds, names, st


def arena_inherited(fds, state):
    """The inherited arena fd as a kvstore.ArenaHandover (with the lost
    subpages and salvaged pages that came with it)."""
    import kvstore
    st = state.get("arena") or {}
    lost = poison = None
    n = int(st.get("lostmap_bytes", 0))
    if n and fds.get("lostmap"):
        raw = os.pread(fds["lostmap"][0], 2 * n, 0)
        if len(raw) == 2 * n:
            lost, poison = raw[:n], raw[n:]
        else:
            event("error", "lostmap_unreadable", detail="lost subpages found again by checksum")
    spares = []
    spare_fds = fds.get("spare", [])
    for (page, small), fd in zip(st.get("spares", []), spare_fds):
        spares.append((int(page), fd, bool(small)))
    if len(spare_fds) != len(st.get("spares", [])):
        event("error", "spares_mismatch", fds=len(spare_fds), pages=len(st.get("spares", [])))
    return kvstore.ArenaHandover(fds["arena"][0], lost, poison, spares)


def listeners():
    """Inherited listening sockets (socket objects), or []."""
    fds, _ = inherited()
    out = []
    for fd in fds.get("listen", []):
        try:
            ok = stat.S_ISSOCK(os.fstat(fd).st_mode)
        except OSError:
            ok = False
        if not ok:
            event("error", "inherited_fd_ignored", fd=fd, name="listen", detail="not a socket")
            continue
        s = socket.socket(fileno=fd)
        s.setblocking(False)
        out.append(s)
    return out


def restore(server, adopted):
    """Replication state of the previous process (only when its arena was
    adopted: the data and the offsets go together). After a planned restart
    it comes from the environment; after a crash, from what the primary
    kept in the arena (:mod:`.repl_persist`)."""
    _, state = inherited()
    repl = server.repl
    p = repl.primary
    if adopted and not state.get("replid") and state.get("role") != "slave":
        from .repl_persist import resume
        resume(server)                   # a crash restart
    elif p.persist is not None and not (adopted and state.get("replid")):
        p.persist.forget()               # no history of the arena goes on here
    if not adopted or not state:
        return
    from .repl_primary import Backlog
    if state.get("replid"):
        p.replid = state["replid"]
        p.backlog = Backlog(p.backlog_size, offset=int(state.get("offset", 0)))
        if p.persist is not None:
            if state.get("role") == "slave":
                p.persist.forget()
            else:
                p.keep_position()
        repl.configure_writes()
    if state.get("role") == "slave" and state.get("master"):
        host, port = state["master"]
        server.config.replica_of = f"{host}:{port}"
        r = repl.replica
        r.master_replid = state.get("master_replid")
        r.applied = int(state.get("applied", 0))
        r.max_version = int(state.get("max_version", 0))
    t0 = state.get("t0")
    if t0:
        server.restart_handover_s = max(0.0, time.time() - float(t0))


def announce(server):
    """After the server listens: log the hand-over time; under systemd or
    --supervise, store the arena and listening fds (FDSTORE=1)."""
    took = getattr(server, "restart_handover_s", None)
    if took is not None:
        event("warning", "restart_done", seconds=round(took, 4), pid=os.getpid(),
              keys=len(server.store) if hasattr(server.store, "__len__") else -1)
    if os.environ.get("NOTIFY_SOCKET"):
        try:
            sdnotify.store_fds("arena", [server.store.arena.fd])
            socks = [s.fileno() for srv in server._listeners for s in srv.sockets]
            if socks:
                sdnotify.store_fds("listen", socks)
            sdnotify.notify(f"READY=1\nMAINPID={os.getpid()}")
        except OSError as e:
            event("error", "sd_notify_failed", error=str(e))


def state_of(server):
    repl = server.repl
    p, r = repl.primary, repl.replica
    p.flush_pending()
    st = {"t0": time.time(), "replid": p.replid, "offset": p.offset, "role": repl.role}
    if repl.role == "slave" and r.master:
        st.update(master=list(r.master), master_replid=r.master_replid, applied=r.applied,
                  max_version=r.max_version)
    return st


def check(server):
    """Why a restart cannot be done now, or None."""
    if server.store is None or getattr(server.store, "closed", False):
        return "no store to hand over"
    if not hasattr(server.store, "arena"):
        return "the store has no arena to hand over"
    if getattr(server, "_restarting", False):
        return "a restart is already in progress"
    return None


def request_restart(server, reason):
    """Schedule the hand-over (the caller's reply goes out first). Returns
    None, or the reason it cannot be done."""
    why = check(server)
    if why:
        return why
    server._restarting = True
    loop = asyncio.get_running_loop()
    loop.create_task(_restart(server, reason))
    return None


async def _drain(server, timeout):
    """Let replies and the replication stream already produced leave."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = False
        for conn in list(server.clients.values()):
            t = getattr(conn, "transport", None)
            if t is not None and not t.is_closing() and t.get_write_buffer_size():
                busy = True
                break
        if not busy:
            return
        await asyncio.sleep(0.005)


async def _restart(server, reason):
    await asyncio.sleep(0)               # the requesting client's reply is written first
    t0 = time.time()
    # Nothing new is read: a command not answered by now was never
    # acknowledged, and the replication offset stops moving.
    for conn in list(server.clients.values()):
        t = getattr(conn, "transport", None)
        if t is not None and not t.is_closing():
            try:
                t.pause_reading()
            except (RuntimeError, AttributeError):
                pass
    await server.recovery_idle()         # never hand the arena over mid-salvage
    state = state_of(server)
    state["t0"] = t0
    await _drain(server, 1.0)
    state["offset"] = server.repl.primary.offset
    event("warning", "restart", reason=reason, pid=os.getpid(), **{k: state[k] for k in ("replid", "offset")})
    store = server.store
    fds = [store.arena.fd]
    names = ["arena"]
    more, more_names, state["arena"] = arena_handover(store.arena)
    fds += more
    names += more_names
    for srv in server._listeners:
        for s in srv.sockets:
            fds.append(s.fileno())
            names.append("listen")
    for h in (logging_handlers()):
        try:
            h.flush()
        except Exception:                # noqa: BLE001
            pass
    env = dict(os.environ)
    env.update({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(len(fds)),
                "LISTEN_FDNAMES": ":".join(names), STATE_ENV: json.dumps(state)})
    sys.stdout.flush()
    sys.stderr.flush()
    sdnotify.place_fds(fds)
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)
    try:
        os.execve(sys.executable, argv, env)
    except OSError as e:                 # the old process goes on serving
        for fd, name in zip(fds, names):
            if name == "lostmap":
                os.close(fd)
        server._restarting = False
        event("error", "restart_failed", error=str(e))


def logging_handlers():
    import logging
    return list(logging.getLogger().handlers)


# -- the command (RESP KV.RESTART, native ``restart``)

def _do(conn, reason):
    from .errors import CommandError
    why = request_restart(conn.server, reason)
    if why:
        raise CommandError(f"ERR restart refused: {why}")


def cmd_kv_restart(conn, args):
    """KV.RESTART: reply +OK, then hand the arena and the listening sockets
    to a new process running the same command line."""
    from .resp import OK
    _do(conn, f"KV.RESTART from client {getattr(conn, 'id', '?')}")
    return OK


def native_restart(conn, args):
    from .adapters import native_args
    native_args(args, 0, 0, "restart")
    _do(conn, f"restart from client {getattr(conn, 'id', '?')}")
    return "OK"
