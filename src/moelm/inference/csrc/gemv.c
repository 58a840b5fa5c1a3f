/* Matrix-vector products for decoding (few rows of x against a weight read once from memory).
 *
 * y[m, o] = sum_i x[m, i] * W[o, i] (+ bias[o]) for m < M, with W [O, I] row-major in one of four formats:
 *   f32, bf16 (raw uint16), int8 with one fp32 scale per output row, int4 with one scale per group of G inputs,
 *   fp32 or (`half`) fp16 (G/2 bytes per group: byte j holds input j in its low nibble and input j + G/2 in its
 *   high nibble, value = (nibble - 8) * scale).
 * `wsel` (may be NULL) picks a matrix per row of x out of E stacked [E, O, I] ones: the experts chosen per token.
 * int8/int4 run in integers against x rounded to int16 (see GEMV_INT), each weight row unpacked once for up to 4
 * rows of x; bf16 with one row of x runs with x permuted so the weights convert without shuffles, with more rows
 * each weight row is converted to fp32 once and shared by all of them.
 * attend_f32 is the rest of a decoding step's attention: rotary embedding, KV-cache write, softmax attention.
 * Written with GCC vector extensions so the compiler emits the machine's SIMD; threads via OpenMP (the same
 * libgomp that PyTorch uses). x and y are fp32 and contiguous; I is a multiple of 32. */
#include <float.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));
typedef uint32_t v8u32 __attribute__((vector_size(32)));

static inline v8f ld_f32(const float *p) { v8f v; memcpy(&v, p, 32); return v; }
#ifdef __AVX2__
#include <immintrin.h>
static inline v8f from_m256(__m256 a) { v8f v; memcpy(&v, &a, 32); return v; }
/* 8 bf16 as fp32 (written out: inside some loops GCC lowers the generic form to shuffles) */
static inline v8f ld_bf16(const uint16_t *p) {
    __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
    return from_m256(_mm256_castsi256_ps(u));
}
static inline v8f ld_i8(const int8_t *p) {
    return from_m256(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))));
}
static inline v8f u8_to_f32(__m128i b) { return from_m256(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b))); }
/* 16 packed bytes -> the 32 nibbles as four v8f: low nibbles 0-7, 8-15, high nibbles 0-7, 8-15 */
static inline void ld_i4(const uint8_t *p, v8f out[4]) {
    __m128i b = _mm_loadu_si128((const __m128i *)p), mask = _mm_set1_epi8(15);
    __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    out[0] = u8_to_f32(lo); out[1] = u8_to_f32(_mm_srli_si128(lo, 8));
    out[2] = u8_to_f32(hi); out[3] = u8_to_f32(_mm_srli_si128(hi, 8));
}
#else
static inline v8f ld_bf16(const uint16_t *p) {
    v8u16 h; memcpy(&h, p, 16);
    v8u32 u = __builtin_convertvector(h, v8u32) << 16;
    v8f v; memcpy(&v, &u, 32); return v;
}
static inline v8f ld_i8(const int8_t *p) {
    v8f v; for (int k = 0; k < 8; k++) v[k] = p[k]; return v;
}
static inline void ld_i4(const uint8_t *p, v8f out[4]) {
    for (int k = 0; k < 8; k++) {
        out[0][k] = p[k] & 15; out[1][k] = p[k + 8] & 15; out[2][k] = p[k] >> 4; out[3][k] = p[k + 8] >> 4;
    }
}
#endif
/* Software prefetch PREFETCH bytes ahead of the weight stream (each thread reads its rows in order), in the integer
 * kernels: 10-30% more read bandwidth than the hardware prefetchers alone give them on the 1-6 MB matrices of a
 * decoding step here (it slows the fp32 and bf16 kernels down, which have it not). */
#define PREFETCH 4096
static inline void prefetch(const void *p) { __builtin_prefetch((const char *)p + PREFETCH, 0, 3); }
/* The pairs of the 512-bit int4 kernel prefetch further, into L2 (see dot_i4sw2) */
static inline void prefetch_l2(const void *p) { __builtin_prefetch((const char *)p + 8192, 0, 2); }
static inline float hsum(v8f a) { return a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7]; }

/* An fp16 value (its bits) as fp32, exactly; without _Float16, which compilers before GCC 12 lack on x86 (intgemm.c
 * uses it too). */
float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 31) bits = sign | 0x7F800000u | (man << 13);  /* inf, nan */
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man) bits = sign;
    else {  /* subnormal: man * 2^-24, normalized */
        int shift = 0;
        while (!(man & 1024)) { man <<= 1; shift++; }
        bits = sign | ((uint32_t)(113 - shift) << 23) | ((man & 1023) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Weight row `row`'s srow scales as fp32: fp32 ones in place, fp16 ones (half) converted into tmp [srow]; NULL
 * without scales. */
static inline const float *row_scales(const void *scale, int half, int64_t row, int64_t srow, float *tmp) {
    if (!scale) return 0;
    if (!half) return (const float *)scale + row * srow;
    const uint16_t *s = (const uint16_t *)scale + row * srow;
    int64_t i = 0;
#if defined(__F16C__) && defined(__AVX2__)
    for (; i + 8 <= srow; i += 8) _mm256_storeu_ps(tmp + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
#endif
    for (; i < srow; i++) tmp[i] = half_to_float(s[i]);
    return tmp;
}

/* dot(x, w) over n (a multiple of 32) with four independent sums; LOAD turns 8 weights into fp32. */
#define DOT(NAME, WT, LOAD)                                                                                   \
static inline float NAME(const float *x, const WT *w, int64_t n) {                                          \
    v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                                              \
    for (int64_t i = 0; i < n; i += 32) {                                                                    \
        a0 += ld_f32(x + i) * LOAD(w + i);                                                                   \
        a1 += ld_f32(x + i + 8) * LOAD(w + i + 8);                                                           \
        a2 += ld_f32(x + i + 16) * LOAD(w + i + 16);                                                         \
        a3 += ld_f32(x + i + 24) * LOAD(w + i + 24);                                                         \
    }                                                                                                        \
    return hsum((a0 + a1) + (a2 + a3));                                                                      \
}
DOT(dot_f32, float, ld_f32)

/* y[m * ystride + r] = dot(x[m], w_r) for M rows of x and R <= 2 weight rows w0, w1 (w1 NULL: one): blocks of
 * 4 rows of x times 2 weight rows keep 8 sums in registers, 6 loads for 8 multiply-adds. With several rows of x
 * the loop is compute-bound and the hardware prefetcher falls behind (each 4 KB weight row is a new page), so the
 * first pass also prefetches `next` (the next weight rows' pf_bytes), spread over its steps: 8 rows of x 22 ->
 * 29-31 GMAC/s on 2 threads. */
static inline void dots_f32(const float *x, int64_t M, const float *w0, const float *w1, int64_t n, float *y,
                            int64_t ystride, const char *next, int64_t pf_bytes) {
    int64_t m = 0, step = pf_bytes * 8 / n;  /* bytes of `next` per 8 inputs */
    if (w1) {
        for (; m + 4 <= M; m += 4) {
            const float *x0 = x + m * n, *x1 = x0 + n, *x2 = x1 + n, *x3 = x2 + n;
            v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
            for (int64_t i = 0; i < n; i += 8) {
                if (next && m == 0) __builtin_prefetch(next + (i >> 3) * step, 0, 3);
                v8f u = ld_f32(w0 + i), v = ld_f32(w1 + i), xv;
                xv = ld_f32(x0 + i); a0 += xv * u; b0 += xv * v;
                xv = ld_f32(x1 + i); a1 += xv * u; b1 += xv * v;
                xv = ld_f32(x2 + i); a2 += xv * u; b2 += xv * v;
                xv = ld_f32(x3 + i); a3 += xv * u; b3 += xv * v;
            }
            float *ym = y + m * ystride;
            ym[0] = hsum(a0); ym[ystride] = hsum(a1); ym[2 * ystride] = hsum(a2); ym[3 * ystride] = hsum(a3);
            ym[1] = hsum(b0); ym[ystride + 1] = hsum(b1); ym[2 * ystride + 1] = hsum(b2);
            ym[3 * ystride + 1] = hsum(b3);
        }
        for (; m < M; m++) {
            y[m * ystride] = dot_f32(x + m * n, w0, n);
            y[m * ystride + 1] = dot_f32(x + m * n, w1, n);
        }
        return;
    }
    for (; m < M; m++) y[m * ystride] = dot_f32(x + m * n, w0, n);
}

#ifdef __AVX512F__
/* With AVX-512, 4 weight rows at a time: blocks of up to 6 rows of x keep 24 sums of 16 lanes in registers, 10
 * loads for 24 multiply-adds of 512 bits (a few rows of x, as an expert gets at prefill, stay bound by memory:
 * the 256-bit blocks of dots_f32 were bound by the multiply-adds from 4 rows on). The first block prefetches the
 * next 4 weight rows into L2, a line of each per step. */
#define WROWS 4
typedef float v16f __attribute__((vector_size(64)));
static inline v16f ld16(const float *p) { v16f v; memcpy(&v, p, 64); return v; }
static inline float hsum16(v16f a) {
    v8f lo, hi;
    memcpy(&lo, &a, 32); memcpy(&hi, (char *)&a + 32, 32);
    return hsum(lo + hi);
}
#define DOTS4(RX)                                                                                             \
static inline void dots4_##RX(const float *x, const float *const w[4], int nw, int64_t n, float *y,        \
                              int64_t ystride, const char *const *next, int64_t step) {                     \
    v16f a[RX][4];                                                                                           \
    _Pragma("GCC unroll 6") for (int j = 0; j < RX; j++)                                                     \
        _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) a[j][r] = (v16f){0};                             \
    for (int64_t i = 0; i < n; i += 16) {                                                                    \
        if (next)                                                                                            \
            _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) __builtin_prefetch(next[r] + (i >> 4) * step, 0, 2); \
        v16f w0 = ld16(w[0] + i), w1 = ld16(w[1] + i), w2 = ld16(w[2] + i), w3 = ld16(w[3] + i);              \
        _Pragma("GCC unroll 6") for (int j = 0; j < RX; j++) {                                               \
            v16f xv = ld16(x + j * n + i);                                                                   \
            a[j][0] += xv * w0; a[j][1] += xv * w1; a[j][2] += xv * w2; a[j][3] += xv * w3;                 \
        }                                                                                                    \
    }                                                                                                        \
    for (int j = 0; j < RX; j++)                                                                             \
        for (int r = 0; r < nw; r++) y[j * ystride + r] = hsum16(a[j][r]);                                  \
}
DOTS4(1) DOTS4(2) DOTS4(3) DOTS4(4) DOTS4(5) DOTS4(6)

/* y[m * ystride + r] = dot(x[m], w[r]) for M rows of x and the first nw of 4 weight rows (the others repeat one) */
static inline void dots_rows(const float *x, int64_t M, const float *const w[4], int nw, int64_t n, float *y,
                             int64_t ystride, const char *const *next, int64_t rowbytes) {
    int64_t m = 0, step = rowbytes * 16 / n;  /* bytes of a next row per 16 inputs */
    for (; m + 6 <= M; m += 6) dots4_6(x + m * n, w, nw, n, y + m * ystride, ystride, m ? 0 : next, step);
    const float *xm = x + m * n;
    const char *const *pf = m ? 0 : next;
    float *ym = y + m * ystride;
    switch (M - m) {
    case 5: dots4_5(xm, w, nw, n, ym, ystride, pf, step); break;
    case 4: dots4_4(xm, w, nw, n, ym, ystride, pf, step); break;
    case 3: dots4_3(xm, w, nw, n, ym, ystride, pf, step); break;
    case 2: dots4_2(xm, w, nw, n, ym, ystride, pf, step); break;
    case 1: dots4_1(xm, w, nw, n, ym, ystride, pf, step); break;
    }
}
#else
#define WROWS 2
static inline void dots_rows(const float *x, int64_t M, const float *const w[2], int nw, int64_t n, float *y,
                             int64_t ystride, const char *const *next, int64_t rowbytes) {
    dots_f32(x, M, w[0], nw > 1 ? w[1] : 0, n, y, ystride, next ? next[0] : 0, 2 * rowbytes);
}
#endif

