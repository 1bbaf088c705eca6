"""kvstore.server: serve a kvstore Store over TCP.

One port speaks two protocols, told apart by the first byte of a connection:
RESP2/RESP3 (so redis-cli, redis-benchmark and redis-py work unmodified) and
the native msgpack protocol of PROTOCOL.md (what ``kvstore.client`` speaks).

Run it with ``kvstore-server`` (see ``kvstore-server --help``) or embed it::

    from kvstore.server import Server, ServerConfig
    server = Server(ServerConfig(port=0))
    await server.serve()        # until server.request_stop()
"""

from .app import Server, run  # noqa: F401
from .config import ServerConfig, load_config, parse_size  # noqa: F401

__all__ = ["Server", "ServerConfig", "load_config", "parse_size", "run"]
