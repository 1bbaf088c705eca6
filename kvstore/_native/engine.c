/* engine.c - records, recovery, compaction, scrubbing and expiry on top of
 * the arena, the index and the allocator. See engine.h.
 */
#define _GNU_SOURCE
#include "engine.h"
#include "checksum.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SUB 4096u

uint64_t kv_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static uint32_t rec_csum(const void *key, uint32_t klen, const void *val, size_t vlen, uint64_t version)
{
    uint8_t le[4] = {(uint8_t)vlen, (uint8_t)(vlen >> 8), (uint8_t)(vlen >> 16), (uint8_t)(vlen >> 24)};
    if ((size_t)klen + 4 + vlen <= 256) {
        uint8_t buf[256];
        memcpy(buf, key, klen);
        memcpy(buf + klen, le, 4);
        memcpy(buf + klen + 4, val, vlen);
        return (uint32_t)kv_xxh64(buf, klen + 4 + vlen, version);
    }
    kv_xxh64_state st;
    kv_xxh64_reset(&st, version);
    kv_xxh64_update(&st, key, klen);
    kv_xxh64_update(&st, le, 4);
    kv_xxh64_update(&st, val, vlen);
    return (uint32_t)kv_xxh64_digest(&st);
}

int kv_eng_init(kv_engine *e, kv_arena *a, size_t capacity)
{
    memset(e, 0, sizeof *e);
    e->arena = a;
    size_t cap = capacity < a->size ? capacity : a->size;
    if (kv_index_init(&e->ix) != 0) return -1;
    if (kv_alloc_init(&e->al, cap / SUB) != 0) {
        kv_index_free(&e->ix);
        return -1;
    }
    e->salvage = 1;
    return 0;
}

void kv_eng_free(kv_engine *e)
{
    kv_index_free(&e->ix);
    kv_alloc_free(&e->al);
    free(e->lostq);
    free(e->scratch);
    memset(e, 0, sizeof *e);
}

void kv_eng_flush(kv_engine *e)
{
    kv_eng_check(e);
    kv_index_clear(&e->ix);
    kv_alloc_reset(&e->al);
    e->n_lost = 0;
    e->lostq_n = 0;
    e->scrub_cursor = 0;
    e->ttl_cursor = 0;
}

static void lostq_push(kv_engine *e, uint32_t id)
{
    if (e->lostq_n == e->lostq_cap) {
        size_t nc = e->lostq_cap ? e->lostq_cap * 2 : 256;
        uint32_t *q = realloc(e->lostq, nc * sizeof *q);
        if (!q) return;            /* the rebuilder also scans for LOST entries */
        e->lostq = q;
        e->lostq_cap = nc;
    }
    e->lostq[e->lostq_n++] = id;
}

void kv_eng_lose(kv_engine *e, uint32_t id, int release)
{
    kv_entry *ent = kv_ix_entry(&e->ix, id);
    if (kv_e_state(ent) != KV_ST_PRESENT) return;
    if (release) kv_alloc_release(&e->al, kv_e_off(ent), (size_t)release);
    kv_e_set_state(ent, KV_ST_LOST);
    e->n_lost++;
    e->c_lost_keys++;
    if (!(kv_e_flags(ent) & KV_F_QUEUED)) {
        kv_e_set_flags(ent, kv_e_flags(ent) | KV_F_QUEUED);
        lostq_push(e, id);
    }
}

static int sub_lost(const kv_engine *e, size_t s)
{
    return kv_bit_get(e->arena->lost, s);
}

