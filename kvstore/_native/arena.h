/* arena.h - the store's memory: memfds of whole (huge)pages, lost-subpage
 * bookkeeping and the fault simulator.
 *
 * An arena is one memfd of N pages (1 GiB, 2 MiB or 4 KiB) mapped
 * MAP_SHARED|MAP_POPULATE. The unit of loss is the 4 KiB subpage. Three
 * bitmaps, one bit per subpage:
 *   lost     - the subpage's bytes are gone (set by the SIGBUS handler);
 *   pending  - lost and not yet drained by recovery (set by the handler);
 *   armed    - latent simulated poison inside a hugepage: the next guarded
 *              touch raises a synchronous SIGBUS (the simulator's "ar").
 * A fourth, `poison`, remembers which 4 KiB the simulator really poisoned,
 * so the salvage path sees EIO from pread exactly there (as a 6.12 kernel
 * does) while the whole hugepage is lost under the mainline policy.
 *
 * The handler may run on any thread at any time: everything it touches is
 * atomic or a syscall that is async-signal-safe.
 */
#ifndef KV_ARENA_H
#define KV_ARENA_H

#include <stddef.h>
#include <stdint.h>

#define KV_SUB_SHIFT 12
#define KV_SUB_SIZE ((size_t)1 << KV_SUB_SHIFT)

#ifndef MFD_MF_KEEP_UE_MAPPED
#define MFD_MF_KEEP_UE_MAPPED 0x0020U
#endif
#ifndef MADV_HWPOISON
#define MADV_HWPOISON 100
#endif

enum kv_policy { KV_POLICY_KEEP_UE = 0, KV_POLICY_MAINLINE = 1 };
enum kv_fault_kind { KV_FAULT_AO = 0, KV_FAULT_AR = 1, KV_FAULT_HWPOISON = 2 };

typedef struct kv_arena {
    uint8_t *base;
    size_t size;              /* mapped bytes, a whole number of pages */
    size_t page_size;         /* 4096, 2 MiB or 1 GiB */
    int page_shift;
    int hugetlb;
    int keep_ue;              /* MFD_MF_KEEP_UE_MAPPED was accepted */
    int policy;               /* kernel policy (real or simulated) */
    int fd;                   /* the arena memfd */
    int efd;                  /* eventfd: readable when something was lost */
    int hole_fd;              /* empty memfd: mapped over a page to make it fault */
    size_t nsub;              /* subpages */
    size_t npages;            /* pages */
    size_t nwords;            /* bitmap words */
    uint64_t *lost;           /* atomics (see file comment) */
    uint64_t *pending;
    uint64_t *armed;
    uint64_t *poison;
    int *page_fd;             /* backing fd of each page (salvage swaps it) */
    uint64_t *page_foff;      /* file offset of each page in page_fd */
    uint8_t *page_small;      /* 1: page now backed by 4 KiB pages (salvaged without a spare hugepage) */
    int *spare_fds;           /* memfds created for salvage, closed at free */
    size_t nspare;
    uint64_t pending_flag;    /* atomic: 1 when pending has bits */
    uint64_t inject_seq;      /* atomic: simulated faults injected (ao/ar), so a
                               * user can look for new armed subpages cheaply */
    /* counters (atomic) */
    uint64_t lost_subpages;
    uint64_t lost_events;
    uint64_t injected[3];
    uint64_t pages_salvaged;
    uint64_t salvage_failed;
    uint64_t subpages_salvaged;
    uint64_t pages_degraded;  /* salvaged into 4 KiB pages for want of a spare hugepage */
    uint32_t salvage_delay_us; /* test hook: a slow salvage copy */
    char reason[256];         /* why a fallback happened, if one did */
} kv_arena;

/* Create an arena of at least `size` bytes. page_size: 0 = auto (1 GiB, else
 * 2 MiB, else 4 KiB), or 1<<30, 1<<21, 4096. policy: -1 = what the kernel
 * does (keep_ue if the flag was accepted, else mainline), or a kv_policy to
 * simulate. On failure returns NULL and writes a message to err. */
kv_arena *kv_arena_create(size_t size, size_t page_size, int policy,
                          char *err, size_t errlen);
void kv_arena_free(kv_arena *a);

/* Map an arena memfd inherited from an earlier process (the same pages: no
 * new memory). The page size comes from the file system (hugetlbfs reports
 * it as the block size). fd is duplicated; the caller keeps its own. NULL
 * with a message in err on failure. */
kv_arena *kv_arena_adopt(int fd, int policy, char *err, size_t errlen);

