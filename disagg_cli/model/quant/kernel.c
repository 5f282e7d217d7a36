/* Weight-only quantized matmul for CPUs: y (M, N) = x (M, K) · W (N, K)ᵀ, W in blocks of 32.
 *
 * Built at first use by disagg_cli/model/quant/kernels.py with the system compiler
 * (-O3 -march=native -fopenmp) and called through ctypes on tensors' data pointers.
 *
 * Weight formats (row-major by output row n, `nb` = ceil(K / 32) blocks per row, zero-padded), a
 * scale d and a min m per block, both f32 (N, nb):
 *   int8: qs u8 (N, nb*32): w = d · q + m, q in 0..255;
 *   int4: qs u8 (N, nb*16): w = d · q + m, q in 0..15; byte j of a block holds element j in its
 *         low nibble and element j + 16 in its high one (GGUF's Q4_0 / Q4_1 layout, so those
 *         blocks load without repacking).
 * Two ways to multiply: float activations (weights widened to f32 per block, then FMAs: exact up
 * to summation order), or, for int4, activations rounded to int8 per block (absmax / 127) as
 * llama.cpp's Q8 path does, so each block is an integer dot product: AVX2 `maddubs` (u8 × s8 →
 * s16 pairs) then `madd` (→ s32), or one `dpbusd` where the CPU has VNNI; the min term needs only
 * the sum of the activation block: Σ (d q + m) x ≈ d dx Σ q xq + m dx Σ xq.
 * Several activation rows (up to 4) share each unpacked weight block, so batched decode reads the
 * weights once per tile of rows; OpenMP splits the output rows between threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define QK 32
#define ROW_TILE 4   /* activation rows sharing one unpacked weight block */
#define N_CHUNK 16   /* output rows per OpenMP work item */

int dq_version(void) { return 6; }

int dq_has_vnni(void) {
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
    return 1;
#else
    return 0;
#endif
}

int dq_has_avx2(void) {
#if defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

/* --- activations → int8 blocks --------------------------------------------------------------- */

/* One row: xq (nb*32) int8, xd (nb) scales, xs (nb) = xd · Σ xq. Elements past K count as 0. */
static void quantize_row(const float *x, int K, int8_t *xq, float *xd, float *xs) {
    int nb = (K + QK - 1) / QK;
    for (int b = 0; b < nb; b++) {
        float buf[QK];
        int n = K - b * QK < QK ? K - b * QK : QK;
        memcpy(buf, x + b * QK, (size_t)n * sizeof(float));
        for (int i = n; i < QK; i++) buf[i] = 0.0f;
        float amax = 0.0f;
        for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(buf[i]));
        float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
#if defined(__AVX2__)
        __m256 vid = _mm256_set1_ps(id);
        __m256i q32[4];
        for (int k = 0; k < 4; k++) {
            __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(buf + 8 * k), vid),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q32[k] = _mm256_cvtps_epi32(v);
        }
        /* packs interleave 128-bit lanes; the permute puts the 32 bytes back in order */
        __m256i q16a = _mm256_packs_epi32(q32[0], q32[1]), q16b = _mm256_packs_epi32(q32[2], q32[3]);
        __m256i q8 = _mm256_packs_epi16(q16a, q16b);
        q8 = _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(xq + b * QK), q8);
        __m256i s = _mm256_madd_epi16(_mm256_add_epi16(q16a, q16b), _mm256_set1_epi16(1));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        sum = _mm_cvtsi128_si32(s4);
#else
        for (int i = 0; i < QK; i++) {
            int q = (int)lrintf(buf[i] * id);
            xq[b * QK + i] = (int8_t)q;
            sum += q;
        }
#endif
        xd[b] = d;
        xs[b] = d * (float)sum;
    }
}

/* --- one weight row against a tile of activation rows ----------------------------------------- */

#if defined(__AVX2__)
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* u8 × s8 dot of 32 bytes into 8 s32 lanes */
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
#endif

static inline __attribute__((always_inline)) void row_int4(
        const uint8_t *w, const float *wd, const float *wm, int nb, const int8_t *xq, const float *xd,
        const float *xs, const int mt, float *y, int64_t ldy) {
    float macc[ROW_TILE] = {0};
#if defined(__AVX2__)
    __m256 acc[ROW_TILE];
    for (int j = 0; j < mt; j++) acc[j] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int b = 0; b < nb; b++) {
        __m128i raw = _mm_loadu_si128((const __m128i *)(w + b * 16));
        __m256i wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
        for (int j = 0; j < mt; j++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (int64_t)j * nb * QK + b * QK));
            __m256 p = _mm256_cvtepi32_ps(dot_u8s8(wv, xv));
            acc[j] = _mm256_fmadd_ps(p, _mm256_set1_ps(wd[b] * xd[j * nb + b]), acc[j]);
            macc[j] += wm[b] * xs[j * nb + b];
        }
    }
    for (int j = 0; j < mt; j++) y[j * ldy] = hsum8(acc[j]) + macc[j];
