/* One source, two targets: every file in csrc/cuda/ compiles with nvcc as CUDA (the real backend,
 * pyengine._cuda) and with a C++ compiler as plain host code (-DPE_CUDA_EMU, pyengine._cuda_emu)
 * against the small emulator of the CUDA execution model below, so that machines and CI without a
 * GPU still run every kernel and check it against the CPU path.
 *
 * The emulator runs the blocks of a launch one after another. The threads of a block are
 * cooperative user-level contexts (ucontext) that switch only where CUDA threads synchronise:
 * __syncthreads(), __syncwarp() and the warp shuffles. Kernels therefore must not rely on implicit
 * warp lock-step (which is also what CUDA itself has required since Volta), and a full-warp shuffle
 * or __syncwarp with lanes that already returned aborts with a message (undefined on a GPU). Launch
 * errors a GPU would report (empty grid, more than 1024 threads per block, more than 48 KiB of
 * dynamic shared memory) are reported by cudaGetLastError() here as well.
 *
 * Kernel code uses: PE_GLOBAL, PE_DEVICE, PE_HOSTDEV, PE_SHARED, PE_DYN_SHARED(T, name),
 * PE_LAUNCH(kernel, grid, block, smem, stream, args...), pe_shfl_xor / pe_shfl, atomicAdd, atomicMax,
 * pe_cu_fp16_to_fp32 / pe_cu_bf16_to_fp32, pe_mma_s8_m16n8k32 (int8 tensor cores), pe_dp4a / pe_byte_perm,
 * and the standard math functions. */
#ifndef PE_CU_COMPAT_H
#define PE_CU_COMPAT_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef PE_CUDA_EMU
/* ---------------------------------------------------------------- real CUDA ------------------ */
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define PE_GLOBAL __global__
#define PE_DEVICE __device__
#define PE_HOSTDEV __host__ __device__
#define PE_SHARED __shared__
#define PE_DYN_SHARED(T, name)                                   \
    extern __shared__ __align__(16) unsigned char pe_dyn_smem_[]; \
    T *name = reinterpret_cast<T *>(pe_dyn_smem_)
#define PE_LAUNCH(kernel, grid, block, smem, stream, ...) \
    kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define PE_CU_HAVE_GRAPHS 1

template <typename T>
__device__ inline T pe_shfl_xor(T v, int lane_mask) {
    return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}
template <typename T>
__device__ inline T pe_shfl(T v, int src_lane) {
    return __shfl_sync(0xffffffffu, v, src_lane);
}

/* D = A B + C on the tensor cores: mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (sm_80 and later),
 * fragments in the layout pe_mma_s8_* below describes. */
__device__ inline void pe_mma_s8_m16n8k32(int32_t d[4], const uint32_t a[4], const uint32_t b[2], const int32_t c[4]) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(c[0]), "r"(c[1]), "r"(c[2]),
          "r"(c[3]));
}
/* Byte j of the result = byte (s >> 4j) & 7 of the 8 bytes y:x (selectors with bit 3 clear). */
__device__ inline uint32_t pe_byte_perm(uint32_t x, uint32_t y, uint32_t s) { return __byte_perm(x, y, s); }

PE_HOSTDEV inline float pe_cu_bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

#else
/* ---------------------------------------------------------------- the emulator --------------- */
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#define PE_GLOBAL
#define PE_DEVICE
#define PE_HOSTDEV
#define PE_SHARED static
#define PE_DYN_SHARED(T, name) T *name = reinterpret_cast<T *>(pe_emu::state().dyn_smem.data())
#define PE_LAUNCH(kernel, grid, block, smem, stream, ...) \
    pe_emu::launch_on((stream), dim3(grid), dim3(block), (size_t)(smem), [=]() { kernel(__VA_ARGS__); })
#define PE_CU_HAVE_GRAPHS 1
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)
#define warpSize 32

using std::max;
using std::min;

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef int cudaError_t;
enum {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorNoDevice = 100,
    cudaErrorNotSupported = 801,
    cudaErrorStreamCaptureUnsupported = 900,
    cudaErrorIllegalState = 401,
};
enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
};
typedef struct pe_emu_stream_ *cudaStream_t;
struct pe_emu_event_ {
    std::chrono::steady_clock::time_point t;
};
typedef pe_emu_event_ *cudaEvent_t;
struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    int multiProcessorCount, major, minor;
};

