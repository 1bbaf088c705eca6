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
        stats = {"error": f"{type(e).__name__}: {e}"}
    nkeys = stats.get("keys")
    if nkeys is None:
        nkeys = len(st)
    used = stats.get("used", 0) or 0
    sections = {
        "server": {
            "redis_version": REDIS_VERSION, "kvstore_version": kvstore.__version__,
            "redis_mode": "standalone", "os": f"{platform.system()} {platform.release()} {platform.machine()}",
            "arch_bits": 64 if sys.maxsize > 2**32 else 32, "multiplexing_api": server.loop_name,
            "process_id": os.getpid(), "tcp_port": server.port, "uptime_in_seconds": up,
            "uptime_in_days": up // 86400, "executable": sys.executable,
            "python_version": platform.python_version(),
        },
        "clients": {
            "connected_clients": len(server.clients), "maxclients": server.config.max_clients,
            "blocked_clients": 0,
        },
        "memory": {
            "used_memory": used, "used_memory_human": _human(used),
            "maxmemory": stats.get("capacity", 0), "maxmemory_policy": "noeviction",
            "used_memory_rss": _rss(),
        },
        "persistence": {"loading": 0, "rdb_bgsave_in_progress": 0, "aof_enabled": 0},
        "stats": {
            "total_connections_received": server.stats_connections,
            "total_commands_processed": server.stats_commands,
            "rejected_connections": server.stats_rejected,
        },
        "replication": (server.repl.info() if getattr(server, "repl", None) is not None
                        else {"role": "master", "connected_slaves": 0}),
        "cpu": {"used_cpu_sys": round(ru.ru_stime, 6), "used_cpu_user": round(ru.ru_utime, 6)},
        "keyspace": ({"db0": f"keys={nkeys},expires={stats.get('keys_with_ttl', 0)},avg_ttl=0"}
                     if nkeys else {}),
        "kvstore": stats,
    }
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


def _rss():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
