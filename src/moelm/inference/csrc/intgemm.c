/* Integer matrix product for prefill with int8 / int4 weights: y[M, N] = x[M, K] . w[N, K]^T, computed as llama.cpp
 * does, on int8 pairs with int32 sums.
 *
 * x is quantized per row per block of QB = 32 inputs (intgemm_quantize): d = max|x| / 127 (computed as max|x| *
 * (1/127)), xq = round-half-even(x * (1/d)) in [-127, 127]. A block's integer dot with the weight codes (int8 q in
 * [-127, 127] or int4 n - 8) is scaled by d times the weight's scale (its row's for int8, its group's for int4;
 * every group size is a multiple of 32, so a block lies in one group) and summed in fp32.
 *
 * The weights are read in moelm's packing (quantization.py) and unpacked a tile of NW rows at a time (the whole K)
 * into a thread's buffer, interleaved so that one vector holds 4 consecutive inputs of each of its rows: tile
 * [K/4][NW][4] bytes. That tile then serves every row of x: a broadcast of 4 bytes of one x row times one tile
 * vector gives each of NW rows its 4-input dot in its own int32 lane (no horizontal sums), R = 4 rows of x at a time
 * (2 or 1 for the rows left over).
 * Variants (intgemm_variants() says which were compiled for this CPU):
 *   0 AVX2: vpmaddubsw + vpmaddwd. int4: the codes n in [0, 15] are the unsigned side, pair sums <= 2*15*127 stay
 *     in int16 over a whole block (16 products <= 30480); int8: |x| is the unsigned side and the sign moves onto the
 *     weight (vpsignb), pair sums <= 2*127*127 = 32258 do not saturate.
 *   1 AVX-VNNI (256-bit vpdpbusd), 2 AVX512-VNNI (512-bit vpdpbusd): the weight is the unsigned side as w + off
 *     (off = 128 for int8, 8 for int4: the stored nibble), and off * sum(xq of the block) is taken off each block.
 * The weights are unpacked by gathers (int4) or 4 bytes of a row at a time (int8) (unpack), or by 8 x 8 transposes
 * of whole 32-byte row pieces (unpack_t), as the caller says (kernels.py measures which is faster on this CPU).
 *   3 AMX-INT8: signed codes on both sides (int4 n - 8 in the tile), no offset to take off; the tile as AMX B tiles
 *     of 16 rows a block (8 x 64 bytes), 16 rows of x an A tile (16 x 32 bytes), one tdpbssd per block into a C
 *     tile, stored and scaled in AVX-512 as the other variants scale their sums (the same integers, the same fp32
 *     operations: equal bits). x's buffers are padded to 16 rows. Linux lends a process the tile registers only on request (arch_prctl), made
 *     once by intgemm_variants(); each thread configures its tiles in the call and releases them after.
 * Threads split the tiles (output rows) in intgemm, whole experts in intgemm_experts. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AMX_INT8__) && defined(__AVX512F__) && defined(__linux__)
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define QB 32  /* inputs per activation block */

#ifdef HAVE_AMX
/* Whether Linux lets this process use the AMX tile data (asked once; granted for every thread) */
static int amx_allowed(void) {
    static int allowed = -1;
    if (allowed < 0) allowed = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return allowed;
}
#endif

int intgemm_variants(void) {
    int mask = 0;
#ifdef __AVX2__
    mask |= 1;
#endif
#ifdef __AVXVNNI__
    mask |= 2;
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    mask |= 4;
#endif
#ifdef HAVE_AMX
    if (amx_allowed()) mask |= 8;
#endif
    return mask;
}

/* One block of QB inputs -> its int8 codes, step and code sum; a block holding a NaN gets a NaN step, so the
 * rows' outputs are NaN as a float product's would be (fmaxf drops NaNs, and -ffast-math folds isnan away: a bit
 * test finds them) */
static inline void quantize_block(const float *xb, int8_t *xq, float *d, int32_t *xsum) {
    float big = 0.0f;
    uint32_t worst = 0;
    for (int i = 0; i < QB; i++) {
        uint32_t u;
        memcpy(&u, xb + i, 4);
        u &= 0x7fffffffu;
        worst = u > worst ? u : worst;
        big = fmaxf(big, fabsf(xb[i]));
    }
    if (worst > 0x7f800000u) {
        memset(xq, 0, QB);
        memcpy(d, &worst, 4);  /* a NaN */
        *xsum = 0;
        return;
    }
    /* at least FLT_MIN: a smaller step has no finite inverse (blocks of |x| < 1.5e-36) */
    float step = big > 0.0f ? fmaxf(big * (1.0f / 127.0f), FLT_MIN) : 0.0f, inv = step > 0.0f ? 1.0f / step : 0.0f;
    int32_t total = 0;
    for (int i = 0; i < QB; i++) {
        float q = nearbyintf(xb[i] * inv);
        q = q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q;
        xq[i] = (int8_t)q;
        total += (int32_t)q;
    }
    *d = step;
    *xsum = total;
}

