"""Server configuration: defaults, TOML config file, command-line flags.

Precedence: built-in defaults < ``--config file.toml`` < explicit flags. The
TOML file uses the flag names with ``_`` or ``-`` (``max_clients = 100``);
an unknown key is an error, so a typo never silently does nothing.
"""

import argparse
import dataclasses
import os
import re
import tomllib

__all__ = ["ServerConfig", "parse_size", "build_parser", "load_config"]

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2,
          "mb": 1000**2, "mib": 1024**2, "g": 1000**3, "gb": 1000**3,
          "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(v):
    """``"64MiB"`` -> 67108864; ints pass through. ``k/m/g`` are powers of 1000
    as in redis.conf, ``KiB/MiB/GiB`` powers of 1024."""
    if isinstance(v, bool):
        raise ValueError(f"not a size: {v!r}")
    if isinstance(v, int):
        if v < 0:
            raise ValueError(f"size must be >= 0: {v}")
        return v
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", str(v))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {v!r} (examples: 1024, 64MiB, 1GiB)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


@dataclasses.dataclass
class ServerConfig:
    bind: str = "127.0.0.1"            # space/comma separated list allowed
    port: int = 7379                   # 0 picks a free port
    capacity: str = "256MiB"
    page_size: str = "auto"
    kernel_policy: str = "auto"
    enable_fault_injection: bool = False
    allow_flushall: bool = True
    requirepass: str = ""              # the default user's password (see resolve_password)
    requirepass_file: str = ""         # read the password from this file (first line)
    aclfile: str = ""                  # users in Redis's ACL file format (server/acl.py)
    protected_mode: bool = True        # no password: refuse clients beyond loopback
    maxmemory_clients: int = 0         # total client buffers ("N%": of capacity); 0 = no cap
    metrics_port: int = -1             # Prometheus /metrics port; -1 = off, 0 = pick one
    metrics_bind: str = "127.0.0.1"
    log_level: str = "info"
    max_clients: int = 10000
    max_key: int = 65536
    max_value: int = 512 * 1024 * 1024
    max_frame: int = (512 + 1) * 1024 * 1024
    max_multibulk: int = 1024 * 1024
    max_bulk: int = 512 * 1024 * 1024
    max_inline: int = 64 * 1024
    max_query_buffer: int = 1024 * 1024 * 1024
    max_output_buffer: int = 1024 * 1024 * 1024   # per client, 0 = unlimited
    idle_timeout: float = 0.0          # seconds, 0 = never close idle clients
    shutdown_timeout: float = 5.0
    use_uvloop: bool = True
    resp_fast: bool = True             # plain RESP GET/SET run in C (engine.resp_fast)
    # replication (server/replication.py)
    replica_of: str = ""               # "HOST:PORT": start as a replica of that primary
    supervise: bool = False            # run under a parent that restarts the worker (supervise.py)
    masterauth: str = ""               # password for the primary (default: requirepass)
    masteruser: str = ""               # ACL user for the primary (default: the default user)
    repl_backlog_size: int = 64 * 1024 * 1024
    min_replica_acks: int = 0          # 0 = asynchronous replication
    min_replica_timeout: float = 1.0   # seconds a write waits for min_replica_acks
    repl_timeout: float = 10.0         # seconds without traffic before a link is dropped
    # cluster mode (server/cluster/node.py)
    cluster: str = ""                  # "etcd://HOST:PORT[,HOST:PORT]/NAME"
    cluster_ttl: int = 3               # lease TTL, seconds (failover starts after it)
    cluster_node_id: str = ""          # keep a node's identity across restarts
    cluster_start_timeout: float = 30.0  # seconds to wait for etcd at start
    announce_host: str = ""            # address other nodes and clients use (default: bind)

    _SIZES = ("max_key", "max_value", "max_frame", "max_multibulk", "max_bulk",
              "max_inline", "max_query_buffer", "max_output_buffer", "repl_backlog_size",
              "maxmemory_clients")

    def validate(self):
        self.resolve_password()
        self.protected_mode = _yes_no(self.protected_mode, "protected_mode")
        self.metrics_port = int(self.metrics_port)
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port out of range: {self.metrics_port}")
        self.maxmemory_clients_percent = 0.0
        mc = self.maxmemory_clients
        if isinstance(mc, str) and mc.strip().endswith("%"):
            try:
                pct = float(mc.strip()[:-1])
            except ValueError:
                raise ValueError(f"not a percentage: {mc!r}") from None
            if not 0 <= pct <= 100:
                raise ValueError(f"maxmemory-clients percentage out of range: {mc!r}")
            self.maxmemory_clients_percent = pct       # of the capacity, set at start
            self.maxmemory_clients = 0
        for name in self._SIZES:
            setattr(self, name, parse_size(getattr(self, name)))
        if not (0 <= int(self.port) <= 65535):
            raise ValueError(f"port out of range: {self.port}")
        self.port = int(self.port)
        if int(self.max_clients) < 1:
            raise ValueError("max_clients must be >= 1")
        self.max_clients = int(self.max_clients)
        self.idle_timeout = float(self.idle_timeout)
        if self.idle_timeout < 0:
            raise ValueError("idle_timeout must be >= 0")
        self.log_level = str(self.log_level).lower()
        if self.log_level not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError(f"unknown log level {self.log_level!r}")
        if self.max_bulk < self.max_value:
            self.max_value = self.max_bulk
        self.masteruser = str(self.masteruser or "")
        if self.masteruser and not (self.masterauth or self.requirepass):
            raise ValueError("masteruser needs a password: set masterauth "
                             "(the user's password on the other nodes)")
        if self.replica_of:
            from .replication import parse_hostport
            parse_hostport(self.replica_of)
        self.min_replica_acks = int(self.min_replica_acks)
        self.min_replica_timeout = float(self.min_replica_timeout)
        self.repl_timeout = float(self.repl_timeout)
        if self.min_replica_acks < 0 or self.min_replica_timeout <= 0 or self.repl_timeout <= 0:
            raise ValueError("min_replica_acks must be >= 0, min_replica_timeout and "
                             "repl_timeout > 0")
        if self.cluster:
            from .cluster.node import parse_cluster_url
            parse_cluster_url(self.cluster)
            self.cluster_ttl = int(self.cluster_ttl)
            if self.cluster_ttl < 2:
                raise ValueError("cluster_ttl must be >= 2 seconds")
            self.cluster_start_timeout = float(self.cluster_start_timeout)
            if self.replica_of:
                raise ValueError("--replica-of and --cluster do not go together: "
                                 "the cluster decides who replicates whom")
            if self.cluster_node_id and not re.fullmatch(r"[0-9a-f]{40}", self.cluster_node_id):
                raise ValueError("cluster_node_id must be 40 lowercase hex digits")
        if self.repl_backlog_size < 1:
            raise ValueError("repl_backlog_size must be >= 1 byte")
        return self

    def resolve_password(self):
        """The default user's password: ``--requirepass``, else the first line
        of ``--requirepass-file``, else the ``KVSTORE_REQUIREPASS``
        environment variable (the last two keep it out of /proc/PID/cmdline)."""
        if not self.requirepass and self.requirepass_file:
            try:
                with open(self.requirepass_file, encoding="utf-8") as f:
                    line = f.readline().rstrip("\r\n")
            except OSError as e:
                raise ValueError(f"requirepass file {self.requirepass_file}: "
                                 f"{e.strerror}") from None
            if not line:
                raise ValueError(f"requirepass file {self.requirepass_file} is empty")
            self.requirepass = line
        if not self.requirepass:
            self.requirepass = os.environ.get("KVSTORE_REQUIREPASS", "")
        return self.requirepass

    @property
    def hosts(self):
        return [h for h in re.split(r"[\s,]+", self.bind.strip()) if h]


