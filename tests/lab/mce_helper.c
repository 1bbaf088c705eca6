/* mce_helper.c - a second process for the kernel memory-failure lab.
 *
 * It maps a file (typically another process's arena memfd, opened through
 * /proc/<pid>/fd/<n>) shared, and either poisons one 4 KiB page of it with
 * madvise(MADV_HWPOISON) or touches one byte of it. Every SIGBUS it receives
 * is recorded (si_code, offset in the file, si_addr_lsb) by an
 * async-signal-safe handler and printed afterwards as one JSON line:
 *
 *   {"op": "poison", "rc": 0, "errno": 0, "signals": [{"code": 4, "off": 8192, "lsb": 30}]}
 *
 *   mce_helper poison PATH OFFSET   madvise(MADV_HWPOISON) the 4 KiB at OFFSET
 *   mce_helper touch  PATH OFFSET   read the byte at OFFSET ("byte" in the output)
 *
 * A SIGBUS raised by a touch is left with siglongjmp (returning would re-run
 * the load); one raised inside madvise returns normally. The helper does not
 * ask for early kill, so it only hears about poison it causes or touches.
 * Exit status 0 when the JSON line was printed, 2 on a usage or setup error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef MADV_HWPOISON
#define MADV_HWPOISON 100
#endif

#define MAX_SIGNALS 16

static volatile sig_atomic_t n_signals;
static int sig_code[MAX_SIGNALS];
static uintptr_t sig_addr[MAX_SIGNALS];
static int sig_lsb[MAX_SIGNALS];
static sigjmp_buf touch_jb;
static volatile sig_atomic_t touching;

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
    (void)sig;
    (void)uc;
    int i = n_signals;
    if (i < MAX_SIGNALS) {
        sig_code[i] = si->si_code;
        sig_addr[i] = (uintptr_t)si->si_addr;
        sig_lsb[i] = (si->si_code == BUS_MCEERR_AR || si->si_code == BUS_MCEERR_AO) ? si->si_addr_lsb : 0;
        n_signals = i + 1;
    }
    if (touching) {
        touching = 0;
        siglongjmp(touch_jb, 1);
    }
}

static void print_result(const char *op, int rc, int err, uint8_t *base, int have_byte, int byte)
{
    printf("{\"op\": \"%s\", \"rc\": %d, \"errno\": %d, \"signals\": [", op, rc, err);
    for (int i = 0; i < n_signals && i < MAX_SIGNALS; i++) {
        long long off = (long long)(sig_addr[i] - (uintptr_t)base);
        printf("%s{\"code\": %d, \"off\": %lld, \"lsb\": %d}", i ? ", " : "", sig_code[i], off, sig_lsb[i]);
    }
    printf("]");
    if (have_byte) printf(", \"byte\": %d", byte);
    printf("}\n");
    fflush(stdout);
}

int main(int argc, char **argv)
{
    if (argc != 4 || (strcmp(argv[1], "poison") && strcmp(argv[1], "touch"))) {
        fprintf(stderr, "usage: %s poison|touch PATH OFFSET\n", argv[0]);
        return 2;
    }
    const char *op = argv[1], *path = argv[2];
    char *end;
    errno = 0;
    unsigned long long off = strtoull(argv[3], &end, 0);
    if (errno || *end) {
        fprintf(stderr, "bad offset %s\n", argv[3]);
        return 2;
    }
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        fprintf(stderr, "open %s: %s\n", path, strerror(errno));
        return 2;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size <= 0 || off >= (unsigned long long)st.st_size) {
        fprintf(stderr, "%s: size %lld, offset %llu out of range\n", path, (long long)st.st_size, off);
        return 2;
    }
    uint8_t *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        fprintf(stderr, "mmap %s (%lld bytes): %s\n", path, (long long)st.st_size, strerror(errno));
        return 2;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, NULL) != 0) {
        fprintf(stderr, "sigaction: %s\n", strerror(errno));
        return 2;
    }
    if (!strcmp(op, "poison")) {
        int rc = madvise(base + (off & ~4095ULL), 4096, MADV_HWPOISON);
        int e = rc ? errno : 0;
        print_result(op, rc, e, base, 0, 0);
        return 0;
    }
    /* volatile: both are read after a siglongjmp out of the load. */
    volatile int byte = -1, have = 0;
    if (sigsetjmp(touch_jb, 1) == 0) {
        touching = 1;
        byte = *(volatile uint8_t *)(base + off);
        touching = 0;
        have = 1;
    }
    print_result(op, 0, 0, base, have, byte);
    return 0;
}
