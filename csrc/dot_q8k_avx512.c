/* Decode kernels with int8 activations (AVX-512 VNNI) for Q4_1, Q5_0, Q5_1 and the K-quants: not yet
 * written; these types use the float32-activation dot until then. */
#include "quants_impl.h"

pe_dot_q8_fn pe_dot_q8k_avx512(int type) {
    (void)type;
    return NULL;
}
