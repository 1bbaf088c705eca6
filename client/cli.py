"""kvstore-cli: one command against a kvstore server, with exit codes for scripts.

Keys are taken from the command line as the raw bytes of the argument
(``os.fsencode``); ``get`` writes the value's exact bytes to stdout (a
newline is added only when stdout is a terminal).
"""

import argparse
import json
import os
import sys

from kvstore import errors

from ._config import DEFAULT_PORT, parse_url
from ._sync import Client

EXIT_OK = 0
EXIT_ABSENT = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3
EXIT_LOST = 4
EXIT_SERVER = 5

_EPILOG = """\
commands:
  get KEY                  write the value's raw bytes to stdout
  put KEY VALUE [--ttl S]  store VALUE ("-" reads the value from stdin); prints the version
  del KEY [KEY ...]        delete keys; prints how many existed
  exists KEY [KEY ...]     prints how many of the keys exist (a lost key exists)
  stats [--json]           the server's store statistics
  lost                     keys currently lost: KEY<TAB>VERSION<TAB>STATE per line
  inject KIND (--offset N | --key KEY)
                           inject a memory fault (ao, ar, hwpoison) if the server allows it
  ping [MESSAGE]           prints PONG (or MESSAGE)

exit status:
  0  ok
  1  key absent (get; del/exists when any named key was absent)
  2  usage error
  3  connection error or timeout (server unreachable, connection broken)
  4  key lost to a memory error (being rebuilt, or unrecoverable)
  5  server error (any other error reply: full, too large, no auth, ...)

The server is 127.0.0.1:7379 unless -h/-p, --url or $KVSTORE_URL
(kv://[:password@]host:port) say otherwise.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _build_parser():
    parser = _Parser(
        prog="kvstore-cli", add_help=False,
        description="Command-line client for a kvstore server (native protocol).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--help", action="help", help="show this help and exit")
    parser.add_argument("-h", "--host", default=None, help="server host (default 127.0.0.1)")
    parser.add_argument("-p", "--port", type=int, default=None,
                        help=f"server port (default {DEFAULT_PORT})")
    parser.add_argument("-a", "--password", default=None, help="server password")
    parser.add_argument("--url", default=os.environ.get("KVSTORE_URL"),
                        help="kv://[:password@]host:port (default $KVSTORE_URL)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for the server (default 10)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("get", help="print a value")
    p.add_argument("key")
    p = sub.add_parser("put", help="store a value")
    p.add_argument("key")
    p.add_argument("value", help='the value, or "-" to read it from stdin')
    p.add_argument("--ttl", type=float, default=None, help="expire after this many seconds")
    p = sub.add_parser("del", help="delete keys")
    p.add_argument("keys", nargs="+", metavar="key")
    p = sub.add_parser("exists", help="count existing keys")
    p.add_argument("keys", nargs="+", metavar="key")
    p = sub.add_parser("stats", help="server statistics")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    sub.add_parser("lost", help="list lost keys")
    p = sub.add_parser("inject", help="inject a memory fault")
    p.add_argument("kind", choices=["ao", "ar", "hwpoison"])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--offset", type=int, help="arena offset")
    where.add_argument("--key", help="the subpage holding this key's record")
    p = sub.add_parser("ping", help="check the server answers")
    p.add_argument("message", nargs="?")
    return parser


def _text(value):
    """Printable form of a key or any result value."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    return str(value)


def _json_default(value):
    if isinstance(value, (bytes, bytearray)):
        return _text(value)
    return repr(value)


def _out(text):
    sys.stdout.write(text + "\n")


def _make_client(args):
    kwargs = parse_url(args.url) if args.url else {}
    if args.host is not None:
        kwargs["host"] = args.host
    if args.port is not None:
        kwargs["port"] = args.port
    if args.password is not None:
        kwargs["password"] = args.password
    timeout = args.timeout if args.timeout and args.timeout > 0 else None
    kwargs.setdefault("socket_timeout", timeout)
    kwargs.setdefault("socket_connect_timeout", timeout)
    kwargs["max_connections"] = 1
    return Client(**kwargs)


def _run(client, args):
    cmd = args.command
    if cmd == "get":
        value = client.get(os.fsencode(args.key))
        if value is None:
            return EXIT_ABSENT
        out = sys.stdout.buffer
        out.write(value)
        if sys.stdout.isatty():
            out.write(b"\n")
        out.flush()
        return EXIT_OK
    if cmd == "put":
        if args.value == "-":
            value = sys.stdin.buffer.read()
        else:
            value = os.fsencode(args.value)
        _out(str(client.put(os.fsencode(args.key), value, ttl=args.ttl)))
        return EXIT_OK
    if cmd in ("del", "exists"):
        keys = [os.fsencode(k) for k in args.keys]
        with client.pipeline() as pipe:
            for key in keys:
                (pipe.delete if cmd == "del" else pipe.exists)(key)
            results = pipe.execute()
        count = sum(1 for r in results if r)
        _out(str(count))
        return EXIT_OK if count == len(keys) else EXIT_ABSENT
    if cmd == "stats":
        stats = client.stats()
        if args.json:
            _out(json.dumps(stats, default=_json_default, sort_keys=True))
        else:
            for name in sorted(stats, key=str):
                value = stats[name]
                if isinstance(value, (dict, list)):
                    value = json.dumps(value, default=_json_default, sort_keys=True)
                _out(f"{_text(name)}: {_text(value)}")
        return EXIT_OK
    if cmd == "lost":
        for key, version, state in client.lost():
            _out(f"{_text(key)}\t{version}\t{_text(state)}")
        return EXIT_OK
    if cmd == "inject":
        key = None if args.key is None else os.fsencode(args.key)
        info = client.inject(args.kind, offset=args.offset, key=key)
        _out(" ".join(f"{_text(k)}={_text(v)}" for k, v in info.items()))
        return EXIT_OK
    if cmd == "ping":
        payload = None if args.message is None else os.fsencode(args.message)
        _out(_text(client.ping(payload)))
        return EXIT_OK
    raise AssertionError(cmd)   # argparse only lets known commands through


def main(argv=None):
    """Entry point of ``kvstore-cli``; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        client = _make_client(args)
    except (TypeError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with client:
            return _run(client, args)
    except errors.KeyLostError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_LOST
    except (errors.ConnectionError, errors.TimeoutError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_CONNECTION
    except errors.Error as exc:
        print(f"{prog}: server error: {exc}", file=sys.stderr)
        return EXIT_SERVER
    except (TypeError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # stdout closed early (e.g. `| head`): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
