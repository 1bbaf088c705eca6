"""Helpers for the replication tests: primaries and replicas as real processes.

Every server runs on 127.0.0.1 with ``--port 0`` on 4 KiB backing (no
hugepages needed) with fault injection on; ``--kernel-policy`` is chosen per
test. ``digest(port)`` asks ``KV.DIGEST`` (xxh64 over sorted
(key, version, value)); ``wait_synced`` polls until a replica has applied
the primary's whole stream and both digests agree.
"""

import redis

from kvstore.client import Client
from serverutil import start_server, wait_for

BASE = ("--capacity", "96MiB", "--page-size", "4K", "--enable-fault-injection")


def start(*flags, policy="keep_ue"):
    return start_server(*BASE, "--kernel-policy", policy, *flags)


def start_replica(primary, *flags, policy="keep_ue"):
    return start(*flags, "--replica-of", f"127.0.0.1:{primary.port}", policy=policy)


def rc(srv, **kw):
    return redis.Redis(host="127.0.0.1", port=srv.port, socket_timeout=20, **kw)


def client(srv, **kw):
    kw.setdefault("socket_timeout", 20)
    return Client("127.0.0.1", srv.port, **kw)


def info(srv):
    return rc(srv).info("replication")


def digest(srv):
    keys, lost, dig = rc(srv).execute_command("KV.DIGEST")
    return int(keys), int(lost), dig


def wait_link_up(replica, timeout=30.0):
    return wait_for(lambda: info(replica).get("master_link_status") == "up"
                    and not info(replica).get("master_sync_in_progress"),
                    timeout, what="replica link up")


def wait_synced(primary, replica, timeout=60.0):
    def ok():
        pi, ri = info(primary), info(replica)
        if ri.get("master_link_status") != "up" or ri.get("master_sync_in_progress"):
            return False
        if ri["slave_repl_offset"] != pi["master_repl_offset"]:
            return False
        return digest(primary) == digest(replica)
    return wait_for(ok, timeout, 0.1, "replica in sync (offset and digest)")


def log_events(srv, name):
    return [line for line in srv.logs().splitlines() if f"event={name} " in line + " "]
