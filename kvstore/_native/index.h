/* index.h - the key index, kept in the arena as hash-ordered 4 KiB pages.
 *
 * The index is a hash-ordered table of pages. The 64-bit key hash
 * (kv_hash(), published as kvstore.key_hash) places every key: its top
 * bits pick a cell of the directory (2^depth cells, depth <= 28), the cell
 * names an index page, and an index page covers a run of consecutive cells,
 * i.e. a known hash range [lo, hi]. A full page gives cells to a neighbour
 * with room or splits at the cell nearest its median (the directory doubles
 * when a page covers too few cells), so pages stay about 80% full.
 *
 * The range is also kept in the allocator's metadata word for the subpage:
 * a lost index page names the keys it held without being read.
 *
 * Index page layout (little-endian):
 *
 *     0   u16 n          slots in use
 *     2   u16 heap       entries occupy [heap, 4096)
 *     4   u16 dead       bytes of freed entries inside the heap
 *     6   u8  magic      KV_IP_MAGIC
 *     7   u8  flags      KV_IP_LOSTRANGE: the range was lost; see lost_at
 *     8   u64 lo         hash range covered, hi inclusive
 *     16  u64 hi
 *     24  u64 lost_at    store version when the range was lost (0: never)
 *     32  u32 slot[n]    (low 16 bits of the hash << 16) | entry offset
 *     ... free ...
 *     heap: entries, 8-byte aligned:
 *         u64 loc   bits  0..39 record offset, 40..56 key length,
 *                   57..59 state, 60..63 flags (KV_F_*)
 *         u64 ver   bits  0..47 version
 *         key bytes padded to 8     (KV_F_LONG: u64 full hash instead; the
 *                                    key is stored in the record)
 *         u64 expiry (ms)           only with KV_F_TTL
 *
 * Tombstones (KV_ST_TOMB) exist only in pages whose range was lost: a delete
 * there must not be undone by a rebuild from a replica.
 */
#ifndef KV_INDEX_H
#define KV_INDEX_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum kv_state {
    KV_ST_FREE = 0,
    KV_ST_PRESENT = 1,
    KV_ST_LOST = 2,          /* record bytes gone; version known */
    KV_ST_REBUILDING = 3,    /* being fetched from a rebuild source */
    KV_ST_UNRECOVERABLE = 4, /* no source had it before the deadline */
    KV_ST_TOMB = 5,          /* deleted after its range was lost */
};

#define KV_F_TTL 1u
#define KV_F_LONG 2u          /* key kept in the record, full hash in the entry */

#define KV_MAX_KEY 65536u
#define KV_INLINE_KEY 1024u   /* longer keys are stored in their record */
#define KV_VERSION_MASK ((1ULL << 48) - 1)

#define KV_IP_HDR 32u
#define KV_IP_LOSTRANGE 1u
#define KV_IP_MAGIC 0xA5u
#define KV_MAX_DEPTH 28u

typedef struct {
    uint16_t n, heap, dead;
    uint8_t magic, flags;
    uint64_t lo, hi, lost_at;
    uint32_t slot[];
} kv_ipage;

typedef struct {
    uint64_t loc;
    uint64_t ver;
    uint8_t key[];
} kv_entry;

static inline uint64_t kv_e_off(const kv_entry *e) { return e->loc & ((1ULL << 40) - 1); }
static inline uint32_t kv_e_klen(const kv_entry *e) { return (uint32_t)((e->loc >> 40) & 0x1FFFF); }
static inline int kv_e_state(const kv_entry *e) { return (int)((e->loc >> 57) & 7); }
static inline unsigned kv_e_flags(const kv_entry *e) { return (unsigned)(e->loc >> 60); }
static inline uint64_t kv_e_version(const kv_entry *e) { return e->ver & KV_VERSION_MASK; }

