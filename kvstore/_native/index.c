/* index.c - entry slab, open-addressing hash table of 32-bit entry ids,
 * and the expiry side table. See index.h.
 */
#define _GNU_SOURCE
#include "index.h"
#include "checksum.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define SLAB_RESERVE ((size_t)32 << 30)     /* 32 GiB of address space: ids are u32 units */
#define TOMB UINT32_MAX
#define MAX_UNITS (2 + KV_MAX_KEY / 8)
#define HASH_SEED 0x6b7673746f7265ULL

uint64_t kv_hash(const void *key, size_t klen)
{
    return kv_xxh64(key, klen, HASH_SEED);
}

int kv_index_init(kv_index *ix)
{
    memset(ix, 0, sizeof *ix);
    void *p = mmap(NULL, SLAB_RESERVE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return -1;
    ix->slab = p;
    ix->slab_cap = SLAB_RESERVE;
    ix->slab_top = 1;                        /* id 0 means "none" */
    ix->free_heads = calloc(MAX_UNITS + 1, sizeof(uint32_t));
    ix->cap = 1024;
    ix->slots = calloc(ix->cap, sizeof(uint32_t));
    if (!ix->free_heads || !ix->slots) {
        kv_index_free(ix);
        return -1;
    }
    return 0;
}

void kv_index_free(kv_index *ix)
{
    if (ix->slab) munmap(ix->slab, ix->slab_cap);
    free(ix->free_heads);
    free(ix->slots);
    free(ix->ttl_ids);
    free(ix->ttl_exp);
    memset(ix, 0, sizeof *ix);
}

void kv_index_clear(kv_index *ix)
{
    /* Give the slab pages back to the kernel, keep the reservation. */
    madvise(ix->slab, ix->slab_top * 8, MADV_DONTNEED);
    ix->slab_top = 1;
    ix->slab_free_units = 0;
    memset(ix->free_heads, 0, (MAX_UNITS + 1) * sizeof(uint32_t));
    free(ix->slots);
    ix->cap = 1024;
    ix->slots = calloc(ix->cap, sizeof(uint32_t));
    ix->count = ix->tombs = 0;
    free(ix->ttl_ids);
    free(ix->ttl_exp);
    ix->ttl_ids = NULL;
    ix->ttl_exp = NULL;
    ix->ttl_cap = ix->ttl_count = 0;
}

static uint32_t slab_alloc(kv_index *ix, uint32_t units)
{
    uint32_t id = ix->free_heads[units];
    if (id) {
        kv_entry *e = kv_ix_entry(ix, id);
        ix->free_heads[units] = (uint32_t)e->ver;      /* next free */
        ix->slab_free_units -= units;
        return id;
    }
    if ((ix->slab_top + units) * 8 > ix->slab_cap || ix->slab_top + units > UINT32_MAX)
        return 0;
    id = (uint32_t)ix->slab_top;
    ix->slab_top += units;
    return id;
}

static void slab_release(kv_index *ix, uint32_t id)
{
    kv_entry *e = kv_ix_entry(ix, id);
    uint32_t klen = kv_e_klen(e), units = kv_e_units(klen);
    kv_e_set(e, 0, klen, KV_ST_FREE, 0);               /* keeps klen: the walk needs the size */
    e->ver = ix->free_heads[units];
    ix->free_heads[units] = id;
    ix->slab_free_units += units;
}

uint32_t kv_index_find(const kv_index *ix, const void *key, uint32_t klen, uint64_t h)
{
    size_t mask = ix->cap - 1, i = (size_t)h & mask;
    uint16_t tag = (uint16_t)(h >> 48);
    for (;;) {
        uint32_t id = ix->slots[i];
        if (id == 0) return 0;
        if (id != TOMB) {
            const kv_entry *e = kv_ix_entry(ix, id);
            if (kv_e_tag(e) == tag && kv_e_klen(e) == klen && memcmp(e->key, key, klen) == 0)
                return id;
        }
        i = (i + 1) & mask;
    }
}

static void place(uint32_t *slots, size_t cap, uint64_t h, uint32_t id)
{
    size_t mask = cap - 1, i = (size_t)h & mask;
    while (slots[i] != 0 && slots[i] != TOMB) i = (i + 1) & mask;
    slots[i] = id;
}

static int grow(kv_index *ix)
{
    size_t ncap = ix->cap;
    if ((ix->count + 1) * 4 > ncap * 3) ncap *= 2;      /* else: only clean tombstones */
    uint32_t *ns = calloc(ncap, sizeof(uint32_t));
    if (!ns) return -1;
    for (size_t i = 0; i < ix->cap; i++) {
        uint32_t id = ix->slots[i];
        if (id == 0 || id == TOMB) continue;
        kv_entry *e = kv_ix_entry(ix, id);
        place(ns, ncap, kv_hash(e->key, kv_e_klen(e)), id);
    }
    free(ix->slots);
    ix->slots = ns;
    ix->cap = ncap;
    ix->tombs = 0;
    return 0;
}

uint32_t kv_index_insert(kv_index *ix, const void *key, uint32_t klen, uint64_t h)
{
    if ((ix->count + ix->tombs + 1) * 8 > ix->cap * 7 && grow(ix) != 0) return 0;
    uint32_t id = slab_alloc(ix, kv_e_units(klen));
    if (!id) return 0;
    kv_entry *e = kv_ix_entry(ix, id);
    kv_e_set(e, 0, klen, KV_ST_PRESENT, 0);
    e->ver = (uint64_t)(uint16_t)(h >> 48) << 48;
    memcpy(e->key, key, klen);
    size_t mask = ix->cap - 1, i = (size_t)h & mask;
    while (ix->slots[i] != 0 && ix->slots[i] != TOMB) i = (i + 1) & mask;
    if (ix->slots[i] == TOMB) ix->tombs--;
    ix->slots[i] = id;
    ix->count++;
    return id;
}

void kv_index_remove(kv_index *ix, uint32_t id)
{
    kv_entry *e = kv_ix_entry(ix, id);
    uint64_t h = kv_hash(e->key, kv_e_klen(e));
    size_t mask = ix->cap - 1, i = (size_t)h & mask;
    while (ix->slots[i] != id) {
        if (ix->slots[i] == 0) return;             /* not in the table */
        i = (i + 1) & mask;
    }
    /* A tombstone is needed only if the next slot continues a probe chain. */
    if (ix->slots[(i + 1) & mask] == 0) {
        ix->slots[i] = 0;
    } else {
        ix->slots[i] = TOMB;
        ix->tombs++;
    }
    ix->count--;
    if (kv_e_flags(e) & KV_F_TTL) kv_ttl_del(ix, id);
    slab_release(ix, id);
}

/* ---- expiry side table: linear probing, backward-shift deletion ---- */

static size_t ttl_home(uint32_t id, size_t cap)
{
    return (size_t)((uint64_t)id * 0x9E3779B97F4A7C15ULL >> 20) & (cap - 1);
}

static int ttl_grow(kv_index *ix)
{
    size_t ncap = ix->ttl_cap ? ix->ttl_cap * 2 : 64;
    uint32_t *ids = calloc(ncap, sizeof(uint32_t));
    uint64_t *exp = calloc(ncap, sizeof(uint64_t));
    if (!ids || !exp) {
        free(ids);
        free(exp);
        return -1;
    }
    for (size_t i = 0; i < ix->ttl_cap; i++) {
        if (!ix->ttl_ids[i]) continue;
        size_t j = ttl_home(ix->ttl_ids[i], ncap);
        while (ids[j]) j = (j + 1) & (ncap - 1);
        ids[j] = ix->ttl_ids[i];
        exp[j] = ix->ttl_exp[i];
    }
    free(ix->ttl_ids);
    free(ix->ttl_exp);
    ix->ttl_ids = ids;
    ix->ttl_exp = exp;
    ix->ttl_cap = ncap;
    return 0;
}

int kv_ttl_set(kv_index *ix, uint32_t id, uint64_t exp_ms)
{
    if ((ix->ttl_count + 1) * 4 > ix->ttl_cap * 3 && ttl_grow(ix) != 0) return -1;
    size_t mask = ix->ttl_cap - 1, i = ttl_home(id, ix->ttl_cap);
    while (ix->ttl_ids[i] && ix->ttl_ids[i] != id) i = (i + 1) & mask;
    if (!ix->ttl_ids[i]) ix->ttl_count++;
    ix->ttl_ids[i] = id;
    ix->ttl_exp[i] = exp_ms;
    kv_entry *e = kv_ix_entry(ix, id);
    kv_e_set_flags(e, kv_e_flags(e) | KV_F_TTL);
    return 0;
}

uint64_t kv_ttl_get(const kv_index *ix, uint32_t id)
{
    if (!ix->ttl_cap) return 0;
    size_t mask = ix->ttl_cap - 1, i = ttl_home(id, ix->ttl_cap);
    while (ix->ttl_ids[i]) {
        if (ix->ttl_ids[i] == id) return ix->ttl_exp[i];
        i = (i + 1) & mask;
    }
    return 0;
}

void kv_ttl_del(kv_index *ix, uint32_t id)
{
    kv_entry *e = kv_ix_entry(ix, id);
    kv_e_set_flags(e, kv_e_flags(e) & ~KV_F_TTL);
    if (!ix->ttl_cap) return;
    size_t mask = ix->ttl_cap - 1, i = ttl_home(id, ix->ttl_cap);
    while (ix->ttl_ids[i] && ix->ttl_ids[i] != id) i = (i + 1) & mask;
    if (!ix->ttl_ids[i]) return;
    ix->ttl_ids[i] = 0;
    ix->ttl_count--;
    /* Backward shift: move later members of the cluster into the hole. */
    size_t j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (!ix->ttl_ids[j]) break;
        size_t k = ttl_home(ix->ttl_ids[j], ix->ttl_cap);
        if ((j > i && (k <= i || k > j)) || (j < i && (k <= i && k > j))) {
            ix->ttl_ids[i] = ix->ttl_ids[j];
            ix->ttl_exp[i] = ix->ttl_exp[j];
            ix->ttl_ids[j] = 0;
            i = j;
        }
    }
}

size_t kv_index_memory(const kv_index *ix)
{
    return (size_t)(ix->slab_top - ix->slab_free_units) * 8 + ix->cap * sizeof(uint32_t) +
           ix->ttl_cap * (sizeof(uint32_t) + sizeof(uint64_t));
}
