"""Peak server memory under output-buffer abuse, kvstore-server next to redis-server.

    python -m bench.output_limit [--limit-mib 8] [--count 400]

Both servers hold one 1 MiB value and run with the same per-client output
limit (kvstore ``--max-output-buffer``, Redis ``client-output-buffer-limit
normal <limit> <limit> 0``). A client with a 4 KiB receive buffer sends, in
one write and without reading, each abuse: ``count`` pipelined GETs, one
MGET naming the key ``count`` times, and (kvstore only) the native ``mget``.
The peak is VmHWM from /proc/PID/status, reset through /proc/PID/clear_refs
before each abuse; the figure is the growth over the RSS at the reset.
Then the input abuse: four clients each send most of a 200 MiB bulk at once,
without and with ``maxmemory-clients`` (same value on both servers).
Measures; asserts nothing, except that each server stayed up.
"""

import argparse
import socket
import struct
import subprocess
import sys
import time

import msgpack

from bench._common import header, table
from bench.server_throughput import free_port, start_kvstore, wait_port

MiB = 1024 * 1024


def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(a), a))
    return b"".join(out)


def hwm_kib(pid, field="VmHWM"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak(pid):
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    return hwm_kib(pid)


def abuse(pid, port, payload):
    before = reset_peak(pid)
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    t0 = time.monotonic()
    try:
        s.sendall(payload)
    except OSError:
        pass
    time.sleep(1.0)
    got = 0
    s.settimeout(10)
    try:
        while True:
            b = s.recv(1 << 20)
            if not b:
                break
            got += len(b)
    except OSError:
        pass
    s.close()
    return (hwm_kib(pid) - before) / 1024, got / MiB, time.monotonic() - t0


def setup(port):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(resp("SET", "big", b"x" * MiB))
    assert s.recv(100) == b"+OK\r\n"
    s.close()


def _partial_bulk(port, size, sent):
    s = socket.create_connection(("127.0.0.1", port))
    try:
        s.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n" % (size + 1000))
        chunk = b"y" * MiB
        for _ in range(size // MiB):
            s.sendall(chunk)
            sent.append(MiB)
        time.sleep(0.5)
    except OSError:
        pass
    finally:
        s.close()


def input_abuse(pid, port, clients=4, size=200 * MiB):
    """``clients`` connections each sending most of a ``size`` bulk at once;
    returns (peak growth MiB, MiB the clients got to send)."""
    import threading
    before = reset_peak(pid)
    sent = []
    ts = [threading.Thread(target=_partial_bulk, args=(port, size, sent)) for _ in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(300)
    return (hwm_kib(pid) - before) / 1024, sum(sent) / MiB


def input_rows(cap_mib):
    rows = []
    for cap in (0, cap_mib):
        kv, kport = start_kvstore(["--capacity", "64MiB", "--maxmemory-clients", f"{cap}MiB"])
        port = free_port()
        rd = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no",
                               "--maxmemory-clients", f"{cap}mb"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port, rd)
            kg, ksent = input_abuse(kv.pid, kport)
            rg, rsent = input_abuse(rd.pid, port)
            rows.append([f"{cap} MiB" if cap else "none", f"{kg:.0f}", f"{rg:.0f}",
                         f"{ksent:.0f}", f"{rsent:.0f}"])
            assert kv.alive() and rd.poll() is None
        finally:
            kv.stop()
            rd.terminate()
            rd.wait()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit-mib", type=int, default=8)
    ap.add_argument("--count", type=int, default=400)
    ap.add_argument("--input-cap-mib", type=int, default=64,
                    help="maxmemory-clients of the input abuse (4 x 200 MiB partial bulks)")
    a = ap.parse_args(argv)
    lim = a.limit_mib * MiB
    gets = resp("GET", "big") * a.count
    mget = resp("MGET", *(["big"] * a.count))
    body = msgpack.packb([1, "mget", [[b"big"] * a.count]], use_bin_type=True)
    native = b"\x00KV1" + struct.pack(">I", len(body)) + body
    rows = []
    for name, payload, both in ((f"{a.count} pipelined GET", gets, True),
                                (f"MGET x{a.count}", mget, True),
                                (f"native mget x{a.count}", native, False)):
        # fresh servers for each abuse: memory freed by an earlier one stays
        # in the process and would hide the next one's peak
        kv, kport = start_kvstore(["--max-output-buffer", f"{a.limit_mib}MiB",
                                   "--capacity", "64MiB"])
        port = free_port()
        rd = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no",
                               "--client-output-buffer-limit", f"normal {lim} {lim} 0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port, rd)
            setup(kport)
            setup(port)
            kg, kgot, _ = abuse(kv.pid, kport, payload)
            if both:
                rg, rgot, _ = abuse(rd.pid, port, payload)
                rows.append([name, f"{kg:.0f}", f"{rg:.0f}", f"{kgot:.1f}", f"{rgot:.1f}"])
            else:
                rows.append([name, f"{kg:.0f}", "n/a", f"{kgot:.1f}", "n/a"])
            assert kv.alive() and rd.poll() is None
        finally:
            kv.stop()
            rd.terminate()
            rd.wait()
    print(header(f"Peak memory growth under output-buffer abuse (limit {a.limit_mib} MiB, "
                 f"1 MiB value)", "bench.output_limit"))
    print(table(["abuse", "kvstore peak growth MiB", "redis peak growth MiB",
                 "kvstore MiB delivered", "redis MiB delivered"], rows))
    rows = input_rows(a.input_cap_mib)
    print()
    print("### 4 clients each sending 200 MiB of a partial bulk (peak growth, MiB)")
    print()
    print(table(["maxmemory-clients", "kvstore peak growth MiB", "redis peak growth MiB",
                 "kvstore MiB sent", "redis MiB sent"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
