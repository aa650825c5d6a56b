/* hexin's own CPU kernels: 4-bit weights x 8-bit activations, a whole decode layer in one
 * call, and int8 products on AMX tiles.
 *
 * Built by hexin/native/__init__.py at first use, once per machine and instruction set, with
 * one of -mavx512vnni (VNNI dpbusd, 64 products an instruction; AMX's tile kernels are
 * compiled into this build too, at the function level), -mavxvnni (the 256-bit form on
 * Intel Core) or plain -mavx2 (maddubs + madd, as every AVX2 CPU has); the portable C
 * below is the fallback for anything else. Loaded through ctypes, which drops the GIL
 * for the call.
 *
 * Weights ("q4"): per output row, blocks of 32 inputs, each 16 bytes of nibbles (input j
 * in the low nibble of byte j, input j + 16 in the high nibble), a scale d and a minimum
 * m: w = q * d + m, q in [0, 15]. This is GGUF's Q4_0 / Q4_1 content, regrouped. The SIMD
 * builds lay the same values out in AMX's tiles instead (see "q4 x q8 in tiles").
 *
 * Activations ("q8"): each row rounded to int8 per block of 32 (scale = |max| / 127), with
 * s = scale * (sum of the block's int8 values) for the minimum's term. In the row layout
 * neighbouring blocks are stored interleaved ([a0 0..15, a1 0..15, a0 16..31, a1 16..31])
 * so that one 32-byte load of two weight blocks lines up with them after splitting
 * nibbles; in the tile layout each block is in order.
 *
 * Every output value is computed by one thread, in one fixed order of operations that
 * does not depend on how many rows the call has or which rows are its neighbours: results
 * are the same for a sequence alone or in any batch.
 */
#define _GNU_SOURCE /* syscall(), to ask Linux for AMX's tile state */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define HX_ISA "avx512_vnni"
#define HX_AVX512 1
#elif defined(__AVXVNNI__) && defined(__AVX2__)
#define HX_ISA "avx_vnni"
#define HX_AVX2 1
#define HX_DPBUSD256(acc, u, s) _mm256_dpbusd_avx_epi32((acc), (u), (s))
#elif defined(__AVX2__) && defined(__FMA__)
#define HX_ISA "avx2"
#define HX_AVX2 1
#define HX_Q8_SIGNED 1 /* maddubs would saturate on unsigned 8-bit weights: signed, m = 0 */
#else
#define HX_ISA "generic"
#endif

/* AMX (Intel Xeon 4th gen and later): the avx512_vnni build compiles its tile kernels at
 * the function level; Python only calls them after hx_amx_init() said yes. */
#if defined(HX_AVX512) && defined(__linux__) && defined(__x86_64__) && \
    (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 11))
#define HX_AMX 1
#define AMX_TARGET __attribute__((target("amx-tile,amx-int8")))
#endif

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* 1 where AMX can run in this process (Linux grants the tile state on request), else 0 */
int hx_amx_init(void) {
#if defined(HX_AMX)
    const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
    return 0;
#endif
}

#define QK 32 /* inputs per block */
#define PREFETCH_BYTES 3072 /* how far ahead of its current row a thread asks for weights */
#if defined(__GNUC__)
#define PREFETCH(p) __builtin_prefetch((p), 0, 3)
#else
#define PREFETCH(p) ((void)(p))
#endif

const char *hx_isa(void) { return HX_ISA; }

/* Whether 8-bit weights are stored signed (w = q d) rather than offset by 128 (w = q d + m,
 * m = -128 d), as ``dpbusd`` needs its first operand unsigned. */
int hx_q8_signed(void) {
#if defined(HX_Q8_SIGNED)
    return 1;
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------ threads */

/* Work is shared through OpenMP, built against the libgomp PyTorch loads: the same worker
 * threads run PyTorch's ops and these kernels, rather than two pools spinning against each
 * other on the same cores. */
typedef void (*hx_task)(void *ctx, int ith, int nth);

static int pool_threads = 1;

/* Use ``threads`` threads per call (PyTorch's count). Returns the count in use. */
int hx_init(int threads) {
#ifdef _OPENMP
    pool_threads = threads > 0 ? threads : 1;
#else
    (void)threads;
#endif
    return pool_threads;
}

static void run_parallel(hx_task fn, void *ctx) {
#ifdef _OPENMP
    if (pool_threads > 1) {
#pragma omp parallel num_threads(pool_threads)
        fn(ctx, omp_get_thread_num(), omp_get_num_threads());
        return;
    }
#endif
    fn(ctx, 0, 1);
}

/* ``fn`` over ``rows`` rows of per-row work: on every thread when there are many rows, on
 * this one when there are few (not worth waking the others for) */
static void run_rows(hx_task fn, void *ctx, int rows) {
    if (rows >= 8)
        run_parallel(fn, ctx);
    else
        fn(ctx, 0, 1);
}

static void split(int n, int ith, int nth, int *lo, int *hi) {
    int per = (n + nth - 1) / nth;
    *lo = ith * per < n ? ith * per : n;
    *hi = *lo + per < n ? *lo + per : n;
}

/* ------------------------------------------------------------------ activations */

/* Blocks are laid out in groups: of 4 while 4 remain, then of 2, then 1. Within a group of
 * g blocks, the first halves (inputs 0..15) of its blocks come first, in order, then the
 * second halves: one load of 4 (or 2) weight blocks' nibbles, split into low and high
 * nibbles, lines up with the group's two halves. */
static int group_of(int b, int nb, int *first) {
    int quads = nb / 4 * 4;
    if (b < quads) {
        *first = b / 4 * 4;
        return 4;
    }
    if (b < quads + (nb - quads) / 2 * 2) {
        *first = quads + (b - quads) / 2 * 2;
        return 2;
    }
    *first = b;
    return 1;
}

/* One row of K floats as q8 blocks: q (K bytes, or with two terms 2K: the rounded values,
 * then the rounding errors in 1/128 steps), d and s (K / 32 each).
 *
 * Two terms keep each activation to 1/256 of its block's largest magnitude (15 bits, more
 * than bf16's 8): 128 q1 + q2 is an exact integer, so the products stay integer sums. A
 * layer's inputs take two (greedy replies keep fp32's choice at near-ties); the LM head,
 * whose likeliest outputs are recomputed in fp32 afterwards, one. ``natural``: each block's
 * values in their own order (the AMX kernel's layout) rather than in groups. */
static void quantize_row(const float *x, int K, int terms, int natural, int8_t *q, float *d,
                         float *s) {
    int nb = K / QK;
    for (int b = 0; b < nb; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        float scale = amax / 127.0f;
        float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int8_t v[QK], e[QK];
        int sum = 0, err = 0;
        for (int j = 0; j < QK; j++) {
            float t = xb[j] * inv;
            v[j] = (int8_t)nearbyintf(t);
            e[j] = (int8_t)nearbyintf((t - (float)v[j]) * 128.0f);
            sum += v[j];
            err += e[j];
        }
        int first = b, g = natural ? 1 : group_of(b, nb, &first); /* a group of 1: in order */
        for (int term = 0; term < terms; term++) {
            const int8_t *src = term ? e : v;
            int8_t *base = q + (size_t)term * K + first * QK;
            memcpy(base + (b - first) * 16, src, 16);
            memcpy(base + g * 16 + (b - first) * 16, src + 16, 16);
        }
        if (terms == 2) {
            d[b] = scale / 128.0f;
            s[b] = d[b] * (float)(128 * sum + err);
        } else {
            d[b] = scale;
            s[b] = scale * (float)sum;
        }
    }
}

/* ------------------------------------------------------------------ q4 x q8 dot products */

typedef struct {
    const uint8_t *q; /* (N, K / 32, 16) nibbles, or (N, K) bytes */
    const uint16_t *d; /* (N, K / 32) fp16, as GGUF stores them */
    const uint16_t *m; /* (N, K / 32) fp16 */
    int32_t n, k;
    int32_t bits; /* 4: nibbles as above; 8: one byte a value, in the activations' layout */
    int32_t tiles; /* TILES_VNNI or TILES_AMX: laid out in AMX's tiles (see tiled_task) */
} hx_weight;

enum {
    TILES_VNNI = 1, /* tiles, multiplied through VNNI (broadcast_task) */
    TILES_AMX = 2,  /* and on the tile unit itself for many rows (tiled_task) */
};

/* fp16 bits to float, for the portable path (the SIMD paths convert with F16C) */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, mant = h & 1023, bits;
    if (exp == 0) { /* zero or subnormal: mant * 2^-24 */
        float f = (float)mant * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    bits = exp == 31 ? sign | 0x7F800000u | (mant << 13) : sign | ((exp + 112) << 23) | (mant << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#if defined(HX_AVX512)
#define MAXR 4 /* activation rows per tile */
#else
#define MAXR 4 /* 8 accumulators of 16 registers */
#endif
#define MAXN 2 /* weight rows per tile */
_Static_assert(MAXN * MAXR == 8, "hsum8x8 reduces one tile's 8 outputs");

#if defined(HX_AVX512) || defined(HX_AVX2)
static inline float hsum256(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* out[k] = the sum of v[k]'s 8 lanes, for 8 vectors at once: a tree of horizontal adds
 * that treats every k alike */
static inline void hsum8x8(const __m256 v[8], float out[8]) {
    __m256 h01 = _mm256_hadd_ps(v[0], v[1]), h23 = _mm256_hadd_ps(v[2], v[3]);
    __m256 h45 = _mm256_hadd_ps(v[4], v[5]), h67 = _mm256_hadd_ps(v[6], v[7]);
    __m256 h0 = _mm256_hadd_ps(h01, h23), h1 = _mm256_hadd_ps(h45, h67);
    /* h0 = [v0 v1 v2 v3 | v0 v1 v2 v3] partial sums of each half, h1 likewise for v4..v7 */
    __m256 lo = _mm256_permute2f128_ps(h0, h1, 0x20), hi = _mm256_permute2f128_ps(h0, h1, 0x31);
    _mm256_storeu_ps(out, _mm256_add_ps(lo, hi));
}

/* int32 sums (4 lanes a block) of two blocks' weights lo/hi times int8 a0/a1 */
static inline __m256i dot256(const int BITS, __m256i lo, __m256i hi, __m256i a0, __m256i a1) {
#if defined(HX_Q8_SIGNED)
    if (BITS == 8) {
        const __m256i ones = _mm256_set1_epi16(1);
        __m256i p0 = _mm256_maddubs_epi16(_mm256_abs_epi8(lo), _mm256_sign_epi8(a0, lo));
        __m256i p1 = _mm256_maddubs_epi16(_mm256_abs_epi8(hi), _mm256_sign_epi8(a1, hi));
        return _mm256_add_epi32(_mm256_madd_epi16(p0, ones), _mm256_madd_epi16(p1, ones));
    }
#else
    (void)BITS;
#endif
#if defined(HX_AVX512)
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, a0), hi, a1);
#elif defined(HX_DPBUSD256)
    return HX_DPBUSD256(HX_DPBUSD256(_mm256_setzero_si256(), lo, a0), hi, a1);
#else
    __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, a0), _mm256_maddubs_epi16(hi, a1));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
#endif
}
#endif

