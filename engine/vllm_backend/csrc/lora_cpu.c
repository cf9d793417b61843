/* Fused multi-LoRA linear for vLLM-CPU: y[t, slice] += (scale * x[t] @ A[s].T) @ B[s].T, s = slot(t).
 *
 * Why C: per token this is a rank-r shrink and expand. In torch it takes a gather of the adapter
 * weights (or padding to segments), an fp32 temporary of the full output width, a dtype conversion
 * and a scatter-add: four passes over the activations where one suffices. Here each token reads its
 * slot's weights in place, four consecutive tokens of one slot (a prefill chunk) per weight load, keeps
 * the rank-r intermediate on the stack, and adds into y once, in 16-float blocks held in registers.
 *
 * Numerics follow vLLM's punica ops: the shrink result is fp32 (vLLM's buffer dtype), the expand
 * accumulates in fp32 on top of y and rounds to y's dtype once (round to nearest even for bf16).
 *
 * Layouts (all row-major, strides in elements):
 *   x      [T, in]         dtype x_dt, row stride x_rs
 *   y      [T, *]          dtype y_dt, row stride y_rs; slice k is columns offsets[k] .. + widths[k]
 *   A_k    [L, R, in]      weight dtype w_dt, slot stride a_ss[k], row stride a_rs[k]
 *   BT_k   [L, R, width]   B transposed, slot stride bt_ss[k], row stride bt_rs[k]
 *   slots  [T]             int64 adapter slot of each token; < 0 or >= n_slots: no adapter
 * dtype codes: 0 = float32, 1 = bfloat16. n_threads: OpenMP threads (the caller passes torch's count).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef int64_t i64;

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                           /* nearest even */
    return (uint16_t)(u >> 16);
}

/* dst[0:n] = src[0:n] as float32. */
static void load_row(float *dst, const void *src, int dt, i64 n) {
    if (dt == 0) {
        memcpy(dst, src, (size_t)n * sizeof(float));
    } else {
        const uint16_t *s = (const uint16_t *)src;
#pragma omp simd
        for (i64 i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    }
}

/* GCC/Clang vector extensions: 16 floats, compiled to AVX-512, AVX2 or SSE as the CPU allows. */
typedef float vf __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(64)));
#define VL 16
#define PRAG_MAX_RANK 512
#define NB 4 /* tokens of one slot done together: each weight load serves NB tokens */

static inline vf load_w(const char *w, int dt, i64 i) {
    vf v;
    if (dt == 0) {
        memcpy(&v, (const float *)w + i, sizeof v);
    } else {
#ifdef __AVX512F__ /* one widening load; GCC splits the generic conversion into 128-bit halves */
        v = (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i))), 16);
#else
        vh b;
        memcpy(&b, (const uint16_t *)w + i, sizeof b);
        vu u = __builtin_convertvector(b, vu) << 16;
        memcpy(&v, &u, sizeof v);
#endif
    }
    return v;
}

static inline float hsum(vf v) { /* pairwise: depth 4 instead of a 16-add chain */
    float t[VL];
    memcpy(t, &v, sizeof t);
    for (int w = VL / 2; w > 0; w /= 2)
        for (int i = 0; i < w; i++) t[i] += t[i + w];
    return t[0];
}

static inline float w_at(const char *w, int dt, i64 i) {
    return dt == 0 ? ((const float *)w)[i] : bf16_to_f32(((const uint16_t *)w)[i]);
}

/* h[b][j] = scale * xf[b] . A[j] for nb tokens b (nb is 1 or NB, a constant after inlining). */
static inline __attribute__((always_inline)) void shrink_block(int nb, float h[][PRAG_MAX_RANK], float *const *xf,
                                                                const char *a, i64 row_bytes, int dt, i64 n,
                                                                i64 rank, float scale) {
    const i64 nv = n - n % VL;
    for (i64 j = 0; j < rank; j++) {
        const char *w = a + j * row_bytes;
        vf acc[NB];
        for (int b = 0; b < nb; b++) acc[b] = (vf){0};
        for (i64 i = 0; i < nv; i += VL) {
            const vf wv = load_w(w, dt, i);
            for (int b = 0; b < nb; b++) {
                vf xv;
                memcpy(&xv, xf[b] + i, sizeof xv);
                acc[b] += xv * wv;
            }
        }
        for (int b = 0; b < nb; b++) {
            float s = hsum(acc[b]);
            for (i64 i = nv; i < n; i++) s += xf[b][i] * w_at(w, dt, i);
            h[b][j] = scale * s;
        }
    }
}

static inline vf load_y(const char *y, int dt, i64 i) { return load_w(y, dt, i); }

static inline void store_y(char *y, int dt, i64 i, vf v) {
    if (dt == 0) {
        memcpy((float *)y + i, &v, sizeof v);
    } else {
        vu u;
        memcpy(&u, &v, sizeof u);
        const vu nan = (u & 0x7fffffffu) > 0x7f800000u; /* all-ones where NaN */
        const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        const vu quiet = (u >> 16) | 0x40u;
        const vh out = __builtin_convertvector((rounded & ~nan) | (quiet & nan), vh);
        memcpy((uint16_t *)y + i, &out, sizeof out);
    }
}

