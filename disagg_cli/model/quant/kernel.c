/* Weight-only quantized matmul for CPUs: y (M, N) = x (M, K) · W (N, K)ᵀ, W in blocks of 32.
 *
 * Built at first use by disagg_cli/model/quant/kernels.py with the system compiler
 * (-O3 -march=native -pthread) and called through ctypes on tensors' data pointers.
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
 * weights once per tile of rows; a small thread pool (below) splits the output rows between threads.
 */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define QK 32
#define ROW_TILE 4   /* activation rows sharing one unpacked weight block */
#define N_CHUNK 16   /* output rows per OpenMP work item */

int dq_version(void) { return 7; }

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

/* --- a small thread pool that never waits for a thread that has not started ------------------
 *
 * OpenMP's fork/join waits at the end of every parallel region for every thread of the team, so on
 * a machine whose cores are shared with other work, a region costs up to a scheduler time slice
 * whenever one thread is descheduled: measured, 2-thread decode ran 20x slower than 1-thread under
 * load. Here the calling thread and up to nthreads - 1 helpers take chunks from an atomic counter;
 * the caller waits only for chunks a helper has actually claimed, so a helper that wakes late finds
 * nothing left and the caller has done the work itself. Helpers spin briefly, then sleep. */
#define MAX_HELPERS 63
#define SPIN_ROUNDS 20000
#define JOB_SLOTS 4

typedef void (*chunk_fn)(void *ctx, int chunk);

/* A job lives in slot gen % JOB_SLOTS; the chunk counter carries its generation in the high 32
 * bits, so a helper still holding an older generation can never claim (or count) a chunk of a
 * newer job: its compare-and-swap fails first. */
typedef struct {
    chunk_fn fn;
    void *ctx;
    int num_chunks, allowed_helpers;
} pool_job;

static pthread_mutex_t pool_submit = PTHREAD_MUTEX_INITIALIZER;  /* one job at a time */
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static int pool_started = 0;
static uint32_t pool_last_gen = 0;
static pool_job pool_jobs[JOB_SLOTS];
static _Atomic uint32_t pool_generation = 0;  /* what sleeping helpers watch */
static _Atomic uint64_t pool_counter = 0;     /* generation << 32 | next chunk */
static _Atomic int pool_done = 0;             /* chunks of the current job finished */

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void run_chunks(uint32_t gen) {
    const pool_job *job = &pool_jobs[gen % JOB_SLOTS];
    for (;;) {
        uint64_t v = atomic_load(&pool_counter);
        do {
            if ((uint32_t)(v >> 32) != gen || (int)(uint32_t)v >= job->num_chunks) return;
        } while (!atomic_compare_exchange_weak(&pool_counter, &v, v + 1));
        job->fn(job->ctx, (int)(uint32_t)v);
        atomic_fetch_add(&pool_done, 1);
    }
}

static void *helper_main(void *arg) {
    int id = (int)(intptr_t)arg;
    uint32_t seen = 0;
    for (;;) {
        uint32_t gen;
        int spins = 0;
        while ((gen = atomic_load(&pool_generation)) == seen) {
            if (++spins < SPIN_ROUNDS) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&pool_mu);
            while (atomic_load(&pool_generation) == seen) pthread_cond_wait(&pool_cv, &pool_mu);
            pthread_mutex_unlock(&pool_mu);
        }
        seen = gen;
        if (id < pool_jobs[gen % JOB_SLOTS].allowed_helpers) run_chunks(gen);
    }
    return NULL;
}

