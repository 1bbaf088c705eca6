"""Restart without losing the memory: hand the arena to the next process.

``KV.RESTART`` (RESP and native ``restart``; @admin @dangerous) and SIGUSR2
re-execute the server with the same command line (new code is picked up from
disk). The arena memfd and the listening sockets cross the exec as the fds 3,
4, ... with ``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES`` (names ``arena``
and ``listen``; after memory errors also ``lostmap``, the lost and poisoned
subpages, and ``spare``, the memfds salvaged pages live in), the same
hand-over systemd's fd store and ``kvstore-server --supervise`` use after a
crash (server/sdnotify.py, server/supervise.py). For a crash restart the
worker keeps the fd store current itself (:class:`CrashHandover`): the
spare memfds as ``arena-spare-<page>-<hp|4k>-<generation>`` and the lost and
poisoned subpages as ``arena-lostmap-<generation>``, stored right after each
recovery, before the commands it held back go on. The listening socket is never closed, so a client
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
import threading
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
    extra = [fd for name, l in fds.items() if name in ("lostmap", "spare") or _crash_name(name)
             for fd in l]
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
    if any(_crash_name(name) for name in fds):
        return _crash_inherited(fds)
    st = state.get("arena") or {}
    kept = st.get("fdstore") or {}
    try:
        # what the fd store holds for a crash restart goes on under the same names
        _inherited_names["spares"] = {int(p): str(n) for p, n in (kept.get("spares") or {}).items()}
        _inherited_names["lostmap"] = kept.get("lostmap") or None
        _inherited_names["all"] = list(_inherited_names["spares"].values()) + (
            [_inherited_names["lostmap"]] if _inherited_names["lostmap"] else [])
    except (AttributeError, TypeError, ValueError):
        _inherited_names.update(spares={}, lostmap=None, all=[])
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


# -- what a crash restart needs besides the arena memfd, kept in the fd store
# (systemd's, or the --supervise parent's) by the worker itself:
#
# * ``arena-spare-<page>-<hp|4k>-<generation>``: the memfd page <page> was
#   salvaged into (hp: a spare hugepage, 4k: 4 KiB shmem pages). Stored
#   right after the salvage, before any write can land in it.
# * ``arena-lostmap-<generation>``: a memfd holding one JSON line
#   ``{"bytes": n, "subpages_per_page": k, "salvaged": [page, ...]}`` and then
#   Arena.lost_bitmap() and Arena.poison_bitmap() (n bytes each). Stored
#   after the spares of the same recovery; the highest generation wins.
#   "salvaged" lists every page that had a spare when it was written: a
#   listed page whose spare did not come back (the service manager refused
#   or dropped it) is adopted as wholly lost, never read.
#
# Generations are wall-clock nanoseconds, so a newer name sorts after an
# older one across processes; a replaced name is removed (FDSTOREREMOVE=1).

SPARE_PREFIX = "arena-spare-"
LOSTMAP_PREFIX = "arena-lostmap-"

_inherited_names = {"spares": {}, "lostmap": None, "all": []}


def _crash_name(name):
    return name.startswith(SPARE_PREFIX) or name.startswith(LOSTMAP_PREFIX)


def _parse_spare(name):
    """(page, small, generation) of a spare's fd name, or None."""
    parts = name[len(SPARE_PREFIX):].split("-")
    if len(parts) != 3 or parts[1] not in ("hp", "4k"):
        return None
    try:
        return int(parts[0]), parts[1] == "4k", int(parts[2])
    except ValueError:
        return None


def _parse_gen(name):
    try:
        return int(name[len(LOSTMAP_PREFIX):])
    except ValueError:
        return None


def _read_lostmap(fd):
    """(lost, poison, salvaged pages, subpages per page) from a lostmap
    memfd, or None when it does not read back whole."""
    size = os.fstat(fd).st_size
    raw = os.pread(fd, size, 0)
    head, sep, rest = raw.partition(b"\n")
    if not sep:
        return None
    try:
        h = json.loads(head)
        n, k = int(h["bytes"]), int(h["subpages_per_page"])
        salvaged = [int(x) for x in h["salvaged"]]
    except (ValueError, KeyError, TypeError):
        return None
    if len(rest) != 2 * n:
        return None
    return bytearray(rest[:n]), rest[n:], salvaged, k


