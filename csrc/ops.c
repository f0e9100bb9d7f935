/* Per-vector operations (see ops.h). Reductions run in one fixed order, in double where cheap. */
#include "ops.h"

#include <math.h>

#include "cpu_features.h"

static const double PE_PI = 3.14159265358979323846;

/* The sum of squares in 16 partial sums (element i into sum i % 16, then a fixed tree): one chain of
 * double adds stood 4 cycles per element (~3 us for 2880), 16 independent ones vectorize. */
void pe_rmsnorm(float *out, const float *x, const float *g, int64_t n, float eps) {
    enum { P = 16 };
    double part[P] = {0};
    int64_t i = 0;
    for (; i + P <= n; i += P)
        for (int k = 0; k < P; k++) part[k] += (double)x[i + k] * x[i + k];
    for (int k = 0; i < n; i++, k++) part[k] += (double)x[i] * x[i];
    for (int w = P / 2; w > 0; w /= 2)
        for (int k = 0; k < w; k++) part[k] += part[k + w];
    const double ss = part[0];
    const float scale = (float)(1.0 / sqrt(ss / (double)n + (double)eps));
    for (int64_t i = 0; i < n; i++) out[i] = g[i] * (x[i] * scale);
}

/* YaRN correction dimension for beta rotations (transformers find_correction_dim). */
static double yarn_corr_dim(double beta, int dim, double base, double orig_ctx) {
    return dim * log(orig_ctx / (beta * 2.0 * PE_PI)) / (2.0 * log(base));
}

double pe_rope_yarn_freqs(double *omega, int head_dim, double base, int yarn, double factor,
                          double orig_ctx, double beta_fast, double beta_slow, int truncate) {
    const int half = head_dim / 2;
    for (int i = 0; i < half; i++) omega[i] = pow(base, -2.0 * i / head_dim);
    if (!yarn || factor <= 1.0) return 1.0;
    double low = yarn_corr_dim(beta_fast, head_dim, base, orig_ctx);
    double high = yarn_corr_dim(beta_slow, head_dim, base, orig_ctx);
    if (truncate) {
        low = floor(low);
        high = ceil(high);
    }
    if (low < 0) low = 0;
    if (high > head_dim - 1) high = head_dim - 1;
    if (low == high) high += 0.001;
    for (int i = 0; i < half; i++) {
        double ramp = (i - low) / (high - low);
        ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
        const double keep = 1.0 - ramp; /* weight of the original (extrapolation) frequency */
        omega[i] = omega[i] / factor * (1.0 - keep) + omega[i] * keep;
    }
    return 0.1 * log(factor) + 1.0;
}

void pe_rope_table(float *cos_t, float *sin_t, const double *omega, int half, int64_t pos, double mscale) {
    for (int i = 0; i < half; i++) {
        const double a = (double)pos * omega[i];
        cos_t[i] = (float)(mscale * cos(a));
        sin_t[i] = (float)(mscale * sin(a));
    }
}

void pe_rope_apply(float *x, int n_heads, int head_dim, const float *cos_t, const float *sin_t) {
    const int half = head_dim / 2;
    for (int h = 0; h < n_heads; h++) {
        float *v = x + (int64_t)h * head_dim;
        for (int i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cos_t[i] - b * sin_t[i];
            v[i + half] = b * cos_t[i] + a * sin_t[i];
        }
    }
}

void pe_softmax(float *x, int n) {
    float m = x[0];
    for (int i = 1; i < n; i++) m = x[i] > m ? x[i] : m;
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - m);
        sum += x[i];
    }
    const float inv = (float)(1.0 / sum);
    for (int i = 0; i < n; i++) x[i] *= inv;
}

static void swiglu_oai_scalar(float *out, const float *g, const float *u, int64_t n) {
    const float alpha = 1.702f, limit = 7.0f;
    for (int64_t i = 0; i < n; i++) {
        const float gi = g[i] < limit ? g[i] : limit;
        float ui = u[i] < -limit ? -limit : u[i];
        ui = ui > limit ? limit : ui;
        out[i] = gi / (1.0f + expf(-alpha * gi)) * (ui + 1.0f);
    }
}

void pe_swiglu_oai(float *out, const float *g, const float *u, int64_t n, int n_threads) {
    void (*f)(float *, const float *, const float *, int64_t) =
        pe_simd_level_get() >= PE_SIMD_AVX512 ? pe_swiglu_oai_avx512 : swiglu_oai_scalar;
    /* elementwise: any split gives the same bits; threads only for a prefill's worth (n >= 64K) */
    const int64_t chunk = 16384, n_chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n >= 4 * chunk)
    for (int64_t c = 0; c < n_chunks; c++)
        f(out + c * chunk, g + c * chunk, u + c * chunk, n - c * chunk < chunk ? n - c * chunk : chunk);
}

void pe_topk(const float *x, int n, int k, int *idx) {
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int i = 0; i < n; i++) {
            int taken = 0;
            for (int p = 0; p < j; p++) taken |= idx[p] == i;
            if (!taken && (best < 0 || x[i] > x[best])) best = i;
        }
        idx[j] = best;
    }
}
