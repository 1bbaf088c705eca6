"""Throughput of kvstore.client: sync, threaded, asyncio and pipelined.

    python -m bench.client_throughput [--quick] [--url kv://host:port] [--cluster N]

Starts a kvstore-server on a free 127.0.0.1 port (unless --url names a
running one), loads ``--keys`` keys of 16 bytes with 64-byte values, then
measures each mode for a fixed number of operations and prints a markdown
table: ops/s, client CPU microseconds per op (this process) and server CPU
microseconds per op (from /proc/PID/stat, only for a server we started).
``--cluster N`` adds rows for :class:`kvstore.client.ClusterClient` against a
local cluster of N primaries (``kvstore-cluster up --replicas 0 --detach``,
its own etcd): the same keys spread over the shards, each pipeline and mget
split by slot (server CPU is the sum over the cluster's servers).
Measures; asserts nothing.
"""

import argparse
import asyncio
import os
import platform
import random
import sys
import threading
import time

from kvstore.client import AsyncClient, Client
from kvstore.server.spawn import start_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CLK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid):
    """utime + stime of ``pid`` (or the sum over a list of pids) in seconds
    (None if unknown)."""
    if pid is None:
        return None
    if isinstance(pid, list):
        parts = [proc_cpu(p) for p in pid]
        return None if None in parts else sum(parts)
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK
    except (OSError, IndexError, ValueError):
        return None


