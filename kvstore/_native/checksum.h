/* checksum.h -- XXH64, the checksum over every record in the arena.
 *
 * Each record (header + key + value) carries an XXH64 digest so that the
 * patrol scrubber and readers can tell bytes that rotted from bytes that are
 * right, and so that Python code can check a record with the `xxhash` package
 * (xxhash.xxh64_intdigest(record, seed)).  This is our own implementation of
 * the published XXH64 algorithm (five 64-bit primes, four-lane 32-byte
 * stripes, tail mixing, final avalanche); tests/test_checksum.py compares it
 * bit for bit against the `xxhash` package.
 *
 * Records are short (16-100 bytes is the hot case), so the one-shot function
 * and its helpers are `static inline` here: the compiler then drops the call
 * and, when the length is known, most of the branching.  The streaming
 * functions, used for large values written in pieces, live in checksum.c.
 *
 * Input is read as little-endian 64- and 32-bit words through memcpy, so any
 * alignment is fine and the digest is the same on every host.
 */
#ifndef KV_CHECKSUM_H
#define KV_CHECKSUM_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define KV_XXH64_P1 0x9E3779B185EBCA87ULL
#define KV_XXH64_P2 0xC2B2AE3D27D4EB4FULL
#define KV_XXH64_P3 0x165667B19E3779F9ULL
#define KV_XXH64_P4 0x85EBCA77C2B2AE63ULL
#define KV_XXH64_P5 0x27D4EB2F165667C5ULL

/* Size of one stripe: four 8-byte lanes. */
#define KV_XXH64_STRIPE 32

/* Streaming state.  Treat as opaque; set up with kv_xxh64_reset(). */
typedef struct {
    uint64_t total_len;                 /* bytes fed so far */
    uint64_t seed;
    uint64_t acc[4];                    /* lane accumulators */
    unsigned char buf[KV_XXH64_STRIPE]; /* bytes not yet folded into acc */
    uint32_t buf_len;                   /* 0 .. KV_XXH64_STRIPE-1 */
} kv_xxh64_state;

/* Rotate x left by r bits (0 < r < 64). */
static inline uint64_t kv_xxh64_rotl(uint64_t x, unsigned r)
{
    return (x << r) | (x >> (64 - r));
}

/* Load a little-endian 64-bit word from p; p may have any alignment. */
static inline uint64_t kv_xxh64_le64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* Load a little-endian 32-bit word from p; p may have any alignment. */
static inline uint32_t kv_xxh64_le32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

/* Fold one 8-byte input lane into a lane accumulator and return it. */
static inline uint64_t kv_xxh64_round(uint64_t acc, uint64_t lane)
{
    acc += lane * KV_XXH64_P2;
    acc = kv_xxh64_rotl(acc, 31);
    return acc * KV_XXH64_P1;
}

/* Merge a finished lane accumulator into the running hash h. */
static inline uint64_t kv_xxh64_merge(uint64_t h, uint64_t acc)
{
    h ^= kv_xxh64_round(0, acc);
    return h * KV_XXH64_P1 + KV_XXH64_P4;
}

/* Process every whole stripe at p (n >= 32 bytes) into acc[4]; return the
 * number of bytes consumed (n rounded down to a multiple of 32). */
static inline size_t kv_xxh64_stripes(uint64_t acc[4],
                                      const unsigned char *p, size_t n)
{
    const unsigned char *start = p;
    const unsigned char *last = p + (n - KV_XXH64_STRIPE);
    uint64_t a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
    do {
        a0 = kv_xxh64_round(a0, kv_xxh64_le64(p));
        a1 = kv_xxh64_round(a1, kv_xxh64_le64(p + 8));
        a2 = kv_xxh64_round(a2, kv_xxh64_le64(p + 16));
        a3 = kv_xxh64_round(a3, kv_xxh64_le64(p + 24));
        p += KV_XXH64_STRIPE;
    } while (p <= last);
    acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
    return (size_t)(p - start);
}

/* Initial lane accumulators for a seed. */
static inline void kv_xxh64_acc_init(uint64_t acc[4], uint64_t seed)
{
    acc[0] = seed + KV_XXH64_P1 + KV_XXH64_P2;
    acc[1] = seed + KV_XXH64_P2;
    acc[2] = seed;
    acc[3] = seed - KV_XXH64_P1;
}

/* Combine the four lane accumulators into one hash (input was >= 32 bytes). */
static inline uint64_t kv_xxh64_converge(const uint64_t acc[4])
{
    uint64_t h = kv_xxh64_rotl(acc[0], 1) + kv_xxh64_rotl(acc[1], 7) +
                 kv_xxh64_rotl(acc[2], 12) + kv_xxh64_rotl(acc[3], 18);
    h = kv_xxh64_merge(h, acc[0]);
    h = kv_xxh64_merge(h, acc[1]);
    h = kv_xxh64_merge(h, acc[2]);
    h = kv_xxh64_merge(h, acc[3]);
    return h;
}

/* Mix the last n (< 32) bytes at p into h, then avalanche; return the
 * digest. */
static inline uint64_t kv_xxh64_finish(uint64_t h, const unsigned char *p,
                                       size_t n)
{
    while (n >= 8) {
        h ^= kv_xxh64_round(0, kv_xxh64_le64(p));
        h = kv_xxh64_rotl(h, 27) * KV_XXH64_P1 + KV_XXH64_P4;
        p += 8;
        n -= 8;
    }
    if (n >= 4) {
        h ^= (uint64_t)kv_xxh64_le32(p) * KV_XXH64_P1;
        h = kv_xxh64_rotl(h, 23) * KV_XXH64_P2 + KV_XXH64_P3;
        p += 4;
        n -= 4;
    }
    while (n > 0) {
        h ^= (uint64_t)*p * KV_XXH64_P5;
        h = kv_xxh64_rotl(h, 11) * KV_XXH64_P1;
        p++;
        n--;
    }
    h ^= h >> 33;
    h *= KV_XXH64_P2;
    h ^= h >> 29;
    h *= KV_XXH64_P3;
    h ^= h >> 32;
    return h;
}

/* XXH64 of the len bytes at data with the given seed; equal to
 * xxhash.xxh64_intdigest(bytes, seed).  data may be NULL when len is 0.
 * Pure function: no state, safe from any thread and from a signal handler. */
static inline uint64_t kv_xxh64(const void *data, size_t len, uint64_t seed)
{
    const unsigned char *p = (const unsigned char *)data;
    uint64_t h;

    if (len >= KV_XXH64_STRIPE) {
        uint64_t acc[4];
        size_t done;
        kv_xxh64_acc_init(acc, seed);
        done = kv_xxh64_stripes(acc, p, len);
        h = kv_xxh64_converge(acc);
        p += done;
        h += (uint64_t)len;
        return kv_xxh64_finish(h, p, len - done);
    }
    h = seed + KV_XXH64_P5 + (uint64_t)len;
    return kv_xxh64_finish(h, p, len);
}

/* Start a new streaming digest with the given seed.  Any previous contents of
 * *st are discarded. */
void kv_xxh64_reset(kv_xxh64_state *st, uint64_t seed);

/* Feed len more bytes at data into the digest.  data may be NULL when len is
 * 0.  Feeding a message in any split gives the same digest as kv_xxh64() of
 * the whole message. */
void kv_xxh64_update(kv_xxh64_state *st, const void *data, size_t len);

/* Digest of everything fed since the last reset.  Does not change *st, so
 * more bytes may be fed afterwards. */
uint64_t kv_xxh64_digest(const kv_xxh64_state *st);

#endif /* KV_CHECKSUM_H */
