/* engine.h - the record store: the index (index.h) and the records, both in
 * the arena, with checksummed records, exact invalidation of lost records,
 * hash-range loss of index pages, salvage, compaction, the patrol scrubber
 * and expiry.
 *
 * Record layout in the arena (little-endian):
 *
 *     u32 checksum   low 32 bits of XXH64(key || u32 vlen || value, seed=version)
 *     u32 vlen       value length
 *     key bytes      only for keys longer than KV_INLINE_KEY (KV_F_LONG)
 *     value bytes
 *
 * The key (short keys) and the version live in the index entry, so a record
 * whose bytes are lost is still known by name and version. The checksum
 * binds the record to its key and version.
 *
 * Every store operation runs inside one guard (a sigsetjmp landing pad):
 * before it touches an arena subpage it checks the lost and armed bitmaps;
 * a fault anywhere leaves the operation, which processes the loss
 * (kv_eng_recover) and starts again from the top. Operations check for
 * pending losses first, so the index never points into memory known to be
 * lost. The caller holds the engine (the Python binding: the GIL).
 */
#ifndef KV_ENGINE_H
#define KV_ENGINE_H

#include "alloc.h"
#include "arena.h"
#include "index.h"

#define KV_REC_HDR 8

enum kv_rc {
    KV_OK = 0,
    KV_ABSENT = 1,
    KV_LOSTKEY = 2,     /* the key is LOST / REBUILDING / UNRECOVERABLE, or its range is */
    KV_FULL = 3,
    KV_NOMEM = 4,
    KV_STALE = 5,       /* install: the offered version is older than required */
    KV_SKIP = 6,        /* install: nothing to do (newer value present, or deleted) */
    KV_AGAIN = 7,       /* internal: process losses and retry */
};

typedef struct {
    uint64_t ranges, subpages, pages_salvaged, subpages_salvaged, salvage_failed;
    uint64_t keys_lost, subpages_quarantined, index_pages_lost, orphans_reclaimed;
    char salvage_error[160];
} kv_recover_stats;

/* What a lookup found. */
typedef struct {
    int state;              /* kv_state; for a lost range: KV_ST_LOST */
    int range_lost;         /* the key's index page was lost: not known here */
    int noname;             /* long key whose record was lost: matched by hash */
    uint64_t version;       /* entry version; for a lost range the version it was lost at */
    uint64_t expire_ms;     /* 0 = none */
    uint64_t rec_off;       /* record offset */
    uint32_t rec_len;       /* record length (kv_eng_info with want_len) */
    uint64_t entry_off;     /* arena offset of the index entry */
    uint32_t entry_len;
    uint64_t range_lo, range_hi;   /* the index page's hash range (hi inclusive) */
} kv_info;

typedef struct {
    uint8_t *key;           /* malloc'd copy; NULL for a long key lost by hash */
    uint32_t klen;
    uint64_t version, hash;
} kv_lostkey;

typedef struct {
    uint64_t lo, hi, version;   /* hi inclusive */
} kv_lostrange;

struct kv_lazy;

typedef struct {
    kv_arena *arena;
    kv_alloc al;
    uint64_t version;             /* last version handed out (writes and deletes) */
    unsigned gdepth;              /* directory: 2^gdepth u32 cells */
    uint64_t dir_sub;             /* first subpage of the directory run */
    size_t dir_n;                 /* its length in subpages */
    uint64_t nkeys;               /* entries that are keys (any state but TOMB) */
    uint64_t n_ttl;
    uint64_t n_lost;              /* entries in LOST / REBUILDING / UNRECOVERABLE */
    kv_lostkey *lostq;            /* keys that became LOST, for the rebuilder */
    size_t lostq_n, lostq_cap;
    kv_lostrange *lranges;        /* index ranges that were lost, for the rebuilder */
    size_t lr_n, lr_cap;
    size_t scrub_cursor;          /* subpage where the scrubber resumes */
    size_t ttl_cursor;
    int salvage;
    volatile int in_salvage;      /* a thread is copying a lost hugepage (engine unlocked) */
    unsigned long recover_owner;  /* 0, or the one thread (pthread_self) that processes
                                   * losses; the others wait for it (kv_eng_recover) */
    void *(*unlock)(void);        /* let other threads run during a salvage copy (the GIL) */
    void (*relock)(void *);
    int need_sweep;
    uint64_t compact_futile_dead;
    uint32_t *pgc;                /* per index subpage: keys | lost << 10 | ttl << 20 */
    uint64_t (*sweep)[2];         /* hash ranges whose orphan records await the sweep */
    size_t sweep_n, sweep_cap;
    uint64_t hdr_version;         /* version last written to the arena header (adopt.h) */
    uint64_t generation;          /* processes that adopted this arena */
    uint64_t verify_todo;         /* after adoption: subpages the scrubber has yet to pass */
    struct kv_lazy *lazy;         /* after adoption: record subpages not validated yet (lazy.h) */
    uint64_t lazy_records, lazy_records_bad, lazy_on_demand;   /* what that validation found */
    int64_t txn_off;              /* a record written but not yet referenced */
    size_t txn_len;
    uint64_t meta_sub;            /* the allocator's metadata region (alloc.h), in the arena */
    size_t meta_n;                /* its length in subpages; 0: still in process memory */
    int pgc_ext;                  /* pgc lives in that region */
    uint64_t inject_seen;         /* arena->inject_seq when armed subpages were last looked for */
    size_t meta_scrub;            /* where the scrubber resumes in the region */
    uint64_t c_meta_rebuilds, c_meta_all_lost;
    /* counters */
    uint64_t c_lost_keys, c_checksum_fail, c_faults_on_read, c_rebuilt, c_expired,
        c_compactions, c_moved, c_scrubbed_bytes, c_scrub_found, c_recoveries,
        c_pages_salvaged, c_subpages_salvaged, c_salvage_failed, c_index_pages_lost,
        c_ranges_rebuilt, c_orphans, c_dir_rebuilds, c_splits, c_moves, c_index_scrubbed, c_range_keys;
    char last_salvage_error[160];
} kv_engine;

