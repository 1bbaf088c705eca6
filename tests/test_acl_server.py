"""ACLs on a running server, both protocols, against a real redis-server.

One ACL file (users with and without each category, key patterns, single
command rules) is loaded by a kvstore-server and a redis-server; every
command family is run as every user on both, and kvstore must refuse exactly
what Redis refuses, with Redis's NOPERM text. The native protocol's ops must
follow the rules of the command they map to (acl.NATIVE_COMMANDS), so the
same Redis run is their reference. Then AUTH / HELLO AUTH / ACL subcommands,
ACL LOAD, the C fast path for full users, --requirepass from a file and the
environment, and protected mode.
"""

import os
import socket
import subprocess
import sys
import tempfile

import pytest

from serverutil import recv_all, resp_command, start_server, store_available, wait_for
from test_server_native import MAGIC, Native

from kvstore.server.acl import NATIVE_COMMANDS

pytestmark = pytest.mark.skipif(not store_available(),
                                reason="kvstore.Store is not in this checkout yet")

CATS = ["read", "write", "keyspace", "string", "admin", "dangerous", "fast", "slow",
        "connection", "transaction"]

USERS = ["full", "keyed", "rokeys", "cmds"] + [f"only_{c}" for c in CATS] + \
        [f"no_{c}" for c in CATS]

ACL_TEXT = "\n".join(
    ["user default on nopass ~* &* +@all",
     "user full on >pw ~* &* +@all",
     "user keyed on >pw ~app:* &* +@all",
     "user rokeys on >pw %R~app:* &* +@all",
     "user cmds on >pw ~* &* -@all +get +client|id +config|get +acl|whoami"]
    + [f"user only_{c} on >pw ~* &* -@all +@{c}" for c in CATS]
    + [f"user no_{c} on >pw ~* &* +@all -@{c}" for c in CATS]) + "\n"

# Every command family, with arguments valid on both servers.
COMMANDS = [
    # strings
    ["GET", "app:1"], ["GET", "other"], ["SET", "app:1", "v"], ["SET", "other", "v"],
    ["SET", "app:1", "v", "GET"], ["MGET", "app:1", "other"], ["MSET", "app:1", "v", "app:2", "w"],
    ["SETNX", "app:3", "v"], ["STRLEN", "app:1"], ["GETDEL", "app:3"],
    ["SETEX", "app:4", "100", "v"], ["PSETEX", "app:4", "100000", "v"], ["MSETNX", "app:9", "v"],
    # keyspace / generic
    ["EXISTS", "app:1", "other"], ["TYPE", "app:1"], ["EXPIRE", "app:1", "100"],
    ["PEXPIRE", "app:1", "100000"], ["TTL", "app:1"], ["PTTL", "app:1"], ["PERSIST", "app:1"],
    ["DEL", "app:2"], ["UNLINK", "app:2"], ["KEYS", "app:*"], ["DBSIZE"],
    # server / admin
    ["INFO", "server"], ["CONFIG", "GET", "maxmemory"], ["COMMAND", "COUNT"],
    ["COMMAND", "INFO", "get"], ["CLIENT", "ID"], ["CLIENT", "LIST"], ["CLIENT", "GETNAME"],
    ["ACL", "WHOAMI"], ["ACL", "CAT"], ["ACL", "USERS"], ["ACL", "LIST"],
    ["LATENCY", "LATEST"], ["LATENCY", "RESET"], ["FLUSHDB"], ["FLUSHALL"],
    ["REPLICAOF", "NO", "ONE"],
    # connection
    ["PING"], ["ECHO", "x"], ["SELECT", "0"],
    # transactions
    ["WATCH", "app:1"], ["UNWATCH"], ["MULTI"], ["DISCARD"],
]