#else
    float acc[ROW_TILE] = {0};
    for (int b = 0; b < nb; b++) {
        for (int j = 0; j < mt; j++) {
            const int8_t *xb = xq + (int64_t)j * nb * QK + b * QK;
            int s = 0;
            for (int i = 0; i < 16; i++) s += (w[b * 16 + i] & 0x0F) * xb[i] + (w[b * 16 + i] >> 4) * xb[i + 16];
            acc[j] += (float)s * wd[b] * xd[j * nb + b];
            macc[j] += wm[b] * xs[j * nb + b];
        }
    }
    for (int j = 0; j < mt; j++) y[j * ldy] = acc[j] + macc[j];
#endif
}

/* Float activations: each weight block is widened to float once (scale and min folded in) and
 * reused by the tile's rows, so the dot products are plain FMAs on x as it is: no activation
 * rounding, hence closer to the float model. On AVX2 this costs about what maddubs does per block;
 * the int8-activation path wins where the CPU has VNNI (one dpbusd per 32 products). */
#if defined(__AVX2__)
static inline __attribute__((always_inline)) void fma_block(__m256 acc[][2], const __m256 w[4], const float *x,
                                                            int64_t ldx, const int mt) {
    for (int j = 0; j < mt; j++) {
        const float *xb = x + (int64_t)j * ldx;
        acc[j][0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xb), acc[j][0]);
        acc[j][1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), acc[j][1]);
        acc[j][0] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), acc[j][0]);
        acc[j][1] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), acc[j][1]);
    }
}
#endif

static inline __attribute__((always_inline)) void row_int8_f(const uint8_t *w, const float *wd, const float *wm,
                                                             int nb, const float *x, int64_t ldx, const int mt,
                                                             float *y, int64_t ldy) {
#if defined(__AVX2__)
    __m256 acc[ROW_TILE][2];
    for (int j = 0; j < mt; j++) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m128i r0 = _mm_loadu_si128((const __m128i *)(w + b * QK));
        __m128i r1 = _mm_loadu_si128((const __m128i *)(w + b * QK + 16));
        __m256 d = _mm256_set1_ps(wd[b]), m = _mm256_set1_ps(wm[b]);
        __m256 wf[4] = {_mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(r0)), m),
                        _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(r0, 8))), m),
                        _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(r1)), m),
                        _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(r1, 8))), m)};
        fma_block(acc, wf, x + b * QK, ldx, mt);
    }
    for (int j = 0; j < mt; j++) y[j * ldy] = hsum8(_mm256_add_ps(acc[j][0], acc[j][1]));
#else
    for (int j = 0; j < mt; j++) {
        float s = 0.0f;
        for (int b = 0; b < nb; b++)
            for (int i = 0; i < QK; i++) s += (wd[b] * (float)w[b * QK + i] + wm[b]) * x[(int64_t)j * ldx + b * QK + i];
        y[j * ldy] = s;
    }
#endif
}

static inline __attribute__((always_inline)) void row_int4_f(const uint8_t *w, const float *wd, const float *wm,
                                                             int nb, const float *x, int64_t ldx, const int mt,
                                                             float *y, int64_t ldy) {
#if defined(__AVX2__)
    __m256 acc[ROW_TILE][2];
    for (int j = 0; j < mt; j++) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
    const __m128i low = _mm_set1_epi8(0x0F);
    for (int b = 0; b < nb; b++) {
        __m128i raw = _mm_loadu_si128((const __m128i *)(w + b * 16));
        __m128i lo = _mm_and_si128(raw, low), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
        __m256 d = _mm256_set1_ps(wd[b]), m = _mm256_set1_ps(wm[b]);
        __m256 wf[4] = {_mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), m),
                        _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), m),
                        _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), m),
                        _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), m)};
        fma_block(acc, wf, x + b * QK, ldx, mt);
    }
    for (int j = 0; j < mt; j++) y[j * ldy] = hsum8(_mm256_add_ps(acc[j][0], acc[j][1]));
