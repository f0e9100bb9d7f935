/* Per-thread scratch arena (see arena.h). */
#include "arena.h"

#include <stdint.h>
#include <stdlib.h>

enum { PE_ARENA_MAX_OVERFLOW = 64, PE_ARENA_ALIGN = 64 };

struct pe_arena {
    uint8_t *base;  /* the main block */
    size_t cap;     /* its size */
    size_t used;    /* logical fill level: main block bytes, then overflow bytes */
    size_t high;    /* the largest fill level since the arena was last empty */
    int n_over;     /* overflow blocks, each recorded with the fill level it started at */
    void *over[PE_ARENA_MAX_OVERFLOW];
    size_t over_at[PE_ARENA_MAX_OVERFLOW];
};

static _Thread_local pe_arena *current;

static size_t round_up(size_t n) { return (n + PE_ARENA_ALIGN - 1) & ~(size_t)(PE_ARENA_ALIGN - 1); }

pe_arena *pe_arena_get(void) {
    if (!current) current = calloc(1, sizeof(pe_arena));
    return current;
}

size_t pe_arena_mark(const pe_arena *a) { return a->used; }

void *pe_arena_alloc(pe_arena *a, size_t bytes) {
    bytes = round_up(bytes ? bytes : 1);
    void *p;
    if (a->n_over == 0 && a->used + bytes <= a->cap) {
        p = a->base + a->used;
    } else { /* past the main block: an overflow block of its own */
        if (a->n_over == PE_ARENA_MAX_OVERFLOW || !(p = aligned_alloc(PE_ARENA_ALIGN, bytes))) return NULL;
        a->over[a->n_over] = p;
        a->over_at[a->n_over++] = a->used;
    }
    a->used += bytes;
    if (a->used > a->high) a->high = a->used;
    return p;
}

void pe_arena_release(pe_arena *a, size_t mark) {
    while (a->n_over > 0 && a->over_at[a->n_over - 1] >= mark) free(a->over[--a->n_over]);
    a->used = mark;
    if (mark == 0 && a->high > a->cap) { /* empty again: one block for the whole high-water mark */
        free(a->base);
        a->base = aligned_alloc(PE_ARENA_ALIGN, round_up(a->high));
        a->cap = a->base ? round_up(a->high) : 0;
    }
    if (mark == 0) a->high = 0;
}
