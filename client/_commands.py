"""The command layer shared by Client, AsyncClient and their pipelines.

Each public method checks its arguments, builds a :class:`Command` (the
protocol op, its args, a decoder for the result, and whether it is an
idempotent read) and hands it to ``self._execute_command``. What that returns
is what the method returns: the decoded result for :class:`~kvstore.client.Client`,
a coroutine for :class:`~kvstore.client.AsyncClient`, the pipeline itself
(for chaining) for pipelines. Argument errors (a ``str`` key, a bad ttl) are
raised when the method is called, before anything is sent, also for the
asyncio client.
"""

import numbers

from kvstore import errors

from . import _protocol

__all__ = ["Command", "CommandsMixin", "LOST", "as_bytes", "decode_reply"]


class _LostMarker:
    """Stands for a LOST value in ``mget(..., on_lost="mark")`` results."""

    __slots__ = ()

    def __repr__(self):
        return "kvstore.client.LOST"

    def __bool__(self):
        return False

    def __reduce__(self):
        return "LOST"


#: Marker put in place of a lost value by ``mget(keys, on_lost="mark")``:
#: the same object as ``kvstore.LOST`` where the engine is built, a marker of
#: its own where the client runs without it.
try:
    from kvstore.store import LOST
except ImportError:
    LOST = _LostMarker()


class Command:
    """One request: ``op`` and ``args`` as sent, ``decode(result)`` applied to
    an ok reply, ``idempotent`` True for reads that are safe to send twice,
    ``key`` the single key it names (used in KeyLostError)."""

    __slots__ = ("op", "args", "decode", "idempotent", "key")

    def __init__(self, op, args, decode=None, idempotent=False, key=None):
        self.op = op
        self.args = args
        self.decode = decode
        self.idempotent = idempotent
        self.key = key

    def __repr__(self):
        return f"Command({self.op!r}, key={self.key!r})"


def as_bytes(value, what="key"):
    """Return ``value`` as bytes; ``str`` and non-buffers are TypeErrors."""
    if type(value) is bytes:
        return value
    if isinstance(value, str):
        raise TypeError(f"{what} must be bytes-like, not str; encode it first "
                        f"(for example {what}.encode())")
    try:
        return bytes(memoryview(value))
    except TypeError:
        raise TypeError(f"{what} must be bytes-like (bytes, bytearray, memoryview), "
                        f"not {type(value).__name__}") from None