/* out[i][r] = x_r . w_(n + i) for NR weight rows and R activation rows: per block,
 * d_w d_a (q_w . q_a) + m_w s_a. Every (i, r) accumulator sees the same operations in the
 * same order whatever NR and R are, so no output depends on the others in its tile. */
static inline __attribute__((always_inline)) void dot_tile(
    const hx_weight *w, int n, const int BITS, const int TERMS, const int NR, const int R,
    const int8_t *const *aq,
    const float *const *ad, const float *const *as, float out[MAXN][MAXR]) {
    const int nb = w->k / QK, BB = BITS * 4; /* bytes a block */
    const size_t second = (size_t)w->k;   /* offset of an activation row's second term */
    const uint8_t *wq[MAXN];
    const uint16_t *wd[MAXN], *wm[MAXN];
    for (int i = 0; i < NR; i++) {
        wq[i] = w->q + (size_t)(n + i) * nb * BB;
        wd[i] = w->d + (size_t)(n + i) * nb;
        wm[i] = w->m + (size_t)(n + i) * nb;
    }
    const int quads = nb / 4 * 4, pairs_end = quads + (nb - quads) / 2 * 2;
#if defined(HX_AVX512) || defined(HX_AVX2)
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i pair_pattern = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0);
#if defined(HX_AVX512)
    const __m512i low4x = _mm512_set1_epi8(0x0F);
    const __m512i quad_pattern = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc[MAXN][MAXR];
    for (int i = 0; i < NR; i++)
        for (int r = 0; r < R; r++) acc[i][r] = _mm512_setzero_ps();
    for (int b = 0; b < quads; b += 4) {
        __m512i lo[MAXN], hi[MAXN];
        __m512 wdx[MAXN]; /* the weight rows' 4 block scales, each over its 4 lanes */
        for (int i = 0; i < NR; i++) {
            if (BITS == 4) {
                __m512i raw = _mm512_loadu_si512((const void *)(wq[i] + b * 16));
                lo[i] = _mm512_and_si512(raw, low4x);
                hi[i] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4x);
            } else {
                lo[i] = _mm512_loadu_si512((const void *)(wq[i] + b * 32));
                hi[i] = _mm512_loadu_si512((const void *)(wq[i] + b * 32 + 64));
            }
            __m128 wd4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(wd[i] + b)));
            wdx[i] = _mm512_permutexvar_ps(quad_pattern, _mm512_castps128_ps512(wd4));
        }
        for (int r = 0; r < R; r++) {
            __m512i a0 = _mm512_loadu_si512((const void *)(aq[r] + b * QK));
            __m512i a1 = _mm512_loadu_si512((const void *)(aq[r] + b * QK + 64));
            __m512i e0 = a0, e1 = a1;
            if (TERMS == 2) {
                e0 = _mm512_loadu_si512((const void *)(aq[r] + second + b * QK));
                e1 = _mm512_loadu_si512((const void *)(aq[r] + second + b * QK + 64));
            }
            __m512 adx = _mm512_permutexvar_ps(quad_pattern, _mm512_castps128_ps512(_mm_loadu_ps(ad[r] + b)));
            for (int i = 0; i < NR; i++) {
                __m512i dp = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[i], a0);
                dp = _mm512_dpbusd_epi32(dp, hi[i], a1);
                if (TERMS == 2) {
                    __m512i de = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[i], e0);
                    de = _mm512_dpbusd_epi32(de, hi[i], e1);
                    dp = _mm512_add_epi32(_mm512_slli_epi32(dp, 7), de);
                }
                /* the same products as scaling once per block: permuting is exact */
                acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), _mm512_mul_ps(wdx[i], adx), acc[i][r]);
            }
        }
    }
    __m256 acc2[MAXN][MAXR];
    for (int i = 0; i < NR; i++)
        for (int r = 0; r < R; r++) acc2[i][r] = _mm256_setzero_ps();
#else
    const __m256i lo_pattern = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0);
    const __m256i hi_pattern = _mm256_set_epi32(3, 3, 3, 3, 2, 2, 2, 2);
    __m256 acc2[MAXN][MAXR];
    for (int i = 0; i < NR; i++)
        for (int r = 0; r < R; r++) acc2[i][r] = _mm256_setzero_ps();
    for (int b = 0; b < quads; b += 4) {
        __m256i lo0[MAXN], hi0[MAXN], lo1[MAXN], hi1[MAXN];
        __m128 wd4[MAXN];
        for (int i = 0; i < NR; i++) {
            if (BITS == 4) {
                __m256i raw0 = _mm256_loadu_si256((const __m256i *)(wq[i] + b * 16));
                __m256i raw1 = _mm256_loadu_si256((const __m256i *)(wq[i] + b * 16 + 32));
                lo0[i] = _mm256_and_si256(raw0, low4);
                hi0[i] = _mm256_and_si256(_mm256_srli_epi16(raw0, 4), low4);
                lo1[i] = _mm256_and_si256(raw1, low4);
                hi1[i] = _mm256_and_si256(_mm256_srli_epi16(raw1, 4), low4);
            } else {
                const __m256i *raw = (const __m256i *)(wq[i] + b * 32);
                lo0[i] = _mm256_loadu_si256(raw);
                lo1[i] = _mm256_loadu_si256(raw + 1);
                hi0[i] = _mm256_loadu_si256(raw + 2);
                hi1[i] = _mm256_loadu_si256(raw + 3);
            }
            wd4[i] = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(wd[i] + b)));
        }
        for (int r = 0; r < R; r++) {
            const __m256i *a = (const __m256i *)(aq[r] + b * QK);
            __m256i a0 = _mm256_loadu_si256(a), a1 = _mm256_loadu_si256(a + 1);
            __m256i a2 = _mm256_loadu_si256(a + 2), a3 = _mm256_loadu_si256(a + 3);
            const __m256i *e = (const __m256i *)(aq[r] + second + b * QK);
            __m128 ad4 = _mm_loadu_ps(ad[r] + b);
            for (int i = 0; i < NR; i++) {
                __m256 s4 = _mm256_castps128_ps256(_mm_mul_ps(wd4[i], ad4));
                __m256i d01 = dot256(BITS, lo0[i], hi0[i], a0, a2);
                __m256i d23 = dot256(BITS, lo1[i], hi1[i], a1, a3);
                if (TERMS == 2) {
                    d01 = _mm256_add_epi32(_mm256_slli_epi32(d01, 7),
                                           dot256(BITS, lo0[i], hi0[i], _mm256_loadu_si256(e),
                                                  _mm256_loadu_si256(e + 2)));
                    d23 = _mm256_add_epi32(_mm256_slli_epi32(d23, 7),
                                           dot256(BITS, lo1[i], hi1[i], _mm256_loadu_si256(e + 1),
                                                  _mm256_loadu_si256(e + 3)));
                }
                acc2[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d01),
                                             _mm256_permutevar8x32_ps(s4, lo_pattern), acc2[i][r]);
                acc2[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d23),
                                             _mm256_permutevar8x32_ps(s4, hi_pattern), acc2[i][r]);
            }
        }
    }