void kv_eng_recover(kv_engine *e, kv_recover_stats *st)
{
    kv_recover_stats local;
    if (!st) st = &local;
    memset(st, 0, sizeof *st);
    kv_arena *a = e->arena;
    enum { CHUNK = 1024 };
    uint64_t(*ranges)[2] = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (cap - n < CHUNK) {
            size_t nc = cap ? cap * 2 : CHUNK * 2;
            uint64_t(*r)[2] = realloc(ranges, nc * sizeof *r);
            if (!r) break;
            ranges = r;
            cap = nc;
        }
        size_t got = kv_arena_drain(a, ranges + n, cap - n);
        n += got;
        if (!__atomic_load_n(&a->pending_flag, __ATOMIC_ACQUIRE)) break;
    }
    if (n == 0) {
        free(ranges);
        return;
    }
    e->c_recoveries++;
    st->ranges = n;
    for (size_t i = 0; i < n; i++) st->subpages += ranges[i][1];

    /* Mainline policy: a whole page went. Copy what is readable into a
     * spare page before deciding which records are lost. */
    if (a->hugetlb && a->policy == KV_POLICY_MAINLINE && e->salvage) {
        size_t per = a->page_size >> KV_SUB_SHIFT;
        size_t last = (size_t)-1;
        for (size_t i = 0; i < n; i++) {
            for (size_t p = ranges[i][0] / per; p <= (ranges[i][0] + ranges[i][1] - 1) / per; p++) {
                if (p == last || !kv_arena_page_all_lost(a, p)) continue;
                last = p;
                long r = kv_arena_salvage(a, p, st->salvage_error, sizeof st->salvage_error);
                if (r >= 0) {
                    st->pages_salvaged++;
                    st->subpages_salvaged += per - (size_t)r;
                    e->c_pages_salvaged++;
                    e->c_subpages_salvaged += per - (size_t)r;
                } else {
                    st->salvage_failed++;
                    e->c_salvage_failed++;
                    memcpy(e->last_salvage_error, st->salvage_error, sizeof e->last_salvage_error);
                }
            }
        }
    }

    /* Is any lost subpage holding records? Only then walk the index. */
    int need = 0;
    for (size_t i = 0; i < n && !need; i++)
        for (uint64_t s = ranges[i][0]; s < ranges[i][0] + ranges[i][1] && s < e->al.nsub; s++) {
            int k = kv_sp_kind(e->al.meta[s]);
            if (sub_lost(e, s) && k != KV_SP_FREE && k != KV_SP_LOST) {
                need = 1;
                break;
            }
        }
    if (need) {
        uint64_t before = e->c_lost_keys;
        for (uint64_t u = 1; u < e->ix.slab_top;) {
            uint32_t id = (uint32_t)u;
            kv_entry *ent = kv_ix_entry(&e->ix, id);
            u += kv_e_units(kv_e_klen(ent));
            if (kv_e_state(ent) != KV_ST_PRESENT) continue;
            size_t s = kv_e_off(ent) >> KV_SUB_SHIFT;
            if (s >= e->al.nsub) continue;
            uint32_t m = e->al.meta[s];
            if (kv_sp_kind(m) == KV_SP_SMALL) {
                if (sub_lost(e, s)) kv_eng_lose(e, id, 0);
            } else if (kv_sp_kind(m) == KV_SP_HEAD) {
                size_t run = kv_sp_run(m);
                for (size_t j = s; j < s + run; j++)
                    if (sub_lost(e, j)) {
                        kv_eng_lose(e, id, 1);      /* frees the healthy subpages */
                        break;
                    }
            }
        }
        st->keys_lost = e->c_lost_keys - before;
    }
    for (size_t i = 0; i < n; i++)
        for (uint64_t s = ranges[i][0]; s < ranges[i][0] + ranges[i][1] && s < e->al.nsub; s++)
            if (sub_lost(e, s) && kv_sp_kind(e->al.meta[s]) != KV_SP_LOST) {
                kv_alloc_quarantine(&e->al, s);
                st->subpages_quarantined++;
            }
    free(ranges);
}

static void entry_drop(kv_engine *e, uint32_t id);

int kv_eng_lookup(kv_engine *e, const void *key, uint32_t klen, uint64_t h, uint32_t *id, uint64_t now_ms)
{
    kv_eng_check(e);
    uint32_t i = kv_index_find(&e->ix, key, klen, h);
    if (!i) return KV_ABSENT;
    kv_entry *ent = kv_ix_entry(&e->ix, i);
    if (kv_e_flags(ent) & KV_F_TTL) {
        uint64_t exp = kv_ttl_get(&e->ix, i);
        if (exp && exp <= (now_ms ? now_ms : kv_now_ms())) {
            entry_drop(e, i);
            e->c_expired++;
            return KV_ABSENT;
        }
    }
    *id = i;
    return kv_e_state(ent) == KV_ST_PRESENT ? KV_OK : KV_LOSTKEY;
}

