/* Weight-only quantized matmul for CPUs: y (M, N) = x (M, K) · W (N, K)ᵀ, W in blocks of 32.
 *
 * Built at first use by disagg_cli/model/quant/kernels.py with the system compiler
 * (-O3 -march=native -pthread, and -fopenmp where it has it) and called through ctypes on tensors'
 * data pointers.
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

int dq_has_vnni(void) {
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
    return 1;
#else
    return 0;
#endif
}

int dq_has_openmp(void) {
#if defined(_OPENMP)
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

/* A job lives in slot gen % JOB_SLOTS. The chunk counter is gen (24 bits) | front (20) | back (20):
 * the caller claims chunks from the front and helpers from the back, so with two threads each reads
 * one contiguous run of the weights (interleaved claims measured 13.5 ms per batch-1 step against
 * 11.3 with 4x larger chunks). The generation in it means a helper still holding an older one can
 * never claim (or count) a chunk of a newer job: its compare-and-swap fails first. */
#define CHUNK_BITS 20
#define CHUNK_MASK ((1u << CHUNK_BITS) - 1)
#define GEN_MASK ((1u << 24) - 1)
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
static _Atomic uint64_t pool_counter = 0;     /* generation << 40 | front << 20 | back */
static _Atomic int pool_done = 0;             /* chunks of the current job finished */

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Claims are guided: a quarter of what is left per thread at a time (at least one chunk), so a job
 * of thousands of chunks costs a few dozen claims (each one moves the counter's cache line between
 * cores) and the last claims are small enough to even out the threads' finish. */
static void run_chunks(uint32_t gen, int from_back) {
    const pool_job *job = &pool_jobs[gen % JOB_SLOTS];
    const uint32_t share = 4u * (uint32_t)(job->allowed_helpers + 1);
    for (;;) {
        uint64_t v = atomic_load(&pool_counter), next;
        uint32_t first, count;
        do {
            uint32_t front = (uint32_t)(v >> CHUNK_BITS) & CHUNK_MASK, back = (uint32_t)v & CHUNK_MASK;
            if ((uint32_t)(v >> (2 * CHUNK_BITS)) != (gen & GEN_MASK) || front >= back) return;
            count = (back - front) / share;
            count = count ? count : 1;
            first = from_back ? back - count : front;
            next = from_back ? v - count : v + ((uint64_t)count << CHUNK_BITS);
        } while (!atomic_compare_exchange_weak(&pool_counter, &v, next));
        for (uint32_t c = first; c < first + count; c++) job->fn(job->ctx, (int)c);
        atomic_fetch_add(&pool_done, (int)count);
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
        if (id < pool_jobs[gen % JOB_SLOTS].allowed_helpers) run_chunks(gen, 1);
    }
    return NULL;
}

/* --- cores lent between workers that share a machine ------------------------------------------
 *
 * Local workers started together each own a few cores. A lease is a small shared file with one
 * slot per worker (a cache line each): its first int is 1 while that worker has work, 0 while it
 * waits for some. Where this process has attached one (`dq_set_lease`), every parallel job reads
 * it when it starts and runs on its own threads plus those of every worker that is idle now, so a
 * prefill worker computes its prompts on both cores while the decode worker has nothing to decode,
 * and gives the core back at its next job (a matmul: milliseconds) once the owner has work again.
 * The process's affinity covers the lenders' cores (`workers/core_lease.py`). */
#define LEASE_SLOT_INTS 16  /* 64 bytes a slot */
#define LEASE_MAX_SLOTS 64
static const _Atomic int32_t *lease_flags = NULL;
static int lease_slots = 0, lease_self = -1;
static int lease_threads_of[LEASE_MAX_SLOTS];

/* flags: slots × 16 int32 (slot i's flag at 16 i); threads: slots ints, each worker's own threads.
 * NULL flags detaches. Returns 0, or -1 for an out-of-range slot count or self. */
int dq_set_lease(const void *flags, int slots, int self, const void *threads) {
    if (flags == NULL) {
        lease_flags = NULL, lease_slots = 0, lease_self = -1;
        return 0;
    }
    if (slots < 1 || slots > LEASE_MAX_SLOTS || self < 0 || self >= slots) return -1;
    for (int i = 0; i < slots; i++) lease_threads_of[i] = ((const int *)threads)[i];
    lease_slots = slots, lease_self = self;
    atomic_thread_fence(memory_order_seq_cst);
    lease_flags = (const _Atomic int32_t *)flags;
    return 0;
}

/* The threads a job asked for (the worker's own), plus those of every lender idle now. */
static inline int lease_threads(int nthreads) {
    const _Atomic int32_t *flags = lease_flags;
    if (flags == NULL) return nthreads;
    for (int i = 0; i < lease_slots; i++)
        if (i != lease_self && atomic_load_explicit(&flags[i * LEASE_SLOT_INTS], memory_order_relaxed) == 0)
            nthreads += lease_threads_of[i];
    return nthreads;
}

/* What a job asking for nthreads runs on now (for tests and logs). */
int dq_lease_threads(int nthreads) { return lease_threads(nthreads); }

/* Run fn(ctx, 0 .. num_chunks - 1) on the caller and up to nthreads - 1 helpers (more where a lease
 * lends cores); returns when all are done. */
static void run_chunks_on(chunk_fn fn, void *ctx, int num_chunks, int nthreads);
static void parallel_chunks(chunk_fn fn, void *ctx, int num_chunks, int nthreads) {
    run_chunks_on(fn, ctx, num_chunks, lease_threads(nthreads));
}

static void run_chunks_on(chunk_fn fn, void *ctx, int num_chunks, int nthreads) {
    int helpers = nthreads - 1 < num_chunks - 1 ? nthreads - 1 : num_chunks - 1;
    if (helpers > MAX_HELPERS) helpers = MAX_HELPERS;
    if (helpers <= 0 || num_chunks > (int)CHUNK_MASK) {  /* over 2^20 chunks: never, at these sizes */
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
    atomic_store(&pool_counter, ((uint64_t)(gen & GEN_MASK) << (2 * CHUNK_BITS)) | (uint64_t)num_chunks);
    pthread_mutex_lock(&pool_mu);
    atomic_store(&pool_generation, gen);
    pthread_cond_broadcast(&pool_cv);
    pthread_mutex_unlock(&pool_mu);
    run_chunks(gen, 0);
    for (int spins = 0; atomic_load(&pool_done) < num_chunks; spins++) {
        if (spins < SPIN_ROUNDS) cpu_relax();
        else sched_yield();  /* a helper was preempted mid-chunk: let it run */
    }
    pthread_mutex_unlock(&pool_submit);
}

/* Work called between torch's own ops (a prompt's matmuls and attention, the unfused paths) runs
 * on OpenMP's threads when the library is built with it: built with -fopenmp, it links libgomp.so.1,
 * which the dynamic loader resolves to the one torch has already loaded, so both share one team.
 * Two pools, each spinning for a while after its work, took turns badly on 2 cores: our helper
 * waited behind torch's spinning threads after every torch op and theirs behind ours (a prompt's
 * attention on this kernel took 0.32 s alone and 0.43 s inside a prefill step). The fused decode
 * step, one call with no torch op inside, keeps the pool above, which never waits for a late thread. */
static __thread int in_fused_step = 0;

static void parallel_work(chunk_fn fn, void *ctx, int num_chunks, int nthreads) {
    nthreads = lease_threads(nthreads);
#if defined(_OPENMP)
    if (!in_fused_step && nthreads > 1 && num_chunks > 1) {
        const int team = nthreads < num_chunks ? nthreads : num_chunks;
#pragma omp parallel for schedule(dynamic, 1) num_threads(team)
        for (int c = 0; c < num_chunks; c++) fn(ctx, c);
        return;
    }
#endif
    run_chunks_on(fn, ctx, num_chunks, nthreads);
}

/* --- activations → int8 blocks --------------------------------------------------------------- */

/* Block b of a row of K floats into buf, zero past K. */
static inline void load_block(const float *x, int K, int b, float buf[QK]) {
    int n = K - b * QK < QK ? K - b * QK : QK;
    memcpy(buf, x + b * QK, (size_t)n * sizeof(float));
    for (int i = n; i < QK; i++) buf[i] = 0.0f;
}

/* One row: xq (nb*32) int8, xd (nb) scales, xs (nb) = xd · Σ xq. Elements past K count as 0. */
static void quantize_row(const float *x, int K, int8_t *xq, float *xd, float *xs) {
    int nb = (K + QK - 1) / QK;
    for (int b = 0; b < nb; b++) {
        float buf[QK];
        load_block(x, K, b, buf);
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

/* The activation-side scale and min terms of a row: Σ_b m[b] · xs[b] (plus 128 Σ_b d[b] · xs[b] for
 * int8 weights, whose unsigned q is used as the signed q - 128 in the dot products). One vector
 * dot per row after the blocks, not a scalar FMA chain inside them. */
static inline float dot_f32(const float *a, const float *b, int n);

static inline float row_min_term(int kind, const float *wd, const float *wm, const float *xs, int nb) {
    float t = dot_f32(wm, xs, nb);
    return kind == 8 ? t + 128.0f * dot_f32(wd, xs, nb) : t;
}

#if defined(__AVX2__)
/* Block b of a weight row as 32 bytes for the integer dot: int4 unpacked to 0..15 (unsigned); int8
 * as q - 128 (signed), returned as |q - 128| with its sign moved onto the activations (`xv`), so
 * `maddubs` (u8 × s8) never saturates: 128 · 127 · 2 < 32768. */
static inline __attribute__((always_inline)) __m256i block_dot(const int kind, const uint8_t *w, __m256i xv) {
    if (kind == 4) {
        __m128i raw = _mm_loadu_si128((const __m128i *)w);
        __m256i wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
        return dot_u8s8(wv, xv);
    }
    __m256i ws = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)w), _mm256_set1_epi8((char)0x80));
    return dot_u8s8(_mm256_abs_epi8(ws), _mm256_sign_epi8(xv, ws));
}
#endif

static inline int block_dot_scalar(int kind, const uint8_t *w, const int8_t *xb) {
    int s = 0;
    if (kind == 4)
        for (int i = 0; i < 16; i++) s += (w[i] & 0x0F) * xb[i] + (w[i] >> 4) * xb[i + 16];
    else
        for (int i = 0; i < QK; i++) s += ((int)w[i] - 128) * xb[i];
    return s;
}

/* One weight row against a tile of mt int8-quantized activation rows (batched steps). */
static inline __attribute__((always_inline)) void row_q(
        const int kind, const uint8_t *w, const float *wd, const float *wm, int nb, const int8_t *xq,
        const float *xd, const float *xs, const int mt, float *y, int64_t ldy) {
    const int bb = kind == 4 ? QK / 2 : QK;  /* weight bytes per block */
#if defined(__AVX2__)
    __m256 acc[ROW_TILE];
    for (int j = 0; j < mt; j++) acc[j] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        for (int j = 0; j < mt; j++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (int64_t)j * nb * QK + b * QK));
            __m256 p = _mm256_cvtepi32_ps(block_dot(kind, w + b * bb, xv));
            acc[j] = _mm256_fmadd_ps(p, _mm256_set1_ps(wd[b] * xd[j * nb + b]), acc[j]);
        }
    }
    for (int j = 0; j < mt; j++) y[j * ldy] = hsum8(acc[j]) + row_min_term(kind, wd, wm, xs + j * nb, nb);
#else
    for (int j = 0; j < mt; j++) {
        float acc = 0.0f;
        for (int b = 0; b < nb; b++)
            acc += (float)block_dot_scalar(kind, w + b * bb, xq + (int64_t)j * nb * QK + b * QK) * wd[b] * xd[j * nb + b];
        y[j * ldy] = acc + row_min_term(kind, wd, wm, xs + j * nb, nb);
    }
#endif
}

/* One activation row (batch-1 decode) against four weight rows at once: four independent FMA
 * chains share each activation block, where one row alone waits on its own FMA latency. */
static inline __attribute__((always_inline)) void rows4_q(
        const int kind, const uint8_t *w, int64_t row_bytes, const float *wd, const float *wm, int nb,
        const int8_t *xq, const float *xd, const float *xs, float *y) {
    const int bb = kind == 4 ? QK / 2 : QK;
#if defined(__AVX2__)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
           acc3 = _mm256_setzero_ps();
    const uint8_t *w0 = w, *w1 = w + row_bytes, *w2 = w + 2 * row_bytes, *w3 = w + 3 * row_bytes;
    for (int b = 0; b < nb; b++) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * QK));
        __m256 dx = _mm256_set1_ps(xd[b]);
        __m256 p0 = _mm256_cvtepi32_ps(block_dot(kind, w0 + b * bb, xv));
        __m256 p1 = _mm256_cvtepi32_ps(block_dot(kind, w1 + b * bb, xv));
        __m256 p2 = _mm256_cvtepi32_ps(block_dot(kind, w2 + b * bb, xv));
        __m256 p3 = _mm256_cvtepi32_ps(block_dot(kind, w3 + b * bb, xv));
        acc0 = _mm256_fmadd_ps(p0, _mm256_mul_ps(dx, _mm256_set1_ps(wd[b])), acc0);
        acc1 = _mm256_fmadd_ps(p1, _mm256_mul_ps(dx, _mm256_set1_ps(wd[nb + b])), acc1);
        acc2 = _mm256_fmadd_ps(p2, _mm256_mul_ps(dx, _mm256_set1_ps(wd[2 * nb + b])), acc2);
        acc3 = _mm256_fmadd_ps(p3, _mm256_mul_ps(dx, _mm256_set1_ps(wd[3 * nb + b])), acc3);
    }
    y[0] = hsum8(acc0) + row_min_term(kind, wd, wm, xs, nb);
    y[1] = hsum8(acc1) + row_min_term(kind, wd + nb, wm + nb, xs, nb);
    y[2] = hsum8(acc2) + row_min_term(kind, wd + 2 * nb, wm + 2 * nb, xs, nb);
    y[3] = hsum8(acc3) + row_min_term(kind, wd + 3 * nb, wm + 3 * nb, xs, nb);
