"""pytest-benchmark twin of ``python -m bench.embedded`` (not part of the test suite).

    pytest bench/test_embedded_bench.py --benchmark-enable
    pytest bench/test_embedded_bench.py --benchmark-enable --benchmark-group-by=param:op
    KVBENCH_KEYS=1000000 pytest bench/test_embedded_bench.py --benchmark-enable

tests/ does not collect this file (pyproject's testpaths), and the default
``--benchmark-disable`` turns each benchmark into a single unchecked run. Each
round runs one operation over all N keys (default 100,000; KVBENCH_KEYS), so
ops/s = N / mean. Groups compare kvstore.Store, a dict and py-lmdb on the same
keys (16 B) and values (64 B).
"""

import os
import random
import shutil
import tempfile

import pytest

import kvstore
from bench import embedded as E

N = int(os.environ.get("KVBENCH_KEYS", "100000"))


@pytest.fixture(scope="module")
def data():
    return E.make_data(N)


@pytest.fixture(scope="module")
def store(data):
    keys, vals, _g, _b = data
    s = kvstore.Store(max(64 << 20, N * 200), page_size=os.environ.get("KVBENCH_PAGE_SIZE", "auto"),
                      recovery="manual")
    E.store_put(s, keys, vals)
    yield s
    s.close()


@pytest.fixture(scope="module")
def pydict(data):
    keys, vals, _g, _b = data
    return dict(zip(keys, vals))


@pytest.fixture(scope="module")
def env(data):
    import lmdb

    keys, vals, _g, _b = data
    path = tempfile.mkdtemp(prefix="kvbench-lmdb-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    e = lmdb.open(path, map_size=max(1 << 30, N * 400), sync=False, metasync=False, writemap=True)
    E.lmdb_put(e, keys, vals)
    yield e
    e.close()
    shutil.rmtree(path, ignore_errors=True)


def _run(benchmark, fn, *args):
    benchmark.extra_info["keys"] = N
    benchmark.pedantic(fn, args=args, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="get")
@pytest.mark.parametrize("impl", ["store", "dict", "lmdb"])
def test_get(benchmark, impl, data, request):
    target = {"store": "store", "dict": "pydict", "lmdb": "env"}[impl]
    fn = {"store": E.store_get, "dict": E.dict_get, "lmdb": E.lmdb_get}[impl]
    _run(benchmark, fn, request.getfixturevalue(target), data[2])


@pytest.mark.benchmark(group="mget-100")
@pytest.mark.parametrize("impl", ["store", "dict", "lmdb"])
def test_mget(benchmark, impl, data, request):
    target = {"store": "store", "dict": "pydict", "lmdb": "env"}[impl]
    fn = {"store": E.store_mget, "dict": E.dict_mget, "lmdb": E.lmdb_mget}[impl]
    _run(benchmark, fn, request.getfixturevalue(target), data[3])


@pytest.mark.benchmark(group="put-overwrite")
@pytest.mark.parametrize("impl", ["store", "dict", "lmdb"])
def test_put(benchmark, impl, data, request):
    target = {"store": "store", "dict": "pydict", "lmdb": "env"}[impl]
    fn = {"store": E.store_put, "dict": E.dict_put, "lmdb": E.lmdb_put}[impl]
    _run(benchmark, fn, request.getfixturevalue(target), data[0], data[1])


@pytest.mark.benchmark(group="ue-recover")
def test_ue_recover(benchmark, data):
    """One round = inject an `ao` into a random key's subpage, then time
    store.recover() (invalidate + rebuild from an in-process source)."""
    keys, vals, _g, _b = data
    src = E.DictSource()
    s = kvstore.Store(max(64 << 20, N * 200), page_size="4K", kernel_policy="keep_ue", rebuild_source=src,
                      recovery="manual")
    for k, v in zip(keys, vals):
        src.data[k] = (s.put(k, v), v)
    rng = random.Random(1)

    def setup():
        s.faults.inject_key(keys[rng.randrange(N)], "ao")
        return (), {}

    try:
        benchmark.pedantic(s.recover, setup=setup, rounds=200, iterations=1)
        assert s.stats()["lost_keys"] == 0
    finally:
        s.close()
