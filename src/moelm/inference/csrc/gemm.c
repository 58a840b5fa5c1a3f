/* fp32 matrix product for prefill: y[M, N] = x[M, K] . w[N, K]^T (+ bias[N]), w a Linear's weight, row-major.
 *
 * Computed as y^T = w . x^T so that the big operand, w, is read in its own layout and never repacked: x (tens to
 * hundreds of rows) is packed once per call into panels of 16 rows transposed, xt[panel][k][16]. The microkernel
 * takes MR rows of w and one panel: per k the panel's loads, MR broadcasts of w and MR x 16 lanes of
 * multiply-adds. Loops: threads split w's rows; each thread runs K in blocks of KC so
 * that the MR w rows of a block (MR KC floats) stay in L1 while every panel of that block (16 KC floats each) comes
 * from L2; y's tiles (stored transposed, see gemm_f32) are written on the first block and accumulated after.
 * Written with GCC vector extensions. With AVX-512 a panel is one 512-bit vector and the microkernel takes 12 rows
 * of w (12 accumulators); else two 256-bit vectors and 6 rows. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v8f __attribute__((vector_size(32)));
#ifdef __AVX512F__
typedef float vf __attribute__((vector_size(64)));  /* a panel's 16 rows in one 512-bit vector */
#define MR 12   /* rows of w per microkernel */
#define PV 1    /* vectors per panel */
#else
typedef v8f vf;
#define MR 6
#define PV 2
#endif
#define NR 16   /* rows of x per panel */
#ifndef KC
#define KC 512  /* k per block */
#endif

static inline v8f ld(const float *p) { v8f v; memcpy(&v, p, 32); return v; }
static inline vf ldv(const float *p) { vf v; memcpy(&v, p, sizeof(vf)); return v; }

/* acc[i][j] (x row j of the panel, w row i) over k in [0, kc): w rows at w + i * ldw, panel p [kc][16]. Rows of w
 * past `mr` are not read (their sums are not stored). */
static inline void kernel(const float *w, int64_t ldw, int mr, const float *p, int64_t kc, const float *pf,
                          float out[MR][NR]) {
    vf acc[MR][PV];
    const float *wr[MR];
    _Pragma("GCC unroll 12") for (int i = 0; i < MR; i++) {
        wr[i] = w + (i < mr ? i : 0) * ldw;
        _Pragma("GCC unroll 2") for (int v = 0; v < PV; v++) acc[i][v] = (vf){0};
    }
    for (int64_t k = 0; k < kc; k++) {
        if (pf && !(k & 15))  /* the next rows' block, a line of each every 16 k, while these are computed */
            _Pragma("GCC unroll 12") for (int i = 0; i < MR; i++) __builtin_prefetch(pf + i * ldw + k, 0, 3);
        vf x[PV];
        _Pragma("GCC unroll 2") for (int v = 0; v < PV; v++) x[v] = ldv(p + k * NR + v * (NR / PV));
        _Pragma("GCC unroll 12") for (int i = 0; i < MR; i++) {
            vf s = (vf){0} + wr[i][k];
            _Pragma("GCC unroll 2") for (int v = 0; v < PV; v++) acc[i][v] += s * x[v];
        }
    }
    memcpy(out, acc, sizeof(acc));
}

/* yt [N, Mp] (Mp = M rounded up to 16): y transposed, so that a tile's MR w rows are MR runs of 16 contiguous floats
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
                    const float *next = p || g + 1 >= g1 ? 0 : w + (n + MR) * K + k0;
                    kernel(w + n * K + k0, K, mr, xt + (p * K + k0) * NR, kc, next, out);
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
