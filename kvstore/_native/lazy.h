/* lazy.h - deferred validation of the records of an adopted arena.
 *
 * Adoption (adopt.c) checks the header, the directory and the index pages
 * before the store serves, and walks the entries once (sequential reads of
 * the index pages) to learn which record subpages they reference. It does
 * not read a single record: the record headers, their bounds, overlaps and
 * the allocator's metadata of every record subpage are settled here, one
 * subpage at a time, when something first needs that subpage:
 *
 *   - a read (or any use) of a record in an unvalidated subpage validates
 *     the subpage first (the engine's rec_header);
 *   - an allocation that finds no free subpage validates more of the arena
 *     until it does (kv_lazy_room): a subpage is handed out only after it
 *     was validated as free;
 *   - a memory error on an unvalidated subpage makes the entries that
 *     reference it LOST (kv_lazy_settle_lost);
 *   - the background pass (kv_lazy_step, from the scrubber) validates the
 *     rest in address order.
 *
 * The rules that keep allocation from overwriting a record not yet
 * validated:
 *
 *   - a subpage some PRESENT entry referenced at adoption ("referenced") is
 *     validated by reading the headers of exactly those records;
 *   - a large record claims its continuation subpages only if none of them
 *     is referenced, validated or lost when it is validated (otherwise it
 *     overlaps something and becomes LOST);
 *   - an unreferenced subpage becomes free only after the nearest referenced
 *     or validated subpage below it was validated and does not cover it.
 *
 * Entries that change while their record subpage is unvalidated always go
 * through rec_header first (overwrite, delete, expiry), so the subpage is
 * validated before its entry moves on. Entries that vanish with a lost index
 * page are recognised by hash (kv_lazy_range_lost): their records are not
 * claimed. Record checksums stay the last word: the background pass checks
 * every one after the structure is settled, and a read checks its own.
 */
#ifndef KV_LAZY_H
#define KV_LAZY_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint64_t offx;         /* record offset the entry named at adoption (bits 0..39);
                              a long key's length, kept in the record (40..57) */
    uint64_t h;            /* the key's hash (its group; finds the entry again) */
    uint64_t len;          /* during validation: record length; 0 stale, ~0 bad */
} kv_lazy_item;

#define KV_LAZY_OFF(it) ((it)->offx & ((1ULL << 40) - 1))
#define KV_LAZY_EXTRA(it) ((uint32_t)((it)->offx >> 40))

typedef struct kv_lazy {
    uint64_t *unval;       /* bit per subpage: not validated yet */
    size_t n_unval;
    uint32_t *start;       /* items of subpage s: item[start[s] .. start[s + 1]) */
    kv_lazy_item *item;
    size_t nitems;
    size_t cursor;         /* background pass */
    size_t room_cursor;    /* where kv_lazy_room looks for the next free run */
    uint64_t (*dead)[2];   /* hash ranges whose index page was lost since adoption */
    size_t dead_n, dead_cap;
    uint8_t *pagebuf;      /* one index page (entry lookups) */
    /* counters */
    uint64_t records, records_bad, subpages_validated, on_demand;
} kv_lazy;

static inline int kv_lazy_bit(const kv_lazy *z, size_t s) { return (int)((z->unval[s >> 6] >> (s & 63)) & 1); }

#endif