/* y[b][0:n] += sum_j h[b][j] * BT[j][0:n] over the rows where some h[b][j] is nonzero, read and
 * written once in blocks of VL, accumulated in fp32 and rounded once. */
static inline __attribute__((always_inline)) void expand_block(int nb, char *const *y, int y_dt,
                                                                float h[][PRAG_MAX_RANK], const char *bt,
                                                                i64 row_bytes, int dt, i64 n, i64 rank) {
    const i64 nv = n - n % VL;
    int live[PRAG_MAX_RANK];
    i64 nlive = 0;
    for (i64 j = 0; j < rank; j++) {
        int nz = 0;
        for (int b = 0; b < nb; b++) nz |= h[b][j] != 0.0f;
        if (nz) live[nlive++] = (int)j;
    }
    if (nlive == 0) return; /* zero adapter (an empty slot): y unchanged, as in vLLM */
    for (i64 o = 0; o < nv; o += VL) {
        vf out[NB];
        for (int b = 0; b < nb; b++) out[b] = load_y(y[b], y_dt, o);
        for (i64 q = 0; q < nlive; q++) {
            const i64 j = live[q];
            const vf wv = load_w(bt + j * row_bytes, dt, o);
            for (int b = 0; b < nb; b++) out[b] += h[b][j] * wv;
        }
        for (int b = 0; b < nb; b++) store_y(y[b], y_dt, o, out[b]);
    }
    for (i64 o = nv; o < n; o++)
        for (int b = 0; b < nb; b++) {
            float acc = w_at(y[b], y_dt, o);
            for (i64 q = 0; q < nlive; q++) acc += h[b][live[q]] * w_at(bt + live[q] * row_bytes, dt, o);
            if (y_dt == 0)
                ((float *)y[b])[o] = acc;
            else
                ((uint16_t *)y[b])[o] = f32_to_bf16(acc);
        }
}

static inline i64 dt_size(int dt) { return dt == 0 ? 4 : 2; }

/* Returns 0 on success, 1 for an unsupported dtype, 2 for a rank above PRAG_MAX_RANK,
 * 3 when scratch memory cannot be allocated. */
int prag_lora_linear(void *y, int y_dt, i64 y_rs,
                     const void *x, int x_dt, i64 x_rs, i64 in,
                     i64 T, const i64 *slots, i64 n_slots,
                     int n_slices, const void *const *a, const i64 *a_ss, const i64 *a_rs,
                     const void *const *bt, const i64 *bt_ss, const i64 *bt_rs,
                     const i64 *offsets, const i64 *widths, i64 rank, int w_dt, float scale, int n_threads) {
    if (x_dt < 0 || x_dt > 1 || y_dt < 0 || y_dt > 1 || w_dt < 0 || w_dt > 1) return 1;
    if (rank > PRAG_MAX_RANK) return 2;
    i64 max_width = 0;
    for (int k = 0; k < n_slices; k++)
        if (widths[k] > max_width) max_width = widths[k];
    const i64 xs = dt_size(x_dt), ys = dt_size(y_dt), ws = dt_size(w_dt);
    int failed = 0;

#pragma omp parallel num_threads(n_threads > 0 ? n_threads : 1) if (T * (in + max_width) * n_slices > 65536)
    {
        float *scratch = (float *)malloc((size_t)NB * in * sizeof(float));
        float h[NB][PRAG_MAX_RANK];
        if (scratch == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        float *xf[NB];
        for (int b = 0; b < NB; b++) xf[b] = scratch + (i64)b * in;
#pragma omp for schedule(static)
        for (i64 t0 = 0; t0 < T; t0 += NB) {
            if (scratch == NULL) continue;
            const i64 s0 = slots[t0];
            int same = t0 + NB <= T && s0 >= 0 && s0 < n_slots;
            for (int b = 1; same && b < NB; b++) same = slots[t0 + b] == s0;
            const i64 ntok = same ? 1 : (T - t0 < NB ? T - t0 : NB);
            for (i64 u = 0; u < ntok; u++) {
                const i64 t = t0 + u, s = slots[t];
                const int nb = same ? NB : 1;
                if (s < 0 || s >= n_slots) continue;
                for (int b = 0; b < nb; b++) load_row(xf[b], (const char *)x + (t + b) * x_rs * xs, x_dt, in);
                for (int k = 0; k < n_slices; k++) {
                    const char *ak = (const char *)a[k] + s * a_ss[k] * ws;
                    const char *bk = (const char *)bt[k] + s * bt_ss[k] * ws;
                    if (same)
                        shrink_block(NB, h, xf, ak, a_rs[k] * ws, w_dt, in, rank, scale);
                    else
                        shrink_block(1, h, xf, ak, a_rs[k] * ws, w_dt, in, rank, scale);
                    char *yk[NB];
                    for (int b = 0; b < nb; b++) yk[b] = (char *)y + ((t + b) * y_rs + offsets[k]) * ys;
                    if (same)
                        expand_block(NB, yk, y_dt, h, bk, bt_rs[k] * ws, w_dt, widths[k], rank);
                    else
                        expand_block(1, yk, y_dt, h, bk, bt_rs[k] * ws, w_dt, widths[k], rank);
                }
            }
        }
        free(scratch);
    }
    return failed ? 3 : 0;
}