namespace pe_emu {

enum { RUN, WAIT_BLOCK, WAIT_WARP, DONE };
constexpr size_t STACK_BYTES = 256 * 1024;

struct Thread {
    ucontext_t ctx;
    dim3 tid;
    int state;
    uint64_t slot; /* this lane's value during a shuffle */
    uint32_t mma[6]; /* this lane's A and B registers during an emulated mma.sync */
};

struct State {
    dim3 block_idx, block_dim, grid_dim;
    Thread *cur = nullptr;
    int cur_linear = 0;
    std::vector<Thread> threads;
    std::vector<char> stacks;
    std::vector<unsigned char> dyn_smem;
    ucontext_t sched;
    const std::function<void()> *body = nullptr;
    cudaError_t last_error = cudaSuccess;
};

inline State &state() {
    static State s;
    return s;
}
inline std::mutex &launch_mutex() {
    static std::mutex m;
    return m;
}

inline void entry() {
    State &s = state();
    (*s.body)();
    s.cur->state = DONE;
}

inline void wait(int kind) {
    State &s = state();
    s.cur->state = kind;
    swapcontext(&s.cur->ctx, &s.sched);
}

inline void run_block() {
    State &s = state();
    const int n = (int)(s.block_dim.x * s.block_dim.y * s.block_dim.z);
    for (int i = 0; i < n; i++) {
        Thread &t = s.threads[i];
        t.tid = dim3(i % s.block_dim.x, (i / s.block_dim.x) % s.block_dim.y, i / (s.block_dim.x * s.block_dim.y));
        t.state = RUN;
        getcontext(&t.ctx);
        t.ctx.uc_stack.ss_sp = s.stacks.data() + (size_t)i * STACK_BYTES;
        t.ctx.uc_stack.ss_size = STACK_BYTES;
        t.ctx.uc_link = &s.sched;
        makecontext(&t.ctx, entry, 0);
    }
    for (;;) {
        for (int i = 0; i < n; i++)
            if (s.threads[i].state == RUN) {
                s.cur = &s.threads[i];
                s.cur_linear = i;
                swapcontext(&s.sched, &s.threads[i].ctx);
            }
        int live = 0, at_block = 0;
        for (int i = 0; i < n; i++) {
            live += s.threads[i].state != DONE;
            at_block += s.threads[i].state == WAIT_BLOCK;
        }
        if (live == 0) return;
        if (at_block == live) {
            for (int i = 0; i < n; i++)
                if (s.threads[i].state == WAIT_BLOCK) s.threads[i].state = RUN;
            continue;
        }
        bool released = false;
        for (int w = 0; w * 32 < n; w++) {
            int lanes_live = 0, lanes_waiting = 0, lanes = 0;
            for (int i = w * 32; i < n && i < w * 32 + 32; i++, lanes++) {
                lanes_live += s.threads[i].state != DONE;
                lanes_waiting += s.threads[i].state == WAIT_WARP;
            }
            if (lanes_waiting && lanes_live < lanes) {
                /* a full-mask shuffle or __syncwarp after some lanes returned: undefined on a GPU */
                fprintf(stderr, "pyengine CUDA emulator: warp %d of block (%u,%u,%u) shuffles or syncs with "
                                "%d of its %d lanes exited\n", w, s.block_idx.x, s.block_idx.y, s.block_idx.z,
                        lanes - lanes_live, lanes);
                abort();
            }
            if (lanes_live && lanes_waiting == lanes_live) {
                for (int i = w * 32; i < n && i < w * 32 + 32; i++)
                    if (s.threads[i].state == WAIT_WARP) s.threads[i].state = RUN;
                released = true;
            }
        }
        if (!released) {
            fprintf(stderr, "pyengine CUDA emulator: deadlock in block (%u,%u,%u): threads wait at "
                            "different barriers\n", s.block_idx.x, s.block_idx.y, s.block_idx.z);
            abort();
        }
    }
}

inline void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()> &body) {
    std::lock_guard<std::mutex> lock(launch_mutex());
    State &s = state();
    const unsigned long long n = (unsigned long long)block.x * block.y * block.z;
    if (!grid.x || !grid.y || !grid.z || !n || n > 1024 || block.z > 64 || grid.y > 65535 ||
        grid.z > 65535 || grid.x > 2147483647u) {
        s.last_error = cudaErrorInvalidConfiguration;
        return;
    }
    if (smem > 48 * 1024) {
        s.last_error = cudaErrorInvalidValue;
        return;
    }
    s.grid_dim = grid;
    s.block_dim = block;
    s.body = &body;
    if (s.threads.size() < n) s.threads.resize(n);
    if (s.stacks.size() < n * STACK_BYTES) s.stacks.resize(n * STACK_BYTES);
    s.dyn_smem.assign(smem + 16, 0xA5); /* garbage, as on a GPU */
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                s.block_idx = dim3(x, y, z);
                run_block();
            }
    s.cur = nullptr;
}

}  // namespace pe_emu