/* What an earlier process hands over with its arena memfd (a planned
 * restart), applied after kv_arena_adopt and before the engine adopts:
 *
 * kv_arena_adopt_spare: page p of the old process was salvaged into the
 * memfd fd (a spare hugepage, or 4 KiB shmem pages when small): map it
 * over the same addresses again (fd is duplicated; the caller keeps its
 * own). 0, or -1 with a message.
 *
 * kv_arena_adopt_lost: subpages [first, first + n) were lost there: they
 * are lost here too (poisoned: pread fails there, as it did there), and pending,
 * so recovery quarantines them and makes whatever they held LOST; nothing
 * reads them again. */
int kv_arena_adopt_spare(kv_arena *a, size_t p, int fd, int small, char *err, size_t errlen);
void kv_arena_adopt_lost(kv_arena *a, size_t first, size_t n, int poisoned);

/* Probe (once per process) whether memfd_create accepts
 * MFD_MF_KEEP_UE_MAPPED and whether MADV_HWPOISON is available. */
int kv_probe_keep_ue(void);
int kv_probe_hwpoison(void);

/* Mark [off, off+len) lost (rounded out to subpages). Async-signal-safe.
 * Returns the number of newly lost subpages. */
size_t kv_arena_mark_lost(kv_arena *a, size_t off, size_t len);

static inline int kv_bit_get(const uint64_t *bm, size_t i)
{
    return (int)((__atomic_load_n(&bm[i >> 6], __ATOMIC_RELAXED) >> (i & 63)) & 1);
}

/* 1 if any subpage in [off, off+len) is lost (known UE); 2 if armed
 * (latent simulated poison) and none lost; else 0. */
static inline int kv_arena_hazard(const kv_arena *a, size_t off, size_t len)
{
    if (len == 0 || off >= a->size) return 0;
    size_t s = off >> KV_SUB_SHIFT, e = (off + len - 1) >> KV_SUB_SHIFT;
    int armed = 0;
    for (size_t i = s; i <= e; i++) {
        if (kv_bit_get(a->lost, i)) return 1;
        if (kv_bit_get(a->armed, i)) armed = 2;
    }
    return armed;
}

/* Guarded copies. Return 0, or -1 with *fault_off set to the arena offset
 * of the lost byte (a known-lost subpage is refused without touching it; an
 * armed one raises a real SIGBUS BUS_MCEERR_AR in this thread). */
int kv_arena_read(kv_arena *a, size_t off, void *dst, size_t n, size_t *fault_off);
int kv_arena_write(kv_arena *a, size_t off, const void *src, size_t n, size_t *fault_off);

/* Called on the landing path of a synchronous fault at `addr`: applies the
 * mainline policy (the whole page now faults). */
void kv_arena_after_sync_fault(kv_arena *a, uintptr_t addr);

/* Inject a fault (see DESIGN.md section 5). Returns 0 or -1 with a message. */
int kv_arena_inject(kv_arena *a, size_t off, int kind, char *err, size_t errlen);

/* Move pending bits to the caller: fills `out` (capacity cap) with
 * [first_subpage, count) ranges, returns how many ranges were written; if
 * cap is too small the rest stays pending. Also resets the eventfd. */
size_t kv_arena_drain(kv_arena *a, uint64_t (*out)[2], size_t cap);

/* Salvage page p (mainline policy): copy its readable 4 KiB subpages from
 * the backing memfd with pread into a new hugepage mapped MAP_FIXED over the
 * same addresses; subpages where pread fails (EIO) stay lost. Without a free
 * hugepage, the copy goes into ordinary 4 KiB shmem pages instead: the data
 * survives, that range pays TLB misses (stats: pages_degraded). Returns the
 * number of subpages that stay lost, or -1 if no memory could be had at all
 * (err says why); then the page stays lost as a whole. */
long kv_arena_salvage(kv_arena *a, size_t p, char *err, size_t errlen);

/* pread the backing memfd (the salvage primitive), honouring simulated
 * poison as the kernel does: -1 with errno EIO if the read starts in a
 * poisoned subpage, a short count if it reaches one. */
long kv_arena_pread(kv_arena *a, size_t off, void *dst, size_t n);

/* TLB benchmark: ns per step of a random pointer chase over one line of
 * every healthy subpage in the first nbytes (see arena.c). */
double kv_arena_chase(kv_arena *a, size_t nbytes, uint64_t steps, uint64_t seed);
int kv_arena_chase_steps(kv_arena *a, uint64_t *pos, uint64_t m);

/* 1 if page p is (still) a hugepage: hugetlb backing, not degraded. */
static inline int kv_arena_page_huge(const kv_arena *a, size_t p)
{
    return a->hugetlb && !a->page_small[p];
}

/* 1 if every subpage of page p is lost. */
int kv_arena_page_all_lost(const kv_arena *a, size_t p);

#endif
