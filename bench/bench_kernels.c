/* pyengine-bench-kernels: times the C core's kernels at gpt-oss-20b shapes, next to the machine's
 * measured memory read bandwidth.
 *
 *   pyengine-bench-kernels [-t THREADS] [-r REPS] [-m MIB] [-T TYPES] [--bandwidth]
 *                          [--bandwidth-file PATH] [--bandwidth-map PATH] [--placement N]
 *
 * For every weight type: a one-token matrix-vector product (decode: bound by reading the weights,
 * reported in GB/s of weight bytes and as a share of the bandwidth probed right before and after
 * that product, the higher of the two: the dev VMs' bandwidth moves by up to 1.7x from one minute to
 * the next, so one probe at the start says little about a kernel timed later) and a 64-token matrix product
 * (prefill: bound by arithmetic, reported in GFLOP/s), on a matrix of n_in = 2880 columns and as
 * many rows as fill MIB megabytes (default 256, beyond the caches); each on the default path (int8
 * activations for types with int8 kernels) and on the exact float32-activation path. Then the MoE
 * layer of gpt-oss-20b (32 MXFP4 experts, 4 used, n_embd = n_ff = 2880) for 1 and 64 tokens, after
 * one-token Q8_0 products of the sizes a decode step makes (what each call costs beyond streaming),
 * and one decoded token's attention over an f16 cache at depths 4096 and 32768.
 * Weights are random blocks whose scale fields are set to a small normal value (no NaN or
 * denormal slow paths); the timing does not depend on the values. Best of REPS runs. */
#include <math.h>
#include <omp.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "attention.h"
#include "cpu_features.h"
#include "matmul.h"
#include "moe.h"
#include "r16.h"
#include "quants.h"

#define N_EMBD 2880
#define PROBE_BYTES ((size_t)1 << 30)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rng(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}

static float frand(void) { return (float)((rng() >> 40) * (1.0 / (1ull << 24))) * 2.0f - 1.0f; }

/* Byte offsets of the f16 scale fields inside one block (-1 ends), and of an E8M0 scale byte. */
typedef struct { int type; int f16[3]; int e8m0; } scale_fields;
static const scale_fields SCALES[] = {
    {PE_TYPE_Q4_0, {0, -1}, -1},      {PE_TYPE_Q4_1, {0, 2, -1}, -1},   {PE_TYPE_Q5_0, {0, -1}, -1},
    {PE_TYPE_Q5_1, {0, 2, -1}, -1},   {PE_TYPE_Q8_0, {0, -1}, -1},      {PE_TYPE_Q2_K, {80, 82, -1}, -1},
    {PE_TYPE_Q3_K, {108, -1}, -1},    {PE_TYPE_Q4_K, {0, 2, -1}, -1},   {PE_TYPE_Q5_K, {0, 2, -1}, -1},
    {PE_TYPE_Q6_K, {208, -1}, -1},    {PE_TYPE_MXFP4, {-1}, 0},
};

/* Large buffers on 2 MiB pages where the kernel gives them (MADV_HUGEPAGE, as the engine asks for
 * its weight mapping, pyengine/gguf_reader.py): the weights and the probe then stream the way a
 * model's do. */
static void *big_alloc(size_t bytes) {
    const size_t huge = (size_t)2 << 20, size = (bytes + huge - 1) / huge * huge;
    void *p = aligned_alloc(huge, size);
#ifdef MADV_HUGEPAGE
    if (p) madvise(p, size, MADV_HUGEPAGE);
#endif
    return p;
}

/* Fill n_rows rows of n elements of `type` with random valid data. */
static void fill(int type, uint8_t *dst, int64_t n_rows, int64_t n) {
    const pe_type_traits *t = pe_type_traits_get(type);
    const size_t row = pe_row_size(type, n);
    const int64_t n_blocks = n_rows * (n / t->blck_size);
    if (type == PE_TYPE_F32 || type == PE_TYPE_F16 || type == PE_TYPE_BF16) {
        for (int64_t i = 0; i < n_rows * n; i++) {
            const float v = frand() * 0.02f;
            uint32_t bits;
            memcpy(&bits, &v, 4);
            if (type == PE_TYPE_F32) memcpy(dst + 4 * i, &v, 4);
            else if (type == PE_TYPE_F16) { uint16_t h = pe_fp32_to_fp16(v); memcpy(dst + 2 * i, &h, 2); }
            else { uint16_t h = (uint16_t)(bits >> 16); memcpy(dst + 2 * i, &h, 2); }
        }
        return;
    }
    for (size_t i = 0; i < row * n_rows; i += 8) {
        uint64_t r = rng();
        memcpy(dst + i, &r, row * n_rows - i < 8 ? row * n_rows - i : 8);
    }
    for (size_t s = 0; s < sizeof SCALES / sizeof SCALES[0]; s++) {
        if (SCALES[s].type != type) continue;
        for (int64_t b = 0; b < n_blocks; b++) {
            uint8_t *blk = dst + b * t->type_size;
            for (int k = 0; k < 3 && SCALES[s].f16[k] >= 0; k++) {
                const uint16_t h = 0x2000; /* 2^-7 */
                memcpy(blk + SCALES[s].f16[k], &h, 2);
            }
            if (SCALES[s].e8m0 >= 0) blk[SCALES[s].e8m0] = 120;
        }
    }
}