/* A stream: work runs at once, except while the stream is being captured into a graph; then it is
 * recorded (launch arguments copied, as a real launch copies them) and runs when the graph is
 * launched. So a replayed graph uses the pointers and sizes of its capture, as on a GPU. */
struct pe_emu_stream_ {
    bool capturing = false;
    std::vector<std::function<void()>> ops;
};
struct pe_emu_graph_ {
    std::vector<std::function<void()>> ops;
};

namespace pe_emu {

/* Runs fn now, or records it when the stream is being captured. */
inline void on_stream(cudaStream_t s, std::function<void()> fn) {
    if (s && s->capturing)
        s->ops.push_back(std::move(fn));
    else
        fn();
}

inline void launch_on(cudaStream_t s, dim3 grid, dim3 block, size_t smem, std::function<void()> body) {
    on_stream(s, [=]() { launch(grid, block, smem, body); });
}

template <typename T>
inline T shuffle(T v, int src_of_lane_xor, bool is_xor) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    State &s = state();
    Thread *me = s.cur;
    const int lin = s.cur_linear, base = lin & ~31, lane = lin & 31;
    me->slot = 0;
    memcpy(&me->slot, &v, sizeof v);
    wait(WAIT_WARP);
    const int src = is_xor ? (lane ^ src_of_lane_xor) & 31 : src_of_lane_xor & 31;
    T out;
    memcpy(&out, &s.threads[base + src].slot, sizeof out);
    wait(WAIT_WARP); /* nobody overwrites a slot before every lane has read */
    return out;
}

}  // namespace pe_emu

#define threadIdx (pe_emu::state().cur->tid)
#define blockIdx (pe_emu::state().block_idx)
#define blockDim (pe_emu::state().block_dim)
#define gridDim (pe_emu::state().grid_dim)

inline void __syncthreads() { pe_emu::wait(pe_emu::WAIT_BLOCK); }
inline void __syncwarp(unsigned = 0xffffffffu) { pe_emu::wait(pe_emu::WAIT_WARP); }
template <typename T>
inline T pe_shfl_xor(T v, int lane_mask) { return pe_emu::shuffle(v, lane_mask, true); }
template <typename T>
inline T pe_shfl(T v, int src_lane) { return pe_emu::shuffle(v, src_lane, false); }
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) { return pe_emu::shuffle(v, lane_mask, true); }
template <typename T>
inline T __shfl_sync(unsigned, T v, int src_lane) { return pe_emu::shuffle(v, src_lane, false); }
template <typename T>
inline T atomicAdd(T *p, T v) {
    const T old = *p;
    *p = old + v;
    return old;
}
template <typename T>
inline T atomicMax(T *p, T v) {
    const T old = *p;
    if (v > old) *p = v;
    return old;
}
template <typename T>
inline T __ldg(const T *p) { return *p; }
inline float pe_cu_bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
inline float __uint_as_float(uint32_t u) { return pe_cu_bits_to_float(u); }
inline uint32_t __float_as_uint(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* host runtime: device memory is host memory, streams and events are synchronous */
inline cudaError_t pe_emu_set(cudaError_t e) { return pe_emu::state().last_error = e; }
inline cudaError_t cudaGetLastError() {
    const cudaError_t e = pe_emu::state().last_error;
    pe_emu::state().last_error = cudaSuccess;
    return e;
}
inline cudaError_t cudaPeekAtLastError() { return pe_emu::state().last_error; }
inline const char *cudaGetErrorString(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorNotSupported: return "operation not supported";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorIllegalState: return "the operation cannot be performed in the present state";
    default: return "unknown error";
    }
}
/* Device allocations end at an inaccessible guard page (a read or write past the end, beyond CUDA's
 * 256-byte rounding, faults at once) and start filled with NaN bytes (0xFF): like GPU memory they are
 * not zeroed, and a kernel that reads what nobody wrote spreads NaNs the tests see. */
