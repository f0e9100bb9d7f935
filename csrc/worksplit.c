/* Contiguous per-thread ranges with stealing of the busiest thread's upper half (see worksplit.h). */
#include "worksplit.h"

static uint64_t pack(uint64_t lo, uint64_t hi) { return lo | hi << 32; }

void pe_split_init(pe_split *s, int64_t n_items, int n_threads, int64_t step) {
    if (n_threads < 1) n_threads = 1;
    if (n_threads > PE_SPLIT_MAX_THREADS) n_threads = PE_SPLIT_MAX_THREADS;
    s->n_threads = n_threads;
    s->step = step < 1 ? 1 : step;
    for (int i = 0; i < n_threads; i++)
        atomic_store_explicit(&s->slot[i].range,
                              pack((uint64_t)(n_items * i / n_threads), (uint64_t)(n_items * (i + 1) / n_threads)),
                              memory_order_relaxed);
}

/* Take up to `step` items from the front of slot `me`. */
static int take_front(pe_split *s, int me, int64_t *a, int64_t *b) {
    _Atomic uint64_t *r = &s->slot[me].range;
    uint64_t v = atomic_load_explicit(r, memory_order_acquire);
    for (;;) {
        const uint64_t lo = v & 0xffffffffu, hi = v >> 32;
        if (lo >= hi) return 0;
        const uint64_t end = hi - lo > (uint64_t)s->step ? lo + (uint64_t)s->step : hi;
        if (atomic_compare_exchange_weak_explicit(r, &v, pack(end, hi), memory_order_acq_rel, memory_order_acquire)) {
            *a = (int64_t)lo, *b = (int64_t)end;
            return 1;
        }
    }
}

/* Move the upper half of the busiest other slot's remaining items into slot `me` (empty). 0 when
 * every slot is empty. */
static int steal(pe_split *s, int me) {
    for (;;) {
        int victim = -1;
        uint64_t most = 0, seen = 0;
        for (int i = 0; i < s->n_threads; i++) {
            if (i == me) continue;
            const uint64_t v = atomic_load_explicit(&s->slot[i].range, memory_order_acquire);
            const uint64_t lo = v & 0xffffffffu, hi = v >> 32;
            if (hi > lo && hi - lo > most) most = hi - lo, victim = i, seen = v;
        }
        if (victim < 0) return 0;
        const uint64_t lo = seen & 0xffffffffu, hi = seen >> 32;
        const uint64_t cut = hi - (hi - lo + 1) / 2; /* the thief takes [cut, hi): at least one item */
        if (atomic_compare_exchange_strong_explicit(&s->slot[victim].range, &seen, pack(lo, cut),
                                                    memory_order_acq_rel, memory_order_acquire)) {
            atomic_store_explicit(&s->slot[me].range, pack(cut, hi), memory_order_release);
            return 1;
        }
        /* the victim moved on (or another thief came first): look again */
    }
}

int pe_split_next(pe_split *s, int tid, int64_t *a, int64_t *b) {
    if (tid >= s->n_threads) return 0; /* beyond PE_SPLIT_MAX_THREADS: the others do its share */
    while (!take_front(s, tid, a, b))
        if (!steal(s, tid)) return 0;
    return 1;
}
