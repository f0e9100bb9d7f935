# cython: language_level=3
"""What the C core sees of this processor: the SIMD level its kernels dispatch to."""

cdef extern from "cpu_features.h":
    ctypedef enum pe_simd_level:
        pass
    pe_simd_level pe_simd_level_get()
    const char *pe_simd_level_name(pe_simd_level level)
    int pe_cpu_has_avx512vbmi()
    int pe_cpu_has_avx512bitalg()

cdef extern from "gemm_q8_amx.h":
    int pe_gemm_q8_amx_ready()


def simd_level() -> str:
    """The SIMD variant the kernels use here: "avx512", "avx2" or "scalar".

    Capped by the environment variable PYENGINE_SIMD (read once per process)."""
    return pe_simd_level_name(pe_simd_level_get()).decode()


def avx512_extensions() -> tuple:
    """The AVX-512 extensions beyond VNNI that some int8 kernels use where present ("vbmi",
    "bitalg"; Ice Lake and later, not Cascade Lake); () below the avx512 level or with
    PYENGINE_SIMD=avx512vnni, which hides them."""
    if simd_level() != "avx512":
        return ()
    return tuple(n for n, has in (("vbmi", pe_cpu_has_avx512vbmi()), ("bitalg", pe_cpu_has_avx512bitalg())) if has)


def amx() -> bool:
    """Whether the int8 prefill tiles of the formats with 32-element sub-blocks run on Intel AMX
    here (AMX-TILE and AMX-INT8, granted to this process by Linux; any non-empty PYENGINE_SIMD hides it)."""
    return bool(pe_gemm_q8_amx_ready())