/* The kernel table's name for a type's R16 row (MXFP4's is plain "R16", as in bench/RESULTS.md). */
static const char *r16_label(int type) {
    switch (type) {
    case PE_TYPE_Q8_0: return "Q8_R16";
    case PE_TYPE_Q4_0: return "Q40R16";
    case PE_TYPE_Q4_1: return "Q41R16";
    case PE_TYPE_Q5_0: return "Q5_R16";
    case PE_TYPE_Q5_1: return "Q51R16";
    case PE_TYPE_Q2_K: return "Q2KR16";
    case PE_TYPE_Q3_K: return "Q3KR16";
    case PE_TYPE_Q4_K: return "Q4KR16";
    case PE_TYPE_Q5_K: return "Q5KR16";
    case PE_TYPE_Q6_K: return "Q6KR16";
    default: return "R16";
    }
}

/* Best-of-reps seconds of one pe_matmul call. */
static double time_matmul(const pe_weight *w, const float *x, int64_t n_tok, float *y, int threads, int reps) {
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        const double t0 = now();
        if (pe_matmul(w, 0, x, w->n_in, n_tok, NULL, y, w->n_out, threads)) { fprintf(stderr, "out of memory\n"); exit(1); }
        const double dt = now() - t0;
        if (dt < best) best = dt;
    }
    return best;
}

/* The int8 multiply-add peak of the default path's products on AVX-512 CPUs: vpdpbusd (VNNI) on
 * 512-bit registers, 64 byte products an instruction, in 12 independent chains per thread (more than
 * latency x throughput on the CPUs seen, 4-5 cycles at 1-2 a cycle), every thread at once, best of 5:
 * G int8 multiply-adds a second; 0 below the AVX-512 level (the AVX2 kernels' vpmaddubsw is another
 * instruction). Why: prefill is bound by these products, not by memory, so this is its ceiling. The
 * default path takes two int8 digits per activation (pe_act_q8), two products per weight: its
 * prefill GFLOP/s (2 per weight multiply-add) is then one int8 product per FLOP, so the peak read as
 * GFLOP/s is its ceiling. AMX CPUs' prefill tiles can pass it. */
#if defined(__x86_64__)
#include <immintrin.h>
__attribute__((target("avx512f,avx512bw,avx512vnni"), noinline)) static int64_t vnni_chains(int64_t iters) {
    __m512i a[12];
    for (int i = 0; i < 12; i++) a[i] = _mm512_set1_epi32(i);
    const __m512i x = _mm512_set1_epi8(3), y = _mm512_set1_epi8(-2);
    for (int64_t it = 0; it < iters; it++)
#pragma GCC unroll 12
        for (int i = 0; i < 12; i++) a[i] = _mm512_dpbusd_epi32(a[i], x, y); /* unrolled: in registers */
    int64_t s = 0;
    for (int i = 0; i < 12; i++) s += _mm512_reduce_add_epi32(a[i]);
    return s;
}
#endif

static double int8_peak(int threads) {
#if defined(__x86_64__)
    if (pe_simd_level_get() < PE_SIMD_AVX512) return 0;
    enum { ITERS = 4000000 };
    double best = 0;
    int64_t sink = 0;
    for (int r = 0; r < 5; r++) {
        const double t0 = now();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
        sink += vnni_chains(ITERS);
        const double g = (double)ITERS * 12 * 64 * threads / (now() - t0) / 1e9;
        if (g > best) best = g;
    }
    return sink == 42 ? 0 : best;
#else
    (void)threads;
    return 0;
#endif
}

/* Read bandwidth: every thread streams its own contiguous slice of a buffer much larger than the
 * caches with 256-bit loads into eight independent XOR accumulators (so the loop is bound by memory,
 * not by a dependency chain), either as one sequential stream or as PROBE_STREAMS streams (the
 * slice cut in as many parts, read 256 bytes from each in turn); the faster of the two, best of 7
 * each. Which one wins depends on the box: one stream per thread was faster on the 2-core dev
 * boxes of 2026-12-03/04, four on the Intel one of 2026-12-05 (by 5-10 %, bench/RESULTS.md). */
enum { PROBE_STREAMS = 4 };
#if defined(__x86_64__)
__attribute__((target("avx2"))) static uint64_t stream_read(const uint8_t *p, size_t bytes, int streams) {
    const size_t part = bytes / (size_t)streams / 256 * 256;
    __m256i a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_si256();
    for (size_t o = 0; o + 256 <= part; o += 256)
        for (int s = 0; s < streams; s++)
            for (int i = 0; i < 8; i++)
                a[i] = _mm256_xor_si256(a[i], _mm256_load_si256((const __m256i *)(p + s * part + o + 32 * i)));
    for (int i = 1; i < 8; i++) a[0] = _mm256_xor_si256(a[0], a[i]);
    return (uint64_t)_mm256_extract_epi64(a[0], 0);
}
#else
static uint64_t stream_read(const uint8_t *p, size_t bytes, int streams) {
    const size_t part = bytes / (size_t)streams / 8 * 8;
    uint64_t s = 0;
    for (size_t o = 0; o + 8 <= part; o += 8)
        for (int k = 0; k < streams; k++) { uint64_t v; memcpy(&v, p + k * part + o, 8); s ^= v; }
    return s;
}
#endif

/* All of buf[0, bytes), each thread its own contiguous slice: the XOR of what stream_read saw. */
static uint64_t read_all(const uint8_t *buf, size_t bytes, int threads, int streams) {
    uint64_t sink = 0;
#pragma omp parallel num_threads(threads) reduction(^ : sink)
    {
        const size_t slice = bytes / (size_t)omp_get_num_threads() / 4096 * 4096;
        sink ^= stream_read(buf + (size_t)omp_get_thread_num() * slice, slice, streams);
    }
    return sink;
}