inline std::mutex &pe_emu_alloc_mutex() {
    static std::mutex m;
    return m;
}
inline std::unordered_map<void *, std::pair<void *, size_t>> &pe_emu_allocations() {
    static std::unordered_map<void *, std::pair<void *, size_t>> m;
    return m;
}
inline cudaError_t cudaMalloc(void **p, size_t n) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE), body = (n + 255) / 256 * 256;
    const size_t span = (body + page - 1) / page * page + page;
    void *base = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
        *p = nullptr;
        return pe_emu_set(cudaErrorMemoryAllocation);
    }
    char *guard = (char *)base + span - page;
    mprotect(guard, page, PROT_NONE);
    *p = guard - body;
    memset(*p, 0xFF, body);
    std::lock_guard<std::mutex> lock(pe_emu_alloc_mutex());
    pe_emu_allocations()[*p] = {base, span};
    return cudaSuccess;
}
template <typename T>
inline cudaError_t cudaMalloc(T **p, size_t n) { return cudaMalloc(reinterpret_cast<void **>(p), n); }
inline cudaError_t cudaFree(void *p) {
    if (!p) return cudaSuccess;
    std::lock_guard<std::mutex> lock(pe_emu_alloc_mutex());
    auto it = pe_emu_allocations().find(p);
    if (it == pe_emu_allocations().end()) return pe_emu_set(cudaErrorInvalidValue);
    munmap(it->second.first, it->second.second);
    pe_emu_allocations().erase(it);
    return cudaSuccess;
}
inline cudaError_t cudaMallocHost(void **p, size_t n) { return cudaMalloc(p, n); }
inline cudaError_t cudaFreeHost(void *p) { return cudaFree(p); }
inline cudaError_t cudaMemcpy(void *d, const void *s, size_t n, cudaMemcpyKind) {
    if (n) memmove(d, s, n);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind k, cudaStream_t st = nullptr) {
    pe_emu::on_stream(st, [=]() { cudaMemcpy(d, s, n, k); });
    return cudaSuccess;
}
inline cudaError_t cudaMemcpy2D(void *d, size_t dpitch, const void *s, size_t spitch, size_t width, size_t height,
                                cudaMemcpyKind) {
    if (width > dpitch || width > spitch) return pe_emu_set(cudaErrorInvalidValue);
    for (size_t r = 0; r < height; r++) memcpy((char *)d + r * dpitch, (const char *)s + r * spitch, width);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpy2DAsync(void *d, size_t dpitch, const void *s, size_t spitch, size_t width,
                                     size_t height, cudaMemcpyKind k, cudaStream_t st = nullptr) {
    if (width > dpitch || width > spitch) return pe_emu_set(cudaErrorInvalidValue);
    pe_emu::on_stream(st, [=]() { cudaMemcpy2D(d, dpitch, s, spitch, width, height, k); });
    return cudaSuccess;
}
inline cudaError_t cudaMemset(void *p, int v, size_t n) {
    memset(p, v, n);
    return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t st = nullptr) {
    pe_emu::on_stream(st, [=]() { cudaMemset(p, v, n); });
    return cudaSuccess;
}
enum { cudaStreamDefault = 0, cudaStreamNonBlocking = 1 };
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned) {
    *s = new pe_emu_stream_();
    return cudaSuccess;
}
inline cudaError_t cudaStreamCreate(cudaStream_t *s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }
inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
    delete s;
    return cudaSuccess;
}
/* waiting for a stream that is being captured is an error on a GPU too */
inline cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    return s && s->capturing ? pe_emu_set(cudaErrorStreamCaptureUnsupported) : cudaSuccess;
}