/* A guarded access to entry id's record failed: process the loss. */
static int read_failed(kv_engine *e, uint32_t id)
{
    e->c_faults_on_read++;
    kv_eng_recover(e, NULL);
    kv_entry *ent = kv_ix_entry(&e->ix, id);
    if (kv_e_state(ent) == KV_ST_PRESENT) kv_eng_lose(e, id, 0);   /* known-lost page, already drained */
    return KV_LOSTKEY;
}

/* A record that does not verify: lose it. If its header is implausible the
 * whole subpage is treated as hit by a memory error. */
static int verify_failed(kv_engine *e, uint32_t id, int plausible, size_t reclen)
{
    e->c_checksum_fail++;
    kv_entry *ent = kv_ix_entry(&e->ix, id);
    if (plausible) {
        kv_eng_lose(e, id, (int)reclen);
    } else {
        kv_arena_mark_lost(e->arena, kv_e_off(ent) & ~(uint64_t)(SUB - 1), SUB);
        kv_eng_recover(e, NULL);
        if (kv_e_state(ent) == KV_ST_PRESENT) kv_eng_lose(e, id, 0);
    }
    return KV_LOSTKEY;
}

static int header_plausible(const kv_engine *e, uint64_t off, uint32_t vlen)
{
    uint64_t len = KV_REC_HDR + (uint64_t)vlen;
    if (off + len > e->al.nsub * (uint64_t)SUB) return 0;
    if (len <= SUB) return (off / SUB) == ((off + len - 1) / SUB);
    return (off % SUB) == 0 && kv_sp_kind(e->al.meta[off / SUB]) == KV_SP_HEAD &&
           kv_sp_run(e->al.meta[off / SUB]) * (uint64_t)SUB >= len;
}

/* Read and check the header of PRESENT entry id. */
static int read_header(kv_engine *e, uint32_t id, uint32_t *csum, uint32_t *vlen)
{
    kv_entry *ent = kv_ix_entry(&e->ix, id);
    uint8_t h[KV_REC_HDR];
    size_t fo;
    if (kv_arena_read(e->arena, kv_e_off(ent), h, sizeof h, &fo) != 0) return read_failed(e, id);
    memcpy(csum, h, 4);
    memcpy(vlen, h + 4, 4);
    if (!header_plausible(e, kv_e_off(ent), *vlen)) return verify_failed(e, id, 0, 0);
    return KV_OK;
}

int kv_eng_value_len(kv_engine *e, uint32_t id, uint32_t *vlen)
{
    uint32_t csum;
    return read_header(e, id, &csum, vlen);
}

int kv_eng_value_read(kv_engine *e, uint32_t id, uint32_t vlen, void *dst)
{
    kv_entry *ent = kv_ix_entry(&e->ix, id);
    uint8_t h[KV_REC_HDR];
    size_t fo;
    uint64_t off = kv_e_off(ent);
    if (kv_arena_read(e->arena, off, h, sizeof h, &fo) != 0) return read_failed(e, id);
    uint32_t csum, hv;
    memcpy(&csum, h, 4);
    memcpy(&hv, h + 4, 4);
    if (hv != vlen || !header_plausible(e, off, vlen)) return verify_failed(e, id, 0, 0);
    if (kv_arena_read(e->arena, off + KV_REC_HDR, dst, vlen, &fo) != 0) return read_failed(e, id);
    if (rec_csum(ent->key, kv_e_klen(ent), dst, vlen, kv_e_version(ent)) != csum)
        return verify_failed(e, id, 1, KV_REC_HDR + (size_t)vlen);
    return KV_OK;
}

size_t kv_eng_record_len(kv_engine *e, uint32_t id)
{
    uint32_t csum, vlen;
    if (read_header(e, id, &csum, &vlen) != KV_OK) return 0;
    return KV_REC_HDR + (size_t)vlen;
}

/* Free the record of PRESENT entry id (needs its length from the header;
 * if the header cannot be read the record is part of a loss being handled). */
static void release_record(kv_engine *e, uint32_t id)
{
    kv_entry *ent = kv_ix_entry(&e->ix, id);
    uint64_t off = kv_e_off(ent);
    size_t s = off / SUB;
    if (s < e->al.nsub && kv_sp_kind(e->al.meta[s]) == KV_SP_HEAD) {
        kv_alloc_release(&e->al, off, 1);
        return;
    }
    uint8_t h[KV_REC_HDR];
    size_t fo;
    if (kv_arena_read(e->arena, off, h, sizeof h, &fo) != 0) return;
    uint32_t vlen;
    memcpy(&vlen, h + 4, 4);
    if (!header_plausible(e, off, vlen)) return;
    kv_alloc_release(&e->al, off, KV_REC_HDR + (size_t)vlen);
}

