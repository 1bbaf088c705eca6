/* arena.c - hugepage memfds, lost-subpage bitmaps, guarded copies, the
 * fault simulator and the mainline salvage. See arena.h for the contract and
 * shared DESIGN.md sections 1, 3 and 5 for the kernel behaviour we follow.
 */
#define _GNU_SOURCE
#include "arena.h"
#include "guard.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/memfd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/magic.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef MFD_HUGE_1GB
#define MFD_HUGE_1GB (30U << 26)
#endif
#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21U << 26)
#endif
#ifndef PR_MCE_KILL
#define PR_MCE_KILL 33
#define PR_MCE_KILL_SET 1
#define PR_MCE_KILL_EARLY 1
#endif

static int g_keep_ue_probe = -1;   /* -1 unknown, 0 refused, 1 accepted */
static int g_hwpoison_probe = -1;

static int memfd(const char *name, unsigned flags)
{
    return (int)syscall(SYS_memfd_create, name, flags);
}

static unsigned huge_flag(size_t page_size)
{
    return page_size == ((size_t)1 << 30) ? MFD_HUGE_1GB : MFD_HUGE_2MB;
}

int kv_probe_keep_ue(void)
{
    if (g_keep_ue_probe >= 0) return g_keep_ue_probe;
    /* The flag only means something for hugetlb memfds; a 2 MiB memfd of
     * size 0 costs nothing even when no hugepage is reserved. */
    int fd = memfd("kvstore-probe", MFD_CLOEXEC | MFD_HUGETLB | MFD_HUGE_2MB | MFD_MF_KEEP_UE_MAPPED);
    if (fd >= 0) {
        close(fd);
        g_keep_ue_probe = 1;
    } else {
        g_keep_ue_probe = 0;
    }
    return g_keep_ue_probe;
}

int kv_probe_hwpoison(void)
{
    if (g_hwpoison_probe >= 0) return g_hwpoison_probe;
    /* Without CONFIG_MEMORY_FAILURE the kernel rejects the advice itself
     * with EINVAL before looking at the range; with it, a zero-length
     * range is accepted as a no-op (needs CAP_SYS_ADMIN, else EPERM). */
    void *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 0;
    int rc = madvise(p, 0, MADV_HWPOISON);
    g_hwpoison_probe = rc == 0;
    munmap(p, 4096);
    return g_hwpoison_probe;
}

static long sysfs_long(const char *path)
{
    char buf[64];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    return strtol(buf, NULL, 10);
}

static const char *page_label(size_t ps)
{
    return ps == ((size_t)1 << 30) ? "1 GiB" : ps == ((size_t)1 << 21) ? "2 MiB" : "4 KiB";
}

