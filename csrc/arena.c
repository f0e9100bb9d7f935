/* Per-thread scratch arena (see arena.h). */
#include "arena.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>

enum { PE_ARENA_MAX_OVERFLOW = 64, PE_ARENA_ALIGN = 64 };
#define PE_ARENA_HUGE ((size_t)2 << 20)

struct pe_arena {
    uint8_t *base;  /* the main block */
    size_t cap;     /* its size */
    size_t used;    /* logical fill level: main block bytes, then overflow bytes */
    size_t high;    /* the largest fill level since the arena was last empty */
    int n_over;     /* overflow blocks, each recorded with the fill level it started at and its size */
    void *over[PE_ARENA_MAX_OVERFLOW];
    size_t over_at[PE_ARENA_MAX_OVERFLOW], over_size[PE_ARENA_MAX_OVERFLOW];
    int n_spare;    /* overflow blocks given back before the arena was empty, kept for the next overflow */
    void *spare[PE_ARENA_MAX_OVERFLOW];
    size_t spare_size[PE_ARENA_MAX_OVERFLOW];
    size_t n_system; /* blocks taken from the C library so far (pe_arena_system_allocs) */
};

static _Thread_local pe_arena *current;
static pthread_key_t exit_key; /* its destructor frees a thread's arena when the thread ends */
static pthread_once_t exit_once = PTHREAD_ONCE_INIT;

static size_t round_up(size_t n) { return (n + PE_ARENA_ALIGN - 1) & ~(size_t)(PE_ARENA_ALIGN - 1); }

/* A block from the C library, counted. One of 2 MiB or more is aligned to 2 MiB and asks for
 * transparent huge pages (MADV_HUGEPAGE: where the kernel's setting is "madvise", the usual one):
 * its first touch then faults 2 MiB at a time, not 4 KiB (a 512-token prefill of gpt-oss-20b
 * touches its 223 MB main block once: 54k faults on small pages), and the passes that stream
 * through it miss the TLB less. */
static void *block_alloc(pe_arena *a, size_t bytes) {
    void *p;
    if (bytes < PE_ARENA_HUGE) p = aligned_alloc(PE_ARENA_ALIGN, bytes);
    else {
        bytes = (bytes + PE_ARENA_HUGE - 1) & ~(PE_ARENA_HUGE - 1);
        p = aligned_alloc(PE_ARENA_HUGE, bytes);
#ifdef MADV_HUGEPAGE
        if (p) madvise(p, bytes, MADV_HUGEPAGE); /* advice only: small pages if refused */
#endif
    }
    if (p) a->n_system++;
    return p;
}

/* The smallest spare block of at least *size bytes, taken off the spares (*size: its size), or NULL. */
static void *take_spare(pe_arena *a, size_t *size) {
    int best = -1;
    for (int i = 0; i < a->n_spare; i++)
        if (a->spare_size[i] >= *size && (best < 0 || a->spare_size[i] < a->spare_size[best])) best = i;
    if (best < 0) return NULL;
    void *p = a->spare[best];
    *size = a->spare_size[best];
    a->spare[best] = a->spare[--a->n_spare];
    a->spare_size[best] = a->spare_size[a->n_spare];
    return p;
}

/* A thread's arena at its exit: everything freed (a node's scheduler thread ends with its model, and
 * its arena, hundreds of MB after a long prompt, would otherwise stay allocated for good). */
static void arena_free(void *p) {
    pe_arena *a = p;
    while (a->n_over > 0) free(a->over[--a->n_over]);
    while (a->n_spare > 0) free(a->spare[--a->n_spare]);
    free(a->base);
    free(a);
}

static void exit_key_make(void) { pthread_key_create(&exit_key, arena_free); }

pe_arena *pe_arena_get(void) {
    if (!current) {
        pthread_once(&exit_once, exit_key_make);
        if ((current = calloc(1, sizeof(pe_arena)))) pthread_setspecific(exit_key, current);
    }
    return current;
}

size_t pe_arena_mark(const pe_arena *a) { return a->used; }

void *pe_arena_alloc(pe_arena *a, size_t bytes) {
    bytes = round_up(bytes ? bytes : 1);
    void *p;
    if (a->n_over == 0 && a->used + bytes <= a->cap) {
        p = a->base + a->used;
    } else { /* past the main block: an overflow block of its own, a spare one if one is large enough */
        if (a->n_over == PE_ARENA_MAX_OVERFLOW) return NULL;
        size_t size = bytes;
        if (!(p = take_spare(a, &size))) { /* none fits: room for one more block, then a new one */
            if (a->n_over + a->n_spare == PE_ARENA_MAX_OVERFLOW) free(a->spare[--a->n_spare]);
            if (!(p = block_alloc(a, bytes))) return NULL;
        }
        a->over[a->n_over] = p;
        a->over_size[a->n_over] = size;
        a->over_at[a->n_over++] = a->used;
    }
    a->used += bytes;
    if (a->used > a->high) a->high = a->used;
    return p;
}

void pe_arena_release(pe_arena *a, size_t mark) {
    while (a->n_over > 0 && a->over_at[a->n_over - 1] >= mark) {
        a->n_over--;
        a->spare[a->n_spare] = a->over[a->n_over]; /* room: overflow blocks + spares <= the maximum */
        a->spare_size[a->n_spare++] = a->over_size[a->n_over];
    }
    a->used = mark;
    if (mark != 0) return;
    while (a->n_spare > 0) free(a->spare[--a->n_spare]);
    if (a->high > a->cap) { /* empty again: one block for the whole high-water mark */
        free(a->base);
        a->base = block_alloc(a, round_up(a->high));
        a->cap = a->base ? round_up(a->high) : 0;
    }
    a->high = 0;
}

size_t pe_arena_system_allocs(const pe_arena *a) { return a->n_system; }
