/* lazy.c - deferred validation of an adopted arena's records. See lazy.h
 * for the rules, adopt.h for the interface.
 *
 * Everything here touches the arena only through guarded copies
 * (kv_arena_read / kv_arena_write), so it may run inside an engine guard
 * (a read that meets an unvalidated record) or outside any (recovery, the
 * background pass, adoption itself): a memory error makes a copy fail, it
 * never jumps out of the middle of a validation.
 */
#include "adopt.h"
#include "lazy.h"

#include <stdlib.h>
#include <string.h>

#define SUB 4096u
#define BAD UINT64_MAX

static void bit_clr(uint64_t *bm, size_t s) { bm[s >> 6] &= ~(1ULL << (s & 63)); }
static int unref(const kv_lazy *z, size_t s) { return z->start[s + 1] == z->start[s]; }

/* engine.c internals */
void kv_eng__count_lost(kv_engine *e, size_t ps, const kv_entry *en);

static void settled(kv_lazy *z, size_t s)
{
    bit_clr(z->unval, s);
    z->n_unval--;
    z->subpages_validated++;
}

/* Subpage s becomes free (or quarantined when it is lost). */
static void make_free(kv_engine *e, size_t s)
{
    kv_alloc *al = &e->al;
    al->meta[s] = 0;
    al->freebm[s >> 6] |= 1ULL << (s & 63);
    al->nfree++;
    if (kv_bit_get(e->arena->lost, s)) kv_alloc_quarantine(al, s);
    settled(e->lazy, s);
}

/* Claim s with metadata word m (s was neither free nor claimed). */
static void claim(kv_engine *e, size_t s, kv_meta m)
{
    kv_alloc *al = &e->al;
    al->freebm[s >> 6] |= 1ULL << (s & 63);
    al->nfree++;
    kv_alloc_claim(al, s, m);
    settled(e->lazy, s);
}

static int is_dead(const kv_lazy *z, uint64_t h)
{
    for (size_t i = 0; i < z->dead_n; i++)
        if (h >= z->dead[i][0] && h <= z->dead[i][1]) return 1;
    return 0;
}

/* The entry that named item it at adoption becomes LOST (found again by
 * hash and record offset; it may have moved inside its page or to another
 * page since). Nothing happens if it is gone or unreadable. */
static void lose_item(kv_engine *e, const kv_lazy_item *it)
{
    kv_lazy *z = e->lazy;
    kv_arena *a = e->arena;
    uint64_t off = KV_LAZY_OFF(it);
    uint64_t c = kv_cell(e->gdepth, it->h);
    uint32_t ps;
    size_t fo;
    if (kv_arena_read(a, e->dir_sub * SUB + c * 4, &ps, 4, &fo) != 0 || ps >= e->al.nsub ||
        kv_sp_kind(e->al.meta[ps]) != KV_SP_INDEX || kv_arena_read(a, (size_t)ps * SUB, z->pagebuf, SUB, &fo) != 0)
        return;
    kv_ipage *p = (kv_ipage *)z->pagebuf;
    if (!kv_ip_plausible(p)) return;
    for (uint32_t i = 0; i < p->n; i++) {
        if ((p->slot[i] >> 16) != kv_tag(it->h)) continue;
        kv_entry *en = kv_ip_entry(p, i);
        if (kv_e_state(en) != KV_ST_PRESENT || kv_e_off(en) != off) continue;
        kv_e_set_state(en, KV_ST_LOST);     /* in the copy, then its loc word in the arena */
        if (kv_arena_write(a, (size_t)ps * SUB + (p->slot[i] & 0xFFFF), &en->loc, 8, &fo) != 0) return;
        kv_eng__count_lost(e, ps, en);
        return;
    }
}

/* s is lost (its bytes cannot be read): the records named there are LOST;
 * a large record starting there takes its continuation with it (those
 * subpages are freed later, as nothing covers them any more). */
static void validate_lost(kv_engine *e, size_t s)
{
    kv_lazy *z = e->lazy;
    for (uint32_t i = z->start[s]; i < z->start[s + 1]; i++) {
        kv_lazy_item *it = &z->item[i];
        if (is_dead(z, it->h)) continue;
        lose_item(e, it);
        z->records_bad++;
    }
    make_free(e, s);       /* lost: quarantined */
}