/* x [M, K] -> xq [M, K], d [M, K/QB], xsum [M, K/QB] (the sum of a block's xq) */
void intgemm_quantize(const float *x, int64_t M, int64_t K, int8_t *xq, float *d, int32_t *xsum, int nthreads) {
    int64_t blocks = M * (K / QB);
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")
    for (int64_t b = 0; b < blocks; b++) quantize_block(x + b * QB, xq + b * QB, d + b, xsum + b);
}

#ifdef __AVX2__
#include <immintrin.h>

float half_to_float(uint16_t h);  /* gemv.c */

static inline float h2f(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    return half_to_float(h);
#endif
}

/* 8 rows of 8 dwords -> its 8 columns: c[k] = (r[0][k], ..., r[7][k]) */
static inline void transpose8(const __m256i *r, __m256i *c) {
    __m256i t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int k = 0; k < 4; k++) {
        c[k] = _mm256_permute2x128_si256(u[k], u[k + 4], 0x20);
        c[k + 4] = _mm256_permute2x128_si256(u[k], u[k + 4], 0x31);
    }
}

/* The scales of rows n0 .. n0 + nw (fp32, or fp16 when half) -> ts [groups][NW] fp32, 0 for rows past nw; whole
 * 8 x 8 blocks of fp16 scales widened by F16C and transposed */
static void tile_scales(const void *scale, int half, int64_t srow, int64_t groups, int64_t n0, int nw, int NW,
                        float *ts) {
    int64_t s0 = 0;
#ifdef __F16C__
    if (half && nw == NW)
        for (; s0 + 8 <= groups; s0 += 8)
            for (int r0 = 0; r0 < NW; r0 += 8) {
                __m256i r[8], c[8];
                for (int i = 0; i < 8; i++)
                    r[i] = _mm256_castps_si256(_mm256_cvtph_ps(_mm_loadu_si128(
                        (const __m128i *)((const uint16_t *)scale + (n0 + r0 + i) * srow + s0))));
                transpose8(r, c);
                for (int k = 0; k < 8; k++) _mm256_storeu_si256((__m256i *)(ts + (s0 + k) * NW + r0), c[k]);
            }
#endif
    for (int r = 0; r < NW; r++) {
        int64_t i = (n0 + r) * srow;
        if (r >= nw)
            for (int64_t s = s0; s < groups; s++) ts[s * NW + r] = 0.0f;
        else if (half)
            for (int64_t s = s0; s < groups; s++) ts[s * NW + r] = h2f(((const uint16_t *)scale)[i + s]);
        else
            for (int64_t s = s0; s < groups; s++) ts[s * NW + r] = ((const float *)scale)[i + s];
    }
}

/* Rows n0 .. n0 + nw of w (nw <= NW) -> tile [K/4][NW][4] and their scales ts [groups][NW]; a byte of the tile is
 * the int8 code xor each byte of off (0x80: + 128), or the int4 nibble + each byte of off (0xF8: - 8, signed)
 * (groups = K / G, G = K for int8); rows past nw repeat row nw - 1 with scale 0. g4 = 0: int8 rows of wrow bytes,
 * 4 bytes at a time; else int4 pairs with group size g4, 4 bytes of 8 rows at a time by one gather (on Zen 5 1.7x
 * the scalar loop for 6 rows of x, the same for 64, with the weights in cache; slower than it for int8). */