/* Remove entry id entirely (any state). */
static void entry_drop(kv_engine *e, uint32_t id)
{
    kv_entry *ent = kv_ix_entry(&e->ix, id);
    int st = kv_e_state(ent);
    if (st == KV_ST_PRESENT) release_record(e, id);
    else if (st != KV_ST_FREE) e->n_lost--;
    kv_index_remove(&e->ix, id);
}

static int64_t alloc_record(kv_engine *e, size_t len, int use_reserve)
{
    int64_t off = kv_alloc_take(&e->al, len, 0);
    if (off < 0 && use_reserve) off = kv_alloc_take(&e->al, len, 1);
    if (off >= 0) return off;
    for (int pass = 0; pass < 4 && e->al.dead_bytes >= len; pass++) {
        if (!kv_eng_compact(e, 4096)) break;
        off = kv_alloc_take(&e->al, len, 0);
        if (off >= 0) break;
    }
    return off;
}

/* Allocate and write a record; retries elsewhere if the place it got is
 * hit by a memory error while being written. *off_out on KV_OK. */
static int write_record(kv_engine *e, const void *key, uint32_t klen, const void *val, size_t vlen,
                        uint64_t version, int use_reserve, uint64_t *off_out)
{
    uint8_t h[KV_REC_HDR];
    uint32_t csum = rec_csum(key, klen, val, vlen, version), vl = (uint32_t)vlen;
    memcpy(h, &csum, 4);
    memcpy(h + 4, &vl, 4);
    for (int attempt = 0; attempt < 16; attempt++) {
        int64_t off = alloc_record(e, KV_REC_HDR + vlen, use_reserve);
        if (off < 0) return KV_FULL;
        size_t fo;
        if (kv_arena_write(e->arena, (size_t)off, h, sizeof h, &fo) == 0 &&
            kv_arena_write(e->arena, (size_t)off + KV_REC_HDR, val, vlen, &fo) == 0) {
            *off_out = (uint64_t)off;
            return KV_OK;
        }
        /* The new place was lost under us: let recovery quarantine it (its
         * accounting includes our bytes) and try again elsewhere. */
        kv_eng_recover(e, NULL);
    }
    return KV_FULL;
}

int kv_eng_put(kv_engine *e, const void *key, uint32_t klen, const void *val, size_t vlen,
               uint64_t version, uint64_t ttl_ms, uint64_t *out_version)
{
    kv_eng_check(e);
    uint64_t h = kv_hash(key, klen);
    uint32_t id = kv_index_find(&e->ix, key, klen, h);
    uint64_t v = version ? version : e->version + 1;
    uint64_t off;
    int rc = write_record(e, key, klen, val, vlen, v, 0, &off);
    if (rc != KV_OK) return rc;
    if (id) {
        kv_entry *ent = kv_ix_entry(&e->ix, id);
        if (kv_e_state(ent) == KV_ST_PRESENT) release_record(e, id);
        else e->n_lost--;
    } else {
        id = kv_index_insert(&e->ix, key, klen, h);
        if (!id) {
            kv_alloc_release(&e->al, off, KV_REC_HDR + vlen);
            return KV_NOMEM;
        }
    }
    kv_entry *ent = kv_ix_entry(&e->ix, id);
    kv_e_set_off(ent, off);
    kv_e_set_state(ent, KV_ST_PRESENT);
    kv_e_set_version(ent, v);
    if (ttl_ms != UINT64_MAX) {
        if (ttl_ms) {
            if (kv_ttl_set(&e->ix, id, ttl_ms) != 0) {
                /* keep the write; without memory for the expiry, drop the key
                 * rather than keep it forever */
                entry_drop(e, id);
                return KV_NOMEM;
            }
        } else if (kv_e_flags(ent) & KV_F_TTL) {
            kv_ttl_del(&e->ix, id);
        }
    }
    if (v > e->version) e->version = v;
    *out_version = v;
    return KV_OK;
}