int kv_eng_init(kv_engine *e, kv_arena *a, size_t capacity);
void kv_eng_free(kv_engine *e);
int kv_eng_flush(kv_engine *e);

/* Process newly lost subpages: drain, salvage whole lost pages (mainline),
 * replace lost index pages (their hash ranges become LOST), invalidate
 * exactly the records on lost subpages, quarantine, reclaim orphans. Cheap
 * when nothing is pending. st may be NULL. */
/* Process pending losses: salvage (mainline), invalidate, quarantine. With
 * recover_owner set, only that thread does it: on any other thread this
 * returns at once (nothing processed), and an operation there that meets
 * lost memory waits, engine unlocked, until the owner has processed it. So
 * a long salvage copy never runs on, say, an event loop thread, which goes
 * on serving whatever does not touch the lost page. */
void kv_eng_recover(kv_engine *e, kv_recover_stats *st);
/* Would a read of key now meet lost (or armed) memory and so wait for the
 * recovery? Never waits, never processes losses. 1 yes, 0 no. */
int kv_eng_touches_lost(kv_engine *e, const void *key, uint32_t klen);
/* The allocator's metadata is used through plain loads and stores: after a
 * simulated fault was injected, an armed subpage of its region counts as
 * touched at the next operation (the allocator is used by most of them). */
void kv_eng__meta_watch(kv_engine *e);
static inline void kv_eng_check(kv_engine *e)
{
    if (__builtin_expect(__atomic_load_n(&e->arena->inject_seq, __ATOMIC_ACQUIRE) != e->inject_seen, 0))
        kv_eng__meta_watch(e);
    if (__builtin_expect(__atomic_load_n(&e->arena->pending_flag, __ATOMIC_ACQUIRE) != 0, 0))
        kv_eng_recover(e, NULL);
}

/* Destination for a value: called with its length, returns a buffer (or
 * NULL: out of memory). May be called again if the read is retried. */
typedef void *(*kv_buf_fn)(void *ctx, size_t n);

/* Read key: KV_OK (value written into buf(ctx, vlen)), KV_ABSENT, KV_LOSTKEY
 * (info says why), KV_NOMEM. Expired keys are deleted here. */
int kv_eng_get(kv_engine *e, const void *key, uint32_t klen, uint64_t now_ms, kv_buf_fn buf, void *ctx,
               kv_info *info);
/* Look key up without reading the value (want_len: read the record length). */
int kv_eng_info(kv_engine *e, const void *key, uint32_t klen, uint64_t now_ms, int want_len, kv_info *info);

/* Write key=value. version 0 = next version; else that exact version.
 * ttl_ms: 0 = no expiry (clears one), >0 = absolute expiry (ms), UINT64_MAX
 * = keep the current expiry. Returns KV_OK (and *out_version), KV_FULL,
 * KV_NOMEM. Nothing is changed on failure. */
int kv_eng_put(kv_engine *e, const void *key, uint32_t klen, const void *val, size_t vlen,
               uint64_t version, uint64_t ttl_ms, uint64_t *out_version);

/* Delete: 1 if the key existed (present or lost, or its range is lost), 0 if
 * not; -1 (KV_FULL) if a tombstone was needed and there was no room. */
int kv_eng_delete(kv_engine *e, const void *key, uint32_t klen);

/* Set (exp_ms > 0) or clear (0) the expiry of a PRESENT key. A change takes
 * a version like a write (version 0 = next; else that exact version, from a
 * primary's stream) and rebinds the record's checksum to it; clearing an
 * expiry the key does not have changes nothing. KV_OK (*out_version: the
 * new version, 0 when nothing changed), KV_ABSENT, KV_LOSTKEY (a LOST key
 * takes a change only with its version given, from a primary's stream: the
 * rebuild must then reach that version; else read-repair it first),
 * KV_SKIP (version given and not newer than the key's), KV_FULL. *had: the
 * key had an expiry. */