static void unpack(const uint8_t *w, int64_t wrow, const void *scale, int f16, int64_t srow, int64_t g4, int64_t K,
                   int64_t n0, int nw, int NW, uint32_t off, uint8_t *tile, float *ts) {
    int64_t groups = g4 ? K / g4 : 1, half = g4 / 2;
    tile_scales(scale, f16, srow, groups, n0, nw, NW, ts);
    if (!g4) {
        for (int r = 0; r < NW; r++) {
            const uint8_t *wr = w + (n0 + (r < nw ? r : nw - 1)) * wrow;
            uint32_t *t = (uint32_t *)tile + r;
            for (int64_t k4 = 0; k4 < K / 4; k4++) {
                uint32_t v;
                memcpy(&v, wr + 4 * k4, 4);
                t[k4 * NW] = v ^ off;  /* off = 0x80808080: the byte q + 128 */
            }
        }
        return;
    }
    const uint8_t *base = w + n0 * wrow;
    const __m256i low = _mm256_set1_epi8(15), add = _mm256_set1_epi32((int32_t)off);
    for (int r0 = 0; r0 < NW; r0 += 8) {
        int32_t at[8];
        for (int i = 0; i < 8; i++) at[i] = (int32_t)((r0 + i < nw ? r0 + i : nw - 1) * wrow);
        __m256i idx = _mm256_loadu_si256((const __m256i *)at);
        uint8_t *t = tile + r0 * 4;
        for (int64_t s = 0; s < groups; s++)
            for (int64_t j = 0; j < half; j += 4) {
                __m256i v = _mm256_i32gather_epi32((const int *)(base + s * half + j), idx, 1);
                _mm256_storeu_si256((__m256i *)(t + (s * g4 + j) / 4 * NW * 4),
                                    _mm256_add_epi8(_mm256_and_si256(v, low), add));
                _mm256_storeu_si256((__m256i *)(t + (s * g4 + half + j) / 4 * NW * 4),
                                    _mm256_add_epi8(_mm256_and_si256(_mm256_srli_epi16(v, 4), low), add));
            }
    }
}

/* unpack without gathers or a row's 4-byte steps: 32 bytes of each of 8 rows loaded and transposed as 8 x 8 dwords,
 * each column what one gather of unpack gives (int8: 4 bytes of each row; int4: split into its low and high
 * nibbles; with off as unpack applies it); every row read in order, which the hardware prefetchers follow (on Zen 5 with int4 weights in memory,
 * not cache: 2.3x the gathers for 24 rows of x). All NW rows at each step, so that each line of the tile is written
 * whole at once (a quarter at a time, it came back from L2 four times), and the next tile's rows prefetched into L2
 * as these are read (into L1 they evicted the tile). int4 needs K a multiple of 64 (whole 32-byte loads); otherwise
 * unpack. */
static void unpack_t(const uint8_t *w, int64_t wrow, const void *scale, int f16, int64_t srow, int64_t g4,
                     int64_t K, int64_t n0, int nw, int NW, uint32_t off, uint8_t *tile, float *ts) {
    int64_t half = g4 / 2, bytes = g4 ? K / 2 : K;
    tile_scales(scale, f16, srow, g4 ? K / g4 : 1, n0, nw, NW, ts);
    const __m256i low = _mm256_set1_epi8(15), flip = _mm256_set1_epi32((int32_t)off);
    const uint8_t *row[32];
    for (int i = 0; i < NW; i++) row[i] = w + (n0 + (i < nw ? i : nw - 1)) * wrow;
    const uint8_t *ahead = w + (n0 + NW) * wrow;
    int64_t s = 0, j = 0;  /* int4: the group and the byte in it of the next 4 bytes (p = s * half + j) */
    for (int64_t p = 0; p < bytes; p += 32) {
        for (int i = 0; i < 32 * NW; i += 64) _mm_prefetch((const char *)(ahead + NW * p + i), _MM_HINT_T1);
        for (int r0 = 0; r0 < NW; r0 += 8) {
            __m256i r[8], c[8];
            for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_si256((const __m256i *)(row[r0 + i] + p));
            transpose8(r, c);
            if (!g4) {
                for (int k = 0; k < 8; k++)
                    _mm256_storeu_si256((__m256i *)(tile + ((p / 4 + k) * NW + r0) * 4), _mm256_xor_si256(c[k], flip));
                continue;
            }
            int64_t s1 = s, j1 = j;
            for (int k = 0; k < 8; k++) {
                uint8_t *lo = tile + (s1 * g4 + j1) * NW + r0 * 4, *hi = lo + half * NW;
                _mm256_storeu_si256((__m256i *)lo, _mm256_add_epi8(_mm256_and_si256(c[k], low), flip));
                _mm256_storeu_si256((__m256i *)hi,
                                    _mm256_add_epi8(_mm256_and_si256(_mm256_srli_epi16(c[k], 4), low), flip));
                if ((j1 += 4) == half) { j1 = 0; s1++; }
            }
        }
        if (g4 && (j += 32) >= half) { s += j / half; j %= half; }
    }
}

