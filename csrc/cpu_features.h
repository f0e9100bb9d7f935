/* Runtime CPU feature detection: one build runs on any x86-64, and the kernels pick
 * their SIMD variant from what the processor (and the OS, for AVX state) supports. */
#ifndef PE_CPU_FEATURES_H
#define PE_CPU_FEATURES_H

typedef enum {
    PE_SIMD_SCALAR = 0,
    PE_SIMD_AVX2 = 1,    /* AVX2 + FMA + F16C */
    PE_SIMD_AVX512 = 2,  /* AVX-512 F/BW/VL/DQ + VNNI (+ BF16 when present) */
} pe_simd_level;

/* Best level this machine supports, capped by the PYENGINE_SIMD environment variable ("scalar",
 * "avx2"; "avx512vnni" keeps the AVX-512 level but hides VBMI and BITALG, see below; "avx512" hides
 * only AMX) so every variant can be tested on one machine. */
pe_simd_level pe_simd_level_get(void);
const char *pe_simd_level_name(pe_simd_level level);
/* AVX-512 VBMI (vpermb, vpermt2b): the file-layout Q4_0/MXFP4/Q4_1/Q5_x int8 decode kernels and the
 * R16 kernel's vpermb form need it on top of PE_SIMD_AVX512; without it (Cascade Lake) those
 * products take the AVX2 kernels or a vpshufb form, with the same bits. */
int pe_cpu_has_avx512vbmi(void);
/* AVX-512 BITALG (vpshufbitqmb): the Q5_0/Q5_1 int8 kernels take their 5th bits with it. */
int pe_cpu_has_avx512bitalg(void);
/* Whether PYENGINE_SIMD leaves AMX to the prefill tiles (unset or empty: yes; any other value, even
 * one it does not know: no). Whether the CPU and the OS have it is gemm_q8_amx.c's question. */
int pe_cpu_amx_allowed(void);
/* Whether the CPU is AMD's (cpuid vendor "AuthenticAMD"): r16.h's pe_r16_one_token_rows asks. */
int pe_cpu_is_amd(void);

#endif
