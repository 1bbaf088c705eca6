"""Prometheus endpoint (``/metrics``) served with the standard
``prometheus_client`` library.

    m = start_metrics_server("127.0.0.1", 9121, stats_provider)
    m.port                       # the bound port (0 picks a free one)
    m.observe_recovery(seconds)  # one recovery pass (salvage + invalidation)
    m.observe_rebuild(seconds)   # one key rebuilt, from loss to repair
    m.stop()

``stats_provider()`` returns the server's stats dict (what ``KV.STATS``
answers: ``Store.stats()`` plus the ``server_*`` and ``repl_*`` fields). It
is called on the HTTP server's thread at every scrape, so it must be safe to
call from there; :func:`loop_stats_provider` wraps a function that has to
run on the asyncio loop. When it raises, the scrape still answers, with the
process metrics and ``kvstore_stats_up 0``.

Exposed, besides the library's process metrics (``process_*``: CPU, RSS,
open fds, start time) and Python's (``python_info``, ``python_gc_*``):

- ``kvstore_info{backing, page_size, keep_ue, kernel_policy, role}`` = 1;
- ``kvstore_memory_errors_total{kind}``: machine-check signals taken, by
  kind (``ao`` action optional, ``ar`` action required, ``adrerr``,
  ``chained``), and ``kvstore_injected_faults_total{kind}`` (``ao``, ``ar``,
  ``hwpoison``) for the simulator and ``KV.INJECT``;
- ``kvstore_lost_subpages``, ``kvstore_loss_events_total``,
  ``kvstore_pages_salvaged_total``, ``kvstore_subpages_salvaged_total``,
  ``kvstore_salvage_failed_total``, ``kvstore_pages_degraded_to_4k_total``;
- keys: ``kvstore_keys``, ``kvstore_lost_keys`` (now),
  ``kvstore_keys_lost_total``, ``kvstore_keys_rebuilt_total``,
  ``kvstore_keys_unrecoverable_total``, ``kvstore_rebuild_pending``,
  ``kvstore_read_repairs_total``, ``kvstore_checksum_failures_total`` ...;
- memory: ``kvstore_capacity_bytes``, ``kvstore_used_bytes``,
  ``kvstore_dead_bytes``, ``kvstore_index_bytes``, ``kvstore_allocator_bytes``,
  ``kvstore_arena_bytes``;
- server: ``kvstore_connected_clients``, ``kvstore_connections_total``,
  ``kvstore_rejected_connections_total``, ``kvstore_commands_total``;
- histograms ``kvstore_recovery_seconds`` and ``kvstore_rebuild_seconds``;
- every other numeric stat as ``kvstore_stat_<name>`` (gauge), so a new
  field shows up without a change here.
"""

import asyncio

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

__all__ = ["start_metrics_server", "MetricsServer", "StatsCollector", "loop_stats_provider"]

# stats key -> (metric name, type, help). Counters get "_total" from the library.
_MAPPED = {
    "keys": ("kvstore_keys", "gauge", "Live keys in the store."),
    "lost_keys": ("kvstore_lost_keys", "gauge", "Keys lost to memory errors and not yet rebuilt."),
    "keys_lost_total": ("kvstore_keys_lost", "counter", "Keys lost to memory errors since start."),
    "rebuilt_keys": ("kvstore_keys_rebuilt", "counter", "Lost keys rebuilt (from a replica or peer)."),
    "unrecoverable_keys": ("kvstore_keys_unrecoverable", "counter",
                           "Lost keys no source could rebuild."),
    "rebuild_pending": ("kvstore_rebuild_pending", "gauge", "Lost keys waiting to be rebuilt."),
    "read_repairs": ("kvstore_read_repairs", "counter", "Lost keys repaired on read."),
    "rebuild_fetches": ("kvstore_rebuild_fetches", "counter", "Fetches from a rebuild source."),
    "lost_subpages": ("kvstore_lost_subpages", "gauge", "4 KiB subpages lost to memory errors."),
    "loss_events": ("kvstore_loss_events", "counter", "Memory-loss events handled."),
    "pages_salvaged": ("kvstore_pages_salvaged", "counter", "Poisoned hugepages salvaged."),
    "subpages_salvaged": ("kvstore_subpages_salvaged", "counter",
                          "Readable subpages copied out of poisoned hugepages."),
    "salvage_failed": ("kvstore_salvage_failed", "counter", "Salvage attempts that failed."),
    "pages_degraded_to_4k": ("kvstore_pages_degraded_to_4k", "counter",
                             "Hugepages replaced by 4 KiB pages (no spare hugepage)."),
    "checksum_failures": ("kvstore_checksum_failures", "counter", "Records failing their checksum."),
    "faults_on_access": ("kvstore_faults_on_access", "counter",
                         "Memory errors met while reading a record."),
    "recoveries": ("kvstore_recoveries", "counter", "Recovery passes run."),
    "expired_keys": ("kvstore_expired_keys", "counter", "Keys removed by expiry."),
    "compactions": ("kvstore_compactions", "counter", "Arena compactions."),
    "scrub_found": ("kvstore_scrub_found", "counter", "Errors found by the background scrub."),
    "capacity": ("kvstore_capacity_bytes", "gauge", "Store capacity."),
    "used": ("kvstore_used_bytes", "gauge", "Bytes of live records."),
    "dead_bytes": ("kvstore_dead_bytes", "gauge", "Bytes of dead records not yet compacted."),
    "index_bytes": ("kvstore_index_bytes", "gauge", "Bytes used by the index."),
    "allocator_bytes": ("kvstore_allocator_bytes", "gauge", "Bytes used by allocator metadata."),
    "arena_bytes": ("kvstore_arena_bytes", "gauge", "Bytes mapped for the arena."),
    "free_subpages": ("kvstore_free_subpages", "gauge", "Free 4 KiB subpages."),
    "quarantined_subpages": ("kvstore_quarantined_subpages", "gauge",
                             "Subpages taken out of use after an error."),
    "server_connected_clients": ("kvstore_connected_clients", "gauge", "Open client connections."),
    "server_total_connections": ("kvstore_connections", "counter", "Connections accepted."),
    "server_rejected_connections": ("kvstore_rejected_connections", "counter",
                                    "Connections refused (max clients)."),
    "server_total_commands": ("kvstore_commands", "counter", "Commands processed."),
    "repl_connected_slaves": ("kvstore_connected_replicas", "gauge", "Connected replicas."),
}
_SIGNALS = {"signals_ao": "ao", "signals_ar": "ar", "signals_adrerr": "adrerr",
            "signals_chained": "chained"}