static void validate_gap(kv_engine *e, size_t t);

/* Validate referenced subpage s: read the headers of the records the
 * entries named there, check bounds and overlaps, claim s (and a large
 * record's run) with the allocator's metadata; what does not verify is
 * LOST, and a subpage no good record is left on is free. */
static void validate_ref(kv_engine *e, size_t s)
{
    kv_lazy *z = e->lazy;
    kv_arena *a = e->arena;
    kv_alloc *al = &e->al;
    if (kv_bit_get(a->lost, s)) {
        validate_lost(e, s);
        return;
    }
    kv_lazy_item *it = z->item + z->start[s];
    size_t n = z->start[s + 1] - z->start[s];
    for (size_t i = 0; i < n; i++) {
        uint64_t off = KV_LAZY_OFF(&it[i]);
        it[i].len = 0;
        if (is_dead(z, it[i].h)) continue;      /* its entry went with a lost index page */
        uint32_t rh[2];
        size_t fo;
        if (kv_arena_read(a, off, rh, 8, &fo) != 0) {
            validate_lost(e, s);                /* a memory error here: all of it is lost */
            return;
        }
        uint64_t len = KV_REC_HDR + (uint64_t)KV_LAZY_EXTRA(&it[i]) + rh[1];
        int ok;
        if (len <= SUB) {
            ok = (off + len - 1) / SUB == s;
        } else {
            uint64_t ns = (len + SUB - 1) / SUB;
            ok = off % SUB == 0 && s + ns <= al->nsub;
            for (uint64_t t = 1; ok && t < ns; t++)
                ok = kv_lazy_bit(z, s + t) && unref(z, s + t) && !kv_bit_get(a->lost, s + t);
        }
        it[i].len = ok ? len : BAD;
    }
    /* by offset (few records per subpage: insertion sort) */
    for (size_t i = 1; i < n; i++) {
        kv_lazy_item x = it[i];
        size_t j = i;
        while (j > 0 && KV_LAZY_OFF(&it[j - 1]) > KV_LAZY_OFF(&x)) {
            it[j] = it[j - 1];
            j--;
        }
        it[j] = x;
    }
    /* overlaps: both sides are bad */
    size_t far = n;
    for (size_t i = 0; i < n; i++) {
        if (it[i].len == 0 || it[i].len == BAD) continue;
        if (far != n && KV_LAZY_OFF(&it[i]) < KV_LAZY_OFF(&it[far]) + kv_alloc_footprint(it[far].len)) {
            it[i].len = it[far].len = BAD;
            continue;
        }
        far = i;
    }
    /* one group per subpage of small records */
    size_t first = n;
    for (size_t i = 0; i < n; i++) {
        if (it[i].len == 0 || it[i].len == BAD) continue;
        if (first == n) first = i;
        else if (kv_alloc_group(al, it[i].h) != kv_alloc_group(al, it[first].h)) it[i].len = BAD;
    }
    /* commit */
    uint32_t fill = 0, live = 0, nrec = 0;
    size_t large = n;
    for (size_t i = 0; i < n; i++) {
        if (it[i].len == BAD) {
            lose_item(e, &it[i]);
            z->records_bad++;
            continue;
        }
        if (it[i].len == 0) continue;
        z->records++;
        if (it[i].len > SUB) {
            large = i;
            continue;
        }
        uint32_t end = (uint32_t)(KV_LAZY_OFF(&it[i]) - (uint64_t)s * SUB + it[i].len);
        if (end > fill) fill = end;
        live += (uint32_t)it[i].len;
        nrec++;
    }
    if (large != n) {
        uint64_t ns = (it[large].len + SUB - 1) / SUB;
        kv_meta tag = kv_sp_tag(al->gbits, kv_alloc_group(al, it[large].h));
        claim(e, s, kv_sp_mk(KV_SP_HEAD) | tag | (kv_meta)ns);
        for (uint64_t t = 1; t < ns; t++) claim(e, s + t, kv_sp_mk(KV_SP_CONT));
    } else if (nrec) {
        kv_meta tag = kv_sp_tag(al->gbits, kv_alloc_group(al, it[first].h));
        claim(e, s, kv_sp_small_set(kv_sp_mk(KV_SP_SMALL) | tag, fill, live, nrec));
    } else {
        make_free(e, s);
    }
}

