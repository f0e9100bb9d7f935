/* Per-thread scratch memory for the forward pass: one block, reused by every call.
 *
 * Why: a forward call needs a dozen buffers per layer (activations, expert groups, quantized
 * activations, tile scratch) whose sizes depend only on the batch. Taking them from malloc on every
 * call costs system calls and page faults for large batches (glibc maps big blocks fresh). Here
 * each thread keeps one 64-byte-aligned block and hands out stack-like slices (alloc, then release
 * back to a mark); a call that needs more than the block takes overflow blocks, and once the
 * outermost release returns everything, the block is replaced by one as large as that call's
 * high-water mark: from the second call of a given batch size on, no allocation happens. The block
 * is kept for the thread's lifetime (the largest batch seen: tens of MB after a 512-token prefill
 * of gpt-oss-20b). Only the thread that calls the forward pass allocates; OpenMP workers only use
 * slices handed to them. */
#ifndef PE_ARENA_H
#define PE_ARENA_H

#include <stddef.h>

typedef struct pe_arena pe_arena;

/* The calling thread's arena (created on first use; NULL if that fails). */
pe_arena *pe_arena_get(void);
/* The current fill level, to release back to. */
size_t pe_arena_mark(const pe_arena *a);
/* bytes of 64-byte-aligned scratch, valid until released; NULL when memory runs out. */
void *pe_arena_alloc(pe_arena *a, size_t bytes);
/* Give back everything allocated since `mark`. */
void pe_arena_release(pe_arena *a, size_t mark);

#endif
