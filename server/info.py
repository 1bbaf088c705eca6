"""The INFO text (RESP ``INFO [section ...]``)."""

import os
import platform
import resource
import sys
import time

import kvstore

__all__ = ["REDIS_VERSION", "info_sections"]

#: The Redis version we answer as (INFO redis_version, HELLO version).
REDIS_VERSION = "7.2.0"

def info_sections(server, wanted):
    """Build INFO text; ``wanted`` is a list of lowercase section names."""
    st = server.store
    now = time.time()
    up = int(now - server.started)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    try:
        stats = dict(st.stats())
    except Exception as e:  # noqa: BLE001 - INFO must answer even then
        from .logs import event
        event("error", "stats_failed", error=f"{type(e).__name__}: {e}")
        stats = {"error": "the store's stats are unavailable (see the server log)"}
    nkeys = stats.get("keys")
    if nkeys is None:
        nkeys = len(st)
    used = stats.get("used", 0) or 0
    cmem = server.clients_memory()
    mem_clients = sum(m for m, _ in cmem)
    max_in = max((c.parser.buffered() for _, c in cmem if getattr(c, "parser", None) is not None),
                 default=0)
    max_out = max((m for m, c in cmem), default=0)
    cap = int(stats.get("capacity", 0) or 0)
    if "free_subpages" in stats and cap:
        # subpages holding records (live or dead until compaction)
        arena_used = max(0, cap - int(stats["free_subpages"]) * 4096)
    else:
        arena_used = used + int(stats.get("dead_bytes", 0) or 0)
    index = int(stats.get("index_bytes", 0) or 0)
    if not stats.get("allocator_in_arena"):
        # in process memory (no room for it in the arena); else arena_used has it
        index += int(stats.get("allocator_bytes", 0) or 0)
    # As Redis's used_memory: what the store really holds (the arena's
    # subpages in use, the index and the allocator's tables) plus the
    # clients' buffers.
    used_memory = arena_used + index + mem_clients
    server.used_memory_peak = max(getattr(server, "used_memory_peak", 0), used_memory)
    rss = _rss()
    d = server.dropped
    last = server.last_dropped
    sections = {
        "server": {
            "redis_version": REDIS_VERSION, "kvstore_version": kvstore.__version__,
            "redis_mode": "standalone", "os": f"{platform.system()} {platform.release()} {platform.machine()}",
            "arch_bits": 64 if sys.maxsize > 2**32 else 32, "multiplexing_api": server.loop_name,
            "process_id": os.getpid(), "run_id": getattr(server, "run_id", ""), "tcp_port": server.port, "uptime_in_seconds": up,
            "uptime_in_days": up // 86400, "executable": sys.executable,
            "python_version": platform.python_version(),
        },
        "clients": {
            "connected_clients": len(server.clients), "maxclients": server.config.max_clients,
            "blocked_clients": 0,
            "client_recent_max_input_buffer": max_in,
            "client_recent_max_output_buffer": max(0, max_out - max_in),
            "client_query_buffer_limit": server.config.max_query_buffer,
            "client_output_buffer_limit": server.config.max_output_buffer,
            "kvstore_last_dropped_client": (
                f"id={last[0]},addr={last[1]},reason={last[2]},bytes={last[3]}"
                if last else "none"),
        },
        "memory": {
            "used_memory": used_memory, "used_memory_human": _human(used_memory),
            "used_memory_rss": rss, "used_memory_rss_human": _human(rss),
            "used_memory_peak": server.used_memory_peak,
            "used_memory_peak_human": _human(server.used_memory_peak),
            "used_memory_overhead": index + mem_clients,
            "used_memory_dataset": used, "used_memory_lua": 0, "used_memory_scripts": 0,
            "mem_clients_normal": mem_clients, "mem_clients_slaves": 0,
            "kvstore_arena_used": arena_used, "kvstore_index_bytes": index,
            "kvstore_dead_bytes": stats.get("dead_bytes", 0),
            "maxmemory": stats.get("capacity", 0),
            "maxmemory_human": _human(int(stats.get("capacity", 0) or 0)),
            "maxmemory_policy": "noeviction",
            "maxmemory_clients": server.config.maxmemory_clients,
            "mem_fragmentation_ratio": round(rss / used_memory, 2) if used_memory else 0,
            "total_system_memory": _total_memory(),
        },
        "persistence": {"loading": 0, "rdb_bgsave_in_progress": 0, "aof_enabled": 0},
        "stats": {
            "total_connections_received": server.stats_connections,
            "total_commands_processed": server.stats_commands,
            "kvstore_fast_commands": server.stats_fast_commands,
            "rejected_connections": server.stats_rejected,
            "kvstore_protected_mode_rejections": server.stats_protected,
            "client_query_buffer_limit_disconnections": d["query_buffer_limit"],
            "client_output_buffer_limit_disconnections": d["output_buffer_limit"],
            "evicted_clients": d["maxmemory_clients"],
        },
        "replication": (server.repl.info() if getattr(server, "repl", None) is not None
                        else {"role": "master", "connected_slaves": 0}),
        "cpu": {"used_cpu_sys": round(ru.ru_stime, 6), "used_cpu_user": round(ru.ru_utime, 6)},
        "keyspace": ({"db0": f"keys={nkeys},expires={stats.get('keys_with_ttl', 0)},avg_ttl=0"}
                     if nkeys else {}),
        "kvstore": stats,
    }
    if hasattr(server, "recovery_state"):
        stats.update(server.recovery_state())
    if not wanted or any(w in ("all", "everything", "default") for w in wanted):
        names = list(sections)
    else:
        names = [n for n in sections if n in wanted]
    out = []
    for n in names:
        title = n.capitalize() if n != "cpu" else "CPU"
        if n == "kvstore":
            title = "kvstore"
        out.append(f"# {title}\r\n")
        for k, v in sections[n].items():
            if isinstance(v, bool):
                v = int(v)
            elif isinstance(v, bytes):
                v = v.decode("latin-1")
            out.append(f"{k}:{v}\r\n")
        out.append("\r\n")
    return "".join(out).rstrip("\r\n") + "\r\n"


def _human(n):
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.2f}{unit}" if unit != "B" else f"{n}B"
        n /= 1024
    return str(n)


def _total_memory():
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _rss():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