/* The microkernel for one variant and R rows of x: rows m0 .. m0 + mr of x (mr <= R) against a tile of
 * NW = W * LANES rows: y[m][n0 + i] for i < nw. BLOCK(acc) starts a block's integer sums, STEP(acc, w, xb) adds
 * one vector of 4 inputs (xb: 4 bytes of x broadcast), END(acc) gives the block's int32 dots. */
#define KERNEL_R(NAME, R, VI, VF, LANES, W, ZERO, BCAST, LOAD, STEP, END, SUB, CVT, LDF, SETF, FMA, MULF, STOREF) \
static void NAME(const uint8_t *tile, const float *ts, int64_t gblocks, const int8_t *xq, const float *d,        \
                 const int32_t *xsum, int64_t K, int64_t m0, int mr, int32_t off, int64_t n0, int nw, float *y,  \
                 int64_t N) {                                                                                     \
    enum { NW = (W) * (LANES) };                                                                                  \
    int64_t blocks = K / QB;                                                                                      \
    const int8_t *xr[R];                                                                                          \
    for (int r = 0; r < R; r++) xr[r] = xq + (m0 + (r < mr ? r : 0)) * K;                                         \
    VF acc[R][W];                                                                                                 \
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)                                                           \
        _Pragma("GCC unroll 2") for (int v = 0; v < W; v++) acc[r][v] = SETF(0.0f);                               \
    for (int64_t b = 0; b < blocks; b++) {                                                                        \
        VI ia[R][W];                                                                                              \
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)                                                       \
            _Pragma("GCC unroll 2") for (int v = 0; v < W; v++) ia[r][v] = ZERO;                                  \
        const uint8_t *t = tile + b * (QB / 4) * NW * 4;                                                          \
        _Pragma("GCC unroll 8") for (int s = 0; s < QB / 4; s++) {                                                \
            VI wv[W];                                                                                             \
            _Pragma("GCC unroll 2") for (int v = 0; v < W; v++) wv[v] = LOAD(t + (s * NW + v * LANES) * 4);      \
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {                                                 \
                int32_t x4;                                                                                       \
                memcpy(&x4, xr[r] + b * QB + s * 4, 4);                                                           \
                VI xb = BCAST(x4);                                                                                \
                _Pragma("GCC unroll 2") for (int v = 0; v < W; v++) ia[r][v] = STEP(ia[r][v], wv[v], xb);         \
            }                                                                                                     \
        }                                                                                                         \
        const float *sg = ts + (b / gblocks) * NW;                                                                \
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {                                                     \
            int64_t m = m0 + (r < mr ? r : 0);                                                                    \
            VI comp = BCAST(off * xsum[m * blocks + b]);                                                          \
            VF dx = SETF(d[m * blocks + b]);                                                                      \
            _Pragma("GCC unroll 2") for (int v = 0; v < W; v++)                                                   \
                acc[r][v] = FMA(CVT(SUB(END(ia[r][v]), comp)), MULF(LDF(sg + v * LANES), dx), acc[r][v]);         \
        }                                                                                                         \
    }                                                                                                             \
    for (int r = 0; r < mr; r++) {                                                                                \
        float out[NW];                                                                                            \
        for (int v = 0; v < W; v++) STOREF(out + v * LANES, acc[r][v]);                                           \
        memcpy(y + (m0 + r) * N + n0, out, nw * sizeof(float));                                                   \
    }                                                                                                             \
}

