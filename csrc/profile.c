/* Process-wide per-operation counters (see profile.h). */
#include "profile.h"

#include <stdatomic.h>
#include <time.h>

static atomic_int enabled;
static _Atomic int64_t op_ns[PE_OP_COUNT], op_calls[PE_OP_COUNT], op_bytes[PE_OP_COUNT];

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

const char *pe_profile_op_name(int op) {
    static const char *const names[PE_OP_COUNT] = {
        [PE_OP_EMBED] = "embed",         [PE_OP_NORM] = "norm",         [PE_OP_QKV] = "qkv",
        [PE_OP_ROPE] = "rope",           [PE_OP_ATTENTION] = "attention", [PE_OP_ATTN_OUT] = "attn_out",
        [PE_OP_RESIDUAL] = "residual",   [PE_OP_ROUTER] = "router",     [PE_OP_EXPERT_UP] = "expert_up",
        [PE_OP_SWIGLU] = "swiglu",       [PE_OP_EXPERT_DOWN] = "expert_down", [PE_OP_EXPERT_SUM] = "expert_sum",
        [PE_OP_OUTPUT] = "output",       [PE_OP_FORWARD] = "forward",
    };
    return op >= 0 && op < PE_OP_COUNT ? names[op] : 0;
}

void pe_profile_enable(int on) { atomic_store(&enabled, on != 0); }

void pe_profile_reset(void) {
    for (int i = 0; i < PE_OP_COUNT; i++) op_ns[i] = op_calls[i] = op_bytes[i] = 0;
}

void pe_profile_read(int64_t ns[PE_OP_COUNT], int64_t calls[PE_OP_COUNT], int64_t bytes[PE_OP_COUNT]) {
    for (int i = 0; i < PE_OP_COUNT; i++) ns[i] = op_ns[i], calls[i] = op_calls[i], bytes[i] = op_bytes[i];
}

int64_t pe_prof_begin(void) { return atomic_load_explicit(&enabled, memory_order_relaxed) ? now_ns() : 0; }

void pe_prof_end(pe_op op, int64_t t, int64_t bytes) {
    if (!t) return;
    atomic_fetch_add_explicit(&op_ns[op], now_ns() - t, memory_order_relaxed);
    atomic_fetch_add_explicit(&op_calls[op], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&op_bytes[op], bytes, memory_order_relaxed);
}