/* GB/s of the fastest of `reps` reads of p[0, bytes), one stream and PROBE_STREAMS streams per
 * thread alternating (the probe's and --bandwidth-file's loop). */
static double best_read_rate(const uint8_t *p, size_t bytes, int threads, int reps) {
    double best = 1e30;
    uint64_t sink = 0;
    for (int r = 0; r < reps; r++) {
        const double t0 = now();
        sink ^= read_all(p, bytes, threads, r % 2 ? PROBE_STREAMS : 1);
        const double dt = now() - t0;
        if (dt < best) best = dt;
    }
    return sink == 42 ? 0 : bytes / best / 1e9;
}

/* The probe's buffer of `bytes`, allocated and filled on the first call (the threads writing their
 * own slices) and kept: the probe runs again next to every kernel. NULL when it cannot be allocated. */
static const uint8_t *probe_buffer(int threads, size_t bytes) {
    static uint8_t *buf;
    static size_t have;
    if (have != bytes) {
        free(buf);
        buf = big_alloc(bytes);
        have = buf ? bytes : 0;
        if (!buf) return NULL;
#pragma omp parallel for num_threads(threads)
        for (int64_t i = 0; i < (int64_t)(bytes / 8); i++) ((uint64_t *)buf)[i] = (uint64_t)i * 0x9E3779B97F4A7C15ull;
    }
    return buf;
}

static double bandwidth(int threads, size_t bytes) {
    const uint8_t *buf = probe_buffer(threads, bytes);
    return buf ? best_read_rate(buf, bytes, threads, 14) : 0;
}

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The median of v[0, n) (sorted in place); 0 when n is 0. */
static double median(double *v, int n) {
    if (n == 0) return 0;
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* Where the two threads run, against what they read (--placement): per sample, the one-way latency of
 * a cache line handed back and forth between thread 0 and thread 1 (a ping-pong on one atomic, 20,000
 * round trips), then one pass of both threads over the probe's buffer (one stream each). Why: on the
 * Zen 4 dev VM the two-thread read rate flips between ~33 and ~60-66 GB/s within seconds, and the
 * flips follow the line's latency: ~25-45 ns when the two vCPUs sit on one core complex (its one
 * link to memory shared: the slow mode), ~160 ns when they sit on two (two links: the fast mode,
 * bench/RESULTS.md, nineteenth session). Prints "latency_ns GB/s" a sample, then the median read
 * rate of the samples at under and over twice the lowest latency. Returns 0, 1 when fewer than two
 * threads run. */
static int placement(int samples) {
    static _Alignas(64) _Atomic int line;
    enum { TRIPS = 20000 };
    const size_t bytes = PROBE_BYTES;
    const uint8_t *buf = probe_buffer(2, bytes);
    if (!buf) return 1;
    double *lat = malloc(sizeof(double) * samples), *gbs = malloc(sizeof(double) * samples);
    double *bins = malloc(sizeof(double) * samples); /* the rates, near ones from the front, far ones from the back */
    int ok = lat && gbs && bins;
    for (int s = 0; ok && s < samples; s++) {
        atomic_store(&line, 0);
        uint64_t sink = 0;
#pragma omp parallel num_threads(2) reduction(^ : sink)
        {
            const int me = omp_get_thread_num();
            if (omp_get_num_threads() < 2) {
                if (me == 0) ok = 0;
            } else {
#pragma omp barrier
                const double t0 = now();
                for (int i = 0; i < TRIPS; i++) { /* thread 0 writes odd values, thread 1 even ones */
                    while (atomic_load_explicit(&line, memory_order_acquire) != 2 * i + me) {}
                    atomic_store_explicit(&line, 2 * i + me + 1, memory_order_release);
                }
                if (me == 0) lat[s] = (now() - t0) / TRIPS / 2 * 1e9;
#pragma omp barrier
                const double t1 = now();
                sink ^= stream_read(buf + bytes / 2 * (size_t)me, bytes / 2, 1);
#pragma omp barrier
                if (me == 0) gbs[s] = bytes / (now() - t1) / 1e9;
            }
        }
        if (sink == 42) printf(" "); /* the reads must not be optimized away */
        if (ok) printf("%.1f %.1f\n", lat[s], gbs[s]);
        fflush(stdout);
        const struct timespec pause = {0, 30 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
    if (ok) {
        double lo = 1e30;
        int n_near = 0, n_far = 0;
        for (int s = 0; s < samples; s++) lo = fmin(lo, lat[s]);
        for (int s = 0; s < samples; s++) {
            if (lat[s] < 2 * lo) bins[n_near++] = gbs[s];
            else bins[samples - 1 - n_far++] = gbs[s];
        }
        printf("under %.0f ns: %d samples, median %.1f GB/s; over: %d samples, median %.1f GB/s\n", 2 * lo, n_near,
               median(bins, n_near), n_far, median(bins + n_near, n_far));
    }
    free(lat), free(gbs), free(bins);
    return !ok;
}

/* A file's pages mapped as the engine maps its weights (read-only, MADV_HUGEPAGE) and paged in (from
 * disk if the page cache does not hold them), *bytes = its size in whole pages; NULL when it cannot be
 * mapped or is under a page a thread (read_all's slices are whole pages). */
static uint8_t *map_paged_in(const char *path, int threads, size_t *bytes) {
    const int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) || !S_ISREG(st.st_mode) || (size_t)st.st_size / (size_t)threads < 4096) {
        if (fd >= 0) close(fd);
        return NULL;
    }
    *bytes = (size_t)st.st_size & ~(size_t)4095;
    uint8_t *p = mmap(NULL, *bytes, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, *bytes, MADV_HUGEPAGE);
#endif
    if (read_all(p, *bytes, threads, 1) == 42) printf(" "); /* the reads must not be optimized away */
    return p;
}

