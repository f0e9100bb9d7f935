# cython: language_level=3
"""What the C core sees of this processor: the SIMD level its kernels dispatch to."""

cdef extern from "cpu_features.h":
    ctypedef enum pe_simd_level:
        pass
    pe_simd_level pe_simd_level_get()
    const char *pe_simd_level_name(pe_simd_level level)


def simd_level() -> str:
    """The SIMD variant the kernels use here: "avx512", "avx2" or "scalar".

    Capped by the environment variable PYENGINE_SIMD (read once per process)."""
    return pe_simd_level_name(pe_simd_level_get()).decode()