#endif
    for (int b = quads; b < pairs_end; b += 2) { /* a lone pair: [a0 0..15, a1 0..15, a0 16.., a1 16..] */
        for (int i = 0; i < NR; i++) {
            __m256i lo, hi;
            if (BITS == 4) {
                __m256i raw = _mm256_loadu_si256((const __m256i *)(wq[i] + b * 16));
                lo = _mm256_and_si256(raw, low4);
                hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
            } else {
                lo = _mm256_loadu_si256((const __m256i *)(wq[i] + b * 32));
                hi = _mm256_loadu_si256((const __m256i *)(wq[i] + b * 32 + 32));
            }
            __m128 wd2 = _mm_cvtph_ps(_mm_cvtsi32_si128(*(const int32_t *)(wd[i] + b)));
            for (int r = 0; r < R; r++) {
                const __m256i *a = (const __m256i *)(aq[r] + b * QK);
                __m256i dp = dot256(BITS, lo, hi, _mm256_loadu_si256(a), _mm256_loadu_si256(a + 1));
                if (TERMS == 2) {
                    const __m256i *e = (const __m256i *)(aq[r] + second + b * QK);
                    dp = _mm256_add_epi32(_mm256_slli_epi32(dp, 7),
                                          dot256(BITS, lo, hi, _mm256_loadu_si256(e), _mm256_loadu_si256(e + 1)));
                }
                __m128 ad2 = _mm_castpd_ps(_mm_load_sd((const double *)(ad[r] + b)));
                __m256 sv = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_mul_ps(wd2, ad2)),
                                                     pair_pattern);
                acc2[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp), sv, acc2[i][r]);
            }
        }
    }
    /* each output's lanes, reduced 8 outputs at a time (the same tree for every slot) */
    __m256 lanes[MAXN * MAXR];
    float extra[MAXN][MAXR];
    for (int k = 0; k < MAXN * MAXR; k++) lanes[k] = _mm256_setzero_ps();
    for (int i = 0; i < NR; i++) {
        for (int r = 0; r < R; r++) {
            float tail = 0.0f;
            if (pairs_end < nb) { /* a lone block, in natural order */
                int b = nb - 1;
                __m128i lo, hi;
                if (BITS == 4) {
                    __m128i raw = _mm_loadu_si128((const __m128i *)(wq[i] + b * 16));
                    lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
                    hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
                } else {
                    lo = _mm_loadu_si128((const __m128i *)(wq[i] + b * 32));
                    hi = _mm_loadu_si128((const __m128i *)(wq[i] + b * 32 + 16));
                }
                const __m128i *a = (const __m128i *)(aq[r] + b * QK);
                __m256i dp = dot256(BITS, _mm256_castsi128_si256(lo), _mm256_castsi128_si256(hi),
                                    _mm256_castsi128_si256(_mm_loadu_si128(a)),
                                    _mm256_castsi128_si256(_mm_loadu_si128(a + 1)));
                if (TERMS == 2) {
                    const __m128i *e = (const __m128i *)(aq[r] + second + b * QK);
                    dp = _mm256_add_epi32(_mm256_slli_epi32(dp, 7),
                                          dot256(BITS, _mm256_castsi128_si256(lo), _mm256_castsi128_si256(hi),
                                                 _mm256_castsi128_si256(_mm_loadu_si128(e)),
                                                 _mm256_castsi128_si256(_mm_loadu_si128(e + 1))));
                }
                __m128i s = _mm256_castsi256_si128(dp);
                s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
                s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
                tail = _cvtsh_ss(wd[i][b]) * ad[r][b] * (float)_mm_cvtsi128_si32(s);
            }
            __m256 mv = _mm256_setzero_ps();
            int b = 0;
            for (; b + 8 <= nb; b += 8)
                mv = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wm[i] + b))),
                                     _mm256_loadu_ps(as[r] + b), mv);
            float msum = 0.0f;
            for (; b < nb; b++) msum += _cvtsh_ss(wm[i][b]) * as[r][b];
            __m256 all = _mm256_add_ps(acc2[i][r], mv);
#if defined(HX_AVX512)
            all = _mm256_add_ps(all, _mm256_add_ps(_mm512_castps512_ps256(acc[i][r]),
                                                   _mm512_extractf32x8_ps(acc[i][r], 1)));
#endif
            lanes[i * MAXR + r] = all;
            extra[i][r] = tail + msum;
        }
    }
    float sums[MAXN * MAXR];
    hsum8x8(lanes, sums);
    for (int i = 0; i < NR; i++)
        for (int r = 0; r < R; r++) out[i][r] = sums[i * MAXR + r] + extra[i][r];
#else
    (void)quads;
    (void)pairs_end;
    for (int i = 0; i < NR; i++) {
        for (int r = 0; r < R; r++) {
            float total = 0.0f;
            for (int b = 0; b < nb; b++) {
                int first, g = group_of(b, nb, &first), isum = 0;
                for (int term = 0; term < TERMS; term++) {
                    const int8_t *a = aq[r] + term * second + first * QK + (b - first) * 16;
                    int part = 0;
                    if (BITS == 4) {
                        const uint8_t *qb = wq[i] + b * 16;
                        for (int j = 0; j < 16; j++)
                            part += (qb[j] & 15) * a[j] + (qb[j] >> 4) * a[j + g * 16];
                    } else {
                        const uint8_t *qb = wq[i] + first * QK + (b - first) * 16;
                        for (int j = 0; j < 16; j++) part += qb[j] * a[j] + qb[j + g * 16] * a[j + g * 16];
                    }
                    isum = isum * 128 + part;
                }
                total += half_to_float(wd[i][b]) * ad[r][b] * (float)isum +
                         half_to_float(wm[i][b]) * as[r][b];
            }
            out[i][r] = total;
        }
    }
#endif
}

/* dot_tile with constant tile sizes, widths and terms, so the compiler unrolls each case */
static void dot_rows(const hx_weight *w, int n, int terms, int NR, int R, const int8_t *const *aq,
                     const float *const *ad, const float *const *as, float out[MAXN][MAXR]) {
#define HX_CASE(nbits, t, nr, r)                                  \
    if (w->bits == nbits && terms == t && NR == nr && R == r)     \
        return dot_tile(w, n, nbits, t, nr, r, aq, ad, as, out);
#if MAXR == 8
#define HX_WIDE(nbits, t, nr) \
    HX_CASE(nbits, t, nr, 8) HX_CASE(nbits, t, nr, 7) HX_CASE(nbits, t, nr, 6) HX_CASE(nbits, t, nr, 5)
#else
#define HX_WIDE(nbits, t, nr)
#endif
#define HX_NARROW(nbits, t, nr) \
    HX_CASE(nbits, t, nr, 4) HX_CASE(nbits, t, nr, 3) HX_CASE(nbits, t, nr, 2) HX_CASE(nbits, t, nr, 1)
#define HX_ROWS(nbits, t) \
    HX_WIDE(nbits, t, 2) HX_NARROW(nbits, t, 2) HX_WIDE(nbits, t, 1) HX_NARROW(nbits, t, 1)
    HX_ROWS(4, 1) HX_ROWS(4, 2) HX_ROWS(8, 1) HX_ROWS(8, 2)
#undef HX_ROWS
#undef HX_NARROW
#undef HX_WIDE
#undef HX_CASE
}

typedef struct {
    const hx_weight *w;
    int rows;
    const int8_t *aq;
    const float *ad, *as;
    float *y;
    int ldy, terms;
    const float *residual; /* optional: y = residual + x W^T */
} matmul_job;

static void matmul_task(void *ctx, int ith, int nth) {
    const matmul_job *j = ctx;
    int K = j->w->k, nb = K / QK, lo, hi;
    /* whole tiles of MAXN weight rows per thread */
    split((j->w->n + MAXN - 1) / MAXN, ith, nth, &lo, &hi);
    lo *= MAXN;
    hi = hi * MAXN < j->w->n ? hi * MAXN : j->w->n;
    const size_t row_bytes = (size_t)nb * j->w->bits * 4;
    const int ahead = (int)((PREFETCH_BYTES + row_bytes - 1) / row_bytes);
    for (int n = lo; n < hi; n += MAXN) {
        int NR = hi - n < MAXN ? hi - n : MAXN;
        /* the rows this thread takes a few tiles later: a decode step reads each weight
         * once, from memory, and the hardware's prefetcher alone left it waiting (a
         * quarter of a one-row step, measured) */
        for (int p = n + ahead; p < n + ahead + NR && p < hi; p++) {
            const char *row = (const char *)(j->w->q + p * row_bytes);
            for (size_t off = 0; off < row_bytes; off += 64) PREFETCH(row + off);
            PREFETCH(j->w->d + (size_t)p * nb);
            PREFETCH(j->w->m + (size_t)p * nb);
        }
        for (int r0 = 0; r0 < j->rows; r0 += MAXR) {
            int R = j->rows - r0 < MAXR ? j->rows - r0 : MAXR;
            const int8_t *aq[MAXR];
            const float *ad[MAXR], *as[MAXR];
            float out[MAXN][MAXR];
            for (int r = 0; r < R; r++) {
                aq[r] = j->aq + (size_t)(r0 + r) * K * j->terms;
                ad[r] = j->ad + (size_t)(r0 + r) * nb;
                as[r] = j->as + (size_t)(r0 + r) * nb;
            }
            dot_rows(j->w, n, j->terms, NR, R, aq, ad, as, out);
            for (int i = 0; i < NR; i++) {
                for (int r = 0; r < R; r++) {
                    size_t at = (size_t)(r0 + r) * j->ldy + n + i;
                    j->y[at] = j->residual ? j->residual[at] + out[i][r] : out[i][r];
                }
            }
        }
    }
}

