/* Weights repacked for decode ("R16"): sixteen rows interleaved so that one 64-byte load holds four
 * codes of each of the 16 rows, and one vpdpbusd against a broadcast activation dword gives all 16
 * rows' partial sums with no horizontal reduction (the layout the prefill tiles of gemm_q8_avx512.c
 * build in scratch memory for every tile; here it is built once, into a cache file next to the
 * model: pyengine/repack_cache.py). Every block format has this form: MXFP4 (the experts), Q8_0
 * (the attention and output weights of gpt-oss files), Q5_0 and Q4_K (attention in their Q4_K_M
 * files), Q5_1 and Q5_K (Q5_K_M files: Q5_1 is llama.cpp's fallback for Q5_K where rows are not a
 * multiple of 256), Q4_0 (the fallback of Q2_K and Q3_K), Q6_K, Q2_K, Q3_K (attn_output of the
 * files named for them) and Q4_1.
 *
 * Why: in the file's layout (17- or 34-byte blocks, one row after the other) the decode kernels
 * spend most of their instructions gathering a row's codes and scales and folding per-row sums;
 * with the rows interleaved those instructions go away. MXFP4: ~35 instead of ~54 vector
 * instructions per 16 rows x 32 elements, ~1.5x faster on one core with its data in cache. Q8_0:
 * no decoding at all (the codes are stored + 128, unsigned, as vpdpbusd takes them), 1.9x faster
 * in cache, and from memory (two threads) 1.09x, since the less a kernel computes per byte, the
 * closer it streams to the memory's rate (bench/RESULTS.md). Q5_0 and Q4_K: no gathering of fifth
 * bits or packed 6-bit scales; 92 % and 87 % of the bandwidth probe against 72 % and 74 %; Q4_1 and
 * Q5_1 97 % and 93 % against 75 % and 73 %, Q5_K 86 % against 78 % (bench/RESULTS.md has Q2_K, Q3_K
 * and Q6_K).
 *
 * Layout of an expert's matrix of n_out rows x n_in elements (nb = n_in / 32 blocks, K-quants: n_in /
 * 256 super-blocks): groups of 16 rows, group g = rows 16 g .. 16 g + 15 (past n_out: the last row
 * again), pe_r16_group_bytes = the bytes of its 16 rows in the file (16 * block bytes * nb; Q3_K,
 * Q4_K, Q5_K: 64 more per super-block, their scales unpacked) rounded up to 64, so that every group starts on a 64-byte
 * boundary when the matrix does. Inside a group: the codes of every block, then the scales of every
 * block, then zero padding.
 * MXFP4 (256 code bytes and 16 scale bytes per block):
 *   codes of block b, piece j (j < 4), at 256 b + 64 j: bytes 4 i .. 4 i + 3 are row i's qs[4 j .. 4 j + 3]
 *     (low nibbles: elements 32 b + 4 j + e, high nibbles: elements 32 b + 16 + 4 j + e)
 *   scale of block b at 256 nb + 16 b + i: row i's E8M0 byte
 * Q8_0 (512 code bytes and 32 scale bytes per block):
 *   codes of block b, piece j (j < 8), at 512 b + 64 j: bytes 4 i .. 4 i + 3 are row i's
 *     qs[4 j .. 4 j + 3] + 128 (elements 32 b + 4 j + e), i.e. exactly the packing of the prefill tiles
 *   scale of block b at 512 nb + 32 b + 2 i: row i's f16 d
 * Q5_0 (320 code bytes and 32 scale bytes per block):
 *   codes of block b, five pieces at 320 b + 64 k: byte 4 i + e of piece k (k < 4), bits 0-4 = row i's
 *     5-bit code of element 8 k + e, bits 5-7 = the low three bits of element 8 k + 4 + e's; byte
 *     4 i + e of piece 4, bits 2 k, 2 k + 1 = the top two bits of element 8 k + 4 + e's
 *   scale of block b at 320 nb + 32 b + 2 i: row i's f16 d
 * Q4_0 (256 code bytes and 32 scale bytes per block): codes as MXFP4's (the raw nibbles, q + 8), scale
 *   of block b at 256 nb + 32 b + 2 i: row i's f16 d
 * Q4_1 (256 code bytes and 64 scale bytes per block), Q5_1 (320 and 64):
 *   codes of block b at 256 b (Q5_1: 320 b) as MXFP4's (Q5_1: as Q5_0's five pieces)
 *   scales of block b at 256 nb + 64 b (Q5_1: 320 nb + 64 b): row i's f16 d at 2 i, its f16 m at 32 + 2 i
 * Q4_K (2048 code bytes and 320 scale bytes per super-block):
 *   codes of super-block b, sub-block s (elements 256 b + 32 s ..), piece j (j < 4), at
 *     2048 b + 256 s + 64 j: byte 4 i + e = row i's code of element 32 s + 4 j + e (low nibble) and
 *     of 32 s + 16 + 4 j + e (high nibble), as MXFP4's pieces
 *   at 2048 nb + 320 b: the 6-bit scales (byte 16 s + i) and minimums (128 + 16 s + i) of every
 *     sub-block and row, then the rows' f16 d (256 + 2 i) and dmin (288 + 2 i)
 * Q5_K (2560 code bytes and 320 scale bytes per super-block): as Q4_K, but each sub-block's codes are
 *   320 bytes at 2560 b + 320 s, as Q5_0's five pieces
 * Q2_K, Q3_K, Q6_K (sub-blocks of 16; per super-block 8 units of 32 elements of 128, 192 or 384 code
 * bytes, then 320, 288 or 288 scale bytes), unit u (elements 256 b + 32 u ..) at ub (8 b + u):
 *   Q2_K: two pieces k < 2 of 2-bit fields: byte 4 i + e, bits 2 f, 2 f + 1 = row i's code of element
 *     4 (4 k + f) + e of the unit
 *   Q3_K: three pieces k < 3 of 3-bit fields: byte 4 i + e of piece k, bits 0-2 = row i's code of
 *     element 4 (2 k) + e of the unit, bits 3-5 = of element 4 (2 k + 1) + e; bits 6-7 of pieces 0
 *     and 1 = the low two bits of elements 24 + e and 28 + e, bits 6 and 7 of piece 2 their third bits
 *   Q6_K: its low four bits as MXFP4's pieces, then at + 256 its high two bits as Q2_K's pieces
 *   at 8 ub nb + (320 or 288) b: byte 16 s + i = row i's scale of sub-block s (Q2_K: the file's byte,
 *     minimum in the high nibble; Q3_K: the signed 6-bit scale as int8; Q6_K: its int8), then the
 *     rows' f16 d (256 + 2 i) and Q2_K's dmin (288 + 2 i)
 * An expert's matrix is ceil(n_out / 16) groups; experts follow each other with no gap.
 * The products are bit-identical to the file-layout kernels (dot_q8_avx512.c, dot_q8k_avx512.c,
 * gemm_q8_avx512.c): the same integer sums, the same float operations in the same order. */
