"""kvstore.client.AsyncClient (the asyncio twin) against the fake server."""

import asyncio
import builtins
import time

import pytest

from fakeserver import FakeServer, frame

import kvstore.client as kc
from kvstore import errors
from kvstore.client import LOST, AsyncClient, Client


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_same_command_methods_as_sync():
    """Twins: every public command of Client exists on AsyncClient."""
    sync = {n for n in dir(Client) if not n.startswith("_")}
    asyn = {n for n in dir(AsyncClient) if not n.startswith("_")}
    assert sync - {"close"} <= asyn
    assert "aclose" in asyn
    for name in ("get", "put", "mget", "pipeline", "inject", "fetch"):
        assert getattr(Client, name) is getattr(AsyncClient, name) or name == "pipeline"


def test_basic_commands(fake):  # noqa: F811
    async def main():
        async with AsyncClient(fake.host, fake.port, socket_timeout=5) as c:
            assert await c.ping() == "PONG"
            v = await c.put(b"a", b"1", ttl=50)
            assert await c.get(b"a") == b"1"
            assert await c.getv(b"a") == (v, b"1")
            assert await c.get(b"nope") is None
            assert await c.exists(b"a") is True
            assert await c.mput({b"b": b"2"}) == [v + 1]
            assert await c.mget([b"a", b"b", b"c"]) == [b"1", b"2", None]
            assert 49 < await c.ttl(b"a") <= 50
            assert await c.persist(b"a") is True
            assert await c.expire(b"a", 10) is True
            assert sorted(await c.keys()) == [b"a", b"b"]
            assert await c.dbsize() == 2
            assert (await c.stats())["keys"] == 2
            assert await c.lost() == []
            assert await c.fetch({b"a": 0}) == {b"a": (v, b"1")}
            assert await c.delete(b"a") is True
            assert await c.flushall() is True
            with pytest.raises(TypeError, match="encode"):
                c.get("str")              # raised at call time, before awaiting
            with pytest.raises(kc.InjectionDisabledError):
                await c.inject("ao", offset=0)
    run(main())


def test_concurrent_tasks_share_the_pool(fake):  # noqa: F811
    async def main():
        async with AsyncClient(fake.host, fake.port, max_connections=3) as c:
            async def worker(n):
                for i in range(100):
                    key = b"%d-%d" % (n, i)
                    await c.put(key, key)
                    assert await c.get(key) == key
            await asyncio.gather(*(worker(n) for n in range(10)))
            assert await c.dbsize() == 1000
    run(main())
    assert fake.accepted <= 3


def test_lost_retry_and_bound(fake):  # noqa: F811
    async def main():
        async with AsyncClient(fake.host, fake.port, retries=2, retry_backoff=0.01) as c:
            version = await c.put(b"k", b"v")
            fake.lose(b"k", times=1)
            assert await c.get(b"k") == b"v"
            fake.lose(b"k", times=100)
            with pytest.raises(errors.KeyLostError) as info:
                await c.get(b"k")
            assert info.value.version == version
            assert (await c.mget([b"k"], on_lost="mark"))[0] is LOST
    run(main())
    assert fake.ops().count("get") == 2 + 3


def test_error_mapping(fake):  # noqa: F811
    fake.actions["put"].append(("error", "READONLY", "replica", {}))

    async def main():
        async with AsyncClient(fake.host, fake.port) as c:
            with pytest.raises(errors.ReadOnlyError):
                await c.put(b"k", b"v")
            with pytest.raises(errors.StoreFullError):
                await c.put(b"full", b"v")
            version = await c.put(b"k", b"v")
            fake.lose(b"k", unrecoverable=True)
            with pytest.raises(errors.UnrecoverableKeyError) as info:
                await c.get(b"k")
            assert info.value.version == version
    run(main())


def test_timeout_and_connection_drop(fake):  # noqa: F811
    fake.actions["get"].append("hang")
    fake.actions["put"].append("close")

    async def main():
        async with AsyncClient(fake.host, fake.port, socket_timeout=0.3) as c:
            start = time.monotonic()
            with pytest.raises(errors.TimeoutError) as info:
                await c.get(b"k")
            assert isinstance(info.value, builtins.TimeoutError)
            assert time.monotonic() - start < 3
            with pytest.raises(errors.ConnectionError) as info:
                await c.put(b"k", b"v")
            assert isinstance(info.value, builtins.ConnectionError)
            assert await c.get(b"k") is None
    run(main())
    assert fake.ops().count("put") == 1 and fake.ops().count("get") == 2


