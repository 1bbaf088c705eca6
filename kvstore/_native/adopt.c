/* adopt.c - the arena header and adoption of an inherited arena. See adopt.h. */
#include "adopt.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SUB 4096u

int kv_crash_armed;
static const char *crash_at;

__attribute__((constructor)) static void crash_init(void)
{
    crash_at = getenv("KVSTORE_CRASH_AT");
    kv_crash_armed = crash_at && *crash_at;
}

void kv_crash_point_slow(const char *name)
{
    if (crash_at && strcmp(crash_at, name) == 0) {
        /* KVSTORE_CRASH_ONCE=path: only the process that creates path aborts
         * (a supervised server's next worker inherits the same environment) */
        const char *once = getenv("KVSTORE_CRASH_ONCE");
        if (once && *once) {
            int fd = open(once, O_WRONLY | O_CREAT | O_EXCL, 0600);
            if (fd < 0) return;
            close(fd);
        }
        fprintf(stderr, "kvstore: KVSTORE_CRASH_AT=%s: aborting here\n", name);
        abort();
    }
}

/* engine.c internals adoption shares */
void kv_eng__lostrange_push(kv_engine *e, uint64_t lo, uint64_t hi, uint64_t version);
void kv_eng__lostq_push(kv_engine *e, const kv_entry *en);
int64_t kv_eng__new_page(kv_engine *e, uint64_t lo, uint64_t hi, unsigned flags, uint64_t lost_at);
int kv_eng__dir_fill(kv_engine *e, uint64_t c0, uint64_t n, uint32_t s);
uint32_t kv_eng__pgc_count(const kv_ipage *p);

int kv_eng__meta_place(kv_engine *e);

void kv_hdr_image(const kv_engine *e, kv_hdr *h)
{
    memset(h, 0, sizeof *h);
    h->magic = KV_HDR_MAGIC;
    h->layout = KV_LAYOUT_VERSION;
    h->hdr_bytes = sizeof *h;
    h->arena_size = e->arena->size;
    h->page_size = e->arena->page_size;
    h->nsub = e->al.nsub;
    h->gbits = e->al.gbits;
    h->gdepth = e->gdepth;
    h->dir_sub = e->dir_sub;
    h->dir_n = e->dir_n;
    h->version = e->version;
    h->generation = e->generation;
    h->meta_sub = e->meta_sub;
    h->meta_n = e->meta_n;
}

void kv_hdr_sync_meta(kv_engine *e)
{
    uint64_t f[2] = {e->meta_sub, e->meta_n};
    size_t fo;
    if (kv_arena_hazard(e->arena, 0, sizeof(kv_hdr)) == 0)
        kv_arena_write(e->arena, offsetof(kv_hdr, meta_sub), f, sizeof f, &fo);
}

void kv_hdr_format(kv_engine *e)
{
    kv_hdr h;
    kv_hdr_image(e, &h);
    h.created_ms = kv_now_ms();
    size_t fo;
    if (kv_arena_hazard(e->arena, 0, sizeof h) == 0 && kv_arena_write(e->arena, 0, &h, sizeof h, &fo) == 0)
        e->hdr_version = e->version;
}

void kv_hdr_sync(kv_engine *e)
{
    kv_arena *a = e->arena;
    if (kv_arena_hazard(a, 0, sizeof(kv_hdr)) != 0) return;
    struct {
        uint32_t gbits, gdepth;
        uint64_t dir_sub, dir_n, version, generation;
    } f = {e->al.gbits, e->gdepth, e->dir_sub, e->dir_n, e->version, e->generation};
    size_t fo;
    if (kv_arena_write(a, offsetof(kv_hdr, gbits), &f, sizeof f, &fo) == 0) e->hdr_version = e->version;
}

/* Raise the header's version to v before an operation whose effect leaves
 * no entry carrying its version (a delete) reaches memory. Adoption takes
 * the header's version as a floor, so a crash between the delete's effect
 * and the header write after the operation cannot hand its version out
 * again. Writes only the version field; kv_hdr_sync_version skips the
 * write after the operation when e->version has caught up with it. */
