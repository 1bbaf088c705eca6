/* resp.c - the server's hot path in C: plain RESP GET and SET.
 *
 * redis-benchmark and most cache clients send little else than
 * `*2 $3 GET <key>` and `*3 $3 SET <key> <value>`. kv_resp_fast() parses as
 * many complete commands of exactly that shape as the buffer holds, runs them
 * against the engine and appends the replies. It stops, without consuming,
 * at the first command that is anything else, incomplete, or that needs the
 * Python layer (a LOST key to repair, a full store to report, a key over
 * the limit): the Python parser takes over from there, so behaviour is the
 * same whichever path runs a command.
 *
 * In cluster mode the caller also passes the node's "fast slots" bitmap
 * (kv_resp_fast's `slots`): a command runs here only when its key's hash
 * slot (kv_key_slot, Redis Cluster's keyHashSlot) has its bit set, i.e.
 * this node serves that slot with no redirect, migration or ASKING to
 * consider. Any other key stops the fast path, and the Python routing hook
 * answers MOVED, ASK or CLUSTERDOWN.
 */
#define _GNU_SOURCE
#include "resp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char *p;
    size_t n, cap;
} obuf;

static int ob_reserve(obuf *o, size_t more)
{
    if (o->n + more <= o->cap) return 0;
    size_t nc = o->cap ? o->cap : 4096;
    while (nc < o->n + more) nc *= 2;
    char *q = realloc(o->p, nc);
    if (!q) return -1;
    o->p = q;
    o->cap = nc;
    return 0;
}

static int ob_put(obuf *o, const void *s, size_t n)
{
    if (ob_reserve(o, n)) return -1;
    memcpy(o->p + o->n, s, n);
    o->n += n;
    return 0;
}

/* Parse "<digits>\r\n" at *pos (after the type byte). -1 malformed or too
 * long, 0 incomplete, 1 ok. Only the canonical form Redis's string2ll takes
 * for a non-negative length: no sign, no space, no leading zero ("0" alone
 * is fine). Anything else stops the fast path and the Python parser reports
 * it as Redis does. */
static int parse_len(const char *b, size_t len, size_t *pos, size_t *out, size_t max)
{
    size_t i = *pos, v = 0;
    int digits = 0;
    while (i < len && b[i] >= '0' && b[i] <= '9') {
        if (digits == 1 && v == 0) return -1;     /* leading zero */
        v = v * 10 + (size_t)(b[i] - '0');
        if (v > max) return -1;
        i++;
        digits++;
    }
    if (i + 1 >= len) return i >= len || digits ? 0 : -1;
    if (!digits || b[i] != '\r' || b[i + 1] != '\n') return -1;
    *pos = i + 2;
    *out = v;
    return 1;
}

/* One bulk string "$<n>\r\n<data>\r\n" at *pos. */
static int parse_bulk(const char *b, size_t len, size_t *pos, const char **data, size_t *n, size_t max)
{
    size_t i = *pos;
    if (i >= len) return 0;
    if (b[i] != '$') return -1;
    i++;
    int r = parse_len(b, len, &i, n, max);
    if (r <= 0) return r;
    if (i + *n + 2 > len) return 0;
    if (b[i + *n] != '\r' || b[i + *n + 1] != '\n') return -1;
    *data = b + i;
    *pos = i + *n + 2;
    return 1;
}

/* CRC16/XMODEM (poly 0x1021, init 0, no reflection, no final xor), as
 * Redis Cluster; crc16_tab[i] is the CRC of the byte i. */
static uint16_t crc16_tab[256];
static int crc16_ready;

static void crc16_init(void)
{
    for (unsigned i = 0; i < 256; i++) {
        unsigned c = i << 8;
        for (int j = 0; j < 8; j++) c = (c & 0x8000) ? (c << 1) ^ 0x1021 : c << 1;
        crc16_tab[i] = (uint16_t)c;
    }
    __atomic_store_n(&crc16_ready, 1, __ATOMIC_RELEASE);
}

static uint16_t crc16(const unsigned char *p, size_t n)
{
    uint16_t crc = 0;
    for (size_t i = 0; i < n; i++) crc = (uint16_t)((crc << 8) ^ crc16_tab[((crc >> 8) ^ p[i]) & 0xff]);
    return crc;
}

