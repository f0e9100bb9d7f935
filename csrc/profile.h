/* Where a forward pass spends its time, per operation: wall time, calls and weight bytes read,
 * accumulated while profiling is on (pyengine bench --profile; pyengine._model.profile_*).
 *
 * Why: the speed target is the memory-bandwidth limit, and the kernel bench (bench/bench_kernels.c)
 * times each product alone; this shows the whole pass as it runs, the products next to everything
 * between them (norms, RoPE, attention, the router, the expert sum), each product's GB/s from its
 * own bytes. Off, each timer costs one load and a branch; on, two clock reads (~40 ns, ~15 per
 * layer). The counters are process-wide: two forward passes running at once would mix. */
#ifndef PE_PROFILE_H
#define PE_PROFILE_H

#include <stdint.h>

typedef enum {
    PE_OP_EMBED,       /* token embedding rows and the RoPE tables */
    PE_OP_NORM,        /* every RMSNorm */
    PE_OP_QKV,         /* q|k|v products (+bias) */
    PE_OP_ROPE,        /* RoPE on q and k */
    PE_OP_ATTENTION,   /* K/V store and attention with sinks over the cache */
    PE_OP_ATTN_OUT,    /* output projection (+bias) */
    PE_OP_RESIDUAL,    /* the residual adds */
    PE_OP_ROUTER,      /* router product, top-k, softmax, grouping by expert */
    PE_OP_EXPERT_UP,   /* the chosen experts' gate|up products */
    PE_OP_SWIGLU,      /* clamped SwiGLU */
    PE_OP_EXPERT_DOWN, /* the chosen experts' down products */
    PE_OP_EXPERT_SUM,  /* the weighted sum of the experts' outputs */
    PE_OP_OUTPUT,      /* the output head */
    PE_OP_FORWARD,     /* the whole forward pass (the others are parts of it) */
    PE_OP_COUNT
} pe_op;

/* Turn profiling on (nonzero) or off (the counters are kept: pause and resume). */
void pe_profile_enable(int on);
/* Zero the counters. */
void pe_profile_reset(void);
/* The counters of every op: nanoseconds, calls, weight bytes read. */
void pe_profile_read(int64_t ns[PE_OP_COUNT], int64_t calls[PE_OP_COUNT], int64_t bytes[PE_OP_COUNT]);

/* The op's name in tables ("qkv", "expert_up", ...); NULL outside [0, PE_OP_COUNT). */
const char *pe_profile_op_name(int op);

/* A timer: t = pe_prof_begin(); ...; pe_prof_end(op, t, bytes). t is 0 while profiling is off. */
int64_t pe_prof_begin(void);
void pe_prof_end(pe_op op, int64_t t, int64_t bytes);

#endif