def _yes_no(v, name):
    if isinstance(v, bool):
        return v
    low = str(v).strip().lower()
    if low in ("yes", "true", "on", "1"):
        return True
    if low in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"{name} must be yes or no, not {v!r}")


_FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)}


def build_parser():
    p = argparse.ArgumentParser(
        prog="kvstore-server",
        description="Serve a kvstore Store over TCP (RESP and the native protocol).")
    p.add_argument("--config", metavar="FILE.toml", help="TOML config file (flags override it)")
    p.add_argument("--bind", help="addresses to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 7379; 0 = pick a free one)")
    p.add_argument("--capacity", help="arena size, e.g. 256MiB, 4GiB")
    p.add_argument("--page-size", help="auto, 1G, 2M or 4K")
    p.add_argument("--kernel-policy", help="auto, keep_ue or mainline")
    p.add_argument("--enable-fault-injection", action="store_true", default=None,
                   help="allow KV.INJECT / native inject (testing only)")
    p.add_argument("--disable-flushall", dest="allow_flushall", action="store_false",
                   default=None, help="refuse FLUSHALL/FLUSHDB")
    p.add_argument("--requirepass", help="the default user's password (visible in the process "
                   "list: prefer --requirepass-file or KVSTORE_REQUIREPASS)")
    p.add_argument("--requirepass-file", metavar="FILE",
                   help="read the default user's password from the first line of FILE")
    p.add_argument("--aclfile", metavar="FILE", help="users and permissions, Redis's ACL file format")
    p.add_argument("--protected-mode", metavar="yes|no",
                   help="without a password, refuse clients beyond loopback (default yes)")
    p.add_argument("--maxmemory-clients", metavar="SIZE",
                   help="cap on all clients' buffers, a size or a percentage of --capacity "
                        "(10%%); the biggest clients are dropped first (default 0: no cap)")
    p.add_argument("--client-query-buffer-limit", dest="max_query_buffer", metavar="SIZE",
                   help="per-client query buffer limit (default 1GiB; same as --max-query-buffer)")
    p.add_argument("--metrics-port", type=int,
                   help="serve Prometheus metrics on this port (0 = pick one; default off)")
    p.add_argument("--metrics-bind", help="address of the metrics endpoint (default 127.0.0.1)")
    p.add_argument("--log-level", help="debug, info, warning, error")
    p.add_argument("--max-clients", "--maxclients", dest="max_clients", type=int,
                   help="max concurrent connections (default 10000, lowered to the fd "
                        "limit - 32 as Redis does)")
    for name in ("max_key", "max_value", "max_frame", "max_multibulk", "max_bulk",
                 "max_inline", "max_query_buffer", "max_output_buffer"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, metavar="SIZE")
    p.add_argument("--idle-timeout", type=float, help="close clients idle this many seconds (0 = never)")
    p.add_argument("--shutdown-timeout", type=float, help="seconds to flush replies at shutdown")
    p.add_argument("--no-uvloop", dest="use_uvloop", action="store_false", default=None,
                   help="use the stdlib asyncio loop even if uvloop is installed")
    p.add_argument("--no-resp-fast", dest="resp_fast", action="store_false", default=None,
                   help="run every RESP command in Python (no C GET/SET path)")
    p.add_argument("--replica-of", metavar="HOST:PORT", help="start as a replica of that primary")
    p.add_argument("--masterauth", help="password for the primary (default: --requirepass)")
    p.add_argument("--masteruser", metavar="NAME",
                   help="ACL user the replica link, rebuild fetches and slot migration "
                        "authenticate as, with --masterauth (default: the default user)")
    p.add_argument("--repl-backlog-size", metavar="SIZE", help="replication backlog (default 64MiB)")
    p.add_argument("--min-replica-acks", type=int,
                   help="writes wait for this many replica acks (default 0: asynchronous)")
    p.add_argument("--min-replica-timeout", type=float,
                   help="seconds a write waits for --min-replica-acks (default 1)")
    p.add_argument("--repl-timeout", type=float,
                   help="seconds without traffic before a replication link is dropped (default 10)")
    p.add_argument("--cluster", metavar="etcd://HOST:PORT/NAME",
                   help="join the named cluster whose state lives in that etcd")
    p.add_argument("--cluster-ttl", type=int,
                   help="cluster lease TTL in seconds (default 3; failover starts after it)")
    p.add_argument("--cluster-node-id", metavar="HEX40",
                   help="this node's cluster id (default: a new random one each start)")
    p.add_argument("--cluster-start-timeout", type=float,
                   help="seconds to wait for etcd at start (default 30)")
    p.add_argument("--announce-host",
                   help="address announced to the cluster and clients (default: first --bind)")
    p.add_argument("--supervise", action="store_true", default=None,
                   help="run the server in a worker under a small parent that keeps the arena "
                        "and the listening socket and restarts the worker when it dies; the "
                        "new worker adopts the memory (server/supervise.py)")
    return p


def load_config(argv=None):
    """Parse flags (and the config file they name) into a validated ServerConfig."""
    args = build_parser().parse_args(argv)
    values = {}
    if args.config:
        with open(args.config, "rb") as f:
            data = tomllib.load(f)
        if isinstance(data.get("server"), dict):
            data = {**{k: v for k, v in data.items() if k != "server"}, **data["server"]}
        for k, v in data.items():
            name = k.replace("-", "_")
            if name == "disable_flushall":
                name, v = "allow_flushall", not v
            if name not in _FIELDS:
                raise ValueError(f"{args.config}: unknown setting {k!r}")
            values[name] = v
    for name in _FIELDS:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    cfg = ServerConfig(**values)
    return cfg.validate()
