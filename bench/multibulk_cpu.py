"""Server CPU for one huge multibulk request, kvstore-server next to redis-server.

    python -m bench.multibulk_cpu [--quick] [--sizes 65536,262144,1048575]

For each size N, sends ``EXISTS key:0 ... key:N-1`` (N + 1 arguments, on an
empty store) in one ``sendall`` over loopback, so the server receives it over
many reads, waits for the ``:0`` reply, and reads the server's CPU time
(utime + stime from /proc/PID/stat) before and after. A parser that re-parses
an incomplete command from its start on every read is quadratic here; one
that keeps the arguments already parsed is linear. Each size runs ``--runs``
times per server (fresh connection each), median reported. Measures; asserts
nothing, except that both servers answered ``:0``.
"""

import argparse
import socket
import statistics
import sys
import time

from bench._common import header, table
from bench.server_throughput import cpu_seconds, start_kvstore, start_redis


def exists_request(n):
    parts = [b"*%d\r\n$6\r\nEXISTS\r\n" % (n + 1)]
    for i in range(n):
        k = b"key:%d" % i
        parts.append(b"$%d\r\n%b\r\n" % (len(k), k))
    return b"".join(parts)


def one_run(pid, port, req):
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    try:
        before = cpu_seconds(pid)
        t0 = time.monotonic()
        s.sendall(req)
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
        wall = time.monotonic() - t0
        time.sleep(0.05)            # let the server finish accounting the read
        return cpu_seconds(pid) - before, wall, reply
    finally:
        s.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64k keys only, one run")
    ap.add_argument("--sizes", default="65536,262144,1048575")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    sizes = [65536] if args.quick else [int(x) for x in args.sizes.split(",")]
    runs = 1 if args.quick else args.runs
    kv, kv_port = start_kvstore(["--capacity", "64MiB"])
    rd, rd_port = start_redis()
    rows = []
    bad = []
    try:
        for n in sizes:
            req = exists_request(n)
            res = {}
            for name, proc, port in (("kvstore", kv, kv_port), ("redis", rd, rd_port)):
                cpus, walls = [], []
                for _ in range(runs):
                    cpu, wall, reply = one_run(proc.pid, port, req)
                    if reply != b":0\r\n":
                        bad.append(f"{name} N={n}: {reply[:80]!r}")
                    cpus.append(cpu)
                    walls.append(wall)
                res[name] = (statistics.median(cpus), statistics.median(walls))
            k, r = res["kvstore"], res["redis"]
            ratio = f"{k[0] / r[0]:.1f}x" if r[0] > 0 else "n/a (redis < 1 tick)"
            rows.append([f"{n:,}", f"{len(req) / 1e6:.1f} MB", f"{k[0]:.2f}", f"{r[0]:.2f}",
                         ratio, f"{k[1]:.2f}", f"{r[1]:.2f}"])
    finally:
        kv.stop()               # a kvstore.server.spawn.ServerProcess
        rd.terminate()          # a subprocess.Popen
        rd.wait(10)
    print(header("Server CPU for one huge multibulk request (EXISTS with N keys)",
                 "bench.multibulk_cpu"))
    print(f"- runs per cell: {runs}, median; CPU = utime + stime of the server process "
          f"(clock tick {1 / __import__('os').sysconf('SC_CLK_TCK'):.2f} s)\n")
    print(table(["keys", "request", "kvstore CPU s", "redis CPU s", "kvstore / redis",
                 "kvstore wall s", "redis wall s"], rows))
    if bad:
        print("wrong replies:", *bad, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