def _seconds(value, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{what} must be > 0 seconds, got {value!r}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _bool(result):
    return bool(result)


def _getv(result):
    if result is None:
        return None
    version, value = result
    return version, value


def _lost(result):
    return [tuple(entry) for entry in result]


def _fetch(result):
    return {key: tuple(entry) for key, entry in result.items()}


def _fetch_range(result):
    nxt, got = result
    return nxt, {key: tuple(entry) for key, entry in got.items()}


def _mget_decoder(keys, on_lost):
    def decode(result):
        values, lost = result
        if not lost:
            return values
        if on_lost == "raise":
            key = keys[lost[0]]
            raise errors.KeyLostError(
                key, None, f"LOST key {key!r} in mget (and {len(lost) - 1} more); "
                "it is being rebuilt or has no replica")
        for index in lost:
            values[index] = LOST
        return values
    return decode


class CommandsMixin:
    """Methods for every native op; subclasses define ``_execute_command``."""

    __slots__ = ()

    def _execute_command(self, command):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- reads -------------------------------------------------------------

    def ping(self, payload=None):
        """Round trip to the server; ``"PONG"``, or ``payload`` echoed back."""
        args = [] if payload is None else [as_bytes(payload, "payload")]
        return self._execute_command(Command("ping", args, None, True))

    def get(self, key):
        """Value of ``key`` (bytes) or None if absent.

        A lost key raises :class:`kvstore.errors.KeyLostError` (after the
        retries, see the class docstring), never None.
        """
        key = as_bytes(key)
        return self._execute_command(Command("get", [key], None, True, key))

    def getv(self, key):
        """``(version, value)`` of ``key``, or None if absent."""
        key = as_bytes(key)
        return self._execute_command(Command("getv", [key], _getv, True, key))

    def exists(self, key):
        """True if ``key`` exists (a lost key exists)."""
        key = as_bytes(key)
        return self._execute_command(Command("exists", [key], _bool, True, key))

    def mget(self, keys, on_lost="raise"):
        """Values of ``keys`` in order, None for absent ones.

        ``on_lost="raise"`` (default): a lost key raises KeyLostError naming
        the first lost key. ``on_lost="mark"``: lost values are
        :data:`kvstore.client.LOST` (never None, which means absent).
        """
        if on_lost not in ("raise", "mark"):
            raise ValueError(f"on_lost must be 'raise' or 'mark', not {on_lost!r}")
        if isinstance(keys, (str, bytes, bytearray, memoryview)):
            raise TypeError("mget takes a list of keys, not a single key")
        keys = [as_bytes(k) for k in keys]
        return self._execute_command(
            Command("mget", [keys], _mget_decoder(keys, on_lost), True))

    def ttl(self, key):
        """Seconds left (float), -1 if the key has no expiry, -2 if absent."""
        key = as_bytes(key)
        return self._execute_command(Command("ttl", [key], None, True, key))

    def keys(self):
        """Every key (a list of bytes)."""
        return self._execute_command(Command("keys", [], None, True))

    def dbsize(self):
        """Number of keys."""
        return self._execute_command(Command("dbsize", [], None, True))

    def incr(self, key, delta=1):
        """Add the int ``delta`` to the integer stored at ``key`` (absent
        counts as 0; the expiry is kept); returns the new value. A value
        that is not an integer, or an overflow, raises ResponseError."""
        key = as_bytes(key)
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise TypeError(f"delta must be an int, not {type(delta).__name__}")
        return self._execute_command(Command("incr", [key, delta], None, False, key))

    def incrbyfloat(self, key, delta):
        """INCRBYFLOAT: add ``delta`` (a number, or its decimal text as
        bytes/str) with Redis's long double arithmetic; returns the new value
        as stored (bytes, e.g. ``b"10.5"``)."""
        key = as_bytes(key)
        if isinstance(delta, str):
            delta = delta.encode()
        if isinstance(delta, bool) or not isinstance(delta, (int, float, bytes)):
            raise TypeError(f"delta must be a number, not {type(delta).__name__}")
        return self._execute_command(Command("incrbyfloat", [key, delta], None, False, key))

    def scan(self, cursor=0, count=10, match=None):
        """One SCAN step: ``(next_cursor, keys)``; 0 starts and ends an
        iteration. A key present for the whole iteration is returned at
        least once."""
        args = [int(cursor), int(count)]
        if match is not None:
            args.append(as_bytes(match))
        return self._execute_command(Command("scan", args, tuple, True))

    def stats(self):
        """The server's store statistics (a dict)."""
        return self._execute_command(Command("stats", [], None, True))

    def lost(self):
        """Keys currently lost: a list of ``(key, version, state)``."""
        return self._execute_command(Command("lost", [], _lost, True))

    def fetch(self, items):
        """Rebuild-source fetch: ``items`` is ``[(key, min_version), ...]`` or a
        mapping; returns ``{key: (version, value)}`` for keys held at
        ``>= min_version``."""
        if hasattr(items, "items"):
            items = items.items()
        pairs = []
        for key, min_version in items:
            if isinstance(min_version, bool) or not isinstance(min_version, numbers.Integral):
                raise TypeError("fetch min_version must be an int")
            pairs.append([as_bytes(key), int(min_version)])
        return self._execute_command(Command("fetch", [pairs], _fetch, True))

    def fetch_range_page(self, lo, hi, min_version=0, max_bytes=None):
        """One page of a rebuild-source range fetch (native ``fetch_range``):
        ``(next, {key: (version, value, expire_at_ms or None)})`` for keys
        with ``lo <= kvstore.key_hash(key) < hi`` (``hi`` up to ``2**64``);
        ``next`` is where the rest of the range starts, None when done.
        A server that has not applied every write and delete up to
        ``min_version`` raises :class:`kvstore.errors.SourceBehindError`."""
        for name, v in (("lo", lo), ("hi", hi), ("min_version", min_version)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"fetch_range {name} must be an int")
        lo, hi = int(lo), int(hi)
        if not 0 <= lo < hi <= 1 << 64:
            raise ValueError(f"need 0 <= lo < hi <= 2**64, not [{lo}, {hi})")
        args = [lo, None if hi == 1 << 64 else hi, int(min_version)]
        if max_bytes is not None:
            args.append(int(max_bytes))
        return self._execute_command(Command("fetch_range", args, _fetch_range, True))

    def fetch_hash_range(self, lo, hi, min_version=0):
        """Every key with ``lo <= kvstore.key_hash(key) < hi`` held by the
        server: ``{key: (version, value, expire_at_ms or None)}``, asked
        page by page (each page answered at ``>= min_version``, see
        :meth:`fetch_range_page`)."""
        out = {}
        pos = lo
        while True:
            nxt, got = self.fetch_range_page(pos, hi, min_version)
            out.update(got)
            if nxt is None:
                return out
            pos = nxt

    # -- writes (never re-sent blindly, see the client docstring) ----------

    def put(self, key, value, ttl=None):
        """Store ``value`` under ``key``; returns the new version (int).

        ``ttl``: seconds (int or float > 0) until the key expires.
        """
        key = as_bytes(key)
        args = [key, as_bytes(value, "value")]
        if ttl is not None:
            args.append(_seconds(ttl, "ttl"))
        return self._execute_command(Command("put", args, None, False, key))

    def delete(self, key):
        """Remove ``key``; True if it existed."""
        key = as_bytes(key)
        return self._execute_command(Command("delete", [key], _bool, False, key))

    def mput(self, mapping):
        """Store many pairs (a mapping or an iterable of ``(key, value)``);
        returns their new versions in order."""
        if hasattr(mapping, "items"):
            mapping = mapping.items()
        flat = []
        for key, value in mapping:
            flat.append(as_bytes(key))
            flat.append(as_bytes(value, "value"))
        return self._execute_command(Command("mput", [flat], None, False))

    def expire(self, key, seconds):
        """Set ``key`` to expire in ``seconds``; True if the key exists.

        As in Redis, ``seconds <= 0`` deletes the key now.
        """
        key = as_bytes(key)
        if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
            raise TypeError(f"seconds must be a number, not {type(seconds).__name__}")
        seconds = int(seconds) if isinstance(seconds, numbers.Integral) else float(seconds)
        return self._execute_command(Command("expire", [key, seconds], _bool, False, key))

    def persist(self, key):
        """Remove ``key``'s expiry; True if one was removed."""
        key = as_bytes(key)
        return self._execute_command(Command("persist", [key], _bool, False, key))

    def flushall(self):
        """Remove every key."""
        return self._execute_command(Command("flushall", [], _bool, False))

    def inject(self, kind, offset=None, key=None, entry=None):
        """Inject a memory fault on the server (if it allows fault injection).

        ``kind`` is ``"ao"``, ``"ar"`` or ``"hwpoison"``; give exactly one of
        ``offset`` (arena offset), ``key`` (the subpage holding that key's
        record) or ``entry`` (the index page holding that key's entry: every
        key of the page's hash range is LOST until rebuilt by hash range).
        Returns ``{"offset": n, "subpage": s, "kind": kind}``.
        A server without fault injection raises
        :class:`~kvstore.client.InjectionDisabledError`.
        """
        if not isinstance(kind, str):
            raise TypeError("kind must be a str: 'ao', 'ar' or 'hwpoison'")
        if sum(x is not None for x in (offset, key, entry)) != 1:
            raise ValueError("inject needs exactly one of offset=, key= or entry=")
        if offset is not None:
            if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
                raise ValueError(f"offset must be a non-negative int, not {offset!r}")
            args = [kind, "offset", int(offset)]
        elif key is not None:
            key = as_bytes(key)
            args = [kind, "key", key]
        else:
            key = as_bytes(entry)
            args = [kind, "entry", key]
        return self._execute_command(Command("inject", args, None, False, key))


def decode_reply(status, result, command):
    """Result of ``command`` from its reply, or raise the mapped error."""
    if status != 0:
        raise _protocol.error_from_reply(result, command.key, command.op)
    decode = command.decode
    if decode is None:
        return result
    try:
        return decode(result)
    except errors.Error:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise errors.ProtocolError(
            f"unexpected result for {command.op!r}: {result!r:.200} ({exc})") from None
