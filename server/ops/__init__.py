"""Command semantics, once for both protocols.

Each function takes the connection (``conn``: ``.server``, ``.store``,
``.writes``, ``.id``, ``.addr``) and typed arguments, and returns a Python
value or raises (``kvstore.errors`` exceptions, or
:class:`..errors.CommandError`); the RESP and native adapters parse the
arguments and encode the result, and :mod:`..errors` maps the exceptions.
Every write goes through ``conn.writes`` (:mod:`..writes`), never straight
to the Store.

    keys.py     reads and writes of keys (GET, SET, MGET, DEL, EXPIRE, ...)
    strings.py  string commands (INCR family, INCRBYFLOAT, APPEND, GETRANGE,
                SETRANGE, GETEX...) and the overflow-checked expiry arithmetic
    keyspace.py SCAN, RENAME, COPY, TOUCH, RANDOMKEY, OBJECT, EXPIRE flags,
                TIME, ROLE
    server.py   server-wide commands (FLUSHALL, fault injection, stats,
                replication: REPLICAOF, WAIT, sync, digest)
"""
