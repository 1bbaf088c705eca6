/* alloc.h - placement of records in the arena, by 4 KiB subpage.
 *
 * A record smaller than a subpage never straddles a subpage boundary: small
 * records are bump-allocated inside the current "open" subpage, and a new
 * subpage is opened when the next one does not fit. Larger records take a
 * run of whole free subpages. One word of metadata per subpage:
 *
 *     bits 29..31 kind: FREE, SMALL, LARGE_HEAD, LARGE_CONT, LOST
 *     SMALL:      bits 0..12 fill (bump end), bits 13..25 live bytes
 *     LARGE_HEAD: bits 0..28 run length in subpages
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

enum { KV_SP_FREE = 0, KV_SP_SMALL = 1, KV_SP_HEAD = 2, KV_SP_CONT = 3, KV_SP_LOST = 4 };

static inline int kv_sp_kind(uint32_t m) { return (int)(m >> 29); }
static inline uint32_t kv_sp_fill(uint32_t m) { return m & 0x1FFF; }
static inline uint32_t kv_sp_live(uint32_t m) { return (m >> 13) & 0x1FFF; }
static inline uint32_t kv_sp_run(uint32_t m) { return m & 0x1FFFFFFF; }
static inline uint32_t kv_sp_small(uint32_t fill, uint32_t live)
{
    return ((uint32_t)KV_SP_SMALL << 29) | (live << 13) | fill;
}

typedef struct {
    uint32_t *meta;
    uint64_t *freebm;        /* 1 = free */
    size_t nsub;             /* usable subpages (the capacity) */
    size_t nfree;
    size_t nlost;
    size_t cursor;           /* next-fit start */
    int64_t open;            /* open SMALL subpage or -1 */
    uint64_t live_bytes;     /* bytes of live records (large: whole subpages) */
    uint64_t dead_bytes;     /* freed bytes still inside SMALL subpages */
    size_t reserve;          /* free subpages kept for the compactor */
} kv_alloc;

int kv_alloc_init(kv_alloc *al, size_t nsub);
void kv_alloc_free(kv_alloc *al);
void kv_alloc_reset(kv_alloc *al);       /* everything free, except LOST */

/* Allocate len bytes. `compacting` may dip into the reserve. Returns the
 * arena offset or -1 when there is no room. */
int64_t kv_alloc_take(kv_alloc *al, size_t len, int compacting);

/* Free a record of len bytes at off (ignored inside LOST subpages). */
void kv_alloc_release(kv_alloc *al, uint64_t off, size_t len);

/* Quarantine subpage s (its records, if any, have been invalidated). */
void kv_alloc_quarantine(kv_alloc *al, size_t s);

/* Bytes a record of this length occupies (large records: whole subpages). */
static inline uint64_t kv_alloc_footprint(size_t len)
{
    return len <= 4096 ? len : (len + 4095) / 4096 * 4096;
}

#endif
