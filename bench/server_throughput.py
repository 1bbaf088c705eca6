"""kvstore-server against redis-server, side by side, with redis-benchmark.

    python -m bench.server_throughput [--quick] [-n N] [--clients C]

Starts redis-server (``--save '' --appendonly no``) and kvstore-server on free
127.0.0.1 ports, then for pipeline depths 1 and 16 runs

    redis-benchmark -t set|get|incr|mset -c 50 -d 64 -r 1000000 -n N -P depth --csv

(``--tests`` picks the tests; MSET is redis-benchmark's 10-key MSET, INCR
one counter key per random key)
against each, interleaved, and reads each server's CPU time (utime + stime
from /proc/PID/stat) around every run. Prints a markdown table: requests/s,
server CPU microseconds per request, and both as ratios to Redis. Measures;
asserts nothing. Keep N small enough that a run stays well under a minute.
"""

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import time

from kvstore.server.spawn import start_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK      # utime + stime


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def start_kvstore(extra):
    srv = start_server(*extra, cwd=REPO)
    return srv, srv.port


def start_redis():
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    return proc, port


def run_benchmark(port, test, n, pipeline, clients, size, keyspace):
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", test,
           "-c", str(clients), "-d", str(size), "-r", str(keyspace), "-n", str(n),
           "-P", str(pipeline), "--csv"]
    p = subprocess.run(cmd, capture_output=True, timeout=120)
    out = p.stdout.decode()
    for line in out.splitlines():
        cols = [c.strip('"') for c in line.split(",")]
        # MSET's row is named "MSET (10 keys)"
        if cols and cols[0].upper().split(" ")[0] == test.upper():
            return float(cols[1])
    raise RuntimeError(f"redis-benchmark failed (rc={p.returncode}): {out} {p.stderr.decode()}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="20k requests per run")
    ap.add_argument("-n", type=int, default=200000, help="requests per run (default 200000)")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--keyspace", type=int, default=1000000)
    ap.add_argument("--pipelines", default="1,16")
    ap.add_argument("--tests", default="set,get,incr,mset",
                    help="redis-benchmark tests, comma-separated (default set,get,incr,mset)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra kvstore-server flag (repeatable), e.g. --server-arg=--page-size=4K")
    args = ap.parse_args(argv)
    n = 20000 if args.quick else args.n
    for tool in ("redis-server", "redis-benchmark"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 1
    procs = {}
    try:
        procs["redis"] = start_redis()
        procs["kvstore"] = start_kvstore(["--capacity", "1GiB", *args.server_arg])
        rows = []
        for depth in [int(x) for x in args.pipelines.split(",")]:
            for test in args.tests.split(","):
                res = {}
                for name in ("redis", "kvstore"):
                    proc, port = procs[name]
                    c0 = cpu_seconds(proc.pid)
                    rps = run_benchmark(port, test, n, depth, args.clients, args.size,
                                        args.keyspace)
                    cpu = cpu_seconds(proc.pid) - c0
                    res[name] = (rps, cpu * 1e6 / n)
                rows.append((depth, test, res))
    finally:
        for proc, _ in procs.values():
            if hasattr(proc, "stop"):       # a kvstore.server.spawn.ServerProcess
                proc.stop()
                continue
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    import kvstore
    print(f"### kvstore-server vs redis-server ({platform.python_implementation()} "
          f"{platform.python_version()}, {os.cpu_count()} CPUs, kvstore {kvstore.__version__})")
    print()
    print(f"`redis-benchmark -t {args.tests.replace(',', '|')} -c {args.clients} -d {args.size} -r {args.keyspace} "
          f"-n {n} -P <depth>`; server CPU from /proc/PID/stat (resolution {1000 // _CLK} ms).")
    print()
    print("| -P | test | redis rps | kvstore rps | rps ratio | redis CPU us/op | "
          "kvstore CPU us/op | CPU ratio |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for depth, test, res in rows:
        (r_rps, r_cpu), (k_rps, k_cpu) = res["redis"], res["kvstore"]
        cpu_ratio = f"{k_cpu / r_cpu:.2f}x" if r_cpu > 0 else "n/a"
        print(f"| {depth} | {test.upper()} | {r_rps:,.0f} | {k_rps:,.0f} | {k_rps / r_rps:.2f}x | "
              f"{r_cpu:.2f} | {k_cpu:.2f} | {cpu_ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
