/* fp32 matrix product for prefill: y[M, N] = x[M, K] . w[N, K]^T (+ bias[N]), w a Linear's weight, row-major.
 *
 * Computed as y^T = w . x^T so that the big operand, w, is read in its own layout and never repacked: x (tens to
 * hundreds of rows) is packed once per call into panels of 16 rows transposed, xt[panel][k][16]. The microkernel
 * takes 6 rows of w and one panel: 12 accumulators of 8 lanes (6 w rows x 16 x rows), per k two loads of the panel
 * and 6 broadcasts of w, 12 multiply-adds. Loops: threads split w's rows; each thread runs K in blocks of KC so
 * that the 6 w rows of a block (6 KC floats) stay in L1 while every panel of that block (16 KC floats each) comes
 * from L2; y's tiles (stored transposed, see gemm_f32) are written on the first block and accumulated after.
 * Written with GCC vector extensions: the compiler emits the machine's FMA SIMD (AVX2 here, AVX-512 registers of
 * the same width elsewhere). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v8f __attribute__((vector_size(32)));

#define MR 6    /* rows of w per microkernel */
#define NR 16   /* rows of x per panel */
#define KC 768  /* k per block */

static inline v8f ld(const float *p) { v8f v; memcpy(&v, p, 32); return v; }

/* acc[i][j] (x row j of the panel, w row i) over k in [0, kc): w rows at w + i * ldw, panel p [kc][16]. Rows of w
 * past `mr` are not read (their sums are not stored). */
static inline void kernel(const float *w, int64_t ldw, int mr, const float *p, int64_t kc, float out[MR][NR]) {
    v8f a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0}, c0 = {0}, c1 = {0}, d0 = {0}, d1 = {0}, e0 = {0}, e1 = {0},
        f0 = {0}, f1 = {0};
    const float *w0 = w, *w1 = w + (mr > 1) * ldw, *w2 = w + (mr > 2) * 2 * ldw, *w3 = w + (mr > 3) * 3 * ldw,
                *w4 = w + (mr > 4) * 4 * ldw, *w5 = w + (mr > 5) * 5 * ldw;
    for (int64_t k = 0; k < kc; k++) {
        v8f x0 = ld(p + k * NR), x1 = ld(p + k * NR + 8);
        v8f s;
        s = (v8f){} + w0[k]; a0 += s * x0; a1 += s * x1;
        s = (v8f){} + w1[k]; b0 += s * x0; b1 += s * x1;
        s = (v8f){} + w2[k]; c0 += s * x0; c1 += s * x1;
        s = (v8f){} + w3[k]; d0 += s * x0; d1 += s * x1;
        s = (v8f){} + w4[k]; e0 += s * x0; e1 += s * x1;
        s = (v8f){} + w5[k]; f0 += s * x0; f1 += s * x1;
    }
    v8f acc[MR][2] = {{a0, a1}, {b0, b1}, {c0, c1}, {d0, d1}, {e0, e1}, {f0, f1}};
    memcpy(out, acc, sizeof(acc));
}

/* yt [N, Mp] (Mp = M rounded up to 16): y transposed, so that a tile's 6 w rows are 6 runs of 16 contiguous floats
 * (vector stores); the caller views it as y [M, N]. */
void gemm_f32(const float *x, int64_t M, int64_t K, const float *w, int64_t N, const float *bias, float *yt,
              int nthreads) {
    int64_t panels = (M + NR - 1) / NR, mp = panels * NR;
    float *xt = aligned_alloc(64, (size_t)panels * K * NR * sizeof(float));
    /* x^T in panels of 16 rows, rows past M zero */
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")
    for (int64_t p = 0; p < panels; p++)
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < NR; j++) {
                int64_t m = p * NR + j;
                xt[(p * K + k) * NR + j] = m < M ? x[m * K + k] : 0.0f;
            }
    int64_t groups = (N + MR - 1) / MR;
    _Pragma("omp parallel num_threads(nthreads)")
    {
        int nt = 1, id = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads(); id = omp_get_thread_num();
#endif
        int64_t g0 = groups * id / nt, g1 = groups * (id + 1) / nt;
        float out[MR][NR];
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
            int64_t kc = K - k0 < KC ? K - k0 : KC;
            for (int64_t g = g0; g < g1; g++) {
                int64_t n = g * MR;
                int mr = N - n < MR ? (int)(N - n) : MR;
                for (int64_t p = 0; p < panels; p++) {
                    kernel(w + n * K + k0, K, mr, xt + (p * K + k0) * NR, kc, out);
                    for (int i = 0; i < mr; i++) {
                        float *yr = yt + (n + i) * mp + p * NR;
                        v8f lo = ld(out[i]), hi = ld(out[i] + 8);
                        if (k0) { lo += ld(yr); hi += ld(yr + 8); }
                        else if (bias) { lo += bias[n + i]; hi += bias[n + i]; }
                        memcpy(yr, &lo, 32); memcpy(yr + 8, &hi, 32);
                    }
                }
            }
        }
    }
    free(xt);
}