/* Try to make the memfd and mapping for one page size. 0 or -1 with err. */
static int try_map(kv_arena *a, size_t size, size_t ps, char *err, size_t errlen)
{
    int fd = -1;
    int keep_ue = 0;
    if (ps == KV_SUB_SIZE) {
        fd = memfd("kvstore-arena", MFD_CLOEXEC);
    } else {
        unsigned fl = MFD_CLOEXEC | MFD_HUGETLB | huge_flag(ps);
        if (kv_probe_keep_ue()) {
            fd = memfd("kvstore-arena", fl | MFD_MF_KEEP_UE_MAPPED);
            keep_ue = fd >= 0;
        }
        if (fd < 0) fd = memfd("kvstore-arena", fl);
    }
    if (fd < 0) {
        snprintf(err, errlen, "memfd_create for %s pages failed: %s", page_label(ps), strerror(errno));
        return -1;
    }
    size_t mapped = (size + ps - 1) / ps * ps;
    if (ftruncate(fd, (off_t)mapped) != 0) {
        snprintf(err, errlen, "ftruncate of %zu bytes on a %s memfd failed: %s",
                 mapped, page_label(ps), strerror(errno));
        close(fd);
        return -1;
    }
    void *p = mmap(NULL, mapped, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    if (p == MAP_FAILED) {
        int e = errno;
        if (ps != KV_SUB_SIZE) {
            char path[128];
            snprintf(path, sizeof path, "/sys/kernel/mm/hugepages/hugepages-%zukB/free_hugepages", ps >> 10);
            long nfree = sysfs_long(path);
            snprintf(path, sizeof path, "/sys/kernel/mm/hugepages/hugepages-%zukB/nr_hugepages", ps >> 10);
            long nres = sysfs_long(path);
            snprintf(err, errlen, "no free %s hugepages: need %zu, reserved %ld, free %ld (%s); "
                     "reserve them as root with `kvstore-hugepages reserve`",
                     page_label(ps), mapped / ps, nres, nfree, strerror(e));
        } else {
            snprintf(err, errlen, "mmap of %zu bytes failed: %s", mapped, strerror(e));
        }
        close(fd);
        return -1;
    }
    a->base = p;
    a->size = mapped;
    a->page_size = ps;
    a->page_shift = __builtin_ctzll(ps);
    a->hugetlb = ps != KV_SUB_SIZE;
    a->keep_ue = keep_ue;
    a->fd = fd;
    return 0;
}

static kv_arena *arena_setup(kv_arena *a, int policy, char *err, size_t errlen);
static void bit_set(uint64_t *bm, size_t i);

kv_arena *kv_arena_create(size_t size, size_t page_size, int policy, char *err, size_t errlen)
{
    if (size == 0) size = KV_SUB_SIZE;
    kv_arena *a = calloc(1, sizeof *a);
    if (!a) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    a->fd = a->efd = a->hole_fd = -1;
    size_t tries[3];
    int n = 0;
    if (page_size == 0) {
        tries[n++] = (size_t)1 << 30;
        tries[n++] = (size_t)1 << 21;
        tries[n++] = KV_SUB_SIZE;
    } else {
        tries[n++] = page_size;
    }
    char why[512] = "";
    int ok = 0;
    for (int i = 0; i < n && !ok; i++) {
        char e[256];
        if (try_map(a, size, tries[i], e, sizeof e) == 0) {
            ok = 1;
        } else {
            size_t l = strlen(why);
            snprintf(why + l, sizeof why - l, "%s%s", l ? "; " : "", e);
        }
    }
    if (!ok) {
        snprintf(err, errlen, "%s", why);
        free(a);
        return NULL;
    }
    if (why[0]) snprintf(a->reason, sizeof a->reason, "fell back to %s pages: %s", page_label(a->page_size), why);
    return arena_setup(a, policy, err, errlen);
}

/* The bookkeeping of an arena whose memfd is mapped (create and adopt). */
static kv_arena *arena_setup(kv_arena *a, int policy, char *err, size_t errlen)
{
    a->policy = policy >= 0 ? policy : (a->keep_ue ? KV_POLICY_KEEP_UE : KV_POLICY_MAINLINE);
    a->nsub = a->size >> KV_SUB_SHIFT;
    a->npages = a->size / a->page_size;
    a->nwords = (a->nsub + 63) / 64;
    a->lost = calloc(a->nwords, 8);
    a->pending = calloc(a->nwords, 8);
    a->armed = calloc(a->nwords, 8);
    a->poison = calloc(a->nwords, 8);
    a->page_fd = calloc(a->npages, sizeof(int));
    a->page_foff = calloc(a->npages, 8);
    a->page_small = calloc(a->npages, 1);
    a->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    a->hole_fd = memfd("kvstore-hole", MFD_CLOEXEC);
    if (!a->lost || !a->pending || !a->armed || !a->poison || !a->page_fd ||
        !a->page_foff || !a->page_small || a->efd < 0 || a->hole_fd < 0) {
        snprintf(err, errlen, "arena bookkeeping allocation failed: %s", strerror(errno));
        kv_arena_free(a);
        return NULL;
    }
    for (size_t p = 0; p < a->npages; p++) {
        a->page_fd[p] = a->fd;
        a->page_foff[p] = (uint64_t)p * a->page_size;
    }
    /* Ask for early kill so a real kernel sends BUS_MCEERR_AO as soon as it
     * finds poison in our pages, not only when we touch it. */
    prctl(PR_MCE_KILL, PR_MCE_KILL_SET, PR_MCE_KILL_EARLY, 0, 0);
    if (kv_guard_install() != 0 || kv_guard_register(a) != 0) {
        snprintf(err, errlen, "cannot install the SIGBUS handler or register the arena: %s", strerror(errno));
        kv_arena_free(a);
        return NULL;
    }
    return a;
}

kv_arena *kv_arena_adopt(int fd, int policy, char *err, size_t errlen)
{
    struct stat st;
    struct statfs sf;
    if (fstat(fd, &st) != 0 || fstatfs(fd, &sf) != 0) {
        snprintf(err, errlen, "cannot stat the inherited arena fd %d: %s", fd, strerror(errno));
        return NULL;
    }
    if (!S_ISREG(st.st_mode) || st.st_size <= 0) {
        snprintf(err, errlen, "inherited fd %d is not an arena memfd (not a regular file with data)", fd);
        return NULL;
    }
    /* hugetlbfs reports the hugepage size as the block size */
    int huge = sf.f_type == HUGETLBFS_MAGIC;
    size_t ps = huge ? (size_t)st.st_blksize : KV_SUB_SIZE;
    if (ps != KV_SUB_SIZE && ps != ((size_t)1 << 21) && ps != ((size_t)1 << 30)) {
        snprintf(err, errlen, "inherited arena fd %d has pages of %zu bytes: not supported", fd, ps);
        return NULL;
    }
    size_t size = (size_t)st.st_size;
    if (size % ps) {
        snprintf(err, errlen, "inherited arena fd %d: %zu bytes is not a whole number of %s pages", fd, size,
                 page_label(ps));
        return NULL;
    }
    int nfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (nfd < 0) {
        snprintf(err, errlen, "cannot duplicate the inherited arena fd %d: %s", fd, strerror(errno));
        return NULL;
    }
    /* The same pages (hugepages included) are mapped again: no new memory.
     * Not MAP_POPULATE: the pages are in the memfd already, so a first
     * touch is an ordinary minor fault (never a SIGBUS); populating 4 KiB
     * pages up front would cost ~0.6 s per GiB before the first read. The
     * adoption reads only the header, directory and index pages; the
     * rest is faulted in by use and by the background validation. */
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, nfd, 0);
    if (p == MAP_FAILED) {
        snprintf(err, errlen, "mmap of the inherited arena (%zu bytes) failed: %s", size, strerror(errno));
        close(nfd);
        return NULL;
    }
    kv_arena *a = calloc(1, sizeof *a);
    if (!a) {
        munmap(p, size);
        close(nfd);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    a->efd = a->hole_fd = -1;
    a->fd = nfd;
    a->base = p;
    a->size = size;
    a->page_size = ps;
    a->page_shift = __builtin_ctzll(ps);
    a->hugetlb = huge;
    a->keep_ue = 0;   /* the flag is not visible on an fd; mainline is the safe guess */
    return arena_setup(a, policy, err, errlen);
}

int kv_arena_adopt_spare(kv_arena *a, size_t p, int fd, int small, char *err, size_t errlen)
{
    struct stat st;
    if (p >= a->npages) {
        snprintf(err, errlen, "salvaged page %zu is outside the arena (%zu pages)", p, a->npages);
        return -1;
    }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || (size_t)st.st_size < a->page_size) {
        snprintf(err, errlen, "the memfd of salvaged page %zu (fd %d) is not a whole page", p, fd);
        return -1;
    }
    int nfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (nfd < 0) {
        snprintf(err, errlen, "cannot duplicate the memfd of salvaged page %zu: %s", p, strerror(errno));
        return -1;
    }
    int *nf = realloc(a->spare_fds, (a->nspare + 1) * sizeof(int));
    if (!nf) {
        close(nfd);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    a->spare_fds = nf;
    void *m = mmap(a->base + (p << a->page_shift), a->page_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
                   nfd, 0);
    if (m == MAP_FAILED) {
        snprintf(err, errlen, "MAP_FIXED of salvaged page %zu failed: %s", p, strerror(errno));
        close(nfd);
        return -1;
    }
    a->spare_fds[a->nspare++] = nfd;
    a->page_fd[p] = nfd;
    a->page_foff[p] = 0;
    if (small && !a->page_small[p]) {
        a->page_small[p] = 1;
        __atomic_fetch_add(&a->pages_degraded, 1, __ATOMIC_RELAXED);
    }
    return 0;
}

void kv_arena_adopt_lost(kv_arena *a, size_t first, size_t n, int poisoned)
{
    if (first >= a->nsub) return;
    if (n > a->nsub - first) n = a->nsub - first;
    if (poisoned)
        for (size_t i = first; i < first + n; i++) bit_set(a->poison, i);
    kv_arena_mark_lost(a, first << KV_SUB_SHIFT, n << KV_SUB_SHIFT);
}

void kv_arena_free(kv_arena *a)
{
    if (!a) return;
    kv_guard_unregister(a);
    if (a->base) munmap(a->base, a->size);
    if (a->fd >= 0) close(a->fd);
    if (a->efd >= 0) close(a->efd);
    if (a->hole_fd >= 0) close(a->hole_fd);
    for (size_t i = 0; i < a->nspare; i++) close(a->spare_fds[i]);
    free(a->spare_fds);
    free(a->lost);
    free(a->pending);
    free(a->armed);
    free(a->poison);
    free(a->page_fd);
    free(a->page_foff);
    free(a->page_small);
    free(a);
}

size_t kv_arena_mark_lost(kv_arena *a, size_t off, size_t len)
{
    if (off >= a->size) return 0;
    if (len > a->size - off) len = a->size - off;
    size_t s = off >> KV_SUB_SHIFT, e = (off + len + KV_SUB_SIZE - 1) >> KV_SUB_SHIFT;
    size_t added = 0;
    for (size_t i = s; i < e;) {
        size_t w = i >> 6, b = i & 63;
        size_t nb = 64 - b;
        if (nb > e - i) nb = e - i;
        uint64_t m = (nb == 64 ? ~0ULL : ((1ULL << nb) - 1)) << b;
        uint64_t old = __atomic_fetch_or(&a->lost[w], m, __ATOMIC_ACQ_REL);
        uint64_t fresh = m & ~old;
        if (fresh) {
            __atomic_fetch_or(&a->pending[w], fresh, __ATOMIC_ACQ_REL);
            added += (size_t)__builtin_popcountll(fresh);
        }
        i += nb;
    }
    if (added) {
        __atomic_fetch_add(&a->lost_subpages, added, __ATOMIC_RELAXED);
        __atomic_fetch_add(&a->lost_events, 1, __ATOMIC_RELAXED);
        __atomic_store_n(&a->pending_flag, 1, __ATOMIC_RELEASE);
        uint64_t one = 1;
        ssize_t r = write(a->efd, &one, sizeof one);
        (void)r;
    }
    return added;
}

/* Map the empty memfd over [off, off+len): every touch there now raises a
 * real SIGBUS (BUS_ADRERR), as a poisoned page does. */
static int make_faulting(kv_arena *a, size_t off, size_t len)
{
    void *p = mmap(a->base + off, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, a->hole_fd, 0);
    return p == MAP_FAILED ? -1 : 0;
}

/* The guarded section itself, kept tiny so no local lives across the
 * sigsetjmp. If raise_at is set, a synchronous machine check is raised there
 * first (latent simulated poison). Returns 0, or -1 after a fault with the
 * address in kv_tls.fault_addr. */
static __attribute__((noinline)) int guarded_memcpy(void *dst, const void *src, size_t n,
                                                   uint8_t *raise_at, int lsb)
{
    sigjmp_buf jb;
    sigjmp_buf *volatile outer = kv_tls.jmp;      /* an enclosing guard, if any */
    volatile int outer_active = kv_tls.active;
    kv_guard_thread_init();
    if (sigsetjmp(jb, 0)) {
        kv_guard_landed();
        kv_tls.jmp = outer;
        kv_tls.active = outer_active;
        return -1;
    }
    kv_guard_arm(&jb);
    if (raise_at) {
        kv_guard_raise(BUS_MCEERR_AR, raise_at, lsb);   /* leaves through jb */
        /* Still here: SIGBUS is blocked in this thread, so the signal stays
         * queued. Never copy the poisoned bytes; report the fault. */
        kv_guard_disarm();
        kv_tls.jmp = outer;
        kv_tls.active = outer_active;
        kv_tls.fault_addr = (uintptr_t)raise_at;
        return -2;
    }
    memcpy(dst, src, n);
    kv_guard_disarm();
    kv_tls.jmp = outer;
    kv_tls.active = outer_active;
    return 0;
}

static int guarded_copy(kv_arena *a, size_t off, void *dst, const void *src, size_t n,
                        int to_arena, size_t *fault_off)
{
    if (off > a->size || n > a->size - off) {
        *fault_off = off;
        errno = ERANGE;
        return -1;
    }
    int hz = kv_arena_hazard(a, off, n);
    uint8_t *raise_at = NULL;
    if (hz == 1) {
        /* Known UE: never consume it again. Report the first lost byte. */
        for (size_t i = off >> KV_SUB_SHIFT;; i++)
            if (kv_bit_get(a->lost, i)) {
                *fault_off = i << KV_SUB_SHIFT > off ? i << KV_SUB_SHIFT : off;
                break;
            }
        errno = EIO;
        return -1;
    }
    if (hz == 2) {
        /* Latent simulated poison inside a hugepage: the touch is where the
         * hardware would raise a synchronous machine check. */
        for (size_t i = off >> KV_SUB_SHIFT;; i++)
            if (kv_bit_get(a->armed, i)) {
                raise_at = a->base + (i << KV_SUB_SHIFT > off ? i << KV_SUB_SHIFT : off);
                break;
            }
    }
    int lsb = KV_SUB_SHIFT;
    if (raise_at && a->policy == KV_POLICY_MAINLINE &&
        kv_arena_page_huge(a, (size_t)(raise_at - a->base) >> a->page_shift))
        lsb = a->page_shift;
    int rc = to_arena ? guarded_memcpy(a->base + off, src, n, raise_at, lsb)
                      : guarded_memcpy(dst, a->base + off, n, raise_at, lsb);
    if (rc != 0) {
        uintptr_t fa = kv_tls.fault_addr;
        *fault_off = fa - (uintptr_t)a->base;
        if (rc == -2) kv_arena_mark_lost(a, *fault_off & ~(((size_t)1 << lsb) - 1), (size_t)1 << lsb);
        kv_arena_after_sync_fault(a, fa);
        errno = EIO;
        return -1;
    }
    return 0;
}

int kv_arena_read(kv_arena *a, size_t off, void *dst, size_t n, size_t *fault_off)
{
    return guarded_copy(a, off, dst, NULL, n, 0, fault_off);
}

int kv_arena_write(kv_arena *a, size_t off, const void *src, size_t n, size_t *fault_off)
{
    return guarded_copy(a, off, NULL, src, n, 1, fault_off);
}

void kv_arena_after_sync_fault(kv_arena *a, uintptr_t addr)
{
    if (addr < (uintptr_t)a->base || addr >= (uintptr_t)a->base + a->size) return;
    size_t p = (addr - (uintptr_t)a->base) >> a->page_shift;
    if (kv_arena_page_huge(a, p) && a->policy == KV_POLICY_MAINLINE)
        make_faulting(a, p << a->page_shift, a->page_size);
}

static void scramble(uint8_t *p, size_t n, uint64_t seed)
{
    uint64_t x = seed * 0x9E3779B97F4A7C15ULL + 1;
    for (size_t i = 0; i < n; i += 8) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        memcpy(p + i, &x, 8);
    }
}