#else
    for (int r = 0; r < 4; r++)
        row_q(kind, w + r * row_bytes, wd + r * nb, wm + r * nb, nb, xq, xd, xs, 1, y + r, 1);
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
    if (j->xq && j->M == 1) {  /* batch-1 decode: four weight rows per pass */
        int n = n0;
        for (; n + 4 <= n1; n += 4) {
            const uint8_t *wr = (const uint8_t *)j->wq + n * j->row_bytes;
            const float *wd = j->wd + (int64_t)n * nb, *wm = j->wm + (int64_t)n * nb;
            if (j->kind == 4) rows4_q(4, wr, j->row_bytes, wd, wm, nb, j->xq, j->xd, j->xs, j->y + n);
            else rows4_q(8, wr, j->row_bytes, wd, wm, nb, j->xq, j->xd, j->xs, j->y + n);
        }
        for (; n < n1; n++) {
            const uint8_t *wr = (const uint8_t *)j->wq + n * j->row_bytes;
            const float *wd = j->wd + (int64_t)n * nb, *wm = j->wm + (int64_t)n * nb;
            if (j->kind == 4) row_q(4, wr, wd, wm, nb, j->xq, j->xd, j->xs, 1, j->y + n, j->ldy);
            else row_q(8, wr, wd, wm, nb, j->xq, j->xd, j->xs, 1, j->y + n, j->ldy);
        }
        return;
    }
    for (int m0 = 0; m0 < j->M; m0 += ROW_TILE) {
        int mt = j->M - m0 < ROW_TILE ? j->M - m0 : ROW_TILE;
        for (int n = n0; n < n1; n++) {
            float *yt = j->y + (int64_t)m0 * j->ldy + n;
            const uint8_t *wr = (const uint8_t *)j->wq + n * j->row_bytes;
            const float *wd = j->wd + (int64_t)n * nb, *wm = j->wm + (int64_t)n * nb;
            if (j->xq) {
                const int8_t *xt = j->xq + (int64_t)m0 * nb * QK;
                const float *dt = j->xd + (int64_t)m0 * nb, *st = j->xs + (int64_t)m0 * nb;
                if (j->kind == 4) {
#define CALLQ4(T) row_q(4, wr, wd, wm, nb, xt, dt, st, T, yt, j->ldy)
                    TILE_CASES(CALLQ4)
                } else {
#define CALLQ8(T) row_q(8, wr, wd, wm, nb, xt, dt, st, T, yt, j->ldy)
                    TILE_CASES(CALLQ8)
                }
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
    if (act_int8) {
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
    parallel_work(matmul_chunk, &job, (N + N_CHUNK - 1) / N_CHUNK, nthreads);
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

/* One new query token per sequence, attending over its cached keys where they lie in the pool:
 * reads each key and value once through the block table, copying nothing.
 * q, out (B, H, hd); keys, values (num_slots, KV, hd) of one layer; block_table (B, max_blocks);
 * seq_lens (B): keys each sequence sees (its new one included). The H / KV query heads that share
 * a KV head are done together, so each K/V row is loaded once for all of them. */
typedef struct {
    const float *q;
    const void *keys, *values;  /* float32, or bfloat16 as uint16 where kv_bf16 */
    const int32_t *block_table, *seq_lens;
    int max_blocks, H, KV, hd, block_size;
    float scale;
    float *out;
    int kv_bf16;
    int B;  /* rows */
    uint64_t call;  /* this call's id (`attention_calls`): what a thread's widened copy belongs to */
    int per_seq;  /* `attend_fast`'s items: 1, a sequence each; 0, a (sequence, KV head) each */
} attention_job;

static __thread float *scores_buf = NULL;  /* per thread, grown as contexts grow */
static __thread size_t scores_cap = 0;

/* A bfloat16 is the top half of a float32: it widens exactly with a 16-bit shift, so a bf16 pool
 * halves the bytes attention reads while every product and sum stays float32. */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* float32 → bfloat16 rounded to nearest, ties to even, NaN → 0x7FC0: torch's
 * `round_to_nearest_even`, so a pool written here holds what `.to(torch.bfloat16)` would store. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* n bf16 → n float32: the 16-bit shift, 16 (AVX-512) or 8 (AVX2) at a time */
static inline void widen_bf16(const uint16_t *src, float *dst, int n) {
    int i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(src + i));
        _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
#endif
#if defined(__AVX2__)
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(src + i));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
#endif
    for (; i < n; i++) dst[i] = bf16_to_f32(src[i]);
}

/* n floats into a pool at element `at`, as float32 or rounded to bf16 */
static void store_kv(void *pool, int64_t at, const float *x, int n, int bf16) {
    if (!bf16) {
        memcpy((float *)pool + at, x, (size_t)n * sizeof(float));
        return;
    }
    uint16_t *dst = (uint16_t *)pool + at;
    for (int i = 0; i < n; i++) dst[i] = f32_to_bf16(x[i]);
}

#if defined(__AVX2__)
/* e^x for 8 floats: x = n ln 2 + r, e^r by a degree-6 polynomial on |r| <= ln 2 / 2 (Cephes'
 * coefficients), 2^n by the exponent bits; about 2 ulp, and ~10x cheaper than 8 calls to expf. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

/* s[0..n) ← softmax(s): exp(s - max), normalised */
static void softmax_inplace(float *s, int n) {
    float mx = -INFINITY, sum = 0.0f;
    int t = 0;
#if defined(__AVX2__)
    __m256 vm = _mm256_set1_ps(-INFINITY);
    for (; t + 8 <= n; t += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + t));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
#endif
    for (; t < n; t++) mx = s[t] > mx ? s[t] : mx;
    t = 0;
#if defined(__AVX2__)
    __m256 vmx = _mm256_set1_ps(mx), vsum = _mm256_setzero_ps();
    for (; t + 8 <= n; t += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), vmx));
        _mm256_storeu_ps(s + t, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    sum = hsum8(vsum);
#endif
    for (; t < n; t++) {
        s[t] = expf(s[t] - mx);
        sum += s[t];
    }
    float inv = 1.0f / sum;
    for (t = 0; t < n; t++) s[t] *= inv;
}

/* Ask for the `bs` rows of one KV head in a block (`row_bytes` each, `stride_bytes` apart) to be
 * brought into cache while the current block is worked on: the pool's blocks lie anywhere, so the
 * hardware prefetcher cannot guess the next one (~15 % of a batch-32 step's attention). Into L2:
 * into L1 they stalled on its miss buffers (Zen 4, 2 threads, batch 32 x 288 tokens, 30 layers on
 * this path: bf16 29 -> 20 ms, float32 39 -> 25 ms). */
static inline void prefetch_rows(const void *first, int bs, int64_t row_bytes, int64_t stride_bytes) {
#if defined(__AVX2__)
    for (int p = 0; p < bs; p++)
        for (int64_t c = 0; c < row_bytes; c += 64)
            _mm_prefetch((const char *)first + p * stride_bytes + c, _MM_HINT_T1);
#else
    (void)first, (void)bs, (void)row_bytes, (void)stride_bytes;
#endif
}

/* The `group` query heads qb (group, hd) that share one KV head, over its first `len` keys: block
 * k of the sequence starts at keys + table[k] · bs · ks + off (ks floats from one slot to the
 * next), values alike. Every score of the group first (each key loaded once for all of them), a
 * softmax per head, then each head's output summed over the values 64 dimensions at a time in
 * registers; the next block's keys (or values) are prefetched while one block is computed on. */
static void attend_group(const float *qb, int group, int hd, int len, int bs, const int32_t *table,
                         const float *keys, const float *values, int64_t ks, int64_t off, float scale, float *scores,
                         float *out) {
    for (int t0 = 0; t0 < len; t0 += bs) {  /* block by block: the block's keys are consecutive slots */
        const float *kb = keys + (int64_t)table[t0 / bs] * bs * ks + off;
        int n = len - t0 < bs ? len - t0 : bs, u = 0;
        if (t0 + bs < len) prefetch_rows(keys + (int64_t)table[t0 / bs + 1] * bs * ks + off, bs, hd * 4, ks * 4);
#if defined(__AVX2__)
        if (hd % 8 == 0)
            for (; u + 4 <= n; u += 4)  /* four keys at once: four independent FMA chains */
                for (int j = 0; j < group; j++) {
                    const float *qj = qb + (int64_t)j * hd, *k0 = kb + u * ks;
                    __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
                    for (int i = 0; i < hd; i += 8) {
                        __m256 qv = _mm256_loadu_ps(qj + i);
                        c0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + i), c0);
                        c1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + ks + i), c1);
                        c2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 2 * ks + i), c2);
                        c3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 3 * ks + i), c3);
                    }
                    float *sj = scores + (int64_t)j * len + t0 + u;
                    sj[0] = hsum8(c0) * scale, sj[1] = hsum8(c1) * scale;
                    sj[2] = hsum8(c2) * scale, sj[3] = hsum8(c3) * scale;
                }
#endif
        for (; u < n; u++)
            for (int j = 0; j < group; j++)
                scores[(int64_t)j * len + t0 + u] = dot_f32(qb + (int64_t)j * hd, kb + u * ks, hd) * scale;
    }
    for (int j = 0; j < group; j++) {
        const float *s = scores + (int64_t)j * len;
        softmax_inplace(scores + (int64_t)j * len, len);
        float *o = out + (int64_t)j * hd;
        int i0 = 0;
#if defined(__AVX2__)
        for (; i0 + 64 <= hd; i0 += 64) {
            __m256 acc[8];
            for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
            for (int t0 = 0; t0 < len; t0 += bs) {
                const float *vb = values + (int64_t)table[t0 / bs] * bs * ks + off + i0;
                int n = len - t0 < bs ? len - t0 : bs;
                if (j == 0 && i0 == 0 && t0 + bs < len)
                    prefetch_rows(values + (int64_t)table[t0 / bs + 1] * bs * ks + off, bs, hd * 4, ks * 4);
                for (int u = 0; u < n; u++) {
                    const float *vr = vb + (int64_t)u * ks;
                    __m256 st = _mm256_set1_ps(s[t0 + u]);
                    for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(st, _mm256_loadu_ps(vr + 8 * i), acc[i]);
                }
            }
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(o + i0 + 8 * i, acc[i]);
        }
#endif
        for (int i = i0; i < hd; i++) o[i] = 0.0f;
        if (i0 < hd)
            for (int t = 0; t < len; t++) {
                const float *vr = values + (int64_t)table[t / bs] * bs * ks + off + (int64_t)(t % bs) * ks;
                for (int i = i0; i < hd; i++) o[i] += s[t] * vr[i];
            }
    }
}

/* Per thread: one KV head's keys and values of one sequence, widened to float32, with what they
 * are (the call, the head, the sequence's blocks) so the next row of the same sequence widens only
 * its new tokens: a prompt's rows share their prefix, and widening it for each row made a 512-token
 * prompt's attention quadratic in copies. */
static __thread float *widened_k = NULL, *widened_v = NULL;
static __thread size_t widened_cap = 0;  /* floats each holds */
static __thread int32_t *widened_table = NULL;  /* the blocks widened from, in order */
static __thread size_t widened_table_cap = 0;
static __thread int32_t *identity_buf = NULL;  /* 0, 1, 2, …: the block table of the widened copy */
static __thread size_t identity_cap = 0;
static __thread uint64_t widened_call = 0;  /* the call (and layer) they belong to; 0: none */
static __thread int widened_kvh = -1, widened_len = 0;
static _Atomic uint64_t attention_calls = 0;  /* one id per call into the paged attention, per layer */

static void *grow(void *p, size_t bytes) {
    void *grown = realloc(p, bytes);
    if (!grown) abort();  /* tens of KB per 1k keys; out of memory here is not recoverable */
    return grown;
}

/* Sequence b, KV head kvh, with the query heads that share it (items are head-major for a bf16
 * pool, so a thread's next item is likely the next row of the same sequence). A float32 pool is
 * read in place through the block table. A bf16 pool is first widened, this head's keys and values
 * of the sequence, into a per-thread float32 copy (len × hd each: 74 KB at 290 tokens, in L2), once
 * per element; the float32 code then reads that copy. Widening inside the score and value loops
 * instead repeated the conversion for each of the group's query heads, and at 1 thread took 95 ms
 * where the float32 pool took 74 (Zen 4, batch 32, 290 tokens, 30 layers). */