/* CUDA graphs: a captured stream's recorded work, replayed in order by cudaGraphLaunch. */
typedef pe_emu_graph_ *cudaGraph_t;
typedef pe_emu_graph_ *cudaGraphExec_t;
enum cudaStreamCaptureMode { cudaStreamCaptureModeGlobal, cudaStreamCaptureModeThreadLocal, cudaStreamCaptureModeRelaxed };
inline cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode) {
    if (!s || s->capturing) return pe_emu_set(cudaErrorStreamCaptureUnsupported);
    s->capturing = true;
    s->ops.clear();
    return cudaSuccess;
}
inline cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *g) {
    *g = nullptr;
    if (!s || !s->capturing) return pe_emu_set(cudaErrorIllegalState);
    s->capturing = false;
    *g = new pe_emu_graph_{std::move(s->ops)};
    s->ops.clear();
    return cudaSuccess;
}
inline cudaError_t cudaGraphInstantiate(cudaGraphExec_t *e, cudaGraph_t g, unsigned long long = 0) {
    *e = new pe_emu_graph_{g->ops};
    return cudaSuccess;
}
inline cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t s) {
    if (s && s->capturing) return pe_emu_set(cudaErrorStreamCaptureUnsupported);
    for (auto &op : e->ops) op();
    return cudaSuccess;
}
inline cudaError_t cudaGraphDestroy(cudaGraph_t g) {
    delete g;
    return cudaSuccess;
}
inline cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e) {
    delete e;
    return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : pe_emu_set(cudaErrorInvalidValue); }
inline cudaError_t cudaGetDeviceCount(int *n) {
    *n = 1;
    return cudaSuccess;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int) {
    memset(p, 0, sizeof *p);
    strcpy(p->name, "pyengine CUDA emulator (CPU)");
    p->totalGlobalMem = (size_t)8 << 30;
    p->multiProcessorCount = 4;
    p->major = 9;
    return cudaSuccess;
}
inline cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total_b) {
    *free_b = *total_b = (size_t)8 << 30;
    return cudaSuccess;
}

inline cudaError_t cudaEventCreate(cudaEvent_t *e) {
    *e = new pe_emu_event_();
    return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
    delete e;
    return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t = nullptr) {
    e->t = std::chrono::steady_clock::now();
    return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b) {
    *ms = std::chrono::duration<float, std::milli>(b->t - a->t).count();
    return cudaSuccess;
}

/* nvcuda::wmma, the parts the kernels use (tf32 m16n16k8 and its f32 accumulator), layout-agnostic:
 * every lane holds the WHOLE tile in x[] (num_elements = rows * cols of the operand, kept row by row)
 * and loads, multiplies and stores all of it itself, so the lanes agree without talking and
 * elementwise loops over num_elements / x[i] act on the same values as the real, distributed
 * fragment. A kernel must never rely on which element a lane holds. Products and sums in f32. */
