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
 *   live_k [L] or NULL     int64 live rank of each slot of slice k: rows >= live_k[s] of BT_k[s] are zero
 *                          (vLLM pads every adapter to max_lora_rank), so they are neither read nor computed
 * dtype codes: 0 = float32, 1 = bfloat16. n_threads: OpenMP threads (the caller passes torch's count).
 *
 * bf16 activations and weights on a CPU with AVX512-BF16 take the shrink straight from the bf16 rows
 * with VDPBF16PS (exact bf16 products, fp32 sums, 32 elements per instruction, several adapter rows per
 * pass over x); the order of the fp32 sums differs from the generic path, and the instruction reads bf16
 * denormals (below 1.2e-38) as zero. The fp32 path, which the token-identity tests use, is unchanged.
 *
 * Decode (every token its own adapter, read from memory, ~70 KB per token and layer for the serving
 * benchmark's model) prefetches the next token's adapter rows while the current token computes.
 *
 * Also here, for the memory hand-over (engine/vllm_backend/memory_lora.py): prag_slot_merge (the
 * cat-merge of store rows into vLLM's padded slot layout, on the adapter thread) and prag_fill_slot (one
 * adapter into a slot of vLLM's stacked tensors and of the transposed B this kernel reads).
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
        return;
    }
#ifdef __AVX512BF16__
    /* one instruction, round to nearest even and quiet NaNs as below, but it flushes fp32 denormals to zero
     * where torch rounds them: lanes with a zero exponent and a nonzero mantissa take the generic path */
    const __m512i bits = (__m512i)v;
    if (!(_mm512_testn_epi32_mask(bits, _mm512_set1_epi32(0x7f800000)) &
          _mm512_test_epi32_mask(bits, _mm512_set1_epi32(0x007fffff)))) {
        _mm256_storeu_si256((__m256i *)((uint16_t *)y + i), (__m256i)_mm512_cvtneps_pbh((__m512)v));
        return;
    }
#endif
    {
        vu u;
        memcpy(&u, &v, sizeof u);
        const vu nan = (u & 0x7fffffffu) > 0x7f800000u; /* all-ones where NaN */
        const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        const vu quiet = (u >> 16) | 0x40u;
        const vh out = __builtin_convertvector((rounded & ~nan) | (quiet & nan), vh);
        memcpy((uint16_t *)y + i, &out, sizeof out);
    }
}

#ifdef __AVX512BF16__
/* h[b][j0 + r] = scale * xb[b] . A[j0 + r] for M rows r (M and nb constants after inlining): every 32-element
 * chunk of x is loaded once for M rows, and each adapter row once for nb tokens. */
static inline __attribute__((always_inline)) void shrink_rows_dp(int nb, int M, float h[][PRAG_MAX_RANK],
                                                                 const uint16_t *const *xb, const char *a,
                                                                 i64 row_bytes, i64 n, i64 j0, float scale,
                                                                 const char *pf) {
    __m512 acc[NB][4];
    const uint16_t *w[4];
    for (int r = 0; r < M; r++) w[r] = (const uint16_t *)(a + (j0 + r) * row_bytes);
    for (int b = 0; b < nb; b++)
        for (int r = 0; r < M; r++) acc[b][r] = _mm512_setzero_ps();
    const i64 nv = n - n % 32;
    for (i64 i = 0; i < nv; i += 32) {
        __m512i wv[4];
        for (int r = 0; r < M; r++) wv[r] = _mm512_loadu_si512((const void *)(w[r] + i));
        if (pf != NULL) /* the next token's adapter, same rows: one cache line per row and step */
            for (int r = 0; r < M; r++) __builtin_prefetch(pf + (j0 + r) * row_bytes + i * 2, 0, 2);
        for (int b = 0; b < nb; b++) {
            const __m512i xv = _mm512_loadu_si512((const void *)(xb[b] + i));
            for (int r = 0; r < M; r++) acc[b][r] = _mm512_dpbf16_ps(acc[b][r], (__m512bh)xv, (__m512bh)wv[r]);
        }
    }
    if (nv < n) { /* masked tail: absent lanes load as zero */
        const __mmask32 m = (__mmask32)((1u << (n - nv)) - 1u);
        __m512i wv[4];
        for (int r = 0; r < M; r++) wv[r] = _mm512_maskz_loadu_epi16(m, (const void *)(w[r] + nv));
        for (int b = 0; b < nb; b++) {
            const __m512i xv = _mm512_maskz_loadu_epi16(m, (const void *)(xb[b] + nv));
            for (int r = 0; r < M; r++) acc[b][r] = _mm512_dpbf16_ps(acc[b][r], (__m512bh)xv, (__m512bh)wv[r]);
        }
    }
    for (int b = 0; b < nb; b++)
        for (int r = 0; r < M; r++) h[b][j0 + r] = scale * _mm512_reduce_add_ps(acc[b][r]);
}

/* h[b][j] = scale * xb[b] . A[j] for j < rank, bf16 x and A: four rows per pass, then the rest. */
static inline __attribute__((always_inline)) void shrink_block_dp(int nb, float h[][PRAG_MAX_RANK],
                                                                  const uint16_t *const *xb, const char *a,
                                                                  i64 row_bytes, i64 n, i64 rank, float scale,
                                                                  const char *pf) {
    i64 j = 0;
    for (; j + 4 <= rank; j += 4) shrink_rows_dp(nb, 4, h, xb, a, row_bytes, n, j, scale, pf);
    switch (rank - j) {
        case 3: shrink_rows_dp(nb, 3, h, xb, a, row_bytes, n, j, scale, pf); break;
        case 2: shrink_rows_dp(nb, 2, h, xb, a, row_bytes, n, j, scale, pf); break;
        case 1: shrink_rows_dp(nb, 1, h, xb, a, row_bytes, n, j, scale, pf); break;
        default: break;
    }
}
#define PRAG_HAVE_DP 1
#else
#define PRAG_HAVE_DP 0
#endif

/* y[b][0:n] += sum_j h[b][j] * BT[j][0:n] over the rows where some h[b][j] is nonzero, read and
 * written once in blocks of VL, accumulated in fp32 and rounded once. */
static inline __attribute__((always_inline)) void expand_block(int nb, char *const *y, int y_dt,
                                                                float h[][PRAG_MAX_RANK], const char *bt,
                                                                i64 row_bytes, int dt, i64 n, i64 rank,
                                                                const char *pf) {
    const i64 nv = n - n % VL;
    int live[PRAG_MAX_RANK];
    i64 nlive = 0;
    for (i64 j = 0; j < rank; j++) {
        int nz = 0;
        for (int b = 0; b < nb; b++) nz |= h[b][j] != 0.0f;
        if (nz) live[nlive++] = (int)j;
    }
    if (nlive == 0) return; /* zero adapter (an empty slot): y unchanged, as in vLLM */
    const i64 ws = dt == 0 ? 4 : 2, line = 64 / ws; /* elements per cache line */
    for (i64 o = 0; o < nv; o += VL) {
        vf out[NB];
        if (pf != NULL && o % line == 0) /* the next token's adapter, same rows, a token ahead */
            for (i64 q = 0; q < nlive; q++) __builtin_prefetch(pf + live[q] * row_bytes + o * ws, 0, 2);
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
                     const void *const *bt, const i64 *bt_ss, const i64 *bt_rs, const i64 *const *live,
                     const i64 *offsets, const i64 *widths, i64 rank, int w_dt, float scale, int n_threads) {
    if (x_dt < 0 || x_dt > 1 || y_dt < 0 || y_dt > 1 || w_dt < 0 || w_dt > 1) return 1;
    if (rank > PRAG_MAX_RANK) return 2;
    i64 max_width = 0;
    for (int k = 0; k < n_slices; k++)
        if (widths[k] > max_width) max_width = widths[k];
    const i64 xs = dt_size(x_dt), ys = dt_size(y_dt), ws = dt_size(w_dt);
    const int dp = PRAG_HAVE_DP && x_dt == 1 && w_dt == 1; /* shrink from the bf16 rows, no fp32 copy of x */
    int failed = 0;

#pragma omp parallel num_threads(n_threads > 0 ? n_threads : 1) if (T * (in + max_width) * n_slices > 65536)
    {
        float *scratch = dp ? NULL : (float *)malloc((size_t)NB * in * sizeof(float));
        float h[NB][PRAG_MAX_RANK];
        if (!dp && scratch == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        float *xf[NB];
        for (int b = 0; b < NB; b++) xf[b] = scratch + (i64)b * in;
#pragma omp for schedule(static)
        for (i64 t0 = 0; t0 < T; t0 += NB) {
            if (!dp && scratch == NULL) continue;
            const i64 s0 = slots[t0];
            int same = t0 + NB <= T && s0 >= 0 && s0 < n_slots;
            for (int b = 1; same && b < NB; b++) same = slots[t0 + b] == s0;
            const i64 ntok = same ? 1 : (T - t0 < NB ? T - t0 : NB);
            for (i64 u = 0; u < ntok; u++) {
                const i64 t = t0 + u, s = slots[t];
                const int nb = same ? NB : 1;
                if (s < 0 || s >= n_slots) continue;
                const uint16_t *xb[NB];
                for (int b = 0; b < nb; b++) {
                    const char *row = (const char *)x + (t + b) * x_rs * xs;
                    xb[b] = (const uint16_t *)row;
                    if (!dp) load_row(xf[b], row, x_dt, in);
                }
                for (int k = 0; k < n_slices; k++) {
                    i64 r = rank;
                    if (live != NULL && live[k] != NULL && live[k][s] < r) r = live[k][s] < 0 ? 0 : live[k][s];
                    if (r == 0) continue; /* an empty slot: y unchanged */
                    const char *ak = (const char *)a[k] + s * a_ss[k] * ws;
                    const char *bk = (const char *)bt[k] + s * bt_ss[k] * ws;
                    /* decode: every token has its own adapter, read from memory; fetch the next one's rows
                     * while this one computes (prefill blocks share one adapter, already in cache) */
                    const i64 sn = !same && t + 1 < T ? slots[t + 1] : -1;
                    const int pfok = sn >= 0 && sn < n_slots && sn != s;
                    const char *pa = pfok ? (const char *)a[k] + sn * a_ss[k] * ws : NULL;
                    const char *pb = pfok ? (const char *)bt[k] + sn * bt_ss[k] * ws : NULL;
#if PRAG_HAVE_DP
                    if (dp) {
                        if (same)
                            shrink_block_dp(NB, h, xb, ak, a_rs[k] * ws, in, r, scale, NULL);
                        else
                            shrink_block_dp(1, h, xb, ak, a_rs[k] * ws, in, r, scale, pa);
                    } else
#endif
                    if (same)
                        shrink_block(NB, h, xf, ak, a_rs[k] * ws, w_dt, in, r, scale);
                    else
                        shrink_block(1, h, xf, ak, a_rs[k] * ws, w_dt, in, r, scale);
                    char *yk[NB];
                    for (int b = 0; b < nb; b++) yk[b] = (char *)y + ((t + b) * y_rs + offsets[k]) * ys;
                    if (same)
                        expand_block(NB, yk, y_dt, h, bk, bt_rs[k] * ws, w_dt, widths[k], r, NULL);
                    else
                        expand_block(1, yk, y_dt, h, bk, bt_rs[k] * ws, w_dt, widths[k], r, pb);
                }
            }
        }
        free(scratch);
    }
    return failed ? 3 : 0;
}

/* live[s] = 1 + the last row j < R of BT[s] with a nonzero element (0: all zero), for s < L; BT as in
 * prag_lora_linear ([L, R, width], slot stride ss, row stride rs, dtype w_dt). Scans rows from the last,
 * stopping at the first nonzero element, so a padded adapter costs its zero rows only. */
void prag_live_ranks(i64 *live, const void *bt, int w_dt, i64 L, i64 R, i64 width, i64 ss, i64 rs) {
    const i64 ws = dt_size(w_dt);
    for (i64 s = 0; s < L; s++) {
        i64 j = R;
        for (; j > 0; j--) {
            const char *row = (const char *)bt + (s * ss + (j - 1) * rs) * ws;
            int nz = 0;
            if (w_dt == 0) { /* bits, not values: only +0.0 is padding (a -0.0 row is kept, as vLLM keeps it) */
                const uint32_t *v = (const uint32_t *)row;
                for (i64 i = 0; i < width && !nz; i++) nz = v[i] != 0;
            } else {
                const uint16_t *v = (const uint16_t *)row;
                for (i64 i = 0; i < width && !nz; i++) nz = v[i] != 0;
            }
            if (nz) break;
        }
        live[s] = j;
    }
}

/* Fills slot rows for one adapter, n segments (engine/vllm_backend/memory_lora.py's activate_adapter):
 * A [R, in_k] and B [out_k, R] (contiguous, element size es) are copied to a_dst[k] and b_dst[k] (contiguous
 * slots of vLLM's stacked tensors); where bt_dst[k] is not NULL, B is also written transposed there
 * ([R, out_k], contiguous: the kernel's expand rows) and, where live_dst[k] is not NULL, *live_dst[k] gets the
 * live rank of that transposed slot (see prag_live_ranks). One call instead of ~2n small torch copies. */
void prag_fill_slot(int n, int w_dt, i64 R, const void *const *a_src, void *const *a_dst, const i64 *in,
                    const void *const *b_src, void *const *b_dst, const i64 *out, void *const *bt_dst,
                    i64 *const *live_dst) {
    const i64 es = dt_size(w_dt);
    for (int k = 0; k < n; k++) {
        memcpy(a_dst[k], a_src[k], (size_t)(R * in[k] * es));
        memcpy(b_dst[k], b_src[k], (size_t)(out[k] * R * es));
        if (bt_dst[k] == NULL) continue;
        const i64 w = out[k];
        if (es == 2) {
            const uint16_t *b = (const uint16_t *)b_src[k];
            uint16_t *t = (uint16_t *)bt_dst[k];
            i64 o = 0;
#ifdef __AVX512BW__
            if (R == 8) { /* bf16, rank 8 (vLLM's smallest max_lora_rank): 4 outputs x 8 ranks per permute */
                const __m512i perm = _mm512_set_epi16(31, 23, 15, 7, 30, 22, 14, 6, 29, 21, 13, 5, 28, 20, 12, 4,
                                                      27, 19, 11, 3, 26, 18, 10, 2, 25, 17, 9, 1, 24, 16, 8, 0);
                for (; o + 4 <= w; o += 4) {
                    uint64_t rows[8]; /* rank j: outputs o..o+3 */
                    _mm512_storeu_si512(rows, _mm512_permutexvar_epi16(perm, _mm512_loadu_si512(b + o * 8)));
                    for (int j = 0; j < 8; j++) memcpy(t + j * w + o, &rows[j], sizeof rows[j]);
                }
            }
#endif
            for (; o < w; o++)
                for (i64 j = 0; j < R; j++) t[j * w + o] = b[o * R + j];
        } else {
            const uint32_t *b = (const uint32_t *)b_src[k];
            uint32_t *t = (uint32_t *)bt_dst[k];
            for (i64 o = 0; o < w; o++)
                for (i64 j = 0; j < R; j++) t[j * w + o] = b[o * R + j];
        }
        if (live_dst[k] != NULL) prag_live_ranks(live_dst[k], bt_dst[k], w_dt, 1, R, w, R * w, w);
    }
}

static inline float src_at(const void *src, int dt, i64 i) {
    return dt == 0 ? ((const float *)src)[i] : bf16_to_f32(((const uint16_t *)src)[i]);
}

static inline void put(void *out, int dt, i64 i, float v) {
    if (dt == 0)
        ((float *)out)[i] = v;
    else
        ((uint16_t *)out)[i] = f32_to_bf16(v);
}

#define MERGE_TILE 64 /* B rows per fp32 tile in prag_slot_merge */

/* One merge for constant dtypes (inlined per combination, so the loops carry no dtype branches). */
static inline __attribute__((always_inline)) int slot_merge_impl(
    char *out, const int out_dt, const char *rows, const int src_dt, i64 k, i64 row_len, i64 R, i64 n_seg,
    const i64 *a_off, const i64 *b_off, const i64 *r, const i64 *d_in, const i64 *d_out, const float *scale) {
    const i64 os = dt_size(out_dt), ss = dt_size(src_dt);
    float *tile = (float *)malloc((size_t)(MERGE_TILE * R) * sizeof(float));
    if (tile == NULL) return 3;
    i64 at = 0; /* elements of out written so far */
    for (i64 g = 0; g < n_seg; g++) {
        const i64 rg = r[g], n = d_in[g], m = d_out[g], live = k * rg;
        if (live > R) {
            free(tile);
            return 2;
        }
        const vf sv = (vf){0} + scale[g];
        for (i64 d = 0; d < k; d++)
            for (i64 i = 0; i < rg; i++) {
                const char *src = rows + (d * row_len + a_off[g] + i * n) * ss;
                char *dst = out + (at + (d * rg + i) * n) * os;
                const i64 nv = n - n % VL;
                for (i64 c = 0; c < nv; c += VL) store_y(dst, out_dt, c, load_w(src, src_dt, c) * sv);
                for (i64 c = nv; c < n; c++) put(dst, out_dt, c, scale[g] * src_at(src, src_dt, c));
            }
        memset(out + (at + live * n) * os, 0, (size_t)((R - live) * n * os)); /* +0.0 in both dtypes */
        at += R * n;
        /* B rows gather k short runs each: assembled in fp32 a tile of MERGE_TILE rows at a time, then
         * rounded with the vector store (the scalar rounding was most of the merge) */
        for (i64 o0 = 0; o0 < m; o0 += MERGE_TILE) {
            const i64 nr = m - o0 < MERGE_TILE ? m - o0 : MERGE_TILE;
            for (i64 o = 0; o < nr; o++) {
                float *t = tile + o * R;
                for (i64 d = 0; d < k; d++) {
                    const char *src = rows + (d * row_len + b_off[g] + (o0 + o) * rg) * ss;
                    for (i64 i = 0; i < rg; i++) t[d * rg + i] = src_at(src, src_dt, i);
                }
                for (i64 j = live; j < R; j++) t[j] = 0.0f;
            }
            char *dst = out + (at + o0 * R) * os;
            const i64 cnt = nr * R, cv = cnt - cnt % VL;
            for (i64 c = 0; c < cv; c += VL) store_y(dst, out_dt, c, load_w((const char *)tile, 0, c));
            for (i64 c = cv; c < cnt; c++) put(dst, out_dt, c, tile[c]);
        }
        at += m * R;
    }
    free(tile);
    return 0;
}

/* The cat-merge of k store rows [k, row_len] (dtype src_dt) into vLLM's padded slot layout, n_seg segments
 * one after another in `out` (dtype out_dt), each A [R, d_in] then B [d_out, R]:
 *   A[d*r + i, :] = scale[g] * rows[d][a_off + i*d_in : + d_in],   B[o, d*r + i] = rows[d][b_off + o*r + i],
 * for documents d < k and ranks i < r, zero past k*r. The product is fp32 and rounded once to out_dt, as
 * memory_lora.SlotMerge's torch ops do (gather, multiply, cast); one pass, single-threaded (it runs on the
 * adapter thread beside the model's threads). Returns 0, 2 when k*r exceeds R for a segment, 3 when the
 * scratch tile cannot be allocated. */
int prag_slot_merge(void *out, int out_dt, const void *rows, int src_dt, i64 k, i64 row_len, i64 R, i64 n_seg,
                    const i64 *a_off, const i64 *b_off, const i64 *r, const i64 *d_in, const i64 *d_out,
                    const float *scale) {
#define PRAG_MERGE(O, S) slot_merge_impl((char *)out, O, (const char *)rows, S, k, row_len, R, n_seg, a_off, b_off, \
                                         r, d_in, d_out, scale)
    if (out_dt == 0) return src_dt == 0 ? PRAG_MERGE(0, 0) : PRAG_MERGE(0, 1);
    return src_dt == 0 ? PRAG_MERGE(1, 0) : PRAG_MERGE(1, 1);
#undef PRAG_MERGE
}
