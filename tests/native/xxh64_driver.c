/* xxh64_driver.c -- standalone test driver for kvstore/_native/checksum.c.
 *
 * Built by tests/test_checksum.py with gcc (plain and with ASan/UBSan), outside
 * the Python extension, so the checksum can be checked bit for bit against the
 * `xxhash` package before and independently of the extension build.
 *
 * Reads commands from stdin, one per line, and writes one line per command:
 *
 *   H <seed> <align> <hex>     one-shot kv_xxh64 of the bytes, placed <align>
 *                              bytes into an exactly sized heap buffer (so the
 *                              sanitizers see any over-read or misaligned
 *                              load); empty <hex> hashes NULL with len 0.
 *                              Prints the digest as 16 hex digits.
 *   S <seed> <hex>:<hex>:...   streaming: reset, then one update per chunk
 *                              (chunks may be empty), each chunk in its own
 *                              exactly sized buffer.  Prints the digest taken
 *                              after the reset and after every update,
 *                              space-separated.
 *
 * `xxh64_driver bench LEN...` prints nanoseconds per one-shot hash for each
 * input length instead (a quick measurement, not a benchmark).
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "checksum.h"

static void die(const char *what)
{
    fprintf(stderr, "xxh64_driver: %s\n", what);
    exit(2);
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Decode n hex digits at s into a new heap buffer of exactly n/2 + align
 * bytes; return the buffer (NULL when the result is empty and align is 0) and
 * store the decoded length in *len. */
static unsigned char *decode(const char *s, size_t n, size_t align, size_t *len)
{
    unsigned char *buf;
    size_t i;

    if (n % 2)
        die("odd number of hex digits");
    *len = n / 2;
    if (*len + align == 0)
        return NULL;
    buf = malloc(*len + align);
    if (!buf)
        die("out of memory");
    memset(buf, 0xA5, align);
    for (i = 0; i < *len; i++) {
        int hi = hexval((unsigned char)s[2 * i]);
        int lo = hexval((unsigned char)s[2 * i + 1]);
        if (hi < 0 || lo < 0)
            die("bad hex digit");
        buf[align + i] = (unsigned char)(hi << 4 | lo);
    }
    return buf;
}

static uint64_t parse_u64(char **cursor)
{
    char *end;
    unsigned long long v;

    errno = 0;
    v = strtoull(*cursor, &end, 10);
    if (errno || end == *cursor || *end != ' ')
        die("bad number");
    *cursor = end + 1;
    return (uint64_t)v;
}

static void one_shot(char *args)
{
    uint64_t seed = parse_u64(&args);
    size_t align = (size_t)parse_u64(&args);
    size_t len;
    unsigned char *buf = decode(args, strlen(args), align, &len);
    const unsigned char *data = len ? buf + align : NULL;

    printf("%016llx\n", (unsigned long long)kv_xxh64(data, len, seed));
    free(buf);
}

static void streaming(char *args)
{
    uint64_t seed = parse_u64(&args);
    kv_xxh64_state st;
    char *chunk = args;

    kv_xxh64_reset(&st, seed);
    printf("%016llx", (unsigned long long)kv_xxh64_digest(&st));
    for (;;) {
        char *colon = strchr(chunk, ':');
        size_t n = colon ? (size_t)(colon - chunk) : strlen(chunk);
        size_t len;
        unsigned char *buf = decode(chunk, n, 0, &len);

        kv_xxh64_update(&st, buf, len);
        free(buf);
        printf(" %016llx", (unsigned long long)kv_xxh64_digest(&st));
        if (!colon)
            break;
        chunk = colon + 1;
    }
    printf("\n");
}

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* Hash a len-byte buffer repeatedly for ~0.2 s; each digest feeds the next
 * seed so the calls cannot be hoisted or overlapped away. */
static void bench(size_t len)
{
    unsigned char *buf = malloc(len ? len : 1);
    uint64_t h = 0, iters = 0, batch = 1024;
    double t0, t1;
    size_t i;

    if (!buf)
        die("out of memory");
    for (i = 0; i < len; i++)
        buf[i] = (unsigned char)(i * 131 + 7);
    t0 = now_ns();
    do {
        uint64_t k;
        for (k = 0; k < batch; k++)
            h = kv_xxh64(buf, len, h);
        iters += batch;
        t1 = now_ns();
    } while (t1 - t0 < 2e8);
    printf("%zu %.2f %.0f %016llx\n", len, (t1 - t0) / (double)iters,
           (double)len * (double)iters / ((t1 - t0) / 1e9) / 1e6,
           (unsigned long long)h);
    free(buf);
}

int main(int argc, char **argv)
{
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;

    if (argc > 1 && strcmp(argv[1], "bench") == 0) {
        int i;
        printf("# len ns_per_hash MB_per_s last_digest\n");
        for (i = 2; i < argc; i++)
            bench((size_t)strtoull(argv[i], NULL, 10));
        return 0;
    }
    while ((n = getline(&line, &cap, stdin)) >= 0) {
        if (n > 0 && line[n - 1] == '\n')
            line[--n] = '\0';
        if (n >= 2 && line[0] == 'H' && line[1] == ' ')
            one_shot(line + 2);
        else if (n >= 2 && line[0] == 'S' && line[1] == ' ')
            streaming(line + 2);
        else
            die("unknown command");
    }
    free(line);
    return 0;
}
