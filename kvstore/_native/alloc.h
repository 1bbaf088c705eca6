/* alloc.h - placement of records and index pages in the arena, by 4 KiB
 * subpage.
 *
 * A record smaller than a subpage never straddles a subpage boundary: small
 * records are bump-allocated inside an "open" subpage, and a new subpage is
 * opened when the next one does not fit. Larger records take a run of whole
 * free subpages. Index pages and the directory take whole subpages too.
 *
 * Records are grouped by key hash: there is one open subpage per group
 * (the top `gbits` bits of the key hash), so every record subpage carries
 * the hash range its records come from. That range is the reverse map: a
 * lost record subpage is matched against the few index pages covering its
 * range, not against the whole index. The engine makes one group per MiB
 * of capacity, so the partly filled open subpages cost about 0.2% of it.
 *
 * One metadata word per subpage:
 *
 *     bits 61..63 kind: FREE, SMALL, LARGE_HEAD, LARGE_CONT, LOST, INDEX, DIR
 *     SMALL:      bits 0..12 fill (bump end), 13..25 live bytes,
 *                 26..35 number of live records, 60 open
 *     LARGE_HEAD: bits 0..27 run length in subpages
 *     SMALL, LARGE_HEAD: bits 36..40 group bits g, 41..59 group prefix (the
 *                 records' keys hash to prefix << (64 - g) ...)
 *     INDEX:      bits 0..27 top 28 bits of the page's lowest hash, 28..55
 *                 of its highest (an index page: its hash range is known
 *                 from this word alone)
 *     DIR:        a subpage of the index directory
 *     HDR:        the arena header (subpage 0, see adopt.h) and the
 *                 allocator's own metadata region (below)
 *
 * The metadata itself (the words above, the free bitmap, the group lists,
 * the open subpage of each group, and one u32 per subpage the engine keeps
 * for its index pages) lives in the arena too, in a run of whole subpages
 * of kind HDR ("fixed"): ~20 B per 4 KiB subpage, ~0.5% of the capacity.
 * It is built in process memory, then written into its region and used
 * there (kv_alloc_export / kv_alloc_attach); a loss there is rebuilt from
 * the index and the records, as adoption does (adopt.c), into a fresh
 * region.
 *
 * A SMALL subpage whose live bytes drop to zero becomes FREE again; LOST
 * subpages (quarantined) are never handed out while the arena lives. Space
 * freed inside a subpage that still holds live records is reclaimed by the
 * engine's compactor, which moves the survivors out.
 */
#ifndef KV_ALLOC_H
#define KV_ALLOC_H

#include <stddef.h>
#include <stdint.h>

enum { KV_SP_FREE = 0, KV_SP_SMALL = 1, KV_SP_HEAD = 2, KV_SP_CONT = 3, KV_SP_LOST = 4, KV_SP_INDEX = 5, KV_SP_DIR = 6,
       KV_SP_HDR = 7 /* the arena header (subpage 0): never handed out */ };

#define KV_GROUP_MAX_BITS 19u
#define KV_NONE UINT32_MAX

typedef uint64_t kv_meta;
#define KV_SP_OPEN (1ULL << 60)
#define KV_SP_LOWMASK ((1ULL << 36) - 1)
#define KV_SP_TAGMASK (((1ULL << 24) - 1) << 36)
static inline int kv_sp_kind(kv_meta m) { return (int)(m >> 61); }
static inline uint32_t kv_sp_fill(kv_meta m) { return (uint32_t)(m & 0x1FFF); }
static inline uint32_t kv_sp_live(kv_meta m) { return (uint32_t)((m >> 13) & 0x1FFF); }
static inline uint32_t kv_sp_nrec(kv_meta m) { return (uint32_t)((m >> 26) & 0x3FF); }
static inline uint64_t kv_sp_run(kv_meta m) { return m & ((1ULL << 28) - 1); }
static inline kv_meta kv_sp_mk(int kind) { return (kv_meta)kind << 61; }
/* The SMALL fields of m replaced (kind, group tag and open bit kept). */
static inline kv_meta kv_sp_small_set(kv_meta m, uint32_t fill, uint32_t live, uint32_t nrec)
{
    return (m & ~KV_SP_LOWMASK) | ((kv_meta)nrec << 26) | ((kv_meta)live << 13) | fill;
}
static inline kv_meta kv_sp_tag(unsigned gbits, uint64_t prefix)
{
    return ((kv_meta)gbits << 36) | (prefix << 41);
}
static inline unsigned kv_sp_gbits(kv_meta m) { return (unsigned)((m >> 36) & 31); }
static inline uint64_t kv_sp_gprefix(kv_meta m) { return (m >> 41) & ((1ULL << 19) - 1); }
#define KV_SP_M28 ((1ULL << 28) - 1)
static inline uint64_t kv_sp_ilo(kv_meta m) { return (m & KV_SP_M28) << 36; }
static inline uint64_t kv_sp_ihi(kv_meta m) { return (((m >> 28) & KV_SP_M28) << 36) | ((1ULL << 36) - 1); }
static inline kv_meta kv_sp_index(uint64_t lo, uint64_t hi)
{
    return kv_sp_mk(KV_SP_INDEX) | (lo >> 36) | ((hi >> 36) << 28);
}