/* The microkernel for R = 4 rows of x and for 2 and 1 (the rows left over) */
#define KERNEL(NAME, ...) KERNEL_R(NAME##_4, 4, __VA_ARGS__) KERNEL_R(NAME##_2, 2, __VA_ARGS__)                    \
    KERNEL_R(NAME##_1, 1, __VA_ARGS__)

#define LD256(p) _mm256_loadu_si256((const __m256i *)(p))
#define ST256F(p, v) _mm256_storeu_ps(p, v)
/* signed int8 x signed int8 by vpmaddubsw (unsigned x signed): |w| (read as unsigned, so a code of -128 is 128)
 * against x with w's sign (x is in [-127, 127], so its negation never wraps); a pair's sum is at most 2 x 128 x 127,
 * within int16 */
static inline __m256i a2_step8(__m256i acc, __m256i w, __m256i xb) {
    __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(xb, w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
static inline __m256i a2_step4(__m256i acc, __m256i w, __m256i xb) {
    return _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, xb));
}
static inline __m256i a2_end4(__m256i acc) { return _mm256_madd_epi16(acc, _mm256_set1_epi16(1)); }
static inline __m256i ident(__m256i a) { return a; }
KERNEL(kern_avx2_i8, __m256i, __m256, 8, 1, _mm256_setzero_si256(), _mm256_set1_epi32, LD256, a2_step8, ident,
       _mm256_sub_epi32, _mm256_cvtepi32_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_mul_ps, ST256F)
KERNEL(kern_avx2_i4, __m256i, __m256, 8, 1, _mm256_setzero_si256(), _mm256_set1_epi32, LD256, a2_step4, a2_end4,
       _mm256_sub_epi32, _mm256_cvtepi32_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_mul_ps, ST256F)
#ifdef __AVXVNNI__
static inline __m256i vnni256(__m256i acc, __m256i w, __m256i xb) { return _mm256_dpbusd_avx_epi32(acc, w, xb); }
KERNEL(kern_vnni256, __m256i, __m256, 8, 1, _mm256_setzero_si256(), _mm256_set1_epi32, LD256, vnni256, ident,
       _mm256_sub_epi32, _mm256_cvtepi32_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_mul_ps, ST256F)
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define LD512(p) _mm512_loadu_si512((const void *)(p))
static inline __m512i ident512(__m512i a) { return a; }
KERNEL(kern_vnni512, __m512i, __m512, 16, 2, _mm512_setzero_si512(), _mm512_set1_epi32, LD512, _mm512_dpbusd_epi32,
       ident512, _mm512_sub_epi32, _mm512_cvtepi32_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_fmadd_ps,
       _mm512_mul_ps, _mm512_storeu_ps)
#endif

#ifdef HAVE_AMX
typedef struct { uint8_t palette, start; uint8_t reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } TileConfig;

/* The tiles: 0 and 4 A (16 rows of x, one block of QB bytes each), 1 and 5 B (a block of the weight tile: QB / 4
 * rows of 16 x 4 bytes), 2 and 3 C (16 x 16 int32). Static: a configuration on the stack can lose its stores, the
 * compiler not seeing ldtilecfg read them (llama.cpp's AMX kernels crashed so, its PR 26954). */
static const TileConfig amx_config __attribute__((aligned(64))) = {
    .palette = 1, .colsb = {QB, 64, 64, 64, QB, 64}, .rows = {16, QB / 4, 16, 16, 16, QB / 4}};

static void amx_begin(void) { _tile_loadconfig(&amx_config); }

/* One block's C tile (stored in c) scaled into the 16 rows' sums, as KERNEL_R scales its int32 lanes */
static inline void amx_scale(__m512 *acc, int32_t (*c)[16], const float *sg, const float *d, int64_t blocks,
                             int64_t b) {
    __m512 s = _mm512_loadu_ps(sg);
    _Pragma("GCC unroll 16") for (int r = 0; r < 16; r++)
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c[r])),
                                 _mm512_mul_ps(s, _mm512_set1_ps(d[r * blocks + b])), acc[r]);
}

/* Rows m0 .. m0 + mr of x (mr <= 16; x's buffers hold 16 rows from m0) against a tile of 16 weight rows, two blocks
 * at a time in two C tiles, so that one block's products overlap the other's scaling */
static void kern_amx(const uint8_t *tile, const float *ts, int64_t gblocks, const int8_t *xq, const float *d,
                     const int32_t *xsum, int64_t K, int64_t m0, int mr, int32_t off, int64_t n0, int nw, float *y,
                     int64_t N) {
    int64_t blocks = K / QB, b = 0;
    const int8_t *x = xq + m0 * K;
    const float *dm = d + m0 * blocks;
    int32_t c0[16][16] __attribute__((aligned(64))), c1[16][16] __attribute__((aligned(64)));
    __m512 acc[16];
    for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
    for (; b + 1 < blocks; b += 2) {
        _tile_loadd(0, x + b * QB, K);
        _tile_loadd(1, tile + b * QB * 16, 64);
        _tile_loadd(4, x + (b + 1) * QB, K);
        _tile_loadd(5, tile + (b + 1) * QB * 16, 64);
        _tile_zero(2);
        _tile_zero(3);
        _tile_dpbssd(2, 0, 1);
        _tile_dpbssd(3, 4, 5);
        _tile_stored(2, c0, 64);
        amx_scale(acc, c0, ts + (b / gblocks) * 16, dm, blocks, b);
        _tile_stored(3, c1, 64);
        amx_scale(acc, c1, ts + ((b + 1) / gblocks) * 16, dm, blocks, b + 1);
    }
    if (b < blocks) {
        _tile_loadd(0, x + b * QB, K);
        _tile_loadd(1, tile + b * QB * 16, 64);
        _tile_zero(2);
        _tile_dpbssd(2, 0, 1);
        _tile_stored(2, c0, 64);
        amx_scale(acc, c0, ts + (b / gblocks) * 16, dm, blocks, b);
    }
    for (int r = 0; r < mr; r++) {
        float out[16];
        _mm512_storeu_ps(out, acc[r]);
        memcpy(y + (m0 + r) * N + n0, out, nw * sizeof(float));
    }
}
#endif

