/* guard.c - the SIGBUS handler, the arena registry and per-thread
 * alternate signal stacks. See guard.h for the contract.
 *
 * The handler is installed once per process with SA_SIGINFO|SA_ONSTACK and
 * keeps the previous disposition to chain to. Everything it does is
 * async-signal-safe: atomic bit operations on the arena bitmaps, counters, a
 * write(2) to the arena's eventfd and, for synchronous faults inside a guard,
 * siglongjmp.
 */
#define _GNU_SOURCE
#include "guard.h"
#include "arena.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

__thread kv_guard_tls kv_tls __attribute__((tls_model("initial-exec")));

#define KV_MAX_ARENAS 256

static kv_arena *g_arenas[KV_MAX_ARENAS];   /* atomic pointers */
static struct sigaction g_prev;             /* the handler before ours */
static int g_installed;
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_key_t g_stack_key;
static pthread_once_t g_key_once = PTHREAD_ONCE_INIT;
static kv_sigcounts g_counts;               /* atomic fields */

#define KV_ALTSTACK_SIZE (64 * 1024)
#define KV_SIM_ERRNO 0x6b76      /* marks signals sent by the simulator */

static kv_arena *find_arena(uintptr_t addr)
{
    for (int i = 0; i < KV_MAX_ARENAS; i++) {
        kv_arena *a = __atomic_load_n(&g_arenas[i], __ATOMIC_ACQUIRE);
        if (a && addr >= (uintptr_t)a->base && addr < (uintptr_t)a->base + a->size)
            return a;
    }
    return NULL;
}

static void cnt(uint64_t *c) { __atomic_fetch_add(c, 1, __ATOMIC_RELAXED); }

/* Hand the signal to whoever had SIGBUS before us. With the default
 * disposition, restore it and re-send the signal to this thread: it stays
 * pending while we are in the handler and kills the process on return (a real
 * fault would also re-fault on return). */
static void chain(int sig, siginfo_t *si, void *uc)
{
    cnt(&g_counts.chained);
    /* A crash handler we chained to may restore "its previous" disposition
     * (ours) and re-raise; that re-raised signal (sent by a user, si_code
     * <= 0) must not go round again: it takes the default action. A handler
     * that simply handled the signal and returned leaves nothing pending, and
     * the next SIGBUS is chained to it again. */
    if (kv_tls.chained && si->si_code <= 0) goto dfl;
    int called = 0;
    if ((g_prev.sa_flags & SA_SIGINFO) && g_prev.sa_sigaction) {
        g_prev.sa_sigaction(sig, si, uc);
        called = 1;
    } else if (!(g_prev.sa_flags & SA_SIGINFO) && g_prev.sa_handler != SIG_DFL &&
               g_prev.sa_handler != SIG_IGN && g_prev.sa_handler) {
        g_prev.sa_handler(sig);
        called = 1;
    }
    if (called) {
        sigset_t pend;
        kv_tls.chained = sigpending(&pend) == 0 && sigismember(&pend, SIGBUS) == 1;
        return;
    }
dfl:;
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(SIGBUS, &dfl, NULL);
    syscall(SYS_tgkill, getpid(), syscall(SYS_gettid), SIGBUS);
}

static void kv_sigbus(int sig, siginfo_t *si, void *uc)
{
    int saved_errno = errno;
    uintptr_t addr = (uintptr_t)si->si_addr;
    int code = si->si_code;
    int user_sent = code <= 0;          /* kill(), tgkill(), sigqueue() */
    kv_arena *a = user_sent ? NULL : find_arena(addr);

    if (!a) {
        chain(sig, si, uc);
        errno = saved_errno;
        return;
    }
    int lsb = KV_SUB_SHIFT;
    if (code == BUS_MCEERR_AR || code == BUS_MCEERR_AO) {
        lsb = si->si_addr_lsb;
        if (lsb < KV_SUB_SHIFT) lsb = KV_SUB_SHIFT;
        if (lsb > 40) lsb = 40;
        cnt(code == BUS_MCEERR_AR ? &g_counts.ar : &g_counts.ao);
    } else if (code == BUS_ADRERR) {
        cnt(&g_counts.adrerr);
    } else {
        cnt(&g_counts.other);
    }
    size_t off = addr - (uintptr_t)a->base;
    size_t mask = ((size_t)1 << lsb) - 1;
    size_t start = off & ~mask;
    kv_arena_mark_lost(a, start, mask + 1);

    if (code == BUS_MCEERR_AO) {            /* asynchronous: note and go on */
        errno = saved_errno;
        return;
    }
    if (kv_tls.injecting) {                 /* SIGBUS inside madvise(HWPOISON) */
        cnt(&g_counts.in_injection);
        errno = saved_errno;
        return;
    }
    if (kv_tls.active && kv_tls.jmp) {      /* leave the guarded access */
        kv_tls.fault_addr = addr;
        kv_tls.fault_code = code;
        kv_tls.active = 0;
        siglongjmp(*kv_tls.jmp, 1);
    }
    if (si->si_errno == KV_SIM_ERRNO) {
        /* A simulated AR that stayed queued while SIGBUS was blocked and
         * arrives after the guard gave up: no faulting instruction to re-run. */
        errno = saved_errno;
        return;
    }
    /* A synchronous fault in our arena outside any guard: a bug in the
     * store. Returning would re-run the faulting load forever. */
    chain(sig, si, uc);
    errno = saved_errno;
}

