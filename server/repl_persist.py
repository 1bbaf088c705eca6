"""The primary's replication position, kept in the arena so a crash restart resumes it.

A planned restart hands the replication id and offset to the next process in
its environment (:mod:`.restart`). A crash leaves nothing but the arena, so a
primary with a backlog also writes its position into the arena's header
subpage, in the half the header does not use (subpage 0, bytes 2048-4095;
``adopt.h`` describes the first 88 bytes):

    2048  u64  magic     ``KVREPL`` 0x00 0x01 (0 when nothing is kept)
    2056  20B  replid    the replication id (40 hex digits as 20 bytes)
    2076  u32  (zero)
    2080  u64  offset    replication offset after the last chunk handed to
                         the replicas
    2088  u64  version   every write with a version up to this one is in
                         the stream before ``offset``
    2096  u32  intent_n  keys in the intent list; 0xFFFFFFFF: it overflowed
    2100  u32  flags     1: a FLUSHALL is in progress
    2104  u64  tail_at   offset of the last chunk handed to the replicas
    2112  u32  tail_len  its length (0: not kept, longer than 960 bytes)
    2116  u32  (zero)
    2120  ...            the intent list: u32 length + key bytes, each (to 3136)
    3136  ...            the last chunk's bytes (to 4096)

What the crash can cut between a write reaching the store and its entry
reaching the stream is closed by two things:

* a write that leaves an entry with a fresh version (SET, MSET, INCR, ...)
  is found after the crash by its version: every key newer than ``version``
  is sent again as a complete ``p`` entry (or ``d`` when it is gone);
* a write whose effect carries no fresh version (DEL, EXPIRE / PERSIST,
  a write at a version made elsewhere, FLUSHALL) first puts its key (or the
  flush flag) in the intent list, before the Store changes; the list is
  emptied once the command's entries are handed over (below). After a crash
  each listed key is sent again with its present state (``p``, or ``d``
  when it is gone), after a ``f`` when a FLUSHALL was in progress.

When the entries fed in one loop iteration are handed to the replicas (the
backlog's ``flush_pending``), the chunk is copied to the tail (when it is
short) and published (``tail_len``), then ``offset`` is rewritten (from then
on the tail ends at it), then ``version`` (the Store's version when the last
entry was fed; a crash between the two leaves an older version with the
newer offset: more keys are sent again, never fewer), then the intent list
is emptied; only then are the bytes sent. A replica that had not received
the last chunk when the process died gets it from the tail: both a replica
at ``offset`` and one at ``tail_at`` continue with a partial sync. One further
behind does a full sync (the rest of the backlog was process memory). A
command whose keys do not fit the intent list (about 1 KiB of key names)
marks it overflowed: a crash before its entries are handed over makes the
next worker start a new replication id (a full sync).
"""

import struct

from kvstore.errors import KeyLostError

from .logs import event

__all__ = ["ArenaReplState", "REGION", "read_state", "resume"]

#: Where the state lives in the arena (subpage 0) and how long it may be.
REGION = 2048
REGION_END = 4096
MAGIC = b"KVREPL\x00\x01"
_OFFSET = REGION + 32
_VERSION = REGION + 40
_INTENT = REGION + 48           # u32 count, u32 flags
_TAIL = REGION + 56             # u64 offset, u32 length, u32 zero
_KEYS = REGION + 72
_TAIL_BYTES = 3136
_TAIL_MAX = REGION_END - _TAIL_BYTES
OVERFLOW = 0xFFFFFFFF
FLAG_FLUSH = 1

_u64 = struct.Struct("<Q")
_u32 = struct.Struct("<I")
_two = struct.Struct("<II")


class ArenaReplState:
    """The writer of the kept position (one per primary with an arena)."""

    def __init__(self, store):
        self.store = store
        self.arena = store.arena
        self.active = False          # the magic is written: the state is kept
        self.n = 0                   # intent keys listed
        self.flags = 0
        self.pos = _KEYS             # where the next intent key goes
        self.covered = 0             # intent keys whose writes were fed
        self.failed = False

    def _w(self, off, data):
        try:
            self.arena.write(off, data)
        except Exception as e:  # noqa: BLE001 - a memory error: stop keeping it
            self._give_up(e)
            raise _Gone() from e

    def _give_up(self, e):
        self.active = False
        if not self.failed:
            self.failed = True
            event("error", "repl_state_not_kept", error=f"{type(e).__name__}: {e}",
                  detail="a crash restart will start a new replication id (full sync)")
        try:
            self.arena.write(REGION, bytes(8))
        except Exception:  # noqa: BLE001 - header subpage gone: adoption refuses the arena
            pass

    def start(self, replid, offset, version):
        """Keep a (new) history: replid from offset on."""
        try:
            rid = bytes.fromhex(replid)
        except (TypeError, ValueError):
            rid = b""
        if len(rid) != 20:
            self.forget()
            return
        try:
            self._w(REGION, bytes(8))
            self._w(REGION + 8, rid + bytes(4) + _u64.pack(offset) + _u64.pack(version)
                    + _two.pack(0, 0) + _u64.pack(0) + _two.pack(0, 0))
            self._w(REGION, MAGIC)
        except _Gone:
            return
        self.n, self.flags, self.pos, self.covered = 0, 0, _KEYS, 0
        self.failed = False
        self.active = True

    def attach(self, st):
        """Go on with the state ``read_state`` found (its intent list stays
        until the entries sent again are fed)."""
        self.n, self.flags, self.pos, self.covered = len(st["keys"]), st["flags"], st["end"], 0
        self.failed = False
        self.active = True

    def forget(self):
        """No history is kept (a replica, a promotion before its first sync)."""
        self.active = False
        self.n, self.flags, self.pos, self.covered = 0, 0, _KEYS, 0
        try:
            self.arena.write(REGION, bytes(8))
        except Exception:  # noqa: BLE001
            pass

    def fed(self):
        """The entries of every write so far were fed (not yet sent)."""
        self.covered = self.n

    def commit(self, offset, version, chunk=None):
        """The stream up to ``offset`` (its last chunk: ``chunk``) is about
        to be sent to the replicas and holds every write up to ``version``.
        Empties the intent list when every key in it was fed by then."""
        if not self.active:
            return
        try:
            self._w(_TAIL + 8, _u32.pack(0))
            if chunk is not None and 0 < len(chunk) <= _TAIL_MAX:
                self._w(_TAIL_BYTES, chunk)
                self._w(_TAIL, _u64.pack(offset - len(chunk)))
                self._w(_TAIL + 8, _u32.pack(len(chunk)))
            self._w(_OFFSET, _u64.pack(offset))
            self._w(_VERSION, _u64.pack(version))
            if (self.n or self.flags) and self.covered == self.n:
                self._w(_INTENT, _two.pack(0, 0))
                self.n, self.flags, self.pos, self.covered = 0, 0, _KEYS, 0
        except _Gone:
            pass

    def intent(self, key):
        """``key`` is about to change without a fresh version (before the Store write)."""
        if not self.active or self.n == OVERFLOW:
            return
        key = bytes(key)
        need = 4 + len(key)
        try:
            if self.pos + need > _TAIL_BYTES:
                self.n = OVERFLOW
                self._w(_INTENT, _u32.pack(OVERFLOW))
                return
            self._w(self.pos, _u32.pack(len(key)) + key)
            self.pos += need
            self.n += 1
            self._w(_INTENT, _u32.pack(self.n))      # published last
        except _Gone:
            pass

    def intent_flush(self):
        """A FLUSHALL is about to run."""
        if not self.active:
            return
        self.flags |= FLAG_FLUSH
        try:
            self._w(_INTENT + 4, _u32.pack(self.flags))
        except _Gone:
            pass