typedef void (*kernel_fn)(const uint8_t *, const float *, int64_t, const int8_t *, const float *, const int32_t *,
                          int64_t, int64_t, int, int32_t, int64_t, int, float *, int64_t);

/* A variant's kernel for int8 (g4 = 0) or int4 weights, its tile width and offsets; kern = 0 if not compiled */
/* R: the rows of x a kern call takes (kern2 and kern1 take 2 and 1); AMX: 16, any number up to it in one kernel, x's
 * buffers padded to it */
typedef struct { kernel_fn kern, kern2, kern1; int NW; int32_t off; uint32_t tile_off; int R, amx; } Variant;

#define SET_KERNELS(v, NAME) ((v).kern = NAME##_4, (v).kern2 = NAME##_2, (v).kern1 = NAME##_1)

static Variant variant_for(int variant, int64_t g4) {
    Variant v = {0, 0, 0, 8, g4 ? 8 : 128, g4 ? 0 : 0x80808080u, 4, 0};
    if (variant == 0) {
        if (g4) SET_KERNELS(v, kern_avx2_i4);
        else SET_KERNELS(v, kern_avx2_i8);
        v.off = g4 ? 8 : 0;
        v.tile_off = 0;
    }
#ifdef __AVXVNNI__
    if (variant == 1) SET_KERNELS(v, kern_vnni256);
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (variant == 2) { SET_KERNELS(v, kern_vnni512); v.NW = 32; }
#endif
#ifdef HAVE_AMX
    if (variant == 3) {
        v.kern = v.kern2 = v.kern1 = kern_amx;
        v.NW = 16, v.R = 16, v.amx = 1, v.off = 0, v.tile_off = g4 ? 0xF8F8F8F8u : 0;
    }
#endif
    return v;
}

/* The calling thread's tiles, around its share of a call: configured for kern_amx, then left as they were found
 * (another library's configuration reloaded, or released), so that code that configures a thread's tiles once and
 * keeps them (llama.cpp's AMX kernels do) still finds its own in that thread */
#ifdef HAVE_AMX
typedef struct { TileConfig before; } Tiles;
#else
typedef struct { char unused; } Tiles;
#endif

static void tiles_on(const Variant *v, Tiles *t) {
#ifdef HAVE_AMX
    if (v->amx) {
        _tile_storeconfig(&t->before);
        amx_begin();
    }
#endif
}

static void tiles_off(const Variant *v, Tiles *t) {
#ifdef HAVE_AMX
    if (v->amx) {
        if (t->before.palette) _tile_loadconfig(&t->before);
        else _tile_release();
    }
#endif
}

/* Rows of x's buffers for M rows: padded to a whole kern call */
static int64_t padded_rows(const Variant *v, int64_t M) { return (M + v->R - 1) / v->R * v->R; }

/* A packed weight: int8 w [N, wrow] (g4 = 0, scale [N]) or int4 pairs (group size g4, scale [N, srow], fp16 when
 * half) */
typedef struct { const void *w; int64_t wrow; const void *scale; int half; int64_t srow, g4, N; } Weight;

/* Tiles t0 .. t1 of W against quantized rows (xq, d, xsum) of x [M, K] -> y [M, N], on this thread's tile
 * buffers */
static void run_tiles(const Variant *v, const Weight *W, const int8_t *xq, const float *d, const int32_t *xsum,
                      int64_t M, int64_t K, float *y, int transposed, int64_t t0, int64_t t1, uint8_t *tile,
                      float *ts) {
    int64_t gblocks = W->g4 ? W->g4 / QB : K / QB;
    for (int64_t t = t0; t < t1; t++) {
        int64_t n0 = t * v->NW;
        int nw = W->N - n0 < v->NW ? (int)(W->N - n0) : v->NW;
        (transposed && (!W->g4 || K % 64 == 0) ? unpack_t : unpack)(
            W->w, W->wrow, W->scale, W->half, W->srow, W->g4, K, n0, nw, v->NW, v->tile_off, tile, ts);
        for (int64_t m0 = 0; m0 < M;) {  /* 4 rows at a time (3 left: 4 with one unused), then 2, then 1 */
            int64_t left = M - m0;
            int mr = v->R > 4 ? (int)(left < v->R ? left : v->R) : left >= 3 ? (left < 4 ? 3 : 4) : (int)left;
            (mr >= 3 ? v->kern : mr == 2 ? v->kern2 : v->kern1)(tile, ts, gblocks, xq, d, xsum, K, m0, mr, v->off,
                                                                 n0, nw, y, W->N);
            m0 += mr;
        }
    }
}