typedef struct {
    kv_meta *meta;
    uint64_t *freebm;        /* 1 = free */
    size_t nsub;             /* usable subpages (the capacity) */
    size_t nfree;
    size_t nlost;
    size_t cursor;           /* next-fit start */
    unsigned gbits;          /* record groups: 2^gbits open subpages */
    int64_t *opens;          /* open SMALL subpage of each group, or -1 */
    uint32_t *ghead;         /* per group: first record subpage (SMALL or LARGE_HEAD) */
    uint32_t *gnext, *gprev; /* per subpage: the group's list (KV_NONE at the ends) */
    uint64_t live_bytes;     /* bytes of live records (large: whole subpages) */
    uint64_t dead_bytes;     /* freed bytes still inside SMALL subpages */
    size_t reserve;          /* free subpages kept for the compactor */
    size_t nindex;           /* subpages holding the index (pages + directory) */
    size_t nfixed;           /* HDR subpages: the header and the metadata region */
    int ext;                 /* the arrays live in the arena (kv_alloc_attach): not ours to free */
} kv_alloc;

/* Where each array sits in the metadata region (byte offsets), for nsub
 * subpages and 2^gbits groups; aux: nsub u32 for the engine. */
typedef struct {
    size_t meta, freebm, opens, gnext, gprev, ghead, aux, total;
} kv_alloc_layout;
void kv_alloc_layout_of(size_t nsub, unsigned gbits, kv_alloc_layout *L);
/* Copy the arrays into img (L->total bytes, laid out as L; aux untouched). */
void kv_alloc_export(const kv_alloc *al, uint8_t *img, const kv_alloc_layout *L);
/* From now on use the arrays at mem (a copy of what kv_alloc_export wrote):
 * the process-memory ones are freed. */
void kv_alloc_attach(kv_alloc *al, uint8_t *mem, const kv_alloc_layout *L);
/* Take a run of n free subpages as HDR (the metadata region): first
 * subpage, or -1. Reserve included. */
int64_t kv_alloc_take_fixed(kv_alloc *al, size_t n);

int kv_alloc_init(kv_alloc *al, size_t nsub);
void kv_alloc_free(kv_alloc *al);
void kv_alloc_reset(kv_alloc *al);       /* everything free, except LOST */

/* Change the number of record groups (closes the open subpages). Only
 * before kv_alloc_attach (-1 after). */
int kv_alloc_set_groups(kv_alloc *al, unsigned gbits);
static inline uint64_t kv_alloc_group(const kv_alloc *al, uint64_t h)
{
    return al->gbits ? h >> (64 - al->gbits) : 0;
}

/* Allocate len bytes for a record of key hash h. `compacting` may dip into
 * the reserve. Returns the arena offset or -1 when there is no room. */
int64_t kv_alloc_take(kv_alloc *al, size_t len, int compacting, uint64_t h);

/* Free a record of len bytes at off (ignored inside LOST subpages). */
void kv_alloc_release(kv_alloc *al, uint64_t off, size_t len);

/* Take one free subpage (or a run of n) for the index, with the given
 * metadata word. -1 when there is none. */
int64_t kv_alloc_take_meta(kv_alloc *al, size_t n, kv_meta m, int use_reserve);
/* Give back index subpages [s, s+n) (LOST ones stay quarantined). */
void kv_alloc_give(kv_alloc *al, size_t s, size_t n);

/* Adoption (adopt.c): mark free subpage s as used with metadata word m (a
 * SMALL or LARGE_HEAD word joins its group's list; SMALL counts its live and
 * dead bytes, LARGE_HEAD its run). 0, or -1 if s is not free. */
int kv_alloc_claim(kv_alloc *al, size_t s, kv_meta m);

/* Quarantine subpage s (its records, if any, have been invalidated). */
void kv_alloc_quarantine(kv_alloc *al, size_t s);

/* Hash range [lo, hi] (hi inclusive) of the records in subpage s (a SMALL
 * or LARGE subpage; LARGE_CONT is followed back to its head). 0, or -1 if s
 * holds no records. */
int kv_alloc_range(const kv_alloc *al, size_t s, uint64_t *lo, uint64_t *hi);

/* Bytes a record of this length occupies (large records: whole subpages). */
static inline uint64_t kv_alloc_footprint(size_t len)
{
    return len <= 4096 ? len : (len + 4095) / 4096 * 4096;
}

#endif