static void bit_set(uint64_t *bm, size_t i)
{
    __atomic_fetch_or(&bm[i >> 6], 1ULL << (i & 63), __ATOMIC_ACQ_REL);
}

static void bit_clear(uint64_t *bm, size_t i)
{
    __atomic_fetch_and(&bm[i >> 6], ~(1ULL << (i & 63)), __ATOMIC_ACQ_REL);
}

int kv_arena_inject(kv_arena *a, size_t off, int kind, char *err, size_t errlen)
{
    if (off >= a->size) {
        snprintf(err, errlen, "offset %zu is outside the arena (%zu bytes)", off, a->size);
        errno = ERANGE;
        return -1;
    }
    size_t sub = off >> KV_SUB_SHIFT, soff = sub << KV_SUB_SHIFT;
    if (kind == KV_FAULT_HWPOISON) {
        const char *allow = getenv("KVSTORE_ALLOW_HWPOISON");
        if (!allow || strcmp(allow, "1") != 0) {
            snprintf(err, errlen, "hwpoison takes memory out of use for good: set KVSTORE_ALLOW_HWPOISON=1 to allow it");
            errno = EPERM;
            return -1;
        }
        if (!kv_probe_hwpoison()) {
            snprintf(err, errlen, "this kernel has no MADV_HWPOISON (CONFIG_MEMORY_FAILURE) or we lack CAP_SYS_ADMIN; "
                     "use kind 'ao' or 'ar' (the simulator)");
            errno = ENOTSUP;
            return -1;
        }
        /* The kernel may deliver SIGBUS (AR) to this thread during the
         * call itself: the handler records it and returns. */
        kv_tls.injecting = 1;
        int rc = madvise(a->base + soff, KV_SUB_SIZE, MADV_HWPOISON);
        int e = errno;
        kv_tls.injecting = 0;
        if (rc != 0) {
            snprintf(err, errlen, "madvise(MADV_HWPOISON) failed: %s", strerror(e));
            errno = e;
            return -1;
        }
        bit_set(a->poison, sub);
        __atomic_fetch_add(&a->injected[kind], 1, __ATOMIC_RELAXED);
        return 0;
    }
    if (kind != KV_FAULT_AO && kind != KV_FAULT_AR) {
        snprintf(err, errlen, "unknown fault kind %d", kind);
        errno = EINVAL;
        return -1;
    }
    __atomic_fetch_add(&a->injected[kind], 1, __ATOMIC_RELAXED);
    if (kv_bit_get(a->lost, sub)) {
        /* Already lost: a second error there changes nothing. */
        return 0;
    }
    size_t p = soff >> a->page_shift;
    int huge = kv_arena_page_huge(a, p);
    int whole_page = huge && a->policy == KV_POLICY_MAINLINE;
    /* The hardware garbles the bytes; scramble them through a guarded write
     * so a page already made faulting cannot take us down. */
    if (!kv_arena_hazard(a, soff, KV_SUB_SIZE) && !kv_bit_get(a->poison, sub)) {
        uint8_t junk[KV_SUB_SIZE];
        size_t fo;
        scramble(junk, sizeof junk, off ^ (uintptr_t)a->base);
        kv_arena_write(a, soff, junk, sizeof junk, &fo);
    }
    bit_set(a->poison, sub);
    int lsb = whole_page ? a->page_shift : KV_SUB_SHIFT;
    if (!huge) {
        /* 4 KiB backing: a real faulting mapping over the page, so an
         * unguarded touch faults for real; a guarded one is raised as the
         * kernel does it, BUS_MCEERR_AR with lsb 12 (armed below). */
        if (make_faulting(a, soff, KV_SUB_SIZE) != 0) {
            snprintf(err, errlen, "cannot map a faulting page at %zu: %s", soff, strerror(errno));
            return -1;
        }
    }
    if (kind == KV_FAULT_AR) bit_set(a->armed, sub);
    if (kind == KV_FAULT_AO) {
        if (whole_page) make_faulting(a, p << a->page_shift, a->page_size);
        else if (huge) bit_set(a->armed, sub);   /* touching it again faults */
        kv_guard_raise(BUS_MCEERR_AO, a->base + soff, lsb);
    }
    __atomic_fetch_add(&a->inject_seq, 1, __ATOMIC_RELEASE);
    return 0;
}

