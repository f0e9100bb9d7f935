# The C core's model structs (csrc/matmul.h, attention.h, moe.h, gptoss.h), declared once for every
# Cython module that builds or reads them: pyengine._model fills them, pyengine._cuda uploads them.

from libc.stdint cimport int64_t, uint8_t

cdef extern from "matmul.h":
    ctypedef struct pe_weight:
        const uint8_t *data
        int type
        int64_t n_in, n_out, row_stride, expert_stride
        int int8_act
        int layout
        const uint8_t *rows
        int64_t rows_stride
    enum: PE_LAYOUT_ROWS

cdef extern from "attention.h":
    ctypedef struct pe_kv_layer:
        uint8_t *k
        uint8_t *v
        int64_t n_slots
        int type_k, type_v
    int pe_kv_keys_tiled(int type)

cdef extern from "moe.h":
    ctypedef struct pe_moe:
        pe_weight router
        const float *router_b
        pe_weight gate, up, down
        const float *gate_b
        const float *up_b
        const float *down_b
        int n_expert, n_used
        int64_t n_embd, n_ff

cdef extern from "gptoss.h":
    ctypedef struct pe_layer:
        const float *attn_norm
        pe_weight wq, wk, wv, wo
        const float *bq
        const float *bk
        const float *bv
        const float *bo
        const float *sinks
        const float *post_norm
        pe_moe moe
        int sliding
    ctypedef struct pe_model:
        int n_layer, n_head, n_head_kv, head_dim
        int64_t n_embd, n_vocab, window
        float eps
        const double *omega
        const double *omega_swa
        double rope_mscale
        pe_weight tok_embd, output
        const float *out_norm
        const pe_layer *layers
    ctypedef struct pe_seq:
        pe_kv_layer *kv
        int64_t n_tok, n_past
