"""Hash slots: CRC16/XMODEM + hash tags, checked against a real Redis Cluster node."""

import shutil
import subprocess
import tempfile
import time

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st



from kvstore.server.cluster import slots  # noqa: E402
from etcdutil import free_port  # noqa: E402

REDIS = shutil.which("redis-server")


@pytest.fixture(scope="module")
def redis_cluster_node():
    if REDIS is None:
        pytest.skip("redis-server not installed (apt-get install redis-server)")
    d = tempfile.mkdtemp(prefix="kvstore-rc-")
    port = free_port()
    while port + 10000 > 65535:     # the cluster bus listens on port + 10000
        port = free_port()
    proc = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1",
                             "--cluster-enabled", "yes", "--cluster-config-file", f"{d}/nodes.conf",
                             "--dir", d, "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = redis.Redis(host="127.0.0.1", port=port, socket_timeout=10, retry_on_error=[])
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"redis-server exited with {proc.returncode}")
            try:
                r.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield r
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def test_crc16_reference_values():
    assert slots.crc16(b"123456789") == 0x31C3       # the XMODEM check value
    assert slots.crc16(b"") == 0
    assert slots.key_slot(b"foo") == 12182            # from the Redis Cluster spec
    assert slots.key_slot(b"{user1000}.following") == slots.key_slot(b"{user1000}.followers")


@pytest.mark.parametrize("key,hashed", [
    (b"{}", b"{}"),                   # empty tag: whole key
    (b"{}a", b"{}a"),
    (b"{{a}}", b"{a"),                # first '{' to first '}' after it
    (b"a{b", b"a{b"),                 # no closing brace
    (b"a}b{c}", b"c"),
    (b"{a}{b}", b"a"),
    (b"x{}{y}", b"x{}{y}"),           # first tag empty: whole key, not the second tag
    (b"", b""),
])
def test_hash_tag_rules(key, hashed):
    assert slots.hash_tag(key) == hashed


def test_str_key_is_a_type_error():
    with pytest.raises(TypeError, match="encode"):
        slots.key_slot("foo")


ODD = [b"{}", b"{{a}}", b"a{b", b"}{", b"{a}}", b"{{}}", b"{}{a}", b"\x00{\xff}", b"{" * 5 + b"}" * 5]


def test_odd_keys_match_redis(redis_cluster_node):
    for k in ODD:
        assert slots.key_slot(k) == redis_cluster_node.execute_command("CLUSTER", "KEYSLOT", k), k


keys = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda a, b, c: a + b"{" + b + b"}" + c, st.binary(max_size=8),
              st.binary(max_size=8), st.binary(max_size=8)),
    st.lists(st.sampled_from([b"{", b"}", b"a", b"\xff", b"{}"]), max_size=12).map(b"".join),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(keys, min_size=1, max_size=20))
def test_keyslot_equals_redis_cluster(redis_cluster_node, batch):
    p = redis_cluster_node.pipeline(transaction=False)
    for k in batch:
        p.execute_command("CLUSTER", "KEYSLOT", k)
    assert [slots.key_slot(k) for k in batch] == p.execute()


def test_ranges_roundtrip_and_normalize():
    assert slots.to_ranges([5, 1, 2, 3, 7, 6]) == [(1, 3), (5, 7)]
    assert slots.normalize([(10, 20), (0, 5), (6, 9), (15, 30)]) == [(0, 30)]
    assert slots.from_ranges([(1, 3)]) == {1, 2, 3}
    assert slots.count([(0, 16383)]) == 16384
    assert slots.contains([(0, 5), (10, 12)], 11) and not slots.contains([(0, 5)], 6)
    with pytest.raises(slots.SlotRangeError):
        slots.normalize([(5, 4)])
    with pytest.raises(slots.SlotRangeError):
        slots.normalize([(0, 16384)])
    with pytest.raises(slots.SlotRangeError):
        slots.to_ranges([-1])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 16, 1000, 16384])
def test_even_split_covers_everything_once(n):
    rs = slots.even_split(n)
    assert len(rs) == n
    assert rs[0][0] == 0 and rs[-1][1] == 16383
    assert all(rs[i][1] + 1 == rs[i + 1][0] for i in range(n - 1))
    sizes = [hi - lo + 1 for lo, hi in rs]
    assert max(sizes) - min(sizes) <= 1


def test_even_split_matches_redis_cli():
    assert slots.even_split(3) == [(0, 5460), (5461, 10922), (10923, 16383)]
    with pytest.raises(slots.SlotRangeError):
        slots.even_split(0)
