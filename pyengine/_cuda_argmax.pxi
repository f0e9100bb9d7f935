# Test wrapper of the device argmax (csrc/cuda/argmax_cuda.h), included by _cuda.pyx: the greedy
# sampler's choice per row, computed by the kernel the forward pass runs after the output head.

from libc.stdint cimport int32_t, int64_t, uint64_t, uintptr_t

cdef extern from "argmax_cuda.h" nogil:
    int pe_cu_argmax_keys(const float *x, int64_t n_rows, int64_t n, int64_t ld, uint64_t *keys, void *stream)
    int32_t pe_cu_argmax_index(uint64_t key)


def argmax_rows(x) -> np.ndarray:
    """int64 [rows]: each row's argmax of a float32 (rows, n) array as the device picks it."""
    cdef cnp.ndarray a = np.ascontiguousarray(x, dtype=np.float32)
    if a.ndim != 2 or a.size == 0:
        raise ValueError("x must be a non-empty 2-D array")
    cdef int64_t rows = a.shape[0], n = a.shape[1], r
    cdef DevBuf d = _dev_upload(a), keys = DevBuf(rows * 8)
    keys.zero()
    _check(pe_cu_argmax_keys(<const float *> d.p, rows, n, n, <uint64_t *> keys.p, NULL))
    _check(pe_cu_synchronize())
    cdef cnp.ndarray[cnp.uint64_t, ndim=1] k = keys.download((rows,), np.uint64)
    return np.array([pe_cu_argmax_index(k[r]) for r in range(rows)], dtype=np.int64)