int kv_eng_set_ttl(kv_engine *e, const void *key, uint32_t klen, uint64_t exp_ms, uint64_t version, int *had,
                   uint64_t *out_version);

/* Move a lost key between LOST / REBUILDING / UNRECOVERABLE. 1 if done. */
int kv_eng_set_state(kv_engine *e, const void *key, uint32_t klen, int state);

/* Install a value from a rebuild source. A LOST key takes it if version is
 * at least its lost version. A key unknown here because its index range was
 * lost takes it only with from_range = V > 0: the value came from a source
 * that had applied every write and delete up to version V, and the range
 * was lost at or before V. A key written or deleted here since the loss
 * keeps what it has. exp_ms: absolute expiry or 0 (keep the lost key's).
 * KV_OK, KV_STALE, KV_SKIP, KV_FULL. */
int kv_eng_install(kv_engine *e, const void *key, uint32_t klen, const void *val, size_t vlen,
                   uint64_t version, uint64_t exp_ms, uint64_t from_range);

/* A source caught up to `version` does not have key: remember it as absent
 * while its range (lost at or before version) is being rebuilt.
 * KV_OK, KV_SKIP, KV_FULL. */
int kv_eng_mark_absent(kv_engine *e, const void *key, uint32_t klen, uint64_t version);
/* A peer reported key LOST at version (it has no readable copy): enter it
 * here as LOST at that version, with no record, unless a copy at version or
 * newer is here. Keys longer than KV_INLINE_KEY are refused (KV_SKIP).
 * KV_OK, KV_SKIP, KV_STALE (version 0) or KV_FULL. */
int kv_eng_mark_lost(kv_engine *e, const void *key, uint32_t klen, uint64_t version);

/* The range [lo, hi] (hi inclusive) was rebuilt from a source caught up to
 * `version`: index pages inside it that were lost at or before that version
 * are known again (their tombstones are dropped). Returns pages cleared. */
size_t kv_eng_range_done(kv_engine *e, uint64_t lo, uint64_t hi, uint64_t version);

/* Flag every index page covering [lo, hi] (hi inclusive) LOST at `version`
 * (a peer has that range LOST): reads of keys the page does not hold raise
 * KV_LOSTKEY until kv_eng_range_done; the entries it holds stay. The pages'
 * whole ranges are queued like a lost range (take_lost_ranges), so the
 * flagged range can be wider than [lo, hi]. Returns pages newly flagged. */
size_t kv_eng_mark_range_lost(kv_engine *e, uint64_t lo, uint64_t hi, uint64_t version);

/* Visit the index pages covering [lo, hi] in hash order. For each, fn gets
 * a private copy of the page (and its subpage number), or NULL when the
 * page is lost (its range is in info-less form: lo..hi of that page). */
typedef int (*kv_page_visit)(void *ctx, const kv_ipage *copy, uint64_t lo, uint64_t hi);
int kv_eng_scan(kv_engine *e, uint64_t lo, uint64_t hi, kv_page_visit fn, void *ctx);

/* Read the value of the record at rec_off for a key/version seen in a scan
 * (checked against the checksum). KV_OK, KV_LOSTKEY, KV_NOMEM. */
int kv_eng_read_record(kv_engine *e, const uint8_t *key, uint32_t klen, uint64_t version, uint64_t rec_off,
                       unsigned flags, kv_buf_fn buf, void *ctx);
/* The key of a long-key entry (read from its record) into buf(ctx, klen). */
int kv_eng_read_longkey(kv_engine *e, uint64_t rec_off, uint32_t klen, kv_buf_fn buf, void *ctx);

/* Patrol: verify up to max_bytes of index pages and records from the
 * cursor. Returns bytes examined; *found counts records that failed. */
uint64_t kv_eng_scrub(kv_engine *e, uint64_t max_bytes, uint64_t *found);

/* Delete expired keys among `budget` index entries from the cursor. */
size_t kv_eng_expire_sweep(kv_engine *e, size_t budget, uint64_t now_ms);

/* Move live records out of sparse subpages. Returns records moved. */
size_t kv_eng_compact(kv_engine *e, size_t max_subpages);

/* Flip one byte of key's record (test hook for checksum detection). */
int kv_eng_corrupt(kv_engine *e, const void *key, uint32_t klen, size_t byte);

/* Bytes of arena used by the allocator's metadata region. */
static inline uint64_t kv_eng_meta_bytes(const kv_engine *e) { return (uint64_t)e->meta_n * 4096; }

/* Bytes of arena used by the index (pages + directory). */
static inline uint64_t kv_eng_index_bytes(const kv_engine *e) { return (uint64_t)e->al.nindex * 4096; }

uint64_t kv_now_ms(void);

#endif