/* Unreferenced unvalidated subpage t: validate the nearest referenced or
 * validated subpage below it (a large record there may cover t), then free
 * the run of unreferenced subpages that follows what that subpage covers. */
static void validate_gap(kv_engine *e, size_t t)
{
    kv_lazy *z = e->lazy;
    size_t r = t;
    while (r > 0 && kv_lazy_bit(z, r - 1) && unref(z, r - 1)) r--;
    if (r > 0 && kv_lazy_bit(z, r - 1)) validate_ref(e, r - 1);
    size_t i = r;
    while (i < e->al.nsub && !kv_lazy_bit(z, i)) i++;       /* what the record below covers */
    while (i < e->al.nsub && kv_lazy_bit(z, i) && unref(z, i)) make_free(e, i++);
}

/* ------------------------------------------------------------ interface */

void kv_lazy_validate(kv_engine *e, size_t s)
{
    kv_lazy *z = e->lazy;
    if (!z || s >= e->al.nsub || !kv_lazy_bit(z, s)) return;
    if (unref(z, s)) validate_gap(e, s);
    else validate_ref(e, s);
}

void kv_lazy_validate_demand(kv_engine *e, size_t s)
{
    if (e->lazy) e->lazy->on_demand++;
    kv_lazy_validate(e, s);
}

/* Next unvalidated subpage at or after s (want_unref: unreferenced only),
 * or nsub. */
static size_t next_unval(const kv_lazy *z, size_t nsub, size_t s, int want_unref)
{
    while (s < nsub) {
        uint64_t w = z->unval[s >> 6] >> (s & 63);
        if (!w) {
            s = (s | 63) + 1;
            continue;
        }
        s += (size_t)__builtin_ctzll(w);
        if (s >= nsub) break;
        if (!want_unref || unref(z, s)) return s;
        s++;
    }
    return nsub;
}

int kv_lazy_room(kv_engine *e)
{
    kv_lazy *z = e->lazy;
    if (!z || !z->n_unval) return 0;
    size_t nsub = e->al.nsub;
    size_t t = next_unval(z, nsub, z->room_cursor, 1);
    if (t == nsub) t = next_unval(z, nsub, 1, 1);
    if (t == nsub) t = next_unval(z, nsub, 1, 0);
    if (t == nsub) return 0;
    z->room_cursor = t;
    kv_lazy_validate(e, t);
    return 1;
}

size_t kv_lazy_step(kv_engine *e, size_t budget)
{
    kv_lazy *z = e->lazy;
    size_t done = 0;
    if (!z) return 0;
    while (done < budget && z->n_unval) {
        size_t s = next_unval(z, e->al.nsub, z->cursor, 0);
        if (s >= e->al.nsub) {
            z->cursor = 1;
            s = next_unval(z, e->al.nsub, 1, 0);
            if (s >= e->al.nsub) break;
        }
        z->cursor = s;
        kv_lazy_validate(e, s);
        done++;
    }
    if (!z->n_unval) kv_lazy_end(e);
    return done;
}

void kv_lazy_settle_lost(kv_engine *e, size_t s) { kv_lazy_validate(e, s); }

void kv_lazy_range_lost(kv_engine *e, uint64_t lo, uint64_t hi)
{
    kv_lazy *z = e->lazy;
    if (!z) return;
    if (z->dead_n == z->dead_cap) {
        size_t nc = z->dead_cap ? z->dead_cap * 2 : 8;
        uint64_t(*d)[2] = realloc(z->dead, nc * sizeof *d);
        if (!d) return;     /* its records are then claimed: space held until a sweep, never reused wrongly */
        z->dead = d;
        z->dead_cap = nc;
    }
    z->dead[z->dead_n][0] = lo;
    z->dead[z->dead_n][1] = hi;
    z->dead_n++;
}

void kv_lazy_end(kv_engine *e)
{
    kv_lazy *z = e->lazy;
    if (!z) return;
    e->lazy_records = z->records;
    e->lazy_records_bad = z->records_bad;
    e->lazy_on_demand = z->on_demand;
    free(z->unval);
    free(z->start);
    free(z->item);
    free(z->dead);
    free(z->pagebuf);
    free(z);
    e->lazy = NULL;
}

