# The int8 tensor-core instruction (mma.sync m16n8k32 s8, csrc/cuda/compat.h) for tests, included by
# _cuda.pyx: its fragment layout as the kernels use it, and one warp running it on given registers.

cdef extern from "gemm_i8_cuda.h":
    int pe_cu_mma_s8_run(const uint32_t *a, const uint32_t *b, const int32_t *c, int32_t *d, void *stream) nogil
    void pe_cu_mma_s8_layout(int *a, int *b, int *c) nogil


def mma_s8_layout():
    """(a, b, c): int arrays (32, 16, 2), (32, 8, 2), (32, 4, 2): for lane l and fragment element i, the
    (row, column) of A (16 x 32), the (k, n) of B (32 x 8) and the (row, column) of C/D (16 x 8) that it
    holds. Element i of A/B is byte i % 4 of register i // 4; of C/D register i."""
    a = np.zeros((32, 16, 2), np.intc)
    b = np.zeros((32, 8, 2), np.intc)
    c = np.zeros((32, 4, 2), np.intc)
    cdef int[:, :, ::1] av = a, bv = b, cv = c
    pe_cu_mma_s8_layout(&av[0, 0, 0], &bv[0, 0, 0], &cv[0, 0, 0])
    return a, b, c


def mma_s8_run(a, b, c) -> np.ndarray:
    """One warp's mma.sync m16n8k32 s8 on the registers a (32, 4) uint32, b (32, 2) uint32, c (32, 4)
    int32 (lane-major); returns the lanes' D registers (32, 4) int32."""
    aa = np.ascontiguousarray(a, dtype=np.uint32)
    ba = np.ascontiguousarray(b, dtype=np.uint32)
    ca = np.ascontiguousarray(c, dtype=np.int32)
    if aa.shape != (32, 4) or ba.shape != (32, 2) or ca.shape != (32, 4):
        raise ValueError("registers must have shapes (32, 4), (32, 2), (32, 4)")
    da, db, dc = _dev_upload(aa), _dev_upload(ba), _dev_upload(ca)
    dd = _dev_upload(np.zeros((32, 4), np.int32))
    _check(pe_cu_mma_s8_run(<const uint32_t *><uintptr_t>da.ptr, <const uint32_t *><uintptr_t>db.ptr,
                            <const int32_t *><uintptr_t>dc.ptr, <int32_t *><uintptr_t>dd.ptr, NULL))
    return dd.download((32, 4), np.int32)
