/* The gpt-oss forward pass on a CUDA device: the same model as csrc/gptoss.c, step for step, with the
 * weights uploaded once and the activations kept on the device. Layers may be split between the CPU
 * and the GPU (the first layers on the CPU, as with llama.cpp's n_gpu_layers), and a layer's experts
 * may stay in host memory (cpu_moe: the GPU computes attention, the CPU the mixture of experts).
 *
 * Every pointer and shape is validated by the caller (pyengine/_cuda_model.pxi). */
#ifndef PE_GPTOSS_CUDA_H
#define PE_GPTOSS_CUDA_H

#include <stdint.h>

#include "matmul_cuda.h"
#include "matvec_q8_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

#include "gptoss.h" /* the CPU model: a C header */

typedef struct {
    int on_gpu;                          /* 0: the CPU runs this layer (it comes before every GPU layer) */
    int cpu_moe;                         /* 1: the experts stay in host memory and the CPU runs them */
    int sliding;
    const float *attn_norm, *post_norm;  /* device [n_embd] */
    int qkv_fused;                       /* 1: wqkv holds the q, k and v rows (same type), one product */
    pe_cu_weight wqkv;                   /* [q_dim + 2 kv_dim rows] when qkv_fused */
    const float *bqkv;                   /* device [q_dim + 2 kv_dim] when qkv_fused */
    pe_cu_weight wq, wk, wv, wo;         /* wq, wk, wv when not qkv_fused */
    const float *bq, *bk, *bv, *bo;      /* device; zeros where the file has no bias */
    const float *sinks;                  /* device [n_head] */
    pe_cu_weight router;
    const float *router_b;               /* device [n_expert] */
    int gate_up_fused;                   /* 1: gate_up holds each expert's gate rows, then its up rows */
    pe_cu_weight gate_up;                /* [n_expert][2 n_ff rows] when gate_up_fused: one product */
    const float *gate_up_b;              /* device [n_expert][2 n_ff] when gate_up_fused */
    pe_cu_weight gate, up, down;         /* expert-stacked (gate, up unused when gate_up_fused; none
                                          * with cpu_moe) */
    const float *gate_b, *up_b, *down_b; /* device [n_expert][n_ff] / [n_expert][n_embd] */
    /* re-laid copies for decode on int8 activations (matvec_q8_cuda.h); qs NULL where there is none
     * (exact engines, other types, unfused q|k|v or gate|up) */
    pe_cu_wq8 wqkv_q8, wo_q8, gate_up_q8, down_q8;
} pe_cu_layer;

typedef struct {
    int n_layer, n_head, n_head_kv, head_dim, n_expert, n_used;
    int64_t n_embd, n_ff, n_vocab, window;
    float eps;
    const double *omega, *omega_swa;     /* device [head_dim / 2] */
    double rope_mscale;
    pe_cu_weight output;
    pe_cu_wq8 output_q8;                 /* qs NULL: the head decodes on float activations */
    const float *out_norm;               /* device [n_embd] */
    const pe_cu_layer *layers;           /* host array [n_layer] */
    int first_gpu_layer;                 /* layers before it run on the CPU */
    const pe_model *cpu;                 /* the CPU model: embeddings, CPU layers, cpu_moe experts */
    int int8_act;                        /* 1: prefill products with Q8_0/MXFP4 weights quantize the
                                          * activations to int8 (gemm_i8_cuda.h); 0: float (exact) */
} pe_cu_model;

typedef struct {
    void *k, *v;                         /* device [n_slots] rows of n_head_kv * head_dim elements */
    int64_t n_slots;
    int type_k, type_v;                  /* element types (attention_cuda.h) */
} pe_cu_kv_layer;

/* One sequence of a forward call (see pe_seq): its GPU cache rows kv[l] for GPU layers, its CPU
 * cache cpu_kv[l] for CPU layers. */
typedef struct {
    pe_cu_kv_layer *kv;
    pe_kv_layer *cpu_kv;
    int64_t n_tok, n_past;
} pe_cu_seq;

/* Scratch memory and the stream of one model for calls of at most max_tok tokens in total. */
typedef struct pe_cu_ctx pe_cu_ctx;

/* NULL when memory runs out (the CUDA error is then in *err). use_graphs: capture single-token decode
 * steps of one sequence into a CUDA graph and replay it. */
pe_cu_ctx *pe_cu_ctx_create(const pe_cu_model *m, int64_t max_tok, int use_graphs, int *err);
void pe_cu_ctx_free(pe_cu_ctx *c);
/* Device bytes the context holds. */
int64_t pe_cu_ctx_bytes(const pe_cu_ctx *c);
/* 1 while decode steps use CUDA graphs (0 when asked not to, or after 3 refused captures). */
int pe_cu_ctx_graphs(const pe_cu_ctx *c);
/* Captures refused so far (each such step ran direct launches); *last_error: the last one's error. */
int pe_cu_ctx_graph_failures(const pe_cu_ctx *c, int *last_error);

/* Profile mode (graphs off): every operation of later forward calls is timed with events; enabling
 * or disabling clears the totals. pe_cu_ctx_profile_read gives operation op's name, milliseconds and
 * calls so far (op from 0 while it returns 0). */
void pe_cu_ctx_profile(pe_cu_ctx *c, int enable);
int pe_cu_ctx_profile_read(const pe_cu_ctx *c, int op, const char **name, double *ms, int64_t *calls);

/* As pe_gptoss_forward_seqs (tokens and logits in host memory; logits [total][n_vocab] when logits_all,
 * else [n_seq][n_vocab]; best pinned, cudaMallocHost, so the download needs no staging copy).
 * argmax (NULL: none): each logits row's argmax computed on the device (argmax_cuda.h: the greedy
 * sampler's choice), one int32 per row. logits NULL: no logits come back (with argmax, a greedy step
 * moves 8 bytes per sequence to the host instead of n_vocab floats). Returns 0, a CUDA error code,
 * or -1 when host memory runs out. */
int pe_cu_forward(const pe_cu_model *m, pe_cu_ctx *c, const pe_cu_seq *seqs, int64_t n_seq, const int32_t *tokens,
                  float *logits, int32_t *argmax, int logits_all, int n_threads, int64_t *expert_counts);

#ifdef __cplusplus
}
#endif

#endif
