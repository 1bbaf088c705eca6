"""The server's incremental parsers, in process: RESP (multibulk + inline) and
native frames. Every length limit is hit, every split point is tried, and
hypothesis checks that any split of a valid stream parses to the same commands.
"""

import struct
import tracemalloc

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.server.config import parse_size
from kvstore.server.framing import MAGIC, NEED_MORE, FrameError, FrameParser
from kvstore.server.resp import RespParser, RespProtocolError, encode, integer
from serverutil import resp_command


def parse_chunks(chunks, **kw):
    p = RespParser(**kw)
    out = []
    for c in chunks:
        p.feed(c)
        out.extend(p.gets_all())
        if p.error:
            break
    return out, p


# ---------------------------------------------------------------- RESP

def test_multibulk_and_gets():
    p = RespParser()
    p.feed(resp_command("SET", "k", "v") + resp_command("GET", "k")[:7])
    assert p.gets() == [b"SET", b"k", b"v"]
    assert p.gets() is False
    p.feed(resp_command("GET", "k")[7:])
    assert p.gets() == [b"GET", b"k"]
    assert p.gets() is False
    assert p.buffered() == 0


def test_binary_and_empty_args():
    blob = bytes(range(256)) + b"\r\n\r\n"
    cmds, p = parse_chunks([resp_command("SET", blob, b"")])
    assert cmds == [[b"SET", blob, b""]] and p.error is None


def test_inline_commands():
    cmds, p = parse_chunks([b"PING\r\nset a  b\nECHO \"x y\\n\"\r\n\r\n"])
    assert p.error is None
    assert cmds == [[b"PING"], [b"set", b"a", b"b"], [b"ECHO", b"x y\n"]]
    # a closing quote must be followed by a space, as in Redis
    cmds, p = parse_chunks([b"ECHO 'it''s'\r\n"])
    assert cmds == [] and b"unbalanced quotes" in p.error


def test_inline_quotes():
    cmds, p = parse_chunks([b'SET "a b" "\\x41\\n" \'c\\\'d\'\r\n'])
    assert cmds == [[b"SET", b"a b", b"A\n", b"c'd"]]
    cmds, p = parse_chunks([b'SET "abc\r\n'])
    assert cmds == [] and b"unbalanced quotes" in p.error


def test_fast_path_hands_over_to_slow_path():
    """A batch mixing ordinary commands with a CRLF inside a value, a big
    header, an inline command and a partial tail parses like the slow path."""
    cmds = [("GET", "a"), ("SET", "k", "v\r\nw"), ("SET", "k2", "x" * 5000),
            ("MSET",) + tuple("abcdefgh"), ("GET", "b")]
    data = b"".join(resp_command(*c) for c in cmds) + b"PING\r\n" + resp_command("GET", "z")
    expect = [[a.encode() for a in c] for c in cmds] + [[b"PING"], [b"GET", b"z"]]
    for cut in (len(data), len(data) - 3):
        p = RespParser()
        p.feed(data[:cut])
        got = p.gets_all()
        p.feed(data[cut:])
        got += p.gets_all()
        assert got == expect and p.error is None and p.buffered() == 0
    p = RespParser()
    p.feed(resp_command("GET", "a") + b"*1\r\n$3\r\nabcXY")
    assert p.gets_all() == [[b"GET", b"a"]] and b"not terminated" in p.error


def test_zero_and_negative_multibulk_are_skipped():
    cmds, p = parse_chunks([b"*0\r\n*-1\r\n" + resp_command("PING")])
    assert cmds == [[b"PING"]] and p.error is None


@pytest.mark.parametrize("data, msg", [
    (b"*99999999999\r\n", b"invalid multibulk length"),
    (b"*2097153\r\n", b"invalid multibulk length"),
    (b"*abc\r\n", b"invalid multibulk length"),
    (b"*1\r\n$4294967296\r\n", b"invalid bulk length"),
    (b"*1\r\n$-5\r\n", b"invalid bulk length"),
    (b"*1\r\n$x\r\n", b"invalid bulk length"),
    (b"*1\r\n:3\r\n", b"expected '$', got ':'"),
    (b"*1\r\n$3\r\nabcXY", b"bulk string not terminated by CRLF"),
    (b"*" + b"1" * 100, b"invalid multibulk length"),
    (b"*1\r\n$" + b"1" * 100, b"invalid bulk length"),
    (b"GET " + b"x" * 70000, b"too big inline request"),
])
def test_protocol_errors(data, msg):
    cmds, p = parse_chunks([resp_command("PING") + data])
    assert cmds == [[b"PING"]]              # what came before still runs
    assert p.error.startswith(b"-ERR Protocol error: ") and msg in p.error
    with pytest.raises(RespProtocolError):
        p.gets()


def test_limits_are_configurable():
    cmds, p = parse_chunks([resp_command("SET", "k", "x" * 11)], max_bulk=10)
    assert p.error and b"invalid bulk length" in p.error
    cmds, p = parse_chunks([resp_command("A", "b", "c")], max_multibulk=2)
    assert p.error and b"invalid multibulk length" in p.error
    cmds, p = parse_chunks([resp_command("SET", "k", "v" * 50)], max_buffer=40)
    assert p.error is None and cmds            # complete commands are fine
    cmds, p = parse_chunks([resp_command("SET", "k", "v" * 50)[:-3]], max_buffer=40)
    assert p.error and b"too big request" in p.error


