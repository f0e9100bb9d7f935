/* The weight formats, declared once: X(NAME, ggml type id, elements per block, bytes per block).
 *
 * Why one list: the C kernels (enum pe_type and the traits table, csrc/quants.h / quants.c), the
 * block structs' size checks (csrc/quants_impl.h), the CUDA kernels (csrc/cuda/quant_dev.cuh) and
 * Python (pyengine.quants, through pyengine._quants.type_info, which reads the C traits) all take
 * their ids and geometry from this one macro, so they cannot disagree.
 * The byte layout of each block is gguf-py's gguf/quants.py; docs/quants.md describes them. */
#ifndef PE_QUANT_FORMATS_H
#define PE_QUANT_FORMATS_H

#define PE_QUANT_FORMATS(X)  \
    X(F32, 0, 1, 4)          \
    X(F16, 1, 1, 2)          \
    X(BF16, 30, 1, 2)        \
    X(Q4_0, 2, 32, 18)       \
    X(Q4_1, 3, 32, 20)       \
    X(Q5_0, 6, 32, 22)       \
    X(Q5_1, 7, 32, 24)       \
    X(Q8_0, 8, 32, 34)       \
    X(Q2_K, 10, 256, 84)     \
    X(Q3_K, 11, 256, 110)    \
    X(Q4_K, 12, 256, 144)    \
    X(Q5_K, 13, 256, 176)    \
    X(Q6_K, 14, 256, 210)    \
    X(MXFP4, 39, 32, 17)

#endif
