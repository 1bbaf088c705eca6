/* resp.h - plain RESP GET/SET executed in C (the server's hot path). */
#ifndef KV_RESP_H
#define KV_RESP_H

#include <stddef.h>

#include "engine.h"

#define KV_RESP_ALLOW_SET 1   /* SET may run here (not a replica, no write observers) */
#define KV_RESP_RESP3 2       /* the connection speaks RESP3 (null is "_") */
#define KV_SLOTS 16384        /* Redis Cluster hash slots */

/* The Redis Cluster hash slot of a key: CRC16/XMODEM of the key, or of its
 * hash tag (the bytes between the first '{' and the first '}' after it,
 * when there is at least one), modulo 16384. */
unsigned kv_key_slot(const char *key, size_t n);

/* Run the leading plain GET/SET commands of b[0..len). Returns the bytes
 * consumed (whole commands only); *out (malloc'd, caller frees; may be NULL
 * when nothing ran) holds their replies, *ncmds how many ran. With max_out
 * > 0 it stops before the next command once the replies hold max_out bytes
 * (the client's output-buffer budget: the rest is left to the caller).
 * With slots != NULL (a KV_SLOTS-bit map, bit s = byte s/8, bit s%8) it
 * stops before the first command whose key's slot bit is clear. */
size_t kv_resp_fast(kv_engine *e, const char *b, size_t len, int flags, size_t max_key, size_t max_value,
                    size_t max_out, const unsigned char *slots, char **out, size_t *outlen, size_t *ncmds);

#endif
