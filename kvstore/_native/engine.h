/* engine.h - the record store: index + allocator + arena, with checksummed
 * records, exact invalidation of lost records, salvage, compaction, the
 * patrol scrubber and expiry.
 *
 * Record layout in the arena (little-endian):
 *
 *     u32 checksum   low 32 bits of XXH64(key || u32 vlen || value, seed=version)
 *     u32 vlen       value length
 *     value bytes
 *
 * The key and the version live in the index (process memory): a record
 * whose bytes are lost is still known by name and version. The checksum
 * binds the record to its key and version, so a record read for the wrong
 * key or an old version fails verification exactly like rotted bytes.
 *
 * Every function here runs with the caller holding the engine (the Python
 * binding holds the GIL throughout). Before an operation the engine
 * processes losses the SIGBUS handler reported (kv_eng_recover), so the index
 * never points into memory known to be lost.
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
    KV_LOSTKEY = 2,     /* the key is LOST / REBUILDING / UNRECOVERABLE */
    KV_FULL = 3,
    KV_NOMEM = 4,
    KV_STALE = 5,       /* install: the offered version is older than required */
    KV_SKIP = 6,        /* install: nothing to do (newer value present, or deleted) */
};

typedef struct {
    uint64_t ranges, subpages, pages_salvaged, subpages_salvaged, salvage_failed;
    uint64_t keys_lost, subpages_quarantined;
    char salvage_error[160];
} kv_recover_stats;

typedef struct {
    kv_arena *arena;
    kv_index ix;
    kv_alloc al;
    uint64_t version;             /* last version handed out */
    uint64_t n_lost;              /* entries in LOST / REBUILDING / UNRECOVERABLE */
    uint32_t *lostq;              /* entry ids that became LOST, for the rebuilder */
    size_t lostq_n, lostq_cap;
    uint64_t scrub_cursor;        /* slab unit where the scrubber resumes */
    size_t ttl_cursor;
    uint8_t *scratch;             /* scrubber / compactor buffer */
    size_t scratch_cap;
    int salvage;                  /* mainline: try to salvage whole-page losses */
    uint64_t compact_futile_dead; /* dead bytes when a compaction last freed nothing */
    /* counters */
    uint64_t c_lost_keys, c_checksum_fail, c_faults_on_read, c_rebuilt, c_expired,
        c_compactions, c_moved, c_scrubbed_bytes, c_scrub_found, c_recoveries,
        c_pages_salvaged, c_subpages_salvaged, c_salvage_failed;
    char last_salvage_error[160];
} kv_engine;

int kv_eng_init(kv_engine *e, kv_arena *a, size_t capacity);
void kv_eng_free(kv_engine *e);
void kv_eng_flush(kv_engine *e);

/* Process newly lost subpages: drain, salvage whole lost pages (mainline),
 * invalidate exactly the records that overlap lost subpages, quarantine.
 * Cheap when nothing is pending. st may be NULL. */
void kv_eng_recover(kv_engine *e, kv_recover_stats *st);
static inline void kv_eng_check(kv_engine *e)
{
    if (__builtin_expect(__atomic_load_n(&e->arena->pending_flag, __ATOMIC_ACQUIRE) != 0, 0))
        kv_eng_recover(e, NULL);
}

/* Look up a live key: KV_OK with *id, KV_ABSENT (expired keys are deleted
 * here), or KV_LOSTKEY with *id. */
int kv_eng_lookup(kv_engine *e, const void *key, uint32_t klen, uint64_t h, uint32_t *id, uint64_t now_ms);

/* Read the value of PRESENT entry id in two steps: the length, then the
 * bytes into dst (vlen bytes), verified against the checksum. On a fault or
 * checksum mismatch the entry becomes LOST and KV_LOSTKEY is returned. */
int kv_eng_value_len(kv_engine *e, uint32_t id, uint32_t *vlen);
int kv_eng_value_read(kv_engine *e, uint32_t id, uint32_t vlen, void *dst);

/* Write key=value. version 0 = next version; else that exact version.
 * ttl_ms: 0 = no expiry (clears one), >0 = absolute expiry (ms), UINT64_MAX
 * = keep the current expiry. Returns KV_OK (and *out_version), KV_FULL,
 * KV_NOMEM. Nothing is changed on failure. */
int kv_eng_put(kv_engine *e, const void *key, uint32_t klen, const void *val, size_t vlen,
               uint64_t version, uint64_t ttl_ms, uint64_t *out_version);

/* Delete: 1 if the key existed (present or lost), 0 if not. */
int kv_eng_delete(kv_engine *e, const void *key, uint32_t klen);

/* Install a value fetched from a rebuild source for a LOST key. */
int kv_eng_install(kv_engine *e, const void *key, uint32_t klen, const void *val, size_t vlen,
                   uint64_t version);

/* Make entry id LOST (its record is unreadable); frees what is healthy. */
void kv_eng_lose(kv_engine *e, uint32_t id, int release);

/* Patrol: verify up to max_bytes of records from the cursor. Returns bytes
 * examined; *found counts records that failed (now LOST). */
uint64_t kv_eng_scrub(kv_engine *e, uint64_t max_bytes, uint64_t *found);

/* Delete up to max expired keys found among `budget` expiry entries. */
size_t kv_eng_expire_sweep(kv_engine *e, size_t budget, uint64_t now_ms);

/* Move live records out of sparse subpages. Returns records moved. */
size_t kv_eng_compact(kv_engine *e, size_t max_subpages);

/* Record length of PRESENT entry id (reads the header); 0 on fault. */
size_t kv_eng_record_len(kv_engine *e, uint32_t id);

/* Flip one byte of a record (test hook for checksum detection). */
int kv_eng_corrupt(kv_engine *e, uint32_t id, size_t byte);

uint64_t kv_now_ms(void);

#endif