/* Read bandwidth of a file's pages where the page cache holds them: all of the mapped file read as
 * the probe above reads its buffer, best of 3 passes each way. Why: on the dev VMs the page cache
 * that holds a model's weights read at 0.60-0.91x the rate of the probe's fresh buffer, changing
 * from one reload of the page cache to the next (bench/RESULTS.md, 2026-12-06), so decode speed is
 * also shown against what the weights' own memory delivers. 0 when the file cannot be mapped. */
static double file_bandwidth(const char *path, int threads) {
    size_t bytes;
    uint8_t *p = map_paged_in(path, threads, &bytes);
    if (!p) return 0;
    const double gbs = best_read_rate(p, bytes, threads, 6);
    munmap(p, bytes);
    return gbs;
}

/* The same rate window by window (`window` bytes, a multiple of 4 KiB; the last one what is left),
 * best of 3 passes each way per window, one line each: where in the file the slow memory is. Why: on
 * the Intel dev VM some gigabytes of the guest's physical memory read up to ~30 % slower than the
 * rest, and which ones changed within the hour (bench/RESULTS.md, 2026-12-06, eleventh session), so
 * a model's decode speed depends on where its pages landed. Returns 0, or 1 when the file cannot be
 * mapped. */
static int file_bandwidth_map(const char *path, int threads, size_t window) {
    size_t bytes;
    uint8_t *p = map_paged_in(path, threads, &bytes);
    if (!p) return 1;
    double lo = 1e30, hi = 0;
    for (size_t off = 0; off < bytes; off += window) {
        const size_t n = bytes - off < window ? bytes - off : window;
        if (n / (size_t)threads < 4096) break; /* a tail under a page a thread */
        const double gbs = best_read_rate(p + off, n, threads, 6);
        lo = fmin(lo, gbs), hi = fmax(hi, gbs);
        printf("%10.3f GiB %10.3f GiB %8.2f GB/s\n", off / 1073741824.0, (off + n) / 1073741824.0, gbs);
    }
    printf("slowest %.2f GB/s, fastest %.2f GB/s\n", lo, hi);
    munmap(p, bytes);
    return 0;
}

/* Bytes that do not fit in the caches: twice the L3 the C library reports, at least `floor`, at
 * most 1 GiB. Some cloud guests report a whole socket's L3 (480 MiB on a 2-core Xeon VM), and there
 * re-reading 64 MiB ran at 1.8x the DRAM rate and 256 MiB at 1.1x (bench/RESULTS.md), so a fixed
 * size sized for a 32 MiB L3 timed the caches, not memory. */
static size_t beyond_caches(size_t floor) {
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    size_t bytes = l3 > 0 ? 2 * (size_t)l3 : 0;
    if (bytes < floor) bytes = floor;
    return bytes > ((size_t)1 << 30) ? (size_t)1 << 30 : bytes;
}

/* Read beyond_caches(64 MiB) so that the next timed call finds no weights in the caches (written
 * once: untouched pages would all read the one zero page, from the caches). */
static void evict_caches(int threads) {
    static uint8_t *buf;
    static size_t bytes;
    if (!buf) {
        bytes = beyond_caches((size_t)64 << 20);
        if (!(buf = big_alloc(bytes))) return;
        memset(buf, 1, bytes);
    }
    if (read_all(buf, bytes, threads, 1) == 42) printf(" "); /* the reads must not be optimized away */
}

/* One-token Q8_0 products of the sizes a gpt-oss-20b decode step makes (k / v 512 rows, attn_out
 * 2880, q 4096; the output head 201,088), caches evicted before each call: each call quantizes its
 * activations and starts the team before any weight is read, which a product the size of the
 * table above amortizes. The activations are evicted too, unlike in the model, so the gap between
 * the sizes bounds what the model's smaller products lose (bench/RESULTS.md, 2026-12-05). */
static void bench_call_sizes(int threads, int reps) {
    const int64_t n_in = N_EMBD, sizes[] = {512, 2880, 4096, 32768};
    const size_t row = pe_row_size(PE_TYPE_Q8_0, n_in);
    const int64_t n_rows = 4 * sizes[3];
    const int calls = 4 * reps;
    uint8_t *w = big_alloc(row * n_rows);
    float *x = aligned_alloc(64, sizeof(float) * n_in), *y = malloc(sizeof(float) * sizes[3]);
    if (!w || !x || !y) { fprintf(stderr, "out of memory\n"); exit(1); }
    fill(PE_TYPE_Q8_0, w, n_rows, n_in);
    for (int64_t i = 0; i < n_in; i++) x[i] = frand();
    printf("\nOne-token Q8_0 products by size, caches evicted before each call, mean of %d calls on "
           "different rows:\n", calls);
    printf("%-8s %10s %10s %10s %8s %10s\n", "rows", "MB", "us", "GB/s", "BW GB/s", "% of BW");
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        const double near = bandwidth(threads, PROBE_BYTES);
        double total = 0;
        for (int r = 0; r < calls; r++) {
            const pe_weight pw = {w + (size_t)((r * 7919) % (n_rows / sizes[k])) * sizes[k] * row, PE_TYPE_Q8_0,
                                  n_in, sizes[k], (int64_t)row, 0, 1, PE_LAYOUT_ROWS, NULL, 0};
            evict_caches(threads);
            const double t0 = now();
            if (pe_matmul(&pw, 0, x, n_in, 1, NULL, y, sizes[k], threads)) { fprintf(stderr, "out of memory\n"); exit(1); }
            total += now() - t0;
        }
        const double mean = total / calls, bytes = (double)row * sizes[k];
        const double bw = fmax(near, bandwidth(threads, PROBE_BYTES));
        printf("%-8lld %10.2f %10.1f %10.2f %8.1f %9.0f%%\n", (long long)sizes[k], bytes / 1e6, mean * 1e6,
               bytes / mean / 1e9, bw, 100.0 * bytes / mean / 1e9 / bw);
    }
    free(w); free(x); free(y);
}