DOT(dot_bf16, uint16_t, ld_bf16)
DOT(dot_i8, int8_t, ld_i8)

/* One group of G inputs at a time: 16 packed bytes cover 16 low-nibble inputs and 16 high-nibble inputs. */
static inline float dot_i4(const float *x, const uint8_t *w, const float *scale, int64_t n, int64_t g) {
    v8f total = {0};
    for (int64_t s = 0; s < n / g; s++) {
        const float *xs = x + s * g;
        const uint8_t *ws = w + s * (g / 2);
        v8f a0 = {0}, a1 = {0};
        for (int64_t j = 0; j < g / 2; j += 16) {
            v8f q[4];
            ld_i4(ws + j, q);
            a0 += ld_f32(xs + j) * (q[0] - 8.0f);
            a1 += ld_f32(xs + j + 8) * (q[1] - 8.0f);
            a0 += ld_f32(xs + j + g / 2) * (q[2] - 8.0f);
            a1 += ld_f32(xs + j + g / 2 + 8) * (q[3] - 8.0f);
        }
        total += (a0 + a1) * scale[s];
    }
    return hsum(total);
}

/* One weight row to fp32 (int formats with their scales applied), for reuse across several rows of x. */
static inline void row_f32(const float *w, const float *scale, int64_t n, int64_t g, float *out) {
    (void)scale; (void)g; memcpy(out, w, n * sizeof(float));
}
static inline void row_bf16(const uint16_t *w, const float *scale, int64_t n, int64_t g, float *out) {
    (void)scale; (void)g;
    for (int64_t i = 0; i < n; i += 8) { v8f v = ld_bf16(w + i); memcpy(out + i, &v, 32); }
}
static inline void row_i8(const int8_t *w, const float *scale, int64_t n, int64_t g, float *out) {
    (void)g;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) { v8f v = ld_i8(w + i) * scale[0]; memcpy(out + i, &v, 32); }
    for (; i < n; i++) out[i] = (float)w[i] * scale[0];  /* dequant_i8's rows of any length: never past the row */
}
static inline void row_i4(const uint8_t *w, const float *scale, int64_t n, int64_t g, float *out) {
    for (int64_t s = 0; s < n / g; s++)
        for (int64_t j = 0; j < g / 2; j += 16) {
            v8f q[4];
            ld_i4(w + s * (g / 2) + j, q);
            float *o = out + s * g + j;
            for (int k = 0; k < 2; k++) {
                v8f lo = (q[k] - 8.0f) * scale[s], hi = (q[k + 2] - 8.0f) * scale[s];
                memcpy(o + 8 * k, &lo, 32);
                memcpy(o + g / 2 + 8 * k, &hi, 32);
            }
        }
}

/* With AVX-512 every row of fp32 x, one row alone too, goes through dots4_* (one sum of 16 lanes per row and weight
 * row, whatever the rows beside it): a speculative check then computes each row as a one-token step does. Without,
 * one row keeps dot_f32 (four sums), and several rows can differ from one in the last bits. */
#ifdef __AVX512F__
#define F32_BLOCKS_ONE_ROW 1
#else
#define F32_BLOCKS_ONE_ROW 0
#endif

/* With wsel NULL all M rows of x share W: a weight row is read once (converted to fp32 once when M > 1) and used
 * for every row of x. With wsel, row m of x uses matrix wsel[m] of the stacked [E, O, I]. wrow = elements of WT per
 * weight row, srow = scales per weight row (int8: 1, int4: I / G). Output rows go to threads in blocks of 8. */
#define GEMV(NAME, WT, DOT, ROW)                                                                              \
void NAME(const float *x, int64_t M, int64_t I, const WT *w, int64_t wrow, const void *scale, int half,      \
          int64_t srow, int64_t G, const float *bias, const int64_t *wsel, int64_t O, float *y, int nthreads) { \
    int64_t mats = wsel ? M : 1;                                                                             \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static) collapse(2)")                          \
    for (int64_t m0 = 0; m0 < mats; m0++)                                                                    \
        for (int64_t ob = 0; ob < (O + 7) / 8; ob++) {                                                       \
            int64_t end = ob * 8 + 8 < O ? ob * 8 + 8 : O;                                                   \
            if (wsel || (M == 1 && (sizeof(WT) != 4 || !F32_BLOCKS_ONE_ROW))) {                             \
                for (int64_t o = ob * 8; o < end; o++) {                                                     \
                    int64_t row = (wsel ? wsel[m0] * O : 0) + o;                                             \
                    const WT *wr = w + row * wrow;                                                           \
                    float tmp[srow];                                                                         \
                    const float *sr = row_scales(scale, half, row, srow, tmp); (void)sr;                     \
                    const float *xm = x + m0 * I;                                                            \
                    y[m0 * O + o] = (DOT) + (bias ? bias[o] : 0.0f);                                         \
                }                                                                                            \
                continue;                                                                                    \
            }                                                                                                \
            float buf[WROWS * I], tmp[srow];                                                                 \
            for (int64_t o = ob * 8; o < end; o += WROWS) {                                                  \
                int nw = end - o < WROWS ? (int)(end - o) : WROWS;                                           \
                const float *wf[WROWS];                                                                      \
                const char *nx[WROWS];                                                                       \
                for (int r = 0; r < WROWS; r++) {                                                            \
                    int64_t row = o + (r < nw ? r : 0);                                                      \
                    wf[r] = (const float *)(w + row * wrow);                                                 \
                    if (sizeof(WT) != 4 && r < nw) {                                                         \
                        ROW(w + row * wrow, row_scales(scale, half, row, srow, tmp), I, G, buf + r * I);     \
                        wf[r] = buf + r * I;                                                                 \
                    } else if (sizeof(WT) != 4) wf[r] = buf;                                                 \
                    nx[r] = (const char *)(w + (o + WROWS + r < O ? o + WROWS + r : o) * wrow);              \
                }                                                                                            \
                dots_rows(x, M, wf, nw, I, y + o, O, o + WROWS < O ? nx : 0, wrow * (int64_t)sizeof(WT));    \
                if (bias) for (int64_t m = 0; m < M; m++)                                                    \
                    for (int r = 0; r < nw; r++) y[m * O + o + r] += bias[o + r];                            \
            }                                                                                                \
        }                                                                                                    \
}

GEMV(gemv_f32, float, dot_f32(xm, wr, I), row_f32)
GEMV(gemv_bf16_rows, uint16_t, dot_bf16(xm, wr, I), row_bf16)

/* bf16 for one row of x per weight row: 16 weights as eight 32-bit lanes; the even ones become fp32 by a shift, the
 * odd ones by a mask (no shuffles), so x is first permuted to (x0, x2, .., x14, x1, x3, .., x15) per 16 inputs. */
static inline v8f as_f32(v8u32 u) { v8f v; memcpy(&v, &u, 32); return v; }
static inline float dot_bf16p(const float *x, const uint16_t *w, int64_t n) {
    v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    for (int64_t i = 0; i < n; i += 32) {
        v8u32 u, v;
        memcpy(&u, w + i, 32); memcpy(&v, w + i + 16, 32);
        a0 += ld_f32(x + i) * as_f32(u << 16);
        a1 += ld_f32(x + i + 8) * as_f32(u & 0xFFFF0000u);
        a2 += ld_f32(x + i + 16) * as_f32(v << 16);
        a3 += ld_f32(x + i + 24) * as_f32(v & 0xFFFF0000u);
    }
    return hsum((a0 + a1) + (a2 + a3));
}
GEMV(gemv_bf16_perm, uint16_t, dot_bf16p(xm, wr, I), row_bf16)

/* bf16, two rows of x against W: each weight row's 16-weight blocks converted once and dotted with both rows, each
 * row's sums kept as dot_bf16p keeps them, so a row of y is what gemv_bf16_perm gives that row alone. Up to
 * EXACT_ROWS rows (no wsel) go by pairs (gemv_bf16_pairs): a speculative check of up to 7 drafted tokens then computes
 * each row's projections as a one-token step does, bit for bit (the layer's projections are called from C; linear()
 * still picks gemv or another kernel per shape by measurement). Against converting each weight row to fp32 for all
 * rows (gemv_bf16_rows), AMD Zen 4, 2 threads, us (ms for the last): 8192 x 192 (in cache) 2 rows 136-145 -> 60-78,
 * 3: 161-165 -> 90-150, 5: 205-235 -> 134-180, 8: 282-369 -> 202-279; 6144 x 1024: 2: 480 -> 210-280, 5: 726-732 ->
 * 530-715, 8: 991-1039 -> 850-860; 103424 x 1024 (212 MB, from memory): 2: even, 3: 10.9-12.1 -> 6.0-7.3, 5: 13.2-14.0
 * -> 13.7-16.2, 8: 17.9-20.0 -> 22.5-27.5 ms (the weight row read once, its conversion repeated per pair); with
 * AVX-512 compiled out much the same (8192 x 192, 5 rows: 214-218 -> 134-172; 103424 x 1024, 3: 11.2-14.7 -> 6.5-7.0,
 * 8: 18.8-18.9 -> 22.2-27.6 ms). More rows (serving batches) take gemv_bf16_rows: at 16, 27-29 ms there against 39-44
 * by pairs. */
#ifndef EXACT_ROWS
#define EXACT_ROWS 8  /* bf16 rows of x (no wsel) computed by pairs, each as a one-row call computes it */
#endif
static inline void dots_bf16p2(const float *x0, const float *x1, const uint16_t *w, int64_t n, float *y0,
                               float *y1) {
    v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
    for (int64_t i = 0; i < n; i += 32) {
        v8u32 u, v;
        memcpy(&u, w + i, 32); memcpy(&v, w + i + 16, 32);
        v8f w0 = as_f32(u << 16), w1 = as_f32(u & 0xFFFF0000u), w2 = as_f32(v << 16), w3 = as_f32(v & 0xFFFF0000u);
        a0 += ld_f32(x0 + i) * w0; a1 += ld_f32(x0 + i + 8) * w1;
        a2 += ld_f32(x0 + i + 16) * w2; a3 += ld_f32(x0 + i + 24) * w3;
        b0 += ld_f32(x1 + i) * w0; b1 += ld_f32(x1 + i + 8) * w1;
        b2 += ld_f32(x1 + i + 16) * w2; b3 += ld_f32(x1 + i + 24) * w3;
    }
    *y0 = hsum((a0 + a1) + (a2 + a3));
    *y1 = hsum((b0 + b1) + (b2 + b3));
}

/* M rows of x (no wsel): each weight row dotted with rows (0, 1), (2, 3), .. by dots_bf16p2 and the last of an odd M
 * by dot_bf16p, so every row of y is what that row alone gets, and the weight row is read from memory once */
static void gemv_bf16_pairs(const float *xp, int64_t M, int64_t I, const uint16_t *w, int64_t wrow,
                            const float *bias, int64_t O, float *y, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t ob = 0; ob < (O + 7) / 8; ob++) {
        int64_t end = ob * 8 + 8 < O ? ob * 8 + 8 : O;
        for (int64_t o = ob * 8; o < end; o++) {
            const uint16_t *wr = w + o * wrow;
            int64_t m = 0;
            for (; m + 1 < M; m += 2)
                dots_bf16p2(xp + m * I, xp + (m + 1) * I, wr, I, y + m * O + o, y + (m + 1) * O + o);
            if (m < M) y[m * O + o] = dot_bf16p(xp + m * I, wr, I);
            if (bias) for (int64_t r = 0; r < M; r++) y[r * O + o] += bias[o];
        }
    }
}