def test_huge_declared_lengths_allocate_nothing():
    tracemalloc.start()
    try:
        for data in (b"*99999999999\r\n", b"*1\r\n$4294967296\r\n",
                     b"*1000000\r\n$536870912\r\nabc"):
            before = tracemalloc.get_traced_memory()[0]
            p = RespParser()
            p.feed(data)
            p.gets_all()
            assert tracemalloc.get_traced_memory()[0] - before < 64 * 1024
    finally:
        tracemalloc.stop()


def test_big_bulk_in_small_chunks_is_linear():
    value = b"v" * (3 * 1024 * 1024)
    data = resp_command("SET", "k", value)
    p = RespParser()
    for i in range(0, len(data), 4096):
        p.feed(data[i:i + 4096])
        cmds = p.gets_all()
        if cmds:
            break
    assert cmds == [[b"SET", b"k", value]]
    assert p.buffered() == 0


resp_arg = st.binary(max_size=40) | st.sampled_from([b"", b"\r\n", b"$1\r\n", b"*3"])
resp_cmd = st.lists(resp_arg, min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(cmds=st.lists(resp_cmd, min_size=1, max_size=8), data=st.data())
def test_any_split_parses_the_same(cmds, data):
    stream = b"".join(resp_command(*c) for c in cmds)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    got, p = parse_chunks(chunks)
    assert p.error is None
    assert got == [list(c) for c in cmds]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_raises_unexpected(data):
    p = RespParser(max_inline=100)
    p.feed(data)
    cmds = p.gets_all()
    assert isinstance(cmds, list)
    assert all(isinstance(a, bytes) for c in cmds for a in c)
    assert p.error is None or p.error.startswith(b"-ERR Protocol error")


def test_encode():
    assert encode(None) == b"$-1\r\n" and encode(None, True) == b"_\r\n"
    assert encode({"a": 1}) == b"*2\r\n$1\r\na\r\n:1\r\n"
    assert encode({"a": 1}, True) == b"%1\r\n$1\r\na\r\n:1\r\n"
    assert encode([b"x", 2, None]) == b"*3\r\n$1\r\nx\r\n:2\r\n$-1\r\n"
    assert encode(True, True) == b"#t\r\n" and encode(True) == b":1\r\n"
    assert encode(1.5, True) == b",1.5\r\n"
    assert integer(5) == b":5\r\n" and integer(10**12) == b":1000000000000\r\n"


# ---------------------------------------------------------------- native frames

def frame(obj):
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def test_frames_magic_then_objects():
    p = FrameParser()
    p.feed(MAGIC[:2])
    assert p.read_magic() is False
    p.feed(MAGIC[2:] + frame([1, "get", [b"k"]]) + frame([2, "ping", []])[:3])
    assert p.read_magic() is True
    assert p.gets() == [1, "get", [b"k"]]
    assert p.gets() is NEED_MORE
    p.feed(frame([2, "ping", []])[3:])
    assert p.gets() == [2, "ping", []]


def test_bad_magic():
    p = FrameParser()
    p.feed(b"\x00XY1")
    with pytest.raises(FrameError):
        p.read_magic()


def test_frame_length_checked_before_allocating():
    tracemalloc.start()
    try:
        p = FrameParser(expect_magic=False)
        before = tracemalloc.get_traced_memory()[0]
        p.feed(b"\xff\xff\xff\xff" + b"x" * 10)
        with pytest.raises(FrameError, match="exceeds max_frame"):
            p.gets()
        assert tracemalloc.get_traced_memory()[0] - before < 64 * 1024
    finally:
        tracemalloc.stop()
    p = FrameParser(max_frame=100, expect_magic=False)
    p.feed(struct.pack(">I", 101))
    with pytest.raises(FrameError):
        p.gets()


@pytest.mark.parametrize("body", [
    b"\xc1",                                    # never-used msgpack byte
    b"\x93\x01",                                # truncated array
    msgpack.packb(msgpack.ExtType(1, b"x")),    # ext types are refused
    b"\xdd\xff\xff\xff\xff",                    # array32 claiming 4G items
    b"\xc6\xff\xff\xff\xf0abc",                 # bin32 claiming 4 GiB
    b"\x01\x02",                                # extra data after the object
])
def test_undecodable_frames(body):
    p = FrameParser(expect_magic=False)
    p.feed(struct.pack(">I", len(body)) + body)
    with pytest.raises(FrameError):
        p.gets()


@settings(max_examples=150, deadline=None)
@given(objs=st.lists(st.tuples(st.integers(0, 2**32), st.text(max_size=8),
                               st.lists(st.binary(max_size=30), max_size=4)),
                     min_size=1, max_size=6),
       data=st.data())
def test_frames_any_split(objs, data):
    stream = MAGIC + b"".join(frame(list(o)) for o in objs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    p = FrameParser()
    got = []
    for a, b in zip([0] + cuts, cuts + [len(stream)]):
        p.feed(stream[a:b])
        if p.read_magic():
            got.extend(p.gets_all())
    assert got == [[i, op, args] for i, op, args in objs]


def test_big_frame_in_chunks():
    value = b"z" * (2 * 1024 * 1024 + 7)
    data = MAGIC + frame([9, "put", [b"k", value]])
    p = FrameParser()
    got = []
    for i in range(0, len(data), 8192):
        p.feed(data[i:i + 8192])
        if p.read_magic():
            got.extend(p.gets_all())
    assert got == [[9, "put", [b"k", value]]]


def test_parse_size():
    assert parse_size("64MiB") == 64 * 2**20 and parse_size("1gb") == 10**9
    assert parse_size(123) == 123 and parse_size("10k") == 10000
    for bad in ("abc", "-1", "1.5G", True):
        with pytest.raises(ValueError):
            parse_size(bad)