/* Run fn(ctx, 0 .. num_chunks - 1) on the caller and up to nthreads - 1 helpers; returns when all are done. */
static void parallel_chunks(chunk_fn fn, void *ctx, int num_chunks, int nthreads) {
    int helpers = nthreads - 1 < num_chunks - 1 ? nthreads - 1 : num_chunks - 1;
    if (helpers > MAX_HELPERS) helpers = MAX_HELPERS;
    if (helpers <= 0) {
        for (int c = 0; c < num_chunks; c++) fn(ctx, c);
        return;
    }
    pthread_mutex_lock(&pool_submit);
    while (pool_started < helpers) {
        pthread_t t;
        if (pthread_create(&t, NULL, helper_main, (void *)(intptr_t)pool_started) != 0) break;
        pthread_detach(t);
        pool_started++;
    }
    uint32_t gen = ++pool_last_gen;
    if (gen == 0) gen = ++pool_last_gen;  /* 0 is what a fresh helper has seen */
    pool_job *job = &pool_jobs[gen % JOB_SLOTS];
    job->fn = fn, job->ctx = ctx, job->num_chunks = num_chunks;
    job->allowed_helpers = helpers < pool_started ? helpers : pool_started;
    atomic_store(&pool_done, 0);
    atomic_store(&pool_counter, (uint64_t)gen << 32);
    pthread_mutex_lock(&pool_mu);
    atomic_store(&pool_generation, gen);
    pthread_cond_broadcast(&pool_cv);
    pthread_mutex_unlock(&pool_mu);
    run_chunks(gen);
    for (int spins = 0; atomic_load(&pool_done) < num_chunks; spins++) {
        if (spins < SPIN_ROUNDS) cpu_relax();
        else sched_yield();  /* a helper was preempted mid-chunk: let it run */
    }
    pthread_mutex_unlock(&pool_submit);
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

typedef struct {
    int kind, M, nb;
    const float *x;
    int64_t ldx;
    const int8_t *xq;  /* int8-activation path: quantized rows, scales, sums */
    const float *xd, *xs;
    const void *wq;
    const float *wd, *wm;
    int N;
    int64_t row_bytes;
    float *y;
    int64_t ldy;
} matmul_job;

/* Output rows [16c, 16c + 16) against every activation row, a tile of up to 4 rows at a time. */
static void matmul_chunk(void *arg, int c) {
    const matmul_job *j = (const matmul_job *)arg;
    int nb = j->nb, n0 = c * N_CHUNK, n1 = n0 + N_CHUNK < j->N ? n0 + N_CHUNK : j->N;
    for (int m0 = 0; m0 < j->M; m0 += ROW_TILE) {
        int mt = j->M - m0 < ROW_TILE ? j->M - m0 : ROW_TILE;
        for (int n = n0; n < n1; n++) {
            float *yt = j->y + (int64_t)m0 * j->ldy + n;
            const uint8_t *wr = (const uint8_t *)j->wq + n * j->row_bytes;
            const float *wd = j->wd + (int64_t)n * nb, *wm = j->wm + (int64_t)n * nb;
            if (j->xq) {
                const int8_t *xt = j->xq + (int64_t)m0 * nb * QK;
                const float *dt = j->xd + (int64_t)m0 * nb, *st = j->xs + (int64_t)m0 * nb;
#define CALL4(T) row_int4(wr, wd, wm, nb, xt, dt, st, T, yt, j->ldy)
                TILE_CASES(CALL4)
            } else if (j->kind == 4) {
                const float *xt = j->x + (int64_t)m0 * j->ldx;
#define CALL4F(T) row_int4_f(wr, wd, wm, nb, xt, j->ldx, T, yt, j->ldy)
                TILE_CASES(CALL4F)
            } else {
                const float *xt = j->x + (int64_t)m0 * j->ldx;
#define CALL8F(T) row_int8_f(wr, wd, wm, nb, xt, j->ldx, T, yt, j->ldy)
                TILE_CASES(CALL8F)
            }
        }
    }
}

/* kind 8 or 4; x (M, K) f32 with row stride ldx; y (M, N) f32 with row stride ldy; act_int8 (int4
 * only): round the activations to int8 blocks (integer dot products); else keep them float.
 * Returns 0, or -1 when the scratch buffer could not be allocated. */
int dq_matmul(int kind, const float *x, int64_t ldx, int M, int K, const void *wq, const float *wd,
              const float *wm, int N, float *y, int64_t ldy, int nthreads, int act_int8) {
    int nb = (K + QK - 1) / QK;
    matmul_job job = {kind, M, nb, x, ldx, NULL, NULL, NULL, wq, wd, wm, N,
                      kind == 4 ? (int64_t)nb * 16 : (int64_t)nb * QK, y, ldy};
    float *padded = NULL, *xd = NULL;
    int8_t *xq = NULL;
    if (act_int8 && kind == 4) {
        xq = (int8_t *)malloc((size_t)M * nb * QK + 64);
        xd = (float *)malloc((size_t)M * nb * 2 * sizeof(float));
        if (!xq || !xd) goto fail;
        for (int m = 0; m < M; m++)
            quantize_row(x + (int64_t)m * ldx, K, xq + (int64_t)m * nb * QK, xd + (int64_t)m * nb,
                         xd + (size_t)M * nb + (int64_t)m * nb);
        job.xq = xq, job.xd = xd, job.xs = xd + (size_t)M * nb;
    } else if (K % QK) {  /* float activations read in place, unless the last block needs padding */
        padded = (float *)calloc((size_t)M * nb * QK, sizeof(float));
        if (!padded) goto fail;
        for (int m = 0; m < M; m++) memcpy(padded + (int64_t)m * nb * QK, x + (int64_t)m * ldx, (size_t)K * sizeof(float));
        job.x = padded, job.ldx = (int64_t)nb * QK;
    }
    parallel_chunks(matmul_chunk, &job, (N + N_CHUNK - 1) / N_CHUNK, nthreads);
    free(padded);
    free(xq);
    free(xd);
    return 0;
fail:
    free(padded);
    free(xq);
    free(xd);
    return -1;
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
typedef struct {
    const float *q, *keys, *values;
    const int32_t *block_table, *seq_lens;
    int max_blocks, H, KV, hd, block_size;
    float scale;
    float *out;
} attention_job;

static __thread float *scores_buf = NULL;  /* per thread, grown as contexts grow */
static __thread size_t scores_cap = 0;

/* Sequence b = item / KV, KV head item % KV, with the query heads that share it. */
static void attention_item(void *arg, int item) {
    const attention_job *a = (const attention_job *)arg;
    int KV = a->KV, hd = a->hd, H = a->H, group = H / KV, bs = a->block_size;
    int b = item / KV, kvh = item % KV, len = a->seq_lens[b];
    size_t need = (size_t)group * (len > 0 ? len : 1);
    if (need > scores_cap) {
        float *grown = (float *)realloc(scores_buf, need * sizeof(float));
        if (!grown) abort();  /* a few KB per 1k keys; out of memory here is not recoverable */
        scores_buf = grown, scores_cap = need;
    }
    float *scores = scores_buf;
    const int32_t *table = a->block_table + (int64_t)b * a->max_blocks;
    const float *qb = a->q + ((int64_t)b * H + (int64_t)kvh * group) * hd;
    for (int t = 0; t < len; t++) {
        int64_t slot = (int64_t)table[t / bs] * bs + t % bs;
        const float *kr = a->keys + (slot * KV + kvh) * hd;
        for (int j = 0; j < group; j++) scores[(int64_t)j * len + t] = dot_f32(qb + (int64_t)j * hd, kr, hd) * a->scale;
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
        float *o = a->out + ((int64_t)b * H + (int64_t)kvh * group + j) * hd;
        for (int i = 0; i < hd; i++) o[i] = 0.0f;
    }
    for (int t = 0; t < len; t++) {
        int64_t slot = (int64_t)table[t / bs] * bs + t % bs;
        const float *vr = a->values + (slot * KV + kvh) * hd;
        for (int j = 0; j < group; j++)
            axpy_f32(a->out + ((int64_t)b * H + (int64_t)kvh * group + j) * hd, scores[(int64_t)j * len + t], vr, hd);
    }
}

/* One new query token per sequence, attending over its cached keys where they lie in the pool:
 * reads each key and value once through the block table, copying nothing.
 * q, out (B, H, hd); keys, values (num_slots, KV, hd) of one layer; block_table (B, max_blocks);
 * seq_lens (B): keys each sequence sees (its new one included). The H / KV query heads that share
 * a KV head are done together, so each K/V row is loaded once for all of them. */
int dq_decode_attention(const float *q, const float *keys, const float *values, const int32_t *block_table,
                        int max_blocks, const int32_t *seq_lens, int B, int H, int KV, int hd, int block_size,
                        float scale, float *out, int nthreads) {
    attention_job job = {q, keys, values, block_table, seq_lens, max_blocks, H, KV, hd, block_size, scale, out};
    parallel_chunks(attention_item, &job, B * KV, nthreads);
    return 0;
}