void gemv_bf16(const float *x, int64_t M, int64_t I, const uint16_t *w, int64_t wrow, const void *scale, int half,
               int64_t srow, int64_t G, const float *bias, const int64_t *wsel, int64_t O, float *y, int nthreads) {
    if (!wsel && M > EXACT_ROWS) {
        gemv_bf16_rows(x, M, I, w, wrow, scale, half, srow, G, bias, wsel, O, y, nthreads);
        return;
    }
    float *xp = malloc(M * I * sizeof(float));
    for (int64_t i = 0; i < M * I; i++) xp[(i & ~15) + ((i & 1) << 3) + ((i & 15) >> 1)] = x[i];
    if (!wsel && M >= 2)
        gemv_bf16_pairs(xp, M, I, w, wrow, bias, O, y, nthreads);
    else
        gemv_bf16_perm(xp, M, I, w, wrow, scale, half, srow, G, bias, wsel, O, y, nthreads);
    free(xp);
}
GEMV(gemv_i8_float, int8_t, dot_i8(xm, wr, I) * sr[0], row_i8)
GEMV(gemv_i4_float, uint8_t, dot_i4(xm, wr, sr, I, G), row_i4)

#ifdef __AVX2__
/* Integer kernels for up to INT_ROWS rows of x, or `wsel`: each group of g activations is scaled to int16
 * (xq = x / xs, xs = max|x| / 32767, relative rounding 1.5e-5 of the group's largest) and multiplied with the weights
 * by _mm256_madd_epi16. The weights are unpacked with shifts within 16-bit lanes (no shuffles), so xq is stored in the
 * order the lanes come out: `pos` maps an input's index within its group to its place in xq. */
static inline int64_t pos_i8(int64_t i) { return (i & ~31) + ((i & 1) << 4) + ((i & 31) >> 1); }
/* int4, g = 64 (32 bytes): lane l holds bytes 2l, 2l+1 = inputs 2l, 2l+32 (byte 2l) and 2l+1, 2l+33 (byte 2l+1) */
static inline int64_t pos_i4(int64_t i) { return (i & ~63) + 16 * (((i & 63) >= 32) + 2 * (i & 1)) + ((i & 31) >> 1); }
static inline int64_t pos_id(int64_t i) { return i; }

/* Whether the integer kernels can take x [n]: every value finite (NaN and inf have no int16 code; the float path
 * gives what PyTorch gives), and no group of g whose largest |x| is below 32767 * FLT_MIN but not 0 (its step would
 * be under FLT_MIN, whose inverse is not finite: its codes would round to nothing). Bit tests, which -ffast-math
 * keeps (it folds isnan and isinf away). */
static int int_ready(const float *x, int64_t n, int64_t g) {
    const uint32_t least = 0x07fffe00u;  /* the bits of 32767 * FLT_MIN in fp32: below it a group goes to floats */
    int bad = 0;
    for (int64_t r = 0; r < n / g && !bad; r++) {
        uint32_t big = 0;
        for (int64_t i = 0; i < g; i++) {
            uint32_t u;
            memcpy(&u, x + r * g + i, 4);
            u &= 0x7fffffffu;
            big = u > big ? u : big;  /* |x| orders as its bits; inf and NaN above every finite value */
        }
        bad = big >= 0x7f800000u || (big && big < least);
    }
    return !bad;
}

/* inlined into each kernel, so `pos` is a constant and inlines too; x as int_ready takes it */
static inline void quantize_x(const float *x, int64_t groups, int64_t g, int64_t (*pos)(int64_t), int16_t *xq,
                              float *xs, float *xsum) {
    for (int64_t r = 0; r < groups; r++) {
        const float *xr = x + r * g;
        float big = 0.0f, total = 0.0f;
        for (int64_t i = 0; i < g; i++) { big = fmaxf(big, fabsf(xr[i])); total += xr[i]; }
        float step = big > 0.0f ? big / 32767.0f : 1.0f, inv = 1.0f / step;
        for (int64_t i = 0; i < g; i++) xq[pos(r * g + i)] = (int16_t)lrintf(xr[i] * inv);
        xs[r] = step; xsum[r] = total;
    }
}

/* The integer dots take NR (1 to 4, a constant after inlining) rows of x against one weight row, so the weights
 * are loaded and unpacked once for all of them: xq row r at xq + r * I, its group scales at xs + r * groups (and
 * group sums at xsum + r * groups); d[r] = the dot of row r. */
#define INLINE static inline __attribute__((always_inline))
#ifndef INT_ROWS
#define INT_ROWS 16  /* more rows of x: weight rows converted to fp32 once (gemv_i8_float / gemv_i4_float) */
#endif

/* int8 weights (one scale per row, applied by the caller): groups of g (a multiple of 32, at most 256) inputs */
INLINE void dot_i8q(const int16_t *xq, int64_t I, const float *xs, const float *xsum, int64_t groups,
                    const int8_t *w, const float *scale, int64_t n, int64_t g, const int NR, float *d) {
    (void)xsum; (void)scale;
    __m256 acc[4];
    for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t s = 0; s < n / g; s++) {
        __m256i isum[4];
        for (int r = 0; r < NR; r++) isum[r] = _mm256_setzero_si256();
        for (int64_t j = s * g; j < s * g + g; j += 32) {
            prefetch(w + j);
            __m256i b = _mm256_loadu_si256((const __m256i *)(w + j));
            __m256i even = _mm256_srai_epi16(_mm256_slli_epi16(b, 8), 8), odd = _mm256_srai_epi16(b, 8);
            for (int r = 0; r < NR; r++) {
                const int16_t *xr = xq + r * I + j;
                isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(even, _mm256_loadu_si256((const __m256i *)xr)));
                isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(odd,
                                                                      _mm256_loadu_si256((const __m256i *)(xr + 16))));
            }
        }
        for (int r = 0; r < NR; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(xs[r * groups + s]), acc[r]);
    }
    for (int r = 0; r < NR; r++) d[r] = hsum(from_m256(acc[r]));
}

/* sc[s] = scale[s] * xs[s] for the groups of one row of x against one weight row (padded with zeros to a whole
 * vector load); returns sum(scale[s] * xsum[s]), what the codes' offset of 8 takes off (times 8) */
INLINE float group_scales(const float *scale, const float *xs, const float *xsum, int64_t groups, float *sc) {
    float offset = 0.0f;
    for (int64_t s = 0; s < groups; s++) {
        sc[s] = scale[s] * xs[s];
        offset += scale[s] * xsum[s];
    }
    for (int k = 0; k < 4; k++) sc[groups + k] = 0.0f;
    return offset;
}

/* int4 in steps of 32 bytes holding `per` whole groups of g = 64 / per inputs (per = 1: g = 64; per = 2: g = 32),
 * xq in the order the 16-bit lanes come out of shifts: sum((n - 8) * x) * s = s * (xs * sum(n * xq) - 8 * sum(x)) per
 * group; int32 lanes 8 / per at a time belong to one group. per is a constant after inlining. */
INLINE void dot_i4s(const int16_t *xq, int64_t I, const float *xs, const float *xsum, int64_t groups,
                    const uint8_t *w, const float *scale, int64_t n, int64_t g, const int NR, float *d, const int per) {
    __m256 acc[4];
    float offset[4], sc[4][n / g + 4];
    const __m256i mask = _mm256_set1_epi16(15);
    const __m256i lanes = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);  /* per = 2: a group's scale in 4 lanes each */
    for (int r = 0; r < NR; r++) {
        acc[r] = _mm256_setzero_ps();
        offset[r] = group_scales(scale, xs + r * groups, xsum + r * groups, n / g, sc[r]);
    }
    for (int64_t s = 0; s < n / g; s += per) {
        prefetch(w + s * (g / 2));
        __m256i b = _mm256_loadu_si256((const __m256i *)(w + s * (g / 2)));
        __m256i q0 = _mm256_and_si256(b, mask), q1 = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
        __m256i q2 = _mm256_and_si256(_mm256_srli_epi16(b, 8), mask), q3 = _mm256_srli_epi16(b, 12);
        for (int r = 0; r < NR; r++) {
            const int16_t *xg = xq + r * I + s * g;
            __m256i isum = _mm256_madd_epi16(q0, _mm256_loadu_si256((const __m256i *)xg));
            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(q1, _mm256_loadu_si256((const __m256i *)(xg + 16))));
            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(q2, _mm256_loadu_si256((const __m256i *)(xg + 32))));
            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(q3, _mm256_loadu_si256((const __m256i *)(xg + 48))));
            __m256 f = per == 1 ? _mm256_broadcast_ss(sc[r] + s)
                                : _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castpd_ps(
                                      _mm_load_sd((const double *)(sc[r] + s)))), lanes);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), f, acc[r]);
        }
    }
    for (int r = 0; r < NR; r++) d[r] = hsum(from_m256(acc[r])) - 8.0f * offset[r];
}
/* g = 64, one group a step (pos_i4) */
INLINE void dot_i4p(const int16_t *xq, int64_t I, const float *xs, const float *xsum, int64_t groups,
                    const uint8_t *w, const float *scale, int64_t n, int64_t g, const int NR, float *d) {
    dot_i4s(xq, I, xs, xsum, groups, w, scale, n, g, NR, d, 1);
}
/* g = 32: two groups a step; byte b of the pair holds inputs j and j + 16 of group b / 16 (j = b % 16) (pos_i4h) */
static inline int64_t pos_i4h(int64_t i) {
    int64_t r = i & 31, b = ((i >> 5) & 1) * 16 + (r & 15);
    return (i & ~63) + (2 * (b & 1) + (r >> 4)) * 16 + (b >> 1);
}
INLINE void dot_i4h(const int16_t *xq, int64_t I, const float *xs, const float *xsum, int64_t groups,
                    const uint8_t *w, const float *scale, int64_t n, int64_t g, const int NR, float *d) {
    dot_i4s(xq, I, xs, xsum, groups, w, scale, n, g, NR, d, 2);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* acc + a . b in int16 pairs (VNNI: one vpdpwssd, the same int32 sums) */
static inline __m512i dp16w(__m512i acc, __m512i a, __m512i b) {
#ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}
/* The same in 512-bit vectors, 64 bytes (2 * per groups) a step, I a multiple of 128: xq in pairs of the 256-bit
 * layout's 64-input blocks, chunk c (16 lanes) of the first block then of the second, so each load of x is whole. */
INLINE void dot_i4sw(const int16_t *xq, int64_t I, const float *xs, const float *xsum, int64_t groups,
                     const uint8_t *w, const float *scale, int64_t n, int64_t g, const int NR, float *d, const int per) {
    __m512 acc[4];
    float offset[4], sc[4][n / g + 4];
    const __m512i mask = _mm512_set1_epi16(15);
    const __m512i lanes = per == 1 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
                                   : _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    for (int r = 0; r < NR; r++) {
        acc[r] = _mm512_setzero_ps();
        offset[r] = group_scales(scale, xs + r * groups, xsum + r * groups, n / g, sc[r]);
    }
    for (int64_t s = 0; s < n / g; s += 2 * per) {
        prefetch(w + s * (g / 2));
        __m512i b = _mm512_loadu_si512((const void *)(w + s * (g / 2)));
        __m512i q0 = _mm512_and_si512(b, mask), q1 = _mm512_and_si512(_mm512_srli_epi16(b, 4), mask);
        __m512i q2 = _mm512_and_si512(_mm512_srli_epi16(b, 8), mask), q3 = _mm512_srli_epi16(b, 12);
        for (int r = 0; r < NR; r++) {
            const int16_t *xg = xq + r * I + s * g;
            __m512i isum = _mm512_madd_epi16(q0, _mm512_loadu_si512((const void *)xg));
            isum = dp16w(isum, q1, _mm512_loadu_si512((const void *)(xg + 32)));
            isum = dp16w(isum, q2, _mm512_loadu_si512((const void *)(xg + 64)));
            isum = dp16w(isum, q3, _mm512_loadu_si512((const void *)(xg + 96)));
            /* int32 lanes 8 / per at a time: one group each */
            __m512 f = _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(_mm_loadu_ps(sc[r] + s)));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), f, acc[r]);
        }
    }
    for (int r = 0; r < NR; r++) d[r] = _mm512_reduce_add_ps(acc[r]) - 8.0f * offset[r];
}
/* One row of x against two weight rows w0, w1, each summed exactly as dot_i4sw sums it, so a row's result does not
 * depend on the rows beside it: each load of x serves both weight rows, and each 64 bytes of codes are loaded once
 * (GCC folds a load into each unpacking op otherwise). On Zen 4, whose 512-bit ops take two cycles, the one-row
 * kernel was bound by its instructions: 3.3-4.0 -> 2.5-2.7 ns a 64-byte step in L2. The prefetch into L2 8 KB ahead
 * goes with it (into L1 4 KB ahead the pairs read memory slower than single rows there). Used where measured faster
 * (gemv_wide 2: kernels.py's "zmm2"). */