# native op -> (its arguments, the RESP command Redis judges it by)
NATIVE = {
    "get": ([b"app:1"], ["GET", "app:1"]),
    "getv": ([b"other"], ["GET", "other"]),
    "put": ([b"app:1", b"v"], ["SET", "app:1", "v"]),
    "delete": ([b"other"], ["DEL", "other"]),
    "exists": ([b"app:1"], ["EXISTS", "app:1"]),
    "mget": ([[b"app:1", b"other"]], ["MGET", "app:1", "other"]),
    "mput": ([[b"app:1", b"v"]], ["MSET", "app:1", "v"]),
    "expire": ([b"app:1", 100], ["EXPIRE", "app:1", "100"]),
    "ttl": ([b"app:1"], ["TTL", "app:1"]),
    "persist": ([b"app:1"], ["PERSIST", "app:1"]),
    "keys": ([], ["KEYS", "*"]),
    "dbsize": ([], ["DBSIZE"]),
    "stats": ([], ["INFO"]),
    "flushall": ([], ["FLUSHALL"]),
    "ping": ([], ["PING"]),
    "role": ([], ["ROLE"]),
}


@pytest.fixture(scope="module")
def aclfile():
    d = tempfile.mkdtemp(prefix="kvstore-acl-")
    path = os.path.join(d, "users.acl")
    with open(path, "w") as f:
        f.write(ACL_TEXT)
    return path


@pytest.fixture(scope="module")
def kv(aclfile):
    srv = start_server("--aclfile", aclfile, "--capacity", "16MiB")
    yield srv
    assert srv.stop() == 0, srv.logs()


@pytest.fixture(scope="module")
def redis_verdicts(aclfile):
    """{(user, command tuple): Redis's NOPERM line or None}."""
    redisdiff = pytest.importorskip("redisdiff")
    if redisdiff.REDIS_SERVER is None:
        pytest.skip("redis-server is not installed: no reference to compare ACLs with")
    r = redisdiff.RedisProc("--aclfile", aclfile)
    try:
        out = {}
        for user in USERS:
            c = redisdiff.Raw(r.connect())
            assert c.call("AUTH", user, "pw") == ("+", b"OK")
            cmds = COMMANDS + [spec[1] for spec in NATIVE.values()]
            for cmd in cmds:
                rep = c.call(*cmd)
                out[(user, tuple(cmd))] = _noperm(rep)
                if cmd == ["MULTI"] and rep == ("+", b"OK"):
                    c.call("DISCARD")
            c.close()
        return out
    finally:
        r.stop()


def _noperm(rep):
    if isinstance(rep, tuple) and rep[0] == "-" and rep[1].startswith(b"NOPERM"):
        return rep[1]
    return None


def test_every_family_as_every_user_matches_redis_resp(kv, redis_verdicts):
    import redisdiff
    bad = []
    for user in USERS:
        s = kv.connect()
        c = redisdiff.Raw(s)
        assert c.call("AUTH", user, "pw") == ("+", b"OK")
        for cmd in COMMANDS:
            rep = c.call(*cmd)
            if cmd == ["MULTI"] and rep == ("+", b"OK"):
                c.call("DISCARD")
            want = redis_verdicts[(user, tuple(cmd))]
            got = _noperm(rep)
            if got != want:
                bad.append((user, cmd, want, rep))
        c.close()
    assert not bad, bad[:10]


def test_every_native_op_follows_its_command(kv, redis_verdicts):
    bad = []
    for user in USERS:
        n = Native(kv)
        assert n.ok("auth", user, b"pw") is True
        for op, (args, cmd) in NATIVE.items():
            rid, status, result = n.call(op, *args)
            want = redis_verdicts[(user, tuple(cmd))]
            if want is not None and b"'" in want:
                # refused by command: the message names the command the op maps to
                want = (f"NOPERM this user has no permissions to run the "
                        f"'{NATIVE_COMMANDS[op]}' command").encode()
            got = None
            if status == 1 and result[0] == "NOPERM":
                got = ("NOPERM " + result[1]).encode()
            if got != want:
                bad.append((user, op, want, status, result))
        n.close()
    assert not bad, bad[:10]


