/* alloc.c - subpage allocator. See alloc.h for the layout and the rules. */
#include "alloc.h"

#include <stdlib.h>
#include <string.h>

#define SUB 4096u

/* The list of record subpages of each group (so the engine can find the
 * records of a hash range without looking at every subpage). */
static void g_link(kv_alloc *al, size_t s, uint64_t g)
{
    al->gprev[s] = KV_NONE;
    al->gnext[s] = al->ghead[g];
    if (al->ghead[g] != KV_NONE) al->gprev[al->ghead[g]] = (uint32_t)s;
    al->ghead[g] = (uint32_t)s;
}

static void g_unlink(kv_alloc *al, size_t s)
{
    kv_meta m = al->meta[s];
    if (kv_sp_kind(m) != KV_SP_SMALL && kv_sp_kind(m) != KV_SP_HEAD) return;
    uint32_t n = al->gnext[s], p = al->gprev[s];
    if (p != KV_NONE) al->gnext[p] = n;
    else if (kv_sp_gbits(m) == al->gbits && al->ghead[kv_sp_gprefix(m)] == s) al->ghead[kv_sp_gprefix(m)] = n;
    if (n != KV_NONE) al->gprev[n] = p;
    al->gnext[s] = al->gprev[s] = KV_NONE;
}

static void fb_set(kv_alloc *al, size_t s) { al->freebm[s >> 6] |= 1ULL << (s & 63); }
static void fb_clr(kv_alloc *al, size_t s) { al->freebm[s >> 6] &= ~(1ULL << (s & 63)); }
static int fb_get(const kv_alloc *al, size_t s) { return (int)((al->freebm[s >> 6] >> (s & 63)) & 1); }

int kv_alloc_init(kv_alloc *al, size_t nsub)
{
    memset(al, 0, sizeof *al);
    al->nsub = nsub;
    al->meta = calloc(nsub ? nsub : 1, sizeof(kv_meta));
    al->freebm = calloc((nsub + 63) / 64 + 1, 8);
    al->gnext = malloc((nsub ? nsub : 1) * sizeof(uint32_t));
    al->gprev = malloc((nsub ? nsub : 1) * sizeof(uint32_t));
    if (!al->meta || !al->freebm || !al->gnext || !al->gprev) {
        kv_alloc_free(al);
        return -1;
    }
    al->reserve = 2 + nsub / 256;
    if (kv_alloc_set_groups(al, 0) != 0) {
        kv_alloc_free(al);
        return -1;
    }
    kv_alloc_reset(al);
    return 0;
}

void kv_alloc_free(kv_alloc *al)
{
    if (al->ext) {
        al->meta = NULL;
        al->freebm = NULL;
        al->opens = NULL;
        al->ghead = al->gnext = al->gprev = NULL;
        al->ext = 0;
        return;
    }
    free(al->meta);
    free(al->freebm);
    free(al->opens);
    free(al->ghead);
    free(al->gnext);
    free(al->gprev);
    al->meta = NULL;
    al->freebm = NULL;
    al->opens = NULL;
    al->ghead = al->gnext = al->gprev = NULL;
}

void kv_alloc_reset(kv_alloc *al)
{
    al->nfree = 0;
    for (size_t s = 0; s < al->nsub; s++) {
        if (kv_sp_kind(al->meta[s]) == KV_SP_LOST) continue;
        if (kv_sp_kind(al->meta[s]) == KV_SP_HDR) {
            fb_clr(al, s);
            continue;
        }
        al->meta[s] = 0;
        fb_set(al, s);
        al->nfree++;
    }
    for (size_t g = 0; g < ((size_t)1 << al->gbits); g++) al->opens[g] = -1, al->ghead[g] = KV_NONE;
    for (size_t s = 0; s < al->nsub; s++) al->gnext[s] = al->gprev[s] = KV_NONE;
    al->cursor = 0;
    al->live_bytes = al->dead_bytes = 0;
    al->nindex = 0;
}

void kv_alloc_layout_of(size_t nsub, unsigned gbits, kv_alloc_layout *L)
{
    size_t n = nsub ? nsub : 1, G = (size_t)1 << gbits, o = 0;
    L->meta = o, o += n * 8;
    L->freebm = o, o += ((nsub + 63) / 64 + 1) * 8;
    L->opens = o, o += G * 8;
    L->gnext = o, o += n * 4;
    L->gprev = o, o += n * 4;
    L->ghead = o, o += G * 4;
    L->aux = o, o += n * 4;
    L->total = o;
}