INLINE void dot_i4sw2(const int16_t *xq, const float *xs, const float *xsum, const uint8_t *w0, const uint8_t *w1,
                      const float *scale0, const float *scale1, int64_t n, int64_t g, float *d, const int per) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    float sc0[n / g + 4], sc1[n / g + 4];
    const __m512i mask = _mm512_set1_epi16(15);
    const __m512i lanes = per == 1 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
                                   : _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    float off0 = group_scales(scale0, xs, xsum, n / g, sc0), off1 = group_scales(scale1, xs, xsum, n / g, sc1);
    for (int64_t s = 0; s < n / g; s += 2 * per) {
        prefetch_l2(w0 + s * (g / 2));
        prefetch_l2(w1 + s * (g / 2));
        __m512i b0 = _mm512_loadu_si512((const void *)(w0 + s * (g / 2)));
        __m512i b1 = _mm512_loadu_si512((const void *)(w1 + s * (g / 2)));
        __asm__("" : "+v"(b0), "+v"(b1));
        const int16_t *xg = xq + s * g;
        __m512i x0 = _mm512_loadu_si512((const void *)xg), x1 = _mm512_loadu_si512((const void *)(xg + 32));
        __m512i x2 = _mm512_loadu_si512((const void *)(xg + 64)), x3 = _mm512_loadu_si512((const void *)(xg + 96));
        __m512i i0 = _mm512_madd_epi16(_mm512_and_si512(b0, mask), x0);
        __m512i i1 = _mm512_madd_epi16(_mm512_and_si512(b1, mask), x0);
        i0 = dp16w(i0, _mm512_and_si512(_mm512_srli_epi16(b0, 4), mask), x1);
        i1 = dp16w(i1, _mm512_and_si512(_mm512_srli_epi16(b1, 4), mask), x1);
        i0 = dp16w(i0, _mm512_and_si512(_mm512_srli_epi16(b0, 8), mask), x2);
        i1 = dp16w(i1, _mm512_and_si512(_mm512_srli_epi16(b1, 8), mask), x2);
        i0 = dp16w(i0, _mm512_srli_epi16(b0, 12), x3);
        i1 = dp16w(i1, _mm512_srli_epi16(b1, 12), x3);
        acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0),
                               _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(_mm_loadu_ps(sc0 + s))), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1),
                               _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(_mm_loadu_ps(sc1 + s))), acc1);
    }
    d[0] = _mm512_reduce_add_ps(acc0) - 8.0f * off0;
    d[1] = _mm512_reduce_add_ps(acc1) - 8.0f * off1;
}
INLINE void dot_i4w2(const int16_t *xq, const float *xs, const float *xsum, const uint8_t *w0, const uint8_t *w1,
                     const float *scale0, const float *scale1, int64_t n, int64_t g, float *d) {
    dot_i4sw2(xq, xs, xsum, w0, w1, scale0, scale1, n, g, d, 1);
}
INLINE void dot_i4hw2(const int16_t *xq, const float *xs, const float *xsum, const uint8_t *w0, const uint8_t *w1,
                      const float *scale0, const float *scale1, int64_t n, int64_t g, float *d) {
    dot_i4sw2(xq, xs, xsum, w0, w1, scale0, scale1, n, g, d, 2);
}
static inline int64_t pos_i4w(int64_t i) {
    int64_t j = pos_i4(i & 63);
    return (i & ~127) + (j >> 4) * 32 + ((i >> 6) & 1) * 16 + (j & 15);
}
static inline int64_t pos_i4hw(int64_t i) {
    int64_t j = pos_i4h(i & 63);
    return (i & ~127) + (j >> 4) * 32 + ((i >> 6) & 1) * 16 + (j & 15);
}
INLINE void dot_i4w(const int16_t *xq, int64_t I, const float *xs, const float *xsum, int64_t groups,
                    const uint8_t *w, const float *scale, int64_t n, int64_t g, const int NR, float *d) {
    dot_i4sw(xq, I, xs, xsum, groups, w, scale, n, g, NR, d, 1);
}
INLINE void dot_i4hw(const int16_t *xq, int64_t I, const float *xs, const float *xsum, int64_t groups,
                     const uint8_t *w, const float *scale, int64_t n, int64_t g, const int NR, float *d) {
    dot_i4sw(xq, I, xs, xsum, groups, w, scale, n, g, NR, d, 2);
}
/* int8 in 512-bit vectors (dot_i8q's sums, 64 bytes a step): xq in blocks of 64 inputs, the 32 even ones' lanes and
 * then the 32 odd ones'; I a multiple of 64 */
static inline int64_t pos_i8w(int64_t i) { return (i & ~63) + ((i & 1) << 5) + ((i & 63) >> 1); }
INLINE void dot_i8w(const int16_t *xq, int64_t I, const float *xs, const float *xsum, int64_t groups,
                    const int8_t *w, const float *scale, int64_t n, int64_t g, const int NR, float *d) {
    (void)xsum; (void)scale;
    __m512 acc[4];
    for (int r = 0; r < NR; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t s = 0; s < n / g; s++) {
        __m512i isum[4];
        for (int r = 0; r < NR; r++) isum[r] = _mm512_setzero_si512();
        for (int64_t j = s * g; j < s * g + g; j += 64) {
            prefetch(w + j);
            __m512i b = _mm512_loadu_si512((const void *)(w + j));
            __m512i even = _mm512_srai_epi16(_mm512_slli_epi16(b, 8), 8), odd = _mm512_srai_epi16(b, 8);
            for (int r = 0; r < NR; r++) {
                const int16_t *xr = xq + r * I + j;
                isum[r] = dp16w(isum[r], even, _mm512_loadu_si512((const void *)xr));
                isum[r] = dp16w(isum[r], odd, _mm512_loadu_si512((const void *)(xr + 32)));
            }
        }
        for (int r = 0; r < NR; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r]), _mm512_set1_ps(xs[r * groups + s]), acc[r]);
    }
    for (int r = 0; r < NR; r++) d[r] = _mm512_reduce_add_ps(acc[r]);
}
#define WIDE_I4 1
#endif

/* int4, any g (a multiple of 32): 16 bytes (16 low and 16 high nibbles) at a time, xq in input order; one row */
static inline float dot_i4q1(const int16_t *xq, const float *xs, const float *xsum, const uint8_t *w,
                             const float *scale, int64_t n, int64_t g) {
    __m256 acc = _mm256_setzero_ps();
    float offset = 0.0f;
    const __m128i mask = _mm_set1_epi8(15);
    for (int64_t s = 0; s < n / g; s++) {
        const int16_t *xg = xq + s * g;
        const uint8_t *wg = w + s * (g / 2);
        __m256i isum = _mm256_setzero_si256();
        for (int64_t j = 0; j < g / 2; j += 16) {
            if (!((s * (g / 2) + j) & 63)) prefetch(wg + j);
            __m128i b = _mm_loadu_si128((const __m128i *)(wg + j));
            __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(b, mask));
            __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), mask));
            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)(xg + j))));
            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(xg + g / 2 + j))));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(scale[s] * xs[s]), acc);
        offset += scale[s] * xsum[s];
    }
    return hsum(from_m256(acc)) - 8.0f * offset;
}
INLINE void dot_i4q(const int16_t *xq, int64_t I, const float *xs, const float *xsum, int64_t groups,
                    const uint8_t *w, const float *scale, int64_t n, int64_t g, const int NR, float *d) {
    for (int r = 0; r < NR; r++) d[r] = dot_i4q1(xq + r * I, xs + r * groups, xsum + r * groups, w, scale, n, g);
}

/* Whether int4 weights in groups of 64 or 32 with I a multiple of 128 take the 512-bit kernel (1), and with it a
 * run of one row of x the weight rows by pairs (2); kernels.py sets it from a measurement on this CPU; 0 until then */
static int wide_i4 = 0;
#ifdef WIDE_I4
/* Whether int8 weights with I a multiple of 64 take the 512-bit kernel (1): kernels.py measures it; 0 until then */
static int wide_i8 = 0;
#endif

/* A DOT2 for the kernels without one (never called) */
INLINE void no_pair(const int16_t *xq, const float *xs, const float *xsum, const uint8_t *w0, const uint8_t *w1,
                    const float *scale0, const float *scale1, int64_t n, int64_t g, float *d) {
    (void)xq; (void)xs; (void)xsum; (void)w0; (void)w1; (void)scale0; (void)scale1; (void)n; (void)g; (void)d;
}

/* Work stealing for the integer GEMV (decoding reads each weight once, so it runs at the memory's speed): thread
 * t owns a contiguous range [lo, hi) of chunks of STEAL work items (its static share: it streams its own rows in
 * order) and takes them from lo; a thread done with its own takes the last chunk of the one with most left. A
 * thread slowed by the host (a busy core, a page fault) then no longer leaves the other idle at the region's end:
 * with a static split, 2 threads of a full-size ERNIE-4.5-21B-A3B decoding step finished 4-14 ms apart (of ~60).
 * Taking chunks in turns (schedule(dynamic)) balances as well but interleaves the threads' streams: slower. */