/* Build the state from the verified index pages (adoption, before the
 * store serves): every PRESENT entry's record is checked for what the
 * entry alone tells (inside the capacity, not on the header, directory or
 * an index page; else LOST at once) and listed under its subpage. */
int kv_lazy_begin(kv_engine *e, const size_t *pages, size_t npages, uint8_t *buf, kv_adopt_report *r)
{
    kv_arena *a = e->arena;
    kv_alloc *al = &e->al;
    size_t nsub = al->nsub;
    uint64_t limit = (uint64_t)nsub * SUB;
    kv_lazy *z = calloc(1, sizeof *z);
    if (!z) return -1;
    e->lazy = z;
    z->unval = calloc((nsub + 63) / 64 + 1, 8);
    z->start = calloc(nsub + 2, sizeof *z->start);
    z->pagebuf = aligned_alloc(64, SUB);
    if (!z->unval || !z->start || !z->pagebuf) goto fail;
    size_t fo;
    /* pass 1: bounds the entry alone tells; count records per subpage */
    size_t nitems = 0;
    for (size_t k = 0; k < npages; k++) {
        size_t s = pages[k];
        if (kv_arena_read(a, s * SUB, buf, SUB, &fo) != 0) continue;
        kv_ipage *p = (kv_ipage *)buf;
        for (uint32_t i = 0; i < p->n; i++) {
            kv_entry *en = kv_ip_entry(p, i);
            if (kv_e_state(en) != KV_ST_PRESENT) continue;
            uint64_t off = kv_e_off(en);
            uint32_t extra = (kv_e_flags(en) & KV_F_LONG) ? kv_e_klen(en) : 0;
            if (off < SUB || off + KV_REC_HDR + extra > limit || al->meta[off / SUB] != 0) {
                kv_e_set_state(en, KV_ST_LOST);
                kv_arena_write(a, s * SUB + (p->slot[i] & 0xFFFF), &en->loc, 8, &fo);
                r->records_bad++;
                continue;
            }
            z->start[off / SUB + 2]++;
            nitems++;
        }
    }
    if (nitems >= UINT32_MAX) goto fail;
    for (size_t s = 2; s < nsub + 2; s++) z->start[s] += z->start[s - 1];
    z->item = malloc((nitems ? nitems : 1) * sizeof *z->item);
    if (!z->item) goto fail;
    /* pass 2: list them */
    for (size_t k = 0; k < npages; k++) {
        size_t s = pages[k];
        if (kv_arena_read(a, s * SUB, buf, SUB, &fo) != 0) continue;
        kv_ipage *p = (kv_ipage *)buf;
        for (uint32_t i = 0; i < p->n; i++) {
            kv_entry *en = kv_ip_entry(p, i);
            if (kv_e_state(en) != KV_ST_PRESENT) continue;
            uint64_t off = kv_e_off(en);
            uint64_t extra = (kv_e_flags(en) & KV_F_LONG) ? kv_e_klen(en) : 0;
            uint64_t h = (kv_e_flags(en) & KV_F_LONG) ? kv_e_fullhash(en) : kv_hash(en->key, kv_e_klen(en));
            z->item[z->start[off / SUB + 1]++] = (kv_lazy_item){off | extra << 40, h, 0};
        }
    }
    z->nitems = nitems;
    /* every subpage not claimed (header, directory, index pages) waits */
    for (size_t s = 0; s < nsub; s++) {
        if (al->meta[s] != 0) continue;
        z->unval[s >> 6] |= 1ULL << (s & 63);
        al->freebm[s >> 6] &= ~(1ULL << (s & 63));
        al->nfree--;
        z->n_unval++;
    }
    z->cursor = z->room_cursor = 1;
    r->records = nitems;
    return 0;
fail:
    kv_lazy_end(e);
    return -1;
}

size_t kv_lazy_pending(const kv_engine *e) { return e->lazy ? e->lazy->n_unval : 0; }

int kv_lazy_unval_slow(const kv_engine *e, size_t s)
{
    return s < e->al.nsub && kv_lazy_bit(e->lazy, s);
}