def test_server_killed_mid_request(fake):  # noqa: F811
    fake.actions["get"].append("hang")

    async def main():
        c = AsyncClient(fake.host, fake.port, retries=1, retry_backoff=0.01)
        await c.ping()
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, fake.stop)
        with pytest.raises(errors.ConnectionError):
            await c.get(b"k")
        await c.aclose()
        await c.aclose()
        with pytest.raises(errors.ClosedError):
            await c.ping()
    start = time.monotonic()
    run(main())
    assert time.monotonic() - start < 10


def test_connection_refused_and_handshake_timeout():
    server = FakeServer().start()
    port = server.port
    server.stop()

    async def refused():
        async with AsyncClient("127.0.0.1", port, retries=1, retry_backoff=0.01) as c:
            with pytest.raises(errors.ConnectionError, match=str(port)):
                await c.ping()
    run(refused())

    with FakeServer(hang_handshake=True) as hung:
        async def hang():
            async with AsyncClient(hung.host, hung.port, socket_connect_timeout=0.2) as c:
                with pytest.raises(errors.TimeoutError):
                    await c.ping()
        run(hang())


def test_cancelled_request_drops_the_connection(fake):  # noqa: F811
    fake.actions["get"].append("hang")

    async def main():
        async with AsyncClient(fake.host, fake.port) as c:
            task = asyncio.create_task(c.get(b"k"))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # the connection with an unanswered request is not reused
            assert c.connection_pool._idle == []
            assert await c.ping() == "PONG"
    run(main())
    assert fake.accepted == 2


def test_pipeline(fake):  # noqa: F811
    async def main():
        async with AsyncClient(fake.host, fake.port) as c:
            async with c.pipeline() as pipe:
                pipe.put(b"a", b"1").get(b"a").get(b"full").put(b"full", b"x").mget([b"a"])
                with pytest.raises(errors.StoreFullError) as info:
                    await pipe.execute()
            results = info.value.pipeline_results
            assert results[1:3] == [b"1", None] and results[4] == [b"1"]
            async with c.pipeline() as pipe:
                for i in range(2000):
                    pipe.put(b"k%d" % i, b"x" * 1000)
                pipe.get(b"k1999")
                out = await pipe.execute(raise_on_error=False)
            assert out[-1] == b"x" * 1000 and len(out) == 2001
            async with c.pipeline() as pipe:
                pipe.put(b"never", b"sent")
            assert await c.exists(b"never") is False
            assert await c.pipeline().execute() == []
    run(main())


def test_client_reused_across_event_loops(fake):  # noqa: F811
    c = AsyncClient(fake.host, fake.port)
    assert asyncio.run(c.put(b"k", b"v")) >= 1
    assert asyncio.run(c.get(b"k")) == b"v"     # a new loop: new connection
    asyncio.run(c.aclose())
    assert fake.accepted == 2


def test_reply_one_byte_at_a_time_and_bad_frame(fake):  # noqa: F811
    fake.actions["get"].append(("slow", 0.0005))
    fake.actions["ping"].append(("raw", frame([12345, 0, "PONG"])))

    async def main():
        async with AsyncClient(fake.host, fake.port) as c:
            await c.put(b"k", b"abc" * 30)
            assert await c.get(b"k") == b"abc" * 30
            with pytest.raises(errors.ProtocolError):
                await c.ping()
            assert await c.ping() == "PONG"
    run(main())


def test_password_and_url():
    with FakeServer(password="pw") as server:
        async def main():
            async with AsyncClient.from_url(f"kv://:pw@127.0.0.1:{server.port}") as c:
                assert await c.ping() == "PONG"
            async with AsyncClient(server.host, server.port, password="bad") as c:
                with pytest.raises(kc.AuthenticationError):
                    await c.ping()
        run(main())


def test_stale_idle_connection_replaced(fake):  # noqa: F811
    async def main():
        async with AsyncClient(fake.host, fake.port) as c:
            await c.ping()
            fake.drop_connections()
            await asyncio.sleep(0.1)
            assert await c.put(b"k", b"v") >= 1
    run(main())
    assert fake.ops().count("put") == 1 and fake.accepted == 2
