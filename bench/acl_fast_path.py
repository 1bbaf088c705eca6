"""GET/SET throughput with ACLs: does a +@all ~* user keep the C path?

    python -m bench.acl_fast_path [-n 300000]

redis-benchmark (-P 16, -c 20, 64-byte values, 10k keys) against three
kvstore-servers: without an ACL file; with an ACL file that has a restricted
user (so the ACL hook is installed), connecting as ``default`` (+@all ~*:
the C GET/SET path still runs); and as the restricted user (every command
goes through Python and the check). Measures; asserts nothing.
"""

import argparse
import os
import subprocess
import sys
import tempfile

from bench._common import header, table
from bench.server_throughput import start_kvstore

ACL = ("user default on nopass ~* &* +@all\n"
       "user app on >pw ~* &* -@all +@read +@write +@connection\n")


def rate(port, test, n, extra):
    p = subprocess.run(["redis-benchmark", "-p", str(port), "-t", test, "-n", str(n), "-P", "16",
                        "-c", "20", "-r", "10000", "-d", "64", "--csv", *extra],
                       capture_output=True, text=True, timeout=300)
    for line in p.stdout.splitlines():
        cols = [c.strip('"') for c in line.split(",")]
        if cols and cols[0].upper() == test.upper():
            return float(cols[1])
    raise RuntimeError(f"redis-benchmark failed: {p.stdout} {p.stderr}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=300000)
    a = ap.parse_args(argv)
    fd, path = tempfile.mkstemp(suffix=".acl")
    with os.fdopen(fd, "w") as f:
        f.write(ACL)
    rows = []
    try:
        for label, flags, extra in (
                ("no ACL file, default user", [], []),
                ("ACL file, default user (+@all ~*)", ["--aclfile", path], []),
                ("ACL file, restricted user", ["--aclfile", path], ["--user", "app", "-a", "pw"])):
            srv, port = start_kvstore(["--capacity", "64MiB", *flags])
            try:
                rows.append([label, f"{rate(port, 'set', a.n, extra):,.0f}",
                             f"{rate(port, 'get', a.n, extra):,.0f}"])
            finally:
                srv.stop()
    finally:
        os.unlink(path)
    print(header("GET/SET throughput with ACLs (redis-benchmark -P 16 -c 20)",
                 "bench.acl_fast_path"))
    print(table(["server / user", "SET ops/s", "GET ops/s"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
