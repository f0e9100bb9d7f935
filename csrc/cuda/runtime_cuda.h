/* The few CUDA runtime calls the Python layer makes (device memory, copies, device queries), as plain C
 * functions: the Cython modules are C and the emulator's runtime is C++ inline code (compat.h).
 * Every function returns 0 or a cudaError code; pe_cu_error_string names it. */
#ifndef PE_RUNTIME_CUDA_H
#define PE_RUNTIME_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

const char *pe_cu_backend(void);            /* "cuda" or "emulator" */
const char *pe_cu_error_string(int err);
int pe_cu_device_count(int *n);             /* 0 devices (not an error) without a driver or GPU */
int pe_cu_set_device(int device);
int pe_cu_device_info(int device, char *name, size_t name_len, size_t *total_mem, int *n_sm, int *cc_major,
                      int *cc_minor);
int pe_cu_mem_info(size_t *free_bytes, size_t *total_bytes);
int pe_cu_malloc(void **p, size_t n);
int pe_cu_free(void *p);
/* Page-locked host memory (cudaMallocHost): device copies into it need no staging copy. */
int pe_cu_malloc_host(void **p, size_t n);
int pe_cu_free_host(void *p);
int pe_cu_memset(void *p, int value, size_t n);
int pe_cu_copy_to_device(void *dst, const void *src, size_t n);
int pe_cu_copy_to_host(void *dst, const void *src, size_t n);
/* height rows of width bytes, rows spitch bytes apart in host memory, packed dpitch apart on the device */
int pe_cu_copy_2d_to_device(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t height);
int pe_cu_synchronize(void);
/* Starts (on != 0) or stops the profiler's collection (cudaProfilerStart/Stop): what runs between
 * is what `ncu --profile-from-start off` records. A no-op in the emulator. */
int pe_cu_profiler(int on);
/* Seconds per device-to-device copy of n bytes (mean of reps after one warm-up): the bandwidth the
 * memory-bound kernels are measured against. */
int pe_cu_time_copy(void *dst, const void *src, size_t n, int reps, double *seconds);

#ifdef __cplusplus
}
#endif

#endif