static inline uint64_t kv_e_mkloc(uint64_t off, uint32_t klen, int state, unsigned flags)
{
    return (off & ((1ULL << 40) - 1)) | ((uint64_t)klen << 40) | ((uint64_t)state << 57) |
           ((uint64_t)flags << 60);
}
static inline void kv_e_set_off(kv_entry *e, uint64_t off)
{
    e->loc = (e->loc & ~((1ULL << 40) - 1)) | (off & ((1ULL << 40) - 1));
}
static inline void kv_e_set_state(kv_entry *e, int state)
{
    e->loc = (e->loc & ~(7ULL << 57)) | ((uint64_t)state << 57);
}
static inline void kv_e_set_flags(kv_entry *e, unsigned flags)
{
    e->loc = (e->loc & ~(15ULL << 60)) | ((uint64_t)flags << 60);
}
static inline void kv_e_set_version(kv_entry *e, uint64_t v)
{
    e->ver = (e->ver & ~KV_VERSION_MASK) | (v & KV_VERSION_MASK);
}
/* Bytes of the key field. */
static inline uint32_t kv_e_keyfield(uint32_t klen, unsigned flags)
{
    return (flags & KV_F_LONG) ? 8 : (klen + 7) & ~7u;
}
static inline uint32_t kv_e_size(uint32_t klen, unsigned flags)
{
    return 16 + kv_e_keyfield(klen, flags) + ((flags & KV_F_TTL) ? 8 : 0);
}
static inline uint32_t kv_e_bytes(const kv_entry *e) { return kv_e_size(kv_e_klen(e), kv_e_flags(e)); }
static inline uint64_t *kv_e_ttlp(kv_entry *e)
{
    return (uint64_t *)(e->key + kv_e_keyfield(kv_e_klen(e), kv_e_flags(e)));
}
static inline uint64_t kv_e_ttl(const kv_entry *e)
{
    if (!(kv_e_flags(e) & KV_F_TTL)) return 0;
    uint64_t x;
    memcpy(&x, e->key + kv_e_keyfield(kv_e_klen(e), kv_e_flags(e)), 8);
    return x;
}
static inline uint64_t kv_e_fullhash(const kv_entry *e)
{
    uint64_t x;
    memcpy(&x, e->key, 8);
    return x;
}

static inline kv_entry *kv_ip_entry(kv_ipage *p, uint32_t i)
{
    return (kv_entry *)((uint8_t *)p + (p->slot[i] & 0xFFFF));
}
static inline uint16_t kv_tag(uint64_t h) { return (uint16_t)h; }

/* Directory cell of hash h at depth D, and the hash range of a cell. */
static inline uint64_t kv_cell(unsigned D, uint64_t h) { return D ? h >> (64 - D) : 0; }
static inline uint64_t kv_cell_lo(unsigned D, uint64_t c) { return D ? c << (64 - D) : 0; }
static inline uint64_t kv_cell_hi(unsigned D, uint64_t c) { return D ? kv_cell_lo(D, c) | (~0ULL >> D) : ~0ULL; }

uint64_t kv_hash(const void *key, size_t klen);

void kv_ip_init(kv_ipage *p, uint64_t lo, uint64_t hi, unsigned flags, uint64_t lost_at);
/* Bytes free in the page once compacted. */
static inline uint32_t kv_ip_free(const kv_ipage *p)
{
    return (uint32_t)p->heap + p->dead - (KV_IP_HDR + 4u * p->n);
}
/* Free bytes for one more entry of `size` bytes (slot included)? */
static inline int kv_ip_fits(const kv_ipage *p, uint32_t size)
{
    return (uint32_t)p->heap >= KV_IP_HDR + 4u * (p->n + 1u) + size;
}
static inline int kv_ip_fits_compacted(const kv_ipage *p, uint32_t size)
{
    return (uint32_t)p->heap + p->dead >= KV_IP_HDR + 4u * (p->n + 1u) + size;
}
/* Append an entry (caller checked kv_ip_fits); returns it. */
kv_entry *kv_ip_add(kv_ipage *p, uint16_t tag, uint32_t size);
/* Remove slot i (its bytes become dead). */
void kv_ip_del(kv_ipage *p, uint32_t i);
/* Squeeze the dead bytes out (uses a 4 KiB buffer on the stack). */
void kv_ip_compact(kv_ipage *p);
/* Sanity of a page read from memory: 1 if plausible. */
int kv_ip_plausible(const kv_ipage *p);

#endif
