"""server/metrics.py: the Prometheus endpoint, scraped over HTTP and parsed
with prometheus_client's own text parser; once with a fixed stats dict, once
with a real kvstore-server's KV.STATS as the provider."""

import asyncio
import threading
import urllib.request

import pytest

from serverutil import start_server, store_available


prometheus_client = pytest.importorskip(
    "prometheus_client", reason="prometheus_client is in the server and test extras")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from kvstore.server.metrics import loop_stats_provider, start_metrics_server  # noqa: E402

STATS = {
    "backing": "hugetlb-1G", "page_size": "1G", "keep_ue": False, "kernel_policy": "mainline",
    "repl_role": "master", "keys": 12, "lost_keys": 2, "keys_lost_total": 5, "rebuilt_keys": 3,
    "unrecoverable_keys": 1, "lost_subpages": 4, "pages_salvaged": 1, "subpages_salvaged": 511,
    "signals_ao": 2, "signals_ar": 1, "signals_adrerr": 0, "signals_chained": 0,
    "injected_ao": 2, "injected_ar": 1, "injected_hwpoison": 0, "capacity": 1 << 20,
    "used": 900, "server_total_commands": 77, "brand_new_field": 9, "fallback_reason": None,
    "repl_replicas": [],
}


def scrape(m):
    with urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def metrics():
    box = {"stats": dict(STATS), "fail": False}

    def provider():
        if box["fail"]:
            raise RuntimeError("store closed")
        return box["stats"]
    m = start_metrics_server("127.0.0.1", 0, provider)
    yield m, box
    m.stop()


def test_scrape(metrics):
    m, _ = metrics
    s = scrape(m)
    assert value(s, "kvstore_stats_up") == 1
    assert value(s, "kvstore_info", backing="hugetlb-1G", page_size="1G", keep_ue="false",
                 kernel_policy="mainline", role="master") == 1
    assert value(s, "kvstore_memory_errors_total", kind="ao") == 2
    assert value(s, "kvstore_memory_errors_total", kind="ar") == 1
    assert value(s, "kvstore_injected_faults_total", kind="hwpoison") == 0
    assert value(s, "kvstore_lost_subpages") == 4
    assert value(s, "kvstore_keys_lost_total") == 5
    assert value(s, "kvstore_keys_rebuilt_total") == 3
    assert value(s, "kvstore_keys_unrecoverable_total") == 1
    assert value(s, "kvstore_pages_salvaged_total") == 1
    assert value(s, "kvstore_capacity_bytes") == 1 << 20
    assert value(s, "kvstore_commands_total") == 77
    assert value(s, "kvstore_stat_brand_new_field") == 9
    assert value(s, "process_resident_memory_bytes") > 0
    assert value(s, "kvstore_recovery_seconds_count") == 0


def test_histograms_and_changing_stats(metrics):
    m, box = metrics
    m.observe_recovery(0.003)
    m.observe_recovery(2.0)
    m.observe_rebuild(0.2)
    box["stats"]["lost_subpages"] = 9
    s = scrape(m)
    assert value(s, "kvstore_recovery_seconds_count") == 2
    assert value(s, "kvstore_recovery_seconds_bucket", le="0.005") == 1
    assert value(s, "kvstore_recovery_seconds_bucket", le="+Inf") == 2
    assert value(s, "kvstore_rebuild_seconds_sum") == pytest.approx(0.2)
    assert value(s, "kvstore_lost_subpages") == 9


def test_provider_failure_still_answers(metrics):
    m, box = metrics
    box["fail"] = True
    s = scrape(m)
    assert value(s, "kvstore_stats_up") == 0
    assert value(s, "process_resident_memory_bytes") > 0
    assert not any(name == "kvstore_keys" for name, _ in s)


def test_loop_stats_provider():
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        seen = []

        def on_loop():
            seen.append(threading.current_thread())
            return {"keys": 3}
        m = start_metrics_server("127.0.0.1", 0, loop_stats_provider(loop, on_loop))
        try:
            assert value(scrape(m), "kvstore_keys") == 3
            assert seen == [t]
        finally:
            m.stop()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        loop.close()


@pytest.mark.skipif(not store_available(), reason="kvstore.Store is not in this checkout yet")
def test_real_server_stats():
    import redis
    srv = start_server("--capacity", "16MiB")
    try:
        r = redis.Redis(host=srv.host, port=srv.port, decode_responses=False, protocol=2)
        r.set("a", "b")
        raw = r.execute_command("KV.STATS")
        if isinstance(raw, list):
            raw = dict(zip(raw[::2], raw[1::2]))
        m = start_metrics_server("127.0.0.1", 0, lambda: raw)
        try:
            s = scrape(m)
        finally:
            m.stop()
        r.close()
    finally:
        srv.stop()
    assert value(s, "kvstore_keys") == 1
    labels = [lab for name, lab in s if name == "kvstore_info"]
    assert len(labels) == 1 and dict(labels[0])["backing"] and dict(labels[0])["page_size"]
    assert value(s, "kvstore_memory_errors_total", kind="ar") == 0
    assert value(s, "kvstore_used_bytes") > 0