static void attention_row(const attention_job *a, int b, int kvh) {
    int KV = a->KV, hd = a->hd, H = a->H, group = H / KV, bs = a->block_size, len = a->seq_lens[b];
    size_t need = (size_t)group * (len > 0 ? len : 1);
    if (need > scores_cap) scores_buf = (float *)grow(scores_buf, need * sizeof(float)), scores_cap = need;
    const int32_t *table = a->block_table + (int64_t)b * a->max_blocks;
    const float *qb = a->q + ((int64_t)b * H + (int64_t)kvh * group) * hd;
    float *out = a->out + ((int64_t)b * H + (int64_t)kvh * group) * hd;
    const int64_t ks = (int64_t)KV * hd;  /* elements from one slot's key to the next */
    if (!a->kv_bf16) {
        attend_group(qb, group, hd, len, bs, table, (const float *)a->keys, (const float *)a->values, ks,
                     (int64_t)kvh * hd, a->scale, scores_buf, out);
        return;
    }
    int nblocks = (len + bs - 1) / bs;
    size_t floats = (size_t)nblocks * bs * hd;
    if (floats > widened_cap) {
        widened_k = (float *)grow(widened_k, floats * sizeof(float));
        widened_v = (float *)grow(widened_v, floats * sizeof(float));
        widened_cap = floats;
    }
    if ((size_t)nblocks > identity_cap) {
        identity_buf = (int32_t *)grow(identity_buf, (size_t)nblocks * sizeof(int32_t));
        for (int k = (int)identity_cap; k < nblocks; k++) identity_buf[k] = k;
        identity_cap = (size_t)nblocks;
    }
    if ((size_t)nblocks > widened_table_cap) {
        widened_table = (int32_t *)grow(widened_table, (size_t)nblocks * sizeof(int32_t));
        widened_table_cap = (size_t)nblocks;
    }
    /* tokens already widened: the same call, head and blocks (a longer row of the same sequence) */
    int from = 0;
    if (widened_call == a->call && widened_kvh == kvh && widened_len <= len) {
        int shared = (widened_len + bs - 1) / bs;
        if (memcmp(widened_table, table, (size_t)shared * sizeof(int32_t)) == 0) from = widened_len;
    }
    const uint16_t *keys = (const uint16_t *)a->keys, *values = (const uint16_t *)a->values;
    for (int t = from; t < len;) {
        int64_t first = ((int64_t)table[t / bs] * bs * KV + kvh) * hd;
        int u0 = t % bs, n = len - t < bs - u0 ? len - t : bs - u0;
        if (t / bs + 1 < nblocks) {
            int64_t next = ((int64_t)table[t / bs + 1] * bs * KV + kvh) * hd;
            prefetch_rows(keys + next, bs, hd * 2, ks * 2);
            prefetch_rows(values + next, bs, hd * 2, ks * 2);
        }
        for (int u = u0; u < u0 + n; u++) {
            widen_bf16(keys + first + u * ks, widened_k + (int64_t)(t - u0 + u) * hd, hd);
            widen_bf16(values + first + u * ks, widened_v + (int64_t)(t - u0 + u) * hd, hd);
        }
        t += n;
    }
    memcpy(widened_table, table, (size_t)nblocks * sizeof(int32_t));
    widened_call = a->call, widened_kvh = kvh, widened_len = len;
    attend_group(qb, group, hd, len, bs, identity_buf, widened_k, widened_v, hd, 0, a->scale, scores_buf, out);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* --- decode attention at memory speed (AVX-512, head dim 64) ----------------------------------
 *
 * A decode step's attention reads every cached key and value of every sequence once: at batch 32
 * and 288 tokens, 212 MB of bf16 a step, which DRAM streams at ~30 GB/s on 2 threads here. Row by
 * row above took 30.6 ms for it (Zen 4, 2 threads, one pool, blocks in random order; 14.5 here):
 * each item took one KV head, so a slot's 384 bytes (3 heads) were fetched in three passes far
 * apart, and the bf16 copy cost a second pass through L2. Here one item is a sequence (all its
 * KV heads; one head per item where there are too few sequences to share), read block by block, every head of a slot together; 16 keys at a time are widened once
 * into L1 and every query head of their KV head works on them there. A bf16 row of 64 loads as two
 * vectors whose even elements widen with a shift and odd ones with a mask, so q is split the same
 * way and the values' sums come out split, joined once at the end. The scores of 16 keys are
 * reduced together (`sum16`), not one horizontal sum per key. Values are summed in key order, one
 * FMA per key and element as before. */
#define FAST_HD 64
#define FAST_KEYS 16
#define FAST_MAX_Q 32  /* query heads an item may hold */

/* lane i = the sum of v[i]'s 16 lanes. Four rounds of shuffles and adds; the rounds leave lane
 * 4r + k holding input (r + 4k), so the inputs go in transposed. */
static inline __m512 sum16(const __m512 v[16]) {
    __m512 w[8], x[4], y[2];
    for (int i = 0; i < 8; i++) {
        const int s0 = 2 * i, s1 = 2 * i + 1;
        const __m512 a = v[4 * (s0 % 4) + s0 / 4], b = v[4 * (s1 % 4) + s1 / 4];
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    }
    for (int i = 0; i < 4; i++)
        x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++)
        y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
}

/* A row of 64 keys or values as 4 vectors: float32 as it lies; bf16 as (even 0..30, odd 1..31,
 * even 32..62, odd 33..63), each element exact. */
static inline void load_row64(const void *row, int bf16, __m512 r[4]) {
    if (!bf16) {
        const float *f = (const float *)row;
        for (int i = 0; i < 4; i++) r[i] = _mm512_loadu_ps(f + 16 * i);
        return;
    }
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int i = 0; i < 2; i++) {
        const __m512i v = _mm512_loadu_si512((const uint8_t *)row + 64 * i);
        r[2 * i] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        r[2 * i + 1] = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
    }
}

/* Ask L2 for slots [from, to) of a sequence (clipped to len), `bytes` of each from `base` + its
 * slot's offset. To L2, not L1: prefetches into L1 stalled on its few miss buffers (Zen 4, batch
 * 32 at 288 tokens: 23 ms a step's attention with them, 14 with these). */
static inline void prefetch_slots(const uint8_t *base, const int32_t *table, int bs, int64_t slot_bytes, int from,
                                  int to, int len, int64_t bytes) {
    for (int t = from; t < to && t < len; t++) {
        const uint8_t *p = base + ((int64_t)table[t / bs] * bs + t % bs) * slot_bytes;
        for (int64_t c = 0; c < bytes; c += 64) _mm_prefetch((const char *)p + c, _MM_HINT_T1);
    }
}

/* The slots of keys t0 .. t0 + n - 1 of a sequence (at[u]: key t0 + u's slot from `base`), and L2
 * asked for `bytes` of each slot 2 chunks on. */
static inline void chunk_slots(const uint8_t *base, const int32_t *table, int bs, int64_t slot_bytes, int t0, int n,
                               int len, int64_t bytes, const uint8_t *at[FAST_KEYS]) {
    for (int u = 0; u < n; u++) at[u] = base + ((int64_t)table[(t0 + u) / bs] * bs + (t0 + u) % bs) * slot_bytes;
    prefetch_slots(base, table, bs, slot_bytes, t0 + 2 * FAST_KEYS, t0 + 3 * FAST_KEYS, len, bytes);
}

/* Sequence b's rows of KV heads [kv0, kv1) with the query heads that share them. */
static void attend_fast(const attention_job *a, int b, int kv0, int kv1) {
    const int KV = a->KV, H = a->H, group = H / KV, bs = a->block_size, len = a->seq_lens[b];
    const int bf16 = a->kv_bf16, esz = bf16 ? 2 : 4, nkv = kv1 - kv0;
    const int64_t slot_bytes = (int64_t)KV * FAST_HD * esz, head_bytes = (int64_t)FAST_HD * esz;
    const int ld = (len + FAST_KEYS - 1) / FAST_KEYS * FAST_KEYS;  /* scores per query head */
    const size_t need = (size_t)nkv * group * (ld > 0 ? ld : FAST_KEYS);
    if (need > scores_cap) scores_buf = (float *)grow(scores_buf, need * sizeof(float)), scores_cap = need;
    const int32_t *table = a->block_table + (int64_t)b * a->max_blocks;
    const uint8_t *keys = (const uint8_t *)a->keys + kv0 * head_bytes, *values = (const uint8_t *)a->values + kv0 * head_bytes;
    const int hq0 = kv0 * group, nq = nkv * group;  /* the query heads, from hq0 */
    const float *q = a->q + ((int64_t)b * H + hq0) * FAST_HD;
    float *out = a->out + ((int64_t)b * H + hq0) * FAST_HD;
    /* q split as the rows are (bf16: even and odd elements) */
    __m512 qs[FAST_MAX_Q][4];
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int h = 0; h < nq; h++)
        for (int i = 0; i < 2; i++) {
            const __m512 lo = _mm512_loadu_ps(q + h * FAST_HD + 32 * i), hi = _mm512_loadu_ps(q + h * FAST_HD + 32 * i + 16);
            qs[h][2 * i] = bf16 ? _mm512_permutex2var_ps(lo, even, hi) : lo;
            qs[h][2 * i + 1] = bf16 ? _mm512_permutex2var_ps(lo, odd, hi) : hi;
        }
    __m512 rows[FAST_KEYS][4], part[FAST_KEYS];
    const __m512 scale = _mm512_set1_ps(a->scale);
    prefetch_slots(keys, table, bs, slot_bytes, 0, 2 * FAST_KEYS, len, nkv * head_bytes);
    for (int t0 = 0; t0 < len; t0 += FAST_KEYS) {
        const int n = len - t0 < FAST_KEYS ? len - t0 : FAST_KEYS;
        const uint8_t *at[FAST_KEYS];  /* every head of the slots 2 chunks on asked for */
        chunk_slots(keys, table, bs, slot_bytes, t0, n, len, nkv * head_bytes, at);
        for (int k = 0; k < nkv; k++) {
            for (int u = 0; u < n; u++) load_row64(at[u] + k * head_bytes, bf16, rows[u]);
            for (int j = 0; j < group; j++) {
                const __m512 *qj = qs[k * group + j];
                for (int u = 0; u < FAST_KEYS; u++) {
                    if (u >= n) {
                        part[u] = _mm512_setzero_ps();
                        continue;
                    }
                    __m512 s = _mm512_mul_ps(qj[0], rows[u][0]);
                    s = _mm512_fmadd_ps(qj[1], rows[u][1], s);
                    s = _mm512_fmadd_ps(qj[2], rows[u][2], s);
                    part[u] = _mm512_fmadd_ps(qj[3], rows[u][3], s);
                }
                _mm512_storeu_ps(scores_buf + (int64_t)(k * group + j) * ld + t0, _mm512_mul_ps(sum16(part), scale));
            }
        }
    }
    prefetch_slots(values, table, bs, slot_bytes, 0, 2 * FAST_KEYS, len, nkv * head_bytes);
    for (int h = 0; h < nq; h++) softmax_inplace(scores_buf + (int64_t)h * ld, len);
    __m512 acc[FAST_MAX_Q][4];
    for (int h = 0; h < nq; h++)
        for (int i = 0; i < 4; i++) acc[h][i] = _mm512_setzero_ps();
    for (int t0 = 0; t0 < len; t0 += FAST_KEYS) {
        const int n = len - t0 < FAST_KEYS ? len - t0 : FAST_KEYS;
        const uint8_t *at[FAST_KEYS];
        chunk_slots(values, table, bs, slot_bytes, t0, n, len, nkv * head_bytes, at);
        for (int k = 0; k < nkv; k++) {
            for (int u = 0; u < n; u++) load_row64(at[u] + k * head_bytes, bf16, rows[u]);
            for (int j = 0; j < group; j++) {  /* in registers for the chunk: 4 sums, in key order */
                const int h = k * group + j;
                const float *s = scores_buf + (int64_t)h * ld + t0;
                __m512 o0 = acc[h][0], o1 = acc[h][1], o2 = acc[h][2], o3 = acc[h][3];
                for (int u = 0; u < n; u++) {
                    const __m512 w = _mm512_set1_ps(s[u]);
                    o0 = _mm512_fmadd_ps(w, rows[u][0], o0), o1 = _mm512_fmadd_ps(w, rows[u][1], o1);
                    o2 = _mm512_fmadd_ps(w, rows[u][2], o2), o3 = _mm512_fmadd_ps(w, rows[u][3], o3);
                }
                acc[h][0] = o0, acc[h][1] = o1, acc[h][2] = o2, acc[h][3] = o3;
            }
        }
    }
    const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi_idx = _mm512_add_epi32(lo_idx, _mm512_set1_epi32(8));
    for (int h = 0; h < nq; h++)
        for (int i = 0; i < 2; i++) {
            __m512 e = acc[h][2 * i], o = acc[h][2 * i + 1];
            _mm512_storeu_ps(out + h * FAST_HD + 32 * i, bf16 ? _mm512_permutex2var_ps(e, lo_idx, o) : e);
            _mm512_storeu_ps(out + h * FAST_HD + 32 * i + 16, bf16 ? _mm512_permutex2var_ps(e, hi_idx, o) : o);
        }
}

static inline int fast_attention(const attention_job *a) {
    return a->hd == FAST_HD && a->KV > 0 && a->H % a->KV == 0 && a->H <= FAST_MAX_Q;
}
#else
static inline int fast_attention(const attention_job *a) { (void)a; return 0; }
#endif

/* Row b's attention over KV head kvh, by whichever path this build and shape have. */
static void attention_one(const attention_job *a, int b, int kvh) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (fast_attention(a)) {
        attend_fast(a, b, kvh, kvh + 1);
        return;
    }
#endif
    attention_row(a, b, kvh);
}

/* The items a step's rows split into (and how, in a->per_seq): whole sequences where there are
 * enough of them to share between the threads, else one KV head of one row each. */
static int attention_items(attention_job *a, int nthreads) {
    a->per_seq = fast_attention(a) && a->B >= 4 * lease_threads(nthreads);
    return a->per_seq ? a->B : a->B * a->KV;
}

static void attention_item(void *arg, int item) {
    const attention_job *a = (const attention_job *)arg;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (a->per_seq) {
        attend_fast(a, item, 0, a->KV);
        return;
    }
#endif
    attention_one(a, a->kv_bf16 ? item % a->B : item / a->KV, a->kv_bf16 ? item / a->B : item % a->KV);
}

static int prompt_tiles_attention(const attention_job *a, int nthreads);

/* One new query token per sequence, attending over its cached keys where they lie in the pool:
 * reads each key and value once through the block table, copying nothing.
 * q, out (B, H, hd) float32; keys, values (num_slots, KV, hd) of one layer, float32 or (kv_bf16)
 * bfloat16; block_table (B, max_blocks); seq_lens (B): keys each sequence sees (its new one
 * included). The H / KV query heads that share a KV head are done together, so each K/V row is
 * loaded once for all of them. */