size_t kv_arena_drain(kv_arena *a, uint64_t (*out)[2], size_t cap)
{
    uint64_t v;
    ssize_t r = read(a->efd, &v, sizeof v);   /* reset before taking bits */
    (void)r;
    __atomic_store_n(&a->pending_flag, 0, __ATOMIC_RELEASE);
    size_t n = 0;
    for (size_t w = 0; w < a->nwords; w++) {
        if (!__atomic_load_n(&a->pending[w], __ATOMIC_RELAXED)) continue;
        if (n + 64 > cap) {          /* worst case: 32 ranges per word */
            __atomic_store_n(&a->pending_flag, 1, __ATOMIC_RELEASE);
            break;
        }
        uint64_t bits = __atomic_exchange_n(&a->pending[w], 0, __ATOMIC_ACQ_REL);
        while (bits) {
            int b = __builtin_ctzll(bits);
            uint64_t run = bits >> b;
            int len = ~run ? __builtin_ctzll(~run) : 64 - b;
            uint64_t first = (uint64_t)w * 64 + (uint64_t)b;
            if (n > 0 && out[n - 1][0] + out[n - 1][1] == first)
                out[n - 1][1] += (uint64_t)len;
            else {
                out[n][0] = first;
                out[n][1] = (uint64_t)len;
                n++;
            }
            bits = (b + len >= 64) ? 0 : bits & ~((((uint64_t)1 << len) - 1) << b);
        }
    }
    return n;
}