#ifndef PE_R16_H
#define PE_R16_H

#include <stdint.h>

#include "matmul.h"
#include "quants.h"

#define PE_R16_ROWS 16

/* Code bytes of one 32-element unit of a group (16 rows; the codes of a block, or of one of a
 * super-block's eight units), or 0 for a type with no R16 form: what each format's layout above
 * takes before its scales. */
static inline int pe_r16_unit_bytes(int type) {
    switch (type) {
    case PE_TYPE_Q8_0: return 512;
    case PE_TYPE_MXFP4: case PE_TYPE_Q4_0: case PE_TYPE_Q4_1: case PE_TYPE_Q4_K: return 256;
    case PE_TYPE_Q5_0: case PE_TYPE_Q5_1: case PE_TYPE_Q5_K: return 320;
    case PE_TYPE_Q2_K: return 128;
    case PE_TYPE_Q3_K: return 192;
    case PE_TYPE_Q6_K: return 384;
    default: return 0;
    }
}

/* While a thread reads a group, the kernel prefetches into L2, block by block, the group the same
 * thread will read this many groups later (the caller says which: the next groups of a thread's run
 * may belong to another matrix, another expert). Two groups of 2880-element rows (~48 KiB) measured
 * on the dev box (one core from DRAM) 25-27 GB/s against 15-21 at 4-16 KiB or into L1; the hardware
 * prefetcher alone left the kernel waiting on memory between its bursts of work. */