static int64_t ts_bytes(int64_t K, int64_t g4, int NW) {
    return ((( g4 ? K / g4 : 1) * NW * (int64_t)sizeof(float) + 63) / 64) * 64;
}

/* y [M, N] = x [M, K] . w^T: int8 w [N, wrow] (g4 = 0, scale [N]) or int4 pairs (group size g4, scale
 * [N, srow], fp16 when half); K a multiple of 32 (of g4 for int4). variant as intgemm_variants() numbers them;
 * transposed: the weights unpacked by unpack_t. Threads split the tiles. Returns -1 if that variant was not
 * compiled, else 0. */
int intgemm(const float *x, int64_t M, int64_t K, const void *w, int64_t wrow, const void *scale, int half,
            int64_t srow, int64_t g4, int64_t N, float *y, int variant, int transposed, int nthreads) {
    if (!(intgemm_variants() >> variant & 1)) return -1;
    Variant v = variant_for(variant, g4);
    if (!v.kern) return -1;
    Weight W = {w, wrow, scale, half, srow, g4, N};
    int64_t blocks = K / QB, Mp = padded_rows(&v, M);
    int8_t *xq = calloc(Mp * K, 1);
    float *d = calloc(Mp * blocks, sizeof(float));
    int32_t *xsum = calloc(Mp * blocks, sizeof(int32_t));
    intgemm_quantize(x, M, K, xq, d, xsum, nthreads);
    int64_t tiles = (N + v.NW - 1) / v.NW;
    _Pragma("omp parallel num_threads(nthreads)")
    {
        uint8_t *tile = aligned_alloc(64, K * v.NW);
        float *ts = aligned_alloc(64, ts_bytes(K, g4, v.NW));
        Tiles state __attribute__((aligned(64)));
        tiles_on(&v, &state);
        _Pragma("omp for schedule(static)")
        for (int64_t t = 0; t < tiles; t++) run_tiles(&v, &W, xq, d, xsum, M, K, y, transposed, t, t + 1, tile, ts);
        tiles_off(&v, &state);
        free(tile);
        free(ts);
    }
    free(xq); free(d); free(xsum);
    return 0;
}

/* rows [M, K] -> their int8 blocks, on this thread */
static void quantize_rows1(const float *x, int64_t M, int64_t K, int8_t *xq, float *d, int32_t *xsum) {
    for (int64_t b = 0; b < M * (K / QB); b++) quantize_block(x + b * QB, xq + b * QB, d + b, xsum + b);
}

/* The routed experts of a prefill in one call: out [T, H] = sum over each token's chosen experts of weight *
 * down(silu(gate) * up) of its row of x [T, H], computed as intgemm computes each product (the same integers and
 * fp32 operations, so each expert's rows equal intgemm's), gate_up [E, 2I, H'] (gate rows first) and down
 * [E, H, I'] with their scales (per row: H / g4 and I / g4 for int4; fp16 where ghalf / dhalf). The pairs come
 * sorted by expert: token [P], weight [P] and counts [E]. Each thread takes whole experts (the threads' shares of
 * the pairs balanced by a fixed rule, so the result does not depend on timing) and sums its experts' outputs in
 * expert order into its own buffer; the buffers are added in thread order. Returns -1 if the variant was not
 * compiled, else 0. */
