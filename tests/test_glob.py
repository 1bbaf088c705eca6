"""server/glob.py: Redis's stringmatchlen rules, checked by hand on the
corner cases and by Hypothesis against a real redis-server's KEYS over
random keys and patterns (classes, ranges, escapes, unterminated brackets,
high bytes)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from redisdiff import REDIS_SERVER, Raw, RedisProc


from kvstore.server import glob  # noqa: E402
from kvstore.server.glob import compile as gcompile, matches_all, stringmatch  # noqa: E402


@pytest.mark.parametrize("pattern, s, want", [
    (b"h?llo", b"hello", True), (b"h?llo", b"hllo", False),
    (b"h*llo", b"hllo", True), (b"h*llo", b"heeeello", True),
    (b"h[ae]llo", b"hallo", True), (b"h[ae]llo", b"hillo", False),
    (b"h[^e]llo", b"hallo", True), (b"h[^e]llo", b"hello", False),
    (b"h[a-b]llo", b"hbllo", True), (b"h[b-a]llo", b"hallo", True),   # reversed range
    (b"h\\*llo", b"h*llo", True), (b"h\\*llo", b"hello", False),
    (b"h[\\]]llo", b"h]llo", True), (b"[a-]x", b"]", True),           # '-' takes the ']': the class runs on
    (b"[a-]x", b"x", True), (b"[a-]x", b"]x", False),
    (b"[ab", b"a", True), (b"[ab", b"b", True), (b"[ab", b"ab", False),  # unterminated
    (b"[", b"[", False), (b"[^", b"x", True), (b"[^", b"", False),
    (b"a\\", b"a\\", True), (b"\\", b"\\", True),
    (b"*", b"", False), (b"", b"", True), (b"", b"a", False), (b"**", b"a", True),
    (b"a*", b"a", True), (b"*a*a*a*b", b"a" * 5000, False), (b"*a*a*a*b", b"a" * 50 + b"b", True),
    (b"[a-\xff]", b"\xff", True), (b"[a-\xff]", b"\x00", True),   # signed chars: -1..97
    (b"[a-\xff]", b"\x80", False),
    (b"[a-\xff]", b"b", False),
])
def test_rules(pattern, s, want):
    assert stringmatch(pattern, s) is want
    assert glob.GlobPattern(pattern).match(s) is want


@pytest.mark.parametrize("pattern, s, want", [
    (b"HeLLo", b"hello", True), (b"h[A-Z]llo", b"hello", True), (b"h[E]llo", b"hello", True),
    (b"h[\\E]llo", b"hello", False),              # an escaped class byte compares exactly
    (b"h?LLO", b"hello", True),
])
def test_nocase(pattern, s, want):
    assert stringmatch(pattern, s, nocase=True) is want


def test_matches_all_and_nesting_limit():
    assert matches_all(b"*") and matches_all("*") and not matches_all(b"**")
    deep = b"*a" * 1001 + b"*"
    assert not stringmatch(deep, b"a" * 1001)      # 1001st '*' not last: Redis gives up
    ok = b"*a" * 1000 + b"*"
    assert stringmatch(ok, b"a" * 1000)


def test_compile_is_cached_and_accepts_str():
    assert gcompile("a*") is gcompile(b"a*")
    assert gcompile("a*")(b"abc")


# ---------------------------------------------------------------- against redis-server

ALPHABET = b"abAB-^[]\\*?z\x80\xff"
keys_st = st.lists(st.binary(min_size=0, max_size=6).map(lambda b: bytes(ALPHABET[x % len(ALPHABET)]
                                                                         for x in b)),
                   min_size=1, max_size=25, unique=True)
pattern_piece = st.sampled_from([b"*", b"?", b"[", b"]", b"^", b"-", b"\\", b"a", b"b", b"A",
                                 b"z", b"[a-b]", b"[^a]", b"[b-a]", b"\\*", b"\\[", b"[\\]]",
                                 b"[a-", b"[^", b"\x80", b"\xff", b"[a-\xff]", b"[\\"])
pattern_st = st.lists(pattern_piece, max_size=6).map(b"".join)


@pytest.fixture(scope="module")
def redis_conn():
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (the CI installs it)")
    r = RedisProc()
    c = Raw(r.connect())
    yield c
    c.close()
    r.stop()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=keys_st, patterns=st.lists(pattern_st, min_size=1, max_size=5))
def test_same_keys_as_redis(redis_conn, keys, patterns):
    assert redis_conn.call("FLUSHALL") == ("+", b"OK")
    args = ["MSET"]
    for k in keys:
        args += [k, b"v"]
    assert redis_conn.call(*args) == ("+", b"OK")
    for pat in patterns:
        want = set(redis_conn.call("KEYS", pat))
        got = glob.filter_keys(pat, keys)
        assert sorted(got) == sorted(want), (pat, sorted(keys))
