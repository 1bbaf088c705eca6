/* adopt.h - the arena header, and adoption of an arena left by an earlier
 * process (a planned restart or a crash).
 *
 * Subpage 0 of every arena holds the header (allocator kind KV_SP_HDR):
 *
 *     0   u64 magic        KV_HDR_MAGIC ("KVARENA" + 0x01)
 *     8   u32 layout       KV_LAYOUT_VERSION: the on-memory layout of the
 *                          header, directory, index pages and records
 *     12  u32 hdr_bytes    sizeof(kv_hdr)
 *     16  u64 arena_size   bytes of the memfd
 *     24  u64 page_size    4096, 2 MiB or 1 GiB
 *     32  u64 nsub         capacity in subpages (the allocator's range)
 *     40  u32 gbits        record groups (alloc.h)
 *     44  u32 gdepth       directory depth
 *     48  u64 dir_sub      first subpage of the directory
 *     56  u64 dir_n        its length in subpages
 *     64  u64 version      the store's version counter (writes and deletes)
 *     72  u64 generation   processes that adopted this arena
 *     80  u64 created_ms   when the arena was formatted
 *     88  u64 meta_sub     first subpage of the allocator's metadata region
 *     96  u64 meta_n       its length in subpages (0: none)
 *
 * The engine writes the directory fields whenever the directory moves, the
 * metadata fields when that region moves, and the version after every
 * operation that took one. Everything else adoption needs is in the index
 * and the records themselves; the allocator's metadata is rebuilt from them
 * subpage by subpage after the store serves (lazy.h) and kept in its region.
 * The same walk, run to the end at once, rebuilds it in a running store when
 * a memory error hits the region (kv_eng__adopt_hdr).
 */
#ifndef KV_ADOPT_H
#define KV_ADOPT_H

#include "engine.h"

#define KV_HDR_MAGIC 0x01414e4552415653ULL /* "SVARENA\x01" little-endian */
#define KV_LAYOUT_VERSION 2u   /* 2: the allocator's metadata region (meta_sub, meta_n) */

typedef struct {
    uint64_t magic;
    uint32_t layout, hdr_bytes;
    uint64_t arena_size, page_size, nsub;
    uint32_t gbits, gdepth;
    uint64_t dir_sub, dir_n;
    uint64_t version;
    uint64_t generation;
    uint64_t created_ms;
    uint64_t meta_sub, meta_n;
} kv_hdr;

typedef struct {
    uint64_t index_pages;      /* index pages that verified */
    uint64_t index_pages_bad;  /* directory runs whose page did not verify: their ranges are LOST */
    uint64_t keys;             /* entries that are keys */
    uint64_t records;          /* records that passed the structural checks */
    uint64_t records_bad;      /* entries whose record did not: LOST */
    uint64_t lost_keys;        /* entries LOST after adoption (before and now) */
    uint64_t lost_ranges;      /* lost hash ranges queued for the rebuilder */
    uint64_t generation;
    uint64_t old_version;      /* the header's version counter */
} kv_adopt_report;

/* Write the whole header (format: fresh arena). */
void kv_hdr_format(kv_engine *e);
/* Write the fields that change (directory, version). Cheap; skipped when
 * subpage 0 is lost (the arena can then no longer be adopted). */
void kv_hdr_sync(kv_engine *e);
static inline void kv_hdr_sync_version(kv_engine *e)
{
    if (__builtin_expect(e->version != e->hdr_version, 0)) kv_hdr_sync(e);
}
/* Write version v (> e->version: the one an operation is about to take) to
 * the header before the operation's effect; see adopt.c. */
void kv_hdr_version_ahead(kv_engine *e, uint64_t v);

/* Adopt arena a (kv_arena_adopt) into a fresh engine e: check the header,
 * validate the directory and the index pages, rebuild the counters, and
 * list every PRESENT entry's record under its subpage for the deferred
 * validation below (no record is read here). Index pages that do not
 * verify become LOST ranges (queued for the rebuilder). Record bounds,
 * overlaps and the allocator's metadata are settled per subpage later
 * (lazy.c); record checksums by kv_eng_scrub's lap after that (every read
 * checks its own). 0, or -1 with a message in err (nothing adopted; e is
 * left empty). */
int kv_eng_adopt(kv_engine *e, kv_arena *a, kv_adopt_report *r, char *err, size_t errlen);

/* Deferred validation of the records (lazy.c; the rules are in lazy.h).
 * kv_eng_adopt validates the header, the directory and the index pages and
 * lists each PRESENT entry's record under its subpage (kv_lazy_begin);
 * until every subpage is validated, e->lazy is set and:
 *   kv_lazy_unval(e, s)    1 if subpage s is not validated yet;
 *   kv_lazy_validate(e, s) validate s now (a read or write is about to use
 *                          a record there; recovery met a loss there);
 *   kv_lazy_room(e)        validate more (the next free run first) because
 *                          an allocation found nothing free: 1 if something
 *                          was validated, 0 if nothing is left to validate;
 *   kv_lazy_step(e, n)     background: validate up to n subpages in address
 *                          order; frees the state when done (e->lazy NULL);
 *   kv_lazy_range_lost     an index page covering [lo, hi] was lost: records
 *                          its entries named are no longer claimed;
 *   kv_lazy_end(e)         drop the state (flush, free).
 * Everything uses guarded copies only and may run inside or outside a
 * guard. */
int kv_lazy_begin(kv_engine *e, const size_t *pages, size_t npages, uint8_t *buf, kv_adopt_report *r);
void kv_lazy_validate(kv_engine *e, size_t s);
void kv_lazy_validate_demand(kv_engine *e, size_t s);
int kv_lazy_room(kv_engine *e);
size_t kv_lazy_step(kv_engine *e, size_t budget);
void kv_lazy_settle_lost(kv_engine *e, size_t s);
void kv_lazy_range_lost(kv_engine *e, uint64_t lo, uint64_t hi);
void kv_lazy_end(kv_engine *e);
size_t kv_lazy_pending(const kv_engine *e);
int kv_lazy_unval_slow(const kv_engine *e, size_t s);
static inline int kv_lazy_unval(const kv_engine *e, size_t s)
{
    return __builtin_expect(e->lazy != NULL, 0) && kv_lazy_unval_slow(e, s);
}
/* The walk of kv_eng_adopt after the header: from header h (checked),
 * rebuild the allocator's metadata, counters and lost queues of a fresh
 * engine e from the directory, index pages and records in arena a. `live`:
 * e is a scratch engine of a running store whose metadata region was lost
 * (the store takes what was rebuilt): the header is not rewritten and the
 * metadata stays in process memory for the caller to place. */
int kv_eng__adopt_hdr(kv_engine *e, kv_arena *a, const kv_hdr *h, int live, kv_adopt_report *r, char *err,
                      size_t errlen);
/* The header fields of a running engine (what kv_hdr_format writes). */
void kv_hdr_image(const kv_engine *e, kv_hdr *h);
/* Write the metadata region's fields (skipped when subpage 0 is lost). */
void kv_hdr_sync_meta(kv_engine *e);

/* Test hook: abort() here when the environment variable KVSTORE_CRASH_AT
 * names this point (see docs/DESIGN.md "Restart"). */
void kv_crash_point_slow(const char *name);
extern int kv_crash_armed;
static inline void kv_crash_point(const char *name)
{
    if (__builtin_expect(kv_crash_armed != 0, 0)) kv_crash_point_slow(name);
}

#endif
