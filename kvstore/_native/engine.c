/* engine.c - records, the in-arena index, recovery, compaction, scrubbing
 * and expiry. See engine.h and index.h.
 */
#define _GNU_SOURCE
#include "engine.h"
#include "adopt.h"
#include "checksum.h"
#include "guard.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SUB 4096u
#define NOPAGE ((size_t)-1)

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

/* ------------------------------------------------------------ guarding */

/* Inside a guard: the subpages of [off, off+len) are lost or armed. Leave
 * through the guard as the hardware would: a known loss is never touched
 * again, latent (simulated) poison raises a real synchronous SIGBUS. */
static __attribute__((noinline, noreturn)) void touch_fault(kv_arena *a, size_t off, size_t len)
{
    size_t s0 = off >> KV_SUB_SHIFT, s1 = (off + (len ? len : 1) - 1) >> KV_SUB_SHIFT;
    for (size_t s = s0; s <= s1; s++)
        if (kv_bit_get(a->lost, s)) {
            kv_tls.fault_addr = (uintptr_t)a->base + (s << KV_SUB_SHIFT);
            kv_tls.fault_code = 0;
            kv_tls.active = 0;
            siglongjmp(*kv_tls.jmp, 1);
        }
    size_t s = s0;
    while (s < s1 && !kv_bit_get(a->armed, s)) s++;
    uint8_t *at = a->base + (s << KV_SUB_SHIFT);
    int lsb = KV_SUB_SHIFT;
    if (a->policy == KV_POLICY_MAINLINE && kv_arena_page_huge(a, (s << KV_SUB_SHIFT) >> a->page_shift))
        lsb = a->page_shift;
    kv_guard_raise(BUS_MCEERR_AR, at, lsb);       /* leaves through the guard */
    /* Still here (SIGBUS blocked): note the loss ourselves. */
    kv_arena_mark_lost(a, (size_t)(at - a->base) & ~(((size_t)1 << lsb) - 1), (size_t)1 << lsb);
    kv_tls.fault_addr = (uintptr_t)at;
    kv_tls.fault_code = BUS_MCEERR_AR;
    kv_tls.active = 0;
    siglongjmp(*kv_tls.jmp, 1);
}

#define TOUCH(e, off, len)                                                            \
    do {                                                                              \
        if (__builtin_expect(kv_arena_hazard((e)->arena, (off), (len)) != 0, 0))     \
            touch_fault((e)->arena, (off), (len));                                    \
    } while (0)

static inline uint8_t *AP(kv_engine *e, uint64_t off) { return e->arena->base + off; }
static inline kv_ipage *PG(kv_engine *e, size_t s) { return (kv_ipage *)(e->arena->base + (s << KV_SUB_SHIFT)); }
static inline uint64_t cell_of(unsigned D, uint64_t h) { return kv_cell(D, h); }
static inline uint32_t *CELLS(kv_engine *e) { return (uint32_t *)AP(e, e->dir_sub * SUB); }
static inline int sub_lost(const kv_engine *e, size_t s) { return kv_bit_get(e->arena->lost, s); }

/* Is a subpage of the allocator's metadata region lost? (Then its arrays
 * must not be touched until recovery has rebuilt them elsewhere.) */
static int meta_lost(const kv_engine *e)
{
    if (!e->meta_n) return 0;
    for (size_t s = e->meta_sub; s < e->meta_sub + e->meta_n; s++)
        if (kv_bit_get(e->arena->lost, s)) return 1;
    return 0;
}

/* Has the allocator's metadata been lost since *ev (the arena's loss
 * counter when the caller last looked)? A loop that reads the metadata
 * between guarded accesses asks before each read: under the mainline
 * policy a fault anywhere on a hugepage takes the whole page, and the
 * metadata may live there (it is readable again once recovered). */
static inline int meta_lost_since(const kv_engine *e, uint64_t *ev)
{
    uint64_t now = __atomic_load_n(&e->arena->lost_events, __ATOMIC_ACQUIRE);
    if (now == *ev) return 0;
    *ev = now;
    return meta_lost(e);
}

/* Landing after a fault inside an engine guard: undo half-done allocations
 * (unless the allocator's metadata was hit: its rebuild from the index
 * frees what no entry references). */
static void landed(kv_engine *e)
{
    kv_guard_landed();
    if (kv_tls.fault_code) kv_arena_after_sync_fault(e->arena, kv_tls.fault_addr);
    if (e->txn_len && meta_lost(e)) e->txn_len = 0;
    if (e->txn_len) {
        kv_alloc_release(&e->al, (uint64_t)e->txn_off, e->txn_len);
        e->txn_len = 0;
    }
}

/* A fault landed while another thread salvages a page (it has unlocked
 * the engine for the copy): wait for it, unlocked too, then go on. */