int kv_eng_delete(kv_engine *e, const void *key, uint32_t klen)
{
    uint32_t id;
    int rc = kv_eng_lookup(e, key, klen, kv_hash(key, klen), &id, 0);
    if (rc == KV_ABSENT) return 0;
    entry_drop(e, id);
    return 1;
}

int kv_eng_install(kv_engine *e, const void *key, uint32_t klen, const void *val, size_t vlen,
                   uint64_t version)
{
    kv_eng_check(e);
    uint64_t h = kv_hash(key, klen);
    uint32_t id = kv_index_find(&e->ix, key, klen, h);
    if (!id) return KV_SKIP;
    kv_entry *ent = kv_ix_entry(&e->ix, id);
    if (kv_e_state(ent) == KV_ST_PRESENT) return KV_SKIP;
    if (version < kv_e_version(ent)) return KV_STALE;
    uint64_t off;
    /* Reinstalling data that was already stored may use the compactor's
     * reserve: faults can fill a store by quarantining its memory. */
    int rc = write_record(e, key, klen, val, vlen, version, 1, &off);
    if (rc != KV_OK) return rc;
    ent = kv_ix_entry(&e->ix, id);
    if (kv_e_state(ent) == KV_ST_PRESENT) {     /* cannot happen under one lock; be safe */
        kv_alloc_release(&e->al, off, KV_REC_HDR + vlen);
        return KV_SKIP;
    }
    kv_e_set_off(ent, off);
    kv_e_set_state(ent, KV_ST_PRESENT);
    kv_e_set_version(ent, version);
    e->n_lost--;
    e->c_rebuilt++;
    if (version > e->version) e->version = version;
    return KV_OK;
}

static uint8_t *scratch(kv_engine *e, size_t n)
{
    if (n > e->scratch_cap) {
        uint8_t *p = realloc(e->scratch, n);
        if (!p) return NULL;
        e->scratch = p;
        e->scratch_cap = n;
    }
    return e->scratch ? e->scratch : (e->scratch = malloc(e->scratch_cap = 64));
}

uint64_t kv_eng_scrub(kv_engine *e, uint64_t max_bytes, uint64_t *found)
{
    kv_eng_check(e);
    uint64_t done = 0;
    *found = 0;
    uint64_t u = e->scrub_cursor, seen = 0;
    if (e->ix.slab_top <= 1) {               /* no entries yet */
        e->scrub_cursor = 0;
        return 0;
    }
    while (done < max_bytes && seen < e->ix.slab_top) {
        if (u == 0 || u >= e->ix.slab_top) u = 1;   /* entries start at unit 1 and are contiguous */
        uint32_t id = (uint32_t)u;
        kv_entry *ent = kv_ix_entry(&e->ix, id);
        uint32_t units = kv_e_units(kv_e_klen(ent));
        u += units;
        seen += units;
        if (kv_e_state(ent) != KV_ST_PRESENT) continue;
        uint32_t vlen;
        if (kv_eng_value_len(e, id, &vlen) != KV_OK) {
            (*found)++;
            continue;
        }
        uint8_t *buf = scratch(e, vlen ? vlen : 1);
        if (!buf) break;
        if (kv_eng_value_read(e, id, vlen, buf) != KV_OK) (*found)++;
        done += KV_REC_HDR + vlen;
    }
    e->scrub_cursor = u < e->ix.slab_top ? u : 0;
    e->c_scrubbed_bytes += done;
    e->c_scrub_found += *found;
    return done;
}

size_t kv_eng_expire_sweep(kv_engine *e, size_t budget, uint64_t now_ms)
{
    kv_eng_check(e);
    kv_index *ix = &e->ix;
    size_t dropped = 0;
    if (!ix->ttl_cap || !ix->ttl_count) return 0;
    for (size_t k = 0; k < budget && ix->ttl_count; k++) {
        size_t i = e->ttl_cursor & (ix->ttl_cap - 1);
        uint32_t id = ix->ttl_ids[i];
        if (id && ix->ttl_exp[i] <= now_ms) {
            entry_drop(e, id);          /* the table shifts: look at slot i again */
            dropped++;
            e->c_expired++;
            continue;
        }
        e->ttl_cursor = i + 1;
    }
    return dropped;
}

typedef struct {
    uint32_t live;
    uint32_t sub;
} cand_t;