int kv_arena_page_all_lost(const kv_arena *a, size_t p)
{
    size_t per = a->page_size >> KV_SUB_SHIFT;
    for (size_t i = p * per; i < (p + 1) * per; i++)
        if (!kv_bit_get(a->lost, i)) return 0;
    return 1;
}

long kv_arena_pread(kv_arena *a, size_t off, void *dst, size_t n)
{
    if (n == 0) return 0;
    if (off >= a->size) {
        errno = EINVAL;
        return -1;
    }
    size_t p = off >> a->page_shift;
    if (off + n > ((p + 1) << a->page_shift)) {
        errno = EINVAL;
        return -1;
    }
    /* As the kernel does: a read that starts in a poisoned subpage fails
     * with EIO; one that reaches a poisoned subpage stops short before it. */
    for (size_t i = off >> KV_SUB_SHIFT; i <= (off + n - 1) >> KV_SUB_SHIFT; i++)
        if (kv_bit_get(a->poison, i)) {
            size_t stop = i << KV_SUB_SHIFT;
            if (stop <= off) {
                errno = EIO;
                return -1;
            }
            n = stop - off;
            break;
        }
    size_t in_page = off - (p << a->page_shift);
    return (long)pread(a->page_fd[p], dst, n, (off_t)(a->page_foff[p] + in_page));
}