#define STEAL 8
typedef struct { _Alignas(64) int64_t range; } Share;  /* lo << 32 | hi, one cache line per thread */
static int team_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}
static int team_size(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}
static void share_init(Share *sh, int me, int team, int64_t chunks) {
    int64_t lo = chunks * me / team, hi = chunks * (me + 1) / team;
    __atomic_store_n(&sh[me].range, lo << 32 | hi, __ATOMIC_RELAXED);
}
static int64_t share_take(Share *sh, int who, int last) {
    int64_t cur = __atomic_load_n(&sh[who].range, __ATOMIC_RELAXED);
    for (;;) {
        int64_t lo = cur >> 32, hi = cur & 0xffffffff;
        if (lo >= hi) return -1;
        if (__atomic_compare_exchange_n(&sh[who].range, &cur, last ? lo << 32 | (hi - 1) : (lo + 1) << 32 | hi, 0,
                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            return last ? hi - 1 : lo;
    }
}
static int64_t share_next(Share *sh, int me, int team) {
    int64_t c = share_take(sh, me, 0);
    while (c < 0) {
        int victim = -1;
        int64_t most = 0;
        for (int t = 0; t < team; t++) {
            int64_t r = __atomic_load_n(&sh[t].range, __ATOMIC_RELAXED), left = (r & 0xffffffff) - (r >> 32);
            if (t != me && left > most) { most = left; victim = t; }
        }
        if (victim < 0) return -1;
        c = share_take(sh, victim, 1);
    }
    return c;
}

/* The integer path: x quantized per group of XG, then each weight row against up to 4 rows of x at a time (with
 * wsel, each run of consecutive rows choosing the same matrix against it, so a matrix is read once per run: the
 * MoE kernel sorts its rows by expert); SCALED multiplies an int8 row's result by its scale. A run of one row of x
 * takes its weight rows by pairs through DOT2 where the kernel has one (PAIRS). */
#define GEMV_INT(NAME, WT, DOT, POS, XG, SCALED, DOT2, PAIRS)                                                        \
static int NAME(const float *x, int64_t M, int64_t I, const WT *w, int64_t wrow, const void *scale,          \
                int half, int64_t srow, int64_t G, const float *bias, const int64_t *wsel, int64_t O,         \
                float *y, int nthreads) {                                                                     \
    int64_t xg = (XG), groups = I / xg;                                                                      \
    if (!int_ready(x, M * I, xg)) return 0;                                                                   \
    int16_t *xq = malloc(M * I * sizeof(int16_t));                                                           \
    float *xs = malloc(M * groups * sizeof(float)), *xsum = malloc(M * groups * sizeof(float));              \
    quantize_x(x, M * groups, xg, POS, xq, xs, xsum);                                                        \
    int64_t *run = malloc((M + 1) * sizeof(int64_t)), runs = 0;  /* first row of each run */                \
    for (int64_t m = 0; m < M; m++)                                                                          \
        if (m == 0 || (wsel && wsel[m] != wsel[m - 1])) run[runs++] = m;                                     \
    run[runs] = M;                                                                                           \
    int64_t blocks = (O + 7) / 8, total = runs * blocks;  /* work items: (run, block of 8 weight rows) */     \
    Share *share = aligned_alloc(64, nthreads * sizeof(Share));                                             \
    _Pragma("omp parallel num_threads(nthreads)")                                                           \
    {                                                                                                        \
    int me = team_id(), team = team_size();                                                                  \
    share_init(share, me, team, (total + STEAL - 1) / STEAL);                                                \
    _Pragma("omp barrier")                                                                                   \
    for (int64_t c; (c = share_next(share, me, team)) >= 0;)                                               \
    for (int64_t i = c * STEAL; i < (c + 1) * STEAL && i < total; i++)                                      \
        for (int64_t s = i / blocks, ob = i % blocks, once = 1; once; once = 0)                             \
            for (int64_t o = ob * 8, m0 = run[s], rows = run[s + 1] - m0; o < ob * 8 + 8 && o < O; o++) {   \
                int64_t row = (wsel ? wsel[m0] * O : 0) + o;                                                 \
                const WT *wr = w + row * wrow;                                                               \
                float tmp[srow];                                                                             \
                const float *sr = row_scales(scale, half, row, srow, tmp);                                   \
                if (PAIRS && wide_i4 == 2 && rows == 1 && o + 1 < ob * 8 + 8 && o + 1 < O) {                 \
                    float tmp1[srow], d[2];                                                                  \
                    const float *sr1 = row_scales(scale, half, row + 1, srow, tmp1);                         \
                    DOT2(xq + m0 * I, xs + m0 * groups, xsum + m0 * groups, (const uint8_t *)wr,             \
                         (const uint8_t *)(wr + wrow), sr, sr1, I, xg, d);                                   \
                    for (int r = 0; r < 2; r++)                                                              \
                        y[m0 * O + o + r] = d[r] + (bias ? bias[o + r] : 0.0f);                              \
                    o++;                                                                                     \
                    continue;                                                                                \
                }                                                                                            \
                for (int64_t m = m0; m < m0 + rows; m += 4) {                                                \
                    int64_t left = m0 + rows - m;                                                            \
                    const int16_t *xm = xq + m * I;                                                          \
                    const float *sm = xs + m * groups, *tm = xsum + m * groups;                             \
                    float d[4];                                                                              \
                    switch (left) {                                                                          \
                    case 1: DOT(xm, I, sm, tm, groups, wr, sr, I, xg, 1, d); break;                          \
                    case 2: DOT(xm, I, sm, tm, groups, wr, sr, I, xg, 2, d); break;                          \
                    case 3: DOT(xm, I, sm, tm, groups, wr, sr, I, xg, 3, d); break;                          \
                    default: DOT(xm, I, sm, tm, groups, wr, sr, I, xg, 4, d); left = 4;                      \
                    }                                                                                        \
                    for (int64_t r = 0; r < left; r++)                                                       \
                        y[(m + r) * O + o] = (SCALED ? d[r] * sr[0] : d[r]) + (bias ? bias[o] : 0.0f);       \
                }                                                                                            \
            }                                                                                                \
    }                                                                                                        \
    free(xq); free(xs); free(xsum); free(run); free(share);                                                  \
    return 1;                                                                                                \
}
/* int8: activation groups of 256 inputs (or the largest power of two dividing I): int32 sums stay below 2^28 */
#define I8_GROUP (I % 256 == 0 ? 256 : I % 128 == 0 ? 128 : I % 64 == 0 ? 64 : 32)
GEMV_INT(gemv_i8_int, int8_t, dot_i8q, pos_i8, I8_GROUP, 1, no_pair, 0)
GEMV_INT(gemv_i4_g64, uint8_t, dot_i4p, pos_i4, 64, 0, no_pair, 0)
GEMV_INT(gemv_i4_int, uint8_t, dot_i4q, pos_id, G, 0, no_pair, 0)
GEMV_INT(gemv_i4_g32, uint8_t, dot_i4h, pos_i4h, 32, 0, no_pair, 0)
#ifdef WIDE_I4
GEMV_INT(gemv_i4_g64w, uint8_t, dot_i4w, pos_i4w, 64, 0, dot_i4w2, 1)
GEMV_INT(gemv_i4_g32w, uint8_t, dot_i4hw, pos_i4hw, 32, 0, dot_i4hw2, 1)
GEMV_INT(gemv_i8_intw, int8_t, dot_i8w, pos_i8w, I8_GROUP, 1, no_pair, 0)
#endif
#endif

int gemv_wide(int on) {
#ifdef WIDE_I4
    if (on >= 0) wide_i4 = on;
    return wide_i4;
#else
    (void)on;
    return -1;
#endif
}

int gemv_wide_i8(int on) {
#ifdef WIDE_I4
    if (on >= 0) wide_i8 = on;
    return wide_i8;
#else
    (void)on;
    return -1;
#endif
}

#define ARGS x, M, I, w, wrow, scale, half, srow, G, bias, wsel, O, y, nthreads
void gemv_i8(const float *x, int64_t M, int64_t I, const int8_t *w, int64_t wrow, const void *scale, int half,
             int64_t srow, int64_t G, const float *bias, const int64_t *wsel, int64_t O, float *y, int nthreads) {
#ifdef __AVX2__
    /* the integer kernels return 0 for an x they cannot round to int16 (int_ready): the float path takes it */
    if (wsel || M <= INT_ROWS) {
#ifdef WIDE_I4
        if (wide_i8 && I % 64 == 0) {
            if (gemv_i8_intw(ARGS)) return;
        } else
#endif
        if (gemv_i8_int(ARGS)) return;
    }
#endif
    gemv_i8_float(ARGS);
}

void gemv_i4(const float *x, int64_t M, int64_t I, const uint8_t *w, int64_t wrow, const void *scale, int half,
             int64_t srow, int64_t G, const float *bias, const int64_t *wsel, int64_t O, float *y, int nthreads) {
#ifdef __AVX2__
    if (wsel || M <= INT_ROWS) {  /* as in gemv_i8 */
#ifdef WIDE_I4
        if ((G == 64 || G == 32) && wide_i4 && I % 128 == 0) {
            if ((G == 64 ? gemv_i4_g64w : gemv_i4_g32w)(ARGS)) return;
        } else
#endif
        if ((G == 64 ? gemv_i4_g64 : G == 32 && I % 64 == 0 ? gemv_i4_g32 : gemv_i4_int)(ARGS)) return;
    }
#endif
    gemv_i4_float(ARGS);
}
#undef ARGS

/* Dequantization to fp32 for prefill (many rows of activations: PyTorch's matmul then does the work): rows weight
 * rows of I inputs each, converted in parallel. */
void dequant_i8(const int8_t *w, const float *scale, int64_t rows, int64_t I, float *out, int nthreads) {
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")
    for (int64_t r = 0; r < rows; r++) row_i8(w + r * I, scale + r, I, 0, out + r * I);
}

void dequant_i4(const uint8_t *w, const void *scale, int half, int64_t rows, int64_t I, int64_t G, float *out,
                int nthreads) {
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")
    for (int64_t r = 0; r < rows; r++) {
        float tmp[I / G];
        row_i4(w + r * (I / 2), row_scales(scale, half, r, I / G, tmp), I, G, out + r * I);
    }
}

/* RMSNorm of fp32 rows: out = w * x / sqrt(mean(x^2) + eps) (rows of n, a multiple of 8). */
void rmsnorm_f32(const float *x, const float *w, int64_t rows, int64_t n, float eps, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        v8f acc = {0};
        for (int64_t i = 0; i < n; i += 8) { v8f v = ld_f32(xr + i); acc += v * v; }
        float inv = 1.0f / sqrtf(hsum(acc) / (float)n + eps);
        for (int64_t i = 0; i < n; i += 8) {
            v8f v = ld_f32(xr + i) * inv * ld_f32(w + i);
            memcpy(out + r * n + i, &v, 32);
        }
    }
}

/* LayerNorm of fp32 rows (torch.nn.LayerNorm): out = (x - mean) / sqrt(var + eps) * w + b, the variance biased;
 * b NULL: no bias; rows of n, a multiple of 8. */
void layernorm_f32(const float *x, const float *w, const float *b, int64_t rows, int64_t n, float eps, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        v8f acc = {0}, sq = {0};
        for (int64_t i = 0; i < n; i += 8) acc += ld_f32(xr + i);
        float mean = hsum(acc) / (float)n;
        for (int64_t i = 0; i < n; i += 8) { v8f d = ld_f32(xr + i) - mean; sq += d * d; }
        float inv = 1.0f / sqrtf(hsum(sq) / (float)n + eps);
        for (int64_t i = 0; i < n; i += 8) {
            v8f v = (ld_f32(xr + i) - mean) * inv * ld_f32(w + i);
            if (b) v += ld_f32(b + i);
            memcpy(out + r * n + i, &v, 32);
        }
    }
}

/* One new position per batch row against a KV cache (decoding), fp32:
 *   rotary embedding of q and k (`rotation` as rotate() takes it),
 *   k and v written at position `pos` of kc/vc [B, Hkv, T, D], then out = softmax(scale * q.k) v over the positions
 *   0..pos that mask [B, mstride] (uint8, NULL: all) allows, GQA head h reading kv head h / (H / Hkv).
 *   With `table` / `positions` (a serving engine's paged cache; NULL: row b, position pos): kc/vc are blocks
 *   [N, Hkv, T, D] of T positions, row b of the batch is at position positions[b] <= pos, attending over
 *   0..positions[b], and its position t lives in block table[b * tstride + t / T] at t % T.
 * q/k/v: rows of the projections' output, row b at q + b * xstride ([H, D], [Hkv, D], [Hkv, D]); cos/sin [B, D/2];
 * out [B, H, D]. Masked positions are skipped (a row with none allowed gives zeros).
 * Split as flash-decoding does: the positions in chunks of ATT_CHUNK (from position 0, so a row's result does not
 * depend on the batch, the block layout or the threads), each chunk of a kv head read once for all the query heads
 * of its group (a running max, sum and weighted sum of v per head), then the chunks merged per head. */
#ifndef ATT_CHUNK
#define ATT_CHUNK 256
#endif
#ifndef ATT_BLOCK
#define ATT_BLOCK 32  /* positions of v converted to fp32 at a time */
#endif
/* bf16 <-> fp32: round to nearest even, as PyTorch's .to(torch.bfloat16) */
static inline uint16_t to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
static inline float from_bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline float round_bf16(float f) { return from_bf16(to_bf16(f)); }
static void round_all(float *x, int64_t n, int bf16) {
    if (bf16) for (int64_t i = 0; i < n; i++) x[i] = round_bf16(x[i]);
}

/* rotation 1: pairs (2i, 2i+1) as ERNIE; 0: halves (i, i + D/2) as Llama/PhiMoE; 2: halves in bf16 arithmetic (each
 * product and the sum rounded, as a bf16 PhiMoE's ops in its dtype) */
