"""Tests of the fake server (tests/fakeserver.py) the client tests run against."""

import socket

import msgpack

from fakeserver import _LEN, frame


def _raw_call(server, *requests):
    sock = socket.create_connection((server.host, server.port), timeout=5)
    try:
        sock.sendall(b"\x00KV1" + b"".join(frame(r) for r in requests))
        replies = []
        buf = b""
        while len(replies) < 1 + len(requests):
            buf += sock.recv(65536)
            while len(buf) >= 4:
                (n,) = _LEN.unpack(buf[:4])
                if len(buf) < 4 + n:
                    break
                replies.append(msgpack.unpackb(buf[4:4 + n], raw=False))
                buf = buf[4 + n:]
        return replies
    finally:
        sock.close()


def test_fake_speaks_the_protocol(fake):
    hello, put, get, missing = _raw_call(
        fake, [1, "put", [b"k", b"v"]], [2, "get", [b"k"]], [3, "get", [b"nope"]])
    assert hello[0] == 0 and hello[1] == 0 and hello[2]["proto"] == 1
    assert put == [1, 0, 1]
    assert get == [2, 0, b"v"]
    assert missing == [3, 0, None]


def test_fake_lost_key_answers_lost_then_recovers(fake):
    fake.data[b"k"] = (7, b"v")
    fake.lose(b"k", times=1)
    _, first, second = _raw_call(fake, [1, "get", [b"k"]], [2, "get", [b"k"]])
    assert first == [1, 1, ["LOST", "key lost, being rebuilt", {"version": 7}]]
    assert second == [2, 0, b"v"]