_INJECTED = {"injected_ao": "ao", "injected_ar": "ar", "injected_hwpoison": "hwpoison"}
_INFO = ("backing", "page_size", "keep_ue", "kernel_policy", "repl_role")

# Recovery runs in milliseconds to seconds (a 1 GiB salvage); a rebuild
# from a peer in milliseconds to minutes.
_RECOVERY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                     5, 10, 30, 60)
_REBUILD_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def _label(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return "" if v is None else str(v)


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class StatsCollector:
    """Turns one stats dict into metric families at each scrape."""

    def __init__(self, stats_provider):
        self.stats_provider = stats_provider

    def describe(self):
        return []       # families depend on the stats: no checks at register time

    def collect(self):
        up = GaugeMetricFamily("kvstore_stats_up", "1 when the server's stats could be read.")
        try:
            stats = self.stats_provider()
            stats = {(k.decode() if isinstance(k, bytes) else k): v for k, v in stats.items()}
        except Exception:  # noqa: BLE001 - a scrape must not fail with the server
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        info = GaugeMetricFamily("kvstore_info", "Backing, page size, keep-UE, kernel policy, role.",
                                 labels=["backing", "page_size", "keep_ue", "kernel_policy", "role"])
        info.add_metric([_label(stats.get(k)) for k in _INFO], 1)
        yield info
        errs = CounterMetricFamily("kvstore_memory_errors", "Machine-check signals taken, by kind.",
                                   labels=["kind"])
        for key, kind in _SIGNALS.items():
            if _number(stats.get(key)):
                errs.add_metric([kind], stats[key])
        yield errs
        inj = CounterMetricFamily("kvstore_injected_faults", "Faults injected, by kind.",
                                  labels=["kind"])
        for key, kind in _INJECTED.items():
            if _number(stats.get(key)):
                inj.add_metric([kind], stats[key])
        yield inj
        seen = set(_SIGNALS) | set(_INJECTED) | set(_INFO)
        for key, (name, kind, doc) in _MAPPED.items():
            v = stats.get(key)
            seen.add(key)
            if not _number(v):
                continue
            fam = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, doc)
            fam.add_metric([], v)
            yield fam
        for key, v in sorted(stats.items()):
            if key in seen or not _number(v):
                continue
            name = "kvstore_stat_" + "".join(c if c.isalnum() else "_" for c in key)
            fam = GaugeMetricFamily(name, f"The {key} field of KV.STATS.")
            fam.add_metric([], v)
            yield fam


class MetricsServer:
    """A running endpoint: its registry, bound address and histograms."""

    def __init__(self, host, port, stats_provider):
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(StatsCollector(stats_provider))
        self.recovery_seconds = Histogram(
            "kvstore_recovery_seconds", "Time of one recovery pass (salvage and invalidation).",
            buckets=_RECOVERY_BUCKETS, registry=self.registry)
        self.rebuild_seconds = Histogram(
            "kvstore_rebuild_seconds", "Time from a key's loss to its rebuild.",
            buckets=_REBUILD_BUCKETS, registry=self.registry)
        self._httpd, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.host = host
        self.port = self._httpd.server_port

    def observe_recovery(self, seconds):
        self.recovery_seconds.observe(seconds)

    def observe_rebuild(self, seconds):
        self.rebuild_seconds.observe(seconds)

    def stop(self):
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def start_metrics_server(host, port, stats_provider):
    """Serve ``/metrics`` on ``host:port`` (0: a free port) in a daemon
    thread; returns the :class:`MetricsServer`."""
    return MetricsServer(host, port, stats_provider)


def loop_stats_provider(loop, fn, timeout=2.0):
    """A provider that runs ``fn()`` on the asyncio ``loop`` (where the
    server's state lives) and waits for its result from the HTTP thread."""
    async def call():
        return fn()

    def provider():
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return fn()
        return asyncio.run_coroutine_threadsafe(call(), loop).result(timeout)
    return provider