static void rotate(const float *x, const float *c, const float *s, int64_t D, int rotation, float *y) {
    int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) {
        int64_t a = rotation == 1 ? 2 * i : i, b = rotation == 1 ? 2 * i + 1 : i + half;
        float xa = x[a], xb = x[b];
        if (rotation == 2) {
            y[a] = round_bf16(round_bf16(xa * c[i]) - round_bf16(xb * s[i]));
            y[b] = round_bf16(round_bf16(xb * c[i]) + round_bf16(xa * s[i]));
        } else {
            y[a] = xa * c[i] - xb * s[i];
            y[b] = xb * c[i] + xa * s[i];
        }
    }
}

/* Positions t..*end - 1 of batch row b's kv head hk are contiguous from the returned element / D (up to the end of
 * t's block, or Lb). */
static inline int64_t kv_run(const int64_t *tb, int64_t b, int64_t Hkv, int64_t hk, int64_t T, int64_t t,
                             int64_t Lb, int64_t *end) {
    if (!tb) { *end = Lb; return (b * Hkv + hk) * T + t; }
    int64_t off = t % T;
    *end = t - off + T < Lb ? t - off + T : Lb;
    return (tb[t / T] * Hkv + hk) * T + off;
}

static inline void st_f32(float *p, v8f v) { memcpy(p, &v, 32); }
/* the cache lines of `bytes` from byte `at` of c (a position's row): into the caches ahead of their use */
static inline void fetch_row(const void *c, int64_t at, int64_t bytes) {
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch((const char *)c + at + off, 0, 3);
}
#ifndef ATT_AHEAD
#define ATT_AHEAD 32  /* positions: the keys and values this far ahead are prefetched */
#endif
/* the sums of 8 vectors, as one vector */
static inline v8f hsum8(const v8f a[8]) {
#ifdef __AVX__
    __m256 r[8];
    memcpy(r, a, sizeof r);
    __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(r[0], r[1]), _mm256_hadd_ps(r[2], r[3]));
    __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(r[4], r[5]), _mm256_hadd_ps(r[6], r[7]));
    __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
    v8f out;
    memcpy(&out, &sum, 32);
    return out;
#else
    v8f out;
    for (int g = 0; g < 8; g++) out[g] = hsum(a[g]);
    return out;
#endif
}
/* acc[0..64) += sum over t < n of p[t] * v[t * D + 0..64): 64 sums in registers (a block of v rows, fp32) */
static void att_pv64(const float *p, int64_t n, const float *v, int64_t D, float *acc) {
    v8f c0 = ld_f32(acc), c1 = ld_f32(acc + 8), c2 = ld_f32(acc + 16), c3 = ld_f32(acc + 24);
    v8f c4 = ld_f32(acc + 32), c5 = ld_f32(acc + 40), c6 = ld_f32(acc + 48), c7 = ld_f32(acc + 56);
    for (int64_t t = 0; t < n; t++, v += D) {
        float w = p[t];
        c0 += w * ld_f32(v); c1 += w * ld_f32(v + 8); c2 += w * ld_f32(v + 16); c3 += w * ld_f32(v + 24);
        c4 += w * ld_f32(v + 32); c5 += w * ld_f32(v + 40); c6 += w * ld_f32(v + 48); c7 += w * ld_f32(v + 56);
    }
    st_f32(acc, c0); st_f32(acc + 8, c1); st_f32(acc + 16, c2); st_f32(acc + 24, c3);
    st_f32(acc + 32, c4); st_f32(acc + 40, c5); st_f32(acc + 48, c6); st_f32(acc + 56, c7);
}
/* the same for a last piece of w < 64 elements */
static void att_pv(const float *p, int64_t n, const float *v, int64_t D, int64_t w, float *acc) {
    for (int64_t t = 0; t < n; t++, v += D)
        for (int64_t i = 0; i < w; i++) acc[i] += p[t] * v[i];
}
#define ATT_MASKED -1e30f  /* the score of a masked position: exp(it - max) is 0 */

/* CT: the cache's element type; LD/ST convert it to/from fp32, LDV loads 8 of it as fp32; RND rounds a rotated q
 * or k as the model's dtype does (bf16: q and k are bf16 tensors after the rotation); the output is rounded by RND
 * too. */
#define ATTEND(NAME, CT, LD, ST, RND, LDV)                                                                       \
/* one chunk [t0, t1) of row b's kv head hk for its G query heads (rotated, qr [G8, D]: G rounded up to 8 with  \
 * zero rows): per head the max score pm[g], the sum of exp(score - max) pl[g] (0: no position allowed) and the  \
 * sum of v weighted so pa [G, D]. Each key is read once for 8 heads (8 sums in registers); each value once into \
 * a block of fp32 rows that every head then reads, 64 sums in registers at a time. */                                                           \
static void NAME##_chunk(const float *qr, int64_t G, int64_t D, const CT *kc, const CT *vc, int64_t T,          \
                         const int64_t *tb, int64_t b, int64_t Hkv, int64_t hk, int64_t t0, int64_t t1,         \
                         const uint8_t *mb, float scale, float *pm, float *pl, float *pa) {                     \
    int64_t n = t1 - t0, D8 = D & ~(int64_t)7;                                                                  \
    float s[G * n];                                                                                             \
    int any = 0;                                                                                                \
    for (int64_t g = 0; g < G; g++) { pm[g] = ATT_MASKED; pl[g] = 0.0f; }                                      \
    for (int64_t i = 0; i < G * D; i++) pa[i] = 0.0f;                                                           \
    for (int64_t t = t0, end; t < t1;) {                                                                        \
        const CT *kt = kc + kv_run(tb, b, Hkv, hk, T, t, t1, &end) * D;                                         \
        for (; t < end; t++, kt += D) {                                                                         \
            if (mb && !mb[t]) {                                                                                 \
                for (int64_t g = 0; g < G; g++) s[g * n + t - t0] = ATT_MASKED;                                 \
                continue;                                                                                       \
            }                                                                                                   \
            any = 1;                                                                                            \
            if (t + ATT_AHEAD < t1) {                                                                           \
                int64_t e;                                                                                      \
                fetch_row(kc, kv_run(tb, b, Hkv, hk, T, t + ATT_AHEAD, t1, &e) * D * (int64_t)sizeof(CT),       \
                          D * (int64_t)sizeof(CT));                                                             \
            }                                                                                                   \
            for (int64_t g0 = 0; g0 < G; g0 += 8) {                                                             \
                const float *qg = qr + g0 * D;                                                                  \
                v8f a[8] = {{0}};                                                                               \
                for (int64_t i = 0; i < D8; i += 8) {                                                           \
                    v8f kv = LDV(kt + i);                                                                       \
                    _Pragma("GCC unroll 8") for (int g = 0; g < 8; g++) a[g] += ld_f32(qg + g * D + i) * kv;   \
                }                                                                                               \
                v8f d = hsum8(a);                                                                               \
                for (int g = 0; g < 8 && g0 + g < G; g++) {                                                     \
                    float x = d[g];                                                                             \
                    for (int64_t i = D8; i < D; i++) x += qg[g * D + i] * LD(kt[i]);                            \
                    x *= scale;                                                                                 \
                    s[(g0 + g) * n + t - t0] = x;                                                               \
                    pm[g0 + g] = x > pm[g0 + g] ? x : pm[g0 + g];                                               \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
    }                                                                                                           \
    if (!any) return;                                                                                           \
    for (int64_t g = 0; g < G; g++) {                                                                           \
        float *sg = s + g * n, top = pm[g], total = 0.0f;                                                       \
        for (int64_t j = 0; j < n; j++) sg[j] = expf(sg[j] - top);                                              \
        for (int64_t j = 0; j < n; j++) total += sg[j];                                                         \
        pl[g] = total;                                                                                          \
        for (int64_t j = 0; j < n; j++) sg[j] = RND(sg[j]);  /* bf16: rounded before v, as SDPA's kernel */     \
    }                                                                                                           \
    float vb[ATT_BLOCK * D];                                                                                    \
    for (int64_t ta = t0; ta < t1; ta += ATT_BLOCK) {  /* a block of v as fp32 (masked rows 0), in L1 for all heads */ \
        int64_t te = ta + ATT_BLOCK < t1 ? ta + ATT_BLOCK : t1;                                                 \
        for (int64_t t = ta, end; t < te;) {                                                                    \
            const CT *vt = vc + kv_run(tb, b, Hkv, hk, T, t, te, &end) * D;                                     \
            for (; t < end; t++, vt += D) {                                                                     \
                float *row = vb + (t - ta) * D;                                                                 \
                if (t + ATT_AHEAD < t1) {                                                                       \
                    int64_t e;                                                                                  \
                    fetch_row(vc, kv_run(tb, b, Hkv, hk, T, t + ATT_AHEAD, t1, &e) * D * (int64_t)sizeof(CT),   \
                              D * (int64_t)sizeof(CT));                                                         \
                }                                                                                               \
                if (mb && !mb[t]) for (int64_t i = 0; i < D; i++) row[i] = 0.0f;                                \
                else for (int64_t i = 0; i < D; i++) row[i] = LD(vt[i]);                                        \
            }                                                                                                   \
        }                                                                                                       \
        for (int64_t g = 0; g < G; g++)                                                                         \
            for (int64_t i0 = 0; i0 < D; i0 += 64) {                                                            \
                const float *sg = s + g * n + ta - t0;                                                          \
                if (D - i0 >= 64) att_pv64(sg, te - ta, vb + i0, D, pa + g * D + i0);                           \
                else att_pv(sg, te - ta, vb + i0, D, D - i0, pa + g * D + i0);                                  \
            }                                                                                                   \
    }                                                                                                           \
}                                                                                                               \
void NAME(const float *q, const float *k, const float *v, int64_t xstride, int64_t B, int64_t H, int64_t Hkv,   \
          int64_t D, const float *cos, const float *sin, int rotation, CT *kc, CT *vc, int64_t T,               \
          int64_t pos, const int64_t *table, int64_t tstride, const int64_t *positions, const uint8_t *mask,     \
          int64_t mstride, float scale, float *out, int nthreads) {                                             \
    int64_t G = H / Hkv, half = D / 2, chunks = pos / ATT_CHUNK + 1, tasks = B * Hkv * chunks;                  \
    for (int64_t b = 0; b < B; b++)                                                                             \
        for (int64_t h = 0; h < Hkv; h++) {                                                                     \
            int64_t pb = positions ? positions[b] : pos, cb = table ? table[b * tstride + pb / T] : b;           \
            int64_t at = ((cb * Hkv + h) * T + (table ? pb % T : pb)) * D;                                      \
            float kr[D];                                                                                        \
            rotate(k + b * xstride + h * D, cos + b * half, sin + b * half, D, rotation, kr);               \
            for (int64_t i = 0; i < D; i++) {                                                                   \
                kc[at + i] = ST(RND(kr[i]));                                                                    \
                vc[at + i] = ST(v[b * xstride + h * D + i]);                                                    \
            }                                                                                                   \
        }                                                                                                       \
    float *parts = malloc(tasks * G * (D + 2) * sizeof(float));  /* per task: max [G], sum [G], acc [G, D] */   \
    _Pragma("omp parallel num_threads(nthreads)")                                                              \
    {                                                                                                           \
        _Pragma("omp for schedule(static, 1)")                                                                 \
        for (int64_t task = 0; task < tasks; task++) {                                                          \
            int64_t c = task % chunks, hk = task / chunks % Hkv, b = task / chunks / Hkv;                       \
            int64_t Lb = (positions ? positions[b] : pos) + 1, t0 = c * ATT_CHUNK;                              \
            float *pm = parts + task * G * (D + 2), *pl = pm + G, *pa = pl + G;                                 \
            if (t0 >= Lb) { for (int64_t g = 0; g < G; g++) pl[g] = 0.0f; continue; }                          \
            float qr[(G + 7) / 8 * 8 * D];                                                                      \
            for (int64_t i = G * D; i < (G + 7) / 8 * 8 * D; i++) qr[i] = 0.0f;                                 \
            for (int64_t g = 0; g < G; g++) {                                                                   \
                rotate(q + b * xstride + (hk * G + g) * D, cos + b * half, sin + b * half, D, rotation,         \
                       qr + g * D);                                                                             \
                for (int64_t i = 0; i < D; i++) qr[g * D + i] = RND(qr[g * D + i]);                             \
            }                                                                                                   \
            NAME##_chunk(qr, G, D, kc, vc, T, table ? table + b * tstride : 0, b, Hkv, hk, t0,                  \
                         t0 + ATT_CHUNK < Lb ? t0 + ATT_CHUNK : Lb, mask ? mask + b * mstride : 0, scale,       \
                         pm, pl, pa);                                                                           \
        }                                                                                                       \
        _Pragma("omp for schedule(static)")                                                                    \
        for (int64_t bh = 0; bh < B * H; bh++) {                                                                \
            int64_t b = bh / H, h = bh % H, hk = h / G, g = h % G;                                              \
            const float *first = parts + (b * Hkv + hk) * chunks * G * (D + 2);                                 \
            float top = -3.4e38f, total = 0.0f, acc[D];                                                         \
            for (int64_t c = 0; c < chunks; c++) {                                                              \
                const float *pm = first + c * G * (D + 2);                                                      \
                if (pm[G + g] > 0.0f && pm[g] > top) top = pm[g];                                               \
            }                                                                                                   \
            for (int64_t i = 0; i < D; i++) acc[i] = 0.0f;                                                      \
            for (int64_t c = 0; c < chunks; c++) {                                                              \
                const float *pm = first + c * G * (D + 2);                                                      \
                if (pm[G + g] <= 0.0f) continue;                                                                \
                float w = expf(pm[g] - top);                                                                    \
                total += w * pm[G + g];                                                                         \
                const float *pa = pm + 2 * G + g * D;                                                           \
                for (int64_t i = 0; i < D; i++) acc[i] += w * pa[i];                                            \
            }                                                                                                   \
            float inv = total > 0.0f ? 1.0f / total : 0.0f;                                                     \
            for (int64_t i = 0; i < D; i++) out[(b * H + h) * D + i] = RND(acc[i] * inv);                       \
        }                                                                                                       \
    }                                                                                                           \
    free(parts);                                                                                                \
}

static inline float same(float f) { return f; }

ATTEND(attend_f32, float, same, same, same, ld_f32)
ATTEND(attend_bf16, uint16_t, from_bf16, to_bf16, round_bf16, ld_bf16)

/* A projection for decode_layer: fmt 0 f32, 1 bf16, 2 int8, 3 int4, 4 int4 with fp16 scales (the formats of
 * gemv_*); w [O, I] in that format with wrow elements per row, scale/srow/G as for gemv_*; bias fp32 [O] or NULL;
 * bias16 a bf16 bias [O] or NULL (a bf16 model's own tensor, added in fp32 as the kernels add `bias`). */
typedef struct {
    int64_t fmt;
    const void *w;
    int64_t wrow;
    const void *scale;
    int64_t srow, G;
    const float *bias;
    int64_t O;
    const uint16_t *bias16;
} Mat;

/* wsel: as for gemv_* (NULL: one matrix) */
static void mat_sel(const Mat *m, const float *x, int64_t M, int64_t I, const int64_t *wsel, float *y, int nt) {
    int half = m->fmt == 4;
#define ARGS x, M, I, m->w, m->wrow, m->scale, half, m->srow, m->G, m->bias, wsel, m->O, y, nt
    switch (m->fmt) {
    case 0: gemv_f32(ARGS); break;
    case 1: gemv_bf16(ARGS); break;
    case 2: gemv_i8(ARGS); break;
    default: gemv_i4(ARGS); break;
    }
#undef ARGS
    if (m->bias16)
        for (int64_t r = 0; r < M; r++)
            for (int64_t o = 0; o < m->O; o++) y[r * m->O + o] += from_bf16(m->bias16[o]);
}
static void mat_apply(const Mat *m, const float *x, int64_t M, int64_t I, float *y, int nt) {
    mat_sel(m, x, M, I, 0, y, nt);
}

/* Matrix e of a stacked Mat (rows e * O .. e * O + O - 1 of its [E * O, I]). */
static Mat mat_part(const Mat *m, int64_t e) {
    static const int64_t bytes[5] = {4, 2, 1, 1, 1};
    Mat part = *m;
    part.w = (const char *)m->w + e * m->O * m->wrow * bytes[m->fmt];
    if (m->scale) part.scale = (const char *)m->scale + e * m->O * m->srow * (m->fmt == 4 ? 2 : 4);
    return part;
}

/* A mixture-of-experts block for moe_block / decode_layer (fp32 activations): the router [E, n] (fp32 or bf16,
 * computed in fp32), the routing `kind`, the stacked experts (gate_up: Mat of one expert, O = 2F rows [gate | up],
 * the experts' matrices one after another; down: O = n) and the shared experts' SwiGLU MLP (NULL: none).
 *   kind 0, ERNIE: p = softmax(logits); the K experts of largest p + bias (bias [E] or NULL: it only chooses; ties
 *     to the lower index); weights p[chosen] / max(sum p[chosen], norm_min).
 *   kind 1, PhiMoE's sparsemixer at inference (K = 2): pick the largest score s (ties to the lower index), mask
 *     the scores with (top - s) / max(|s|, top) > 2 * jitter, weight = softmax over the unmasked at the pick; the
 *     second pick the same with the first excluded. */
typedef struct {
    int64_t kind;
    const Mat *router;
    const float *bias;
    int64_t E, K;
    float norm_min, jitter;
    const Mat *gate_up, *down, *sgate_up, *sdown;
} Moe;

static int64_t argmax_from(const float *s, int64_t E, const uint8_t *skip) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; e++)
        if (!(skip && skip[e]) && (best < 0 || s[e] > s[best])) best = e;
    return best;
}