unsigned kv_key_slot(const char *key, size_t n)
{
    if (!__atomic_load_n(&crc16_ready, __ATOMIC_ACQUIRE)) crc16_init();
    const unsigned char *k = (const unsigned char *)key;
    const unsigned char *open = memchr(k, '{', n);
    if (open) {
        size_t s = (size_t)(open - k) + 1;
        const unsigned char *close = memchr(k + s, '}', n - s);
        if (close && close > k + s) return crc16(k + s, (size_t)(close - (k + s))) & (KV_SLOTS - 1);
    }
    return crc16(k, n) & (KV_SLOTS - 1);
}

static int is_cmd(const char *s, size_t n, const char *name)
{
    return n == 3 && (s[0] | 0x20) == name[0] && (s[1] | 0x20) == name[1] && (s[2] | 0x20) == name[2];
}

/* Value destination for kv_eng_get: "$<len>\r\n" then the value, written
 * after the replies so far (o->n moves only when the command completes). */
typedef struct {
    obuf *o;
    size_t hn, vlen;
} obuf_val;

static void *obuf_val_buf(void *ctx, size_t n)
{
    obuf_val *v = ctx;
    char hdr[32];
    int hn = snprintf(hdr, sizeof hdr, "$%zu\r\n", n);
    if (ob_reserve(v->o, (size_t)hn + n + 2)) return NULL;
    memcpy(v->o->p + v->o->n, hdr, (size_t)hn);
    v->hn = (size_t)hn;
    v->vlen = n;
    return v->o->p + v->o->n + hn;
}

size_t kv_resp_fast(kv_engine *e, const char *b, size_t len, int flags, size_t max_key, size_t max_value,
                    size_t max_out, const unsigned char *slots, char **out, size_t *outlen, size_t *ncmds)
{
    obuf o = {0};
    size_t pos = 0, done = 0;
    *ncmds = 0;
    uint64_t now = 0;
    while (pos < len && b[pos] == '*') {
        if (max_out && o.n >= max_out) break;   /* output budget spent: the caller decides */
        size_t i = pos + 1, argc;
        if (parse_len(b, len, &i, &argc, 16) != 1 || argc < 2 || argc > 3) break;
        const char *cmd, *key, *val = NULL;
        size_t cn, kn, vn = 0;
        if (parse_bulk(b, len, &i, &cmd, &cn, 16) != 1) break;
        int get = argc == 2 && is_cmd(cmd, cn, "get");
        int set = argc == 3 && (flags & KV_RESP_ALLOW_SET) && is_cmd(cmd, cn, "set");
        if (!get && !set) break;
        if (parse_bulk(b, len, &i, &key, &kn, max_key) != 1) break;
        if (set && parse_bulk(b, len, &i, &val, &vn, max_value) != 1) break;
        if (slots) {
            unsigned slot = kv_key_slot(key, kn);
            if (!(slots[slot >> 3] & (1u << (slot & 7)))) break;   /* routed by Python */
        }
        if (get) {
            if (!now) now = kv_now_ms();
            obuf_val ov = {&o, 0};
            kv_info info;
            size_t mark = o.n;
            int rc = kv_eng_get(e, key, (uint32_t)kn, now, obuf_val_buf, &ov, &info);
            if (rc == KV_ABSENT) {
                o.n = mark;
                if (flags & KV_RESP_RESP3 ? ob_put(&o, "_\r\n", 3) : ob_put(&o, "$-1\r\n", 5)) break;
            } else if (rc != KV_OK) {
                o.n = mark;
                break;                        /* lost: the Python layer repairs or reports */
            } else {
                o.n = mark + ov.hn + ov.vlen;
                if (ob_put(&o, "\r\n", 2)) {
                    o.n = mark;
                    break;
                }
            }
        } else {
            uint64_t ver;
            if (kv_eng_put(e, key, (uint32_t)kn, val, vn, 0, 0, &ver) != KV_OK) break;
            if (ob_put(&o, "+OK\r\n", 5)) break;
        }
        pos = done = i;
        (*ncmds)++;
    }
    *out = o.p;
    *outlen = o.n;
    return done;
}
