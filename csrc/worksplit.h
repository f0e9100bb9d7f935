/* Splitting a parallel loop's items (row groups, tiles) between the threads of a team, with stealing.
 *
 * Why: decode streams weights from memory, and on a 2-core VM the two cores do not get equal shares
 * of the bandwidth from one moment to the next. With OpenMP's static split, each region (q|k|v, the
 * experts' gate|up, down, the output head: ~100 per token) ended with one thread idle while the other
 * finished: summed over 9,409 decode regions of the 20b synth file, 0.82-1.15 s of 7.7-9.2 s of
 * region time (2026-12-03, 2 threads); with this split 0.065 s. Dynamic or guided schedules also
 * remove the wait, but hand out interleaved chunks, which breaks the one sequential stream per
 * thread that the decode kernels' next-group prefetch relies on: measured 3-4 % slower than static.
 * This split, against the static one (bench/ab_builds.py, paired): decode +2 %, prefill +3.5 %
 * (when one thread idles, the other gets the whole bandwidth, so the idle time costs less than it
 * seems).
 *
 * Here thread i owns the contiguous range [i n / T, (i + 1) n / T) and takes it front to back, a few
 * items at a time; a thread that runs out steals the upper half of what the busiest thread has left
 * and walks that front to back. So every thread still reads long ascending runs, and only the end of
 * the loop moves between threads. Which thread computes an item never changes a result bit (each
 * item writes only its own outputs), so results stay independent of the thread count and timing.
 *
 * Usage, inside `#pragma omp parallel` (every thread of the team must call pe_split_next until it
 * returns 0):
 *     pe_split s;              // shared, declared before the region
 *     pe_split_init(&s, n_items, n_threads_of_the_team, step);
 *     ...
 *     int64_t a, b;
 *     while (pe_split_next(&s, omp_get_thread_num(), &a, &b)) for (i = a; i < b; i++) work(i);
 */
#ifndef PE_WORKSPLIT_H
#define PE_WORKSPLIT_H

#include <stdatomic.h>
#include <stdint.h>

enum { PE_SPLIT_MAX_THREADS = 256 };

typedef struct {
    _Alignas(64) _Atomic uint64_t range; /* lo | hi << 32: items [lo, hi) not yet taken */
    char pad[56];                        /* one cache line per thread */
} pe_split_slot;

typedef struct {
    pe_split_slot slot[PE_SPLIT_MAX_THREADS];
    int n_threads;
    int64_t step; /* items a thread takes from its own range at a time */
} pe_split;

/* n_items < 2^32; n_threads: the num_threads the region asks for (clamped to [1, PE_SPLIT_MAX_THREADS];
 * when OpenMP gives the team fewer threads, or more than the clamp, the missing owners' ranges are
 * stolen by the others); step >= 1. Call before the parallel region. */
void pe_split_init(pe_split *s, int64_t n_items, int n_threads, int64_t step);

/* The next items [*a, *b) for thread `tid` (its own range first, then stolen halves); 0 when none are
 * left anywhere. Lock-free: one compare-and-swap per take. */
int pe_split_next(pe_split *s, int tid, int64_t *a, int64_t *b);

#endif