void kv_alloc_export(const kv_alloc *al, uint8_t *img, const kv_alloc_layout *L)
{
    size_t n = al->nsub ? al->nsub : 1, G = (size_t)1 << al->gbits;
    memcpy(img + L->meta, al->meta, n * 8);
    memcpy(img + L->freebm, al->freebm, ((al->nsub + 63) / 64 + 1) * 8);
    memcpy(img + L->opens, al->opens, G * 8);
    memcpy(img + L->gnext, al->gnext, n * 4);
    memcpy(img + L->gprev, al->gprev, n * 4);
    memcpy(img + L->ghead, al->ghead, G * 4);
}

void kv_alloc_attach(kv_alloc *al, uint8_t *mem, const kv_alloc_layout *L)
{
    kv_alloc_free(al);
    al->meta = (kv_meta *)(mem + L->meta);
    al->freebm = (uint64_t *)(mem + L->freebm);
    al->opens = (int64_t *)(mem + L->opens);
    al->gnext = (uint32_t *)(mem + L->gnext);
    al->gprev = (uint32_t *)(mem + L->gprev);
    al->ghead = (uint32_t *)(mem + L->ghead);
    al->ext = 1;
}

/* Next free subpage at or after the cursor (wrapping), or -1. */
static int64_t find_free(kv_alloc *al)
{
    size_t nw = (al->nsub + 63) / 64;
    size_t w0 = al->cursor >> 6;
    for (size_t k = 0; k <= nw; k++) {
        size_t w = (w0 + k) % nw;
        uint64_t bits = al->freebm[w];
        if (k == 0) bits &= ~0ULL << (al->cursor & 63);
        if (bits) {
            size_t s = w * 64 + (size_t)__builtin_ctzll(bits);
            if (s < al->nsub) return (int64_t)s;
        }
    }
    return -1;
}

/* First run of n free subpages (first fit from the cursor, wrapping). */
static int64_t find_run(kv_alloc *al, size_t n)
{
    size_t start = 0, len = 0;
    for (size_t pass = 0; pass < 2; pass++) {
        size_t from = pass == 0 ? al->cursor : 0, to = pass == 0 ? al->nsub : al->cursor + n;
        if (to > al->nsub) to = al->nsub;
        len = 0;
        for (size_t s = from; s < to;) {
            if ((s & 63) == 0 && len == 0 && s + 64 <= to && al->freebm[s >> 6] == 0) {
                s += 64;
                continue;
            }
            if (fb_get(al, s)) {
                if (len == 0) start = s;
                if (++len == n) return (int64_t)start;
            } else {
                len = 0;
            }
            s++;
        }
    }
    return -1;
}

static void close_open(kv_alloc *al, uint64_t g)
{
    if (al->opens[g] < 0) return;
    size_t s = (size_t)al->opens[g];
    al->opens[g] = -1;
    kv_meta m = al->meta[s];
    if (kv_sp_kind(m) != KV_SP_SMALL) return;
    al->meta[s] = m & ~KV_SP_OPEN;
    if (kv_sp_live(m) == 0) {
        al->dead_bytes -= kv_sp_fill(m);
        g_unlink(al, s);
        al->meta[s] = 0;
        fb_set(al, s);
        al->nfree++;
    }
}

int kv_alloc_set_groups(kv_alloc *al, unsigned gbits)
{
    if (gbits > KV_GROUP_MAX_BITS) gbits = KV_GROUP_MAX_BITS;
    if (al->opens && gbits == al->gbits) return 0;
    if (al->ext) return -1;
    int64_t *o = malloc(((size_t)1 << gbits) * sizeof *o);
    uint32_t *h = malloc(((size_t)1 << gbits) * sizeof *h);
    if (!o || !h) {
        free(o);
        free(h);
        return -1;
    }
    if (al->opens)
        for (uint64_t g = 0; g < ((uint64_t)1 << al->gbits); g++) close_open(al, g);
    free(al->opens);
    free(al->ghead);
    for (size_t g = 0; g < ((size_t)1 << gbits); g++) o[g] = -1, h[g] = KV_NONE;
    al->opens = o;
    al->ghead = h;
    al->gbits = gbits;
    /* subpages placed under the old groups: list them under the new ones */
    for (size_t s = 0; s < al->nsub; s++) {
        al->gnext[s] = al->gprev[s] = KV_NONE;
        kv_meta m = al->meta[s];
        if (kv_sp_kind(m) != KV_SP_SMALL && kv_sp_kind(m) != KV_SP_HEAD) continue;
        unsigned gb = kv_sp_gbits(m);
        uint64_t g = gb <= gbits ? kv_sp_gprefix(m) << (gbits - gb) : kv_sp_gprefix(m) >> (gb - gbits);
        al->meta[s] = (m & ~KV_SP_TAGMASK) | kv_sp_tag(gbits, g);
        g_link(al, s, g);
    }
    return 0;
}