static void bench_moe(int threads, int reps) {
    const int E = 32, K = 4;
    const int64_t D = N_EMBD, F = N_EMBD;
    const size_t exp_row = pe_row_size(PE_TYPE_MXFP4, D);
    uint8_t *gate = big_alloc(exp_row * F * E), *up = big_alloc(exp_row * F * E), *down = big_alloc(exp_row * D * E);
    float *router = malloc(sizeof(float) * D * E), *rb = calloc(E, sizeof(float));
    float *gb = calloc((size_t)E * F, sizeof(float)), *ub = calloc((size_t)E * F, sizeof(float));
    float *db = calloc((size_t)E * D, sizeof(float));
    float *x = aligned_alloc(64, sizeof(float) * D * 64), *y = malloc(sizeof(float) * D * 64);
    if (!gate || !up || !down || !router || !rb || !gb || !ub || !db || !x || !y) { fprintf(stderr, "out of memory\n"); exit(1); }
    fill(PE_TYPE_MXFP4, gate, F * E, D);
    fill(PE_TYPE_MXFP4, up, F * E, D);
    fill(PE_TYPE_MXFP4, down, D * E, F);
    for (int64_t i = 0; i < D * E; i++) router[i] = frand();
    for (int64_t i = 0; i < D * 64; i++) x[i] = frand();
    pe_moe m = {
        .router = {(const uint8_t *)router, PE_TYPE_F32, D, E, (int64_t)(D * sizeof(float)), 0},
        .router_b = rb,
        .gate = {gate, PE_TYPE_MXFP4, D, F, (int64_t)exp_row, (int64_t)(exp_row * F)},
        .up = {up, PE_TYPE_MXFP4, D, F, (int64_t)exp_row, (int64_t)(exp_row * F)},
        .down = {down, PE_TYPE_MXFP4, F, D, (int64_t)pe_row_size(PE_TYPE_MXFP4, F), (int64_t)(pe_row_size(PE_TYPE_MXFP4, F) * D)},
        .gate_b = gb, .up_b = ub, .down_b = db, .n_expert = E, .n_used = K, .n_embd = D, .n_ff = F,
    };
    printf("\nMoE layer, gpt-oss-20b shape (32 MXFP4 experts, 4 used, n_embd = n_ff = 2880):\n");
    printf("%-8s %12s %12s %12s %8s %10s\n", "tokens", "ms", "GB/s", "GFLOP/s", "BW GB/s", "% of BW");
    /* the experts also in the R16 layout (the engine's default with its repack cache, r16.h) */
    const pe_moe file = m;
    pe_moe r16 = m;
    const int has_r16 = pe_r16_dot_get(PE_TYPE_MXFP4) != NULL;
    pe_weight *const mats[3] = {&r16.gate, &r16.up, &r16.down};
    for (int i = 0; i < 3 && has_r16; i++) {
        uint8_t *dst = big_alloc((size_t)pe_r16_bytes(PE_TYPE_MXFP4, mats[i]->n_in, mats[i]->n_out, E));
        if (!dst) { fprintf(stderr, "out of memory\n"); exit(1); }
        pe_r16_repack(mats[i], E, dst, threads);
        *mats[i] = pe_r16_weight(PE_TYPE_MXFP4, dst, mats[i]->n_in, mats[i]->n_out);
    }
    const int64_t toks[] = {1, 64, 1, 64, 1, 64};
    for (int k = 0; k < (has_r16 ? 6 : 4); k++) {
        const int64_t n = toks[k];
        const int int8 = k < 2 || k >= 4; /* the default (int8 activations), the exact float32 path, R16 */
        m = k >= 4 ? r16 : file;
        m.gate.int8_act = m.up.int8_act = m.down.int8_act = int8;
        double best = 1e30;
        double near = bandwidth(threads, PROBE_BYTES);
        for (int r = 0; r < reps; r++) {
            /* as in decoding: experts not in the caches (the layer's 4 experts are ~53 MB, and the L3
             * kept part of them from one repetition to the next), and one token a different one each
             * time, so that the routing changes */
            evict_caches(threads);
            const double t0 = now();
            if (pe_moe_forward(&m, n == 1 ? x + (r % 64) * D : x, n, y, threads, NULL)) {
                fprintf(stderr, "out of memory\n");
                exit(1);
            }
            const double dt = now() - t0;
            if (dt < best) best = dt;
        }
        near = fmax(near, bandwidth(threads, PROBE_BYTES));
        /* bytes: the distinct experts the tokens chose (at most E), 3 matrices each, + the router */
        const int64_t used = n * K < E ? n * K : E;
        const double bytes = (double)used * (2.0 * exp_row * F + pe_row_size(PE_TYPE_MXFP4, F) * D) + 4.0 * D * E;
        const double flops = 2.0 * n * K * 3.0 * D * F;
        char label[16];
        snprintf(label, sizeof label, k >= 4 ? "%lld (R16)" : int8 ? "%lld" : "%lld (exact)", (long long)n);
        printf("%-8s %12.3f %12.2f %12.2f %8.1f %9.0f%%\n", label, best * 1e3, bytes / best / 1e9,
               flops / best / 1e9, near, 100.0 * bytes / best / 1e9 / near);
    }
    for (int i = 0; i < 3 && has_r16; i++) free((void *)mats[i]->data);
    free(gate); free(up); free(down); free(router); free(rb); free(gb); free(ub); free(db); free(x); free(y);
}