#else
    for (int j = 0; j < mt; j++) {
        float s = 0.0f;
        for (int b = 0; b < nb; b++) {
            const float *xb = x + (int64_t)j * ldx + b * QK;
            for (int i = 0; i < 16; i++)
                s += (wd[b] * (float)(w[b * 16 + i] & 0x0F) + wm[b]) * xb[i] +
                     (wd[b] * (float)(w[b * 16 + i] >> 4) + wm[b]) * xb[i + 16];
        }
        y[j * ldy] = s;
    }
#endif
}

/* The constant `mt` of each case lets the compiler keep the tile's accumulators in registers. */
#define TILE_CASES(CALL) \
    switch (mt) { case 4: CALL(4); break; case 3: CALL(3); break; case 2: CALL(2); break; default: CALL(1); }

/* --- entry point ------------------------------------------------------------------------------- */

/* Float activations: x read in place (copied once, zero-padded, only when K is not a multiple of 32). */
static int matmul_f32_act(int kind, const float *x, int64_t ldx, int M, int K, const void *wq, const float *wd,
                          const float *wm, int N, float *y, int64_t ldy, int nthreads, int nb, int64_t row_bytes) {
    float *padded = NULL;
    if (K % QK) {
        padded = (float *)calloc((size_t)M * nb * QK, sizeof(float));
        if (!padded) return -1;
        for (int m = 0; m < M; m++) memcpy(padded + (int64_t)m * nb * QK, x + (int64_t)m * ldx, (size_t)K * sizeof(float));
        x = padded;
        ldx = (int64_t)nb * QK;
    }
    int num_chunks = (N + N_CHUNK - 1) / N_CHUNK;
    int workers = num_chunks < nthreads ? num_chunks : nthreads;
#pragma omp parallel for schedule(static) num_threads(workers)
    for (int c = 0; c < num_chunks; c++) {
        int n0 = c * N_CHUNK, n1 = n0 + N_CHUNK < N ? n0 + N_CHUNK : N;
        for (int m0 = 0; m0 < M; m0 += ROW_TILE) {
            int mt = M - m0 < ROW_TILE ? M - m0 : ROW_TILE;
            const float *xt = x + (int64_t)m0 * ldx;
            for (int n = n0; n < n1; n++) {
                float *yt = y + (int64_t)m0 * ldy + n;
                if (kind == 4) {
                    const uint8_t *wr = (const uint8_t *)wq + n * row_bytes;
#define CALL4F(T) row_int4_f(wr, wd + (int64_t)n * nb, wm + (int64_t)n * nb, nb, xt, ldx, T, yt, ldy)
                    TILE_CASES(CALL4F)
                } else {
                    const uint8_t *wr = (const uint8_t *)wq + n * row_bytes;
#define CALL8F(T) row_int8_f(wr, wd + (int64_t)n * nb, wm + (int64_t)n * nb, nb, xt, ldx, T, yt, ldy)
                    TILE_CASES(CALL8F)
                }
            }
        }
    }
    free(padded);
    return 0;
}

/* kind 8 or 4; x (M, K) f32 with row stride ldx; y (M, N) f32 with row stride ldy; act_int8 (int4
 * only): round the activations to int8 blocks (integer dot products); else keep them float.
 * Returns 0, or -1 when the scratch buffer could not be allocated. */