class Bench:
    def __init__(self, host, port, server_pid, nkeys, value_size):
        self.host = host
        self.port = port
        self.server_pid = server_pid
        self.keys = [b"key:%012d" % i for i in range(nkeys)]
        self.value = os.urandom(value_size // 2).hex().encode()[:value_size]
        self.rows = []

    def _start(self):
        return proc_cpu(self.server_pid), time.process_time(), time.perf_counter()

    def _record(self, mode, op, conc, nops, started):
        s0, c0, t0 = started
        dt = time.perf_counter() - t0
        cpu = time.process_time() - c0
        s1 = proc_cpu(self.server_pid)
        server_us = "n/a" if s0 is None or s1 is None else f"{(s1 - s0) / nops * 1e6:.1f}"
        self.rows.append((mode, op, conc, nops, dt, nops / dt, cpu / nops * 1e6, server_us))
        print(f"  {mode:<26} {op:<4} {nops / dt:>12,.0f} ops/s", file=sys.stderr)

    def measure(self, mode, op, conc, nops, fn):
        started = self._start()
        fn()
        self._record(mode, op, conc, nops, started)

    async def ameasure(self, mode, op, conc, nops, make):
        started = self._start()
        await make()
        self._record(mode, op, conc, nops, started)

    # -- modes -----------------------------------------------------------------

    def sync(self, nops):
        keys, value = self.keys, self.value
        sample = [random.choice(keys) for _ in range(nops)]
        with Client(self.host, self.port, socket_timeout=30) as c:
            c.ping()
            self.measure("sync, 1 connection", "put", 1, nops,
                         lambda: [c.put(k, value) for k in sample])
            self.measure("sync, 1 connection", "get", 1, nops,
                         lambda: [c.get(k) for k in sample])

    def threads(self, nops, nthreads):
        keys = self.keys
        per = nops // nthreads
        with Client(self.host, self.port, socket_timeout=30, max_connections=nthreads) as c:
            c.ping()

            def run():
                def work():
                    for k in random.sample(keys, min(per, len(keys))):
                        c.get(k)
                ts = [threading.Thread(target=work) for _ in range(nthreads)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
            self.measure(f"sync, {nthreads} threads", "get", nthreads,
                         per * nthreads if per <= len(keys) else len(keys) * nthreads, run)

    def pipelined(self, nops, batch):
        keys, value = self.keys, self.value
        sample = [random.choice(keys) for _ in range(nops)]
        with Client(self.host, self.port, socket_timeout=30) as c:
            c.ping()

            def run(op):
                for i in range(0, nops, batch):
                    pipe = c.pipeline()
                    for k in sample[i:i + batch]:
                        if op == "put":
                            pipe.put(k, value)
                        else:
                            pipe.get(k)
                    pipe.execute()
            self.measure(f"sync pipeline, {batch}/batch", "put", 1, nops, lambda: run("put"))
            self.measure(f"sync pipeline, {batch}/batch", "get", 1, nops, lambda: run("get"))
            self.measure(f"sync mget, {batch} keys", "get", 1, nops,
                         lambda: [c.mget(sample[i:i + batch]) for i in range(0, nops, batch)])

    def asyncio_(self, nops, tasks, batch):
        keys, value = self.keys, self.value
        per = nops // tasks
        parts = [[random.choice(keys) for _ in range(per)] for _ in range(tasks)]
        n = per * tasks

        async def worker(c, part, op):
            for k in part:
                if op == "put":
                    await c.put(k, value)
                else:
                    await c.get(k)

        async def pipe_worker(c, part):
            for i in range(0, len(part), batch):
                p = c.pipeline()
                for k in part[i:i + batch]:
                    p.get(k)
                await p.execute()

        async def main():
            async with AsyncClient(self.host, self.port, socket_timeout=30,
                                   max_connections=tasks) as c:
                await asyncio.gather(*(c.ping() for _ in range(tasks)))
                await self.ameasure("asyncio, 1 task", "get", 1, per,
                                    lambda: worker(c, parts[0], "get"))
                for op in ("put", "get"):
                    await self.ameasure(
                        f"asyncio, {tasks} tasks", op, tasks, n,
                        lambda op=op: asyncio.gather(*(worker(c, p, op) for p in parts)))
                await self.ameasure(
                    f"asyncio pipeline, {tasks}x{batch}", "get", tasks, n,
                    lambda: asyncio.gather(*(pipe_worker(c, p) for p in parts)))

        asyncio.run(main())

    def cluster(self, nodes, nshards, nops, batch, tasks):
        """ClusterClient rows (``nodes``: startup addresses)."""
        from kvstore.client import AsyncClusterClient, ClusterClient
        keys, value = self.keys, self.value
        sample = [random.choice(keys) for _ in range(nops)]
        label = f"cluster ({nshards} shards)"
        with ClusterClient(nodes, socket_timeout=30) as c:
            c.ping()
            c.get(keys[0])
            self.measure(f"{label}, sync", "put", 1, nops,
                         lambda: [c.put(k, value) for k in sample])
            self.measure(f"{label}, sync", "get", 1, nops, lambda: [c.get(k) for k in sample])
            big = sample * 5

            def run(op):
                for i in range(0, len(big), batch):
                    pipe = c.pipeline()
                    for k in big[i:i + batch]:
                        if op == "put":
                            pipe.put(k, value)
                        else:
                            pipe.get(k)
                    pipe.execute()
            self.measure(f"{label}, pipeline {batch}/batch", "put", 1, len(big),
                         lambda: run("put"))
            self.measure(f"{label}, pipeline {batch}/batch", "get", 1, len(big),
                         lambda: run("get"))
            self.measure(f"{label}, mget {batch} keys", "get", 1, len(big),
                         lambda: [c.mget(big[i:i + batch]) for i in range(0, len(big), batch)])
        per = nops // tasks
        parts = [sample[i * per:(i + 1) * per] for i in range(tasks)]

        async def main():
            async with AsyncClusterClient(nodes, socket_timeout=30, max_connections=tasks) as c:
                await c.get(keys[0])

                async def worker(part):
                    for k in part:
                        await c.get(k)
                await self.ameasure(f"{label}, asyncio {tasks} tasks", "get", tasks,
                                    per * tasks,
                                    lambda: asyncio.gather(*(worker(p) for p in parts)))
        asyncio.run(main())

    def table(self):
        lines = ["| mode | op | concurrency | ops | seconds | ops/s | client CPU us/op | server CPU us/op |",
                 "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for mode, op, conc, n, dt, rate, cus, sus in self.rows:
            lines.append(f"| {mode} | {op} | {conc} | {n} | {dt:.2f} | {rate:,.0f} | "
                         f"{cus:.1f} | {sus} |")
        return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.client_throughput",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few operations (a smoke run)")
    ap.add_argument("--url", help="bench a running server instead of starting one")
    ap.add_argument("--keys", type=int, default=10000, help="distinct keys (default 10000)")
    ap.add_argument("--value-size", type=int, default=64, help="value bytes (default 64)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra kvstore-server argument (repeatable)")
    ap.add_argument("--cluster", type=int, metavar="N", default=0,
                    help="also bench ClusterClient against a local cluster of N primaries")
    args = ap.parse_args(argv)

    n = 5_000 if args.quick else 40_000
    proc = None
    if args.url:
        c = Client.from_url(args.url)
        host, port = c.host, c.port
        c.close()
        pid = None
    else:
        proc = start_server("--capacity", "256MiB", *args.server_arg, cwd=REPO)
        host, port, pid = proc.host, proc.port, proc.pid
    try:
        bench = Bench(host, port, pid, args.keys, args.value_size)
        with Client(host, port, socket_timeout=30) as c:
            for i in range(0, len(bench.keys), 500):
                c.mput({k: bench.value for k in bench.keys[i:i + 500]})
        print(f"kvstore client throughput ({'quick' if args.quick else 'full'} run)", file=sys.stderr)
        bench.sync(n)
        bench.threads(n, 4)
        bench.pipelined(n * 5, 100)
        bench.asyncio_(n, 32, 100)
        if args.cluster:
            run_cluster_rows(bench, args.cluster, n)
        print()
        print(f"kvstore.client throughput against kvstore-server on {host}:{port}; "
              f"{args.keys} keys of 16 B, values of {args.value_size} B; "
              f"Python {platform.python_version()}, {os.cpu_count()} CPUs.")
        print()
        print(bench.table())
    finally:
        if proc is not None:
            proc.stop(timeout=15)
    return 0


def run_cluster_rows(bench, nshards, n):
    """Start a local cluster (``kvstore-cluster up``), load the keys, add its rows."""
    import json
    import socket
    import subprocess
    import tempfile
    from kvstore.client import ClusterClient
    cli = [sys.executable, "-m", "kvstore.server.cluster.cli"]
    d = tempfile.mkdtemp(prefix="kvstore-bench-cluster-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1]
    r = subprocess.run(cli + ["up", "--shards", str(nshards), "--replicas", "0", "--port",
                              str(base), "--dir", d, "--detach", "--capacity", "256MiB"],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        print(f"kvstore-cluster up failed:\n{r.stdout}{r.stderr}", file=sys.stderr)
        return
    try:
        with open(os.path.join(d, "cluster.json")) as f:
            st = json.load(f)
        nodes = [("127.0.0.1", x["port"]) for x in st["nodes"]]
        saved = bench.server_pid
        bench.server_pid = [x["pid"] for x in st["nodes"]]
        with ClusterClient(nodes, socket_timeout=30) as c:
            for i in range(0, len(bench.keys), 500):
                c.mput({k: bench.value for k in bench.keys[i:i + 500]})
        bench.cluster(nodes, nshards, n, 100, 32)
        bench.server_pid = saved
    finally:
        subprocess.run(cli + ["down", "--dir", d], capture_output=True, timeout=60)


if __name__ == "__main__":
    sys.exit(main())