int dq_decode_attention(const float *q, const void *keys, const void *values, const int32_t *block_table,
                        int max_blocks, const int32_t *seq_lens, int B, int H, int KV, int hd, int block_size,
                        float scale, float *out, int nthreads, int kv_bf16) {
    attention_job job = {q, keys, values, block_table, seq_lens, max_blocks, H, KV, hd, block_size, scale, out,
                         kv_bf16, B, atomic_fetch_add(&attention_calls, 1) + 1};
    if (prompt_tiles_attention(&job, nthreads) == 0) return 0;
    parallel_work(attention_item, &job, attention_items(&job, nthreads), nthreads);
    return 0;
}

/* --- a whole decode step of a quantized Llama model in one call ------------------------------
 *
 * Batch-1 decode in eager torch spends most of its step outside the matmuls: some twenty small
 * ops per layer, each a dispatch and an allocation. Here one call runs every layer of a step of B
 * decoding sequences (one new token each): RMSNorm, the fused QKV matmul (+ bias), rotate-half RoPE
 * from the caller's cos/sin tables, K/V written into their pool slots, paged attention, the output
 * projection, the residual, RMSNorm, fused gate/up, SiLU·up, down, the residual; then the final
 * norm and the head. Matmuls take int16-rounded activations (`quantize_row16`) and are split
 * between threads by groups of output rows; the element-wise work is the caller's (D is small), and
 * the scratch lives with the model, so a step allocates nothing once warm.
 *
 * The model does not own its weights: every pointer is into tensors the Python side keeps alive. */

/* A weight repacked for the step: output rows in groups of 4 (the last padded with zero rows), and
 * per group, block by block, [d of the 4 rows][m' of the 4 rows][the 4 rows' quants], so a thread
 * reads one sequential stream instead of twelve (4 rows × quants, scales, mins): measured 7.8 GB/s
 * from DRAM with the separate arrays, against 21 for a plain sequential read on 2 threads.
 * int8 quants are stored signed (q - 128), so m' = m + 128 d for them; int4 keeps q and m. */
typedef struct {
    int kind, N, K, nb, groups;
    int64_t block_bytes, group_bytes;
    uint8_t *data;  /* owned: groups × group_bytes, 64-byte aligned; NULL for a float weight */
    const float *bias;  /* may be NULL; the caller's */
    const float *panels;  /* a float32 weight instead: the GEMM's panels (the caller's) */
    uint8_t *pdata;  /* owned: the same quants by panels of 16 columns (`qpanel_matmul`), or NULL */
    int64_t pblock_bytes;  /* one block of one panel in pdata */
} dq_weight;

typedef struct {
    const float *norm_in, *norm_post;
    dq_weight qkv, o, gate_up, down;
} dq_layer;

typedef struct {
    int L, D, H, KV, hd, F, V;
    float eps;
    const float *embed;  /* (V, D) float32: the token lookup */
    const float *norm_final;
    dq_weight head;
    dq_layer *layers;
    int cap;  /* rows the scratch holds */
    float *x, *h, *qkv, *q, *att, *gu, *act, *xd;
    int16_t *xq;
    int32_t *lens;
} dq_model;

void *dq_model_new(int L, int D, int H, int KV, int hd, int F, int V, float eps, const float *embed,
                   const float *norm_final) {
    dq_model *m = (dq_model *)calloc(1, sizeof(dq_model));
    if (!m) return NULL;
    m->layers = (dq_layer *)calloc((size_t)L, sizeof(dq_layer));
    if (!m->layers) {
        free(m);
        return NULL;
    }
    m->L = L, m->D = D, m->H = H, m->KV = KV, m->hd = hd, m->F = F, m->V = V, m->eps = eps;
    m->embed = embed, m->norm_final = norm_final;
    return m;
}

static void free_scratch(dq_model *m) {
    free(m->x), free(m->h), free(m->qkv), free(m->q), free(m->att), free(m->gu), free(m->act);
    free(m->xd), free(m->xq), free(m->lens);
    m->x = m->h = m->qkv = m->q = m->att = m->gu = m->act = m->xd = NULL;
    m->xq = NULL, m->lens = NULL, m->cap = 0;
}

void dq_model_free(void *p) {
    dq_model *m = (dq_model *)p;
    if (!m) return;
    free_scratch(m);
    for (int l = 0; l < m->L; l++) {
        dq_layer *ly = &m->layers[l];
        free(ly->qkv.data), free(ly->o.data), free(ly->gate_up.data), free(ly->down.data);
        free(ly->qkv.pdata), free(ly->o.pdata), free(ly->gate_up.pdata), free(ly->down.pdata);
    }
    free(m->head.data), free(m->head.pdata);
    free(m->layers);
    free(m);
}

/* Weight `which` (0 qkv, 1 o, 2 gate_up, 3 down of `layer`; 4 the head), or NULL when out of range. */
static dq_weight *model_weight(dq_model *m, int layer, int which) {
    if (which < 0 || which > 4 || (which < 4 && (layer < 0 || layer >= m->L))) return NULL;
    return which == 4 ? &m->head : which == 0 ? &m->layers[layer].qkv : which == 1 ? &m->layers[layer].o
         : which == 2 ? &m->layers[layer].gate_up : &m->layers[layer].down;
}

/* Quant e (0..31) of block b of row n in the caller's layout (see the top of this file). */
static inline int quant_at(int kind, const uint8_t *qs, int nb, int n, int b, int e) {
    if (kind == 8) return qs[((int64_t)n * nb + b) * QK + e];
    uint8_t byte = qs[((int64_t)n * nb + b) * (QK / 2) + (e & 15)];
    return e < 16 ? byte & 0x0F : byte >> 4;
}

/* w->pdata: the weight again by panels of 16 output columns (QPANEL_NR), for `qpanel_matmul`. Per
 * panel, block by block: [d of the 16 columns][m' of the 16][32 k of 16 quants each]; an int4 k is
 * 8 bytes (column j in the low nibble of byte j, column j + 8 in its high one), an int8 k 16 signed
 * bytes (q - 128, so m' = m + 128 d as in the groups). Columns past N are zero. */
#define QPANEL_NR 16  /* the GEMM's GEMM_NR: a widened panel is one of its panels */
static int pack_qpanels(dq_weight *w, const uint8_t *qs, const float *d, const float *mins) {
    const int nb = w->nb, panels = (w->N + QPANEL_NR - 1) / QPANEL_NR, qk = w->kind == 4 ? 8 : 16;
    w->pblock_bytes = 2 * QPANEL_NR * 4 + QK * qk;
    size_t bytes = (size_t)panels * nb * w->pblock_bytes;
    if (posix_memalign((void **)&w->pdata, 64, bytes) != 0) {
        w->pdata = NULL;
        return -1;
    }
    memset(w->pdata, 0, bytes);
    for (int p = 0; p < panels; p++)
        for (int b = 0; b < nb; b++) {
            uint8_t *blk = w->pdata + ((int64_t)p * nb + b) * w->pblock_bytes;
            float *pd = (float *)blk, *pm = pd + QPANEL_NR;
            uint8_t *q = blk + 2 * QPANEL_NR * 4;
            for (int j = 0; j < QPANEL_NR && p * QPANEL_NR + j < w->N; j++) {
                int n = p * QPANEL_NR + j;
                pd[j] = d[(int64_t)n * nb + b];
                pm[j] = mins[(int64_t)n * nb + b] + (w->kind == 8 ? 128.0f * pd[j] : 0.0f);
                for (int e = 0; e < QK; e++) {
                    int v = quant_at(w->kind, qs, nb, n, b, e);
                    if (w->kind == 8) q[e * qk + j] = (uint8_t)(v ^ 0x80);
                    else q[e * qk + (j & 7)] |= (uint8_t)(j < 8 ? v : v << 4);
                }
            }
        }
    return 0;
}

/* which: 0 qkv, 1 o, 2 gate_up, 3 down of `layer`; 4 the head (layer ignored). Returns 0 or -1. */
int dq_model_set_weight(void *p, int layer, int which, int kind, int N, int K, const uint8_t *qs, const float *d,
                        const float *mins, const float *bias) {
    dq_model *m = (dq_model *)p;
    if ((kind != 4 && kind != 8) || !model_weight(m, layer, which)) return -1;
    int nb = (K + QK - 1) / QK, qb = kind == 4 ? QK / 2 : QK, groups = (N + 3) / 4;
    int64_t block_bytes = 32 + 4 * (int64_t)qb;
    dq_weight w = {kind, N, K, nb, groups, block_bytes, block_bytes * nb, NULL, bias, NULL, NULL, 0};
    if (posix_memalign((void **)&w.data, 64, (size_t)(w.group_bytes * groups)) != 0) return -1;
    memset(w.data, 0, (size_t)(w.group_bytes * groups));
    if (pack_qpanels(&w, qs, d, mins) != 0) {
        free(w.data);
        return -1;
    }
    for (int n = 0; n < N; n++) {
        int g = n / 4, r = n % 4;
        for (int b = 0; b < nb; b++) {
            uint8_t *blk = w.data + g * w.group_bytes + b * block_bytes;
            float dv = d[(int64_t)n * nb + b], mv = mins[(int64_t)n * nb + b];
            if (kind == 8) mv += 128.0f * dv;
            memcpy(blk + 4 * r, &dv, 4);
            memcpy(blk + 16 + 4 * r, &mv, 4);
            uint8_t *dst = blk + 32 + r * qb;
            memcpy(dst, qs + (int64_t)n * nb * qb + (int64_t)b * qb, (size_t)qb);
            if (kind == 8)
                for (int i = 0; i < qb; i++) dst[i] ^= 0x80;  /* q - 128 as a signed byte */
        }
    }
    dq_weight *slot = model_weight(m, layer, which);
    free(slot->data), free(slot->pdata);
    *slot = w;
    return 0;
}

/* A float32 weight (N, K) given as the GEMM's panels (ceil(N / 16), K, 16), read in place: every
 * step, of any size, multiplies it on the GEMM (float32 models). */
int dq_model_set_float_weight(void *p, int layer, int which, int N, int K, const float *panels, const float *bias) {
    dq_model *m = (dq_model *)p;
    dq_weight *slot = model_weight(m, layer, which);
    if (!slot || !panels || N < 1 || K < 1) return -1;
    free(slot->data), free(slot->pdata);
    dq_weight w = {32, N, K, (K + QK - 1) / QK, (N + 3) / 4, 0, 0, NULL, bias, panels, NULL, 0};
    *slot = w;
    return 0;
}

int dq_model_set_norms(void *p, int layer, const float *norm_in, const float *norm_post) {
    dq_model *m = (dq_model *)p;
    if (layer < 0 || layer >= m->L) return -1;
    m->layers[layer].norm_in = norm_in, m->layers[layer].norm_post = norm_post;
    return 0;
}

static int ensure_scratch(dq_model *m, int B) {
    if (B <= m->cap) return 0;
    free_scratch(m);
    int kmax = m->F > m->D ? m->F : m->D;
    int nbmax = (kmax + QK - 1) / QK;
    int qkv = (m->H + 2 * m->KV) * m->hd;
    m->x = (float *)malloc((size_t)B * m->D * sizeof(float));
    m->h = (float *)malloc((size_t)B * m->D * sizeof(float));
    m->qkv = (float *)malloc((size_t)B * qkv * sizeof(float));
    m->q = (float *)malloc((size_t)B * m->H * m->hd * sizeof(float));
    m->att = (float *)malloc((size_t)B * m->H * m->hd * sizeof(float));
    m->gu = (float *)malloc((size_t)B * 2 * m->F * sizeof(float));
    m->act = (float *)malloc((size_t)B * m->F * sizeof(float));
    m->xd = (float *)malloc((size_t)B * nbmax * 2 * sizeof(float));
    m->xq = (int16_t *)malloc((size_t)B * nbmax * QK * sizeof(int16_t) + 64);
    m->lens = (int32_t *)malloc((size_t)B * sizeof(int32_t));
    if (!m->x || !m->h || !m->qkv || !m->q || !m->att || !m->gu || !m->act || !m->xd || !m->xq || !m->lens) {
        free_scratch(m);
        return -1;
    }
    m->cap = B;
    return 0;
}

/* Activations for the step's matmuls: int16 per block of 32 (absmax / 32767), and each block's exact
 * float sum for the min term. int8 rounding (as llama.cpp's Q8 path) measured too coarse to keep
 * greedy text: a one-step change of a single activation moved layer 29's V by 4 % and free-running
 * greedy agreement with float32 fell to ~50 % over 6 prompts × 64 tokens; int16 costs two `madd`s
 * per block instead of one `maddubs` + `madd`, and is ~256× finer. */
static void quantize_row16(const float *x, int K, int16_t *xq, float *xd, float *xs) {
    int nb = (K + QK - 1) / QK;
    for (int b = 0; b < nb; b++) {
        float buf[QK];
        load_block(x, K, b, buf);
        float amax = 0.0f, sum = 0.0f;
#if defined(__AVX2__)
        __m256 v[4], vmax = _mm256_setzero_ps(), vsum = _mm256_setzero_ps();
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_loadu_ps(buf + 8 * k);
            vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v[k]));
            vsum = _mm256_add_ps(vsum, v[k]);
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        sum = hsum8(vsum);
        __m256 vid = _mm256_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
        for (int k = 0; k < 4; k += 2) {  /* round to nearest, pack to int16; permute undoes the lane split */
            __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], vid)), c = _mm256_cvtps_epi32(_mm256_mul_ps(v[k + 1], vid));
            __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, c), 0xD8);
            _mm256_storeu_si256((__m256i *)(xq + b * QK + 8 * k), packed);
        }
#else
        for (int i = 0; i < QK; i++) {
            amax = fmaxf(amax, fabsf(buf[i]));
            sum += buf[i];
        }
        float id = amax > 0.0f ? 32767.0f / amax : 0.0f;
        for (int i = 0; i < QK; i++) xq[b * QK + i] = (int16_t)lrintf(buf[i] * id);
