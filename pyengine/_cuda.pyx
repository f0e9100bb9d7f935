# cython: language_level=3, boundscheck=False, wraparound=False
"""Binding of the CUDA backend (csrc/cuda/). The same source builds two modules: `pyengine._cuda`
(nvcc, real GPUs; only where nvcc was found at install time) and `pyengine._cuda_emu` (the kernels
compiled as host C++ against the emulator in csrc/cuda/compat.h; always built, so CI checks every
kernel without a GPU). Which one runs is pyengine.cuda's business; nothing here imports the other.

Device memory is owned by DevBuf objects; every size, type and shape is checked here before a device
pointer reaches C."""

import numpy as np
cimport cpython
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uintptr_t

cnp.import_array()

cdef extern from "runtime_cuda.h":
    const char *pe_cu_backend()
    const char *pe_cu_error_string(int err)
    int pe_cu_device_count(int *n)
    int pe_cu_set_device(int device)
    int pe_cu_device_info(int device, char *name, size_t name_len, size_t *total_mem, int *n_sm,
                          int *cc_major, int *cc_minor)
    int pe_cu_mem_info(size_t *free_bytes, size_t *total_bytes)
    int pe_cu_malloc(void **p, size_t n)
    int pe_cu_free(void *p)
    int pe_cu_malloc_host(void **p, size_t n)
    int pe_cu_free_host(void *p)
    int pe_cu_memset(void *p, int value, size_t n)
    int pe_cu_copy_to_device(void *dst, const void *src, size_t n)
    int pe_cu_copy_to_host(void *dst, const void *src, size_t n)
    int pe_cu_copy_2d_to_device(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width,
                                size_t height)
    int pe_cu_synchronize()
    int pe_cu_profiler(int on)
    int pe_cu_time_copy(void *dst, const void *src, size_t n, int reps, double *seconds)


class CudaError(RuntimeError):
    """A CUDA runtime error (out of device memory, launch failure, no device)."""


cdef int _check(int rc) except -1:
    if rc != 0:
        raise CudaError(f"CUDA error {rc}: {pe_cu_error_string(rc).decode()}")
    return 0


BACKEND = pe_cu_backend().decode()


def device_count() -> int:
    """Usable CUDA devices (0 without a driver or GPU)."""
    cdef int n = 0
    pe_cu_device_count(&n)
    return n


def device_info(int device=0) -> dict:
    """name, total_memory (bytes), multiprocessors and compute capability of a device."""
    cdef char name[256]
    cdef size_t total = 0
    cdef int n_sm = 0, major = 0, minor = 0
    _check(pe_cu_device_info(device, name, sizeof(name), &total, &n_sm, &major, &minor))
    return {"name": name.decode(errors="replace"), "total_memory": int(total), "multiprocessors": n_sm,
            "compute_capability": f"{major}.{minor}"}


def mem_info() -> tuple:
    """(free, total) bytes of the current device."""
    cdef size_t free_b = 0, total_b = 0
    _check(pe_cu_mem_info(&free_b, &total_b))
    return int(free_b), int(total_b)


def set_device(int device) -> None:
    _check(pe_cu_set_device(device))


def synchronize() -> None:
    """Waits for the device and raises the first error of asynchronous work."""
    _check(pe_cu_synchronize())


def profiler(bint on) -> None:
    """Starts or stops the profiler's collection (cudaProfilerStart/Stop; `ncu --profile-from-start
    off` records only what runs in between). Does nothing in the emulator."""
    _check(pe_cu_profiler(on))


def copy_bandwidth(size_t nbytes=1 << 30, int reps=10) -> float:
    """Bytes per second a device-to-device copy moves, counting what it reads and what it writes
    (the figure memory-bound kernels are compared with)."""
    if nbytes == 0 or reps < 1:
        raise ValueError("nbytes and reps must be positive")
    cdef DevBuf a = DevBuf(nbytes), b = DevBuf(nbytes)
    cdef double sec = 0
    _check(pe_cu_time_copy(b.p, a.p, nbytes, reps, &sec))
    return 2.0 * nbytes / sec if sec > 0 else float("inf")


cdef class DevBuf:
    """nbytes of device memory, freed with the object."""
    cdef void *p
    cdef readonly size_t nbytes

    def __cinit__(self, size_t nbytes):
        self.p = NULL
        self.nbytes = nbytes
        _check(pe_cu_malloc(&self.p, nbytes))

    def __dealloc__(self):
        if self.p != NULL:
            pe_cu_free(self.p)

    @property
    def ptr(self) -> int:
        return <uintptr_t> self.p

    def zero(self) -> None:
        _check(pe_cu_memset(self.p, 0, self.nbytes))

    def download(self, shape, dtype) -> np.ndarray:
        """A host copy of the buffer's first bytes as an array of the given shape and dtype."""
        cdef cnp.ndarray out = np.empty(shape, dtype=dtype)
        if <size_t> out.nbytes > self.nbytes:
            raise ValueError(f"{out.nbytes} bytes requested from a buffer of {self.nbytes}")
        _check(pe_cu_copy_to_host(cnp.PyArray_DATA(out), self.p, out.nbytes))
        return out


cdef class PinnedBuf:
    """nbytes of page-locked host memory (cudaMallocHost), freed with the object. Arrays made by
    `array` keep it alive (their base), so a device copy into it never lands in memory someone
    still reads unless they hold such an array."""
    cdef void *p
    cdef readonly size_t nbytes

    def __cinit__(self, size_t nbytes):
        self.p = NULL
        self.nbytes = nbytes
        _check(pe_cu_malloc_host(&self.p, nbytes))

    def __dealloc__(self):
        if self.p != NULL:
            pe_cu_free_host(self.p)

    cdef cnp.ndarray array(self, int64_t rows, int64_t cols):
        """A float32 (rows, cols) view of the first bytes (no copy)."""
        cdef cnp.npy_intp dims[2]
        dims[0], dims[1] = rows, cols
        if rows * cols * 4 > <int64_t> self.nbytes:
            raise ValueError("pinned buffer too small")
        cdef cnp.ndarray out = cnp.PyArray_SimpleNewFromData(2, dims, cnp.NPY_FLOAT32, self.p)
        cpython.Py_INCREF(self)
        cnp.PyArray_SetBaseObject(out, self)
        return out


def _dev_upload(a) -> DevBuf:
    """A device copy of a numpy array (made C-contiguous first)."""
    cdef cnp.ndarray arr = np.ascontiguousarray(a)
    cdef DevBuf buf = DevBuf(max(arr.nbytes, 1))
    _check(pe_cu_copy_to_device(buf.p, cnp.PyArray_DATA(arr), arr.nbytes))
    return buf


include "_cuda_parts.pxi"