def test_kvstore_admin_commands_are_admin_and_dangerous(kv):
    import redisdiff
    for user, refused in (("no_admin", True), ("no_dangerous", True), ("only_read", True),
                          ("full", False)):
        c = redisdiff.Raw(kv.connect())
        c.call("AUTH", user, "pw")
        rep = c.call("KV.REPL", "DROP")
        assert (_noperm(rep) is not None) == refused, (user, rep)
        rep = c.call("KV.INJECT", "ao", "OFFSET", "0")
        assert (_noperm(rep) is not None) == refused, (user, rep)
        c.close()
        if not refused:
            continue              # a full user's sync would start a replication stream
        n = Native(kv)
        n.ok("auth", user, b"pw")
        for op, args in (("sync", [None, 0, 1]), ("replicaof", []), ("inject", ["ao", "offset", 0])):
            rid, status, result = n.call(op, *args)
            assert (status == 1 and result[0] == "NOPERM") == refused, (user, op, result)
        n.close()


def test_multi_refuses_at_queue_time(kv):
    import redisdiff
    c = redisdiff.Raw(kv.connect())
    c.call("AUTH", "only_string", "pw")
    assert c.call("MULTI") == ("-", b"NOPERM this user has no permissions to run the 'multi' "
                                    b"command")
    c.call("AUTH", "no_dangerous", "pw")
    assert c.call("MULTI") == ("+", b"OK")
    assert _noperm(c.call("FLUSHALL")) is not None
    assert c.call("EXEC")[1].startswith(b"EXECABORT")
    c.close()