int kv_guard_is_installed(void)
{
    struct sigaction cur;
    if (sigaction(SIGBUS, NULL, &cur) != 0) return 0;
    return (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == kv_sigbus;
}

int kv_guard_install(void)
{
    int rc = 0;
    pthread_mutex_lock(&g_lock);
    if (!kv_guard_is_installed()) {
        struct sigaction sa, prev;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = kv_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGBUS, &sa, &prev) != 0) {
            rc = -1;
        } else {
            /* Chain to whatever was there (another library, faulthandler,
             * ASan, or the default). Never chain to ourselves. */
            if (!((prev.sa_flags & SA_SIGINFO) && prev.sa_sigaction == kv_sigbus))
                g_prev = prev;
            g_installed = 1;
        }
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

static void free_altstack(void *p)
{
    stack_t ss;
    memset(&ss, 0, sizeof ss);
    ss.ss_flags = SS_DISABLE;
    sigaltstack(&ss, NULL);
    munmap(p, KV_ALTSTACK_SIZE);
}

static void make_key(void) { pthread_key_create(&g_stack_key, free_altstack); }

void kv_guard_thread_init_slow(void)
{
    stack_t cur;
    kv_tls.altstack_ready = 1;
    if (sigaltstack(NULL, &cur) == 0 && !(cur.ss_flags & SS_DISABLE))
        return;                             /* the thread has one already */
    void *p = mmap(NULL, KV_ALTSTACK_SIZE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return;            /* the handler then runs on the thread stack */
    stack_t ss;
    memset(&ss, 0, sizeof ss);
    ss.ss_sp = p;
    ss.ss_size = KV_ALTSTACK_SIZE;
    if (sigaltstack(&ss, NULL) != 0) {
        munmap(p, KV_ALTSTACK_SIZE);
        return;
    }
    pthread_once(&g_key_once, make_key);
    pthread_setspecific(g_stack_key, p);
}

int kv_guard_register(kv_arena *a)
{
    for (int i = 0; i < KV_MAX_ARENAS; i++) {
        kv_arena *expect = NULL;
        if (__atomic_compare_exchange_n(&g_arenas[i], &expect, a, 0,
                                        __ATOMIC_RELEASE, __ATOMIC_RELAXED))
            return 0;
    }
    errno = ENOSPC;
    return -1;
}

void kv_guard_unregister(kv_arena *a)
{
    for (int i = 0; i < KV_MAX_ARENAS; i++) {
        kv_arena *expect = a;
        __atomic_compare_exchange_n(&g_arenas[i], &expect, NULL, 0,
                                    __ATOMIC_RELEASE, __ATOMIC_RELAXED);
    }
}

void kv_guard_after_fault(void)
{
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGBUS);
    pthread_sigmask(SIG_UNBLOCK, &s, NULL);
}

int kv_guard_raise(int code, void *addr, int lsb)
{
    siginfo_t si;
    memset(&si, 0, sizeof si);
    si.si_signo = SIGBUS;
    si.si_code = code;
    si.si_errno = KV_SIM_ERRNO;     /* kernel-made signals carry 0 here */
    si.si_addr = addr;
    si.si_addr_lsb = (short)lsb;
    return (int)syscall(SYS_rt_tgsigqueueinfo, getpid(), syscall(SYS_gettid), SIGBUS, &si);
}

void kv_guard_counts(kv_sigcounts *out)
{
    out->ao = __atomic_load_n(&g_counts.ao, __ATOMIC_RELAXED);
    out->ar = __atomic_load_n(&g_counts.ar, __ATOMIC_RELAXED);
    out->adrerr = __atomic_load_n(&g_counts.adrerr, __ATOMIC_RELAXED);
    out->other = __atomic_load_n(&g_counts.other, __ATOMIC_RELAXED);
    out->chained = __atomic_load_n(&g_counts.chained, __ATOMIC_RELAXED);
    out->in_injection = __atomic_load_n(&g_counts.in_injection, __ATOMIC_RELAXED);
}

int kv_guard_raw_load(uintptr_t addr)
{
    return *(volatile uint8_t *)addr;
}
