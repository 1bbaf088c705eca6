"""The operators' view: the Prometheus Redis exporter scraping a
kvstore-server, kvstore's own /metrics (--metrics-port), INFO memory and
LATENCY as the exporter reads them."""

import re
import shutil
import socket
import subprocess
import urllib.request

import pytest
import redis

from serverutil import free_port, start_server, store_available, wait_for

pytestmark = pytest.mark.skipif(not store_available(),
                                reason="kvstore.Store is not in this checkout yet")

EXPORTER = shutil.which("prometheus-redis-exporter")


def scrape(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def metric(text, name, labels=None):
    """The value of the first sample of ``name`` (with ``labels`` a substring
    of its label set), or None."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m and m.group(1) == name and (labels is None or labels in (m.group(2) or "")):
            return float(m.group(3))
    return None


def test_info_memory_counts_what_the_store_uses():
    with start_server("--capacity", "16MiB") as srv:
        c = redis.Redis(host=srv.host, port=srv.port)
        c.set("k", "v")
        mem = c.info("memory")
        # not the 2 data bytes: the arena's records, the index, client buffers
        assert mem["used_memory"] > 1000
        assert mem["used_memory"] >= mem["kvstore_arena_used"] + mem["kvstore_index_bytes"]
        assert mem["used_memory_human"].endswith(("K", "M", "B"))
        assert mem["used_memory_peak"] >= mem["used_memory"]
        assert mem["maxmemory"] == 16 * 1024 * 1024
        before = mem["used_memory"]
        c.set("big", b"x" * 500_000)
        assert c.info("memory")["used_memory"] >= before + 500_000
        c.close()


def test_latency_subcommands_are_cleanly_formed():
    with start_server("--capacity", "16MiB") as srv:
        s = socket.create_connection((srv.host, srv.port))
        s.sendall(b"LATENCY LATEST\r\nLATENCY HISTOGRAM\r\nLATENCY RESET\r\n")
        from serverutil import recv_until
        assert recv_until(s, lambda d: d.count(b"\r\n") >= 3) == b"*0\r\n*0\r\n:0\r\n"
        s.close()
        c = redis.Redis(host=srv.host, port=srv.port, protocol=3)
        assert c.execute_command("LATENCY", "HISTOGRAM") == {}
        c.close()


@pytest.mark.skipif(EXPORTER is None, reason="prometheus-redis-exporter is not installed "
                                             "(Debian: apt-get install prometheus-redis-exporter)")
def test_redis_exporter_scrapes_kvstore():
    with start_server("--capacity", "16MiB") as srv:
        c = redis.Redis(host=srv.host, port=srv.port)
        for i in range(5):
            c.set(f"k{i}", "v" * 100)
        c.close()
        port = free_port()
        ex = subprocess.Popen([EXPORTER, "-redis.addr", f"redis://{srv.host}:{srv.port}",
                               "-web.listen-address", f"127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            def ready():
                try:
                    return scrape(f"http://127.0.0.1:{port}/metrics")
                except OSError:
                    return None
            text = wait_for(ready, timeout=20, what="the exporter")
            assert metric(text, "redis_up") == 1.0
            assert metric(text, "redis_db_keys", 'db="db0"') == 5.0
            used = metric(text, "redis_memory_used_bytes")
            assert used is not None and used > 1000          # not the data bytes alone
            assert metric(text, "redis_connected_clients") >= 1
            assert metric(text, "redis_memory_max_bytes") == 16 * 1024 * 1024
            assert metric(text, "redis_exporter_last_scrape_error") == 0.0
            assert metric(text, "redis_commands_processed_total") >= 5
        finally:
            ex.terminate()
            ex.wait(10)
        assert "panic" not in ex.stderr.read().decode()


def test_metrics_port_serves_kvstore_metrics():
    pytest.importorskip("prometheus_client")
    with start_server("--capacity", "16MiB", "--metrics-port", "0",
                      "--enable-fault-injection") as srv:
        m = wait_for(lambda: re.search(r"metrics_listening.*port=(\d+)", srv.logs()),
                     what="the metrics endpoint")
        port = int(m.group(1))
        c = redis.Redis(host=srv.host, port=srv.port)
        c.set("k", "v")
        c.execute_command("KV.INJECT", "ao", "KEY", "k")
        wait_for(lambda: c.info("stats")["total_commands_processed"] > 2, what="commands")
        text = wait_for(lambda: (lambda t: t if metric(t, "kvstore_recovery_seconds_count")
                                 else None)(scrape(f"http://127.0.0.1:{port}/metrics")),
                        timeout=20, what="a recovery observed")
        assert metric(text, "kvstore_keys") is not None
        assert metric(text, "process_resident_memory_bytes") > 0
        assert metric(text, "kvstore_injected_faults_total", 'kind="ao"') == 1.0
        assert metric(text, "kvstore_info") == 1.0
        # the recovery shows in LATENCY LATEST too
        latest = c.execute_command("LATENCY", "LATEST")
        assert latest and latest[0][0] == b"recovery"
        c.close()


def test_metrics_rebuild_histogram_counts_keys_rebuilt_from_a_replica():
    """A key lost on the primary and rebuilt from its replica is one
    observation of kvstore_rebuild_seconds (loss to reinstall)."""
    pytest.importorskip("prometheus_client")
    import replutil
    with replutil.start("--metrics-port", "0") as primary, \
            replutil.start_replica(primary) as replica:
        c = redis.Redis(host=primary.host, port=primary.port)
        for i in range(20):
            c.set(f"k{i}", f"v{i}")
        replutil.wait_synced(primary, replica)
        port = int(wait_for(lambda: re.search(r"metrics_listening.*port=(\d+)", primary.logs()),
                            what="the metrics endpoint").group(1))
        c.execute_command("KV.INJECT", "ao", "KEY", "k7")
        wait_for(lambda: c.info("kvstore")["rebuilt_keys"] >= 1, timeout=30,
                 what="the key rebuilt from the replica")
        text = scrape(f"http://127.0.0.1:{port}/metrics")
        assert metric(text, "kvstore_rebuild_seconds_count") >= 1
        assert metric(text, "kvstore_recovery_seconds_count") >= 1
        assert c.get("k7") == b"v7"
        c.close()
