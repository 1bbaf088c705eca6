"""Retry policy and ``kv://`` URL parsing, shared by the sync and asyncio clients.

The retry rule (the same for :class:`~kvstore.client.Client` and
:class:`~kvstore.client.AsyncClient`):

1. A failure before any byte of the request was written (the connection
   could not be opened, or the handshake failed) is retried for every
   command: the server cannot have seen it.
2. A connection that breaks after the request may have been sent (reset,
   EOF before the reply) is retried only for idempotent reads (get, getv,
   exists, mget, ttl, keys, dbsize, stats, lost, fetch, ping). A write
   (put, mput, delete, expire, persist, flushall, inject) is *never* re-sent:
   it raises :class:`kvstore.errors.ConnectionError`, and the write may or
   may not have been applied.
3. :class:`kvstore.errors.KeyLostError` (the key is being rebuilt) is retried
   for reads; :class:`kvstore.errors.UnrecoverableKeyError` never is.
4. Timeouts are not retried (the caller chose the deadline) unless
   ``retry_on_timeout=True``, and then only under rules 1 and 2.
5. At most ``retries`` retries, sleeping ``retry_backoff * 2**attempt``
   seconds (capped at ``retry_backoff_max``) before each one. Other errors
   (server error replies, bad arguments) are raised at once.

Pipelines follow rules 1, 2 and 4 for the whole batch (re-sent only when every
command in it is an idempotent read) and never retry a KeyLostError inside the
batch: it is returned or raised in its place.
"""

from urllib.parse import parse_qsl, unquote, urlsplit

from kvstore import errors

DEFAULT_PORT = 7379


class RetryPolicy:
    __slots__ = ("retries", "backoff", "backoff_max", "on_timeout")

    def __init__(self, retries=3, backoff=0.05, backoff_max=1.0, on_timeout=False):
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, not {retries!r}")
        if not backoff >= 0 or not backoff_max >= 0:
            raise ValueError("retry_backoff and retry_backoff_max must be >= 0")
        self.retries = retries
        self.backoff = float(backoff)
        self.backoff_max = float(backoff_max)
        self.on_timeout = bool(on_timeout)

    def delay(self, attempt):
        """Seconds to sleep before retry number ``attempt`` (0-based)."""
        return min(self.backoff * (2 ** attempt), self.backoff_max)

    def should_retry(self, exc, idempotent, sent, attempt):
        """True if ``exc`` (raised at retry ``attempt``) may be retried.

        ``sent`` is False only when the request cannot have reached the server.
        """
        if attempt >= self.retries:
            return False
        if isinstance(exc, errors.UnrecoverableKeyError):
            return False
        if isinstance(exc, errors.KeyLostError):
            return idempotent
        return self.may_resend(exc, idempotent, sent)

    def may_resend(self, exc, idempotent, sent):
        """Rules 1, 2 and 4 without the count: True if a request whose
        connection failed with ``exc`` may be sent again (the cluster client
        bounds its resends by time instead)."""
        if isinstance(exc, errors.TimeoutError):
            return self.on_timeout and (idempotent or not sent)
        if isinstance(exc, errors.ConnectionError):
            return idempotent or not sent
        return False


_URL_INTS = ("retries", "max_connections")
_URL_FLOATS = ("socket_timeout", "socket_connect_timeout", "retry_backoff",
               "retry_backoff_max", "pool_timeout")


def client_retry_policy(socket_timeout, socket_connect_timeout, retries, retry_backoff,
                        retry_backoff_max, retry_on_timeout):
    """Check a client's timeouts and build its RetryPolicy (Client and
    AsyncClient take the same settings)."""
    for name, value in (("socket_timeout", socket_timeout),
                        ("socket_connect_timeout", socket_connect_timeout)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0 seconds or None, not {value!r}")
    return RetryPolicy(retries, retry_backoff, retry_backoff_max, retry_on_timeout)


def parse_url(url):
    """Keyword arguments for a client from ``kv://[:password@]host:port[?opt=v]``.

    Query options: socket_timeout, socket_connect_timeout, retries,
    retry_backoff, retry_backoff_max, pool_timeout, max_connections.
    """
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, not {type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme != "kv":
        raise ValueError(f"not a kvstore URL (expected kv://[:password@]host:port): {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in URL {url!r}") from None
    kwargs = {"host": parts.hostname or "127.0.0.1",
              "port": DEFAULT_PORT if port is None else port}
    if parts.password is not None:
        kwargs["password"] = unquote(parts.password)
    elif parts.username:
        # kv://secret@host: a lone user part is taken as the password.
        kwargs["password"] = unquote(parts.username)
    if parts.path not in ("", "/"):
        raise ValueError(f"kvstore URLs have no path (one database): {url!r}")
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        try:
            if name in _URL_INTS:
                kwargs[name] = int(value)
            elif name in _URL_FLOATS:
                kwargs[name] = None if value in ("", "none", "None") else float(value)
            else:
                raise ValueError(f"unknown URL option {name!r} in {url!r}")
        except ValueError as exc:
            if "unknown URL option" in str(exc):
                raise
            raise ValueError(f"bad value {value!r} for URL option {name!r}") from None
    return kwargs