class _Gone(Exception):
    pass


def read_state(arena):
    """The kept state of ``arena``: a dict (replid, offset, version, keys,
    flush), or (None, reason)."""
    try:
        raw = arena.read(REGION, REGION_END - REGION)
    except Exception as e:  # noqa: BLE001
        return None, f"unreadable ({type(e).__name__}: {e})"
    if raw[:8] != MAGIC:
        return None, "none kept (not a primary with replicas, or an older build)"
    replid = raw[8:28].hex()
    offset = _u64.unpack_from(raw, 32)[0]
    version = _u64.unpack_from(raw, 40)[0]
    n, flags = _two.unpack_from(raw, 48)
    if n == OVERFLOW:
        return None, "a command touching more keys than the intent list holds was cut short"
    tail_at = _u64.unpack_from(raw, 56)[0]
    tail_len = _u32.unpack_from(raw, 64)[0]
    tail = None
    if 0 < tail_len <= _TAIL_MAX and tail_at + tail_len == offset:
        t0 = _TAIL_BYTES - REGION
        tail = bytes(raw[t0:t0 + tail_len])
    keys = []
    pos = _KEYS - REGION
    for _ in range(n):
        if REGION + pos + 4 > _TAIL_BYTES:
            return None, "intent list does not verify"
        ln = _u32.unpack_from(raw, pos)[0]
        if REGION + pos + 4 + ln > _TAIL_BYTES:
            return None, "intent list does not verify"
        keys.append(bytes(raw[pos + 4:pos + 4 + ln]))
        pos += 4 + ln
    return {"replid": replid, "offset": offset, "version": version, "keys": keys,
            "flush": bool(flags & FLAG_FLUSH), "flags": flags, "end": REGION + pos,
            "tail": tail}, None


def resume(server):
    """After a crash adoption: continue the kept history. Returns True when
    the primary resumed it (its replicas at the kept offset partial-sync)."""
    repl = server.repl
    p = repl.primary
    store = server.store
    if p.persist is None or repl.role != "master" or getattr(server.config, "replica_of", None):
        if p.persist is not None:
            p.persist.forget()
        return False
    st, why = read_state(store.arena)
    if st is None:
        event("warning", "repl_not_resumed", reason=why,
              detail="new replication id; replicas do a full sync")
        p.persist.forget()
        return False
    p.replid = st["replid"]
    # the last chunk sent before the crash, when kept: a replica that missed
    # it continues from where it was
    p.start_backlog(st["offset"], st["tail"])
    p.persist.attach(st)
    repl.configure_writes()
    # the FLUSHALL first, then the writes in version order, then what is gone
    since = store.keys_since(st["version"])
    seen = set(since)
    puts, dels, lost = [], [], 0
    for k in since + [k for k in dict.fromkeys(st["keys"]) if k not in seen]:
        try:
            got = store.get_versioned(k)
        except KeyLostError:
            lost += 1                   # stays LOST here; rebuilt as any LOST key
            continue
        if got is None:             # deleted, or expired
            dels.append(("d", k, store.version))
        else:
            puts.append(("p", k, got[0], got[1], store.expire_at(k)))
    puts.sort(key=lambda e: e[2])
    entries = ([("f",)] if st["flush"] else []) + puts + dels
    if entries:
        p.on_writes(entries, None)
    else:
        p.persist.commit(p.backlog.end, store.version)
    event("warning", "repl_resumed", replid=p.replid, offset=st["offset"],
          tail_bytes=len(st["tail"] or b""), version=st["version"],
          resent=len(entries), intent_keys=len(st["keys"]), flush=int(st["flush"]),
          lost_not_sent=lost)
    return True
