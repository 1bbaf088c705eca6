"""Bounded memory per client and in total, and maxclients from the fd limit.

The reproductions of issue 14, each against a kvstore-server subprocess whose
peak memory is read from /proc/PID/status (VmHWM, reset through
/proc/PID/clear_refs before the abuse starts):

* 400 pipelined GET of a 1 MiB value with --max-output-buffer 8MiB (C path
  and Python path), one MGET of that key x400, the native mget of it x400:
  the client is dropped near its limit instead of the server building
  ~400 MiB of replies;
* clients each sending most of a 200 MiB bulk: --client-query-buffer-limit
  drops one, --maxmemory-clients the biggest;
* with RLIMIT_NOFILE 256, maxclients is 224 (Redis: limit - 32), logged and in
  INFO, and the next client gets Redis's "max number of clients reached".
"""

import re
import resource
import socket
import threading
import time

import msgpack
import pytest
import redis

from serverutil import recv_all, resp_command, start_server, store_available, wait_for
from test_server_native import MAGIC, frame

pytestmark = pytest.mark.skipif(not store_available(),
                                reason="kvstore.Store is not in this checkout yet")

MiB = 1024 * 1024
BIG = b"x" * MiB


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid):
    """Make VmHWM start again from the current RSS (Linux clear_refs 5)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    return status_kib(pid, "VmHWM")


def info(srv, section):
    c = redis.Redis(host=srv.host, port=srv.port, decode_responses=True)
    try:
        return c.info(section)
    finally:
        c.close()


def _load_big(srv):
    c = redis.Redis(host=srv.host, port=srv.port)
    c.set("big", BIG)
    c.close()


def _abuse_and_peak(srv, payload, read_hello=False):
    """Send ``payload`` without reading replies; return (peak growth in MiB,
    bytes the client got before it was closed)."""
    before = reset_peak(srv.pid)
    s = socket.create_connection((srv.host, srv.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(payload)
    time.sleep(0.5)
    got = recv_all(s, timeout=10)
    s.close()
    peak = status_kib(srv.pid, "VmHWM")
    return (peak - before) / 1024, len(got)


@pytest.mark.parametrize("fast", [True, False], ids=["c-path", "python-path"])
def test_pipelined_big_gets_stop_at_the_output_limit(fast):
    flags = ["--max-output-buffer", "8MiB", "--capacity", "64MiB"]
    if not fast:
        flags.append("--no-resp-fast")
    with start_server(*flags) as srv:
        _load_big(srv)
        grew, got = _abuse_and_peak(srv, resp_command("GET", "big") * 400)
        assert got < 64 * MiB                     # cut off, not 400 MiB delivered
        assert grew < 96, f"server grew by {grew:.0f} MiB"
        st = info(srv, "stats")
        assert st["client_output_buffer_limit_disconnections"] >= 1
        assert info(srv, "clients")["kvstore_last_dropped_client"]["reason"] == "output_buffer_limit"
        assert "output buffer limit" in srv.logs()
        assert srv.alive()


def test_mget_of_many_big_values_stops_at_the_output_limit():
    with start_server("--max-output-buffer", "8MiB", "--capacity", "64MiB") as srv:
        _load_big(srv)
        grew, got = _abuse_and_peak(srv, resp_command("MGET", *(["big"] * 400)))
        assert got < 64 * MiB
        assert grew < 96, f"server grew by {grew:.0f} MiB"
        assert info(srv, "stats")["client_output_buffer_limit_disconnections"] == 1
        # a small MGET still answers
        c = redis.Redis(host=srv.host, port=srv.port)
        c.set("a", "1")
        assert c.mget(["a", "nope", "a"] * 50) == [b"1", None, b"1"] * 50
        c.close()


def test_native_mget_of_many_big_values_stops_at_the_output_limit():
    with start_server("--max-output-buffer", "8MiB", "--capacity", "64MiB") as srv:
        _load_big(srv)
        payload = MAGIC + frame([1, "mget", [[b"big"] * 400]])
        grew, got = _abuse_and_peak(srv, payload)
        assert got < 64 * MiB
        assert grew < 96, f"server grew by {grew:.0f} MiB"
        assert info(srv, "stats")["client_output_buffer_limit_disconnections"] == 1


def _partial_bulk(srv, size, sent, errors):
    s = socket.create_connection((srv.host, srv.port))
    try:
        s.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n" % (size + 1000))
        chunk = b"y" * MiB
        for _ in range(size // MiB):
            s.sendall(chunk)
            sent.append(MiB)
        time.sleep(0.5)
    except OSError as e:
        errors.append(e)
    finally:
        s.close()


def test_query_buffer_limit_closes_the_client():
    with start_server("--client-query-buffer-limit", "16MiB", "--capacity", "16MiB") as srv:
        sent, errors = [], []
        _partial_bulk(srv, 64 * MiB, sent, errors)
        assert errors, "the server should have closed the connection"
        assert sum(sent) < 48 * MiB
        assert info(srv, "stats")["client_query_buffer_limit_disconnections"] == 1
        assert "query buffer limit" in srv.logs()


@pytest.mark.slow
def test_maxmemory_clients_drops_the_biggest_clients():
    with start_server("--maxmemory-clients", "64MiB", "--capacity", "64MiB") as srv:
        before = reset_peak(srv.pid)
        sent, errors = [], []
        threads = [threading.Thread(target=_partial_bulk, args=(srv, 200 * MiB, sent, errors))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        grew = (status_kib(srv.pid, "VmHWM") - before) / 1024
        assert len(errors) >= 3, "most clients should have been dropped"
        assert grew < 200, f"server grew by {grew:.0f} MiB with a 64 MiB cap"
        assert info(srv, "stats")["evicted_clients"] >= 3
        assert srv.alive()
        c = redis.Redis(host=srv.host, port=srv.port)
        assert c.ping()
        c.close()


def test_maxmemory_clients_counts_unread_output():
    with start_server("--maxmemory-clients", "16MiB", "--capacity", "64MiB",
                      "--no-resp-fast") as srv:
        _load_big(srv)
        s = socket.create_connection((srv.host, srv.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(resp_command("GET", "big") * 40)
        wait_for(lambda: info(srv, "stats")["evicted_clients"] == 1, timeout=20,
                 what="the client holding 40 MiB of replies to be evicted")
        s.close()


def _low_nofile():
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def test_maxclients_follows_the_fd_limit():
    with start_server("--capacity", "16MiB", preexec_fn=_low_nofile) as srv:
        assert info(srv, "clients")["maxclients"] == 224
        assert "maxclients_reduced" in srv.logs()
        socks = []
        try:
            for _ in range(224):
                s = socket.create_connection((srv.host, srv.port))
                s.sendall(resp_command("PING"))
                assert s.recv(64) == b"+PONG\r\n"
                socks.append(s)
            s = socket.create_connection((srv.host, srv.port))
            s.sendall(resp_command("PING"))
            assert recv_all(s, timeout=5) == b"-ERR max number of clients reached\r\n"
            s.close()
            n = socket.create_connection((srv.host, srv.port))
            n.sendall(MAGIC)
            data = recv_all(n, timeout=5)
            n.close()
            body = msgpack.unpackb(data[4:], raw=False)
            assert body[1] == 1 and body[2][0] == "BUSY"
            assert "max_clients" in srv.logs()
        finally:
            for s in socks:
                s.close()
        wait_for(lambda: info(srv, "stats")["rejected_connections"] >= 2, what="rejections")


def test_client_list_and_info_show_client_memory():
    with start_server("--capacity", "16MiB", "--maxmemory-clients", "1GiB") as srv:
        s = socket.create_connection((srv.host, srv.port))
        s.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3000000\r\n" + b"z" * 2_000_000)
        c = redis.Redis(host=srv.host, port=srv.port, decode_responses=True)
        wait_for(lambda: c.info("clients")["client_recent_max_input_buffer"] >= 1_000_000,
                 what="the partial bulk to be buffered")
        lines = c.execute_command("CLIENT", "LIST")
        lines = lines if isinstance(lines, str) else "\n".join(
            " ".join(f"{k}={v}" for k, v in d.items()) for d in lines)
        assert re.search(r"qbuf=\d{7}", lines), lines
        assert "user=default" in lines
        assert c.info("memory")["mem_clients_normal"] >= 1_000_000
        assert c.config_get("maxmemory-clients") == {"maxmemory-clients": str(1 << 30)}
        c.close()
        s.close()


def test_client_no_evict_exempts_a_client_from_maxmemory_clients():
    with start_server("--maxmemory-clients", "8MiB", "--capacity", "64MiB") as srv:
        keep = socket.create_connection((srv.host, srv.port))
        keep.sendall(resp_command("CLIENT", "NO-EVICT", "ON"))
        assert keep.recv(100) == b"+OK\r\n"
        keep.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$30000000\r\n" + b"z" * 12 * MiB)
        other = socket.create_connection((srv.host, srv.port))
        other.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nj\r\n$30000000\r\n" + b"z" * 2 * MiB)
        wait_for(lambda: info(srv, "stats")["evicted_clients"] >= 1, what="an eviction")
        try:
            got = recv_all(other, timeout=5)
        except ConnectionResetError:              # dropped with its input unread: RST
            got = b""
        assert got == b""                         # the other client was dropped
        keep.sendall(b"z" * (30000000 - 12 * MiB) + b"\r\n")
        assert keep.recv(100) == b"+OK\r\n"                # the exempt one was not
        keep.close()
        other.close()
        s = socket.create_connection((srv.host, srv.port))
        s.sendall(resp_command("CLIENT", "NO-EVICT", "maybe"))
        assert s.recv(100) == b"-ERR syntax error\r\n"
        s.close()


def test_maxmemory_clients_as_a_percentage_of_capacity():
    with start_server("--capacity", "16MiB", "--maxmemory-clients", "25%") as srv:
        assert info(srv, "memory")["maxmemory_clients"] == 4 * MiB
