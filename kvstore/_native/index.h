/* index.h - the key index, kept in ordinary process memory.
 *
 * Keys live here, not only in the arena: a key whose record was lost must
 * still be known by name (to report it LOST and to ask a replica for it).
 * Each key has one entry in a slab:
 *
 *     u64 loc   bits  0..39  arena offset of the record
 *               bits 40..56  key length (up to 65536)
 *               bits 57..59  state (kv_state)
 *               bits 60..63  flags (KV_F_*)
 *     u64 ver   bits  0..47  version
 *               bits 48..63  hash tag (top 16 bits of the key hash)
 *     key bytes, padded to 8
 *
 * The slab is one large MAP_NORESERVE region addressed by 32-bit entry ids
 * (8-byte units), so a hash slot is 4 bytes. Freed entries go to a free list
 * per size. A linear walk of the slab visits every entry (the recovery scan
 * and the compactor use it). A side table holds expiry times, only for keys
 * that have one.
 */
#ifndef KV_INDEX_H
#define KV_INDEX_H

#include <stddef.h>
#include <stdint.h>

enum kv_state {
    KV_ST_FREE = 0,          /* slab entry not in use */
    KV_ST_PRESENT = 1,
    KV_ST_LOST = 2,          /* record bytes gone; version known */
    KV_ST_REBUILDING = 3,    /* being fetched from a rebuild source */
    KV_ST_UNRECOVERABLE = 4, /* no source had it before the deadline */
};

#define KV_F_TTL 1u
#define KV_F_QUEUED 2u   /* in the engine's lost queue, not yet taken */

#define KV_MAX_KEY 65536u
#define KV_VERSION_MASK ((1ULL << 48) - 1)

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
static inline uint16_t kv_e_tag(const kv_entry *e) { return (uint16_t)(e->ver >> 48); }

static inline void kv_e_set(kv_entry *e, uint64_t off, uint32_t klen, int state, unsigned flags)
{
    e->loc = (off & ((1ULL << 40) - 1)) | ((uint64_t)klen << 40) | ((uint64_t)state << 57) |
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

/* Size of an entry in 8-byte units. */
static inline uint32_t kv_e_units(uint32_t klen) { return 2 + (klen + 7) / 8; }

typedef struct {
    uint8_t *slab;           /* MAP_NORESERVE region */
    size_t slab_cap;         /* bytes reserved */
    uint64_t slab_top;       /* units in use (bump) */
    uint32_t *free_heads;    /* per size in units; 0 = empty */
    uint64_t slab_free_units;
    uint32_t *slots;         /* 0 empty, UINT32_MAX tombstone, else entry id */
    size_t cap;              /* power of two */
    size_t count;            /* entries in the table (any state but FREE) */
    size_t tombs;
    /* expiry side table: entry id -> absolute expiry (ms, CLOCK_REALTIME) */
    uint32_t *ttl_ids;
    uint64_t *ttl_exp;
    size_t ttl_cap, ttl_count;
} kv_index;

int kv_index_init(kv_index *ix);
void kv_index_free(kv_index *ix);
/* Drop every entry (keeps the reserved memory). */
void kv_index_clear(kv_index *ix);

uint64_t kv_hash(const void *key, size_t klen);

static inline kv_entry *kv_ix_entry(const kv_index *ix, uint32_t id)
{
    return (kv_entry *)(ix->slab + (size_t)id * 8);
}

/* Find the entry for key (any non-FREE state). Returns its id or 0. */
uint32_t kv_index_find(const kv_index *ix, const void *key, uint32_t klen, uint64_t h);

/* Create an entry for a key known to be absent; state and offset set by the
 * caller. Returns the id, or 0 when out of memory. */
uint32_t kv_index_insert(kv_index *ix, const void *key, uint32_t klen, uint64_t h);

/* Remove entry id from the table and free it (and its expiry). */
void kv_index_remove(kv_index *ix, uint32_t id);

/* Slab walk: first entry id at or after `from` units (0 when none). Visits
 * FREE entries too; the caller skips them. */
static inline uint32_t kv_index_next(const kv_index *ix, uint64_t from)
{
    return from < ix->slab_top ? (uint32_t)(from ? from : 1) : 0;
}
static inline uint64_t kv_index_after(const kv_index *ix, uint32_t id)
{
    return (uint64_t)id + kv_e_units(kv_e_klen(kv_ix_entry(ix, id)));
}

/* Expiry side table. */
int kv_ttl_set(kv_index *ix, uint32_t id, uint64_t exp_ms);
uint64_t kv_ttl_get(const kv_index *ix, uint32_t id);     /* 0 = none */
void kv_ttl_del(kv_index *ix, uint32_t id);

/* Bytes of process memory used by the index (slab in use + tables). */
size_t kv_index_memory(const kv_index *ix);

#endif