/* bf16: a bf16 model's sparsemixer (logits of bf16; the difference, the ratio and 2 * jitter rounded to bf16, as its
 * ops in bf16 round them); ERNIE's routing is fp32 in either */
static void route(const Moe *M, int bf16, const float *logit, int64_t *index, float *weight) {
    int64_t E = M->E, K = M->K;
    float p[E], score[E];
    uint8_t taken[E];
    memset(taken, 0, E);
    if (M->kind == 1) {
        float limit = bf16 ? round_bf16(2.0f * M->jitter) : 2.0f * M->jitter;
        for (int64_t k = 0; k < 2; k++) {
            int64_t pick = argmax_from(logit, E, taken);
            float top = logit[pick], total = 0.0f;
            for (int64_t e = 0; e < E; e++) {
                /* factor 0 (logit and top 0): PyTorch's 0 / 0 is NaN, not far; -ffast-math assumes no NaN */
                float factor = fabsf(logit[e]) > top ? fabsf(logit[e]) : top;
                float ratio = bf16 ? round_bf16(round_bf16(top - logit[e]) / factor) : (top - logit[e]) / factor;
                int far = factor > 0.0f && ratio > limit;
                if (!taken[e] && !far) total += expf(logit[e] - top);
            }
            index[k] = pick; weight[k] = 1.0f / total;
            taken[pick] = 1;
        }
        return;
    }
    float top = logit[argmax_from(logit, E, 0)], total = 0.0f, chosen = 0.0f;
    for (int64_t e = 0; e < E; e++) { p[e] = expf(logit[e] - top); total += p[e]; }
    for (int64_t e = 0; e < E; e++) { p[e] /= total; score[e] = p[e] + (M->bias ? M->bias[e] : 0.0f); }
    for (int64_t k = 0; k < K; k++) {
        index[k] = argmax_from(score, E, taken);
        taken[index[k]] = 1;
        chosen += p[index[k]];
    }
    float norm = chosen > M->norm_min ? chosen : M->norm_min;
    for (int64_t k = 0; k < K; k++) weight[k] = p[index[k]] / norm;
}

/* g / (1 + exp(-g)), exp's argument at most 88: exp(89) is inf, and -ffast-math divides by a reciprocal refined by
 * a Newton step, which makes g / inf NaN instead of -0 */
static inline float silu(float g) { return g / (1.0f + expf(fminf(-g, 88.0f))); }

/* silu(gate) * up for rows of [gate (F) | up (F)]; bf16: the inputs, silu and the product rounded as PyTorch's bf16
 * ops round them */
static void swiglu_rows(const float *gu, int64_t rows, int64_t F, int bf16, float *out) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < F; i++) {
            float g = gu[r * 2 * F + i], up = gu[r * 2 * F + F + i];
            if (bf16) { g = round_bf16(g); up = round_bf16(up); }
            float a = silu(g);
            out[r * F + i] = bf16 ? round_bf16(round_bf16(a) * up) : a * up;
        }
}

/* y[b] += sum_k weight[b, k] * expert_{index[b, k]}(h[b]) + shared(h[b]) for B rows h [B, n] (the order of the
 * model's sums); logits [B, E], index [B, K], weight [B, K] are written. The (row, choice) pairs are sorted by
 * expert, so each chosen expert's weights are read once for all the rows that chose it: int8/int4 experts in one
 * gemv call per projection (its runs of equal wsel), fp32/bf16 ones in a call per expert.
 * bf16 (a bf16 model; h and y bf16 values): rounded where PyTorch's bf16 ops round, the experts' outputs times the
 * bf16 weights summed per row in fp32 in ascending expert order and rounded once (as the op-by-op experts' fp32
 * index_add_), then + shared. */
static void moe_apply(const Moe *M, int bf16, const float *h, int64_t B, int64_t n, float *y, float *logits,
                      int64_t *index, float *weight, int nt) {
    int64_t E = M->E, K = M->K, F = M->gate_up->O / 2, pairs = B * K, c = 0;
    mat_apply(M->router, h, B, n, logits, nt);
    round_all(logits, B * E, bf16 && M->kind == 1);  /* PhiMoE's router is a bf16 model's bf16 Linear */
    for (int64_t b = 0; b < B; b++) route(M, bf16, logits + b * E, index + b * K, weight + b * K);
    int64_t *order = malloc(2 * pairs * sizeof(int64_t)), *sel = order + pairs;
    float *xg = malloc(pairs * (n + 3 * F + n) * sizeof(float)), *gu = xg + pairs * n, *act = gu + 2 * pairs * F;
    float *out = act + pairs * F;
    for (int64_t e = 0; e < E; e++)
        for (int64_t p = 0; p < pairs; p++)
            if (index[p] == e) { order[c] = p; sel[c] = e; memcpy(xg + c * n, h + (p / K) * n, n * sizeof(float)); c++; }
    if (M->gate_up->fmt >= 2) {
        mat_sel(M->gate_up, xg, pairs, n, sel, gu, nt);
        swiglu_rows(gu, pairs, F, bf16, act);
        mat_sel(M->down, act, pairs, F, sel, xg, nt);
    } else
        for (int64_t r = 0, r1; r < pairs; r = r1) {
            for (r1 = r + 1; r1 < pairs && sel[r1] == sel[r]; r1++) {}
            Mat gate_up = mat_part(M->gate_up, sel[r]), down = mat_part(M->down, sel[r]);
            mat_apply(&gate_up, xg + r * n, r1 - r, n, gu + r * 2 * F, nt);
            swiglu_rows(gu + r * 2 * F, r1 - r, F, bf16, act + r * F);
            mat_apply(&down, act + r * F, r1 - r, F, xg + r * n, nt);
        }
    for (int64_t r = 0; r < pairs; r++) memcpy(out + order[r] * n, xg + r * n, n * sizeof(float));
    float *shared = 0;
    if (M->sgate_up) {
        int64_t S = M->sgate_up->O / 2;
        float *sgu = malloc(B * (3 * S + n) * sizeof(float)), *sact = sgu + 2 * B * S;
        shared = sact + B * S;
        mat_apply(M->sgate_up, h, B, n, sgu, nt);
        swiglu_rows(sgu, B, S, bf16, sact);
        mat_apply(M->sdown, sact, B, S, shared, nt);
        shared = memmove(sgu, shared, B * n * sizeof(float));
    }
    if (bf16) {
        float *acc = out;  /* the experts' outputs are in xg (sorted) */
        memset(acc, 0, B * n * sizeof(float));
        for (int64_t r = 0; r < pairs; r++) {
            float w = round_bf16(weight[order[r]]), *a = acc + (order[r] / K) * n;
            for (int64_t i = 0; i < n; i++) a[i] += round_bf16(round_bf16(xg[r * n + i]) * w);
        }
        for (int64_t i = 0; i < B * n; i++) {
            float routed = round_bf16(acc[i]);
            y[i] = round_bf16(y[i] + (shared ? round_bf16(routed + round_bf16(shared[i])) : routed));
        }
    } else
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < n; i++) {
                float total = 0.0f;
                for (int64_t k = 0; k < K; k++) total += weight[b * K + k] * out[(b * K + k) * n + i];
                y[b * n + i] += shared ? total + shared[b * n + i] : total;
            }
    free(order); free(xg); free(shared);
}