int64_t kv_alloc_take(kv_alloc *al, size_t len, int compacting, uint64_t h)
{
    if (len == 0) len = 1;
    size_t keep = compacting ? 0 : al->reserve;
    uint64_t g = kv_alloc_group(al, h);
    kv_meta tag = kv_sp_tag(al->gbits, g);
    if (len <= SUB) {
        if (al->opens[g] >= 0) {
            size_t s = (size_t)al->opens[g];
            kv_meta m = al->meta[s];
            if (kv_sp_kind(m) == KV_SP_SMALL && kv_sp_fill(m) + len <= SUB && kv_sp_nrec(m) < 1023) {
                al->meta[s] = kv_sp_small_set(m, kv_sp_fill(m) + (uint32_t)len, kv_sp_live(m) + (uint32_t)len,
                                              kv_sp_nrec(m) + 1);
                al->live_bytes += len;
                return (int64_t)(s * SUB + kv_sp_fill(m));
            }
        }
        if (al->nfree <= keep) return -1;
        int64_t s = find_free(al);
        if (s < 0) return -1;
        close_open(al, g);
        fb_clr(al, (size_t)s);
        al->nfree--;
        al->meta[s] = kv_sp_small_set(kv_sp_mk(KV_SP_SMALL) | tag | KV_SP_OPEN, (uint32_t)len, (uint32_t)len, 1);
        g_link(al, (size_t)s, g);
        al->opens[g] = s;
        al->cursor = (size_t)s + 1 < al->nsub ? (size_t)s + 1 : 0;
        al->live_bytes += len;
        return s * (int64_t)SUB;
    }
    size_t n = (len + SUB - 1) / SUB;
    if (n >= (1u << 28) || al->nfree < n + keep) return -1;
    int64_t s = find_run(al, n);
    if (s < 0) return -1;
    for (size_t i = 0; i < n; i++) {
        fb_clr(al, (size_t)s + i);
        al->meta[s + (int64_t)i] = kv_sp_mk(KV_SP_CONT);
    }
    al->meta[s] = kv_sp_mk(KV_SP_HEAD) | tag | (kv_meta)n;
    g_link(al, (size_t)s, g);
    al->nfree -= n;
    al->cursor = (size_t)s + n < al->nsub ? (size_t)s + n : 0;
    al->live_bytes += n * SUB;
    return s * (int64_t)SUB;
}

void kv_alloc_release(kv_alloc *al, uint64_t off, size_t len)
{
    size_t s = (size_t)(off / SUB);
    if (s >= al->nsub) return;
    kv_meta m = al->meta[s];
    int kind = kv_sp_kind(m);
    if (kind == KV_SP_SMALL) {
        if (len == 0) len = 1;
        if (len > kv_sp_live(m)) len = kv_sp_live(m);   /* never underflow the field */
        uint32_t live = kv_sp_live(m) - (uint32_t)len;
        uint32_t nrec = kv_sp_nrec(m) ? kv_sp_nrec(m) - 1 : 0;
        if (!nrec) live = 0, len = kv_sp_live(m);
        al->live_bytes -= len;
        al->dead_bytes += len;
        al->meta[s] = kv_sp_small_set(m, kv_sp_fill(m), live, nrec);
        if (live == 0 && !(m & KV_SP_OPEN)) {
            al->dead_bytes -= kv_sp_fill(m);
            g_unlink(al, s);
            al->meta[s] = 0;
            fb_set(al, s);
            al->nfree++;
        }
    } else if (kind == KV_SP_HEAD) {
        size_t n = kv_sp_run(m);
        g_unlink(al, s);
        for (size_t i = s; i < s + n && i < al->nsub; i++) {
            if (kv_sp_kind(al->meta[i]) == KV_SP_LOST) continue;
            al->meta[i] = 0;
            fb_set(al, i);
            al->nfree++;
        }
        al->live_bytes -= n * SUB;
    }
}

