/* Per-thread scratch memory for the forward pass: one block, reused by every call.
 *
 * Why: a forward call needs a dozen buffers per layer (activations, expert groups, quantized
 * activations, tile scratch) whose sizes depend only on the batch. Taking them from malloc on every
 * call costs system calls and page faults for large batches (glibc maps big blocks fresh). Here
 * each thread keeps one 64-byte-aligned block and hands out stack-like slices (alloc, then release
 * back to a mark); a call that needs more than the block takes overflow blocks, and once the
 * outermost release returns everything, the block is replaced by one as large as that call's
 * high-water mark: from the second call of a given batch size on, no allocation happens. The block
 * is kept for the thread's lifetime (the largest batch seen: 223 MB after a 512-token prefill of
 * gpt-oss-20b). Only the thread that calls the forward pass allocates; OpenMP workers only use
 * slices handed to them.
 *
 * Within that first call, an overflow block released before the arena is empty is kept as a spare
 * and handed to the next overflow it is large enough for (the smallest such), so each layer reuses
 * the previous layer's blocks: freeing them gave glibc's mapped blocks back to the kernel, and every
 * layer faulted its ~135 MB in again (a first 512-token prefill of the 20b synth file took ~790k
 * page faults more than the next one). The spares are freed at the outermost release.
 *
 * A thread's arena is freed when the thread ends (a pthread key's destructor): the node runs each
 * model's passes on a scheduler thread of its own, and every model loaded after another left the
 * old thread's block (223 MB after a long prompt of the 20b) allocated for good. */
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
/* Blocks this arena has taken from the C library since it was created (the main block and
 * overflow blocks, spares reused not counted): what tests read to see that layers reuse blocks. */
size_t pe_arena_system_allocs(const pe_arena *a);

#endif