#define PE_R16_PF_GROUPS 2

/* Byte of element 32 b + 4 j (j < 8) in pe_act_q8's xh / xl order, where the kernels broadcast the
 * activation dword of a piece: per 128 elements, bytes 16 k + i = element 32 k + i and
 * 64 + 16 k + i = element 32 k + 16 + i. */
static inline int64_t pe_r16_act_at(int64_t b, int j) {
    return 128 * (b / 4) + 16 * (b % 4) + (j < 4 ? 4 * j : 64 + 4 * (j - 4));
}

/* One cache line at p into L2. An asm statement, not __builtin_prefetch: GCC 12 at -O3 deletes
 * the builtin from a loop that holds nothing else when it vectorizes that loop (the two-cursor
 * loop below lost every prefetch in the MXFP4 kernel, where its trip count is a constant). */
static inline void pe_r16_prefetch_line(const uint8_t *p) {
#if defined(__x86_64__)
    __asm__ volatile("prefetcht1 %0" : : "m"(*(const char *)p));
#else
    __builtin_prefetch(p, 0, 2);
#endif
}

/* How many cursors pe_r16_prefetch_codes spreads a group's codes over: 1 on AMD CPUs, 4 on the
 * others; PYENGINE_R16_PF_CURSORS=1 or 4 says which (for A/B runs). Set when the library loads
 * (r16.c), read by the kernels' prefetch steps. Why it depends on the CPU: more cursors keep more
 * reads in flight per thread than one, and on the Intel box (kernel bench, 2026-12-05) two instead
 * of one took the R16 forms of the 32-block formats from 83-92 % to 91-99 % of the probe, the
 * K-quants' from 74-82 % to 79-95 %, 4-token Q8_0 from 23 to 28 GB/s (four instead of two: decode
 * 1.006-1.014x paired end to end). On the Zen 4 VM one cursor decoded the MXFP4 synth file 1.017x
 * and 1.032x faster than four in two paired runs (bench/ab_builds.py, tg16, 24 pairs each, both
 * memory modes; bench/RESULTS.md, seventeenth session). */
extern int pe_r16_pf_cursors;

/* The codes at [at, at + n) of a group (at pf; NULL: nothing) whose codes take `total` bytes, into
 * L2: with one cursor in order, with four from one cursor in each quarter of the codes (the step's
 * n / 64 lines round-robin to the cursors), so each line of the group is prefetched once, as the
 * kernel reads n bytes. */
static inline void pe_r16_prefetch_codes(const uint8_t *pf, int64_t total, int64_t at, int n) {
    if (!pf) return;
    if (pe_r16_pf_cursors == 1) {
        for (int k = 0; k < n / 64; k++) pe_r16_prefetch_line(pf + at + 64 * k);
        return;
    }
    enum { K = 4 };
    const int64_t part = (total / 64 + K - 1) / K * 64; /* cursor c starts at c * part */
    /* Steps of whole rounds of the cursors (MXFP4, Q4_0, Q4_1, Q4_K: 256 bytes; Q8_0: 512): line
     * at / 64 + k goes to cursor k % K, so the addresses are loop invariants plus constants. The
     * general loop below costs a multiply and sign fix-ups a line: on Zen 4, one core, weights in
     * L2, that arithmetic cost MXFP4's kernel 6-8 % and Q8_0's 11-14 % (bench/RESULTS.md, 2026-12-06). */
    if (at % (64 * K) == 0 && n % (64 * K) == 0) {
        const uint8_t *q = pf + at / K;
        for (int k = 0; k < n / 64; k++) pe_r16_prefetch_line(q + (k % K) * part + k / K * 64);
        return;
    }
    for (int64_t i = at / 64; i < (at + n) / 64; i++) pe_r16_prefetch_line(pf + (i % K) * part + i / K * 64);
}

/* The 32-block kernels' step for block b of nb: block b's share of the codes (`code` bytes a block)
 * and, once per 64 bytes, the scales that follow them (`scale` bytes a block). */
