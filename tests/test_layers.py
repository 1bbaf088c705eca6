"""The shape of the code: what imports what, and the command table.

- ``kvstore.client`` imports (and works offline) without the C engine.
- The command table is data: rows added to a table reach both protocols,
  and a pre-dispatch hook runs before every command and can refuse it.
"""

import subprocess
import sys
import textwrap

import pytest

from kvstore.server.adapters import arity_error, build_native, build_resp
from kvstore.server.commands import build_table
from kvstore.server.errors import CommandError, native_error, resp_error
from kvstore.server.registry import Command, CommandTable


def test_client_imports_without_the_engine():
    code = textwrap.dedent("""
        import sys
        sys.modules["kvstore._native"] = None          # as if never built
        import kvstore.client, kvstore.errors, kvstore.wire
        from kvstore.client import LOST, Client, AsyncClient, ClusterClient
        from kvstore.slots import key_slot
        assert key_slot(b"123456789") == 0x31C3 % 16384
        assert "kvstore.server" not in sys.modules, "the client imported the server"
        assert "kvstore.store" not in sys.modules, "the engine was imported"
        assert repr(LOST) == "kvstore.client.LOST"
        frame = kvstore.client._protocol.encode_request(1, "get", [b"k"])
        assert frame[:4] == len(frame[4:]).to_bytes(4, "big")
        try:
            kvstore.Store
        except ImportError:
            print("ok")
        else:
            raise SystemExit("kvstore.Store imported without the engine")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


class _Conn:
    """The little a handler reads from a connection."""

    null = b"$-1\r\n"
    resp3 = False

    def __init__(self):
        self.calls = []


def _table():
    return CommandTable(arity_error, build_resp, build_native)


def test_a_row_with_an_op_reaches_both_protocols():
    def strlen(conn, key):
        conn.calls.append(key)
        return len(key) * 2

    t = _table()
    t.add(Command("XLEN", 2, ("readonly",), (1, 1, 1), group="string", op=strlen,
                  args=("key",), reply="int", native="xlen"))
    conn = _Conn()
    assert t.resp[b"XLEN"](conn, [b"XLEN", b"abc"]) == b":6\r\n"
    assert t.resp[b"xlen"](conn, [b"xlen"]) == b"-ERR wrong number of arguments for 'xlen' command\r\n"
    assert t.native["xlen"](conn, [b"abc"]) == 6
    with pytest.raises(CommandError) as e:
        t.native["xlen"](conn, ["not bytes"])
    assert native_error(e.value) == ["TYPE", "keys must be msgpack bin (bytes)", {}]
    assert conn.calls == [b"abc", b"abc"]
    assert t.get(b"xlen").acl == ("@string",)


def test_pre_dispatch_hook_sees_the_row_and_can_refuse():
    t = build_table()
    seen = []

    def hook(conn, cmd, args):
        seen.append((cmd.name or cmd.native, cmd.keys))
        if cmd.name == "GET":
            raise CommandError("NOPERM this user has no permissions to run the 'get' command")

    t.add_hook(hook)
    conn = _Conn()
    with pytest.raises(CommandError) as e:
        t.resp[b"get"](conn, [b"get", b"k"])
    assert resp_error(e.value) == (b"-NOPERM this user has no permissions to run the 'get' "
                                   b"command\r\n")
    assert t.resp[b"PING"](conn, [b"PING"]) == b"+PONG\r\n"
    assert t.native["ping"](conn, []) == "PONG"
    assert seen == [("GET", (1, 1, 1)), ("PING", (0, 0, 0)), ("ping", (0, 0, 0))]


def test_every_command_is_one_row():
    t = build_table()
    assert len(t.commands) == len({id(c) for c in t.commands.values()})
    for name, cmd in t.commands.items():
        assert t.resp[name.encode()] is t.resp[name.lower().encode()]
        assert cmd.arity != 0
    assert {"get", "put", "mget", "sync", "persist", "dbsize"} <= set(t.native)
    with pytest.raises(ValueError):
        t.add(Command("GET", 2, resp=lambda conn, args: b"+OK\r\n"))


def test_store_reports_its_own_writes_to_the_write_observer():
    import contextlib

    import kvstore

    class Observer:
        def __init__(self):
            self.events = []

        def installed(self, key, value, version, status):
            self.events.append(("installed", key, value, version, status))

        @contextlib.contextmanager
        def read_repair(self, key, version):
            self.events.append(("repair", bytes(key), version))
            yield

    with kvstore.Store("1MiB", page_size="4K", recovery="manual") as st:
        obs = st.write_observer = Observer()
        v = st.put(b"k", b"v1")
        st.put(b"other", b"x")
        assert obs.events == []                      # client writes are not the Store's own
        st.faults.inject_key(b"k", "ao")
        st.recover()
        with pytest.raises(kvstore.KeyLostError):
            st.get(b"k")                             # no rebuild source: stays lost
        assert obs.events == [("repair", b"k", v)]
        assert st.install(b"k", b"v1", v) == "installed"
        assert obs.events[-1] == ("installed", b"k", b"v1", v, "installed")
        assert st.get(b"k") == b"v1"
        st.write_observer = None
        st.install(b"k", b"v0", v - 1)
        assert len(obs.events) == 2


def _relative_imports(pkg_dir):
    """{module: {module it imports}} for the relative imports inside a package."""
    import ast
    import os
    graph = {}
    for root, _dirs, files in os.walk(pkg_dir):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, pkg_dir)[:-3].split(os.sep)
            is_pkg = rel[-1] == "__init__"
            mod = rel[:-1] if is_pkg else rel
            here = mod if is_pkg else mod[:-1]
            deps = set()
            with open(path) as fh:
                tree = ast.parse(fh.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level:
                    base = here[:len(here) - (node.level - 1)]
                    if node.module:
                        deps.add(".".join(base + node.module.split(".")))
                    else:
                        deps.update(".".join(base + [a.name]) for a in node.names)
            graph[".".join(mod)] = deps
    return graph


def _cycles(graph):
    out = []

    def visit(node, path):
        for nxt in graph.get(node, ()):
            if nxt in path:
                out.append(path[path.index(nxt):] + [nxt])
            elif nxt in graph:
                visit(nxt, path + [nxt])
    for n in graph:
        visit(n, [n])
    return out


@pytest.mark.parametrize("package", ["server", "client"])
def test_no_import_cycles(package):
    import os
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), package)
    graph = _relative_imports(root)
    assert len(graph) > 5
    assert _cycles(graph) == []


def test_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) != []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
