/* Plain C wrappers of the CUDA runtime for the Cython layer (see runtime_cuda.h). */
#include "compat.h"
#include "runtime_cuda.h"

#include <stdio.h>
#ifndef PE_CUDA_EMU
#include <cuda_profiler_api.h>
#endif

extern "C" {

const char *pe_cu_backend(void) {
#ifdef PE_CUDA_EMU
    return "emulator";
#else
    return "cuda";
#endif
}

const char *pe_cu_error_string(int err) { return cudaGetErrorString((cudaError_t)err); }

int pe_cu_device_count(int *n) {
    *n = 0;
    if (cudaGetDeviceCount(n) != cudaSuccess) {
        *n = 0;
        cudaGetLastError(); /* no driver / no device: report zero devices, keep no sticky error */
    }
    return 0;
}

int pe_cu_set_device(int device) { return (int)cudaSetDevice(device); }

int pe_cu_device_info(int device, char *name, size_t name_len, size_t *total_mem, int *n_sm, int *cc_major,
                      int *cc_minor) {
    cudaDeviceProp p;
    const cudaError_t e = cudaGetDeviceProperties(&p, device);
    if (e != cudaSuccess) return (int)e;
    snprintf(name, name_len, "%s", p.name);
    *total_mem = p.totalGlobalMem;
    *n_sm = p.multiProcessorCount;
    *cc_major = p.major;
    *cc_minor = p.minor;
    return 0;
}

int pe_cu_mem_info(size_t *free_bytes, size_t *total_bytes) { return (int)cudaMemGetInfo(free_bytes, total_bytes); }

int pe_cu_malloc(void **p, size_t n) {
    *p = NULL;
    return (int)cudaMalloc(p, n ? n : 1);
}

int pe_cu_free(void *p) { return (int)cudaFree(p); }

int pe_cu_malloc_host(void **p, size_t n) {
    *p = NULL;
    return (int)cudaMallocHost(p, n ? n : 1);
}

int pe_cu_free_host(void *p) { return (int)cudaFreeHost(p); }

int pe_cu_memset(void *p, int value, size_t n) { return (int)cudaMemset(p, value, n); }

int pe_cu_copy_to_device(void *dst, const void *src, size_t n) {
    return (int)cudaMemcpy(dst, src, n, cudaMemcpyHostToDevice);
}

int pe_cu_copy_to_host(void *dst, const void *src, size_t n) {
    return (int)cudaMemcpy(dst, src, n, cudaMemcpyDeviceToHost);
}

int pe_cu_copy_2d_to_device(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t height) {
    return (int)cudaMemcpy2D(dst, dpitch, src, spitch, width, height, cudaMemcpyHostToDevice);
}

int pe_cu_time_copy(void *dst, const void *src, size_t n, int reps, double *seconds) {
    cudaEvent_t a, b;
    float ms = 0.0f;
    if (cudaEventCreate(&a) != cudaSuccess) return (int)cudaGetLastError();
    if (cudaEventCreate(&b) != cudaSuccess) {
        cudaEventDestroy(a);
        return (int)cudaGetLastError();
    }
    int rc = (int)cudaMemcpy(dst, src, n, cudaMemcpyDeviceToDevice);
    if (!rc) rc = (int)cudaEventRecord(a, 0);
    for (int i = 0; i < reps && !rc; i++) rc = (int)cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, 0);
    if (!rc) rc = (int)cudaEventRecord(b, 0);
    if (!rc) rc = (int)cudaEventSynchronize(b);
    if (!rc) rc = (int)cudaEventElapsedTime(&ms, a, b);
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    *seconds = rc ? 0.0 : ms / 1e3 / (reps > 0 ? reps : 1);
    return rc;
}

int pe_cu_synchronize(void) {
    const cudaError_t e = cudaDeviceSynchronize();
    return (int)(e != cudaSuccess ? e : cudaGetLastError());
}

int pe_cu_profiler(int on) {
#ifdef PE_CUDA_EMU
    (void)on;
    return 0;
#else
    return (int)(on ? cudaProfilerStart() : cudaProfilerStop());
#endif
}

}