#endif
        xd[b] = amax / 32767.0f;
        xs[b] = sum;
    }
}

#define PREFETCH_AHEAD 1024  /* bytes of the weight stream requested ahead of the block being read */

#if defined(__AVX2__)
/* The 4 rows of a packed group against mt (1 or 2) activation rows; y[j * ldy + r] for r < rows. */
static inline __attribute__((always_inline)) void group_q(
        const int kind, const uint8_t *g, int nb, int64_t block_bytes, const int16_t *xq, const float *xd,
        const float *xs, const int mt, int rows, float *y, int64_t ldy) {
    __m256 acc[2][4];
    __m128 macc[2];
    for (int j = 0; j < mt; j++) {
        for (int r = 0; r < 4; r++) acc[j][r] = _mm256_setzero_ps();
        macc[j] = _mm_setzero_ps();
    }
    const int qb = kind == 4 ? QK / 2 : QK;
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = g + b * block_bytes;
        _mm_prefetch((const char *)(blk + PREFETCH_AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(blk + PREFETCH_AHEAD + 64), _MM_HINT_T0);
        const float *d4 = (const float *)blk;
        __m128 m4 = _mm_load_ps((const float *)(blk + 16));
        __m256i xlo[2], xhi[2];
        for (int j = 0; j < mt; j++) {
            const int16_t *xb = xq + (int64_t)j * nb * QK + b * QK;
            xlo[j] = _mm256_loadu_si256((const __m256i *)xb);
            xhi[j] = _mm256_loadu_si256((const __m256i *)(xb + 16));
            macc[j] = _mm_fmadd_ps(m4, _mm_set1_ps(xs[j * nb + b]), macc[j]);
        }
        for (int r = 0; r < 4; r++) {
            const uint8_t *w = blk + 32 + r * qb;
            __m256i wlo, whi;  /* elements 0..15 and 16..31 as int16 */
            if (kind == 4) {  /* byte j = element j | element j + 16 << 4, widened to a word first */
                __m256i words = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)w));
                wlo = _mm256_and_si256(words, _mm256_set1_epi16(0x0F));
                whi = _mm256_srli_epi16(words, 4);
            } else {  /* packed signed (q - 128) */
                wlo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w));
                whi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16)));
            }
            __m256 dr = _mm256_broadcast_ss(d4 + r);
            for (int j = 0; j < mt; j++) {
                __m256i p = _mm256_add_epi32(_mm256_madd_epi16(wlo, xlo[j]), _mm256_madd_epi16(whi, xhi[j]));
                acc[j][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dr, _mm256_set1_ps(xd[j * nb + b])),
                                            acc[j][r]);
            }
        }
    }
    for (int j = 0; j < mt; j++) {
        float mins[4];
        _mm_storeu_ps(mins, macc[j]);
        for (int r = 0; r < rows; r++) y[j * ldy + r] = hsum8(acc[j][r]) + mins[r];
    }
}
#else
static void group_q(const int kind, const uint8_t *g, int nb, int64_t block_bytes, const int16_t *xq,
                    const float *xd, const float *xs, const int mt, int rows, float *y, int64_t ldy) {
    const int qb = kind == 4 ? QK / 2 : QK;
    for (int j = 0; j < mt; j++)
        for (int r = 0; r < rows; r++) {
            float acc = 0.0f;
            for (int b = 0; b < nb; b++) {
                const uint8_t *blk = g + b * block_bytes, *w = blk + 32 + r * qb;
                const int16_t *xb = xq + (int64_t)j * nb * QK + b * QK;
                float dv, mv;
                memcpy(&dv, blk + 4 * r, 4);
                memcpy(&mv, blk + 16 + 4 * r, 4);
                int64_t s = 0;
                if (kind == 4)
                    for (int i = 0; i < 16; i++) s += (w[i] & 0x0F) * xb[i] + (w[i] >> 4) * xb[i + 16];
                else
                    for (int i = 0; i < QK; i++) s += (int)(int8_t)w[i] * xb[i];
                acc += (float)s * dv * xd[j * nb + b] + mv * xs[j * nb + b];
            }
            y[j * ldy + r] = acc;
        }
}
#endif

typedef struct {
    const dq_weight *w;
    int M;
    const int16_t *xq;  /* int16 rows, scales and sums */
    const float *xd, *xs;
    float *y;
} packed_job;

#define GROUP_CHUNK 4  /* groups of 4 rows per work item */

/* Groups [4c, 4c + 4) against every activation row, two at a time: each group's blocks come from
 * memory once and from L1 for the rest of the batch. */
static void packed_chunk(void *arg, int c) {
    const packed_job *pj = (const packed_job *)arg;
    const dq_weight *w = pj->w;
    int nb = w->nb, g1 = (c + 1) * GROUP_CHUNK < w->groups ? (c + 1) * GROUP_CHUNK : w->groups;
    for (int g = c * GROUP_CHUNK; g < g1; g++) {
        const uint8_t *gp = w->data + g * w->group_bytes;
        int rows = w->N - 4 * g < 4 ? w->N - 4 * g : 4;
        for (int m0 = 0; m0 < pj->M; m0 += 2) {
            const int16_t *xt = pj->xq + (int64_t)m0 * nb * QK;
            const float *dt = pj->xd + (int64_t)m0 * nb, *st = pj->xs + (int64_t)m0 * nb;
            float *yt = pj->y + (int64_t)m0 * w->N + 4 * g;
            if (w->kind == 4) {
                if (pj->M - m0 >= 2) group_q(4, gp, nb, w->block_bytes, xt, dt, st, 2, rows, yt, w->N);
                else group_q(4, gp, nb, w->block_bytes, xt, dt, st, 1, rows, yt, w->N);
            } else {
                if (pj->M - m0 >= 2) group_q(8, gp, nb, w->block_bytes, xt, dt, st, 2, rows, yt, w->N);
                else group_q(8, gp, nb, w->block_bytes, xt, dt, st, 1, rows, yt, w->N);
            }
        }
    }
}

int dq_gemm_f32(const float *x, int64_t ldx, int M, int K, const float *wp, int N, const float *bias, float *y,
                int64_t ldy, int nthreads);

static void qpanel_matmul(const dq_weight *w, const float *x, int M, float *y, int nthreads);
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
static int q16_matmul(const dq_weight *w, const float *x, int M, float *y, int nthreads);
#endif

/* y (M, N) = x (M, K) · Wᵀ (+ bias). A few rows are bandwidth-bound: integer dot products of the
 * 4-row groups on int16-rounded activations. From QPANEL_MIN_ROWS rows the step is compute-bound:
 * each quantized panel is widened to float once (the exact weight values) and the GEMM's 6 × 16
 * tiles run every row against it, with no rounding of the activations. Measured on Zen 4 (AVX-512,
 * 2 threads, tok/s of whole decode steps): batch 4 284 on the groups against 173 on the panels,
 * batch 5 253 on the panels; batch 32 461 against 286 for the 4 × 3 float tiles this replaced
 * (each group widened, then 12 dot products with horizontal sums) and 414 for float32 weights. */
#define QPANEL_MIN_ROWS 5

static void step_matmul(dq_model *m, const float *x, int M, const dq_weight *w, float *y, int nthreads) {
    if (w->panels) {  /* a float32 weight: the GEMM, bias included */
        dq_gemm_f32(x, w->K, M, w->K, w->panels, w->N, w->bias, y, w->N, nthreads);
        return;
    }
    if (w->pdata && M >= QPANEL_MIN_ROWS) {  /* bias included */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
        if (q16_matmul(w, x, M, y, nthreads) == 0) return;
#endif
        qpanel_matmul(w, x, M, y, nthreads);
        return;
    }
    int nb = w->nb;
    for (int r = 0; r < M; r++)
        quantize_row16(x + (int64_t)r * w->K, w->K, m->xq + (int64_t)r * nb * QK, m->xd + (int64_t)r * nb,
                       m->xd + (size_t)M * nb + (int64_t)r * nb);
    packed_job job = {w, M, m->xq, m->xd, m->xd + (size_t)M * nb, y};
    parallel_work(packed_chunk, &job, (w->groups + GROUP_CHUNK - 1) / GROUP_CHUNK, nthreads);
    if (w->bias)
        for (int r = 0; r < M; r++)
            for (int n = 0; n < w->N; n++) y[(int64_t)r * w->N + n] += w->bias[n];
}

/* out = weight · x / sqrt(mean(x²) + eps), one row of D */
static void rms_norm(const float *x, const float *weight, int D, float eps, float *out) {
    float ss = dot_f32(x, x, D);
    float inv = 1.0f / sqrtf(ss / (float)D + eps);
    for (int i = 0; i < D; i++) out[i] = weight[i] * (x[i] * inv);
}

/* rotate-half RoPE of `heads` heads of hd in place: x[i] ← x[i]·cos[i] − x[i+hd/2]·sin[i], and
 * x[i+hd/2] ← x[i+hd/2]·cos[i+hd/2] + x[i]·sin[i+hd/2]; cos/sin one position's row of hd */