typedef struct {
    int8_t *q;
    float *d, *s;
    int k, terms, rows;
    int tiles; /* for a weight in AMX's layout: blocks in order, rows past 16 padded to 16s */
} q8_buffer;

/* Activations for ``rows`` rows multiplied by weights like ``w`` (1 or 2 terms) */
static int q8_alloc(q8_buffer *b, int rows, const hx_weight *w, int terms) {
    b->k = w->k;
    b->terms = terms;
    b->rows = rows;
    b->tiles = w->tiles;
    int padded = b->tiles && rows > 16 ? (rows + 15) / 16 * 16 : rows;
    size_t row_bytes = (size_t)w->k * terms;
    b->q = malloc(padded * row_bytes);
    b->d = malloc(sizeof(float) * rows * (w->k / QK));
    b->s = malloc(sizeof(float) * rows * (w->k / QK));
    if (b->q) memset(b->q + rows * row_bytes, 0, (padded - rows) * row_bytes);
    return b->q && b->d && b->s;
}

static void q8_free(q8_buffer *b) {
    free(b->q);
    free(b->d);
    free(b->s);
}

static void q8_row(q8_buffer *b, int r, const float *x) {
    int nb = b->k / QK;
    quantize_row(x, b->k, b->terms, b->tiles, b->q + (size_t)r * b->k * b->terms,
                 b->d + (size_t)r * nb, b->s + (size_t)r * nb);
}

typedef struct {
    q8_buffer *buffer;
    const float *x; /* (buffer rows, buffer k) */
} quantize_job;

static void quantize_task(void *ctx, int ith, int nth) {
    const quantize_job *j = ctx;
    int lo, hi;
    split(j->buffer->rows, ith, nth, &lo, &hi);
    for (int r = lo; r < hi; r++) q8_row(j->buffer, r, j->x + (size_t)r * j->buffer->k);
}

/* every row of x into ``buffer`` */
static void quantize_rows(q8_buffer *buffer, const float *x) {
    quantize_job job = {buffer, x};
    run_rows(quantize_task, &job, buffer->rows);
}

/* ------------------------------------------------------------------ q4 x q8 in tiles */

/* The AVX-512 build lays weights out in AMX's tiles ("tiles"): per group of 16 output rows
 * and block of 32 inputs, the 512-byte tile AMX reads its second operand from (4
 * consecutive inputs of each of the 16 rows, row after row of the tile), as nibbles (byte
 * j: value j, and value j + 256 in the high nibble) or as signed bytes; d and m (16 per
 * group and block) in fp16. Activations are q8 blocks in natural order.
 *
 * Each block's sums are exact integers (two terms: 128 I1 + I2), and every output then
 * adds I d_w d_a + m_w s_a block after block in one fp32 lane of its own. Two kernels
 * compute exactly that: the tile unit (tiled_task), 16 rows x 16 outputs x 32 inputs an
 * instruction, for many rows where the CPU has AMX; VNNI with the row's inputs broadcast
 * (broadcast_task) for a few rows or without AMX. Their results are the same bit for bit,
 * so a row's result does not depend on the batch it is in. The tile layout also suits
 * VNNI better than whole rows: each lane ends a block with one output's exact sum, where
 * the row layout converted and scaled every lane's partial sums (measured 1.8x faster for
 * one row, 2.2x for 32). */

int hx_tiles(void) {
#if defined(HX_AMX)
    return TILES_AMX;
#elif defined(HX_AVX512) || defined(HX_AVX2)
    return TILES_VNNI;
#else
    return 0;
#endif
}

#if defined(HX_AMX)
/* tile registers (numerals: the intrinsics paste them into the instruction) */
#define T_SUM1 0
#define T_SUM2 1
#define T_ACT1 2
#define T_ACT2 3
#define T_WEIGHT 4

AMX_TARGET static void tiled_task(void *ctx, int ith, int nth) {
    const matmul_job *j = ctx;
    const hx_weight *w = j->w;
    const int K = w->k, nb = K / QK, groups = w->n / 16, terms = j->terms;
    const int rows = j->rows, chunk = rows < 16 ? rows : 16, tile_bytes = w->bits * 64;
    const size_t act_stride = (size_t)K * terms;
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = T_SUM1; t <= T_ACT2; t++) {
        cfg.rows[t] = (uint8_t)chunk;
        cfg.colsb[t] = t <= T_SUM2 ? 64 : QK;
    }
    cfg.rows[T_WEIGHT] = QK / 4;
    cfg.colsb[T_WEIGHT] = 64;
    _tile_loadconfig(&cfg);
    uint8_t unpacked[512] __attribute__((aligned(64)));
    int32_t sum1[16][16] __attribute__((aligned(64))), sum2[16][16] __attribute__((aligned(64)));
    float *acc = aligned_alloc(64, sizeof(float) * 16 * ((rows + 15) / 16 * 16));
    if (!acc) abort();
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    int lo, hi;
    split(groups, ith, nth, &lo, &hi);
    for (int g = lo; g < hi; g++) {
        const uint8_t *wq = w->q + (size_t)g * nb * tile_bytes;
        const uint16_t *wd = w->d + (size_t)g * nb * 16, *wm = w->m + (size_t)g * nb * 16;
        memset(acc, 0, sizeof(float) * 16 * rows);
        for (int b = 0; b < nb; b++) {
            const uint8_t *tq = wq + (size_t)b * tile_bytes;
            for (int p = 0; p < tile_bytes; p += 64) PREFETCH(tq + PREFETCH_BYTES + p);
            if (w->bits == 4) {
                for (int p = 0; p < 256; p += 64) {
                    __m512i v = _mm512_loadu_si512((const void *)(tq + p));
                    _mm512_store_si512((void *)(unpacked + p), _mm512_and_si512(v, low4));
                    _mm512_store_si512((void *)(unpacked + 256 + p),
                                       _mm512_and_si512(_mm512_srli_epi16(v, 4), low4));
                }
                _tile_loadd(T_WEIGHT, unpacked, 64);
            } else {
                _tile_loadd(T_WEIGHT, tq, 64);
            }
            __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wd + b * 16)));
            __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wm + b * 16)));
            for (int r0 = 0; r0 < rows; r0 += 16) {
                const int8_t *a = j->aq + (size_t)r0 * act_stride + b * QK;
                _tile_zero(T_SUM1);
                _tile_loadd(T_ACT1, a, act_stride);
                _tile_dpbssd(T_SUM1, T_ACT1, T_WEIGHT);
                _tile_stored(T_SUM1, sum1, 64);
                if (terms == 2) {
                    _tile_zero(T_SUM2);
                    _tile_loadd(T_ACT2, a + K, act_stride);
                    _tile_dpbssd(T_SUM2, T_ACT2, T_WEIGHT);
                    _tile_stored(T_SUM2, sum2, 64);
                }
                int r_end = rows - r0 < 16 ? rows - r0 : 16;
                for (int r = 0; r < r_end; r++) {
                    __m512i is = _mm512_load_si512((const void *)sum1[r]);
                    if (terms == 2)
                        is = _mm512_add_epi32(_mm512_slli_epi32(is, 7), _mm512_load_si512((const void *)sum2[r]));
                    size_t at = (size_t)(r0 + r) * nb + b;
                    float *out = acc + (size_t)(r0 + r) * 16;
                    __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_mul_ps(dw, _mm512_set1_ps(j->ad[at])),
                                               _mm512_load_ps(out));
                    if (w->bits == 4) v = _mm512_fmadd_ps(mw, _mm512_set1_ps(j->as[at]), v);
                    _mm512_store_ps(out, v);
                }
            }
        }
        for (int r = 0; r < rows; r++) {
            float *y = j->y + (size_t)r * j->ldy + g * 16;
            __m512 v = _mm512_load_ps(acc + (size_t)r * 16);
            if (j->residual) v = _mm512_add_ps(_mm512_loadu_ps(j->residual + (size_t)r * j->ldy + g * 16), v);
            _mm512_storeu_ps(y, v);
        }
    }
    free(acc);
    _tile_release();
}
#endif

#if defined(HX_AVX512) || defined(HX_DPBUSD256)
/* (rows, terms, blocks): 128 x each activation block's sum, which a product with weights
 * offset by 128 (w + 128, unsigned for dpbusd) has in excess; the caller frees it */
static int32_t *block_offsets(const matmul_job *j) {
    const int K = j->w->k, nb = K / QK, terms = j->terms;
    int32_t *offsets = malloc(sizeof(int32_t) * j->rows * terms * nb);
    if (!offsets) abort();
    for (int r = 0; r < j->rows; r++)
        for (int t = 0; t < terms; t++)
            for (int b = 0; b < nb; b++) {
                const int8_t *a = j->aq + ((size_t)r * terms + t) * K + b * QK;
                int sum = 0;
                for (int i = 0; i < QK; i++) sum += a[i];
                offsets[((size_t)r * terms + t) * nb + b] = 128 * sum;
            }
    return offsets;
}
#endif