namespace nvcuda {
namespace wmma {
struct matrix_a;
struct matrix_b;
struct accumulator;
struct row_major;
struct col_major;
namespace precision {
struct tf32;
}
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K> struct pe_frag_shape;
template <int M, int N, int K> struct pe_frag_shape<matrix_a, M, N, K> {
    static constexpr int rows = M, cols = K;
};
template <int M, int N, int K> struct pe_frag_shape<matrix_b, M, N, K> {
    static constexpr int rows = K, cols = N;
};
template <int M, int N, int K> struct pe_frag_shape<accumulator, M, N, K> {
    static constexpr int rows = M, cols = N;
};
template <typename T> struct pe_frag_storage {
    typedef T type;
};
template <> struct pe_frag_storage<precision::tf32> {
    typedef float type;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static constexpr int rows = pe_frag_shape<Use, M, N, K>::rows, cols = pe_frag_shape<Use, M, N, K>::cols;
    enum { num_elements = rows * cols };
    typename pe_frag_storage<T>::type x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L> &f, const V &v) {
    for (int i = 0; i < f.num_elements; i++) f.x[i] = v;
}

/* Element (r, c) of a tile at p with leading dimension ldm: rows contiguous or columns contiguous. */
template <typename F, typename P>
inline void pe_frag_load(F &f, const P *p, unsigned ldm, bool col) {
    for (int r = 0; r < F::rows; r++)
        for (int c = 0; c < F::cols; c++) f.x[r * F::cols + c] = col ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c];
}
template <typename Use, int M, int N, int K, typename T, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, row_major> &f, const P *p, unsigned ldm) {
    pe_frag_load(f, p, ldm, false);
}
template <typename Use, int M, int N, int K, typename T, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, col_major> &f, const P *p, unsigned ldm) {
    pe_frag_load(f, p, ldm, true);
}
template <int M, int N, int K, typename T, typename P>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T> &f, const P *p, unsigned ldm, layout_t layout) {
    pe_frag_load(f, p, ldm, layout == mem_col_major);
}
template <int M, int N, int K, typename T, typename P>
inline void store_matrix_sync(P *p, const fragment<accumulator, M, N, K, T> &f, unsigned ldm, layout_t layout) {
    for (int r = 0; r < M; r++)
        for (int c = 0; c < N; c++)
            (layout == mem_col_major ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c]) = f.x[r * N + c];
}

/* d = a b + c, each sum in order of k from c, f32 products (the build does not contract them). */
template <int M, int N, int K, typename TA, typename TB, typename LA, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC> &d, const fragment<matrix_a, M, N, K, TA, LA> &a,
                     const fragment<matrix_b, M, N, K, TB, LB> &b, const fragment<accumulator, M, N, K, TC> &c) {
    TC out[M * N];
    for (int i = 0; i < M * N; i++) out[i] = c.x[i];
    for (int m = 0; m < M; m++)
        for (int k = 0; k < K; k++) {
            const TC am = a.x[m * K + k];
            for (int n = 0; n < N; n++) out[m * N + n] += am * (TC)b.x[k * N + n];
        }
    for (int i = 0; i < M * N; i++) d.x[i] = out[i];
}

/* cvt.rna.tf32.f32: round to 10 mantissa bits, to nearest, ties away from zero (the magnitude bits
 * get half an ulp added, then truncated); inf and NaN pass unchanged. */
inline float __float_to_tf32(float in) {
    uint32_t u;
    memcpy(&u, &in, sizeof u);
    if ((u & 0x7f800000u) == 0x7f800000u) return in;
    u = (u + 0x1000u) & ~0x1fffu;
    float out;
    memcpy(&out, &u, sizeof out);
    return out;
}
}  // namespace wmma
}  // namespace nvcuda

inline uint32_t pe_byte_perm(uint32_t x, uint32_t y, uint32_t s) {
    const uint64_t bytes = (uint64_t)y << 32 | x;
    uint32_t r = 0;
    for (int j = 0; j < 4; j++) r |= (uint32_t)((bytes >> (8 * ((s >> (4 * j)) & 7))) & 0xFFu) << (8 * j);
    return r;
}

#endif /* PE_CUDA_EMU */

/* ---------------------------------------------------------------- both ----------------------- */

/* IEEE half -> float, exact (subnormals included), on host and device. */
PE_HOSTDEV inline float pe_cu_fp16_to_fp32(uint16_t h) {
#ifdef __CUDA_ARCH__
    return __half2float(__ushort_as_half(h)); /* one cvt.f32.f16 instead of ~10 integer instructions */
#else
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    if (exp == 0) {
        const float f = (float)mant * 5.9604644775390625e-8f; /* mant * 2^-24, exact */
        return sign ? -f : f;
    }
    if (exp == 31) return pe_cu_bits_to_float(sign | 0x7f800000u | (mant << 13));
    return pe_cu_bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
#endif
}

/* bfloat16 -> float, exact. */
PE_HOSTDEV inline float pe_cu_bf16_to_fp32(uint16_t h) { return pe_cu_bits_to_float((uint32_t)h << 16); }

