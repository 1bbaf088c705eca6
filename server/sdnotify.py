"""systemd's notification and file-descriptor-store protocol, both ends.

The worker side (used by every kvstore-server):

* :func:`notify` sends one datagram to ``$NOTIFY_SOCKET`` (a path, or an
  abstract name when it starts with ``@``): newline-separated
  ``VAR=value`` lines such as ``READY=1`` or ``FDSTORE=1`` / ``FDNAME=arena``,
  with file descriptors attached as ``SCM_RIGHTS`` ancillary data. With
  ``FileDescriptorStoreMax=`` set in the unit, systemd keeps those fds across
  restarts of the service (sd_pid_notify_with_fds(3), sd_notify(3));
  ``FDSTOREREMOVE=1`` / ``FDNAME=`` drops the ones stored under a name.
* :func:`listen_fds` takes the fds handed to this process at start-up:
  ``$LISTEN_PID`` must be this process, ``$LISTEN_FDS`` fds start at 3 and
  ``$LISTEN_FDNAMES`` names them, colon-separated (sd_listen_fds(3)). The
  variables are removed from the environment so children do not see them.

The store side (:class:`FdStore`) is what ``kvstore-server --supervise``
runs in its small parent: it receives those datagrams, keeps the named fds,
and hands them back to the next worker exactly as systemd would
(:meth:`FdStore.child_env` and :meth:`FdStore.install_in_child`).
"""

import array
import fcntl
import os
import socket

__all__ = ["notify", "listen_fds", "FdStore", "LISTEN_FDS_START"]

LISTEN_FDS_START = 3


def _address(path):
    return "\0" + path[1:] if path.startswith("@") else path


def notify(message, fds=(), sock_path=None):
    """Send ``message`` (str) with ``fds`` to ``$NOTIFY_SOCKET``. False when
    no notification socket is set; OSError when the send fails."""
    path = sock_path or os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", list(fds)))] if fds else []
        s.sendmsg([message.encode()], anc, 0, _address(path))
    return True


def store_fds(name, fds, sock_path=None):
    """Ask the service manager to keep ``fds`` under ``name``."""
    return notify(f"FDSTORE=1\nFDNAME={name}", fds, sock_path)


def listen_fds(unset=True):
    """``{name: [fd, ...]}`` handed to this process, or {} (sd_listen_fds).
    The fds are made close-on-exec; the caller owns them."""
    env = os.environ
    try:
        pid = int(env.get("LISTEN_PID", ""))
        n = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return {}
    names = env.get("LISTEN_FDNAMES", "")
    if unset:
        for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(k, None)
    if pid != os.getpid() or n <= 0:
        return {}
    names = names.split(":") if names else []
    out = {}
    for i in range(n):
        fd = LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue
        out.setdefault(names[i] if i < len(names) else "unknown", []).append(fd)
    return out


class FdStore:
    """The receiving end of the protocol (what systemd does for a service
    with ``FileDescriptorStoreMax=``): a datagram socket at ``path`` that
    keeps the fds sent with ``FDSTORE=1`` under their ``FDNAME=`` (more
    under the same name replace them), drops them on ``FDSTOREREMOVE=1``, and
    remembers the other variables (``READY=1``, ``STATUS=``...)."""

    def __init__(self, path, max_fds=64):
        self.path = path
        self.max_fds = max_fds
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(_address(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.fds = {}            # name -> [fd]
        self.messages = []       # [(dict of variables, pid or None)]

    def fileno(self):
        return self.sock.fileno()

    def receive(self, timeout=None):
        """Read one datagram (blocking up to ``timeout``). Returns its
        variables as a dict, or None on timeout."""
        self.sock.settimeout(timeout)
        try:
            msg, anc, _flags, _addr = self.sock.recvmsg(
                4096, socket.CMSG_SPACE(self.max_fds * 4) + socket.CMSG_SPACE(12))
        except (TimeoutError, BlockingIOError, socket.timeout):
            return None
        fds, pid = [], None
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(data[:len(data) - len(data) % a.itemsize])
                fds.extend(a)
            elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = int.from_bytes(data[:4], "little")
        for fd in fds:
            os.set_inheritable(fd, False)
        var = {}
        for line in msg.decode(errors="replace").splitlines():
            k, sep, v = line.partition("=")
            if sep:
                var[k] = v
        self.messages.append((var, pid))
        if var.get("FDSTOREREMOVE") == "1":
            for old in self.fds.pop(var.get("FDNAME", "stored"), []):
                os.close(old)
        if var.get("FDSTORE") == "1" and fds:
            name = var.get("FDNAME", "stored")
            for old in self.fds.pop(name, []):
                os.close(old)
            self.fds[name] = fds
        else:
            for fd in fds:         # systemd closes fds sent without FDSTORE=1
                os.close(fd)
        return var

    def listed(self):
        """[(name, fd)] in the order they are handed over."""
        return [(name, fd) for name, fds in self.fds.items() for fd in fds]

    def child_env(self, pid):
        """LISTEN_* variables for the process ``pid`` that gets the fds."""
        items = self.listed()
        return {"LISTEN_PID": str(pid), "LISTEN_FDS": str(len(items)),
                "LISTEN_FDNAMES": ":".join(n for n, _ in items)}

    def install_in_child(self):
        """In a forked child before exec: move the stored fds to 3, 4, ..."""
        place_fds([fd for _, fd in self.listed()])

    def close(self):
        for fds in self.fds.values():
            for fd in fds:
                os.close(fd)
        self.fds.clear()
        self.sock.close()
        if not self.path.startswith("@"):
            try:
                os.unlink(self.path)
            except OSError:
                pass


def place_fds(fds):
    """Make ``fds`` the inheritable fds 3, 4, ... (in that order), as a
    service manager hands them over. Only for a process about to exec."""
    high = [os.dup(fd) for fd in fds]            # out of the way of the targets
    moved = []
    for fd in high:
        if fd < LISTEN_FDS_START + len(fds):
            nfd = fcntl.fcntl(fd, fcntl.F_DUPFD, LISTEN_FDS_START + len(fds) + 16)
            os.close(fd)
            fd = nfd
        moved.append(fd)
    for i, fd in enumerate(moved):
        os.dup2(fd, LISTEN_FDS_START + i, inheritable=True)
        os.close(fd)