static void rope(float *x, int heads, int hd, const float *cos, const float *sin) {
    int half = hd / 2;
    for (int h = 0; h < heads; h++) {
        float *v = x + (int64_t)h * hd;
        for (int i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

/* a[i] = silu(g[i]) · u[i] = g / (1 + e^-g) · u, with u = g + F (the fused gate/up row); vectorized,
 * as at batch 32 the scalar expf of 30 × 32 × 1536 gates cost ~20 ms a step on one thread. */
static void silu_mul(const float *g, int F, float *a) {
    const float *u = g + F;
    int i = 0;
#if defined(__AVX2__)
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (; i + 8 <= F; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        __m256 e = exp256(_mm256_sub_ps(zero, gv));
        _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < F; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* --- the element-wise parts of a step of many rows, for the layer-by-layer path ------------------
 *
 * A prompt step runs layer by layer in Python (its K/V streams out per layer), and there torch's
 * ops for RMSNorm, RoPE and SiLU·up took 230 ms of a 2,048-row step's 1.8 s (Zen 4, 2 threads):
 * a dozen passes over the activations, each allocating. These are the fused step's own, one pass
 * each, rows split between threads. */
typedef struct {
    const float *x;
    float *out;
    const float *w, *cos, *sin;
    const int32_t *positions;
    int64_t ldx, ldo;
    int M, D, heads, hd, rows_per_item;
    float eps;
} rows_job;

/* the end of item c's rows */
static inline int rows_end(const rows_job *j, int c) {
    return (c + 1) * j->rows_per_item < j->M ? (c + 1) * j->rows_per_item : j->M;
}

static void norm_item(void *arg, int c) {
    const rows_job *j = (const rows_job *)arg;
    for (int r = c * j->rows_per_item, r1 = rows_end(j, c); r < r1; r++) rms_norm(j->x + r * j->ldx, j->w, j->D, j->eps, j->out + r * j->ldo);
}

static void rope_item(void *arg, int c) {
    const rows_job *j = (const rows_job *)arg;
    for (int r = c * j->rows_per_item, r1 = rows_end(j, c); r < r1; r++) {
        const int64_t at = (int64_t)j->positions[r] * j->hd;
        rope(j->out + r * j->ldo, j->heads, j->hd, j->cos + at, j->sin + at);
    }
}

static void silu_item(void *arg, int c) {
    const rows_job *j = (const rows_job *)arg;
    for (int r = c * j->rows_per_item, r1 = rows_end(j, c); r < r1; r++) silu_mul(j->x + r * j->ldx, j->D, j->out + r * j->ldo);
}

#define ROWS_PER_ITEM 16

/* out (M, D), row stride ldo = RMSNorm of x (M, D), row stride ldx, by weight (D) */
void dq_rms_norm_rows(const float *x, int64_t ldx, int M, int D, const float *weight, float eps, float *out,
                      int64_t ldo, int nthreads) {
    rows_job j = {.x = x, .out = out, .w = weight, .ldx = ldx, .ldo = ldo, .M = M, .D = D,
                  .rows_per_item = ROWS_PER_ITEM, .eps = eps};
    parallel_work(norm_item, &j, (M + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM, nthreads);
}

/* Rotate-half RoPE in place of the first `heads` heads (hd each) of M rows, row stride ldx; row r at
 * positions[r] of the (positions, hd) cos/sin tables. */
void dq_rope_rows(float *x, int64_t ldx, int M, int heads, int hd, const int32_t *positions, const float *cos_table,
                  const float *sin_table, int nthreads) {
    rows_job j = {.out = x, .cos = cos_table, .sin = sin_table, .positions = positions, .ldo = ldx, .M = M,
                  .heads = heads, .hd = hd, .rows_per_item = ROWS_PER_ITEM};
    parallel_work(rope_item, &j, (M + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM, nthreads);
}

/* out (M, F) = silu(gate) · up of gu (M, 2F): each row gate then up */
void dq_silu_mul_rows(const float *gu, int M, int F, float *out, int nthreads) {
    rows_job j = {.x = gu, .out = out, .ldx = 2 * (int64_t)F, .ldo = F, .M = M, .D = F, .rows_per_item = ROWS_PER_ITEM};
    parallel_work(silu_item, &j, (M + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM, nthreads);
}

/* B sequences, one new token each: tokens, positions (B); block_table (B, max_blocks) of block ids;
 * keys/values: the pool, (L, slots, KV, hd) float32, or bfloat16 where kv_bf16 (the new K/V rounded
 * to nearest even, as torch rounds), `layer_stride` elements per layer; cos/sin
 * (positions, hd) tables covering every position given. Writes logits (B, V), and the final hidden
 * states (B, D) when `hidden` is not NULL. Returns 0, -1 when scratch could not be allocated, -2
 * for a token id out of range, -3 for a position past its block table. */
int dq_decode_step(void *p, int B, const int32_t *tokens, const int32_t *positions, const int32_t *block_table,
                   int max_blocks, int block_size, void *keys, void *values, int64_t layer_stride, int kv_bf16,
                   const float *cos_table, const float *sin_table, int nthreads, float *logits, float *hidden) {
    dq_model *m = (dq_model *)p;
    if (ensure_scratch(m, B) != 0) return -1;
    const int D = m->D, H = m->H, KV = m->KV, hd = m->hd, F = m->F;
    const int qkv_w = (H + 2 * KV) * hd;
    for (int b = 0; b < B; b++) {
        if (tokens[b] < 0 || tokens[b] >= m->V) return -2;
        if (positions[b] < 0 || positions[b] / block_size >= max_blocks) return -3;
        memcpy(m->x + (int64_t)b * D, m->embed + (int64_t)tokens[b] * D, (size_t)D * sizeof(float));
        m->lens[b] = positions[b] + 1;
    }
    in_fused_step = 1;
    for (int l = 0; l < m->L; l++) {
        const dq_layer *ly = &m->layers[l];
        const int64_t layer_bytes = l * layer_stride * (kv_bf16 ? 2 : 4);
        char *lk = (char *)keys + layer_bytes, *lv = (char *)values + layer_bytes;
        for (int b = 0; b < B; b++) rms_norm(m->x + (int64_t)b * D, ly->norm_in, D, m->eps, m->h + (int64_t)b * D);
        step_matmul(m, m->h, B, &ly->qkv, m->qkv, nthreads);
        for (int b = 0; b < B; b++) {
            float *row = m->qkv + (int64_t)b * qkv_w;
            const float *c = cos_table + (int64_t)positions[b] * hd, *s = sin_table + (int64_t)positions[b] * hd;
            rope(row, H + KV, hd, c, s);  /* q heads then k heads: contiguous in the row */
            memcpy(m->q + (int64_t)b * H * hd, row, (size_t)H * hd * sizeof(float));
            int pos = positions[b];
            int64_t slot = (int64_t)block_table[(int64_t)b * max_blocks + pos / block_size] * block_size +
                           pos % block_size;
            store_kv(lk, slot * KV * hd, row + H * hd, KV * hd, kv_bf16);
            store_kv(lv, slot * KV * hd, row + (H + KV) * hd, KV * hd, kv_bf16);
        }
        attention_job aj = {m->q, lk, lv, block_table, m->lens, max_blocks, H, KV, hd, block_size,
                            1.0f / sqrtf((float)hd), m->att, kv_bf16, B, atomic_fetch_add(&attention_calls, 1) + 1};
        parallel_chunks(attention_item, &aj, attention_items(&aj, nthreads), nthreads);
        step_matmul(m, m->att, B, &ly->o, m->h, nthreads);
        for (int64_t i = 0; i < (int64_t)B * D; i++) m->x[i] += m->h[i];
        for (int b = 0; b < B; b++) rms_norm(m->x + (int64_t)b * D, ly->norm_post, D, m->eps, m->h + (int64_t)b * D);
        step_matmul(m, m->h, B, &ly->gate_up, m->gu, nthreads);
        rows_job sj = {.x = m->gu, .out = m->act, .ldx = 2 * (int64_t)F, .ldo = F, .M = B, .D = F, .rows_per_item = 1};
        parallel_chunks(silu_item, &sj, B, B < nthreads ? B : nthreads);
        step_matmul(m, m->act, B, &ly->down, m->h, nthreads);
        for (int64_t i = 0; i < (int64_t)B * D; i++) m->x[i] += m->h[i];
    }
    for (int b = 0; b < B; b++) rms_norm(m->x + (int64_t)b * D, m->norm_final, D, m->eps, m->h + (int64_t)b * D);
    if (hidden) memcpy(hidden, m->h, (size_t)B * D * sizeof(float));
    step_matmul(m, m->h, B, &m->head, logits, nthreads);
    in_fused_step = 0;
    return 0;
}

/* out[r] = the first index of the largest of x[r, 0..n) for each of B rows (what torch.argmax
 * gives; a NaN counts as largest, as there). torch's argmax took ~0.1 ms per 49,152-wide row,
 * 3 ms of a batch-32 step; this reads the row once at memory speed. */
void dq_argmax_rows(const float *x, int B, int64_t n, int64_t ld, int64_t *out) {
    for (int r = 0; r < B; r++) {
        const float *row = x + (int64_t)r * ld;
        int64_t best = 0, i = 0;
        float mx = n > 0 ? row[0] : 0.0f;
        if (n > 0 && isnan(mx)) { out[r] = 0; continue; }
#if defined(__AVX2__)
        __m256 vm = _mm256_set1_ps(mx), nan_seen = _mm256_setzero_ps();
        for (; i + 8 <= n; i += 8) {  /* the max first, then its first index */
            __m256 v = _mm256_loadu_ps(row + i);
            nan_seen = _mm256_or_ps(nan_seen, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            vm = _mm256_max_ps(vm, v);
        }
        int tail_nan = 0;
        for (int64_t t = i; t < n; t++) tail_nan |= isnan(row[t]);
        if (_mm256_movemask_ps(nan_seen) || tail_nan) {  /* rare: the scalar scan below */
            i = 0;
        } else {
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            float vmax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
            for (int64_t t = i; t < n; t++) vmax = row[t] > vmax ? row[t] : vmax;
            int64_t t = 0;
            __m256 target = _mm256_set1_ps(vmax);
            for (; t + 8 <= n; t += 8) {
                int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + t), target, _CMP_EQ_OQ));
                if (mask) break;
            }
            while (row[t] != vmax) t++;
            out[r] = t;
            continue;
        }
#endif
        for (; i < n; i++) {
            float v = row[i];
            if (isnan(v)) { best = i; break; }
            if (v > mx) mx = v, best = i;
        }
        out[r] = best;
    }
}

/* y (M, N) = x (M, K) · Wᵀ with a weight set on the model (the step's own matmul), for tests. */
int dq_model_matmul(void *p, int layer, int which, const float *x, int M, float *y, int nthreads) {
    dq_model *m = (dq_model *)p;
    const dq_weight *w = model_weight(m, layer, which);
    if (!w || (!w->data && !w->panels)) return -1;
    if (w->data && M < QPANEL_MIN_ROWS && ensure_scratch(m, M) != 0) return -1;  /* panels need none */
    step_matmul(m, x, M, w, y, nthreads);
    return 0;
}

/* --- float32 GEMM for prompts ----------------------------------------------------------------
 *
 * y (M, N) = x (M, K) · Wᵀ + bias, for steps of many rows (prefill) on float weights. W is packed
 * once into panels of 16 output columns, wp[p][k][j] = W[16p + j][k] (zero past N), so a tile of
 * 6 rows × 16 columns of y lives in 12 registers and each k costs two panel loads and six
 * broadcasts for twelve FMAs (the outer-product form of BLIS-style kernels), with no horizontal sums
 * and x read in place. Work items are a block of rows × a few panels, sized so both stay in L2.
 * torch's sgemm reached 44–47 % of FMA peak at these shapes on the AVX2 machine. */
#define GEMM_NR 16
#define GEMM_MR 6
_Static_assert(QPANEL_NR == GEMM_NR, "a widened quantized panel must be one GEMM panel");

typedef struct {
    const float *x, *wp, *bias;
    float *y;
    int64_t ldx, ldy;
    int M, K, N, rows_per_item, panels_per_item, row_items;
} gemm_job;

static inline __attribute__((always_inline)) void gemm_tile(const int mr, const float *x, int64_t ldx, int K,
                                                            const float *wp, const float *bias, float *y,
                                                            int64_t ldy, int cols) {
#if defined(__AVX2__)
    /* every loop over i unrolled, so the accumulators stay in registers (an indexed access anywhere
     * makes GCC keep the array on the stack and store it on every k) */
    __m256 acc[GEMM_MR][2];
#pragma GCC unroll 6
    for (int i = 0; i < mr; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int k = 0; k < K; k++) {
        const __m256 b0 = _mm256_loadu_ps(wp + (int64_t)k * GEMM_NR), b1 = _mm256_loadu_ps(wp + (int64_t)k * GEMM_NR + 8);
#pragma GCC unroll 6
        for (int i = 0; i < mr; i++) {
            const __m256 a = _mm256_broadcast_ss(x + (int64_t)i * ldx + k);
            acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
        }
    }
    if (cols == GEMM_NR) {
        const __m256 bias0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
        const __m256 bias1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
#pragma GCC unroll 6
        for (int i = 0; i < mr; i++) {
            _mm256_storeu_ps(y + (int64_t)i * ldy, _mm256_add_ps(acc[i][0], bias0));
            _mm256_storeu_ps(y + (int64_t)i * ldy + 8, _mm256_add_ps(acc[i][1], bias1));
        }
        return;
    }
    float t[GEMM_MR][GEMM_NR];
#pragma GCC unroll 6
    for (int i = 0; i < mr; i++) {
        _mm256_storeu_ps(t[i], acc[i][0]);
        _mm256_storeu_ps(t[i] + 8, acc[i][1]);
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < cols; j++) y[(int64_t)i * ldy + j] = t[i][j] + (bias ? bias[j] : 0.0f);
#else
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < cols; j++) {
            float a = bias ? bias[j] : 0.0f;
            for (int k = 0; k < K; k++) a += x[(int64_t)i * ldx + k] * wp[(int64_t)k * GEMM_NR + j];
            y[(int64_t)i * ldy + j] = a;
        }
#endif
}

static void gemm_item(void *arg, int item) {
    const gemm_job *g = (const gemm_job *)arg;
    const int panels = (g->N + GEMM_NR - 1) / GEMM_NR;
    const int r0 = (item % g->row_items) * g->rows_per_item, p0 = (item / g->row_items) * g->panels_per_item;
    const int r1 = r0 + g->rows_per_item < g->M ? r0 + g->rows_per_item : g->M;
    const int p1 = p0 + g->panels_per_item < panels ? p0 + g->panels_per_item : panels;
    for (int p = p0; p < p1; p++) {
        const float *wp = g->wp + (int64_t)p * g->K * GEMM_NR;
        const float *bias = g->bias ? g->bias + (int64_t)p * GEMM_NR : NULL;
        const int cols = g->N - p * GEMM_NR < GEMM_NR ? g->N - p * GEMM_NR : GEMM_NR;
        for (int r = r0; r < r1; r += GEMM_MR) {
            const float *x = g->x + (int64_t)r * g->ldx;
            float *y = g->y + (int64_t)r * g->ldy + p * GEMM_NR;
            switch (r1 - r < GEMM_MR ? r1 - r : GEMM_MR) {
                case 1: gemm_tile(1, x, g->ldx, g->K, wp, bias, y, g->ldy, cols); break;
                case 2: gemm_tile(2, x, g->ldx, g->K, wp, bias, y, g->ldy, cols); break;
                case 3: gemm_tile(3, x, g->ldx, g->K, wp, bias, y, g->ldy, cols); break;
                case 4: gemm_tile(4, x, g->ldx, g->K, wp, bias, y, g->ldy, cols); break;
                case 5: gemm_tile(5, x, g->ldx, g->K, wp, bias, y, g->ldy, cols); break;
                default: gemm_tile(6, x, g->ldx, g->K, wp, bias, y, g->ldy, cols); break;
            }
        }
    }
}

/* One quantized panel (`pack_qpanels`) widened to float as the GEMM's panel: buf[k][j] = d · q + m'. */
static void widen_qpanel(const int kind, const uint8_t *pp, int nb, int64_t pbb, float *buf) {
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = pp + b * pbb, *q = blk + 2 * QPANEL_NR * 4;
        const float *pd = (const float *)blk, *pm = pd + QPANEL_NR;
        float *o = buf + (int64_t)b * QK * QPANEL_NR;
#if defined(__AVX2__)
        const __m256 d0 = _mm256_loadu_ps(pd), d1 = _mm256_loadu_ps(pd + 8);
        const __m256 m0 = _mm256_loadu_ps(pm), m1 = _mm256_loadu_ps(pm + 8);
        const __m128i low = _mm_set1_epi8(0x0F);
        for (int e = 0; e < QK; e++, o += QPANEL_NR) {
            __m256 c0, c1;
            if (kind == 4) {
                __m128i raw = _mm_loadl_epi64((const __m128i *)(q + e * 8));
                c0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(raw, low)));
                c1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), low)));
            } else {
                __m128i raw = _mm_loadu_si128((const __m128i *)(q + e * 16));
                c0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
                c1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8)));
            }
            _mm256_storeu_ps(o, _mm256_fmadd_ps(c0, d0, m0));
            _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(c1, d1, m1));
        }
#else
        for (int e = 0; e < QK; e++, o += QPANEL_NR)
            for (int j = 0; j < QPANEL_NR; j++) {
                int v = kind == 4 ? (j < 8 ? q[e * 8 + j] & 0x0F : q[e * 8 + j - 8] >> 4) : (int)(int8_t)q[e * 16 + j];
                o[j] = pd[j] * (float)v + pm[j];
            }
#endif
    }
}

typedef struct {
    const dq_weight *w;
    const float *x;
    float *y;
    int M;
} qpanel_job;

static __thread float *qpanel_buf = NULL;  /* per thread: one panel widened, K × 16 floats */
static __thread size_t qpanel_cap = 0;