/* The fragment layout of mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (PTX ISA, "Matrix Fragments
 * for mma.m16n8k32" with .s8 operands), the one place the kernels, the emulator and the tests take it
 * from. Lane = 4 * groupID + threadID_in_group. Element i of a lane's fragment is byte i % 4 of
 * register i / 4 (A: 16 elements in 4 registers, B: 8 in 2) or register i (C/D: 4 int32):
 * - A (16 x 32, row-major): row groupID (+ 8 for registers 1 and 3), column 4 threadID_in_group +
 *   i % 4 (+ 16 for registers 2 and 3);
 * - B (32 x 8, k by n, "col": each column's k contiguous): k = 4 threadID_in_group + i % 4 (+ 16 for
 *   register 1), column groupID;
 * - C and D (16 x 8): row groupID (+ 8 for elements 2 and 3), column 2 threadID_in_group + i % 2.
 * So one 32-bit load of 4 consecutive k of a row (A) or of a column (B) fills one register. */
PE_HOSTDEV constexpr int pe_mma_s8_a_row(int lane, int i) { return (lane >> 2) + 8 * ((i >> 2) & 1); }
PE_HOSTDEV constexpr int pe_mma_s8_a_col(int lane, int i) { return 4 * (lane & 3) + (i & 3) + 16 * (i >> 3); }
PE_HOSTDEV constexpr int pe_mma_s8_b_k(int lane, int i) { return 4 * (lane & 3) + (i & 3) + 16 * (i >> 2); }
PE_HOSTDEV constexpr int pe_mma_s8_b_col(int lane, int i) { return (void)i, lane >> 2; }
PE_HOSTDEV constexpr int pe_mma_s32_c_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
PE_HOSTDEV constexpr int pe_mma_s32_c_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

#ifdef PE_CUDA_EMU
/* The warp-wide mma.sync, exactly: every lane posts its A and B registers, then each computes its own
 * D elements from the whole warp's registers through the layout above (int32 sums wrap, as the
 * instruction's do without .satfinite). Every lane of the warp must call it, as on a GPU. */
inline void pe_mma_s8_m16n8k32(int32_t d[4], const uint32_t a[4], const uint32_t b[2], const int32_t c[4]) {
    pe_emu::State &s = pe_emu::state();
    const int lin = s.cur_linear, base = lin & ~31, lane = lin & 31;
    memcpy(s.cur->mma, a, 4 * sizeof(uint32_t));
    memcpy(s.cur->mma + 4, b, 2 * sizeof(uint32_t));
    pe_emu::wait(pe_emu::WAIT_WARP);
    int8_t A[16][32], B[32][8];
    for (int l = 0; l < 32; l++) {
        const uint32_t *r = s.threads[base + l].mma;
        for (int i = 0; i < 16; i++) A[pe_mma_s8_a_row(l, i)][pe_mma_s8_a_col(l, i)] = (int8_t)(r[i >> 2] >> (8 * (i & 3)));
        for (int i = 0; i < 8; i++) B[pe_mma_s8_b_k(l, i)][pe_mma_s8_b_col(l, i)] = (int8_t)(r[4 + (i >> 2)] >> (8 * (i & 3)));
    }
    int32_t out[4];
    for (int i = 0; i < 4; i++) {
        const int m = pe_mma_s32_c_row(lane, i), n = pe_mma_s32_c_col(lane, i);
        uint32_t acc = (uint32_t)c[i];
        for (int k = 0; k < 32; k++) acc += (uint32_t)((int32_t)A[m][k] * (int32_t)B[k][n]);
        out[i] = (int32_t)acc;
    }
    pe_emu::wait(pe_emu::WAIT_WARP); /* nobody posts new registers before every lane has read */
    memcpy(d, out, sizeof out);
}
#endif

/* dp4a: c + the sum of the four products of the signed bytes of a and b (int8 activation kernels). */
PE_DEVICE inline int pe_dp4a(int a, int b, int c) {
#ifdef __CUDA_ARCH__
    return __dp4a(a, b, c);
#else
    for (int i = 0; i < 4; i++) c += (int)(int8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i));
    return c;
#endif
}

#endif /* PE_CU_COMPAT_H */