#if defined(HX_AVX512)
#define BROADCAST_ROWS 8 /* rows a broadcast pass keeps in registers */
#define AMX_MIN_ROWS 13  /* from here on, tiled weights go to the tile unit where allowed */

/* tiled_task's results, bit for bit, through VNNI (where there is no AMX, or for a few
 * rows, where the tile unit's latency is not worth it): one weight tile row (16 outputs x
 * 4 inputs) times the row's 4 inputs broadcast, so that each of 16 lanes sums one
 * output's block exactly, and the same fp32 steps after. dpbusd takes its first operand
 * unsigned: 8-bit weights are offset by 128 (by flipping the sign bit) and 128 times the
 * block's activation sum taken off again, exactly. */
static void broadcast_task(void *ctx, int ith, int nth) {
    const matmul_job *j = ctx;
    const hx_weight *w = j->w;
    const int K = w->k, nb = K / QK, groups = w->n / 16, terms = j->terms, rows = j->rows;
    const int tile_bytes = w->bits * 64;
    const size_t act_stride = (size_t)K * terms;
    const __m512i low4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8((char)0x80);
    int32_t *offsets = w->bits == 8 ? block_offsets(j) : NULL;
    int lo, hi;
    split(groups, ith, nth, &lo, &hi);
    for (int g = lo; g < hi; g++) {
        const uint8_t *wq = w->q + (size_t)g * nb * tile_bytes;
        const uint16_t *wd = w->d + (size_t)g * nb * 16, *wm = w->m + (size_t)g * nb * 16;
        for (int r0 = 0; r0 < rows; r0 += BROADCAST_ROWS) {
            const int R = rows - r0 < BROADCAST_ROWS ? rows - r0 : BROADCAST_ROWS;
            __m512 acc[BROADCAST_ROWS];
            for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
            for (int b = 0; b < nb; b++) {
                const uint8_t *tq = wq + (size_t)b * tile_bytes;
                if (r0 == 0)
                    for (int p = 0; p < tile_bytes; p += 64) PREFETCH(tq + PREFETCH_BYTES + p);
                __m512i tile[8];
                if (w->bits == 4) {
                    for (int p = 0; p < 4; p++) {
                        __m512i v = _mm512_loadu_si512((const void *)(tq + 64 * p));
                        tile[p] = _mm512_and_si512(v, low4);
                        tile[4 + p] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                    }
                } else {
                    for (int p = 0; p < 8; p++)
                        tile[p] = _mm512_xor_si512(_mm512_loadu_si512((const void *)(tq + 64 * p)), flip);
                }
                __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wd + b * 16)));
                __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wm + b * 16)));
                for (int r = 0; r < R; r++) {
                    const int8_t *a = j->aq + (size_t)(r0 + r) * act_stride + b * QK;
                    __m512i sums[2];
                    for (int t = 0; t < terms; t++) {
                        const int32_t *quads = (const int32_t *)(a + (size_t)t * K);
                        __m512i s0 = _mm512_setzero_si512();
                        for (int p = 0; p < 8; p++)
                            s0 = _mm512_dpbusd_epi32(s0, tile[p], _mm512_set1_epi32(quads[p]));
                        if (offsets)
                            s0 = _mm512_sub_epi32(s0, _mm512_set1_epi32(offsets[((size_t)(r0 + r) * terms + t) * nb + b]));
                        sums[t] = s0;
                    }
                    __m512i is = terms == 2 ? _mm512_add_epi32(_mm512_slli_epi32(sums[0], 7), sums[1]) : sums[0];
                    size_t at = (size_t)(r0 + r) * nb + b;
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_mul_ps(dw, _mm512_set1_ps(j->ad[at])), acc[r]);
                    if (w->bits == 4) acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(j->as[at]), acc[r]);
                }
            }
            for (int r = 0; r < R; r++) {
                size_t at = (size_t)(r0 + r) * j->ldy + g * 16;
                __m512 v = acc[r];
                if (j->residual) v = _mm512_add_ps(_mm512_loadu_ps(j->residual + at), v);
                _mm512_storeu_ps(j->y + at, v);
            }
        }
    }
    free(offsets);
}
#elif defined(HX_AVX2)
#define BROADCAST_ROWS 4 /* rows a broadcast pass keeps in registers (16 of them) */

/* int32 sums of one block for 8 outputs: tile rows w[0..7] (8 outputs x 4 inputs each)
 * times the row's inputs a (32, natural order), 4 at a time broadcast */
static inline __m256i block_sums(const int BITS, const __m256i w[8], const int8_t *a) {
    const int32_t *quads = (const int32_t *)a;
#if defined(HX_DPBUSD256)
    (void)BITS;
    __m256i s = _mm256_setzero_si256();
    for (int p = 0; p < 8; p++) s = HX_DPBUSD256(s, w[p], _mm256_set1_epi32(quads[p]));
    return s;
#else
    const __m256i ones = _mm256_set1_epi16(1);
    if (BITS == 4) { /* pairs of 4-bit x 8-bit products stay below 2^15 / 8: sum in 16 bits */
        __m256i s16 = _mm256_maddubs_epi16(w[0], _mm256_set1_epi32(quads[0]));
        for (int p = 1; p < 8; p++)
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[p], _mm256_set1_epi32(quads[p])));
        return _mm256_madd_epi16(s16, ones);
    }
    __m256i s = _mm256_setzero_si256(); /* signed 8-bit: |w| times a with w's sign */
    for (int p = 0; p < 8; p++) {
        __m256i ap = _mm256_sign_epi8(_mm256_set1_epi32(quads[p]), w[p]);
        s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w[p]), ap), ones));
    }
    return s;
#endif
}

/* broadcast_task for 256-bit vectors: each group's two halves of 8 outputs in turn */
static void broadcast_task(void *ctx, int ith, int nth) {
    const matmul_job *j = ctx;
    const hx_weight *w = j->w;
    const int K = w->k, nb = K / QK, groups = w->n / 16, terms = j->terms, rows = j->rows;
    const int tile_bytes = w->bits * 64;
    const size_t act_stride = (size_t)K * terms;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
#if defined(HX_DPBUSD256)
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    int32_t *offsets = w->bits == 8 ? block_offsets(j) : NULL;
#else
    int32_t *offsets = NULL; /* the sign trick needs no offset */
#endif
    int lo, hi;
    split(groups, ith, nth, &lo, &hi);
    for (int g = lo; g < hi; g++) {
        const uint8_t *wq = w->q + (size_t)g * nb * tile_bytes;
        const uint16_t *wd = w->d + (size_t)g * nb * 16, *wm = w->m + (size_t)g * nb * 16;
        for (int r0 = 0; r0 < rows; r0 += BROADCAST_ROWS) {
            const int R = rows - r0 < BROADCAST_ROWS ? rows - r0 : BROADCAST_ROWS;
            for (int h = 0; h < 2; h++) { /* outputs 8h .. 8h + 7 */
                __m256 acc[BROADCAST_ROWS];
                for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
                for (int b = 0; b < nb; b++) {
                    const uint8_t *tq = wq + (size_t)b * tile_bytes;
                    if (r0 == 0 && h == 0)
                        for (int p = 0; p < tile_bytes; p += 64) PREFETCH(tq + PREFETCH_BYTES + p);
                    __m256i tile[8];
                    if (w->bits == 4) {
                        for (int p = 0; p < 4; p++) {
                            __m256i v = _mm256_loadu_si256((const __m256i *)(tq + 64 * p + 32 * h));
                            tile[p] = _mm256_and_si256(v, low4);
                            tile[4 + p] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                        }
                    } else {
                        for (int p = 0; p < 8; p++) {
                            tile[p] = _mm256_loadu_si256((const __m256i *)(tq + 64 * p + 32 * h));
#if defined(HX_DPBUSD256)
                            tile[p] = _mm256_xor_si256(tile[p], flip);
#endif
                        }
                    }
                    __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + b * 16 + 8 * h)));
                    __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wm + b * 16 + 8 * h)));
                    for (int r = 0; r < R; r++) {
                        const int8_t *a = j->aq + (size_t)(r0 + r) * act_stride + b * QK;
                        __m256i sums[2];
                        for (int t = 0; t < terms; t++) {
                            sums[t] = w->bits == 4 ? block_sums(4, tile, a + (size_t)t * K)
                                                   : block_sums(8, tile, a + (size_t)t * K);
                            if (offsets)
                                sums[t] = _mm256_sub_epi32(
                                    sums[t], _mm256_set1_epi32(offsets[((size_t)(r0 + r) * terms + t) * nb + b]));
                        }
                        __m256i is = terms == 2 ? _mm256_add_epi32(_mm256_slli_epi32(sums[0], 7), sums[1]) : sums[0];
                        size_t at = (size_t)(r0 + r) * nb + b;
                        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), _mm256_mul_ps(dw, _mm256_set1_ps(j->ad[at])),
                                                 acc[r]);
                        if (w->bits == 4) acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(j->as[at]), acc[r]);
                    }
                }
                for (int r = 0; r < R; r++) {
                    size_t at = (size_t)(r0 + r) * j->ldy + g * 16 + 8 * h;
                    __m256 v = acc[r];
                    if (j->residual) v = _mm256_add_ps(_mm256_loadu_ps(j->residual + at), v);
                    _mm256_storeu_ps(j->y + at, v);
                }
            }
        }
    }
    free(offsets);
}
#endif