static void qpanel_item(void *arg, int p) {
    const qpanel_job *j = (const qpanel_job *)arg;
    const dq_weight *w = j->w;
    const size_t need = (size_t)w->nb * QK * QPANEL_NR;
    if (qpanel_cap < need) {
        float *grown = (float *)realloc(qpanel_buf, need * sizeof(float));
        if (!grown) abort();  /* 96 KB at K = 1536 */
        qpanel_buf = grown, qpanel_cap = need;
    }
    if (w->kind == 4) widen_qpanel(4, w->pdata + (int64_t)p * w->nb * w->pblock_bytes, w->nb, w->pblock_bytes, qpanel_buf);
    else widen_qpanel(8, w->pdata + (int64_t)p * w->nb * w->pblock_bytes, w->nb, w->pblock_bytes, qpanel_buf);
    const int cols = w->N - p * QPANEL_NR < QPANEL_NR ? w->N - p * QPANEL_NR : QPANEL_NR;
    const float *bias = w->bias ? w->bias + (int64_t)p * QPANEL_NR : NULL;
    const int K = w->K;
    for (int r = 0; r < j->M; r += GEMM_MR) {
        const float *x = j->x + (int64_t)r * K;
        float *y = j->y + (int64_t)r * w->N + p * QPANEL_NR;
        switch (j->M - r < GEMM_MR ? j->M - r : GEMM_MR) {
            case 1: gemm_tile(1, x, K, K, qpanel_buf, bias, y, w->N, cols); break;
            case 2: gemm_tile(2, x, K, K, qpanel_buf, bias, y, w->N, cols); break;
            case 3: gemm_tile(3, x, K, K, qpanel_buf, bias, y, w->N, cols); break;
            case 4: gemm_tile(4, x, K, K, qpanel_buf, bias, y, w->N, cols); break;
            case 5: gemm_tile(5, x, K, K, qpanel_buf, bias, y, w->N, cols); break;
            default: gemm_tile(6, x, K, K, qpanel_buf, bias, y, w->N, cols); break;
        }
    }
}

/* y (M, N) = x (M, K) · Wᵀ + bias with W's quantized panels: each one widened once per step. */
static void qpanel_matmul(const dq_weight *w, const float *x, int M, float *y, int nthreads) {
    qpanel_job j = {w, x, y, M};
    parallel_work(qpanel_item, &j, (w->N + QPANEL_NR - 1) / QPANEL_NR, nthreads);
}

/* --- int16 tiles for steps of many rows, where the CPU has AVX512-VNNI -----------------------
 *
 * The same panels multiplied in integers: the activations rounded to int16 per block of 32
 * (`quantize_row16`, as the narrow steps do), the weights' quants widened to int16 once per panel
 * and step, and `vpdpwssd` (two int16 products summed into an int32 lane) runs a block of 32 k for
 * 6 rows × 32 columns in 6 × 2 × 16 instructions; then each block's integer sums become floats, scaled
 * by d · dx, with the min term m' · Σx added from the block's exact float sum. Each instruction
 * does 32 multiply-adds to an FMA's 16, and measured on Zen 4 it issues as often (117 against 59
 * GMAC/s on one core), so prompts run on twice the float GEMM's ceiling without bfloat16's
 * rounding: per-block int16 activations kept greedy agreement with float32 at 100 % free-running
 * and teacher-forced over the agreement prompts, where bfloat16 weights and activations gave 91 %
 * free-running. Quants are at most 8 bits and activations 16, so a block's sums stay far inside
 * int32. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define Q16_TILES 1

int dq_has_q16_tiles(void) { return 1; }

/* One panel's quants as int16 pairs: buf[(b * 16 + kk) * 32 + 2j + h] = quant (2kk + h) of column j
 * in block b, the operand layout of `vpdpwssd` (lane j multiplies the pair (k, k + 1) of column j). */
static void widen_qpanel16(const int kind, const uint8_t *pp, int nb, int64_t pbb, int16_t *buf) {
    const __m128i low = _mm_set1_epi8(0x0F);
    for (int b = 0; b < nb; b++) {
        const uint8_t *q = pp + b * pbb + 2 * QPANEL_NR * 4;
        for (int kk = 0; kk < QK / 2; kk++) {
            __m256i v[2];
            for (int h = 0; h < 2; h++) {
                const int e = 2 * kk + h;
                if (kind == 4) {
                    __m128i raw = _mm_loadl_epi64((const __m128i *)(q + e * 8));
                    __m128i cols = _mm_unpacklo_epi64(_mm_and_si128(raw, low), _mm_and_si128(_mm_srli_epi16(raw, 4), low));
                    v[h] = _mm256_cvtepu8_epi16(cols);
                } else {
                    v[h] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + e * 16)));
                }
            }
            __m512i pair = _mm512_or_si512(_mm512_cvtepu16_epi32(v[0]), _mm512_slli_epi32(_mm512_cvtepu16_epi32(v[1]), 16));
            _mm512_storeu_si512((void *)(buf + ((int64_t)b * (QK / 2) + kk) * 32), pair);
        }
    }
}

/* Activations packed for the tiles: rows in groups of gm (`q16_group_rows`; the last padded with
 * zero rows), and per group, block by block, the 16 int32 pairs (k, k + 1) of its rows side by
 * side, pair kk of row i at [kk · gm + i], then the rows' scales dx and sums Σx: one pointer and
 * constant offsets in the tile's loop. With each row apart by K, the 6 row addresses × 16 pairs unrolled spilled the
 * compiler's registers (Zen 4, one core: 88 GMAC/s alone against 93 packed). */
#define Q16_MR 8  /* most rows per tile: 8 of one panel, or 6 of two (4 · 6 accumulators of 16 columns) */
#define Q16_GROUP_INTS(nb, gm) ((int64_t)(nb) * (QK / 2 + 2) * (gm))  /* a group of gm rows' 32-bit words */

/* Rows per group for a step of M rows: 6 (two panels a tile), unless groups of 8 (one panel a
 * tile) pad fewer rows by over 5 %: a decode batch of 8 computed 12 rows in groups of 6, 14 % slower
 * than 8 × 16 tiles (Zen 4, 2 threads, a layer's matmuls). */
static inline int q16_group_rows(int M) {
    const int pad6 = (M + 5) / 6 * 6, pad8 = (M + 7) / 8 * 8;
    return (pad6 - pad8) * 20 > M ? 8 : 6;
}

/* A group of gm rows (mr of them real) against one or two widened panels (np and gm constants in
 * each copy), blocks [b0, b1) of them: each row's pair is loaded once for both panels, a block's
 * first pair multiplies with `vpmaddwd` (no zeroed accumulators), and all the sums stay in
 * registers. The sums start from zero at block 0, else from y (the blocks before); the bias goes
 * in after the last block. Columns past `cols` of a panel (the last, partial one) and rows past mr
 * are not stored. */
static inline __attribute__((always_inline)) void q16_tile(const int np, const int gm, const int mr, const int32_t *xp, int nb,
                                                           int b0, int b1, const int16_t *wb0, const int16_t *wb1,
                                                           const uint8_t *pp0, const uint8_t *pp1, int64_t pbb,
                                                           const float *bias0, const float *bias1, float *y,
                                                           int64_t ldy, int cols0, int cols1) {
    const __mmask16 keep0 = (__mmask16)((1u << cols0) - 1u), keep1 = (__mmask16)((1u << cols1) - 1u);
    __m512 f0[Q16_MR], f1[Q16_MR];
#pragma GCC unroll 8
    for (int i = 0; i < gm; i++) {
        f0[i] = b0 && i < mr ? _mm512_maskz_loadu_ps(keep0, y + i * ldy) : _mm512_setzero_ps();
        f1[i] = np == 2 && b0 && i < mr ? _mm512_maskz_loadu_ps(keep1, y + i * ldy + QPANEL_NR) : _mm512_setzero_ps();
    }
    for (int b = b0; b < b1; b++) {
        __m512i a0[Q16_MR], a1[Q16_MR];
        const int16_t *w0 = wb0 + (int64_t)b * (QK / 2) * 32, *w1 = np == 2 ? wb1 + (int64_t)b * (QK / 2) * 32 : w0;
        const int32_t *xb = xp + (int64_t)b * (QK / 2 + 2) * gm;
        {
            const __m512i v0 = _mm512_loadu_si512((const void *)w0);
            const __m512i v1 = np == 2 ? _mm512_loadu_si512((const void *)w1) : v0;
#pragma GCC unroll 8
            for (int i = 0; i < gm; i++) {
                const __m512i x = _mm512_set1_epi32(xb[i]);
                a0[i] = _mm512_madd_epi16(x, v0);
                if (np == 2) a1[i] = _mm512_madd_epi16(x, v1);
            }
        }
#pragma GCC unroll 15
        for (int kk = 1; kk < QK / 2; kk++) {
            const __m512i v0 = _mm512_loadu_si512((const void *)(w0 + kk * 32));
            const __m512i v1 = np == 2 ? _mm512_loadu_si512((const void *)(w1 + kk * 32)) : v0;
#pragma GCC unroll 8
            for (int i = 0; i < gm; i++) {
                const __m512i x = _mm512_set1_epi32(xb[kk * gm + i]);
                a0[i] = _mm512_dpwssd_epi32(a0[i], x, v0);
                if (np == 2) a1[i] = _mm512_dpwssd_epi32(a1[i], x, v1);
            }
        }
        const float *sc = (const float *)(xb + QK / 2 * gm);  /* dx of the rows, then Σx */
        const float *pd0 = (const float *)(pp0 + b * pbb), *pd1 = (const float *)((np == 2 ? pp1 : pp0) + b * pbb);
        const __m512 d0 = _mm512_loadu_ps(pd0), m0 = _mm512_loadu_ps(pd0 + QPANEL_NR);
        const __m512 d1 = _mm512_loadu_ps(pd1), m1 = _mm512_loadu_ps(pd1 + QPANEL_NR);
#pragma GCC unroll 8
        for (int i = 0; i < gm; i++) {
            const __m512 sx = _mm512_set1_ps(sc[i]), ss = _mm512_set1_ps(sc[gm + i]);
            f0[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0[i]), _mm512_mul_ps(d0, sx), f0[i]);
            f0[i] = _mm512_fmadd_ps(m0, ss, f0[i]);
            if (np == 2) {
                f1[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1[i]), _mm512_mul_ps(d1, sx), f1[i]);
                f1[i] = _mm512_fmadd_ps(m1, ss, f1[i]);
            }
        }
    }
    const int last = b1 == nb;
    const __m512 bv0 = last && bias0 ? _mm512_maskz_loadu_ps(keep0, bias0) : _mm512_setzero_ps();
    const __m512 bv1 = last && np == 2 && bias1 ? _mm512_maskz_loadu_ps(keep1, bias1) : _mm512_setzero_ps();
    for (int i = 0; i < mr; i++) {
        _mm512_mask_storeu_ps(y + i * ldy, keep0, _mm512_add_ps(f0[i], bv0));
        if (np == 2) _mm512_mask_storeu_ps(y + i * ldy + QPANEL_NR, keep1, _mm512_add_ps(f1[i], bv1));
    }
}

/* Blocks a tile takes at a time: two widened panels of them (12 blocks: 24 KB) stay in L1 while
 * every group of rows goes through them (at K = 1536 whole panels did not: 65 against 82 GMAC/s
 * at K = 576, Zen 4, one core). */
#define Q16_KC 12

typedef struct {
    const dq_weight *w;
    const int32_t *xp;  /* the packed activations */
    float *y;
    int M, gm;  /* rows, rows per group */
} q16_job;

static __thread int16_t *q16_wbuf = NULL;  /* per thread: two panels widened, 2 × K × 16 int16 */
static __thread size_t q16_wcap = 0;

/* Item i: panels 2i and 2i + 1 (the second may be partial or absent) against every group of rows. */
static void q16_item(void *arg, int item) {
    const q16_job *j = (const q16_job *)arg;
    const dq_weight *w = j->w;
    const int nb = w->nb, p0 = 2 * item, np = (p0 + 1) * QPANEL_NR < w->N ? 2 : 1;
    const size_t need = (size_t)2 * nb * QK * QPANEL_NR;
    if (q16_wcap < need) q16_wbuf = (int16_t *)grow(q16_wbuf, need * sizeof(int16_t)), q16_wcap = need;  /* 96 KB at K = 1536 */
    const int64_t pbb = w->pblock_bytes;
    const uint8_t *pp0 = w->pdata + (int64_t)p0 * nb * pbb, *pp1 = pp0 + (int64_t)nb * pbb;
    int16_t *wb0 = q16_wbuf, *wb1 = q16_wbuf + (size_t)nb * QK * QPANEL_NR;
    for (int p = 0; p < np; p++) widen_qpanel16(w->kind == 4 ? 4 : 8, p ? pp1 : pp0, nb, pbb, p ? wb1 : wb0);
    const int cols0 = w->N - p0 * QPANEL_NR < QPANEL_NR ? w->N - p0 * QPANEL_NR : QPANEL_NR;
    const int cols1 = np == 2 ? (w->N - (p0 + 1) * QPANEL_NR < QPANEL_NR ? w->N - (p0 + 1) * QPANEL_NR : QPANEL_NR) : 0;
    const float *bias0 = w->bias ? w->bias + (int64_t)p0 * QPANEL_NR : NULL, *bias1 = bias0 ? bias0 + QPANEL_NR : NULL;
    const int chunks = j->M < 64 ? 1 : (nb + Q16_KC - 1) / Q16_KC, kc = (nb + chunks - 1) / chunks;  /* even chunks */
    for (int b0 = 0; b0 < nb; b0 += kc) {
        const int b1 = b0 + kc < nb ? b0 + kc : nb;
        const int gm = j->gm;
        for (int r = 0; r < j->M; r += gm) {
            const int32_t *xp = j->xp + (int64_t)(r / gm) * Q16_GROUP_INTS(nb, gm);
            float *y = j->y + (int64_t)r * w->N + p0 * QPANEL_NR;
            const int mr = j->M - r < gm ? j->M - r : gm;
            if (gm == 8) {  /* 8 rows of one panel at a time */
                q16_tile(1, 8, mr, xp, nb, b0, b1, wb0, wb0, pp0, pp0, pbb, bias0, NULL, y, w->N, cols0, 0);
                if (np == 2)
                    q16_tile(1, 8, mr, xp, nb, b0, b1, wb1, wb1, pp1, pp1, pbb, bias1, NULL, y + QPANEL_NR, w->N, cols1, 0);
            } else if (np == 2) {
                q16_tile(2, 6, mr, xp, nb, b0, b1, wb0, wb1, pp0, pp1, pbb, bias0, bias1, y, w->N, cols0, cols1);
            } else {
                q16_tile(1, 6, mr, xp, nb, b0, b1, wb0, wb0, pp0, pp0, pbb, bias0, NULL, y, w->N, cols0, 0);
            }
        }
    }
}