def _crash_inherited(fds):
    """The ArenaHandover for fds a service manager kept across a crash."""
    import kvstore
    spares = {}                      # page -> (generation, fd, small, name)
    maps = []                        # (generation, fd, name)
    for name, l in fds.items():
        if name.startswith(SPARE_PREFIX):
            p = _parse_spare(name)
            if p is None or not l:
                event("error", "inherited_fd_ignored", name=name, detail="not a spare name")
                continue
            page, small, gen = p
            if page not in spares or spares[page][0] < gen:
                spares[page] = (gen, l[0], small, name)
        elif name.startswith(LOSTMAP_PREFIX):
            gen = _parse_gen(name)
            if gen is not None and l:
                maps.append((gen, l[0], name))
    lost = poison = None
    lostmap_name = None
    marked = []
    for gen, fd, name in sorted(maps, reverse=True):
        try:
            got = _read_lostmap(fd)
        except OSError:
            got = None
        if got is None:
            event("error", "lostmap_unreadable", name=name, detail="trying an older one")
            continue
        lost, poison, salvaged, k = got
        lostmap_name = name
        for page in salvaged:
            if page in spares:
                continue
            # salvaged before the crash, but its spare did not come back: the
            # arena holds the page as it was at the salvage; never read it
            marked.append(page)
            for sub in range(page * k, (page + 1) * k):
                if sub // 8 < len(lost):
                    lost[sub // 8] |= 1 << (sub % 8)
        lost = bytes(lost)
        break
    if marked:
        event("error", "salvaged_pages_without_spare", pages=",".join(map(str, marked)),
              detail="their subpages are adopted as lost; keys LOST, rebuilt from replicas")
    if spares and lostmap_name is None:
        event("warning", "lostmap_missing", detail="lost subpages are found again by checksum")
    _inherited_names["spares"] = {page: name for page, (_g, _fd, _s, name) in spares.items()}
    _inherited_names["lostmap"] = lostmap_name
    _inherited_names["all"] = [name for name in fds if _crash_name(name)]
    return kvstore.ArenaHandover(fds["arena"][0], lost, poison,
                                 [(page, fd, small) for page, (_g, fd, small, _n) in spares.items()])


def _ident(fd):
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


class CrashHandover:
    """Keeps the fd store (``$NOTIFY_SOCKET``) current with the spares and
    the lost subpages of ``arena``, for a restart after a crash.
    :meth:`sync` is called at start-up and by the recovery thread right
    after each recovery, before the commands held back go on."""

    def __init__(self, arena):
        self.arena = arena
        self._lock = threading.Lock()
        self._spares = {}            # page -> (identity of the file, fd name)
        self._lostmap = None         # fd name of the lostmap stored last
        self._last = None            # what it held
        self._gen = 0
        self._stale = set(_inherited_names["all"])
        inherited = _inherited_names["spares"]
        try:
            for page, fd, _small in arena.spares():
                if page in inherited:            # the same file the store keeps
                    self._spares[page] = (_ident(fd), inherited[page])
                    self._stale.discard(inherited[page])
        except OSError:
            pass
        if _inherited_names["lostmap"]:
            self._lostmap = _inherited_names["lostmap"]
            self._stale.discard(self._lostmap)

    def _next_gen(self):
        self._gen = max(self._gen + 1, time.time_ns())
        return self._gen

    def sync(self):
        """Store the spares not stored yet, then the lost subpages if they
        changed. Raises OSError when the fd store cannot be reached."""
        with self._lock:
            spares = self.arena.spares()
            failed = None
            for page, fd, small in spares:
                ident = _ident(fd)
                cur = self._spares.get(page)
                if cur is not None and cur[0] == ident:
                    continue
                name = f"{SPARE_PREFIX}{page}-{'4k' if small else 'hp'}-{self._next_gen()}"
                try:
                    sdnotify.store_fds(name, [fd])
                except OSError as e:
                    # the lostmap below still names the page: adopted as lost
                    failed = failed or e
                    continue
                self._spares[page] = (ident, name)
                if cur is not None:
                    sdnotify.notify(f"FDSTOREREMOVE=1\nFDNAME={cur[1]}")
                event("warning", "spare_stored", page=page, name=name)
            lost = self.arena.lost_bitmap()
            salvaged = sorted(page for page, _fd, _small in spares)
            now = (lost, salvaged)
            if now != self._last and (any(lost) or salvaged or self._lostmap):
                a = self.arena
                head = json.dumps({"bytes": len(lost), "salvaged": salvaged,
                                   "subpages_per_page": a.nsubpages // a.npages}).encode()
                fd = os.memfd_create("kvstore-lostmap", os.MFD_CLOEXEC)
                try:
                    os.write(fd, head + b"\n" + lost + a.poison_bitmap())
                    name = f"{LOSTMAP_PREFIX}{self._next_gen()}"
                    sdnotify.store_fds(name, [fd])
                finally:
                    os.close(fd)         # the fd store keeps its own
                old, self._lostmap = self._lostmap, name
                if old:
                    sdnotify.notify(f"FDSTOREREMOVE=1\nFDNAME={old}")
            self._last = now
            # what an earlier worker stored that this one does not use (an
            # arena not adopted, a spare or lostmap replaced) must not come back
            for name in sorted(self._stale):
                sdnotify.notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
            self._stale.clear()
            if failed is not None:
                raise failed

    def names(self):
        """What is stored now, for a planned restart's state: the next
        process goes on with the same names."""
        with self._lock:
            return {"spares": {str(page): name for page, (_i, name) in self._spares.items()},
                    "lostmap": self._lostmap}


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
            if getattr(server, "crash_handover", None) is not None:
                server.crash_handover.sync()
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
    if getattr(server, "crash_handover", None) is not None:
        state["arena"]["fdstore"] = server.crash_handover.names()
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
