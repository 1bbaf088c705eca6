"""Unit tests of the client's framing, error table, retry rule and URL parsing."""

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import errors
from kvstore.client import _protocol
from kvstore.client._config import RetryPolicy, parse_url
from kvstore.client._protocol import NEED_MORE, FrameParser

values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.binary(max_size=300)
    | st.text(max_size=30) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20)


def framed(obj):
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


@settings(max_examples=200, deadline=None)
@given(st.lists(values, min_size=1, max_size=8), st.data())
@pytest.mark.slow
def test_parser_any_split(objs, data):
    stream = b"".join(framed(o) for o in objs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    parser = FrameParser()
    out = []
    prev = 0
    for cut in cuts + [len(stream)]:
        parser.feed(stream[prev:cut])
        prev = cut
        while (obj := parser.gets()) is not NEED_MORE:
            out.append(obj)
    assert out == objs
    assert parser.buffered() == 0


def test_parser_needs_more_and_compacts():
    parser = FrameParser()
    assert parser.gets() is NEED_MORE
    data = framed([1, 0, b"x" * 1000]) * 200
    parser.feed(data[:-1])
    got = 0
    while parser.gets() is not NEED_MORE:
        got += 1
    assert got == 199
    assert parser.buffered() < 1100        # consumed bytes were dropped
    parser.feed(data[-1:])
    assert parser.gets() == [1, 0, b"x" * 1000]


def test_parser_rejects_oversized_length_before_body():
    parser = FrameParser(max_frame=1000)
    parser.feed(struct.pack(">I", 1001))     # no body at all yet
    with pytest.raises(errors.ProtocolError, match="max_frame"):
        parser.gets()
    parser = FrameParser()
    parser.feed(struct.pack(">I", 0xFFFFFFFF))
    with pytest.raises(errors.ProtocolError):
        parser.gets()


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x92\x01", b"\x01\x02"])
def test_parser_rejects_bad_bodies(body):
    parser = FrameParser()
    parser.feed(struct.pack(">I", len(body)) + body)
    with pytest.raises(errors.ProtocolError):
        parser.gets()


def test_encode_request():
    data = _protocol.encode_request(7, "get", [b"k"])
    assert data[:4] == struct.pack(">I", len(data) - 4)
    assert msgpack.unpackb(data[4:], raw=False) == [7, "get", [b"k"]]
    assert _protocol.next_request_id(1) == 2
    assert _protocol.next_request_id(2**31 - 1) == 1


def test_check_reply():
    assert _protocol.check_reply([3, 0, b"v"], 3) == (0, b"v")
    assert _protocol.check_reply([0, 1, ["PROTO", "x", {}]], 3)[0] == 1
    for bad in ([4, 0, None], [3, 2, None], [3, 0], "x", None):
        with pytest.raises(errors.ProtocolError):
            _protocol.check_reply(bad, 3)


@pytest.mark.parametrize("code, cls", [
    ("LOST", errors.KeyLostError),
    ("UNRECOVERABLE", errors.UnrecoverableKeyError),
    ("FULL", errors.StoreFullError),
    ("TOOLARGE", errors.ValueTooLargeError),
    ("READONLY", errors.ReadOnlyError),
    ("NOAUTH", _protocol.AuthenticationError),
    ("DISABLED", _protocol.DisabledError),
    ("PROTO", _protocol.ServerProtocolError),
    ("ERR", errors.ResponseError),
    ("TYPE", errors.ResponseError),
    ("UNKNOWN", errors.ResponseError),
    ("BUSY", errors.ResponseError),
    ("SOMETHING_NEW", errors.ResponseError),
])
def test_error_table(code, cls):
    exc = _protocol.error_from_reply([code, "msg", {"version": 9}], key=b"k")
    assert type(exc) is cls
    assert exc.code == code and "msg" in str(exc)
    if issubclass(cls, errors.KeyLostError):
        assert exc.version == 9 and exc.key == b"k"
        assert exc.retryable == (code == "LOST")


def test_disabled_inject_is_a_fault_injection_error():
    exc = _protocol.error_from_reply(["DISABLED", "off", {}], op="inject")
    assert isinstance(exc, _protocol.InjectionDisabledError)
    assert isinstance(exc, errors.FaultInjectionError) and isinstance(exc, errors.ResponseError)
    assert not isinstance(_protocol.error_from_reply(["DISABLED", "off", {}], op="flushall"),
                          errors.FaultInjectionError)


def test_error_reply_odd_shapes():
    assert _protocol.error_from_reply(["TOOLARGE", "k", {"what": "key"}]).__class__ \
        is errors.KeyTooLargeError
    exc = _protocol.error_from_reply(["LOST", "gone"])
    assert isinstance(exc, errors.KeyLostError) and exc.version is None
    assert isinstance(_protocol.error_from_reply("junk"), errors.ProtocolError)


def test_retry_rule():
    p = RetryPolicy(retries=2)
    lost = errors.KeyLostError(b"k", 1)
    conn = errors.ConnectionError("x")
    tmo = errors.TimeoutError("x")
    assert p.should_retry(lost, True, True, 0)
    assert not p.should_retry(lost, False, True, 0)
    assert not p.should_retry(lost, True, True, 2)            # bound
    assert not p.should_retry(errors.UnrecoverableKeyError(b"k", 1), True, True, 0)
    assert p.should_retry(conn, True, True, 0)                # read after send
    assert not p.should_retry(conn, False, True, 0)           # write after send
    assert p.should_retry(conn, False, False, 0)              # write never sent
    assert not p.should_retry(tmo, True, True, 0)             # timeouts: opt-in
    assert RetryPolicy(on_timeout=True).should_retry(tmo, True, True, 0)
    assert not RetryPolicy(on_timeout=True).should_retry(tmo, False, True, 0)
    assert not p.should_retry(errors.ResponseError("x"), True, True, 0)
    q = RetryPolicy(retries=5, backoff=0.05, backoff_max=0.3)
    assert [q.delay(i) for i in range(5)] == [0.05, 0.1, 0.2, 0.3, 0.3]
    with pytest.raises(ValueError):
        RetryPolicy(retries=-1)


def test_may_resend_is_the_retry_rule_without_the_count():
    # the cluster client resends by this rule, bounded by time instead of retries
    p = RetryPolicy(retries=0)
    conn = errors.ConnectionError("x")
    tmo = errors.TimeoutError("x")
    assert not p.should_retry(conn, True, True, 0)            # out of retries...
    assert p.may_resend(conn, True, True)                     # ...the rule itself still allows
    assert not p.may_resend(conn, False, True)                # write after send: never
    assert p.may_resend(conn, False, False)                   # write never sent
    assert not p.may_resend(tmo, True, True)                  # timeouts: opt-in
    assert RetryPolicy(on_timeout=True).may_resend(tmo, True, True)
    assert not RetryPolicy(on_timeout=True).may_resend(tmo, False, True)
    assert not p.may_resend(errors.KeyLostError(b"k", 1), True, True)
    assert not p.may_resend(errors.ResponseError("x"), True, True)


def test_parse_url():
    assert parse_url("kv://localhost:1234") == {"host": "localhost", "port": 1234}
    assert parse_url("kv://:p%40ss@10.0.0.1:99") == {
        "host": "10.0.0.1", "port": 99, "password": "p@ss"}
    assert parse_url("kv://[::1]:5")["host"] == "::1"
    assert parse_url("kv://h")["port"] == 7379
    kw = parse_url("kv://h:1?socket_timeout=1.5&retries=0&max_connections=3")
    assert kw["socket_timeout"] == 1.5 and kw["retries"] == 0 and kw["max_connections"] == 3
    for bad in ("http://h:1", "kv://h:99999", "kv://h:1/3", "kv://h:1?colour=red",
                "kv://h:1?retries=many"):
        with pytest.raises(ValueError):
            parse_url(bad)
    with pytest.raises(TypeError):
        parse_url(b"kv://h:1")