static void matmul(const hx_weight *w, int rows, const q8_buffer *a, float *y, int ldy,
                   const float *residual) {
    matmul_job job = {w, rows, a->q, a->d, a->s, y, ldy, a->terms, residual};
#if defined(HX_AVX512) || defined(HX_AVX2)
    if (w->tiles) {
#if defined(HX_AMX)
        if (w->tiles == TILES_AMX && rows >= AMX_MIN_ROWS) {
            run_parallel(tiled_task, &job);
            return;
        }
#endif
        run_parallel(broadcast_task, &job);
        return;
    }
#endif
    run_parallel(matmul_task, &job);
}

/* y (rows, w.n) = x (rows, w.k) W^T, activations rounded to q8 per block in ``terms`` (1 or
 * 2) terms. Returns 0, or -1 when memory ran out. */
int hx_linear(const hx_weight *w, int rows, int terms, const float *x, float *y) {
    q8_buffer a;
    int ok = q8_alloc(&a, rows, w, terms == 2 ? 2 : 1);
    if (ok) {
        quantize_rows(&a, x);
        matmul(w, rows, &a, y, w->n, NULL);
    }
    q8_free(&a);
    return ok ? 0 : -1;
}

/* ------------------------------------------------------------------ int8 x int8 with AMX */

/* Prompts (many rows at once) are compute-bound. Where the CPU has AMX (Intel Xeon 4th gen
 * and later), its tile unit multiplies int8 matrices several times faster than VNNI. The
 * weight is int8 per output row (w = q * scale), packed once in the layout AMX reads its
 * second operand in; each activation row is rounded to int8 twice (the row, then its
 * rounding error: ~14 bits), as quant.Int8Linear does through PyTorch elsewhere:
 * y = (sum q_hi q * s_hi + sum q_lo q * s_lo) * scale. The sums are exact integers and
 * each output is scaled by the same operations whatever the number of rows, so results
 * never depend on the batch. The tile unit is only entered through hx_amx_* below, which
 * the avx512_vnni build compiles for AMX at the function level, and Python only calls
 * them after hx_amx_init() said yes. */


typedef struct {
    const int8_t *q;    /* (N / 16, K / 4, 16, 4): tiles of 16 outputs x 4 inputs a row */
    const float *scale; /* (N,) */
    int32_t n, k;
} hx_int8_weight;

/* Round each of ``rows`` rows of x (rows, k) to int8 in ``terms`` terms: hi (and lo) are
 * (rows padded to 16, k), the padding left zero; s_hi, s_lo (rows,) their scales. The
 * rule is quant._round_rows's: scale = max(|max|, 1e-30) / 127, q = round(x / scale). */
typedef struct {
    const float *x;
    int8_t *hi, *lo;
    float *s_hi, *s_lo;
    int rows, k, terms;
} round_job;

#if defined(HX_AMX)
/* k a multiple of 64 (hx_amx_linear's precondition) */
static float round_row(const float *x, int k, int8_t *q) {
    __m512 m0 = _mm512_setzero_ps(), m1 = _mm512_setzero_ps();
    for (int i = 0; i < k; i += 32) {
        m0 = _mm512_max_ps(m0, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
        m1 = _mm512_max_ps(m1, _mm512_abs_ps(_mm512_loadu_ps(x + i + 16)));
    }
    float scale = fmaxf(_mm512_reduce_max_ps(_mm512_max_ps(m0, m1)), 1e-30f) / 127.0f;
    __m512 sv = _mm512_set1_ps(scale);
    for (int i = 0; i < k; i += 16) {
        __m512 t = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + i), sv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(t)));
    }
    return scale;
}

static void round_task(void *ctx, int ith, int nth) {
    const round_job *j = ctx;
    int lo, hi;
    split(j->rows, ith, nth, &lo, &hi);
    float *err = j->terms == 2 ? aligned_alloc(64, sizeof(float) * j->k) : NULL;
    if (j->terms == 2 && !err) abort();
    for (int r = lo; r < hi; r++) {
        const float *x = j->x + (size_t)r * j->k;
        int8_t *h = j->hi + (size_t)r * j->k;
        float s = round_row(x, j->k, h);
        j->s_hi[r] = s;
        if (j->terms == 2) { /* x - q s, as PyTorch computes it (no fused multiply-add) */
            __m512 sv = _mm512_set1_ps(s);
            for (int i = 0; i < j->k; i += 16) {
                __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(h + i))));
                _mm512_store_ps(err + i, _mm512_sub_ps(_mm512_loadu_ps(x + i), _mm512_mul_ps(q, sv)));
            }
            j->s_lo[r] = round_row(err, j->k, j->lo + (size_t)r * j->k);
        }
    }
    free(err);
}
#endif

typedef struct {
    const hx_int8_weight *w;
    const int8_t *hi, *lo;
    const float *s_hi, *s_lo;
    float *y;
    int rows, terms;
} amx_job;

#if defined(HX_AMX)
/* y for rows m0.. (up to 16) and outputs n0.. (16 a tile, NT tiles) from the int32 tiles c:
 * c[t] the high term's sums against weight tile t, c[2 + t] the low term's */
static inline void amx_store(const amx_job *j, int m0, int n0, int NT, int32_t c[4][16][16]) {
    int N = j->w->n, m_end = j->rows - m0 < 16 ? j->rows - m0 : 16;
    for (int t = 0; t < NT; t++) {
        __m512 sc = _mm512_loadu_ps(j->w->scale + n0 + 16 * t);
        for (int m = 0; m < m_end; m++) { /* in quant.py's order of operations */
            __m512 hi = _mm512_cvtepi32_ps(_mm512_load_si512(c[t][m]));
            __m512 s_hi = _mm512_set1_ps(j->s_hi[m0 + m]), v;
            if (j->terms == 2) {
                __m512 lo = _mm512_cvtepi32_ps(_mm512_load_si512(c[2 + t][m]));
                v = _mm512_add_ps(_mm512_mul_ps(hi, s_hi), _mm512_mul_ps(lo, _mm512_set1_ps(j->s_lo[m0 + m])));
                v = _mm512_mul_ps(v, sc);
            } else {
                v = _mm512_mul_ps(hi, _mm512_mul_ps(s_hi, sc));
            }
            _mm512_storeu_ps(j->y + (size_t)(m0 + m) * N + n0 + 16 * t, v);
        }
    }
}

/* Tiles: 0-3 sums (16 rows x 16 int32), 4-5 the rows' high and low terms (16 rows x 64
 * inputs), 6-7 two weight tiles (16 quads of inputs x 16 outputs x 4). */
AMX_TARGET static void amx_task(void *ctx, int ith, int nth) {
    const amx_job *j = ctx;
    const int K = j->w->k, N = j->w->n, quads = K / 4;
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
    int32_t c[4][16][16] __attribute__((aligned(64)));
    int lo, hi, padded = (j->rows + 15) / 16 * 16;
    split((N / 16 + 1) / 2, ith, nth, &lo, &hi); /* pairs of weight tiles */
    for (int p = lo; p < hi; p++) {
        int n0 = 32 * p, NT = n0 + 32 <= N ? 2 : 1;
        const int8_t *w0 = j->w->q + (size_t)(n0 / 16) * quads * 64, *w1 = w0 + (size_t)quads * 64;
        for (int m0 = 0; m0 < padded; m0 += 16) {
            const int8_t *a_hi = j->hi + (size_t)m0 * K, *a_lo = j->lo + (size_t)m0 * K;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int k = 0; k < K; k += 64) {
                _tile_loadd(4, a_hi + k, K);
                _tile_loadd(6, w0 + k * 16, 64);
                _tile_dpbssd(0, 4, 6);
                if (NT == 2) {
                    _tile_loadd(7, w1 + k * 16, 64);
                    _tile_dpbssd(1, 4, 7);
                }
                if (j->terms == 2) {
                    _tile_loadd(5, a_lo + k, K);
                    _tile_dpbssd(2, 5, 6);
                    if (NT == 2) _tile_dpbssd(3, 5, 7);
                }
            }
            _tile_stored(0, c[0], 64);
            _tile_stored(1, c[1], 64);
            _tile_stored(2, c[2], 64);
            _tile_stored(3, c[3], 64);
            amx_store(j, m0, n0, NT, c);
        }
    }
    _tile_release();
}
#endif

/* y (rows, w.n) = x (rows, w.k) W^T through AMX, x in ``terms`` (1 or 2) int8 terms a row.
 * w.k must be a multiple of 64 and w.n of 16. Returns 0; -1 when memory ran out; -2 where
 * this build has no AMX. */
