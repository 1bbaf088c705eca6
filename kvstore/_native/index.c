/* index.c - the placement hash and operations on one index page. See
 * index.h for the layout. These functions touch only the page they are
 * given; the engine checks the page is healthy before calling them.
 */
#include "index.h"
#include "checksum.h"

#define HASH_SEED 0x6b7673746f7265ULL

uint64_t kv_hash(const void *key, size_t klen)
{
    return kv_xxh64(key, klen, HASH_SEED);
}

void kv_ip_init(kv_ipage *p, uint64_t lo, uint64_t hi, unsigned flags, uint64_t lost_at)
{
    memset(p, 0, KV_IP_HDR);
    p->n = 0;
    p->heap = 4096;
    p->dead = 0;
    p->magic = KV_IP_MAGIC;
    p->flags = (uint8_t)flags;
    p->lo = lo;
    p->hi = hi;
    p->lost_at = lost_at;
}

kv_entry *kv_ip_add(kv_ipage *p, uint16_t tag, uint32_t size)
{
    p->heap = (uint16_t)(p->heap - size);
    p->slot[p->n++] = ((uint32_t)tag << 16) | p->heap;
    kv_entry *e = (kv_entry *)((uint8_t *)p + p->heap);
    memset(e, 0, size);
    return e;
}

void kv_ip_del(kv_ipage *p, uint32_t i)
{
    kv_entry *e = kv_ip_entry(p, i);
    uint32_t size = kv_e_bytes(e);
    if ((p->slot[i] & 0xFFFF) == p->heap) p->heap = (uint16_t)(p->heap + size);
    else p->dead = (uint16_t)(p->dead + size);
    p->slot[i] = p->slot[--p->n];
}

void kv_ip_compact(kv_ipage *p)
{
    uint8_t buf[4096];
    uint32_t top = 4096;
    for (uint32_t i = 0; i < p->n; i++) {
        kv_entry *e = kv_ip_entry(p, i);
        uint32_t size = kv_e_bytes(e);
        top -= size;
        memcpy(buf + top, e, size);
        p->slot[i] = (p->slot[i] & 0xFFFF0000u) | top;
    }
    memcpy((uint8_t *)p + top, buf + top, 4096 - top);
    p->heap = (uint16_t)top;
    p->dead = 0;
}

int kv_ip_plausible(const kv_ipage *p)
{
    if (p->magic != KV_IP_MAGIC || p->lo > p->hi || p->heap > 4096 ||
        KV_IP_HDR + 4u * p->n > p->heap || p->dead > 4096 - p->heap)
        return 0;
    for (uint32_t i = 0; i < p->n; i++) {
        uint32_t o = p->slot[i] & 0xFFFF;
        if (o < p->heap || o > 4096 - 16 || (o & 7)) return 0;
        const kv_entry *e = (const kv_entry *)((const uint8_t *)p + o);
        if (o + kv_e_bytes(e) > 4096 || kv_e_state(e) == KV_ST_FREE || kv_e_state(e) > KV_ST_TOMB) return 0;
    }
    return 1;
}