static void wait_salvage(kv_engine *e)
{
    if (!__atomic_load_n(&e->in_salvage, __ATOMIC_ACQUIRE)) return;
    void *tok = e->unlock ? e->unlock() : NULL;
    while (__atomic_load_n(&e->in_salvage, __ATOMIC_ACQUIRE)) {
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
    if (e->relock) e->relock(tok);
}

/* Is losses processing reserved to another thread (recover_owner)? */
static inline int not_owner(const kv_engine *e)
{
    unsigned long o = __atomic_load_n(&e->recover_owner, __ATOMIC_ACQUIRE);
    return o != 0 && o != (unsigned long)pthread_self();
}

/* Seconds a thread waits for the owner before processing losses itself
 * (an owner that stopped without handing back; never in normal use). */
#define OWNER_WAIT_NS (30ULL * 1000000000ULL)

/* An operation met lost memory (or must start again): get the losses
 * processed. Another thread salvaging, or a recover_owner that is not this
 * thread: wait for it, unlocked, so it can finish; then process whatever is
 * left (a no-op when another thread owns recovery). */
static void settle(kv_engine *e)
{
    wait_salvage(e);
    if (not_owner(e) && (__atomic_load_n(&e->arena->pending_flag, __ATOMIC_ACQUIRE) ||
                         __atomic_load_n(&e->in_salvage, __ATOMIC_ACQUIRE))) {
        void *tok = e->unlock ? e->unlock() : NULL;
        struct timespec t0, now;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        while (not_owner(e) && (__atomic_load_n(&e->arena->pending_flag, __ATOMIC_ACQUIRE) ||
                                __atomic_load_n(&e->in_salvage, __ATOMIC_ACQUIRE))) {
            struct timespec ts = {0, 200000};
            nanosleep(&ts, NULL);
            clock_gettime(CLOCK_MONOTONIC, &now);
            if ((uint64_t)(now.tv_sec - t0.tv_sec) * 1000000000ULL + (uint64_t)now.tv_nsec -
                    (uint64_t)t0.tv_nsec > OWNER_WAIT_NS)
                break;
        }
        if (e->relock) e->relock(tok);
        if (not_owner(e) && !__atomic_load_n(&e->in_salvage, __ATOMIC_ACQUIRE) &&
            __atomic_load_n(&e->arena->pending_flag, __ATOMIC_ACQUIRE)) {
            /* the owner is gone: do it here rather than fail the operation */
            unsigned long o = e->recover_owner;
            e->recover_owner = 0;
            kv_eng_recover(e, NULL);
            e->recover_owner = o;
            return;
        }
    }
    kv_eng_recover(e, NULL);
}

static int64_t g_txn_page = -1;      /* only touched with the engine held */
static int64_t g_txn_dir = -1;
static size_t g_txn_dir_n;

static void landed_alloc(kv_engine *e)
{
    if (meta_lost(e)) g_txn_page = g_txn_dir = -1;
    if (g_txn_page >= 0) kv_alloc_give(&e->al, (size_t)g_txn_page, 1);
    if (g_txn_dir >= 0) kv_alloc_give(&e->al, (size_t)g_txn_dir, g_txn_dir_n);
    g_txn_page = g_txn_dir = -1;
}

typedef int (*kv_body)(kv_engine *e, void *args);

/* Run body inside a guard; on a fault, process the loss and start again. */
static __attribute__((noinline)) int run(kv_engine *e, kv_body body, void *args)
{
    sigjmp_buf jb;
    volatile int tries = 0;
    sigjmp_buf *volatile outer = kv_tls.jmp;
    volatile int outer_active = kv_tls.active;
    kv_guard_thread_init();
    for (;;) {
        if (sigsetjmp(jb, 0)) {
            landed(e);
            landed_alloc(e);
            kv_tls.jmp = outer;
            kv_tls.active = outer_active;
            e->c_faults_on_read++;
            if (++tries > 64) return KV_AGAIN;
            settle(e);
            continue;
        }
        kv_eng_check(e);
        kv_guard_arm(&jb);
        int rc = body(e, args);
        kv_guard_disarm();
        kv_tls.jmp = outer;
        kv_tls.active = outer_active;
        kv_hdr_sync_version(e);
        if (rc != KV_AGAIN) return rc;
        if (++tries > 64) return KV_AGAIN;
        settle(e);
    }
}

/* Run body once inside a guard of its own (usable inside another guard):
 * its result, or on_fault when a fault cut it short (the loss is recorded,
 * not processed). */
static __attribute__((noinline)) int guarded_once(kv_engine *e, kv_body body, void *args, int on_fault)
{
    sigjmp_buf jb;
    sigjmp_buf *volatile outer = kv_tls.jmp;
    volatile int outer_active = kv_tls.active;
    kv_guard_thread_init();
    if (sigsetjmp(jb, 0)) {
        kv_guard_landed();
        if (kv_tls.fault_code) kv_arena_after_sync_fault(e->arena, kv_tls.fault_addr);
        kv_tls.jmp = outer;
        kv_tls.active = outer_active;
        return on_fault;
    }
    kv_guard_arm(&jb);
    int rc = body(e, args);
    kv_guard_disarm();
    kv_tls.jmp = outer;
    kv_tls.active = outer_active;
    return rc;
}

/* Visit index page s in place inside its own guard (usable inside another
 * guard). Returns 0, or -1 when a fault cut the visit short. */
typedef void (*kv_page_fn)(kv_engine *e, size_t s, kv_ipage *p, void *ctx);
typedef struct {
    size_t s;
    kv_page_fn fn;
    void *ctx;
} visit_args;

static int body_visit(kv_engine *e, void *va)
{
    visit_args *v = va;
    TOUCH(e, v->s * SUB, SUB);
    v->fn(e, v->s, PG(e, v->s), v->ctx);
    return 0;
}

static int visit_page(kv_engine *e, size_t s, kv_page_fn fn, void *ctx)
{
    visit_args v = {s, fn, ctx};
    return guarded_once(e, body_visit, &v, -1);
}

/* Visit every healthy index page. Returns the number of visits cut short. */
static size_t each_page(kv_engine *e, kv_page_fn fn, void *ctx)
{
    size_t bad = 0;
    uint64_t ev = 0;
    for (size_t s = 0; s < e->al.nsub; s++) {
        if (meta_lost_since(e, &ev)) return bad + 1;
        if (kv_sp_kind(e->al.meta[s]) != KV_SP_INDEX || sub_lost(e, s)) continue;
        if (visit_page(e, s, fn, ctx) != 0) bad++;
    }
    return bad;
}

/* ------------------------------------------------------- page counters */

/* Keys, lost keys and keys with an expiry, per index page (so a lost page's
 * share can be taken off the totals without reading it). */
static inline size_t sub_of(kv_engine *e, const void *inpage)
{
    return (size_t)((const uint8_t *)inpage - e->arena->base) >> KV_SUB_SHIFT;
}

static inline void pgc_add(kv_engine *e, const void *inpage, int dk, int dl, int dt)
{
    size_t s = sub_of(e, inpage);
    uint32_t c = e->pgc[s];
    uint32_t k = (c & 1023) + (uint32_t)dk, l = ((c >> 10) & 1023) + (uint32_t)dl,
             t = ((c >> 20) & 1023) + (uint32_t)dt;
    e->pgc[s] = (k & 1023) | (l & 1023) << 10 | (t & 1023) << 20;
    e->nkeys += (uint64_t)(int64_t)dk;
    e->n_lost += (uint64_t)(int64_t)dl;
    e->n_ttl += (uint64_t)(int64_t)dt;
}

static uint32_t pgc_count(const kv_ipage *p)
{
    uint32_t k = 0, l = 0, t = 0;
    for (uint32_t i = 0; i < p->n; i++) {
        const kv_entry *en = kv_ip_entry((kv_ipage *)p, i);
        int st = kv_e_state(en);
        if (st == KV_ST_TOMB) continue;
        k++;
        if (st != KV_ST_PRESENT) l++;
        if (kv_e_flags(en) & KV_F_TTL) t++;
    }
    return k | l << 10 | t << 20;
}

/* ---------------------------------------------------------- lost queue */

static void lostrange_push(kv_engine *e, uint64_t lo, uint64_t hi, uint64_t version)
{
    if (e->lr_n == e->lr_cap) {
        size_t nc = e->lr_cap ? e->lr_cap * 2 : 16;
        kv_lostrange *r = realloc(e->lranges, nc * sizeof *r);
        if (!r) return;
        e->lranges = r;
        e->lr_cap = nc;
    }
    e->lranges[e->lr_n++] = (kv_lostrange){lo, hi, version};
}

static void lostq_push(kv_engine *e, const kv_entry *en)
{
    if (kv_e_flags(en) & KV_F_LONG) {      /* name gone with the record: by hash */
        uint64_t h = kv_e_fullhash(en);
        lostrange_push(e, h, h, kv_e_version(en));
        return;
    }
    if (e->lostq_n == e->lostq_cap) {
        size_t nc = e->lostq_cap ? e->lostq_cap * 2 : 256;
        kv_lostkey *q = realloc(e->lostq, nc * sizeof *q);
        if (!q) return;            /* lost_keys() still lists it */
        e->lostq = q;
        e->lostq_cap = nc;
    }
    uint32_t klen = kv_e_klen(en);
    uint8_t *k = malloc(klen ? klen : 1);
    if (!k) return;
    memcpy(k, en->key, klen);
    e->lostq[e->lostq_n++] = (kv_lostkey){k, klen, kv_e_version(en), 0};
}

/* Entry en's record is unreadable: LOST (release: bytes of it to free). */
static void lose(kv_engine *e, kv_entry *en, size_t release)
{
    if (kv_e_state(en) != KV_ST_PRESENT) return;
    if (release) kv_alloc_release(&e->al, kv_e_off(en), release);
    kv_e_set_state(en, KV_ST_LOST);
    pgc_add(e, en, 0, 1, 0);
    e->c_lost_keys++;
    lostq_push(e, en);
}

/* ------------------------------------------------------------- lookups */

static size_t find_page(kv_engine *e, uint64_t h)
{
    uint64_t c = cell_of(e->gdepth, h);
    TOUCH(e, e->dir_sub * SUB + c * 4, 4);
    size_t s = CELLS(e)[c];
    if (__builtin_expect(s >= e->al.nsub, 0)) return NOPAGE;
    if (__builtin_expect(kv_arena_hazard(e->arena, s * SUB, SUB) != 0, 0)) {
        /* a page that could not be replaced after a loss: its range is lost */
        if (kv_sp_kind(e->al.meta[s]) != KV_SP_INDEX) return NOPAGE;
        touch_fault(e->arena, s * SUB, SUB);
    }
    /* the header and the slot array are read next: ask for them together */
    const uint8_t *pg = AP(e, (uint64_t)s * SUB);
    for (int l = 0; l < 8; l++) __builtin_prefetch(pg + l * 64);
    return s;
}

static int pg_find(kv_engine *e, kv_ipage *p, const void *key, uint32_t klen, uint64_t h)
{
    uint32_t want = (uint32_t)kv_tag(h) << 16;
    uint32_t n = p->n;
    for (uint32_t i = 0; i < n; i++) {
        if ((p->slot[i] & 0xFFFF0000u) != want) continue;
        kv_entry *en = kv_ip_entry(p, i);
        if (kv_e_klen(en) != klen) continue;
        if (!(kv_e_flags(en) & KV_F_LONG)) {
            if (memcmp(en->key, key, klen) == 0) return (int)i;
            continue;
        }
        if (kv_e_fullhash(en) != h) continue;
        if (kv_e_state(en) != KV_ST_PRESENT) return (int)i;     /* known by hash only */
        uint64_t off = kv_e_off(en) + KV_REC_HDR;
        TOUCH(e, off, klen);
        if (memcmp(AP(e, off), key, klen) == 0) return (int)i;
    }
    return -1;
}

static int header_plausible(const kv_engine *e, uint64_t off, uint64_t len)
{
    if (off + len > e->al.nsub * (uint64_t)SUB) return 0;
    if (len <= SUB) return (off / SUB) == ((off + len - 1) / SUB) && kv_sp_kind(e->al.meta[off / SUB]) == KV_SP_SMALL;
    return (off % SUB) == 0 && kv_sp_kind(e->al.meta[off / SUB]) == KV_SP_HEAD &&
           kv_sp_run(e->al.meta[off / SUB]) * (uint64_t)SUB >= len;
}

/* Record header of PRESENT entry en: *vlen and the whole record length. 0,
 * or KV_AGAIN after marking an implausible record's subpage lost. */
static int rec_header(kv_engine *e, kv_entry *en, uint32_t *csum, uint32_t *vlen, size_t *reclen)
{
    uint64_t off = kv_e_off(en);
    if (__builtin_expect(kv_lazy_unval(e, off / SUB), 0)) {
        /* adopted, not validated yet: validate the subpage first (lazy.h) */
        kv_lazy_validate_demand(e, off / SUB);
        if (kv_e_state(en) != KV_ST_PRESENT || kv_lazy_unval(e, off / SUB)) return KV_AGAIN;
    }
    TOUCH(e, off, KV_REC_HDR);
    memcpy(csum, AP(e, off), 4);
    memcpy(vlen, AP(e, off + 4), 4);
    size_t extra = (kv_e_flags(en) & KV_F_LONG) ? kv_e_klen(en) : 0;
    *reclen = KV_REC_HDR + extra + (size_t)*vlen;
    if (!header_plausible(e, off, *reclen)) {
        /* garbage where a header should be: treat the subpage as hit */
        e->c_checksum_fail++;
        kv_arena_mark_lost(e->arena, off & ~(uint64_t)(SUB - 1), SUB);
        return KV_AGAIN;
    }
    return 0;
}

static void fill_info(kv_engine *e, kv_ipage *p, size_t s, kv_entry *en, kv_info *info)
{
    info->state = kv_e_state(en);
    info->range_lost = 0;
    info->noname = (kv_e_flags(en) & KV_F_LONG) && info->state != KV_ST_PRESENT;
    info->version = kv_e_version(en);
    info->expire_ms = kv_e_ttl(en);
    info->rec_off = kv_e_off(en);
    info->rec_len = 0;
    info->entry_off = (uint64_t)((uint8_t *)en - e->arena->base);
    info->entry_len = kv_e_bytes(en);
    info->range_lo = p->lo;
    info->range_hi = p->hi;
}

static void fill_range_info(kv_engine *e, kv_ipage *p, kv_info *info)
{
    memset(info, 0, sizeof *info);
    info->state = KV_ST_LOST;
    info->range_lost = 1;
    info->version = p ? p->lost_at : e->version;
    if (p) {
        info->range_lo = p->lo;
        info->range_hi = p->hi;
    }
}

/* Remove slot i (any state) and free what it holds. */
static void entry_drop(kv_engine *e, kv_ipage *p, uint32_t i, size_t reclen)
{
    kv_entry *en = kv_ip_entry(p, i);
    int st = kv_e_state(en);
    if (st == KV_ST_PRESENT) {
        uint64_t off = kv_e_off(en);
        kv_alloc_release(&e->al, off, reclen);
    }
    pgc_add(e, p, st != KV_ST_TOMB ? -1 : 0, st >= KV_ST_LOST && st <= KV_ST_UNRECOVERABLE ? -1 : 0,
            (kv_e_flags(en) & KV_F_TTL) ? -1 : 0);
    kv_ip_del(p, i);
}

/* Length to release for PRESENT entry en (reads the header of small ones). */
static int release_len(kv_engine *e, kv_entry *en, size_t *len)
{
    *len = 0;
    if (kv_e_state(en) != KV_ST_PRESENT) return 0;
    uint64_t off = kv_e_off(en);
    if (kv_sp_kind(e->al.meta[off / SUB]) == KV_SP_HEAD) {
        *len = 1;
        return 0;
    }
    uint32_t c, v;
    return rec_header(e, en, &c, &v, len);
}

/* ----------------------------------------------------------------- get */

typedef struct {
    const uint8_t *key;
    uint32_t klen;
    uint64_t h, now;
    kv_buf_fn buf;
    void *ctx;
    kv_info *info;
    int want_value, want_len;
} get_args;

static int body_get(kv_engine *e, void *va)
{
    get_args *a = va;
    size_t s = find_page(e, a->h);
    if (s == NOPAGE) {
        fill_range_info(e, NULL, a->info);
        return KV_LOSTKEY;
    }
    kv_ipage *p = PG(e, s);
    int i = pg_find(e, p, a->key, a->klen, a->h);
    if (i < 0) {
        if (p->flags & KV_IP_LOSTRANGE) {
            fill_range_info(e, p, a->info);
            return KV_LOSTKEY;
        }
        return KV_ABSENT;
    }
    kv_entry *en = kv_ip_entry(p, (uint32_t)i);
    int st = kv_e_state(en);
    if (st == KV_ST_TOMB) return KV_ABSENT;
    if (kv_e_flags(en) & KV_F_TTL) {
        uint64_t exp = kv_e_ttl(en);
        if (exp && exp <= (a->now ? a->now : kv_now_ms())) {
            size_t rl;
            int rc = release_len(e, en, &rl);
            if (rc) return rc;
            entry_drop(e, p, (uint32_t)i, rl);
            e->c_expired++;
            return KV_ABSENT;
        }
    }
    fill_info(e, p, s, en, a->info);
    if (st != KV_ST_PRESENT) return KV_LOSTKEY;
    if (!a->want_value && !a->want_len) return KV_OK;
    uint32_t csum, vlen;
    size_t reclen;
    int rc = rec_header(e, en, &csum, &vlen, &reclen);
    if (rc) return rc;
    a->info->rec_len = (uint32_t)reclen;
    if (!a->want_value) return KV_OK;
    uint64_t voff = kv_e_off(en) + KV_REC_HDR + ((kv_e_flags(en) & KV_F_LONG) ? a->klen : 0);
    TOUCH(e, voff, vlen);
    void *dst = a->buf(a->ctx, vlen);
    if (!dst) return KV_NOMEM;
    memcpy(dst, AP(e, voff), vlen);
    if (rec_csum(a->key, a->klen, dst, vlen, kv_e_version(en)) != csum) {
        e->c_checksum_fail++;
        lose(e, en, reclen);
        a->info->state = KV_ST_LOST;
        return KV_LOSTKEY;
    }
    return KV_OK;
}

int kv_eng_get(kv_engine *e, const void *key, uint32_t klen, uint64_t now_ms, kv_buf_fn buf, void *ctx,
               kv_info *info)
{
    get_args a = {key, klen, kv_hash(key, klen), now_ms, buf, ctx, info, 1, 0};
    return run(e, body_get, &a);
}

int kv_eng_info(kv_engine *e, const void *key, uint32_t klen, uint64_t now_ms, int want_len, kv_info *info)
{
    get_args a = {key, klen, kv_hash(key, klen), now_ms, NULL, NULL, info, 0, want_len};
    return run(e, body_get, &a);
}

/* ---------------------------------------------------------- allocation */

static int64_t alloc_record(kv_engine *e, size_t len, int use_reserve, uint64_t h)
{
    int64_t off = kv_alloc_take(&e->al, len, 0, h);
    if (off < 0 && use_reserve) off = kv_alloc_take(&e->al, len, 1, h);
    /* after adoption: validate more of the arena until there is room */
    while (off < 0 && kv_lazy_room(e)) {
        off = kv_alloc_take(&e->al, len, 0, h);
        if (off < 0 && use_reserve) off = kv_alloc_take(&e->al, len, 1, h);
    }
    if (off >= 0) return off;
    for (int pass = 0; pass < 4 && e->al.dead_bytes >= len; pass++) {
        if (!kv_eng_compact(e, 4096)) break;
        off = kv_alloc_take(&e->al, len, 0, h);
        if (off >= 0) break;
    }
    return off;
}

/* Index subpages for a split: compact records first if that makes room. */
static int64_t take_index(kv_engine *e, size_t n, kv_meta m)
{
    int64_t s = kv_alloc_take_meta(&e->al, n, m, 0);
    while (s < 0 && kv_lazy_room(e)) s = kv_alloc_take_meta(&e->al, n, m, 0);
    for (int pass = 0; s < 0 && pass < 4 && e->al.dead_bytes >= SUB; pass++) {
        if (!kv_eng_compact(e, 4096)) break;
        s = kv_alloc_take_meta(&e->al, n, m, 0);
    }
    return s;
}

/* Double the directory (inside a guard). */
static int dir_double(kv_engine *e)
{
    unsigned D = e->gdepth;
    if (D >= KV_MAX_DEPTH) return KV_FULL;
    uint64_t ncells = 1ULL << (D + 1);
    size_t n = (size_t)((ncells * 4 + SUB - 1) / SUB);
    int64_t s2 = take_index(e, n, kv_sp_mk(KV_SP_DIR));
    if (s2 < 0) return KV_FULL;
    g_txn_dir = s2;
    g_txn_dir_n = n;
    TOUCH(e, (size_t)s2 * SUB, n * SUB);
    TOUCH(e, e->dir_sub * SUB, e->dir_n * SUB);
    uint32_t *old = CELLS(e), *nw = (uint32_t *)AP(e, (uint64_t)s2 * SUB);
    for (uint64_t c = 0; c < (1ULL << D); c++) nw[2 * c] = nw[2 * c + 1] = old[c];
    uint64_t old_sub = e->dir_sub;
    size_t old_n = e->dir_n;
    e->dir_sub = (uint64_t)s2;
    e->dir_n = n;
    e->gdepth = D + 1;
    kv_hdr_sync(e);                    /* the header names the new directory before the old one is reused */
    kv_alloc_give(&e->al, old_sub, old_n);
    g_txn_dir = -1;
    return KV_OK;
}

typedef struct {
    uint64_t cell;
    uint32_t i, bytes;
} ecell;

static int ecell_cmp(const void *x, const void *y)
{
    const ecell *a = x, *b = y;
    return a->cell < b->cell ? -1 : a->cell > b->cell;
}

static uint64_t entry_hash(const kv_entry *en)
{
    return (kv_e_flags(en) & KV_F_LONG) ? kv_e_fullhash(en) : kv_hash(en->key, kv_e_klen(en));
}

/* Rebuild pages a (cells ..b-1 of the sorted entries) and z (cells b..)
 * from the sorted entry list of p (and the existing entries of z when
 * `zkeep`): used for splits and for moving cells to a neighbour. */
static void pages_write(kv_ipage *p, const ecell *ec, uint32_t n, uint32_t cut, kv_ipage *a, kv_ipage *z,
                        int zkeep)
{
    uint8_t ab[4096] __attribute__((aligned(8))), zb[4096] __attribute__((aligned(8)));
    kv_ipage *A = (kv_ipage *)ab, *Z = (kv_ipage *)zb;
    kv_ip_init(A, a->lo, a->hi, a->flags, a->lost_at);
    kv_ip_init(Z, z->lo, z->hi, z->flags, z->lost_at);
    if (zkeep)
        for (uint32_t i = 0; i < z->n; i++) {
            kv_entry *en = kv_ip_entry(z, i);
            uint32_t size = kv_e_bytes(en);
            memcpy(kv_ip_add(Z, (uint16_t)(z->slot[i] >> 16), size), en, size);
        }
    for (uint32_t k = 0; k < n; k++) {
        kv_entry *en = kv_ip_entry(p, ec[k].i);
        uint32_t size = kv_e_bytes(en);
        memcpy(kv_ip_add(k < cut ? A : Z, (uint16_t)(p->slot[ec[k].i] >> 16), size), en, size);
    }
    memcpy(a, A, 4096);
    memcpy(z, Z, 4096);
}

/* Page s has no room for `need` more bytes: give cells to a neighbour that
 * has room, else split it at the cell nearest its median (doubling the
 * directory when the page covers too few cells). Inside a guard. KV_OK
 * when something changed (the caller looks again), else KV_FULL. */
static int grow_page(kv_engine *e, size_t s, uint32_t need)
{
    kv_ipage *p = PG(e, s);
    unsigned D = e->gdepth;
    if (kv_cell(D, p->hi) - kv_cell(D, p->lo) < 3 && D < KV_MAX_DEPTH) {
        if (dir_double(e) == KV_OK) return KV_OK;
        if (p->lo == p->hi || kv_cell(D, p->lo) == kv_cell(D, p->hi)) return KV_FULL;
    }
    D = e->gdepth;
    uint64_t c0 = kv_cell(D, p->lo), c1 = kv_cell(D, p->hi);
    uint32_t n = p->n;
    ecell ec[(4096 - KV_IP_HDR) / 20 + 1];
    uint32_t total = 0;
    for (uint32_t i = 0; i < n; i++) {
        kv_entry *en = kv_ip_entry(p, i);
        ec[i] = (ecell){kv_cell(D, entry_hash(en)), i, kv_e_bytes(en) + 4};
        total += ec[i].bytes;
    }
    qsort(ec, n, sizeof *ec, ecell_cmp);
    uint32_t room = 4096 - KV_IP_HDR;
    uint32_t *cells = CELLS(e);
    /* a neighbour with the same standing (both known ranges) and room */
    for (int side = 0; side < 2 && !(p->flags & KV_IP_LOSTRANGE); side++) {
        if (side == 0 ? c1 + 1 >= (1ULL << D) : c0 == 0) continue;
        uint64_t nc = side == 0 ? c1 + 1 : c0 - 1;
        TOUCH(e, e->dir_sub * SUB + nc * 4, 4);
        size_t r = cells[nc];
        if (r >= e->al.nsub || r == s || kv_sp_kind(e->al.meta[r]) != KV_SP_INDEX) continue;
        TOUCH(e, r * SUB, SUB);
        kv_ipage *q = PG(e, r);
        if (q->flags & KV_IP_LOSTRANGE) continue;
        uint32_t qused = room - kv_ip_free(q);
        /* move whole cells from the near end while both end up under the
         * average of the two, and at least `need` is freed */
        uint32_t target = (total + qused) / 2, moved = 0, cut = side == 0 ? n : 0;
        if (side == 0) {
            while (cut > 0) {
                uint32_t k = cut, b = 0;
                uint64_t cc = ec[k - 1].cell;
                while (k > 0 && ec[k - 1].cell == cc) b += ec[--k].bytes;
                if (k == 0 || qused + moved + b > target + need || qused + moved + b > room - 64) break;
                moved += b;
                cut = k;
            }
        } else {
            while (cut < n) {
                uint32_t k = cut, b = 0;
                uint64_t cc = ec[k].cell;
                while (k < n && ec[k].cell == cc) b += ec[k++].bytes;
                if (k == n || qused + moved + b > target + need || qused + moved + b > room - 64) break;
                moved += b;
                cut = k;
            }
        }
        if (moved < need + 8 || total - moved + need > room) continue;
        /* new boundary: the first moved cell (right) / first kept cell (left) */
        uint64_t bcell = side == 0 ? ec[cut].cell : ec[cut].cell;
        uint64_t ncell_lo = side == 0 ? bcell : c0, ncell_hi = side == 0 ? c1 : bcell - 1;  /* cells moving */
        TOUCH(e, e->dir_sub * SUB + ncell_lo * 4, (ncell_hi - ncell_lo + 1) * 4);
        if (side == 0) {
            q->lo = kv_cell_lo(D, bcell);
            p->hi = kv_cell_hi(D, bcell - 1);
            pages_write(p, ec, n, cut, p, q, 1);
        } else {
            q->hi = kv_cell_hi(D, bcell - 1);
            p->lo = kv_cell_lo(D, bcell);
            /* q gets entries [0, cut), p keeps [cut, n): write q first */
            uint8_t tb[4096] __attribute__((aligned(8)));
            kv_ipage *T = (kv_ipage *)tb;
            kv_ip_init(T, q->lo, q->hi, q->flags, q->lost_at);
            for (uint32_t i = 0; i < q->n; i++) {
                kv_entry *en = kv_ip_entry(q, i);
                uint32_t size = kv_e_bytes(en);
                memcpy(kv_ip_add(T, (uint16_t)(q->slot[i] >> 16), size), en, size);
            }
            uint8_t pb[4096] __attribute__((aligned(8)));
            kv_ipage *P2 = (kv_ipage *)pb;
            kv_ip_init(P2, p->lo, p->hi, p->flags, p->lost_at);
            for (uint32_t k = 0; k < n; k++) {
                kv_entry *en = kv_ip_entry(p, ec[k].i);
                uint32_t size = kv_e_bytes(en);
                memcpy(kv_ip_add(k < cut ? T : P2, (uint16_t)(p->slot[ec[k].i] >> 16), size), en, size);
            }
            memcpy(q, T, 4096);
            memcpy(p, P2, 4096);
        }
        for (uint64_t c = ncell_lo; c <= ncell_hi; c++) cells[c] = (uint32_t)r;
        e->al.meta[s] = kv_sp_index(p->lo, p->hi);
        e->al.meta[r] = kv_sp_index(q->lo, q->hi);
        e->pgc[s] = pgc_count(p);
        e->pgc[r] = pgc_count(q);
        e->c_moves++;
        return KV_OK;
    }
    /* split at the cell boundary nearest the median */
    uint32_t best = 0, bestd = UINT32_MAX, acc = 0;
    for (uint32_t k = 1; k <= n; k++) {
        acc += ec[k - 1].bytes;
        if (k < n && ec[k].cell == ec[k - 1].cell) continue;
        if (k == n) break;
        uint32_t d = acc > total / 2 ? acc - total / 2 : total / 2 - acc;
        if (d < bestd) bestd = d, best = k;
    }
    uint64_t bcell;
    if (best == 0) {
        /* every entry in one cell: cut the range at that cell's edge */
        uint64_t cc = n ? ec[0].cell : c0;
        if (cc > c0) bcell = cc;
        else if (cc < c1) bcell = cc + 1;
        else return dir_double(e);
        best = cc > c0 ? 0 : n;
    } else {
        bcell = ec[best].cell;
    }
    int64_t q = take_index(e, 1, kv_sp_index(kv_cell_lo(D, bcell), p->hi));
    if (q < 0) return KV_FULL;
    g_txn_page = q;
    TOUCH(e, (size_t)q * SUB, SUB);
    TOUCH(e, e->dir_sub * SUB + bcell * 4, (c1 - bcell + 1) * 4);
    kv_ipage *Q = PG(e, (size_t)q);
    kv_ip_init(Q, kv_cell_lo(D, bcell), p->hi, p->flags, p->lost_at);
    p->hi = kv_cell_hi(D, bcell - 1);
    pages_write(p, ec, n, best, p, Q, 0);
    e->al.meta[s] = kv_sp_index(p->lo, p->hi);
    for (uint64_t c = bcell; c <= c1; c++) cells[c] = (uint32_t)q;
    e->pgc[s] = pgc_count(p);
    e->pgc[q] = pgc_count(Q);
    g_txn_page = -1;
    e->c_splits++;
    return KV_OK;
}

static int split(kv_engine *e, size_t s, uint32_t need) { return grow_page(e, s, need); }

/* Room for an entry of `size` in page s (after dropping slot `drop`, or -1).
 * Compacts when that is enough; else 0 (the caller splits). */
static int make_room(kv_ipage *p, uint32_t size, int drop)
{
    uint32_t have = (uint32_t)p->heap - (KV_IP_HDR + 4u * p->n), dead = p->dead;
    if (drop >= 0) {
        uint32_t b = kv_e_bytes(kv_ip_entry(p, (uint32_t)drop));
        have += 4;
        if ((p->slot[drop] & 0xFFFF) == p->heap) have += b;
        else dead += b;
    }
    if (have >= size + 4) return 1;
    if (have + dead >= size + 4) return 2;     /* compact after the drop */
    return 0;
}

/* ----------------------------------------------------------------- put */

enum { UP_PUT = 0, UP_INSTALL = 1, UP_RANGE = 2, UP_TOMB = 3, UP_ABSENT = 4, UP_LOST = 5 };

typedef struct {
    const uint8_t *key;
    uint32_t klen;
    uint64_t h;
    const uint8_t *val;
    size_t vlen;
    uint64_t version;     /* 0: next */
    uint64_t ttl;         /* put semantics */
    int mode;
    uint64_t out_version;
    int existed;
    uint64_t range_v;     /* UP_RANGE / UP_ABSENT: the source had applied up to this version */
} put_args;

static int body_upsert(kv_engine *e, void *va)
{
    put_args *a = va;
    int longkey = a->klen > KV_INLINE_KEY;
    size_t s;
    kv_ipage *p;
    int i;
    kv_entry *en;
    int room;
    uint64_t exp = 0;
    unsigned nflags;
    uint32_t nsize;
    a->existed = 0;
    for (int guard = 0;; guard++) {
        s = find_page(e, a->h);
        if (s == NOPAGE) return KV_FULL;
        p = PG(e, s);
        i = pg_find(e, p, a->key, a->klen, a->h);
        en = i >= 0 ? kv_ip_entry(p, (uint32_t)i) : NULL;
        int st = en ? kv_e_state(en) : KV_ST_FREE;
        /* decide */
        switch (a->mode) {
        case UP_PUT:
            break;
        case UP_INSTALL:
        case UP_RANGE:
            if (en) {
                if (st == KV_ST_PRESENT || st == KV_ST_TOMB) return KV_SKIP;
                if (a->version < kv_e_version(en)) return KV_STALE;
            } else if (a->mode != UP_RANGE || !(p->flags & KV_IP_LOSTRANGE) || p->lost_at > a->range_v) {
                return KV_SKIP;
            }
            break;
        case UP_TOMB:                 /* delete */
            if (en && st == KV_ST_TOMB) return 0;
            if (!en && !(p->flags & KV_IP_LOSTRANGE)) return 0;
            if (en && !(p->flags & KV_IP_LOSTRANGE)) {
                size_t rl;
                int rc = release_len(e, en, &rl);
                if (rc) return rc;
                /* the delete leaves no entry with its version: the header
                 * holds it before the entry goes (adopt.c) */
                kv_hdr_version_ahead(e, e->version + 1);
                kv_crash_point("delete:ahead");
                entry_drop(e, p, (uint32_t)i, rl);
                kv_crash_point("delete:drop");
                a->existed = 1;
                e->version++;
                return 1;
            }
            break;
        case UP_ABSENT:
            if (en || !(p->flags & KV_IP_LOSTRANGE) || p->lost_at > a->range_v) return KV_SKIP;
            break;
        case UP_LOST:                 /* a peer's LOST key: the name and version, no record */
            if (longkey || (en && st != KV_ST_TOMB && kv_e_version(en) >= a->version)) return KV_SKIP;
            break;
        }
        exp = 0;
        if (a->mode == UP_PUT) {
            if (a->ttl == UINT64_MAX) {
                if (en && st != KV_ST_TOMB) exp = kv_e_ttl(en);
            } else {
                exp = a->ttl;
            }
        } else if (a->mode == UP_INSTALL || a->mode == UP_RANGE) {
            /* a rebuilt key keeps the expiry it had, unless the source says */
            exp = a->ttl ? a->ttl : (en && st != KV_ST_TOMB ? kv_e_ttl(en) : 0);
        }
        int tomb = a->mode == UP_TOMB || a->mode == UP_ABSENT || a->mode == UP_LOST;
        nflags = (longkey ? KV_F_LONG : 0) | (exp && !tomb ? KV_F_TTL : 0);
        nsize = kv_e_size(a->klen, nflags);
        room = make_room(p, nsize, i);
        if (room) break;
        if (guard > 48) return KV_FULL;
        int rc = split(e, s, nsize + 4);
        if (rc != KV_OK) return rc;
    }
    int tomb = a->mode == UP_TOMB || a->mode == UP_ABSENT || a->mode == UP_LOST;
    /* the old record's length, before anything changes */
    size_t oldlen = 0;
    if (en) {
        int rc = release_len(e, en, &oldlen);
        if (rc) return rc;
    }
    uint64_t v = a->version ? a->version : e->version + 1;
    if (a->mode == UP_ABSENT) v = p->lost_at;
    uint64_t off = 0;
    if (!tomb) {
        size_t len = KV_REC_HDR + (longkey ? a->klen : 0) + a->vlen;
        int64_t o = alloc_record(e, len, a->mode != UP_PUT, a->h);
        if (o < 0) return KV_FULL;
        /* the compactor may have moved records: find the entry again */
        if (en) {
            i = pg_find(e, p, a->key, a->klen, a->h);
            en = kv_ip_entry(p, (uint32_t)i);
        }
        e->txn_off = o;
        e->txn_len = len;
        TOUCH(e, (uint64_t)o, len);
        uint8_t h[KV_REC_HDR];
        uint32_t csum = rec_csum(a->key, a->klen, a->val, a->vlen, v), vl = (uint32_t)a->vlen;
        memcpy(h, &csum, 4);
        memcpy(h + 4, &vl, 4);
        uint8_t *d = AP(e, (uint64_t)o);
        memcpy(d, h, KV_REC_HDR);
        if (longkey) memcpy(d + KV_REC_HDR, a->key, a->klen);
        memcpy(d + KV_REC_HDR + (longkey ? a->klen : 0), a->val, a->vlen);
        off = (uint64_t)o;
        kv_crash_point(a->mode == UP_PUT ? "put:record" : "install:record");
    }
    /* commit: nothing below touches memory not checked above */
    if (a->mode == UP_TOMB) kv_hdr_version_ahead(e, e->version + 1);
    kv_entry *ne;
    if (en && kv_e_bytes(en) == nsize) {
        /* same size (an overwrite, mostly): rewrite the entry in place */
        int ost = kv_e_state(en);
        a->existed = ost != KV_ST_TOMB;
        if (ost == KV_ST_PRESENT) kv_alloc_release(&e->al, kv_e_off(en), oldlen);
        pgc_add(e, p, ost != KV_ST_TOMB ? -1 : 0, ost >= KV_ST_LOST && ost <= KV_ST_UNRECOVERABLE ? -1 : 0,
                (kv_e_flags(en) & KV_F_TTL) ? -1 : 0);
        ne = en;
    } else {
        if (en) {
            a->existed = kv_e_state(en) != KV_ST_TOMB;
            entry_drop(e, p, (uint32_t)i, oldlen);
        }
        if (room == 2) kv_ip_compact(p);
        ne = kv_ip_add(p, kv_tag(a->h), nsize);
    }
    int nst = a->mode == UP_LOST ? KV_ST_LOST : tomb ? KV_ST_TOMB : KV_ST_PRESENT;
    ne->loc = kv_e_mkloc(off, a->klen, nst, nflags);
    kv_crash_point(a->mode == UP_PUT ? "put:entry" : a->mode == UP_TOMB ? "delete:entry" : "install:entry");
    ne->ver = v & KV_VERSION_MASK;
    if (longkey) memcpy(ne->key, &a->h, 8);
    else memcpy(ne->key, a->key, a->klen);
    if (nflags & KV_F_TTL) memcpy(kv_e_ttlp(ne), &exp, 8);
    pgc_add(e, p, nst == KV_ST_TOMB ? 0 : 1, nst == KV_ST_LOST ? 1 : 0, (nflags & KV_F_TTL) ? 1 : 0);
    e->txn_len = 0;
    if (a->mode == UP_TOMB) {
        e->version++;
        ne->ver = e->version & KV_VERSION_MASK;
        return 1;
    }
    if (a->mode == UP_ABSENT) return KV_OK;
    if (v > e->version) e->version = v;
    if (a->mode == UP_LOST) return KV_OK;
    a->out_version = v;
    if (a->mode != UP_PUT) e->c_rebuilt++;
    return KV_OK;
}

int kv_eng_put(kv_engine *e, const void *key, uint32_t klen, const void *val, size_t vlen,
               uint64_t version, uint64_t ttl_ms, uint64_t *out_version)
{
    put_args a = {key, klen, kv_hash(key, klen), val, vlen, version, ttl_ms, UP_PUT, 0, 0, 0};
    int rc = run(e, body_upsert, &a);
    if (rc == KV_AGAIN) rc = KV_FULL;
    if (rc == KV_OK) *out_version = a.out_version;
    return rc;
}

int kv_eng_delete(kv_engine *e, const void *key, uint32_t klen)
{
    put_args a = {key, klen, kv_hash(key, klen), NULL, 0, 0, 0, UP_TOMB, 0, 0, 0};
    int rc = run(e, body_upsert, &a);
    if (rc == KV_FULL || rc == KV_AGAIN) return -1;
    return rc;
}

int kv_eng_install(kv_engine *e, const void *key, uint32_t klen, const void *val, size_t vlen,
                   uint64_t version, uint64_t exp_ms, uint64_t from_range)
{
    if (exp_ms && exp_ms <= kv_now_ms()) return KV_SKIP;
    put_args a = {key, klen, kv_hash(key, klen), val, vlen, version, exp_ms,
                  from_range ? UP_RANGE : UP_INSTALL, 0, 0, from_range};
    if (!version) return KV_STALE;
    int rc = run(e, body_upsert, &a);
    return rc == KV_AGAIN ? KV_FULL : rc;
}

int kv_eng_mark_absent(kv_engine *e, const void *key, uint32_t klen, uint64_t version)
{
    put_args a = {key, klen, kv_hash(key, klen), NULL, 0, 0, 0, UP_ABSENT, 0, 0, version};
    int rc = run(e, body_upsert, &a);
    return rc == KV_AGAIN ? KV_FULL : rc;
}

int kv_eng_mark_lost(kv_engine *e, const void *key, uint32_t klen, uint64_t version)
{
    put_args a = {key, klen, kv_hash(key, klen), NULL, 0, version, 0, UP_LOST, 0, 0, 0};
    if (!version) return KV_STALE;
    int rc = run(e, body_upsert, &a);
    return rc == KV_AGAIN ? KV_FULL : rc;
}

/* ------------------------------------------------------ small mutators */

typedef struct {
    const uint8_t *key;
    uint32_t klen;
    uint64_t h, exp;
    int state, had;
    uint64_t version;     /* set_ttl: 0 = next, else that version (replication) */
    uint64_t out_version;
} mut_args;

/* Rebind PRESENT entry en's record to version v: verify the checksum under
 * the old version, write the one under v. 0, KV_LOSTKEY (the record did not
 * verify: the key is LOST now) or KV_AGAIN. Touches the whole record first. */
static int rec_rebind(kv_engine *e, kv_entry *en, const uint8_t *key, uint32_t klen, uint64_t v)
{
    uint32_t csum, vlen;
    size_t reclen;
    int rc = rec_header(e, en, &csum, &vlen, &reclen);
    if (rc) return rc;
    uint64_t off = kv_e_off(en);
    TOUCH(e, off, reclen);
    const uint8_t *val = AP(e, off + reclen - vlen);
    if (rec_csum(key, klen, val, vlen, kv_e_version(en)) != csum) {
        e->c_checksum_fail++;
        lose(e, en, reclen);
        return KV_LOSTKEY;
    }
    uint32_t nc = rec_csum(key, klen, val, vlen, v);
    memcpy(AP(e, off), &nc, 4);
    return 0;
}

/* A change of expiry is a write: the key takes a new version (the same
 * counter as puts and deletes), and its record's checksum is rebound to it,
 * so a peer's copy from before the change is older and never installed over
 * it. Only PRESENT keys: a LOST key's expiry changes once it is back. */
static int body_set_ttl(kv_engine *e, void *va)
{
    mut_args *a = va;
    for (int guard = 0; guard < 48; guard++) {
        size_t s = find_page(e, a->h);
        if (s == NOPAGE) return KV_LOSTKEY;
        kv_ipage *p = PG(e, s);
        int i = pg_find(e, p, a->key, a->klen, a->h);
        if (i < 0) return (p->flags & KV_IP_LOSTRANGE) ? KV_LOSTKEY : KV_ABSENT;
        kv_entry *en = kv_ip_entry(p, (uint32_t)i);
        int st = kv_e_state(en);
        if (st == KV_ST_TOMB) return KV_ABSENT;
        unsigned f = kv_e_flags(en);
        a->had = (f & KV_F_TTL) != 0;
        if (a->had) {
            uint64_t old = kv_e_ttl(en);
            if (old <= kv_now_ms()) {          /* already expired: gone, as a read would find */
                size_t rl;
                int rc = release_len(e, en, &rl);
                if (rc) return rc;
                entry_drop(e, p, (uint32_t)i, rl);
                e->c_expired++;
                a->had = 0;
                return KV_ABSENT;
            }
        }
        /* A LOST key (no record to rebind) takes a change only from a
         * primary's stream: the change's version becomes the version its
         * rebuild must reach, and the expiry is kept for it. A local change
         * waits until the key is back (the Store read-repairs it first). */
        int present = st == KV_ST_PRESENT;
        if (!present && (!a->version || (f & KV_F_LONG))) return KV_LOSTKEY;
        if (!a->had && !a->exp) return KV_OK;     /* nothing changes, no version */
        if (a->version && a->version <= kv_e_version(en)) return KV_SKIP;   /* older than what is here */
        uint64_t v = a->version ? a->version : e->version + 1;
        const uint8_t *key = a->key;
        if (present && (f & KV_F_LONG)) {
            /* the key lives in the record: checked by the checksum below */
            key = AP(e, kv_e_off(en) + KV_REC_HDR);
        }
        if (a->had) {
            int rc = present ? rec_rebind(e, en, key, a->klen, v) : 0;
            if (rc) return rc;
            if (a->exp) memcpy(kv_e_ttlp(en), &a->exp, 8);
            else {
                kv_e_set_flags(en, f & ~KV_F_TTL);
                p->dead = (uint16_t)(p->dead + 8);
                pgc_add(e, p, 0, 0, -1);
            }
            kv_e_set_version(en, v);
        } else {
            uint32_t size = kv_e_bytes(en);
            int room = make_room(p, size + 8, i);
            if (!room) {
                int rc = split(e, s, size + 12);
                if (rc != KV_OK) return rc;
                continue;
            }
            int rc = present ? rec_rebind(e, en, key, a->klen, v) : 0;
            if (rc) return rc;
            uint8_t tmp[16 + KV_INLINE_KEY + 16];
            memcpy(tmp, en, size);
            kv_ip_del(p, (uint32_t)i);
            if (room == 2) kv_ip_compact(p);
            kv_entry *ne = kv_ip_add(p, kv_tag(a->h), size + 8);
            memcpy(ne, tmp, size);
            kv_e_set_flags(ne, f | KV_F_TTL);
            memcpy(kv_e_ttlp(ne), &a->exp, 8);
            kv_e_set_version(ne, v);
            pgc_add(e, p, 0, 0, 1);
        }
        if (v > e->version) e->version = v;
        a->out_version = v;
        return KV_OK;
    }
    return KV_FULL;
}

int kv_eng_set_ttl(kv_engine *e, const void *key, uint32_t klen, uint64_t exp_ms, uint64_t version, int *had,
                   uint64_t *out_version)
{
    mut_args a = {key, klen, kv_hash(key, klen), exp_ms, 0, 0, version, 0};
    int rc = run(e, body_set_ttl, &a);
    *had = a.had;
    if (out_version) *out_version = a.out_version;
    return rc == KV_AGAIN ? KV_FULL : rc;
}

static int body_set_state(kv_engine *e, void *va)
{
    mut_args *a = va;
    size_t s = find_page(e, a->h);
    if (s == NOPAGE) return 0;
    kv_ipage *p = PG(e, s);
    int i = pg_find(e, p, a->key, a->klen, a->h);
    if (i < 0) return 0;
    kv_entry *en = kv_ip_entry(p, (uint32_t)i);
    int st = kv_e_state(en);
    if (st < KV_ST_LOST || st > KV_ST_UNRECOVERABLE) return 0;
    kv_e_set_state(en, a->state);
    return 1;
}

int kv_eng_set_state(kv_engine *e, const void *key, uint32_t klen, int state)
{
    mut_args a = {key, klen, kv_hash(key, klen), 0, state, 0};
    int rc = run(e, body_set_state, &a);
    return rc == 1;
}

typedef struct {
    uint64_t lo, hi, version;
    size_t s;
    size_t cleared;
} range_args;

static int body_range_clear(kv_engine *e, void *va)
{
    range_args *a = va;
    size_t s = find_page(e, a->lo);
    if (s == NOPAGE) return 0;
    kv_ipage *p = PG(e, s);
    uint64_t plo = p->lo, phi = p->hi;
    a->s = phi;
    if (plo < a->lo || phi > a->hi || !(p->flags & KV_IP_LOSTRANGE) || p->lost_at > a->version) return 0;
    for (uint32_t i = 0; i < p->n;) {
        if (kv_e_state(kv_ip_entry(p, i)) == KV_ST_TOMB) kv_ip_del(p, i);
        else i++;
    }
    p->flags &= (uint8_t)~KV_IP_LOSTRANGE;
    p->lost_at = 0;
    a->cleared++;
    return 0;
}

size_t kv_eng_range_done(kv_engine *e, uint64_t lo, uint64_t hi, uint64_t version)
{
    range_args a = {lo, hi, version, 0, 0};
    uint64_t pos = lo;
    for (;;) {
        a.lo = pos;
        a.s = ~0ULL;
        run(e, body_range_clear, &a);
        uint64_t phi = a.s;
        if (phi >= hi || phi == ~0ULL) break;
        pos = phi + 1;
    }
    if (a.cleared) e->c_ranges_rebuilt += a.cleared;
    return a.cleared;
}

/* Flag the index page holding hash a->lo LOST at a->version (kept: a later
 * lost_at already there); a->s = the page's hi. Its entries stay. */
static int body_range_mark(kv_engine *e, void *va)
{
    range_args *a = va;
    size_t s = find_page(e, a->lo);
    if (s == NOPAGE) {                 /* no page for that cell: already lost */
        a->s = kv_cell_hi(e->gdepth, cell_of(e->gdepth, a->lo));
        return 0;
    }
    kv_ipage *p = PG(e, s);
    a->s = p->hi;
    if ((p->flags & KV_IP_LOSTRANGE) && p->lost_at >= a->version) return 0;
    p->flags |= KV_IP_LOSTRANGE;
    p->lost_at = a->version;
    lostrange_push(e, p->lo, p->hi, a->version);
    a->cleared++;
    return 0;
}

size_t kv_eng_mark_range_lost(kv_engine *e, uint64_t lo, uint64_t hi, uint64_t version)
{
    range_args a = {lo, hi, version, 0, 0};
    uint64_t pos = lo;
    int tries = 0;
    if (lo > hi || !version) return 0;
    kv_eng_check(e);
    for (;;) {
        a.lo = pos;
        a.s = ~0ULL;
        if (run(e, body_range_mark, &a) == KV_AGAIN && ++tries < 8) continue;
        uint64_t phi = a.s;
        if (phi >= hi || phi == ~0ULL) break;
        pos = phi + 1;
    }
    return a.cleared;
}

/* ---------------------------------------------------------------- scan */

int kv_eng_scan(kv_engine *e, uint64_t lo, uint64_t hi, kv_page_visit fn, void *ctx)
{
    uint8_t buf[4096] __attribute__((aligned(8)));
    uint64_t pos = lo;
    int need = 0, rc = 0;
    uint64_t ev = 0;
    kv_eng_check(e);
    for (int guard = 0;; guard++) {
        uint64_t c = cell_of(e->gdepth, pos);
        uint32_t s;
        size_t fo;
        if (kv_arena_read(e->arena, e->dir_sub * SUB + c * 4, &s, 4, &fo) != 0) {
            settle(e);
            if (guard > 64) return -1;
            continue;
        }
        uint64_t plo, phi;
        if (meta_lost_since(e, &ev)) {
            settle(e);                  /* the allocator's page is readable once recovered */
            if (meta_lost(e) || guard > 64) return -1;
            continue;
        }
        kv_meta m = s < e->al.nsub ? e->al.meta[s] : 0;
        if (kv_sp_kind(m) != KV_SP_INDEX) {
            /* no page at all (could not be replaced): a lost range of one cell */
            plo = kv_cell_lo(e->gdepth, c);
            phi = kv_cell_hi(e->gdepth, c);
            rc = fn(ctx, NULL, plo, phi);
        } else {
            plo = kv_sp_ilo(m);
            phi = kv_sp_ihi(m);
            if (kv_arena_read(e->arena, (size_t)s * SUB, buf, SUB, &fo) != 0) {
                need = 1;
                rc = fn(ctx, NULL, plo, phi);
            } else {
                rc = fn(ctx, (const kv_ipage *)buf, plo, phi);
            }
        }
        if (rc) break;
        if (phi >= hi || phi == ~0ULL) break;
        pos = phi + 1;
    }
    if (need) kv_eng_recover(e, NULL);
    return rc;
}

typedef struct {
    uint64_t off;
    uint32_t klen;
    kv_buf_fn buf;
    void *ctx;
} lk_args;

static int body_longkey(kv_engine *e, void *va)
{
    lk_args *a = va;
    TOUCH(e, a->off + KV_REC_HDR, a->klen);
    void *d = a->buf(a->ctx, a->klen);
    if (!d) return KV_NOMEM;
    memcpy(d, AP(e, a->off + KV_REC_HDR), a->klen);
    return KV_OK;
}

int kv_eng_read_longkey(kv_engine *e, uint64_t rec_off, uint32_t klen, kv_buf_fn buf, void *ctx)
{
    if (rec_off + KV_REC_HDR + klen > e->al.nsub * (uint64_t)SUB) return KV_LOSTKEY;
    if (kv_arena_hazard(e->arena, rec_off + KV_REC_HDR, klen)) return KV_LOSTKEY;
    lk_args a = {rec_off, klen, buf, ctx};
    return run(e, body_longkey, &a);
}

/* ------------------------------------------------------------ recovery */

/* Fill directory cells [c0, c0+n) with page s (own guard). */
static __attribute__((noinline)) int dir_fill(kv_engine *e, uint64_t c0, uint64_t n, uint32_t s)
{
    sigjmp_buf jb;
    kv_guard_thread_init();
    if (sigsetjmp(jb, 0)) {
        kv_guard_landed();
        if (kv_tls.fault_code) kv_arena_after_sync_fault(e->arena, kv_tls.fault_addr);
        return -1;
    }
    kv_guard_arm(&jb);
    TOUCH(e, e->dir_sub * SUB + c0 * 4, n * 4);
    uint32_t *cells = CELLS(e);
    for (uint64_t c = 0; c < n; c++) cells[c0 + c] = s;
    kv_guard_disarm();
    return 0;
}

/* Make an empty index page for [lo, hi]; flags/lost_at as given. */
static int64_t new_page(kv_engine *e, uint64_t lo, uint64_t hi, unsigned flags, uint64_t lost_at)
{
    for (int tries = 0; tries < 8; tries++) {
        int64_t q = kv_alloc_take_meta(&e->al, 1, kv_sp_index(lo, hi), 1);
        while (q < 0 && kv_lazy_room(e)) q = kv_alloc_take_meta(&e->al, 1, kv_sp_index(lo, hi), 1);
        if (q < 0) return -1;
        uint8_t buf[KV_IP_HDR] __attribute__((aligned(8)));
        kv_ip_init((kv_ipage *)buf, lo, hi, flags, lost_at);
        size_t fo;
        if (kv_arena_write(e->arena, (size_t)q * SUB, buf, sizeof buf, &fo) == 0) return q;
        /* that subpage is lost too: it will be quarantined */
        e->al.meta[q] = 0;
        e->al.nindex--;
        e->al.nfree++;
        kv_alloc_quarantine(&e->al, (size_t)q);
    }
    return -1;
}

/* Rebuild the directory from the allocator's metadata (every index page's
 * hash range is there). */
static void dir_rebuild(kv_engine *e)
{
    unsigned D = e->gdepth;
    uint64_t ncells = 1ULL << D;
    size_t n = e->dir_n;
    uint64_t old = e->dir_sub;
    size_t oldn = e->dir_n;
    int64_t s2 = -1;
    for (int tries = 0; tries < 8 && s2 < 0; tries++) {
        s2 = kv_alloc_take_meta(&e->al, n, kv_sp_mk(KV_SP_DIR), 1);
        while (s2 < 0 && kv_lazy_room(e)) s2 = kv_alloc_take_meta(&e->al, n, kv_sp_mk(KV_SP_DIR), 1);
        if (s2 < 0) break;
        uint32_t *tmp = malloc(n * SUB);
        if (!tmp) {
            kv_alloc_give(&e->al, (size_t)s2, n);
            s2 = -1;
            break;
        }
        for (uint64_t c = 0; c < ncells; c++) tmp[c] = UINT32_MAX;
        for (size_t s = 0; s < e->al.nsub; s++) {
            kv_meta m = e->al.meta[s];
            if (kv_sp_kind(m) != KV_SP_INDEX) continue;
            uint64_t c0 = kv_cell(D, kv_sp_ilo(m)), c1 = kv_cell(D, kv_sp_ihi(m));
            for (uint64_t c = c0; c <= c1 && c < ncells; c++) tmp[c] = (uint32_t)s;
        }
        size_t fo;
        int ok = kv_arena_write(e->arena, (size_t)s2 * SUB, tmp, n * SUB, &fo) == 0;
        free(tmp);
        if (!ok) {
            kv_alloc_give(&e->al, (size_t)s2, n);
            for (size_t i = (size_t)s2; i < (size_t)s2 + n; i++)
                if (sub_lost(e, i)) kv_alloc_quarantine(&e->al, i);   /* never picked again */
            s2 = -1;
        }
    }
    if (s2 < 0) return;                   /* no room: keep the old one (reads fall back) */
    e->dir_sub = (uint64_t)s2;
    kv_hdr_sync(e);
    for (size_t i = old; i < old + oldn; i++)
        if (!sub_lost(e, i)) kv_alloc_give(&e->al, i, 1);
    e->c_dir_rebuilds++;
    /* cells no page covers (should not happen): give them empty lost pages */
    for (uint64_t c = 0; c < ncells; c++) {
        uint32_t s;
        size_t fo;
        if (kv_arena_read(e->arena, e->dir_sub * SUB + c * 4, &s, 4, &fo) != 0) break;
        if (s != UINT32_MAX) continue;
        int64_t q = new_page(e, kv_cell_lo(D, c), kv_cell_hi(D, c), KV_IP_LOSTRANGE, e->version);
        if (q >= 0) dir_fill(e, c, 1, (uint32_t)q);
        lostrange_push(e, kv_cell_lo(D, c), kv_cell_hi(D, c), e->version);
    }
}

/* Index page s was lost: its hash range becomes LOST. */
static void index_lost(kv_engine *e, size_t s, kv_recover_stats *st)
{
    kv_meta m = e->al.meta[s];
    uint64_t lo = kv_sp_ilo(m), hi = kv_sp_ihi(m);
    unsigned D = e->gdepth;
    uint64_t V = e->version;
    uint32_t cnt = e->pgc[s];
    e->c_lost_keys += cnt & 1023;          /* the keys of the range are lost (not LOST entries) */
    e->c_range_keys += cnt & 1023;
    e->nkeys -= cnt & 1023;
    e->n_lost -= (cnt >> 10) & 1023;
    e->n_ttl -= (cnt >> 20) & 1023;
    e->pgc[s] = 0;
    kv_lazy_range_lost(e, lo, hi);
    int64_t q = new_page(e, lo, hi, KV_IP_LOSTRANGE, V);
    kv_alloc_quarantine(&e->al, s);
    if (e->sweep_n == e->sweep_cap) {
        size_t nc = e->sweep_cap ? e->sweep_cap * 2 : 8;
        uint64_t(*r)[2] = realloc(e->sweep, nc * sizeof *r);
        if (r) {
            e->sweep = r;
            e->sweep_cap = nc;
        }
    }
    if (e->sweep_n < e->sweep_cap) {
        e->sweep[e->sweep_n][0] = lo;
        e->sweep[e->sweep_n][1] = hi;
        e->sweep_n++;
    }
    if (q >= 0) dir_fill(e, kv_cell(D, lo), kv_cell(D, hi) - kv_cell(D, lo) + 1, (uint32_t)q);
    lostrange_push(e, lo, hi, V);
    e->c_index_pages_lost++;
    st->index_pages_lost++;
    e->need_sweep = 1;
}

typedef struct {
    kv_recover_stats *st;
} walk_ctx;

static void walk_fn(kv_engine *e, size_t ps, kv_ipage *p, void *vctx)
{
    walk_ctx *w = vctx;
    for (uint32_t i = 0; i < p->n; i++) {
        kv_entry *en = kv_ip_entry(p, i);
        if (kv_e_state(en) != KV_ST_PRESENT) continue;
        size_t s = kv_e_off(en) >> KV_SUB_SHIFT;
        if (s >= e->al.nsub) continue;
        kv_meta m = e->al.meta[s];
        if (kv_sp_kind(m) == KV_SP_SMALL) {
            if (sub_lost(e, s)) {
                lose(e, en, 0);
                w->st->keys_lost++;
            }
        } else if (kv_sp_kind(m) == KV_SP_HEAD) {
            size_t run = (size_t)kv_sp_run(m);
            for (size_t j = s; j < s + run; j++)
                if (sub_lost(e, j)) {
                    lose(e, en, 1);       /* frees the healthy subpages */
                    w->st->keys_lost++;
                    break;
                }
        }
    }
}

/* Visit (once each, per `seen` list) the index pages covering [lo, hi],
 * found through the directory. -1 if the directory could not be read or a
 * page visit was cut short by a fault. */
typedef struct {
    size_t *v;
    size_t n, cap;
} seen_set;

static int visit_range(kv_engine *e, uint64_t lo, uint64_t hi, kv_page_fn fn, void *ctx, seen_set *seen)
{
    uint64_t pos = lo, ev = 0;
    int rc = 0;
    for (;;) {
        uint64_t c = cell_of(e->gdepth, pos);
        uint32_t ps;
        size_t fo;
        if (kv_arena_read(e->arena, e->dir_sub * SUB + c * 4, &ps, 4, &fo) != 0 || ps >= e->al.nsub) return -1;
        if (meta_lost_since(e, &ev)) return -1;
        kv_meta m = e->al.meta[ps];
        uint64_t phi;
        if (kv_sp_kind(m) == KV_SP_INDEX) {
            phi = kv_sp_ihi(m);
            size_t j = 0;
            while (j < seen->n && seen->v[j] != ps) j++;
            if (j == seen->n && !sub_lost(e, ps)) {
                if (seen->n == seen->cap) {
                    size_t nc = seen->cap ? seen->cap * 2 : 64;
                    size_t *q = realloc(seen->v, nc * sizeof *q);
                    if (!q) return -1;
                    seen->v = q;
                    seen->cap = nc;
                }
                seen->v[seen->n++] = ps;
                if (visit_page(e, ps, fn, ctx) != 0) rc = -1;
            }
        } else {
            phi = kv_cell_hi(e->gdepth, c);
        }
        if (phi >= hi || phi == ~0ULL) break;
        pos = phi + 1;
    }
    return rc;
}

/* Find the records on lost subpages: each record subpage knows the hash
 * range of its records (its group), so only the index pages covering those
 * ranges are read; the whole index only when a group is the whole range. */
static void walk_lost(kv_engine *e, uint64_t (*ranges)[2], size_t n, kv_recover_stats *st)
{
    walk_ctx w = {st};
    seen_set seen = {0};
    int whole = 0;
    uint64_t last_lo = 1;
    for (size_t i = 0; i < n && !whole; i++)
        for (uint64_t s = ranges[i][0]; s < ranges[i][0] + ranges[i][1] && s < e->al.nsub; s++) {
            int k = kv_sp_kind(e->al.meta[s]);
            if (!sub_lost(e, s) || (k != KV_SP_SMALL && k != KV_SP_HEAD && k != KV_SP_CONT)) continue;
            uint64_t lo, hi;
            if (kv_alloc_range(&e->al, (size_t)s, &lo, &hi) != 0 || (lo == 0 && hi == ~0ULL)) {
                whole = 1;
                break;
            }
            if (lo == last_lo) continue;
            last_lo = lo;
            if (visit_range(e, lo, hi, walk_fn, &w, &seen) != 0) whole = 1;
        }
    if (whole) each_page(e, walk_fn, &w);
    free(seen.v);
}

/* Orphan sweep: after an index page was lost, the records its entries
 * pointed to belong to nobody. They are in the record subpages of the lost
 * range's group(s); count the references to those subpages from the index
 * pages covering the same group(s), free subpages nobody references and
 * recount the live bytes of the rest. */
typedef struct {
    uint16_t *refs;
    uint32_t *live;
    uint8_t *cand;           /* 1 candidate, 2 candidate with orphans among live records */
    int pass;
} sweep_ctx;

static void sweep_fn(kv_engine *e, size_t ps, kv_ipage *p, void *vctx)
{
    sweep_ctx *w = vctx;
    for (uint32_t i = 0; i < p->n; i++) {
        kv_entry *en = kv_ip_entry(p, i);
        if (kv_e_state(en) != KV_ST_PRESENT) continue;
        size_t s = kv_e_off(en) >> KV_SUB_SHIFT;
        if (s >= e->al.nsub || !w->cand[s]) continue;
        if (w->pass == 1) {
            if (w->refs[s] < UINT16_MAX) w->refs[s]++;
        } else if (w->cand[s] == 2) {
            uint32_t c, v;
            size_t len;
            if (rec_header(e, en, &c, &v, &len) != 0) continue;
            w->live[s] += (uint32_t)len;
        }
    }
}

static void orphan_sweep(kv_engine *e, kv_recover_stats *st)
{
    kv_alloc *al = &e->al;
    size_t n = al->nsub;
    unsigned g = al->gbits;
    sweep_ctx w = {calloc(n ? n : 1, 2), calloc(n ? n : 1, 4), calloc(n ? n : 1, 1), 1};
    uint64_t(*gr)[2] = malloc((e->sweep_n ? e->sweep_n : 1) * sizeof *gr);
    seen_set seen = {0};
    uint32_t *cl = NULL;
    int whole = g == 0 || e->sweep_n == 0;
    if (!w.refs || !w.live || !w.cand || !gr) goto out;
    /* the groups the lost ranges fall in */
    for (size_t i = 0; i < e->sweep_n; i++) {
        uint64_t lo = e->sweep[i][0], hi = e->sweep[i][1];
        uint64_t gmask = ~0ULL >> g;              /* bits below the group prefix */
        lo &= ~gmask;                             /* the groups the range overlaps */
        hi |= gmask;
        gr[i][0] = lo;
        gr[i][1] = hi;
    }
    /* candidates: the record subpages of those groups (the allocator lists them) */
    size_t ncl = 0, capcl = 0;
    for (size_t i = 0; i < (whole ? 1 : e->sweep_n); i++) {
        uint64_t g0 = whole || !g ? 0 : gr[i][0] >> (64 - g), g1 = whole || !g ? (1ULL << g) - 1 : gr[i][1] >> (64 - g);
        for (uint64_t gp = g0; gp <= g1; gp++)
            for (uint32_t s = al->ghead[gp]; s != KV_NONE; s = al->gnext[s]) {
                if (w.cand[s]) continue;
                if (ncl == capcl) {
                    size_t nc = capcl ? capcl * 2 : 256;
                    uint32_t *q = realloc(cl, nc * sizeof *q);
                    if (!q) goto out;
                    cl = q;
                    capcl = nc;
                }
                cl[ncl++] = s;
                w.cand[s] = 1;
            }
    }
    if (whole) {
        if (each_page(e, sweep_fn, &w)) goto out;      /* a page faulted: try again later */
    } else {
        for (size_t i = 0; i < e->sweep_n; i++)
            if (visit_range(e, gr[i][0], gr[i][1], sweep_fn, &w, &seen) != 0) goto out;
    }
    int any = 0;
    for (size_t j = 0; j < ncl; j++) {
        size_t s = cl[j];
        kv_meta m = al->meta[s];
        if (kv_sp_kind(m) == KV_SP_SMALL && kv_sp_nrec(m) > w.refs[s]) {
            if (w.refs[s] == 0) {
                st->orphans_reclaimed += kv_sp_nrec(m);
                e->c_orphans += kv_sp_nrec(m);
                al->live_bytes -= kv_sp_live(m);
                al->dead_bytes += kv_sp_live(m);
                al->meta[s] = kv_sp_small_set(m, kv_sp_fill(m), 1, 1);
                al->live_bytes += 1;
                al->dead_bytes -= 1;
                kv_alloc_release(al, (uint64_t)s * SUB, 1);
            } else {
                w.cand[s] = 2;
                any = 1;
            }
        } else if (kv_sp_kind(m) == KV_SP_HEAD && w.refs[s] == 0) {
            st->orphans_reclaimed++;
            e->c_orphans++;
            kv_alloc_release(al, (uint64_t)s * SUB, 1);
        }
    }
    if (any) {
        w.pass = 2;
        seen.n = 0;
        if (whole) {
            if (each_page(e, sweep_fn, &w)) goto out;
        } else {
            for (size_t i = 0; i < e->sweep_n; i++)
                if (visit_range(e, gr[i][0], gr[i][1], sweep_fn, &w, &seen) != 0) goto out;
        }
        for (size_t j = 0; j < ncl; j++) {
            size_t s = cl[j];
            if (w.cand[s] != 2) continue;
            kv_meta m = al->meta[s];
            if (kv_sp_kind(m) != KV_SP_SMALL) continue;
            uint32_t live = w.live[s] > kv_sp_fill(m) ? kv_sp_fill(m) : w.live[s];
            st->orphans_reclaimed += kv_sp_nrec(m) - w.refs[s];
            e->c_orphans += kv_sp_nrec(m) - w.refs[s];
            al->live_bytes -= kv_sp_live(m) - live;
            al->dead_bytes += kv_sp_live(m) - live;
            al->meta[s] = kv_sp_small_set(m, kv_sp_fill(m), live, w.refs[s]);
        }
    }
    e->need_sweep = 0;
    e->sweep_n = 0;
out:
    free(w.refs);
    free(w.live);
    free(w.cand);
    free(gr);
    free(seen.v);
    free(cl);
}

/* ------------------------------------- the allocator's metadata region */

static void free_queues(kv_engine *e);

/* Write the allocator's arrays and the page counters into a region of
 * whole subpages (kind HDR) and use them there: the current region when it
 * has the right size and is healthy, else a fresh run. 0, or -1 (no room or
 * memory: they stay in process memory, and stats say so). */
int kv_eng__meta_place(kv_engine *e)
{
    kv_alloc_layout L;
    kv_alloc_layout_of(e->al.nsub, e->al.gbits, &L);
    size_t n = (L.total + SUB - 1) / SUB;
    uint8_t *img = calloc(n, SUB);
    if (!img) return -1;
    for (int tries = 0; tries < 8; tries++) {
        if (e->meta_n && (e->meta_n != n || kv_arena_hazard(e->arena, e->meta_sub * SUB, e->meta_n * SUB))) {
            /* the old region: unusable (lost) or the wrong size */
            kv_alloc_give(&e->al, e->meta_sub, e->meta_n);
            for (size_t i = e->meta_sub; i < e->meta_sub + e->meta_n; i++)
                if (sub_lost(e, i)) kv_alloc_quarantine(&e->al, i);
            e->meta_n = 0;
        }
        if (!e->meta_n) {
            int64_t s = kv_alloc_take_fixed(&e->al, n);
            if (s < 0) break;
            e->meta_sub = (uint64_t)s;
            e->meta_n = n;
        }
        kv_alloc_export(&e->al, img, &L);
        memcpy(img + L.aux, e->pgc, e->al.nsub * sizeof *e->pgc);
        size_t fo;
        if (kv_arena_write(e->arena, e->meta_sub * SUB, img, n * SUB, &fo) != 0) continue;   /* lost there: next run */
        uint8_t *mem = AP(e, e->meta_sub * SUB);
        kv_alloc_attach(&e->al, mem, &L);
        if (!e->pgc_ext) free(e->pgc);
        e->pgc = (uint32_t *)(mem + L.aux);
        e->pgc_ext = 1;
        free(img);
        kv_hdr_sync_meta(e);
        return 0;
    }
    free(img);
    if (e->meta_n) {
        kv_alloc_give(&e->al, e->meta_sub, e->meta_n);
        e->meta_n = 0;
    }
    kv_hdr_sync_meta(e);
    return -1;
}

void kv_eng__meta_watch(kv_engine *e)
{
    kv_arena *a = e->arena;
    e->inject_seen = __atomic_load_n(&a->inject_seq, __ATOMIC_ACQUIRE);
    for (size_t s = e->meta_sub; s < e->meta_sub + e->meta_n; s++) {
        if (!kv_bit_get(a->armed, s) || kv_bit_get(a->lost, s)) continue;
        /* what the hardware does on the allocator's next load there */
        size_t off = s << KV_SUB_SHIFT, len = SUB;
        if (a->policy == KV_POLICY_MAINLINE && kv_arena_page_huge(a, off >> a->page_shift)) {
            len = a->page_size;
            off &= ~(len - 1);
        }
        kv_arena_mark_lost(a, off, len);
        kv_arena_after_sync_fault(a, (uintptr_t)a->base + (s << KV_SUB_SHIFT));
        e->c_faults_on_read++;
    }
}

/* Neither the metadata nor the directory could be read: no index page can
 * be found, so every key's place is unknown. Start an empty index whose
 * whole hash range is LOST (rebuilt from the source by range, like any lost
 * index page); records become orphans of it and are free again. */
static void meta_all_lost(kv_engine *e)
{
    kv_alloc_free(&e->al);
    if (!e->pgc_ext) free(e->pgc);
    e->pgc = NULL;
    e->pgc_ext = 0;
    e->meta_n = 0;
    size_t nsub = e->al.nsub;
    unsigned gbits = e->al.gbits;
    if (kv_alloc_init(&e->al, nsub) != 0 || kv_alloc_set_groups(&e->al, gbits) != 0 ||
        !(e->pgc = calloc(nsub, sizeof *e->pgc)))
        abort();        /* out of process memory while the store's state is gone: nothing sane left */
    kv_alloc_claim(&e->al, 0, kv_sp_mk(KV_SP_HDR));
    for (size_t s = 0; s < nsub; s++)
        if (sub_lost(e, s)) kv_alloc_quarantine(&e->al, s);
    free_queues(e);
    e->nkeys = e->n_lost = e->n_ttl = 0;
    e->need_sweep = 0;
    e->sweep_n = 0;
    e->txn_len = 0;
    int64_t d = kv_alloc_take_meta(&e->al, 1, kv_sp_mk(KV_SP_DIR), 1);
    int64_t q = d >= 0 ? new_page(e, 0, ~0ULL, KV_IP_LOSTRANGE, e->version) : -1;
    if (q >= 0) {
        e->dir_sub = (uint64_t)d;
        e->dir_n = 1;
        e->gdepth = 0;
        uint32_t c = (uint32_t)q;
        size_t fo;
        kv_arena_write(e->arena, e->dir_sub * SUB, &c, 4, &fo);
    }
    lostrange_push(e, 0, ~0ULL, e->version);
    e->c_meta_all_lost++;
    kv_eng__meta_place(e);
    kv_hdr_sync(e);
}

/* A subpage of the allocator's metadata region was lost: rebuild all of it
 * from the arena with adoption's walk (directory -> index pages -> record
 * headers), into a fresh region. Nothing is lost for it, except keys whose
 * record header is itself on a lost subpage (LOST, as any record loss). */
static void meta_rebuild(kv_engine *e, kv_recover_stats *st)
{
    kv_hdr h;
    kv_hdr_image(e, &h);
    h.meta_sub = h.meta_n = 0;          /* the old region is not claimed: its healthy part is free again */
    kv_engine *t = calloc(1, sizeof *t);
    kv_adopt_report r;
    char err[200];
    if (!t || kv_eng__adopt_hdr(t, e->arena, &h, 1, &r, err, sizeof err) != 0) {
        free(t);
        meta_all_lost(e);
        return;
    }
    uint64_t lost_before = e->n_lost;
    /* every lost subpage (earlier ones included) stays out of use */
    for (size_t s = 0; s < t->al.nsub; s++)
        if (sub_lost(e, s) && kv_sp_kind(t->al.meta[s]) == KV_SP_FREE) {
            kv_alloc_quarantine(&t->al, s);
            if (st) st->subpages_quarantined++;
        }
    kv_alloc_free(&e->al);
    if (!e->pgc_ext) free(e->pgc);
    e->al = t->al;
    e->pgc = t->pgc;
    e->pgc_ext = 0;
    e->meta_n = 0;
    e->nkeys = t->nkeys;
    e->n_lost = t->n_lost;
    e->n_ttl = t->n_ttl;
    if (t->version > e->version) e->version = t->version;
    /* the walk queued every LOST key and range again: take its queues */
    free_queues(e);
    free(e->lostq);
    free(e->lranges);
    e->lostq = t->lostq, e->lostq_n = t->lostq_n, e->lostq_cap = t->lostq_cap;
    e->lranges = t->lranges, e->lr_n = t->lr_n, e->lr_cap = t->lr_cap;
    free(t->sweep);
    free(t);
    e->txn_len = 0;
    /* the walk validated every subpage: nothing is deferred any more */
    kv_lazy_end(e);
    if (e->n_lost > lost_before) {
        e->c_lost_keys += e->n_lost - lost_before;
        if (st) st->keys_lost += e->n_lost - lost_before;
    }
    e->c_meta_rebuilds++;
    kv_eng__meta_place(e);
}

void kv_eng_recover(kv_engine *e, kv_recover_stats *st)
{
    kv_recover_stats local;
    if (!st) st = &local;
    memset(st, 0, sizeof *st);
    kv_arena *a = e->arena;
    /* Another thread is salvaging (and will process what it drained); new
     * losses wait for it. */
    if (__atomic_load_n(&e->in_salvage, __ATOMIC_ACQUIRE)) return;
    /* Another thread owns recovery: it processes these (see settle()). */
    if (not_owner(e)) return;
    int salvaging = 0;
    for (int round = 0; round < 64; round++) {
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
            break;
        }
        e->c_recoveries++;
        st->ranges += n;
        for (size_t i = 0; i < n; i++) st->subpages += ranges[i][1];

        if (a->hugetlb && a->policy == KV_POLICY_MAINLINE && e->salvage) {
            size_t per = a->page_size >> KV_SUB_SHIFT;
            size_t last = (size_t)-1;
            for (size_t i = 0; i < n; i++) {
                for (size_t p = ranges[i][0] / per; p <= (ranges[i][0] + ranges[i][1] - 1) / per; p++) {
                    if (p == last || !kv_arena_page_all_lost(a, p)) continue;
                    last = p;
                    /* The page is quarantined (every subpage marked lost), so no
                     * thread touches it: copy it with the engine unlocked, so
                     * readers of the other pages go on. */
                    __atomic_store_n(&e->in_salvage, 1, __ATOMIC_RELEASE);
                    salvaging = 1;           /* until this recovery is complete */
                    void *tok = e->unlock ? e->unlock() : NULL;
                    long r = kv_arena_salvage(a, p, st->salvage_error, sizeof st->salvage_error);
                    if (e->relock) e->relock(tok);
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

        /* The allocator's own metadata was hit: rebuild it from the index
         * and the records before anything reads it. */
        if (meta_lost(e)) meta_rebuild(e, st);
        /* After adoption: a lost subpage not validated yet is settled
         * first (the entries naming records there become LOST; an
         * unreferenced one is free or part of a large record below it). */
        if (e->lazy)
            for (size_t i = 0; i < n; i++)
                for (uint64_t s = ranges[i][0]; s < ranges[i][0] + ranges[i][1] && s < e->al.nsub; s++)
                    if (sub_lost(e, s) && kv_lazy_unval(e, (size_t)s)) kv_lazy_settle_lost(e, (size_t)s);

        /* Free subpages among the lost ones leave the free pool first: the
         * directory rebuild and the fresh pages for lost index ranges below
         * allocate, and must land on healthy memory (after a whole-page
         * loss most of the lost page is free subpages). */
        for (size_t i = 0; i < n; i++)
            for (uint64_t s = ranges[i][0]; s < ranges[i][0] + ranges[i][1] && s < e->al.nsub; s++)
                if (sub_lost(e, s) && kv_sp_kind(e->al.meta[s]) == KV_SP_FREE) {
                    kv_alloc_quarantine(&e->al, (size_t)s);
                    st->subpages_quarantined++;
                }
        int need_walk = 0, dir_hit = 0;
        for (size_t i = 0; i < n; i++)
            for (uint64_t s = ranges[i][0]; s < ranges[i][0] + ranges[i][1] && s < e->al.nsub; s++) {
                if (!sub_lost(e, s)) continue;
                int k = kv_sp_kind(e->al.meta[s]);
                if (k == KV_SP_DIR) dir_hit = 1;
                else if (k == KV_SP_SMALL || k == KV_SP_HEAD || k == KV_SP_CONT) need_walk = 1;
            }
        if (dir_hit) dir_rebuild(e);
        for (size_t i = 0; i < n; i++)
            for (uint64_t s = ranges[i][0]; s < ranges[i][0] + ranges[i][1] && s < e->al.nsub; s++)
                if (sub_lost(e, s) && kv_sp_kind(e->al.meta[s]) == KV_SP_INDEX) index_lost(e, (size_t)s, st);
        if (need_walk) walk_lost(e, ranges, n, st);
        for (size_t i = 0; i < n; i++)
            for (uint64_t s = ranges[i][0]; s < ranges[i][0] + ranges[i][1] && s < e->al.nsub; s++)
                if (sub_lost(e, s) && kv_sp_kind(e->al.meta[s]) != KV_SP_LOST) {
                    if (kv_sp_kind(e->al.meta[s]) == KV_SP_DIR && s >= e->dir_sub && s < e->dir_sub + e->dir_n)
                        continue;        /* the live directory: rebuilt first, kept if that failed */
                    kv_alloc_quarantine(&e->al, (size_t)s);
                    st->subpages_quarantined++;
                }
        free(ranges);
    }
    if (e->need_sweep) orphan_sweep(e, st);
    /* threads that met the lost page wait until its records are invalidated */
    if (salvaging) __atomic_store_n(&e->in_salvage, 0, __ATOMIC_RELEASE);
}

/* Would reading key now meet memory known to be lost (or armed), so that
 * the read waits for recovery? Reads only what is not known lost, inside a
 * guard of its own (a fault there counts as yes). Does not process losses
 * and never waits: a thread that does not own recovery asks before a read
 * it would rather put off than wait for (a server's event loop during a
 * salvage copy). */
typedef struct {
    const void *key;
    uint32_t klen;
} touch_args;

static int touches_body(kv_engine *e, void *ta)
{
    const void *key = ((touch_args *)ta)->key;
    uint32_t klen = ((touch_args *)ta)->klen;
    kv_arena *a = e->arena;
    uint64_t h = kv_hash(key, klen);
    uint64_t c = cell_of(e->gdepth, h);
    if (kv_arena_hazard(a, e->dir_sub * SUB + c * 4, 4)) return 1;
    size_t s = CELLS(e)[c];
    if (s >= e->al.nsub) return 0;               /* no page: LOST at once, no wait */
    if (kv_arena_hazard(a, s * SUB, SUB)) return 1;
    kv_ipage *p = PG(e, s);
    int i = pg_find(e, p, key, klen, h);
    if (i < 0) return 0;
    kv_entry *en = kv_ip_entry(p, (uint32_t)i);
    if (kv_e_state(en) != KV_ST_PRESENT) return 0;
    uint64_t off = kv_e_off(en);
    if (off + KV_REC_HDR > e->al.nsub * (uint64_t)SUB) return 0;
    if (kv_arena_hazard(a, off, KV_REC_HDR)) return 1;
    uint32_t csum, vlen;
    size_t reclen;
    if (rec_header(e, en, &csum, &vlen, &reclen)) return 1;
    return kv_arena_hazard(a, off, reclen) != 0;
}

int kv_eng_touches_lost(kv_engine *e, const void *key, uint32_t klen)
{
    touch_args t = {key, klen};
    return guarded_once(e, touches_body, &t, 1);
}

/* ------------------------------------------------------------ lifecycle */

static int setup_index(kv_engine *e)
{
    int64_t d = kv_alloc_take_meta(&e->al, 1, kv_sp_mk(KV_SP_DIR), 1);
    if (d < 0) return -1;
    e->dir_sub = (uint64_t)d;
    e->dir_n = 1;
    e->gdepth = 0;
    int64_t q = new_page(e, 0, ~0ULL, 0, 0);
    if (q < 0) return -1;
    uint32_t c = (uint32_t)q;
    size_t fo;
    if (kv_arena_write(e->arena, e->dir_sub * SUB, &c, 4, &fo) != 0) return -1;
    return 0;
}

int kv_eng_init(kv_engine *e, kv_arena *a, size_t capacity)
{
    memset(e, 0, sizeof *e);
    e->arena = a;
    size_t cap = capacity < a->size ? capacity : a->size;
    if (cap / SUB < 8) cap = 8 * SUB < a->size ? 8 * SUB : a->size;
    if (kv_alloc_init(&e->al, cap / SUB) != 0) return -1;
    e->pgc = calloc(e->al.nsub, sizeof *e->pgc);
    if (!e->pgc) {
        kv_alloc_free(&e->al);
        return -1;
    }
    /* Record groups: one per MiB of capacity (the open subpages of all
     * groups, half full on average, cost about 0.2% of the capacity). */
    unsigned g = 0;
    while (g < KV_GROUP_MAX_BITS && ((size_t)1 << 20) << (g + 1) <= cap) g++;
    kv_alloc_set_groups(&e->al, g);
    kv_alloc_claim(&e->al, 0, kv_sp_mk(KV_SP_HDR));   /* the arena header (adopt.h) */
    e->salvage = 1;
    e->inject_seen = __atomic_load_n(&a->inject_seq, __ATOMIC_ACQUIRE);
    /* The allocator's metadata: at the end of the arena, away from the
     * header and the first directory (a whole-page loss without salvage
     * then rarely takes both the directory and the metadata). */
    kv_alloc_layout L;
    kv_alloc_layout_of(e->al.nsub, e->al.gbits, &L);
    size_t mn = (L.total + SUB - 1) / SUB;
    if (mn + 4 < e->al.nsub) {
        e->meta_sub = e->al.nsub - mn;
        e->meta_n = mn;
        for (size_t i = 0; i < mn; i++) kv_alloc_claim(&e->al, e->meta_sub + i, kv_sp_mk(KV_SP_HDR));
    }
    if (setup_index(e) != 0) {
        kv_alloc_free(&e->al);
        free(e->pgc);
        return -1;
    }
    kv_eng__meta_place(e);
    kv_hdr_format(e);
    return 0;
}

static void free_queues(kv_engine *e)
{
    for (size_t i = 0; i < e->lostq_n; i++) free(e->lostq[i].key);
    e->lostq_n = 0;
    e->lr_n = 0;
}

void kv_eng_free(kv_engine *e)
{
    kv_lazy_end(e);
    free_queues(e);
    kv_alloc_free(&e->al);
    free(e->lostq);
    free(e->lranges);
    if (!e->pgc_ext) free(e->pgc);
    free(e->sweep);
    memset(e, 0, sizeof *e);
}

int kv_eng_flush(kv_engine *e)
{
    kv_eng_check(e);
    kv_lazy_end(e);        /* everything is free now, validated or not */
    kv_alloc_reset(&e->al);
    free_queues(e);
    e->nkeys = e->n_ttl = e->n_lost = 0;
    e->scrub_cursor = e->ttl_cursor = 0;
    e->need_sweep = 0;
    e->sweep_n = 0;
    memset(e->pgc, 0, e->al.nsub * sizeof *e->pgc);
    if (setup_index(e) != 0) return -1;
    kv_hdr_sync(e);
    return 0;
}

/* -------------------------------------------------------------- patrol */

typedef struct {
    uint64_t done, found;
    uint8_t *buf;
    size_t cap;
    int bad_page;
} scrub_ctx;

static void scrub_fn(kv_engine *e, size_t ps, kv_ipage *p, void *vctx)
{
    scrub_ctx *w = vctx;
    w->done += SUB;
    e->c_index_scrubbed++;
    if (!kv_ip_plausible(p)) {
        w->bad_page = 1;
        return;
    }
    for (uint32_t i = 0; i < p->n; i++) {
        kv_entry *en = kv_ip_entry(p, i);
        if (kv_e_state(en) != KV_ST_PRESENT) continue;
        uint32_t csum, vlen;
        size_t reclen;
        if (rec_header(e, en, &csum, &vlen, &reclen) != 0) {
            w->found++;
            continue;
        }
        uint64_t off = kv_e_off(en);
        TOUCH(e, off, reclen);
        const uint8_t *key = (kv_e_flags(en) & KV_F_LONG) ? AP(e, off + KV_REC_HDR) : en->key;
        const uint8_t *val = AP(e, off + reclen - vlen);
        if (rec_csum(key, kv_e_klen(en), val, vlen, kv_e_version(en)) != csum) {
            e->c_checksum_fail++;
            lose(e, en, reclen);
            w->found++;
        }
        w->done += reclen;
    }
}

/* Patrol the allocator's metadata region: read up to `max` subpages of it
 * (guarded), so latent errors there are found before the allocator meets
 * them. Returns bytes read; a fault marks the subpage lost (recovered by
 * the caller's next check). */
static uint64_t scrub_meta(kv_engine *e, size_t max)
{
    if (!e->meta_n) return 0;
    uint8_t buf[SUB];
    uint64_t done = 0;
    for (size_t k = 0; k < max && k < e->meta_n; k++) {
        if (e->meta_scrub >= e->meta_n) e->meta_scrub = 0;
        size_t s = e->meta_sub + e->meta_scrub++;
        if (sub_lost(e, s)) break;
        size_t fo;
        if (kv_arena_read(e->arena, s * SUB, buf, SUB, &fo) != 0) {
            e->c_scrub_found++;
            break;
        }
        done += SUB;
    }
    return done;
}

uint64_t kv_eng_scrub(kv_engine *e, uint64_t max_bytes, uint64_t *found)
{
    kv_eng_check(e);
    /* the metadata first, in proportion to its share of the arena (at least one subpage a call) */
    uint64_t mdone = scrub_meta(e, 1 + (size_t)(max_bytes / SUB) * e->meta_n / (e->al.nsub ? e->al.nsub : 1));
    e->c_scrubbed_bytes += mdone;
    kv_eng_check(e);
    if (e->lazy) {
        /* after adoption the structure is settled first (each subpage
         * validated costs about one read per record header there) */
        size_t budget = (size_t)(max_bytes / SUB) + 1;
        size_t done = kv_lazy_step(e, budget);
        *found = 0;
        kv_eng_check(e);
        return (uint64_t)done * SUB;
    }
    scrub_ctx w = {0};
    uint64_t ev = 0;
    size_t n = e->al.nsub, s = e->scrub_cursor, start = s;
    for (size_t k = 0; k < n && w.done < max_bytes; k++, s++) {
        if (s >= n) s = 0;
        if (meta_lost_since(e, &ev)) break;
        if (kv_sp_kind(e->al.meta[s]) != KV_SP_INDEX || sub_lost(e, s)) continue;
        w.bad_page = 0;
        if (visit_page(e, s, scrub_fn, &w) != 0) w.found++;
        if (w.bad_page) {
            /* not an index page any more: handle it as a memory error there */
            e->c_checksum_fail++;
            kv_arena_mark_lost(e->arena, s * SUB, SUB);
        }
    }
    e->scrub_cursor = s >= n ? 0 : s;
    if (e->verify_todo) {
        size_t passed = s >= start ? s - start : n - start + s;
        if (passed == 0 && w.done < max_bytes) passed = n;   /* a whole lap */
        e->verify_todo = e->verify_todo > passed ? e->verify_todo - passed : 0;
    }
    e->c_scrubbed_bytes += w.done;
    e->c_scrub_found += w.found;
    *found = w.found;
    kv_eng_check(e);
    return w.done;
}

typedef struct {
    uint64_t now;
    size_t budget, seen, dropped;
} ttl_ctx;

static void ttl_fn(kv_engine *e, size_t ps, kv_ipage *p, void *vctx)
{
    ttl_ctx *w = vctx;
    for (uint32_t i = 0; i < p->n;) {
        kv_entry *en = kv_ip_entry(p, i);
        w->seen++;
        if ((kv_e_flags(en) & KV_F_TTL) && kv_e_ttl(en) <= w->now) {
            size_t rl;
            if (release_len(e, en, &rl) != 0) {
                i++;
                continue;
            }
            entry_drop(e, p, i, rl);
            w->dropped++;
            e->c_expired++;
            continue;
        }
        i++;
    }
}

size_t kv_eng_expire_sweep(kv_engine *e, size_t budget, uint64_t now_ms)
{
    kv_eng_check(e);
    if (!e->n_ttl) return 0;
    ttl_ctx w = {now_ms, budget, 0, 0};
    size_t n = e->al.nsub, s = e->ttl_cursor;
    uint64_t ev = 0;
    for (size_t k = 0; k < n && w.seen < budget && e->n_ttl; k++, s++) {
        if (s >= n) s = 0;
        if (meta_lost_since(e, &ev)) break;
        if (kv_sp_kind(e->al.meta[s]) != KV_SP_INDEX || sub_lost(e, s)) continue;
        visit_page(e, s, ttl_fn, &w);
    }
    e->ttl_cursor = s >= n ? 0 : s;
    kv_eng_check(e);
    return w.dropped;
}

/* ----------------------------------------------------------- compaction */

typedef struct {
    uint32_t live;
    uint32_t sub;
} cand_t;

static int cand_cmp(const void *x, const void *y)
{
    const cand_t *a = x, *b = y;
    return a->live < b->live ? -1 : a->live > b->live;
}

typedef struct {
    uint8_t *cand;
    size_t moved;
    int stop;
} compact_ctx;

static int64_t g_mv_off = -1;
static size_t g_mv_len;

static void compact_fn(kv_engine *e, size_t ps, kv_ipage *p, void *vctx)
{
    compact_ctx *w = vctx;
    kv_alloc *al = &e->al;
    for (uint32_t i = 0; i < p->n && !w->stop; i++) {
        kv_entry *en = kv_ip_entry(p, i);
        if (kv_e_state(en) != KV_ST_PRESENT) continue;
        uint64_t off = kv_e_off(en);
        size_t s = off / SUB;
        if (s >= al->nsub || !((w->cand[s / 8] >> (s % 8)) & 1)) continue;
        if (kv_sp_kind(al->meta[s]) != KV_SP_SMALL) continue;
        uint32_t c, v;
        size_t len;
        if (rec_header(e, en, &c, &v, &len) != 0) continue;
        TOUCH(e, off, len);
        uint64_t h = (kv_e_flags(en) & KV_F_LONG) ? kv_e_fullhash(en) : kv_hash(en->key, kv_e_klen(en));
        int64_t noff = kv_alloc_take(al, len, 1, h);
        if (noff < 0) {
            w->stop = 1;
            return;
        }
        g_mv_off = noff;
        g_mv_len = len;
        TOUCH(e, (uint64_t)noff, len);
        memmove(AP(e, (uint64_t)noff), AP(e, off), len);
        kv_crash_point("compact:copy");
        kv_e_set_off(en, (uint64_t)noff);
        kv_crash_point("compact:entry");
        g_mv_off = -1;
        kv_alloc_release(al, off, len);
        w->moved++;
    }
}

size_t kv_eng_compact(kv_engine *e, size_t max_subpages)
{
    kv_alloc *al = &e->al;
    if (al->dead_bytes <= e->compact_futile_dead) return 0;
    size_t room = (al->nfree > 1 ? al->nfree - 1 : 0) * SUB;
    cand_t *cv = malloc((al->nsub ? al->nsub : 1) * sizeof *cv);
    uint8_t *cand = calloc((al->nsub + 7) / 8, 1);
    if (!cv || !cand) {
        free(cv);
        free(cand);
        return 0;
    }
    size_t nc = 0;
    for (size_t s = 0; s < al->nsub; s++) {
        kv_meta m = al->meta[s];
        if (kv_sp_kind(m) != KV_SP_SMALL || (m & KV_SP_OPEN)) continue;
        uint32_t fill = kv_sp_fill(m), live = kv_sp_live(m);
        if (fill - live >= SUB / 8 && live <= SUB - SUB / 8) cv[nc++] = (cand_t){live, (uint32_t)s};
    }
    qsort(cv, nc, sizeof *cv, cand_cmp);
    size_t ncand = 0, moving = 0;
    for (size_t i = 0; i < nc && ncand < max_subpages; i++) {
        if (moving + cv[i].live + cv[i].live / 8 + 64 > room) break;
        moving += cv[i].live;
        cand[cv[i].sub / 8] |= (uint8_t)(1u << (cv[i].sub % 8));
        ncand++;
    }
    free(cv);
    compact_ctx w = {cand, 0, 0};
    if (ncand) {
        e->c_compactions++;
        uint64_t ev = 0;
        for (size_t s = 0; s < al->nsub && !w.stop; s++) {
            if (meta_lost_since(e, &ev)) {
                g_mv_off = -1;          /* the rebuild frees what no entry references */
                break;
            }
            if (kv_sp_kind(al->meta[s]) != KV_SP_INDEX || sub_lost(e, s)) continue;
            if (visit_page(e, s, compact_fn, &w) != 0 && !meta_lost(e) && g_mv_off >= 0) {
                kv_alloc_release(al, (uint64_t)g_mv_off, g_mv_len);
                g_mv_off = -1;
            }
        }
    }
    free(cand);
    e->c_moved += w.moved;
    e->compact_futile_dead = w.moved ? 0 : al->dead_bytes + SUB;
    return w.moved;
}

typedef struct {
    const uint8_t *key;
    uint32_t klen;
    uint64_t h;
    size_t byte;
} corrupt_args;

static int body_corrupt(kv_engine *e, void *va)
{
    corrupt_args *a = va;
    size_t s = find_page(e, a->h);
    if (s == NOPAGE) return KV_LOSTKEY;
    kv_ipage *p = PG(e, s);
    int i = pg_find(e, p, a->key, a->klen, a->h);
    if (i < 0) return KV_ABSENT;
    kv_entry *en = kv_ip_entry(p, (uint32_t)i);
    if (kv_e_state(en) != KV_ST_PRESENT) return KV_LOSTKEY;
    uint64_t off = kv_e_off(en) + a->byte;
    TOUCH(e, off, 1);
    *AP(e, off) ^= 0x5A;
    return KV_OK;
}

int kv_eng_corrupt(kv_engine *e, const void *key, uint32_t klen, size_t byte)
{
    corrupt_args a = {key, klen, kv_hash(key, klen), byte};
    return run(e, body_corrupt, &a);
}

/* ---------------------------------------------- for adopt.c (adopt.h) */

void kv_eng__lostrange_push(kv_engine *e, uint64_t lo, uint64_t hi, uint64_t version)
{
    lostrange_push(e, lo, hi, version);
}
void kv_eng__lostq_push(kv_engine *e, const kv_entry *en) { lostq_push(e, en); }
/* lazy.c marked the entry en (a copy of it) on index page ps LOST. */
void kv_eng__count_lost(kv_engine *e, size_t ps, const kv_entry *en)
{
    uint32_t c = e->pgc[ps];
    uint32_t l = ((c >> 10) & 1023) + 1;
    e->pgc[ps] = (c & ~(1023u << 10)) | (l & 1023) << 10;
    e->n_lost++;
    e->c_lost_keys++;
    lostq_push(e, en);
}
int64_t kv_eng__new_page(kv_engine *e, uint64_t lo, uint64_t hi, unsigned flags, uint64_t lost_at)
{
    return new_page(e, lo, hi, flags, lost_at);
}
int kv_eng__dir_fill(kv_engine *e, uint64_t c0, uint64_t n, uint32_t s) { return dir_fill(e, c0, n, s); }
uint32_t kv_eng__pgc_count(const kv_ipage *p) { return pgc_count(p); }