/* One decoded token's attention in a full layer of gpt-oss (64 query heads, 8 K/V heads of 64, f16
 * cache, no window) at depths 4096 and 32768: microseconds per layer and the rate the cache's keys
 * and values stream at (K and V, 2 KiB a position). Twelve layers, as the 20b's full ones, are taken
 * in turn so that their caches (805 MB at 32768) do not sit in the L3; best of REPS passes over them.
 * Why: at long contexts a decoded token's attention reads more than its weights. */
static void bench_attention(int threads, int reps) {
    enum { H = 64, HKV = 8, HD = 64, LAYERS = 12 };
    const int64_t depths[] = {4096, 32768}, kv_dim = HKV * HD, chunk = 256;
    float *k = malloc(sizeof(float) * kv_dim * chunk), *v = malloc(sizeof(float) * kv_dim * chunk);
    float *q = aligned_alloc(64, sizeof(float) * H * HD), *o = aligned_alloc(64, sizeof(float) * H * HD);
    float sinks[H];
    if (!k || !v || !q || !o) { fprintf(stderr, "out of memory\n"); exit(1); }
    for (int i = 0; i < H * HD; i++) q[i] = frand();
    for (int i = 0; i < H; i++) sinks[i] = frand();
    printf("\nAttention, one decoded token, a full gpt-oss layer (64 heads, 8 K/V heads of 64, f16 cache):\n");
    printf("%-8s %12s %12s %12s %8s\n", "depth", "us/layer", "KV MB", "KV GB/s", "BW GB/s");
    for (int di = 0; di < 2; di++) {
        const int64_t depth = depths[di], n_slots = depth + 1;
        const size_t bytes = (size_t)HKV * (size_t)n_slots * pe_row_size(PE_TYPE_F16, HD);
        pe_kv_layer L[LAYERS];
        for (int l = 0; l < LAYERS; l++) {
            L[l] = (pe_kv_layer){big_alloc(bytes), big_alloc(bytes), n_slots, PE_TYPE_F16, PE_TYPE_F16};
            if (!L[l].k || !L[l].v) { fprintf(stderr, "out of memory\n"); exit(1); }
            for (int64_t p0 = 0; p0 < n_slots; p0 += chunk) {
                const int64_t n = n_slots - p0 < chunk ? n_slots - p0 : chunk;
                for (int64_t i = 0; i < n * kv_dim; i++) k[i] = frand(), v[i] = frand();
                pe_kv_store(&L[l], k, v, n, p0, kv_dim, HD);
            }
        }
        double best = 1e30;
        for (int r = 0; r < reps; r++) {
            const double t0 = now();
            for (int l = 0; l < LAYERS; l++)
                if (pe_attention(o, q, 1, depth, &L[l], H, HKV, HD, 0, sinks, threads)) { fprintf(stderr, "out of memory\n"); exit(1); }
            best = fmin(best, (now() - t0) / LAYERS);
        }
        const double near = bandwidth(threads, PROBE_BYTES);
        printf("%-8lld %12.1f %12.1f %12.2f %8.1f\n", (long long)depth, best * 1e6, 2.0 * bytes / 1e6, 2.0 * bytes / best / 1e9, near);
        for (int l = 0; l < LAYERS; l++) free(L[l].k), free(L[l].v);
    }
    free(k); free(v); free(q); free(o);
}

/* Whether `name` is one of the comma-separated names in `list` (any name when list is NULL). */
static int listed(const char *list, const char *name) {
    if (!list) return 1;
    const size_t n = strlen(name);
    for (const char *p = list; *p;) {
        const char *end = strchr(p, ',');
        const size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == n && !strncasecmp(p, name, n)) return 1;
        p += len + (end ? 1 : 0);
    }
    return 0;
}