int intgemm_experts(const float *x, int64_t T, int64_t H, int64_t I, const int64_t *token, const float *weight,
                    const int64_t *counts, int64_t E, const uint8_t *gw, const uint8_t *gs, const uint8_t *dw,
                    const uint8_t *ds, int ghalf, int dhalf, int64_t g4, float *out, int variant, int transposed,
                    int nthreads) {
    if (!(intgemm_variants() >> variant & 1)) return -1;
    Variant v = variant_for(variant, g4);
    if (!v.kern) return -1;
    int64_t gwrow = g4 ? H / 2 : H, dwrow = g4 ? I / 2 : I, gsrow = g4 ? H / g4 : 1, dsrow = g4 ? I / g4 : 1;
    int64_t most = 0, total = 0;
    int64_t *start = malloc((E + 1) * sizeof(int64_t)), *owner = malloc(E * sizeof(int64_t));
    start[0] = 0;
    for (int64_t e = 0; e < E; e++) {
        start[e + 1] = start[e] + counts[e];
        most = counts[e] > most ? counts[e] : most;
    }
    total = start[E];
    most = padded_rows(&v, most);
    /* expert e to the thread whose share of the pairs its middle falls in */
    for (int64_t e = 0; e < E; e++) owner[e] = (start[e] + start[e + 1]) * nthreads / (2 * (total ? total : 1));
    float *parts = calloc((size_t)(nthreads > 1 ? nthreads - 1 : 0) * T * H + 1, sizeof(float));
    _Pragma("omp parallel num_threads(nthreads)")
    {
        int me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        float *acc = me == 0 ? out : parts + (int64_t)(me - 1) * T * H;
        int64_t wide = H > 2 * I ? H : 2 * I, kmax = H > I ? H : I;
        uint8_t *tile = aligned_alloc(64, kmax * v.NW);
        float *ts = aligned_alloc(64, ts_bytes(kmax, g4, v.NW));
        float *xs = malloc(most * wide * sizeof(float)), *h = malloc(most * wide * sizeof(float));
        int8_t *xq = calloc(most * kmax, 1);
        float *d = calloc(most * (kmax / QB), sizeof(float));
        int32_t *xsum = calloc(most * (kmax / QB), sizeof(int32_t));
        Tiles state __attribute__((aligned(64)));
        tiles_on(&v, &state);
        for (int64_t e = 0; e < E; e++) {
            int64_t c = counts[e];
            if (!c || owner[e] != me) continue;
            const int64_t *tok = token + start[e];
            for (int64_t r = 0; r < c; r++) memcpy(xs + r * H, x + tok[r] * H, H * sizeof(float));
            quantize_rows1(xs, c, H, xq, d, xsum);
            Weight G = {gw + e * 2 * I * gwrow, gwrow, gs + e * 2 * I * gsrow * (ghalf ? 2 : 4), ghalf, gsrow, g4,
                        2 * I};
            run_tiles(&v, &G, xq, d, xsum, c, H, h, transposed, 0, (2 * I + v.NW - 1) / v.NW, tile, ts);
            for (int64_t r = 0; r < c; r++) {  /* silu(gate) * up -> xs [c, I]; exp(89) is inf: see gemv.c's silu */
                const float *gate = h + r * 2 * I, *up = gate + I;
                for (int64_t i = 0; i < I; i++) xs[r * I + i] = gate[i] / (1.0f + expf(fminf(-gate[i], 88.0f))) * up[i];
            }
            quantize_rows1(xs, c, I, xq, d, xsum);
            Weight D = {dw + e * H * dwrow, dwrow, ds + e * H * dsrow * (dhalf ? 2 : 4), dhalf, dsrow, g4, H};
            run_tiles(&v, &D, xq, d, xsum, c, I, h, transposed, 0, (H + v.NW - 1) / v.NW, tile, ts);
            for (int64_t r = 0; r < c; r++) {
                float wt = weight[start[e] + r], *o = acc + tok[r] * H;
                const float *y = h + r * H;
                for (int64_t j = 0; j < H; j++) o[j] += y[j] * wt;
            }
        }
        tiles_off(&v, &state);
        free(tile); free(ts); free(xs); free(h); free(xq); free(d); free(xsum);
    }
    for (int t = 1; t < nthreads; t++) {
        const float *p = parts + (int64_t)(t - 1) * T * H;
        for (int64_t i = 0; i < T * H; i++) out[i] += p[i];
    }
    free(parts); free(start); free(owner);
    return 0;
}
#else
int intgemm(const float *x, int64_t M, int64_t K, const void *w, int64_t wrow, const void *scale, int half,
            int64_t srow, int64_t g4, int64_t N, float *y, int variant, int transposed, int nthreads) {
    return -1;
}
int intgemm_experts(const float *x, int64_t T, int64_t H, int64_t I, const int64_t *token, const float *weight,
                    const int64_t *counts, int64_t E, const uint8_t *gw, const uint8_t *gs, const uint8_t *dw,
                    const uint8_t *ds, int ghalf, int dhalf, int64_t g4, float *out, int variant, int transposed,
                    int nthreads) {
    return -1;
}
#endif