void kv_hdr_version_ahead(kv_engine *e, uint64_t v)
{
    kv_arena *a = e->arena;
    if (v <= e->hdr_version || kv_arena_hazard(a, 0, sizeof(kv_hdr)) != 0) return;
    size_t fo;
    if (kv_arena_write(a, offsetof(kv_hdr, version), &v, sizeof v, &fo) == 0) e->hdr_version = v;
}

/* ------------------------------------------------------------ adoption */

/* Mark the entry at entry_off LOST in the arena (its loc word). */
static void entry_mark_lost(kv_arena *a, uint64_t entry_off)
{
    kv_entry en;
    size_t fo;
    if (kv_arena_read(a, entry_off, &en.loc, 8, &fo) != 0) return;
    kv_e_set_state(&en, KV_ST_LOST);
    kv_arena_write(a, entry_off, &en.loc, 8, &fo);
}

static uint64_t entry_hash(const kv_entry *en)
{
    return (kv_e_flags(en) & KV_F_LONG) ? kv_e_fullhash(en) : kv_hash(en->key, kv_e_klen(en));
}

/* The entries of a page read from memory: keys where they belong? */
static int page_entries_ok(const kv_ipage *p)
{
    for (uint32_t i = 0; i < p->n; i++) {
        const kv_entry *en = kv_ip_entry((kv_ipage *)p, i);
        uint32_t klen = kv_e_klen(en);
        unsigned fl = kv_e_flags(en);
        if (klen > KV_MAX_KEY || (fl & ~(KV_F_TTL | KV_F_LONG))) return 0;
        if (((fl & KV_F_LONG) != 0) != (klen > KV_INLINE_KEY)) return 0;
        uint64_t h = entry_hash(en);
        if (h < p->lo || h > p->hi) return 0;
        if ((p->slot[i] >> 16) != kv_tag(h)) return 0;
    }
    return 1;
}

int kv_eng_adopt(kv_engine *e, kv_arena *a, kv_adopt_report *r, char *err, size_t errlen)
{
    memset(e, 0, sizeof *e);
    memset(r, 0, sizeof *r);
    e->arena = a;
    kv_hdr h;
    size_t fo;
    if (a->size < SUB || kv_arena_read(a, 0, &h, sizeof h, &fo) != 0) {
        snprintf(err, errlen, "the arena header is unreadable (memory lost there): not adopted");
        return -1;
    }
    if (h.magic != KV_HDR_MAGIC) {
        snprintf(err, errlen, "no kvstore arena header (magic %016llx): not adopted",
                 (unsigned long long)h.magic);
        return -1;
    }
    if (h.layout != KV_LAYOUT_VERSION) {
        snprintf(err, errlen,
                 "arena layout version %u, this build reads layout version %u: not adopted "
                 "(start empty and resync from a replica)",
                 h.layout, KV_LAYOUT_VERSION);
        return -1;
    }
    uint64_t ncells = h.gdepth <= KV_MAX_DEPTH ? 1ULL << h.gdepth : 0;
    if (h.hdr_bytes != sizeof h || h.arena_size != a->size || h.page_size != a->page_size || h.nsub < 8 ||
        h.nsub > (a->size >> KV_SUB_SHIFT) || h.gbits > KV_GROUP_MAX_BITS || h.gdepth > KV_MAX_DEPTH ||
        h.dir_n != (ncells * 4 + SUB - 1) / SUB || h.dir_sub < 1 || h.dir_sub + h.dir_n > h.nsub) {
        snprintf(err, errlen, "the arena header does not agree with the arena (size %zu, pages %zu): not adopted",
                 a->size, a->page_size);
        return -1;
    }
    if (h.meta_n && (h.meta_sub < 1 || h.meta_sub + h.meta_n > h.nsub ||
                     (h.meta_sub < h.dir_sub + h.dir_n && h.dir_sub < h.meta_sub + h.meta_n))) {
        snprintf(err, errlen, "the arena header's allocator region does not fit the arena: not adopted");
        return -1;
    }
    return kv_eng__adopt_hdr(e, a, &h, 0, r, err, errlen);
}