static int cand_cmp(const void *x, const void *y)
{
    const cand_t *a = x, *b = y;
    return a->live < b->live ? -1 : a->live > b->live;
}

/* Greedy cleaning: the emptiest SMALL subpages first (any with at least an
 * eighth dead and under 7/8 live), as many as the free space can absorb, so
 * every pass frees whole subpages. A pass that frees nothing is remembered:
 * the next one waits until more bytes have died. */
size_t kv_eng_compact(kv_engine *e, size_t max_subpages)
{
    kv_alloc *al = &e->al;
    if (al->dead_bytes <= e->compact_futile_dead) return 0;
    size_t room = (al->nfree > 1 ? al->nfree - 1 : 0) * SUB;
    if (al->open >= 0) room += SUB - kv_sp_fill(al->meta[al->open]);
    cand_t *cv = malloc((al->nsub ? al->nsub : 1) * sizeof *cv);
    uint8_t *cand = calloc((al->nsub + 7) / 8, 1);
    if (!cv || !cand) {
        free(cv);
        free(cand);
        return 0;
    }
    size_t nc = 0;
    for (size_t s = 0; s < al->nsub; s++) {
        uint32_t m = al->meta[s];
        if (kv_sp_kind(m) != KV_SP_SMALL || (int64_t)s == al->open) continue;
        uint32_t fill = kv_sp_fill(m), live = kv_sp_live(m);
        if (fill - live >= SUB / 8 && live <= SUB - SUB / 8) cv[nc++] = (cand_t){live, (uint32_t)s};
    }
    qsort(cv, nc, sizeof *cv, cand_cmp);
    size_t ncand = 0, moving = 0;
    for (size_t i = 0; i < nc && ncand < max_subpages; i++) {
        /* survivors go to the open subpage and free ones; leave slack for
         * records that do not pack perfectly */
        if (moving + cv[i].live + cv[i].live / 8 + 64 > room) break;
        moving += cv[i].live;
        cand[cv[i].sub / 8] |= (uint8_t)(1u << (cv[i].sub % 8));
        ncand++;
    }
    free(cv);
    size_t moved = 0;
    if (ncand) {
        e->c_compactions++;
        for (uint64_t u = 1; u < e->ix.slab_top;) {
            uint32_t id = (uint32_t)u;
            kv_entry *ent = kv_ix_entry(&e->ix, id);
            u += kv_e_units(kv_e_klen(ent));
            if (kv_e_state(ent) != KV_ST_PRESENT) continue;
            uint64_t off = kv_e_off(ent);
            size_t s = off / SUB;
            if (s >= al->nsub || !((cand[s / 8] >> (s % 8)) & 1)) continue;
            uint32_t vlen;
            if (kv_eng_value_len(e, id, &vlen) != KV_OK) continue;
            uint8_t *buf = scratch(e, KV_REC_HDR + (size_t)vlen);
            if (!buf) break;
            size_t fo;
            if (kv_arena_read(e->arena, off, buf, KV_REC_HDR + vlen, &fo) != 0) {
                read_failed(e, id);
                continue;
            }
            int64_t noff = kv_alloc_take(al, KV_REC_HDR + vlen, 1);
            if (noff < 0) break;
            if (kv_arena_write(e->arena, (size_t)noff, buf, KV_REC_HDR + vlen, &fo) != 0) {
                kv_eng_recover(e, NULL);       /* the destination was lost; try later */
                continue;
            }
            kv_e_set_off(ent, (uint64_t)noff);
            kv_alloc_release(al, off, KV_REC_HDR + vlen);
            moved++;
        }
    }
    /* (a candidate emptied early may already hold moved records: it was
     * FREE, so it is a fine destination) */
    free(cand);
    e->c_moved += moved;
    e->compact_futile_dead = moved ? 0 : al->dead_bytes + SUB;
    return moved;
}

int kv_eng_corrupt(kv_engine *e, uint32_t id, size_t byte)
{
    kv_entry *ent = kv_ix_entry(&e->ix, id);
    uint8_t b;
    size_t fo, off = kv_e_off(ent) + byte;
    if (kv_arena_read(e->arena, off, &b, 1, &fo) != 0) return -1;
    b ^= 0x5A;
    return kv_arena_write(e->arena, off, &b, 1, &fo);
}