static inline void pe_r16_prefetch_block(const uint8_t *pf, int64_t nb, int64_t b, const int code, const int scale) {
    if (!pf) return;
    pe_r16_prefetch_codes(pf, code * nb, code * b, code);
    if (!((scale * b) & 63)) pe_r16_prefetch_line(pf + code * nb + scale * b);
}
/* The K-quant kernels' step for unit b (sub-block b % 8 of super-block b / 8) of a group of nsb
 * super-blocks: unit b's share of the codes (`unit` bytes a unit) and one 64-byte line of its
 * super-block's scale area (`scale` bytes a super-block, at most 8 lines) while lines remain. */
static inline void pe_r16_prefetch_unit(const uint8_t *pf, int64_t nsb, int64_t b, const int unit, const int scale) {
    if (!pf) return;
    pe_r16_prefetch_codes(pf, 8 * unit * nsb, unit * b, unit);
    if (64 * (b % 8) < scale) pe_r16_prefetch_line(pf + 8 * unit * nsb + scale * (b / 8) + 64 * (b % 8));
}
/* MXFP4's step: 256 code bytes and 16 scale bytes a block. */
static inline void pe_r16_prefetch(const uint8_t *pf, int64_t nb, int64_t b) { pe_r16_prefetch_block(pf, nb, b, 256, 16); }

/* Whether ggml type `type` has an R16 form (every block format: MXFP4, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K). */
static inline int pe_r16_has_type(int type) { return pe_r16_unit_bytes(type) != 0; }
/* Whether one-token products of an R16 weight of this type read its rows in the file's layout
 * instead, where the weight carries them (pe_weight.rows): PYENGINE_DECODE_LAYOUT=rows says yes for
 * every type, =r16 no; unset (or anything else), yes for Q8_0 on AMD CPUs. On the Zen 4 dev VM the
 * file layout's one-token Q8_0 kernel streamed 50-56 GB/s from a ~68 GB/s memory where the R16 one
 * read 35-41 (two demand streams, more or fewer prefetch cursors, a slower kernel: none moved it),
 * while on the Intel box R16 read faster (95 % of the probe against 86 %); several tokens keep R16,
 * whose kernel reads each block once for all of them (bench/RESULTS.md, thirteenth session). */
int pe_r16_one_token_rows(int type);

/* Bytes of one group of 16 rows of n_in elements. */
int64_t pe_r16_group_bytes(int type, int64_t n_in);
/* Bytes of the repacked form of a weight of n_expert matrices of n_out rows x n_in elements. */
int64_t pe_r16_bytes(int type, int64_t n_in, int64_t n_out, int64_t n_expert);

/* The pe_weight over R16 bytes at `data` (64-byte aligned) of matrices of the type of n_out rows x
 * n_in elements, one expert after the other: row_stride = group bytes / 16, int8 activations. */
pe_weight pe_r16_weight(int type, const uint8_t *data, int64_t n_in, int64_t n_out);

/* dst (pe_r16_bytes(...) bytes) = the repacked form of `src`, a weight of a type with an R16 form in the file's
 * layout (any row and expert stride), over n_expert experts; threads take groups of rows. */
void pe_r16_repack(const pe_weight *src, int64_t n_expert, uint8_t *dst, int n_threads);

/* out[t * ldo + i] = row i of the group . token t, for i < nr (1..16) and t < n_tok (1..8), over
 * nb 32-element blocks; per token the bits of the file layout's int8 kernel (dot_q8_avx512.c,
 * dot_q8k_avx512.c). `pf`: a group of
 * the same type and n_in to prefetch into L2 meanwhile (PE_R16_PF_GROUPS), or NULL. */
typedef void (*pe_r16_dot_fn)(const uint8_t *group, int64_t nb, int nr, const pe_act_q8 *x, int n_tok, float *out,
                              int64_t ldo, const uint8_t *pf);
/* The kernel for this CPU and type, or NULL: MXFP4 on AVX-512 VNNI (vpermb or vpshufb form:
 * r16_avx512.c) or AVX2 (dot_q8_avx2.c, the same bits); the other types on AVX-512 VNNI. */
pe_r16_dot_fn pe_r16_dot_get(int type);
void pe_r16_dot_avx2(const uint8_t *group, int64_t nb, int nr, const pe_act_q8 *x, int n_tok, float *out, int64_t ldo,
                     const uint8_t *pf);

#endif
