"""kvstore-cli run as a subprocess against the fake server: exit codes,
raw bytes on stdout, values from stdin."""

import json
import os
import subprocess
import sys

import pytest

from fakeserver import REPO, FakeServer

# Runs kvstore.client.cli:main the way the console script does.
_BOOT = "import sys\nfrom kvstore.client.cli import main\nsys.exit(main())\n"


def cli(*args, stdin=b"", env=None, timeout=30):
    full_env = dict(os.environ)
    full_env.pop("KVSTORE_URL", None)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", _BOOT, *args], input=stdin,
                          capture_output=True, cwd=REPO, env=full_env, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr.decode(errors="replace")


def at(server, *args):
    return ("-h", server.host, "-p", str(server.port), *args)


def test_help_documents_exit_codes():
    code, out, _ = cli("--help")
    assert code == 0
    text = out.decode()
    for line in ("0  ok", "1  key absent", "2  usage error", "3  connection error",
                 "4  key lost", "5  server error"):
        assert line in text
    assert "-h HOST" in text or "-h, --host" in text


@pytest.mark.parametrize("args", [
    (), ("frobnicate",), ("get",), ("-p", "notaport", "ping"),
    ("inject", "ao"), ("inject", "melt", "--offset", "1"), ("put", "k"),
])
def test_usage_errors_exit_2(args):
    code, out, err = cli(*args)
    assert code == 2, err
    assert out == b""
    assert "usage" in err


def test_put_get_raw_bytes(fake):  # noqa: F811
    code, out, _ = cli(*at(fake, "put", "greeting", "hello world"))
    assert code == 0 and int(out) >= 1
    code, out, _ = cli(*at(fake, "get", "greeting"))
    assert (code, out) == (0, b"hello world")       # exact bytes, no newline
    assert fake.data[b"greeting"][1] == b"hello world"


def test_put_value_from_stdin(fake):  # noqa: F811
    blob = bytes(range(256)) * 40 + b"\n\x00trailing\n"
    code, out, err = cli(*at(fake, "put", "blob", "-"), stdin=blob)
    assert code == 0, err
    assert fake.data[b"blob"][1] == blob
    code, out, _ = cli(*at(fake, "get", "blob"))
    assert code == 0 and out == blob


def test_put_with_ttl(fake):  # noqa: F811
    code, _, err = cli(*at(fake, "put", "k", "v", "--ttl", "60"))
    assert code == 0, err
    assert fake.requests[-1][2] == [b"k", b"v", 60.0]
    code, _, err = cli(*at(fake, "put", "k", "v", "--ttl", "0"))
    assert code == 2 and "ttl" in err


@pytest.mark.slow
def test_absent_key_exit_1(fake):  # noqa: F811
    assert cli(*at(fake, "get", "nope"))[:2] == (1, b"")
    fake.data[b"a"] = (1, b"x")
    assert cli(*at(fake, "exists", "a"))[:2] == (0, b"1\n")
    assert cli(*at(fake, "exists", "a", "nope"))[:2] == (1, b"1\n")
    assert cli(*at(fake, "del", "a"))[:2] == (0, b"1\n")
    assert cli(*at(fake, "del", "a"))[:2] == (1, b"0\n")
    assert b"a" not in fake.data


@pytest.mark.slow
def test_lost_key_exit_4(fake):  # noqa: F811
    fake.data[b"k"] = (3, b"v")
    fake.lose(b"k", times=1000)
    code, out, err = cli(*at(fake, "get", "k"))
    assert code == 4 and out == b""
    assert "lost" in err
    fake.lost.clear()
    fake.lose(b"k", unrecoverable=True)
    assert cli(*at(fake, "get", "k"))[0] == 4
    code, out, _ = cli(*at(fake, "lost"))
    assert code == 0 and out == b"k\t3\tunrecoverable\n"


@pytest.mark.slow
def test_connection_errors_exit_3(fake):  # noqa: F811
    port = fake.port
    fake.stop()
    code, _, err = cli("-p", str(port), "ping")
    assert code == 3 and str(port) in err
    with FakeServer() as hung:
        hung.actions["get"].append("hang")
        code, _, err = cli(*at(hung, "--timeout", "0.3", "get", "k"))
        assert code == 3 and "0.3" in err


def test_server_errors_exit_5(fake):  # noqa: F811
    code, _, err = cli(*at(fake, "put", "full", "x"))
    assert code == 5 and "FULL" in err
    code, _, err = cli(*at(fake, "inject", "ao", "--offset", "0"))
    assert code == 5 and "DISABLED" in err


@pytest.mark.slow
def test_stats_ping_inject(fake):  # noqa: F811
    fake.data[b"a"] = (1, b"x")
    code, out, _ = cli(*at(fake, "stats"))
    assert code == 0 and b"keys: 1\n" in out and b'nested: {"a": 1}' in out
    code, out, _ = cli(*at(fake, "stats", "--json"))
    assert code == 0 and json.loads(out)["keys"] == 1
    assert cli(*at(fake, "ping"))[:2] == (0, b"PONG\n")
    assert cli(*at(fake, "ping", "hey"))[:2] == (0, b"hey\n")
    with FakeServer(injection=True) as server:
        code, out, _ = cli(*at(server, "inject", "hwpoison", "--offset", "8192"))
        assert code == 0 and out == b"offset=8192 subpage=2 kind=hwpoison\n"
        server.data[b"k"] = (1, b"v")
        code, out, _ = cli(*at(server, "inject", "ao", "--key", "k"))
        assert code == 0 and server.requests[-1][2] == ["ao", "key", b"k"]


@pytest.mark.slow
def test_url_password_and_env():
    with FakeServer(password="pw") as server:
        url = f"kv://:pw@127.0.0.1:{server.port}"
        assert cli("--url", url, "ping")[:2] == (0, b"PONG\n")
        assert cli("ping", env={"KVSTORE_URL": url})[:2] == (0, b"PONG\n")
        assert cli(*at(server, "-a", "pw", "ping"))[:2] == (0, b"PONG\n")
        code, _, err = cli(*at(server, "-a", "bad", "ping"))
        assert code == 5 and "password" in err
        code, _, err = cli(*at(server, "ping"))
        assert code == 5 and "NOAUTH" in err
    assert cli("--url", "http://x:1", "ping")[0] == 2


def test_non_utf8_key_bytes(fake):  # noqa: F811
    key = os.fsdecode(b"k\xff\xfe")
    code, _, err = cli(*at(fake, "put", key, "v"))
    assert code == 0, err
    assert b"k\xff\xfe" in fake.data