void moe_block(const Moe *M, const float *h, int64_t B, int64_t n, float *y, float *logits, int64_t *index,
               float *weight, int nt) {
    moe_apply(M, 0, h, B, n, y, logits, index, weight, nt);
}

/* A decoder layer's fixed parts for decode_layer: RMSNorm weights (fp32, or bf16 for decode_layer_bf16) and eps,
 * the projections (gate_up NULL: the layer has an MoE block), head counts and size, rotary kind, attention scale;
 * b1 / b2 the norms' biases (fp32, or bf16 for decode_layer_bf16) where they are LayerNorms (NULL: RMSNorms). */
typedef struct {
    const void *n1, *n2;
    float eps1, eps2;
    const Mat *qkv, *o, *gate_up, *down;
    int64_t H, Hkv, D, rotation;
    float scale;
    const Moe *moe;
    const void *b1, *b2;
} Layer;

/* The norm rows as the model computes it: with a bias b (fp32 values), LayerNorm (layernorm_f32; bf16: the bf16
 * weight's values, the result rounded to bf16); else RMSNorm: fp32
 * w * x / sqrt(mean(x^2) + eps); bf16 (PyTorch's RMSNorm on bf16): the fp32 normalisation rounded to bf16, times the
 * bf16 weight, rounded again */
static void norm_rows(const float *x, const void *w, const void *b, int bf16, int64_t rows, int64_t n, float eps,
                      float *out) {
    if (b && bf16) {  /* PyTorch's LayerNorm on bf16: computed in fp32 (the bf16 weight's values), rounded once */
        float wf[n], bf[n];
        for (int64_t i = 0; i < n; i++) {
            wf[i] = from_bf16(((const uint16_t *)w)[i]);
            bf[i] = from_bf16(((const uint16_t *)b)[i]);
        }
        layernorm_f32(x, wf, bf, rows, n, eps, out);
        round_all(out, rows * n, 1);
        return;
    }
    if (b) { layernorm_f32(x, w, b, rows, n, eps, out); return; }
    if (!bf16) { rmsnorm_f32(x, w, rows, n, eps, out); return; }
    const uint16_t *wb = w;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float total = 0.0f;
        for (int64_t i = 0; i < n; i++) total += xr[i] * xr[i];
        float inv = 1.0f / sqrtf(total / (float)n + eps);
        for (int64_t i = 0; i < n; i++) out[r * n + i] = round_bf16(from_bf16(wb[i]) * round_bf16(xr[i] * inv));
    }
}

/* RMSNorm of bf16 rows x [rows, n] with a bf16 weight, as norm_rows computes it (PyTorch's RMSNorm on bf16) */
static void norm_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *b, int64_t rows, int64_t n, float eps,
                      uint16_t *out) {
    float xf[n], yf[n];
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < n; i++) xf[i] = from_bf16(x[r * n + i]);
        norm_rows(xf, w, b, 1, 1, n, eps, yf);
        for (int64_t i = 0; i < n; i++) out[r * n + i] = to_bf16(yf[i]);
    }
}
void rmsnorm_bf16(const uint16_t *x, const uint16_t *w, int64_t rows, int64_t n, float eps, uint16_t *out) {
    norm_bf16(x, w, NULL, rows, n, eps, out);
}
/* LayerNorm of bf16 rows x [rows, n], bf16 weight and bias (NULL: none), as norm_rows computes it (PyTorch's
 * LayerNorm on bf16) */
void layernorm_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *b, int64_t rows, int64_t n, float eps,
                    uint16_t *out) {
    uint16_t zero[n];  /* bf16 +0 */
    memset(zero, 0, sizeof(zero));
    norm_bf16(x, w, b ? b : zero, rows, n, eps, out);
}

/* One decoder layer for one new position per row (decoding), activations x [B, n] (fp32 values; with bf16, values
 * of bf16 and every step rounded to bf16 as PyTorch's bf16 ops round their results):
 *   y = x + o(attention(qkv(norm(x, n1))))              (attention as attend_f32 / attend_bf16, static cache;
 *                                                       norm: RMSNorm, or LayerNorm with b1 / b2, see norm_rows)
 *   h = norm(y, n2)
 *   y += down(silu(gate) * up), gate|up = gate_up(h)   (only with gate_up: a dense SwiGLU MLP)
 *   y += moe(h), router logits [B, E] to `logits`       (only with moe; with neither, the caller runs its MoE
 *                                                       block on h)
 * qkv's output is [q (H D) | k (Hkv D) | v (Hkv D)]; gate_up's [gate (F) | up (F)]. */
static void layer_step(const Layer *L, int bf16, const float *x, int64_t B, int64_t n, const float *cos,
                       const float *sin, void *kc, void *vc, int64_t T, int64_t pos, const int64_t *table,
                       int64_t tstride, const int64_t *positions, const uint8_t *mask, int64_t mstride, float *y,
                       float *h, float *logits, int nt) {
    int64_t H = L->H, Hkv = L->Hkv, D = L->D, F = L->gate_up ? L->gate_up->O / 2 : 0, width = L->qkv->O;
    int64_t big = width > 2 * F ? width : 2 * F;
    float *proj = malloc(B * (big > n ? big : n) * sizeof(float));
    float *att = malloc(B * (H * D > F ? H * D : F) * sizeof(float));
    norm_rows(x, L->n1, L->b1, bf16, B, n, L->eps1, h);
    mat_apply(L->qkv, h, B, n, proj, nt);
    round_all(proj, B * width, bf16);
    if (bf16)
        attend_bf16(proj, proj + H * D, proj + (H + Hkv) * D, width, B, H, Hkv, D, cos, sin, (int)L->rotation,
                    kc, vc, T, pos, table, tstride, positions, mask, mstride, L->scale, att, nt);
    else
        attend_f32(proj, proj + H * D, proj + (H + Hkv) * D, width, B, H, Hkv, D, cos, sin, (int)L->rotation,
                   kc, vc, T, pos, table, tstride, positions, mask, mstride, L->scale, att, nt);
    mat_apply(L->o, att, B, H * D, y, nt);
    for (int64_t i = 0; i < B * n; i++) y[i] = bf16 ? round_bf16(round_bf16(y[i]) + x[i]) : y[i] + x[i];
    norm_rows(y, L->n2, L->b2, bf16, B, n, L->eps2, h);
    if (L->moe) {
        int64_t *index = malloc(B * L->moe->K * sizeof(int64_t));
        float *weight = malloc(B * L->moe->K * sizeof(float));
        moe_apply(L->moe, bf16, h, B, n, y, logits, index, weight, nt);
        free(index); free(weight);
    }
    if (L->gate_up) {
        mat_apply(L->gate_up, h, B, n, proj, nt);
        round_all(proj, B * 2 * F, bf16);
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < F; i++) {
                float g = proj[b * 2 * F + i], a = silu(g), up = proj[b * 2 * F + F + i];
                att[b * F + i] = bf16 ? round_bf16(round_bf16(a) * up) : a * up;
            }
        float *out = proj;  /* the gate_up output is no longer needed */
        mat_apply(L->down, att, B, F, out, nt);
        for (int64_t i = 0; i < B * n; i++) y[i] = bf16 ? round_bf16(round_bf16(out[i]) + y[i]) : y[i] + out[i];
    }
    free(proj); free(att);
}

void decode_layer(const Layer *L, const float *x, int64_t B, int64_t n, const float *cos, const float *sin,
                  float *kc, float *vc, int64_t T, int64_t pos, const int64_t *table, int64_t tstride,
                  const int64_t *positions, const uint8_t *mask, int64_t mstride, float *y, float *h, float *logits,
                  int nt) {
    layer_step(L, 0, x, B, n, cos, sin, kc, vc, T, pos, table, tstride, positions, mask, mstride, y, h, logits, nt);
}

/* A whole decoding step through `layers` decoder layers in one call, each as decode_layer computes it with its
 * dense MLP or MoE block (L[l]->moe) included: x [B, n] -> y [B, n] (fp32, or with bf16 a bf16 model's values, as
 * decode_layer_bf16: rounded where its PyTorch ops round, so chaining in fp32 is exact), layer l with its own cache
 * kc[l] / vc[l] and nt[l] threads; the MoE layers' router logits [B, E] one after another in `logits`. */
void decode_layers(const Layer *const *L, const int *nt, int64_t layers, int bf16, const void *x, int64_t B, int64_t n,
                   const float *cos, const float *sin, void *const *kc, void *const *vc, int64_t T, int64_t pos,
                   const int64_t *table, int64_t tstride, const int64_t *positions, const uint8_t *mask,
                   int64_t mstride, void *y, float *logits) {
    float *base = malloc(3 * B * n * sizeof(float)), *a = base, *b = a + B * n, *h = b + B * n;
    for (int64_t i = 0; i < B * n; i++) a[i] = bf16 ? from_bf16(((const uint16_t *)x)[i]) : ((const float *)x)[i];
    for (int64_t l = 0; l < layers; l++) {
        layer_step(L[l], bf16, a, B, n, cos, sin, kc[l], vc[l], T, pos, table, tstride, positions, mask, mstride, b, h,
                   logits, nt[l]);
        if (L[l]->moe) logits += B * L[l]->moe->E;
        float *t = a; a = b; b = t;
    }
    for (int64_t i = 0; i < B * n; i++) {
        if (bf16) ((uint16_t *)y)[i] = to_bf16(a[i]);
        else ((float *)y)[i] = a[i];
    }
    free(base);
}

/* decode_layer for a bf16 model: x, y, h and the cache bf16; norms bf16; projections bf16 (fmt 1, bf16 biases) */
void decode_layer_bf16(const Layer *L, const uint16_t *x, int64_t B, int64_t n, const float *cos, const float *sin,
                       uint16_t *kc, uint16_t *vc, int64_t T, int64_t pos, const int64_t *table, int64_t tstride,
                       const int64_t *positions, const uint8_t *mask, int64_t mstride, uint16_t *y, uint16_t *h,
                       float *logits, int nt) {
    float *xf = malloc(3 * B * n * sizeof(float)), *yf = xf + B * n, *hf = yf + B * n;
    for (int64_t i = 0; i < B * n; i++) xf[i] = from_bf16(x[i]);
    layer_step(L, 1, xf, B, n, cos, sin, kc, vc, T, pos, table, tstride, positions, mask, mstride, yf, hf, logits,
               nt);
    for (int64_t i = 0; i < B * n; i++) { y[i] = to_bf16(yf[i]); h[i] = to_bf16(hf[i]); }
    free(xf);
}
