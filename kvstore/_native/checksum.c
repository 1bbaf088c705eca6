/* checksum.c -- streaming XXH64.
 *
 * The one-shot kv_xxh64() and the round helpers are static inline in
 * checksum.h (records are short and the call overhead matters there).  This
 * file holds the streaming form, for checksumming a value that arrives or is
 * copied in pieces: bytes are buffered until a whole 32-byte stripe is
 * available, stripes go straight from the caller's buffer when possible, and
 * the digest can be taken at any point without disturbing the state.
 */
#include "checksum.h"

/* Start a new streaming digest with the given seed. */
void kv_xxh64_reset(kv_xxh64_state *st, uint64_t seed)
{
    memset(st, 0, sizeof *st);
    st->seed = seed;
    kv_xxh64_acc_init(st->acc, seed);
}

/* Feed len bytes at data.  Keeps at most 31 bytes buffered between calls;
 * everything past the buffered prefix is hashed in place. */
void kv_xxh64_update(kv_xxh64_state *st, const void *data, size_t len)
{
    const unsigned char *p = (const unsigned char *)data;

    if (len == 0)
        return;
    st->total_len += (uint64_t)len;

    /* Not enough for a stripe yet: just buffer. */
    if (st->buf_len + len < KV_XXH64_STRIPE) {
        memcpy(st->buf + st->buf_len, p, len);
        st->buf_len += (uint32_t)len;
        return;
    }

    /* Complete the buffered stripe first. */
    if (st->buf_len > 0) {
        size_t fill = KV_XXH64_STRIPE - st->buf_len;
        memcpy(st->buf + st->buf_len, p, fill);
        kv_xxh64_stripes(st->acc, st->buf, KV_XXH64_STRIPE);
        p += fill;
        len -= fill;
        st->buf_len = 0;
    }

    /* Whole stripes straight from the input. */
    if (len >= KV_XXH64_STRIPE) {
        size_t done = kv_xxh64_stripes(st->acc, p, len);
        p += done;
        len -= done;
    }

    /* Keep the tail for next time. */
    if (len > 0) {
        memcpy(st->buf, p, len);
        st->buf_len = (uint32_t)len;
    }
}

/* Digest of everything fed so far; *st is left as it was. */
uint64_t kv_xxh64_digest(const kv_xxh64_state *st)
{
    uint64_t h;

    if (st->total_len >= KV_XXH64_STRIPE)
        h = kv_xxh64_converge(st->acc);
    else
        h = st->seed + KV_XXH64_P5;
    h += st->total_len;
    return kv_xxh64_finish(h, st->buf, st->buf_len);
}