int dq_matmul(int kind, const float *x, int64_t ldx, int M, int K, const void *wq, const float *wd,
              const float *wm, int N, float *y, int64_t ldy, int nthreads, int act_int8) {
    int nb = (K + QK - 1) / QK;
    int64_t row_bytes = kind == 4 ? (int64_t)nb * 16 : (int64_t)nb * QK;
    if (!act_int8 || kind != 4) return matmul_f32_act(kind, x, ldx, M, K, wq, wd, wm, N, y, ldy, nthreads, nb, row_bytes);
    int8_t *xq = (int8_t *)malloc((size_t)M * nb * QK + 64);
    float *xd = (float *)malloc((size_t)M * nb * 2 * sizeof(float));
    if (!xq || !xd) {
        free(xq);
        free(xd);
        return -1;
    }
    float *xs = xd + (size_t)M * nb;
    int num_chunks = (N + N_CHUNK - 1) / N_CHUNK;
    /* Quantizing a row costs about what reading one weight row does: a handful of rows is not
     * worth a second parallel region and its barrier (which a busy machine makes slow). */
#pragma omp parallel for schedule(static) num_threads(nthreads) if (M >= 16)
    for (int m = 0; m < M; m++)
        quantize_row(x + (int64_t)m * ldx, K, xq + (int64_t)m * nb * QK, xd + (int64_t)m * nb, xs + (int64_t)m * nb);
    int workers = num_chunks < nthreads ? num_chunks : nthreads;
#pragma omp parallel num_threads(workers)
    {
#pragma omp for schedule(static) nowait
        for (int c = 0; c < num_chunks; c++) {
            int n0 = c * N_CHUNK, n1 = n0 + N_CHUNK < N ? n0 + N_CHUNK : N;
            for (int m0 = 0; m0 < M; m0 += ROW_TILE) {
                int mt = M - m0 < ROW_TILE ? M - m0 : ROW_TILE;
                const int8_t *xt = xq + (int64_t)m0 * nb * QK;
                const float *dt = xd + (int64_t)m0 * nb, *st = xs + (int64_t)m0 * nb;
                for (int n = n0; n < n1; n++) {
                    float *yt = y + (int64_t)m0 * ldy + n;
                    const uint8_t *wr = (const uint8_t *)wq + n * row_bytes;
#define CALL4(T) row_int4(wr, wd + (int64_t)n * nb, wm + (int64_t)n * nb, nb, xt, dt, st, T, yt, ldy)
                    TILE_CASES(CALL4)
                }
            }
        }
    }
    free(xq);
    free(xd);
    return 0;
}

/* --- decode attention over the paged KV pool ------------------------------------------------- */

static inline float dot_f32(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.0f;
#if defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    s = hsum8(acc);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy_f32(float *y, float a, const float *x, int n) {
    int i = 0;
#if defined(__AVX2__)
    __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += a * x[i];
}

/* One new query token per sequence, attending over its cached keys where they lie in the pool:
 * reads each key and value once through the block table, copying nothing.
 * q, out (B, H, hd); keys, values (num_slots, KV, hd) of one layer; block_table (B, max_blocks);
 * seq_lens (B): keys each sequence sees (its new one included). The H / KV query heads that share
 * a KV head are done together, so each K/V row is loaded once for all of them. */
int dq_decode_attention(const float *q, const float *keys, const float *values, const int32_t *block_table,
                        int max_blocks, const int32_t *seq_lens, int B, int H, int KV, int hd, int block_size,
                        float scale, float *out, int nthreads) {
    int group = H / KV, max_len = 0;
    for (int b = 0; b < B; b++) max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    int ok = 1;
#pragma omp parallel num_threads(nthreads)
    {
        float *scores = (float *)malloc((size_t)group * (max_len > 0 ? max_len : 1) * sizeof(float));
        if (!scores) {
#pragma omp atomic write
            ok = 0;
        }
#pragma omp for schedule(dynamic, 1)
        for (int item = 0; item < B * KV; item++) {
            if (!scores) continue;
            int b = item / KV, kvh = item % KV, len = seq_lens[b];
            const int32_t *table = block_table + (int64_t)b * max_blocks;
            const float *qb = q + ((int64_t)b * H + (int64_t)kvh * group) * hd;
            for (int t = 0; t < len; t++) {
                int64_t slot = (int64_t)table[t / block_size] * block_size + t % block_size;
                const float *kr = keys + (slot * KV + kvh) * hd;
                for (int j = 0; j < group; j++) scores[(int64_t)j * len + t] = dot_f32(qb + (int64_t)j * hd, kr, hd) * scale;
            }
            for (int j = 0; j < group; j++) {
                float *s = scores + (int64_t)j * len, mx = -INFINITY, sum = 0.0f;
                for (int t = 0; t < len; t++) mx = s[t] > mx ? s[t] : mx;
                for (int t = 0; t < len; t++) {
                    s[t] = expf(s[t] - mx);
                    sum += s[t];
                }
                float inv = 1.0f / sum;
                for (int t = 0; t < len; t++) s[t] *= inv;
                float *o = out + ((int64_t)b * H + (int64_t)kvh * group + j) * hd;
                for (int i = 0; i < hd; i++) o[i] = 0.0f;
            }
            for (int t = 0; t < len; t++) {
                int64_t slot = (int64_t)table[t / block_size] * block_size + t % block_size;
                const float *vr = values + (slot * KV + kvh) * hd;
                for (int j = 0; j < group; j++)
                    axpy_f32(out + ((int64_t)b * H + (int64_t)kvh * group + j) * hd, scores[(int64_t)j * len + t], vr, hd);
            }
        }
        free(scores);
    }
    return ok ? 0 : -1;
}