int hx_amx_linear(const hx_int8_weight *w, int rows, int terms, const float *x, float *y) {
#if defined(HX_AMX)
    int padded = (rows + 15) / 16 * 16;
    terms = terms == 2 ? 2 : 1;
    size_t plane = (size_t)padded * w->k; /* one term's bytes */
    int8_t *q = malloc(plane * terms);
    float *s = malloc(sizeof(float) * rows * 2);
    int ok = q && s;
    if (ok) {
        for (int t = 0; t < terms; t++) /* rows past the last stay zero */
            memset(q + t * plane + (size_t)rows * w->k, 0, (size_t)(padded - rows) * w->k);
        round_job rj = {x, q, q + plane, s, s + rows, rows, w->k, terms};
        run_rows(round_task, &rj, rows);
        amx_job aj = {w, rj.hi, rj.lo, rj.s_hi, rj.s_lo, y, rows, terms};
        run_parallel(amx_task, &aj);
    }
    free(q);
    free(s);
    return ok ? 0 : -1;
#else
    (void)w, (void)rows, (void)terms, (void)x, (void)y;
    return -2;
#endif
}

/* ------------------------------------------------------------------ a decode layer */

typedef struct {
    int32_t hidden, heads, kv_heads, head_dim, intermediate;
    float eps;
    const float *attn_norm, *mlp_norm;
    const hx_weight *qkv, *wo, *gate_up, *down;
    /* What other families add to Llama's layer; NULL or 0 where a layer has none, so a
     * Llama layer runs exactly as before. */
    const float *qkv_bias; /* ((heads + 2 kv_heads) head_dim): Qwen2's, added to the product */
    const float *qk_norm;  /* (heads + kv_heads, head_dim): Qwen3's RMSNorm of each q, k head */
    int32_t window;        /* > 0: sliding window, a query sees its last ``window`` keys */
} hx_layer;

typedef struct {
    int32_t rows;
    const float *cos, *sin;   /* (rows, head_dim / 2): this step's rotation */
    const int32_t *positions; /* (rows,): where each row's token goes (= tokens before it) */
    const int64_t *table;     /* (rows, table_width) block ids */
    int32_t table_width, block_size;
    uint16_t *k, *v; /* this layer's bf16 cache: (blocks * block_size, kv_heads, head_dim) */
} hx_step;

/* x / rms(x) * w of n values into out, which may be x itself (the statistic comes first) */
static void rms_norm_row(const float *x, const float *w, int n, float eps, float *out) {
    float acc[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] += x[i + l] * x[i + l];
    float ss = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
}

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* e^x for x <= 0 (softmax after subtracting the maximum): 2^(x log2 e) split into an
 * integer power and a degree-6 polynomial on [-0.5, 0.5]; relative error below 2e-7 */
static inline float exp_neg(float x) {
    if (x < -87.0f) return 0.0f;
    float t = x * 1.44269504088896341f;
    float n = nearbyintf(t);
    float f = t - n;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, 4);
    return p * scale;
}

/* bf16 values as fp32 (n a multiple of 8) */
static inline void widen_bf16(const uint16_t *src, float *dst, int n) {
#if defined(HX_AVX512) || defined(HX_AVX2)
    for (int i = 0; i < n; i += 8) {
        __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i))), 16);
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(w));
    }
#else
    for (int i = 0; i < n; i++) dst[i] = from_bf16(src[i]);
#endif
}

/* a . b in 8 lanes, then the lanes summed (n a multiple of 8) */
static inline float dot(const float *a, const float *b, int n) {
#if defined(HX_AVX512) || defined(HX_AVX2)
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    return hsum256(acc);
#else
    float part[8] = {0};
    for (int i = 0; i < n; i += 8)
        for (int l = 0; l < 8; l++) part[l] += a[i + l] * b[i + l];
    return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
#endif
}

/* acc += p v */
static inline void axpy(float p, const float *v, float *acc, int n) {
#if defined(HX_AVX512) || defined(HX_AVX2)
    __m256 pv = _mm256_set1_ps(p);
    for (int i = 0; i < n; i += 8)
        _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(acc + i)));
#else
    for (int i = 0; i < n; i++) acc[i] += p * v[i];
#endif
}

/* out[i] = scale * (q . keys[i]) for n <= 8 bf16 keys; each dot is summed in 8 lanes and the
 * lanes of all 8 reduced together, the same operations for a key whatever its neighbours */
static inline void dot8(const float *q, const uint16_t *const *keys, int n, int D, float scale,
                        float *out) {
#if defined(HX_AVX512) || defined(HX_AVX2)
    __m256 acc[8];
    for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
    for (int d = 0; d < D; d += 8) {
        __m256 qv = _mm256_loadu_ps(q + d);
        for (int i = 0; i < n; i++) {
            __m256i k32 = _mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(keys[i] + d))), 16);
            acc[i] = _mm256_fmadd_ps(qv, _mm256_castsi256_ps(k32), acc[i]);
        }
    }
    float sums[8];
    hsum8x8(acc, sums);
    for (int i = 0; i < n; i++) out[i] = sums[i] * scale;
#else
    float kf[256];
    for (int i = 0; i < n; i++) {
        widen_bf16(keys[i], kf, D);
        out[i] = dot(q, kf, D) * scale;
    }
#endif
}

typedef struct {
    const hx_layer *L;
    const hx_step *S;
    const float *qkv; /* (rows, (heads + 2 kv_heads) * head_dim), rotated */
    float *out;       /* (rows, heads * head_dim) */
    int max_len;
} attention_job;

/* The cache slot of row ``r``'s token ``t`` */
static inline int64_t slot_of(const hx_step *S, int r, int t) {
    return S->table[(size_t)r * S->table_width + t / S->block_size] * S->block_size + t % S->block_size;
}

/* softmax numerators of ``len`` scores in place; returns their sum (in order) */
static float softmax_numerators(float *sc, int len) {
    float best = -INFINITY, sum = 0.0f;
    for (int t = 0; t < len; t++) best = fmaxf(best, sc[t]);
    for (int t = 0; t < len; t++) sc[t] = exp_neg(sc[t] - best); /* vectorised */
    for (int t = 0; t < len; t++) sum += sc[t];
    return sum;
}

#if defined(HX_AVX512)
static inline __m512 widen16_bf16(const uint16_t *src) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

/* Grouped-query attention of G query heads (q: G x D, D = 16 DV) over ``len`` cached keys
 * and values of one kv head, the row's tokens ``first`` to ``first + len - 1``, with every
 * accumulator in a register: each key and value is widened from bf16 once for all G heads.
 * Scores go to ``scores`` (G x len), the output to ``o`` (G x D). A head's sums run in the
 * same order whatever else is in the step. */
static inline __attribute__((always_inline)) void attend_heads(
    const int DV, const int G, const hx_step *S, int KV, int r, int g, const float *q,
    int first, int len, float scale, float *scores, float *o) {
    const int D = 16 * DV;
    const int64_t *blocks = S->table + (size_t)r * S->table_width;
    const int bs = S->block_size;
    const size_t stride = (size_t)KV * D; /* elements from one slot to the next */
    const uint16_t *last = S->k + ((size_t)slot_of(S, r, first + len - 1) * KV + g) * D;
    int blk = first / bs, off = first % bs; /* the next key's block and offset, by counting */
    for (int t = 0; t < len; t += 8) { /* scores of 8 keys at a time: one reduction */
        const uint16_t *keys[8];
        for (int i = 0; i < 8; i++) { /* past the end: the last key again, its score unused */
            keys[i] = last;
            if (t + i < len) {
                keys[i] = S->k + ((size_t)blocks[blk] * bs + off) * stride + (size_t)g * D;
                if (++off == bs) off = 0, blk++;
            }
        }
        __m512 acc[8][G];
        for (int i = 0; i < 8; i++)
            for (int h = 0; h < G; h++) acc[i][h] = _mm512_setzero_ps();
        for (int i = 0; i < 8; i++) {
            for (int c = 0; c < DV; c++) {
                __m512 k = widen16_bf16(keys[i] + 16 * c);
                for (int h = 0; h < G; h++)
                    acc[i][h] = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * D + 16 * c), k, acc[i][h]);
            }
        }
        int n = len - t < 8 ? len - t : 8;
        for (int h = 0; h < G; h++) {
            __m256 lanes[8];
            float sums[8];
            for (int i = 0; i < 8; i++)
                lanes[i] = _mm256_add_ps(_mm512_castps512_ps256(acc[i][h]), _mm512_extractf32x8_ps(acc[i][h], 1));
            hsum8x8(lanes, sums);
            for (int i = 0; i < n; i++) scores[h * len + t + i] = sums[i] * scale;
        }
    }
    float total[G];
    for (int h = 0; h < G; h++) total[h] = softmax_numerators(scores + h * len, len);
    __m512 acc[G][DV];
    for (int h = 0; h < G; h++)
        for (int c = 0; c < DV; c++) acc[h][c] = _mm512_setzero_ps();
    blk = first / bs, off = first % bs;
    for (int t = 0; t < len; t++) {
        const uint16_t *v = S->v + ((size_t)blocks[blk] * bs + off) * stride + (size_t)g * D;
        if (++off == bs) off = 0, blk++;
        for (int c = 0; c < DV; c++) {
            __m512 vf = widen16_bf16(v + 16 * c);
            for (int h = 0; h < G; h++)
                acc[h][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[h * len + t]), vf, acc[h][c]);
        }
    }
    for (int h = 0; h < G; h++)
        for (int c = 0; c < DV; c++)
            _mm512_storeu_ps(o + h * D + 16 * c, _mm512_div_ps(acc[h][c], _mm512_set1_ps(total[h])));
}

