# cython: language_level=3
"""The C core's work split between threads (csrc/worksplit.h), driven from Python so the tests can
check its promise under real contention: every item taken exactly once, by contiguous runs, for any
team size, with the end of a slow thread's range taken over by the others."""

cimport cython
from cython.parallel cimport parallel
cimport openmp
from libc.stdint cimport int64_t, int32_t
from libc.stdlib cimport malloc, free
import numpy as np
cimport numpy as cnp

cnp.import_array()

cdef extern from "worksplit.h" nogil:
    ctypedef struct pe_split:
        pass
    void pe_split_init(pe_split *s, int64_t n_items, int n_threads, int64_t step)
    int pe_split_next(pe_split *s, int tid, int64_t *a, int64_t *b)

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec *tp)
    int CLOCK_MONOTONIC


cdef inline double _now() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec + 1e-9 * t.tv_nsec


@cython.boundscheck(False)
@cython.wraparound(False)
def cover(int64_t n_items, int n_threads, int64_t step, int team, double slow_us=0.0):
    """Run one split of `n_items` prepared for `n_threads` on an OpenMP team of `team` threads; thread 0
    busy-waits `slow_us` microseconds per item. Returns (taker, count): int32 arrays over the items,
    the thread that took each item (the last one, if several did) and how many times it was taken."""
    if n_items < 0 or n_items >= 2 ** 32 or n_threads < 1 or step < 1 or team < 1:
        raise ValueError("bad split arguments")
    cdef cnp.ndarray[int32_t, ndim=1] taker = np.full(n_items, -1, dtype=np.int32)
    cdef cnp.ndarray[int32_t, ndim=1] count = np.zeros(n_items, dtype=np.int32)
    cdef int32_t *tk = <int32_t *>taker.data
    cdef int32_t *ct = <int32_t *>count.data
    cdef pe_split *s = <pe_split *>malloc(sizeof(pe_split) + 64)
    if s == NULL:
        raise MemoryError()
    cdef pe_split *sa = <pe_split *>((<size_t>s + 63) // 64 * 64)
    cdef int64_t a, b, i
    cdef int tid
    cdef double t0
    pe_split_init(sa, n_items, n_threads, step)
    with nogil, parallel(num_threads=team):
        tid = openmp.omp_get_thread_num()
        a = 0
        b = 0
        while pe_split_next(sa, tid, &a, &b):
            i = a
            while i < b:
                # count[i] += 1 atomically enough for the check: items are never shared when correct
                ct[i] = ct[i] + 1
                tk[i] = tid
                if tid == 0 and slow_us > 0:
                    t0 = _now()
                    while _now() - t0 < slow_us * 1e-6:
                        pass
                i = i + 1
    free(s)
    return taker, count