int kv_eng__adopt_hdr(kv_engine *e, kv_arena *a, const kv_hdr *hp, int live, kv_adopt_report *r, char *err,
                      size_t errlen)
{
    memset(e, 0, sizeof *e);
    memset(r, 0, sizeof *r);
    e->arena = a;
    kv_hdr h = *hp;
    size_t fo;
    uint64_t ncells = 1ULL << h.gdepth;
    uint32_t *cells = NULL;
    size_t *pages = NULL;
    uint64_t (*bad)[2] = NULL;
    uint8_t *buf = NULL;
    size_t npages = 0, nbad = 0, bad_cap = 0;

    if (kv_alloc_init(&e->al, h.nsub) != 0 || kv_alloc_set_groups(&e->al, h.gbits) != 0 ||
        !(e->pgc = calloc(h.nsub, sizeof *e->pgc)) || !(buf = aligned_alloc(64, SUB)) ||
        !(cells = malloc(ncells * 4))) {
        snprintf(err, errlen, "out of memory while adopting the arena");
        goto fail;
    }
    e->gdepth = h.gdepth;
    e->dir_sub = h.dir_sub;
    e->dir_n = h.dir_n;
    e->version = h.version;
    e->generation = h.generation + 1;
    e->salvage = 1;
    e->txn_off = -1;
    r->old_version = h.version;
    kv_alloc_claim(&e->al, 0, kv_sp_mk(KV_SP_HDR));
    for (size_t i = 0; i < h.meta_n; i++) kv_alloc_claim(&e->al, h.meta_sub + i, kv_sp_mk(KV_SP_HDR));
    e->meta_sub = h.meta_sub;
    e->meta_n = h.meta_n;
    for (size_t i = 0; i < h.dir_n; i++) kv_alloc_claim(&e->al, h.dir_sub + i, kv_sp_mk(KV_SP_DIR));
    if (kv_arena_read(a, h.dir_sub * SUB, cells, ncells * 4, &fo) != 0) {
        snprintf(err, errlen, "the index directory is unreadable (memory lost at offset %zu): not adopted", fo);
        goto fail;
    }

    /* 1. The directory's runs of cells, each naming one index page whose
     * header covers exactly that run. */
    unsigned D = h.gdepth;
    pages = malloc((ncells < h.nsub ? ncells : h.nsub) * sizeof *pages + sizeof *pages);
    if (!pages) {
        snprintf(err, errlen, "out of memory while adopting the arena");
        goto fail;
    }
    for (uint64_t c = 0; c < ncells;) {
        uint32_t s = cells[c];
        uint64_t c1 = c;
        while (c1 + 1 < ncells && cells[c1 + 1] == s) c1++;
        int ok = s >= 1 && s < h.nsub && e->al.meta[s] == 0 &&
                 kv_arena_read(a, (size_t)s * SUB, buf, SUB, &fo) == 0;
        const kv_ipage *p = (const kv_ipage *)buf;
        ok = ok && kv_ip_plausible(p) && p->lo == kv_cell_lo(D, c) && p->hi == kv_cell_hi(D, c1) &&
             page_entries_ok(p);
        if (ok) {
            kv_alloc_claim(&e->al, s, kv_sp_index(p->lo, p->hi));
            pages[npages++] = s;
        } else {
            if (nbad == bad_cap) {
                size_t nc = bad_cap ? bad_cap * 2 : 16;
                void *nb = realloc(bad, nc * sizeof *bad);
                if (!nb) {
                    snprintf(err, errlen, "out of memory while adopting the arena");
                    goto fail;
                }
                bad = nb;
                bad_cap = nc;
            }
            bad[nbad][0] = c;
            bad[nbad][1] = c1;
            nbad++;
        }
        c = c1 + 1;
    }

    /* 2. The versions the entries hold; REBUILDING entries become LOST
     * (their fetch died with the old process). */
    uint64_t maxv = h.version;
    for (size_t k = 0; k < npages; k++) {
        size_t s = pages[k];
        if (kv_arena_read(a, s * SUB, buf, SUB, &fo) != 0) continue;
        kv_ipage *p = (kv_ipage *)buf;
        if (p->lost_at > maxv) maxv = p->lost_at;
        for (uint32_t i = 0; i < p->n; i++) {
            kv_entry *en = kv_ip_entry(p, i);
            if (kv_e_version(en) > maxv) maxv = kv_e_version(en);
            if (kv_e_state(en) == KV_ST_REBUILDING) entry_mark_lost(a, s * SUB + (p->slot[i] & 0xFFFF));
        }
    }
    e->version = maxv;

    /* 3. The records are not read here: each PRESENT entry's record is
     * listed under its subpage and validated when first used, or by the
     * background pass (lazy.c); nothing is allocated before its subpage
     * was validated. */
    if (kv_lazy_begin(e, pages, npages, buf, r) != 0) {
        snprintf(err, errlen, "out of memory while adopting the arena");
        goto fail;
    }

    /* 4. Counters and the rebuilder's queues. */
    for (size_t k = 0; k < npages; k++) {
        size_t s = pages[k];
        if (kv_arena_read(a, s * SUB, buf, SUB, &fo) != 0) continue;
        kv_ipage *p = (kv_ipage *)buf;
        uint32_t c = kv_eng__pgc_count(p);
        e->pgc[s] = c;
        e->nkeys += c & 1023;
        e->n_lost += (c >> 10) & 1023;
        e->n_ttl += (c >> 20) & 1023;
        if (p->flags & KV_IP_LOSTRANGE) {
            kv_eng__lostrange_push(e, p->lo, p->hi, p->lost_at);
            r->lost_ranges++;
        }
        for (uint32_t i = 0; i < p->n; i++) {
            kv_entry *en = kv_ip_entry(p, i);
            int st = kv_e_state(en);
            if (st == KV_ST_LOST || st == KV_ST_UNRECOVERABLE) kv_eng__lostq_push(e, en);
        }
    }
    r->index_pages = npages;
    r->keys = e->nkeys;
    r->lost_keys = e->n_lost;

    /* 5. Runs whose page did not verify: a fresh page flagged LOSTRANGE. */
    for (size_t b = 0; b < nbad; b++) {
        uint64_t lo = kv_cell_lo(D, bad[b][0]), hi = kv_cell_hi(D, bad[b][1]);
        int64_t q = kv_eng__new_page(e, lo, hi, KV_IP_LOSTRANGE, e->version);
        if (q < 0 || kv_eng__dir_fill(e, bad[b][0], bad[b][1] - bad[b][0] + 1, (uint32_t)q) != 0) {
            snprintf(err, errlen, "no room to replace an index page that did not verify: not adopted");
            goto fail;
        }
        kv_eng__lostrange_push(e, lo, hi, e->version);
        r->index_pages_bad++;
        r->lost_ranges++;
    }
    r->generation = e->generation;
    e->verify_todo = e->al.nsub;
    if (live) {
        /* a running store rebuilding its lost metadata needs all of it
         * now: validate every subpage before returning */
        while (e->lazy)
            if (kv_lazy_step(e, e->al.nsub + 1) == 0) kv_lazy_end(e);
    } else {
        kv_eng__meta_place(e);      /* the metadata into its region (left in process memory if no room) */
        kv_hdr_sync(e);
    }
    free(cells);
    free(pages);
    free(bad);
    free(buf);
    return 0;
fail:
    free(cells);
    free(pages);
    free(bad);
    free(buf);
    kv_eng_free(e);
    return -1;
}