int main(int argc, char **argv) {
    int threads = omp_get_max_threads(), reps = 5;
    size_t mib = beyond_caches((size_t)256 << 20) >> 20;
    int only_bw = 0, only_peak = 0;
    const char *bw_file = NULL; /* --bandwidth-file: only that file's read rate */
    const char *bw_map = NULL;  /* --bandwidth-map: that file's read rate window by window */
    int placement_samples = -1; /* --placement N: N samples of the two threads' latency and read rate */
    int mib_given = 0;
    const char *only_types = NULL; /* -T: comma-separated type names, NULL: all */
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-t") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-r") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-m") && i + 1 < argc) mib = (size_t)atol(argv[++i]), mib_given = 1;
        else if (!strcmp(argv[i], "-T") && i + 1 < argc) only_types = argv[++i];
        else if (!strcmp(argv[i], "--bandwidth")) only_bw = 1;
        else if (!strcmp(argv[i], "--int8-peak")) only_peak = 1;
        else if (!strcmp(argv[i], "--bandwidth-file") && i + 1 < argc) bw_file = argv[++i];
        else if (!strcmp(argv[i], "--bandwidth-map") && i + 1 < argc) bw_map = argv[++i];
        else if (!strcmp(argv[i], "--placement") && i + 1 < argc) placement_samples = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            printf("usage: %s [-t THREADS] [-r REPS] [-m MIB] [-T TYPES] [--bandwidth] [--bandwidth-file PATH] [--bandwidth-map PATH] [--placement N] [--int8-peak]\n\n"
                   "Times the C core's kernels at gpt-oss-20b shapes next to the machine's memory read bandwidth:\n"
                   "per weight type a one-token product (decode, GB/s of weights and %% of the bandwidth), a\n"
                   "4-token one (a decode step of 4 sequences, GB/s of weights) and a 64-token one (prefill,\n"
                   "GFLOP/s), default and exact paths; one-token Q8_0 products of the sizes a 20b decode step\n"
                   "makes; then the 20b MoE layer, and a decoded token's attention at depths 4096 and 32768.\n\n"
                   "  -t THREADS    OpenMP threads (default: %d)\n"
                   "  -r REPS       repetitions, best is reported (default 5)\n"
                   "  -m MIB        matrix size in MiB, beyond the caches (default %zu: twice the L3, 256 to 1024)\n"
                   "  -T TYPES      only these types' rows, comma-separated (e.g. MXFP4,Q8_0); the sizes table\n"
                   "                only with Q8_0, the MoE layer only with MXFP4, attention only with attention\n"
                   "                (for quick A/B runs)\n"
                   "  --bandwidth   only the read-bandwidth probe, printed as GB/s (for scripts)\n"
                   "  --bandwidth-file PATH\n"
                   "                only the read rate of PATH's pages in the page cache (a model's weights,\n"
                   "                mapped as the engine maps them), printed as GB/s (for scripts)\n"
                   "  --bandwidth-map PATH\n"
                   "                the same rate per window of PATH (-m MIB, default 1024), a line each, then the\n"
                   "                slowest and fastest: where in the file slow memory is\n"
                   "  --placement N N samples of the latency of a cache line handed between two threads and\n"
                   "                their read rate right after, then the median rate at near and far latency:\n"
                   "                whether the memory's speed follows where the two cores sit\n"
                   "  --int8-peak   only the int8 multiply-add peak (vpdpbusd, AVX-512 VNNI; every thread at\n"
                   "                once), printed as G multiply-adds/s (for scripts): prefill's ceiling\n", argv[0], threads, mib);
            return 0;
        } else {
            fprintf(stderr, "usage: %s [-t THREADS] [-r REPS] [-m MIB] [-T TYPES] [--bandwidth] [--bandwidth-file PATH] [--bandwidth-map PATH] [--placement N] [--int8-peak] (-h for help)\n", argv[0]);
            return 2;
        }
    }
    if (threads < 1 || reps < 1 || mib < 1) { fprintf(stderr, "-t, -r and -m must be >= 1\n"); return 2; }
    if (placement_samples >= 0) { /* where the two threads sit, against what they read */
        if (placement_samples < 1) { fprintf(stderr, "--placement needs N >= 1\n"); return 2; }
        if (placement(placement_samples)) { fprintf(stderr, "--placement needs two threads and the probe's buffer\n"); return 1; }
        return 0;
    }
    if (bw_file) { /* the read rate of a model's pages in the page cache, for scripts */
        const double gbs = file_bandwidth(bw_file, threads);
        if (gbs <= 0) { fprintf(stderr, "%s: cannot map it (or under 4 KiB a thread)\n", bw_file); return 1; }
        printf("%.2f\n", gbs);
        return 0;
    }
    if (bw_map) { /* the same, window by window */
        if (file_bandwidth_map(bw_map, threads, (mib_given ? mib : 1024) << 20)) {
            fprintf(stderr, "%s: cannot map it (or under 4 KiB a thread)\n", bw_map);
            return 1;
        }
        return 0;
    }
    if (only_peak) { /* prefill's ceiling, for scripts */
        const double peak = int8_peak(threads);
        if (peak <= 0) { fprintf(stderr, "no AVX-512 VNNI here (SIMD %s)\n", pe_simd_level_name(pe_simd_level_get())); return 1; }
        printf("%.1f\n", peak);
        return 0;
    }
    const double bw = bandwidth(threads, PROBE_BYTES);
    if (only_bw) { /* just the probe, for scripts (bench/compare_llamacpp.py) */
        printf("%.2f\n", bw);
        return 0;
    }
    printf("pyengine kernel bench: SIMD %s, %d threads, best of %d; memory read bandwidth %.1f GB/s; int8 "
           "multiply-add peak %.0f G/s (prefill's ceiling in GFLOP/s: two int8 digits per activation)\n",
           pe_simd_level_name(pe_simd_level_get()), threads, reps, bw, int8_peak(threads));
    printf("matrix: n_in = %d, rows filling %zu MiB; decode = 1 token, 4 tok = one step of 4 sequences, "
           "prefill = 64 tokens\n\n", N_EMBD, mib);
    printf("%-6s %8s %12s %8s %8s %12s %16s %14s %16s\n", "type", "rows", "decode GB/s", "BW GB/s", "% of BW",
           "4 tok GB/s", "prefill GFLOP/s", "exact dec GB/s", "exact pre GFLOP/s");
    const int types[] = {PE_TYPE_F32, PE_TYPE_F16, PE_TYPE_BF16, PE_TYPE_Q8_0, PE_TYPE_Q4_0, PE_TYPE_Q4_1,
                         PE_TYPE_Q5_0, PE_TYPE_Q5_1, PE_TYPE_Q2_K, PE_TYPE_Q3_K, PE_TYPE_Q4_K, PE_TYPE_Q5_K,
                         PE_TYPE_Q6_K, PE_TYPE_MXFP4};
    for (size_t k = 0; k < sizeof types / sizeof types[0]; k++) {
        const int type = types[k];
        const pe_type_traits *t = pe_type_traits_get(type);
        if (!t || !listed(only_types, t->name)) continue;
        /* K-quants have 256-element blocks and 2880 is not a multiple: they get 3072 columns */
        const int64_t n_in = N_EMBD % t->blck_size ? 3072 : N_EMBD;
        const size_t row = pe_row_size(type, n_in);
        const int64_t rows = (int64_t)((mib << 20) / row);
        uint8_t *w = big_alloc(row * rows);
        float *y = malloc(sizeof(float) * rows * 64);
        /* 64-byte aligned like the engine's activations (csrc/arena.h): from malloc they sat 16 bytes
         * off a cache line, and every 64-byte load of x split two lines (F16 decode 0.8x, BF16 0.9x
         * in the L3 with two threads, 2026-12-05) */
        float *xx = aligned_alloc(64, sizeof(float) * n_in * 64);
        if (!w || !y || !xx) { fprintf(stderr, "out of memory\n"); return 1; }
        for (int64_t i = 0; i < n_in * 64; i++) xx[i] = frand();
        fill(type, w, rows, n_in);
        /* the default path (int8 activations where the type has kernels), then the exact one */
        double dec[2], pre[2], near = 0; /* near: the probe right before / after the decode timing */
        double dec4 = 0; /* 4 tokens (the several-token kernels), weight GB/s */
        for (int exact = 0; exact < 2; exact++) {
            pe_weight pw = {w, type, n_in, rows, (int64_t)row, 0, !exact, PE_LAYOUT_ROWS, NULL, 0};
            time_matmul(&pw, xx, 1, y, threads, 1); /* page in */
            if (!exact) near = bandwidth(threads, PROBE_BYTES);
            dec[exact] = row * rows / time_matmul(&pw, xx, 1, y, threads, reps) / 1e9;
            if (!exact) near = fmax(near, bandwidth(threads, PROBE_BYTES));
            if (!exact) dec4 = row * rows / time_matmul(&pw, xx, 4, y, threads, reps) / 1e9;
            const int64_t pre_rows = rows < 8192 ? rows : 8192; /* prefill: compute-bound, a slice is enough */
            pe_weight pp = {w, type, n_in, pre_rows, (int64_t)row, 0, !exact, PE_LAYOUT_ROWS, NULL, 0};
            pre[exact] = 2.0 * n_in * pre_rows * 64 / time_matmul(&pp, xx, 64, y, threads, reps) / 1e9;
        }
        printf("%-6s %8lld %12.2f %8.1f %7.0f%% %12.2f %16.2f %14.2f %16.2f\n", t->name, (long long)rows, dec[0], near,
               100.0 * dec[0] / near, dec4, pre[0], dec[1], pre[1]);
        if (pe_r16_dot_get(type)) { /* the same matrix in the R16 layout (r16.h's types; int8 only) */
            uint8_t *r16 = big_alloc((size_t)pe_r16_bytes(type, n_in, rows, 1));
            if (!r16) { fprintf(stderr, "out of memory\n"); return 1; }
            const pe_weight src = {w, type, n_in, rows, (int64_t)row, 0, 1, PE_LAYOUT_ROWS, NULL, 0};
            pe_r16_repack(&src, 1, r16, threads);
            const pe_weight pr = pe_r16_weight(type, r16, n_in, rows);
            time_matmul(&pr, xx, 1, y, threads, 1);
            near = bandwidth(threads, PROBE_BYTES);
            const double d1 = row * rows / time_matmul(&pr, xx, 1, y, threads, reps) / 1e9;
            near = fmax(near, bandwidth(threads, PROBE_BYTES));
            const double d4 = row * rows / time_matmul(&pr, xx, 4, y, threads, reps) / 1e9;
            const int64_t pre_rows = rows < 8192 ? rows : 8192;
            const pe_weight pp = pe_r16_weight(type, r16, n_in, pre_rows);
            const double p64 = 2.0 * n_in * pre_rows * 64 / time_matmul(&pp, xx, 64, y, threads, reps) / 1e9;
            printf("%-6s %8lld %12.2f %8.1f %7.0f%% %12.2f %16.2f %14s %16s\n", r16_label(type), (long long)rows, d1, near,
                   100.0 * d1 / near, d4, p64, "-", "-");
            free(r16);
        }
        free(w); free(y); free(xx);
    }
    if (listed(only_types, pe_type_traits_get(PE_TYPE_Q8_0)->name)) bench_call_sizes(threads, reps);
    if (listed(only_types, pe_type_traits_get(PE_TYPE_MXFP4)->name)) bench_moe(threads, reps);
    if (listed(only_types, "attention")) bench_attention(threads, reps);
    return 0;
}