long kv_arena_salvage(kv_arena *a, size_t p, char *err, size_t errlen)
{
    if (p >= a->npages) {
        snprintf(err, errlen, "page %zu outside the arena", p);
        return -1;
    }
    if (!kv_arena_page_huge(a, p)) {
        snprintf(err, errlen, "4 KiB backing: nothing to salvage beyond the lost subpage");
        return -1;
    }
    size_t ps = a->page_size, per = ps >> KV_SUB_SHIFT, first = p * per;
    /* Map the spare somewhere else first: if it cannot be had the arena is
     * left as it was. A spare hugepage first, else 4 KiB shmem pages. The
     * memory is allocated (and zeroed, up to 1 GiB) with fallocate on the
     * memfd, not with MAP_POPULATE: populating a mapping holds the process's
     * mmap lock for the whole zeroing, and every other thread that maps or
     * unmaps memory meanwhile (malloc, a server's event loop) would wait. */
    uint8_t *tmp = MAP_FAILED;
    int small = 0;
    char why[160] = "";
    int fd = memfd("kvstore-spare", MFD_CLOEXEC | MFD_HUGETLB | huge_flag(ps));
    if (fd >= 0 && ftruncate(fd, (off_t)ps) == 0 && fallocate(fd, 0, 0, (off_t)ps) == 0)
        tmp = mmap(NULL, ps, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (tmp == MAP_FAILED) {
        snprintf(why, sizeof why, "no free %s hugepage (%s)", page_label(ps), strerror(errno));
        if (fd >= 0) close(fd);
        small = 1;
        fd = memfd("kvstore-spare-4k", MFD_CLOEXEC);
        if (fd >= 0 && ftruncate(fd, (off_t)ps) == 0 && fallocate(fd, 0, 0, (off_t)ps) == 0)
            tmp = mmap(NULL, ps, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    }
    if (tmp == MAP_FAILED) {
        snprintf(err, errlen, "%s, and no memory for 4 KiB pages either: %s", why, strerror(errno));
        if (fd >= 0) close(fd);
        __atomic_fetch_add(&a->salvage_failed, 1, __ATOMIC_RELAXED);
        return -1;
    }
    long still_lost = 0;
    /* Read the rest of the page in one call each time: the kernel stops
     * short before a poisoned 4 KiB and fails with EIO when a read starts in
     * one (each call on a poisoned hugepage is slow, so make few). A subpage
     * that cannot be read is zeroed and stays lost. */
    for (size_t o = 0; o < ps;) {
        long r = kv_arena_pread(a, (p << a->page_shift) + o, tmp + o, ps - o);
        if (r > 0) {
            o += (size_t)r;
            continue;
        }
        size_t sub = o & ~(KV_SUB_SIZE - 1);     /* EIO (or EOF): lose this subpage */
        memset(tmp + sub, 0, KV_SUB_SIZE);
        bit_set(a->poison, first + (sub >> KV_SUB_SHIFT));
        o = sub + KV_SUB_SIZE;
    }
    if (a->salvage_delay_us) usleep(a->salvage_delay_us);
    munmap(tmp, ps);
    void *m = mmap(a->base + (p << a->page_shift), ps, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_FIXED | MAP_POPULATE, fd, 0);
    if (m == MAP_FAILED) {
        snprintf(err, errlen, "MAP_FIXED of the spare page failed: %s", strerror(errno));
        close(fd);
        __atomic_fetch_add(&a->salvage_failed, 1, __ATOMIC_RELAXED);
        return -1;
    }
    int *nf = realloc(a->spare_fds, (a->nspare + 1) * sizeof(int));
    if (nf) {
        a->spare_fds = nf;
        a->spare_fds[a->nspare++] = fd;
    }
    a->page_fd[p] = fd;
    a->page_foff[p] = 0;
    if (small) {
        a->page_small[p] = 1;
        __atomic_fetch_add(&a->pages_degraded, 1, __ATOMIC_RELAXED);
    }
    size_t restored = 0;
    for (size_t i = first; i < first + per; i++) {
        bit_clear(a->armed, i);
        if (kv_bit_get(a->poison, i)) {
            still_lost++;
        } else if (kv_bit_get(a->lost, i)) {
            bit_clear(a->pending, i);
            bit_clear(a->lost, i);
            restored++;
        }
    }
    __atomic_fetch_sub(&a->lost_subpages, restored, __ATOMIC_RELAXED);
    __atomic_fetch_add(&a->subpages_salvaged, restored, __ATOMIC_RELAXED);
    __atomic_fetch_add(&a->pages_salvaged, 1, __ATOMIC_RELAXED);
    return still_lost;
}

/* Build a random cycle through one cache line of every healthy 4 KiB subpage
 * in the first `nbytes` of the arena and follow it `steps` times, inside one
 * guard. This is the TLB benchmark: with 4 KiB pages nearly every step
 * misses the TLB, with 1 GiB pages almost none does. Returns the average
 * nanoseconds per step, or -1 (no healthy subpage, fault, no memory). */
double kv_arena_chase(kv_arena *a, size_t nbytes, uint64_t steps, uint64_t seed)
{
    if (nbytes > a->size) nbytes = a->size;
    size_t nsub = nbytes >> KV_SUB_SHIFT, n = 0;
    uint64_t *node = malloc((nsub ? nsub : 1) * sizeof *node);
    if (!node) return -1;
    uint64_t x = seed * 0x9E3779B97F4A7C15ULL + 0x632BE59BD9B4E019ULL;
#define NEXT() (x ^= x << 13, x ^= x >> 7, x ^= x << 17, x)
    for (size_t i = 0; i < nsub; i++)
        if (!kv_arena_hazard(a, i << KV_SUB_SHIFT, KV_SUB_SIZE))
            node[n++] = (i << KV_SUB_SHIFT) + (NEXT() % 64) * 64;
    if (n < 2) {
        free(node);
        return -1;
    }
    for (size_t i = n - 1; i > 0; i--) {        /* Sattolo: one cycle through all */
        size_t j = NEXT() % i;
        uint64_t t = node[i];
        node[i] = node[j];
        node[j] = t;
    }
#undef NEXT
    size_t fo;
    for (size_t i = 0; i < n; i++) {
        uint64_t next = node[(i + 1) % n];
        if (kv_arena_write(a, node[i], &next, sizeof next, &fo) != 0) {
            free(node);
            return -1;
        }
    }
    uint64_t start = node[0];
    free(node);
    volatile uint64_t sink = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    uint64_t pos = start;
    const uint64_t chunk = 1 << 16;
    for (uint64_t done = 0; done < steps; done += chunk) {
        uint64_t m = steps - done < chunk ? steps - done : chunk;
        if (kv_arena_chase_steps(a, &pos, m) != 0) return -1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    sink = pos;
    (void)sink;
    double ns = (double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec);
    return steps ? ns / (double)steps : 0;
}

/* Follow the chain m steps from *pos inside one guard. */
int kv_arena_chase_steps(kv_arena *a, uint64_t *pos, uint64_t m)
{
    sigjmp_buf jb;
    kv_guard_thread_init();
    if (sigsetjmp(jb, 0)) {
        kv_guard_landed();
        return -1;
    }
    kv_guard_arm(&jb);
    uint64_t p = *pos;
    for (uint64_t i = 0; i < m; i++) p = *(volatile uint64_t *)(a->base + p);
    kv_guard_disarm();
    *pos = p;
    return 0;
}