int kv_alloc_claim(kv_alloc *al, size_t s, kv_meta m)
{
    if (s >= al->nsub || !fb_get(al, s)) return -1;
    fb_clr(al, s);
    al->nfree--;
    al->meta[s] = m;
    switch (kv_sp_kind(m)) {
    case KV_SP_INDEX:
    case KV_SP_DIR:
        al->nindex++;
        break;
    case KV_SP_HDR:
        al->nfixed++;
        break;
    case KV_SP_SMALL:
        al->live_bytes += kv_sp_live(m);
        al->dead_bytes += kv_sp_fill(m) - kv_sp_live(m);
        if (kv_sp_gbits(m) == al->gbits) g_link(al, s, kv_sp_gprefix(m));
        break;
    case KV_SP_HEAD:
        al->live_bytes += kv_sp_run(m) * SUB;
        if (kv_sp_gbits(m) == al->gbits) g_link(al, s, kv_sp_gprefix(m));
        break;
    default:
        break;
    }
    return 0;
}

void kv_alloc_quarantine(kv_alloc *al, size_t s)
{
    if (s >= al->nsub) return;
    kv_meta m = al->meta[s];
    g_unlink(al, s);
    switch (kv_sp_kind(m)) {
    case KV_SP_LOST:
        return;
    case KV_SP_FREE:
        fb_clr(al, s);
        al->nfree--;
        break;
    case KV_SP_SMALL:
        al->live_bytes -= kv_sp_live(m);
        al->dead_bytes -= kv_sp_fill(m) - kv_sp_live(m);
        if (m & KV_SP_OPEN) {
            uint64_t g = kv_sp_gprefix(m);
            if (kv_sp_gbits(m) == al->gbits && al->opens[g] == (int64_t)s) al->opens[g] = -1;
        }
        break;
    case KV_SP_INDEX:
    case KV_SP_DIR:
        al->nindex--;
        break;
    case KV_SP_HDR:
        al->nfixed--;
        break;
    default:
        /* part of a large record: the engine has freed the run already */
        break;
    }
    al->meta[s] = kv_sp_mk(KV_SP_LOST);
    al->nlost++;
}

int64_t kv_alloc_take_meta(kv_alloc *al, size_t n, kv_meta m, int use_reserve)
{
    size_t keep = use_reserve ? 0 : al->reserve;
    if (al->nfree < n + keep) return -1;
    int64_t s = n == 1 ? find_free(al) : find_run(al, n);
    if (s < 0) return -1;
    for (size_t i = 0; i < n; i++) {
        fb_clr(al, (size_t)s + i);
        al->meta[s + (int64_t)i] = m;
    }
    al->nfree -= n;
    al->nindex += n;
    return s;
}

int64_t kv_alloc_take_fixed(kv_alloc *al, size_t n)
{
    if (n == 0 || al->nfree < n) return -1;
    int64_t s = find_run(al, n);
    if (s < 0) return -1;
    for (size_t i = 0; i < n; i++) {
        fb_clr(al, (size_t)s + i);
        al->meta[s + (int64_t)i] = kv_sp_mk(KV_SP_HDR);
    }
    al->nfree -= n;
    al->nfixed += n;
    return s;
}

void kv_alloc_give(kv_alloc *al, size_t s, size_t n)
{
    for (size_t i = s; i < s + n && i < al->nsub; i++) {
        int k = kv_sp_kind(al->meta[i]);
        if (k != KV_SP_INDEX && k != KV_SP_DIR) continue;
        al->meta[i] = 0;
        fb_set(al, i);
        al->nfree++;
        al->nindex--;
    }
}

int kv_alloc_range(const kv_alloc *al, size_t s, uint64_t *lo, uint64_t *hi)
{
    if (s >= al->nsub) return -1;
    while (s > 0 && kv_sp_kind(al->meta[s]) == KV_SP_CONT) s--;
    kv_meta m = al->meta[s];
    if (kv_sp_kind(m) != KV_SP_SMALL && kv_sp_kind(m) != KV_SP_HEAD) return -1;
    unsigned g = kv_sp_gbits(m);
    uint64_t p = kv_sp_gprefix(m);
    *lo = g ? p << (64 - g) : 0;
    *hi = g ? *lo | (~0ULL >> g) : ~0ULL;
    return 0;
}
