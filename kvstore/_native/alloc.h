/* alloc.h - placement of records in the arena, by 4 KiB subpage.
 *
 * A record smaller than a subpage never straddles a subpage boundary: small
 * records are bump-allocated inside the current "open" subpage, and a new
 * subpage is opened when the next one does not fit. Larger records take a
 * run of whole free subpages. One word of metadata per subpage:
 *
 *     bits 61..63 kind: FREE, SMALL, LARGE_HEAD, LARGE_CONT, LOST, INDEX, DIR
 *     SMALL:      bits 0..12 fill (bump end), 13..25 live bytes,
 *                 26..35 number of live records
 *     LARGE_HEAD: bits 0..39 run length in subpages
 *     INDEX:      bits 0..6 local depth, 8..55 hash prefix (an index page:
 *                 its hash range is known from this word alone)
 *     DIR:        a subpage of a copy of the index directory
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

enum { KV_SP_FREE = 0, KV_SP_SMALL = 1, KV_SP_HEAD = 2, KV_SP_CONT = 3, KV_SP_LOST = 4, KV_SP_INDEX = 5, KV_SP_DIR = 6 };

typedef uint64_t kv_meta;
static inline int kv_sp_kind(kv_meta m) { return (int)(m >> 61); }
static inline uint32_t kv_sp_fill(kv_meta m) { return (uint32_t)(m & 0x1FFF); }
static inline uint32_t kv_sp_live(kv_meta m) { return (uint32_t)((m >> 13) & 0x1FFF); }
static inline uint32_t kv_sp_nrec(kv_meta m) { return (uint32_t)((m >> 26) & 0x3FF); }
static inline uint64_t kv_sp_run(kv_meta m) { return m & ((1ULL << 40) - 1); }
static inline kv_meta kv_sp_mk(int kind) { return (kv_meta)kind << 61; }
static inline kv_meta kv_sp_small(uint32_t fill, uint32_t live, uint32_t nrec)
{
    return kv_sp_mk(KV_SP_SMALL) | ((kv_meta)nrec << 26) | ((kv_meta)live << 13) | fill;
}
static inline unsigned kv_sp_depth(kv_meta m) { return (unsigned)(m & 0x7F); }
static inline uint64_t kv_sp_prefix(kv_meta m) { return (m >> 8) & ((1ULL << 48) - 1); }
static inline kv_meta kv_sp_index(uint64_t prefix, unsigned depth)
{
    return kv_sp_mk(KV_SP_INDEX) | (prefix << 8) | depth;
}

typedef struct {
    kv_meta *meta;
    uint64_t *freebm;        /* 1 = free */
    size_t nsub;             /* usable subpages (the capacity) */
    size_t nfree;
    size_t nlost;
    size_t cursor;           /* next-fit start */
    int64_t open;            /* open SMALL subpage or -1 */
    uint64_t live_bytes;     /* bytes of live records (large: whole subpages) */
    uint64_t dead_bytes;     /* freed bytes still inside SMALL subpages */
    size_t reserve;          /* free subpages kept for the compactor */
    size_t nindex;           /* subpages holding the index (pages + directory) */
} kv_alloc;

int kv_alloc_init(kv_alloc *al, size_t nsub);
void kv_alloc_free(kv_alloc *al);
void kv_alloc_reset(kv_alloc *al);       /* everything free, except LOST */

/* Allocate len bytes. `compacting` may dip into the reserve. Returns the
 * arena offset or -1 when there is no room. */
int64_t kv_alloc_take(kv_alloc *al, size_t len, int compacting);

/* Free a record of len bytes at off (ignored inside LOST subpages). */
void kv_alloc_release(kv_alloc *al, uint64_t off, size_t len);

/* Take one free subpage (or a run of n) for the index, with the given
 * metadata word. -1 when there is none. */
int64_t kv_alloc_take_meta(kv_alloc *al, size_t n, kv_meta m, int use_reserve);
/* Give back index subpages [s, s+n) (LOST ones stay quarantined). */
void kv_alloc_give(kv_alloc *al, size_t s, size_t n);

/* Quarantine subpage s (its records, if any, have been invalidated). */
void kv_alloc_quarantine(kv_alloc *al, size_t s);

/* Bytes a record of this length occupies (large records: whole subpages). */
static inline uint64_t kv_alloc_footprint(size_t len)
{
    return len <= 4096 ? len : (len + 4095) / 4096 * 4096;
}

#endif
