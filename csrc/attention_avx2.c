/* The attention inner loop compiled for AVX2 + FMA (see attention_heads.h). */
#define ATTEND_HEADS pe_attend_heads_avx2
#include "attention_heads.h"