def test_auth_hello_and_acl_subcommands(kv, aclfile):
    import redis
    r = redis.Redis(host=kv.host, port=kv.port, username="keyed", password="pw",
                    decode_responses=True)
    assert r.acl_whoami() == "keyed"
    with pytest.raises(redis.exceptions.NoPermissionError):
        r.get("other")
    r.close()
    assert _raw(kv, "AUTH", "keyed", "bad") == (
        b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
    r3 = redis.Redis(host=kv.host, port=kv.port, username="full", password="pw", protocol=3,
                     decode_responses=True)
    assert r3.acl_whoami() == "full"
    assert sorted(r3.acl_users()) == sorted(USERS + ["default"])
    assert "user keyed on #" in "\n".join(r3.acl_list())
    assert "read" in r3.acl_cat() and "get" in r3.acl_cat("read")
    with pytest.raises(redis.exceptions.ResponseError, match="Unknown category"):
        r3.acl_cat("nope")
    got = r3.acl_getuser("keyed")
    assert got["keys"] == ["~app:*"] or got["keys"] == "~app:*"
    assert r3.acl_getuser("nobody") is None
    # COMMAND INFO shows Redis's categories, from the same table the rules use
    import redisdiff
    raw = redisdiff.Raw(kv.connect())
    info = raw.call("COMMAND", "INFO", "get", "flushall")
    raw.close()
    cats = [[x[1] if isinstance(x, tuple) else x for x in row[6]] for row in info]
    assert cats[0] == [b"@read", b"@string", b"@fast"]                 # Redis's order
    assert cats[1] == [b"@keyspace", b"@write", b"@slow", b"@dangerous"]
    r3.close()
    # AUTH <password> with a nopass default user: Redis's error
    s = kv.connect()
    s.sendall(resp_command("AUTH", "x"))
    assert s.recv(4096).startswith(b"-ERR AUTH <password> called without any password")
    # HELLO 3 AUTH user pass
    s.sendall(resp_command("HELLO", "3", "AUTH", "only_read", "pw") + resp_command("ACL", "WHOAMI"))
    data = recv_until_two(s)
    assert b"NOPERM this user has no permissions to run the 'acl|whoami' command" in data
    s.close()


def _raw(srv, *args):
    """One command on a fresh connection; its reply line."""
    from serverutil import recv_until
    s = srv.connect()
    s.sendall(resp_command(*args))
    got = recv_until(s, lambda d: d.endswith(b"\r\n"), timeout=5)
    s.close()
    return got


def recv_until_two(s):
    from serverutil import recv_until
    return recv_until(s, lambda d: b"NOPERM" in d or d.count(b"\r\n") > 40, timeout=5)


def test_acl_load_replaces_users_and_moves_connections(tmp_path):
    path = tmp_path / "u.acl"
    path.write_text("user default on nopass ~* &* +@all\nuser app on >pw ~* -@all +@read\n"
                    "user gone on >pw ~* +@all\n")
    with start_server("--aclfile", str(path), "--capacity", "16MiB") as srv:
        import redis
        app = redis.Redis(host=srv.host, port=srv.port, username="app", password="pw")
        gone = srv.connect()
        gone.sendall(resp_command("AUTH", "gone", "pw"))
        assert gone.recv(100) == b"+OK\r\n"
        with pytest.raises(redis.exceptions.NoPermissionError):
            app.set("k", "v")
        admin = redis.Redis(host=srv.host, port=srv.port)
        path.write_text("user default on nopass ~* &* +@all\nuser app on >pw ~* +@all\n")
        assert admin.acl_load()
        assert app.set("k", "v")          # the same connection, the new rules
        assert recv_all(gone, timeout=5) == b""     # closed: its user is gone
        gone.close()
        path.write_text("user default on nopass ~* &* +@all\nuser app on >pw ~* +@nosuch\n")
        with pytest.raises(redis.exceptions.ResponseError, match="Unknown command or category"):
            admin.acl_load()
        assert app.get("k") == b"v"      # a bad file changes nothing
        app.close()
        admin.close()


def test_requirepass_from_file_and_environment(tmp_path):
    import redis
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    with start_server("--requirepass-file", str(pw), "--capacity", "16MiB") as srv:
        with open(f"/proc/{srv.pid}/cmdline", "rb") as f:
            assert b"s3cret" not in f.read()
        assert _raw(srv, "PING") == b"-NOAUTH Authentication required.\r\n"
        assert redis.Redis(host=srv.host, port=srv.port, password="s3cret").ping()
        n = Native(srv)
        assert n.hello[2]["auth"] is True
        assert n.err("get", b"k") == "NOAUTH"
        assert n.ok("auth", b"s3cret") is True
        assert n.ok("auth", "default", b"s3cret") is True
        n.close()
    env = dict(os.environ, KVSTORE_REQUIREPASS="fromenv")
    with start_server("--capacity", "16MiB", env=env) as srv:
        with open(f"/proc/{srv.pid}/cmdline", "rb") as f:
            assert b"fromenv" not in f.read()
        assert redis.Redis(host=srv.host, port=srv.port, password="fromenv").ping()
        assert _raw(srv, "AUTH", "other").startswith(b"-WRONGPASS")


def test_full_users_keep_the_c_fast_path(aclfile):
    """With restricted users the ACL hook is installed, yet a +@all ~* user's
    connection may still take the C GET/SET path; a restricted user's may
    not (the end-to-end proof that restricted users never bypass the check
    is the differential test above: keyed's GET other is refused)."""
    from kvstore.server import app
    from kvstore.server.conn import BaseConnection
    from kvstore.server.config import ServerConfig

    srv = app.Server(ServerConfig(capacity="8MiB", aclfile=aclfile).validate(),
                     store=_FakeStore())
    assert srv.table.hooks
    conn = BaseConnection(srv)
    acl = srv.access.acl
    for name, fast in (("full", True), ("default", True), ("keyed", False), ("rokeys", False),
                       ("no_dangerous", False), ("only_read", False), ("cmds", False)):
        conn.set_user(acl.get(name))
        assert srv.table.fast_ok(conn) is fast, name
    # no restricted user: no hook, nothing to pay
    plain = app.Server(ServerConfig(capacity="8MiB").validate(), store=_FakeStore())
    assert not plain.table.hooks
    assert plain.table.fast_ok(BaseConnection(plain))


class _FakeStore:
    def __len__(self):
        return 0


# ------------------------------------------------------------------ protected mode

def test_protected_mode_decision():
    from kvstore.server.access import protected_refusal
    from kvstore.server.acl import AclStore
    nopass = AclStore().default_user()
    withpass = AclStore("pw").default_user()
    assert protected_refusal(True, nopass, "192.0.2.7")
    assert protected_refusal(True, nopass, "fd00::7")
    assert not protected_refusal(True, nopass, "127.0.0.1")
    assert not protected_refusal(True, nopass, "127.5.5.5")
    assert not protected_refusal(True, nopass, "::1")
    assert not protected_refusal(True, nopass, "::ffff:127.0.0.1")
    assert not protected_refusal(True, withpass, "192.0.2.7")
    assert not protected_refusal(False, nopass, "192.0.2.7")
    assert not protected_refusal(True, nopass, None)          # unix socket


def _non_loopback_address():
    """An IPv4 address of this machine beyond loopback, or None."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True,
                             timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    for a in out:
        if ":" not in a and not a.startswith("127."):
            try:
                with socket.socket() as s:
                    s.bind((a, 0))
                return a
            except OSError:
                continue
    return None


@pytest.mark.parametrize("mode", ["yes", "no"])
def test_protected_mode_refuses_non_loopback_clients(mode):
    addr = _non_loopback_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback address (the decision is tested above)")
    redisdiff = pytest.importorskip("redisdiff")
    with start_server("--bind", f"127.0.0.1 {addr}", "--protected-mode", mode,
                      "--capacity", "16MiB") as srv:
        wait_for(lambda: "protected_mode" in srv.logs() or "no_password_exposed" in srv.logs(),
                 what="the start-up warning")
        assert ("protected_mode" in srv.logs()) == (mode == "yes")
        s = socket.create_connection((addr, srv.port), timeout=5)
        s.sendall(resp_command("PING"))
        if mode == "yes":
            got = recv_all(s, timeout=5)          # the error, then the server closes
        else:
            got = s.recv(100)
        s.close()
        if mode == "yes":
            from kvstore.server.access import DENIED
            assert got == b"-" + DENIED.encode() + b"\r\n"
            # the text is Redis's own (checked against the installed binary when present)
            if redisdiff.REDIS_SERVER:
                with open(redisdiff.REDIS_SERVER, "rb") as f:
                    assert DENIED.encode() in f.read()
            # native clients get a DENIED error frame
            n = socket.create_connection((addr, srv.port), timeout=5)
            n.sendall(MAGIC)
            assert b"DENIED" in recv_all(n, timeout=5)
            n.close()
            # loopback clients are served
            lo = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            lo.sendall(resp_command("PING"))
            assert lo.recv(100) == b"+PONG\r\n"
            lo.close()
            assert "client_rejected" in srv.logs()
        else:
            assert got.startswith(b"+PONG")


def test_protected_mode_off_with_password_serves_everyone(tmp_path):
    addr = _non_loopback_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback address")
    pw = tmp_path / "pw"
    pw.write_text("x\n")
    with start_server("--bind", addr, "--requirepass-file", str(pw),
                      "--capacity", "16MiB") as srv:
        s = socket.create_connection((addr, srv.port), timeout=5)
        s.sendall(resp_command("AUTH", "x") + resp_command("PING"))
        from serverutil import recv_until
        assert recv_until(s, lambda d: d.count(b"\r\n") >= 2) == b"+OK\r\n+PONG\r\n"
        s.close()
        assert "protected_mode" not in srv.logs()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_every_command_and_native_op_has_acl_rules():
    """Each row's categories come from acl.py's table (COMMAND INFO shows
    them); a command missing there would be refused to every restricted
    user, and a native op missing from NATIVE_COMMANDS would follow no
    command's rules."""
    from kvstore.server.acl import COMMAND_CATEGORIES
    from kvstore.server.commands import build_table
    table = build_table()
    missing = [n for n in table.commands if n.lower() not in COMMAND_CATEGORIES]
    assert not missing, f"add these to acl.py's _TABLE: {missing}"
    for name, row in table.commands.items():
        assert row.acl and all(c.startswith("@") for c in row.acl), name
    unmapped = [op for op in table.native if op not in NATIVE_COMMANDS]
    assert not unmapped, f"add these to acl.NATIVE_COMMANDS: {unmapped}"
