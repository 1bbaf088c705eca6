/* guard.h - the process-wide SIGBUS handler and guarded arena access.
 *
 * Every byte of an arena is read or written inside a guard: a sigsetjmp
 * landing pad published in thread-local storage. When the hardware (or the
 * fault simulator) raises SIGBUS for an address inside one of our arenas, the
 * handler marks the lost subpages in that arena's bitmaps, counts the signal,
 * wakes the arena's eventfd and, if the thread was inside a guard and the
 * fault is synchronous (BUS_MCEERR_AR or a faulting mapping), siglongjmps
 * back to the guard, which returns an error naming the offset.
 *
 * Signals for addresses outside our arenas are passed to the handler that
 * was installed before ours (so a real bug still crashes the process).
 */
#ifndef KV_GUARD_H
#define KV_GUARD_H

#include <setjmp.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#ifndef BUS_MCEERR_AR
#define BUS_MCEERR_AR 4
#endif
#ifndef BUS_MCEERR_AO
#define BUS_MCEERR_AO 5
#endif

struct kv_arena;

/* Per-thread guard state. initial-exec TLS so the signal handler never has to
 * allocate a TLS block. */
typedef struct {
    sigjmp_buf *jmp;             /* landing pad, NULL outside a guard */
    volatile int active;         /* inside a guarded access */
    volatile int injecting;      /* inside madvise(MADV_HWPOISON) */
    volatile uintptr_t fault_addr;   /* address reported by the last fault */
    volatile int fault_code;     /* si_code of the last fault */
    int altstack_ready;
    int chained;                 /* this thread passed a SIGBUS on already */
} kv_guard_tls;

extern __thread kv_guard_tls kv_tls __attribute__((tls_model("initial-exec")));

/* Install our SIGBUS handler (idempotent). If another handler replaced ours
 * since, reinstall ours on top and chain to the newcomer. Returns 0 or -1
 * with errno set. */
int kv_guard_install(void);

/* 1 if our handler is the one currently installed for SIGBUS. */
int kv_guard_is_installed(void);

/* kv_guard_thread_init() (below) makes sure the calling thread has an
 * alternate signal stack: allocated the first time a thread touches an
 * arena, freed at thread exit. */

/* Register / unregister an arena so the handler can find it by address.
 * Returns 0 or -1 (registry full). */
int kv_guard_register(struct kv_arena *a);
void kv_guard_unregister(struct kv_arena *a);

/* Called on the landing path after a siglongjmp: the handler ran with SIGBUS
 * blocked and sigsetjmp(.., 0) did not save the mask, so unblock it again. */
void kv_guard_after_fault(void);

/* Send SIGBUS with the given si_code/address/lsb to the calling thread
 * (rt_tgsigqueueinfo). The handler runs before this returns. */
int kv_guard_raise(int code, void *addr, int lsb);

/* Process-wide counters of SIGBUS signals seen by our handler. */
typedef struct {
    uint64_t ao, ar, adrerr, other, chained, in_injection;
} kv_sigcounts;
void kv_guard_counts(kv_sigcounts *out);

/* Test hook: load one byte from an absolute address without a guard. */
int kv_guard_raw_load(uintptr_t addr);

/* Guarded section, used inside one C function:
 *
 *     sigjmp_buf jb;
 *     kv_guard_thread_init();
 *     if (sigsetjmp(jb, 0)) { kv_guard_landed(); ... fault: kv_tls.fault_addr ... }
 *     kv_guard_arm(&jb);
 *     ... touch arena ...
 *     kv_guard_disarm();
 *
 * sigsetjmp must stand alone as the controlling expression (C rules), hence
 * no macro. The function holding jb must not return between arm and disarm.
 * Locals modified between arm and a fault must be volatile to be read on the
 * fault path. sigsetjmp(.., 0) does not save the signal mask (a syscall);
 * kv_guard_landed() unblocks SIGBUS instead, only on the fault path. */
void kv_guard_thread_init_slow(void);
static inline void kv_guard_thread_init(void)
{
    if (__builtin_expect(!kv_tls.altstack_ready, 0))
        kv_guard_thread_init_slow();
}
static inline void kv_guard_arm(sigjmp_buf *jb)
{
    kv_tls.jmp = jb;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    kv_tls.active = 1;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}
static inline void kv_guard_disarm(void)
{
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    kv_tls.active = 0;
    kv_tls.jmp = NULL;
}
static inline void kv_guard_landed(void)
{
    kv_tls.active = 0;
    kv_tls.jmp = NULL;
    kv_guard_after_fault();
}

#endif