/* attend_heads for up to 4 heads of 64 or 128 dimensions; 0 where it has no such case */
static int attend_fast(int D, int G, const hx_step *S, int KV, int r, int g, const float *q,
                       int first, int len, float scale, float *scores, float *o) {
#define HX_ATTEND(dv, gg)                                                                    \
    if (D == 16 * dv && G == gg) {                                                           \
        attend_heads(dv, gg, S, KV, r, g, q, first, len, scale, scores, o);                  \
        return 1;                                                                            \
    }
    HX_ATTEND(4, 1) HX_ATTEND(4, 2) HX_ATTEND(4, 3) HX_ATTEND(4, 4)
    HX_ATTEND(8, 1) HX_ATTEND(8, 2) HX_ATTEND(8, 3) HX_ATTEND(8, 4)
#undef HX_ATTEND
    return 0;
}
#endif

/* One (row, kv head) task: the query heads sharing those keys and values (grouped-query
 * attention) read each cached key and value once. Each head's sums run in the same order
 * whatever else is in the step. A sliding window (``window``) starts the keys later: a
 * query at position p sees p - window < t <= p, as ops.causal_mask(window=); keys before
 * it stay in the cache, unread. */
static void attention_task(void *ctx, int ith, int nth) {
    const attention_job *j = ctx;
    const hx_layer *L = j->L;
    const hx_step *S = j->S;
    int H = L->heads, KV = L->kv_heads, D = L->head_dim, group = H / KV;
    int width = (H + 2 * KV) * D;
    float scale = 1.0f / sqrtf((float)D);
    int max_len = j->max_len > 0 ? j->max_len : 1;
    float *scores = malloc(sizeof(float) * group * max_len);
    float *acc = malloc(sizeof(float) * group * D);
    float *kv = malloc(sizeof(float) * D);
    float *total = malloc(sizeof(float) * group);
    if (!scores || !acc || !kv || !total) abort();
    int lo, hi;
    split(S->rows * KV, ith, nth, &lo, &hi);
    for (int task = lo; task < hi; task++) {
        int r = task / KV, g = task % KV;
        const float *q = j->qkv + (size_t)r * width + g * group * D;
        float *o = j->out + (size_t)r * H * D + g * group * D;
        int len = S->positions[r] + 1, first = 0;
        if (L->window > 0 && len > L->window) first = len - L->window, len = L->window;
#if defined(HX_AVX512)
        int done = 1; /* heads in chunks of up to 4, each chunk's keys widened once */
        for (int h0 = 0; h0 < group && done; h0 += 4) {
            int G = group - h0 < 4 ? group - h0 : 4;
            done = attend_fast(D, G, S, KV, r, g, q + h0 * D, first, len, scale, scores,
                               o + h0 * D);
        }
        if (done) continue;
#endif
        for (int t = 0; t < len; t += 8) { /* keys 8 at a time: one reduction for 8 dots */
            int n = len - t < 8 ? len - t : 8;
            const uint16_t *keys[8];
            for (int i = 0; i < n; i++)
                keys[i] = S->k + ((size_t)slot_of(S, r, first + t + i) * KV + g) * D;
            for (int h = 0; h < group; h++) dot8(q + h * D, keys, n, D, scale, scores + h * len + t);
        }
        for (int h = 0; h < group; h++) total[h] = softmax_numerators(scores + h * len, len);
        memset(acc, 0, sizeof(float) * group * D);
        for (int t = 0; t < len; t++) {
            widen_bf16(S->v + ((size_t)slot_of(S, r, first + t) * KV + g) * D, kv, D);
            for (int h = 0; h < group; h++) axpy(scores[h * len + t], kv, acc + h * D, D);
        }
        for (int i = 0; i < group * D; i++) o[i] = acc[i] / total[i / D];
    }
    free(scores);
    free(acc);
    free(kv);
    free(total);
}

/* x sigmoid(x), with e^-|x| from exp_neg (vectorisable, unlike libm's expf) */
static inline float silu(float x) {
    float e = exp_neg(-fabsf(x));
    return x >= 0.0f ? x / (1.0f + e) : x * e / (1.0f + e);
}

/* The per-row steps between the matrix products: for many rows, split across threads. */
typedef struct {
    const hx_layer *L;
    int kind; /* NORM: RMSNorm of x into q8; SWIGLU: silu(gate) * up of gu into q8 */
    const float *x;
    float *scratch;
    q8_buffer *out;
    const float *weight;
} row_job;

enum { NORM, SWIGLU };

static void row_task(void *ctx, int ith, int nth) {
    const row_job *j = ctx;
    int lo, hi, hidden = j->L->hidden, inter = j->L->intermediate;
    split(j->out->rows, ith, nth, &lo, &hi);
    for (int r = lo; r < hi; r++) {
        if (j->kind == NORM) {
            float *n = j->scratch + (size_t)r * hidden;
            rms_norm_row(j->x + (size_t)r * hidden, j->weight, hidden, j->L->eps, n);
            q8_row(j->out, r, n);
        } else {
            float *g = (float *)j->x + (size_t)r * 2 * inter, *u = g + inter;
            for (int i = 0; i < inter; i++) g[i] = silu(g[i]) * u[i];
            q8_row(j->out, r, g);
        }
    }
}

static void rows_step(const hx_layer *L, int kind, const float *x, float *scratch, q8_buffer *out,
                      const float *weight) {
    row_job job = {L, kind, x, scratch, out, weight};
    run_rows(row_task, &job, out->rows);
}

/* Rotate-half RoPE of one head in place. */
static void rope_head(float *x, const float *cos, const float *sin, int D) {
    int half = D / 2;
    for (int i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i] + a * sin[i];
    }
}

/* One decoder layer for a decode step: x (rows, hidden) is the residual stream, updated in
 * place; this step's keys and values are written to the cache. Qwen2's Q/K/V bias, Qwen3's
 * q/k norms and a sliding window run where the layer has them (hx_layer), in the order the
 * op-by-op path runs them (model.Llama.forward). Returns 0, or -1 when memory ran out (x is
 * then unchanged). */
int hx_decode_layer(const hx_layer *L, const hx_step *S, float *x) {
    int rows = S->rows, hidden = L->hidden, H = L->heads, KV = L->kv_heads, D = L->head_dim;
    int inter = L->intermediate, width = (H + 2 * KV) * D;
    float *norm = malloc(sizeof(float) * rows * hidden);
    float *qkv = malloc(sizeof(float) * rows * width);
    float *attn = malloc(sizeof(float) * rows * H * D);
    float *gu = malloc(sizeof(float) * rows * 2 * inter);
    float *mid = malloc(sizeof(float) * rows * hidden);
    q8_buffer a_hidden = {0}, a_attn = {0}, a_inter = {0};
    int ok = norm && qkv && attn && gu && mid && q8_alloc(&a_hidden, rows, L->qkv, 2) &&
             q8_alloc(&a_attn, rows, L->wo, 2) && q8_alloc(&a_inter, rows, L->down, 2);
    if (ok) {
        int max_len = 0;
        for (int r = 0; r < rows; r++)
            if (S->positions[r] + 1 > max_len) max_len = S->positions[r] + 1;
        if (L->window > 0 && max_len > L->window) max_len = L->window; /* keys a row reads */
        rows_step(L, NORM, x, norm, &a_hidden, L->attn_norm);
        matmul(L->qkv, rows, &a_hidden, qkv, width, NULL);
        for (int r = 0; r < rows; r++) {
            float *row = qkv + (size_t)r * width;
            if (L->qkv_bias) /* after the product, as the op-by-op path adds it */
                for (int i = 0; i < width; i++) row[i] += L->qkv_bias[i];
            if (L->qk_norm) /* each q and k head on its own, before RoPE */
                for (int h = 0; h < H + KV; h++)
                    rms_norm_row(row + h * D, L->qk_norm + h * D, D, L->eps, row + h * D);
            const float *c = S->cos + (size_t)r * (D / 2), *s = S->sin + (size_t)r * (D / 2);
            for (int h = 0; h < H + KV; h++) rope_head(row + h * D, c, s, D);
            int pos = S->positions[r];
            int64_t slot = S->table[(size_t)r * S->table_width + pos / S->block_size] * S->block_size +
                           pos % S->block_size;
            for (int i = 0; i < KV * D; i++) {
                S->k[(size_t)slot * KV * D + i] = to_bf16(row[H * D + i]);
                S->v[(size_t)slot * KV * D + i] = to_bf16(row[(H + KV) * D + i]);
            }
        }
        attention_job aj = {L, S, qkv, attn, max_len};
        run_parallel(attention_task, &aj);
        quantize_rows(&a_attn, attn);
        matmul(L->wo, rows, &a_attn, mid, hidden, x);
        rows_step(L, NORM, mid, norm, &a_hidden, L->mlp_norm);
        matmul(L->gate_up, rows, &a_hidden, gu, 2 * inter, NULL);
        rows_step(L, SWIGLU, gu, NULL, &a_inter, NULL);
        matmul(L->down, rows, &a_inter, x, hidden, mid);
    }
    free(norm);
    free(qkv);
    free(attn);
    free(gu);
    free(mid);
    q8_free(&a_hidden);
    q8_free(&a_attn);
    q8_free(&a_inter);
    return ok ? 0 : -1;
}