typedef struct {
    const float *x;
    int32_t *xp;
    int K, nb, M, gm;
} q16_quant_job;

/* Group g of gm rows quantized as `quantize_row16` does (int16 per block of 32, absmax / 32767,
 * rounded to nearest; dx and the block's float sum) straight into the packed layout; rows past M
 * are zero. AVX-512 with masked loads for a partial last block: the row-by-row AVX2 version (a
 * copy of each block through a buffer) took 8.6 % of a 2,048-row prompt step, this ~3 %. */
static void q16_quant_item(void *arg, int g) {
    const q16_quant_job *j = (const q16_quant_job *)arg;
    const int nb = j->nb, K = j->K, gm = j->gm;
    int32_t *xp = j->xp + (int64_t)g * Q16_GROUP_INTS(nb, gm);
    const __m512 sign = _mm512_set1_ps(-0.0f);
    for (int i = 0; i < gm; i++) {
        const int r = g * gm + i;
        const float *x = j->x + (int64_t)r * K;
        for (int b = 0; b < nb; b++) {
            int32_t *xb = xp + (int64_t)b * (QK / 2 + 2) * gm;
            float *sc = (float *)(xb + QK / 2 * gm);
            if (r >= j->M) {
                for (int kk = 0; kk < QK / 2; kk++) xb[kk * gm + i] = 0;
                sc[i] = 0.0f, sc[gm + i] = 0.0f;
                continue;
            }
            const int n = K - b * QK < QK ? K - b * QK : QK;
            const __mmask16 m0 = (__mmask16)(n >= 16 ? 0xFFFFu : (1u << n) - 1u);
            const __mmask16 m1 = (__mmask16)(n >= 32 ? 0xFFFFu : n > 16 ? (1u << (n - 16)) - 1u : 0u);
            const __m512 v0 = _mm512_maskz_loadu_ps(m0, x + b * QK), v1 = _mm512_maskz_loadu_ps(m1, x + b * QK + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
            const __m512 id = _mm512_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
            const __m256i q0 = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(v0, id)));
            const __m256i q1 = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(v1, id)));
            int32_t pairs[QK / 2];
            _mm256_storeu_si256((__m256i *)pairs, q0);
            _mm256_storeu_si256((__m256i *)(pairs + 8), q1);
            for (int kk = 0; kk < QK / 2; kk++) xb[kk * gm + i] = pairs[kk];
            sc[i] = amax / 32767.0f;
            sc[gm + i] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
        }
    }
}

/* The caller's activations, packed, grown as needed. */
static __thread int32_t *q16_act = NULL;
static __thread size_t q16_act_cap = 0;

/* y (M, N) = x (M, K) · Wᵀ + bias on int16 tiles; -1 (nothing written) where memory runs out. */
static int q16_matmul(const dq_weight *w, const float *x, int M, float *y, int nthreads) {
    const int nb = w->nb, gm = q16_group_rows(M), groups = (M + gm - 1) / gm;
    const size_t need = (size_t)groups * Q16_GROUP_INTS(nb, gm);
    if (q16_act_cap < need) {
        void *grown = realloc(q16_act, need * sizeof(int32_t));
        if (!grown) return -1;
        q16_act = (int32_t *)grown, q16_act_cap = need;
    }
    q16_quant_job qj = {x, q16_act, w->K, nb, M, gm};
    parallel_work(q16_quant_item, &qj, groups, nthreads);
    q16_job j = {w, q16_act, y, M, gm};
    parallel_work(q16_item, &j, ((w->N + QPANEL_NR - 1) / QPANEL_NR + 1) / 2, nthreads);
    return 0;
}
#else
int dq_has_q16_tiles(void) { return 0; }
#endif

/* y (M, N) (row stride ldy) = x (M, K) (row stride ldx) · Wᵀ + bias (N, or NULL), W as panels (see
 * above). A work item is 48 rows × 2 panels (32 columns): its rows of x (110 KB at K = 576) and its
 * panels (72 KB) stay in L2 while its 8 × 2 tiles run; measured, the blocking mattered little
 * once the tile's accumulators stayed in registers. Returns 0, or -1 for K < 1. */
#define GEMM_ROWS_PER_ITEM 48
#define GEMM_PANELS_PER_ITEM 2
int dq_gemm_f32(const float *x, int64_t ldx, int M, int K, const float *wp, int N, const float *bias, float *y,
                int64_t ldy, int nthreads) {
    if (M <= 0 || N <= 0) return 0;
    if (K <= 0) return -1;
    const int panels = (N + GEMM_NR - 1) / GEMM_NR;
    gemm_job g = {x, wp, bias, y, ldx, ldy, M, K, N, GEMM_ROWS_PER_ITEM, GEMM_PANELS_PER_ITEM,
                  (M + GEMM_ROWS_PER_ITEM - 1) / GEMM_ROWS_PER_ITEM};
    const int items = g.row_items * ((panels + GEMM_PANELS_PER_ITEM - 1) / GEMM_PANELS_PER_ITEM);
    parallel_work(gemm_item, &g, items, nthreads);
    return 0;
}

/* --- a prompt's rows: attention by tiles of consecutive rows ----------------------------------
 *
 * Rows of one sequence in a step (a prompt, a chunk) attend to the same keys, each to one more
 * than the row before. Row by row (`attention_row`), each row read its whole prefix again and
 * summed every score horizontally: 110 ms of a 512-token prompt's 30 layers on 2 Zen 4 threads,
 * for 9 GFLOP. Here up to GEMM_MR consecutive rows of one KV head are one item: the sequence's
 * keys are copied (widened where the pool is bf16) once per thread into the float GEMM's panel
 * layout (16 keys × head dim), its values into 16-dimension panels, and the scores (rows × keys,
 * per query head) and the outputs (scores × values) are the GEMM's own register tiles; each row's
 * scores past its own length are masked before its softmax. Decode rows (one per sequence) keep
 * the row path. */
typedef struct {
    int b0, rows;  /* rows b0 .. b0 + rows - 1: one sequence, each seeing one more key */
} att_tile;

typedef struct {
    const attention_job *a;
    const att_tile *tiles;
    int ntiles;
} tiles_job;

static __thread float *tile_kp = NULL, *tile_vp = NULL;  /* keys (cap/16, hd, 16), values (hd/16, cap, 16) */
static __thread size_t tile_cap = 0;  /* keys the panels hold (a multiple of 16) at head dim tile_hd */
static __thread int tile_hd = 0;
static __thread int32_t *tile_table = NULL;
static __thread size_t tile_table_cap = 0;
static __thread uint64_t tile_call = 0;
static __thread int tile_kvh = -1, tile_len = 0;
static __thread float *tile_scores = NULL;
static __thread size_t tile_scores_cap = 0;

static inline void gemm_rows(int mr, const float *x, int64_t ldx, int K, const float *wp, float *y, int64_t ldy,
                             int cols) {
    switch (mr) {
        case 1: gemm_tile(1, x, ldx, K, wp, NULL, y, ldy, cols); break;
        case 2: gemm_tile(2, x, ldx, K, wp, NULL, y, ldy, cols); break;
        case 3: gemm_tile(3, x, ldx, K, wp, NULL, y, ldy, cols); break;
        case 4: gemm_tile(4, x, ldx, K, wp, NULL, y, ldy, cols); break;
        case 5: gemm_tile(5, x, ldx, K, wp, NULL, y, ldy, cols); break;
        default: gemm_tile(6, x, ldx, K, wp, NULL, y, ldy, cols); break;
    }
}

/* The first `len` keys and values of the tile's sequence for KV head kvh, in panels (see above);
 * keys this thread already holds for the same call, head and blocks are kept. */
static void tile_panels(const attention_job *a, const int32_t *table, int kvh, int len) {
    const int hd = a->hd, KV = a->KV, bs = a->block_size, nblocks = (len + bs - 1) / bs;
    int from = 0;
    if (hd != tile_hd) tile_cap = 0, tile_len = 0, tile_call = 0, tile_hd = hd;  /* another model's */
    if (tile_call == a->call && tile_kvh == kvh && tile_len <= len && (size_t)len <= tile_cap &&
        memcmp(tile_table, table, (size_t)((tile_len + bs - 1) / bs) * sizeof(int32_t)) == 0)
        from = tile_len;
    if ((size_t)len > tile_cap) {  /* the value panels' layout depends on the capacity: copy anew */
        size_t cap = tile_cap ? tile_cap : 256;  /* grown in place: realloc keeps nothing we need */
        while (cap < (size_t)len) cap *= 2;
        tile_kp = (float *)grow(tile_kp, cap * hd * sizeof(float));
        tile_vp = (float *)grow(tile_vp, cap * hd * sizeof(float));
        tile_cap = cap, from = 0;
    }
    if ((size_t)nblocks > tile_table_cap) {
        tile_table = (int32_t *)grow(tile_table, (size_t)nblocks * sizeof(int32_t));
        tile_table_cap = (size_t)nblocks;
    }
    float row[2][256];
    for (int t = from; t < len; t++) {
        const int64_t at = (((int64_t)table[t / bs] * bs + t % bs) * KV + kvh) * hd;
        if (a->kv_bf16) {
            widen_bf16((const uint16_t *)a->keys + at, row[0], hd);
            widen_bf16((const uint16_t *)a->values + at, row[1], hd);
        } else {
            memcpy(row[0], (const float *)a->keys + at, (size_t)hd * sizeof(float));
            memcpy(row[1], (const float *)a->values + at, (size_t)hd * sizeof(float));
        }
        float *kp = tile_kp + (int64_t)(t / GEMM_NR) * hd * GEMM_NR + t % GEMM_NR;
        for (int i = 0; i < hd; i++) kp[i * GEMM_NR] = row[0][i];
        for (int p = 0; p < hd / GEMM_NR; p++)
            memcpy(tile_vp + ((int64_t)p * tile_cap + t) * GEMM_NR, row[1] + p * GEMM_NR, GEMM_NR * sizeof(float));
    }
    memcpy(tile_table, table, (size_t)nblocks * sizeof(int32_t));
    tile_call = a->call, tile_kvh = kvh, tile_len = len;
}

static void tile_item(void *arg, int item) {
    const tiles_job *j = (const tiles_job *)arg;
    const attention_job *a = j->a;
    const att_tile *tl = &j->tiles[item % j->ntiles];
    const int kvh = item / j->ntiles;
    if (tl->rows == 1) {
        attention_one(a, tl->b0, kvh);
        return;
    }
    const int hd = a->hd, H = a->H, group = H / a->KV, rows = tl->rows;
    const int len = a->seq_lens[tl->b0 + rows - 1];  /* the last row sees the most keys */
    tile_panels(a, a->block_table + (int64_t)tl->b0 * a->max_blocks, kvh, len);
    const int ld = (len + GEMM_NR - 1) / GEMM_NR * GEMM_NR;
    if ((size_t)rows * ld > tile_scores_cap) {
        tile_scores = (float *)grow(tile_scores, (size_t)rows * ld * sizeof(float));
        tile_scores_cap = (size_t)rows * ld;
    }
    const int64_t ldq = (int64_t)H * hd;
    for (int h = 0; h < group; h++) {
        const int64_t first = ((int64_t)tl->b0 * H + (int64_t)kvh * group + h) * hd;
        for (int p = 0; p * GEMM_NR < len; p++)
            gemm_rows(rows, a->q + first, ldq, hd, tile_kp + (int64_t)p * hd * GEMM_NR, tile_scores + p * GEMM_NR, ld,
                      len - p * GEMM_NR < GEMM_NR ? len - p * GEMM_NR : GEMM_NR);
        for (int r = 0; r < rows; r++) {
            float *s = tile_scores + (int64_t)r * ld;
            const int n = a->seq_lens[tl->b0 + r];
            for (int t = 0; t < n; t++) s[t] *= a->scale;
            softmax_inplace(s, n);
            for (int t = n; t < len; t++) s[t] = 0.0f;  /* keys after the row's own: none of its business */
        }
        for (int p = 0; p < hd / GEMM_NR; p++)
            gemm_rows(rows, tile_scores, ld, len, tile_vp + (int64_t)p * tile_cap * GEMM_NR, a->out + first + p * GEMM_NR,
                      ldq, GEMM_NR);
    }
}

/* Tiles of consecutive rows where the step has them; -1 (nothing done) where it has none, or the
 * head dimension does not fill whole panels. */
static int prompt_tiles_attention(const attention_job *a, int nthreads) {
    if (a->hd % GEMM_NR != 0 || a->hd > 256 || a->B < 2) return -1;
    att_tile *tiles = (att_tile *)malloc((size_t)a->B * sizeof(att_tile));
    if (!tiles) return -1;
    int ntiles = 0, runs = 0;
    for (int b = 0; b < a->B;) {
        int n = 1;
        while (b + n < a->B && n < GEMM_MR && a->seq_lens[b + n] == a->seq_lens[b + n - 1] + 1 &&
               memcmp(a->block_table + (int64_t)(b + n) * a->max_blocks, a->block_table + (int64_t)b * a->max_blocks,
                      (size_t)a->max_blocks * sizeof(int32_t)) == 0)
            n++;
        runs += n > 1;
        tiles[ntiles++] = (att_tile){b, n};
        b += n;
    }
    if (!runs) {
        free(tiles);
        return -1;
    }
    tiles_job j = {a, tiles, ntiles};
    parallel_work(tile_item, &j, ntiles * a->KV, nthreads);
    free(tiles);
    return 0;
}
