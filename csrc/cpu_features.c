/* Runtime CPU feature detection (see cpu_features.h). */
#include "cpu_features.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

static unsigned long long pe_xgetbv(unsigned int index) {
    unsigned int eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(index));
    return ((unsigned long long)edx << 32) | eax;
}

static pe_simd_level detect(void) {
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return PE_SIMD_SCALAR;
    int osxsave = (c >> 27) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1, avx = (c >> 28) & 1;
    if (!osxsave || !avx) return PE_SIMD_SCALAR;
    unsigned long long xcr0 = pe_xgetbv(0);
    if ((xcr0 & 0x6) != 0x6) return PE_SIMD_SCALAR; /* OS saves XMM and YMM state */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return PE_SIMD_SCALAR;
    int avx2 = (b >> 5) & 1;
    int avx512f = (b >> 16) & 1, avx512dq = (b >> 17) & 1, avx512bw = (b >> 30) & 1, avx512vl = (b >> 31) & 1;
    int vnni = (c >> 11) & 1;
    if (!(avx2 && fma && f16c)) return PE_SIMD_SCALAR;
    if (avx512f && avx512dq && avx512bw && avx512vl && vnni && (xcr0 & 0xe6) == 0xe6) return PE_SIMD_AVX512;
    return PE_SIMD_AVX2;
}

/* Bit `bit` of cpuid leaf 7's ECX: an AVX-512 extension of Ice Lake and later (absent on Cascade Lake). */
static int leaf7_ecx(int bit) {
    unsigned int a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (c >> bit) & 1;
}

/* Read once: pe_r16_one_token_rows asks at every product, and cpuid traps to the hypervisor in a VM. */
int pe_cpu_is_amd(void) {
    static int cached = -1;
    if (cached < 0) {
        unsigned int a, b, c, d;
        cached = __get_cpuid(0, &a, &b, &c, &d) && b == 0x68747541u && d == 0x69746e65u &&
                 c == 0x444d4163u; /* "Auth" "enti" "cAMD" */
    }
    return cached;
}
#else
static pe_simd_level detect(void) { return PE_SIMD_SCALAR; }
static int leaf7_ecx(int bit) { return 0; }
int pe_cpu_is_amd(void) { return 0; }
#endif

/* PYENGINE_SIMD, read once per process: scalar and avx2 cap the level; avx512vnni keeps it and hides
 * VBMI and BITALG, as on Cascade Lake; avx512 (or any other value) keeps them all. Any non-empty
 * value hides AMX (pe_cpu_amx_allowed). */
typedef enum { CAP_NONE, CAP_SCALAR, CAP_AVX2, CAP_AVX512VNNI } simd_cap;

static simd_cap cap_get(void) {
    static int cached = -1;
    if (cached < 0) {
        const char *cap = getenv("PYENGINE_SIMD");
        cached = !cap ? CAP_NONE
                 : strcmp(cap, "scalar") == 0 ? CAP_SCALAR
                 : strcmp(cap, "avx2") == 0 ? CAP_AVX2
                 : strcmp(cap, "avx512vnni") == 0 ? CAP_AVX512VNNI : CAP_NONE;
    }
    return (simd_cap)cached;
}

int pe_cpu_has_avx512vbmi(void) { return cap_get() != CAP_AVX512VNNI && leaf7_ecx(1); }

int pe_cpu_has_avx512bitalg(void) { return cap_get() != CAP_AVX512VNNI && leaf7_ecx(12); }

int pe_cpu_amx_allowed(void) {
    const char *cap = getenv("PYENGINE_SIMD");
    return !cap || !*cap;
}

const char *pe_simd_level_name(pe_simd_level level) {
    switch (level) {
    case PE_SIMD_AVX512: return "avx512";
    case PE_SIMD_AVX2: return "avx2";
    default: return "scalar";
    }
}

pe_simd_level pe_simd_level_get(void) {
    static int cached = -1;
    if (cached < 0) {
        pe_simd_level level = detect();
        if (cap_get() == CAP_SCALAR) level = PE_SIMD_SCALAR;
        else if (cap_get() == CAP_AVX2 && level > PE_SIMD_AVX2) level = PE_SIMD_AVX2;
        cached = (int)level;
    }
    return (pe_simd_level)cached;
}
